"""The `bpfdumpfs` command."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict

from . import mount, targets
from .dumpers import DEFAULT_STATE_DIR, DumperError, StateDir

log = logging.getLogger("bpfdumpfs")


def _state_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", metavar="DIR",
                   default=os.environ.get("BPFDUMPFS_STATE_DIR", DEFAULT_STATE_DIR),
                   help="bpffs directory holding the dumper pins "
                        "(env BPFDUMPFS_STATE_DIR; default %(default)s)")


def cmd_mount(args) -> int:
    opts = mount.MountOptions(mountpoint=args.mountpoint, state_dir=args.state_dir,
                              builtins=not args.no_builtins, debug_fuse=args.debug_fuse,
                              log_file=args.log_file)
    if args.background:
        return mount.run_background(opts)
    mount.run(opts)
    return 0


def cmd_targets(args) -> int:
    found = targets.running_kernel()
    if args.json:
        print(json.dumps([{"name": t.name, "params": [asdict(p) for p in t.params]}
                          for t in found.values()], indent=2))
        return 0
    for t in found.values():
        params = "; ".join(("" if p.required else "optional ") + p.help for p in t.params)
        print(f"{t.name:20} {params or '-'}")
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
        print(f"{r.target}/{r.name:24} link {r.link_id:<5} prog {r.prog_id:<5} "
              f"{r.prog_name:16} {r.mode} {r.owner}:{r.group} {params}".rstrip())
    return 0


def cmd_info(args) -> int:
    target, _, name = args.dumper.partition("/")
    info = StateDir(args.state_dir).check().info(target, name)
    if args.json:
        print(json.dumps(asdict(info), indent=2))
        return 0
    for k, v in asdict(info).items():
        if v is not None:
            print(f"{k:13} {v}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bpfdumpfs",
                                description="BPF iterator dumpers as a filesystem.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("mount", help="mount the dumper tree and serve it (foreground)",
                       description="Mount the dumper tree at MOUNTPOINT and serve it until "
                                   "SIGINT or SIGTERM, then unmount.")
    m.add_argument("mountpoint", nargs="?", default=mount.DEFAULT_MOUNTPOINT,
                   help="where to mount (default %(default)s)")
    _state_dir_arg(m)
    m.add_argument("--no-builtins", action="store_true",
                   help="do not pin the built-in dumpers at start")
    m.add_argument("--background", action="store_true",
                   help="fork, return once the tree is mounted, serve in the background")
    m.add_argument("--log-file", metavar="FILE",
                   help=f"append logs to FILE (with --background: default "
                        f"{mount.DEFAULT_BACKGROUND_LOG}; otherwise stderr)")
    m.add_argument("--debug-fuse", action="store_true", help="log every FUSE request")
    m.set_defaults(func=cmd_mount)

    t = sub.add_parser("targets", help="the iterator targets of the running kernel",
                       description="List this kernel's iterator targets (from its BTF) and "
                                   "the parameters each takes.")
    t.add_argument("--json", action="store_true", help="machine-readable output")
    t.set_defaults(func=cmd_targets)

    ls = sub.add_parser("ls", help="list the pinned dumpers",
                        description="List every dumper pinned in the state directory.")
    _state_dir_arg(ls)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_ls)

    i = sub.add_parser("info", help="show one dumper",
                       description="Show a dumper's target, link, program, parameters "
                                   "and access.")
    i.add_argument("dumper", metavar="TARGET/NAME")
    _state_dir_arg(i)
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    log_file = getattr(args, "log_file", None)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s bpfdumpfs: %(levelname)s: %(message)s"
                        if log_file or getattr(args, "background", False)
                        else "bpfdumpfs: %(levelname)s: %(message)s",
                        filename=None if getattr(args, "background", False) else log_file)
    try:
        return args.func(args)
    except DumperError as e:
        print(f"bpfdumpfs: {e}", file=sys.stderr)
        if e.log:
            print(f"verifier log:\n{e.log}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
