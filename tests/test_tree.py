"""The mounted tree as users see it: listing, attributes, opens, pins from other tools."""
from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    ROOT,
    TASKS_OBJ,
    Daemon,
    bpfdumpfs,
    bpftool_pin,
    eventually,
    fstype,
    mount_bpffs,
    seq_fds,
    unmount,
)

from bpfdumpfs import targets
from bpfdumpfs.builtins import builtins
from bpfdumpfs.keeper import CONTROL_DIR, control_path


def test_one_directory_per_kernel_target(tree):
    listed = sorted(os.listdir(tree.mnt))
    assert ".stats" in listed  # the daemon's metrics, see test_ops_features
    listed.remove(".stats")
    assert listed == sorted(targets.discover())
    assert len(listed) >= 18 and {"task", "tcp", "ksym", "cgroup"} <= set(listed)
    for t in listed:
        st = os.stat(tree.mnt / t)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755


def test_every_builtin_is_a_file_with_the_pins_attributes(tree):
    for b in builtins():
        found = list(tree.mnt.glob(f"*/{b.name}"))
        assert len(found) == 1, f"{b.name}: {found}"
        f = found[0]
        pin = tree.state / f.parent.name / f.name
        st, pst = os.stat(f), os.stat(pin)
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0
        assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(pst.st_mode) == b.mode
        assert (st.st_uid, st.st_gid) == (pst.st_uid, pst.st_gid) == (0, 0)


def test_file_reads_are_fresh_and_seek_like_proc_files(tree):
    f = tree.mnt / "task" / "tasks"
    with open(f, "rb") as a:
        assert os.lseek(a.fileno(), 10, os.SEEK_SET) == 10  # like /proc's seq_files
        assert os.lseek(a.fileno(), 0, os.SEEK_END) == 0    # size 0, as /proc's
        first = a.read()
    # A new open is a new seq_file: our own pid is in it, and it is a whole dump.
    again = f.read_bytes()
    assert first.splitlines()[0] == again.splitlines()[0]
    assert f"{os.getpid():>7}".encode() in again


def test_concurrent_opens_are_independent(tree):
    f = tree.mnt / "task" / "tasks"
    a, b = open(f, "rb", buffering=0), open(f, "rb", buffering=0)
    try:
        head_a = a.read(100)
        whole_b = b.read(1 << 20) + b.read(1 << 20)
        rest_a = a.read(1 << 20)
        assert head_a + rest_a and (head_a + rest_a).splitlines()[0] == whole_b.splitlines()[0]
        assert whole_b.startswith(head_a[:40])
    finally:
        a.close()
        b.close()


def test_writing_or_creating_is_refused(tree):
    with pytest.raises(PermissionError):
        open(tree.mnt / "task" / "tasks", "wb")
    with pytest.raises(PermissionError):
        open(tree.mnt / "task" / "new", "wb")
    with pytest.raises(PermissionError):
        os.mkdir(tree.mnt / "task" / "d")
    with pytest.raises(PermissionError):
        os.mkdir(tree.mnt / "newtarget")


def test_pin_made_by_bpftool_appears_and_goes_at_once(tree):
    pin = tree.state / "task" / "frombpftool"
    bpftool_pin(TASKS_OBJ, pin)
    try:
        assert "frombpftool" in os.listdir(tree.mnt / "task")
        assert (tree.mnt / "task" / "frombpftool").read_bytes().startswith(b"    PID")
        # bpffs pins are 0600 & ~umask, and the tree shows the pin's mode
        assert stat.S_IMODE(os.stat(tree.mnt / "task" / "frombpftool").st_mode) == \
            stat.S_IMODE(os.stat(pin).st_mode)
    finally:
        pin.unlink()
    assert "frombpftool" not in os.listdir(tree.mnt / "task")
    assert not (tree.mnt / "task" / "frombpftool").exists()


def test_a_name_looked_up_before_it_was_pinned_appears_at_once(tree):
    """A failed lookup leaves the kernel nothing it trusts: the pin made next is
    seen by the very next stat, with no invalidation needed."""
    f = tree.mnt / "task" / "notyet"
    for _ in range(3):
        assert not f.exists()
    pin = tree.state / "task" / "notyet"
    bpftool_pin(TASKS_OBJ, pin)
    try:
        assert f.exists()
        assert f.read_bytes().startswith(b"    PID")
    finally:
        pin.unlink()
    assert not f.exists()


