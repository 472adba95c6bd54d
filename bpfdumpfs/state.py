"""The state directory: dumpers pinned at STATE_DIR/TARGET/NAME in a bpffs, their
records (mode, owner, view, origin, parameters), and the names they may take.

The state directory is the single source of truth: the FUSE tree, the CLI and other
tools (`bpftool iter pin`) all see and change the same pins, and a pin survives any
crash of the process that made it.
"""
from __future__ import annotations

import errno
import grp
import json
import logging
import os
import pwd
import re
import stat
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from . import kernel, targets
from .dumpers import Dumper, DumperInfo, Params, params_of
from .errors import DumperError

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/sys/fs/bpf/bpfdumpfs"
BPF_FS_MAGIC = 0xCAFE4A11
NAME_MAX = 64  # bpffs takes longer names; users read these in `ls`, keep them short
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
# Pins are made under a temporary name and renamed into place, so nobody sees a
# half-made dumper; the prefix is not a valid dumper name, so it never shows.
_TMP_PREFIX = "-new-"


def is_dumper_name(name: str) -> bool:
    """Whether NAME may name a dumper (see check_name); temporary pins' names may not."""
    return len(name) <= NAME_MAX and _NAME_RE.match(name) is not None


def check_name(name: str) -> str:
    """A dumper name: a non-empty file name without '/', '.' or a leading '-'."""
    if not name:
        raise DumperError(errno.EINVAL, "dumper name is empty", "give a name such as 'mytasks'")
    if len(name) > NAME_MAX:
        raise DumperError(errno.ENAMETOOLONG, f"dumper name {name[:20]}... is {len(name)} "
                          f"characters", f"use at most {NAME_MAX}")
    if not _NAME_RE.match(name):
        raise DumperError(errno.EINVAL, f"dumper name {name!r} is not allowed",
                          "use letters, digits, '_' and '-' (not first); no '/' or '.'")
    return name



# -- the state directory -------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """A pin in the state directory, as the tree lists it."""
    target: str
    name: str
    path: str


ID_MAX = 2**32 - 2   # (uid_t)-1 means "unchanged" to chown
PID_MAX = 1 << 22    # PID_MAX_LIMIT


def _id(value: str | int, kind: str) -> int:
    n = int(value)
    if not 0 <= n <= ID_MAX and n != -1:  # -1: leave it as it is
        raise DumperError(errno.EINVAL, f"{kind} {n} is out of range",
                          f"give a {kind} from 0 to {ID_MAX}")
    return n


def _uid(owner: str | int | None) -> int:
    if owner is None or isinstance(owner, int) or str(owner).isdigit():
        return -1 if owner is None else _id(owner, "uid")
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise DumperError(errno.EINVAL, f"user {owner!r} does not exist",
                          "give an existing user name or a numeric uid") from None


def _gid(group: str | int | None) -> int:
    if group is None or isinstance(group, int) or str(group).isdigit():
        return -1 if group is None else _id(group, "gid")
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise DumperError(errno.EINVAL, f"group {group!r} does not exist",
                          "give an existing group name or a numeric gid") from None


VIEWS = ("reader", "daemon")


@dataclass(frozen=True)
class Spec:
    """A dumper as `bpfdumpfs add` and config files declare it."""
    name: str
    object: str                       # a BPF object, or a .bpf.c source
    prog: str | None = None
    params: Params = Params()
    mode: int | None = None           # None: 0400 for a new dumper, kept on --replace
    owner: str | int | None = None    # None: root for a new dumper, kept on --replace
    group: str | int | None = None
    view: str = "reader"
    cflags: tuple[str, ...] = ()      # compiler flags for a source (compile.cflags)

    def check(self) -> Spec:
        """Everything that can be checked without the kernel; raises DumperError."""
        check_name(self.name)
        if self.mode is not None and not 0 <= self.mode <= 0o7777:
            raise DumperError(errno.EINVAL, f"mode {self.mode:o} is not a file mode",
                              "give an octal mode such as 0440")
        if self.view not in VIEWS:
            raise DumperError(errno.EINVAL, f"view {self.view!r} is unknown",
                              "use --view reader or --view daemon")
        _uid(self.owner), _gid(self.group)
        for key in ("tid", "pid"):
            value = getattr(self.params, key)
            if value is not None and not 0 < value <= PID_MAX:
                raise DumperError(errno.EINVAL, f"{key} {value} is not a process id",
                                  f"give a {key} from 1 to {PID_MAX}")
        return self


