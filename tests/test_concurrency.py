"""Many readers at once, slow dumpers, and readers that vanish mid-read."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import threading
import time

import pytest
from helpers import (
    bpf_objects,
    eventually,
    need_kernel,
    read_all,
    seq_fds,
    settled_seq_fds,
)

from bpfdumpfs import Dumper, StateDir
from bpfdumpfs.compile import compile_source


# Each task costs SPIN_MS of the CPU, measured with bpf_ktime_get_ns so it is slow on any
# machine: the dump takes about 3 s however many tasks there are (20 ms each at least),
# all of it inside read() calls the daemon cannot interrupt or poll. bpf_loop's bound
# (1 << 23 calls) is far more than that per task.
def threads() -> int:
    """The tasks a task iterator visits from here: every thread /proc shows."""
    n = 0
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            n += len(os.listdir(f"/proc/{p}/task"))
        except FileNotFoundError:
            pass  # gone meanwhile
    return n


SPIN_MS = max(20, 3000 // max(threads(), 1))
# Stays here, not in tests/bpf: its spin is computed from this host's thread count.
SLOW = r"""
#include "common.h"
const volatile __u64 spin_ns = SPIN_MS * 1000 * 1000;
static long spin(__u32 i, void *until) { return bpf_ktime_get_ns() >= *(__u64 *)until; }
SEC("iter/task")
int dump_slow(struct bpf_iter__task *ctx)
{
	struct task_struct *t = ctx->task;
	__u64 until = bpf_ktime_get_ns() + spin_ns;
	if (!t)
		return 0;
	bpf_loop(1 << 23, spin, &until, 0);
	/* numbered as the seq_file's pid namespace numbers it, as the test sees itself */
	BPF_SEQ_PRINTF(ctx->meta->seq, "%d\n", tgid_in(t, seq_pid_ns(ctx->meta->seq)));
	return 0;
}
""".replace("SPIN_MS", str(SPIN_MS))


def pinned(tree, obj: str, name: str):
    """OBJ pinned in the session's tree as NAME, readable by all; its pin's path."""
    with Dumper.load(obj) as dumper:
        return dumper.pin(StateDir(tree.state), name, mode=0o444)


@pytest.fixture(scope="module")
def slow(tree, tmp_path_factory):
    need_kernel()
    d = tmp_path_factory.mktemp("slow")
    (d / "slow.bpf.c").write_text(SLOW)
    pin = pinned(tree, compile_source(d / "slow.bpf.c", str(d)), "slow")
    yield tree.mnt / "task" / "slow"
    os.unlink(pin)


@pytest.fixture(scope="module")
def stable(tree):
    """tests/bpf/stable.bpf.c: half a megabyte, the same at every open."""
    pin = pinned(tree, bpf_objects("stable")["stable"], "stable")
    yield pin, tree.mnt / "ksym" / "stable"
    os.unlink(pin)


def test_64_concurrent_readers_get_the_same_bytes(stable):
    pin, f = stable
    want = pin.read_bytes()
    assert len(want) > 300_000
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        got = list(pool.map(lambda i: read_all(f, 4096 if i % 2 else 128 * 1024), range(64)))
    assert all(g == want for g in got), [len(g) for g in got if g != want]


def test_reads_that_grow_or_shrink_midstream_get_every_byte(stable):
    """Small reads start the read-ahead, then larger and smaller ones follow (as
    Python's readall and `less` do): each is answered, in order, to the end."""
    pin, f = stable
    want = pin.read_bytes()
    sizes = [4096] * 3 + [65536, 7, 100_000, 4096, 1 << 20]
    got = []

    def read() -> None:
        fd = os.open(f, os.O_RDONLY)
        try:
            while chunk := os.read(fd, sizes[min(len(got), len(sizes) - 1)]):
                got.append(chunk)
        finally:
            os.close(fd)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)
    assert not reader.is_alive(), f"read {len(got)} stuck for a minute"
    assert b"".join(got) == want
    assert len(got) >= len(sizes)  # every size was asked while output was left


def test_dumps_are_read_in_1mib_blocks_like_cat_reads_them(tree):
    """cat sizes its reads by st_blksize: 1 MiB, so a dump takes an eighth of the
    FUSE round trips of 128 KiB reads. Each such read is answered in full but the last."""
    pin = pinned(tree, bpf_objects("stable_half")["stable_half"], "stable_half")
    f = tree.mnt / "ksym" / "stable_half"
    want = pin.read_bytes()
    assert len(want) > 2 << 20
    bs = os.stat(f).st_blksize
    assert bs == 1 << 20
    fd = os.open(f, os.O_RDONLY)
    try:
        got = list(iter(lambda: os.read(fd, bs), b""))
    finally:
        os.close(fd)
    assert b"".join(got) == want
    assert [len(g) for g in got[:-1]] == [bs] * (len(got) - 1)
    assert subprocess.run(["cat", str(f)], capture_output=True, check=True).stdout == want
    os.unlink(pin)


