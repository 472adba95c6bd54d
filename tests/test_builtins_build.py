"""The shipped built-in objects: each loads on this kernel (one of its variants, at
least), one command rebuilds them, and a built-in that cannot load is reported."""
from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    bpf_objects,
    maps_comparable,
    mount_bpffs,
    need,
    need_kernel,
    readline,
    unmount,
)

import bpfdumpfs.builtins as shipped
from bpfdumpfs import Dumper, DumperError, cli, kernel
from bpfdumpfs.builtins import HERE, Builtin, builtins
from bpfdumpfs.dumpers import Params
from bpfdumpfs.metrics import STATUS_XATTR, Metrics
from bpfdumpfs.state import StateDir

NAMES = [b.name for b in builtins()]


def test_every_source_has_a_shipped_object():
    sources = sorted(p.name.removesuffix(".bpf.c") for p in (HERE / "src").glob("*.bpf.c"))
    assert sources == sorted(NAMES)
    assert len(NAMES) >= 16


@pytest.mark.parametrize("name", NAMES)
def test_shipped_object_loads_and_dumps(name):
    need_kernel()
    b = next(b for b in builtins() if b.name == name)
    with b.load() as d:
        assert d.info().prog_name in {v.name for v in b.variants}
        with d.open() as s:
            s.read(1)  # runs the program at least once; errors would raise


def accepted(b: Builtin) -> dict[str, Dumper]:
    """Each variant of B that this kernel's verifier accepts, loaded; a variant is
    only ever refused by the verifier (EACCES, EINVAL), never for another reason."""
    loaded = {}
    for v in b.variants:
        try:
            loaded[v.name] = Dumper.load(b.object, v.name, b.params)
        except DumperError as e:
            assert e.errno in (errno.EACCES, errno.EINVAL) and e.log, str(e)
    assert loaded, f"no variant of {b.name} loads"
    return loaded


# A process with mappings whose paths the two vmas variants find differently: a file
# unlinked while mapped, a memfd, a file below a bind mount, and a name with a space.
MAPPER = r"""
import mmap, os, sys
d = sys.argv[1]
keep = []
for name in ("gone", "with space"):
    fd = os.open(os.path.join(d, name), os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, 4096)
    keep.append(mmap.mmap(fd, 4096))
os.unlink(os.path.join(d, "gone"))
fd = os.memfd_create("hello")
os.ftruncate(fd, 4096)
keep.append(mmap.mmap(fd, 4096))
fd = os.open(os.path.join(sys.argv[2], "deep", "er", "file"), os.O_RDONLY)
keep.append(mmap.mmap(fd, 4096, prot=mmap.PROT_READ))
print("ready", flush=True)
sys.stdin.read()
"""


