"""Hostile input: property-based tests over names, paths, xattrs, CLI arguments, config
files and BPF objects. Nothing may crash or wedge the daemon; every failure is a clean error."""
from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, need_kernel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpfdumpfs import Dumper, DumperError
from bpfdumpfs.builtins import object_path
from bpfdumpfs.config import ConfigError, parse
from bpfdumpfs.state import check_name

FAST = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)


@FAST
@given(names)
def test_check_name_accepts_or_refuses_cleanly(name):
    try:
        assert check_name(name) == name
    except DumperError as e:
        assert e.errno in (errno.EINVAL, errno.ENAMETOOLONG)
        assert e.hint
    else:
        assert 0 < len(name) <= 64 and "/" not in name and "." not in name
        assert not name.startswith("-")


@FAST
@given(names)
def test_lookups_of_any_name_give_clean_errors(tree, name):
    raw = os.fsencode(name).replace(b"\0", b"")[:300] or b"x"  # paths cannot hold NUL
    if raw in (b".", b".."):
        return
    for parent in (tree.mnt, tree.mnt / "task"):
        try:
            os.stat(os.path.join(os.fsencode(parent), raw))
        except OSError as e:
            assert e.errno in (errno.ENOENT, errno.ENAMETOOLONG, errno.EINVAL, errno.ENOTDIR)
    assert tree.serving()


@FAST
@given(st.binary(min_size=1, max_size=250).filter(lambda b: b"\0" not in b),
       st.binary(max_size=300))
def test_xattrs_of_any_name_and_value_give_clean_errors(tree, name, value):
    f = tree.mnt / "task" / "tasks"
    try:
        os.getxattr(f, name)
    except OSError as e:
        assert e.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.ERANGE, errno.EINVAL,
                           errno.ENAMETOOLONG, errno.EPERM)
    with pytest.raises(OSError) as e:
        os.setxattr(f, name, value)
    assert e.value.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.EINVAL, errno.ENAMETOOLONG,
                             errno.E2BIG, errno.ERANGE)
    assert tree.serving()


@FAST
@given(st.text(max_size=400))
def test_config_parser_never_crashes(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "x.toml"
    path.write_text(text)
    try:
        entries = parse(path)
    except ConfigError as e:
        assert e.line >= 1 and str(e)
    else:
        for entry in entries:
            assert entry.line >= 1


@FAST
@given(st.dictionaries(st.sampled_from(["object", "source", "prog", "map", "cgroup", "order",
                                         "tid", "pid", "mode", "owner", "group", "view",
                                         "bogus"]),
                       st.one_of(st.text(max_size=20), st.integers(-5, 1 << 40), st.booleans(),
                                 st.lists(st.integers(), max_size=2)), max_size=6),
       st.text(st.characters(whitelist_categories=("Ll", "Nd")), min_size=1, max_size=70))
def test_config_entries_of_any_shape_are_reported_with_a_line(tmp_path_factory, table, name):
    def toml(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return str(v).replace("'", '"')
    path = tmp_path_factory.mktemp("cfg") / "x.toml"
    path.write_text(f"[dumpers.{name}]\n" + "".join(f"{k} = {toml(v)}\n"
                                                     for k, v in table.items()))
    try:
        parse(path)
    except ConfigError as e:
        assert 1 <= e.line <= len(table) + 1, (e.line, str(e))


ARG_WORDS = ["add", "pin", "rm", "ls", "info", "run", "apply", "targets", "status", "--map",
             "--cgroup", "--order", "--tid", "--pid", "--mode", "--owner", "--group", "--prog",
             "--replace", "--view", "--state-dir", "--json", "x", "task/x", "-1", "0",
             "99999999999", "/nonexistent", "", "a.b", "--", "reader", "pre", "\x01"]


@SLOW
@given(st.lists(st.one_of(st.sampled_from(ARG_WORDS),
                          st.text(st.characters(blacklist_characters="\0",  # argv holds no NUL
                                                blacklist_categories=("Cs",)), max_size=12)),
                max_size=6))
def test_cli_arguments_never_give_a_traceback(state_dir, argv):
    env = {**os.environ, "BPFDUMPFS_STATE_DIR": str(state_dir),
           "BPFDUMPFS_CONFIG_DIR": "/nonexistent"}
    if argv[:1] in (["run"],) or "--replace" in argv and "add" in argv:
        argv = ["info", *argv]  # keep the run from streaming or changing real state
    p = subprocess.run([sys.executable, "-m", "bpfdumpfs", *argv], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode in (0, 1, 2), (argv, p.returncode, p.stderr)
    if p.returncode:
        assert p.stderr.strip(), "a failure says why"


def _broken_objects(tmp: Path) -> list[tuple[str, Path]]:
    good = object_path("tasks").read_bytes()
    rng = random.Random(7)
    objs = []
    for i, cut in enumerate(sorted(rng.sample(range(1, len(good)), 12))):
        objs.append((f"truncated at {cut}", tmp / f"trunc{i}.bpf.o"))
        objs[-1][1].write_bytes(good[:cut])
    for i in range(4):
        objs.append(("random bytes", tmp / f"random{i}.bpf.o"))
        objs[-1][1].write_bytes(b"\x7fELF" + rng.randbytes(rng.randint(0, 4000)))
    objs.append(("wrong machine", tmp / "true.o"))
    shutil.copy("/bin/true", objs[-1][1])
    # a valid ELF whose program is garbage: flip bytes inside the iter section's code
    flipped = bytearray(good)
    sec = flipped.find(b"\x85\x00\x00\x00")   # the first call instruction
    flipped[sec:sec + 64] = rng.randbytes(64)
    objs.append(("broken program", tmp / "flipped.bpf.o"))
    objs[-1][1].write_bytes(bytes(flipped))
    return objs


def test_malformed_objects_are_refused_cleanly(tmp_path, tree):
    need_kernel()
    for what, obj in _broken_objects(tmp_path):
        try:
            with Dumper.load(obj) as d:
                d.read()  # if libbpf and the verifier let it through, it must still run
        except DumperError as e:
            assert e.errno and str(obj) in str(e), (what, str(e))
        p = subprocess.run([sys.executable, "-m", "bpfdumpfs", "add", "bad", str(obj),
                            "--state-dir", str(tree.state)], cwd=ROOT, capture_output=True,
                           text=True)
        assert "Traceback" not in p.stderr, (what, p.stderr)
        assert p.returncode == 1 or (p.returncode == 0 and subprocess.run(
            [sys.executable, "-m", "bpfdumpfs", "rm", "task/bad", "--state-dir",
             str(tree.state)], cwd=ROOT).returncode == 0), (what, p.stderr)
    assert tree.serving()
    assert (tree.mnt / "task" / "tasks").read_bytes().startswith(b"    PID")
