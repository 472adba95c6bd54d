"""The mount never goes dead (keeper.py): a server killed, a daemon upgraded in place,
a daemon restarted with its connection kept in systemd's fd store -- each 20 times,
while a reader opens and reads a dumper every 10 ms and sees every byte, and no error."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import (
    ROOT,
    Daemon,
    bpf_objects,
    bpftool_pin,
    cgroup2_root,
    children,
    eventually,
    fixed_output,
    fstype,
    mount_bpffs,
    unmount,
)

ROUNDS = 20
WANT = fixed_output("A")


def status(mnt: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "bpfdumpfs", "status", str(mnt), "--json"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return json.loads(out)[0]


def mount_id(mnt: Path) -> int:
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        if fields[4] == str(mnt):
            return int(fields[0])
    raise AssertionError(f"{mnt} is not mounted")


class ReaderLoop:
    """Open and read FILE every 10 ms, 1 KiB at a time (so a read spans several FUSE
    reads), and note anything but WANT; and, through it all, keep one open file read
    a little every 10 ms, opened anew at each end."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.reads = 0
        self.problems: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop), threading.Thread(target=self._slow)]

    def _read(self, f, chunk: int) -> bytes:
        out = b""
        while block := f.read(chunk):
            out += block
            if chunk < 1024:
                time.sleep(0.01)
        return out

    def _check(self, chunk: int) -> None:
        try:
            with open(self.file, "rb", buffering=0) as f:
                got = self._read(f, chunk)
        except OSError as e:
            self.problems.append(f"{e!r} at {time.monotonic():.3f}")
            return
        if got != WANT:
            self.problems.append(f"read {len(got)} bytes, not the {len(WANT)} written")
        self.reads += 1

    def _loop(self) -> None:
        while not self.stop.wait(0.01):
            self._check(1024)

    def _slow(self) -> None:
        while not self.stop.is_set():
            self._check(512)

    def __enter__(self) -> ReaderLoop:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)
            assert not t.is_alive(), "a reader hung"


def fixed_state(tmp_path: Path) -> Path:
    """A bpffs below TMP_PATH holding task/fixed, which prints WANT."""
    state = mount_bpffs(tmp_path / "state")
    bpftool_pin(bpf_objects("fixed_a")["fixed_a"], state / "task" / "fixed")
    return state


@pytest.fixture
def served(tmp_path):
    """A daemon (no built-ins) serving task/fixed, which prints WANT."""
    state = fixed_state(tmp_path)
    d = Daemon(tmp_path / "mnt", state, "--no-builtins", "--config-dir",
               str(tmp_path / "none"))
    try:
        yield d.start()
    finally:
        d.stop()
        unmount(state)


def resumed(mnt: Path, old_pid: int, within: float) -> float:
    """Seconds until a new server answers; fails after WITHIN."""
    t0 = time.monotonic()
    assert eventually(lambda: status(mnt)["pid"] != old_pid, within, step=0.01), \
        f"no new server within {within} s"
    return time.monotonic() - t0


def test_a_killed_server_is_replaced_at_once_and_no_reader_notices(served):
    mnt, keeper = served.mnt, served.proc.pid
    first = status(mnt)
    assert first["keeper"] == keeper != first["pid"]
    mid = mount_id(mnt)
    time.sleep(0.3)  # the keeper's fds once the first server has settled
    keeper_fds = len(os.listdir(f"/proc/{keeper}/fd"))
    took = []
    with ReaderLoop(mnt / "task" / "fixed") as loop:
        for _ in range(ROUNDS):
            pid = status(mnt)["pid"]
            # a file half read when its server dies reads on to the end
            with open(mnt / "task" / "fixed", "rb", buffering=0) as f:
                head = f.read(1000)
                t0 = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                rest = f.read()
                took.append(time.monotonic() - t0)
            assert head + rest == WANT
            resumed(mnt, pid, 1.0)
            time.sleep(0.1)
    assert not loop.problems, loop.problems
    assert loop.reads >= ROUNDS * 5
    assert max(took) < 1.0, f"reads waited up to {max(took):.3f} s for a new server"
    assert mount_id(mnt) == mid
    assert "was killed by SIGKILL" in served.output()
    # nothing left of the dead servers: one server, the keeper's fds as they were
    assert children(keeper) == [status(mnt)["pid"]]
    assert len(os.listdir(f"/proc/{keeper}/fd")) == keeper_fds
    assert len(os.listdir(f"/proc/{keeper}/task")) == 1


