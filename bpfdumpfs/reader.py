"""Serving one open seq_file to FUSE reads.

FUSE reads are answered on the device's worker threads (device.py), so a kernel
read of a seq_file -- which runs the BPF program and cannot be polled -- simply
blocks the worker that got the FUSE read; the pool keeps other workers reading
/dev/fuse for everyone else. A reader that streams (two full chunks in a row)
gets a producer thread that keeps reading the kernel, at most READ_AHEAD chunks
ahead, so the kernel's work overlaps the FUSE round trips instead of waiting
for them.

The seq_file is closed at release, or, if a thread is still inside a kernel
read, the moment that read returns.
"""
from __future__ import annotations

import collections
import errno
import logging
import threading
import time
from dataclasses import dataclass

from .dumpers import DumperError, Stream

log = logging.getLogger(__name__)

QUICK_NS = 300_000        # a dumper is quick while its kernel reads average less
LEARN_READS = 3           # reads before a dumper may be called quick
STREAMING_AFTER = 2       # full chunks in a row before a producer takes over
READ_AHEAD = 3            # chunks a producer may hold for its reader


@dataclass
class Pace:
    """What the kernel reads of one dumper took, as a moving average."""
    reads: int = 0
    avg_ns: float = 0.0

    @property
    def quick(self) -> bool:
        return self.reads >= LEARN_READS and self.avg_ns < QUICK_NS

    def record(self, ns: int) -> None:
        self.reads += 1
        # one slow read weighs enough to make the dumper slow at once
        self.avg_ns = ns if ns > QUICK_NS else 0.8 * self.avg_ns + 0.2 * ns


class Reader:
    """FUSE-facing reads of one Stream, from the calling thread or a producer."""

    def __init__(self, stream: Stream, pace: Pace) -> None:
        self.stream = stream
        self.pace = pace
        self.serial = threading.Lock()   # one FUSE read of this file at a time
        self.guard = threading.Lock()    # guards what follows
        self.cond: threading.Condition | None = None  # wakes reader and producer, if any
        self.pending = bytearray()   # read from the kernel, not yet given to the reader
        self.chunks: collections.deque[bytearray] = collections.deque()  # the producer's
        self.eof = False
        self.error: DumperError | None = None
        self.full_reads = 0
        self.producing = False
        self.produced_all = False
        self.busy = 0                # threads inside a kernel read of the stream
        self.released = False

    @property
    def quick(self) -> bool:
        """Whether the next read is sure to be answered without a long wait."""
        return self.eof or self.error is not None or bool(self.chunks) or \
            (not self.producing and self.pace.quick)

    def read(self, size: int) -> bytearray:
        """Up to SIZE bytes, short only at the end; raises DumperError from the kernel."""
        with self.serial:
            if self.producing:
                self._from_producer(size)
            elif len(self.pending) < size and not self.eof and not self.error:
                self._fill(size - len(self.pending))
            if self.error and not self.pending:
                raise self.error
            if len(self.pending) <= size:  # the common case: hand the buffer over, no copy
                out, self.pending = self.pending, bytearray()
            else:
                out = self.pending[:size]
                del self.pending[:size]
            self.full_reads = self.full_reads + 1 if len(out) == size else 0
            if (self.full_reads >= STREAMING_AFTER and not self.producing and not self.eof
                    and not self.error):
                self._start_producer(size)
            return out

    def _fill(self, size: int) -> None:
        if not self._enter():
            raise DumperError(errno.EBADF, f"reading dumper {self.stream.label}: released")
        t0 = time.monotonic_ns()
        try:
            data = self.stream.fill(size)
        except DumperError as e:
            self.error = e
        else:
            self.pace.record(time.monotonic_ns() - t0)
            if self.pending:
                self.pending += data
            else:
                self.pending = data  # no copy
            self.eof = self.stream.eof
        finally:
            self._leave()

    # -- the producer ---------------------------------------------------------------
    def _start_producer(self, size: int) -> None:
        if not self._enter():
            return
        self.cond = threading.Condition(self.guard)  # made here: most opens never stream
        self.producing = True
        threading.Thread(target=self._produce, args=(size,), daemon=True,
                         name=f"produce {self.stream.label}").start()

    def _produce(self, size: int) -> None:
        """Read chunks ahead until EOF, an error, or release."""
        try:
            while True:
                with self.cond:
                    while len(self.chunks) >= READ_AHEAD and not self.released:
                        self.cond.wait()
                    if self.released:
                        return
                try:
                    data = self.stream.fill(size)
                except DumperError as e:
                    self.error = e
                    return
                except Exception as e:  # a bug here must fail this reader, not the daemon
                    log.exception("reading %s", self.stream.label)
                    self.error = DumperError(errno.EIO, f"reading dumper {self.stream.label}: "
                                             f"internal error {e!r}")
                    return
                with self.cond:
                    self.chunks.append(data)
                    self.cond.notify_all()
                if self.stream.eof:
                    return
        finally:
            with self.cond:
                self.produced_all = True
                self.cond.notify_all()
            self._leave()

    def _from_producer(self, size: int) -> None:
        """Move produced chunks to pending until SIZE bytes are there or nothing is left."""
        with self.cond:
            while True:
                if self.chunks and not self.pending:
                    self.pending = self.chunks.popleft()  # take it whole, no copy
                while self.chunks and len(self.pending) < size:
                    self.pending += self.chunks.popleft()
                self.cond.notify_all()
                finished = self.produced_all and not self.chunks
                if len(self.pending) >= size or finished:
                    self.eof = finished and not self.error
                    return
                self.cond.wait()

    # -- the end --------------------------------------------------------------------
    def _enter(self) -> bool:
        """Count a thread into the stream; False once released."""
        with self.guard:
            if self.released:
                return False
            self.busy += 1
            return True

    def _leave(self) -> None:
        with self.guard:
            self.busy -= 1
            done = self.released and not self.busy
        if done:
            self.stream.close()

    def release(self) -> None:
        with self.guard:
            self.released = True
            if self.cond is not None:
                self.cond.notify_all()
            done = not self.busy
        if done:
            self.stream.close()
