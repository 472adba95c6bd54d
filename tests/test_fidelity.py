"""Fidelity: what a reader gets through the mount is what the kernel gives from the pin.

Every test compares bytes read through MNT/TARGET/NAME (with cat, dd, head -c,
Python reads, less) with bytes read straight from the pin STATE/TARGET/NAME in
the daemon's bpffs, which is what the kernel makes of the dumper without
bpfdumpfs in between.

The test dumpers (tests/bpf/*.bpf.c, built by `make -C tests/bpf` when the
session starts) are deterministic by construction: task_file dumpers made with
a pid parameter over a helper process holding a fixed set of fds (dups of
/dev/null), and cgroup dumpers over a test cgroup tree, printing lines made
only of the fd number, the object's place in the dump or the cgroup id. Their
output is also computed here in Python, so the pin itself is checked too.
They cover the kernel's awkward cases: several MB of output; objects that
overflow the 32 KiB seq_file buffer (dropped and re-run); a program returning
1 ("retry this object": EAGAIN); a million objects without output (EAGAIN);
one object larger than the buffer (E2BIG); a cgroup dump over one buffer
(EOPNOTSUPP); and, where the kernel allows it, a bpf_map_elem dumper with a
map parameter.

Built-in dumpers are not deterministic (tasks, sockets and BPF objects come
and go); each is read straight from its pin before and after it is read
through the mount (by `cat`, and by 4 KiB reads), and the lines that are the
same before and after must come through the mount unchanged, in order and
exactly as often (sockets: as a set; counters, timers and the readers' own
processes masked).
"""
from __future__ import annotations

import collections
import concurrent.futures
import difflib
import errno
import functools
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import (
    BPF_BUILD,
    BPF_SRC,
    Daemon,
    bpf_objects,
    bpftool_json,
    cgroup2_root,
    eventually,
    mount_bpffs,
    need,
    readline,
    unmount,
)

from bpfdumpfs import Dumper, Params, StateDir
from bpfdumpfs.builtins import builtins

# -- what the test programs print (mirrors tests/bpf/*.bpf.c) --------------------------

B64 = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/"
FILLER = B64 * 64                       # filler[] of fidelity.h: 4096 bytes
KNUTH = 2654435761
FDS = 20_000        # fds 0..19999 in each fd table of a helper (RLIMIT_NOFILE here: 20000)
END = b"# end\n"    # every test dumper's last line (its epilogue)
CGROUP_KIDS = 12    # the test cgroup tree: one parent and 12 children


def fd_line(fd: int) -> bytes:
    """FD_LINE of fidelity.h: 300 bytes."""
    off = fd % 64
    return b"fd %05d check %08x " % (fd, fd * KNUTH % 2**32) + FILLER[off:off + 275] + b"\n"


def expect_big() -> bytes:
    return (b"# fidelity big: fd check pad\n" + b"".join(fd_line(fd) for fd in range(FDS))
            + END)


def expect_overflow() -> bytes:
    def line(fd: int) -> bytes:
        off, n = fd % 64, 2900 + (fd % 16) * 5
        return b"fd %05d " % fd + FILLER[off:off + n] + b"\n"
    return b"".join(line(fd) for fd in range(2000)) + END


def expect_eagain() -> bytes:
    return b"".join(fd_line(fd) for fd in range(8000)) + END


def expect_e2big_before_error() -> bytes:
    """Everything fid_e2big prints before fd 2500, whose 40,000 bytes never fit."""
    return b"".join(fd_line(fd) for fd in range(2500))


def expect_silent(objects: int) -> bytes:
    silent = 1_000_050
    return (b"".join(b"obj %07d fd %05d\n" % (n, n % FDS) for n in range(silent, objects))
            + END)


def expect_cgroups(top: Path, pad: int) -> bytes:
    """fid_cgroup_*: the test tree in pre-order (parent, then children as created)."""
    level = len(top.relative_to(cgroup2_root()).parts)
    dirs = [(top, level)] + [(top / f"c{i:02d}", level + 1) for i in range(CGROUP_KIDS)]
    return b"".join(b"cgroup %d level %d " % (os.stat(d).st_ino, lv) + FILLER[:pad] + b"\n"
                    for d, lv in dirs)


# -- reading ----------------------------------------------------------------------------

@dataclass
class PinRead:
    """What one open() of a pin gave, read with plain read(2)s."""
    data: bytes
    eagain: int              # reads that failed with EAGAIN (and were retried)
    error: OSError | None    # what ended the stream, if not EOF


def read_pin(path: Path, size: int = 1 << 20) -> PinRead:
    """Read a pin straight from the bpffs, retrying EAGAIN as the kernel asks."""
    fd = os.open(path, os.O_RDONLY)
    chunks, eagain = [], 0
    try:
        while True:
            try:
                b = os.read(fd, size)
            except BlockingIOError:
                eagain += 1
                assert eagain < 10_000_000, f"{path}: EAGAIN without end"
                continue
            except OSError as e:
                return PinRead(b"".join(chunks), eagain, e)
            if not b:
                return PinRead(b"".join(chunks), eagain, None)
            chunks.append(b)
    finally:
        os.close(fd)