def test_an_upgrade_in_place_takes_the_mount_over(served):
    mnt, state = served.mnt, served.state
    mid = mount_id(mnt)
    daemons = [served]
    try:
        with ReaderLoop(mnt / "task" / "fixed") as loop:
            for i in range(ROUNDS):
                old = daemons[-1]
                new = Daemon(mnt, state, "--no-builtins", "--config-dir", "/nonexistent",
                             log=mnt.parent / f"upgrade-{i}.log")
                new.start()  # the mount serves all along: start() returns at once
                daemons.append(new)
                assert eventually(lambda new=new: status(mnt)["keeper"] == new.proc.pid, 30,
                                  step=0.01), new.output()
                assert old.proc.wait(timeout=30) == 0, old.output()
                assert "handed" in old.output() and "took" in new.output()
    finally:
        for d in daemons[1:-1]:
            if d.proc.poll() is None:
                d.kill()
        served.proc = daemons[-1].proc  # the fixture stops the one serving now
        served.log = daemons[-1].log
    assert not loop.problems, loop.problems
    assert loop.reads >= ROUNDS * 5
    assert mount_id(mnt) == mid
    assert status(mnt)["keeper"] == daemons[-1].proc.pid


class FdStore:
    """What systemd does for a Type=notify service with FileDescriptorStoreMax=: a
    NOTIFY_SOCKET that keeps the fds it is sent (FDSTORE=1, by FDNAME), and passes
    them to the service's next start (LISTEN_FDS, LISTEN_FDNAMES, from fd 3)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.fds: dict[str, int] = {}
        self.extra_env: dict[str, str] = {}
        self.messages: list[str] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._receive)
        self.thread.start()

    def _receive(self) -> None:
        while not self.done.is_set():
            try:
                msg, fds, _, _ = socket.recv_fds(self.sock, 4096, 8)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in msg.decode().splitlines() if "=" in line)
            self.messages.append(msg.decode())
            if fields.get("FDSTORE") == "1":
                for fd in fds:
                    old = self.fds.pop(fields["FDNAME"], None)
                    if old is not None:
                        os.close(old)
                    self.fds[fields["FDNAME"]] = fd

    def env(self) -> dict[str, str]:
        return {**os.environ, "NOTIFY_SOCKET": str(self.path), "FDSTORE": "4",
                **self.extra_env}

    def prefix(self) -> tuple[list[str], tuple[int, ...]]:
        """A command prefix that starts the service as systemd would with the fds kept:
        at 3 and up, named, LISTEN_PID its own."""
        names = sorted(self.fds)
        # by way of fds out of the way: one kept at 3 or 4 may be another's place
        script = ("import fcntl, os, sys\n"
                  "fds = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10)\n"
                  "       for fd in sys.argv[1].split(',')]\n"
                  "for i, fd in enumerate(fds): os.dup2(fd, 3 + i); os.close(fd)\n"
                  "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), "
                  "LISTEN_FDNAMES=sys.argv[2])\n"
                  "os.execvp(sys.argv[3], sys.argv[3:])\n")
        fds = ",".join(str(self.fds[n]) for n in names)
        return [sys.executable, "-c", script, fds, ":".join(names)], tuple(self.fds.values())

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        for fd in self.fds.values():
            os.close(fd)
        self.sock.close()


class StoredDaemon(Daemon):
    """A Daemon started under FdStore."""

    def __init__(self, *args, store: FdStore, **kw) -> None:
        super().__init__(*args, **kw)
        self.store = store

    def start(self, timeout: float = 60) -> Daemon:
        prefix, fds = self.store.prefix() if self.store.fds else ([], ())
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([*prefix, *self.command()], cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.store.env(), pass_fds=fds)
        return self


@contextmanager
def fd_store(tmp_path: Path):
    store = FdStore(tmp_path / "notify")
    try:
        yield store
    finally:
        store.close()


def test_a_restart_with_the_fd_store_keeps_the_mount(tmp_path):
    state = fixed_state(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    daemons: list[Daemon] = []
    try:
        with fd_store(tmp_path) as store:
            def start(i: int) -> Daemon:
                d = StoredDaemon(mnt, state, "--no-builtins", "--config-dir", "/nonexistent",
                                 store=store, log=tmp_path / f"run-{i}.log").start()
                daemons.append(d)
                return d
            first = start(0)
            assert eventually(lambda: {"fuse", "fuse-state"} <= set(store.fds), 30), \
                first.output()
            assert eventually(first.serving, 30)
            mid = mount_id(mnt)
            with ReaderLoop(mnt / "task" / "fixed") as loop:
                for i in range(1, ROUNDS + 1):
                    # the whole service dies (keeper and server), as systemd restarts it
                    daemons[-1].kill(signal.SIGKILL)
                    d = start(i)
                    assert eventually(lambda d=d: status(mnt)["keeper"] == d.proc.pid, 30,
                                      step=0.01), d.output()
                    assert "fd store" in d.output()
            assert not loop.problems, loop.problems
            assert loop.reads >= ROUNDS * 5
            assert mount_id(mnt) == mid
            assert any(m.startswith("READY=1") for m in store.messages)
    finally:
        for d in daemons:
            d.stop()
        unmount(mnt)
        unmount(state)


def test_sigterm_leaves_the_mount_to_a_restart_of_the_unit_and_unmounts_at_a_stop(tmp_path):
    """systemd sends SIGTERM for `systemctl restart` and `systemctl stop` alike; the
    keeper tells them apart by the unit's job (here a systemctl on PATH answers as
    systemd would, for a cgroup named as a unit's)."""
    unit = f"bpfdumpfs-test-{os.getpid()}.service"
    cg = cgroup2_root() / unit
    cg.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    jobs = tmp_path / "jobs"
    (bin_dir / "systemctl").write_text(f"#!/bin/sh\ncat {jobs}\n")
    (bin_dir / "systemctl").chmod(0o755)
    state = fixed_state(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    in_unit = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh"]
    daemons: list[Daemon] = []
    try:
        with fd_store(tmp_path) as store:
            store.extra_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}

            def start(i: int) -> Daemon:
                d = StoredDaemon(mnt, state, "--no-builtins", "--config-dir", "/nonexistent",
                                 store=store, prefix=in_unit, log=tmp_path / f"run-{i}.log")
                daemons.append(d.start())
                assert eventually(lambda: d.serving() and status(mnt)["keeper"] == d.proc.pid,
                                  30, step=0.01), d.output()
                return d
            start(0)
            mid = mount_id(mnt)
            with ReaderLoop(mnt / "task" / "fixed") as loop:
                for i in range(1, 4):
                    jobs.write_text(f"{i} {unit} restart running\n")
                    daemons[-1].proc.terminate()
                    assert daemons[-1].proc.wait(timeout=30) == 0
                    assert "leaving the mount to the next start" in daemons[-1].output()
                    start(i)
            assert not loop.problems, loop.problems
            assert mount_id(mnt) == mid
            jobs.write_text(f"9 {unit} stop running\n")
            daemons[-1].proc.terminate()
            assert daemons[-1].proc.wait(timeout=30) == 0
            assert fstype(mnt) is None
    finally:
        for d in daemons:
            d.stop()
        unmount(mnt)
        unmount(state)
        eventually(lambda: not (cg / "cgroup.procs").read_text().strip(), 10)
        cg.rmdir()


def test_a_control_socket_that_is_not_roots_is_ignored(tmp_path):
    """A socket planted at the control path (by a user who may write there: a volume
    shared with an app) neither takes the mount nor stops the daemon from mounting."""
    from bpfdumpfs.keeper import CONTROL_DIR, control_path
    state = fixed_state(tmp_path)
    mnt = tmp_path / "mnt"
    path = control_path(str(mnt))
    os.makedirs(CONTROL_DIR, mode=0o700, exist_ok=True)
    planted = subprocess.Popen([sys.executable, "-c", (
        "import os, socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        f"s.bind({path!r}); os.chmod({path!r}, 0o666); os.setuid(65534); s.listen()\n"
        "print('listening', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    d = Daemon(mnt, state, "--no-builtins", "--config-dir", str(tmp_path / "none"))
    try:
        assert planted.stdout.readline() == "listening\n"
        d.start()
        assert (mnt / "task" / "fixed").read_bytes() == WANT
        assert f"ignoring {path}: the process listening there is not root's" in d.output()
    finally:
        planted.kill()
        planted.wait()
        d.stop()
        unmount(state)
