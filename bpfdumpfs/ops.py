"""pyfuse3 operations: the state directory shown as a tree of dumper files.

    /                 one directory per iterator target of the running kernel
    /TARGET/NAME      one regular file per iter link pinned at STATE/TARGET/NAME

Every open() makes a fresh kernel seq_file; output is never cached. The kernel
caches names and attributes (a LOOKUP or GETATTR per `cat` costs as much as
reading a small dump) and the daemon invalidates them as soon as inotify says a
pin changed -- by the CLI, bpftool or anyone (watch.py) -- so a chmod, rm or
rename shows within milliseconds. Without a working watch nothing is cached.

Most handlers run in trio under pyfuse3. The hot ones -- open_quick() and
make_quick(), read_handle(), release_handle(), xattr_refusal() -- are called from
the device's threads (device.py) and take self.lock where they share state; how
one open file is read (with read-ahead for streams) is reader.py's concern.
"""
from __future__ import annotations

import errno
import functools
import json
import logging
import math
import os
import stat
import threading
import time
from collections import Counter
from dataclasses import dataclass

import pyfuse3
import trio

from . import kernel, privilege
from .dumpers import (
    NAME_MAX,
    Dumper,
    DumperError,
    StateDir,
    Stream,
    check_name,
    is_dumper_name,
    iter_link_info,
)
from .limits import Limits
from .metrics import STATUS_XATTR, Metrics
from .namespaces import Namespaces, kind_of
from .privilege import User
from .reader import Budget, Pace, Reader
from .refusals import Refusals
from .seek import Seekable
from .watch import StateWatch

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
STATS_INODE = (1 << 16) - 1
STATS_NAME = ".stats"
FIRST_FILE_INODE = 1 << 16  # target directories take the inodes below
DIR_MODE = stat.S_IFDIR | 0o755
XATTR_PREFIX = b"user.bpfdump."
CACHE_TIMEOUT = 60.0  # entries/attributes, while the state dir is watched
LINK_CACHE_MAX = 1024  # link fds kept open for quick opens
STATE_RETRY = 1.0      # seconds between looks for a state dir that went away
# cat, cp and Python size their reads by st_blksize: a dump is then read in 1 MiB
# FUSE reads (the kernel's largest, 256 pages), an eighth of the round trips of 128 KiB
FILE_BLKSIZE = 1 << 20


