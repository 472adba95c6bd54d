"""Test helpers: a real bpfdumpfs daemon on a private bpffs, started and ended by pid."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CI = os.environ.get("CI") == "true"
ROOT = Path(__file__).resolve().parent.parent
BUILTINS = ROOT / "bpfdumpfs" / "builtins"
TASKS_OBJ = str(BUILTINS / "tasks.bpf.o")
CGROUPS_OBJ = str(BUILTINS / "cgroups.bpf.o")
KSYM_OBJ = str(BUILTINS / "kallsyms.bpf.o")
BPF_SRC = ROOT / "tests" / "bpf"   # the tests' own BPF programs, and their Makefile
BPF_BUILD = BPF_SRC / "build"
FIXED_LINES = 200                  # the lines tests/bpf/fixed_[ab].bpf.c print


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


def settled(value, what: str, quiet: float = 0.1, timeout: float = 30.0,
            step: float = 0.02):
    """VALUE() once it has stayed the same for QUIET seconds; fails, naming WHAT and the
    last values seen, if it has not within TIMEOUT."""
    seen, since = [value()], [time.monotonic()]

    def still() -> bool:
        now = value()
        if now != seen[-1]:
            seen.append(now)
            since[0] = time.monotonic()
        return time.monotonic() - since[0] >= quiet
    assert eventually(still, timeout, step), \
        f"{what} did not stay the same for {quiet} s within {timeout} s: {seen[-10:]}"
    return seen[-1]


def readline(stream, timeout: float = 60.0, what: str = "a line"):
    """STREAM.readline() (a child process's pipe), failing, naming WHAT, if none has come
    in TIMEOUT seconds: the writer hangs, and the test must not."""
    got = []
    reader = threading.Thread(target=lambda: got.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(max(timeout, 0))
    assert got, f"waited {timeout:.0f} s for {what}, in vain"
    return got[0]


def waiting_in(pid: int) -> str:
    """The kernel function task PID sleeps in ("0" while it runs), or why not known."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError as e:
        return str(e)


def seq_fds(pid: int) -> int:
    """How many bpf_iter seq_files process PID holds open."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:bpf_iter":
                n += 1
        except FileNotFoundError:
            pass
    return n


def settled_seq_fds(pid: int, timeout: float = 30.0) -> int:
    """seq_fds once earlier tests' releases (sent asynchronously by the kernel) are in."""
    return settled(lambda: seq_fds(pid), f"the seq_files pid {pid} holds", 0.1, timeout)


def read_all(path, bs: int = 64 * 1024) -> bytes:
    """PATH read to its end with read(2)s of BS bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, bs):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


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


def cli(state: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """bpfdumpfs ARGS --state-dir STATE (never raises: tests look at what users see)."""
    kw = {"env": {**os.environ, **env}} if env else {}
    return bpfdumpfs(*args, "--state-dir", str(state), check=False, **kw)


def ok(p: subprocess.CompletedProcess) -> str:
    """stdout of a bpfdumpfs command that must succeed (no traceback either)."""
    assert p.returncode == 0, f"exit {p.returncode}: {p.stderr}"
    assert "Traceback" not in p.stderr
    return p.stdout


def bpftool_json(*args: str):
    """What `bpftool -j ARGS` prints, parsed; it must succeed."""
    p = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=False)
    assert p.returncode == 0, f"bpftool {' '.join(args)}: {p.stderr}"
    return json.loads(p.stdout)


def bpftool_pin(obj: str, path: Path) -> None:
    """`bpftool iter pin OBJ PATH`: a dumper made by another tool."""
    path.parent.mkdir(exist_ok=True)
    subprocess.run(["bpftool", "iter", "pin", obj, str(path)], check=True, capture_output=True)


def xattrs(path: Path) -> dict[str, str]:
    """getfattr -d of PATH as a dict of user.bpfdump.* names (without the prefix)."""
    p = subprocess.run(["getfattr", "-d", "--absolute-names", "-e", "text", str(path)],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    found = {}
    for line in p.stdout.splitlines():
        m = re.fullmatch(r'user\.bpfdump\.([a-z_]+)="(.*)"', line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


_ARCH = {"x86_64": "x86", "aarch64": "arm64", "ppc64le": "powerpc", "s390x": "s390"}


def bpf_objects(*names: str) -> dict[str, str]:
    """The test programs NAMES (tests/bpf/NAME.bpf.c), built for the running kernel by
    tests/bpf/Makefile (a no-op once built; every one if no NAMES): NAME -> object path."""
    need_kernel()
    for tool in ("make", "clang", "bpftool"):
        need(shutil.which(tool) is not None, f"{tool} (to build tests/bpf)")
    arch = _ARCH.get(platform.machine(), platform.machine())
    p = subprocess.run(["make", "-s", f"-j{os.cpu_count() or 1}", "-C", str(BPF_SRC),
                        f"ARCH={arch}", *(f"build/{n}.bpf.o" for n in names)],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0, f"building tests/bpf failed:\n{p.stdout}\n{p.stderr}"
    return {n: str(BPF_BUILD / f"{n}.bpf.o") for n in names}


def fixed_output(letter: str) -> bytes:
    """What one seq_file of tests/bpf/fixed_LETTER.bpf.c (A or B) reads."""
    return b"".join(f"{letter} {i:04d} fixed output of program {letter}\n".encode()
                    for i in range(FIXED_LINES))


def children(pid: int) -> list[int]:
    return [int(c) for task in os.listdir(f"/proc/{pid}/task")
            for c in open(f"/proc/{pid}/task/{task}/children").read().split()]


def _server_below(pid: int) -> int | None:
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            cmd, kids = open(f"/proc/{p}/cmdline", "rb").read(), children(p)
            for k in kids:
                if b"mount" in cmd and open(f"/proc/{k}/cmdline", "rb").read() == cmd:
                    return k
        except OSError:
            continue
        todo += kids
    return None


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

    @property
    def pid(self) -> int:
        """The server's pid: the child the keeper (the command's process, or below
        the prefix's) forked, with the keeper's command line (keeper.py)."""
        assert self.proc
        found = eventually(lambda: _server_below(self.proc.pid) is not None, 10)
        assert found, f"no server below pid {self.proc.pid}: {self.output()}"
        return _server_below(self.proc.pid)  # type: ignore[return-value]

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
