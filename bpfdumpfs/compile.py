"""Compile a `.bpf.c` source against the running kernel's BTF.

Sources include "vmlinux.h" (generated from /sys/kernel/btf/vmlinux with bpftool
and cached per kernel) and libbpf's <bpf/*.h> headers; "common.h" of the
built-ins is on the include path too. The result is a CO-RE object in a private
temporary directory, loaded like any other object.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import DumperError
from .targets import VMLINUX_BTF

CACHE_DIR = Path(os.environ.get("BPFDUMPFS_CACHE_DIR", "/var/cache/bpfdumpfs"))
BUILTIN_SRC = Path(__file__).resolve().parent / "builtins" / "src"
_ARCH = {"x86_64": "x86", "aarch64": "arm64", "ppc64le": "powerpc", "s390x": "s390"}


def is_source(path: str | os.PathLike) -> bool:
    return str(path).endswith(".c")


def _tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if not found:
        raise DumperError(errno.ENOENT, f"compiling a .bpf.c source needs {name}",
                          f"install it (apt-get install {package}) or give a compiled .bpf.o")
    return found


def vmlinux_h() -> Path:
    """vmlinux.h of the running kernel, generated once per kernel BTF."""
    with open(VMLINUX_BTF, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    header = CACHE_DIR / digest / "vmlinux.h"
    if header.exists():
        return header
    bpftool = _tool("bpftool", "bpftool")
    header.parent.mkdir(parents=True, exist_ok=True)
    tmp = header.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "w") as out:
        p = subprocess.run([bpftool, "btf", "dump", "file", VMLINUX_BTF, "format", "c"],
                           stdout=out, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise DumperError(errno.EIO, "generating vmlinux.h with bpftool", p.stderr.strip())
    tmp.rename(header)
    return header


def compile_source(src: str | os.PathLike, workdir: str) -> str:
    """Compile SRC to a BPF object in WORKDIR; returns the object's path."""
    src = Path(src)
    if not src.is_file():
        raise DumperError(errno.ENOENT, f"opening BPF source {src}",
                          "give the path of a .bpf.c file")
    clang = _tool("clang", "clang llvm libbpf-dev")
    include = vmlinux_h().parent
    obj = Path(workdir) / (src.name.removesuffix(".c") + ".o")
    arch = _ARCH.get(platform.machine(), platform.machine())
    p = subprocess.run([clang, "-g", "-O2", "-target", "bpf", f"-D__TARGET_ARCH_{arch}",
                        f"-I{include}", f"-I{BUILTIN_SRC}", "-c", str(src), "-o", str(obj)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        first = next((ln for ln in p.stderr.splitlines() if "error" in ln), p.stderr.strip())
        raise DumperError(errno.EINVAL, f"compiling {src} failed", first, log=p.stderr.strip())
    return str(obj)


@contextlib.contextmanager
def object_file(path: str | os.PathLike) -> Iterator[str]:
    """PATH itself for an object; for a source, its compiled object while in the block."""
    if not is_source(path):
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="bpfdumpfs-") as workdir:
        yield compile_source(path, workdir)
