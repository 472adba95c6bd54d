"""Serving one open seq_file to FUSE reads.

FUSE reads are answered on the device's worker threads (device.py), so a kernel
read of a seq_file -- which runs the BPF program and cannot be polled -- simply
blocks the worker that got the FUSE read; the pool keeps other workers reading
/dev/fuse for everyone else. A reader that streams (two full reads in a row, or
one larger than a kernel buffer, as cat's) gets a producer thread that keeps
reading the kernel, at most READ_AHEAD of its reads ahead (and no more than
MAX_AHEAD bytes beyond one), so the kernel's work overlaps the FUSE round trips
instead of waiting for them. All producers together hold at most a Budget of
bytes ahead of their readers, one user's at most UID_SHARE of it: a producer
that would read beyond it while its reader waits for nothing stops, and that
reader's reads are made on demand again (and get a producer again once there is
budget). So readers that stop reading (many `less`es left open) cannot make the
daemon hold their dumps, nor one user's take every other user's read-ahead.

A FUSE read that would wait for the producer is parked with it instead (park):
the producer answers it from its own thread once there is enough, so streaming
readers neither hold a worker each nor make the reader of /dev/fuse hand off its
lead at every read -- during which every other request waits in /dev/fuse.

What a kernel read returns is handed to the FUSE reply as it is: a reply is a
list of those chunks (or views of them), written with one writev, so no byte
is copied in the daemon.

The seq_file is closed at release, or, if a thread is still inside a kernel
read, the moment that read returns.
"""
from __future__ import annotations

import collections
import errno
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from ._core import ffi, lib
from .core import Pace
from .errors import DumperError
from .stream import KERNEL_BUF, Stream

log = logging.getLogger(__name__)

STREAMING_AFTER = 2       # full reads in a row before a producer takes over
READ_AHEAD = 3            # FUSE reads' worth a producer may hold for its reader...
MAX_AHEAD = 256 << 10     # ...but no more bytes than this, beyond one read
MAX_PIECES = 64           # more chunks in one reply are joined (writev takes 1024)
UID_SHARE = 0.75          # of the read-ahead budget one user's streams may hold


class Budget:
    """Bytes that all producers together may hold ahead of their readers; one user's
    producers at most UID_SHARE of them, so that one user's stopped readers (a
    container's many `less`es left open) cannot take every other user's read-ahead.
    Kept in C (core.c), where the data plane's producers count in it too."""

    def __init__(self, limit: int) -> None:
        self.limit = limit       # 0: no limit
        self.ptr = lib.core_budget_new(limit, UID_SHARE)  # never freed: one per daemon
        if self.ptr == ffi.NULL:
            raise MemoryError("the read-ahead budget")

    @property
    def held(self) -> int:
        return lib.core_budget_held(self.ptr, 0, True)

    def held_by(self, uid: Hashable) -> int:
        return lib.core_budget_held(self.ptr, user_key(uid), False)

    @property
    def users(self) -> int:
        """Users holding any read-ahead."""
        return lib.core_budget_users(self.ptr)

    def account(self, uid: Hashable) -> Account:
        """UID's share, as its readers spend it."""
        return Account(self, uid)


def user_key(user: Hashable) -> int:
    """The budget's key for USER: a privilege.User (uid, pid namespace) as core.c keys
    its files' users; any other key (tests) by its hash."""
    if isinstance(user, tuple) and len(user) == 2 and all(isinstance(x, int) for x in user):
        return lib.core_user_key(user[0], user[1])
    return hash(user) & (1 << 63) - 1


class Account:
    """One user's share of a Budget."""

    def __init__(self, budget: Budget, uid: Hashable) -> None:
        self.budget = budget
        self.key = user_key(uid)

    def add(self, n: int) -> None:
        lib.core_budget_add(self.budget.ptr, self.key, n)

    @property
    def spent(self) -> bool:
        return bool(lib.core_budget_spent(self.budget.ptr, self.key))


Deliver = Callable[["list | DumperError"], None]


@dataclass(frozen=True)
class Parked:
    """A FUSE READ left with the producer, which answers it once SIZE bytes are ready
    (or the dump ended) by calling DELIVER with the pieces or the error."""
    size: int
    deliver: Deliver