def test_every_vmas_variant_the_kernel_accepts_shows_what_proc_maps_shows(tmp_path):
    """On a tmpfs of its own: through an overlayfs (a container's /tmp) the mapped file is
    the layer's, whose path a bind mount does not change (documented in vmas.bpf.c)."""
    need_kernel()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmp_path)], check=True)
    src = tmp_path / "src"
    (src / "deep" / "er").mkdir(parents=True)
    (src / "deep" / "er" / "file").write_bytes(b"x" * 4096)
    bound = tmp_path / "bound"
    bound.mkdir()
    subprocess.run(["mount", "--bind", str(src), str(bound)], check=True)
    p = subprocess.Popen([sys.executable, "-c", MAPPER, str(tmp_path), str(bound)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert readline(p.stdout, what="the mappings made") == "ready\n"
        with open(f"/proc/{p.pid}/maps") as f:
            expect = maps_comparable([" ".join(ln.split()) for ln in f
                                      if not ln.endswith("[vsyscall]\n")])
        assert any(ln.endswith(" (deleted)") for ln in expect)
        b = next(b for b in builtins() if b.name == "vmas")
        for name, d in accepted(b).items():
            with d:
                got = maps_comparable([" ".join(ln.split()[1:])
                                   for ln in d.read().decode().splitlines()
                                   if ln.split(" ", 1)[0] == str(p.pid)])
            assert got == expect, name
    finally:
        p.stdin.close()
        p.wait()
        subprocess.run(["umount", str(bound)], check=True)
        subprocess.run(["umount", str(tmp_path)], check=True)


def test_make_rebuilds_every_object(tmp_path):
    """The objects hold CO-RE relocations against the build machine's BTF, so a rebuild
    on another kernel is not byte for byte the same: it has the same programs, in the
    same order, and each of them loads and dumps as the shipped one does."""
    need_kernel()
    need(shutil.which("clang") is not None and shutil.which("bpftool") is not None,
         "clang and bpftool (./setup installs them)")
    work = tmp_path / "builtins"
    shutil.copytree(HERE, work, ignore=shutil.ignore_patterns("*.bpf.o", "build", "__pycache__"))
    p = subprocess.run(["make", "-C", str(work)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert sorted(o.name.removesuffix(".bpf.o") for o in work.glob("*.bpf.o")) == sorted(NAMES)
    for b in builtins():
        rebuilt = Builtin(b.name, work / f"{b.name}.bpf.o", b.params)
        assert rebuilt.variants == b.variants, f"{b.name} is stale"
        with rebuilt.load() as new, b.load() as shipped:
            assert new.info().prog_name == shipped.info().prog_name
            with new.open() as s:
                s.read(1)


def test_a_builtin_the_kernel_refuses_is_reported_and_the_rest_served(tmp_path, monkeypatch,
                                                                      capsys):
    """Its one-line reason goes to the log, to .stats and to `bpfdumpfs status`; the
    other built-ins are pinned as usual."""
    obj = bpf_objects("unverifiable")["unverifiable"]  # every verifier refuses it
    tasks = next(b for b in builtins() if b.name == "tasks")
    monkeypatch.setattr(shipped, "builtins",
                        lambda: [tasks, Builtin("refused", Path(obj), Params())])
    state = StateDir(mount_bpffs(tmp_path / "state")).ensure()
    try:
        report = shipped.pin_builtins(state)
        assert report.done == ["task/tasks pinned"]
        assert list(report.unavailable) == ["task/refused"]
        assert "invalid mem access" in report.unavailable["task/refused"]
        assert state.names("task") == ["tasks"]
    finally:
        state.meta.close()
        unmount(tmp_path / "state")

    point = tmp_path / "mnt"
    (point / "task").mkdir(parents=True)
    os.setxattr(point, STATUS_XATTR, json.dumps(Metrics(str(point), str(state.path),
                                                         report.unavailable).status()).encode())
    assert cli.main(["status", str(point)]) == 0
    out = capsys.readouterr().out
    assert f"  not served  task/refused: {report.unavailable['task/refused']}\n" in out


def test_a_builtin_without_its_target_is_reported(tmp_path, monkeypatch):
    need_kernel()
    tasks = next(b for b in builtins() if b.name == "tasks")
    monkeypatch.setattr(shipped.targets, "running_kernel", lambda: {})
    monkeypatch.setattr(shipped, "builtins", lambda: [tasks])
    state = StateDir(mount_bpffs(tmp_path / "state")).ensure()
    try:
        report = shipped.pin_builtins(state)
    finally:
        state.meta.close()
        unmount(tmp_path / "state")
    assert report.unavailable == {"task/tasks": "built-in task/tasks is not served: "
                                  "No such file or directory (ENOENT); "
                                  "this kernel has no task iterator target"}



def system_hz() -> int:
    path = kernel.system_kconfig()
    need(path is not None, "a Kconfig file (/boot/config-RELEASE or /proc/config.gz)")
    with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
        return next(int(ln.split("=")[1]) for ln in f if ln.startswith("CONFIG_HZ="))


def test_measured_hz_is_the_kernels_config_hz():
    need_kernel()
    assert kernel.measured_hz() == system_hz()


def test_builtins_with_kconfig_externs_load_where_the_system_has_no_kconfig(monkeypatch):
    """libbpf refuses a __kconfig extern it cannot resolve, and most hosts have no
    Kconfig to read: the daemon gives it the values it measures instead."""
    need_kernel()
    hz = system_hz()
    monkeypatch.setattr(kernel, "system_kconfig", lambda: None)
    kernel.kconfig.cache_clear()
    try:
        assert kernel.kconfig() == f"CONFIG_HZ={hz}\n"
        for b in builtins():
            if b.name in ("tcp", "tcp6"):
                with b.load() as d:
                    assert d.read().startswith(b"  sl  local_address")
    finally:
        kernel.kconfig.cache_clear()
