"""btf.Btf over BTF blobs built here, record by record, from include/uapi/linux/btf.h
(written independently of btf.py's table of record sizes), and over the running
kernel's own BTF if it is readable. Also targets.discover, which finds iterator
targets by the two marks each leaves in BTF."""
from __future__ import annotations

import errno
import os
import struct

import pytest

from bpfdumpfs.btf import (
    BTF_KIND_ENUM,
    BTF_KIND_FUNC,
    BTF_KIND_PTR,
    BTF_KIND_STRUCT,
    BTF_KIND_TYPEDEF,
    VMLINUX_BTF,
    Btf,
)
from bpfdumpfs.errors import DumperError

# enum btf_kind (include/uapi/linux/btf.h)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO, VAR, DATASEC = 9, 10, 11, 12, 13, 14, 15
FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = 16, 17, 18, 19


class BtfBlob:
    """A raw BTF blob: struct btf_header, then the type section, then the strings.
    Each add_* appends one type and returns its id (the first is 1; 0 is void)."""

    def __init__(self) -> None:
        self.types = bytearray()
        self.strings = bytearray(b"\0")  # offset 0 is the empty name
        self.count = 0

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(self, kind: int, name: str = "", vlen: int = 0, size_or_type: int = 0,
            tail: bytes = b"", kflag: int = 0) -> int:
        """struct btf_type {name_off; info (vlen: bits 0-15, kind: 24-28, kind_flag:
        31); size or type}, and the kind's data after it."""
        info = kflag << 31 | kind << 24 | vlen
        self.types += struct.pack("<III", self.s(name), info, size_or_type) + tail
        self.count += 1
        return self.count

    def int(self, name: str, size: int = 4, bits: int = 32, signed: bool = True) -> int:
        return self.add(INT, name, 0, size, struct.pack("<I", (signed << 24) | bits))

    def ptr(self, to: int) -> int:
        return self.add(PTR, "", 0, to)

    def struct(self, name: str, members: list[tuple[str, int]], kind: int = STRUCT) -> int:
        """btf_member {name_off; type; offset}, one per member, each 8 bytes apart."""
        tail = b"".join(struct.pack("<III", self.s(m), t, 64 * i)
                        for i, (m, t) in enumerate(members))
        return self.add(kind, name, len(members), 8 * len(members), tail)

    def enum(self, name: str, values: dict[str, int]) -> int:
        tail = b"".join(struct.pack("<Ii", self.s(n), v) for n, v in values.items())
        return self.add(ENUM, name, len(values), 4, tail)

    def enum64(self, name: str, values: dict[str, int]) -> int:
        tail = b"".join(struct.pack("<III", self.s(n), v & 0xFFFFFFFF, v >> 32)
                        for n, v in values.items())
        return self.add(ENUM64, name, len(values), 8, tail)

    def func_proto(self, ret: int, params: list[tuple[str, int]]) -> int:
        tail = b"".join(struct.pack("<II", self.s(n), t) for n, t in params)
        return self.add(FUNC_PROTO, "", len(params), ret, tail)

    def func(self, name: str, proto: int, linkage: int = 1) -> int:
        return self.add(FUNC, name, linkage, proto)  # vlen is the linkage, not a count

    def bytes(self, hdr_len: int = 24, strings_first: bool = False) -> bytes:
        """The blob; HDR_LEN > 24 stands for a newer kernel's longer header."""
        t, s = bytes(self.types), bytes(self.strings)
        type_off, str_off = (len(s), 0) if strings_first else (0, len(t))
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, hdr_len, type_off, len(t), str_off, len(s))
        body = s + t if strings_first else t + s
        return hdr.ljust(hdr_len, b"\0") + body


