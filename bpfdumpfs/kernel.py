"""The one place in Python that speaks bpf(2) and libbpf (the data plane, core.c,
makes the seq_files of the opens it serves itself: BPF_ITER_CREATE alone).

cffi in ABI mode, on libc.py's FFI. bpf(2) is reached through libc's syscall();
compiled BPF objects (CO-RE relocations, .rodata/.bss, kconfig externs) are loaded
by libbpf.

Every function returns plain file descriptors that the caller owns, and every
failure raises DumperError with the errno and a sentence naming the command and
its object. Nothing here knows about dumpers, state directories or FUSE.
"""
from __future__ import annotations

import errno
import functools
import os
import re
import threading
import time
from dataclasses import dataclass, field

from . import libc, privilege
from .btf import BTF_KIND_FUNC, VMLINUX_BTF, Btf
from .errors import DumperError

ffi = libc.ffi  # bpf(2)'s structures and libbpf, declared beside libc's calls
ffi.cdef(
    """
    struct bpf_obj_attr {            /* OBJ_PIN, OBJ_GET */
        uint64_t pathname;
        uint32_t bpf_fd;
        uint32_t file_flags;
        int32_t  path_fd;
    };
    struct bpf_link_create_attr {    /* LINK_CREATE */
        uint32_t prog_fd;
        uint32_t target_fd;
        uint32_t attach_type;
        uint32_t flags;
        uint64_t iter_info;
        uint32_t iter_info_len;
    };
    struct bpf_link_update_attr {    /* LINK_UPDATE */
        uint32_t link_fd;
        uint32_t new_prog_fd;
        uint32_t flags;
        uint32_t old_prog_fd;
    };
    struct bpf_iter_create_attr {    /* ITER_CREATE */
        uint32_t link_fd;
        uint32_t flags;
    };
    struct bpf_info_attr {           /* OBJ_GET_INFO_BY_FD */
        uint32_t bpf_fd;
        uint32_t info_len;
        uint64_t info;
    };
    struct bpf_id_attr {             /* *_GET_NEXT_ID, *_GET_FD_BY_ID */
        uint32_t id;
        uint32_t next_id;
        uint32_t open_flags;
    };
    struct bpf_map_create_attr {     /* MAP_CREATE */
        uint32_t map_type;
        uint32_t key_size;
        uint32_t value_size;
        uint32_t max_entries;
        uint32_t map_flags;
        uint32_t inner_map_fd;
        uint32_t numa_node;
        char     map_name[16];
    };
    struct bpf_map_elem_attr {       /* MAP_*_ELEM, MAP_GET_NEXT_KEY */
        uint32_t map_fd;
        uint64_t key;
        uint64_t value;              /* or next_key */
        uint64_t flags;
    };
    struct bpf_iter_link_info {      /* union bpf_iter_link_info, 16 bytes */
        uint32_t a;                  /* map_fd | cgroup order | task tid */
        uint32_t b;                  /* cgroup_fd | task pid */
        uint32_t c;                  /* task pid_fd | low half of cgroup_id */
        uint32_t d;                  /* high half of cgroup_id */
    };

    /* include/uapi/linux/bpf.h, up to the members read here; the kernel fills
       min(info_len, its own size) and zeroes nothing beyond */
    struct bpf_link_info {
        uint32_t type;
        uint32_t id;
        uint32_t prog_id;
        uint32_t _pad;               /* the union is 8-byte aligned */
        union {
            struct {
                uint64_t target_name;
                uint32_t target_name_len;
                union { struct { uint32_t map_id; } map; };
                union {
                    struct { uint64_t cgroup_id; uint32_t order; } cgroup;
                    struct { uint32_t tid; uint32_t pid; } task;
                };
            } iter;
        };
    };
    struct bpf_prog_info {
        uint32_t type;
        uint32_t id;
        uint8_t  tag[8];
        uint32_t jited_prog_len;
        uint32_t xlated_prog_len;
        uint64_t jited_prog_insns;
        uint64_t xlated_prog_insns;
        uint64_t load_time;
        uint32_t created_by_uid;
        uint32_t nr_map_ids;
        uint64_t map_ids;
        char     name[16];           /* cut to 15 characters: the full one is in BTF */
        uint32_t ifindex;
        uint32_t gpl_compatible;     /* a 1-bit field */
        uint64_t netns_dev;
        uint64_t netns_ino;
        uint32_t nr_jited_ksyms;
        uint32_t nr_jited_func_lens;
        uint64_t jited_ksyms;
        uint64_t jited_func_lens;
        uint32_t btf_id;
        uint32_t func_info_rec_size;
        uint64_t func_info;
        uint32_t nr_func_info;
    };
    struct bpf_func_info {
        uint32_t insn_off;
        uint32_t type_id;
    };
    struct bpf_btf_info {
        uint64_t btf;
        uint32_t btf_size;
        uint32_t id;
    };
    struct bpf_insn {
        uint8_t  code;
        uint8_t  dst_reg:4;
        uint8_t  src_reg:4;
        int16_t  off;
        int32_t  imm;
    };

    struct bpf_object;
    struct bpf_program;
    struct btf;
    struct bpf_object_open_opts {
        size_t sz;
        const char *object_name;
        bool relaxed_maps;
        const char *pin_root_path;
        uint32_t _unused;
        const char *kconfig;
        const char *btf_custom_path;
        char *kernel_log_buf;
        size_t kernel_log_size;
        uint32_t kernel_log_level;
    };
    typedef int (*libbpf_print_fn_t)(int level, const char *fmt, void *ap);
    libbpf_print_fn_t libbpf_set_print(libbpf_print_fn_t fn);
    struct bpf_object *bpf_object__open_file(const char *path,
                                             const struct bpf_object_open_opts *opts);
    int bpf_object__load(struct bpf_object *obj);
    void bpf_object__close(struct bpf_object *obj);
    struct bpf_program *bpf_object__next_program(const struct bpf_object *obj,
                                                 struct bpf_program *prog);
    const char *bpf_program__name(const struct bpf_program *prog);
    const char *bpf_program__section_name(const struct bpf_program *prog);
    int bpf_program__set_autoload(struct bpf_program *prog, bool autoload);
    int bpf_program__fd(const struct bpf_program *prog);
    int bpf_program__set_log_buf(struct bpf_program *prog, char *log_buf, size_t log_size);
    int bpf_program__set_log_level(struct bpf_program *prog, uint32_t log_level);
    const struct bpf_insn *bpf_program__insns(const struct bpf_program *prog);
    size_t bpf_program__insn_cnt(const struct bpf_program *prog);
    """
)

