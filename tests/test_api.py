"""The Python API: anonymous dumpers, independent streams, pins, info, errors."""
from __future__ import annotations

import errno
import gc
import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT, need_kernel

from bpfdumpfs import Dumper, DumperError, Params, StateDir, kernel
from bpfdumpfs.builtins import object_path


@pytest.fixture(autouse=True)
def _kernel():
    need_kernel()


def link_alive(link_id: int) -> bool:
    try:
        os.close(kernel.link_get_fd_by_id(link_id))
        return True
    except DumperError as e:
        assert e.errno == errno.ENOENT
        return False


def test_streams_are_independent_line_iterators():
    with Dumper.load(object_path("tasks")) as d:
        with d.open() as a, d.open(text=True) as b:
            first_a = a.readline()
            lines_b = list(b)
            assert first_a.decode() == lines_b[0]
            rest_a = a.read()
        assert first_a.split() == [b"PID", b"TGID", b"PPID", b"S", b"UID", b"COMM"]
        assert f"{os.getpid():>7}" in "".join(lines_b)
        assert f"{os.getpid():>7}".encode() in rest_a  # a's own whole dump, after b's


def test_info_names_target_link_prog_and_params():
    with Dumper.load(object_path("cgroups"), params=Params(order="ancestors")) as d:
        info = d.info()
        assert (info.target, info.prog_name, info.cgroup_order) == ("cgroup", "dump_cgroups",
                                                                    "ancestors")
        assert info.params() == {"cgroup_id": info.cgroup_id, "cgroup_order": "ancestors"}
        assert re.fullmatch(r"[0-9a-f]{16}", info.prog_tag)
        li = d.link_info()
        assert (li.id, li.prog_id) == (info.link_id, info.prog_id)


def test_anonymous_link_dies_when_closed_or_collected():
    d = Dumper.load(object_path("tasks"))
    link_id = d.info().link_id
    stream = d.open()
    d.close()
    assert not link_alive(link_id)
    assert stream.read(7) == b"    PID", "a stream opened before keeps working (kernel fact)"
    stream.close()
    with pytest.raises(DumperError) as e:
        d.open()
    assert e.value.errno == errno.EBADF

    d = Dumper.load(object_path("tasks"))
    link_id = d.info().link_id
    del d
    gc.collect()
    assert not link_alive(link_id)


def test_pin_get_and_remove(tmp_path):
    state_path = tmp_path / "state"
    state_path.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(state_path)], check=True)
    try:
        state = StateDir(state_path).check()
        with Dumper.load(object_path("tasks")) as d:
            path = d.pin(state, "mine", mode=0o440)
            link_id = d.info().link_id
        assert path == state_path / "task" / "mine"
        assert oct(os.stat(path).st_mode & 0o777) == "0o440"
        assert link_alive(link_id), "the pin keeps the link"
        with state.get("task", "mine") as again:
            assert again.info().link_id == link_id
            assert again.read().startswith(b"    PID")
        info = state.info("task", "mine")
        assert (info.name, info.mode, info.owner, info.group) == ("mine", "0440", "root", "root")
        with Dumper.from_link_id(link_id) as adopted:
            assert adopted.read().startswith(b"    PID")
        state.remove("task", "mine")
        assert not path.exists() and not link_alive(link_id)
        with pytest.raises(DumperError) as e:
            state.get("task", "mine")
        assert str(e.value) == ("dumper task/mine does not exist: No such file or directory "
                                "(ENOENT); see `bpfdumpfs ls`")
    finally:
        subprocess.run(["umount", "-l", str(state_path)])


def test_errors_carry_errno_and_hint(tmp_path):
    with pytest.raises(DumperError) as e:
        Dumper.load(object_path("tasks"), params=Params(map="1"))
    assert e.value.errno == errno.EINVAL and e.value.hint.startswith("it takes --tid N")
    with pytest.raises(DumperError) as e:
        Dumper.load(object_path("cgroups"))
    assert e.value.errno == errno.EINVAL and "--order" in e.value.hint
    bad = tmp_path / "x.bpf.o"
    bad.write_bytes(b"\x7fELF" + os.urandom(200))
    with pytest.raises(DumperError) as e:
        Dumper.load(bad)
    assert isinstance(e.value, OSError) and e.value.errno
    assert str(bad) in str(e.value)


def test_readme_examples_run(tmp_path):
    """Every ```python block of README.md, as written, in a private mount namespace whose
    /sys/fs/bpf is a fresh bpffs (so the examples' default state dir is ours alone)."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has Python examples"
    for i, code in enumerate(blocks):
        script = tmp_path / f"example{i}.py"
        script.write_text(code)
        p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            f"mount -t bpf bpf /sys/fs/bpf && {sys.executable} {script}"],
                           capture_output=True, text=True, cwd=ROOT, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert p.returncode == 0, f"README example {i} failed:\n{p.stderr}"
        assert "Traceback" not in p.stderr
