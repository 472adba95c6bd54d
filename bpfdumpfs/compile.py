"""Compile a `.bpf.c` source against the running kernel's BTF.

Sources include "vmlinux.h" (generated from /sys/kernel/btf/vmlinux with bpftool
and cached per kernel) and libbpf's <bpf/*.h> headers; "common.h" of the
built-ins is on the include path too. So is what the BPF builds of the kernel's
selftests and libbpf-bootstrap add: the host compiler's system include dirs
(with the multiarch one, where <bits/wordsize.h> and <asm/errno.h> live, which
clang's BPF target does not search), after everything else (-idirafter), so
that <errno.h> or <limits.h> resolve as they do there. The user's own flags
(-I DIR, -D NAME=VALUE, --cflags) come first. The result is a CO-RE object in a
private temporary directory, loaded like any other object.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

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


def cflags(include: Iterable[str] = (), define: Iterable[str] = (),
           extra: Iterable[str] = ()) -> tuple[str, ...]:
    """Compiler flags from -I DIRs, -D NAME[=VALUE]s and free-form --cflags strings
    (split as a shell would); raises DumperError for an include dir that is not one."""
    flags = []
    for d in include:
        if not Path(d).is_dir():
            raise DumperError(errno.ENOENT, f"include dir {d} is not a directory",
                              "give -I the directory holding the headers")
        flags.append(f"-I{Path(d).resolve()}")
    flags += [f"-D{x}" for x in define]
    for text in extra:
        try:
            flags += shlex.split(text)
        except ValueError as e:
            raise DumperError(errno.EINVAL, f"--cflags {text!r} cannot be split: {e}",
                              "quote it as a shell would") from None
    return tuple(flags)


@functools.cache
def system_includes(clang: str) -> tuple[str, ...]:
    """-idirafter DIR for each system include dir the host's clang searches (as the
    kernel selftests' and libbpf-bootstrap's Makefiles do): none if it cannot say."""
    p = subprocess.run([clang, "-v", "-E", "-x", "c", "-"], input="", capture_output=True,
                       text=True)
    lines = p.stderr.splitlines()
    try:
        start = lines.index("#include <...> search starts here:") + 1
        end = lines.index("End of search list.", start)
    except ValueError:
        return ()
    return tuple(f for ln in lines[start:end] for f in ("-idirafter", ln.strip().split()[0]))


def compile_source(src: str | os.PathLike, workdir: str, flags: Iterable[str] = ()) -> str:
    """Compile SRC to a BPF object in WORKDIR, with the user's FLAGS first; returns the
    object's path."""
    src = Path(src)
    if not src.is_file():
        raise DumperError(errno.ENOENT, f"opening BPF source {src}",
                          "give the path of a .bpf.c file")
    clang = _tool("clang", "clang llvm libbpf-dev")
    include = vmlinux_h().parent
    obj = Path(workdir) / (src.name.removesuffix(".c") + ".o")
    arch = _ARCH.get(platform.machine(), platform.machine())
    p = subprocess.run([clang, "-g", "-O2", "-target", "bpf", f"-D__TARGET_ARCH_{arch}",
                        *flags, f"-I{include}", f"-I{BUILTIN_SRC}", *system_includes(clang),
                        "-c", str(src), "-o", str(obj)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        first = next((ln for ln in p.stderr.splitlines() if "error" in ln), p.stderr.strip())
        hint = first
        if "file not found" in first:
            hint += " (give its directory with -I DIR, or `include` in a config file)"
        raise DumperError(errno.EINVAL, f"compiling {src} failed", hint, log=p.stderr.strip())
    return str(obj)


@contextlib.contextmanager
def object_file(path: str | os.PathLike, flags: Iterable[str] = ()) -> Iterator[str]:
    """PATH itself for an object; for a source, its compiled object while in the block.
    FLAGS (compiler flags) are for a source only."""
    if not is_source(path):
        if tuple(flags):
            raise DumperError(errno.EINVAL, f"compiler flags given for {path}, which is "
                              "not a .c source", "drop -I, -D and --cflags, or give the source")
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="bpfdumpfs-") as workdir:
        yield compile_source(path, workdir, flags)