_libc = libc.lib
_libbpf = None  # opened on first use: reading a pinned dumper needs no libbpf

# bpf(2)'s number by architecture (arch/*/include/uapi/asm/unistd*.h; the generic
# table's for arm64, riscv64 and loongarch64)
SYSCALL_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "loongarch64": 280,
               "ppc64le": 361, "ppc64": 361, "s390x": 351}
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM = 0, 1, 2
BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY = 3, 4
BPF_MAP_TYPE_HASH = 1
BPF_F_NO_PREALLOC = 1
BPF_OBJ_PIN, BPF_OBJ_GET = 6, 7
BPF_PROG_GET_NEXT_ID, BPF_MAP_GET_NEXT_ID = 11, 12
BPF_PROG_GET_FD_BY_ID, BPF_MAP_GET_FD_BY_ID = 13, 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_BTF_GET_FD_BY_ID = 19
BPF_LINK_CREATE, BPF_LINK_UPDATE = 28, 29
BPF_LINK_GET_FD_BY_ID, BPF_LINK_GET_NEXT_ID = 30, 31
BPF_ITER_CREATE = 33
BPF_TRACE_ITER = 28
BPF_LINK_TYPE_ITER = 4
BPF_F_RDONLY = 1 << 3


# syscall() is variadic: its arguments need C types. An unknown architecture
# calls syscall -1, which fails with ENOSYS and the hint below.
_SYS_BPF = ffi.cast("long", SYSCALL_BPF.get(os.uname().machine, -1))
_HINTS = {
    errno.EPERM: "run as root (loading and pinning need CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN)",
    errno.EACCES: "check the permissions of the path or run as root",
    errno.EMFILE: "the process has all the files open that RLIMIT_NOFILE allows: raise it "
                  "(ulimit -n; LimitNOFILE= for a systemd service)",
    errno.ENFILE: "the system has all the files open that it allows: raise fs.file-max",
    errno.ENOSYS: "this kernel has no bpf(2) (CONFIG_BPF_SYSCALL), or bpfdumpfs does not know "
                  f"its number on {os.uname().machine} (it knows {', '.join(SYSCALL_BPF)})",
}


