"""The daemon's limits: what each protects, its default, and where a value comes from
-- the settings file's [limits], then the command line (`bpfdumpfs mount --max-handles
...`), which wins. Every limit is a number >= 0, and 0 means no limit.

    [limits]
    max_handles = 4096          # open dumper files in all; 0: no limit
    max_handles_per_uid = 1024  # of one user
    open_budget = 30            # seconds one open may read; 0: no budget
    read_ahead_mib = 64         # all streams' read-ahead; 0: no limit
"""
from __future__ import annotations

import dataclasses
import errno
import tomllib
from dataclasses import dataclass, field
from typing import Any

from .errors import DumperError

DEFAULT_SETTINGS = "/etc/bpfdumpfs/bpfdumpfs.toml"


def _limit(default: float, flag: str, metavar: str, help: str) -> Any:
    return field(default=default, metadata={"flag": flag, "metavar": metavar, "help": help})


@dataclass(frozen=True)
class Limits:
    """What protects the host from its readers; 0 means no limit."""
    max_handles: int = _limit(
        4096, "--max-handles", "N",
        "open dumper files in all, then ENFILE (default 4096; 0: no limit)")
    max_handles_per_uid: int = _limit(
        1024, "--max-handles-per-uid", "N",
        "open dumper files per user, then EMFILE (default 1024; 0: no limit)")
    open_budget: float = _limit(
        0.0, "--open-budget", "SECONDS",
        "seconds one open may read, then ETIME (default 0: no budget)")
    read_ahead_mib: int = _limit(
        64, "--read-ahead", "MIB",
        "MiB that all streams together may read ahead of their readers, one user's at "
        "most 3/4 of it; beyond it reads are made on demand (default 64; 0: no limit)")

    def replace(self, **given: Any) -> Limits:
        """These limits with the values GIVEN (None: not given, keep this one)."""
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})


FIELDS = {f.name: f for f in dataclasses.fields(Limits)}
# limits that take a fraction (seconds); the others count whole things
FRACTIONAL = frozenset(name for name, f in FIELDS.items() if f.type == "float")


def _valid(name: str, value: Any) -> bool:
    """A number >= 0 of the limit's type (a float limit takes an int too; no bools)."""
    kinds = (int, float) if name in FRACTIONAL else (int,)
    return isinstance(value, kinds) and not isinstance(value, bool) and value >= 0


def load(path: str, required: bool = False) -> Limits:
    """[limits] of the daemon's settings file PATH (absent: the defaults, unless
    REQUIRED). DumperError(EINVAL) names the line of an unknown key or a bad value."""
    try:
        text = open(path).read()
    except FileNotFoundError:
        if required:
            raise DumperError(errno.ENOENT, f"settings file {path} does not exist",
                              "create it, or leave out --settings") from None
        return Limits()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DumperError(errno.EINVAL, f"{path}: TOML syntax: {e}") from None
    limits = data.pop("limits", {})
    given: list[tuple[str, Any]] = [*[(k, None) for k in data], *limits.items()]
    for key, value in given:
        line = next((i + 1 for i, ln in enumerate(text.split("\n"))
                     if ln.strip().startswith(key)), 1)
        if key not in FIELDS or value is None:
            raise DumperError(errno.EINVAL, f"{path}:{line}: unknown setting {key!r}",
                              "known: [limits] " + ", ".join(FIELDS))
        if not _valid(key, value):
            raise DumperError(errno.EINVAL, f"{path}:{line}: {key} must be a number >= 0",
                              f"e.g. {key} = 0 (no limit)")
    return Limits(**limits)
