"""The `bpfdumpfs` command as users run it, against a real kernel and a real mount:
add/pin/rm/ls/info/targets, --replace, extended attributes, bad input, restarts."""
from __future__ import annotations

import grp
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import (
    BPF_SRC,
    CGROUPS_OBJ,
    KSYM_OBJ,
    ROOT,
    TASKS_OBJ,
    Daemon,
    bpf_objects,
    bpfdumpfs,
    bpftool_json,
    cgroup2_root,
    cli,
    eventually,
    fixed_output,
    link_exists,
    listing,
    mount_bpffs,
    need_kernel,
    ok,
    prog_exists,
    unmount,
    xattrs,
)

# the test programs used here: tests/bpf/NAME.bpf.c (each says what it is)
PROGRAMS = ["fixed_a", "fixed_b", "two_iters", "tracepoint_only", "no_such_target",
            "unverifiable", "map_elems"]


# -- helpers -------------------------------------------------------------------------

def error_line(p: subprocess.CompletedProcess) -> str:
    """The one-line error of a failed command: exit 1, 'bpfdumpfs: ...', no traceback."""
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 1, f"exit {p.returncode}: {p.stdout} {p.stderr}"
    lines = p.stderr.splitlines()
    assert len(lines) == 1, f"not a one-line error: {p.stderr!r}"
    assert lines[0].startswith("bpfdumpfs: "), lines
    assert p.stdout == ""
    return lines[0]


def has_hint(line: str) -> bool:
    """Errors read 'bpfdumpfs: WHAT: strerror (ENAME); HOW TO FIX'."""
    return re.search(r"\([A-Z0-9]+\); \S", line) is not None


def pins(state: Path) -> set[Path]:
    return {p for p in state.glob("*/*")}


# Runs bpfdumpfs.cli.main(ARGV) for many ARGVs, each in a process forked from one that
# imported bpfdumpfs (and read the kernel's BTF) once: each prints and returns what
# `bpfdumpfs ARGV` would (an uncaught exception prints its traceback, as Python does)
# without an interpreter start-up per case: forty cases cost a second, not thirty.
_FORKING_CLI = r"""
import json, os, sys, traceback
from bpfdumpfs import cli, targets
targets.running_kernel()   # read the kernel's BTF once, as each process would
where = sys.argv[1]
with open(os.path.join(where, "cases.json")) as f:
    cases = json.load(f)
children = {}
for key, argv in cases.items():
    pid = os.fork()
    if pid == 0:
        for fd, ext in ((1, "out"), (2, "err")):
            path = os.path.join(where, f"{key}.{ext}")
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), fd)
        code = 1
        try:
            code = cli.main(argv) or 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    children[pid] = key
codes = {}
while children:
    pid, status = os.wait()
    codes[children.pop(pid)] = os.waitstatus_to_exitcode(status)
with open(os.path.join(where, "codes.json"), "w") as f:
    json.dump(codes, f)
"""


def run_forked(argvs: dict[str, list[str]], where: Path) -> dict[str, subprocess.CompletedProcess]:
    """What `bpfdumpfs ARGV` prints and returns, for each ARGV: see _FORKING_CLI."""
    where.mkdir(parents=True, exist_ok=True)
    keys = {f"c{i}": k for i, k in enumerate(argvs)}
    (where / "cases.json").write_text(json.dumps({c: argvs[k] for c, k in keys.items()}))
    subprocess.run([sys.executable, "-c", _FORKING_CLI, str(where)], cwd=ROOT, check=True,
                   timeout=300)
    codes = json.loads((where / "codes.json").read_text())
    return {k: subprocess.CompletedProcess(argvs[k], codes[c], (where / f"{c}.out").read_text(),
                                           (where / f"{c}.err").read_text())
            for c, k in keys.items()}


def info(state: Path, dumper: str) -> dict:
    return json.loads(ok(cli(state, "info", dumper, "--json")))


# -- fixtures -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def objs() -> dict[str, str]:
    """PROGRAMS, built: name -> .bpf.o path (its source: tests/bpf/NAME.bpf.c)."""
    return bpf_objects(*PROGRAMS)


@pytest.fixture(scope="module")
def _daemon(tmp_path_factory):
    need_kernel()
    base = tmp_path_factory.mktemp("cli")
    state = mount_bpffs(base / "state")
    cfg = base / "cfg"
    cfg.mkdir()
    d = Daemon(base / "mnt", state, "--no-builtins", "--config-dir", str(cfg)).start()
    yield d
    d.stop()
    unmount(state)


@pytest.fixture
def served(_daemon):
    """The module's daemon; pins a test makes are removed after it."""
    before = pins(_daemon.state)
    yield _daemon
    for p in pins(_daemon.state) - before:
        p.unlink()