def sh(*cmd: str, timeout: float = 120, stdin_path: Path | None = None
       ) -> subprocess.CompletedProcess:
    if stdin_path is None:
        return subprocess.run(cmd, capture_output=True, timeout=timeout)
    with open(stdin_path, "rb") as f:
        return subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=f)


# opens FILE, sends its fd over a unix socket at SOCK, and exits
OPEN_AND_SEND = """
import os, socket, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[2]); s.listen(1); print("ready", flush=True)
c, _ = s.accept()
socket.send_fds(c, [b"x"], [fd])
"""


def _receive_fd(sock: Path, opener: subprocess.Popen) -> int:
    assert readline(opener.stdout, what="the opener ready") == b"ready\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))
        _, fds, _, _ = socket.recv_fds(s, 1, 1)
    return fds[0]


def ok(p: subprocess.CompletedProcess) -> bytes:
    """stdout of a command that must succeed silently."""
    assert (p.returncode, p.stderr) == (0, b""), \
        f"{shlex.join(map(str, p.args))}: exit {p.returncode}, stderr {p.stderr!r}"
    return p.stdout


def py_read(path: Path, size: int) -> bytes:
    """Unbuffered Python reads of SIZE bytes (one read(2), one FUSE read each) until EOF."""
    chunks = []
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(size):
            assert len(chunk) <= size
            chunks.append(chunk)
    return b"".join(chunks)


# Whole reads through the mount: reader name -> function(path) -> bytes.
WHOLE = {
    "cat": lambda p: ok(sh("cat", str(p))),
    "dd-bs=1M": lambda p: ok(sh("dd", f"if={p}", "bs=1M", "status=none")),
    "python-4KiB": lambda p: py_read(p, 4096),
    "python-64KiB": lambda p: py_read(p, 65536),
}
# head -c N, around the page size, the seq_file buffer size, inside and past the end.
HEAD_SIZES = [1, 4095, 4096, 4097, 32768, 32769, 1_000_003, 10**9]
DD1_PREFIX = 3000   # dd bs=1 costs one FUSE round trip per byte: read a prefix of big dumps


def diff(a: list[str], b: list[str], n: int = 12) -> str:
    out = list(difflib.unified_diff(a, b, "pin", "mount", lineterm="", n=1))
    return "\n".join(x[:160] for x in out[:n]) + ("\n..." if len(out) > n else "")


def bytes_diff(want: bytes, got: bytes) -> str:
    """Where two byte strings part, for assertion messages (not 6 MB reprs)."""
    pairs = enumerate(zip(want, got, strict=False))  # the shorter one may end first
    i = next((k for k, (x, y) in pairs if x != y), min(len(want), len(got)))
    return (f"pin {len(want)} bytes, mount {len(got)} bytes; first difference at byte {i}: "
            f"pin {want[max(0, i - 40):i + 40]!r} / mount {got[max(0, i - 40):i + 40]!r}")


def same(want: bytes, got: bytes) -> bool:
    """want == got, as a call: pytest would otherwise diff megabytes on failure."""
    return want == got


LOG_PROBLEM = re.compile(r"\b(ERROR|WARNING|CRITICAL)\b")


def log_lines(tree, since: int, needle: str, timeout: float = 5.0) -> list[str]:
    """Error and warning lines of the daemon's log, written after offset SINCE, that
    contain NEEDLE (waits up to TIMEOUT for the first; none if none came)."""
    def found() -> list[str]:
        return [ln for ln in tree.output()[since:].splitlines()
                if needle in ln and LOG_PROBLEM.search(ln)]
    eventually(found, timeout, step=0.05)
    return found()


# -- fixtures: the test dumpers ---------------------------------------------------------

@pytest.fixture(scope="session")
def bpf_objs() -> Path:
    """The directory of tests/bpf/fid_*.bpf.c built for the running kernel."""
    bpf_objects(*(p.name.removesuffix(".bpf.c") for p in BPF_SRC.glob("fid_*.bpf.c")))
    return BPF_BUILD


