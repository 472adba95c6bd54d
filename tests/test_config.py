"""Declarative dumpers: a directory of TOML files applied by `bpfdumpfs apply` and by
the daemon (at start and on SIGHUP), against a real kernel."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import (
    BPF_SRC,
    CGROUPS_OBJ,
    ROOT,
    TASKS_OBJ,
    Daemon,
    bpf_objects,
    bpfdumpfs,
    bpftool_json,
    eventually,
    fixed_output,
    link_exists,
    mount_bpffs,
    need_kernel,
    unmount,
)

from bpfdumpfs.dumpers import Dumper


@pytest.fixture(scope="module")
def objs() -> dict[str, str]:
    """tests/bpf/fixed_a and fixed_b: their .bpf.c sources and .bpf.o objects."""
    built = bpf_objects("fixed_a", "fixed_b")
    return {"a": built["fixed_a"], "b": built["fixed_b"],
            "src_a": str(BPF_SRC / "fixed_a.bpf.c"), "src_b": str(BPF_SRC / "fixed_b.bpf.c")}


@pytest.fixture
def setup(tmp_path):
    """(state, config dir): a private bpffs and an empty config directory."""
    need_kernel()
    state = mount_bpffs(tmp_path / "state")
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    yield state, cfg
    unmount(state)


def apply(cfg, state) -> subprocess.CompletedProcess:
    p = bpfdumpfs("apply", "--config-dir", str(cfg), "--state-dir", str(state), check=False)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def applied(p: subprocess.CompletedProcess) -> list[str]:
    """What a successful apply printed, one change a line."""
    assert p.returncode == 0 and p.stderr == "", p.stderr
    return sorted(p.stdout.splitlines())


def dumpers(state) -> dict[str, dict]:
    p = bpfdumpfs("ls", "--json", "--state-dir", str(state))
    return {f"{r['target']}/{r['name']}": r for r in json.loads(p.stdout)}


def facts(state: Path) -> dict[str, dict]:
    """What the kernel and bpffs say of each pin (fast: bpftool and stat, no CLI)."""
    found = {}
    for pin in sorted(state.glob("*/*")):
        link = bpftool_json("link", "show", "pinned", str(pin))
        prog = bpftool_json("prog", "show", "id", str(link["prog_id"]))
        st = os.stat(pin)
        found[f"{pin.parent.name}/{pin.name}"] = {
            "link_id": link["id"], "prog_name": prog["name"], "pid": link.get("pid"),
            "mode": f"{st.st_mode & 0o7777:04o}", "uid": st.st_uid, "gid": st.st_gid}
    return found


def read_pin(pin: Path) -> bytes:
    with Dumper.from_pin(pin) as d:
        return d.read()


def two_dumpers(cfg: Path, objs, mode: str = "0440", pid: int | None = None) -> Path:
    """a.toml: task/ca (object a.bpf.o next to the file) and task/cpid (the built-in
    tasks dumper of one process)."""
    if not (cfg / "a.bpf.o").exists():
        shutil.copy(objs["a"], cfg / "a.bpf.o")
    f = cfg / "a.toml"
    f.write_text(f"""# two dumpers
[dumpers.ca]
object = "a.bpf.o"        # relative to this file
mode = "{mode}"
group = "nogroup"
view = "daemon"