@pytest.fixture(scope="module")
def various(_daemon, objs, tmp_path_factory):
    """Dumpers of every kind of parameter, made once for the ls/info/xattr tests."""
    state = _daemon.state
    cg = cgroup2_root() / f"bpfdumpfs-test-{os.getpid()}-various"
    cg.mkdir()
    pid = os.getpid()
    made = {
        "task/v_plain": [objs["fixed_a"], "--mode", "0444", "--owner", "nobody",
                         "--group", "nogroup", "--view", "daemon"],
        "task/v_pid": [TASKS_OBJ, "--pid", str(pid)],
        "task/v_tid": [TASKS_OBJ, "--tid", str(threading.get_native_id())],
        "cgroup/v_cg": [CGROUPS_OBJ, "--order", "self", "--cgroup", str(cg)],
        "cgroup/v_cgid": [CGROUPS_OBJ, "--order", "pre", "--cgroup", str(os.stat(cg).st_ino)],
        "ksym/v_ksym": [KSYM_OBJ, "--mode", "0440"],
    }
    try:
        added = run_forked({d: ["add", d.split("/")[1], *args, "--state-dir", str(state)]
                            for d, args in made.items()}, tmp_path_factory.mktemp("various"))
        for dumper, p in added.items():
            assert ok(p) == f"{_daemon.mnt}/{dumper}\n"
        yield {"dumpers": made, "cgroup": cg, "pid": pid}
    finally:
        for dumper in made:
            (state / dumper).unlink(missing_ok=True)
        cg.rmdir()


# -- --help and the state dir ---------------------------------------------------------------

HELP = {
    "mount": ["mountpoint", "--config-dir", "--no-builtins",
              "--background", "SIGHUP"],
    "add": ["NAME", "OBJECT", "--prog", "--map", "--cgroup", "--order", "--tid", "--pid",
            "--mode", "--owner", "--group", "--replace", ".bpf.c", "-I DIR", "-D",
            "--cflags"],
    "pin": ["NAME", "LINK", "link id", "--mode", "--owner", "--group"],
    "rm": ["TARGET/NAME", "reader"],
    "ls": ["--json"],
    "info": ["TARGET/NAME", "--json"],
    "targets": ["--json", "parameters"],
    "apply": ["--config-dir", "remove"],
    "run": ["OBJECT", "--pin"],
}


@pytest.fixture(scope="module")
def helps(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """`bpfdumpfs --help` (key "") and `bpfdumpfs CMD --help` of every CMD it lists."""
    top = bpfdumpfs("--help", check=False)
    listed = re.findall(r"^    ([a-z]+)\s+\S", top.stdout, re.M)
    return {"": top, **run_forked({c: [c, "--help"] for c in listed},
                                  tmp_path_factory.mktemp("helps"))}


def test_top_level_help_lists_every_subcommand(helps):
    p = helps[""]
    assert p.returncode == 0 and p.stdout.startswith("usage: bpfdumpfs ")
    assert set(HELP) <= set(helps) - {""}


def test_every_subcommand_has_a_help_that_names_the_state_dir(helps):
    for command, p in helps.items():
        if not command:
            continue
        assert p.returncode == 0 and p.stderr == "", command
        assert p.stdout.startswith(f"usage: bpfdumpfs {command} ")
        assert len(p.stdout.split("\n\n")) >= 3, f"{command}: no description or options"
        assert "--state-dir" in p.stdout and "BPFDUMPFS_STATE_DIR" in p.stdout, command


@pytest.mark.parametrize("command", sorted(HELP))
def test_every_subcommand_explains_its_arguments(helps, command):
    p = helps[command]
    for word in HELP[command]:
        assert word in p.stdout, f"`bpfdumpfs {command} --help` does not mention {word}"


def test_targets_takes_state_dir_like_every_subcommand(bare):
    """`bpfdumpfs CMD --state-dir S` must work for every CMD (scripts pass it to all)."""
    p = cli(bare, "targets")
    assert p.returncode == 0, p.stderr
    assert "task" in p.stdout.split()


def test_state_dir_comes_from_the_flag_or_the_environment(served, bare, objs):
    env = {"BPFDUMPFS_STATE_DIR": str(bare)}
    p = bpfdumpfs("add", "fromenv", objs["fixed_a"], check=False, env={**os.environ, **env})
    assert ok(p) == f"{bare}/task/fromenv\n"
    assert (bare / "task" / "fromenv").exists()
    p = bpfdumpfs("ls", check=False, env={**os.environ, **env})
    assert ok(p).split()[0] == "task/fromenv"
    # the flag wins over the environment
    p = bpfdumpfs("add", "fromflag", objs["fixed_a"], "--state-dir", str(served.state),
                  check=False, env={**os.environ, **env})
    assert ok(p) == f"{served.mnt}/task/fromflag\n"
    assert not (bare / "task" / "fromflag").exists()
    # a relative --state-dir names the same tree
    rel = os.path.relpath(served.state, ROOT)
    p = bpfdumpfs("add", "relative", objs["fixed_a"], "--state-dir", rel, check=False)
    assert ok(p) == f"{served.mnt}/task/relative\n"


# -- add ------------------------------------------------------------------------------------

def test_add_shows_in_the_tree_at_once_and_nothing_is_cached(served, objs):
    mnt, state = served.mnt, served.state
    assert "x" not in os.listdir(mnt / "task")
    assert ok(cli(state, "add", "x", objs["fixed_a"])) == f"{mnt}/task/x\n"
    assert "x" in os.listdir(mnt / "task")
    assert (mnt / "task" / "x").read_bytes() == fixed_output("A")
    st = os.stat(mnt / "task" / "x")
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o400, 0, 0)
    ok(cli(state, "rm", "task/x"))
    assert "x" not in os.listdir(mnt / "task")
    assert not (mnt / "task" / "x").exists()
    # the same name again, another program: the tree shows the new one, not a cached one
    ok(cli(state, "add", "x", objs["fixed_b"], "--mode", "0444"))
    assert (mnt / "task" / "x").read_bytes() == fixed_output("B")
    assert os.stat(mnt / "task" / "x").st_mode & 0o7777 == 0o444