HOLDER = r"""
import ctypes, os, resource, sys, threading
fds, tables = int(sys.argv[1]), int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if hard != resource.RLIM_INFINITY and hard < fds:
    sys.exit(f"RLIMIT_NOFILE hard limit {hard} < {fds}")
resource.setrlimit(resource.RLIMIT_NOFILE, (fds, hard))
libc = ctypes.CDLL(None, use_errno=True)

def fill():  # this task's fd table: 0, 1, 2 (pipes) and 3..fds-1 (/dev/null)
    base = os.open("/dev/null", os.O_RDONLY)
    if base != 3:
        sys.exit(f"fd 3 was taken ({base})")
    for fd in range(4, fds):
        os.dup2(base, fd, inheritable=False)

made = threading.Semaphore(0)

def table():  # a thread with an fd table of its own (unshare CLONE_FILES)
    if libc.unshare(0x400):
        os._exit(3)
    os.closerange(3, fds)
    fill()
    made.release()
    threading.Event().wait()

fill()
for _ in range(tables - 1):
    threading.Thread(target=table, daemon=True).start()
    made.acquire()
print(os.getpid(), flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


class Holder:
    """A process whose TABLES fd tables each hold fds 0..FDS-1, unchanged until close()."""

    def __init__(self, tables: int = 1) -> None:
        self.objects = FDS * tables
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(FDS), str(tables)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        line = readline(self.proc.stdout, what=f"a helper holding {FDS} fds")
        if not line:
            self.proc.wait(timeout=30)
            need(False, f"a helper holding {FDS} fds: {self.proc.stderr.read().decode()}")
        self.pid = int(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@dataclass
class Pinned:
    """A test dumper pinned at STATE/TARGET/NAME, so also at MNT/TARGET/NAME."""
    pin: Path
    mnt: Path
    expected: bytes | None = None   # its whole output, computed in Python

    @property
    def label(self) -> str:         # how the daemon names it
        return f"{self.pin.parent.name}/{self.pin.name}"

    @functools.cached_property
    def ref(self) -> PinRead:
        """The pin read straight from the bpffs, once."""
        return read_pin(self.pin)


def pin(tree, obj: str, name: str, params: Params, expected: bytes | None = None) -> Pinned:
    with Dumper.load(BPF_BUILD / f"fid_{obj}.bpf.o", params=params) as d:
        path = d.pin(StateDir(tree.state), name)
    return Pinned(path, tree.mnt / path.parent.name / path.name, expected)


@pytest.fixture(scope="class")
def cgroups():
    """A test cgroup tree: a parent and CGROUP_KIDS children, removed after the class."""
    top = cgroup2_root() / f"bpfdumpfs-fidelity-{os.getpid()}"
    top.mkdir()
    kids = [top / f"c{i:02d}" for i in range(CGROUP_KIDS)]
    try:
        for k in kids:
            k.mkdir()
        yield top
    finally:
        for k in kids:
            if k.exists():
                k.rmdir()
        top.rmdir()


@pytest.fixture(scope="class")
def dumpers(tree, bpf_objs, cgroups):
    """The deterministic test dumpers, pinned in the daemon's state dir for one class."""
    holder = Holder()
    made: dict[str, Pinned] = {}
    fds = Params(pid=holder.pid)
    try:
        made["big"] = pin(tree, "big", "fidelity_big", fds, expect_big())
        made["overflow"] = pin(tree, "overflow", "fidelity_overflow", fds, expect_overflow())
        made["eagain"] = pin(tree, "eagain", "fidelity_eagain", fds, expect_eagain())
        made["e2big"] = pin(tree, "e2big", "fidelity_e2big", fds)
        tree_params = Params(order="pre", cgroup=str(cgroups))
        made["cgroup_small"] = pin(tree, "cgroup_small", "fidelity_cgroup_small", tree_params,
                                   expect_cgroups(cgroups, 700))
        made["cgroup_big"] = pin(tree, "cgroup_big", "fidelity_cgroup_big", tree_params)
        yield made
    finally:
        for d in made.values():
            d.pin.unlink(missing_ok=True)
        holder.close()


def bss_u64(pin_path: Path) -> int:
    """The first 8 bytes of .bss of the program behind a pinned link (fid_overflow: reruns)."""
    link = bpftool_json("link", "show", "pinned", str(pin_path))
    prog = bpftool_json("prog", "show", "id", str(link["prog_id"]))
    for m in prog.get("map_ids", []):
        if bpftool_json("map", "show", "id", str(m))["name"].endswith(".bss"):
            [entry] = bpftool_json("map", "dump", "id", str(m))
            return int.from_bytes(bytes(int(x, 16) for x in entry["value"][:8]), "little")
    raise AssertionError(f"no .bss map behind {pin_path}")


# The cgroup iterator fails any read that starts after one that stopped short of
# the end (EOPNOTSUPP), even when the whole dump fits one 32 KiB buffer: readers
# whose reads are smaller than the dump (4 KiB, dd bs=1, head -c) must still get
# it all, since the daemon reads the kernel with room for a whole buffer.
MATRIX_DUMPERS = ["big", "overflow", "eagain", "cgroup_small"]
READERS = [*WHOLE, *(f"head-c{n}" for n in HEAD_SIZES), "dd-bs=1"]


def matrix():
    for d in MATRIX_DUMPERS:
        for r in READERS:
            yield pytest.param(d, r, id=f"{d}-{r}")