_ARGS: dict = {}  # (cmd, attr type) -> their C-typed arguments, cast once


def _bpf(cmd: int, attr, what: str, hint: str = "") -> int:
    key = (cmd, ffi.typeof(attr))
    args = _ARGS.get(key)
    if args is None:
        args = _ARGS[key] = (ffi.cast("int", cmd), ffi.cast("unsigned int", ffi.sizeof(attr[0])))
    ret = _libc.syscall(_SYS_BPF, args[0], attr, args[1])
    if ret < 0:
        err = ffi.errno
        # a permission problem is the same whatever was attempted: say how to get past it
        raise DumperError(err, what, _HINTS.get(err) or hint)
    return ret


# -- bpffs ---------------------------------------------------------------------

def fs_magic(path: str) -> int:
    """statfs(2) f_type of the filesystem holding PATH."""
    try:
        return libc.statfs_type(path)
    except OSError as e:
        raise DumperError(e.errno, f"statfs {path}") from None


def mount_bpffs(path: str) -> None:
    """mount -t bpf bpf -o mode=0700 PATH: a fresh bpffs is 1777 otherwise, and anyone
    could make directories in it (as systemd does, root's alone)."""
    try:
        libc.mount("bpf", path, "bpf", 0, "mode=0700")
    except OSError as e:
        raise DumperError(e.errno, f"mounting a bpffs at {path}") from None


# -- pins --------------------------------------------------------------------

def obj_pin(fd: int, path: str) -> None:
    """Pin a BPF object (here: a link) at PATH in a bpffs."""
    buf = ffi.new("char[]", os.fsencode(path))
    attr = ffi.new("struct bpf_obj_attr *", {"pathname": int(ffi.cast("uintptr_t", buf)),
                                            "bpf_fd": fd})
    _bpf(BPF_OBJ_PIN, attr, f"pinning at {path}")


def obj_get(path: str, flags: int = 0, hint: str = "") -> int:
    """Open the BPF object pinned at PATH; returns a new fd."""
    buf = ffi.new("char[]", os.fsencode(path))
    attr = ffi.new("struct bpf_obj_attr *", {"pathname": int(ffi.cast("uintptr_t", buf)),
                                            "file_flags": flags})
    return _bpf(BPF_OBJ_GET, attr, f"opening the pin {path}", hint)


# -- links and seq_files -----------------------------------------------------

@dataclass(frozen=True)
class IterParams:
    """What the kernel calls bpf_iter_link_info; at most one group may be set."""
    map_fd: int | None = None
    cgroup_fd: int | None = None
    cgroup_id: int | None = None
    cgroup_order: int | None = None
    tid: int | None = None
    pid: int | None = None
    pid_fd: int | None = None

    def pack(self):
        """The 16-byte union, or None when the link takes no parameters."""
        info = ffi.new("struct bpf_iter_link_info *")
        if self.map_fd is not None:
            info.a = self.map_fd
        elif self.cgroup_order is not None:
            info.a = self.cgroup_order
            info.b = self.cgroup_fd or 0
            cid = self.cgroup_id or 0
            info.c, info.d = cid & 0xFFFFFFFF, cid >> 32
        elif self.tid is not None:
            info.a = self.tid
        elif self.pid is not None:
            info.b = self.pid
        elif self.pid_fd is not None:
            info.c = self.pid_fd
        else:
            return None
        return info


def link_create_iter(prog_fd: int, params: IterParams | None = None, what: str = "") -> int:
    """BPF_LINK_CREATE with BPF_TRACE_ITER: an iter link (a dumper); returns its fd."""
    info = params.pack() if params else None
    attr = ffi.new("struct bpf_link_create_attr *")
    attr.prog_fd = prog_fd
    attr.attach_type = BPF_TRACE_ITER
    if info is not None:
        attr.iter_info = int(ffi.cast("uintptr_t", info))
        attr.iter_info_len = ffi.sizeof(info[0])
    return _bpf(BPF_LINK_CREATE, attr, what or f"creating an iter link for prog fd {prog_fd}")


