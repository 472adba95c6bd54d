"""What the daemon counts: opens, bytes, errors by errno, open handles and read
latency, per dumper. Served as OpenMetrics text in MOUNT/.stats (for Prometheus and
node_exporter's textfile collector) and, summed up, as JSON in the mount root's
xattr user.bpfdump.status (for `bpfdumpfs status`)."""
from __future__ import annotations

import errno as errno_names
import os
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from . import __version__, core

STATUS_XATTR = b"user.bpfdump.status"  # of the mount root: status(), as JSON

# read latency buckets, seconds: a FUSE read from 20 us (small) to seconds (slow)
BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
           0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
core.set_buckets(BUCKETS)


@dataclass
class _Dumper:
    # opens, bytes, open files and read latency: counted in C too (core.py)
    stats: core.Stats = field(default_factory=core.Stats)
    errors: Counter = field(default_factory=Counter)      # errno name -> count


class Metrics:
    def __init__(self, mountpoint: str, state_dir: str,
                 unavailable: dict[str, str] | None = None) -> None:
        self.mountpoint, self.state_dir = mountpoint, state_dir
        self.unavailable = dict(unavailable or {})  # built-in TARGET/NAME -> why not served
        self.started = time.time()
        self.by_dumper: dict[str, _Dumper] = defaultdict(_Dumper)
        self.lock = threading.Lock()  # counted from the device's threads and trio's

    def stats(self, dumper: str) -> core.Stats:
        """DUMPER's counters, for C to count in too (core.publish)."""
        with self.lock:
            return self.by_dumper[dumper].stats

    def opened(self, dumper: str) -> None:
        self.stats(dumper).opened()

    def closed(self, dumper: str) -> None:
        self.stats(dumper).closed()

    def read(self, dumper: str, nbytes: int, seconds: float) -> None:
        self.stats(dumper).read(nbytes, seconds)

    def error(self, dumper: str, err: int) -> None:
        with self.lock:
            self.by_dumper[dumper].errors[errno_names.errorcode.get(err, str(err))] += 1

    def status(self) -> dict:
        """The daemon and its totals, as `bpfdumpfs status --json` shows them."""
        with self.lock:
            rows = list(self.by_dumper.values())
            return {"mountpoint": self.mountpoint, "state_dir": self.state_dir,
                    "version": __version__, "pid": os.getpid(), "keeper": os.getppid(),
                    "since": self.started,
                    "handles": sum(d.stats.handles for d in rows),
                    "opens": sum(d.stats.opens for d in rows),
                    "errors": sum(sum(d.errors.values()) for d in rows),
                    "unavailable": dict(sorted(self.unavailable.items()))}

    def render(self, read_ahead: int, helpers: int = 0, net_threads: int = 0) -> bytes:
        """OpenMetrics text; READ_AHEAD is what all streams hold ahead now, in bytes;
        HELPERS and NET_THREADS, the pid-namespace helpers and network-namespace threads
        running now."""
        out = [
            "# TYPE bpfdumpfs_info gauge",
            "# HELP bpfdumpfs_info The daemon: version, mount point, state dir, pid.",
            f'bpfdumpfs_info{{version="{__version__}",mountpoint="{_esc(self.mountpoint)}",'
            f'state_dir="{_esc(self.state_dir)}",pid="{os.getpid()}"}} 1',
            "# TYPE bpfdumpfs_start_time_seconds gauge",
            "# UNIT bpfdumpfs_start_time_seconds seconds",
            f"bpfdumpfs_start_time_seconds {self.started:.3f}",
            "# TYPE bpfdumpfs_read_ahead_bytes gauge",
            "# UNIT bpfdumpfs_read_ahead_bytes bytes",
            ("# HELP bpfdumpfs_read_ahead_bytes Read from the kernel ahead of their readers, "
             "all streams (limit: read_ahead_mib)."),
            f"bpfdumpfs_read_ahead_bytes {read_ahead}",
            "# TYPE bpfdumpfs_namespace_helpers gauge",
            ("# HELP bpfdumpfs_namespace_helpers What makes seq_files in readers' namespaces: "
             "pid-namespace helper processes and network-namespace threads."),
            f'bpfdumpfs_namespace_helpers{{kind="pid"}} {helpers}',
            f'bpfdumpfs_namespace_helpers{{kind="net"}} {net_threads}',
            "# TYPE bpfdumpfs_builtin_unavailable gauge",
            ("# HELP bpfdumpfs_builtin_unavailable A built-in dumper this kernel does not "
             "serve, and why."),
        ]
        out += [f'bpfdumpfs_builtin_unavailable{{builtin="{_esc(name)}",reason="{_esc(why)}"}} 1'
                for name, why in sorted(self.unavailable.items())]
        with self.lock:
            rows = sorted((k, _Row(v)) for k, v in self.by_dumper.items())
        families = [
            ("opens", "counter", "opens of the dumper", lambda d: [("", d.opens)]),
            ("read_bytes", "counter", "bytes read from the dumper",
             lambda d: [("", d.bytes)]),
            ("open_handles", "gauge", "open files of the dumper", lambda d: [("", d.handles)]),
            ("errors", "counter", "failed opens and reads, by errno",
             lambda d: [(f',errno="{e}"', n) for e, n in sorted(d.errors.items())]),
        ]
        for name, kind, text, values in families:
            metric = f"bpfdumpfs_{name}"
            out += [f"# TYPE {metric} {kind}", f"# HELP {metric} {text.capitalize()}."]
            suffix = "_total" if kind == "counter" else ""
            for dumper, d in rows:
                for extra, n in values(d):
                    out.append(f'{metric}{suffix}{{dumper="{_esc(dumper)}"{extra}}} {n}')
        metric = "bpfdumpfs_read_seconds"
        out += [f"# TYPE {metric} histogram", f"# UNIT {metric} seconds",
                f"# HELP {metric} Time to answer one FUSE read."]
        for dumper, d in rows:
            label = f'dumper="{_esc(dumper)}"'
            total = 0
            for le, n in zip((*BUCKETS, "+Inf"), d.latency, strict=True):
                total += n
                out.append(f'{metric}_bucket{{{label},le="{le}"}} {total}')
            out.append(f"{metric}_count{{{label}}} {total}")
            out.append(f"{metric}_sum{{{label}}} {d.latency_sum:.6f}")
        out.append("# EOF")
        return ("\n".join(out) + "\n").encode()


class _Row:
    """One dumper's counters, read once (C may count on meanwhile)."""

    def __init__(self, d: _Dumper) -> None:
        s = d.stats
        self.opens, self.bytes, self.handles = s.opens, s.bytes, s.handles
        self.latency, self.latency_sum = s.latency(len(BUCKETS)), s.latency_sum
        self.errors = Counter(d.errors)


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
