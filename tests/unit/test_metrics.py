"""MOUNT/.stats as a scraper reads it: Metrics.render() after some opens, reads,
errors and closes, parsed by prometheus_client's strict OpenMetrics parser (which
refuses a missing # EOF, a bad escape, a counter without _total, histogram buckets
out of order...). node_exporter's textfile collector takes what it takes."""
from __future__ import annotations

import errno
import os
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfdumpfs import __version__
from bpfdumpfs.metrics import BUCKETS, Metrics

parser = pytest.importorskip("prometheus_client.openmetrics.parser")

# every character OpenMetrics escapes, a comma, which ends a label if unquoted, and
# backslashes before 'n' and '"', which would read back as escapes if not escaped
WEIRD = '/run/bpf,dump "quoted" C:\\new \\" \\\\ end\nline 2'


def parse(m: Metrics, read_ahead: int = 0, helpers: int = 0, net_threads: int = 0) -> dict:
    """The families of M's text by name, each {"type", "unit", "samples": {(name,
    labels as sorted tuple): value}}; the parser raises on anything not OpenMetrics."""
    text = m.render(read_ahead, helpers, net_threads).decode()
    families = {}
    for f in parser.text_string_to_metric_families(text):
        samples = {}
        for s in f.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"sample {key} given twice"
            samples[key] = s.value
        families[f.name] = {"type": f.type, "unit": f.unit, "samples": samples}
    return families


def value(families: dict, family: str, sample: str, **labels) -> float:
    return families[family]["samples"][(sample, tuple(sorted(labels.items())))]


def test_a_fresh_daemon_is_described_and_valid():
    """Before any open: the daemon's info (version, mount point, state dir, pid), its
    start time, read-ahead and helpers; per-dumper families present and empty."""
    before = time.time()
    m = Metrics("/mnt/bpf", "/sys/fs/bpf/bpfdumpfs")
    after = time.time()
    f = parse(m, read_ahead=12345, helpers=2, net_threads=3)
    assert value(f, "bpfdumpfs_info", "bpfdumpfs_info", version=__version__,
                 mountpoint="/mnt/bpf", state_dir="/sys/fs/bpf/bpfdumpfs",
                 pid=str(os.getpid())) == 1
    start = value(f, "bpfdumpfs_start_time_seconds", "bpfdumpfs_start_time_seconds")
    assert before - 0.001 <= start <= after + 0.001
    assert f["bpfdumpfs_start_time_seconds"]["unit"] == "seconds"
    assert value(f, "bpfdumpfs_read_ahead_bytes", "bpfdumpfs_read_ahead_bytes") == 12345
    assert f["bpfdumpfs_read_ahead_bytes"]["unit"] == "bytes"
    assert value(f, "bpfdumpfs_namespace_helpers", "bpfdumpfs_namespace_helpers",
                 kind="pid") == 2
    assert value(f, "bpfdumpfs_namespace_helpers", "bpfdumpfs_namespace_helpers",
                 kind="net") == 3
    for name, kind in [("bpfdumpfs_opens", "counter"), ("bpfdumpfs_read_bytes", "counter"),
                       ("bpfdumpfs_open_handles", "gauge"), ("bpfdumpfs_errors", "counter"),
                       ("bpfdumpfs_read_seconds", "histogram"),
                       ("bpfdumpfs_builtin_unavailable", "gauge")]:
        assert f[name]["type"] == kind and f[name]["samples"] == {}, name


def test_opens_reads_errors_and_closes_per_dumper():
    """Counters and gauges per dumper label, after what the daemon would count."""
    m = Metrics("/mnt/bpf", "/state")
    for _ in range(3):
        m.opened("task/tasks")
    m.closed("task/tasks")
    m.opened("ksym/ksyms")
    m.closed("ksym/ksyms")
    m.read("task/tasks", 4096, 0.0002)
    m.read("task/tasks", 100, 0.003)
    m.error("task/tasks", errno.EACCES)
    m.error("task/tasks", errno.EACCES)
    m.error("task/tasks", errno.E2BIG)
    m.error("bpf_map/maps", 9999)  # an errno Python has no name for: counted by number
    f = parse(m)
    assert f["bpfdumpfs_opens"]["samples"] == {
        ("bpfdumpfs_opens_total", (("dumper", "ksym/ksyms"),)): 1,
        ("bpfdumpfs_opens_total", (("dumper", "task/tasks"),)): 3,
        ("bpfdumpfs_opens_total", (("dumper", "bpf_map/maps"),)): 0}
    assert value(f, "bpfdumpfs_open_handles", "bpfdumpfs_open_handles",
                 dumper="task/tasks") == 2
    assert value(f, "bpfdumpfs_open_handles", "bpfdumpfs_open_handles",
                 dumper="ksym/ksyms") == 0
    assert value(f, "bpfdumpfs_read_bytes", "bpfdumpfs_read_bytes_total",
                 dumper="task/tasks") == 4196
    assert f["bpfdumpfs_errors"]["samples"] == {
        ("bpfdumpfs_errors_total", (("dumper", "task/tasks"), ("errno", "E2BIG"))): 1,
        ("bpfdumpfs_errors_total", (("dumper", "task/tasks"), ("errno", "EACCES"))): 2,
        ("bpfdumpfs_errors_total", (("dumper", "bpf_map/maps"), ("errno", "9999"))): 1}


