"""Who is asking: a FUSE requester as the kernel would weigh it.

The daemon runs as root and FUSE tells it only the requester's uid, gid and pid.
A uid alone says too little: a container's root is uid 0 on the host but holds
few capabilities, none of them in the initial user namespace that owns BPF
objects and kernel addresses. So privileged requests are judged by the
requester's effective capabilities (/proc/PID/status), counted only in the
initial user namespace, as the kernel's own capable() would count them:

- changing the tree (rm, mv, chmod, chown) needs uid 0 and CAP_SYS_ADMIN or
  CAP_BPF, what pinning and loading need;
- uid 0 reading a dumper that is not world-readable needs CAP_SYS_ADMIN: the
  file mode lets uid 0 in by identity, which a container's root shares.

A requester whose pid the daemon cannot see (0: another pid namespace) or that
has gone is unprivileged. Per-user limits count a user per pid namespace, so one
container's root does not spend the host root's share.
"""
from __future__ import annotations

import os

CAP_SYS_ADMIN, CAP_SYSLOG, CAP_BPF = 21, 34, 39
CHANGE_CAPS = (CAP_SYS_ADMIN, CAP_BPF)
READ_PRIVATE_CAPS = (CAP_SYS_ADMIN,)

User = tuple[int, str]  # uid, pid namespace ("pid:[N]"; "" if unknown)

# the daemon's own user namespace: it serves as host root, so the initial one
_INIT_USERNS = os.readlink("/proc/self/ns/user")


def capable(pid: int, caps: tuple[int, ...]) -> bool:
    """Whether process PID has any of CAPS, effective, in the initial user namespace."""
    if pid <= 0:
        return False
    try:
        if os.readlink(f"/proc/{pid}/ns/user") != _INIT_USERNS:
            return False
        with open(f"/proc/{pid}/status") as f:
            eff = next(int(ln.split()[1], 16) for ln in f if ln.startswith("CapEff:"))
    except (OSError, StopIteration):
        return False
    return any(eff >> cap & 1 for cap in caps)


def may_change(uid: int, pid: int) -> bool:
    return uid == 0 and capable(pid, CHANGE_CAPS)


def user(uid: int, pid: int) -> User:
    """The key per-user limits count UID under: the uid in its pid namespace."""
    try:
        return uid, os.readlink(f"/proc/{pid}/ns/pid") if pid > 0 else ""
    except OSError:
        return uid, ""
