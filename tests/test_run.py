"""`bpfdumpfs run`: an anonymous dumper streamed to stdout, nothing left behind."""
from __future__ import annotations

import fcntl
import os
import signal
import struct
import subprocess
import sys
import termios

import pytest
from helpers import (
    BPF_SRC,
    CGROUPS_OBJ,
    ROOT,
    bpf_objects,
    bpfdumpfs,
    eventually,
    need_kernel,
    waiting_in,
)

from bpfdumpfs import kernel


@pytest.fixture(scope="module")
def probe_obj() -> str:
    """tests/bpf/run_probe.bpf.c: a uniquely named program, so the ids it leaves (or not)
    can be told from others'."""
    return bpf_objects("run_probe")["run_probe"]


def ours() -> set[tuple[str, int]]:
    """Links and programs of dump_run_probe that exist now."""
    found = set()
    for pid in kernel.prog_ids():
        try:
            fd = kernel.prog_get_fd_by_id(pid)
        except OSError:
            continue
        try:
            if kernel.prog_info(fd).name == "dump_run_probe":
                found.add(("prog", pid))
        finally:
            os.close(fd)
    for lid in kernel.link_ids():
        try:
            fd = kernel.link_get_fd_by_id(lid)
        except OSError:
            continue
        try:
            if ("prog", kernel.link_info(fd).prog_id) in found:
                found.add(("link", lid))
        finally:
            os.close(fd)
    return found


def test_run_streams_to_stdout_and_leaves_nothing(probe_obj):
    before = ours()
    p = bpfdumpfs("run", str(probe_obj), text=False)
    assert p.returncode == 0 and p.stderr == b""
    lines = p.stdout.splitlines()
    kallsyms = open("/proc/kallsyms", "rb").read().count(b"\n")
    assert abs(len(lines) - kallsyms) < kallsyms // 100, "about one line per kernel symbol"
    assert all(len(ln.split()) == 2 and len(ln.split()[0]) == 16 for ln in lines[:100])
    assert ours() == before


def test_run_compiles_a_source():
    p = bpfdumpfs("run", str(BPF_SRC / "run_probe.bpf.c"), text=False)
    assert p.returncode == 0 and p.stdout.count(b"\n") > 10000


def test_run_into_head_ends_quietly(probe_obj):
    before = ours()
    p = subprocess.run(f"{sys.executable} -m bpfdumpfs run {probe_obj} | head -n 3; "
                       "echo status=${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                       capture_output=True, text=True, cwd=ROOT)
    out = p.stdout.splitlines()
    assert len(out) == 4 and out[3] == "status=0"
    assert p.stderr == ""
    assert ours() == before


def start_run(probe_obj, stdout: int) -> subprocess.Popen:
    """`bpfdumpfs run PROBE > STDOUT` as a terminal starts it: with SIGINT at its default
    (a shell without job control starts background commands, CI's among them, with SIGINT
    ignored, and the run, like any program, keeps it ignored)."""
    return subprocess.Popen([sys.executable, "-m", "bpfdumpfs", "run", str(probe_obj)],
                            cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_run_killed_mid_stream_leaves_nothing(probe_obj, sig, code):
    before = ours()
    # Nobody reads the pipe, so the run blocks in write() with its link and prog alive.
    r, w = os.pipe()
    p = start_run(probe_obj, stdout=w)
    os.close(w)
    assert eventually(lambda: ours() != before, 30, step=0.05), \
        "the run should hold its link while streaming"
    p.send_signal(sig)
    assert p.wait(timeout=30) == code
    os.close(r)
    assert b"Traceback" not in p.stderr.read()
    # the kernel frees the link and program once the fds are gone
    assert eventually(lambda: ours() == before, 5, step=0.05), \
        f"left behind: {sorted(ours() - before)}"


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_run_stopped_in_a_half_done_write_ends(probe_obj, sig, code):
    """A signal that cuts a write to stdout short (a pipe of one page, never read)
    still ends the run: what was not written is dropped, not written forever."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    p = start_run(probe_obj, stdout=w)
    os.close(w)
    try:
        # the pipe is full, and the run waits inside a write
        assert eventually(lambda: unread(r) >= 4096, 30), "the run never filled its pipe"
        assert eventually(lambda: waiting_in(p.pid).endswith("pipe_write"), 10), \
            f"the run is not waiting in a write to its pipe: {waiting_in(p.pid)}"
        p.send_signal(sig)
        assert p.wait(timeout=10) == code
        assert b"Traceback" not in p.stderr.read()
    finally:
        p.kill()
        p.wait()
        os.close(r)


def unread(fd: int) -> int:
    """Bytes waiting in the pipe FD."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def test_run_pin_pins_it_like_add(probe_obj, state_dir):
    p = bpfdumpfs("run", str(probe_obj), "--pin", "runpinned", "--mode", "0440",
                  "--state-dir", str(state_dir))
    pin = state_dir / "ksym" / "runpinned"
    try:
        assert p.stdout.strip().endswith("/ksym/runpinned")
        assert oct(os.stat(pin).st_mode & 0o7777) == "0o440"
        assert open(pin, "rb").read(17)[16:17] == b" "
    finally:
        pin.unlink()


def test_run_bad_input_is_one_line(tmp_path):
    p = bpfdumpfs("run", str(tmp_path / "missing.bpf.o"), check=False)
    assert p.returncode == 1
    assert p.stderr == (f"bpfdumpfs: opening BPF object {tmp_path}/missing.bpf.o: No such file "
                        "or directory (ENOENT); give the path of a compiled .bpf.o or a .bpf.c "
                        "source\n")


def test_run_takes_a_cgroup_v1_hierarchy_as_the_kernel_does(tmp_path):
    """The cgroup iterator walks a v1 hierarchy too (cgroup_v1v2_get_from_fd); here a
    named one of no controllers, which a host with every controller on v2 can still
    mount. A directory of another file system is refused by name."""
    need_kernel()
    top = tmp_path / "v1"
    top.mkdir()
    subprocess.run(["mount", "-t", "cgroup", "-o", f"none,name=bpfdumpfs-{os.getpid()}",
                    "cgroup", str(top)], check=True)
    try:
        (top / "kid").mkdir()
        try:
            p = bpfdumpfs("run", str(CGROUPS_OBJ), "--cgroup", str(top), "--order", "pre")
            ids = [int(ln.split()[0]) for ln in p.stdout.splitlines()]
            assert ids == [os.stat(top).st_ino, os.stat(top / "kid").st_ino], p.stdout
        finally:
            (top / "kid").rmdir()
    finally:
        subprocess.run(["umount", str(top)], check=True)
    p = bpfdumpfs("run", str(CGROUPS_OBJ), "--cgroup", str(tmp_path), "--order", "pre",
                  check=False)
    assert (p.returncode, p.stderr.count("\n")) == (1, 1), p
    assert f"{tmp_path} is not a cgroup directory" in p.stderr and "v1 hierarchy" in p.stderr