def test_add_works_without_a_daemon_and_the_tree_shows_it_later(bare, objs, tmp_path):
    assert ok(cli(bare, "add", "early", objs["fixed_a"])) == f"{bare}/task/early\n"
    link = bpftool_json("link", "show", "pinned", str(bare / "task" / "early"))
    assert link["target_name"] == "task"
    d = Daemon(tmp_path / "mnt", bare, "--no-builtins", "--config-dir",
               str(tmp_path / "nocfg")).start()
    try:
        assert (d.mnt / "task" / "early").read_bytes() == fixed_output("A")
        assert xattrs(d.mnt / "task" / "early")["link_id"] == str(link["id"])
    finally:
        d.stop()
    ok(cli(bare, "rm", "task/early"))
    assert not (bare / "task" / "early").exists()


def test_add_names_at_the_limits_are_accepted(served, objs, tmp_path):
    names = ("n" * 64, "a-b_C9", "_9")
    added = run_forked({n: ["add", n, objs["fixed_a"], "--state-dir", str(served.state)]
                        for n in names}, tmp_path / "runs")
    for name in names:
        assert ok(added[name]) == f"{served.mnt}/task/{name}\n"
        assert name in os.listdir(served.mnt / "task")


def test_add_compiles_a_source_against_the_running_kernel(served, objs):
    src = str(BPF_SRC / "fixed_b.bpf.c")
    assert ok(cli(served.state, "add", "fromsrc", src)) == f"{served.mnt}/task/fromsrc\n"
    assert (served.mnt / "task" / "fromsrc").read_bytes() == fixed_output("B")
    assert xattrs(served.mnt / "task" / "fromsrc")["prog_name"] == "dump_b"


def test_add_a_source_without_clang_says_so(served, objs, tmp_path):
    src = str(BPF_SRC / "fixed_b.bpf.c")
    (tmp_path / "bin").mkdir()
    before = listing(served.state)
    p = cli(served.state, "add", "noclang", src, env={"PATH": str(tmp_path / "bin")})
    line = error_line(p)
    assert "clang" in line and "install" in line and has_hint(line)
    assert listing(served.state) == before


def test_add_with_prog_picks_one_of_several(served, objs):
    p = cli(served.state, "add", "picked", objs["two_iters"], "--prog", "second")
    assert ok(p) == f"{served.mnt}/ksym/picked\n"   # the target is the program's
    assert xattrs(served.mnt / "ksym" / "picked")["prog_name"] == "second"


# -- pin ------------------------------------------------------------------------------------

def test_pin_adopts_a_link_by_path_and_by_id(served, bare, objs):
    state, mnt = served.state, served.mnt
    by_path, by_id = bare / "bypath", bare / "byid"
    subprocess.run(["bpftool", "iter", "pin", objs["fixed_a"], str(by_path)], check=True)
    subprocess.run(["bpftool", "iter", "pin", objs["fixed_b"], str(by_id)], check=True)
    link_a = bpftool_json("link", "show", "pinned", str(by_path))["id"]
    link_b = bpftool_json("link", "show", "pinned", str(by_id))["id"]

    assert ok(cli(state, "pin", "adopted_a", str(by_path))) == f"{mnt}/task/adopted_a\n"
    assert ok(cli(state, "pin", "adopted_b", str(link_b), "--mode", "0444")) == \
        f"{mnt}/task/adopted_b\n"
    # bpftool's pins go; ours keep the links alive
    by_path.unlink()
    by_id.unlink()
    assert (mnt / "task" / "adopted_a").read_bytes() == fixed_output("A")
    assert (mnt / "task" / "adopted_b").read_bytes() == fixed_output("B")
    rows = {r["name"]: r for r in json.loads(ok(cli(state, "ls", "--json")))}
    a, b = rows["adopted_a"], rows["adopted_b"]
    assert (a["link_id"], a["origin"], a["mode"]) == (link_a, "pin", "0400")
    assert (b["link_id"], b["origin"], b["mode"]) == (link_b, "pin", "0444")


