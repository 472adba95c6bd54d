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
has gone is unprivileged. Seq_files of CRED_TARGETS are made with no more
capabilities than the reader has, so the kernel filters them for the reader as
it would filter the reader's own open of the pin (view = daemon opts out).
Per-user limits count a user per pid namespace, so one container's root does
not spend the host root's share.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from . import core, libc

CAP_SYS_ADMIN, CAP_BPF = 21, 39
CHANGE_CAPS = (CAP_SYS_ADMIN, CAP_BPF)
READ_PRIVATE_CAPS = (CAP_SYS_ADMIN,)

User = tuple[int, int]  # uid, pid namespace's inode (0 if unknown)

# iterators that weigh the credentials of the task making the seq_file: ksym shows
# addresses only to CAP_SYSLOG (bpf_iter_ksym_init: kallsyms_show_value(current_cred()))
CRED_TARGETS = frozenset({"ksym"})

def effective(pid: int) -> int:
    """Process PID's effective capabilities in the initial user namespace, as a mask:
    none if it is in another user namespace, gone, or not visible (0). (In C, as the
    data plane weighs them too: core.c.)"""
    return core.effective_caps(pid)


def capable(pid: int, caps: tuple[int, ...]) -> bool:
    """Whether process PID has any of CAPS, effective, in the initial user namespace."""
    eff = effective(pid)
    return any(eff >> cap & 1 for cap in caps)


@contextlib.contextmanager
def capabilities(mask: int) -> Iterator[None]:
    """The block runs on this thread with no effective capabilities beyond MASK (a
    reader's, from effective(); capset is per thread: the daemon's other threads keep
    theirs). A seq_file made inside is made with the reader's rights, for the
    iterators that weigh them."""
    eff, perm = libc.capget()
    want = eff & mask
    if want == eff:
        yield
        return
    libc.capset(want, perm)
    try:
        yield
    finally:
        libc.capset(eff, perm)


def may_change(uid: int, pid: int) -> bool:
    return uid == 0 and capable(pid, CHANGE_CAPS)


def user(uid: int, pid: int) -> User:
    """The key per-user limits count UID under: the uid in its pid namespace."""
    return uid, core.pid_ns(pid)
