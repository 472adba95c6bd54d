#!/usr/bin/env python3
"""bpfdumpfs benchmark: every figure a ratio measured side by side in one run.

    .venv/bin/python bench/bench.py [--quick] [--rounds N]

Mounts a private tree (private bpffs, temp mount point) and compares reads
through it with reads of the same pinned iterators straight from bpffs, and
bpfdumpfs's per-open overhead with lxcfs's (Debian package lxcfs; installed on
first use). Run as root, on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bpfdumpfs import Dumper, StateDir  # noqa: E402
from bpfdumpfs.builtins import object_path  # noqa: E402
from bpfdumpfs.compile import compile_source  # noqa: E402

# ~1.5 KB: the first 64 tasks, pid and comm.
SMALL = r"""
#include "common.h"
SEC("iter/task")
int dump_small(struct bpf_iter__task *ctx)
{
	struct task_struct *t = ctx->task;
	if (!t || ctx->meta->seq_num >= 64)
		return 0;
	BPF_SEQ_PRINTF(ctx->meta->seq, "%7d %s\n", t->pid, t->comm);
	return 0;
}
"""
# Seconds per open: every task spins in bpf_loop before its line.
SLOW = r"""
#include "common.h"
static long nop(__u32 i, void *ctx) { return 0; }
SEC("iter/task")
int dump_slow(struct bpf_iter__task *ctx)
{
	struct task_struct *t = ctx->task;
	if (!t)
		return 0;
	bpf_loop(1 << 21, nop, NULL, 0);
	BPF_SEQ_PRINTF(ctx->meta->seq, "%d\n", t->pid);
	return 0;
}
"""


def read_all(path: str, bs: int = 128 * 1024) -> int:
    fd = os.open(path, os.O_RDONLY)
    n = 0
    try:
        while chunk := os.read(fd, bs):
            n += len(chunk)
    finally:
        os.close(fd)
    return n


def per_open(path: str, n: int) -> float:
    """Seconds per open -> read to EOF -> close."""
    read_all(path)
    t = time.perf_counter()
    for _ in range(n):
        read_all(path)
    return (time.perf_counter() - t) / n


def throughput(path: str) -> float:
    """Bytes/s of one read to the end in the blocks `cat` uses: st_blksize, at least
    128 KiB (coreutils' io_blksize)."""
    bs = max(128 * 1024, os.stat(path).st_blksize)
    t = time.perf_counter()
    n = read_all(path, bs)
    return n / (time.perf_counter() - t)


def concurrent_cats(path: str, k: int) -> float:
    """Aggregate bytes/s of K `cat PATH` processes started together."""
    size = read_all(path)
    t = time.perf_counter()
    procs = [subprocess.Popen(["cat", path], stdout=subprocess.DEVNULL) for _ in range(k)]
    for p in procs:
        p.wait()
    return size * k / (time.perf_counter() - t)


def paired(fn, a, b, rounds: int) -> tuple[float, float, list[float]]:
    """Medians of FN(a) and FN(b), and the per-round ratios FN(b)/FN(a). Each round
    measures both back to back, the order alternating, because this VM's speed
    drifts (the same direct read varies by 40% over seconds): a ratio of two
    measurements made together is steadier than a ratio of two medians."""
    ra, rb = [], []
    for i in range(rounds):
        if i % 2:
            rb.append(fn(b))
            ra.append(fn(a))
        else:
            ra.append(fn(a))
            rb.append(fn(b))
    ratios = [y / x for x, y in zip(ra, rb, strict=True)]
    return statistics.median(ra), statistics.median(rb), ratios


def ratio_cells(ratios: list[float], goal: str) -> tuple[str, str]:
    """The table's cells for per-round RATIOS: their median against GOAL, and their
    middle half, which says how far one run's median may be trusted on a machine
    this noisy."""
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return (f"{statistics.median(ratios):.3f} (goal {goal})",
            f"{q1:.2f}-{q3:.2f} ({len(ratios)} rounds)")


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process PID, its ended threads included (utime and
    stime of /proc/PID/stat, in clock ticks: measured over whole sections, not rounds)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_row(what: str, seconds: float, per: float, unit: str, scale: float) -> tuple:
    """A row of the daemon's CPU time per unit of work: a figure that a busy or slow
    VM moves much less than it moves a wall-clock ratio."""
    return (f"daemon CPU per {what}, {unit}", "", f"{seconds / per * scale:.1f}", "",
            f"{seconds:.2f} s over {per:,.0f} {what.split()[0]}s")


def memory_kib(pids: list[int]) -> int:
    """The memory of processes PIDS together: the sum of their PSS, which counts a page
    the keeper and its server share (they fork) once, and a page of one alone whole."""
    total = 0
    for pid in pids:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                total += int(line.split()[1])
    return total


URING = Path("/sys/module/fuse/parameters/enable_uring")


class Mounted:
    def __init__(self, work: Path, io_uring: bool = False) -> None:
        self.state = work / "state"
        self.mnt = work / "mnt"
        self.state.mkdir()
        self.mnt.mkdir()
        subprocess.run(["mount", "-t", "bpf", "bpf", str(self.state)], check=True)
        self.log = open(work / "daemon.log", "wb")
        self.uring_was = URING.read_text().strip() if io_uring else ""
        if io_uring:
            URING.write_text("Y")  # the daemon's INIT then offers it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bpfdumpfs", "mount", str(self.mnt), "--state-dir",
             str(self.state), "--config-dir", str(work / "none")],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not (self.mnt / "ksym" / "kallsyms").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"daemon did not start; see {work / 'daemon.log'}")
            time.sleep(0.05)

    @property
    def pids(self) -> list[int]:
        """The daemon's processes: the keeper and the server it forked."""
        kids = open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read().split()
        return [self.proc.pid, *map(int, kids)]

    def cpu_seconds(self) -> float:
        return sum(map(cpu_seconds, self.pids))

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        if self.uring_was:  # kept while mounted: every command on the rings checks it
            URING.write_text(self.uring_was)
        subprocess.run(["umount", "-l", str(self.state)], check=False)


