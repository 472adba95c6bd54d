"""Serving one open seq_file to FUSE reads without stalling anyone.

A kernel read of a seq_file runs the BPF program on the caller's thread and
cannot be polled, so it is either done inline (blocking the event loop) or in a
worker thread (about 0.15 ms per hand-off). The choice is made per dumper from
what its reads took before:

- a dumper whose kernel reads are quick (a moving average under 0.3 ms, after a
  few reads in threads to learn it) is read inline: a small dump costs no thread
  hand-off at all;
- any other dumper (new, slow or large) is read in worker threads;
- a reader that streams (two full chunks in a row) gets a producer: one worker
  thread that keeps reading the kernel, at most READ_AHEAD chunks ahead of the
  reader, so the kernel's work never waits for FUSE round trips.
A quick dumper that turns slow moves back to threads after one slow read.

The seq_file is closed at release, or, if a worker is still inside read(), the
moment that read returns.
"""
from __future__ import annotations

import collections
import errno
import logging
import threading
import time
from dataclasses import dataclass

import trio

from .dumpers import DumperError, Stream

log = logging.getLogger(__name__)

INLINE_MAX_NS = 300_000   # inline only while reads average less than this
LEARN_READS = 3           # reads done in threads before a dumper may be read inline
STREAMING_AFTER = 2       # full chunks in a row before a producer takes over
READ_AHEAD = 3            # chunks a producer may hold for its reader


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
    """FUSE-facing reads of one Stream: inline, threaded, or from a producer thread."""

    def __init__(self, stream: Stream, pace: Pace, limiter: trio.CapacityLimiter,
                 nursery: trio.Nursery) -> None:
        self.stream = stream
        self.pace = pace
        self.limiter = limiter
        self.nursery = nursery
        self.pending = bytearray()   # read from the kernel, not yet given to the reader
        self.eof = False
        self.error: DumperError | None = None
        self.full_reads = 0
        self.busy = 0                # threads that may be inside a kernel read
        self.released = False
        # the producer's side (made when it starts): chunks it read, guarded by cond;
        # arrived wakes the reader
        self.producing = False
        self.chunks: collections.deque[bytearray] | None = None
        self.produced_all = False
        self.cond: threading.Condition | None = None
        self.arrived: trio.Event | None = None

    # -- reading without a producer ----------------------------------------------
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

    def _take(self, data: bytearray) -> None:
        self.pending += data
        self.eof = self.stream.eof

    async def read(self, size: int) -> bytearray:
        """Up to SIZE bytes, short only at the end; raises DumperError from the kernel."""
        if self.producing:
            await self._from_producer(size)
        elif len(self.pending) < size and not self.eof and not self.error:
            want = size - len(self.pending)
            try:
                data = self._fill(want) if self.pace.inline else await self._fill_threaded(want)
            except DumperError as e:
                self.error = e
            else:
                self._take(data)
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

    # -- the producer ---------------------------------------------------------------
    def _start_producer(self, size: int) -> None:
        self.chunks = collections.deque()
        self.cond = threading.Condition()
        self.arrived = trio.Event()
        self.producing = True
        self.busy += 1
        self.nursery.start_soon(self._run_producer, size, trio.lowlevel.current_trio_token())

    async def _run_producer(self, size: int, token: trio.lowlevel.TrioToken) -> None:
        try:
            await trio.to_thread.run_sync(self._produce, size, token, limiter=self.limiter)
        finally:
            self.busy -= 1
            self._close_if_done()

    def _produce(self, size: int, token: trio.lowlevel.TrioToken) -> None:
        """In a worker thread: read chunks ahead until EOF, an error, or release."""
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
                token.run_sync_soon(self.arrived.set)
                if self.stream.eof:
                    return
        finally:
            with self.cond:
                self.produced_all = True
            token.run_sync_soon(self.arrived.set)

    async def _from_producer(self, size: int) -> None:
        """Move produced chunks to pending until SIZE bytes are there or nothing is left."""
        while True:
            with self.cond:
                if self.chunks and not self.pending:
                    self.pending = self.chunks.popleft()  # take it whole, no copy
                while self.chunks and len(self.pending) < size:
                    self.pending += self.chunks.popleft()
                self.cond.notify()
                finished = self.produced_all and not self.chunks
            if len(self.pending) >= size or finished:
                self.eof = finished and not self.error
                return
            self.arrived = trio.Event()
            with self.cond:
                if self.chunks or self.produced_all:
                    continue  # it arrived between the check and the new event
            await self.arrived.wait()

    # -- the end --------------------------------------------------------------------
    def release(self) -> None:
        self.released = True
        if self.cond is not None:
            with self.cond:
                self.cond.notify()
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self.released and not self.busy:
            self.stream.close()