# link fd -> its BPF_ITER_CREATE attr, which is the same for every open of the link
# (and right for any link that later gets the same fd number)
_iter_attrs: dict[int, object] = {}


def iter_create(link_fd: int, what: str = "") -> int:
    """BPF_ITER_CREATE: a fresh seq_file of the link; reading it runs the program."""
    attr = _iter_attrs.get(link_fd)
    if attr is None:
        attr = _iter_attrs[link_fd] = ffi.new("struct bpf_iter_create_attr *",
                                              {"link_fd": link_fd})
    return _bpf(BPF_ITER_CREATE, attr, what or f"creating a seq_file of link fd {link_fd}")


def link_update(link_fd: int, new_prog_fd: int, what: str = "") -> None:
    """BPF_LINK_UPDATE: swap the link's program atomically."""
    attr = ffi.new("struct bpf_link_update_attr *", {"link_fd": link_fd,
                                                   "new_prog_fd": new_prog_fd})
    _bpf(BPF_LINK_UPDATE, attr, what or f"replacing the program of link fd {link_fd}")


# -- maps (bpfdumpfs keeps its own metadata in one) -------------------------------

def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               flags: int = 0, name: str = "") -> int:
    attr = ffi.new("struct bpf_map_create_attr *", {
        "map_type": map_type, "key_size": key_size, "value_size": value_size,
        "max_entries": max_entries, "map_flags": flags, "map_name": name.encode()[:15]})
    return _bpf(BPF_MAP_CREATE, attr, f"creating map {name!r}")


def _elem_attr(fd: int, key: bytes, value, flags: int = 0):
    kbuf = ffi.from_buffer(key)
    attr = ffi.new("struct bpf_map_elem_attr *", {
        "map_fd": fd, "key": int(ffi.cast("uintptr_t", kbuf)),
        "value": int(ffi.cast("uintptr_t", value)) if value is not None else 0,
        "flags": flags})
    return attr, kbuf


def map_update(fd: int, key: bytes, value: bytes) -> None:
    vbuf = ffi.from_buffer(value)
    attr, _k = _elem_attr(fd, key, vbuf)
    _bpf(BPF_MAP_UPDATE_ELEM, attr, f"updating an element of map fd {fd}")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    vbuf = ffi.new("char[]", value_size)
    attr, _k = _elem_attr(fd, key, vbuf)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, attr, f"looking up an element of map fd {fd}")
    except DumperError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return bytes(ffi.buffer(vbuf, value_size))


def map_delete(fd: int, key: bytes) -> bool:
    attr, _k = _elem_attr(fd, key, None)
    try:
        _bpf(BPF_MAP_DELETE_ELEM, attr, f"deleting an element of map fd {fd}")
    except DumperError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int) -> list[bytes]:
    keys: list[bytes] = []
    prev = None
    while True:
        nbuf = ffi.new("char[]", key_size)
        attr, _k = _elem_attr(fd, prev if prev is not None else b"", nbuf)
        if prev is None:
            attr.key = 0
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, attr, f"listing the keys of map fd {fd}")
        except DumperError as e:
            if e.errno == errno.ENOENT:
                return keys
            raise
        prev = bytes(ffi.buffer(nbuf, key_size))
        keys.append(prev)


# -- ids ---------------------------------------------------------------------

def _get_fd_by_id(cmd: int, kind: str, obj_id: int, flags: int = 0) -> int:
    attr = ffi.new("struct bpf_id_attr *", {"id": obj_id, "open_flags": flags})
    return _bpf(cmd, attr, f"opening {kind} id {obj_id}",
                f"list the ids with `bpftool {kind} show`")


def link_get_fd_by_id(link_id: int) -> int:
    return _get_fd_by_id(BPF_LINK_GET_FD_BY_ID, "link", link_id)


def prog_get_fd_by_id(prog_id: int) -> int:
    return _get_fd_by_id(BPF_PROG_GET_FD_BY_ID, "prog", prog_id)


