"""The `bpfdumpfs` command: mount the tree, manage dumpers, run one anonymously."""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict

from . import config, limits, mount, mounts, targets
from .builtins import builtins
from .compile import cflags as compiler_flags
from .dumpers import Dumper, Params
from .errors import DumperError
from .metrics import STATUS_XATTR
from .state import DEFAULT_STATE_DIR, VIEWS, Spec, StateDir
from .stream import Stream

log = logging.getLogger("bpfdumpfs")


# -- shared arguments -------------------------------------------------------------

def _state_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", metavar="DIR",
                   default=os.environ.get("BPFDUMPFS_STATE_DIR", DEFAULT_STATE_DIR),
                   help="bpffs directory holding the dumper pins "
                        "(env BPFDUMPFS_STATE_DIR; default %(default)s)")


def _program_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("object", metavar="OBJECT",
                   help="compiled BPF object (.bpf.o) or source (.bpf.c, compiled with clang)")
    p.add_argument("--prog", metavar="PROG", help="the iter program to use, if OBJECT has several")
    c = p.add_argument_group("compiling a source")
    c.add_argument("-I", dest="include", action="append", default=[], metavar="DIR",
                   help="also look for headers in DIR (repeatable)")
    c.add_argument("-D", dest="define", action="append", default=[], metavar="NAME[=VALUE]",
                   help="define a macro (repeatable)")
    c.add_argument("--cflags", action="append", default=[], metavar="FLAGS",
                   help="more clang flags, split as a shell would: --cflags=\"-Wall -O1\"")
    g = p.add_argument_group("target parameters (see `bpfdumpfs targets`)")
    g.add_argument("--map", metavar="ID|PINNED_PATH", help="map of bpf_map_elem, "
                   "bpf_sk_storage_map and sockmap dumpers")
    g.add_argument("--cgroup", metavar="PATH|ID", help="cgroup to start from (default: root)")
    g.add_argument("--order", choices=list(targets.ORDER_ENUMS),
                   help="cgroup walk order (required for cgroup dumpers)")
    g.add_argument("--tid", type=int, metavar="N", help="only this thread (task targets)")
    g.add_argument("--pid", type=int, metavar="N", help="only this process (task targets)")
    p.add_argument("--view", choices=VIEWS, default="reader",
                   help="whose namespaces a read sees: the reader's (default) or the daemon's")


def _access_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", type=_mode, metavar="MODE",
                   help="file mode in octal (default 0400: root only; kept on --replace)")
    p.add_argument("--owner", metavar="USER", help="owner (default root; kept on --replace)")
    p.add_argument("--group", metavar="GROUP", help="group (default root; kept on --replace)")
    p.add_argument("--replace", action="store_true",
                   help="replace a dumper of that name (same target and parameters: the "
                        "program is swapped atomically, the link stays)")


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode such as 0440") from None
    if not 0 <= mode <= 0o7777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file mode")
    return mode


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def _params(args) -> Params:
    return Params(map=args.map, cgroup=args.cgroup, order=args.order, tid=args.tid, pid=args.pid)


def _cflags(args) -> tuple[str, ...]:
    return compiler_flags(args.include, args.define, args.cflags)


def _split(dumper: str) -> tuple[str, str]:
    target, sep, name = dumper.partition("/")
    if not sep or not target or not name:
        raise DumperError(errno.EINVAL, f"{dumper!r} does not name a dumper",
                          "write TARGET/NAME, e.g. task/tasks (see `bpfdumpfs ls`)")
    return target, name


def _shown_path(state: StateDir, target: str, name: str) -> str:
    """Where users find the dumper: its file in a mounted tree, else its pin."""
    for mnt in mounts.mounts_of(state.path):
        return os.path.join(mnt, target, name)
    return str(state.pin_path(target, name))


# -- commands ---------------------------------------------------------------------------