# one record of each kind, referring to type I; with items where the kind has them
ONE_OF = {
    INT: lambda b, i: b.int("i64", 8, 64),
    PTR: lambda b, i: b.ptr(i),
    ARRAY: lambda b, i: b.add(ARRAY, "", 0, 0, struct.pack("<III", i, i, 16)),
    STRUCT: lambda b, i: b.struct("s", [("x", i), ("y", i)]),
    UNION: lambda b, i: b.struct("u", [("a", i), ("b", i), ("c", i)], UNION),
    ENUM: lambda b, i: b.enum("e", {"A": 0, "B": -1}),
    FWD: lambda b, i: b.add(FWD, "opaque"),
    TYPEDEF: lambda b, i: b.add(TYPEDEF, "t", 0, i),
    VOLATILE: lambda b, i: b.add(VOLATILE, "", 0, i),
    CONST: lambda b, i: b.add(CONST, "", 0, i),
    RESTRICT: lambda b, i: b.add(RESTRICT, "", 0, i),
    FUNC: lambda b, i: b.func("f", i, linkage=2),  # extern: vlen 2, still no items
    FUNC_PROTO: lambda b, i: b.func_proto(i, [("a", i), ("b", i), ("c", i)]),
    VAR: lambda b, i: b.add(VAR, "v", 0, i, struct.pack("<I", 1)),
    DATASEC: lambda b, i: b.add(DATASEC, ".data", 2, 8, struct.pack("<6I", i, 0, 4, i, 4, 4)),
    FLOAT: lambda b, i: b.add(FLOAT, "double", 0, 8),
    DECL_TAG: lambda b, i: b.add(DECL_TAG, "tag", 0, i, struct.pack("<i", -1)),
    TYPE_TAG: lambda b, i: b.add(TYPE_TAG, "user", 0, i),
    ENUM64: lambda b, i: b.enum64("e64", {"HUGE": 1 << 40, "ONE": 1}),
}


@pytest.mark.parametrize("kind", sorted(ONE_OF))
def test_every_kind_is_read_to_its_end(kind: int):
    """After a type of each kind, the next type is found where btf.h puts it: a wrong
    record length for any one kind would misread every type after it."""
    b = BtfBlob()
    i = b.int("int")
    tid = ONE_OF[kind](b, i)
    after = b.int("after", 8, 64)
    btf = Btf(b.bytes())
    assert len(btf.offsets) == after + 1  # void, then each type once
    assert btf.type(tid)[0] == kind
    kind_after, name_off, vlen, size = btf.type(after)
    assert (kind_after, btf.name(name_off), vlen, size) == (INT, "after", 0, 8)


def each_kind(b: BtfBlob) -> dict[int, int]:
    """One type of every kind btf.h defines, in one blob: kind -> id."""
    ids = {INT: b.int("int")}
    for kind, make in ONE_OF.items():
        if kind != INT:
            ids[kind] = make(b, ids[INT])
    return ids


def test_types_by_id_with_their_names_and_sizes():
    """type(id) gives (kind, name offset, vlen, size or type) and name() the name."""
    b = BtfBlob()
    ids = each_kind(b)
    btf = Btf(b.bytes())
    assert len(btf.offsets) == len(ids) + 1
    kind, name_off, vlen, size = btf.type(ids[STRUCT])
    assert (kind, btf.name(name_off), vlen, size) == (STRUCT, "s", 2, 16)
    kind, name_off, vlen, target = btf.type(ids[TYPEDEF])
    assert (kind, btf.name(name_off), target) == (TYPEDEF, "t", ids[INT])
    kind, name_off, vlen, target = btf.type(ids[FUNC])
    assert (kind, btf.name(name_off), vlen, target) == (FUNC, "f", 2, ids[INT])
    kind, name_off, vlen, size = btf.type(ids[ENUM64])
    assert (kind, btf.name(name_off), vlen, size) == (ENUM64, "e64", 2, 8)
    assert btf.type(ids[PTR])[:2] == (PTR, 0)  # anonymous
    assert btf.name(0) == ""


def test_first_param_of_a_func_proto():
    """first_param gives the type of a FUNC_PROTO's first parameter (how an iterator's
    FUNC is told from a kfunc of the same prefix)."""
    b = BtfBlob()
    i = b.int("int")
    p = b.ptr(i)
    proto = b.func_proto(i, [("meta", p), ("n", i)])
    b.func("bpf_iter_x", proto)
    btf = Btf(b.bytes())
    assert btf.first_param(proto) == p


def test_a_longer_header_and_sections_in_any_order():
    """The sections are found by the header's offsets and its own length, as a newer
    kernel's longer header or another producer's layout may place them."""
    b = BtfBlob()
    ids = each_kind(b)
    for blob in (b.bytes(hdr_len=32), b.bytes(strings_first=True)):
        btf = Btf(blob)
        assert len(btf.offsets) == len(ids) + 1
        assert btf.names_of_kind(STRUCT, {"s"}) == {"s": ids[STRUCT]}


def test_skip_modifiers_reaches_the_type_underneath():
    """const, volatile, typedef, restrict and type tags are skipped; the rest not."""
    b = BtfBlob()
    i = b.int("int")
    p = b.ptr(i)
    t = b.add(TYPE_TAG, "user", 0, p)
    r = b.add(RESTRICT, "", 0, t)
    td = b.add(TYPEDEF, "iptr_t", 0, r)
    v = b.add(VOLATILE, "", 0, td)
    c = b.add(CONST, "", 0, v)
    btf = Btf(b.bytes())
    assert btf.skip_modifiers(c) == p
    assert btf.skip_modifiers(p) == p  # a pointer is no modifier: not followed to int
    assert btf.skip_modifiers(0) == 0  # void