def test_files_read_a_little_and_left_open_cost_no_thread_each(stable, tree):
    """Read-ahead threads are for readers that stream: 100 files each read once in
    small reads (a `less` showing its first screen) must not hold 100 threads."""
    pin, f = stable
    want = pin.read_bytes()
    tasks = f"/proc/{tree.pid}/task"
    base = len(os.listdir(tasks))
    fds = [os.open(f, os.O_RDONLY) for _ in range(100)]
    try:
        assert all(os.read(fd, 4096) == want[:4096] for fd in fds)
        assert len(os.listdir(tasks)) < base + 10
    finally:
        for fd in fds:
            os.close(fd)


def test_a_slow_dumper_does_not_stall_other_readers(slow, tree):
    pid = tree.pid
    base = settled_seq_fds(pid)
    t0 = time.monotonic()
    bg = subprocess.Popen(["cat", str(slow)], stdout=subprocess.PIPE)
    # its seq_file made: the dump, a kernel read that lasts seconds, is under way
    assert eventually(lambda: seq_fds(pid) > base, 10), "cat of the slow dumper never opened"
    latencies = []
    while bg.poll() is None and len(latencies) < 50:
        t = time.monotonic()
        assert read_all(tree.mnt / "task" / "tasks").startswith(b"    PID")
        latencies.append(time.monotonic() - t)
    out, _ = bg.communicate(timeout=120)
    slow_took = time.monotonic() - t0
    assert slow_took > 1.0, "the slow dumper should take seconds"
    assert str(os.getpid()).encode() in out.split()  # the whole dump, this process too
    assert len(latencies) >= 10
    assert max(latencies) < 0.5, f"small reads waited behind the slow one: {max(latencies):.2f}s"


def test_reader_killed_mid_read_frees_its_seq_file(slow, tree):
    pid = tree.pid
    base = settled_seq_fds(pid)
    reader = subprocess.Popen(["cat", str(slow)], stdout=subprocess.DEVNULL)
    assert eventually(lambda: seq_fds(pid) != base, 5, step=0.01), "the reader never opened"
    assert seq_fds(pid) == base + 1
    reader.send_signal(signal.SIGKILL)
    reader.wait()
    # The kernel read under way cannot be interrupted; the fd goes as soon as it returns.
    assert eventually(lambda: seq_fds(pid) == base, 30, step=0.05), \
        f"{seq_fds(pid) - base} seq_file(s) left 30 s after the reader was killed"


def test_streaming_readers_killed_while_their_read_waits_free_their_seq_files(slow, tree):
    """8 cats of the slow dumper share 2 CPUs, so each mostly waits for its producer, its
    READ left with it. SIGKILLed there, every seq_file is closed within seconds, and the
    tree serves on."""
    pid = tree.pid
    base = settled_seq_fds(pid)
    cats = [subprocess.Popen(["cat", str(slow)], stdout=subprocess.DEVNULL)
            for _ in range(8)]
    # every cat's open answered, and its dump under way: it reads, and waits
    assert eventually(lambda: seq_fds(pid) >= base + len(cats), 10), \
        f"{seq_fds(pid) - base} of {len(cats)} cats opened within 10 s"
    for c in cats:
        c.send_signal(signal.SIGKILL)
    for c in cats:
        c.wait()
    assert eventually(lambda: seq_fds(pid) == base, 10, step=0.05), \
        f"{seq_fds(pid) - base} seq_file(s) left 10 s after the cats were killed"
    assert read_all(tree.mnt / "task" / "tasks").startswith(b"    PID")


def test_head_on_a_huge_dump_frees_its_seq_file(tree):
    pid = tree.pid
    base = settled_seq_fds(pid)
    for _ in range(20):
        p = subprocess.run(f"head -c 300000 {tree.mnt}/ksym/kallsyms | wc -c", shell=True,
                           capture_output=True, text=True)
        assert p.stdout.strip() == "300000"
    assert eventually(lambda: seq_fds(pid) == base, 5, step=0.01), \
        f"{seq_fds(pid) - base} seq_file(s) left 5 s after the last head exited"
