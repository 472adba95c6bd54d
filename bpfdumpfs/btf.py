"""Just enough of a BTF parser: types by id and by name, their names, enumerators.

Read for the kernel's own BTF (iterator targets, helper ids) and for a loaded
program's (its full name), both in the raw format of include/uapi/linux/btf.h.
"""
from __future__ import annotations

import struct

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"

BTF_KIND_PTR, BTF_KIND_STRUCT, BTF_KIND_ENUM = 2, 4, 6
BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST, BTF_KIND_RESTRICT = 8, 9, 10, 11
BTF_KIND_FUNC, BTF_KIND_FUNC_PROTO = 12, 13
BTF_KIND_TYPE_TAG = 18
# bytes that follow struct btf_type (12 bytes), by kind: (fixed, per vlen item)
_EXTRA = {
    1: (4, 0),    # INT
    2: (0, 0),    # PTR
    3: (12, 0),   # ARRAY
    4: (0, 12),   # STRUCT
    5: (0, 12),   # UNION
    6: (0, 8),    # ENUM
    7: (0, 0),    # FWD
    8: (0, 0),    # TYPEDEF
    9: (0, 0),    # VOLATILE
    10: (0, 0),   # CONST
    11: (0, 0),   # RESTRICT
    12: (0, 0),   # FUNC
    13: (0, 8),   # FUNC_PROTO
    14: (4, 0),   # VAR
    15: (0, 12),  # DATASEC
    16: (0, 0),   # FLOAT
    17: (4, 0),   # DECL_TAG
    18: (0, 0),   # TYPE_TAG
    19: (0, 12),  # ENUM64
}
_MODIFIERS = {BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST, BTF_KIND_RESTRICT,
              BTF_KIND_TYPE_TAG}


_HEADER = struct.Struct("<HBBIIIII")  # struct btf_header


class Btf:
    """One BTF blob: its type and string sections, and where each type starts."""

    def __init__(self, data: bytes) -> None:
        if len(data) < _HEADER.size:
            raise ValueError(f"not BTF: {len(data)} bytes, shorter than its header")
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = \
            _HEADER.unpack_from(data, 0)
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
            if kind not in _EXTRA:
                # BTF does not say how long a kind's record is: guessing would misread
                # every type after it
                raise ValueError(f"BTF type {len(self.offsets) - 1} is of kind {kind}, which "
                                 "this bpfdumpfs does not know (a newer kernel's)")
            fixed, per_item = _EXTRA[kind]
            off += 12 + fixed + per_item * vlen

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
        """Enumerators of the ENUM called NAME (empty if there is none)."""
        tid = self.names_of_kind(BTF_KIND_ENUM, {name}).get(name)
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