def test_entries_that_are_not_dumpers_are_hidden_and_logged_once(tree):
    amap = tree.state / "task" / "notalink"
    subprocess.run(["bpftool", "map", "create", str(amap), "type", "array", "key", "4",
                    "value", "4", "entries", "1", "name", "notalink"], check=True)
    wrong = tree.state / "ksym" / "wrongtarget"   # a task link pinned under ksym/
    bpftool_pin(TASKS_OBJ, wrong)
    try:
        for _ in range(3):
            assert "notalink" not in os.listdir(tree.mnt / "task")
            assert "wrongtarget" not in os.listdir(tree.mnt / "ksym")
            assert not (tree.mnt / "task" / "notalink").exists()
        log = tree.output()
        assert log.count(f"hiding {amap}: not an iterator link") == 1
        assert log.count(f"hiding {wrong}: its target is task, not ksym") == 1
        assert "tasks" in os.listdir(tree.mnt / "task")  # the rest of the tree is unharmed
    finally:
        amap.unlink()
        wrong.unlink()


def test_a_misplaced_pin_is_listed_where_it_is_with_the_fix(tree):
    """A task link pinned under ksym/ is hidden from the tree; `ls` and `info` name it
    by its real path (which `info` and `rm` take), marked misplaced, with the mv."""
    wrong = tree.state / "ksym" / "ref_wrongdir"
    bpftool_pin(TASKS_OBJ, wrong)
    try:
        state = ("--state-dir", str(tree.state))
        listed = bpfdumpfs("ls", *state).stdout.splitlines()
        at = next(i for i, ln in enumerate(listed) if "ref_wrongdir" in ln)
        assert listed[at].startswith("ksym/ref_wrongdir ")
        fix = f"mv {wrong} {tree.state / 'task'}/"
        assert listed[at + 1] == f"  misplaced: a task dumper pinned under ksym/, so the tree " \
                                 f"hides it; move it: {fix}"
        assert not any(ln.startswith("task/ref_wrongdir") for ln in listed)
        info = json.loads(bpfdumpfs("info", "ksym/ref_wrongdir", "--json", *state).stdout)
        assert (info["target"], info["name"]) == ("ksym", "ref_wrongdir")
        assert info["misplaced"].endswith(fix)
        subprocess.run(fix.split(), check=True)  # the fix works: it shows in the tree
        assert eventually(lambda: (tree.mnt / "task" / "ref_wrongdir").exists())
        assert "misplaced" not in bpfdumpfs("info", "task/ref_wrongdir", *state).stdout
        bpfdumpfs("rm", "task/ref_wrongdir", *state)
        assert not (tree.state / "task" / "ref_wrongdir").exists()
    finally:
        wrong.unlink(missing_ok=True)
        (tree.state / "task" / "ref_wrongdir").unlink(missing_ok=True)


def test_a_new_pin_is_checked_as_it_appears_not_when_first_listed(tree):
    """The daemon checks pins in the background as they come (a first `ls -l` of
    thousands would otherwise wait for every check): a bad one is reported with no
    one listing it."""
    amap = tree.state / "task" / "unlisted"
    subprocess.run(["bpftool", "map", "create", str(amap), "type", "array", "key", "4",
                    "value", "4", "entries", "1", "name", "unlisted"], check=True)
    try:
        assert eventually(lambda: f"hiding {amap}: not an iterator link" in tree.output(), 10), \
            "the new pin was not checked"
    finally:
        amap.unlink()


def test_release_frees_the_kernel_fd_at_once(tree):
    pid = tree.pid
    base = seq_fds(pid)
    f = open(tree.mnt / "task" / "tasks", "rb", buffering=0)
    f.read(10)
    assert seq_fds(pid) == base + 1
    f.close()
    assert eventually(lambda: seq_fds(pid) == base, 2, step=0.01), \
        f"{seq_fds(pid) - base} seq_file(s) left 2 s after the close"
    # head stops reading early and exits: its seq_file goes too
    out = subprocess.run(f"head -c 100 {tree.mnt}/task/tasks", shell=True,
                         capture_output=True, check=True)
    assert len(out.stdout) == 100
    assert eventually(lambda: seq_fds(pid) == base, 2, step=0.01), \
        f"{seq_fds(pid) - base} seq_file(s) left 2 s after head exited"


