"""The shipped built-in objects: each loads on this kernel, and one command rebuilds them."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from bpfdumpfs import Dumper
from bpfdumpfs.builtins import HERE, builtins
from helpers import need, need_kernel

NAMES = [b.name for b in builtins()]


def test_every_source_has_a_shipped_object():
    sources = sorted(p.name.removesuffix(".bpf.c") for p in (HERE / "src").glob("*.bpf.c"))
    assert sources == sorted(NAMES)
    assert len(NAMES) >= 16


@pytest.mark.parametrize("name", NAMES)
def test_shipped_object_loads_and_dumps(name):
    need_kernel()
    b = next(b for b in builtins() if b.name == name)
    with Dumper.load(b.object, params=b.params) as d:
        assert d.info().prog_name.startswith("dump_")
        with d.open() as s:
            s.read(1)  # runs the program at least once; errors would raise


def test_make_rebuilds_every_object(tmp_path):
    need_kernel()
    need(shutil.which("clang") is not None and shutil.which("bpftool") is not None,
         "clang and bpftool (./setup installs them)")
    work = tmp_path / "builtins"
    shutil.copytree(HERE, work, ignore=shutil.ignore_patterns("*.bpf.o", "build", "__pycache__"))
    p = subprocess.run(["make", "-C", str(work)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert sorted(o.name.removesuffix(".bpf.o") for o in work.glob("*.bpf.o")) == sorted(NAMES)
    for b in builtins():
        rebuilt = work / f"{b.name}.bpf.o"
        with Dumper.load(rebuilt, params=b.params) as d:
            assert d.info().prog_name.startswith("dump_")
        # the same compiler gives the same object: what ships is what the sources say
        if shutil.which("clang") and "14." in subprocess.run(
                ["clang", "--version"], capture_output=True, text=True).stdout:
            assert rebuilt.read_bytes() == b.object.read_bytes(), f"{b.name} is stale"