def cmd_mount(args) -> int:
    given = limits.load(args.settings or limits.DEFAULT_SETTINGS,
                        required=args.settings is not None)
    opts = mount.MountOptions(mountpoint=args.mountpoint, state_dir=args.state_dir,
                              config_dir=args.config_dir, builtins=not args.no_builtins,
                              debug_fuse=args.debug_fuse, log_file=args.log_file,
                              limits=given.replace(**{k: getattr(args, k)
                                                      for k in limits.FIELDS}))
    if args.background:
        return mount.run_background(opts)
    mount.run(opts)
    return 0


def cmd_add(args) -> int:
    state = StateDir(args.state_dir).check()
    spec = Spec(args.name, args.object, args.prog, _params(args), args.mode, args.owner,
                args.group, args.view, _cflags(args))
    path, done = state.add(spec, replace=args.replace, origin="cli", object=args.object)
    target = path.parent.name
    if done != "added":
        print(f"bpfdumpfs: {done} {target}/{args.name}", file=sys.stderr)
    print(_shown_path(state, target, args.name))
    return 0


def cmd_pin(args) -> int:
    state = StateDir(args.state_dir).check()
    path = state.adopt(args.name, args.link, args.mode, args.owner, args.group, args.replace,
                       args.view)
    print(_shown_path(state, path.parent.name, args.name))
    return 0


def cmd_rm(args) -> int:
    state = StateDir(args.state_dir).check()
    for d in args.dumpers:
        state.remove(*_split(d))
    return 0


def cmd_ls(args) -> int:
    state = StateDir(args.state_dir).check()
    rows = []
    for e in state.entries():
        try:
            rows.append(state.info(e.target, e.name))
        except DumperError as err:
            log.warning("skipping %s/%s: %s", e.target, e.name, err)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    for r in rows:
        params = " ".join(f"{k}={v}" for k, v in r.params().items())
        print(f"{r.target}/{r.name}".ljust(32) + f" link {r.link_id:<5} prog {r.prog_id:<5} "
              f"{r.prog_name:16} {r.mode} {r.owner}:{r.group} {r.view} {params}".rstrip())
        if r.misplaced:
            print(f"  misplaced: {r.misplaced}")
    return 0


def cmd_info(args) -> int:
    info = StateDir(args.state_dir).check().info(*_split(args.dumper))
    if args.json:
        print(json.dumps(asdict(info), indent=2))
        return 0
    for k, v in asdict(info).items():
        if isinstance(v, tuple):  # reader_dependent: a line only if it names any
            v = ", ".join(v) or None
        if v is not None:
            print(f"{k:16} {v}")
    return 0


def cmd_targets(args) -> int:
    found = targets.running_kernel()
    state = StateDir(args.state_dir)
    served: dict[str, list[dict]] = {}
    for b in builtins():
        served.setdefault(b.target, []).append(
            {"name": b.name, "pinned": state.pin_path(b.target, b.name).exists()})
    if args.json:
        print(json.dumps([{"name": t.name, "params": [asdict(p) for p in t.params],
                           "builtins": served.get(t.name, [])}
                          for t in found.values()], indent=2))
        return 0
    for t in found.values():
        params = "; ".join(("" if p.required else "optional ") + p.help for p in t.params)
        names = ",".join(b["name"] + ("" if b["pinned"] else " (not pinned)")
                         for b in served.get(t.name, []))
        print(f"{t.name:20} {names or '-':24} {params or '-'}")
    return 0