def test_statfs_works_for_df(tree):
    out = subprocess.run(["df", str(tree.mnt)], capture_output=True, text=True)
    assert out.returncode == 0 and "bpfdumpfs" in out.stdout


# -- the daemon's life ------------------------------------------------------------

@pytest.fixture
def private(tmp_path):
    """A fresh state dir and mount point for a daemon of the test's own."""
    state = mount_bpffs(tmp_path / "state")
    mnt = tmp_path / "mnt"
    yield state, mnt
    unmount(mnt)
    unmount(state)


def test_sigterm_and_sigint_unmount_cleanly(private):
    state, mnt = private
    for sig in (signal.SIGTERM, signal.SIGINT):
        d = Daemon(mnt, state).start()
        assert (mnt / "task" / "tasks").exists()
        d.proc.send_signal(sig)
        assert d.proc.wait(timeout=30) == 0, d.output()
        assert fstype(mnt) is None
        assert "unmounted" in d.output()


def test_no_builtins_pins_nothing(private):
    state, mnt = private
    d = Daemon(mnt, state, "--no-builtins").start()
    try:
        assert os.listdir(mnt / "task") == []
        # a fresh bpffs holds only the kernel's preloaded maps.debug/progs.debug
        assert {p.name for p in state.iterdir()} <= {"maps.debug", "progs.debug"}
    finally:
        d.stop()


def test_kill_9_loses_nothing_and_the_dead_mount_is_cleared(private):
    state, mnt = private
    d = Daemon(mnt, state).start()
    before = sorted(str(p.relative_to(mnt)) for p in mnt.glob("*/*"))
    ino_before = {p: os.stat(state / p).st_ino for p in before}
    reader = open(mnt / "task" / "tasks", "rb", buffering=0)
    reader.read(10)
    d.kill(signal.SIGKILL)  # the keeper, and with it its server (keeper.py)
    with pytest.raises(OSError) as e:
        os.listdir(mnt)
    # aborted while the server was dying, or asked once it was dead
    assert e.value.errno in (errno.ECONNABORTED, errno.ENOTCONN)
    with pytest.raises(OSError):  # the reader's fd is dead with the mount
        reader.read(10)
    reader.close()  # and closes without a word: there is nothing to flush (NOFLUSH)
    sockets = set(os.listdir(CONTROL_DIR))
    assert Path(control_path(str(mnt))).name in sockets  # left by the killed keeper
    d2 = Daemon(mnt, state).start()
    try:
        assert "clearing the dead FUSE mount" in d2.output()
        after = sorted(str(p.relative_to(mnt)) for p in mnt.glob("*/*"))
        assert after == before
        assert {p: os.stat(state / p).st_ino for p in after} == ino_before  # the same pins
        assert (mnt / "task" / "tasks").read_bytes().startswith(b"    PID")
    finally:
        d2.stop()
    # the new keeper's socket took the dead one's place, and went with it
    assert Path(control_path(str(mnt))).name not in os.listdir(CONTROL_DIR)