def map_get_fd_by_id(map_id: int) -> int:
    return _get_fd_by_id(BPF_MAP_GET_FD_BY_ID, "map", map_id)


def _ids(cmd: int) -> list[int]:
    ids: list[int] = []
    start = 0
    while True:
        attr = ffi.new("struct bpf_id_attr *", {"id": start})
        try:
            _bpf(cmd, attr, "listing BPF object ids")
        except DumperError as e:
            if e.errno == errno.ENOENT:  # past the last id
                return ids
            raise
        start = attr.next_id
        ids.append(start)


def link_ids() -> list[int]:
    """Every link id in the system (BPF_LINK_GET_NEXT_ID)."""
    return _ids(BPF_LINK_GET_NEXT_ID)


def prog_ids() -> list[int]:
    """Every program id in the system (BPF_PROG_GET_NEXT_ID)."""
    return _ids(BPF_PROG_GET_NEXT_ID)


# -- info --------------------------------------------------------------------

def _info(fd: int, info, what: str) -> None:
    """OBJ_GET_INFO_BY_FD into INFO, a cffi pointer to the kernel's info struct."""
    attr = ffi.new("struct bpf_info_attr *", {"bpf_fd": fd, "info_len": ffi.sizeof(info[0]),
                                            "info": int(ffi.cast("uintptr_t", info))})
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, what)


TARGET_NAME_MAX = 128


@dataclass(frozen=True)
class LinkInfo:
    type: int
    id: int
    prog_id: int
    target_name: str = ""
    map_id: int = 0
    cgroup_id: int = 0
    cgroup_order: int = 0
    tid: int = 0
    pid: int = 0

    @property
    def is_iter(self) -> bool:
        return self.type == BPF_LINK_TYPE_ITER


def link_info(fd: int) -> LinkInfo:
    """OBJ_GET_INFO_BY_FD of a link, with the iter target and its parameters."""
    # One call, with room for any iter target name (the longest is under 32 bytes)
    info = ffi.new("struct bpf_link_info *")
    name = ffi.new("char[]", TARGET_NAME_MAX)
    info.iter.target_name = int(ffi.cast("uintptr_t", name))
    info.iter.target_name_len = TARGET_NAME_MAX
    _info(fd, info, f"reading the info of link fd {fd}")
    if info.type != BPF_LINK_TYPE_ITER:
        return LinkInfo(info.type, info.id, info.prog_id)
    it = info.iter
    target = ffi.string(name).decode()
    common = (info.type, info.id, info.prog_id, target)
    if target == "cgroup":
        return LinkInfo(*common, cgroup_id=it.cgroup.cgroup_id, cgroup_order=it.cgroup.order)
    if target.startswith("task"):
        return LinkInfo(*common, tid=it.task.tid, pid=it.task.pid)
    return LinkInfo(*common, map_id=it.map.map_id)


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str          # in full, as bpftool shows it
    tag: str
    created_by_uid: int
    load_time_ns: int


BPF_OBJ_NAME_LEN = 16  # with the NUL: the kernel keeps 15 characters of a name


def prog_info(fd: int) -> ProgInfo:
    """OBJ_GET_INFO_BY_FD of a program. Its name is taken from its BTF, as bpftool
    does, where the kernel's copy is cut short; without BTF, the kernel's 15 characters."""
    info = ffi.new("struct bpf_prog_info *")
    # the first func_info record is the program's own function: its FUNC type names it
    func = ffi.new("struct bpf_func_info *")
    info.nr_func_info = 1
    info.func_info_rec_size = ffi.sizeof(func[0])
    info.func_info = int(ffi.cast("uintptr_t", func))
    _info(fd, info, f"reading the info of prog fd {fd}")
    name = ffi.string(info.name).decode(errors="replace")
    if len(name) == BPF_OBJ_NAME_LEN - 1 and info.btf_id and info.nr_func_info:
        try:
            name = _btf_func_name(info.btf_id, func.type_id)
        except (DumperError, ValueError):
            pass  # its BTF needs CAP_SYS_ADMIN to read, or is of a newer kind: keep 15
    return ProgInfo(info.id, info.type, name, bytes(info.tag).hex(), info.created_by_uid,
                    info.load_time)