# -- rm -------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["bpfdumpfs rm", "rm in the tree"])
def test_rm_mid_read_lets_the_reader_finish_and_the_link_dies(served, objs, how):
    state, mnt = served.state, served.mnt
    ok(cli(state, "add", "doomed", objs["fixed_a"]))
    i = bpftool_json("link", "show", "pinned", str(state / "task" / "doomed"))
    reader = open(mnt / "task" / "doomed", "rb", buffering=0)
    try:
        head = reader.read(100)
        assert len(head) == 100
        if how == "bpfdumpfs rm":
            assert ok(cli(state, "rm", "task/doomed")) == ""
        else:
            subprocess.run(["rm", str(mnt / "task" / "doomed")], check=True)
        assert not (state / "task" / "doomed").exists()
        assert "doomed" not in os.listdir(mnt / "task")
        rest = b""
        try:
            while chunk := reader.read(1 << 16):
                rest += chunk
        except OSError as e:
            pytest.fail(f"after {how}, the reader that opened before could not read on: {e}")
        assert head + rest == fixed_output("A")
    finally:
        reader.close()
    assert eventually(lambda: not link_exists(i["id"])), "the link outlived its pin"
    assert eventually(lambda: not prog_exists(i["prog_id"])), "the program outlived its link"


# -- ls, info, xattrs ---------------------------------------------------------------------

BPFTOOL_ORDER = {"self_only": "self", "descendants_pre": "pre", "descendants_post": "post",
                 "ancestors_up": "ancestors", "children": "children"}


def test_ls_and_info_agree_with_bpftool(served, various):
    state = served.state
    rows = {f"{r['target']}/{r['name']}": r for r in json.loads(ok(cli(state, "ls", "--json")))}
    assert set(various["dumpers"]) <= set(rows)
    for dumper in various["dumpers"]:
        r = rows[dumper]
        link = bpftool_json("link", "show", "pinned", str(state / dumper))
        prog = bpftool_json("prog", "show", "id", str(link["prog_id"]))
        assert (r["link_id"], r["prog_id"], r["target"]) == \
            (link["id"], link["prog_id"], link["target_name"])
        assert (r["prog_name"], r["prog_tag"]) == (prog["name"], prog["tag"])
        assert r["pid"] == link.get("pid") and r["tid"] == link.get("tid")
        assert r["cgroup_id"] == link.get("cgroup_id")
        assert r["cgroup_order"] == BPFTOOL_ORDER.get(link.get("order"))
        assert r["map_id"] is None
        assert r["path"] == str(state / dumper) and r["origin"] == "cli"
    for dumper in ("task/v_plain", "cgroup/v_cg"):
        assert info(state, dumper) == rows[dumper]
    assert rows["task/v_pid"]["pid"] == various["pid"]
    assert rows["cgroup/v_cg"]["cgroup_id"] == os.stat(various["cgroup"]).st_ino
    assert rows["cgroup/v_cg"]["cgroup_order"] == "self"
    assert rows["cgroup/v_cgid"]["cgroup_order"] == "pre"
    plain = rows["task/v_plain"]
    assert (plain["mode"], plain["owner"], plain["group"], plain["view"]) == \
        ("0444", "nobody", "nogroup", "daemon")
    assert (rows["ksym/v_ksym"]["mode"], rows["ksym/v_ksym"]["owner"]) == ("0440", "root")

    # the text forms show the same
    text = {ln.split()[0]: ln for ln in ok(cli(state, "ls")).splitlines()}
    row = text["task/v_pid"].split()
    assert row[1:5] == ["link", str(rows["task/v_pid"]["link_id"]), "prog",
                        str(rows["task/v_pid"]["prog_id"])]
    assert "dump_tasks" in row and f"pid={various['pid']}" in row and "root:root" in row
    assert "nobody:nogroup" in text["task/v_plain"].split()
    shown = dict(ln.split(None, 1) for ln in ok(cli(state, "info", "cgroup/v_cg")).splitlines())
    assert shown["link_id"] == str(rows["cgroup/v_cg"]["link_id"])
    assert shown["prog_tag"] == rows["cgroup/v_cg"]["prog_tag"]
    assert shown["cgroup_order"] == "self" and shown["mode"] == "0400"


