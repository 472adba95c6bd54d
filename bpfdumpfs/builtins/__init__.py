"""The built-in dumpers: compiled CO-RE objects shipped in this package.

Each NAME.bpf.o here holds one SEC("iter/TARGET") program and becomes the
dumper TARGET/NAME; its source is src/NAME.bpf.c (`make -C` this directory
rebuilds them all). PARAMS lists the iter parameters a built-in needs.

Modes follow what /proc shows to unprivileged users: world-readable where the
/proc file is (tasks, sockets, routes, cgroups), root-only where /proc hides the
content from others (open files, mappings, kernel addresses, slab and BPF
internals). The seq_file is created by the root daemon, so a dump never gets the
per-reader filtering /proc applies; the mode is the only gate.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..dumpers import Params

HERE = Path(__file__).resolve().parent
PARAMS: dict[str, Params] = {
    "cgroups": Params(order="pre"),  # the whole hierarchy from the root, parents first
}
PUBLIC = {"tasks", "tcp", "tcp6", "udp", "udp6", "unix", "netlink", "ipv6_route", "cgroups"}


@dataclass(frozen=True)
class Builtin:
    name: str
    object: Path
    params: Params

    @property
    def mode(self) -> int:
        return 0o444 if self.name in PUBLIC else 0o400


def object_path(name: str) -> Path:
    """The shipped object of built-in NAME (e.g. "tasks"), for Dumper.load."""
    path = HERE / f"{name}.bpf.o"
    if not path.exists():
        raise FileNotFoundError(f"no built-in dumper {name!r}; built-ins: "
                                + ", ".join(b.name for b in builtins()))
    return path


def builtins() -> list[Builtin]:
    return [Builtin(p.name.removesuffix(".bpf.o"), p, PARAMS.get(p.name.removesuffix(".bpf.o"),
                                                                 Params()))
            for p in sorted(HERE.glob("*.bpf.o"))]