def cmd_status(args) -> int:
    points = [args.mountpoint] if args.mountpoint else mounts.bpfdumpfs_mounts()
    if not points:
        raise DumperError(errno.ENOENT, "no bpfdumpfs tree is mounted",
                          "start one: bpfdumpfs mount (or systemctl start bpfdumpfs)")
    rows = []
    for point in points:
        try:
            info = json.loads(os.getxattr(point, STATUS_XATTR))
        except OSError as e:
            raise DumperError(e.errno, f"reading the status of {point} "
                              f"(xattr {STATUS_XATTR.decode()})",
                              "is a bpfdumpfs daemon serving it? (see `mount -t fuse.bpfdumpfs`)"
                              ) from None
        info["dumpers"] = sum(len(os.listdir(os.path.join(point, d)))
                              for d in os.listdir(point) if not d.startswith("."))
        rows.append(info)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for info in rows:
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(info["since"]))
        print(f"{info['mountpoint']}: served by pid {info['pid']} since {since} "
              f"(bpfdumpfs {info['version']}; its keeper is pid {info['keeper']})")
        print(f"  state dir   {info['state_dir']}")
        print(f"  dumpers     {info['dumpers']}")
        print(f"  open files  {info['handles']}")
        print(f"  opens       {info['opens']}")
        print(f"  errors      {info['errors']}")
        for name, why in sorted(info["unavailable"].items()):
            print(f"  not served  {name}: {why}")
    return 0


def cmd_apply(args) -> int:
    config.check_dir(args.config_dir)
    report = config.apply(args.config_dir, StateDir(args.state_dir).check())
    for line in report.applied:
        print(line)
    for line in report.errors:
        print(f"bpfdumpfs: {line}", file=sys.stderr)
    return 0 if report.ok else 1


def cmd_run(args) -> int:
    if args.pin:
        args.name = args.pin
        return cmd_add(args)
    # SIGTERM ends the run like Ctrl-C: the link and program die with this process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    out = sys.stdout.buffer
    with Dumper.load(args.object, args.prog, _params(args), _cflags(args)) as d, \
            Stream(d.open_fd(), d.label) as stream:
        while chunk := stream.read_chunk():
            out.write(chunk)
        out.flush()
    return 0


