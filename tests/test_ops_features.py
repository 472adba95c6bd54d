"""What operators use: MOUNT/.stats, `bpfdumpfs status`, and the limits."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import time

import pytest
from helpers import (
    ROOT,
    TASKS_OBJ,
    Daemon,
    bpf_objects,
    bpfdumpfs,
    eventually,
    mount_bpffs,
    readline,
    rss_kib,
    settled,
    traversable,
    unmount,
)

from bpfdumpfs import Dumper, StateDir

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def daemon(tmp_path, request):
    state = mount_bpffs(tmp_path / "state")
    args = getattr(request, "param", ())
    traversable(tmp_path)
    d = Daemon(tmp_path / "mnt", state, "--config-dir", str(tmp_path / "none"), *args).start()
    yield d
    d.stop()
    unmount(state)


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{want}}} not in .stats")


def test_stats_count_opens_bytes_handles_errors(daemon):
    stats = daemon.mnt / ".stats"
    assert oct(os.stat(stats).st_mode & 0o777) == "0o444"
    data = (daemon.mnt / "task" / "tasks").read_bytes()
    f = open(daemon.mnt / "ksym" / "kallsyms", "rb")
    f.read(100)
    text = stats.read_text()
    assert text.endswith("# EOF\n")
    assert metric(text, "bpfdumpfs_opens_total", dumper="task/tasks") == 1
    assert metric(text, "bpfdumpfs_read_bytes_total", dumper="task/tasks") == len(data)
    assert metric(text, "bpfdumpfs_open_handles", dumper="task/tasks") == 0
    assert metric(text, "bpfdumpfs_open_handles", dumper="ksym/kallsyms") == 1
    count = metric(text, "bpfdumpfs_read_seconds_count", dumper="task/tasks")
    assert count >= 1
    assert metric(text, "bpfdumpfs_read_seconds_bucket", dumper="task/tasks", le="+Inf") == count
    f.close()
    # every line is OpenMetrics text: comments, or name{labels} value
    for line in text.splitlines():
        assert line.startswith("#") or re.fullmatch(r"[a-z_]+(\{.*\})? [0-9.e+-]+", line), line


def test_status_shows_where_since_when_and_how_busy(daemon):
    (daemon.mnt / "task" / "tasks").read_bytes()
    p = bpfdumpfs("status", str(daemon.mnt))
    lines = p.stdout.splitlines()
    assert lines[0].startswith(f"{daemon.mnt}: served by pid {daemon.pid} since ")
    assert f"state dir   {daemon.state}" in p.stdout
    assert re.search(r"dumpers     1[0-9]\n", p.stdout)
    assert "opens       1\n" in p.stdout and "errors      0" in p.stdout
    p = bpfdumpfs("status", str(daemon.mnt / "nope"), check=False)
    assert p.returncode == 1 and "reading" in p.stderr and "Traceback" not in p.stderr


def test_status_names_a_mount_point_with_a_comma_and_a_quote_whole(tmp_path):
    """status reads the daemon's own JSON, not .stats' labels parsed back: a mount point
    that OpenMetrics must escape comes back as it is, found with or without naming it."""
    state = mount_bpffs(tmp_path / "state")
    traversable(tmp_path)
    d = Daemon(tmp_path / 'bpf,dump"x', state, "--config-dir", str(tmp_path / "none")).start()
    try:
        (d.mnt / "task" / "tasks").read_bytes()
        named = json.loads(bpfdumpfs("status", str(d.mnt), "--json").stdout)
        assert [(r["mountpoint"], r["pid"], r["opens"]) for r in named] == \
            [(str(d.mnt), d.pid, 1)]
        every = json.loads(bpfdumpfs("status", "--json").stdout)
        assert str(d.mnt) in [r["mountpoint"] for r in every]
        assert f"{d.mnt}: served by pid {d.pid}" in bpfdumpfs("status", str(d.mnt)).stdout
    finally:
        d.stop()
        unmount(state)


@pytest.mark.parametrize("daemon", [("--max-handles", "3", "--max-handles-per-uid", "2")],
                         indirect=True)
def test_handle_limits_refuse_with_emfile_and_enfile(daemon):
    f = daemon.mnt / "task" / "tasks"
    held = [open(f, "rb"), open(f, "rb")]
    nobody = None
    try:
        with pytest.raises(OSError) as e:
            open(f, "rb")
        assert e.value.errno == errno.EMFILE   # root has its 2
        # another user may still open one, up to the total of 3 ...
        nobody = subprocess.Popen([*NOBODY, "sh", "-c", f"exec 3<{f}; echo held; sleep 30"],
                                  stdout=subprocess.PIPE)
        assert readline(nobody.stdout, what="nobody's open") == b"held\n"
        # ... and then no more
        p = subprocess.run([*NOBODY, "cat", str(f)], capture_output=True, text=True)
        assert p.returncode == 1 and "Too many open files in system" in p.stderr
    finally:
        if nobody:
            nobody.kill()
            nobody.wait()
        for h in held:
            h.close()
    log = daemon.output()
    assert "the limit (max_handles_per_uid)" in log and "the limit (max_handles)" in log
    text = (daemon.mnt / ".stats").read_text()
    assert metric(text, "bpfdumpfs_errors_total", dumper="task/tasks", errno="EMFILE") >= 1
    assert metric(text, "bpfdumpfs_errors_total", dumper="task/tasks", errno="ENFILE") >= 1


@pytest.mark.parametrize("daemon", [("--max-handles-per-uid", "2",)], indirect=True)
def test_a_seq_file_the_daemon_cannot_make_fails_the_open_says_why_and_frees_its_count(daemon):
    """Out of file descriptors (RLIMIT_NOFILE), the daemon cannot make a seq_file. The
    data plane (core.c) then passes the open to Python, which fails it with EIO: `cat`
    says "Input/output error"; the log names the dumper and the kernel's reason; and
    each failed open gives its count back (the limit here is 2 files per user)."""
    f = daemon.mnt / "task" / "tasks"
    first = f.read_bytes()  # now its link is cached: opens take the data plane's path
    pid = daemon.pid
    limit = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (0, limit[1]))  # no new fd at all
    try:
        for _ in range(2):
            with pytest.raises(OSError) as e:
                os.open(f, os.O_RDONLY)
            assert e.value.errno == errno.EIO
            p = subprocess.run(["cat", str(f)], capture_output=True, text=True, timeout=30)
            assert (p.returncode, p.stdout, p.stderr) == (
                1, "", f"cat: {f}: Input/output error\n")
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limit)
    held = [open(f, "rb"), open(f, "rb")]  # both counts came back
    try:
        assert held[0].read(64) == first[:64]
    finally:
        for h in held:
            h.close()
    log = daemon.output()
    assert log.count("opening dumper task/tasks: Too many open files (EMFILE); the process has "
                     "all the files open that RLIMIT_NOFILE allows") == 4, log
    text = (daemon.mnt / ".stats").read_text()
    assert metric(text, "bpfdumpfs_errors_total", dumper="task/tasks", errno="EIO") == 4
    assert metric(text, "bpfdumpfs_open_handles", dumper="task/tasks") == 0


@pytest.mark.parametrize("nofile", ["64:20000", "256:256"])
def test_the_daemon_holds_the_files_its_limits_allow_whatever_its_soft_fd_limit(tmp_path,
                                                                               nofile):
    """A systemd service starts with a soft RLIMIT_NOFILE of 1024: the daemon raises it
    to the hard limit, so max_handles decides how many files may be open. A hard
    limit below what max_handles needs is named at start."""
    soft, hard = map(int, nofile.split(":"))
    state = mount_bpffs(tmp_path / "state")
    d = Daemon(tmp_path / "mnt", state, "--config-dir", str(tmp_path / "none"),
               prefix=["prlimit", f"--nofile={nofile}", "--"]).start()
    try:
        f = d.mnt / "task" / "tasks"
        held = [open(f, "rb") for _ in range(2 * soft if soft < hard else 100)]
        try:
            heads = {h.read(32) for h in held}
            assert len(heads) == 1 and heads.pop().strip()
        finally:
            for h in held:
                h.close()
        limits = open(f"/proc/{d.pid}/limits").read()
        assert re.search(rf"Max open files +{hard} +{hard} ", limits), limits
        warned = f"RLIMIT_NOFILE is {hard}, and max_handles (4096) with the link cache"
        assert (warned in d.output()) == (hard == 256), d.output()
    finally:
        d.stop()
        unmount(state)


# N threads open FILE at once and hold what they get: "opened K refused M ERRNOS"
CONCURRENT_OPENS = """
import os, sys, threading
n = int(sys.argv[2]); start = threading.Barrier(n); got = []; errs = []
def one():
    start.wait()
    try:
        got.append(os.open(sys.argv[1], os.O_RDONLY))
    except OSError as e:
        errs.append(e.errno)