def _guarded(handler):
    """Let only FUSEError out of a handler: anything else would escape pyfuse3.main()
    and leave a dead mount ('Transport endpoint is not connected')."""
    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            log.error("%s: %s", handler.__name__, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed; answering EIO", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


def _guard_handlers(cls):
    for name, fn in list(vars(cls).items()):
        if name in vars(pyfuse3.Operations) and name != "init":
            setattr(cls, name, _guarded(fn))
    return cls


PARKED = object()  # read_handle(): the read was left with its producer


def _read_errno(e: DumperError) -> int:
    """What a reader gets for E: the kernel's errno (E2BIG, EOPNOTSUPP...), as a read of
    the pin would give it; EIO for a program that asked to run an object again every
    time (EAGAIN), since the file fails for good and must not look worth retrying."""
    return errno.EIO if e.errno in (None, 0, errno.EAGAIN) else e.errno


class _Snapshot:
    """A small file made once at open (.stats), read at any offset like a dumper."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def quick(self, offset: int) -> bool:
        return True

    def read(self, offset: int, size: int) -> list:
        return [self.data[offset:offset + size]]

    def release(self) -> None:
        self.data = b""


def _file_info(fh: int) -> pyfuse3.FileInfo:
    """Every read reaches the daemon, with its offset, and no page cache is kept (seek.py;
    device.py's FOPEN_FLAGS say the same, and "no FLUSH", for the opens it answers)."""
    return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=False)


@dataclass
class Handle:
    """One open() of a dumper: its reader and who opened it."""
    reader: Seekable | _Snapshot
    label: str
    pid: int
    uid: int
    user: User        # whose limits it counts in
    opened: float
    failed: int = 0   # errno the handle failed with: logged once, answered from then on


@dataclass(frozen=True)
class _Origin:
    """How one open makes its seq_files -- the first at open, more for seeks back
    (seek.py) -- always as at open: the same link, view, reader and rights."""
    dumper: Dumper
    target: str
    view: str
    pid: int
    uid: int
    user: User
    caps: int | None   # the reader's effective capabilities, for CRED_TARGETS


@dataclass
class _Pin:
    """What the daemon knows of one pin, valid while the pin keeps its inode."""
    ino: int
    link_id: int
    hidden: str | None          # why it is not shown; None for a dumper of its target
    pace: Pace
    view: str | None = None         # from the pin's record, looked up at the first open
    # Cached only while watched. Dropped when the pin changes; open files of it keep
    # their reference (to re-run it for a seek back, seek.py), so its link goes with
    # the last of them, as a kernel seq_file keeps its program.
    dumper: Dumper | None = None


@dataclass
class _Dir:
    """A readdir snapshot taken at opendir, so offsets stay stable while listing."""
    inode: int
    entries: list[tuple[bytes, int]]   # (name, inode of a target dir | 0 for a dumper)


@_guard_handlers
class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    # The kernel then caches each file's (absent) ACL instead of asking at every `ls -l`
    # (and at every permission check of a non-root reader).
    enable_acl = True

    def __init__(self, state: StateDir, targets: list[str], metrics: Metrics,
                 limits: Limits = Limits()) -> None:
        super().__init__()
        self.state = state
        self.targets = sorted(targets)
        self.target_ino = {t: ROOT + 1 + i for i, t in enumerate(self.targets)}
        self.ino_target = {i: t for t, i in self.target_ino.items()}
        # dumper files: inode <-> (target, name), with the kernel's lookup counts
        self.file_ino: dict[tuple[str, str], int] = {}
        self.ino_file: dict[int, tuple[str, str]] = {}
        self.lookups: dict[int, int] = {}
        self.next_ino = FIRST_FILE_INODE
        self.handles: dict[int, Handle] = {}
        self.next_fh = 1
        self.dirs: dict[int, _Dir] = {}
        self.pins: dict[tuple[str, str], _Pin] = {}
        self.cached_links = 0
        self.namespaces = Namespaces()
        self.mounted_ns = time.time_ns()
        # Opens, reads and releases are served on the device's threads (device.py) while
        # everything else runs in trio: this guards the pins' cached links and the handles.
        self.lock = threading.RLock()
        self.cache_timeout = 0.0  # > 0 only while the state dir is watched
        # pins to check before anyone lists them (see _check_new), each queued once
        self.unchecked_in, self.unchecked = trio.open_memory_channel(math.inf)
        self.unchecked_keys: set[tuple[str, str]] = set()
        self.metrics = metrics
        self.limits = limits
        self.refusals = Refusals(log)
        self.read_ahead = Budget(limits.read_ahead_mib << 20)
        self.uid_handles: Counter[User] = Counter()  # counted from before their seq_file
        self.opening = 0  # opens counted in the limits whose seq_file is being made
        self.unmade: dict[int, tuple] = {}  # fh -> what make_quick() needs
        self.trio_token: trio.lowlevel.TrioToken | None = None

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the tasks the tree needs besides pyfuse3's own, until cancelled."""
        self.trio_token = trio.lowlevel.current_trio_token()  # for seeks back (_remake)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._check_new)
                nursery.start_soon(self.namespaces.reap_idle)
                task_status.started()
                await self._watch_state()
        finally:
            self.namespaces.close()

    async def _check_new(self) -> None:
        """Check each pin as it appears (and those found at the start), between other
        requests: a check is some 50 us of bpf(2) and /proc, and a target may hold
        thousands of dumpers, which a first `ls -l` would otherwise wait for. The watch
        keeps what was checked true."""
        async for target, name in self.unchecked:
            self.unchecked_keys.discard((target, name))
            if self.cache_timeout:
                try:
                    self._pin(target, name)
                except pyfuse3.FUSEError:
                    pass  # gone again, or not a dumper (_pin said why)
                except Exception:  # a bug here must not take the tree down
                    log.exception("checking %s/%s failed", target, name)

    async def _watch_state(self) -> None:
        """Cache while the state dir is a watched bpffs; if it goes away (unmounted,
        replaced), serve uncached and wait for it to come back."""
        missing = False
        while True:
            try:
                self.state.check()
                watch = StateWatch(self.state.path)
            except (DumperError, OSError) as e:
                if not missing:
                    log.error("%s; the tree serves what it finds there, uncached, until a "
                              "bpffs is back", e)
                missing = True
                await trio.sleep(STATE_RETRY)
                continue
            if missing:
                log.warning("state dir %s is a bpffs again", self.state.path)
                missing = False
            self.cache_timeout = CACHE_TIMEOUT
            self._forget_all()   # what was cached may be from the old state dir
            try:
                await watch.run(self.changed)
            except Exception:  # a bug here must not take the tree down: serve uncached
                log.exception("watching %s failed", self.state.path)
            self.cache_timeout = 0.0
            self._forget_all()

    def _forget_all(self) -> None:
        for target in self.targets:
            self.changed(target, None)

    def shutdown(self) -> None:
        """Release every open file: producer threads stop, seq_files close."""
        with self.lock:
            handles = list(self.handles.values())
            self.handles.clear()
        for h in handles:
            h.reader.release()

    def changed(self, target: str, name: str | None) -> None:
        """A pin changed: forget what we and the kernel cached of it, and check it anew."""
        names = [name] if name else [n for t, n in {*self.file_ino, *self.pins} if t == target]
        if self.cache_timeout:
            for n in [name] if name else self.state.names(target):
                if is_dumper_name(n) and (target, n) not in self.unchecked_keys:
                    self.unchecked_keys.add((target, n))
                    self.unchecked_in.send_nowait((target, n))
        for n in names:
            self._forget_pin((target, n))
            ino = self.file_ino.get((target, n))
            if ino is None:
                # The kernel holds no entry of it (it trusts no entry we did not give,
                # and forgets one before its inode): nothing to invalidate.
                continue
            pyfuse3.invalidate_entry_async(self.target_ino[target], n.encode(),
                                           ignore_enoent=True)
            pyfuse3.invalidate_inode(ino, attr_only=True)

    def _forget_pin(self, key: tuple[str, str]) -> None:
        """Drop what is known of a pin, closing its cached link."""
        with self.lock:
            pin = self.pins.pop(key, None)
            if pin is not None and pin.dumper is not None:
                pin.dumper = None
                self.cached_links -= 1

    # -- inodes --------------------------------------------------------------
    def _file_inode(self, target: str, name: str) -> int:
        key = (target, name)
        ino = self.file_ino.get(key)
        if ino is None:
            ino = self.next_ino
            self.next_ino += 1
            self.file_ino[key] = ino
            self.ino_file[ino] = key
            self.lookups[ino] = 0
        return ino

    async def forget(self, inode_list) -> None:
        for ino, n in inode_list:
            if ino not in self.lookups:
                continue
            self.lookups[ino] -= n
            if self.lookups[ino] <= 0:
                del self.lookups[ino]
                self.file_ino.pop(self.ino_file.pop(ino), None)

    def _pin_stat(self, target: str, name: str) -> os.stat_result:
        """stat of a pin that is a valid dumper of TARGET; FUSEError(ENOENT) otherwise."""
        return self._pin(target, name)[1]

    def _pin(self, target: str, name: str) -> tuple[_Pin, os.stat_result]:
        """The pin's record and stat, checked once per pin inode; ENOENT if not a dumper."""
        path = self.state.pin_str(target, name)
        try:
            st = os.lstat(path)  # a symlink in the state dir is not a pin: never followed
        except OSError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        if not stat.S_ISREG(st.st_mode):
            raise pyfuse3.FUSEError(errno.ENOENT)
        pin = self.pins.get((target, name))
        if pin is None or pin.ino != st.st_ino:
            link_id, why = self._check_pin(path, target)
            if why and (pin is None or pin.hidden != why):
                log.warning("hiding %s: %s", path, why)
            self._forget_pin((target, name))
            pin = self.pins[(target, name)] = _Pin(st.st_ino, link_id, why, Pace())
        if pin.hidden:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return pin, st

    @staticmethod
    def _check_pin(path, target: str) -> tuple[int, str | None]:
        """(link id, why the pin is not shown -- None if it is a dumper of TARGET)."""
        try:
            fd = kernel.obj_get(path)
            try:
                info = iter_link_info(fd, path)
            finally:
                os.close(fd)
        except DumperError as e:
            return 0, "not an iterator link" if e.errno == errno.EINVAL else str(e)
        if info.target_name != target:
            return info.id, (f"its target is {info.target_name}, not {target}; "
                             f"pin it under {info.target_name}/ instead")
        return info.id, None

    # -- attributes ---------------------------------------------------------------
    def _dir_attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = DIR_MODE
        a.st_nlink = 2
        a.st_uid = a.st_gid = 0
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.mounted_ns
        a.entry_timeout = a.attr_timeout = 60  # the targets never change while the kernel runs
        return a

    def _file_attr(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = stat.S_IFREG | stat.S_IMODE(st.st_mode)
        a.st_nlink = 1
        a.st_uid, a.st_gid = st.st_uid, st.st_gid
        a.st_size = 0  # unknown until read: the output is made at each open
        a.st_blksize = FILE_BLKSIZE
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        a.entry_timeout = a.attr_timeout = self.cache_timeout
        return a

    def _stats_attr(self) -> pyfuse3.EntryAttributes:
        a = self._dir_attr(STATS_INODE)
        a.st_mode = stat.S_IFREG | 0o444
        a.st_nlink = 1
        a.entry_timeout = a.attr_timeout = 0
        return a

    async def getattr(self, inode, ctx=None) -> pyfuse3.EntryAttributes:
        if inode == ROOT or inode in self.ino_target:
            return self._dir_attr(inode)
        if inode == STATS_INODE:
            return self._stats_attr()
        key = self.ino_file.get(inode)
        if key is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._file_attr(inode, self._pin_stat(*key))

    async def lookup(self, parent_inode, name, ctx=None) -> pyfuse3.EntryAttributes:
        name = os.fsdecode(name)
        if parent_inode == ROOT:
            if name == STATS_NAME:
                return self._stats_attr()
            if name not in self.target_ino:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._dir_attr(self.target_ino[name])
        target = self.ino_target.get(parent_inode)
        if target is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if len(name) > NAME_MAX or name.startswith("-"):
            raise pyfuse3.FUSEError(errno.ENOENT)
        st = self._pin_stat(target, name)
        ino = self._file_inode(target, name)
        self.lookups[ino] += 1
        return self._file_attr(ino, st)

    # -- directories --------------------------------------------------------------
    async def opendir(self, inode, ctx) -> int:
        if inode == ROOT:
            entries = [(STATS_NAME.encode(), STATS_INODE)] + \
                [(t.encode(), self.target_ino[t]) for t in self.targets]
        elif inode in self.ino_target:
            entries = [(n.encode(), 0) for n in self.state.names(self.ino_target[inode])]
        else:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self.next_fh
        self.next_fh += 1
        self.dirs[fh] = _Dir(inode, entries)
        return fh

    async def readdir(self, fh, start_id, token) -> None:
        d = self.dirs[fh]
        entries = d.entries
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            if ino == STATS_INODE:
                attr = self._stats_attr()
            elif ino:  # a target directory
                attr = self._dir_attr(ino)
            else:
                target = self.ino_target[d.inode]
                try:
                    attr = self._file_attr(self._file_inode(target, name.decode()),
                                           self._pin_stat(target, name.decode()))
                except pyfuse3.FUSEError:
                    continue  # removed since opendir, or hidden
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                return
            if not ino:
                self.lookups[attr.st_ino] += 1

    async def releasedir(self, fh) -> None:
        self.dirs.pop(fh, None)

    # -- files ----------------------------------------------------------------------
    # FUSE opens come to open_quick() first, on a device thread (device.py); what it
    # declines (first opens, other namespaces, refusals) comes to open() in trio.
    # Reads and releases of every file are served on device threads.
    def _new_fh(self) -> int:
        with self.lock:
            fh = self.next_fh
            self.next_fh += 1
            return fh

    def _new_handle(self, reader, label: str, user: User, pid: int, fh: int = 0) -> int:
        """Register READER as an open file counted by _reserve(), under FH if
        open_quick() answered with it."""
        with self.lock:
            self.opening -= 1
            fh = fh or self._new_fh()
            self.handles[fh] = Handle(reader, label, pid, user[0], user, time.monotonic())
        return fh

    def _reserve(self, user: User) -> tuple[int, str] | None:
        """Count one more open by UID in the limits, or (errno, why) they refuse it.
        Counted before its seq_file is made, since making it may wait (in another
        namespace): opens that checked first and counted after all got past the limit
        together (16 at once from a container, against a limit of 4). .stats opens
        count too: each holds its snapshot."""
        lim = self.limits
        with self.lock:
            files = len(self.handles) + self.opening
            if lim.max_handles and files >= lim.max_handles:
                return errno.ENFILE, f"{files} files open, the limit (max_handles)"
            if lim.max_handles_per_uid and self.uid_handles[user] >= lim.max_handles_per_uid:
                return errno.EMFILE, (f"the user has {self.uid_handles[user]} files open, "
                                      "the limit (max_handles_per_uid)")
            self.uid_handles[user] += 1
            self.opening += 1
            return None

    def _unreserve(self, user: User) -> None:
        """An open counted by _reserve() made no file."""
        with self.lock:
            self.uid_handles[user] -= 1
            self.opening -= 1

    def _opened(self, fd: int, origin: _Origin, pin: _Pin, label: str, fh: int = 0) -> int:
        """A handle for the new seq_file FD, of an open counted by _reserve()."""
        with self.lock:
            self.metrics.opened(label)
            reader = Seekable(self._reader(fd, pin, label, origin.user),
                              functools.partial(self._remake, origin, pin, label))
            return self._new_handle(reader, label, origin.user, origin.pid, fh)

    def _reader(self, fd: int, pin: _Pin, label: str, user: User) -> Reader:
        return Reader(Stream(fd, label), pin.pace, self.read_ahead.account(user))

    def _remake(self, o: _Origin, pin: _Pin, label: str) -> Reader:
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
            fd = trio.from_thread.run(self.namespaces.open_fd, o.dumper, o.target, o.pid,
                                      o.uid, trio_token=self.trio_token)
        else:
            fd = self._seq_file(o)
        return self._reader(fd, pin, label, o.user)

    def _may_read(self, key: tuple[str, str], uid: int, pid: int) -> bool:
        """Whether the requester may read the dumper KEY, beyond the kernel's mode check
        (see privilege.py): uid 0 reads a dumper that is not world-readable only with
        CAP_SYS_ADMIN."""
        if uid != 0:
            return True
        try:
            mode = os.stat(self.state.pin_str(*key)).st_mode
        except OSError:
            return True  # gone: the open fails on its own
        return bool(mode & stat.S_IROTH) or privilege.capable(pid, privilege.READ_PRIVATE_CAPS)

    def open_quick(self, inode: int, flags: int, uid: int, pid: int) -> int | None:
        """Open without waiting for anything: a dumper whose link is cached, seen from
        the daemon's namespaces. Returns the fh to answer with, or None to leave it to
        open(). The seq_file is made by make_quick(), once the answer is on its way:
        the reader's wake-up and first READ then overlap the making instead of
        following it (a tenth of a small dump's per-open overhead)."""
        key = self.ino_file.get(inode)
        pin = self.pins.get(key) if key else None
        if (flags & os.O_ACCMODE != os.O_RDONLY or pin is None or pin.hidden
                or pin.view is None):
            return None
        kind = kind_of(key[0])
        if pin.view == "reader" and kind and not self.namespaces.at_home(kind, pid):
            return None
        if not self._may_read(key, uid, pid):
            return None
        user = privilege.user(uid, pid)
        with self.lock:
            if pin.dumper is None or self._reserve(user):
                return None
            fh = self._new_fh()
            self.unmade[fh] = pin.dumper, pin, key, uid, pid, user
            return fh

    def make_quick(self, fh: int) -> None:
        """Make the seq_file of an open that open_quick() answered with FH; if that fails
        now, the file fails: its reads get EIO, and the log says why. No request of
        the file can come first: the device thread that answered the open calls this
        before it reads /dev/fuse again."""
        d, pin, (target, name), uid, pid, user = self.unmade.pop(fh)
        label = f"{target}/{name}"
        # with the dumper open_quick() took, even if its pin went since
        origin = self._origin(d, pin, target, uid, pid, user)
        try:
            fd = self._seq_file(origin)
        except DumperError as e:
            h = self.handles[self._new_handle(_Snapshot(b""), label, origin.user, origin.pid,
                                              fh)]
            self._fail(h, errno.EIO, str(e))
            return
        self._opened(fd, origin, pin, label, fh)

    async def open(self, inode, flags, ctx) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EACCES)
        user = privilege.user(ctx.uid, ctx.pid)
        if inode == STATS_INODE:
            self._reserve_or_refuse(STATS_NAME, user, ctx)
            snapshot = _Snapshot(self.metrics.render(self.read_ahead.held,
                                                     *self.namespaces.counts()))
            return _file_info(self._new_handle(snapshot, STATS_NAME, user, ctx.pid))
        key = self.ino_file.get(inode)
        if key is None:
            raise pyfuse3.FUSEError(errno.EISDIR if inode in self.ino_target or inode == ROOT
                                    else errno.ENOENT)
        target, name = key
        label = f"{target}/{name}"
        if not self._may_read(key, ctx.uid, ctx.pid):
            self.refusals.warn(ctx.uid, "open %s by uid %d pid %d refused: a dumper that is "
                               "not world-readable needs CAP_SYS_ADMIN (in the initial user "
                               "namespace) of uid 0", label, ctx.uid, ctx.pid)
            self.metrics.error(label, errno.EACCES)
            raise pyfuse3.FUSEError(errno.EACCES)
        self._reserve_or_refuse(label, user, ctx)
        try:
            pin, origin, fd = await self._open_pin(target, name, user, ctx)
        except BaseException:  # refused, failed or cancelled: it made no file
            self._unreserve(user)
            raise
        return _file_info(self._opened(fd, origin, pin, label))

    def _reserve_or_refuse(self, label: str, user: User, ctx) -> None:
        refused = self._reserve(user)
        if refused:
            self.refusals.warn(ctx.uid, "open %s by uid %d pid %d refused: %s", label, ctx.uid,
                               ctx.pid, refused[1])
            self.metrics.error(label, refused[0])
            raise pyfuse3.FUSEError(refused[0])

    async def _open_pin(self, target: str, name: str, user: User,
                        ctx) -> tuple[_Pin, _Origin, int]:
        """The pin TARGET/NAME and a new seq_file of it, for open(); FUSEError if not."""
        label = f"{target}/{name}"
        pin = self.pins.get((target, name))
        if pin is None or pin.hidden or not self.cache_timeout:
            pin, _ = self._pin(target, name)  # while watched, a known pin needs no stat
        try:
            if pin.view is None:
                pin.view = self.state.meta.get(target, name, pin.link_id).get("view", "reader")
            origin = self._origin(self._dumper(pin, target, name), pin, target, ctx.uid,
                                  ctx.pid, user)
            return pin, origin, await self._open_in_view(origin)
        except DumperError as e:
            if e.errno == errno.ENOENT:   # removed since the lookup
                raise pyfuse3.FUSEError(errno.ENOENT) from None
            # permission and "try again" (a limit, a helper late) mean what they say
            err = e.errno if e.errno in (errno.EACCES, errno.EAGAIN) else errno.EIO
            self.refusals.warn(ctx.uid, "open %s by uid %d pid %d refused: %s", label, ctx.uid,
                               ctx.pid, e)
            self.metrics.error(label, err)
            raise pyfuse3.FUSEError(err) from None

    def _dumper(self, pin: _Pin, target: str, name: str) -> Dumper:
        """The pin's dumper, cached while the state dir is watched (a change event drops
        it, so a removed pin keeps its link only while files opened from it are open).
        Uncached, each open file holds a link of its own."""
        if pin.dumper is not None:
            return pin.dumper
        d = Dumper(kernel.obj_get(self.state.pin_str(target, name)), f"{target}/{name}")
        if self.cache_timeout and self.cached_links < LINK_CACHE_MAX:
            with self.lock:
                pin.dumper = d
                self.cached_links += 1
        return d

    @staticmethod
    def _origin(d: Dumper, pin: _Pin, target: str, uid: int, pid: int,
                user: User) -> _Origin:
        caps = None
        if pin.view == "reader" and target in privilege.CRED_TARGETS:
            caps = privilege.effective(pid)
        return _Origin(d, target, pin.view, pid, uid, user, caps)

    async def _open_in_view(self, o: _Origin) -> int:
        """A seq_file of O's dumper as its reader would make it (its view)."""
        if o.view == "reader" and kind_of(o.target):
            return await self.namespaces.open_fd(o.dumper, o.target, o.pid, o.uid)
        return self._seq_file(o)

    @staticmethod
    def _seq_file(o: _Origin) -> int:
        """A seq_file of O's dumper made here, with no more capabilities than the reader
        had at open where the kernel weighs them (privilege.CRED_TARGETS)."""
        if o.caps is None:
            return o.dumper.open_fd()
        with privilege.capabilities(o.caps):
            return o.dumper.open_fd()

    def read_handle(self, fh: int, offset: int, size: int, answer=None,
                    tag: int = 0) -> list | object | None:
        """A FUSE read of an open file at OFFSET, on a device thread: it may block in the
        kernel. Returns the reply's pieces (see reader.py, seek.py). Given ANSWER, a read that may wait
        long is instead left with the file's producer, which calls ANSWER(TAG, pieces)
        -- or ANSWER(TAG, errno) -- once it can: PARKED; or, with no producer to leave
        it with, None (for the device to hand its lead over and ask again)."""
        h = self.handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if h.failed:
            raise pyfuse3.FUSEError(h.failed)
        if isinstance(h.reader, _Snapshot):
            return h.reader.read(offset, size)
        t0 = time.monotonic()
        if self._out_of_time(h, t0):
            budget = self.limits.open_budget
            raise self._fail(h, errno.ETIME, f"reading dumper {h.label} stopped: the open "
                             f"took more than its time budget of {budget:g} s (open_budget)")
        if answer is not None and not h.reader.quick(offset):
            def deliver(result: list | DumperError) -> None:
                if isinstance(result, DumperError):
                    self._fail(h, _read_errno(result), str(result))
                    return answer(tag, _read_errno(result))
                self.metrics.read(h.label, sum(map(len, result)), time.monotonic() - t0)
                return answer(tag, result)
            return PARKED if h.reader.park(offset, size, deliver) else None
        try:
            data = h.reader.read(offset, size)
        except DumperError as e:
            raise self._fail(h, _read_errno(e), str(e)) from None
        self.metrics.read(h.label, sum(map(len, data)), time.monotonic() - t0)
        return data

    def _out_of_time(self, h: Handle, now: float) -> bool:
        """Whether H has read for longer than its open_budget."""
        budget = self.limits.open_budget
        return bool(budget) and now - h.opened > budget

    def _fail(self, h: Handle, err: int, why: str) -> pyfuse3.FUSEError:
        """Fail handle H for good with ERR: one log line, ERR to every later read.
        Returns the error to raise for this read."""
        h.failed = err
        log.error("%s (reader uid %d pid %d)", why, h.uid, h.pid)
        self.metrics.error(h.label, err)
        return pyfuse3.FUSEError(err)

    def release_handle(self, fh: int) -> None:
        """The last close of an open file, on a device thread."""
        with self.lock:
            h = self.handles.pop(fh, None)
            if h is None:
                return
            if isinstance(h.reader, Seekable):
                self.metrics.closed(h.label)
            self.uid_handles[h.user] -= 1
        h.reader.release()

    def streaming(self) -> bool:
        """Whether any open file is being read ahead now (see Reader.streaming)."""
        return any(isinstance(h.reader, Seekable) and h.reader.streaming
                   for h in list(self.handles.values()))

    async def flush(self, fh) -> None:
        # Nothing to flush; ENOSYS tells the kernel never to send FLUSH again,
        # saving a round trip on every close().
        raise pyfuse3.FUSEError(errno.ENOSYS)

    def _may_change(self, ctx, err: int, what: str) -> None:
        """FUSEError(ERR) unless the requester may change the tree (privilege.py)."""
        if not privilege.may_change(ctx.uid, ctx.pid):
            self.refusals.warn(ctx.uid, "%s by uid %d pid %d refused: changes need uid 0 with "
                               "CAP_SYS_ADMIN or CAP_BPF in the initial user namespace", what,
                               ctx.uid, ctx.pid)
            raise pyfuse3.FUSEError(err)

    async def unlink(self, parent_inode, name, ctx) -> None:
        """rm MNT/TARGET/NAME: delete the pin (privileged); open readers finish their read."""
        target = self.ino_target.get(parent_inode)
        if target is None:
            raise pyfuse3.FUSEError(errno.EPERM)
        self._may_change(ctx, errno.EACCES, f"rm {target}/{os.fsdecode(name)}")
        name = os.fsdecode(name)
        self._pin_stat(target, name)
        try:
            self.state.remove(target, name)
        except DumperError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        log.info("removed dumper %s/%s (uid %d, pid %d)", target, name, ctx.uid, ctx.pid)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags,
                     ctx) -> None:
        """mv within a target directory (privileged): renames the pin."""
        target = self.ino_target.get(parent_inode_old)
        if target is None or parent_inode_new != parent_inode_old:
            raise pyfuse3.FUSEError(errno.EINVAL)  # a link's target is fixed
        self._may_change(ctx, errno.EPERM, f"mv {target}/{os.fsdecode(name_old)}")
        old, new = os.fsdecode(name_old), os.fsdecode(name_new)
        try:
            check_name(new)
        except DumperError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        self._pin_stat(target, old)
        if flags & pyfuse3.RENAME_NOREPLACE and self.state.pin_path(target, new).exists():
            raise pyfuse3.FUSEError(errno.EEXIST)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        self.state.rename(target, old, new)
        log.info("renamed dumper %s/%s to %s (uid %d)", target, old, new, ctx.uid)
        ino = self.file_ino.pop((target, old), None)
        if ino is not None:
            self.file_ino.pop((target, new), None)
            self.file_ino[(target, new)] = ino
            self.ino_file[ino] = (target, new)

    async def setattr(self, inode, attr, fields, fh, ctx) -> pyfuse3.EntryAttributes:
        """chmod, chown and touch of a dumper change its pin (privileged)."""
        key = self.ino_file.get(inode)
        if key is None:
            raise pyfuse3.FUSEError(errno.EPERM)
        self._may_change(ctx, errno.EPERM, f"changing {key[0]}/{key[1]}")
        if fields.update_size:
            raise pyfuse3.FUSEError(errno.EACCES)
        path = self.state.pin_path(*key)
        try:
            self._pin_stat(*key)
        except pyfuse3.FUSEError:
            if fields.update_mode or fields.update_uid or fields.update_gid:
                raise
            # After an unlink the kernel sets the times of the inode still open; its pin
            # is gone, and failing this would fail the open readers' next reads.
            return self._gone_attr(inode, attr)
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.chown(path, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = os.stat(path)
            os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                               attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        log.info("changed %s/%s (uid %d)", *key, ctx.uid)
        return self._file_attr(inode, self._pin_stat(*key))

    def _gone_attr(self, inode, attr) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_mode = stat.S_IFREG
        a.st_nlink = 0
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = attr.st_atime_ns, attr.st_mtime_ns, \
            attr.st_ctime_ns
        a.entry_timeout = a.attr_timeout = 0
        return a

    # -- extended attributes: what `bpfdumpfs info` shows, for getfattr -d ---------------
    def _xattrs(self, inode) -> dict[bytes, bytes]:
        if inode == ROOT:
            return {STATUS_XATTR: json.dumps(self.metrics.status()).encode()}
        key = self.ino_file.get(inode)
        if key is None:
            return {}
        self._pin_stat(*key)
        try:
            info = self.state.info(*key)
        except DumperError as e:
            err = errno.ENOENT if e.errno == errno.ENOENT else errno.EIO
            raise pyfuse3.FUSEError(err) from None
        fields = {"target": info.target, "link_id": info.link_id, "prog_id": info.prog_id,
                  "prog_name": info.prog_name, "prog_tag": info.prog_tag, "view": info.view,
                  **info.params()}
        return {XATTR_PREFIX + k.encode(): str(v).encode() for k, v in fields.items()}

    async def listxattr(self, inode, ctx) -> list[bytes]:
        return list(self._xattrs(inode))

    @staticmethod
    def xattr_refusal(name: bytes) -> int | None:
        """The errno for a getxattr of NAME that needs no look at the file, or None.

        `ls -l` asks every file for its security label and its ACL. There are no labels
        here: saying "not supported" (not "no such attribute") lets coreutils stop asking
        after the first file. ACLs must be answered "none": the kernel asks for them in
        permission checks. Both are answered on the device's threads (device.py)."""
        if name.startswith((b"security.", b"trusted.")):
            return errno.EOPNOTSUPP
        if not name.startswith(XATTR_PREFIX):
            return pyfuse3.ENOATTR
        return None

    async def getxattr(self, inode, name, ctx) -> bytes:
        refused = self.xattr_refusal(name)
        if refused:
            raise pyfuse3.FUSEError(refused)
        value = self._xattrs(inode).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    async def setxattr(self, inode, name, value, ctx) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def removexattr(self, inode, name, ctx) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    # The tree is a view of the state directory: nothing is created through it.
    async def create(self, parent_inode, name, mode, flags, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mkdir(self, parent_inode, name, mode, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(self, parent_inode, name, target, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def statfs(self, ctx) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_files = len(self.file_ino) + len(self.targets) + 1
        s.f_namemax = NAME_MAX
        return s
