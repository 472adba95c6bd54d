"""Readers see their own namespaces: net targets their network namespace, task
targets their pid namespace -- not the daemon's."""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import Daemon, bpfdumpfs, eventually, mount_bpffs, unmount, waiting_in

from bpfdumpfs.namespaces import HELPER_DEADLINE, MAX_PER_UID, MAX_WAITING
from bpfdumpfs.nshelper import IDLE, kept_caps

TCP_OBJ = "bpfdumpfs/builtins/tcp.bpf.o"


def port_hex(port: int) -> str:
    return f":{port:04X} "


def in_new_netns(tree, files: list[str]) -> tuple[int, str]:
    """Listen on a port inside `unshare --net`, read FILES from there; (port, output)."""
    script = ("import socket, sys\n"
              "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
              "print(s.getsockname()[1])\n"
              "for f in sys.argv[1:]:\n"
              "    sys.stdout.write(open(f).read())\n")
    p = subprocess.run(["unshare", "--net", "sh", "-c",
                        'ip link set lo up && exec "$0" "$@"', sys.executable, "-c", script,
                        *[str(tree.mnt / f) for f in files]],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    port, _, out = p.stdout.partition("\n")
    return int(port), out


def test_net_reader_sees_its_own_namespace(tree, host_listener):
    ns_port, ns_view = in_new_netns(tree, ["tcp/tcp"])
    assert ns_view.startswith("  sl  local_address")
    assert port_hex(ns_port) in ns_view, "the reader's own listener"
    assert port_hex(host_listener) not in ns_view, "nothing of the host's namespace"
    assert len(ns_view.splitlines()) == 2, "a new namespace has just that one socket"
    host_view = (tree.mnt / "tcp" / "tcp").read_text()
    assert port_hex(host_listener) in host_view
    assert port_hex(ns_port) not in host_view or ns_port == host_listener


def test_view_daemon_shows_the_daemons_namespace(tree, host_listener):
    bpfdumpfs("add", "hosttcp", TCP_OBJ, "--view", "daemon", "--mode", "0444",
              "--state-dir", str(tree.state))
    try:
        ns_port, out = in_new_netns(tree, ["tcp/hosttcp"])
        assert port_hex(host_listener) in out
        assert port_hex(ns_port) not in out or ns_port == host_listener
    finally:
        bpfdumpfs("rm", "tcp/hosttcp", "--state-dir", str(tree.state))


def nshelpers() -> int:
    return len(helper_pids())


def test_pid_reader_sees_only_its_own_tasks(tree):
    """...numbered as the namespace numbers them, as its /proc and `ps` do."""
    before = nshelpers()
    script = (f"sleep 30 & cat {tree.mnt}/task/tasks; echo ---; ps -eo pid=,ppid=,comm=; "
              f"echo ---; cat {tree.mnt}/task_file/files {tree.mnt}/task_vma/vmas; kill $!")
    p = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    tasks, ps, files_vmas = p.stdout.split("---\n")
    lines = tasks.splitlines()
    assert lines[0].split() == ["PID", "TGID", "PPID", "S", "UID", "COMM"]
    rows = {ln.split()[5]: ln.split()[:3] for ln in lines[1:]}
    # the shell, sleep and cat: nothing of the daemon's lives in the namespace
    assert sorted(rows) == sorted(["sh", "sleep", "cat"]), rows
    assert rows["sh"] == ["1", "1", "0"]  # the namespace's init; its parent is outside
    procs = {comm: [pid, ppid] for pid, ppid, comm in map(str.split, ps.splitlines())}
    for comm in ("sh", "sleep"):
        assert [rows[comm][0], rows[comm][2]] == procs[comm], (rows, procs)
    # files and vmas number the processes the same way (a handful; host pids run high)
    pids = {int(ln.split()[0]) for ln in files_vmas.splitlines() if ln.split()[0] != "PID"}
    assert 1 in pids and max(pids) < 20, pids
    host = (tree.mnt / "task" / "tasks").read_text()
    host_pids = {int(ln.split()[0]) for ln in host.splitlines()[1:]}
    assert os.getpid() in host_pids and len(host_pids) > len(rows), "the daemon's own view"
    # the namespace is gone with its init, and its helper ends idle
    assert eventually(lambda: nshelpers() <= before, 10, step=0.05), \
        f"{nshelpers() - before} namespace helper(s) left 10 s after the namespace went"
    assert nshelpers() == before


@pytest.fixture
def daemon_in_own_pidns(tmp_path):
    """A daemon in a pid namespace of its own: host readers' pids are invisible to it."""
    state = mount_bpffs(tmp_path / "state")
    d = Daemon(tmp_path / "mnt", state, "--config-dir", str(tmp_path / "none"),
               prefix=["unshare", "--pid", "--fork", "--kill-child"]).start()
    yield d
    # unshare does not pass SIGTERM on: end the daemon itself, the clean way
    child = subprocess.run(["pgrep", "-P", str(d.proc.pid)], capture_output=True, text=True)
    for pid in child.stdout.split():
        os.kill(int(pid), signal.SIGTERM)
    d.stop()
    unmount(state)


def test_reader_pid_invisible_to_daemon_is_refused(daemon_in_own_pidns):
    d = daemon_in_own_pidns
    p = subprocess.run(["cat", str(d.mnt / "tcp" / "tcp")], capture_output=True, text=True)
    assert p.returncode == 1
    assert p.stderr.strip().endswith("Permission denied")
    assert "the reader's pid is not visible to the daemon" in d.output()
    # targets the kernel does not scope, and view=daemon dumpers, still work
    assert (d.mnt / "cgroup" / "cgroups").read_bytes().startswith(b"1 0 /")
    # but what only a privileged reader may read is refused: an invisible reader's
    # capabilities are unknown (privilege.py)
    with pytest.raises(PermissionError):
        (d.mnt / "ksym" / "kallsyms").read_bytes()
    bpfdumpfs("add", "daemontcp", TCP_OBJ, "--view", "daemon", "--mode", "0444",
              "--state-dir", str(d.state))
    assert (d.mnt / "tcp" / "daemontcp").read_text().startswith("  sl  local_address")


def status_fields(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(ln.rstrip("\n").split(":\t", 1) for ln in f if ":\t" in ln)


def test_the_pid_helper_is_worth_nothing_to_whoever_reaches_it(tree):
    """It runs as nobody with no capabilities and no way to gain any, not dumpable (so
    nobody, its own uid, cannot read its memory or attach), under a seccomp filter,
    rooted in an empty read-only tmpfs, holding its sockets and nothing else: no link
    fd at rest."""
    before = set(helper_pids())
    p = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "cat",
                        str(tree.mnt / "task" / "tasks")], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    new = set(helper_pids()) - before
    assert len(new) == 1, new
    pid = new.pop()
    stats = (tree.mnt / ".stats").read_text()
    assert int(stats.split('bpfdumpfs_namespace_helpers{kind="pid"} ')[1].split()[0]) >= 1
    st = status_fields(pid)
    assert st["Uid"].split() == ["65534"] * 4 and st["Gid"].split() == ["65534"] * 4
    assert st["Groups"].strip() == ""
    caps = sum(1 << cap for cap in kept_caps())  # none from 6.5 on, CAP_BPF before
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[field], 16) & ~caps == 0, (field, st[field])
    assert st["NoNewPrivs"].strip() == "1"
    if os.uname().machine == "x86_64":  # filtered: sockets, fork, memory, BPF_ITER_CREATE
        assert st["Seccomp"].strip() == "2", st["Seccomp"]
    # not dumpable: its /proc files are root's, and its own uid cannot read them
    assert os.stat(f"/proc/{pid}/environ").st_uid == 0
    r = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                        "cat", f"/proc/{pid}/environ"], capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    # its root: empty, and not even root can write there
    root = f"/proc/{pid}/root"
    assert os.listdir(root) == []
    with pytest.raises(OSError) as e:
        open(f"{root}/proof", "w")
    assert e.value.errno == errno.EROFS
    fds = {int(n): os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
    assert fds[0] == fds[1] == "/dev/null"
    assert all(target.startswith("socket:[") for fd, target in fds.items() if fd > 2), fds
    assert len(fds) <= 6, fds  # stdio, the daemon's socket, its own pair to its children


def helper_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "bpfdumpfs.nshelper"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_the_first_read_in_a_new_pid_namespace_succeeds_every_time(tree):
    """Namespaces come and go and the kernel reuses their inode numbers: a new one is
    never taken for a dead one whose helper is gone."""
    for _ in range(6):
        subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], check=True)
        p = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "cat",
                            str(tree.mnt / "task" / "tasks")], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0, p.stderr
        assert [ln.split()[5] for ln in p.stdout.splitlines()[1:]] == ["cat"]


