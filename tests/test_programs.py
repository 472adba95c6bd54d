"""What bpfdumpfs tells of the programs it loads, against a real kernel: full names (from
BTF) everywhere a name is shown, loads the kernel refuses before verifying them, and
helpers whose results depend on the task reading the seq_file."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
from helpers import (
    BPF_SRC,
    ROOT,
    bpf_objects,
    bpftool_json,
    cli,
    need_kernel,
    ok,
    traversable,
    xattrs,
)

from bpfdumpfs import Dumper, btf, kernel

LONG_NAME = "slab_info_collector"  # 19 characters: the kernel keeps "slab_info_colle"

# the test programs used here: tests/bpf/NAME.bpf.c (each says what it is)
PROGRAMS = ["long_name", "reader_pid", "in_subprog", "non_gpl_kfunc"]


@pytest.fixture(scope="module")
def objs(tmp_path_factory) -> dict[str, str]:
    """PROGRAMS built (name -> .bpf.o), copied where anyone may read them (the refusal
    tests load them as nobody)."""
    where = traversable(tmp_path_factory.mktemp("progs"))
    built = {}
    for name, obj in bpf_objects(*PROGRAMS).items():
        built[name] = shutil.copy(obj, where)
        os.chmod(built[name], 0o644)
    return built


def source(name: str) -> str:
    return str(BPF_SRC / f"{name}.bpf.c")


def warnings(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("bpfdumpfs: WARNING: ")]


# -- full names ------------------------------------------------------------------------

def test_full_program_names_in_ls_info_json_and_xattrs(tree, objs):
    state, mnt = tree.state, tree.mnt
    p = cli(state, "add", "long_named", source("long_name"), "--prog", LONG_NAME)
    try:
        assert ok(p) == f"{mnt}/task/long_named\n"
        assert p.stderr == "", "a program without reader-dependent helpers warned"
        shown = json.loads(ok(cli(state, "info", "task/long_named", "--json")))
        prog = bpftool_json("prog", "show", "id", str(shown["prog_id"]))
        assert shown["prog_name"] == prog["name"] == LONG_NAME
        rows = {r["name"]: r for r in json.loads(ok(cli(state, "ls", "--json")))}
        assert rows["long_named"]["prog_name"] == LONG_NAME
        text = {ln.split()[0]: ln.split() for ln in ok(cli(state, "ls")).splitlines()}
        assert LONG_NAME in text["task/long_named"]
        lines = dict(ln.split(None, 1) for ln in
                     ok(cli(state, "info", "task/long_named")).splitlines())
        assert lines["prog_name"] == LONG_NAME
        f = mnt / "task" / "long_named"
        got = subprocess.run(["getfattr", "--only-values", "-n", "user.bpfdump.prog_name",
                              str(f)], capture_output=True, text=True, check=False)
        assert (got.returncode, got.stdout) == (0, LONG_NAME), got.stderr
        assert xattrs(f)["prog_name"] == LONG_NAME
    finally:
        cli(state, "rm", "task/long_named")


def test_a_program_without_btf_keeps_the_kernels_15_characters():
    obj = bpf_objects("long_name_nobtf")["long_name_nobtf"]  # long_name.bpf.c without -g
    with Dumper.load(obj) as d:
        assert d.info().prog_name == LONG_NAME[:15]


def test_btf_of_an_unknown_kind_is_refused_not_misread():
    # one type of kind 20 (none yet), then an INT: the INT's offset cannot be known
    types = struct.pack("<III", 0, 20 << 24, 0) + struct.pack("<IIII", 1, 1 << 24, 4, 32)
    strings = b"\0int\0"
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types),
                         len(strings))
    with pytest.raises(ValueError, match="kind 20"):
        btf.Btf(header + types + strings)


# -- loads refused before verification -----------------------------------------------------

PRIVILEGES = {
    "nobody": (["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                "--inh-caps=-all"], "CAP_BPF and CAP_PERFMON"),
    "root-with-CAP_BPF-only": (["setpriv", "--bounding-set=-all,+bpf", "--inh-caps=-all"],
                               "lacks CAP_PERFMON"),
}


@pytest.mark.parametrize("who", sorted(PRIVILEGES))
def test_a_load_without_capabilities_is_refused_before_verifying(objs, who):
    prefix, lacks = PRIVILEGES[who]
    p = subprocess.run([*prefix, sys.executable, "-m", "bpfdumpfs", "run", objs["reader_pid"]],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 1 and p.stdout == "" and "Traceback" not in p.stderr, p.stderr
    line, = p.stderr.splitlines()
    assert line.startswith("bpfdumpfs: loading program 'print_reader_pid' of ")
    assert "(EPERM); the kernel refused to load it (EPERM) before verifying it: " in line
    assert lacks in line and "CAP_SYS_ADMIN" in line and "verifier rejected" not in line


def test_a_non_gpl_program_calling_a_kfunc_is_refused_before_verifying(objs):
    need_kernel()
    p = subprocess.run([sys.executable, "-m", "bpfdumpfs", "run", objs["non_gpl_kfunc"]],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    first, *log = p.stderr.splitlines()
    assert "the kernel refused to load it (EINVAL) before verifying it: cannot call kernel " \
           "function from non-GPL compatible program; " + kernel.LICENSE_HINT in first
    assert any(ln.startswith("processed 0 insns") for ln in log)


# -- reader-dependent helpers ---------------------------------------------------------------

def test_a_program_reading_the_current_task_warns_and_reads_the_daemons_pid(tree, objs):
    state, mnt = tree.state, tree.mnt
    p = cli(state, "add", "reader_pid", source("reader_pid"), "--mode", "0444")
    try:
        assert ok(p) == f"{mnt}/task/reader_pid\n"
        warned, = warnings(p.stderr)
        assert "task/reader_pid calls bpf_get_current_pid_tgid" in warned
        assert "the daemon's" in warned and "not the reader's" in warned
        shown = json.loads(ok(cli(state, "info", "task/reader_pid", "--json")))
        assert shown["reader_dependent"] == ["bpf_get_current_pid_tgid"]
        lines = dict(ln.split(None, 1) for ln in
                     ok(cli(state, "info", "task/reader_pid")).splitlines())
        assert lines["reader_dependent"] == "bpf_get_current_pid_tgid"
        # read through the tree, the current task is the daemon, whoever reads
        assert tree.pid != os.getpid()
        assert (mnt / "task" / "reader_pid").read_text() == f"tgid {tree.pid}\n"
        reader = subprocess.run(["cat", str(mnt / "task" / "reader_pid")], capture_output=True,
                                text=True, check=True)
        assert reader.stdout == f"tgid {tree.pid}\n"
    finally:
        cli(state, "rm", "task/reader_pid")


def test_run_pin_and_config_files_warn_too(bare, objs, tmp_path):
    p = cli(bare, "run", source("reader_pid"), "--pin", "pinned")
    assert ok(p) == f"{bare}/task/pinned\n"
    assert "task/pinned calls bpf_get_current_pid_tgid" in warnings(p.stderr)[0]
    cfg = tmp_path / "cfg"
    cfg.mkdir(mode=0o755)
    (cfg / "r.toml").write_text(f'[dumpers.fromconfig]\nobject = "{objs["reader_pid"]}"\n')
    p = cli(bare, "apply", "--config-dir", str(cfg))
    assert ok(p) == "added task/fromconfig\n"
    assert "task/fromconfig calls bpf_get_current_pid_tgid" in warnings(p.stderr)[0]
    assert json.loads(ok(cli(bare, "info", "task/fromconfig", "--json")))[
        "reader_dependent"] == ["bpf_get_current_pid_tgid"]


def test_helpers_called_from_a_subprogram_are_found(objs):
    with Dumper.load(objs["in_subprog"]) as d:
        assert d.reader_dependent == ("bpf_get_current_uid_gid",)
        assert "bpf_seq_printf" in d.helpers


def test_a_program_without_such_helpers_gets_no_warning(bare, objs):
    p = cli(bare, "add", "quiet", objs["long_name"])
    assert ok(p) == f"{bare}/task/quiet\n" and p.stderr == ""
    assert json.loads(ok(cli(bare, "info", "task/quiet", "--json")))["reader_dependent"] == []
    assert "reader_dependent" not in ok(cli(bare, "info", "task/quiet"))


def test_an_adopted_link_says_nothing_of_its_helpers(bare, objs):
    pin = bare / "external"
    subprocess.run(["bpftool", "iter", "pin", objs["reader_pid"], str(pin)], check=True)
    p = cli(bare, "pin", "adopted", str(pin))
    assert ok(p) == f"{bare}/task/adopted\n" and p.stderr == ""
    assert json.loads(ok(cli(bare, "info", "task/adopted", "--json")))[
        "reader_dependent"] is None
