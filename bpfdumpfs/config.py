"""Declarative dumpers: a directory of TOML files, applied idempotently.

    # /etc/bpfdumpfs/dumpers.d/web.toml
    [dumpers.webtcp]
    source = "webtcp.bpf.c"     # or object = "/path/x.bpf.o"; relative to this file
    prog = "dump_tcp"           # when the object has several iter programs
    mode = "0440"
    group = "adm"
    view = "reader"             # or "daemon"
    # parameters, as `bpfdumpfs add` takes them: map, cgroup, order, tid, pid
    # a source's compiler flags, as add's -I, -D and --cflags:
    include = ["include"]       # header dirs, relative to this file
    define = ["MAX_ROWS=64"]
    cflags = "-Wno-unused"

`apply` adds what is missing, replaces what changed (the entry or its object),
and removes only dumpers it created from a file that no longer declares them.
A file with any error -- syntax, an unknown key, an object that does not load --
is reported with its path, line and reason, and nothing from it is applied; the
dumpers it made earlier are left as they are.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .compile import cflags, is_source
from .dumpers import Dumper, Params
from .errors import DumperError
from .state import Spec, StateDir

log = logging.getLogger(__name__)

DEFAULT_CONFIG_DIR = "/etc/bpfdumpfs/dumpers.d"
_KEYS = {"object", "source", "prog", "map", "cgroup", "order", "tid", "pid", "mode", "owner",
         "group", "view", "include", "define", "cflags"}
_TYPES: dict[str, type | tuple[type, ...]] = {
    "object": str, "source": str, "prog": str, "map": (str, int), "cgroup": (str, int),
    "order": str, "tid": int, "pid": int, "mode": str, "owner": (str, int),
    "group": (str, int), "view": str, "include": list, "define": list, "cflags": str}
_SOURCE_ONLY = ("include", "define", "cflags")


@dataclass
class Entry:
    spec: Spec
    line: int
    digest: str = ""


@dataclass
class Report:
    applied: list[str] = field(default_factory=list)   # "added task/x", "replaced ...", ...
    errors: list[str] = field(default_factory=list)    # "FILE:LINE: reason"

    @property
    def ok(self) -> bool:
        return not self.errors


def _line_of(text: str, name: str, key: str | None = None) -> int:
    """Line of [dumpers.NAME] (or of KEY inside it) in TEXT; 1 when not found."""
    lines = text.split("\n")  # TOML's lines; splitlines() would also split at \x85, \u2028...
    header = re.compile(rf"^\s*\[\s*dumpers\s*\.\s*[\"']?{re.escape(name)}[\"']?\s*\]")
    start = next((i for i, ln in enumerate(lines) if header.match(ln)), None)
    if start is None:
        return 1
    if key:
        for i in range(start + 1, len(lines)):
            if lines[i].lstrip().startswith("["):
                break
            if re.match(rf"^\s*{re.escape(key)}\s*=", lines[i]):
                return i + 1
    return start + 1


class ConfigError(Exception):
    def __init__(self, line: int, reason: str) -> None:
        super().__init__(reason)
        self.line = line


MAX_FILE_BYTES = 1 << 20     # a config file, read whole
MAX_OBJECT_BYTES = 64 << 20  # an object or source a config file names


def untrusted(path: Path, kind: str, max_bytes: int = 0) -> str | None:
    """Why PATH may not be used as KIND ("dir" or "file") of the root daemon's config,
    or None. Never followed if a symlink; it must be root's, writable by nobody else,
    and a file regular and at most MAX_BYTES: a config that another user can write
    would have the daemon load their programs and publish what they point it at."""
    try:
        st = path.lstat()
    except OSError as e:
        return f"cannot be read: {e.strerror}"
    if kind == "dir" and not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if kind == "file" and not stat.S_ISREG(st.st_mode):
        return "is not a regular file (a symlink, directory or FIFO is refused)"
    if st.st_uid != 0:
        return f"is owned by uid {st.st_uid}, not root: chown root {path}"
    if st.st_mode & 0o022:
        return f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o}): chmod go-w {path}"
    if max_bytes and st.st_size > max_bytes:
        return f"is {st.st_size} bytes, more than {max_bytes}"
    return None


def _read(path: Path) -> str:
    """A config file's text, read without following links or blocking (lstat has
    checked it is a regular file; this open makes sure it still is)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ConfigError(1, "is not a regular file")
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(1, f"is more than {MAX_FILE_BYTES} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(line, f"is not UTF-8 text (byte {e.start})") from None


def parse(path: Path) -> list[Entry]:
    """The dumpers FILE declares, checked as far as possible without the kernel; a file
    root alone may not have written is refused before it is read."""
    why = untrusted(path, "file", MAX_FILE_BYTES)
    if why:
        raise ConfigError(1, why)
    try:
        text = _read(path)
    except OSError as e:
        raise ConfigError(1, f"cannot be read: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise ConfigError(int(m.group(1)) if m else 1, f"TOML syntax: {e}") from None
    except RecursionError:
        raise ConfigError(1, "TOML nested too deeply") from None
    unknown = set(data) - {"dumpers"}
    if unknown:
        raise ConfigError(1, f"unknown table(s) {sorted(unknown)}: declare dumpers as "
                             "[dumpers.NAME]")
    entries = []
    for name, table in data.get("dumpers", {}).items():
        line = _line_of(text, name)
        if not isinstance(table, dict):
            raise ConfigError(line, f"dumpers.{name} must be a table")
        for key, value in table.items():
            if key not in _KEYS:
                raise ConfigError(_line_of(text, name, key),
                                  f"unknown key {key!r}; known: {', '.join(sorted(_KEYS))}")
            if not isinstance(value, _TYPES[key]) or (
                    isinstance(value, list) and not all(isinstance(v, str) for v in value)):
                raise ConfigError(_line_of(text, name, key), f"{key} has the wrong type")
        if ("object" in table) == ("source" in table):
            raise ConfigError(line, f"dumper {name!r} needs exactly one of object or source")
        key = "object" if "object" in table else "source"
        if not table[key]:
            raise ConfigError(_line_of(text, name, key), f"{key} is empty: give a path")
        obj = Path(table[key])
        obj = obj if obj.is_absolute() else path.parent / obj
        if "source" in table and not is_source(obj):
            raise ConfigError(_line_of(text, name, "source"), "source must be a .c file")
        why = untrusted(obj, "file", MAX_OBJECT_BYTES)
        if why:
            raise ConfigError(_line_of(text, name, key), f"{key} {obj} {why}")
        flags = _cflags(table, name, path, text)
        try:
            mode = int(table.get("mode", "0400"), 8)
        except ValueError:
            raise ConfigError(_line_of(text, name, "mode"),
                              f"mode {table['mode']!r} is not octal (e.g. \"0440\")") from None
        spec = Spec(name=name, object=str(obj), prog=table.get("prog"),
                    params=Params(map=_str(table.get("map")), cgroup=_str(table.get("cgroup")),
                                  order=table.get("order"), tid=table.get("tid"),
                                  pid=table.get("pid")),
                    mode=mode, owner=table.get("owner"), group=table.get("group"),
                    view=table.get("view", "reader"), cflags=flags)
        try:
            spec.check()
        except DumperError as e:
            raise ConfigError(line, str(e)) from None
        entries.append(Entry(spec, line))
    return entries


def _cflags(table: dict, name: str, path: Path, text: str) -> tuple[str, ...]:
    """The compiler flags of dumper NAME's table, from `include` dirs (relative to the
    config file at PATH, and as trusted as it), `define`s and `cflags`."""
    given = [k for k in _SOURCE_ONLY if k in table]
    if given and "source" not in table:
        raise ConfigError(_line_of(text, name, given[0]), f"{given[0]} applies to a source "
                          "only; this dumper names an object")
    dirs = []
    for d in table.get("include", []):
        d = Path(d) if Path(d).is_absolute() else path.parent / d
        why = untrusted(d, "dir")
        if why:
            raise ConfigError(_line_of(text, name, "include"), f"include {d} {why}")
        dirs.append(str(d))
    try:
        return cflags(dirs, table.get("define", []), [table.get("cflags", "")])
    except DumperError as e:
        raise ConfigError(_line_of(text, name, given[0]), str(e)) from None


def _str(v) -> str | None:
    return None if v is None else str(v)


def _digest(spec: Spec) -> str:
    """What decides whether an applied entry changed: the entry and its object's bytes."""
    h = hashlib.sha256(json.dumps([spec.name, spec.object, spec.prog, vars(spec.params),
                                   spec.mode, spec.owner, spec.group, spec.view, spec.cflags],
                                  default=str).encode())
    try:
        h.update(Path(spec.object).read_bytes())
    except OSError:
        pass  # a missing object is reported when it is loaded
    return h.hexdigest()[:32]


def apply(config_dir: str | os.PathLike, state: StateDir) -> Report:
    """Make the state directory match the config directory (see the module doc)."""
    report = Report()
    config_dir = Path(config_dir).resolve()  # records name files by absolute path
    if not config_dir.exists():
        files = []
    elif why := untrusted(config_dir, "dir"):
        report.errors.append(f"config dir {config_dir} {why}; nothing in it is applied")
        return report
    else:
        files = sorted(config_dir.glob("*.toml"))
    made = _made_from_config(state)
    declared: set[tuple[str, str]] = set()   # (origin file, name) of every valid entry
    invalid: set[str] = set()                # files whose earlier dumpers are left alone
    for path in files:
        try:
            entries = parse(path)
            _apply_file(path, entries, state, made, report)
        except ConfigError as e:
            report.errors.append(f"{path}:{e.line}: {e}")
            invalid.add(str(path))
            continue
        declared |= {(str(path), e.spec.name) for e in entries}
    for (origin, name), (target, _) in made.items():
        if (origin, name) in declared or origin in invalid or \
                Path(origin).parent != config_dir:  # another config dir's: not ours to remove
            continue
        state.remove(target, name)
        report.applied.append(f"removed {target}/{name}")
    return report


def _made_from_config(state: StateDir) -> dict[tuple[str, str], tuple[str, str | None]]:
    """(config file, name) -> (target, digest) of every dumper config made."""
    made: dict[tuple[str, str], tuple[str, str | None]] = {}
    for e in state.entries():
        record = state.record(e.target, e.name)
        if record.get("origin") == "config" and record.get("config_file"):
            made[(record["config_file"], e.name)] = (e.target, record.get("config_digest"))
    return made


def _apply_file(path: Path, entries: list[Entry], state: StateDir,
                made: dict[tuple[str, str], tuple[str, str | None]], report: Report) -> None:
    """Load every changed entry of one file first; pin them only if all load."""
    loaded: list[tuple[Entry, Dumper]] = []
    try:
        for entry in entries:
            entry.digest = _digest(entry.spec)
            ours = made.get((str(path), entry.spec.name))
            if ours and ours[1] == entry.digest:
                continue  # applied before from these very bytes: nothing to load
            try:
                d = Dumper.load(entry.spec.object, entry.spec.prog, entry.spec.params,
                                entry.spec.cflags)
            except DumperError as e:
                raise ConfigError(entry.line, str(e)) from None
            loaded.append((entry, d))
            target = d.link_info().target_name
            if state.pin_path(target, entry.spec.name).exists() and \
                    (not ours or ours[0] != target):
                raise ConfigError(entry.line, f"dumper {target}/{entry.spec.name} exists "
                                  "and was not made from this file; remove it "
                                  "(bpfdumpfs rm) or rename the entry")
        for entry, d in loaded:
            _, done = state.add(entry.spec, replace=True, origin="config", loaded=d,
                                config_file=str(path), config_digest=entry.digest)
            report.applied.append(f"{done} {d.link_info().target_name}/{entry.spec.name}")
    finally:
        for _, d in loaded:
            d.close()


def check_dir(config_dir: str | os.PathLike) -> None:
    """Raise DumperError if CONFIG_DIR exists but is not a readable directory."""
    p = Path(config_dir)
    if p.exists() and not p.is_dir():
        raise DumperError(errno.ENOTDIR, f"config dir {p} is not a directory",
                          "give a directory of *.toml files with --config-dir")
