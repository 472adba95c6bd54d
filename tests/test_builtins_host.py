"""The host built-in dumpers (tasks, files, vmas, maps, progs, links, kallsyms,
slabinfo, cgroups) checked against what the kernel shows elsewhere: /proc,
/sys/fs/cgroup and bpftool. Dumper output only ever comes from the
`read_builtin` fixture; everything else is an independent second source."""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    BUILTINS,
    bpftool_json,
    cgroup2_root,
    eventually,
    maps_comparable,
    readline,
)

TASKS_HEADER = "    PID    TGID    PPID S        UID COMM"
FILES_HEADER = "    PID      FD KIND   PATH"
SLAB_HEADER = "name                     objsize    size align flags"


# ---------------------------------------------------------------- helpers

def lines_of(data: bytes) -> list[str]:
    text = data.decode()
    assert text.endswith("\n"), "dump does not end with a newline"
    return text[:-1].split("\n")


def proc_stat(path: str) -> dict:
    """pid, comm, state, ppid of a /proc/.../stat file (comm may hold spaces)."""
    raw = Path(path).read_text()
    head, _, rest = raw.rpartition(")")
    pid, _, comm = head.partition(" (")
    fields = rest.split()
    return {"pid": int(pid), "comm": comm, "state": fields[0], "ppid": int(fields[1])}


def proc_status(path: str) -> dict:
    out = {}
    for line in Path(path).read_text().splitlines():
        key, _, val = line.partition(":")
        out[key] = val.split()
    return out


def wait_for(cond, what, timeout=10.0):
    assert eventually(cond, timeout), f"timed out waiting for {what}"


def proc_state(pid: int) -> str:
    return proc_stat(f"/proc/{pid}/stat")["state"]


def exec_done(pid: int, exe: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/exe") == exe
    except OSError:
        return False


@pytest.fixture
def children():
    procs = []
    yield procs
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGCONT)
                p.kill()
            except ProcessLookupError:
                pass
        p.wait()


def spawn_sleep(children, **kw) -> subprocess.Popen:
    p = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL, **kw)
    children.append(p)
    sleep_bin = os.path.realpath(subprocess.check_output(["sh", "-c", "command -v sleep"],
                                                         text=True).strip())
    wait_for(lambda: exec_done(p.pid, sleep_bin), "sleep to exec")
    return p


# A helper process with known fds and some threads. It reports ready on
# stdout and lives until its stdin closes.
HOLDER = r"""
import os, socket, sys, threading
fds = {}
fds["file"] = os.open("/etc/passwd", os.O_RDONLY)
fds["dir"] = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
r, w = os.pipe(); fds["pipe_r"] = r; fds["pipe_w"] = w
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); fds["socket"] = s.fileno()
fds["anon"] = os.eventfd(0)
fds["chr"] = os.open("/dev/null", os.O_RDONLY)
fifo = sys.argv[1]
os.mkfifo(fifo)
fds["fifo"] = os.open(fifo, os.O_RDWR)
ev = threading.Event()
ts = [threading.Thread(target=ev.wait) for _ in range(3)]
for t in ts: t.start()
print(" ".join(f"{k}={v}" for k, v in fds.items()), flush=True)
sys.stdin.read()
ev.set()
"""


@pytest.fixture
def holder(children, tmp_path):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "fifo")],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    children.append(p)
    fds = dict(kv.split("=") for kv in readline(p.stdout, what="the holder's fds").split())
    wait_for(lambda: len(os.listdir(f"/proc/{p.pid}/task")) == 4, "holder threads")
    yield p, {k: int(v) for k, v in fds.items()}
    p.stdin.close()


@pytest.fixture(scope="module")
def own_bpffs(tmp_path_factory):
    """A private bpffs for objects the tests create with bpftool."""
    d = tmp_path_factory.mktemp("hostbpffs")
    subprocess.run(["mount", "-t", "bpf", "bpf", str(d)], check=True)
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


# ---------------------------------------------------------------- tasks

