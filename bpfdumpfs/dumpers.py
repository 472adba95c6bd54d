"""The dumper model, and bpfdumpfs's Python API: a Dumper and the parameters of its
target (map, cgroup, task).

A Dumper is an iter bpf_link: a factory of seq_files. Each `open()` makes a new
kernel seq_file (a Stream) whose reads run the program. An anonymous Dumper
(`Dumper.load`) lives as long as its link fd: it is released when closed or
garbage-collected, so nothing outlives the program unless it is pinned.

A pinned dumper is a link pinned at STATE_DIR/TARGET/NAME in a bpffs. The state
directory is the single source of truth: the FUSE tree, the CLI and other tools
(`bpftool iter pin`) all see and change the same pins, and a pin survives any
crash of the process that made it.

    >>> from bpfdumpfs import Dumper, StateDir
    >>> with Dumper.load("tasks.bpf.o") as d, d.open() as s:
    ...     header = s.readline()
"""
from __future__ import annotations

import errno
import io
import logging
import os
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import kernel, targets
from .compile import object_file
from .errors import DumperError
from .stream import Stream

if TYPE_CHECKING:
    from .state import StateDir

log = logging.getLogger(__name__)

# -- parameters ------------------------------------------------------------------

@dataclass(frozen=True)
class Params:
    """A dumper's iter_info parameters as a user names them."""
    map: str | None = None        # map id, or the bpffs path of a pinned map
    cgroup: str | None = None     # cgroup directory path or cgroup id
    order: str | None = None      # pre | post | self | ancestors | children
    tid: int | None = None
    pid: int | None = None

    def given(self) -> list[str]:
        return [k for k, v in asdict(self).items() if v is not None]


_GROUP_OF = {"map": "map", "cgroup": "cgroup", "order": "cgroup", "tid": "task", "pid": "task"}


def _open_map(spec: str) -> int:
    if spec.isdigit():
        return kernel.map_get_fd_by_id(int(spec))
    return kernel.obj_get(spec, hint="give --map a map id (bpftool map show) or the bpffs "
                                     "path of a pinned map")


# the kernel takes a directory of either hierarchy (cgroup_v1v2_get_from_fd)
CGROUP_SUPER_MAGICS = (0x63677270, 0x27E0EB)   # cgroup2, cgroup (v1)
CGROUP_HINT = ("give a cgroup directory (of a cgroup2 or a v1 hierarchy, e.g. under "
               "/sys/fs/cgroup), or the id of a cgroup (the inode number of its directory)")


