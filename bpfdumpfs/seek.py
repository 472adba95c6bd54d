"""Offsets in a dumper file, as seq_lseek gives them to a kernel seq_file.

A BPF iterator's seq_file cannot seek (its pin in bpffs answers ESPIPE), but the
/proc files users know can, and `head -n`, `tail`, `less`, `pread`, `dd skip=`,
splice and sendfile count on it. So a dumper file takes any offset:

- at the current position, a read streams on (reader.py);
- ahead of it, the output in between is read and passed over;
- behind it, within the last BACK bytes this open produced, it is served from
  them (`{ head -n 1; head -n 1; } < FILE`, `less` paging back a little);
- further back, the iterator is run again from the start, in a new seq_file
  made as the open made its own, and read on to the offset -- what seq_lseek
  itself does, re-running ->start from position 0.

Every open keeps its own bytes: nothing is shared between opens, and nothing
beyond BACK bytes is kept, so a huge dump is never held whole.
"""
from __future__ import annotations

import errno
import threading
from collections.abc import Callable

from .errors import DumperError
from .reader import KERNEL_BUF, Reader

BACK = 64 << 10        # bytes behind the position kept to serve a short seek back
SKIP_READ = 8 * KERNEL_BUF  # bytes read at a time while passing over output


class Seekable:
    """One open dumper file: a Reader at a position, and how to start it over."""

    def __init__(self, reader: Reader, remake: Callable[[], Reader], pos: int = 0,
                 back: bytes = b"") -> None:
        self.reader = reader
        self.remake = remake           # a new Reader of a new seq_file, made as the first
        self.pos = pos                 # offset of the next byte the reader gives
        # a copy of the last bytes before pos: references to the pieces would hold a
        # 1-byte view, and a 32 KiB kernel chunk behind it, per byte `dd bs=1` read
        self.back = bytearray(back)
        self.cond = threading.Condition()
        self.parked = False            # a read left with the producer is yet to be answered
        self.released = False
        self.swap = threading.Lock()   # guards released and swapping the reader, briefly

    def quick(self, offset: int) -> bool:
        """Whether a read at OFFSET is sure to be answered without a long wait."""
        return offset == self.pos and not self.parked and self.reader.quick

    @property
    def streaming(self) -> bool:
        return self.reader.streaming

    def read(self, offset: int, size: int) -> list:
        """Up to SIZE bytes at OFFSET, short only at the end; raises DumperError."""
        with self.cond:
            while self.parked:
                self.cond.wait()
            out = []
            if offset < self.pos:
                if offset >= self.pos - len(self.back):
                    start = offset - (self.pos - len(self.back))
                    out = [self.back[start:start + size]]  # a copy: back changes
                    offset += len(out[0])
                    size -= len(out[0])
                    if not size:
                        return out
                else:
                    self._replay()
            if offset > self.pos and not self._pass_over(offset - self.pos):
                return out  # the dump ends before OFFSET
            pieces = self.reader.read(size)
            self._advance(pieces)
            return out + pieces

    def park(self, offset: int, size: int, deliver) -> bool:
        """Leave a read at the position with the reader's producer (Reader.park); False
        if it is elsewhere, or if another read is under way (never waits for it)."""
        if offset != self.pos or not self.cond.acquire(blocking=False):
            return False
        try:
            if self.parked or offset != self.pos:
                return False

            def done(result) -> None:
                with self.cond:
                    if isinstance(result, list):
                        self._advance(result)
                    self.parked = False
                    self.cond.notify_all()
                deliver(result)

            self.parked = self.reader.park(size, done)
            return self.parked
        finally:
            self.cond.release()

    def release(self) -> None:
        """Close now, without waiting for a read under way (a killed reader's RELEASE
        comes while its read is still in the kernel): that read ends on its own."""
        with self.swap:
            self.released = True
            reader = self.reader
        reader.release()

    # -- under the lock -------------------------------------------------------------
    def _pass_over(self, n: int) -> bool:
        """Read N bytes on and keep only the last BACK; False if the dump ends first."""
        while n:
            got = self.reader.read(min(n, SKIP_READ))
            self._advance(got)
            if not _length(got):
                return False
            n -= _length(got)
        return True

    def _replay(self) -> None:
        """Start over from offset 0 in a new seq_file."""
        fresh = self.remake()
        with self.swap:
            old, released = self.reader, self.released
            if not released:
                self.reader = fresh
        (fresh if released else old).release()
        if released:
            raise DumperError(errno.EBADF, f"reading dumper {old.stream.label}: released")
        self.pos = 0
        self.back.clear()

    def _advance(self, pieces: list) -> None:
        """Move pos past PIECES, keeping the last BACK bytes (copying at most BACK)."""
        n = _length(pieces)
        self.pos += n
        if n >= BACK:
            self.back.clear()
        skip = max(0, n - BACK)  # bytes of PIECES too far back to keep
        for piece in pieces:
            if skip >= len(piece):
                skip -= len(piece)
                continue
            self.back += memoryview(piece)[skip:]
            skip = 0
        del self.back[:max(0, len(self.back) - BACK)]


def _length(pieces: list) -> int:
    return sum(map(len, pieces))
