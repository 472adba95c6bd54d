"""Open files of the tree: each a fresh kernel seq_file of a dumper (or .stats' snapshot),
counted in the daemon's limits, read at any offset (seek.py over reader.py).

One open path, in three steps:

    admit    may the requester read it (privilege.py), and do the limits allow one
             more file? Counted here (in core.c's counts), before anything waits.
    make     the seq_file, as the reader would make it: in its namespaces (its view,
             namespaces.py), with no more capabilities than it has where the kernel
             weighs them.
    register the file gets its fh, and reads may come.

Once a pin's first open succeeded here with its link cached, the pin is published
to the data plane (core.py), whose C threads then admit, make and register the
opens that need no judgement themselves, and serve their reads. A file C serves
comes to Python only when it needs one -- a seek, an error, a slow dumper, its time
budget spent -- and Python then adopts it (_adopt), to serve it from there on.

Thread safety: opens, reads and releases run on the device's threads and in trio at
once. `lock` guards the handles and the fh counter; it is held only for bookkeeping:
never across a kernel call or a wait, and the only locks taken while it is held are
the metrics' (metrics.py) and core.c's. Reads look a handle up without it (one dict
lookup); a handle's reader has locks of its own (seek.py, reader.py). pins.py's lock
is never held with it. `adopting` serializes adoptions, and is taken before `lock`.
"""
from __future__ import annotations

import enum
import errno
import functools
import logging
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import pyfuse3
import trio

from . import core, privilege
from .dumpers import Dumper
from .errors import DumperError
from .inodes import FH_GENERATION, Key, fh_base, file_inode
from .limits import Limits
from .metrics import Metrics
from .namespaces import Namespaces, kind_of
from .pins import Pin, Pins
from .privilege import User
from .reader import MAX_AHEAD, READ_AHEAD, STREAMING_AFTER, Budget, Pace, Reader
from .refusals import Refusals
from .seek import BACK, Seekable
from .stream import Stream, kernel_error

log = logging.getLogger(__name__)
T = TypeVar("T")

# FUSE open flags (include/uapi/linux/fuse.h), for every file of the tree. DIRECT_IO:
# every read reaches the daemon, with its offset (seek.py), and no page cache is kept;
# NOFLUSH: close() sends no FLUSH (there is nothing to flush).
FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE, FOPEN_NONSEEKABLE, FOPEN_NOFLUSH = 1, 2, 4, 32
OPEN_FLAGS = FOPEN_DIRECT_IO | FOPEN_NOFLUSH
# cat, cp and Python size their reads by st_blksize: a dump is then read in 1 MiB
# FUSE reads (the kernel's largest, 256 pages), an eighth of the round trips of 128 KiB
FILE_BLKSIZE = 1 << 20


def file_info(fh: int) -> pyfuse3.FileInfo:
    """OPEN_FLAGS as pyfuse3 takes them (it has no NOFLUSH: the device adds it to the
    reply, device._open_reply)."""
    return pyfuse3.FileInfo(fh=fh, direct_io=bool(OPEN_FLAGS & FOPEN_DIRECT_IO),
                            keep_cache=bool(OPEN_FLAGS & FOPEN_KEEP_CACHE),
                            nonseekable=bool(OPEN_FLAGS & FOPEN_NONSEEKABLE))


class ReadLater(enum.Enum):
    """What read_handle() says when it does not answer a read itself."""
    PARKED = enum.auto()   # left with the file's producer, which answers it
    MAY_WAIT = enum.auto()  # may wait long: call again from a thread that may wait


Answer = Callable[[int, "list | int"], None]  # (tag, pieces or errno): a parked read's reply


def read_errno(e: DumperError) -> int:
    """What a reader gets for E: the kernel's errno (E2BIG, EOPNOTSUPP...), as a read of
    the pin would give it; EIO for a program that asked to run an object again every
    time (EAGAIN), since the file fails for good and must not look worth retrying."""
    return errno.EIO if e.errno in (None, 0, errno.EAGAIN) else e.errno