# -- the parser -------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bpfdumpfs", description="BPF iterator dumpers as files. Dumpers are iter links "
        "pinned at STATE_DIR/TARGET/NAME; the mounted tree shows each as MOUNT/TARGET/NAME.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="log lines as text (default) or one JSON object each")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("mount", help="mount the dumper tree and serve it",
                       description="Mount the dumper tree at MOUNTPOINT and serve it in the "
                       "foreground until SIGINT or SIGTERM, then unmount. SIGHUP re-applies "
                       "the config directory.")
    m.add_argument("mountpoint", nargs="?", default=mount.DEFAULT_MOUNTPOINT,
                   help="where to mount (default %(default)s)")
    _state_dir_arg(m)
    _config_dir_arg(m)
    m.add_argument("--no-builtins", action="store_true",
                   help="do not pin the built-in dumpers at start")
    m.add_argument("--background", action="store_true",
                   help="fork, return once the tree is mounted, serve in the background")
    m.add_argument("--log-file", metavar="FILE",
                   help=f"append logs to FILE (with --background: default "
                        f"{mount.DEFAULT_BACKGROUND_LOG}; otherwise stderr)")
    m.add_argument("--settings", metavar="FILE",
                   help=f"daemon settings ([limits]; default {limits.DEFAULT_SETTINGS} if it "
                        "exists)")
    for name, f in limits.FIELDS.items():
        m.add_argument(f.metadata["flag"], dest=name, metavar=f.metadata["metavar"],
                       type=float if name in limits.FRACTIONAL else _count, help=f.metadata["help"])
    m.add_argument("--debug-fuse", action="store_true", help="log every FUSE request")
    m.set_defaults(func=cmd_mount)

    a = sub.add_parser("add", help="load a program and pin it as a dumper",
                       description="Load OBJECT's iter program, create its link and pin it as "
                       "TARGET/NAME (TARGET from the program's SEC(\"iter/TARGET\")). Prints "
                       "the dumper's path in the mounted tree.")
    a.add_argument("name", metavar="NAME", help="the dumper's file name")
    _program_args(a)
    _access_args(a)
    _state_dir_arg(a)
    a.set_defaults(func=cmd_add)

    pn = sub.add_parser("pin", help="adopt an existing iter link as a dumper",
                        description="Pin an existing iter link, given by link id or by its "
                        "bpffs path, as TARGET/NAME.")
    pn.add_argument("name", metavar="NAME")
    pn.add_argument("link", metavar="LINK", help="link id (bpftool link show) or pinned path")
    _access_args(pn)
    pn.add_argument("--view", choices=VIEWS, default="reader")
    _state_dir_arg(pn)
    pn.set_defaults(func=cmd_pin)

    r = sub.add_parser("rm", help="remove dumpers",
                       description="Delete the pins; a link dies once no reader holds it, and "
                       "readers mid-read finish their read.")
    r.add_argument("dumpers", nargs="+", metavar="TARGET/NAME")
    _state_dir_arg(r)
    r.set_defaults(func=cmd_rm)

    ls = sub.add_parser("ls", help="list the dumpers",
                        description="List every dumper in the state directory: target/name, "
                        "link and prog ids, program name, access, view, parameters.")
    _state_dir_arg(ls)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_ls)

    i = sub.add_parser("info", help="show one dumper",
                       description="Show a dumper's target, link, program (name, tag), "
                       "parameters, access, view and origin.")
    i.add_argument("dumper", metavar="TARGET/NAME")
    _state_dir_arg(i)
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_info)

    t = sub.add_parser("targets", help="the iterator targets of the running kernel",
                       description="List this kernel's iterator targets (from its BTF), "
                       "the built-in dumpers of each (marked if not pinned in the state "
                       "dir: `bpfdumpfs status` says why) and the parameters each takes.")
    t.add_argument("--json", action="store_true", help="machine-readable output")
    _state_dir_arg(t)  # accepted like everywhere; targets are the kernel's, not the state's
    t.set_defaults(func=cmd_targets)

    ap = sub.add_parser("apply", help="apply the config directory without a daemon",
                        description="Make the state directory match the TOML files of the "
                        "config directory: add what is missing, replace what changed, remove "
                        "only what config made and no longer declares.")
    _config_dir_arg(ap)
    _state_dir_arg(ap)
    ap.set_defaults(func=cmd_apply)

    st = sub.add_parser("status", help="is the tree served, since when, how busy",
                        description="Show each mounted tree (or MOUNTPOINT): the daemon's pid, "
                        "since when it serves, its state dir, dumpers, open files, errors.")
    st.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    _state_dir_arg(st)
    st.set_defaults(func=cmd_status)

    rn = sub.add_parser("run", help="run a dumper once, anonymously, to stdout",
                        description="Load OBJECT, create its link without pinning it, stream "
                        "one seq_file to stdout and exit. Nothing is left behind.")
    _program_args(rn)
    rn.add_argument("--pin", metavar="NAME", help="pin the dumper as NAME instead (like add)")
    _access_args(rn)
    _state_dir_arg(rn)
    rn.set_defaults(func=cmd_run)
    return p


def _config_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-dir", metavar="DIR",
                   default=os.environ.get("BPFDUMPFS_CONFIG_DIR", config.DEFAULT_CONFIG_DIR),
                   help="directory of *.toml dumper declarations (env BPFDUMPFS_CONFIG_DIR; "
                        "default %(default)s)")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (for log shippers)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
                 "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(args) -> None:
    background = getattr(args, "background", False)
    log_file = getattr(args, "log_file", None)
    handler = (logging.FileHandler(log_file) if log_file and not background
               else logging.StreamHandler(sys.stderr))
    if args.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            ("%(asctime)s " if log_file or background else "")
            + "bpfdumpfs: %(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        handlers=[handler])
    if getattr(args, "debug_fuse", False):  # the device's request log, without -v
        logging.getLogger("bpfdumpfs.device").setLevel(logging.DEBUG)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _setup_logging(args)
    try:
        return args.func(args)
    except DumperError as e:
        print(f"bpfdumpfs: {e}", file=sys.stderr)
        if e.log:
            print(e.log, file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader went away (`bpfdumpfs ls | head`): end quietly, as ls does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # anything the model did not name: still one line, no traceback
        where = f": {e.filename}" if e.filename else ""
        print(f"bpfdumpfs: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