def read_through_mount(reader: str, path: Path, whole: bytes) -> tuple[bytes, bytes]:
    """(what READER gets through the mount, the part of WHOLE it must equal)."""
    if reader in WHOLE:
        return WHOLE[reader](path), whole
    if reader.startswith("head-c"):
        n = int(reader.removeprefix("head-c"))
        return ok(sh("head", "-c", str(n), str(path))), whole[:n]
    assert reader == "dd-bs=1"
    n = DD1_PREFIX if len(whole) > 4 * DD1_PREFIX else len(whole) + 1
    return ok(sh("dd", f"if={path}", "bs=1", f"count={n}", "status=none")), whole[:n]


class TestDeterministicDumpers:
    """The test dumpers: output known in advance, the same on every open."""

    @pytest.mark.parametrize("name", ["big", "overflow", "eagain", "cgroup_small"])
    def test_pin_prints_what_the_program_is_built_to(self, dumpers, name):
        d = dumpers[name]
        assert d.ref.error is None, f"{d.pin}: {d.ref.error}"
        assert same(d.expected, d.ref.data), bytes_diff(d.expected, d.ref.data)
        if name == "big":
            assert len(d.ref.data) > 5_000_000

    @pytest.mark.parametrize("dumper,reader", list(matrix()))
    def test_reader_through_mount_gets_the_pins_bytes(self, tree, dumpers, dumper, reader):
        d = dumpers[dumper]
        assert d.ref.error is None and same(d.ref.data, d.expected)
        got, want = read_through_mount(reader, d.mnt, d.ref.data)
        assert same(want, got), f"{reader} of {d.label}: {bytes_diff(want, got)}"

    def test_objects_dropped_at_buffer_overflow_are_rerun_not_lost(self, tree, dumpers):
        """~3 KB per object: about ten fit the 32 KiB buffer, the next is dropped and re-run."""
        d = dumpers["overflow"]
        before = bss_u64(d.pin)
        ref = read_pin(d.pin)
        between = bss_u64(d.pin)
        assert between > before, "the kernel re-ran no object: the test proves nothing"
        assert ref.error is None and same(d.expected, ref.data)
        got = WHOLE["cat"](d.mnt)
        assert bss_u64(d.pin) > between, "no object re-run while reading through the mount"
        assert same(ref.data, got), bytes_diff(ref.data, got)

    def test_eagain_is_retried_by_the_daemon_never_shown(self, tree, dumpers):
        """Odd fds make the program return 1 twice: the kernel's read fails with EAGAIN."""
        d = dumpers["eagain"]
        ref = read_pin(d.pin)
        assert ref.eagain > 0, "the kernel never gave EAGAIN: the test proves nothing"
        assert ref.error is None and same(d.expected, ref.data)
        since = len(tree.output())
        for reader in WHOLE:
            got = WHOLE[reader](d.mnt)  # ok(): exit 0 and nothing on stderr
            assert same(ref.data, got), f"{reader}: {bytes_diff(ref.data, got)}"
        assert log_lines(tree, since, d.label, timeout=0) == []

    def test_less_shows_the_first_page_G_reaches_the_end_g_comes_back(self, tree, dumpers,
                                                                       tmp_path):
        need(shutil.which("tmux") is not None and shutil.which("less") is not None,
             "tmux and less")
        d = dumpers["big"]
        width = 200
        rows = [ln[i:i + width] for ln in d.expected.decode().splitlines()
                for i in range(0, max(len(ln), 1), width)]
        tmux = ["tmux", "-S", str(tmp_path / "tmux"), "-f", "/dev/null"]  # a server of our own
        env = {k: v for k, v in os.environ.items() if not k.startswith("LESS")}
        env["TERM"] = "xterm"
        subprocess.run(tmux + ["new-session", "-d", "-x", str(width), "-y", "50",
                               f"less {shlex.quote(str(d.mnt))}"], env=env, check=True)

        def screen(until, what: str) -> list[str]:
            shown = []

            def showing() -> bool:
                shown[:] = subprocess.run(tmux + ["capture-pane", "-p"], capture_output=True,
                                          text=True, check=True).stdout.split("\n")
                return until(shown)
            assert eventually(showing, 30, step=0.1), f"less never showed {what}:\n" + \
                "\n".join(shown)
            return shown
        try:
            height = int(subprocess.run(tmux + ["display", "-p", "#{pane_height}"],
                                        capture_output=True, text=True, check=True).stdout)
            page = height - 1  # the last row is less's prompt
            first = screen(lambda s: s[0] == rows[0] and len(s) > page and s[page - 1] != "",
                           "the first page")
            assert first[:page] == rows[:page]
            subprocess.run(tmux + ["send-keys", "G"], check=True)
            last = screen(lambda s: END.decode().strip() in s[:page], "the end after G")
            assert last[:page] == rows[-page:], diff(rows[-page:], last[:page])
            # less keeps 64 KiB of a seekable file: the start, 6 MB back, is read again
            subprocess.run(tmux + ["send-keys", "g"], check=True)
            again = screen(lambda s: s[0] == rows[0], "the first page after g")
            assert again[:page] == rows[:page], diff(rows[:page], again[:page])
        finally:
            subprocess.run(tmux + ["kill-server"], capture_output=True)

    # -- seeking, as /proc's seq_files do (seek.py) ------------------------------------------

    def test_head_n_is_quiet_and_reads_on_where_the_last_stopped(self, tree, dumpers):
        d = dumpers["big"]
        lines = d.expected.splitlines(keepends=True)
        assert ok(sh("head", "-n", "5", str(d.mnt))) == b"".join(lines[:5])
        # each head reads a block and seeks back to its last line's end: the next goes on
        got = ok(sh("sh", "-c", 'head -n 1; head -n 2; head -n 1 >/dev/null; head -n 1',
                    stdin_path=d.mnt))
        assert got == b"".join(lines[:3] + lines[4:5])

    def test_tail_and_dd_skip_get_the_pins_bytes(self, tree, dumpers):
        d = dumpers["big"]
        lines = d.expected.splitlines(keepends=True)
        assert ok(sh("tail", "-n", "3", str(d.mnt))) == b"".join(lines[-3:])
        for skip, count in ((0, 10), (70_000, 5000), (5_000_001, 300)):
            got = ok(sh("dd", f"if={d.mnt}", "bs=1", f"skip={skip}", f"count={count}",
                        "status=none"))
            assert got == d.expected[skip:skip + count], (skip, count)

    def test_pread_at_any_offset_gets_the_pins_bytes(self, tree, dumpers):
        d = dumpers["big"]
        want = d.expected
        fd = os.open(d.mnt, os.O_RDONLY)
        try:
            # ahead, a little back (kept), far back (a re-run), past the end, ahead again
            for off in (0, 100, 5000, 3_000_000, 3_000_000 - 40_000, 1_000, len(want) - 7,
                        len(want), len(want) + 4096, 2_500_000, 4):
                assert os.pread(fd, 4096, off) == want[off:off + 4096], off
            os.lseek(fd, 1_000_000, os.SEEK_SET)  # and read(2) goes on from a seek
            assert os.read(fd, 100) == want[1_000_000:1_000_100]
        finally:
            os.close(fd)

    def test_preads_from_threads_on_one_file_each_get_their_offset(self, tree, dumpers):
        d = dumpers["big"]
        want = d.expected
        offsets = [((i * 7919) % 97) * 50_000 for i in range(64)]
        fd = os.open(d.mnt, os.O_RDONLY)
        try:
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                got = list(pool.map(lambda off: os.pread(fd, 30_000, off), offsets))
        finally:
            os.close(fd)
        for off, data in zip(offsets, got, strict=True):
            assert data == want[off:off + 30_000], off

    def test_a_seek_back_re_runs_only_for_the_opener(self, tree, dumpers, tmp_path):
        """A task_file dumper in the reader's view: another process given the open file
        reads on, but a seek back past what this open kept (a re-run, in the opener's
        namespaces) fails with ESTALE once the opener is gone."""
        d = dumpers["big"]
        want = d.expected
        opener = subprocess.Popen(
            [sys.executable, "-c", OPEN_AND_SEND, str(d.mnt), str(tmp_path / "sock")],
            stdout=subprocess.PIPE)
        fd = _receive_fd(tmp_path / "sock", opener)
        try:
            opener.wait(timeout=30)
            assert os.pread(fd, 4096, 2_000_000) == want[2_000_000:2_004_096]
            assert os.pread(fd, 4096, 2_000_000 - 10_000) == want[1_990_000:1_994_096]
            with pytest.raises(OSError) as e:
                os.pread(fd, 4096, 0)
            assert e.value.errno == errno.ESTALE
        finally:
            os.close(fd)
        assert ok(sh("head", "-c", "4096", str(d.mnt))) == want[:4096]  # a new open is fine

    @pytest.mark.xfail(strict=True, reason="kernel: splice from a FOPEN_DIRECT_IO FUSE file "
                       "reads the page cache, empty at size 0 (fix: 'fuse: use "
                       "copy_splice_read() for FOPEN_DIRECT_IO splice read', May 2026)")
    @pytest.mark.parametrize("how", ["splice", "sendfile", "shutil.copyfile"])
    def test_splice_and_sendfile_get_the_pins_bytes(self, tree, dumpers, how, tmp_path):
        d = dumpers["big"]
        fd = os.open(d.mnt, os.O_RDONLY)
        try:
            if how == "splice":
                r, w = os.pipe()
                n = os.splice(fd, w, 65536)
                got = os.read(r, n) if n else b""
                os.close(r)
                os.close(w)
                assert got == d.expected[:len(got)] and len(got) > 0
            elif how == "sendfile":
                with open(tmp_path / "copy", "wb") as out:
                    n = os.sendfile(out.fileno(), fd, 0, 1 << 20)
                assert n > 0 and (tmp_path / "copy").read_bytes() == d.expected[:n]
            else:
                shutil.copyfile(d.mnt, tmp_path / "copy")
                assert same(d.expected, (tmp_path / "copy").read_bytes())
        finally:
            os.close(fd)

    # -- errors: E2BIG and EOPNOTSUPP reach the reader as from the pin, logged once -------

    @pytest.mark.parametrize("dumper,errname,cause", [
        ("e2big", "E2BIG", "buffer"),           # one object over the 32 KiB buffer
        ("cgroup_big", "EOPNOTSUPP", "buffer"),  # a cgroup dump over one buffer
    ])
    @pytest.mark.parametrize("reader", ["cat", "dd-bs=1M", "python-64KiB"])
    def test_kernel_error_reaches_the_reader_as_from_the_pin_and_one_log_line(
            self, tree, dumpers, dumper, errname, cause, reader):
        d = dumpers[dumper]
        err = getattr(errno, errname)
        ref = read_pin(d.pin)
        assert ref.error is not None and ref.error.errno == err, ref.error
        assert ref.data and ref.data.endswith(b"\n")  # whole lines came before the error
        if dumper == "e2big":
            assert same(expect_e2big_before_error(), ref.data)
        since = len(tree.output())
        if reader == "python-64KiB":
            got = b""
            with open(d.mnt, "rb", buffering=0) as f:
                with pytest.raises(OSError) as e:
                    while chunk := f.read(65536):
                        got += chunk
                assert e.value.errno == err
                with pytest.raises(OSError) as again:  # and it stays failed
                    f.read(65536)
                assert again.value.errno == err
        else:
            cmd = ["cat", str(d.mnt)] if reader == "cat" else \
                ["dd", f"if={d.mnt}", "bs=1M", "status=none"]
            p = sh(*cmd)
            assert p.returncode == 1 and os.strerror(err).encode() in p.stderr, p
            got = p.stdout
        assert ref.data.startswith(got), "the reader got bytes the kernel never gave"
        logged = log_lines(tree, since, d.label)
        assert len(logged) == 1, f"want one log line naming {d.label}: {logged}"
        # EOPNOTSUPP is also ENOTSUP, "Operation not supported"
        names = {errname, errno.errorcode[err], os.strerror(err)}
        assert any(n in logged[0] for n in names) and cause in logged[0], logged[0]

    @pytest.mark.parametrize("dumper,reader", [
        ("e2big", "cat"),           # should print all 750,000 bytes, then fail
        ("cgroup_big", "cat"),      # should print the first buffer (8 cgroups), then fail
        ("e2big", "head-c-all"),    # head -c 750000: every byte exists, should exit 0
    ])
    def test_output_before_a_kernel_error_reaches_the_reader(self, tree, dumpers, dumper,
                                                             reader):
        d = dumpers[dumper]
        ref = read_pin(d.pin)
        assert ref.error is not None and ref.data
        if reader == "cat":
            p = sh("cat", str(d.mnt))
            assert p.returncode == 1
            assert same(ref.data, p.stdout), bytes_diff(ref.data, p.stdout)
        else:
            got = ok(sh("head", "-c", str(len(ref.data)), str(d.mnt)))
            assert same(ref.data, got), bytes_diff(ref.data, got)

    def test_output_before_an_oversized_object_reads_fine(self, tree, dumpers):
        """Reads that end well before the object that fails get their bytes, no error."""
        d = dumpers["e2big"]
        want = expect_e2big_before_error()
        since = len(tree.output())
        for n in (1, 4096, 300_000):
            assert same(want[:n], ok(sh("head", "-c", str(n), str(d.mnt))))
        assert log_lines(tree, since, d.label, timeout=0) == []


