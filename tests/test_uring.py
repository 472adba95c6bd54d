"""FUSE over io_uring (core.c): with fuse.enable_uring=Y the daemon serves requests
from one ring per CPU, and readers see the same tree as over /dev/fuse.

The module parameter is host-wide (and must stay set while the rings are in use):
this module sets it for its own daemon and puts it back as it found it. The rest of
the suite runs over /dev/fuse (the default)."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    Daemon,
    bpf_objects,
    eventually,
    fstype,
    mount_bpffs,
    need,
    need_kernel,
    read_all,
    rss_kib,
    seq_fds,
    settled_seq_fds,
    traversable,
    unmount,
)

from bpfdumpfs import Dumper, StateDir

PARAM = Path("/sys/module/fuse/parameters/enable_uring")


def possible_cpus() -> list[int]:
    lo, _, hi = Path("/sys/devices/system/cpu/possible").read_text().strip().partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def on_cpu(cpu: int, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["taskset", "-c", str(cpu), *argv], capture_output=True,
                          timeout=120, check=False)


def queue_threads(pid: int) -> dict[str, int]:
    """The tids of the daemon's io_uring queue threads, by name."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue  # a thread ended meanwhile
        if name.startswith("fuse-uring-"):
            out[name] = int(tid)
    return out


def queue_time(pid: int) -> dict[str, int]:
    """ns on CPU of each of the daemon's io_uring queue threads, by name."""
    out = {}
    for name, tid in queue_threads(pid).items():
        try:
            out[name] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except OSError:
            continue
    return out


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    need_kernel()
    need(PARAM.exists(), "a kernel with CONFIG_FUSE_IO_URING (fuse.enable_uring)")
    was = PARAM.read_text().strip()
    base = tmp_path_factory.mktemp("uring")
    state = mount_bpffs(base / "state")
    traversable(base)
    PARAM.write_text("Y")
    d = Daemon(base / "mnt", state, "--config-dir", str(base / "none"))
    try:
        d.start()
        with Dumper.load(bpf_objects("stable")["stable"]) as dumper:
            pin = dumper.pin(StateDir(state), "stable", mode=0o444)
        yield d, pin, d.mnt / "ksym" / "stable"
    finally:
        d.stop()
        PARAM.write_text(was)
        unmount(state)
    assert d.proc.returncode == 0, d.output()


def test_each_cpus_requests_are_served_by_its_own_queue(ring):
    d, pin, f = ring
    assert f"serving FUSE requests through io_uring: {len(possible_cpus())} queues" \
        in d.output(), d.output()
    want = pin.read_bytes()
    for cpu in cpus():
        before = queue_time(d.pid)
        for _ in range(20):
            p = on_cpu(cpu, "cat", str(f))
            assert (p.returncode, p.stdout) == (0, want), p.stderr
        after = queue_time(d.pid)
        grew = {q for q in after if after[q] - before.get(q, 0) > 0}
        assert f"fuse-uring-{cpu}" in grew, (cpu, before, after)


def test_reads_at_any_size_and_offset_are_the_pins_bytes(ring):
    d, pin, f = ring
    want = pin.read_bytes()
    p = subprocess.run(["head", "-n", "5", str(f)], capture_output=True, check=True)
    assert p.stdout == b"".join(want.splitlines(keepends=True)[:5])
    p = subprocess.run(["dd", f"if={f}", "bs=1", "count=3000", "status=none"],
                       capture_output=True, check=True)
    assert p.stdout == want[:3000]
    fd = os.open(f, os.O_RDONLY)
    try:
        for off in (0, 4096, 200_000, 7, len(want) - 10, len(want) + 5):
            assert os.pread(fd, 70_000, off) == want[off:off + 70_000], off
    finally:
        os.close(fd)
    p = subprocess.run(["tail", "-c", "1000", str(f)], capture_output=True, check=True)
    assert p.stdout == want[-1000:]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda i: read_all(f, 4096 if i % 2 else 1 << 20), range(32)))
    assert all(g == want for g in got), [len(g) for g in got if g != want]


