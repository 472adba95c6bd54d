"""What bpfdumpfs hands bpf(2) for an iter link, and how it reads the kernel's answer,
checked byte for byte against include/uapi/linux/bpf.h with layouts written here with
struct, independently of kernel.py's cdef.

No kernel: bpf(2) is replaced by a stand-in at kernel._bpf that reads and writes
memory as the kernel would. The end-to-end tier cannot cover the --map path on a
kernel that refuses every map-element program (EPERM), nor big-endian layouts; these
run everywhere.

UAPI layouts used (native byte order, natural alignment):

    union bpf_iter_link_info {                 /* 16 bytes */
        struct { __u32 map_fd; } map;
        struct { __u32 order; __u32 cgroup_fd; __u64 cgroup_id; } cgroup;
        struct { __u32 tid; __u32 pid; __u32 pid_fd; } task;
    };
    BPF_LINK_CREATE attr: __u32 prog_fd, target_fd, attach_type, flags;
                          then at 16: __aligned_u64 iter_info; __u32 iter_info_len;
    BPF_OBJ_GET_INFO_BY_FD attr: __u32 bpf_fd, info_len; __aligned_u64 info;
    struct bpf_link_info: __u32 type, id, prog_id; union at 16, whose iter member is
        __aligned_u64 target_name; __u32 target_name_len;        /* 16, 24 */
        union { __u32 map_id; };                                  /* 28 */
        union { struct { __u64 cgroup_id; __u32 order; } cgroup;  /* 32, 40 */
                struct { __u32 tid; __u32 pid; } task; };         /* 32, 36 */
"""
from __future__ import annotations

import ctypes
import errno
import struct

import pytest

from bpfdumpfs import kernel
from bpfdumpfs.errors import DumperError
from bpfdumpfs.kernel import IterParams, link_create_iter, link_info

BPF_LINK_CREATE = 28
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_TRACE_ITER = 28
BPF_LINK_TYPE_RAW_TRACEPOINT, BPF_LINK_TYPE_ITER = 1, 4
# enum bpf_cgroup_iter_order
BPF_CGROUP_ITER_SELF_ONLY, BPF_CGROUP_ITER_DESCENDANTS_PRE, BPF_CGROUP_ITER_CHILDREN = 1, 2, 5


def mem(addr: int, size: int) -> bytes:
    return ctypes.string_at(addr, size)


def packed(params: IterParams) -> bytes | None:
    info = params.pack()
    return None if info is None else bytes(kernel.ffi.buffer(info))


@pytest.mark.parametrize("params, expected", [
    (IterParams(map_fd=7), struct.pack("=I12x", 7)),
    (IterParams(cgroup_order=BPF_CGROUP_ITER_DESCENDANTS_PRE, cgroup_fd=9),
     struct.pack("=IIQ", BPF_CGROUP_ITER_DESCENDANTS_PRE, 9, 0)),
    # an id above 32 bits: both halves of the u64 must land where the kernel reads it
    (IterParams(cgroup_order=BPF_CGROUP_ITER_CHILDREN, cgroup_id=0x1_2345_6789),
     struct.pack("=IIQ", BPF_CGROUP_ITER_CHILDREN, 0, 0x1_2345_6789)),
    (IterParams(cgroup_order=BPF_CGROUP_ITER_SELF_ONLY),
     struct.pack("=IIQ", BPF_CGROUP_ITER_SELF_ONLY, 0, 0)),
    (IterParams(tid=4242), struct.pack("=III4x", 4242, 0, 0)),
    (IterParams(pid=4343), struct.pack("=III4x", 0, 4343, 0)),
    (IterParams(pid_fd=11), struct.pack("=III4x", 0, 0, 11)),
], ids=["map_fd", "cgroup_fd", "cgroup_id", "cgroup_root", "task_tid", "task_pid",
        "task_pid_fd"])
def test_iter_params_pack_to_the_uapi_union(params: IterParams, expected: bytes):
    """IterParams.pack() is union bpf_iter_link_info, as the kernel reads it."""
    assert len(expected) == 16
    assert packed(params) == expected


def test_no_params_pack_to_nothing():
    """A link without parameters passes no iter_info at all (the kernel takes
    iter_info_len 0 for targets that need none)."""
    assert IterParams().pack() is None