def test_parameters_shape_what_the_tree_reads(served, various):
    mnt, pid = served.mnt, various["pid"]
    lines = (mnt / "task" / "v_pid").read_text().splitlines()
    assert lines[0].split()[:2] == ["PID", "TGID"]
    assert lines[1:] and all(int(ln.split()[1]) == pid for ln in lines[1:])
    cg = various["cgroup"]
    assert (mnt / "cgroup" / "v_cg").read_text() == \
        f"{os.stat(cg).st_ino} 1 /{cg.name}\n"
    assert (mnt / "task" / "v_plain").read_bytes() == fixed_output("A")


def test_xattrs_show_the_link_program_and_parameters(served, various):
    rows = {f"{r['target']}/{r['name']}": r
            for r in json.loads(ok(cli(served.state, "ls", "--json")))}
    fields = ["target", "link_id", "prog_id", "prog_name", "prog_tag", "view",
              "map_id", "cgroup_id", "cgroup_order", "tid", "pid"]
    for dumper in various["dumpers"]:
        got, want = xattrs(served.mnt / dumper), rows[dumper]
        assert {k: v for k, v in got.items() if k in fields} == \
            {k: str(want[k]) for k in fields if want[k] is not None}, dumper
    assert xattrs(served.mnt / "task" / "v_pid")["pid"] == str(various["pid"])
    assert xattrs(served.mnt / "cgroup" / "v_cg")["cgroup_order"] == "self"
    assert xattrs(served.mnt / "task" / "v_plain")["view"] == "daemon"


def test_map_parameter_by_id_and_by_pinned_path(served, bare, objs):
    state, mnt = served.state, served.mnt
    amap = bare / "amap"
    subprocess.run(["bpftool", "map", "create", str(amap), "type", "hash", "key", "4", "value",
                    "4", "entries", "8", "name", "bpfdumpfs_t"], check=True)
    for k, v in ((1, 10), (2, 20)):
        subprocess.run(["bpftool", "map", "update", "pinned", str(amap), "key", str(k), "0", "0",
                        "0", "value", str(v), "0", "0", "0"], check=True)
    map_id = bpftool_json("map", "show", "pinned", str(amap))["id"]
    p = cli(state, "add", "byid", objs["map_elems"], "--map", str(map_id))
    if p.returncode != 0 and "Operation not permitted" in p.stderr:
        # Tell a kernel that refuses every map-element iterator from a bpfdumpfs bug.
        probe = subprocess.run(["bpftool", "prog", "load", objs["map_elems"], str(bare / "probe")],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.xfail("this kernel refuses to load any iter/bpf_map_elem program (EPERM, "
                         "bpftool too)")
    assert ok(p) == f"{mnt}/bpf_map_elem/byid\n"
    assert ok(cli(state, "add", "bypath", objs["map_elems"], "--map", str(amap))) == \
        f"{mnt}/bpf_map_elem/bypath\n"
    for name in ("byid", "bypath"):
        assert sorted((mnt / "bpf_map_elem" / name).read_text().splitlines()) == ["1=10", "2=20"]
        assert info(state, f"bpf_map_elem/{name}")["map_id"] == map_id
        assert xattrs(mnt / "bpf_map_elem" / name)["map_id"] == str(map_id)
        link = bpftool_json("link", "show", "pinned", str(state / "bpf_map_elem" / name))
        assert link["map_id"] == map_id


# -- targets ----------------------------------------------------------------------------------

def kernel_targets() -> set[str]:
    """Iterator targets from the kernel's BTF, found with bpftool: a FUNC bpf_iter_X and
    a STRUCT bpf_iter__X."""
    out = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"],
                         capture_output=True, text=True, check=True).stdout
    structs = set(re.findall(r"STRUCT 'bpf_iter__([a-z0-9_]+)'", out))
    funcs = set(re.findall(r"FUNC 'bpf_iter_([a-z0-9_]+)'", out))
    return structs & funcs


def test_targets_lists_this_kernels_targets_and_their_parameters():
    need_kernel()
    found = json.loads(ok(bpfdumpfs("targets", "--json", check=False)))
    names = [t["name"] for t in found]
    assert set(names) == kernel_targets() and len(names) == len(set(names))
    assert len(names) >= 18
    params = {t["name"]: {p["name"]: p["required"] for p in t["params"]} for t in found}
    for t in ("bpf_map_elem", "bpf_sk_storage_map", "sockmap"):
        assert params[t] == {"map": True}
    assert params["cgroup"] == {"cgroup": True}
    for t in ("task", "task_file", "task_vma"):
        assert params[t] == {"task": False}
    for t in ("ksym", "tcp", "bpf_map", "bpf_prog", "unix"):
        assert params[t] == {}
    text = ok(bpfdumpfs("targets", check=False)).splitlines()
    assert [ln.split()[0] for ln in text] == names
    line = {ln.split()[0]: ln for ln in text}
    assert "--map" in line["bpf_map_elem"] and "--order" in line["cgroup"]
    assert "--pid" in line["task"] and "optional" in line["task"]