def test_enum_members_by_enum_name():
    """enum_members gives an ENUM's enumerators with their (signed) values; {} if no
    ENUM has that name, even if another kind does."""
    b = BtfBlob()
    b.struct("colour_s", [])
    b.enum("colour", {"RED": 0, "GREEN": 1, "NONE": -1})
    b.add(TYPEDEF, "shade", 0, 1)
    btf = Btf(b.bytes())
    assert btf.enum_members("colour") == {"RED": 0, "GREEN": 1, "NONE": -1}
    assert btf.enum_members("shade") == {}
    assert btf.enum_members("nothing") == {}


def test_names_of_kind_finds_only_that_kind_and_named_types():
    b = BtfBlob()
    i = b.int("x")
    s = b.struct("x", [("m", i)])
    b.struct("", [("m", i)])  # anonymous: never found
    f = b.func("x_fn", b.func_proto(i, []))
    btf = Btf(b.bytes())
    assert btf.names_of_kind(BTF_KIND_STRUCT, {"x", "y", ""}) == {"x": s}
    assert btf.names_of_kind(BTF_KIND_FUNC, {"x", "x_fn"}) == {"x_fn": f}
    assert btf.names_of_kind(BTF_KIND_ENUM, {"x"}) == {}


@pytest.mark.parametrize("kind", [0, 20, 31])
def test_an_unknown_kind_is_refused_not_guessed(kind: int):
    """A kind this parser does not know (a newer kernel's) raises ValueError naming
    it, rather than misreading every type after it."""
    b = BtfBlob()
    b.int("int")
    b.add(kind, "new", 1, 0, b"\0" * 12)
    b.int("after")
    with pytest.raises(ValueError, match=f"kind {kind}"):
        Btf(b.bytes())


def test_not_btf_is_refused():
    blob = bytearray(BtfBlob().bytes())
    blob[0:2] = b"\xeb\x9f"  # the magic in the other byte order (a big-endian blob)
    with pytest.raises(ValueError, match="not BTF"):
        Btf(bytes(blob))


# -- targets.discover over synthetic BTF -------------------------------------------

def kernel_like(b: BtfBlob, targets: list[str], ctx_only: list[str] = (),
                kfuncs: list[str] = (), orders: dict[str, int] | None = None) -> None:
    """Iterator targets as the kernel's BTF shows them: FUNC bpf_iter_X(struct
    bpf_iter_meta *meta, ...) and STRUCT bpf_iter__X; CTX_ONLY, the struct without
    the FUNC; KFUNCS, open-coded iterator kfuncs, which share the prefix only."""
    i = b.int("int")
    meta = b.struct("bpf_iter_meta", [("seq", i)])
    # the kernel declares `struct bpf_iter_meta *meta`; a const in front must not matter
    meta_ptr = b.add(CONST, "", 0, b.ptr(meta))
    for t in targets:
        b.func(f"bpf_iter_{t}", b.func_proto(i, [("meta", meta_ptr), ("obj", b.ptr(i))]))
        b.struct(f"bpf_iter__{t}", [("meta", b.ptr(meta)), (t, b.ptr(i))])
    for t in ctx_only:
        b.struct(f"bpf_iter__{t}", [("meta", b.ptr(meta))])
    for k in kfuncs:
        b.func(f"bpf_iter_{k}", b.func_proto(i, [("it", b.ptr(i))]))
        b.struct(f"bpf_iter__{k}", [("meta", b.ptr(meta))])
    if orders is not None:
        b.enum("bpf_cgroup_iter_order", orders)


def test_discover_finds_targets_by_their_two_marks(tmp_path):
    """A target needs both the FUNC whose first parameter is a struct bpf_iter_meta
    pointer and the context STRUCT; kfuncs sharing the prefix are not targets. Known
    targets get their parameters; the cgroup target, the orders its kernel has."""
    from bpfdumpfs.targets import discover
    b = BtfBlob()
    kernel_like(b, ["task", "bpf_map_elem", "cgroup", "ksym"], ctx_only=["ghost"],
                kfuncs=["num"],
                orders={"BPF_CGROUP_ITER_ORDER_UNSPEC": 0, "BPF_CGROUP_ITER_SELF_ONLY": 1,
                        "BPF_CGROUP_ITER_DESCENDANTS_PRE": 2})
    path = tmp_path / "vmlinux"
    path.write_bytes(b.bytes())
    found = discover(str(path))
    assert list(found) == ["bpf_map_elem", "cgroup", "ksym", "task"]
    assert [p.name for p in found["bpf_map_elem"].params] == ["map"]
    assert found["bpf_map_elem"].params[0].required
    assert [(p.name, p.required) for p in found["task"].params] == [("task", False)]
    assert found["ksym"].params == ()
    # only the orders this kernel has, with its BTF's values
    assert found["cgroup"].cgroup_orders == {"self": 1, "pre": 2}
    assert found["cgroup"].order_name(2) == "pre"
    assert found["cgroup"].order_name(5) is None