class FakeBpf:
    """bpf(2) as the kernel answers it, for the commands a test hands it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[int, bytes]] = []
        self.link_info: dict = {}
        monkeypatch.setattr(kernel, "_bpf", self)

    def __call__(self, cmd: int, attr, what: str, hint: str = "") -> int:
        raw = bytes(kernel.ffi.buffer(attr))
        self.calls.append((cmd, raw))
        if cmd == BPF_LINK_CREATE:
            return 99
        if cmd == BPF_OBJ_GET_INFO_BY_FD:
            return self._get_info(raw)
        raise DumperError(errno.EINVAL, what)

    def _get_info(self, raw: bytes) -> int:
        _fd, info_len, addr = struct.unpack_from("=IIQ", raw, 0)
        li = self.link_info
        assert info_len >= 44, "too short for the iter part of bpf_link_info"
        user = bytearray(mem(addr, info_len))
        # the kernel copies the user's struct in first: target_name is an in/out pointer
        name_ptr, name_len = struct.unpack_from("=QI", user, 16)
        struct.pack_into("=III", user, 0, li["type"], li["id"], li["prog_id"])
        if li["type"] == BPF_LINK_TYPE_ITER:
            name = li["target"].encode() + b"\0"
            assert name_ptr and name_len >= len(name), "no room for the target name"
            ctypes.memmove(name_ptr, name, len(name))
            struct.pack_into("=I", user, 24, len(name))
            if "map_id" in li:
                struct.pack_into("=I", user, 28, li["map_id"])
            if "cgroup_id" in li:
                struct.pack_into("=QI", user, 32, li["cgroup_id"], li["order"])
            if "tid" in li:
                struct.pack_into("=II", user, 32, li["tid"], li["pid"])
        ctypes.memmove(addr, bytes(user), info_len)
        return 0


def test_link_create_passes_the_union_and_its_length(monkeypatch):
    """BPF_LINK_CREATE gets the program, BPF_TRACE_ITER, and a pointer to the packed
    union with its length; a link without parameters gets neither."""
    bpf = FakeBpf(monkeypatch)
    seen: list[tuple] = []

    def capture(cmd, attr, what, hint=""):
        raw = bytes(kernel.ffi.buffer(attr))
        prog_fd, target_fd, attach_type, flags, info_ptr, info_len = \
            struct.unpack_from("=IIIIQI", raw, 0)
        info = mem(info_ptr, info_len) if info_ptr else None
        seen.append((prog_fd, target_fd, attach_type, flags, info, info_len))
        return bpf(cmd, attr, what, hint)
    monkeypatch.setattr(kernel, "_bpf", capture)

    assert link_create_iter(5, IterParams(cgroup_order=2, cgroup_id=1 << 40)) == 99
    assert link_create_iter(6) == 99
    assert seen == [(5, 0, BPF_TRACE_ITER, 0, struct.pack("=IIQ", 2, 0, 1 << 40), 16),
                    (6, 0, BPF_TRACE_ITER, 0, None, 0)]
    assert [cmd for cmd, _ in bpf.calls] == [BPF_LINK_CREATE] * 2


@pytest.mark.parametrize("answer, expected", [
    ({"target": "bpf_map_elem", "map_id": 42},
     {"target_name": "bpf_map_elem", "map_id": 42}),
    ({"target": "bpf_sk_storage_map", "map_id": 7},
     {"target_name": "bpf_sk_storage_map", "map_id": 7}),
    ({"target": "cgroup", "cgroup_id": 0x1_0000_0005, "order": 2},
     {"target_name": "cgroup", "cgroup_id": 0x1_0000_0005, "cgroup_order": 2}),
    ({"target": "task", "tid": 0, "pid": 5678},
     {"target_name": "task", "pid": 5678}),
    ({"target": "task_file", "tid": 1234, "pid": 0},
     {"target_name": "task_file", "tid": 1234}),
    ({"target": "task_vma", "tid": 0, "pid": 0}, {"target_name": "task_vma"}),
    ({"target": "ksym"}, {"target_name": "ksym"}),
], ids=["bpf_map_elem", "bpf_sk_storage_map", "cgroup", "task_pid", "task_file_tid",
        "task_vma_all", "ksym"])
def test_link_info_reads_the_iter_target_and_its_parameters(monkeypatch, answer, expected):
    """link_info decodes bpf_link_info of an iter link: target name, and the map id,
    cgroup id (all 64 bits) and order, or task tid/pid the link was made with."""
    bpf = FakeBpf(monkeypatch)
    bpf.link_info = {"type": BPF_LINK_TYPE_ITER, "id": 31, "prog_id": 77, **answer}
    info = link_info(3)
    assert info.is_iter
    got = {k: getattr(info, k) for k in ("target_name", "map_id", "cgroup_id",
                                         "cgroup_order", "tid", "pid")}
    assert got == {"target_name": "", "map_id": 0, "cgroup_id": 0, "cgroup_order": 0,
                   "tid": 0, "pid": 0, **expected}
    assert (info.type, info.id, info.prog_id) == (BPF_LINK_TYPE_ITER, 31, 77)
    assert bpf.calls[0][0] == BPF_OBJ_GET_INFO_BY_FD
    assert struct.unpack_from("=I", bpf.calls[0][1], 0) == (3,)  # of the fd asked about


def test_link_info_of_a_link_that_is_no_iter(monkeypatch):
    """Another kind of link (found by id among the system's links) is told apart."""
    bpf = FakeBpf(monkeypatch)
    bpf.link_info = {"type": BPF_LINK_TYPE_RAW_TRACEPOINT, "id": 8, "prog_id": 9}
    info = link_info(4)
    assert not info.is_iter
    assert (info.type, info.id, info.prog_id, info.target_name) == (1, 8, 9, "")


def test_link_info_takes_a_long_target_name_whole(monkeypatch):
    """Target names are short today; one of 100 characters still comes back whole."""
    bpf = FakeBpf(monkeypatch)
    bpf.link_info = {"type": BPF_LINK_TYPE_ITER, "id": 1, "prog_id": 2,
                     "target": "x" * 100}
    assert link_info(5).target_name == "x" * 100