# -- a million objects without output ----------------------------------------------------

def test_a_million_silent_objects_then_output(tree, bpf_objs):
    """The kernel gives EAGAIN after 1,000,000 objects without output; the reader sees none.

    A helper with 51 fd tables of 20,000 fds: 1,020,000 task_file objects, of
    which fid_silent prints the last 19,950 (and "# end").
    """
    holder = Holder(tables=51)
    try:
        d = pin(tree, "silent", "fidelity_silent", Params(pid=holder.pid),
                expect_silent(holder.objects))
        try:
            assert d.ref.eagain > 0, "the kernel never gave EAGAIN: the test proves nothing"
            assert d.ref.error is None and same(d.expected, d.ref.data), \
                bytes_diff(d.expected, d.ref.data)
            since = len(tree.output())
            for reader in ("cat", "dd-bs=1M", "python-64KiB"):
                got = WHOLE[reader](d.mnt)
                assert same(d.ref.data, got), f"{reader}: {bytes_diff(d.ref.data, got)}"
            assert log_lines(tree, since, d.label, timeout=0) == []
        finally:
            d.pin.unlink(missing_ok=True)
    finally:
        holder.close()


# -- a program that never gets past an object ----------------------------------------------

def proc_wait_state(pid: int) -> str:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return f"state {state}, waiting in {Path(f'/proc/{pid}/wchan').read_text()}"
    except OSError as e:
        return str(e)


