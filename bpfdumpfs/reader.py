"""Serving one open seq_file to FUSE reads without stalling anyone.

A kernel read of a seq_file runs the BPF program on the caller's thread and
cannot be polled, so it is either done inline (blocking the event loop) or in a
worker thread (about 0.15 ms per hand-off). The choice is made per dumper from
what its reads took before:

- a dumper whose kernel reads are quick (a moving average under 0.3 ms, after a
  few reads in threads to learn it) is read inline: a small dump costs no thread
  hand-off at all;
- any other dumper (new, slow or large) is read in worker threads, and once a
  reader streams (asks for full chunks), the next chunk is read ahead while the
  current one travels to the reader, so the kernel's work overlaps FUSE's.
A quick dumper that turns slow moves back to threads after one slow read.

At most one chunk is read ahead per open file, so memory stays bounded. The
seq_file is closed at release, or, if a worker is still inside read(), the
moment that read returns.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import trio

from .dumpers import DumperError, Stream

log = logging.getLogger(__name__)

INLINE_MAX_NS = 300_000   # inline only while reads average less than this
LEARN_READS = 3           # reads done in threads before a dumper may be read inline


@dataclass
class Pace:
    """What the kernel reads of one dumper took, as a moving average."""
    reads: int = 0
    avg_ns: float = 0.0

    @property
    def inline(self) -> bool:
        return self.reads >= LEARN_READS and self.avg_ns < INLINE_MAX_NS

    def record(self, ns: int) -> None:
        self.reads += 1
        # one slow read weighs enough to move the dumper back to threads at once
        self.avg_ns = ns if ns > INLINE_MAX_NS else 0.8 * self.avg_ns + 0.2 * ns


class Reader:
    """FUSE-facing reads of one Stream: inline or threaded, with read-ahead."""

    def __init__(self, stream: Stream, pace: Pace, limiter: trio.CapacityLimiter,
                 nursery: trio.Nursery) -> None:
        self.stream = stream
        self.pace = pace
        self.limiter = limiter
        self.nursery = nursery
        self.pending = bytearray()   # read from the kernel, not yet given to the reader
        self.eof = False
        self.error: DumperError | None = None
        self.ahead: trio.Event | None = None   # set when the read-ahead chunk is in
        self.busy = 0                          # kernel reads running in workers
        self.released = False

    def _fill(self, size: int) -> bytearray:
        t0 = time.monotonic_ns()
        data = self.stream.fill(size)
        self.pace.record(time.monotonic_ns() - t0)
        return data

    async def _fill_threaded(self, size: int) -> bytearray:
        self.busy += 1
        try:
            return await trio.to_thread.run_sync(self._fill, size, limiter=self.limiter)
        finally:
            self.busy -= 1
            self._close_if_done()

    async def _read_ahead(self, size: int, done: trio.Event) -> None:
        try:
            self._take(await self._fill_threaded(size), size)
        except DumperError as e:
            self.error = e
        finally:
            done.set()

    def _take(self, data: bytearray, asked: int) -> None:
        self.pending += data
        if len(data) < asked:
            self.eof = True

    async def read(self, size: int) -> bytes:
        """Up to SIZE bytes, short only at the end; raises DumperError from the kernel."""
        if self.ahead is not None:
            await self.ahead.wait()
            self.ahead = None
        if self.error:
            raise self.error
        if len(self.pending) < size and not self.eof:
            want = size - len(self.pending)
            data = self._fill(want) if self.pace.inline else await self._fill_threaded(want)
            self._take(data, want)
        out = bytes(self.pending[:size])
        del self.pending[:size]
        if len(out) == size and not self.eof and not self.pending:
            # The reader streams: read the next chunk while this one is delivered.
            self.ahead = trio.Event()
            self.nursery.start_soon(self._read_ahead, size, self.ahead)
        return out

    def release(self) -> None:
        self.released = True
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self.released and not self.busy:
            self.stream.close()