def btf_data(fd: int) -> bytes:
    """The raw BTF of the BTF object FD: its size first, then its bytes."""
    info = ffi.new("struct bpf_btf_info *")
    _info(fd, info, f"reading the info of btf fd {fd}")
    buf = ffi.new("char[]", info.btf_size)
    info.btf = int(ffi.cast("uintptr_t", buf))
    _info(fd, info, f"reading btf fd {fd}")
    return ffi.buffer(buf, info.btf_size)[:]


@functools.lru_cache(maxsize=256)  # a BTF object never changes, nor is its id reused
def _btf_func_name(btf_id: int, type_id: int) -> str:
    """The name of the FUNC TYPE_ID of the kernel's BTF object BTF_ID."""
    fd = _get_fd_by_id(BPF_BTF_GET_FD_BY_ID, "btf", btf_id)
    try:
        btf = Btf(btf_data(fd))
    finally:
        os.close(fd)
    kind, name_off, _, _ = btf.type(type_id)
    if kind != BTF_KIND_FUNC:
        raise ValueError(f"BTF type {type_id} of btf id {btf_id} is not a FUNC")
    return btf.name(name_off)


# -- loading objects with libbpf ---------------------------------------------

@dataclass(frozen=True)
class ProgSpec:
    """One program of an ELF object as libbpf sees it before loading."""
    name: str
    section: str

    @property
    def iter_target(self) -> str | None:
        """TARGET of SEC("iter/TARGET") or SEC("iter.s/TARGET"), else None."""
        kind, _, target = self.section.partition("/")
        return target if kind in ("iter", "iter.s") and target else None


@dataclass
class LoadedProg:
    fd: int
    spec: ProgSpec
    warnings: list[str] = field(default_factory=list)
    helpers: frozenset[str] = frozenset()  # the helpers it calls (bpf_d_path, ...)


_load_lock = threading.Lock()  # libbpf's print callback is process-wide
_messages: list[str] = []


def _libbpf_lib():
    global _libbpf
    if _libbpf is None:
        try:
            _libbpf = ffi.dlopen("libbpf.so.1")
        except OSError as e:
            raise DumperError(errno.ENOENT, "loading libbpf.so.1",
                              "install it: apt-get install libbpf1") from e
        _libbpf.libbpf_set_print(_print_cb)
    return _libbpf


@ffi.callback("int(int, const char *, void *)")
def _print_cb(level, fmt, ap):
    if level == 0:  # LIBBPF_WARN: the lines that explain a failed open or load
        buf = ffi.new("char[]", 1024)
        _libc.vsnprintf(buf, 1024, fmt, ap)
        _messages.append(ffi.string(buf).decode(errors="replace").rstrip())
    return 0


def _open_object(lib, path: str):
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise DumperError(errno.ENOENT, f"opening BPF object {path}",
                          "give the path of a compiled .bpf.o or a .bpf.c source") from None
    except OSError as e:
        raise DumperError(e.errno, f"opening BPF object {path}",
                          _HINTS.get(e.errno or 0, "give a readable BPF object file")) from None
    if magic != b"\x7fELF":
        raise DumperError(errno.ENOEXEC, f"opening BPF object {path}",
                          "it is not an ELF file; compile it with clang -target bpf")
    opts = ffi.new("struct bpf_object_open_opts *")
    opts.sz = ffi.sizeof("struct bpf_object_open_opts")
    config = kconfig()
    if config:
        keep = ffi.new("char[]", config.encode())
        opts.kconfig = keep
    obj = lib.bpf_object__open_file(os.fsencode(path), opts)
    if obj == ffi.NULL:
        err = ffi.errno or errno.EINVAL
        raise DumperError(err, f"opening BPF object {path}",
                          _last_messages() or "is it a BPF ELF object (clang -target bpf)?")
    return obj


HZ_CHOICES = (100, 250, 300, 1000)  # the values Kconfig offers for CONFIG_HZ


def system_kconfig() -> str | None:
    """The Kconfig file libbpf reads for __kconfig externs, if this system has one."""
    for path in (f"/boot/config-{os.uname().release}", "/proc/config.gz"):
        if os.access(path, os.R_OK):
            return path
    return None


