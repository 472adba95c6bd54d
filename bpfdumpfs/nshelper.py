"""The helper process of namespaces.py: creates seq_files in a reader's pid namespace.

Run as `python -I -m bpfdumpfs.nshelper NS_FD SOCK_FD` (cwd /). setns() of a pid
namespace moves only the caller's future children, so for each request the
helper forks a child, which is born in the namespace, makes the seq_file and
exits; the helper reaps it before answering. Nothing of bpfdumpfs lives in the
reader's namespace between requests: a container does not see the helper in
`ps`, in /proc or in its own task dumps, and has nothing there to attach to.

Whoever reaches the helper anyway (a child, in the instant it lives) finds
nothing worth having: before serving, the helper drops to nobody with no
capabilities (CAP_BPF alone on kernels before 6.5, where every bpf(2) command
needs it when unprivileged BPF is off), sets no_new_privs and dumpable 0, closes
every fd but its sockets, and chroots into an empty read-only tmpfs in a mount
namespace of its own; on x86-64 a seccomp filter then allows only the calls it
makes (sockets, fork and wait, memory, signals, and bpf(2)'s BPF_ITER_CREATE;
EPERM for the rest). It holds no link fd at rest: each request's is closed once
its seq_file is made.

Protocol on the SEQPACKET socket: the daemon sends b"c" with one link fd
(SCM_RIGHTS); the answer is b"f" with the seq_file fd, or b"e<errno>". The
helper exits when the daemon closes the socket, or after IDLE seconds without a
request.
"""
from __future__ import annotations

import errno
import os
import socket
import sys

from . import kernel, libc
from .errors import DumperError

IDLE = 5.0
NOBODY = 65534
CLONE_NEWNS, CLONE_NEWPID = 0x00020000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 1 << 14, 1 << 18
PR_SET_DUMPABLE, PR_SET_KEEPCAPS, PR_CAPBSET_DROP = 4, 8, 24
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
CAP_BPF, CAP_LAST_CAP = 39, 63

def kept_caps(release: str = os.uname().release) -> set[int]:
    """The capabilities BPF_ITER_CREATE needs on kernel RELEASE: none from 6.5 on
    (capabilities are checked at map create and program load only); before, CAP_BPF."""
    major, minor = (int(x) for x in release.split(".")[:2])
    return set() if (major, minor) >= (6, 5) else {CAP_BPF}


# What the helper and its children call once hardened: sockets, fork and wait, memory,
# signals and the BPF_ITER_CREATE command of bpf(2); anything else fails with EPERM.
# x86-64 numbers (arch/x86/entry/syscalls/syscall_64.tbl); elsewhere no filter is set.
AUDIT_ARCH_X86_64 = 0xC000003E
SYSCALLS_X86_64 = {
    "read": 0, "write": 1, "close": 3, "fstat": 5, "poll": 7, "lseek": 8, "mmap": 9,
    "mprotect": 10, "munmap": 11, "brk": 12, "rt_sigaction": 13, "rt_sigprocmask": 14,
    "rt_sigreturn": 15, "sched_yield": 24, "mremap": 25, "madvise": 28, "getpid": 39,
    "sendmsg": 46, "recvmsg": 47, "getsockname": 51, "getpeername": 52, "getsockopt": 55,
    "clone": 56, "exit": 60, "wait4": 61, "fcntl": 72, "getuid": 102, "getgid": 104,
    "geteuid": 107, "getegid": 108, "sigaltstack": 131, "gettid": 186, "futex": 202,
    "restart_syscall": 219, "clock_gettime": 228, "clock_nanosleep": 230, "exit_group": 231,
    "newfstatat": 262, "ppoll": 271, "set_robust_list": 273, "getrandom": 318, "rseq": 334,
}
BPF_SYSCALL_X86_64 = 321
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06
RET_ALLOW, RET_EPERM, RET_KILL = 0x7FFF0000, 0x00050000 | errno.EPERM, 0x80000000