threads = [threading.Thread(target=one) for _ in range(n)]
[t.start() for t in threads]
[t.join() for t in threads]
print("opened", len(got), "refused", len(errs), sorted(set(errs)))
"""


@pytest.mark.parametrize("daemon", [("--max-handles-per-uid", "4",)], indirect=True)
def test_concurrent_opens_from_a_container_stay_within_the_per_user_limit(daemon):
    """An open from another network namespace waits while its seq_file is made there, so
    opens that checked the limit first and counted themselves after all got past it
    together: 12-16 of 16 at once, against a limit of 4. Each is counted before it waits."""
    f = daemon.mnt / "tcp" / "tcp"

    def stats(name: str, **labels) -> float:
        return metric((daemon.mnt / ".stats").read_text(), name, dumper="tcp/tcp", **labels)
    for _ in range(3):  # and again: each refusal, and each close, gave its count back
        p = subprocess.run(["unshare", "--net", *NOBODY, "/usr/bin/python3", "-c",
                            CONCURRENT_OPENS, str(f), "16"],
                           capture_output=True, text=True, timeout=60)
        assert p.stdout.strip() == f"opened 4 refused 12 [{errno.EMFILE}]", (p.stdout, p.stderr)
        assert eventually(lambda: stats("bpfdumpfs_open_handles") == 0)
    assert stats("bpfdumpfs_errors_total", errno="EMFILE") == 36


@pytest.mark.parametrize("daemon", [("--debug-fuse",)], indirect=True)
def test_debug_fuse_logs_every_request_and_its_reply(daemon):
    """The device answers opens, reads and releases itself; --debug-fuse must show those
    too, not only what reaches pyfuse3: one line per request and one per reply."""
    f = daemon.mnt / "task" / "tasks"
    for _ in range(2):  # the first open goes to pyfuse3, the second the device answers
        assert subprocess.run(["cat", str(f)], capture_output=True).returncode == 0

    def unanswered() -> list[tuple[str, str]]:
        log = daemon.output()
        replies = set(re.findall(r"   unique: (\d+), (?:success|error)", log))
        return [(u, op) for u, op in re.findall(r"unique: (\d+), opcode: (\w+) \(\d+\)", log)
                if u not in replies and op not in ("FORGET", "BATCH_FORGET", "INTERRUPT")]
    # the kernel sends RELEASE after close returns, and a reply is logged after its request
    assert eventually(lambda: daemon.output().count("opcode: RELEASE (18)") >= 2
                      and not unanswered()), f"requests logged without a reply: {unanswered()}"
    ops = re.findall(r"unique: \d+, opcode: (\w+) \(\d+\)", daemon.output())
    assert ops.count("OPEN") == 2 and ops.count("RELEASE") == 2, ops
    assert ops.count("READ") >= 4, ops  # the dump, then its end, per cat


@pytest.mark.parametrize("daemon", [("--open-budget", "0.5",)], indirect=True)
def test_open_budget_stops_a_runaway_reader(daemon):
    f = open(daemon.mnt / "ksym" / "kallsyms", "rb", buffering=0)
    assert len(f.read(4096)) == 4096
    time.sleep(0.7)  # not a wait for state: the open outlives its budget of 0.5 s
    with pytest.raises(OSError) as e:
        f.read(4096)
    assert e.value.errno == errno.ETIME
    f.close()
    assert "took more than its time budget of 0.5 s (open_budget)" in daemon.output()
    assert (daemon.mnt / "task" / "tasks").read_bytes()  # a fresh open has its own budget


def read_to_end(fd: int) -> bytes:
    return b"".join(iter(lambda: os.read(fd, 1 << 20), b""))


def pin_half(daemon) -> bytes:
    """Pin a 2.5 MB dump, the same at every open, as ksym/half (0444); returns its bytes."""
    with Dumper.load(bpf_objects("stable_half")["stable_half"]) as d:
        d.pin(StateDir(daemon.state), "half", mode=0o444)
    return (daemon.state / "ksym" / "half").read_bytes()


def read_ahead(daemon) -> float:
    """Bytes all streams hold read ahead now, from .stats."""
    return metric((daemon.mnt / ".stats").read_text(), "bpfdumpfs_read_ahead_bytes")


def read_ahead_settled(daemon) -> float:
    """read_ahead once the producers started have read ahead all they may: when it has
    stayed the same for half a second."""
    return settled(lambda: read_ahead(daemon), "the read-ahead bytes in .stats", quiet=0.5,
                   timeout=20)


@pytest.mark.parametrize("daemon", [("--read-ahead", "8",)], indirect=True)
def test_read_ahead_budget_bounds_what_stopped_readers_hold(daemon):
    """40 readers of a 2.5 MB dump each read 1 MiB, as cat does, and stop. Unbounded, each
    would have 1.25 MiB more read ahead for it (~50 MiB); with --read-ahead 8 the daemon
    holds about 6 MiB for them (one user's share of 8), and every reader still gets every
    byte."""
    want = pin_half(daemon)
    assert len(want) > 2 << 20
    f = str(daemon.mnt / "ksym" / "half")
    base = rss_kib(daemon.pid)
    fds = [os.open(f, os.O_RDONLY) for _ in range(40)]
    try:
        for fd in fds:
            assert os.read(fd, 1 << 20) == want[:1 << 20]
        ahead = read_ahead_settled(daemon)
        held = (rss_kib(daemon.pid) - base) / 1024
        assert held < 20, f"40 stopped readers cost the daemon {held:.0f} MiB"
        assert 4 << 20 < ahead < 9 << 20  # the budget, give or take a kernel read
        for fd in fds:
            assert want[:1 << 20] + read_to_end(fd) == want
    finally:
        for fd in fds:
            os.close(fd)
    # all given back once the files are released (the kernel sends RELEASE after close)
    assert eventually(lambda: read_ahead(daemon) == 0)


# Run as another user: N readers of PATH each read 1 MiB and stop (as `less`es left
# open), until a line on stdin; then each reads to the end and prints its sha256.
STOPPED_READERS = r"""
import hashlib, os, sys
path, n = sys.argv[1], int(sys.argv[2])
fds = [os.open(path, os.O_RDONLY) for _ in range(n)]
heads = [os.read(fd, 1 << 20) for fd in fds]
print("stopped", flush=True)
sys.stdin.readline()
for fd, head in zip(fds, heads):
    rest = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
    print(hashlib.sha256(head + rest).hexdigest())
"""


@pytest.mark.parametrize("daemon", [("--read-ahead", "8",)], indirect=True)
def test_one_users_stopped_readers_leave_read_ahead_for_others(daemon):
    """40 readers of one user read 1 MiB each and stop. They may hold no more than 3/4 of
    the read-ahead budget (6 of 8 MiB): the streams of another user, started after them,
    still read ahead. Every reader gets every byte."""
    want = pin_half(daemon)
    f = str(daemon.mnt / "ksym" / "half")
    p = subprocess.Popen([*NOBODY, "/usr/bin/python3", "-c", STOPPED_READERS, f, "40"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert readline(p.stdout, what="40 readers stopped") == "stopped\n"
        held = read_ahead_settled(daemon)
        assert 4 << 20 < held < 7 << 20, f"one user's stopped readers hold {held / 2**20:.1f} MiB"
        fds = [os.open(f, os.O_RDONLY) for _ in range(4)]
        try:
            for fd in fds:
                assert os.read(fd, 1 << 20) == want[:1 << 20]
            # root's streams read ahead into the quarter left
            assert eventually(lambda: read_ahead(daemon) > held + (1 << 20)), \
                "root read nothing ahead"
            for fd in fds:
                assert want[:1 << 20] + read_to_end(fd) == want
        finally:
            for fd in fds:
                os.close(fd)
        out, _ = p.communicate("\n", timeout=60)
        assert out.split() == [hashlib.sha256(want).hexdigest()] * 40
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_settings_file_sets_limits_and_bad_ones_are_refused(tmp_path):
    state = mount_bpffs(tmp_path / "state")
    try:
        good = tmp_path / "good.toml"
        good.write_text("[limits]\nmax_handles_per_uid = 1\n")
        d = Daemon(tmp_path / "mnt", state, "--settings", str(good), "--no-builtins",
                   "--config-dir", str(tmp_path / "none")).start()
        try:
            bpfdumpfs("add", "t", TASKS_OBJ, "--state-dir", str(state))
            a = open(d.mnt / "task" / "t", "rb")
            with pytest.raises(OSError) as e:
                open(d.mnt / "task" / "t", "rb")
            assert e.value.errno == errno.EMFILE
            a.close()
        finally:
            d.stop()
        bad = tmp_path / "bad.toml"
        bad.write_text("[limits]\nmax_handles = -1\n")
        p = bpfdumpfs("mount", str(tmp_path / "mnt"), "--state-dir", str(state), "--settings",
                      str(bad), check=False)
        assert p.returncode == 1
        assert p.stderr.strip() == (f"bpfdumpfs: {bad}:2: max_handles must be a number >= 0: "
                                    "Invalid argument (EINVAL); e.g. max_handles = 0 (no limit)")
    finally:
        unmount(state)


def test_builtins_pinned_by_an_earlier_version_get_this_versions_program(tmp_path):
    """Built-ins stay pinned across restarts, so an upgrade must give them its programs,
    in place: the same link, its mode and any open file kept. A program an operator put
    there with `add` is theirs, and stays."""
    # a built-in's program as an earlier bpfdumpfs might have shipped it: same name,
    # other code
    old = bpf_objects("old_tasks")["old_tasks"]
    state = mount_bpffs(tmp_path / "state")
    try:
        with Dumper.load(old) as d:
            d.pin(StateDir(state), "tasks", mode=0o444)
            link_id = d.link_info().id
        d = Daemon(tmp_path / "mnt", state, "--config-dir", str(tmp_path / "none")).start()
        try:
            text = (d.mnt / "task" / "tasks").read_text()
            assert text.startswith("    PID    TGID    PPID S"), text[:80]
            assert "task/tasks updated" in d.output()
        finally:
            d.stop()
        with Dumper.from_pin(state / "task" / "tasks") as pinned:
            assert pinned.link_info().id == link_id  # the same link, given a program
        assert (state / "task" / "tasks").stat().st_mode & 0o777 == 0o444
        # an operator's own program of that name is left as it is
        bpfdumpfs("add", "tasks", str(old), "--replace", "--mode", "0444",
                  "--state-dir", str(state))
        d = Daemon(tmp_path / "mnt", state, "--config-dir", str(tmp_path / "none"),
                   log=tmp_path / "second.log").start()
        try:
            assert (d.mnt / "task" / "tasks").read_text() == "an older task/tasks\n"
            assert "task/tasks updated" not in d.output()
        finally:
            d.stop()
    finally:
        unmount(state)


def test_json_logs_have_level_and_message(tmp_path):
    state = mount_bpffs(tmp_path / "state")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "bpfdumpfs", "--log-format", "json", "mount",
                          str(mnt), "--state-dir", str(state), "--config-dir",
                          str(tmp_path / "none")], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        # a built-in this kernel cannot serve adds a warning (with its verifier log at
        # info): read up to the line that says the tree is served
        deadline, lines = time.monotonic() + 60, []
        while not lines or not lines[-1]["message"].startswith("serving "):
            lines.append(json.loads(readline(p.stderr, deadline - time.monotonic(),
                                             "the log line saying the tree is served")))
        pinned = [e for e in lines if e["message"].startswith("built-ins: ")]
        assert len(pinned) == 1 and pinned[0]["level"] == "info"
        assert "task/tasks pinned" in pinned[0]["message"]
        assert lines[-1] == {**lines[-1], "level": "info",
                             "message": f"serving {mnt} from {state}"}
        assert {e["level"] for e in lines} <= {"info", "warning"}
        assert all(e["logger"].startswith("bpfdumpfs") and e["time"] for e in lines)
    finally:
        p.terminate()
        p.wait(timeout=30)
        unmount(mnt)
        unmount(state)


def test_xattrs_other_than_ours_are_refused_the_way_ls_expects(daemon):
    """Labels are "not supported" (so `ls -l` stops asking after one file), ACLs are
    "none" (the kernel asks in permission checks), other user.* names do not exist."""
    f = daemon.mnt / "task" / "tasks"
    for name, err in (("security.selinux", errno.EOPNOTSUPP), ("trusted.x", errno.EOPNOTSUPP),
                      ("system.posix_acl_access", errno.ENODATA),
                      ("user.other", errno.ENODATA), ("user.bpfdump.nope", errno.ENODATA)):
        with pytest.raises(OSError) as e:
            os.getxattr(f, name)
        assert e.value.errno == err, name
    assert os.getxattr(f, "user.bpfdump.target") == b"task"
    # a non-root user lists and reads through the same permission checks
    p = subprocess.run([*NOBODY, "ls", "-l", str(f.parent)], capture_output=True, text=True)
    assert p.returncode == 0 and " tasks\n" in p.stdout, p.stderr
    from bpfdumpfs import Dumper, StateDir
    from bpfdumpfs.builtins import object_path
    with Dumper.load(object_path("tasks")) as d:
        for i in range(20):
            d.pin(StateDir(daemon.state), f"copy{i}", mode=0o444)
    p = subprocess.run(["strace", "-c", "-e", "trace=lgetxattr", "ls", "-l",
                        str(f.parent)], capture_output=True, text=True)
    assert p.returncode == 0 and "copy19" in p.stdout, p.stderr
    calls = [int(ln.split()[3]) for ln in p.stderr.splitlines() if ln.endswith("lgetxattr")]
    assert calls and calls[0] <= 2, p.stderr  # the label is asked once, not of 23 files