def measured_hz(interval: float = 0.1) -> int | None:
    """CONFIG_HZ, measured: jiffies (from /proc/timer_list) over INTERVAL seconds of
    CLOCK_MONOTONIC, rounded to the nearest value Kconfig allows; None if unreadable."""
    def sample() -> tuple[int, float]:
        with open("/proc/timer_list") as f:
            for line in f:
                if line.startswith("jiffies: "):
                    return int(line.split()[1]), time.monotonic()
        raise ValueError("no jiffies line")
    try:
        j0, t0 = sample()
        time.sleep(interval)
        j1, t1 = sample()
    except (OSError, ValueError):
        return None
    rate = (j1 - j0) / (t1 - t0)
    return min(HZ_CHOICES, key=lambda hz: abs(hz - rate))


@functools.cache
def kconfig() -> str | None:
    """Kconfig text for libbpf where the system has no Kconfig file to read (most
    distribution kernels lack /proc/config.gz, and containers and guests /boot):
    without it, libbpf refuses any object with a __kconfig extern. Built-ins use
    CONFIG_HZ alone, which the running kernel shows by counting its jiffies."""
    if system_kconfig():
        return None
    hz = measured_hz()
    return f"CONFIG_HZ={hz}\n" if hz else None


def _programs(lib, obj):
    prog = lib.bpf_object__next_program(obj, ffi.NULL)
    while prog != ffi.NULL:
        yield prog, ProgSpec(ffi.string(lib.bpf_program__name(prog)).decode(),
                             ffi.string(lib.bpf_program__section_name(prog)).decode())
        prog = lib.bpf_object__next_program(obj, prog)


def _last_messages(n: int = 3) -> str:
    lines = [m for m in _messages if m]
    return " | ".join(lines[-n:])


def object_programs(path: str) -> list[ProgSpec]:
    """The programs an ELF object holds (opened, not loaded)."""
    lib = _libbpf_lib()
    with _load_lock:
        _messages.clear()
        obj = _open_object(lib, path)
        try:
            return [spec for _, spec in _programs(lib, obj)]
        finally:
            lib.bpf_object__close(obj)


# the verifier's closing statistics, which say nothing of why it refused
_LOG_STATS = re.compile(r"^(processed \d+ insns|verification time|stack depth|"
                        r"Validating |-- END PROG LOAD LOG --)")


def verifier_complaint(log: str) -> str:
    """The verifier's reason for a refusal: the last line of LOG before its statistics."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    while lines and _LOG_STATS.match(lines[-1]):
        lines.pop()
    return lines[-1] if lines else ""


# the verifier's statistics when it stopped before looking at any instruction
_NOTHING_VERIFIED = re.compile(r"^processed 0 insns", re.MULTILINE)
# what libbpf says when BPF_PROG_LOAD itself failed (not libbpf's own preparation)
_KERNEL_REFUSED = "BPF program load failed"
LICENSE_HINT = 'give it a GPL-compatible license: char LICENSE[] SEC("license") = "GPL";'
CAP_PERFMON = 38


def _load_hint(err: int, vlog: str) -> str:
    """Why a load failed with ERR and verifier log VLOG: the kernel refused the program
    before verifying it, the verifier rejected it, or libbpf failed on its own."""
    complaint = verifier_complaint(vlog)
    fix = f"; {LICENSE_HINT}" if "non-GPL" in complaint else ""
    if not vlog or _NOTHING_VERIFIED.search(vlog):
        # EPERM is the kernel's (libbpf makes none up), and so is what libbpf got back
        # from BPF_PROG_LOAD itself
        if vlog or err == errno.EPERM or any(_KERNEL_REFUSED in m for m in _messages):
            # a log means the verifier ran: nothing before it (capabilities, security
            # modules) refused the program
            why = complaint or ("it gave no reason; its verifier log says only that no "
                                "instruction was processed" if vlog else _refusal_cause(err))
            return (f"the kernel refused to load it ({errno.errorcode.get(err, err)}) before "
                    f"verifying it: {why}{fix}")
        return (_HINTS.get(err) if os.geteuid() != 0 else None) or _last_messages()
    if err == errno.ENOSPC:
        # before 6.4 a log that does not fit fails the load with ENOSPC, hiding the
        # first attempt's errno: the program was refused all the same
        return (f"the verifier rejected it; its log is over {VERIFIER_LOG_SIZE >> 20} MiB, "
                "the start is attached")
    return f"the verifier rejected it; see the log{fix}"


def _refusal_cause(err: int) -> str:
    """The likely reason why the kernel refused a program with ERR, saying nothing."""
    if err not in (errno.EPERM, errno.EACCES):
        return _last_messages() or "the kernel gave no reason; see dmesg"
    caps = privilege.effective(os.getpid())
    missing = [name for name, cap in (("CAP_BPF", privilege.CAP_BPF),
                                      ("CAP_PERFMON", CAP_PERFMON)) if not caps >> cap & 1]
    if missing and not caps >> privilege.CAP_SYS_ADMIN & 1:
        return (f"this process lacks {' and '.join(missing)} in the initial user namespace; "
                "run it as root with CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN")
    return ("this process has the capabilities it needs, so a security module (SELinux, "
            "AppArmor, a BPF LSM program) refused it, or RLIMIT_MEMLOCK is too low (kernels "
            "before 5.11): see dmesg and the audit log")


BPF_JMP_CALL = 0x85  # BPF_JMP | BPF_CALL


@functools.cache
def helper_names() -> dict[int, str]:
    """The running kernel's helpers by id, named as programs call them (bpf_d_path):
    from its BTF's enum bpf_func_id, since each kernel has the helpers it has."""
    with open(VMLINUX_BTF, "rb") as f:
        members = Btf(f.read()).enum_members("bpf_func_id")
    return {value: "bpf_" + name.removeprefix("BPF_FUNC_") for name, value in members.items()}