def seccomp_program() -> list[tuple[int, int, int, int]]:
    """The filter: allow SYSCALLS_X86_64, bpf(2) with cmd BPF_ITER_CREATE only, EPERM for
    the rest; kill a call from another architecture's ABI."""
    allowed = sorted(SYSCALLS_X86_64.values())
    n = len(allowed)
    return [(LD_W_ABS, 0, 0, 4),                      # seccomp_data.arch
            (JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
            (RET_K, 0, 0, RET_KILL),
            (LD_W_ABS, 0, 0, 0),                      # seccomp_data.nr
            *[(JEQ_K, n + 3 - i, 0, nr) for i, nr in enumerate(allowed)],
            (JEQ_K, 0, 2, BPF_SYSCALL_X86_64),
            (LD_W_ABS, 0, 0, 16),                     # args[0], low half: the command
            (JEQ_K, 1, 0, kernel.BPF_ITER_CREATE),
            (RET_K, 0, 0, RET_EPERM),
            (RET_K, 0, 0, RET_ALLOW)]


def harden(keep: set[int]) -> None:
    """Make this process worth nothing to anyone who reaches it (see the module doc);
    of its fds, only stdio (/dev/null) and KEEP stay open."""
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    os.close(devnull)
    start = 3
    for fd in sorted(keep):
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, os.sysconf("SC_OPEN_MAX"))
    # an empty, read-only root in a mount namespace of our own: nothing of the host's
    # tree through /proc/PID/root, and nothing to write there either
    libc.unshare(CLONE_NEWNS)
    libc.mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    libc.mount("bpfdumpfs-empty", "/tmp", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
               "size=4k,mode=0555")
    os.chdir("/tmp")
    libc.chroot(".")
    os.chdir("/")
    caps = kept_caps()
    for cap in range(CAP_LAST_CAP + 1):
        if cap not in caps:
            try:
                libc.prctl(PR_CAPBSET_DROP, cap)
            except OSError:
                break  # EINVAL: past this kernel's last capability
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    libc.prctl(PR_SET_KEEPCAPS, 1 if caps else 0)
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    mask = sum(1 << cap for cap in caps)
    libc.capset(mask, mask)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1)
    libc.prctl(PR_SET_DUMPABLE, 0)
    os.dup2(0, 2)  # /dev/null: nothing to say from here on, and no terminal to reach
    if os.uname().machine == "x86_64":
        libc.seccomp(seccomp_program())


def _make(link_fd: int, back: socket.socket) -> None:
    """In the forked child: make the seq_file and hand it to the helper."""
    try:
        fd = kernel.iter_create(link_fd)
    except DumperError as e:
        back.send(b"e%d" % e.errno)
    else:
        socket.send_fds(back, [b"f"], [fd])


def _request(link_fd: int, here: socket.socket, there: socket.socket) -> tuple[bytes, list[int]]:
    try:
        child = os.fork()
    except OSError as e:
        # ENOMEM: the namespace's init has died, and no task can be born there
        return b"e%d" % (errno.ESRCH if e.errno == errno.ENOMEM else e.errno or errno.EIO), []
    if child == 0:
        try:
            _make(link_fd, there)
        finally:
            os._exit(0)
    os.waitpid(child, 0)  # reaped before the answer: the reader's dump never shows it
    try:
        msg, fds, _flags, _addr = socket.recv_fds(here, 16, 1, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b"e%d" % errno.EIO, []
    return msg, fds


def serve(sock: socket.socket, here: socket.socket, there: socket.socket) -> None:
    """Answer requests on SOCK (its IDLE timeout set before hardening: seccomp refuses
    the ioctl that sets it)."""
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 16, 1)
        except TimeoutError:
            return
        if not msg:
            return
        try:
            reply, out = _request(fds[0], here, there) if fds else (b"e%d" % errno.EINVAL, [])
        finally:
            for f in fds:
                os.close(f)
        try:
            socket.send_fds(sock, [reply], out) if out else sock.send(reply)
        finally:
            for f in out:
                os.close(f)


def main() -> int:
    ns_fd, sock_fd = int(sys.argv[1]), int(sys.argv[2])
    sock = socket.socket(fileno=sock_fd)
    sock.settimeout(IDLE)
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        libc.setns(ns_fd, CLONE_NEWPID)
        os.close(ns_fd)
        harden({sock_fd, here.fileno(), there.fileno()})
    except OSError as e:
        print(f"bpfdumpfs nshelper: {e}", file=sys.stderr)
        return 1
    serve(sock, here, there)
    return 0


if __name__ == "__main__":
    sys.exit(main())