def test_a_helper_that_stops_answering_fails_its_open_alone(tree):
    """A stopped helper is killed at its deadline and its open fails with EAGAIN; other
    readers are served meanwhile, and the next open there gets a new helper."""
    ns = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "sleep", "60"])
    try:
        assert eventually(lambda: subprocess.run(["pgrep", "-P", str(ns.pid)],
                                                 capture_output=True).returncode == 0)
        inner = int(subprocess.run(["pgrep", "-P", str(ns.pid)], capture_output=True,
                                   text=True).stdout.split()[0])
        enter = ["nsenter", "-t", str(inner), "-p", "-m"]
        before = set(helper_pids())
        assert subprocess.run([*enter, "cat", str(tree.mnt / "task" / "tasks")],
                              capture_output=True).returncode == 0
        stopped = (set(helper_pids()) - before).pop()
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.monotonic()
        slow = subprocess.Popen([*enter, "cat", str(tree.mnt / "task" / "tasks")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

        def cat_waits() -> bool:  # nsenter's child, cat, waits for the daemon's answer
            kids = subprocess.run(["pgrep", "-P", str(slow.pid)], capture_output=True,
                                  text=True, check=False).stdout.split()
            return any(waiting_in(int(k)) == "request_wait_answer" for k in kids)
        assert eventually(cat_waits, 3), "the cat in the namespace never waited on its open"
        assert (tree.mnt / "ksym" / "kallsyms").read_bytes()  # served meanwhile
        assert time.monotonic() - t0 < 3
        assert slow.wait(timeout=30) == 1
        assert "Resource temporarily unavailable" in slow.stderr.read()
        assert HELPER_DEADLINE <= time.monotonic() - t0 < HELPER_DEADLINE + 5
        assert stopped not in helper_pids()
        p = subprocess.run([*enter, "cat", str(tree.mnt / "task" / "tasks")],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    finally:
        ns.kill()
        ns.wait()


def test_a_flood_of_pid_namespaces_is_bounded_and_cleaned_up(tmp_path):
    """80 readers of one user at once, each in a pid namespace of its own: at most
    MAX_PER_UID helpers run for them and MAX_WAITING opens wait (a reader beyond gets
    EAGAIN, never a hang), the tree's other requests are served meanwhile, and once idle
    every helper ends, is reaped, and leaves no fd behind."""
    state = mount_bpffs(tmp_path / "state")
    d = Daemon(tmp_path / "mnt", state, "--config-dir", str(tmp_path / "none"))
    try:
        d.start()
        f = d.mnt / "task" / "tasks"
        f.read_bytes()  # its link cached, as it stays
        fds_before = len(os.listdir(f"/proc/{d.pid}/fd"))
        readers = [subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "cat", str(f)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                   for _ in range(80)]
        peak, slowest = 0, 0.0

        def flood_over() -> bool:  # after an open and a listing, served while it waits
            nonlocal peak, slowest
            t = time.monotonic()
            stats = (d.mnt / ".stats").read_text()
            assert "tasks" in os.listdir(d.mnt / "task")
            slowest = max(slowest, time.monotonic() - t)
            peak = max(peak, int(stats.split('namespace_helpers{kind="pid"} ')[1].split()[0]))
            return all(r.poll() is not None for r in readers)
        assert eventually(flood_over, 120, step=0.05), \
            f"{sum(r.poll() is None for r in readers)} of 80 readers still running after 120 s"
        assert slowest < 2.0, f"the flood held the tree's other requests {slowest:.1f} s"
        for r in readers:
            err = r.stderr.read()
            assert r.returncode == 0 or "Resource temporarily unavailable" in err, err
        assert 0 < peak <= MAX_PER_UID  # all of them root's readers
        assert sum(r.returncode == 0 for r in readers) >= MAX_PER_UID // 2

        def cleaned() -> bool:
            kids = subprocess.run(["ps", "--ppid", str(d.pid), "-o", "pid="],
                                  capture_output=True, text=True).stdout.split()
            return not kids and len(os.listdir(f"/proc/{d.pid}/fd")) <= fds_before
        assert eventually(cleaned, timeout=3 * IDLE, step=0.5)  # ended idle, then reaped
    finally:
        d.stop()
        unmount(state)


def test_opens_waiting_on_stuck_helpers_never_hold_the_tree(tmp_path):
    """Five namespaces whose helpers are stopped, sixteen opens waiting in each: more than
    pyfuse3's 64 tasks. MAX_WAITING of them wait (the rest get EAGAIN at once), so
    listings and .stats stay quick; an open waiting on a killed helper fails with EAGAIN
    or is served by the next one, and none hangs."""
    state = mount_bpffs(tmp_path / "state")
    d = Daemon(tmp_path / "mnt", state, "--config-dir", str(tmp_path / "none"))
    f = d.mnt / "task" / "tasks"
    spaces, stopped, cats = [], [], []
    try:
        d.start()
        for _ in range(5):
            ns = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
                                   "sleep", "60"])
            spaces.append(ns)
            assert eventually(lambda ns=ns: subprocess.run(["pgrep", "-P", str(ns.pid)],
                                                           capture_output=True).returncode == 0)
            inner = subprocess.run(["pgrep", "-P", str(ns.pid)], capture_output=True,
                                   text=True).stdout.split()[0]
            enter = ["nsenter", "-t", inner, "-p", "-m"]
            before = set(helper_pids())
            assert subprocess.run([*enter, "cat", str(f)], capture_output=True).returncode == 0
            helper = (set(helper_pids()) - before).pop()
            os.kill(helper, signal.SIGSTOP)
            stopped.append((enter, helper))
        cats = [subprocess.Popen([*enter, "cat", str(f)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
                for enter, _ in stopped for _ in range(16)]
        t0, slowest = time.monotonic(), 0.0
        while time.monotonic() - t0 < HELPER_DEADLINE - 1:  # as long as the cats wait
            t = time.monotonic()
            assert "tasks" in os.listdir(d.mnt / "task")
            assert (d.mnt / ".stats").read_bytes()
            slowest = max(slowest, time.monotonic() - t)
            time.sleep(0.1)  # not a wait for state: a look at the tree every 0.1 s
        assert slowest < 1.0, f"stuck helpers held the tree {slowest:.1f} s"
        refused = 0
        for c in cats:
            if c.wait(timeout=30):
                assert "Resource temporarily unavailable" in c.stderr.read()
                refused += 1
        assert refused >= len(cats) - MAX_WAITING
    finally:
        for c in cats:
            c.kill()
            c.wait()
        for _, h in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(h, signal.SIGKILL)
        for ns in spaces:
            ns.kill()
            ns.wait()
        d.stop()
        unmount(state)


def test_a_flood_of_network_namespaces_is_bounded(tmp_path):
    """40 readers of one user at once, each in a network namespace of its own: at most
    MAX_PER_UID threads enter them for that user; the others get EAGAIN, never a hang."""
    state = mount_bpffs(tmp_path / "state")
    d = Daemon(tmp_path / "mnt", state, "--config-dir", str(tmp_path / "none"))
    try:
        d.start()
        readers = [subprocess.Popen(["unshare", "--net", "cat", str(d.mnt / "tcp" / "tcp")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                   for _ in range(40)]
        served = 0
        for r in readers:
            if r.wait(timeout=60):
                assert "Resource temporarily unavailable" in r.stderr.read()
            else:
                served += 1
        stats = (d.mnt / ".stats").read_text()
        threads = int(stats.split('namespace_helpers{kind="net"} ')[1].split()[0])
        assert served == threads <= MAX_PER_UID, (served, threads)
    finally:
        d.stop()
        unmount(state)


# In a new pid namespace: hold 8,000 fds, read the files dump 2 MiB on (or to its end),
# then read its start again (a re-run, made by the namespace's helper); print both.
REREAD_IN_NS = """
import os, sys
fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(8000)]
fd = os.open(sys.argv[1], os.O_RDONLY)
first = os.read(fd, 150_000)
while os.read(fd, 1 << 20):
    pass
again = os.pread(fd, 150_000, 0)
sys.stdout.write(first.decode() + "---\\n" + again.decode())
"""


def test_a_seek_back_re_runs_in_the_readers_namespace(tree):
    """A seek back past what an open kept re-runs the dumper in a new seq_file; for a
    reader in another pid namespace, made there too (by its helper), so the re-run
    shows the same tasks, numbered the same, as the first run."""
    p = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
                        REREAD_IN_NS, str(tree.mnt / "task_file" / "files")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    first, again = p.stdout.split("---\n")
    assert len(first) == 150_000 and first == again
    pids = {int(ln.split()[0]) for ln in first.splitlines()[1:-1]}
    assert pids == {1}, pids  # python is the namespace's init: nothing else is in it