def test_read_latency_histogram_is_cumulative_with_le_inclusive():
    """Each read is counted in every bucket whose bound it does not exceed (a read of
    exactly a bound is in that bucket), and in +Inf; _count and _sum agree."""
    m = Metrics("/mnt/bpf", "/state")
    times = [0.00001, 0.001, 0.0011, 0.3, 60.0]
    for t in times:
        m.read("task/tasks", 1, t)
    f = parse(m)["bpfdumpfs_read_seconds"]
    assert f["type"] == "histogram" and f["unit"] == "seconds"
    buckets = {float(dict(labels)["le"]): n for (name, labels), n in f["samples"].items()
               if name == "bpfdumpfs_read_seconds_bucket"}
    assert sorted(buckets) == [*BUCKETS, float("inf")]
    for le, n in buckets.items():
        assert n == sum(t <= le for t in times), le
    label = (("dumper", "task/tasks"),)
    assert f["samples"][("bpfdumpfs_read_seconds_count", label)] == len(times)
    assert f["samples"][("bpfdumpfs_read_seconds_sum", label)] == pytest.approx(sum(times))


def test_label_values_with_commas_quotes_backslashes_and_newlines_survive():
    """Mount point, state dir, built-in names and reasons, and dumper labels come back
    from a strict parser exactly as they were: every label value is escaped."""
    m = Metrics(WEIRD, WEIRD + "/state", {"task/x": f'needs "{WEIRD}"'})
    m.opened(WEIRD)
    m.read(WEIRD, 10, 0.01)
    m.error(WEIRD, errno.EIO)
    f = parse(m)
    info = dict(next(iter(f["bpfdumpfs_info"]["samples"]))[1])
    assert info["mountpoint"] == WEIRD and info["state_dir"] == WEIRD + "/state"
    assert value(f, "bpfdumpfs_builtin_unavailable", "bpfdumpfs_builtin_unavailable",
                 builtin="task/x", reason=f'needs "{WEIRD}"') == 1
    assert value(f, "bpfdumpfs_opens", "bpfdumpfs_opens_total", dumper=WEIRD) == 1
    assert value(f, "bpfdumpfs_errors", "bpfdumpfs_errors_total", dumper=WEIRD,
                 errno="EIO") == 1
    assert value(f, "bpfdumpfs_read_seconds", "bpfdumpfs_read_seconds_count",
                 dumper=WEIRD) == 1


# text the daemon can be given: any str that encodes as UTF-8 (argv and paths with
# bytes that are not UTF-8 decode to lone surrogates; see the report on that)
label_text = st.text(st.one_of(st.sampled_from('\\"\n,={}# n'),
                               st.characters(blacklist_categories=("Cs",))), max_size=40)


@settings(max_examples=150, deadline=None, database=None)
@given(mountpoint=label_text, state_dir=label_text, reason=label_text, dumper=label_text)
def test_any_label_text_round_trips(mountpoint: str, state_dir: str, reason: str,
                                    dumper: str):
    m = Metrics(mountpoint, state_dir, {"t/b": reason})
    m.opened(dumper)
    f = parse(m)
    info = dict(next(iter(f["bpfdumpfs_info"]["samples"]))[1])
    assert (info["mountpoint"], info["state_dir"]) == (mountpoint, state_dir)
    assert value(f, "bpfdumpfs_builtin_unavailable", "bpfdumpfs_builtin_unavailable",
                 builtin="t/b", reason=reason) == 1
    assert value(f, "bpfdumpfs_opens", "bpfdumpfs_opens_total", dumper=dumper) == 1


def test_counts_from_many_threads_are_not_lost():
    """The device's threads and trio's count at once: no increment is lost."""
    m = Metrics("/mnt/bpf", "/state")

    def work():
        for _ in range(2000):
            m.opened("task/tasks")
            m.read("task/tasks", 3, 0.0001)
            m.closed("task/tasks")
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    f = parse(m)
    assert value(f, "bpfdumpfs_opens", "bpfdumpfs_opens_total", dumper="task/tasks") == 16000
    assert value(f, "bpfdumpfs_read_bytes", "bpfdumpfs_read_bytes_total",
                 dumper="task/tasks") == 48000
    assert value(f, "bpfdumpfs_open_handles", "bpfdumpfs_open_handles",
                 dumper="task/tasks") == 0
