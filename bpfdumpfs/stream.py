"""seq_file streams: reading what one kernel seq_file of a dumper prints.

A Stream is the file object of one BPF_ITER_CREATE fd: its reads run the dumper's
program. It reads the kernel's buffer whole at each read, retries the kernel's
EAGAIN (a program that printed nothing for an object) up to MAX_EAGAIN in a row,
and turns the kernel's E2BIG and EOPNOTSUPP into errors that say what to change.
"""
from __future__ import annotations

import errno
import io
import logging
import os

from .errors import DumperError

log = logging.getLogger(__name__)

KERNEL_BUF = 8 * os.sysconf("SC_PAGE_SIZE")  # bpf_seq_read's buffer: one read drains it
MAX_EAGAIN = 10_000     # EAGAINs in a row; a million silent objects make only one
E2BIG_HINT = ("one object's output is larger than the kernel's seq_file buffer (32 KiB); "
              "make the program print less per object")
EOPNOTSUPP_HINT = ("this target can fill only one buffer per seq_file (the cgroup iterator); "
                   "narrow the dump, e.g. with --order self or children")



def kernel_error(label: str, err: int) -> DumperError:
    """What a read of dumper LABEL failing with ERR says (EAGAIN: after MAX_EAGAIN)."""
    if err == errno.EAGAIN:
        return DumperError(err, f"reading dumper {label}: the program asked {MAX_EAGAIN} "
                           "times in a row to run an object again",
                           "return 1 only to retry an object once in a while; "
                           "return 0 to go on")
    hint = {errno.E2BIG: E2BIG_HINT, errno.EOPNOTSUPP: EOPNOTSUPP_HINT}.get(err, "")
    return DumperError(err, f"reading dumper {label}", hint)


class Stream(io.RawIOBase):
    """One kernel seq_file: a read-once, unseekable stream of a dumper's output.

    Every kernel read gets room for a whole kernel buffer (KERNEL_BUF): the cgroup
    iterator fails any read after one that left output behind. EAGAIN (the
    program returned 1, or a million objects gave no output) is read again and
    never reaches the reader, unless it never stops (a program that returns 1
    for the same object forever). E2BIG and EOPNOTSUPP become DumperError naming
    the dumper and the cause.
    """

    def __init__(self, fd: int, label: str) -> None:
        super().__init__()
        self.fd = fd
        self.label = label
        # read from the kernel, beyond what readinto() was asked
        self._surplus: bytes | memoryview = b""

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def readinto(self, buf) -> int:
        """Some bytes into BUF (at most a kernel buffer's worth); 0 at the end."""
        data = self._surplus or memoryview(self.read_chunk())
        n = min(len(buf), len(data))
        buf[:n] = data[:n]
        self._surplus = data[n:]
        return n

    def read_chunk(self) -> bytes:
        """One kernel read: what one run of the program over some objects printed (up to
        a kernel buffer's worth); b"" at the end. Raises DumperError."""
        again = 0
        while True:
            try:
                data = os.read(self.fd, KERNEL_BUF)
            except BlockingIOError:
                again += 1
                if again < MAX_EAGAIN:
                    continue
                raise kernel_error(self.label, errno.EAGAIN) from None
            except OSError as e:
                raise kernel_error(self.label, e.errno or errno.EIO) from None
            return data

    def close(self) -> None:
        if not self.closed and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        super().close()

