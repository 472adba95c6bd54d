"""What the tree knows of the state directory's pins: for each, whether it is a dumper
of its target directory (checked once per pin inode), its view, and -- while the
state directory is watched -- an open link to it, so that opens need no bpf(2)
OBJ_GET and can be answered on the device's threads (files.py).

Nothing here outlives a change: the watch (watch.py) reports every change to a pin,
and forget() drops what was known of it. Without a working watch nothing is cached
(`cached` is False) and every open looks the pin up anew.

Thread safety: check(), forget() and check_new() run in trio. The device's threads
read `known` (a dict lookup) and a pin's fields, and take the dumper a pin holds;
`lock` guards a pin's `dumper` and the count of cached links, which both sides
change. It is never held while calling out.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import stat
import threading
from dataclasses import dataclass

import pyfuse3
import trio

from . import core, kernel
from .core import Pace
from .dumpers import Dumper, iter_link_info
from .errors import DumperError
from .inodes import Key
from .state import StateDir, is_dumper_name

log = logging.getLogger(__name__)

LINK_CACHE_MAX = 1024  # link fds kept open for quick opens
CACHE_TIMEOUT = 60.0   # the kernel keeps entries/attributes this long, while pins are cached


@dataclass
class Pin:
    """One pin of the state dir, as last checked."""
    ino: int                    # the pin's inode: a new one is a new pin
    link_id: int
    hidden: str | None          # why it is not shown; None for a dumper of its target
    pace: Pace                  # how its dumps are read (reader.py), shared by its files
    view: str | None = None     # from the pin's record, looked up at the first open
    # Its link, while the state dir is watched: set by the first open, dropped by a
    # change event. Open files hold their Dumper by reference, so a pin removed while
    # read keeps its link until they close.
    dumper: Dumper | None = None
    nodeid: int = 0             # its inode, once published to the data plane (core.py)


class Pins:
    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.known: dict[Key, Pin] = {}
        self.cached = False       # the state dir is watched: links may be kept
        self.cached_links = 0
        self.lock = threading.Lock()
        # pins to check before anyone lists them (see check_new), each queued once
        self.unchecked_in, self.unchecked = trio.open_memory_channel[Key](math.inf)
        self.unchecked_keys: set[Key] = set()

    def check(self, target: str, name: str) -> tuple[Pin, os.stat_result]:
        """The pin's record and stat, checked once per pin inode; FUSEError(ENOENT) if
        it is not a dumper of TARGET."""
        path = self.state.pin_str(target, name)
        try:
            st = os.lstat(path)  # a symlink in the state dir is not a pin: never followed
        except OSError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        if not stat.S_ISREG(st.st_mode):
            raise pyfuse3.FUSEError(errno.ENOENT)
        pin = self.known.get((target, name))
        if pin is None or pin.ino != st.st_ino:
            link_id, why = _check_pin(path, target)
            if why and (pin is None or pin.hidden != why):
                log.warning("hiding %s: %s", path, why)
            self.forget((target, name))
            pin = self.known[(target, name)] = Pin(st.st_ino, link_id, why, Pace())
        if pin.hidden:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return pin, st

    def forget(self, key: Key) -> None:
        """Drop what is known of a pin, and its cached link."""
        with self.lock:
            pin = self.known.pop(key, None)
            if pin is not None and pin.dumper is not None:
                pin.dumper = None
                self.cached_links -= 1
        if pin is not None and pin.nodeid:
            core.unpublish(pin.nodeid)

    def dumper(self, pin: Pin, target: str, name: str) -> Dumper:
        """The pin's dumper, cached while the state dir is watched. Uncached, each open
        file holds a link of its own."""
        if pin.dumper is not None:
            return pin.dumper
        d = Dumper(kernel.obj_get(self.state.pin_str(target, name)), f"{target}/{name}")
        with self.lock:
            if self.cached and self.cached_links < LINK_CACHE_MAX and pin.dumper is None:
                pin.dumper = d
                self.cached_links += 1
        return d

    def view(self, pin: Pin, target: str, name: str) -> str:
        """The pin's view (`reader` unless its record says otherwise), read once."""
        if pin.view is None:
            pin.view = self.state.meta.get(target, name, pin.link_id).get("view", "reader")
        return pin.view

    def queue_check(self, target: str, name: str) -> None:
        """Have check_new() check TARGET/NAME soon (once, however often it changes)."""
        if is_dumper_name(name) and (target, name) not in self.unchecked_keys:
            self.unchecked_keys.add((target, name))
            self.unchecked_in.send_nowait((target, name))

    async def check_new(self) -> None:
        """Check each pin as it appears (and those found at the start), between other
        requests: a check is some 50 us of bpf(2) and /proc, and a target may hold
        thousands of dumpers, which a first `ls -l` would otherwise wait for. The watch
        keeps what was checked true."""
        async for target, name in self.unchecked:
            self.unchecked_keys.discard((target, name))
            if self.cached:
                try:
                    self.check(target, name)
                except pyfuse3.FUSEError:
                    pass  # gone again, or not a dumper (check() said why)
                except Exception:  # a bug here must not take the tree down
                    log.exception("checking %s/%s failed", target, name)


def _check_pin(path: str, target: str) -> tuple[int, str | None]:
    """(link id, why the pin is not shown -- None if it is a dumper of TARGET)."""
    try:
        fd = kernel.obj_get(path)
        try:
            info = iter_link_info(fd, path)
        finally:
            os.close(fd)
    except DumperError as e:
        return 0, "not an iterator link" if e.errno == errno.EINVAL else str(e)
    if info.target_name != target:
        return info.id, (f"its target is {info.target_name}, not {target}; "
                         f"pin it under {info.target_name}/ instead")
    return info.id, None