def _called_helpers(lib, prog) -> frozenset[str]:
    """The helpers a loaded program calls, from libbpf's copy of its instructions,
    which after the load has its subprograms appended. A call with src_reg 0 calls the
    helper whose id is imm (1 calls a BPF function, 2 a kfunc)."""
    insns, size = lib.bpf_program__insns(prog), ffi.sizeof("struct bpf_insn")
    opcodes = ffi.buffer(insns, lib.bpf_program__insn_cnt(prog) * size)[:][::size]
    names = helper_names()
    return frozenset(names[insns[i].imm] for i, code in enumerate(opcodes)
                     if code == BPF_JMP_CALL and insns[i].src_reg == 0
                     and insns[i].imm in names)


# libbpf loads without a log first and fills this only to explain a failure; a
# complex program's log runs to megabytes on kernels before 6.4, where one that
# does not fit turns the load's error into ENOSPC
VERIFIER_LOG_SIZE = 16 << 20
_new_log = ffi.new_allocator(should_clear_after_alloc=False)  # untouched until written


def load_program(path: str, prog_name: str) -> LoadedProg:
    """Load one program of an ELF object through libbpf; returns its own fd.

    The object's other programs are not loaded. Its maps live on as long as the
    program references them, so the object itself is closed before returning.
    A verifier rejection raises DumperError with the verifier log attached.
    """
    lib = _libbpf_lib()
    with _load_lock:
        _messages.clear()
        obj = _open_object(lib, path)
        try:
            chosen = None
            for prog, spec in _programs(lib, obj):
                if spec.name == prog_name:
                    chosen = (prog, spec)
                else:
                    lib.bpf_program__set_autoload(prog, False)
            if chosen is None:
                raise DumperError(errno.ENOENT, f"finding program {prog_name!r} in {path}")
            prog, spec = chosen
            log = _new_log("char[]", VERIFIER_LOG_SIZE)
            log[0] = b"\0"
            lib.bpf_program__set_log_buf(prog, log, VERIFIER_LOG_SIZE)
            if lib.bpf_object__load(obj) != 0:
                err = ffi.errno or errno.EINVAL
                vlog = ffi.string(log).decode(errors="replace").strip()
                raise DumperError(err, f"loading program {prog_name!r} of {path}",
                                  _load_hint(err, vlog), log=vlog)
            helpers = _called_helpers(lib, prog)
            fd = os.dup(lib.bpf_program__fd(prog))
            os.set_inheritable(fd, False)
            return LoadedProg(fd, spec, list(_messages), helpers)
        finally:
            lib.bpf_object__close(obj)