class Lxcfs:
    def __init__(self, work: Path) -> None:
        if not shutil.which("lxcfs"):
            subprocess.run(["apt-get", "install", "-y", "-qq", "lxcfs"], check=True,
                           stdout=subprocess.DEVNULL, env={**os.environ,
                                                           "DEBIAN_FRONTEND": "noninteractive"})
        self.dir = work / "lxcfs"
        self.dir.mkdir()
        self.proc = subprocess.Popen(["lxcfs", str(self.dir)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not (self.dir / "proc" / "uptime").exists():
            if time.monotonic() > deadline:
                raise SystemExit("lxcfs did not start")
            time.sleep(0.05)

    def close(self) -> None:
        subprocess.run(["fusermount3", "-u", str(self.dir)], check=False)
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (noisier)")
    ap.add_argument("--io-uring", action="store_true",
                    help="mount with fuse.enable_uring=Y (FUSE over io_uring; the parameter "
                    "is host-wide, and put back after the mount)")
    ap.add_argument("--rounds", type=int, metavar="N",
                    help="paired rounds of each ratio (default 15, three times that for the "
                    "large dump): more for a median that moves less from run to run")
    args = ap.parse_args()
    if args.rounds is not None and args.rounds < 2:
        ap.error("--rounds: at least 2, to have a middle half to print")
    rounds, opens = (5, 500) if args.quick else (15, 1000)
    rounds = args.rounds or rounds
    rows: list[tuple[str, str, str, str, str]] = []

    with tempfile.TemporaryDirectory(prefix="bpfdumpfs-bench-") as tmp:
        work = Path(tmp)
        m = Mounted(work, args.io_uring)
        lx = Lxcfs(work)
        try:
            state = StateDir(m.state)
            for name, src in (("small", SMALL), ("slow", SLOW)):
                (work / f"{name}.bpf.c").write_text(src)
                with Dumper.load(compile_source(work / f"{name}.bpf.c", str(work))) as d:
                    d.pin(state, name, mode=0o444)
            big_pin, big = str(m.state / "ksym/kallsyms"), str(m.mnt / "ksym/kallsyms")
            small_pin, small = str(m.state / "task/small"), str(m.mnt / "task/small")
            size_big, size_small = read_all(big_pin), read_all(small_pin)

            # 1. large dump throughput: a round is a fraction of a second, and a pair
            # varies by +-10%, so three times the rounds for a steadier median
            cpu = m.cpu_seconds()
            d_bps, m_bps, ratios = paired(throughput, big_pin, big, 3 * rounds)
            cpu_big = m.cpu_seconds() - cpu, 3 * rounds * size_big / 1e6
            rows.append((f"large dump ({size_big / 1e6:.1f} MB kallsyms), MB/s",
                         f"{d_bps / 1e6:.1f}", f"{m_bps / 1e6:.1f}",
                         *ratio_cells(ratios, ">= 0.95")))

            # 2. small dump: per-open overhead vs lxcfs's
            for _ in range(5):
                read_all(small)  # let the daemon learn it is quick
            # a round measures both overheads together, the order alternating
            d_t, m_t, p_t, l_t = [], [], [], []
            lx_uptime = str(lx.dir / "proc/uptime")
            cpu = m.cpu_seconds()
            for i in range(rounds):
                for direct, mounted, ds, ms in ((small_pin, small, d_t, m_t),
                                                ("/proc/uptime", lx_uptime, p_t, l_t)):
                    runs = [(direct, ds), (mounted, ms)]
                    for path, out in (runs if i % 2 else runs[::-1]):
                        out.append(per_open(path, opens))
            cpu_small = m.cpu_seconds() - cpu, rounds * (opens + 1)
            ours, theirs = ([(m - d) * 1e6 for d, m in zip(*xs, strict=True)]
                            for xs in ((d_t, m_t), (p_t, l_t)))
            med = statistics.median
            rows.append((f"small dump ({size_small} B): open-read-close, us",
                         f"{med(d_t) * 1e6:.0f}", f"{med(m_t) * 1e6:.0f}",
                         f"overhead {med(ours):.0f} us", ""))
            rows.append(("lxcfs proc/uptime vs /proc/uptime, us", f"{med(p_t) * 1e6:.0f}",
                         f"{med(l_t) * 1e6:.0f}", f"overhead {med(theirs):.0f} us", ""))
            rows.append(("per-open overhead, bpfdumpfs / lxcfs", "", "",
                         *ratio_cells([o / t for o, t in zip(ours, theirs, strict=True)], "< 1")))
            rows.append(cpu_row("open (small dump)", *cpu_small, "us", 1e6))

            # 3. 32 concurrent readers of the large dump: the noisiest figure, so as
            # many rounds as the small dump's (a round is ~4 s)
            cpu = m.cpu_seconds()
            d_agg, m_agg, ratios = paired(lambda p: concurrent_cats(p, 32), big_pin, big,
                                          rounds)
            cpu_32 = m.cpu_seconds() - cpu, rounds * 33 * size_big / 1e6
            rows.append(("32 concurrent readers, aggregate MB/s", f"{d_agg / 1e6:.1f}",
                         f"{m_agg / 1e6:.1f}", *ratio_cells(ratios, ">= 0.9")))
            rows.append(cpu_row("MB (large dump, one reader)", *cpu_big, "ms", 1e3))
            rows.append(cpu_row("MB (32 readers)", *cpu_32, "ms", 1e3))

            # 4. fairness: small-dump latency while a slow dumper streams
            def latencies(n: int) -> list[float]:
                out = []
                for _ in range(n):
                    t = time.perf_counter()
                    read_all(small)
                    out.append(time.perf_counter() - t)
                return out
            idle = p99(latencies(opens))
            stop = threading.Event()

            def stream_slow() -> None:
                while not stop.is_set():
                    read_all(str(m.mnt / "task/slow"))
            bg = threading.Thread(target=stream_slow)
            bg.start()
            time.sleep(0.3)
            busy = p99(latencies(opens))
            stop.set()
            bg.join()
            rows.append(("small-dump p99 latency, idle vs slow dumper streaming, us",
                         f"{idle * 1e6:.0f}", f"{busy * 1e6:.0f}",
                         f"{busy / idle:.2f} (goal <= 2)", ""))

            # 5. RSS with 1,000 dumpers and 200 open handles
            with Dumper.load(object_path("tasks")) as d:
                for i in range(1000):
                    d.pin(state, f"t{i:04d}", mode=0o444)
            base_rss = memory_kib(m.pids)
            fds = []
            for i in range(200):
                fd = os.open(str(m.mnt / f"task/t{i:04d}"), os.O_RDONLY)
                os.read(fd, 1)
                fds.append(fd)
            rss = memory_kib(m.pids)
            for fd in fds:
                os.close(fd)
            rows.append(("daemon memory (PSS, keeper + server), 1,000 dumpers + 200 open "
                         "handles, MiB",
                         f"{base_rss / 1024:.1f} (no handles)", f"{rss / 1024:.1f}",
                         "goal <= 64", ""))

            # 6. ls -l of a target holding 10,000 dumpers
            with Dumper.load(object_path("tasks")) as d:
                for i in range(1000, 10000):
                    d.pin(state, f"t{i:04d}", mode=0o444)
            times = []
            for _ in range(3):
                t = time.perf_counter()
                subprocess.run(["ls", "-l", str(m.mnt / "task")], stdout=subprocess.DEVNULL,
                               check=True)
                times.append(time.perf_counter() - t)
            t = time.perf_counter()
            subprocess.run(["ls", "-l", str(m.state / "task")], stdout=subprocess.DEVNULL,
                           check=True)
            direct_ls = time.perf_counter() - t
            rows.append(("ls -l of a target with 10,000 dumpers, s (first, median of 3)",
                         f"{direct_ls:.2f} (bpffs)",
                         f"{times[0]:.2f}, {statistics.median(times):.2f}",
                         "goal <= 1", ""))
        finally:
            lx.close()
            m.close()

    head = ("measure", "direct", "bpfdumpfs", "ratio", "middle half of the rounds' ratios")
    w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    print(" | ".join(h.ljust(w[i]) for i, h in enumerate(head)))
    print("-|-".join("-" * x for x in w))
    for r in rows:
        print(" | ".join(c.ljust(w[i]) for i, c in enumerate(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
