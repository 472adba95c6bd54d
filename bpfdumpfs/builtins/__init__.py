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
internals). The seq_file is created by the root daemon, so a dump gets the
per-reader filtering /proc applies only where the kernel decides it from the
seq_file's creator's capabilities (ksym: see privilege.CRED_TARGETS); otherwise the
mode is the gate.

The daemon pins them at start (pin_builtins), and gives those an earlier version
pinned this version's programs.
"""
from __future__ import annotations

import errno
import hashlib
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .. import kernel, targets
from ..dumpers import Dumper, Params
from ..errors import DumperError
from ..state import StateDir

log = logging.getLogger(__name__)

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
        target = self.variants[0].iter_target
        assert target is not None  # variants are its iter programs
        return target

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


@dataclass
class BuiltinReport:
    done: list[str]               # "TARGET/NAME pinned" or "... updated"
    unavailable: dict[str, str]   # TARGET/NAME -> why it is not served, one line


def pin_builtins(state: StateDir) -> BuiltinReport:
    """Pin each built-in dumper that is not pinned yet, and give each one pinned by
    an earlier version this version's program.

    A built-in that this kernel has no target for, or whose every variant the
    verifier refuses, is reported (a warning, and in .stats and `status`) and
    skipped: the tree still serves everything else.
    """
    report = BuiltinReport([], {})
    have = set(targets.running_kernel())
    for b in builtins():
        try:
            if b.target not in have:
                raise missing_target(b)
            sha = hashlib.sha256(b.object.read_bytes()).hexdigest()[:16]
            if state.pin_path(b.target, b.name).exists():
                if _update_builtin(state, b, sha):
                    report.done.append(f"{b.target}/{b.name} updated")
                continue
            with b.load() as d:
                d.pin(state, b.name, mode=b.mode)
                state.meta.set(b.target, b.name, d.link_info().id, origin="builtin", object=sha,
                               reader_dependent=list(d.reader_dependent or ()))
            report.done.append(f"{b.target}/{b.name} pinned")
        except DumperError as e:
            why = reason(e)
            report.unavailable[f"{b.target}/{b.name}"] = why
            log.warning("built-in %s/%s is not served: %s", b.target, b.name, why)
            if e.log:
                log.info("verifier log of %s:\n%s", b.name, e.log)
    return report


def _update_builtin(state: StateDir, b: Builtin, sha: str) -> bool:
    """Give the pinned built-in B this version's program, if an earlier
    version pinned it (LINK_UPDATE: the link, its pin, mode and open files stay; later
    opens run the new program). Each built-in's record names the object it came from
    (SHA), so a restart loads nothing; a pin with no record (older versions made none)
    is taken for a built-in if its program has the name of one of the built-in's
    variants. A pin made by add, a config file or adopt (recorded with their origin)
    is the operator's: left alone."""
    with state.get(b.target, b.name) as pinned:
        link_id = pinned.link_info().id
        record = state.meta.get(b.target, b.name, link_id)
        if record.get("origin", "builtin") != "builtin" or record.get("object") == sha:
            return False
        old = pinned.info()
        if old.prog_name not in {v.name for v in b.variants}:
            return False  # another tool's dumper under a built-in's name
        with b.load() as shipped:
            changed = old.prog_tag != shipped.info().prog_tag
            if changed:
                pinned.replace_program(shipped)
            helpers = list(shipped.reader_dependent or ())
        state.meta.set(b.target, b.name, link_id, origin="builtin", object=sha,
                       reader_dependent=helpers)
    return changed
