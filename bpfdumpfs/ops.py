"""pyfuse3 operations: the state directory shown as a tree of dumper files.

    /                 one directory per iterator target of the running kernel
    /TARGET/NAME      one regular file per iter link pinned at STATE/TARGET/NAME

Every open() makes a fresh kernel seq_file; output is never cached. The kernel
caches names and attributes (a LOOKUP or GETATTR per `cat` costs as much as
reading a small dump) and the daemon invalidates them as soon as inotify says a
pin changed -- by the CLI, bpftool or anyone (watch.py) -- so a chmod, rm or
rename shows within milliseconds. Without a working watch nothing is cached.

Operations holds the FUSE handlers and what ties their parts together; each part
has one job and says how it may be used from which thread:

    inodes.py   the inode table and open directory listings
    pins.py     what is known of each pin, and the cached links
    files.py    open files: admission, the limits, making seq_files, reads, releases

Threads: pyfuse3's handlers (everything async here) run in trio, one at a time.
The device's threads (device.py) call the methods of device.Served -- read_handle,
release_handle, xattr_refusal -- at any time, concurrently with trio and each other;
these touch only what the parts above document as safe. The data plane's C threads
(core.py) serve most opens, reads and releases before any of this sees them.
"""
from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
import time
from collections.abc import Sequence

import pyfuse3
import trio
from pyfuse3 import (
    EntryAttributes,
    FileHandleT,
    FileInfo,
    FileNameT,
    FlagT,
    InodeT,
    ModeT,
    ReaddirToken,
    RequestContext,
    SetattrFields,
    XAttrNameT,
)

from . import core, privilege
from .errors import DumperError
from .files import FILE_BLKSIZE, Answer, OpenFiles, ReadLater, file_info
from .inodes import PIN_INODE_BASE, ROOT, STATS_INODE, Inodes, Key, file_inode
from .limits import Limits
from .metrics import STATUS_XATTR, Metrics
from .pins import CACHE_TIMEOUT, Pins
from .refusals import Refusals
from .state import NAME_MAX, StateDir, check_name
from .watch import StateWatch

log = logging.getLogger(__name__)

STATS_NAME = ".stats"
DIR_MODE = stat.S_IFDIR | 0o755
XATTR_PREFIX = b"user.bpfdump."
# GETXATTR names answered without a look at the file, first match: (prefix, errno; 0 to
# look). Served by the data plane too (core.c).
XATTR_REFUSALS = ((b"security.", errno.EOPNOTSUPP), (b"trusted.", errno.EOPNOTSUPP),
                  (XATTR_PREFIX, 0), (b"", pyfuse3.ENOATTR))
STATE_RETRY = 1.0      # seconds between looks for a state dir that went away


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


