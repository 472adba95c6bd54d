"""Test helpers: a real bpfdumpfs daemon on a private bpffs, started and ended by pid."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CI = os.environ.get("CI") == "true"
ROOT = Path(__file__).resolve().parent.parent


def need(ok: bool, why: str) -> None:
    """Skip a test whose prerequisite is missing -- but fail it in CI, loudly."""
    if not ok:
        (pytest.fail if CI else pytest.skip)(f"needs {why}")


def need_kernel() -> None:
    need(os.geteuid() == 0, "root (bpf(2), bpffs and FUSE mounts)")
    need(os.path.exists("/dev/fuse"), "/dev/fuse")
    need(os.path.exists("/sys/kernel/btf/vmlinux"), "kernel BTF (/sys/kernel/btf/vmlinux)")


def eventually(cond, timeout: float = 5.0, step: float = 0.02) -> bool:
    """Whether COND() becomes true within TIMEOUT seconds, asked every STEP."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def rss_kib(pid: int) -> int:
    """Resident memory of process PID, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))


def link_exists(link_id: int) -> bool:
    return subprocess.run(["bpftool", "link", "show", "id", str(link_id)],
                          capture_output=True).returncode == 0


def prog_exists(prog_id: int) -> bool:
    return subprocess.run(["bpftool", "prog", "show", "id", str(prog_id)],
                          capture_output=True).returncode == 0


def listing(state: Path) -> list[tuple]:
    """Everything in the state dir, with what a change would alter (mtime included)."""
    found = []
    for dirpath, dirs, files in os.walk(state):
        for n in dirs + files:
            st = os.lstat(os.path.join(dirpath, n))
            found.append((os.path.relpath(os.path.join(dirpath, n), state), st.st_ino,
                          st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns))
    return sorted(found)


def cgroup2_root() -> Path:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "cgroup2":
                return Path(left.split()[4])
    need(False, "a cgroup2 mount")


def fstype(path: str | os.PathLike) -> str | None:
    """fstype of the mount at exactly PATH, if any."""
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == path:
                found = right.split()[0]
    return locals().get("found")


def traversable(path: Path) -> Path:
    """Let non-root readers reach PATH: pytest's temp dirs are 0700 root."""
    for p in [path, *path.parents]:
        if p == Path("/tmp"):
            break
        p.chmod(p.stat().st_mode | 0o755)
    return path


def mount_bpffs(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", str(path)], check=True)
    return path


def unmount(path: Path) -> None:
    """Unmount PATH if something is mounted there (fusermount3 first, then umount -l)."""
    if fstype(path) is None:
        return
    if (fstype(path) or "").startswith("fuse"):
        subprocess.run(["fusermount3", "-u", str(path)], capture_output=True)
    if fstype(path) is not None:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def bpfdumpfs(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run the bpfdumpfs CLI of this checkout, as a user would."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    p = subprocess.run([sys.executable, "-m", "bpfdumpfs", *args], cwd=ROOT, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"bpfdumpfs {' '.join(args)} failed: {p.stderr}")
    return p


class Daemon:
    """`bpfdumpfs mount MNT --state-dir STATE` in the foreground, as a child process."""

    def __init__(self, mnt: Path, state: Path, *args: str, log: Path | None = None,
                 prefix: list[str] | None = None) -> None:
        self.mnt, self.state, self.args = mnt, state, args
        self.prefix = prefix or []  # e.g. unshare ...: how the daemon is started
        self.log = log or mnt.parent / f"{mnt.name}.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [*self.prefix, sys.executable, "-m", "bpfdumpfs", "mount", str(self.mnt),
                "--state-dir", str(self.state), *self.args]

    def start(self, timeout: float = 60) -> Daemon:
        if fstype(self.mnt) is None:  # a dead mount left there is the daemon's to clear
            self.mnt.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.command(), cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.serving():
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.output()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"daemon did not mount in {timeout}s: {self.output()}")
            time.sleep(0.02)
        return self

    def serving(self) -> bool:
        """Mounted, and answered by a live daemon. A dead mount gives ENOTCONN -- but
        only to requests that reach the daemon: stat() may be answered from cache.
        The listing must be the tree's: a dead mount cleared between the fstype
        check and the listing leaves the empty directory under it."""
        if fstype(self.mnt) != "fuse.bpfdumpfs":
            return False
        try:
            return ".stats" in os.listdir(self.mnt)
        except OSError:
            return False

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> int | None:
        """SIGTERM (the clean way); then make sure nothing is left mounted."""
        code = None
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                code = self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        unmount(self.mnt)
        return code


def maps_comparable(lines: list[str]) -> list[str]:
    """Lines of /proc/PID/maps or of a vmas dump (PID dropped), made comparable: where /
    is an overlayfs (a container) the device column goes, since for a file mapped
    through it the dump shows the backing layer's device and /proc the overlay's (a
    documented difference, vmas.bpf.c)."""
    if fstype("/") != "overlay":
        return lines
    return [" ".join(f for i, f in enumerate(ln.split(" ")) if i != 3) for ln in lines]


@contextlib.contextmanager
def own_daemon(base: Path, *args: str, prefix: list[str] | None = None) -> Iterator[Daemon]:
    """A daemon with ARGS on a bpffs of its own below BASE, with no config; stopped and
    its bpffs unmounted afterwards, even if it never started."""
    state = mount_bpffs(base / "state")
    d = Daemon(base / "mnt", state, "--config-dir", str(base / "none"), *args, prefix=prefix)
    try:
        yield d.start()
    finally:
        d.stop()
        unmount(state)