class Reader:
    """FUSE-facing reads of one Stream, from the calling thread or a producer."""

    def __init__(self, stream: Stream, pace: Pace, budget: Account) -> None:
        self.stream = stream
        self.pace = pace
        self.budget = budget
        self.serial = threading.Lock()   # one FUSE read of this file at a time
        self.guard = threading.Lock()    # guards what follows
        self.cond = threading.Condition(self.guard)  # wakes reader and producer
        self.pending: collections.deque = collections.deque()  # kernel chunks not yet read
        self.pending_len = 0
        self.ended = False           # no more kernel reads: the end, an error, or produced all
        self.error: DumperError | None = None
        self.full_reads = 0
        self.producing = False
        self.largest_read = 0        # bytes: the largest FUSE read so far
        self.ahead_limit = 0         # bytes a producer may hold ahead of the reader
        self.want = 0                # bytes the reader waits for, if it waits
        self.counted = 0             # bytes of pending counted in the budget
        self.parked: Parked | None = None  # a READ the producer answers
        self.busy = 0                # threads inside a kernel read of the stream
        self.released = False

    def resume(self, pending: bytes, ended: bool, error: DumperError | None) -> None:
        """Go on from where another reader of the stream stopped (core.adopt): PENDING
        read from the kernel and not yet given, and whether (and how) it ended."""
        if pending:
            self.pending.append(pending)
            self.pending_len = len(pending)
        self.ended, self.error = ended, error

    @property
    def quick(self) -> bool:
        """Whether the next read is sure to be answered without a long wait."""
        if self.producing:
            return self._ready(self.largest_read)
        return self.ended or self.pace.quick

    @property
    def streaming(self) -> bool:
        """Whether a producer is reading ahead now: not done, and not waiting for a
        reader that stopped reading (a `less` left open)."""
        return self.producing and not self.ended and self.pending_len < self.ahead_limit

    def read(self, size: int) -> list:
        """Up to SIZE bytes, short only at the end, as a list of bytes-like pieces;
        raises DumperError from the kernel (after the output read before it)."""
        with self.serial:
            out = self._read_produced(size) if self.producing else None
            if out is None:
                if not self._ready(size):
                    self._fill(size)
                with self.guard:
                    out = self._take(size)
            if not out and self.error:
                raise self.error
            full = sum(map(len, out)) == size
            self.full_reads = self.full_reads + 1 if full else 0
            # two full reads, or one that took several kernel reads: a large dump is
            # being read, and the kernel had better go on while the reply travels
            streams = self.full_reads >= STREAMING_AFTER or full and size > KERNEL_BUF
            if streams and not self.producing and not self.ended and not self.budget.spent:
                self._start_producer(size)
            return _joined(out)

    def park(self, size: int, deliver: Deliver) -> bool:
        """Leave a read of SIZE with the producer, which answers it with DELIVER(pieces)
        -- or DELIVER(DumperError) -- once it can, from its own thread; False if there
        is no producer to leave it with, or the read can be answered now."""
        with self.guard:
            if not self.producing or self.released or self.parked or self._ready(size):
                return False
            if size > self.largest_read:
                self._grow(size)
            self.parked = Parked(size, deliver)
            self.cond.notify_all()
            return True

    def _answer_parked(self) -> tuple | None:
        """(deliver, pieces or error) for the parked read if it can be answered now
        (under the producer's lock); the caller delivers it outside the lock."""
        if self.parked is None:
            return None
        size, deliver = self.parked.size, self.parked.deliver
        if not self._ready(size):
            return None
        self.parked = None
        out = self._take(size)
        if not out and self.error:
            return deliver, self.error
        return deliver, _joined(out)

    def _read_produced(self, size: int) -> list | None:
        """A read answered from the producer's chunks; None if it stopped (budget)."""
        with self.cond:
            if size > self.largest_read:  # room for this read, larger than the ones before
                self._grow(size)
                self.cond.notify_all()
            self.want = size
            while not self._ready(size) and self.producing:
                self.cond.wait()
            self.want = 0
            if not self._ready(size):
                return None
            out = self._take(size)
            self.cond.notify_all()
            return out

    def _waited_for(self) -> int:
        """Bytes a waiting read needs pending (the reader's, or one parked), 0 if none
        waits. Safe without the lock: each attribute is read once."""
        parked = self.parked
        return max(self.want, parked.size if parked else 0)

    def _ready(self, size: int) -> bool:
        """Whether a read of SIZE can be answered from pending now."""
        return self.pending_len >= size or self.ended

    def _grow(self, size: int) -> None:
        self.largest_read = size
        self.ahead_limit = size + min((READ_AHEAD - 1) * size, MAX_AHEAD)

    def _take(self, size: int) -> list:
        """Up to SIZE bytes from the front of pending (under guard), given back to the
        budget as far as the producer counted them."""
        out = []
        room = size
        while self.pending and room:
            piece = self.pending[0]
            if len(piece) <= room:
                out.append(self.pending.popleft())
                room -= len(piece)
            else:
                piece = memoryview(piece)
                out.append(piece[:room])
                self.pending[0] = piece[room:]
                room = 0
        self.pending_len -= size - room
        n = min(self.counted, size - room)
        if n:  # read ahead by a producer
            self.counted -= n
            self.budget.add(-n)
        return out

    def _fill(self, size: int) -> None:
        """Kernel reads until SIZE bytes are pending, or the end or an error."""
        if not self._enter():
            raise DumperError(errno.EBADF, f"reading dumper {self.stream.label}: released")
        t0 = time.monotonic_ns()
        try:
            while self.pending_len < size:
                data = self.stream.read_chunk()
                if not data:
                    self.ended = True
                    break
                self.pending.append(data)
                self.pending_len += len(data)
            self.pace.record(time.monotonic_ns() - t0)
        except DumperError as e:
            self.error = e
            self.ended = True
        finally:
            self._leave()

    # -- the producer ---------------------------------------------------------------
    def _start_producer(self, size: int) -> None:
        if not self._enter():
            return
        self._grow(size)
        self.producing = True
        threading.Thread(target=self._produce, daemon=True,
                         name=f"produce {self.stream.label}").start()

    def _produce(self) -> None:
        """Read ahead until the end, an error, or release; or stop early where the
        budget is spent and the reader waits for nothing."""
        early = False
        try:
            while True:
                with self.cond:
                    while self.pending_len >= self.ahead_limit and not self.released:
                        self.cond.wait()
                    if self.released:
                        return
                    need = self._waited_for()
                    if self.budget.spent and self.pending_len >= need:
                        early, self.producing = True, False
                        return
                    room = self.ahead_limit - self.pending_len
                chunks, n, end = self._read_batch(room)
                with self.cond:
                    if self.released:
                        self.budget.add(-n)
                        return
                    self.pending.extend(chunks)
                    self.pending_len += n
                    self.counted += n
                    answer = self._answer_parked()
                    # wake the reader only once its read can be answered: a wake-up
                    # per chunk costs both threads a GIL hand-off each time
                    if self.want and self.pending_len >= self.want:
                        self.cond.notify_all()
                if answer:
                    answer[0](answer[1])
                if end:
                    return
        finally:
            with self.cond:
                self.ended = self.ended or not early
                answer = self._answer_parked()
                self.cond.notify_all()
            if answer:
                answer[0](answer[1])
            self._leave()

    def _read_batch(self, room: int) -> tuple[list, int, bool]:
        """Kernel reads until ROOM bytes, until a waiting read can be answered, or
        until the budget is spent: (chunks, bytes, whether the stream ended, with
        self.error set if by an error). The bytes are counted in the budget as read.

        No lock is taken between kernel reads, so that each holds the GIL for as
        short a time as can be. Every kernel read gives up the GIL and takes it back,
        and with dozens of streams, the longer it is then held, the more threads
        queue for it. In 32 Python threads reading kallsyms, 30 us of Python per read
        tripled the context switches and cost 9% of the throughput."""
        chunks: list = []
        n = 0
        try:
            while n < room and not self.released:
                data = self.stream.read_chunk()
                if not data:
                    return chunks, n, True
                chunks.append(data)
                n += len(data)
                self.budget.add(len(data))
                # read without the lock: a read parked meanwhile, unseen, is answered
                # once ROOM is read at the latest
                need = self._waited_for()
                if self.pending_len + n >= need and (need or self.budget.spent):
                    break
        except DumperError as e:
            self.error = e
            return chunks, n, True
        except Exception as e:  # a bug here must fail this reader, not the daemon
            log.exception("reading %s", self.stream.label)
            self.error = DumperError(errno.EIO, f"reading dumper {self.stream.label}: "
                                     f"internal error {e!r}")
            return chunks, n, True
        return chunks, n, False

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
            if self.counted:
                self.budget.add(-self.counted)
                self.counted = 0
            if self.cond is not None:
                self.cond.notify_all()
            done = not self.busy
        if done:
            self.stream.close()


def _joined(out: list) -> list:
    """OUT, its pieces joined into one if they are more than writev should take."""
    return [b"".join(out)] if len(out) > MAX_PIECES else out
