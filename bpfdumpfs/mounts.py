"""The host's mounts, from /proc/self/mountinfo: where bpfdumpfs trees are mounted,
which state dir each serves, and the dead FUSE mount a killed daemon leaves."""
from __future__ import annotations

import errno
import logging
import os
import re
import subprocess

from .errors import DumperError
from .state import StateDir

log = logging.getLogger(__name__)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, fstype, source) of every mount, from /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, source = right.split()[:2]
            found.append((_unescape(left.split()[4]), fstype, _unescape(source)))
    return found


def fstypes() -> dict[str, str]:
    """mount point -> fstype."""
    return {point: fstype for point, fstype, _ in mountinfo()}


def fsname(state: StateDir) -> str:
    """The FUSE fsname, which names the state dir so the CLI can find the tree."""
    path = os.path.realpath(state.path)
    return f"bpfdumpfs:{path}" if re.fullmatch(r"[^\s,\\]+", path) else "bpfdumpfs"


def bpfdumpfs_mounts() -> list[str]:
    return [p for p, fstype, _ in mountinfo() if fstype == "fuse.bpfdumpfs"]


def mounts_of(state_dir) -> list[str]:
    """Mount points of bpfdumpfs trees serving STATE_DIR."""
    want = fsname(StateDir(state_dir))
    return [p for p, fstype, source in mountinfo()
            if fstype == "fuse.bpfdumpfs" and source == want]


def clear_dead_mount(mountpoint: str) -> None:
    """Unmount a FUSE mount whose daemon is gone; refuse to mount over a live one.

    A dead mount may still answer stat() from the kernel's attribute cache, so
    liveness is asked with a readdir, which always reaches the daemon."""
    path = os.path.realpath(mountpoint)
    fstype = fstypes().get(path, "")
    if not fstype.startswith("fuse"):
        return
    try:
        os.listdir(path)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise
        log.warning("clearing the dead FUSE mount at %s (its daemon is gone)", path)
        subprocess.run(["fusermount3", "-uz", path], check=False)
        if path in fstypes():
            subprocess.run(["umount", "-l", path], check=False)
        return
    raise DumperError(errno.EBUSY, f"{path} is already a live FUSE mount ({fstype})",
                      f"unmount it first (fusermount3 -u {path}) or choose another mount point")