def test_targets_name_the_builtin_serving_each_and_whether_it_is_pinned(tree, bare):
    found = {t["name"]: t["builtins"] for t in json.loads(ok(cli(tree.state, "targets",
                                                                   "--json")))}
    assert found["task"] == [{"name": "tasks", "pinned": True}]
    assert found["tcp"] == [{"name": "tcp", "pinned": True}, {"name": "tcp6", "pinned": True}]
    assert found["bpf_map_elem"] == []
    line = {ln.split()[0]: ln for ln in ok(cli(bare, "targets")).splitlines()}
    assert line["task_vma"].split()[1:4] == ["vmas", "(not", "pinned)"]
    assert line["bpf_map_elem"].split()[1] == "-"


# -- --replace ---------------------------------------------------------------------------------

def test_replace_swaps_the_program_atomically(served, objs):
    state, mnt = served.state, served.mnt
    f = mnt / "task" / "swapped"
    ok(cli(state, "add", "swapped", objs["fixed_a"], "--mode", "0444", "--group", "nogroup"))
    old = xattrs(f)
    early = open(f, "rb", buffering=0)          # opened and half read before the swap
    opened = open(f, "rb", buffering=0)         # opened, not read, before the swap
    try:
        head = early.read(100)
        p = cli(state, "add", "swapped", objs["fixed_b"], "--replace")
        assert p.returncode == 0, p.stderr
        assert p.stdout == f"{f}\n"
        assert p.stderr == "bpfdumpfs: updated task/swapped\n"
        new = xattrs(f)
        assert new["link_id"] == old["link_id"]
        assert new["prog_id"] != old["prog_id"] and new["prog_name"] == "dump_b"
        st = os.stat(f)
        assert (st.st_mode & 0o7777, st.st_gid) == (0o444, grp.getgrnam("nogroup").gr_gid)
        assert bpftool_json("link", "show", "id", old["link_id"])["prog_id"] == \
            int(new["prog_id"])
        assert f.read_bytes() == fixed_output("B")
        assert head + early.read(1 << 20) + early.read(1 << 20) == fixed_output("A")
        assert opened.read(1 << 20) + opened.read(1 << 20) == fixed_output("A")
    finally:
        early.close()
        opened.close()
    assert eventually(lambda: not prog_exists(int(old["prog_id"])))


def test_replace_with_other_parameters_makes_a_new_link(served):
    state = served.state
    f = served.mnt / "task" / "narrowed"
    ok(cli(state, "add", "narrowed", TASKS_OBJ))
    old = xattrs(f)
    p = cli(state, "add", "narrowed", TASKS_OBJ, "--pid", str(os.getpid()), "--replace",
            "--mode", "0444", "--group", "nogroup")
    assert p.returncode == 0 and p.stderr == "bpfdumpfs: replaced task/narrowed\n"
    st = os.stat(f)                                  # at once: no stale attributes
    assert (st.st_mode & 0o7777, st.st_gid) == (0o444, grp.getgrnam("nogroup").gr_gid)
    new = xattrs(f)
    assert new["link_id"] != old["link_id"] and new["pid"] == str(os.getpid())
    assert eventually(lambda: not link_exists(int(old["link_id"])))
    lines = f.read_text().splitlines()
    assert all(int(ln.split()[1]) == os.getpid() for ln in lines[1:])


# -- bad input ---------------------------------------------------------------------------------

def _notelf(c):
    junk = c["tmp"] / "junk.bpf.o"
    junk.write_text("this is not an ELF file\n")
    return ["add", "x", str(junk)]


