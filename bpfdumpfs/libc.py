"""The one cffi FFI of the package, and the libc calls made through it: namespaces
(setns, unshare), mounts, chroot, prctl, capabilities, seccomp, inotify and malloc's
tuning. Each wrapper raises OSError with the errno on failure. kernel.py declares
bpf(2)'s structures and libbpf on this same FFI (one set of C types); it is the one
place that speaks bpf(2)."""
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
    int umount2(const char *target, int flags);
    int chroot(const char *path);
    struct cap_header { uint32_t version; int pid; };
    struct cap_data { uint32_t effective, permitted, inheritable; };
    int capget(struct cap_header *header, struct cap_data *data);
    int capset(struct cap_header *header, const struct cap_data *data);
    struct sock_filter { uint16_t code; uint8_t jt; uint8_t jf; uint32_t k; };
    struct sock_fprog { unsigned short len; struct sock_filter *filter; };
    int inotify_init1(int flags);
    int inotify_add_watch(int fd, const char *pathname, uint32_t mask);
    int mallopt(int param, int value);
    int malloc_trim(size_t pad);
    struct mallinfo2 { size_t arena, ordblks, smblks, hblks, hblkhd, usmblks, fsmblks,
                       uordblks, fordblks, keepcost; };
    struct mallinfo2 mallinfo2(void);
    long syscall(long number, ...);
    struct statfs { long f_type; long _rest[15]; };
    int statfs(const char *path, struct statfs *buf);
    int vsnprintf(char *str, size_t size, const char *format, void *ap);
""")
lib = ffi.dlopen(None)

LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ffi.errno
        raise OSError(err, f"{what}: {os.strerror(err)}")


def setns(fd: int, nstype: int) -> None:
    _check(lib.setns(fd, nstype), "setns")


def unshare(flags: int) -> None:
    _check(lib.unshare(flags), "unshare")


def prctl(option: int, a2: int = 0, a3: int = 0) -> None:
    _check(lib.prctl(option, a2, a3, 0, 0), f"prctl({option})")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(lib.mount(os.fsencode(source), os.fsencode(target),
                       fstype.encode() if fstype else ffi.NULL, flags,
                       data.encode() if data else ffi.NULL), f"mount {target}")


def umount2(target: str, flags: int) -> None:
    _check(lib.umount2(os.fsencode(target), flags), f"umount {target}")


def chroot(path: str) -> None:
    _check(lib.chroot(path.encode()), f"chroot {path}")


def capget() -> tuple[int, int]:
    """(effective, permitted) capabilities of the calling thread, as 64-bit masks."""
    header = ffi.new("struct cap_header *", {"version": LINUX_CAPABILITY_VERSION_3})
    data = ffi.new("struct cap_data[2]")
    _check(lib.capget(header, data), "capget")
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
    _check(lib.capset(header, data), "capset")


PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2


def seccomp(program: list[tuple[int, int, int, int]]) -> None:
    """Install a seccomp filter of classic BPF instructions (code, jt, jf, k) on the
    calling thread and its future children; needs no_new_privs (or CAP_SYS_ADMIN)."""
    filt = ffi.new("struct sock_filter[]", [{"code": c, "jt": t, "jf": f, "k": k}
                                            for c, t, f, k in program])
    prog = ffi.new("struct sock_fprog *", {"len": len(program), "filter": filt})
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, int(ffi.cast("uintptr_t", prog)))


def inotify_init1(flags: int) -> int:
    fd = lib.inotify_init1(flags)
    if fd < 0:
        _check(fd, "inotify_init1")
    return fd


def inotify_add_watch(fd: int, path: str | os.PathLike, mask: int) -> int:
    wd = lib.inotify_add_watch(fd, os.fsencode(path), mask)
    if wd < 0:
        _check(wd, f"inotify_add_watch {os.fsdecode(path)}")
    return wd


def statfs_type(path: str) -> int:
    """statfs(2) f_type of the filesystem holding PATH."""
    buf = ffi.new("struct statfs *")
    _check(lib.statfs(os.fsencode(path), buf), f"statfs {path}")
    return buf.f_type & 0xFFFFFFFF
