"""Which iterator targets the running kernel has, and what parameters each takes.

There is no UAPI that lists iterator targets, but each one leaves two marks in
the kernel's BTF: a FUNC `bpf_iter_X` whose first parameter is a
`struct bpf_iter_meta *`, and a STRUCT `bpf_iter__X` (the program's context).
Both are required: kfuncs such as bpf_iter_num_new share the prefix but not the
signature. The parameters a target accepts are kernel semantics that BTF does not
record, so they come from a small table keyed by target name.
"""
from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass

from .errors import DumperError

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"

BTF_KIND_PTR, BTF_KIND_STRUCT, BTF_KIND_FUNC, BTF_KIND_FUNC_PROTO = 2, 4, 12, 13
BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST, BTF_KIND_RESTRICT = 8, 9, 10, 11
BTF_KIND_TYPE_TAG = 18
# bytes that follow struct btf_type (12 bytes), by kind; vlen-sized kinds below
_EXTRA_FIXED = {1: 4, 3: 12, 14: 4, 17: 4}  # INT, ARRAY, VAR, DECL_TAG
# STRUCT, UNION, ENUM, FUNC_PROTO, DATASEC, ENUM64
_EXTRA_PER_VLEN = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}
_MODIFIERS = {BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST, BTF_KIND_RESTRICT,
              BTF_KIND_TYPE_TAG}


@dataclass(frozen=True)
class Param:
    """One iter_info parameter group a target accepts."""
    name: str          # "map", "cgroup" or "task"
    required: bool
    help: str


@dataclass(frozen=True)
class Target:
    name: str
    params: tuple[Param, ...] = ()
    cgroup_orders: tuple[str, ...] = ()   # for the cgroup target: the orders this kernel has

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


_MAP = Param("map", True, "--map ID|PINNED_PATH: the map whose elements are dumped")
# enum bpf_cgroup_iter_order enumerators, by the names the CLI uses
ORDER_ENUMS = {"self": "BPF_CGROUP_ITER_SELF_ONLY", "pre": "BPF_CGROUP_ITER_DESCENDANTS_PRE",
               "post": "BPF_CGROUP_ITER_DESCENDANTS_POST",
               "ancestors": "BPF_CGROUP_ITER_ANCESTORS_UP",
               "children": "BPF_CGROUP_ITER_CHILDREN"}


def _cgroup_param(orders) -> Param:
    return Param("cgroup", True, f"--order {'|'.join(orders)}, optional --cgroup PATH|ID "
                                 "(default: the root cgroup)")


_TASK = Param("task", False, "--tid N or --pid N: only that thread or process (default: all)")
PARAMS: dict[str, tuple[Param, ...]] = {
    "bpf_map_elem": (_MAP,),
    "bpf_sk_storage_map": (_MAP,),
    "sockmap": (_MAP,),
    "task": (_TASK,),
    "task_file": (_TASK,),
    "task_vma": (_TASK,),
}


class _Btf:
    """Just enough of a BTF parser to find types by name and follow pointers."""

    def __init__(self, data: bytes) -> None:
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = \
            struct.unpack_from("<HBBIIIII", data, 0)
        if magic != 0xEB9F:
            raise ValueError("not BTF")
        self.types = memoryview(data)[hdr_len + type_off: hdr_len + type_off + type_len]
        self.strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        self.offsets = [0]  # type id 0 is void
        off = 0
        while off < len(self.types):
            self.offsets.append(off)
            info = struct.unpack_from("<I", self.types, off + 4)[0]
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            off += 12 + _EXTRA_FIXED.get(kind, 0) + _EXTRA_PER_VLEN.get(kind, 0) * vlen

    def name(self, off: int) -> str:
        end = self.strings.index(b"\0", off)
        return self.strings[off:end].decode()

    def type(self, tid: int) -> tuple[int, int, int, int]:
        """(kind, name_off, vlen, size_or_type) of type TID."""
        off = self.offsets[tid]
        name_off, info, size_or_type = struct.unpack_from("<III", self.types, off)
        return (info >> 24) & 0x1F, name_off, info & 0xFFFF, size_or_type

    def first_param(self, proto_id: int) -> int:
        off = self.offsets[proto_id] + 12
        return struct.unpack_from("<II", self.types, off)[1]

    def skip_modifiers(self, tid: int) -> int:
        while tid and self.type(tid)[0] in _MODIFIERS:
            tid = self.type(tid)[3]
        return tid

    def enum_members(self, name: str) -> dict[str, int]:
        """Enumerators of the ENUM called NAME (empty if the kernel has none)."""
        tid = self.names_of_kind(6, {name}).get(name)
        if tid is None:
            return {}
        off, vlen = self.offsets[tid] + 12, self.type(tid)[2]
        members = {}
        for i in range(vlen):
            name_off, value = struct.unpack_from("<Ii", self.types, off + 8 * i)
            members[self.name(name_off)] = value
        return members

    def names_of_kind(self, kind: int, candidates: set[str]) -> dict[str, int]:
        found = {}
        for tid in range(1, len(self.offsets)):
            k, name_off, _, _ = self.type(tid)
            if k == kind and name_off:
                name = self.name(name_off)
                if name in candidates:
                    found[name] = tid
        return found


def _is_meta_ptr(btf: _Btf, tid: int) -> bool:
    tid = btf.skip_modifiers(tid)
    kind, _, _, pointee = btf.type(tid)
    if kind != BTF_KIND_PTR:
        return False
    kind, name_off, _, _ = btf.type(btf.skip_modifiers(pointee))
    return kind == BTF_KIND_STRUCT and btf.name(name_off) == "bpf_iter_meta"


def discover(btf_path: str = VMLINUX_BTF) -> dict[str, Target]:
    """The iterator targets of the kernel described by BTF_PATH, by name."""
    try:
        with open(btf_path, "rb") as f:
            data = f.read()
        btf = _Btf(data)
    except (OSError, ValueError) as e:
        raise DumperError(getattr(e, "errno", None) or 2, f"reading kernel BTF {btf_path}",
                          "bpfdumpfs needs a kernel built with CONFIG_DEBUG_INFO_BTF=y") from e
    # Cheap pre-filter on the string table, then check the two BTF marks.
    names = {m.decode() for m in re.findall(rb"\0bpf_iter__?([a-z0-9_]+)(?=\0)", btf.strings)}
    funcs = btf.names_of_kind(BTF_KIND_FUNC, {f"bpf_iter_{n}" for n in names})
    ctxs = btf.names_of_kind(BTF_KIND_STRUCT, {f"bpf_iter__{n}" for n in names})
    enum = btf.enum_members("bpf_cgroup_iter_order")
    orders = {o: enum[e] for o, e in ORDER_ENUMS.items() if e in enum}
    targets = {}
    for fname, fid in funcs.items():
        name = fname[len("bpf_iter_"):]
        if f"bpf_iter__{name}" not in ctxs:
            continue
        proto = btf.type(fid)[3]
        if btf.type(proto)[2] >= 1 and _is_meta_ptr(btf, btf.first_param(proto)):
            if name == "cgroup":
                targets[name] = Target(name, (_cgroup_param(orders),), tuple(orders))
            else:
                targets[name] = Target(name, PARAMS.get(name, ()))
    return dict(sorted(targets.items()))


@functools.lru_cache(maxsize=1)
def running_kernel() -> dict[str, Target]:
    """The running kernel's targets (BTF does not change while it runs)."""
    return discover()