def parse_tasks(data: bytes) -> dict[int, dict]:
    lines = lines_of(data)
    assert lines[0] == TASKS_HEADER
    tasks = {}
    for line in lines[1:]:
        # fixed-width columns: %7d %7d %7d %c %10u %s
        assert len(line) >= 38 and line[7] == line[15] == line[23] == line[25] == " " \
            and line[36] == " ", f"misaligned task line: {line!r}"
        pid = int(line[0:7])
        assert pid not in tasks, f"task {pid} listed twice"
        tasks[pid] = {"tgid": int(line[8:15]), "ppid": int(line[16:23]), "state": line[24],
                      "uid": int(line[26:36]), "comm": line[37:]}
        assert tasks[pid]["state"] in "RSDTtXZPI"
    return tasks


def expected_task(stat_path: str, status_path: str) -> dict:
    st, status = proc_stat(stat_path), proc_status(status_path)
    return {"tgid": int(status["Tgid"][0]), "ppid": st["ppid"], "state": st["state"],
            "uid": int(status["Uid"][0]), "comm": st["comm"]}


def test_tasks_match_proc(read_builtin, children, holder):
    sleeper = spawn_sleep(children)
    nobody = spawn_sleep(children, user=65534)
    stopped = spawn_sleep(children)
    os.kill(stopped.pid, signal.SIGSTOP)
    wait_for(lambda: proc_state(stopped.pid) == "T", "stopped child")
    zombie = subprocess.Popen(["true"])
    children.append(zombie)
    wait_for(lambda: proc_state(zombie.pid) == "Z", "zombie child")
    hp, _ = holder

    tasks = parse_tasks(read_builtin("tasks"))

    # kernel threads are in the initial pid namespace only (not in a container's)
    kthreads = os.path.exists("/proc/2/stat")
    # stable tasks: pid, tgid, ppid, state, uid, comm exactly as /proc has them
    for pid in ([2] if kthreads else []) + [sleeper.pid, nobody.pid, stopped.pid, zombie.pid,
                                            hp.pid]:
        assert pid in tasks, f"pid {pid} missing from tasks"
        assert tasks[pid] == expected_task(f"/proc/{pid}/stat", f"/proc/{pid}/status"), pid
    assert tasks[sleeper.pid]["state"] == "S" and tasks[sleeper.pid]["comm"] == "sleep"
    assert tasks[nobody.pid]["uid"] == 65534
    assert tasks[stopped.pid]["state"] == "T"
    assert tasks[zombie.pid]["state"] == "Z"
    assert tasks[sleeper.pid]["ppid"] == os.getpid()

    # threads are listed, with their own pid and the process's tgid
    tids = [int(t) for t in os.listdir(f"/proc/{hp.pid}/task")]
    assert len(tids) == 4
    for tid in tids:
        assert tid in tasks, f"thread {tid} missing"
        assert tasks[tid] == expected_task(f"/proc/{hp.pid}/task/{tid}/stat",
                                           f"/proc/{hp.pid}/task/{tid}/status")
        assert tasks[tid]["tgid"] == hp.pid

    # idle kernel threads: rescuer workqueue threads sleep as TASK_IDLE -> 'I'
    rescuers = [p for p, t in tasks.items() if t["comm"].startswith("kworker/R-")]
    idle = [p for p in rescuers if os.path.exists(f"/proc/{p}") and proc_state(p) == "I"]
    assert idle or not kthreads, "no idle rescuer kworkers to compare"
    for p in idle:
        assert tasks[p]["state"] == "I" and tasks[p]["ppid"] == 2

    # pid 1 is compared when present: on some sandboxes (this project's test
    # VM) the init process and its threads are never visited by task iterators
    if 1 in tasks:
        assert tasks[1] == expected_task("/proc/1/stat", "/proc/1/status")

    # every task /proc lists is in the dump, unless it appeared after the dump,
    # went away, or belongs to a hidden init (tgid 1)
    newest = max(tasks)
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{p}/task")]
            tgid1 = proc_status(f"/proc/{p}/status")["Tgid"][0] == "1"
        except (FileNotFoundError, ProcessLookupError):
            continue
        for tid in tids:
            if tid in tasks or tid > newest or tgid1 or not os.path.exists(f"/proc/{p}/task/{tid}"):
                continue
            raise AssertionError(f"task {tid} (process {p}) missing from the tasks dump")


# ---------------------------------------------------------------- files

