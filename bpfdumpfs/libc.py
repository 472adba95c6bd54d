"""The libc calls of process and thread state, through one cffi declaration:
namespaces (setns, unshare), mounts, chroot, prctl and capabilities. bpf(2) is
kernel.py's. Each wrapper raises OSError with the errno on failure."""
from __future__ import annotations

import os

import cffi

ffi = cffi.FFI()
ffi.cdef("""
    int setns(int fd, int nstype);
    int unshare(int flags);
    int prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4,
              unsigned long a5);
    int mount(const char *source, const char *target, const char *fstype,
              unsigned long flags, const void *data);
    int chroot(const char *path);
    struct cap_header { uint32_t version; int pid; };
    struct cap_data { uint32_t effective, permitted, inheritable; };
    int capget(struct cap_header *header, struct cap_data *data);
    int capset(struct cap_header *header, const struct cap_data *data);
    struct sock_filter { uint16_t code; uint8_t jt; uint8_t jf; uint32_t k; };
    struct sock_fprog { unsigned short len; struct sock_filter *filter; };
""")
_libc = ffi.dlopen(None)

LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ffi.errno
        raise OSError(err, f"{what}: {os.strerror(err)}")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def prctl(option: int, a2: int = 0, a3: int = 0) -> None:
    _check(_libc.prctl(option, a2, a3, 0, 0), f"prctl({option})")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(_libc.mount(os.fsencode(source), os.fsencode(target),
                       fstype.encode() if fstype else ffi.NULL, flags,
                       data.encode() if data else ffi.NULL), f"mount {target}")


def chroot(path: str) -> None:
    _check(_libc.chroot(path.encode()), f"chroot {path}")


def capget() -> tuple[int, int]:
    """(effective, permitted) capabilities of the calling thread, as 64-bit masks."""
    header = ffi.new("struct cap_header *", {"version": LINUX_CAPABILITY_VERSION_3})
    data = ffi.new("struct cap_data[2]")
    _check(_libc.capget(header, data), "capget")
    return (data[0].effective | data[1].effective << 32,
            data[0].permitted | data[1].permitted << 32)


def capset(effective: int, permitted: int) -> None:
    """Set the calling thread's capabilities (the syscall is per thread, unlike setuid
    in glibc, which every thread of the process follows); inheritable is cleared."""
    header = ffi.new("struct cap_header *", {"version": LINUX_CAPABILITY_VERSION_3})
    data = ffi.new("struct cap_data[2]")
    for i in (0, 1):
        data[i].effective = effective >> 32 * i & 0xFFFFFFFF
        data[i].permitted = permitted >> 32 * i & 0xFFFFFFFF
    _check(_libc.capset(header, data), "capset")


PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2


def seccomp(program: list[tuple[int, int, int, int]]) -> None:
    """Install a seccomp filter of classic BPF instructions (code, jt, jf, k) on the
    calling thread and its future children; needs no_new_privs (or CAP_SYS_ADMIN)."""
    filt = ffi.new("struct sock_filter[]", [{"code": c, "jt": t, "jf": f, "k": k}
                                            for c, t, f, k in program])
    prog = ffi.new("struct sock_fprog *", {"len": len(program), "filter": filt})
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, int(ffi.cast("uintptr_t", prog)))
