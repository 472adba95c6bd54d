"""limits.py: the settings file's [limits], the defaults, and the command line's
overrides -- what `bpfdumpfs mount` starts with (no daemon, no root)."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest

from bpfdumpfs import cli, limits
from bpfdumpfs.errors import DumperError
from bpfdumpfs.limits import Limits


def settings(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bpfdumpfs.toml"
    path.write_text(text)
    return str(path)


def test_an_absent_file_gives_the_defaults_unless_it_was_named(tmp_path):
    assert limits.load(str(tmp_path / "none.toml")) == Limits()
    with pytest.raises(DumperError) as e:
        limits.load(str(tmp_path / "none.toml"), required=True)
    assert e.value.errno == errno.ENOENT and "does not exist" in str(e.value)


def test_every_limit_is_read_and_a_float_limit_takes_an_int(tmp_path):
    path = settings(tmp_path, "[limits]\nmax_handles = 10\nmax_handles_per_uid = 0\n"
                              "open_budget = 3\nread_ahead_mib = 5\n")
    assert limits.load(path) == Limits(max_handles=10, max_handles_per_uid=0,
                                       open_budget=3, read_ahead_mib=5)
    assert limits.load(settings(tmp_path, "[limits]\nopen_budget = 2.5\n")).open_budget == 2.5


@pytest.mark.parametrize("text, line, words", [
    ("[limits]\nmax_handels = 3\n", 2, ["unknown setting 'max_handels'", "max_handles"]),
    ("max_handles = 3\n", 1, ["unknown setting 'max_handles'", "[limits]"]),
    ("[limits]\nopen_budget = 1\nmax_handles = -1\n", 3, ["max_handles must be a number >= 0"]),
    ("[limits]\nmax_handles = 2.5\n", 2, ["max_handles must be a number >= 0"]),
    ("[limits]\nmax_handles = true\n", 2, ["max_handles must be a number >= 0"]),
    ("[limits]\nread_ahead_mib = \"64\"\n", 2, ["read_ahead_mib must be a number >= 0"]),
])
def test_a_bad_setting_is_named_with_its_line(tmp_path, text, line, words):
    path = settings(tmp_path, text)
    with pytest.raises(DumperError) as e:
        limits.load(path)
    assert e.value.errno == errno.EINVAL
    assert str(e.value).startswith(f"{path}:{line}: "), str(e.value)
    for w in words:
        assert w in str(e.value)


def test_bad_toml_is_one_error_naming_the_file(tmp_path):
    path = settings(tmp_path, "[limits\n")
    with pytest.raises(DumperError) as e:
        limits.load(path)
    assert e.value.errno == errno.EINVAL and str(e.value).startswith(f"{path}: TOML syntax")


def test_the_command_line_wins_over_the_file_limit_by_limit():
    base = Limits(max_handles=10, open_budget=5.0)
    assert base.replace(max_handles=None, open_budget=None) == base
    assert base.replace(max_handles=3, read_ahead_mib=0) == \
        Limits(max_handles=3, open_budget=5.0, read_ahead_mib=0)


def test_mount_has_a_flag_for_each_limit_parsed_as_its_type():
    args = cli.parser().parse_args(["mount", "--max-handles", "7", "--open-budget", "0.5",
                                    "--read-ahead", "0", "--max-handles-per-uid", "2"])
    assert {k: getattr(args, k) for k in limits.FIELDS} == \
        {"max_handles": 7, "max_handles_per_uid": 2, "open_budget": 0.5, "read_ahead_mib": 0}
    unset = cli.parser().parse_args(["mount"])
    assert Limits().replace(**{k: getattr(unset, k) for k in limits.FIELDS}) == Limits()
