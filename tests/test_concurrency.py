"""Many readers at once, slow dumpers, and readers that vanish mid-read."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import threading
import time

import pytest

from bpfdumpfs import Dumper, StateDir
from bpfdumpfs.compile import compile_source
from helpers import need_kernel
from test_tree import seq_fds


def settled_seq_fds(pid: int) -> int:
    """seq_fds once earlier tests' releases (sent asynchronously by the kernel) are in."""
    last = seq_fds(pid)
    while True:
        time.sleep(0.1)
        now = seq_fds(pid)
        if now == last:
            return now
        last = now

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


# Every tenth symbol of the core kernel (not modules, not BPF programs, which come
# and go): about half a megabyte that stays the same from one open to the next.
STABLE = r"""
#include "common.h"
SEC("iter/ksym")
int dump_stable(struct bpf_iter__ksym *ctx)
{
	struct kallsym_iter *it = ctx->ksym;
	if (!it || it->module_name[0] || ctx->meta->seq_num % 10)
		return 0;
	BPF_SEQ_PRINTF(ctx->meta->seq, "%llx %c %s\n", it->value, it->type, it->name);
	return 0;
}
"""
# Every other symbol: some 2.5 MB, more than two of cat's 1 MiB reads.
STABLE_HALF = STABLE.replace("% 10", "% 2")


def pinned(tree, tmp_path_factory, name: str, source: str):
    need_kernel()
    d = tmp_path_factory.mktemp(name)
    (d / f"{name}.bpf.c").write_text(source)
    obj = compile_source(d / f"{name}.bpf.c", str(d))
    with Dumper.load(obj) as dumper:
        path = dumper.pin(StateDir(tree.state), name, mode=0o444)
    return path


@pytest.fixture(scope="module")
def slow(tree, tmp_path_factory):
    pin = pinned(tree, tmp_path_factory, "slow", SLOW)
    yield tree.mnt / "task" / "slow"
    os.unlink(pin)


@pytest.fixture(scope="module")
def stable(tree, tmp_path_factory):
    pin = pinned(tree, tmp_path_factory, "stable", STABLE)
    yield pin, tree.mnt / "ksym" / "stable"
    os.unlink(pin)


def read_all(path, bs=64 * 1024) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, bs):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


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


def test_dumps_are_read_in_1mib_blocks_like_cat_reads_them(tree, tmp_path_factory):
    """cat sizes its reads by st_blksize: 1 MiB, so a dump takes an eighth of the
    FUSE round trips of 128 KiB reads. Each such read is answered in full but the last."""
    pin = pinned(tree, tmp_path_factory, "stable_half", STABLE_HALF)
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
    tasks = f"/proc/{tree.proc.pid}/task"
    base = len(os.listdir(tasks))
    fds = [os.open(f, os.O_RDONLY) for _ in range(100)]
    try:
        assert all(os.read(fd, 4096) == want[:4096] for fd in fds)
        assert len(os.listdir(tasks)) < base + 10
    finally:
        for fd in fds:
            os.close(fd)


def test_a_slow_dumper_does_not_stall_other_readers(slow, tree):
    t0 = time.monotonic()
    bg = subprocess.Popen(["cat", str(slow)], stdout=subprocess.PIPE)
    time.sleep(0.2)  # it is now inside a kernel read that lasts seconds
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
    pid = tree.proc.pid
    base = settled_seq_fds(pid)
    reader = subprocess.Popen(["cat", str(slow)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while seq_fds(pid) == base and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seq_fds(pid) == base + 1
    reader.send_signal(signal.SIGKILL)
    reader.wait()
    # The kernel read under way cannot be interrupted; the fd goes as soon as it returns.
    deadline = time.monotonic() + 30
    while seq_fds(pid) != base and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seq_fds(pid) == base


def test_streaming_readers_killed_while_their_read_waits_free_their_seq_files(slow, tree):
    """8 cats of the slow dumper share 2 CPUs, so each mostly waits for its producer, its
    READ left with it. SIGKILLed there, every seq_file is closed within seconds, and the
    tree serves on."""
    pid = tree.proc.pid
    base = settled_seq_fds(pid)
    cats = [subprocess.Popen(["cat", str(slow)], stdout=subprocess.DEVNULL)
            for _ in range(8)]
    time.sleep(0.3)
    assert seq_fds(pid) > base
    for c in cats:
        c.send_signal(signal.SIGKILL)
    for c in cats:
        c.wait()
    deadline = time.monotonic() + 10
    while seq_fds(pid) != base and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seq_fds(pid) == base
    assert read_all(tree.mnt / "task" / "tasks").startswith(b"    PID")


def test_head_on_a_huge_dump_frees_its_seq_file(tree):
    pid = tree.proc.pid
    base = settled_seq_fds(pid)
    for _ in range(20):
        p = subprocess.run(f"head -c 300000 {tree.mnt}/ksym/kallsyms | wc -c", shell=True,
                           capture_output=True, text=True)
        assert p.stdout.strip() == "300000"
    deadline = time.monotonic() + 5
    while seq_fds(pid) != base and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seq_fds(pid) == base
