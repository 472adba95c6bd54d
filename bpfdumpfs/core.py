"""The data plane: opens, reads and releases of dumper files served in C (core.c),
without the GIL or a hand-off between threads.

On this kind of VM a request that passes from thread to thread pays a cross-CPU
wake-up each time, and a request served in Python pays 20-30 us of Python; a small
dump's open is four requests (OPEN, READ, READ at the end, RELEASE). So the threads
that read /dev/fuse are C threads (core.c), taking turns as the leader -- the one
reading /dev/fuse, spinning SPIN seconds before it sleeps -- and they serve the
common case whole:

    OPEN      of a published dumper (publish(): its link cached, its view known),
              by a reader in the daemon's namespaces of the dumper's kind, admitted
              by the same counts Python admits by (admit()); the seq_file is made
              with no more capabilities than the reader has, for CRED_TARGETS
    READ      of a file opened so, at its position, of a dumper that is not slow
    RELEASE   of such a file
    GETATTR   of a published dumper while its pin is the one published (`cat`
              asks after every open: each read makes the kernel drop the atime)

Anything else -- every other request, and any of these that needs a judgement (a
first open, a refusal to log, a seek, a kernel error, a slow dumper, a file past
its time budget) -- is forwarded to Python whole, as /dev/fuse gave it, through a
SOCK_SEQPACKET socket (device.py). A READ of a file served here that C forwards
makes Python take the file over (adopt()): its seq_file, position, the bytes kept
for a seek back and any read ahead of the position move to Python, which serves
the file from then on (files.py). So the judgements stay in Python, in one place,
and C holds only what the quick path needs.

The counts per user and the limits, the metrics' counters and each dumper's pace
are kept in C, so that both sides count in the same place.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ._core import ffi, lib

FH_BIT = 1 << 62        # the fhs of files served in C; Python's are small
QUICK_NS = 300_000      # a dumper is quick while its kernel reads average less
LEARN_READS = 3         # reads before a dumper may be called quick
SPIN = 200e-6          # seconds the leader asks for a next request before it sleeps
NS_KINDS = {None: 0, "pid": 1, "net": 2}

if err := lib.core_init(QUICK_NS, LEARN_READS):
    raise OSError(err, f"reading /proc/self/ns/user: {os.strerror(err)}")


def served_here(fh: int) -> bool:
    """Whether FH is (or was, before Python adopted it) a file opened in C."""
    return bool(fh & FH_BIT)


class Pace:
    """What the kernel reads of one dumper took, as a moving average: shared by the
    files of a pin, in C and in Python (reader.py)."""

    def __init__(self, ptr=None) -> None:
        # a reference of our own: C's files of the pin hold theirs
        self.ptr = ffi.gc(ptr if ptr is not None else lib.core_pace_new(), lib.core_pace_put)

    @property
    def reads(self) -> int:
        return self.ptr.reads

    @property
    def avg_ns(self) -> float:
        return self.ptr.avg_ns

    @property
    def quick(self) -> bool:
        return bool(lib.core_pace_quick(self.ptr))

    def record(self, ns: int) -> None:
        lib.core_pace_record(self.ptr, ns)


class Stats:
    """One dumper's counters (metrics.py), counted by C and Python alike; never freed,
    as a dumper's metrics outlive its pin."""

    def __init__(self) -> None:
        self.ptr = lib.core_stats_new()
        if self.ptr == ffi.NULL:
            raise MemoryError("metrics of a dumper")

    def opened(self) -> None:
        lib.core_count_open(self.ptr)

    def closed(self) -> None:
        lib.core_count_close(self.ptr)

    def read(self, nbytes: int, seconds: float) -> None:
        lib.core_count_read(self.ptr, nbytes, int(seconds * 1e9))

    @property
    def opens(self) -> int:
        return self.ptr.opens

    @property
    def handles(self) -> int:
        return self.ptr.handles

    @property
    def bytes(self) -> int:
        return self.ptr.bytes

    def latency(self, buckets: int) -> list[int]:
        return list(self.ptr.latency[0:buckets + 1])

    @property
    def latency_sum(self) -> float:
        return self.ptr.latency_ns / 1e9


def set_buckets(bounds: tuple[float, ...]) -> None:
    lib.core_set_buckets(ffi.new("double[]", bounds), len(bounds))


def set_limits(max_files: int, max_user_files: int, open_budget: float, read_ahead: object,
               streaming_after: int, read_ahead_reads: int, max_ahead: int) -> None:
    """The limits C's files answer to, as Python's do (files.py, reader.py): READ_AHEAD
    is the budget (a struct core_budget) their producers count in."""
    lib.core_set_limits(ffi.new("struct core_limits *", {
        "max_files": max_files, "max_user_files": max_user_files,
        "open_budget_ns": int(open_budget * 1e9), "read_ahead": read_ahead,
        "streaming_after": streaming_after, "read_ahead_reads": read_ahead_reads,
        "max_ahead": max_ahead}))


def admit(uid: int, ns: int) -> int:
    """Count one more file of user (UID, pid namespace NS), or the errno of the limit
    that refuses it (ENFILE: all files; EMFILE: the user's)."""
    return lib.core_admit(uid, ns)


def unadmit(uid: int, ns: int) -> None:
    lib.core_unadmit(uid, ns)


def files(uid: int, ns: int) -> tuple[int, int]:
    """(files open, those of user (UID, NS))."""
    mine = ffi.new("uint32_t *")
    total = lib.core_files(uid, ns, mine)
    return total, mine[0]


def pid_ns(pid: int) -> int:
    """The inode of PID's pid namespace; 0 if unknown."""
    return lib.core_pid_ns(max(pid, 0))