def test_a_dump_that_never_progresses_fails_the_read_instead_of_hanging(bpf_objs, tmp_path):
    """The kernel answers every read of this dumper with EAGAIN: `cat` of the pin fails
    at once. Through the mount the reader must get an error too, not hang."""
    state = mount_bpffs(tmp_path / "state")
    d = Daemon(tmp_path / "mnt", state, "--no-builtins")  # not the session's: it may wedge
    reader = None
    try:
        d.start()
        pin_path = state / "task" / "forever"
        pin_path.parent.mkdir()
        subprocess.run(["bpftool", "iter", "pin", str(bpf_objs / "fid_retry_forever.bpf.o"),
                        str(pin_path)], check=True, capture_output=True)
        direct = sh("cat", str(pin_path), timeout=10)
        assert direct.returncode == 1 and b"Resource temporarily unavailable" in direct.stderr
        reader = subprocess.Popen(["cat", str(d.mnt / "task" / "forever")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            reader.wait(timeout=3)
        except subprocess.TimeoutExpired:
            blocked = proc_wait_state(reader.pid)
            reader.kill()
            try:
                reader.wait(timeout=2)
                killed = "SIGKILL ended it"
            except subprocess.TimeoutExpired:
                killed = f"SIGKILL did not end it ({proc_wait_state(reader.pid)})"
            raise AssertionError(f"cat through the mount still blocked after 3 s ({blocked}); "
                                 f"{killed}") from None
        assert reader.returncode != 0
    finally:
        if reader is not None and reader.poll() is None:
            d.kill()  # only the daemon's death frees a reader stuck in a FUSE read
            reader.wait(timeout=30)
        d.stop()
        unmount(state)


# -- a dumper with a map parameter ---------------------------------------------------------

MAP_ELEMS = 20_000


def test_map_parameter_dumper(tree, bpf_objs):
    """bpf_map_elem over an array map made and filled with bpftool, pinned with bpftool."""
    maps = tree.state / "fidelity-test-maps"   # not a target: the tree does not show it
    maps.mkdir(exist_ok=True)
    mp = maps / "elems"
    link = tree.state / "bpf_map_elem" / "fidelity_map"
    link.parent.mkdir(exist_ok=True)
    try:
        subprocess.run(["bpftool", "map", "create", str(mp), "type", "array", "key", "4",
                        "value", "8", "entries", str(MAP_ELEMS), "name", "fidelity_elems"],
                       check=True, capture_output=True)
        value = {k: (k * KNUTH) ^ 0x5A5A_0000_0000_5A5A for k in range(MAP_ELEMS)}
        batch = Path(f"/tmp/bpfdumpfs-fidelity-{os.getpid()}.batch")
        batch.write_text("".join(
            f"map update pinned {mp} key {' '.join(str(b) for b in k.to_bytes(4, 'little'))} "
            f"value {' '.join(str(b) for b in v.to_bytes(8, 'little'))}\n"
            for k, v in value.items()))
        try:
            subprocess.run(["bpftool", "batch", "file", str(batch)], check=True,
                           capture_output=True)
        finally:
            batch.unlink()
        p = subprocess.run(["bpftool", "iter", "pin", str(bpf_objs / "fid_mapelem.bpf.o"),
                            str(link), "map", "pinned", str(mp)], capture_output=True, text=True)
        if p.returncode != 0 and "Operation not permitted" in p.stderr:
            # Not a skip: the kernel says no. On a kernel that loads them, all of it runs.
            pytest.xfail("this kernel refuses every bpf_map_elem program (even `return 0`) "
                         "with EPERM before verifying it (verifier log: processed 0 insns)")
        assert p.returncode == 0, p.stderr
        expected = b"".join(b"elem %07d value %016x\n" % (k, v) for k, v in value.items()) + END
        ref = read_pin(link)
        assert ref.error is None and same(expected, ref.data), bytes_diff(expected, ref.data)
        mnt = tree.mnt / "bpf_map_elem" / "fidelity_map"
        for reader in READERS:
            got, want = read_through_mount(reader, mnt, ref.data)
            assert same(want, got), f"{reader}: {bytes_diff(want, got)}"
    finally:
        link.unlink(missing_ok=True)
        mp.unlink(missing_ok=True)
        maps.rmdir()


# -- built-in dumpers: read through the mount against their pins --------------------------

def _plain(lines: list[str], skip: set[int]) -> list[str]:
    return lines


def _without_pids(regex: str, state_col: bool = False):
    """Drop the lines of processes in SKIP (the test, the daemon, the reader: their own
    files, mappings and threads change as they read); mask a task's state letter."""
    rx = re.compile(regex)

    def norm(lines: list[str], skip: set[int]) -> list[str]:
        out = []
        for ln in lines:
            m = rx.match(ln)
            if m and int(m.group("pid")) in skip:
                continue
            if m and state_col:
                ln = ln[:m.start("state")] + "?" + ln[m.end("state"):]
            out.append(ln)
        return out
    return norm


def _columns(keep: list[int], data_line: str):
    """Keep only the stable columns of data lines (counters, timers, refcounts vary)."""
    rx = re.compile(data_line)

    def norm(lines: list[str], skip: set[int]) -> list[str]:
        out = []
        for ln in lines:
            if rx.match(ln):
                cols = ln.split()
                ln = " ".join(cols[i] for i in keep if i < len(cols))
            out.append(ln)
        return out
    return norm


_proc_net_socket = _columns([1, 2, 3, 7, 9], r"^\s*\d+: ")   # local rem st uid inode
# name -> (normalizer, compare as sets?). Socket dumps may show a socket twice across
# chunked reads (it moves between hash buckets), so they compare as sets.
BUILTIN_NORMS = {
    "tasks": (_without_pids(r"^\s*\d+\s+(?P<pid>\d+)\s+\d+ (?P<state>\S) ", True), False),
    "files": (_without_pids(r"^\s*(?P<pid>\d+)\s+\d+ "), False),
    "vmas": (_without_pids(r"^(?P<pid>\d+) "), False),
    "tcp": (_proc_net_socket, True),
    "tcp6": (_proc_net_socket, True),
    "udp": (_proc_net_socket, True),
    "udp6": (_proc_net_socket, True),
    "unix": (_columns([0, 2, 3, 4, 5, 6, 7], r"^[0-9a-f]+: "), True),
    "netlink": (_columns([0, 1, 2, 3, 9], r"^[0-9a-f]{16} "), True),
    "ipv6_route": (_columns([0, 1, 2, 3, 4, 5, 8, 9], r"^[0-9a-f]{32} "), True),
}


def consistent(a: bytes, b: bytes, c: bytes, norm, sets: bool, skip: set[int]) -> str | None:
    """None if B (through the mount) fits reads A (before) and C (after) of the pin.

    If A and C are the same, nothing changed: B must equal them. Otherwise the
    lines with the same count in A and C must appear in B as often, in A's or
    C's order, and no line of A or C may appear in B more often than in both.
    """
    if a.endswith(b"\n") and c.endswith(b"\n") and not b.endswith(b"\n"):
        return f"the mount's output ends mid-line: {b[-80:]!r}"
    la, lb, lc = (norm(x.decode("latin-1").split("\n"), skip) for x in (a, b, c))
    if sets:
        la, lb, lc = sorted(set(la)), sorted(set(lb)), sorted(set(lc))
    if la == lc:
        return None if lb == la else "nothing changed between the pin reads, yet:\n" + \
            diff(la, lb)
    ca, cb, cc = (collections.Counter(x) for x in (la, lb, lc))
    stable = {ln for ln, n in ca.items() if cc[ln] == n}
    sa, sb, sc = ([ln for ln in x if ln in stable] for x in (la, lb, lc))
    if sb != sa and sb != sc:
        return "lines the same before and after differ through the mount:\n" + diff(sa, sb)
    extra = [ln for ln, n in cb.items() if (ln in ca or ln in cc) and n > max(ca[ln], cc[ln])]
    if extra:
        return f"lines repeated through the mount: {extra[:5]}"
    return None


def read_in_subprocess(reader: str, path: Path) -> tuple[bytes, int]:
    """(bytes READER gets from PATH, the pid that read them)."""
    if reader == "cat":
        cmd = ["cat", str(path)]
    else:
        assert reader == "python-4KiB"
        cmd = [sys.executable, "-c", "import sys\nwith open(sys.argv[1], 'rb', buffering=0) as f:"
               "\n    while b := f.read(4096): sys.stdout.buffer.write(b)", str(path)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=120)
    assert (p.returncode, err) == (0, b""), f"{reader} {path}: {p.returncode} {err!r}"
    return out, p.pid


@pytest.mark.parametrize("reader", ["cat", "python-4KiB"])
@pytest.mark.parametrize("name", sorted(b.name for b in builtins()))
def test_builtin_through_mount_matches_its_pin(tree, name, reader):
    found = list(tree.mnt.glob(f"*/{name}"))
    assert len(found) == 1, f"built-in {name} not in the tree: {found}"
    mnt = found[0]
    pin_path = tree.state / mnt.parent.name / name
    norm, sets = BUILTIN_NORMS.get(name, (_plain, False))
    why = []
    for _ in range(3):  # the system may change between reads: try again before failing
        before = read_pin(pin_path)
        out, reader_pid = read_in_subprocess(reader, mnt)
        after = read_pin(pin_path)
        assert before.error is None and after.error is None, (before.error, after.error)
        assert before.data, f"{pin_path} is empty: nothing to compare"
        problem = consistent(before.data, out, after.data, norm, sets,
                             {os.getpid(), tree.pid, reader_pid})
        if problem is None:
            return
        why.append(problem)
    pytest.fail(f"{reader} {mnt} against its pin, three times:\n" + "\n---\n".join(why))
