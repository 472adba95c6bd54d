"""inotify on the state directory: which pins were added, removed, renamed or changed.

The tree lets the kernel cache entries and attributes -- a GETATTR per `cat`
costs as much as reading a small dump -- and keeps that cache true by
invalidating exactly what changed as soon as a pin changes, by the CLI, bpftool
or anyone.
"""
from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

import trio

from . import libc

log = logging.getLogger(__name__)

IN_ATTRIB, IN_MOVED_FROM, IN_MOVED_TO = 0x4, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
IN_UNMOUNT, IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR = 0x2000, 0x4000, 0x8000, 0x40000000
_MASK = (IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
         | IN_MOVE_SELF)
_EVENT = struct.Struct("iIII")

# on_change(target, name): NAME under TARGET changed; name None: anything under TARGET
OnChange = Callable[[str, "str | None"], None]


class StateWatch:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        self.dirs: dict[int, str | None] = {}   # watch descriptor -> target (None: the root)
        self._add(root, None)
        with os.scandir(root) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    self._add(Path(e.path), e.name)

    def _add(self, path: Path, target: str | None) -> None:
        try:
            wd = libc.inotify_add_watch(self.fd, path, _MASK)
        except FileNotFoundError:
            return  # a directory removed meanwhile needs no watch
        self.dirs[wd] = target

    async def run(self, on_change: OnChange) -> None:
        """Report changes until cancelled; returns when the state dir goes away."""
        try:
            while True:
                await trio.lowlevel.wait_readable(self.fd)
                try:
                    data = os.read(self.fd, 64 * 1024)
                except BlockingIOError:
                    continue
                if not self._dispatch(data, on_change):
                    return
        finally:
            os.close(self.fd)

    def _dispatch(self, data: bytes, on_change: OnChange) -> bool:
        off = 0
        while off < len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, off)
            name = data[off + _EVENT.size: off + _EVENT.size + length].rstrip(b"\0").decode(
                errors="replace")
            off += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:   # events were lost: forget everything
                for t in {t for t in self.dirs.values() if t}:
                    on_change(t, None)
                continue
            target = self.dirs.get(wd, "")
            if target is None:  # the root: target directories come and go
                if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED):
                    log.error("state dir %s went away: the tree stops caching", self.root)
                    return False
                if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                    self._add(self.root / name, name)
                    on_change(name, None)
                continue
            if mask & IN_IGNORED:
                self.dirs.pop(wd, None)
            if target:
                on_change(target, name or None)
        return True