@_guard_handlers
class Operations(pyfuse3.Operations):
    """The FUSE handlers of the tree (see the module's docstring)."""
    supports_dot_lookup = False
    enable_writeback_cache = False
    # The kernel then caches each file's (absent) ACL instead of asking at every `ls -l`
    # (and at every permission check of a non-root reader).
    enable_acl = True

    def __init__(self, state: StateDir, targets: list[str], metrics: Metrics,
                 limits: Limits = Limits(), generation: int = 0) -> None:
        super().__init__()
        self.state = state
        self.metrics = metrics
        self.refusals = Refusals(log)
        self.inodes = Inodes(targets, generation)
        self.pins = Pins(state)
        self.files = OpenFiles(self.pins, metrics, limits, self.refusals, generation)
        self.reviving = trio.Lock()
        core.set_xattr_refusals(XATTR_REFUSALS)
        self.mounted_ns = time.time_ns()

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the tasks the tree needs besides pyfuse3's own, until cancelled."""
        self.files.serving()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.pins.check_new)
                nursery.start_soon(self.files.namespaces.reap_idle)
                task_status.started()
                await self._watch_state()
        finally:
            self.files.namespaces.close()

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
            self._cache(True)
            try:
                await watch.run(self.changed)
            except Exception:  # a bug here must not take the tree down: serve uncached
                log.exception("watching %s failed", self.state.path)
            self._cache(False)

    @property
    def cache_timeout(self) -> float:
        """How long the kernel may keep names and attributes: only while watched."""
        return CACHE_TIMEOUT if self.pins.cached else 0.0

    def _cache(self, on: bool) -> None:
        """Start or stop caching; what was cached may be from another state dir."""
        self.pins.cached = on
        for target in self.inodes.targets:
            self.changed(target, None)

    def shutdown(self) -> None:
        self.files.shutdown()

    def streaming(self) -> bool:
        return self.files.streaming()

    def changed(self, target: str, name: str | None) -> None:
        """A pin changed: forget what we and the kernel cached of it, and check it anew."""
        names = [name] if name else [n for t, n in {*self.inodes.file_ino, *self.pins.known}
                                     if t == target]
        if self.cache_timeout:
            for n in [name] if name else self.state.names(target):
                self.pins.queue_check(target, n)
        for n in names:
            self.pins.forget((target, n))
            ino = self.inodes.file_ino.get((target, n))
            if ino is None:
                # The kernel holds no entry of it (it trusts no entry we did not give,
                # and forgets one before its inode): nothing to invalidate.
                continue
            pyfuse3.invalidate_entry_async(self.inodes.target_ino[target], n.encode(),
                                           ignore_enoent=True)
            pyfuse3.invalidate_inode(ino, attr_only=True)

    def _pin_stat(self, target: str, name: str) -> os.stat_result:
        """stat of a pin that is a valid dumper of TARGET; FUSEError(ENOENT) otherwise."""
        return self.pins.check(target, name)[1]

    def _key(self, inode: int) -> Key | None:
        """The dumper file INODE names: known since a lookup here, or else found by its
        pin's inode -- one the kernel had from a daemon that served the mount before
        (an upgrade, a crash: inodes.py)."""
        key = self.inodes.ino_file.get(inode)
        if key is None and inode > PIN_INODE_BASE:
            key = self.state.find(self.inodes.targets, inode - PIN_INODE_BASE)
            if key is not None:
                self.inodes.file(*key, inode - PIN_INODE_BASE)
        return key

    def _file_stat(self, inode: int) -> tuple[Key, os.stat_result]:
        """The dumper file INODE and its pin's stat; FUSEError(ENOENT) if it is none, or
        its pin is gone or is another now: an inode the kernel kept of a removed pin
        must not read or change a new pin of the name."""
        key = self._key(inode)
        if key is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        st = self._pin_stat(*key)
        if file_inode(st.st_ino) != inode:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return key, st

    # -- attributes ---------------------------------------------------------------
    def _dir_attr(self, ino: int) -> EntryAttributes:
        a = EntryAttributes()
        a.st_ino = ino
        a.st_mode = DIR_MODE
        a.st_nlink = 2
        a.st_uid = a.st_gid = 0
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.mounted_ns
        a.entry_timeout = a.attr_timeout = 60  # the targets never change while the kernel runs
        return a

    def _file_attr(self, ino: int, st: os.stat_result) -> EntryAttributes:
        """A dumper file's attributes; those of a published pin come from C
        (core.c: getattr_file), which must stay in step."""
        a = EntryAttributes()
        a.st_ino = ino
        a.st_mode = stat.S_IFREG | stat.S_IMODE(st.st_mode)
        a.st_nlink = 1
        a.st_uid, a.st_gid = st.st_uid, st.st_gid
        a.st_size = 0  # unknown until read: the output is made at each open
        a.st_blksize = FILE_BLKSIZE
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        a.entry_timeout = a.attr_timeout = self.cache_timeout
        return a

    def _stats_attr(self) -> EntryAttributes:
        a = self._dir_attr(STATS_INODE)
        a.st_mode = stat.S_IFREG | 0o444
        a.st_nlink = 1
        a.entry_timeout = a.attr_timeout = 0
        return a

    async def getattr(self, inode: InodeT, ctx: RequestContext | None = None) -> EntryAttributes:
        if self.inodes.is_dir(inode):
            return self._dir_attr(inode)
        if inode == STATS_INODE:
            return self._stats_attr()
        return self._file_attr(inode, self._file_stat(inode)[1])

    async def lookup(self, parent_inode: InodeT, name: FileNameT,
                     ctx: RequestContext | None = None) -> EntryAttributes:
        fname = os.fsdecode(name)
        if parent_inode == ROOT:
            if fname == STATS_NAME:
                return self._stats_attr()
            if fname not in self.inodes.target_ino:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._dir_attr(self.inodes.target_ino[fname])
        target = self.inodes.ino_target.get(parent_inode)
        if target is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if len(fname) > NAME_MAX or fname.startswith("-"):
            raise pyfuse3.FUSEError(errno.ENOENT)
        st = self._pin_stat(target, fname)
        ino = self.inodes.file(target, fname, st.st_ino)
        self.inodes.looked_up(ino)
        return self._file_attr(ino, st)

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        self.inodes.forget(inode_list)

    # -- directories --------------------------------------------------------------
    def _entries(self, inode: int) -> list[tuple[bytes, int]]:
        if inode == ROOT:
            return [(STATS_NAME.encode(), STATS_INODE)] + \
                [(t.encode(), self.inodes.target_ino[t]) for t in self.inodes.targets]
        if inode in self.inodes.ino_target:
            return [(n.encode(), 0) for n in self.state.names(self.inodes.ino_target[inode])]
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        return FileHandleT(self.inodes.open_listing(inode, self._entries(inode)))

    async def readdir(self, fh: FileHandleT, start_id: int, token: ReaddirToken) -> None:
        d = self.inodes.listings.get(fh)
        if d is None:
            # opened through the server before this one (keeper.py): listed on from now,
            # as a listing goes on after names came and went
            inode = self.inodes.listing_inode(fh)
            if not self.inodes.is_dir(inode):
                raise pyfuse3.FUSEError(errno.EBADF)
            self.inodes.open_listing(inode, self._entries(inode), fh)
            d = self.inodes.listings[fh]
        entries = d.entries
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            if ino == STATS_INODE:
                attr = self._stats_attr()
            elif ino:  # a target directory
                attr = self._dir_attr(ino)
            else:
                target = self.inodes.ino_target[d.inode]
                try:
                    st = self._pin_stat(target, name.decode())
                    attr = self._file_attr(self.inodes.file(target, name.decode(), st.st_ino), st)
                except pyfuse3.FUSEError:
                    continue  # removed since opendir, or hidden
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                return
            if not ino:
                self.inodes.looked_up(attr.st_ino)

    async def releasedir(self, fh: FileHandleT) -> None:
        self.inodes.close_listing(fh)

    # -- files: opens the data plane declines (first opens, other namespaces, refusals)
    # come to open() in trio (files.py) -------------------------------------------------
    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext) -> FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EACCES)
        if inode == STATS_INODE:
            return file_info(self.files.open_snapshot(STATS_NAME, self._stats, ctx.uid,
                                                      ctx.pid))
        key = self._key(inode)
        if key is None:
            raise pyfuse3.FUSEError(errno.EISDIR if self.inodes.is_dir(inode) else errno.ENOENT)
        return file_info(await self.files.open(inode, key, ctx.uid, ctx.pid))

    def _stats(self) -> bytes:
        return self.metrics.render(self.files.read_ahead.held, *self.files.namespaces.counts())

    def read_handle(self, fh: int, offset: int, size: int, answer: Answer | None = None,
                    tag: int = 0, opener: tuple[int, int, int] | None = None) -> list | ReadLater:
        if opener is not None and self.files.foreign(fh):
            if answer is not None:
                return ReadLater.MAY_WAIT  # making it again waits for trio
            self.files.in_trio(self._revive, fh, *opener)
        return self.files.read(fh, offset, size, answer, tag)

    async def _revive(self, fh: int, inode: int, uid: int, pid: int) -> None:
        """Make file FH of INODE again for its reader (uid, pid): a previous server of the
        mount opened it, and went (an upgrade, a crash: keeper.py). ESTALE if its pin is
        gone."""
        async with self.reviving:  # one at a time: two reads of one file may come at once
            if not self.files.foreign(fh):
                return
            if inode == STATS_INODE:
                self.files.open_snapshot(STATS_NAME, self._stats, uid, pid, fh)
                return
            key = self._key(inode)
            if key is None:
                raise pyfuse3.FUSEError(errno.ESTALE)
            try:
                await self.files.open(inode, key, uid, pid, fh)
            except pyfuse3.FUSEError as e:
                raise pyfuse3.FUSEError(errno.ESTALE if e.errno == errno.ENOENT else e.errno) \
                    from None
            log.info("file %d of %s/%s (uid %d pid %d) made again: it was opened through the "
                     "server before", fh, *key, uid, pid)

    def release_handle(self, fh: int) -> None:
        self.files.release(fh)

    async def flush(self, fh: FileHandleT) -> None:
        # Every open has NOFLUSH (device._open_reply): a kernel that sends FLUSH anyway
        # is told, with ENOSYS, never to send it again.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    def _may_change(self, ctx, err: int, what: str) -> None:
        """FUSEError(ERR) unless the requester may change the tree (privilege.py)."""
        if not privilege.may_change(ctx.uid, ctx.pid):
            self.refusals.warn(ctx.uid, "%s by uid %d pid %d refused: changes need uid 0 with "
                               "CAP_SYS_ADMIN or CAP_BPF in the initial user namespace", what,
                               ctx.uid, ctx.pid)
            raise pyfuse3.FUSEError(err)

    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        """rm MNT/TARGET/NAME: delete the pin (privileged); open readers finish their read."""
        target = self.inodes.ino_target.get(parent_inode)
        if target is None:
            raise pyfuse3.FUSEError(errno.EPERM)
        fname = os.fsdecode(name)
        self._may_change(ctx, errno.EACCES, f"rm {target}/{fname}")
        self._pin_stat(target, fname)
        try:
            self.state.remove(target, fname)
        except DumperError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        log.info("removed dumper %s/%s (uid %d, pid %d)", target, fname, ctx.uid, ctx.pid)

    async def rename(self, parent_inode_old: InodeT, name_old: FileNameT,
                     parent_inode_new: InodeT, name_new: FileNameT, flags: FlagT,
                     ctx: RequestContext) -> None:
        """mv within a target directory (privileged): renames the pin."""
        target = self.inodes.ino_target.get(parent_inode_old)
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
        self.inodes.renamed(target, old, new)

    async def setattr(self, inode: InodeT, attr: EntryAttributes, fields: SetattrFields,
                      fh: FileHandleT | None, ctx: RequestContext) -> EntryAttributes:
        """chmod, chown and touch of a dumper change its pin (privileged)."""
        key = self._key(inode)
        if key is None:
            raise pyfuse3.FUSEError(errno.EPERM)
        self._may_change(ctx, errno.EPERM, f"changing {key[0]}/{key[1]}")
        if fields.update_size:
            raise pyfuse3.FUSEError(errno.EACCES)
        path = self.state.pin_path(*key)
        try:
            self._file_stat(inode)
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

    def _gone_attr(self, inode, attr) -> EntryAttributes:
        a = EntryAttributes()
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
        if self._key(inode) is None:
            return {}
        key = self._file_stat(inode)[0]
        try:
            info = self.state.info(*key)
        except DumperError as e:
            err = errno.ENOENT if e.errno == errno.ENOENT else errno.EIO
            raise pyfuse3.FUSEError(err) from None
        fields = {"target": info.target, "link_id": info.link_id, "prog_id": info.prog_id,
                  "prog_name": info.prog_name, "prog_tag": info.prog_tag, "view": info.view,
                  **info.params()}
        return {XATTR_PREFIX + k.encode(): str(v).encode() for k, v in fields.items()}

    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> list[XAttrNameT]:
        return list(self._xattrs(inode))

    @staticmethod
    def xattr_refusal(name: bytes) -> int | None:
        """The errno for a getxattr of NAME that needs no look at the file, or None.

        `ls -l` asks every file for its security label and its ACL. There are no labels
        here: saying "not supported" (not "no such attribute") lets coreutils stop asking
        after the first file. ACLs must be answered "none": the kernel asks for them in
        permission checks. Both are answered by the data plane (core.c), or on the
        device's threads (device.py) where it forwards them."""
        return next((err or None for prefix, err in XATTR_REFUSALS if name.startswith(prefix)),
                    None)

    async def getxattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> bytes:
        refused = self.xattr_refusal(name)
        if refused:
            raise pyfuse3.FUSEError(refused)
        value = self._xattrs(inode).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    async def setxattr(self, inode: InodeT, name: XAttrNameT, value: bytes,
                       ctx: RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def removexattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    # The tree is a view of the state directory: nothing is created through it.
    async def create(self, parent_inode: InodeT, name: FileNameT, mode: ModeT, flags: FlagT,
                     ctx: RequestContext) -> tuple[FileInfo, EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int,
                    ctx: RequestContext) -> EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mkdir(self, parent_inode: InodeT, name: FileNameT, mode: ModeT,
                    ctx: RequestContext) -> EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(self, parent_inode: InodeT, name: FileNameT, target: FileNameT,
                      ctx: RequestContext) -> EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT,
                   ctx: RequestContext) -> EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def statfs(self, ctx: RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_files = len(self.inodes.file_ino) + len(self.inodes.targets) + 1
        s.f_namemax = NAME_MAX
        return s