# (id, argv after `bpfdumpfs`, words the error must contain)
BAD = [
    ("missing-object", lambda c: ["add", "x", "/nonexistent/x.bpf.o"],
     ["/nonexistent/x.bpf.o", "No such file"]),
    ("not-elf", _notelf, ["junk.bpf.o", "ELF"]),
    ("no-iter-program", lambda c: ["add", "x", c["objs"]["tracepoint_only"]],
     ["tracepoint_only.bpf.o", "no iterator program", 'SEC("iter/']),
    ("prog-not-an-iterator", lambda c: ["add", "x", c["objs"]["tracepoint_only"],
                                        "--prog", "on_openat"], ["on_openat", "iter"]),
    ("several-iter-programs", lambda c: ["add", "x", c["objs"]["two_iters"]],
     ["2 iterator programs", "--prog", "first", "second"]),
    ("target-not-in-kernel", lambda c: ["add", "x", c["objs"]["no_such_target"]],
     ["nonexistent", "targets"]),
    ("map-missing", lambda c: ["add", "x", c["objs"]["map_elems"]],
     ["bpf_map_elem", "--map"]),
    ("order-missing", lambda c: ["add", "x", CGROUPS_OBJ], ["cgroup", "--order"]),
    ("map-not-taken", lambda c: ["add", "x", TASKS_OBJ, "--map", "1"],
     ["task", "--map", "--pid"]),
    ("pid-not-taken", lambda c: ["add", "x", KSYM_OBJ, "--pid", "1"],
     ["ksym", "--pid", "no parameters"]),
    ("tid-and-pid", lambda c: ["add", "x", TASKS_OBJ, "--pid", "1", "--tid", "1"],
     ["--tid", "--pid"]),
    ("no-such-map-id", lambda c: ["add", "x", c["objs"]["map_elems"], "--map", "4000000000"],
     ["map", "4000000000"]),
    ("no-such-map-pin", lambda c: ["add", "x", c["objs"]["map_elems"], "--map", "/nonexistent"],
     ["/nonexistent"]),
    ("cgroup-path-not-a-cgroup", lambda c: ["add", "x", CGROUPS_OBJ, "--order", "self",
                                            "--cgroup", "/tmp"], ["/tmp", "cgroup"]),
    ("no-such-cgroup-id", lambda c: ["add", "x", CGROUPS_OBJ, "--order", "self",
                                     "--cgroup", "987654321"], ["987654321", "cgroup"]),
    ("empty-name", lambda c: ["add", "", TASKS_OBJ], ["name", "empty"]),
    ("long-name", lambda c: ["add", "n" * 65, TASKS_OBJ], ["65", "64"]),
    ("taken-name", lambda c: ["add", "taken", TASKS_OBJ],
     ["task/taken", "exists", "--replace"]),
    ("slash-name", lambda c: ["add", "a/b", TASKS_OBJ], ["'a/b'", "'/'"]),
    ("dot-name", lambda c: ["add", "a.b", TASKS_OBJ], ["'a.b'", "'.'"]),
    ("dash-name", lambda c: ["add", "--state-dir", str(c["state"]), "--", "-x", TASKS_OBJ],
     ["'-x'", "'-'"]),
    ("unknown-user", lambda c: ["add", "x", TASKS_OBJ, "--owner", "nosuchuser"],
     ["nosuchuser", "user"]),
    ("unknown-group", lambda c: ["add", "x", TASKS_OBJ, "--group", "nosuchgroup"],
     ["nosuchgroup", "group"]),
    ("state-not-bpffs", lambda c: ["add", "x", TASKS_OBJ, "--state-dir", str(c["tmp"])],
     ["{tmp}", "bpffs", "mount -t bpf"]),
    ("pin-no-such-link-id", lambda c: ["pin", "x", "4000000000"], ["4000000000", "link"]),
    ("pin-no-such-path", lambda c: ["pin", "x", "/nonexistent/link"], ["/nonexistent/link"]),
    ("pin-not-a-link", lambda c: ["pin", "x", str(c["state"] / "amap")],
     ["amap", "not an iterator link"]),
    ("rm-no-such-dumper", lambda c: ["rm", "task/nothere"], ["task/nothere", "does not exist"]),
    ("rm-not-a-dumper-name", lambda c: ["rm", "nothere"], ["'nothere'", "TARGET/NAME"]),
    ("info-no-such-dumper", lambda c: ["info", "task/nothere"], ["task/nothere"]),
]


@pytest.fixture(scope="module")
def bad_state(tmp_path_factory):
    """A state dir with one dumper (task/taken) and a map, for the bad-input cases."""
    need_kernel()
    state = mount_bpffs(tmp_path_factory.mktemp("bad") / "state")
    ok(cli(state, "add", "taken", TASKS_OBJ))
    subprocess.run(["bpftool", "map", "create", str(state / "amap"), "type", "array", "key",
                    "4", "value", "4", "entries", "1", "name", "amap"], check=True)
    yield state
    unmount(state)


@pytest.fixture(scope="module")
def bad_runs(bad_state, objs, tmp_path_factory):
    """Every BAD case, run at once; and the state dir listing before and after them all."""
    c = {"objs": objs, "state": bad_state, "tmp": tmp_path_factory.mktemp("badinput")}
    broken = c["tmp"] / "broken.bpf.c"
    broken.write_text('#include "common.h"\nSEC("iter/task")\nint f(struct bpf_iter__task *c)'
                      ' { return undeclared_thing; }\n')
    argvs = {"verifier": ["add", "x", objs["unverifiable"]],
             "compile-error": ["add", "x", str(broken)],
             "mode-999": ["add", "x", TASKS_OBJ, "--mode", "999"],
             "mode-17777": ["add", "x", TASKS_OBJ, "--mode", "17777"]}
    argvs |= {case: argv(c) for case, argv, _ in BAD}
    for args in argvs.values():
        if "--state-dir" not in args:
            args += ["--state-dir", str(bad_state)]
    before = listing(bad_state)
    results = run_forked(argvs, c["tmp"] / "runs")
    return c["tmp"], results, before, listing(bad_state)