def parse_files(data: bytes) -> dict[tuple[int, int], tuple[str, str]]:
    lines = lines_of(data)
    assert lines[0] == FILES_HEADER
    files = {}
    for line in lines[1:]:
        # %7d %7u %-6s %s
        assert len(line) >= 24 and line[7] == line[15] == line[22] == " ", \
            f"misaligned file line: {line!r}"
        key = (int(line[0:7]), int(line[8:15]))
        assert key not in files, f"fd listed twice: {line!r}"
        files[key] = (line[16:22].rstrip(), line[23:])
    return files


def test_files_match_proc_fd(read_builtin, holder):
    hp, fds = holder
    files = parse_files(read_builtin("files"))

    mine = {fd: v for (pid, fd), v in files.items() if pid == hp.pid}
    expect = {int(fd): os.readlink(f"/proc/{hp.pid}/fd/{fd}")
              for fd in os.listdir(f"/proc/{hp.pid}/fd")}
    assert sorted(mine) == sorted(expect)
    assert {fd: path for fd, (kind, path) in mine.items()} == expect

    kinds = {fd: kind for fd, (kind, path) in mine.items()}
    assert kinds[fds["file"]] == "file" and mine[fds["file"]][1] == "/etc/passwd"
    assert kinds[fds["dir"]] == "dir" and mine[fds["dir"]][1] == "/"
    assert kinds[fds["pipe_r"]] == kinds[fds["pipe_w"]] == "pipe"
    assert re.fullmatch(r"pipe:\[\d+\]", mine[fds["pipe_r"]][1])
    assert kinds[fds["socket"]] == "socket"
    assert re.fullmatch(r"socket:\[\d+\]", mine[fds["socket"]][1])
    assert kinds[fds["anon"]] == "anon" and mine[fds["anon"]][1] == "anon_inode:[eventfd]"
    assert kinds[fds["chr"]] == "chr" and mine[fds["chr"]][1] == "/dev/null"
    assert kinds[fds["fifo"]] == "fifo" and mine[fds["fifo"]][1].endswith("/fifo")

    # one line per process and fd: the holder's 3 extra threads share its file
    # table and add nothing; no thread id appears as a PID
    tids = {int(t) for t in os.listdir(f"/proc/{hp.pid}/task")} - {hp.pid}
    assert len(tids) == 3 and not {pid for pid, fd in files} & tids

    # the test process itself
    me = {fd: v for (pid, fd), v in files.items() if pid == os.getpid()}
    for fd in (0, 1, 2):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        assert me[fd][1] == target


# ---------------------------------------------------------------- vmas

VMA_RE = re.compile(r"(\d+) ([0-9a-f]{8,16})-([0-9a-f]{8,16}) ([r-][w-][x-][ps]) ([0-9a-f]{8,}) "
                    r"([0-9a-f]{2,}):([0-9a-f]{2,}) (\d+)(?: (.+))?")


def parse_vmas(data: bytes) -> dict[int, list[str]]:
    by_pid: dict[int, list[str]] = {}
    for line in lines_of(data):
        m = VMA_RE.fullmatch(line)
        assert m, f"bad vma line: {line!r}"
        pid = int(m.group(1))
        by_pid.setdefault(pid, []).append(line.split(" ", 1)[1])
    return by_pid


def proc_maps(pid: int) -> list[str]:
    """/proc/PID/maps with the padding before the path squeezed to one space."""
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(None, 5)
        out.append(" ".join(f.strip() for f in fields))
    return out


def test_vmas_match_proc_maps(read_builtin, children, holder):
    sleeper = spawn_sleep(children)
    hp, _ = holder
    vmas = parse_vmas(read_builtin("vmas"))

    for pid in (sleeper.pid, hp.pid):
        assert pid in vmas, f"no mappings for {pid}"
        expect = maps_comparable(proc_maps(pid))
        got = maps_comparable(vmas[pid])
        # the [vsyscall] gate page is not a VMA of the process: /proc adds it
        expect = [m for m in expect if not m.endswith(" [vsyscall]")]
        assert len(got) == len(set(got)), "a mapping is listed twice (threads not filtered?)"
        file_backed = [m for m in expect if m.split(" ", 5)[-1].startswith("/")]
        assert file_backed, "no file-backed mappings to compare"
        assert [m for m in got if m in file_backed] == file_backed
        # and in fact every line: anonymous, [heap], [stack], [vdso], [vvar]...
        assert got == expect

    sleep_bin = os.readlink(f"/proc/{sleeper.pid}/exe")
    assert any(m.endswith(" " + sleep_bin) and " r-xp " in m for m in vmas[sleeper.pid])
    assert any(m.endswith(" [stack]") for m in vmas[sleeper.pid])
    # kernel threads have no mm, and threads are not repeated
    assert 2 not in vmas
    assert not set(vmas) & ({int(t) for t in os.listdir(f"/proc/{hp.pid}/task")} - {hp.pid})


