"""Which iterator targets the running kernel has, and what parameters each takes.

There is no UAPI that lists iterator targets, but each one leaves two marks in
the kernel's BTF: a FUNC `bpf_iter_X` whose first parameter is a
`struct bpf_iter_meta *`, and a STRUCT `bpf_iter__X` (the program's context).
Both are required: kfuncs such as bpf_iter_num_new share the prefix but not the
signature. The parameters a target accepts are kernel semantics that BTF does not
record, so they come from a small table keyed by target name.
"""
from __future__ import annotations

import errno
import functools
import re
from dataclasses import dataclass, field

from .btf import BTF_KIND_FUNC, BTF_KIND_PTR, BTF_KIND_STRUCT, VMLINUX_BTF, Btf
from .errors import DumperError


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
    # the cgroup target: the walk orders this kernel has, by the CLI's names, with their
    # values of enum bpf_cgroup_iter_order as its BTF gives them
    cgroup_orders: dict[str, int] = field(default_factory=dict, hash=False)

    def order_name(self, value: int) -> str | None:
        """The CLI's name of a cgroup_order VALUE the kernel reports of a link."""
        return next((k for k, v in self.cgroup_orders.items() if v == value), None)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


_MAP = Param("map", True, "--map ID|PINNED_PATH: the map whose elements are dumped")
# enum bpf_cgroup_iter_order's enumerators, by the names the CLI uses (bpftool's)
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


def _is_meta_ptr(btf: Btf, tid: int) -> bool:
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
        btf = Btf(data)
    except OSError as e:
        raise DumperError(e.errno or errno.ENOENT, f"reading kernel BTF {btf_path}",
                          "bpfdumpfs needs a kernel built with CONFIG_DEBUG_INFO_BTF=y") from e
    except ValueError as e:  # not BTF, or a kind newer than this parser
        raise DumperError(errno.EINVAL, f"reading kernel BTF {btf_path}: {e}",
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
                targets[name] = Target(name, (_cgroup_param(orders),), orders)
            else:
                targets[name] = Target(name, PARAMS.get(name, ()))
    return dict(sorted(targets.items()))


@functools.lru_cache(maxsize=1)
def running_kernel() -> dict[str, Target]:
    """The running kernel's targets (BTF does not change while it runs)."""
    return discover()