@pytest.mark.parametrize("case,words", [pytest.param(i, w, id=i) for i, _, w in BAD])
def test_bad_input_is_one_clear_line_and_changes_nothing(bad_runs, case, words):
    tmp, results, before, after = bad_runs
    line = error_line(results[case])
    for w in words:
        w = w.replace("{tmp}", str(tmp))
        assert w in line, f"{w!r} not in {line!r}"
    assert has_hint(line), f"no fix given: {line!r}"
    assert after == before, "a bad command changed the state dir"


def test_verifier_rejection_prints_the_verifier_log(bad_runs):
    _, results, before, after = bad_runs
    p = results["verifier"]
    assert p.returncode == 1 and "Traceback" not in p.stderr and p.stdout == ""
    first, *log = p.stderr.splitlines()
    assert first.startswith("bpfdumpfs: ") and "bad_deref" in first and "verifier" in first
    assert any("invalid mem access" in ln for ln in log), p.stderr
    assert after == before


def test_a_source_that_does_not_compile_shows_the_compiler_error(bad_runs):
    _, results, before, after = bad_runs
    p = results["compile-error"]
    assert p.returncode == 1 and "Traceback" not in p.stderr and p.stdout == ""
    first = p.stderr.splitlines()[0]
    assert first.startswith("bpfdumpfs: ") and "broken.bpf.c" in first
    assert "undeclared_thing" in first
    assert after == before


@pytest.mark.parametrize("mode,why", [("999", "is not an octal mode such as 0440"),
                                      ("17777", "is not a file mode")])
def test_a_bad_mode_is_refused_by_the_argument_parser(bad_runs, mode, why):
    _, results, before, after = bad_runs
    p = results[f"mode-{mode}"]
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.splitlines()[-1] == f"bpfdumpfs add: error: argument --mode: '{mode}' {why}"
    assert after == before


# -- restarts ------------------------------------------------------------------------------

def test_kill_9_mid_read_and_restart_loses_nothing(tmp_path, objs):
    need_kernel()
    state = mount_bpffs(tmp_path / "state")
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "r.toml").write_text(f'[dumpers.fromconfig]\nobject = "{objs["fixed_b"]}"\n'
                                f'mode = "0440"\ngroup = "nogroup"\n')
    mnt = tmp_path / "mnt"
    d = Daemon(mnt, state, "--no-builtins", "--config-dir", str(cfg)).start()
    d2 = None
    try:
        ok(cli(state, "add", "fromcli", objs["fixed_a"], "--mode", "0444", "--owner", "nobody",
               "--group", "nogroup", "--view", "daemon"))
        ok(cli(state, "add", "onepid", TASKS_OBJ, "--pid", str(os.getpid())))
        subprocess.run(["bpftool", "iter", "pin", objs["fixed_a"], str(state / "ext")],
                       check=True)
        ok(cli(state, "pin", "adopted", str(state / "ext"), "--mode", "0400"))
        (state / "ext").unlink()

        def snapshot():
            """ls --json, the xattrs and the mode/owner/group the tree shows of each."""
            rows = json.loads(ok(cli(state, "ls", "--json")))
            files = {f"{r['target']}/{r['name']}": r for r in rows}
            stats = {k: os.stat(mnt / k) for k in files}
            return (files, {k: xattrs(mnt / k) for k in files},
                    {k: (st.st_mode, st.st_uid, st.st_gid) for k, st in stats.items()})
        before = snapshot()
        assert {r["origin"] for r in before[0].values()} == {"cli", "config", "pin"}

        reader = open(mnt / "task" / "fromcli", "rb", buffering=0)
        assert len(reader.read(100)) == 100
        d.kill(signal.SIGKILL)
        with pytest.raises(OSError):
            reader.read(100)
        try:
            reader.close()
        except OSError:
            pass  # the fd died with the mount
        d2 = Daemon(mnt, state, "--no-builtins", "--config-dir", str(cfg),
                    log=tmp_path / "restarted.log").start()
        # Daemon.start() can return early: a dead mount's root answers stat() from the
        # kernel's attribute cache. Wait for the new daemon to serve.
        assert eventually(lambda: "serving" in d2.output() or d2.proc.poll() is not None, 30)
        assert d2.proc.poll() is None, f"the restarted daemon exited: {d2.output()}"
        assert snapshot() == before
        assert (mnt / "task" / "fromcli").read_bytes() == fixed_output("A")
        assert (mnt / "task" / "fromconfig").read_bytes() == fixed_output("B")
        assert (mnt / "task" / "adopted").read_bytes() == fixed_output("A")
        # the config was applied again, and found nothing to do
        assert not re.search(r"config: (added|updated|replaced|removed)", d2.output())
    finally:
        if d2:
            d2.stop()
        d.stop()
        unmount(state)