def _cgroup(spec: str) -> tuple[int | None, int | None]:
    """(cgroup_fd, cgroup_id) for a cgroup directory path or a numeric cgroup id."""
    if spec.isdigit():
        return None, int(spec)
    try:
        fd = os.open(spec, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise DumperError(e.errno, f"opening cgroup {spec}", CGROUP_HINT) from None
    if kernel.fs_magic(f"/proc/self/fd/{fd}") not in CGROUP_SUPER_MAGICS:
        os.close(fd)
        raise DumperError(errno.EINVAL, f"{spec} is not a cgroup directory", CGROUP_HINT)
    return fd, None


def iter_params(target: targets.Target, params: Params) -> tuple[kernel.IterParams | None,
                                                                  list[int]]:
    """Check PARAMS against what TARGET takes; the kernel form and fds to close after."""
    for key in params.given():
        if target.param(_GROUP_OF[key]) is None:
            accepted = ", ".join(p.help for p in target.params) or "no parameters"
            raise DumperError(errno.EINVAL, f"target {target.name} does not take --{key}",
                              f"it takes {accepted}")
    for p in target.params:
        if p.required and not any(_GROUP_OF[k] == p.name for k in params.given()):
            raise DumperError(errno.EINVAL, f"target {target.name} needs a {p.name} parameter",
                              f"add {p.help}")
    if params.tid is not None and params.pid is not None:
        raise DumperError(errno.EINVAL, "--tid and --pid both given", "give one of them")
    if params.map is not None:
        fd = _open_map(params.map)
        return kernel.IterParams(map_fd=fd), [fd]
    if target.param("cgroup"):
        if params.order not in target.cgroup_orders:
            raise DumperError(errno.EINVAL, f"cgroup order {params.order!r} is not one this "
                              "kernel has", "use --order " + "|".join(target.cgroup_orders))
        cg_fd, cid = _cgroup(params.cgroup) if params.cgroup else (None, None)
        return (kernel.IterParams(cgroup_fd=cg_fd, cgroup_id=cid,
                                  cgroup_order=target.cgroup_orders[params.order]),
                [cg_fd] if cg_fd is not None else [])
    if params.tid is not None or params.pid is not None:
        return kernel.IterParams(tid=params.tid, pid=params.pid), []
    return None, []


# -- dumpers -----------------------------------------------------------------------

@dataclass(frozen=True)
class DumperInfo:
    """What `bpfdumpfs info` shows: the link, its program and its parameters."""
    target: str
    link_id: int
    prog_id: int
    prog_name: str
    prog_tag: str
    map_id: int | None = None
    cgroup_id: int | None = None
    cgroup_order: str | None = None
    tid: int | None = None
    pid: int | None = None
    name: str | None = None
    path: str | None = None
    mode: str | None = None
    owner: str | None = None
    group: str | None = None
    view: str | None = None
    origin: str | None = None
    # helpers its program calls that see whoever reads a seq_file (READER_HELPERS):
    # through the tree, the daemon; None if bpfdumpfs did not load the program
    reader_dependent: tuple[str, ...] | None = None
    misplaced: str | None = None   # why the tree hides it: pinned under another target

    def params(self) -> dict[str, int | str]:
        keys = ("map_id", "cgroup_id", "cgroup_order", "tid", "pid")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


def params_of(li: kernel.LinkInfo) -> tuple:
    return (li.map_id, li.cgroup_id, li.cgroup_order, li.tid, li.pid)


def choose_program(obj: str, prog: str | None) -> kernel.ProgSpec:
    specs = kernel.object_programs(obj)
    iters = [s for s in specs if s.iter_target]
    if prog is not None:
        match = [s for s in specs if s.name == prog]
        if not match:
            raise DumperError(errno.ENOENT, f"{obj} has no program {prog!r}",
                              "its iter programs: " + (", ".join(s.name for s in iters) or "none"))
        if not match[0].iter_target:
            raise DumperError(errno.EINVAL, f"program {prog!r} of {obj} is not an iterator "
                              f"(section {match[0].section!r})", 'use SEC("iter/TARGET")')
        return match[0]
    if not iters:
        raise DumperError(errno.EINVAL, f"{obj} has no iterator program",
                          'a dumper needs a program in SEC("iter/TARGET")')
    if len(iters) > 1:
        raise DumperError(errno.EINVAL, f"{obj} has {len(iters)} iterator programs",
                          "choose one with --prog " + "|".join(s.name for s in iters))
    return iters[0]


def _target(name: str | None) -> targets.Target:
    known = targets.running_kernel()
    if name is None or name not in known:
        raise DumperError(errno.ENOENT, f"iterator target {name!r} is not in this kernel",
                          "see `bpfdumpfs targets` for the ones it has")
    return known[name]


def iter_link_info(fd: int, label: str) -> kernel.LinkInfo:
    """The info of the link FD; DumperError(EINVAL) if FD is not an iterator link."""
    # a pin may hold a map or a program too, whose info would be misread as a link's
    info = kernel.link_info(fd) if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:bpf-link" \
        else None
    if info is None or not info.is_iter:
        raise DumperError(errno.EINVAL, f"{label} is not an iterator link",
                          "give a link made from a SEC(\"iter/...\") program")
    return info


# Helpers that answer for the task running the program, which for an iterator is the
# task reading the seq_file. Through the tree the daemon reads every seq_file, so they
# give the daemon's pid, uid, comm, cgroup, stack, user memory and root, never the
# reader's.
READER_HELPERS = frozenset({
    "bpf_get_current_pid_tgid", "bpf_get_current_uid_gid", "bpf_get_current_comm",
    "bpf_get_current_task", "bpf_get_current_task_btf", "bpf_get_current_cgroup_id",
    "bpf_get_current_ancestor_cgroup_id", "bpf_get_ns_current_pid_tgid",
    "bpf_current_task_under_cgroup", "bpf_get_stack", "bpf_get_task_stack",
    "bpf_probe_read_user", "bpf_probe_read_user_str", "bpf_copy_from_user",
    "bpf_probe_write_user", "bpf_d_path", "bpf_send_signal", "bpf_send_signal_thread",
})


class Dumper:
    """An iter bpf_link held by this process: open() it for fresh seq_files."""

    def __init__(self, link_fd: int, label: str = "",
                 helpers: frozenset[str] | None = None) -> None:
        self._fd = link_fd
        self._finalizer = weakref.finalize(self, os.close, link_fd)
        self.label = label or f"link fd {link_fd}"
        self.helpers = helpers  # what its program calls, if this process loaded it

    @property
    def reader_dependent(self) -> tuple[str, ...] | None:
        """The READER_HELPERS its program calls; None if this process did not load it."""
        return None if self.helpers is None else tuple(sorted(self.helpers & READER_HELPERS))

    # construction ----------------------------------------------------------
    @classmethod
    def load(cls, obj: str | os.PathLike, prog: str | None = None,
             params: Params = Params(), cflags: tuple[str, ...] = ()) -> Dumper:
        """Load PROG of OBJ (a BPF object, or a .bpf.c source compiled first, with
        CFLAGS) and make an anonymous dumper of it: it lives until closed or
        garbage-collected."""
        with object_file(obj, cflags) as path:
            return cls._load(path, prog, params)

    @classmethod
    def _load(cls, obj: str, prog: str | None, params: Params) -> Dumper:
        spec = choose_program(obj, prog)
        target = _target(spec.iter_target)
        info, fds = iter_params(target, params)
        what = f"creating a {target.name} dumper of {spec.name!r}"
        if params.cgroup is not None:
            what += f" from cgroup {params.cgroup}"
        try:
            loaded = kernel.load_program(obj, spec.name)
            try:
                link = kernel.link_create_iter(loaded.fd, info, what)
            except DumperError as e:
                if params.cgroup is not None and e.errno in (errno.ENOENT, errno.EBADF):
                    raise DumperError(e.errno, what, CGROUP_HINT) from None
                raise
            finally:
                os.close(loaded.fd)
        finally:
            for fd in fds:
                os.close(fd)
        return cls(link, f"{target.name}:{spec.name}", loaded.helpers)

    @classmethod
    def from_link_id(cls, link_id: int) -> Dumper:
        return cls._adopt(kernel.link_get_fd_by_id(link_id), f"link id {link_id}")

    @classmethod
    def from_pin(cls, path: str | os.PathLike, hint: str = "") -> Dumper:
        return cls._adopt(kernel.obj_get(str(path), hint=hint), str(path))

    @classmethod
    def _adopt(cls, fd: int, label: str) -> Dumper:
        d = cls(fd, label)
        try:
            iter_link_info(fd, label)
        except DumperError:
            d.close()
            raise
        return d

    # use --------------------------------------------------------------------------
    @property
    def fd(self) -> int:
        if not self._finalizer.alive:
            raise DumperError(errno.EBADF, f"dumper {self.label} is closed")
        return self._fd

    def open_fd(self) -> int:
        """A new seq_file fd (the caller closes it)."""
        return kernel.iter_create(self.fd, f"opening dumper {self.label}")

    def dup(self) -> Dumper:
        """Another handle on the same link, closed independently of this one."""
        return Dumper(os.dup(self.fd), self.label, self.helpers)

    def open(self, text: bool = False) -> io.BufferedReader[Stream] | io.TextIOWrapper:
        """A new, independent stream of the dumper's output (iterates lines)."""
        raw = Stream(self.open_fd(), self.label)
        buffered = io.BufferedReader(raw, buffer_size=64 * 1024)
        return io.TextIOWrapper(buffered, errors="replace") if text else buffered

    def read(self) -> bytes:
        """The whole output of one new seq_file (for small dumps)."""
        with Stream(self.open_fd(), self.label) as s:
            return b"".join(iter(s.read_chunk, b""))

    def link_info(self) -> kernel.LinkInfo:
        return kernel.link_info(self.fd)

    def info(self) -> DumperInfo:
        li = self.link_info()
        prog_fd = kernel.prog_get_fd_by_id(li.prog_id)
        try:
            pi = kernel.prog_info(prog_fd)
        finally:
            os.close(prog_fd)
        cgroup = targets.running_kernel()["cgroup"] if li.target_name == "cgroup" else None
        return DumperInfo(
            target=li.target_name, link_id=li.id, prog_id=li.prog_id,
            prog_name=pi.name, prog_tag=pi.tag,
            map_id=li.map_id or None,
            cgroup_id=li.cgroup_id if cgroup else None,
            cgroup_order=cgroup.order_name(li.cgroup_order) if cgroup else None,
            tid=li.tid or None, pid=li.pid or None)

    def replace_program(self, other: Dumper) -> None:
        """Give this link the program of OTHER (same target), atomically (LINK_UPDATE):
        streams opened before keep the old program, later opens run the new one."""
        mine, theirs = self.link_info(), other.link_info()
        if mine.target_name != theirs.target_name:
            raise DumperError(errno.EINVAL, f"dumper {other.label} is for target "
                              f"{theirs.target_name}, {self.label} is {mine.target_name}",
                              "replace it with a program of the same target")
        prog_fd = kernel.prog_get_fd_by_id(theirs.prog_id)
        try:
            kernel.link_update(self.fd, prog_fd, f"replacing the program of {self.label}")
        finally:
            os.close(prog_fd)

    def pin(self, state: StateDir, name: str, **kwargs) -> Path:
        """Pin under STATE as TARGET/NAME; see StateDir.pin."""
        return state.pin(self, name, **kwargs)

    def close(self) -> None:
        """Release the link fd; an unpinned link dies with its last fd."""
        self._finalizer()

    def __enter__(self) -> Dumper:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Dumper {self.label}{' closed' if not self._finalizer.alive else ''}>"