# ---------------------------------------------------------------- maps, progs, links

MAP_RE = re.compile(r"(\d+): (\w+)  name (\S+)  flags 0x([0-9a-f]+)  key (\d+)B  value (\d+)B"
                    r"  max_entries (\d+)")
PROG_RE = re.compile(r"(\d+): (\w+)  name (\S+)  tag ([0-9a-f]{16})")
LINK_RE = re.compile(r"(\d+): (\w+)  prog (\d+)")


def parse_ids(data: bytes, regex) -> dict[int, tuple]:
    out = {}
    for line in lines_of(data):
        m = regex.fullmatch(line)
        assert m, f"bad line: {line!r}"
        assert int(m.group(1)) not in out, f"id listed twice: {line!r}"
        out[int(m.group(1))] = m.groups()[1:]
    ids = list(out)
    assert ids == sorted(ids), "objects are not in id order"
    return out


def stable(before: list[dict], after: list[dict]) -> dict[int, dict]:
    """Objects bpftool showed both before and after the dump, by id."""
    a = {o["id"]: o for o in after}
    return {o["id"]: o for o in before if o["id"] in a}


def test_maps_match_bpftool(read_builtin, own_bpffs):
    pin = own_bpffs / "tmap"
    subprocess.run(["bpftool", "map", "create", str(pin), "type", "hash", "key", "4", "value", "8",
                    "entries", "16", "name", "bdfs_tmap"], check=True)
    try:
        mine = bpftool_json("map", "show", "pinned", str(pin))
        before = bpftool_json("map", "show")
        maps = parse_ids(read_builtin("maps"), MAP_RE)
        after = bpftool_json("map", "show")
    finally:
        pin.unlink()

    assert maps[mine["id"]] == ("hash", "bdfs_tmap", "0", "4", "8", "16")
    for mid, o in stable(before, after).items():
        assert mid in maps, f"map {mid} missing"
        assert maps[mid] == (o["type"], o.get("name") or "-", format(o["flags"], "x"),
                             str(o["bytes_key"]), str(o["bytes_value"]), str(o["max_entries"]))


def test_progs_match_bpftool(read_builtin, own_bpffs):
    pin = own_bpffs / "tprog"
    subprocess.run(["bpftool", "prog", "load", str(BUILTINS / "tasks.bpf.o"), str(pin)], check=True)
    try:
        mine = bpftool_json("prog", "show", "pinned", str(pin))
        before = bpftool_json("prog", "show")
        progs = parse_ids(read_builtin("progs"), PROG_RE)
        after = bpftool_json("prog", "show")
    finally:
        pin.unlink()

    assert progs[mine["id"]] == ("tracing", "dump_tasks", mine["tag"])
    for pid_, o in stable(before, after).items():
        assert pid_ in progs, f"prog {pid_} missing"
        assert progs[pid_] == (o["type"], o.get("name") or "-", o["tag"])


def test_links_match_bpftool(read_builtin, own_bpffs):
    pin = own_bpffs / "tlink"
    subprocess.run(["bpftool", "iter", "pin", str(BUILTINS / "slabinfo.bpf.o"), str(pin)],
                   check=True)
    try:
        mine = bpftool_json("link", "show", "pinned", str(pin))
        before = bpftool_json("link", "show")
        links = parse_ids(read_builtin("links"), LINK_RE)
        after = bpftool_json("link", "show")
    finally:
        pin.unlink()

    assert links[mine["id"]] == ("iter", str(mine["prog_id"]))
    for lid, o in stable(before, after).items():
        assert lid in links, f"link {lid} missing"
        assert links[lid] == (o["type"], str(o.get("prog_id", 0)))


# ---------------------------------------------------------------- kallsyms

KSYM_RE = re.compile(r"[0-9a-f]{16} [A-Za-z] \S+(\t\[\S+\])?")


