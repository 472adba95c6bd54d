"""The built-in dumpers: compiled CO-RE objects shipped in this package.

Each NAME.bpf.o here becomes the dumper TARGET/NAME; its source is
src/NAME.bpf.c (`make -C` this directory rebuilds them all). PARAMS lists the
iter parameters a built-in needs. An object holds one SEC("iter/TARGET")
program, or several variants of it for the same target, tried in their order in
the object until the running kernel's verifier accepts one (as libbpf programs
adapt: where one program cannot pass every verifier from 5.15 on).

Modes follow what /proc shows to unprivileged users: world-readable where the
/proc file is (tasks, sockets, routes, cgroups), root-only where /proc hides the
content from others (open files, mappings, kernel addresses, slab and BPF
internals). The seq_file is created by the root daemon, so a dump never gets the
per-reader filtering /proc applies; the mode is the only gate.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .. import kernel
from ..dumpers import Dumper, DumperError, Params

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

    @cached_property
    def variants(self) -> list[kernel.ProgSpec]:
        """Its iter programs, in the order they are tried."""
        return [s for s in kernel.object_programs(str(self.object)) if s.iter_target]

    @property
    def target(self) -> str:
        return self.variants[0].iter_target

    def load(self) -> Dumper:
        """An anonymous dumper of the first variant this kernel accepts; else a
        DumperError naming each variant's reason."""
        failed: list[tuple[str, DumperError]] = []
        for spec in self.variants:
            try:
                return Dumper.load(self.object, spec.name, self.params)
            except DumperError as e:
                failed.append((spec.name, e))
        if len(failed) == 1:
            raise failed[0][1]
        first = failed[0][1]
        raise DumperError(first.errno, f"loading built-in {self.target}/{self.name}: "
                          f"none of its {len(failed)} variants loads",
                          "; ".join(f"{name}: {reason(e)}" for name, e in failed),
                          log="\n\n".join(f"{name}:\n{e.log}" for name, e in failed if e.log))


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


def reason(e: DumperError) -> str:
    """One line on why a built-in did not load: the verifier's complaint if any."""
    return kernel.verifier_complaint(e.log) or str(e)


def missing_target(b: Builtin) -> DumperError:
    return DumperError(errno.ENOENT, f"built-in {b.target}/{b.name} is not served",
                       f"this kernel has no {b.target} iterator target")
