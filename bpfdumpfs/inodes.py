"""The tree's inodes: fixed ones for the root, .stats and the target directories, and
one per dumper file the kernel has looked up, with its lookup count; and the
listings of open directories.

    1                  the root
    2 .. 2+T           the target directories, in name order (they never change)
    STATS_INODE        /.stats
    PIN_INODE_BASE+i   the dumper file whose pin is bpffs inode i (bpffs numbers its
                       inodes in 32 bits): every daemon serving the state dir gives a
                       name the same inode, and a new pin of the name a new one, so an
                       inode the kernel holds never names another pin. Known from the
                       first lookup until the kernel forgets it (FORGET).

Thread safety: everything here is changed in trio only (pyfuse3's handlers). The
device's threads only look up an inode's (target, name) for a quick open: a single
dict lookup, atomic under the GIL, and a stale answer (a file just forgotten) costs
nothing, since the open then falls back to trio, which looks again.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyfuse3

ROOT = pyfuse3.ROOT_INODE
DIR_INODES = 1 << 16        # the root, the target directories and .stats are below
STATS_INODE = DIR_INODES - 1  # target directories take the inodes below
PIN_INODE_BASE = 1 << 32
# An fh (of an open file or listing) carries the generation of the server that made it
# (one more at each takeover of the mount: keeper.py) from this bit up, so that one a
# previous server made is never taken for one this server made since (core.c's alike)
FH_GENERATION_SHIFT = 40
GENERATIONS = 1 << 16
FH_GENERATION = (GENERATIONS - 1) << FH_GENERATION_SHIFT  # its bits
LISTING_INODE_SHIFT = 24  # a listing's fh: generation, directory inode, counter

Key = tuple[str, str]  # (target, name) of a dumper file


@dataclass
class Listing:
    """An open directory: what opendir found, for readdir to page through."""
    inode: int
    entries: list[tuple[bytes, int]]   # (name, inode of a target dir | 0 for a dumper)


def fh_base(generation: int) -> int:
    """The bits every fh a server of GENERATION makes has set (core.c's too)."""
    return generation % GENERATIONS << FH_GENERATION_SHIFT


def file_inode(pin_ino: int) -> int:
    """The inode of the dumper file of the pin that is bpffs inode PIN_INO."""
    return PIN_INODE_BASE + pin_ino


class Inodes:
    def __init__(self, targets: list[str], generation: int = 0) -> None:
        self.targets = sorted(targets)
        self.target_ino = {t: ROOT + 1 + i for i, t in enumerate(self.targets)}
        self.ino_target = {i: t for t, i in self.target_ino.items()}
        self.file_ino: dict[Key, int] = {}
        self.ino_file: dict[int, Key] = {}
        self.lookups: dict[int, int] = {}   # the kernel's lookup count of each file inode
        self.listings: dict[int, Listing] = {}
        self.next_listing = 1
        self.listing_base = fh_base(generation)

    def is_dir(self, ino: int) -> bool:
        return ino == ROOT or ino in self.ino_target

    def file(self, target: str, name: str, pin_ino: int) -> int:
        """The inode of TARGET/NAME while its pin is bpffs inode PIN_INO."""
        key = (target, name)
        ino = file_inode(pin_ino)
        self.file_ino[key] = ino
        was = self.ino_file.get(ino)
        if was != key:  # new, or its pin renamed behind the mount
            if was is not None and self.file_ino.get(was) == ino:
                del self.file_ino[was]
            self.ino_file[ino] = key
            self.lookups.setdefault(ino, 0)
        return ino

    def looked_up(self, ino: int) -> None:
        """The kernel now holds one more reference to file inode INO (LOOKUP, READDIRPLUS)."""
        self.lookups[ino] += 1

    def forget(self, inode_list) -> None:
        for ino, n in inode_list:
            if ino not in self.lookups:
                continue
            self.lookups[ino] -= n
            if self.lookups[ino] <= 0:
                del self.lookups[ino]
                key = self.ino_file.pop(ino)
                if self.file_ino.get(key) == ino:  # not since given to a new pin of the name
                    del self.file_ino[key]

    def renamed(self, target: str, old: str, new: str) -> None:
        """TARGET/OLD is now TARGET/NEW: the kernel's inode of it moves along."""
        ino = self.file_ino.pop((target, old), None)
        if ino is not None:
            self.file_ino.pop((target, new), None)
            self.file_ino[(target, new)] = ino
            self.ino_file[ino] = (target, new)

    def open_listing(self, inode: int, entries: list[tuple[bytes, int]], fh: int = 0) -> int:
        """A listing of directory INODE; its fh names the directory, so that a server
        that takes the mount over can list it on (listing_inode)."""
        if not fh:
            fh = self.listing_base | inode << LISTING_INODE_SHIFT | \
                self.next_listing % (1 << LISTING_INODE_SHIFT)
            self.next_listing += 1
        self.listings[fh] = Listing(inode, entries)
        return fh

    @staticmethod
    def listing_inode(fh: int) -> int:
        """The directory a listing's FH (made here or by a previous server) names."""
        return fh >> LISTING_INODE_SHIFT & (DIR_INODES - 1)

    def close_listing(self, fh: int) -> None:
        self.listings.pop(fh, None)