@pytest.mark.parametrize("blob", [
    pytest.param(b"", id="empty"),
    pytest.param(b"\0" * 24, id="not-btf"),
])
def test_discover_refuses_what_is_not_btf(tmp_path, blob: bytes):
    """A kernel BTF that is missing, unreadable or not BTF is a DumperError saying
    what bpfdumpfs needs, not a traceback."""
    from bpfdumpfs.targets import discover
    with pytest.raises(DumperError) as e:
        discover(str(tmp_path / "missing"))
    assert e.value.errno == errno.ENOENT and "CONFIG_DEBUG_INFO_BTF" in e.value.hint
    path = tmp_path / "vmlinux"
    path.write_bytes(blob)
    with pytest.raises(DumperError) as e:
        discover(str(path))
    assert e.value.errno == errno.EINVAL


def test_discover_refuses_a_newer_kernels_btf(tmp_path):
    from bpfdumpfs.targets import discover
    b = BtfBlob()
    kernel_like(b, ["task"])
    b.add(25, "future")
    path = tmp_path / "vmlinux"
    path.write_bytes(b.bytes())
    with pytest.raises(DumperError) as e:
        discover(str(path))
    assert e.value.errno == errno.EINVAL and "kind 25" in str(e.value)


# -- the running kernel's BTF ------------------------------------------------------

@pytest.fixture(scope="module")
def vmlinux() -> Btf:
    if not os.access(VMLINUX_BTF, os.R_OK):
        pytest.skip(f"{VMLINUX_BTF} is not readable")
    with open(VMLINUX_BTF, "rb") as f:
        return Btf(f.read())


def members(btf: Btf, tid: int) -> dict[str, int]:
    """A STRUCT's or UNION's members, name -> type id (struct btf_member: name_off,
    type, offset), those of anonymous struct and union members included: the kernel
    wraps context pointers in one (__bpf_md_ptr)."""
    off, vlen = btf.offsets[tid] + 12, btf.type(tid)[2]
    found = {}
    for i in range(vlen):
        name_off, mtype = struct.unpack_from("<II", btf.types, off + 12 * i)
        if name_off:
            found[btf.name(name_off)] = mtype
        elif btf.type(btf.skip_modifiers(mtype))[0] in (STRUCT, UNION):
            found.update(members(btf, btf.skip_modifiers(mtype)))
    return found


def test_vmlinux_parses_and_has_the_task_iterator(vmlinux: Btf):
    """The running kernel's BTF parses whole (every kind known), and struct
    bpf_iter__task is there with meta and task pointers."""
    found = vmlinux.names_of_kind(BTF_KIND_STRUCT, {"bpf_iter__task", "bpf_iter_meta"})
    assert set(found) == {"bpf_iter__task", "bpf_iter_meta"}
    m = members(vmlinux, found["bpf_iter__task"])
    assert list(m)[:2] == ["meta", "task"]
    kind, _, _, pointee = vmlinux.type(vmlinux.skip_modifiers(m["meta"]))
    assert kind == BTF_KIND_PTR and vmlinux.skip_modifiers(pointee) == found["bpf_iter_meta"]
    assert vmlinux.names_of_kind(BTF_KIND_TYPEDEF, {"u32"})


def test_vmlinux_helper_ids_are_the_uapi_ones(vmlinux: Btf):
    """enum bpf_func_id's values are fixed by the UAPI: helper names come from here."""
    ids = vmlinux.enum_members("bpf_func_id")
    assert ids["BPF_FUNC_map_lookup_elem"] == 1
    assert ids["BPF_FUNC_trace_printk"] == 6
    assert ids["BPF_FUNC_seq_printf"] == 126


def test_vmlinux_targets_include_task(vmlinux: Btf):
    """discover() over the running kernel's BTF finds the task iterator (there since
    5.8), with its optional tid/pid parameters."""
    from bpfdumpfs.targets import discover
    found = discover(VMLINUX_BTF)
    assert "task" in found
    assert [(p.name, p.required) for p in found["task"].params] == [("task", False)]