[dumpers.cpid]
object = "{TASKS_OBJ}"
pid = {pid or os.getpid()}
owner = "nobody"
""")
    return f


# -- apply without a daemon --------------------------------------------------------------

def test_apply_adds_what_is_missing_and_a_second_run_changes_nothing(setup, objs):
    state, cfg = setup
    f = two_dumpers(cfg, objs)
    assert applied(apply(cfg, state)) == ["added task/ca", "added task/cpid"]
    rows = dumpers(state)
    ca, cpid = rows["task/ca"], rows["task/cpid"]
    assert (ca["mode"], ca["owner"], ca["group"], ca["view"], ca["origin"], ca["prog_name"]) == \
        ("0440", "root", "nogroup", "daemon", "config", "dump_a")
    assert (cpid["mode"], cpid["owner"], cpid["pid"], cpid["origin"]) == \
        ("0400", "nobody", os.getpid(), "config")
    assert read_pin(state / "task" / "ca") == fixed_output("A")
    again = apply(cfg, state)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")
    assert dumpers(state) == rows                   # the same links, untouched
    assert f.exists()


def test_apply_replaces_what_changed(setup, objs):
    state, cfg = setup
    two_dumpers(cfg, objs)
    applied(apply(cfg, state))
    before = facts(state)

    two_dumpers(cfg, objs, mode="0444")             # the entry changed
    assert applied(apply(cfg, state)) == ["updated task/ca"]
    now = facts(state)
    assert now["task/ca"] == {**before["task/ca"], "mode": "0444"}     # the same link
    assert now["task/cpid"] == before["task/cpid"]

    shutil.copy(objs["b"], cfg / "a.bpf.o")         # the object's bytes changed
    assert applied(apply(cfg, state)) == ["updated task/ca"]
    now = facts(state)
    assert now["task/ca"] == {**before["task/ca"], "mode": "0444", "prog_name": "dump_b"}
    assert read_pin(state / "task" / "ca") == fixed_output("B")

    parent = os.getppid()                           # a parameter changed: a new link
    two_dumpers(cfg, objs, mode="0444", pid=parent)
    assert applied(apply(cfg, state)) == ["replaced task/cpid"]
    now = facts(state)
    assert now["task/cpid"]["pid"] == parent
    assert now["task/cpid"]["link_id"] != before["task/cpid"]["link_id"]
    assert now["task/cpid"]["uid"] == before["task/cpid"]["uid"] != 0   # owner = "nobody"
    assert eventually(lambda: not link_exists(before["task/cpid"]["link_id"]), 10.0)
    assert applied(apply(cfg, state)) == []
    assert dumpers(state)["task/cpid"]["origin"] == "config"


def test_apply_removes_only_what_config_made(setup, objs):
    state, cfg = setup
    mine = bpfdumpfs("add", "mine", TASKS_OBJ, "--state-dir", str(state), check=False)
    assert mine.returncode == 0, mine.stderr
    f = two_dumpers(cfg, objs)
    applied(apply(cfg, state))
    before = facts(state)

    f.write_text(f.read_text().split("[dumpers.cpid]")[0])   # the entry goes
    assert applied(apply(cfg, state)) == ["removed task/cpid"]
    assert not (state / "task" / "cpid").exists()
    assert eventually(lambda: not link_exists(before["task/cpid"]["link_id"]), 10.0)
    f.unlink()                                                # the whole file goes
    assert applied(apply(cfg, state)) == ["removed task/ca"]
    assert facts(state) == {"task/mine": before["task/mine"]}
    assert applied(apply(cfg, state)) == []                   # an empty dir: nothing to do
    assert dumpers(state)["task/mine"]["origin"] == "cli"


def test_a_file_that_turns_invalid_keeps_its_dumpers(setup, objs):
    state, cfg = setup
    f = two_dumpers(cfg, objs)
    applied(apply(cfg, state))
    before = facts(state)
    good = f.read_text()
    f.write_text(good + "\n[dumpers.broken\n")
    p = apply(cfg, state)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.startswith(f"bpfdumpfs: {f}:13: TOML syntax")
    assert facts(state) == before
    f.write_text(good)
    assert applied(apply(cfg, state)) == []
    assert facts(state) == before


def test_apply_with_a_relative_config_dir_changes_nothing(setup, objs):
    """The same directory named another way is the same config."""
    state, cfg = setup
    two_dumpers(cfg, objs)
    applied(apply(cfg, state))
    before = facts(state)
    p = bpfdumpfs("apply", "--config-dir", os.path.relpath(cfg, ROOT), "--state-dir",
                  str(state), check=False)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    assert facts(state) == before


# -- invalid files ---------------------------------------------------------------------------

FIRST = f'[dumpers.first]\nobject = "{TASKS_OBJ}"\n\n'   # lines 1-3 of every bad file

# case -> (the rest of bad.toml from line 4, the lines the error may name, words of the reason)
INVALID = {
    "toml-syntax": ('[dumpers.s]\nobject = "{tasks}"\nmode = "0440" x\n', {6},
                    ["TOML", "line 6"]),
    "unknown-key": ('[dumpers.u]\nobject = "{tasks}"\ncolour = "red"\n', {6},
                    ["unknown key 'colour'"]),
    "wrong-type": ('[dumpers.t]\nobject = "{tasks}"\npid = "one"\n', {6}, ["pid", "type"]),
    "missing-object": ('[dumpers.m]\nobject = "nothere.bpf.o"\n', {4, 5},
                       ["nothere.bpf.o", "No such file"]),
    "bad-mode": ('[dumpers.md]\nobject = "{tasks}"\nmode = "rw-r--r--"\n', {6},
                 ["mode", "rw-r--r--"]),
    "unknown-user": ('[dumpers.us]\nobject = "{tasks}"\nowner = "nosuchuser"\n', {4, 6},
                     ["nosuchuser"]),
    "param-not-taken": ('[dumpers.pp]\nobject = "{tasks}"\norder = "pre"\n', {4, 6},
                        ["task", "--order"]),
    "param-missing": ('[dumpers.pm]\nobject = "{cgroups}"\n', {4, 5}, ["cgroup", "order"]),
    "bad-name": ('[dumpers."a.b"]\nobject = "{tasks}"\n', {4}, ["'a.b'"]),
    "name-taken": ('[dumpers.taken]\nobject = "{tasks}"\n', {4},
                   ["task/taken", "exists", "bpfdumpfs rm"]),
    "negative-owner": ('[dumpers.o]\nobject = "{tasks}"\nowner = -5\n', {4, 6},
                       ["uid -5 is out of range"]),
    "negative-tid": ('[dumpers.ti]\nobject = "{tasks}"\ntid = -1\n', {4, 6},
                     ["tid -1 is not a process id"]),
    "nested-5000-deep": ("deep = " + "[" * 5000 + "]" * 5000 + "\n", {1}, ["nested too deeply"]),
    "object-a-device": ('[dumpers.z]\nobject = "/dev/zero"\n', {5},
                        ["/dev/zero", "not a regular file"]),
}


@pytest.fixture(scope="module")
def invalid_runs(tmp_path_factory):
    """Each INVALID case in a state dir of its own (name-taken's holds task/taken, added
    by the CLI) with a config dir of bad.toml and good.toml; all applied at once."""
    need_kernel()
    cases = {}
    for case, (text, _, _) in INVALID.items():
        base = tmp_path_factory.mktemp(case)
        state, cfg = mount_bpffs(base / "state"), base / "cfg"
        cfg.mkdir()
        (cfg / "bad.toml").write_text(FIRST + text.format(tasks=TASKS_OBJ, cgroups=CGROUPS_OBJ))
        (cfg / "good.toml").write_text(f'[dumpers.good]\nobject = "{TASKS_OBJ}"\n')
        cases[case] = (state, cfg)
    taken = bpfdumpfs("add", "taken", TASKS_OBJ, "--state-dir", str(cases["name-taken"][0]),
                      check=False)
    assert taken.returncode == 0, taken.stderr
    before = {c: facts(state) for c, (state, _) in cases.items()}
    with ThreadPoolExecutor(max_workers=8) as pool:
        runs = dict(zip(cases, pool.map(lambda sc: apply(sc[1], sc[0]), cases.values()),
                        strict=True))
    yield {c: (cfg, runs[c], before[c], facts(state)) for c, (state, cfg) in cases.items()}
    for state, _ in cases.values():
        unmount(state)


@pytest.mark.parametrize("case", sorted(INVALID))
def test_an_invalid_file_is_reported_and_nothing_from_it_applied(invalid_runs, case):
    cfg, p, before, after = invalid_runs[case]
    _, lines, words = INVALID[case]
    assert p.returncode == 1
    assert p.stdout == "added task/good\n"           # the valid file still applies
    err = p.stderr.splitlines()
    assert len(err) == 1, p.stderr
    prefix = f"bpfdumpfs: {cfg / 'bad.toml'}:"
    assert err[0].startswith(prefix), err[0]
    line, _, reason = err[0][len(prefix):].partition(": ")
    assert int(line) in lines, f"line {line} of {err[0]!r}; expected one of {lines}"
    for w in words:
        assert w in reason, f"{w!r} not in {reason!r}"
    assert set(after) - set(before) == {"task/good"}  # nothing from the bad file
    assert {k: after[k] for k in before} == before     # task/taken is untouched


# -- the daemon ---------------------------------------------------------------------------

def test_the_daemon_applies_the_config_at_start_and_on_sighup(tmp_path, objs):
    need_kernel()
    state, cfg, mnt = mount_bpffs(tmp_path / "state"), tmp_path / "cfg", tmp_path / "mnt"
    cfg.mkdir()
    shutil.copy(objs["src_a"], cfg / "web.bpf.c")
    web = cfg / "web.toml"
    web.write_text('[dumpers.web]\nsource = "web.bpf.c"\nmode = "0444"\n')
    d = Daemon(mnt, state, "--no-builtins", "--config-dir", str(cfg)).start()
    try:
        f = mnt / "task" / "web"
        assert f.read_bytes() == fixed_output("A")     # applied before the tree was mounted
        assert os.stat(f).st_mode & 0o777 == 0o444
        link_id = os.getxattr(f, "user.bpfdump.link_id")

        def hup_until(cond) -> None:
            d.proc.send_signal(signal.SIGHUP)
            assert eventually(cond, 10.0), d.output()

        # the source changes and a dumper is added: one SIGHUP, no remount
        shutil.copy(objs["src_b"], cfg / "web.bpf.c")
        web.write_text(web.read_text() + f'\n[dumpers.more]\nobject = "{objs["b"]}"\n')
        hup_until(lambda: "more" in os.listdir(mnt / "task"))
        assert eventually(lambda: f.read_bytes() == fixed_output("B"), 10.0)
        assert os.getxattr(f, "user.bpfdump.link_id") == link_id   # swapped in place
        assert (mnt / "task" / "more").read_bytes() == fixed_output("B")

        # the entry goes: so does its dumper
        web.write_text('[dumpers.web]\nsource = "web.bpf.c"\nmode = "0444"\n')
        hup_until(lambda: "more" not in os.listdir(mnt / "task"))

        # an invalid file is logged with file and line; the daemon serves on
        bad = cfg / "bad.toml"
        bad.write_text('[dumpers.oops]\nobject = "x.bpf.o"\nfrequency = 3\n')
        hup_until(lambda: f"config: {bad}:3: unknown key 'frequency'" in d.output())
        assert d.proc.poll() is None and f.read_bytes() == fixed_output("B")
        assert sorted(os.listdir(mnt / "task")) == ["web"]
        bad.unlink()

        # the CLI and the daemon agree: nothing left to do
        p = apply(cfg, state)
        assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    finally:
        d.stop()
        unmount(state)


def bad_files(cfg: Path) -> dict[str, str]:
    """Files no config may be read from, beside a good one; name -> words of the reason."""
    (cfg / "good.toml").write_text(f'[dumpers.good]\nobject = "{TASKS_OBJ}"\n')
    (cfg / "latin1.toml").write_bytes(b'[dumpers.l]\nobject = "caf\xe9"\n')
    (cfg / "dir.toml").mkdir()
    os.mkfifo(cfg / "fifo.toml")
    (cfg / "link.toml").symlink_to(cfg / "good.toml")
    (cfg / "nobodys.toml").write_text(f'[dumpers.n]\nobject = "{TASKS_OBJ}"\n')
    os.chown(cfg / "nobodys.toml", 65534, 65534)
    (cfg / "shared.toml").write_text(f'[dumpers.sh]\nobject = "{TASKS_OBJ}"\n')
    os.chmod(cfg / "shared.toml", 0o664)
    return {"latin1.toml": "not UTF-8", "dir.toml": "not a regular file",
            "fifo.toml": "not a regular file", "link.toml": "not a regular file",
            "nobodys.toml": "owned by uid 65534, not root", "shared.toml": "writable by others"}


def test_files_the_daemon_must_not_trust_are_reported_and_skipped(setup):
    """Each is one line naming it and why; nothing blocks (a FIFO is never opened), and
    the good file still applies."""
    state, cfg = setup
    reasons = bad_files(cfg)
    p = apply(cfg, state)
    assert p.returncode == 1 and p.stdout == "added task/good\n"
    err = p.stderr.splitlines()
    assert len(err) == len(reasons), p.stderr
    for name, words in reasons.items():
        line = next(ln for ln in err if f"{cfg / name}:" in ln)
        assert words in line, line
    assert set(dumpers(state)) == {"task/good"}


@pytest.mark.parametrize("case", ["owned-by-nobody", "writable-by-all"])
def test_a_config_dir_another_user_can_write_is_not_applied(setup, case):
    state, cfg = setup
    (cfg / "good.toml").write_text(f'[dumpers.good]\nobject = "{TASKS_OBJ}"\n')
    if case == "owned-by-nobody":
        os.chown(cfg, 65534, 65534)
    else:
        os.chmod(cfg, 0o1777)
    p = apply(cfg, state)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.startswith(f"bpfdumpfs: config dir {cfg} ")
    assert p.stderr.rstrip().endswith("nothing in it is applied")
    assert dumpers(state) == {}


def test_bad_files_on_sighup_leave_the_daemon_serving(tmp_path):
    state = mount_bpffs(tmp_path / "state")
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    d = Daemon(tmp_path / "mnt", state, "--config-dir", str(cfg))
    try:
        d.start()
        bad_files(cfg)
        (cfg / "deep.toml").write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
        (cfg / "zero.toml").write_text('[dumpers.z]\nobject = "/dev/zero"\n')
        d.proc.send_signal(signal.SIGHUP)
        assert eventually(lambda: "config: added task/good" in d.output(), timeout=30)
        assert d.proc.poll() is None
        assert (d.mnt / "task" / "good").read_bytes().startswith(b"    PID")
        out = d.output()
        for name in ("latin1", "dir", "fifo", "link", "nobodys", "shared", "deep", "zero"):
            assert f"{cfg / name}.toml:" in out, name
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=30) == 0
    finally:
        d.stop()
        unmount(state)