class Snapshot:
    """A small file made once at open (.stats), read at any offset like a dumper."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def quick(self, offset: int) -> bool:
        return True

    def read(self, offset: int, size: int) -> list:
        return [self.data[offset:offset + size]]

    def release(self) -> None:
        self.data = b""


@dataclass
class Handle:
    """An open file."""
    reader: Seekable | Snapshot
    label: str        # TARGET/NAME, or .stats
    pid: int
    uid: int
    user: User        # whose limits it counts in
    opened: float     # time.monotonic() of the open, for open_budget
    failed: int = 0   # errno the handle failed with: logged once, answered from then on


@dataclass(frozen=True)
class Origin:
    """Who opened a dumper file and how, to make its seq_file again for a seek back."""
    dumper: Dumper
    target: str
    view: str
    pid: int
    uid: int
    user: User
    caps: int | None   # the reader's effective capabilities, for CRED_TARGETS


class OpenFiles:
    def __init__(self, pins: Pins, metrics: Metrics, limits: Limits,
                 refusals: Refusals, generation: int = 0) -> None:
        self.pins = pins
        self.metrics = metrics
        self.limits = limits
        self.refusals = refusals
        self.namespaces = Namespaces()
        self.read_ahead = Budget(limits.read_ahead_mib << 20)
        self.lock = threading.Lock()
        self.handles: dict[int, Handle] = {}
        self.adopting = threading.Lock()  # one adoption at a time (_adopt)
        self.fh_base = fh_base(generation)
        self.next_fh = 1
        core.set_limits(limits.max_handles, limits.max_handles_per_uid, limits.open_budget,
                        self.read_ahead.ptr, STREAMING_AFTER, READ_AHEAD, MAX_AHEAD)
        self.trio_token: trio.lowlevel.TrioToken | None = None  # for in_trio
        self.trio_up = threading.Event()  # trio_token set: trio runs

    # -- admit -----------------------------------------------------------------------
    def _refusal(self, key: Key | None, uid: int, pid: int,
                 user: User) -> tuple[int, str] | None:
        """(errno, why) if this open may not be made; else counts it in the limits.
        Counted before its seq_file is made, since making it may wait (in another
        namespace): opens that checked first and counted after all got past the limit
        together (16 at once from a container, against a limit of 4). .stats opens
        (KEY None) count too: each holds its snapshot."""
        if key is not None and not self._may_read(key, uid, pid):
            return errno.EACCES, ("a dumper that is not world-readable needs CAP_SYS_ADMIN "
                                  "(in the initial user namespace) of uid 0")
        err = core.admit(*user)
        if not err:
            return None
        files, mine = core.files(*user)
        if err == errno.ENFILE:
            return err, f"{files} files open, the limit (max_handles)"
        if err == errno.EMFILE:
            return err, f"the user has {mine} files open, the limit (max_handles_per_uid)"
        return err, os.strerror(err)

    def _admit(self, key: Key | None, label: str, uid: int, pid: int) -> User:
        """The user an open counts for, once admitted; FUSEError (logged) if refused."""
        user = privilege.user(uid, pid)
        refused = self._refusal(key, uid, pid, user)
        if refused:
            raise self._refuse(label, uid, pid, *refused)
        return user

    def _refuse(self, label: str, uid: int, pid: int, err: int,
                why: str) -> pyfuse3.FUSEError:
        self.refusals.warn(uid, "open %s by uid %d pid %d refused: %s", label, uid, pid, why)
        self.metrics.error(label, err)
        return pyfuse3.FUSEError(err)

    @staticmethod
    def _unadmit(user: User) -> None:
        """An admitted open made no file, or a file was released."""
        core.unadmit(*user)

    def _may_read(self, key: Key, uid: int, pid: int) -> bool:
        """Whether the requester may read the dumper KEY, beyond the kernel's mode check
        (see privilege.py): uid 0 reads a dumper that is not world-readable only with
        CAP_SYS_ADMIN."""
        if uid != 0:
            return True
        try:
            mode = os.stat(self.pins.state.pin_str(*key)).st_mode
        except OSError:
            return True  # gone: the open fails on its own
        return bool(mode & stat.S_IROTH) or privilege.capable(pid, privilege.READ_PRIVATE_CAPS)

    # -- make ------------------------------------------------------------------------
    @staticmethod
    def _origin(d: Dumper, view: str, target: str, uid: int, pid: int, user: User) -> Origin:
        caps = None
        if view == "reader" and target in privilege.CRED_TARGETS:
            caps = privilege.effective(pid)
        return Origin(d, target, view, pid, uid, user, caps)

    async def _make_in_view(self, o: Origin) -> int:
        """A seq_file of O's dumper as its reader would make it (its view)."""
        if o.view == "reader" and kind_of(o.target):
            return await self.namespaces.open_fd(o.dumper, o.target, o.pid, o.uid)
        return self._make_here(o)

    @staticmethod
    def _make_here(o: Origin) -> int:
        """A seq_file of O's dumper made here, with no more capabilities than the reader
        had at open where the kernel weighs them (privilege.CRED_TARGETS)."""
        if o.caps is None:
            return o.dumper.open_fd()
        with privilege.capabilities(o.caps):
            return o.dumper.open_fd()

    def _remake(self, o: Origin, pace: Pace, label: str) -> Reader:
        """A new seq_file for a seek back (seek.py), on a device thread, made as the
        open made its first; refused once the opener is gone, where what it would
        show depends on who reads (a pid reused by another process must not lend its
        namespaces or capabilities to this file)."""
        kind = kind_of(o.target) if o.view == "reader" else None
        if (kind or o.caps is not None) and privilege.user(o.uid, o.pid) != o.user:
            raise DumperError(errno.ESTALE, f"re-running dumper {label} to seek back: the "
                              f"process that opened it (pid {o.pid}) is gone",
                              "open the file again to read from there")
        if kind and not self.namespaces.at_home(kind, o.pid):
            fd = self.in_trio(self.namespaces.open_fd, o.dumper, o.target, o.pid, o.uid)
        else:
            fd = self._make_here(o)
        return self._reader(fd, pace, label, o.user)

    def serving(self) -> None:
        """Trio runs (in this thread): the device's threads may call in_trio."""
        self.trio_token = trio.lowlevel.current_trio_token()
        self.trio_up.set()

    def in_trio(self, afn: Callable[..., Awaitable[T]], *args) -> T:
        """AFN(*ARGS) run in trio, from a device thread; requests may come before trio
        runs (those a server before left, sent again at once: keeper.py)."""
        self.trio_up.wait()
        return trio.from_thread.run(afn, *args, trio_token=self.trio_token)

    def _reader(self, fd: int, pace: Pace, label: str, user: User) -> Reader:
        return Reader(Stream(fd, label), pace, self.read_ahead.account(user))

    # -- register --------------------------------------------------------------------
    def _new_fh(self) -> int:
        """A fresh fh; the caller holds the lock."""
        fh = self.fh_base | self.next_fh
        self.next_fh += 1
        return fh

    def foreign(self, fh: int) -> bool:
        """Whether FH was opened through a server that served the mount before this one,
        and is not made again here yet (see revive)."""
        return fh & FH_GENERATION != self.fh_base and fh not in self.handles

    def _register(self, reader: Seekable | Snapshot, label: str, user: User, pid: int,
                  fh: int = 0) -> int:
        """Register READER as an admitted open's file: under a new fh, or FH (revive)."""
        with self.lock:
            fh = fh or self._new_fh()
            self.handles[fh] = Handle(reader, label, pid, user[0], user, time.monotonic())
            return fh

    def _opened(self, fd: int, origin: Origin, pin: Pin, label: str, fh: int) -> int:
        """The handle of an admitted open's new seq_file FD."""
        reader = Seekable(self._reader(fd, pin.pace, label, origin.user),
                          functools.partial(self._remake, origin, pin.pace, label))
        self.metrics.opened(label)
        return self._register(reader, label, origin.user, origin.pid, fh)

    # -- the ways in -----------------------------------------------------------------
    def _publish(self, inode: int, key: Key, pin: Pin, view: str) -> None:
        """Let the data plane serve the pin's next opens (core.py), once its link is
        cached and its view known. Readers whose open needs a judgement (another
        namespace, uid 0 and a private dumper, a limit) are still sent here."""
        dumper = pin.dumper
        if dumper is None or pin.nodeid or pin.hidden:
            return
        target = key[0]
        kind = kind_of(target) if view == "reader" else None
        cred = view == "reader" and target in privilege.CRED_TARGETS
        try:
            core.publish(inode, dumper.fd, f"{target}/{key[1]}", self.pins.state.pin_str(*key),
                         pin.ino, kind, self.namespaces.mine[kind] if kind else "", cred,
                         self.metrics.stats(f"{target}/{key[1]}"), pin.pace)
        except OSError as e:
            log.warning("%s: its opens stay in Python", e)
            return
        pin.nodeid = inode

    def _adopt(self, fh: int) -> Handle | None:
        """The handle of FH, taken over from the data plane if it served the file until
        now (see the module's docstring); None if neither side has it. Adoptions take
        turns (one may wait for a kernel read of the file under way in C), without the
        lock the opens need."""
        if not core.served_here(fh):
            return None
        with self.adopting:
            h = self.handles.get(fh)
            if h is not None:
                return h  # adopted meanwhile
            a = core.adopt(fh, BACK)
            if a is None:
                return None
            target, name = a.label.split("/", 1)
            pin = self.pins.known.get((target, name))
            # a pin changed since: the reader's view is the one that shows no more
            view = pin.view if pin is not None and pin.view else "reader"
            user = (a.uid, a.user_ns)
            origin = self._origin(Dumper(a.link_fd, a.label), view, target, a.uid, a.pid, user)
            reader = self._reader(a.fd, a.pace, a.label, user)
            reader.resume(a.surplus, a.ended, kernel_error(a.label, a.err) if a.err else None)
            seekable = Seekable(reader, functools.partial(self._remake, origin, a.pace, a.label),
                                a.pos, a.back)
            h = Handle(seekable, a.label, a.pid, a.uid, user, a.opened)
            with self.lock:
                self.handles[fh] = h
            return h

    async def open(self, inode: int, key: Key, uid: int, pid: int, fh: int = 0) -> int:
        """Open dumper KEY (inode INODE) for the requester, in trio; FUSEError says why
        not. Given FH, a file a previous server opened is made again under its fh, as if
        opened now: its reads go on from their offsets as after a seek (seek.py), which
        runs the dumper again -- the kernel's own seq_lseek does no better."""
        target, name = key
        label = f"{target}/{name}"
        user = self._admit(key, label, uid, pid)
        try:
            pin = self.pins.known.get(key)
            if pin is None or pin.hidden or not self.pins.cached:
                pin, _ = self.pins.check(target, name)  # while watched, a known pin needs no stat
            if file_inode(pin.ino) != inode:  # an inode of a pin since removed (ops._file_stat)
                raise pyfuse3.FUSEError(errno.ENOENT)
            view = self.pins.view(pin, target, name)
            origin = self._origin(self.pins.dumper(pin, target, name), view, target, uid,
                                  pid, user)
            fd = await self._make_in_view(origin)
        except DumperError as e:
            self._unadmit(user)
            if e.errno == errno.ENOENT:   # removed since the lookup
                raise pyfuse3.FUSEError(errno.ENOENT) from None
            # permission and "try again" (a limit, a helper late) mean what they say
            err = e.errno if e.errno in (errno.EACCES, errno.EAGAIN) else errno.EIO
            raise self._refuse(label, uid, pid, err, str(e)) from None
        except BaseException:  # refused, failed or cancelled: it made no file
            self._unadmit(user)
            raise
        self._publish(inode, key, pin, view)
        return self._opened(fd, origin, pin, label, fh)

    def open_snapshot(self, label: str, render: Callable[[], bytes], uid: int,
                      pid: int, fh: int = 0) -> int:
        """A file of what RENDER makes (.stats), counted in the limits like any open file
        and made only once admitted: a refused open costs no rendering."""
        user = self._admit(None, label, uid, pid)
        try:
            data = render()
        except BaseException:
            self._unadmit(user)
            raise
        return self._register(Snapshot(data), label, user, pid, fh)

    # -- reads and releases, on the device's threads ---------------------------------
    def read(self, fh: int, offset: int, size: int, answer: Answer | None = None,
             tag: int = 0) -> list | ReadLater:
        """A FUSE read of an open file at OFFSET: it may block in the kernel. Returns
        the reply's pieces (see reader.py, seek.py). Given ANSWER, a read that may wait
        long is instead left with the file's producer, which calls ANSWER(TAG, pieces)
        -- or ANSWER(TAG, errno) -- once it can (PARKED); or, with no producer to leave
        it with, not made (MAY_WAIT)."""
        h = self.handles.get(fh) or self._adopt(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if h.failed:
            raise pyfuse3.FUSEError(h.failed)
        if isinstance(h.reader, Snapshot):
            return h.reader.read(offset, size)
        t0 = time.monotonic()
        budget = self.limits.open_budget
        if budget and t0 - h.opened > budget:
            raise self._fail(h, errno.ETIME, f"reading dumper {h.label} stopped: the open "
                             f"took more than its time budget of {budget:g} s (open_budget)")
        if answer is not None and not h.reader.quick(offset):
            def deliver(result: list | DumperError) -> None:
                if isinstance(result, DumperError):
                    self._fail(h, read_errno(result), str(result))
                    return answer(tag, read_errno(result))
                self.metrics.read(h.label, sum(map(len, result)), time.monotonic() - t0)
                return answer(tag, result)
            return ReadLater.PARKED if h.reader.park(offset, size, deliver) \
                else ReadLater.MAY_WAIT
        try:
            data = h.reader.read(offset, size)
        except DumperError as e:
            raise self._fail(h, read_errno(e), str(e)) from None
        self.metrics.read(h.label, sum(map(len, data)), time.monotonic() - t0)
        return data

    def _fail(self, h: Handle, err: int, why: str) -> pyfuse3.FUSEError:
        """Fail handle H for good with ERR: one log line, ERR to every later read.
        Returns the error to raise for this read."""
        h.failed = err
        log.error("%s (reader uid %d pid %d)", why, h.uid, h.pid)
        self.metrics.error(h.label, err)
        return pyfuse3.FUSEError(err)

    def release(self, fh: int) -> None:
        """The last close of an open file."""
        with self.lock:
            h = self.handles.pop(fh, None)
            if h is None:
                return
        self._unadmit(h.user)
        if isinstance(h.reader, Seekable):
            self.metrics.closed(h.label)
        h.reader.release()

    def streaming(self) -> bool:
        """Whether any open file is being read ahead now (see Reader.streaming)."""
        return core.producing() or any(isinstance(h.reader, Seekable) and h.reader.streaming
                   for h in list(self.handles.values()))

    def shutdown(self) -> None:
        """Release every open file: producer threads stop, seq_files close."""
        with self.lock:
            handles = list(self.handles.values())
            self.handles.clear()
        for h in handles:
            h.reader.release()
        core.release_all()