def test_streams_on_one_cpu_do_not_stall_its_other_readers(ring):
    """Reads left with their producers hold their queue's entries: the queue takes more,
    so a small file read on the same CPU meanwhile is answered."""
    d, pin, f = ring
    ksyms = str(d.mnt / "ksym" / "kallsyms")
    want = Path(ksyms).read_bytes()
    cpu = cpus()[0]
    cats = [subprocess.Popen(["taskset", "-c", str(cpu), "cat", ksyms], stdout=subprocess.PIPE)
            for _ in range(12)]
    try:
        small = pin.read_bytes()
        for _ in range(5):
            p = on_cpu(cpu, "timeout", "10", "cat", str(f))
            assert (p.returncode, p.stdout == small) == (0, True), p.stderr
        outs = [c.communicate(timeout=120)[0] for c in cats]
    finally:
        for c in cats:
            c.kill()
    # kallsyms moves only when programs load; a mismatch must at least be a whole dump
    assert all(len(o) > len(want) // 2 and o.endswith(b"\n") for o in outs)


def test_readers_killed_mid_stream_free_their_seq_files(ring):
    d, pin, f = ring
    pid = d.pid
    base = settled_seq_fds(pid)
    ksyms = str(d.mnt / "ksym" / "kallsyms")
    cats = [subprocess.Popen(["taskset", "-c", str(cpus()[i % len(cpus())]), "cat", ksyms],
                             stdout=subprocess.PIPE) for i in range(8)]
    for c in cats:
        assert c.stdout.read(4096)  # reading, and waiting for the rest
    for c in cats:
        c.send_signal(signal.SIGKILL)
        c.wait()
        c.stdout.close()
    assert eventually(lambda: seq_fds(pid) == base, 10, step=0.05), \
        f"{seq_fds(pid) - base} seq_file(s) left 10 s after the cats were killed"


def test_the_tree_is_listed_changed_and_described_as_over_dev_fuse(ring):
    d, pin, f = ring
    p = subprocess.run(["ls", "-l", str(d.mnt / "ksym")], capture_output=True, text=True,
                       check=True)
    assert "stable" in p.stdout and "kallsyms" in p.stdout
    assert os.getxattr(f, "user.bpfdump.target") == b"ksym"
    os.chmod(f, 0o440)
    assert stat.S_IMODE(os.stat(pin).st_mode) == 0o440
    os.chmod(f, 0o444)
    assert b'dumper="ksym/stable"' in (d.mnt / ".stats").read_bytes()


def test_a_burst_of_streams_leaves_no_memory_behind(ring):
    d, pin, f = ring
    pid = d.pid
    ksyms = str(d.mnt / "ksym" / "kallsyms")
    read_all(ksyms, 1 << 20)  # warm up
    base = rss_kib(pid)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        assert all(len(x) > 1 << 20 for x in pool.map(lambda _: read_all(ksyms, 1 << 20),
                                                     range(32)))
    assert eventually(lambda: rss_kib(pid) < base + 8 * 1024, 10, step=0.1), \
        f"RSS {base} -> {rss_kib(pid)} KiB"


def test_busy_cpus_take_the_queues_out_of_sched_idle_and_readers_are_answered(ring):
    """On calm CPUs the queues run in SCHED_IDLE (readers stay on their CPU); as soon as
    tasks wait for a CPU they go back to the normal class, so a reader on a CPU that a
    busy loop also wants is answered as promptly as the loop lets it, not starved."""
    d, pin, f = ring
    pid = d.pid

    def policies() -> set[int]:
        return {os.sched_getscheduler(tid) for tid in queue_threads(pid).values()}

    assert eventually(lambda: policies() == {os.SCHED_IDLE}, 10, step=0.1), policies()
    want = pin.read_bytes()
    hogs = [subprocess.Popen(["taskset", "-c", str(cpu), "sh", "-c", "while :; do :; done"])
            for cpu in cpus() for _ in range(2)]
    try:
        assert eventually(lambda: policies() == {os.SCHED_OTHER}, 5, step=0.05), policies()
        for cpu in cpus():
            for _ in range(5):
                p = on_cpu(cpu, "timeout", "2", "cat", str(f))
                assert (p.returncode, p.stdout == want) == (0, True), p.stderr
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert eventually(lambda: policies() == {os.SCHED_IDLE}, 10, step=0.1), policies()


def test_without_cap_sys_nice_the_queues_keep_the_normal_class(ring, tmp_path):
    """Leaving SCHED_IDLE needs CAP_SYS_NICE: a daemon without it never enters it (it
    could not leave it when the CPUs get busy), says so, and serves as before."""
    d, pin, f = ring
    other = Daemon(tmp_path / "mnt", d.state, "--config-dir", str(tmp_path / "none"),
                   "--no-builtins", prefix=["setpriv", "--bounding-set=-sys_nice"])
    other.start()
    try:
        assert eventually(lambda: "the queues stay in the normal class" in other.output(), 10,
                          step=0.1), other.output()
        want = pin.read_bytes()
        assert (other.mnt / "ksym" / "stable").read_bytes() == want
        time.sleep(3)  # not a wait for state: longer than a calm that would move them
        tids = queue_threads(other.pid).values()
        assert tids and {os.sched_getscheduler(t) for t in tids} == {os.SCHED_OTHER}
    finally:
        other.stop()
    assert other.proc.returncode == 0, other.output()


def test_a_mount_over_io_uring_is_not_handed_over_and_ends_with_its_server(ring, tmp_path):
    """The kernel does not send again what a dead server's rings held, and requests queued
    for them may wait for good: a takeover is refused with why, and a server's death
    unmounts (ENOTCONN, not a hang) rather than serve on."""
    d, pin, f = ring
    other = Daemon(tmp_path / "mnt", d.state, "--config-dir", str(tmp_path / "none"),
                   "--no-builtins")
    other.start()
    try:
        assert eventually(lambda: "through io_uring" in other.output(), 10, step=0.05)
        p = subprocess.run([*other.command()], capture_output=True, text=True, timeout=60)
        assert p.returncode == 1
        assert p.stderr.strip().endswith(
            f"{other.mnt} is served over io_uring, which cannot be handed over: Device or "
            f"resource busy (EBUSY); stop its daemon first (fusermount3 -u {other.mnt}), "
            "then mount"), p.stderr
        assert (other.mnt / "ksym" / "stable").read_bytes() == pin.read_bytes()
        os.kill(other.pid, signal.SIGKILL)
        assert other.proc.wait(timeout=30) == 1  # a failure: systemd restarts it
        assert "cannot be served on" in other.output()
        assert fstype(other.mnt) is None
    finally:
        other.stop()