def effective_caps(pid: int) -> int:
    """PID's effective capabilities in the initial user namespace (privilege.py)."""
    return lib.core_effective_caps(max(pid, 0))


def publish(nodeid: int, link_fd: int, label: str, pin_path: str, pin_ino: int,
            ns_kind: str | None, home_ns: str, cred: bool, stats: Stats, pace: Pace) -> None:
    """Let C serve opens and attributes of inode NODEID (see the module's docstring),
    while PIN_PATH is the pin PIN_INO. C keeps a duplicate of LINK_FD; the dumper's
    file opens are then made with the reader's capabilities if CRED, and only for
    readers in HOME_NS if NS_KIND."""
    err = lib.core_publish(nodeid, link_fd, label.encode(), pin_path.encode(), pin_ino,
                           NS_KINDS[ns_kind], home_ns.encode(), cred, stats.ptr, pace.ptr)
    if err:
        raise OSError(err, f"publishing {label}: {os.strerror(err)}")


def unpublish(nodeid: int) -> None:
    lib.core_unpublish(nodeid)


@dataclass
class Adopted:
    """A file C served until now, taken over by Python."""
    fd: int               # its seq_file, now Python's to close
    link_fd: int          # a link of its dumper, Python's to close
    label: str
    err: int              # the kernel's errno that ended it, 0 if none
    ended: bool
    uid: int
    pid: int
    user_ns: int
    pos: int
    opened: float         # time.monotonic() of the open
    back: bytes           # the last bytes before pos
    surplus: bytes        # read from the kernel beyond pos
    pace: Pace


def adopt(fh: int, back: int) -> Adopted | None:
    """Take file FH over from C; None if C does not have it (released, or taken). BACK:
    the most bytes C keeps behind the position."""
    a = ffi.new("struct core_adopted *")
    back_buf = ffi.new("char[]", back)
    if not lib.core_adopt(fh, a, back_buf):
        return None
    surplus = ffi.unpack(a.surplus, a.surplus_len) if a.surplus_len else b""
    lib.core_free(a.surplus)
    return Adopted(a.fd, a.link_fd, ffi.string(a.label).decode(errors="replace"), a.err,
                   bool(a.ended), a.uid, a.pid, a.user_ns, a.pos, a.opened_ns / 1e9,
                   ffi.unpack(back_buf, a.back_len), surplus,
                   Pace(a.pace))


def set_xattr_refusals(rules: tuple[tuple[bytes, int], ...]) -> None:
    """GETXATTR names C answers itself: the first prefix a name starts with gives the
    errno, 0 for Python to answer (ops.XATTR_REFUSALS)."""
    lib.core_xattr_rule(ffi.NULL, 0)
    for prefix, err in rules:
        if lib.core_xattr_rule(prefix, err):
            raise ValueError(f"xattr rule {prefix!r}: too many, or too long")


def start(dev_fd: int, fwd_fd: int, *, first_threads: int, max_threads: int, debug: bool,
          kernel_buf: int, max_eagain: int, back: int, max_read: int, bufsize: int,
          open_flags: int, blksize: int, attr_valid: int, read_private_caps: int,
          fh_base: int) -> None:
    """Start C's threads reading DEV_FD (/dev/fuse), forwarding to FWD_FD; the fhs of
    the files they open have the bits of FH_BASE (the server's generation) set."""
    config = ffi.new("struct core_config *", {
        "spin_ns": int(SPIN * 1e9), "kernel_buf": kernel_buf, "max_eagain": max_eagain,
        "back": back, "max_read": max_read, "bufsize": bufsize, "open_flags": open_flags,
        "blksize": blksize, "attr_valid": attr_valid, "read_private_caps": read_private_caps,
        "fh_base": fh_base})
    err = lib.core_start(dev_fd, fwd_fd, config, first_threads, max_threads, debug)
    if err:
        raise OSError(err, f"starting the FUSE threads: {os.strerror(err)}")


def start_uring(payload: int) -> None:
    """Serve FUSE over io_uring from here on (INIT asked for it): one queue per possible
    CPU, whose entries hold requests and replies of up to PAYLOAD bytes."""
    err = lib.core_start_uring(payload)
    if err:
        raise OSError(err, f"starting the io_uring queues: {os.strerror(err)}")


def uring_queues() -> int:
    """The io_uring queues serving requests; 0 over /dev/fuse."""
    return lib.core_uring_queues()


def uring_idle_class(idle: bool) -> None:
    """Run the io_uring queues' threads in SCHED_IDLE or not (see core.c)."""
    lib.core_uring_idle_class(idle)


def reply(parts: list) -> None:
    """Answer a request with PARTS (its fuse_out_header first): in the ring entry that
    holds it, or else through /dev/fuse."""
    iov = ffi.new("struct iovec[]", len(parts))
    bufs = [ffi.from_buffer(p) for p in parts]  # kept alive through the call
    for v, b, p in zip(iov, bufs, parts, strict=True):
        v.iov_base, v.iov_len = b, len(p)
    err = lib.core_reply(iov, len(parts))
    if err:
        raise OSError(-err, os.strerror(-err))


def drain() -> None:
    """Take no more requests from /dev/fuse: the connection passes to another server,
    to which the kernel sends them again (keeper.py)."""
    lib.core_drain()


def release_all() -> None:
    """Close every file C serves (at the end)."""
    lib.core_release_all()


def producing() -> bool:
    """Whether C reads ahead for a reader now (resources.py waits for the end to trim)."""
    return bool(lib.core_producing())


def trim(streaming: bool) -> None:
    """Unmap the read-ahead chunks C keeps for streams to come: beyond a stream's
    worth while files STREAMING, else all (resources.py)."""
    lib.core_trim(not streaming)