def test_kallsyms_equals_proc(read_builtin):
    read_builtin("kallsyms")  # make sure the dumper is loaded before comparing
    for _ in range(5):
        before = Path("/proc/kallsyms").read_bytes()
        dump = read_builtin("kallsyms")
        after = Path("/proc/kallsyms").read_bytes()
        if before == after:
            break
    else:
        pytest.fail("/proc/kallsyms kept changing (BPF programs loading?)")
    for line in lines_of(dump)[:5000]:
        assert KSYM_RE.fullmatch(line), f"bad kallsyms line: {line!r}"
    assert any(not line.startswith("0000000000000000") for line in lines_of(dump)[:100]), \
        "root should see real addresses"
    # byte for byte, module and [bpf] symbols included
    assert dump == before


# ---------------------------------------------------------------- slabinfo

def proc_slabinfo() -> list[list[str]]:
    lines = Path("/proc/slabinfo").read_text().splitlines()
    assert lines[0].startswith("slabinfo - version: 2.") and lines[1].startswith("# name")
    return [line.split() for line in lines[2:]]


def test_slabinfo_matches_proc(read_builtin):
    before = proc_slabinfo()
    lines = lines_of(read_builtin("slabinfo"))
    after = proc_slabinfo()

    assert lines[0] == SLAB_HEADER
    dump = []
    for line in lines[1:]:
        f = line.split()
        assert len(f) == 5 and re.fullmatch(r"0x[0-9a-f]{8}", f[4]), f"bad slab line: {line!r}"
        name, objsize, size, align = f[0], int(f[1]), int(f[2]), int(f[3])
        assert 0 < objsize <= size and align > 0 and size % align == 0, line
        dump.append((name, size))

    names = [n for n, _ in dump]
    assert len(names) == len(set(names)), "a cache is listed twice"
    # caches present in both reads of /proc/slabinfo: same names, same order,
    # and <objsize> there is the size column here
    stable_names = {f[0] for f in before} & {f[0] for f in after}
    assert len(stable_names) > 20
    proc_size = {f[0]: int(f[3]) for f in after}
    assert [n for n in names if n in stable_names] == [f[0] for f in after if f[0] in stable_names]
    for name, size in dump:
        if name in stable_names:
            assert size == proc_size[name], name
    # nothing the kernel never showed
    assert set(names) <= {f[0] for f in before} | {f[0] for f in after}


# ---------------------------------------------------------------- cgroups

def cgroup_tree(root: Path) -> dict[str, tuple[int, int]]:
    """path relative to the cgroup2 root -> (id = inode, level)"""
    tree = {"/": (root.stat().st_ino, 0)}
    for d, subdirs, _ in os.walk(root):
        for s in subdirs:
            p = Path(d) / s
            rel = "/" + str(p.relative_to(root))
            try:
                tree[rel] = (p.stat().st_ino, rel.count("/"))
            except FileNotFoundError:
                pass
    return tree


def test_cgroups_match_cgroupfs(read_builtin):
    root = cgroup2_root()
    base = root / f"bdfs-test-{os.getpid()}"
    made = [base, base / "a", base / "a" / "b", base / "c"]
    for d in made:
        d.mkdir()
    try:
        before = cgroup_tree(root)
        data = read_builtin("cgroups")
        after = cgroup_tree(root)
    finally:
        for d in reversed(made):
            d.rmdir()

    dump = {}
    order = []
    for line in lines_of(data):
        m = re.fullmatch(r"(\d+) (\d+) (/\S*)", line)
        assert m, f"bad cgroup line: {line!r}"
        path = m.group(3)
        assert path not in dump, f"cgroup listed twice: {path}"
        dump[path] = (int(m.group(1)), int(m.group(2)))
        order.append(path)

    assert order[0] == "/" and dump["/"][1] == 0
    rel = "/" + base.name
    for p in (rel, rel + "/a", rel + "/a/b", rel + "/c"):
        assert dump[p] == before[p], p
    assert dump[rel + "/a/b"][1] == 3
    # pre-order: every cgroup after its parent
    pos = {p: i for i, p in enumerate(order)}
    for p in order[1:]:
        parent = p.rsplit("/", 1)[0] or "/"
        assert pos[parent] < pos[p], p
    stable_ = {p: v for p, v in before.items() if after.get(p) == v}
    for p, v in stable_.items():
        assert dump.get(p) == v, p
    assert set(dump) <= set(before) | set(after)
