"""The built-in dumpers: compiled CO-RE objects shipped in this package.

Each NAME.bpf.o here holds one SEC("iter/TARGET") program and becomes the
dumper TARGET/NAME; its source is src/NAME.bpf.c (`make -C` this directory
rebuilds them all). PARAMS lists the iter parameters a built-in needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..dumpers import Params

HERE = Path(__file__).resolve().parent
PARAMS: dict[str, Params] = {
    "cgroups": Params(order="pre"),  # the whole hierarchy from the root, parents first
}


@dataclass(frozen=True)
class Builtin:
    name: str
    object: Path
    params: Params


def builtins() -> list[Builtin]:
    return [Builtin(p.name.removesuffix(".bpf.o"), p, PARAMS.get(p.name.removesuffix(".bpf.o"),
                                                                 Params()))
            for p in sorted(HERE.glob("*.bpf.o"))]