def test_a_live_mount_of_another_state_dir_is_not_taken_over(private, bare):
    """`bpfdumpfs mount MNT` takes a live MNT over (an upgrade: test_restart.py) only
    to serve the same state dir."""
    state, mnt = private
    d = Daemon(mnt, state).start()
    try:
        p = subprocess.run([*Daemon(mnt, bare).command(), "--no-builtins"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 1
        assert p.stderr.strip().endswith(
            f"{mnt} is already a live FUSE mount, served from {state}: Device or resource "
            f"busy (EBUSY); unmount it first (fusermount3 -u {mnt}), or take it over with "
            f"--state-dir {state}"), p.stderr
        assert "Traceback" not in p.stderr
        assert (mnt / "task" / "tasks").exists() and d.proc.poll() is None
        assert "refused to hand" in d.output()
    finally:
        d.stop()


def test_state_dir_that_is_not_bpffs_is_refused(tmp_path):
    mnt = tmp_path / "mnt"
    p = subprocess.run([*Daemon(mnt, tmp_path).command()], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1
    assert p.stderr.strip() == (f"bpfdumpfs: state dir {tmp_path} is not on a bpffs: "
                                f"Invalid argument (EINVAL); mount one there (mount -t bpf bpf "
                                f"{tmp_path}) or choose another --state-dir")
    assert fstype(mnt) is None


def test_defaults_mount_bpffs_and_run_bpfdump_in_the_background(tmp_path):
    """The README's first command, in a private mount namespace so the host is untouched:
    no bpffs at /sys/fs/bpf, default state dir and mount point, --background."""
    log = tmp_path / "daemon.log"
    script = f"""
set -e
umount -l /sys/fs/bpf 2>/dev/null || true
out=$({sys.executable} -m bpfdumpfs mount --background --log-file {log})
echo "$out"
pid=$(echo "$out" | sed -n 's/.*daemon pid \\([0-9]*\\).*/\\1/p')
trap 'kill $pid 2>/dev/null || true' EXIT   # whatever fails below, the daemon goes
stat -f -c %T /sys/fs/bpf
sed -n 1p /run/bpfdump/task/tasks
ls /sys/fs/bpf/bpfdumpfs/task
fusermount3 -u /run/bpfdump
"""
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert p.returncode == 0, p.stderr + log.read_text()
    lines = p.stdout.splitlines()
    assert lines[0].startswith("bpfdumpfs: mounted /run/bpfdump (daemon pid ")
    assert lines[1] == "bpf_fs"
    assert lines[2].split() == ["PID", "TGID", "PPID", "S", "UID", "COMM"]
    assert lines[3] == "tasks"
    assert "serving /run/bpfdump from /sys/fs/bpf/bpfdumpfs" in log.read_text()


def soon(check, within: float = 0.05) -> bool:
    """CHECK() becomes true within WITHIN seconds (the inotify round trip)."""
    return eventually(check, within, step=0.001)


def test_changes_to_pins_show_at_once_despite_caching(tree):
    """The kernel caches entries and attributes; inotify on the state dir must
    invalidate them within milliseconds of a pin changing under the daemon."""
    pin = tree.state / "task" / "cached"
    bpftool_pin(TASKS_OBJ, pin)
    f = tree.mnt / "task" / "cached"
    try:
        assert stat.S_IMODE(os.stat(f).st_mode) == stat.S_IMODE(os.stat(pin).st_mode)
        for mode in (0o444, 0o400, 0o440):
            os.chmod(pin, mode)
            assert soon(lambda mode=mode: stat.S_IMODE(os.stat(f).st_mode) == mode)
        os.chown(pin, 65534, 65534)
        assert soon(lambda: (os.stat(f).st_uid, os.stat(f).st_gid) == (65534, 65534))
        os.rename(pin, pin.with_name("cached2"))
        pin = pin.with_name("cached2")
        assert soon(lambda: not f.exists())
        assert (tree.mnt / "task" / "cached2").read_bytes().startswith(b"    PID")
        # a ksym link renamed over it: hidden (wrong target), at once
        other = tree.state / "task" / "other"
        subprocess.run(["bpftool", "iter", "pin", str(Path(TASKS_OBJ).with_name(
            "kallsyms.bpf.o")), str(other)], check=True)
        assert "other" not in os.listdir(tree.mnt / "task")
        os.rename(other, pin)
        assert soon(lambda: not (tree.mnt / "task" / "cached2").exists())
    finally:
        pin.unlink(missing_ok=True)


def test_attributes_of_a_file_being_read_follow_its_pin(tree):
    """Once a pin has been read, its attributes are served by the data plane (core.c),
    and `cat`'s fstat after each open asks for them: they must still be the pin's as
    it changes, and those of a new pin put in its place."""
    pin = tree.state / "task" / "readattr"
    bpftool_pin(TASKS_OBJ, pin)
    f = tree.mnt / "task" / "readattr"
    try:
        for _ in range(2):  # the first open publishes it; the second is served in C
            with open(f, "rb") as r:
                assert r.read().startswith(b"    PID")
                st, pst = os.fstat(r.fileno()), os.stat(pin)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_size, st.st_blksize) == \
            (stat.S_IMODE(pst.st_mode), pst.st_uid, 0, 1 << 20)
        assert st.st_mtime_ns == pst.st_mtime_ns and st.st_ino == os.stat(f).st_ino
        with open(f, "rb") as r:
            for mode in (0o444, 0o400):
                os.chmod(pin, mode)
                assert soon(lambda mode=mode: stat.S_IMODE(os.fstat(r.fileno()).st_mode) == mode)
            os.chown(pin, 65534, 65534)
            assert soon(lambda: os.fstat(r.fileno()).st_uid == 65534)
            assert r.read(10) == b"    PID   "
        pin.unlink()
        bpftool_pin(TASKS_OBJ, pin)  # a new pin of the name, root's and 0600
        os.chmod(pin, 0o600)
        assert soon(lambda: (stat.S_IMODE(os.stat(f).st_mode), os.stat(f).st_uid) == (0o600, 0))
        pin.unlink()
        assert soon(lambda: not f.exists())
    finally:
        pin.unlink(missing_ok=True)


def test_a_files_inode_is_its_pins_in_every_daemon(private):
    """A dumper file's inode number is derived from its pin's, so a daemon started
    anew on the state dir (an upgrade, a restart) gives every name the inode it had."""
    state, mnt = private
    pin = state / "task" / "stable"
    inos = []
    for _ in range(2):
        d = Daemon(mnt, state, "--config-dir", str(state.parent / "none")).start()
        try:
            if not pin.exists():
                bpftool_pin(TASKS_OBJ, pin)
            f = mnt / "task" / "stable"
            assert f.read_bytes().startswith(b"    PID")
            inos.append((os.stat(f).st_ino, os.stat(mnt / "task" / "tasks").st_ino))
        finally:
            d.stop()
    assert inos[0] == inos[1]
    assert inos[0][0] == (1 << 32) + os.stat(pin).st_ino


def test_an_inode_kept_of_a_replaced_pin_does_not_reach_the_new_pin(tree):
    """A file left open while its pin is replaced by another of the same name keeps
    reading the old dumper; a chmod through it must not change the new pin."""
    pin = tree.state / "task" / "replaced"
    f = tree.mnt / "task" / "replaced"
    bpftool_pin(TASKS_OBJ, pin)
    try:
        with open(f, "rb") as old:
            assert old.read(10) == b"    PID   "
            pin.unlink()
            bpftool_pin(TASKS_OBJ, pin)
            os.chmod(pin, 0o600)
            assert soon(lambda: os.stat(f).st_ino == (1 << 32) + os.stat(pin).st_ino)
            with pytest.raises(FileNotFoundError):
                os.fchmod(old.fileno(), 0o444)
            assert stat.S_IMODE(os.stat(pin).st_mode) == 0o600
            assert old.read().endswith(b"\n")  # the old dumper reads on to its end
    finally:
        pin.unlink(missing_ok=True)


def test_state_dir_unmounted_under_the_daemon_then_back(private):
    state, mnt = private
    d = Daemon(mnt, state, "--config-dir", str(state.parent / "none")).start()
    try:
        assert (mnt / "task" / "tasks").read_bytes().startswith(b"    PID")
        subprocess.run(["umount", "-l", str(state)], check=True)
        # nothing there now: the files go, a read of one gets a clean ENOENT
        assert soon(lambda: "tasks" not in os.listdir(mnt / "task"), 5)
        with pytest.raises(FileNotFoundError):
            (mnt / "task" / "tasks").read_bytes()
        assert soon(lambda: "is not on a bpffs" in d.output(), 5)
        # a bpffs is back (empty: pins die with their bpffs); new pins show, cached again
        mount_bpffs(state)
        bpftool_pin(TASKS_OBJ, state / "task" / "back")
        assert soon(lambda: "back" in os.listdir(mnt / "task"), 5)
        assert (mnt / "task" / "back").read_bytes().startswith(b"    PID")
        assert soon(lambda: "is a bpffs again" in d.output(), 5)
        assert fstype(mnt) == "fuse.bpfdumpfs"
    finally:
        d.stop()