class Meta:
    """What bpfdumpfs records beside each pin that the link itself does not carry
    (where it came from, its view): a hash map pinned in the state directory, so
    the record lives and dies with the pins and survives any daemon crash. A
    record names the link id it describes; a pin replaced by another tool makes
    its record stale, and stale records are ignored."""
    PIN = "bpfdumpfs_meta"
    KEY_SIZE, VALUE_SIZE, MAX_ENTRIES = 128, 2048, 1 << 16

    def __init__(self, state_path: Path) -> None:
        self.path = state_path / self.PIN
        self._fd: int | None = None

    def _map(self) -> int:
        if self._fd is None:
            try:
                self._fd = kernel.obj_get(str(self.path))
            except DumperError as e:
                if e.errno != errno.ENOENT:
                    raise
                fd = kernel.map_create(kernel.BPF_MAP_TYPE_HASH, self.KEY_SIZE, self.VALUE_SIZE,
                                       self.MAX_ENTRIES, kernel.BPF_F_NO_PREALLOC, "bpfdumpfs_meta")
                try:
                    kernel.obj_pin(fd, str(self.path))
                    self._fd = fd
                except DumperError as e:  # another process pinned it first
                    os.close(fd)
                    if e.errno != errno.EEXIST:
                        raise
                    self._fd = kernel.obj_get(str(self.path))
        return self._fd

    @classmethod
    def _key(cls, target: str, name: str) -> bytes:
        return f"{target}/{name}".encode().ljust(cls.KEY_SIZE, b"\0")

    def get(self, target: str, name: str, link_id: int) -> dict:
        if not self.path.exists():
            return {}
        raw = kernel.map_lookup(self._map(), self._key(target, name), self.VALUE_SIZE)
        if raw is None:
            return {}
        record = json.loads(raw.rstrip(b"\0"))
        return record if record.get("link_id") == link_id else {}

    def set(self, target: str, name: str, link_id: int, **fields) -> None:
        value = json.dumps({"link_id": link_id, **fields}).encode()
        if len(value) > self.VALUE_SIZE:
            raise DumperError(errno.ENAMETOOLONG, f"metadata of dumper {target}/{name}",
                              "use a shorter object path")
        kernel.map_update(self._map(), self._key(target, name), value.ljust(self.VALUE_SIZE, b"\0"))

    def delete(self, target: str, name: str) -> None:
        if self.path.exists():
            kernel.map_delete(self._map(), self._key(target, name))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class StateDir:
    """STATE/TARGET/NAME pins of iter links in a bpffs."""

    def __init__(self, path: str | os.PathLike = DEFAULT_STATE_DIR) -> None:
        self.path = Path(path)
        self._str = str(self.path)
        self.meta = Meta(self.path)

    def check(self) -> StateDir:
        """Raise unless the state directory exists on a bpffs."""
        try:
            magic = kernel.fs_magic(str(self.path))
        except DumperError as e:
            raise DumperError(e.errno, f"state dir {self.path} is not usable",
                              f"create it on a bpffs: mount -t bpf bpf {self.path}") from None
        if magic != BPF_FS_MAGIC:
            raise DumperError(errno.EINVAL, f"state dir {self.path} is not on a bpffs",
                              f"mount one there (mount -t bpf bpf {self.path}) or choose "
                              "another --state-dir")
        return self

    def ensure(self) -> StateDir:
        """Create the state directory, mounting bpffs at /sys/fs/bpf if nothing is there."""
        if not self.path.exists():
            bpf_root = Path("/sys/fs/bpf")
            if bpf_root in self.path.parents and kernel.fs_magic(str(bpf_root)) != BPF_FS_MAGIC:
                kernel.mount_bpffs(str(bpf_root))
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DumperError(e.errno, f"creating state dir {self.path}",
                                  "its parent must be on a bpffs (mount -t bpf bpf DIR)") from None
        self.check()
        self._secure()
        return self

    def _secure(self) -> None:
        """Make the state dir and its target dirs root's alone. A bpffs mounted without
        mode= is 1777: anyone could make a target dir there first, own it, and then
        rename and remove the pins root puts in it."""
        for path in [self.path, *self.path.iterdir()]:
            st = path.lstat()  # a symlink is no directory here: never followed
            if not stat.S_ISDIR(st.st_mode) or (st.st_uid == 0 and not st.st_mode & 0o022):
                continue
            os.chown(path, 0, 0, follow_symlinks=False)
            os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o022)
            log.warning("state dir: %s was uid %d's, mode %04o: made it root's, not writable "
                        "by others", path, st.st_uid, stat.S_IMODE(st.st_mode))

    def pin_str(self, target: str, name: str) -> str:
        """Where TARGET/NAME is pinned, as a str: the tree asks it for every file it
        lists, and a Path costs more than the stat that follows."""
        return f"{self._str}/{target}/{name}"

    def pin_path(self, target: str, name: str) -> Path:
        return Path(self.pin_str(target, name))

    # reading ----------------------------------------------------------------
    def _pins(self, target: str) -> list[os.DirEntry]:
        """The entries of valid dumper names pinned under TARGET: one readdir, no stat."""
        try:
            with os.scandir(self.path / target) as it:
                return [e for e in it if is_dumper_name(e.name) and
                        e.is_file(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def names(self, target: str) -> list[str]:
        """Valid dumper names pinned under TARGET (not checked to be iter links)."""
        return sorted(e.name for e in self._pins(target))

    def find(self, targets_: list[str], ino: int) -> tuple[str, str] | None:
        """(target, name) of the dumper whose pin is inode INO, under one of TARGETS_."""
        for target in targets_:
            for e in self._pins(target):
                if e.inode() == ino:
                    return target, e.name
        return None

    def entries(self, target: str | None = None) -> Iterator[Entry]:
        for t in [target] if target else sorted(targets.running_kernel()):
            for n in self.names(t):
                yield Entry(t, n, str(self.pin_path(t, n)))

    def get(self, target: str, name: str) -> Dumper:
        """The pinned dumper TARGET/NAME, held by this process."""
        path = self.pin_path(target, name)
        try:
            return Dumper.from_pin(path)
        except DumperError as e:
            if e.errno == errno.ENOENT:
                raise DumperError(errno.ENOENT, f"dumper {target}/{name} does not exist",
                                  "see `bpfdumpfs ls`") from None
            raise

    def record(self, target: str, name: str) -> dict:
        """What bpfdumpfs recorded of the pinned dumper TARGET/NAME (origin, view, config
        file...), with its link_id; empty if nothing, or a stale record."""
        with self.get(target, name) as d:
            return self.meta.get(target, name, d.link_info().id)

    def info(self, target: str, name: str) -> DumperInfo:
        """The dumper pinned at TARGET/NAME, named by where it is pinned: a link of
        another target pinned there is shown there, marked misplaced with the fix."""
        with self.get(target, name) as d:
            info = d.info()
        st = os.stat(self.pin_path(target, name))
        meta = self.meta.get(target, name, info.link_id)
        misplaced = None
        if info.target != target:
            misplaced = (f"a {info.target} dumper pinned under {target}/, so the tree hides "
                         f"it; move it: mv {self.pin_path(target, name)} "
                         f"{self.path / info.target}/")
        return DumperInfo(**{**asdict(info), "target": target, "misplaced": misplaced,
                             "name": name,
                             "path": str(self.pin_path(target, name)),
                             "mode": f"{stat.S_IMODE(st.st_mode):04o}",
                             "owner": _user_name(st.st_uid), "group": _group_name(st.st_gid),
                             "view": meta.get("view", "reader"),
                             "origin": meta.get("origin", "external"),
                             "reader_dependent": tuple(meta["reader_dependent"])
                             if "reader_dependent" in meta else None})

    # changing ----------------------------------------------------------------
    def pin(self, dumper: Dumper, name: str, mode: int = 0o400, owner: str | int | None = None,
            group: str | int | None = None, replace: bool = False) -> Path:
        """Pin DUMPER as TARGET/NAME with MODE/OWNER/GROUP; returns the pin's path.

        The pin is made under a temporary name, given its mode and owner, then
        renamed into place: readers never see a half-made dumper, and a replaced
        one is swapped in one step (readers of the old one finish their read).
        """
        check_name(name)
        uid, gid = _uid(owner), _gid(group)
        target = dumper.link_info().target_name
        final = self.pin_path(target, name)
        if final.exists() and not replace:
            raise DumperError(errno.EEXIST, f"dumper {target}/{name} exists",
                              "choose another name, or --replace it")
        (self.path / target).mkdir(exist_ok=True)
        tmp = self.path / target / f"{_TMP_PREFIX}{uuid.uuid4().hex[:12]}"
        kernel.obj_pin(dumper.fd, str(tmp))
        try:
            self._set_access(tmp, mode, uid, gid)
            os.rename(tmp, final)
        except OSError as e:
            os.unlink(tmp)
            raise DumperError(e.errno, f"pinning dumper {target}/{name}") from None
        return final

    def add(self, spec: Spec, replace: bool = False, origin: str = "cli",
            loaded: Dumper | None = None, **record) -> tuple[Path, str]:
        """Load SPEC (or take LOADED, its already loaded dumper) and pin it; returns
        (pin path, what was done: added | replaced | updated).

        Nothing changes unless every check passes. With REPLACE, a dumper of the
        same target and parameters gets the new program through LINK_UPDATE (the
        link and its id stay; open streams keep the old program); otherwise the
        new link is pinned over the old one in one rename.
        """
        spec.check()
        new = loaded or Dumper.load(spec.object, spec.prog, spec.params, spec.cflags)
        try:
            li = new.link_info()
            path = self.pin_path(li.target_name, spec.name)
            mode = 0o400 if spec.mode is None else spec.mode
            if not path.exists():
                self.pin(new, spec.name, mode, spec.owner, spec.group)
                done, link_id = "added", li.id
            elif not replace:
                raise DumperError(errno.EEXIST, f"dumper {li.target_name}/{spec.name} exists",
                                  "choose another name, or --replace it")
            else:
                with self.get(li.target_name, spec.name) as old:
                    oi = old.link_info()
                    if params_of(oi) == params_of(li):
                        old.replace_program(new)
                        self._set_access(path, spec.mode, spec.owner, spec.group)
                        done, link_id = "updated", oi.id
                    else:
                        st = os.stat(path)
                        self.pin(new, spec.name,
                                 stat.S_IMODE(st.st_mode) if spec.mode is None else spec.mode,
                                 st.st_uid if spec.owner is None else spec.owner,
                                 st.st_gid if spec.group is None else spec.group, replace=True)
                        done, link_id = "replaced", li.id
            helpers = new.reader_dependent
            if helpers is not None:
                record["reader_dependent"] = list(helpers)
            self._record(li.target_name, spec.name, link_id, origin=origin, view=spec.view,
                         **record)
            if helpers:
                log.warning("%s/%s calls %s: read through the tree, these give the daemon's "
                            "task (pid, uid, comm, cgroup, stack, memory, root), not the "
                            "reader's", li.target_name, spec.name, ", ".join(helpers))
        finally:
            if loaded is None:
                new.close()
        return path, done

    def adopt(self, name: str, link: str, mode: int | None = None, owner: str | int | None = None,
              group: str | int | None = None, replace: bool = False,
              view: str = "reader") -> Path:
        """Pin an existing iter link, given by id or by its bpffs path, as TARGET/NAME."""
        Spec(name, "", mode=mode, owner=owner, group=group, view=view).check()
        with (Dumper.from_link_id(int(link)) if link.isdigit() else Dumper.from_pin(
                link, hint="give a link id (bpftool link show) or the bpffs path of a "
                           "pinned iter link")) as d:
            path = self.pin(d, name, 0o400 if mode is None else mode, owner, group, replace)
            li = d.link_info()
            self._record(li.target_name, name, li.id, origin="pin", view=view)
        return path

    def _record(self, target: str, name: str, link_id: int, **fields) -> None:
        """Write a pin's record, and touch the pin: a mounted tree watches the pins
        (not the record map), and re-reads a record when its pin changes."""
        self.meta.set(target, name, link_id, **fields)
        os.utime(self.pin_path(target, name))

    @staticmethod
    def _set_access(path: Path, mode: int | None, owner, group) -> None:
        """chmod/chown a pin; None leaves that attribute as it is."""
        if mode is not None:
            os.chmod(path, mode)
        os.chown(path, _uid(owner), _gid(group))

    def rename(self, target: str, old: str, new: str) -> None:
        """Rename a pin (and its record) within its target directory."""
        check_name(new)
        src = self.pin_path(target, old)
        record = self.record(target, old)
        os.rename(src, self.pin_path(target, new))
        if record:
            link_id = record.pop("link_id")
            self._record(target, new, link_id, **record)
            self.meta.delete(target, old)

    def remove(self, target: str, name: str) -> None:
        """Delete the pin; the link dies once no reader holds a seq_file of it."""
        try:
            os.unlink(self.pin_path(target, name))
        except FileNotFoundError:
            raise DumperError(errno.ENOENT, f"dumper {target}/{name} does not exist",
                              "see `bpfdumpfs ls`") from None
        except OSError as e:
            raise DumperError(e.errno, f"removing dumper {target}/{name}",
                              "only root removes dumpers") from None
        self.meta.delete(target, name)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)

