"""The FUSE connection: /dev/fuse read by the data plane's C threads (core.py), which
serve the opens, reads and releases they can and forward the rest here; and the
relay of what is forwarded to pyfuse3.

pyfuse3 runs each request through trio, about 65 us of Python per round trip on
this kind of machine, and kernel reads of a seq_file block, so in trio they would
need a thread hand-off each. So the daemon owns /dev/fuse. It mounts it itself and
gives pyfuse3 one end of a SOCK_SEQPACKET socketpair as its session ("/dev/fd/N":
libfuse reads requests from it and writes replies and notifications to it, one
message each).

What C forwards comes through another socketpair to a pool of Python workers, which
wait for it together. READ and RELEASE of the files Python serves (those C handed
over, and those opened here) they answer at once through the small interface of
`Served` (ops.py serves it, with files.py), and so the getxattrs C answers itself,
when --debug-fuse has it forward everything. A READ blocks only the worker that took
it, and a READ of a file being read ahead that must wait is left with its producer,
which answers it. Everything else (lookups, listings, first opens, opens in another
namespace, changes) goes to pyfuse3 whole, and its answers come back through the
relay thread.
"""
from __future__ import annotations

import base64
import collections
import errno
import logging
import mmap
import os
import queue
import resource
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

import pyfuse3

from . import core, libc, privilege
from .files import FILE_BLKSIZE, OPEN_FLAGS, Answer, ReadLater
from .inodes import fh_base
from .pins import CACHE_TIMEOUT
from .seek import BACK
from .stream import KERNEL_BUF, MAX_EAGAIN


class Served(Protocol):
    """What the device's threads ask of the tree: each call answers without waiting on
    trio, may run concurrently with trio and with the others, and fails with
    pyfuse3.FUSEError(errno)."""

    def read_handle(self, fh: int, offset: int, size: int, answer: Answer | None = None,
                    tag: int = 0, opener: tuple[int, int, int] | None = None) -> list | ReadLater:
        """The pieces of the reply, or, given ANSWER, a read left to be answered by
        answer(tag, ...) (PARKED) or not made since it may wait (MAY_WAIT). OPENER, the
        request's (nodeid, uid, pid), makes again a file a previous server opened."""

    def release_handle(self, fh: int) -> None:
        """The file's last close."""

    def xattr_refusal(self, name: bytes) -> int | None:
        """The errno for a getxattr of NAME that needs no look at the file, or None."""


class InHeader(NamedTuple):
    """struct fuse_in_header"""
    len: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    total_extlen: int
    padding: int

log = logging.getLogger(__name__)

# the kernel's FUSE ABI (include/uapi/linux/fuse.h)
IN_HEADER = struct.Struct("<IIQQIIIHH")   # len, opcode, unique, nodeid, uid, gid, pid, ...
OUT_HEADER = struct.Struct("<IiQ")        # len, error, unique
READ_IN = struct.Struct("<QQI")           # fh, offset, size
FH_IN = struct.Struct("<Q")               # fuse_release_in starts with fh
UNIQUE = struct.Struct("<Q")              # at offset 8 of fuse_out_header
BODY = IN_HEADER.size                     # where a request's own struct starts
GETXATTR_IN = struct.Struct("<II")        # size, padding; the name follows
FUSE_OPEN, FUSE_READ, FUSE_RELEASE, FUSE_GETXATTR, FUSE_INIT, FUSE_INTERRUPT = \
    14, 15, 18, 22, 26, 36
OPEN_OUT = struct.Struct("<QI")           # fuse_open_out: fh, open_flags
NO_REPLY = {2, 42}                        # FORGET, BATCH_FORGET
INIT_IN = struct.Struct("<IIIII")         # major, minor, max_readahead, flags, flags2
# major, minor, max_readahead, flags, max_background, congestion_threshold, max_write,
# time_gran, max_pages, map_alignment, flags2
INIT_OUT = struct.Struct("<IIIIHHIIHHI")
FUSE_INIT_EXT = 1 << 30
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_OVER_IO_URING = 1 << 9               # of flags2 (bit 41 of the 64-bit flags)
OPCODES = {1: "LOOKUP", 2: "FORGET", 3: "GETATTR", 4: "SETATTR", 5: "READLINK", 6: "SYMLINK",
           8: "MKNOD", 9: "MKDIR", 10: "UNLINK", 11: "RMDIR", 12: "RENAME", 13: "LINK",
           14: "OPEN", 15: "READ", 16: "WRITE", 17: "STATFS", 18: "RELEASE", 20: "FSYNC",
           21: "SETXATTR", 22: "GETXATTR", 23: "LISTXATTR", 24: "REMOVEXATTR", 25: "FLUSH",
           26: "INIT", 27: "OPENDIR", 28: "READDIR", 29: "RELEASEDIR", 30: "FSYNCDIR",
           31: "GETLK", 32: "SETLK", 33: "SETLKW", 34: "ACCESS", 35: "CREATE",
           36: "INTERRUPT", 37: "BMAP", 38: "DESTROY", 39: "IOCTL", 40: "POLL",
           42: "BATCH_FORGET", 43: "FALLOCATE", 44: "READDIRPLUS", 45: "RENAME2",
           46: "LSEEK", 47: "COPY_FILE_RANGE", 48: "SETUPMAPPING", 49: "REMOVEMAPPING",
           50: "SYNCFS", 51: "TMPFILE", 52: "STATX"}
# libfuse's buffer: the largest request (a 1 MiB write) and its headers
MAX_READ = 256 * 4096   # the largest READ: max_pages (256) pages
BUFSIZE = MAX_READ + 4096
FIRST_WORKERS = 2   # Python workers, and C threads, started with the mount
REPLIERS = 2        # threads writing the answers to parked reads
MAX_WAITING = 4     # a worker that finds this many others waiting retires
# io_uring queues in SCHED_IDLE (see _watch_pressure): CPU pressure looked at every
# PRESSURE_EVERY s; the normal class once some task waited for a CPU PRESSURE_SPIKE of
# one look's time, or PRESSURE_BUSY of the last second's; back to SCHED_IDLE after
# PRESSURE_CALM s below PRESSURE_BUSY
PRESSURE_EVERY, PRESSURE_SPIKE, PRESSURE_BUSY, PRESSURE_CALM = 0.1, 0.1, 0.02, 2.0
CAP_SYS_NICE = 23
# a message must fit the socket's buffer whole (a READ reply of .stats, a listing)
SOCKET_BUF = 4 << 20
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # not in Python's socket module

MS_NOSUID, MS_NODEV, MNT_DETACH = 2, 4, 2


def mount(mountpoint: str, fsname: str) -> int:
    """Mount a FUSE tree at MOUNTPOINT; returns its connection (/dev/fuse)."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"
    try:
        libc.mount(fsname, mountpoint, "fuse.bpfdumpfs", MS_NOSUID | MS_NODEV, opts)
    except OSError:
        os.close(fd)
        raise
    return fd


def unmount(mountpoint: str) -> None:
    """Detach the mount at MOUNTPOINT, if any is left."""
    try:
        libc.umount2(mountpoint, MNT_DETACH)
    except OSError:
        pass  # gone meanwhile: what matters is that it is not ours any more


class Device:
    """One FUSE mount: /dev/fuse, its worker threads, and the relay to pyfuse3."""

    def __init__(self, ops: Served, mountpoint: str, max_workers: int, debug: bool = False,
                 generation: int = 0) -> None:
        self.ops = ops
        self.debug = debug  # log every request and reply, in libfuse's debug format
        self.mountpoint = mountpoint
        self.max_workers = max_workers
        self.generation = generation
        self.fd = -1
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # what the data plane forwards: read here, written by C
        self.forwarded, self.core_end = socket.socketpair(socket.AF_UNIX,
                                                          socket.SOCK_SEQPACKET)
        for s in (self.ours, self.theirs, self.forwarded, self.core_end):
            for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF),
                                 (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
                try:
                    s.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUF)
                except PermissionError:
                    # FORCE needs CAP_NET_ADMIN, which the systemd unit does not grant;
                    # up to net.core.[wr]mem_max, which fits pyfuse3's small replies
                    s.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUF)
        self.lock = threading.Lock()
        self.workers = 0
        self.waiting = 0              # workers waiting for a request
        self.unmounted = threading.Event()  # the mount is gone: workers stop
        self.notices: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.answers: queue.SimpleQueue[tuple] = queue.SimpleQueue()  # (unique, result)
        self.init_unique = 0          # INIT, until answered
        self.init_replayed = False    # INIT was the kernel's to a previous server
        self.uring_offered = False    # INIT offered FUSE over io_uring (core.py)
        self.report: Callable[[dict], None] = lambda what: None  # to the keeper
        self.to_pyfuse3: set[int] = set()  # uniques of requests pyfuse3 is yet to answer
        self.opens: set[int] = set()       # ...of those, the OPENs

    def session(self) -> str:
        """The session path to give pyfuse3.init(); libfuse takes this end over (and
        closes it at fuse_session_destroy)."""
        return f"/dev/fd/{self.theirs.detach()}"

    def start(self, fd: int, init: bytes | None = None,
              report: Callable[[dict], None] | None = None) -> None:
        """Serve the connection FD (/dev/fuse). INIT: the kernel's INIT request, when
        the connection was set up by a server before this one (keeper.py); pyfuse3
        is given it as if it came now, and its reply is kept from the kernel, which has
        had one. REPORT tells the keeper the kernel's INIT when it comes, and that FUSE
        runs over io_uring (keeper.py)."""
        self.fd = fd
        if report:
            self.report = report
        if init:
            head = InHeader._make(IN_HEADER.unpack_from(init))
            self._saw_init(memoryview(init), head)
            self.init_replayed = True
            self.ours.sendall(init)
        core.start(fd, self.core_end.fileno(), first_threads=FIRST_WORKERS,
                   max_threads=self.max_workers, debug=self.debug, kernel_buf=KERNEL_BUF,
                   max_eagain=MAX_EAGAIN, back=BACK, max_read=MAX_READ, bufsize=BUFSIZE,
                   open_flags=OPEN_FLAGS, blksize=FILE_BLKSIZE, attr_valid=int(CACHE_TIMEOUT),
                   read_private_caps=sum(1 << c for c in privilege.READ_PRIVATE_CAPS),
                   fh_base=fh_base(self.generation))
        threading.Thread(target=self._relay, name="fuse-relay", daemon=True).start()
        threading.Thread(target=self._notify, name="fuse-notify", daemon=True).start()
        for _ in range(REPLIERS):
            threading.Thread(target=self._write_answers, name="fuse-replier",
                             daemon=True).start()
        with self.lock:
            for _ in range(FIRST_WORKERS):
                self._spawn()

    def wait_unmounted(self) -> None:
        """Block until the mount is gone (fusermount3 -u, umount), for the daemon to end."""
        self.unmounted.wait()

    def drain(self, timeout: float) -> None:
        """Take no more requests, and wait up to TIMEOUT s for pyfuse3 to answer those it
        has: the connection passes to another server (keeper.py), to which the kernel
        sends again whatever is left unanswered here."""
        core.drain()
        deadline = time.monotonic() + timeout
        while self.to_pyfuse3 and time.monotonic() < deadline:
            time.sleep(0.005)
        if self.to_pyfuse3:
            log.warning("handing over with %d requests unanswered: the next server gets "
                        "them again", len(self.to_pyfuse3))

    def unmount(self) -> None:
        """Detach the mount, unless it is gone already (what is mounted there now, if
        anything, is someone else's)."""
        if not self.unmounted.is_set():
            unmount(self.mountpoint)
        self.unmounted.set()

    # -- workers ----------------------------------------------------------------------
    def _spawn(self) -> None:
        self.workers += 1
        threading.Thread(target=self._work, name="fuse-worker", daemon=True).start()

    def _work(self) -> None:
        """Wait for a forwarded request and answer it; one that may block (a kernel read
        of a dumper not known to be quick) is answered once another worker waits, so
        no request waits behind a slow one. Workers wait in recv() together: the
        socket gives each request to one of them."""
        # mapped, not a bytearray: its pages are touched only as requests fill them,
        # where zeroing 1 MiB for every worker a burst of opens starts was a quarter
        # of the daemon's page faults
        buf = mmap.mmap(-1, BUFSIZE)
        mv = memoryview(buf)
        while True:
            with self.lock:
                if self.waiting >= MAX_WAITING or self.unmounted.is_set():
                    self.workers -= 1
                    return
                self.waiting += 1
            try:
                n = self.forwarded.recv_into(buf)
            except OSError as e:
                log.error("reading the data plane's requests: %s", e)
                n = 0
            with self.lock:
                self.waiting -= 1
            if not n:  # C shut its end down: the mount is gone
                self.unmounted.set()
                continue
            head = InHeader._make(IN_HEADER.unpack_from(mv))
            if self.debug:
                _log_request(head, n)
            # releases, passing requests on and quick reads never wait long, and a read
            # of a file read ahead is left for its producer to answer
            if self._dispatch(mv, n, head, wait=False):
                continue
            with self.lock:
                if not self.waiting and self.workers < self.max_workers:
                    self._spawn()
            self._dispatch(mv, n, head, wait=True)

    def _dispatch(self, mv: memoryview, n: int, head: InHeader, wait: bool) -> bool:
        """Answer the request, or pass it on to pyfuse3. Unless WAIT, a read that may
        wait long is parked with its producer, or else left (returning False, having
        done nothing) for a worker that may wait."""
        opcode, unique = head.opcode, head.unique
        try:
            if opcode == FUSE_READ:
                fh, offset, size = READ_IN.unpack_from(mv, BODY)
                out = self.ops.read_handle(fh, offset, size, None if wait else self._answer,
                                           unique, (head.nodeid, head.uid, head.pid))
                if out is ReadLater.MAY_WAIT:
                    return False
                if out is not ReadLater.PARKED:
                    self._reply(unique, *out)
                return True
            if opcode == FUSE_RELEASE:
                self.ops.release_handle(FH_IN.unpack_from(mv, BODY)[0])
                self._reply(unique)
                return True
            if opcode == FUSE_GETXATTR:
                name = bytes(mv[BODY + GETXATTR_IN.size:n]).split(b"\0", 1)[0]
                err = self.ops.xattr_refusal(name)
                if err:
                    self._reply_error(unique, err)
                    return True
            if opcode == FUSE_INIT:
                self._saw_init(mv, head)
            if opcode == FUSE_INTERRUPT:
                # Nothing here can stop a kernel read midway, and pyfuse3's handlers do
                # not look: the interrupted request completes (or the kernel drops it).
                return True
        except pyfuse3.FUSEError as e:
            self._reply_error(unique, e.errno)
            return True
        except Exception:  # a bug must fail this request, not the mount
            log.exception("FUSE request %d failed; answering EIO", opcode)
            self._reply_error(unique, errno.EIO)
            return True
        if opcode not in NO_REPLY:
            self.to_pyfuse3.add(unique)
        if opcode == FUSE_OPEN:
            self.opens.add(unique)
        try:
            self.ours.sendall(mv[:n])
        except OSError as e:
            log.error("passing a FUSE request to pyfuse3: %s", e)
            self._reply_error(unique, errno.EIO)
        return True

    # -- FUSE over io_uring (core.c) ---------------------------------------------------------
    def _saw_init(self, mv: memoryview, head: InHeader) -> None:
        """Note whether the kernel offers io_uring (the operator set fuse.enable_uring),
        for pyfuse3's INIT reply to ask for it."""
        _, _, _, flags, flags2 = INIT_IN.unpack_from(mv, BODY)
        self.init_unique = head.unique
        self.report({"init": base64.b64encode(mv[:head.len]).decode()})
        self.uring_offered = bool(flags & FUSE_INIT_EXT and flags2 & FUSE_OVER_IO_URING)

    def _init_reply(self, msg: memoryview) -> bytes | memoryview:
        """pyfuse3's INIT reply, asking for io_uring where the kernel offers it, and
        without the writeback cache libfuse asks for by default: nothing is written
        here, and with it the kernel would not heed NOFLUSH (device._open_reply)."""
        self.init_unique = 0
        if len(msg) < OUT_HEADER.size + INIT_OUT.size:
            self.uring_offered = False
            return msg
        out = list(INIT_OUT.unpack_from(msg, OUT_HEADER.size))
        out[3] &= ~FUSE_WRITEBACK_CACHE
        if self.uring_offered:
            out[3] |= FUSE_INIT_EXT
            out[10] |= FUSE_OVER_IO_URING
        patched = bytearray(msg)
        INIT_OUT.pack_into(patched, OUT_HEADER.size, *out)
        return bytes(patched)

    def _start_uring(self, init_reply: bytes | memoryview) -> None:
        """The queues, once the kernel has the INIT reply; every entry's payload holds
        the largest request and reply (max_write, max_pages)."""
        out = INIT_OUT.unpack_from(init_reply, OUT_HEADER.size)
        payload = max(8192, out[6], out[8] * mmap.PAGESIZE, MAX_READ)
        try:
            core.start_uring(payload)
        except OSError as e:
            # the kernel waits for every CPU's queue: one missing would hang readers
            log.error("FUSE over io_uring offered, but %s: unmounting rather than hang "
                      "readers", e)
            self.unmount()
            return
        log.info("serving FUSE requests through io_uring: %d queues (one per CPU)",
                 core.uring_queues())
        self.report({"uring": True})
        threading.Thread(target=self._watch_pressure, name="cpu-pressure", daemon=True).start()

    def _watch_pressure(self) -> None:
        """Keep the queues' threads in SCHED_IDLE while the CPUs are calm, so that the
        scheduler leaves a reader on its CPU (core.c: core_uring_idle_class), and in the
        normal class as soon as tasks wait for CPUs (the kernel's pressure stall
        information): there SCHED_IDLE would starve the queues. An idle machine still
        shows stalls of a few ms now and then, so calm is judged over PRESSURE_CALM
        seconds, busy over one look or the last second. Without PSI they stay in the
        normal class."""
        if not _may_leave_sched_idle():
            log.info("FUSE over io_uring: the queues stay in the normal class (leaving "
                     "SCHED_IDLE would need CAP_SYS_NICE or RLIMIT_NICE 20)")
            return
        try:
            f = open("/proc/pressure/cpu", "rb", buffering=0)
        except OSError:
            return
        with f:
            looks = round(PRESSURE_CALM / PRESSURE_EVERY)
            shares: collections.deque[float] = collections.deque(maxlen=looks)
            idle = False
            last, t_last = _stalled(f), time.monotonic()
            while not self.unmounted.wait(PRESSURE_EVERY):
                total, now = _stalled(f), time.monotonic()
                shares.append((total - last) / 1e6 / max(now - t_last, 1e-3))
                last, t_last = total, now
                recent = list(shares)[-round(1 / PRESSURE_EVERY):]
                busy = shares[-1] > PRESSURE_SPIKE or sum(recent) / len(recent) > PRESSURE_BUSY
                calm = len(shares) == looks and sum(shares) / looks < PRESSURE_BUSY
                if idle and busy or not idle and calm:
                    idle = not idle
                    core.uring_idle_class(idle)

    def _answer(self, unique: int, result: list | int) -> None:
        """The reply to a parked read (its pieces, or an errno), written by a replier:
        copying a 1 MiB reply would hold up the producer's next kernel read."""
        self.answers.put((unique, result))

    def _write_answers(self) -> None:
        while True:
            unique, result = self.answers.get()
            if isinstance(result, int):
                self._reply_error(unique, result)
            else:
                self._reply(unique, *result)

    def _reply(self, unique: int, *pieces) -> None:
        size = OUT_HEADER.size + sum(map(len, pieces))
        self._write([OUT_HEADER.pack(size, 0, unique), *pieces])

    def _reply_error(self, unique: int, err: int) -> None:
        self._write([OUT_HEADER.pack(OUT_HEADER.size, -err, unique)])

    def _write(self, parts: list) -> None:
        if self.debug:
            _log_reply(parts)
        try:
            if core.uring_queues():
                core.reply(parts)  # to the ring entry of its request, if it came so
            else:
                os.writev(self.fd, parts)
        except OSError as e:
            # ENOENT: the request was interrupted (its reader died); ENODEV: unmounted
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("writing to /dev/fuse: %s", e)

    # -- pyfuse3's side -------------------------------------------------------------------
    def _relay(self) -> None:
        """pyfuse3's replies to the kernel; its notifications to the notify thread, since
        the kernel may hold one (an entry invalidation waits for the directory's lock)
        until a reply queued behind it is written."""
        buf = bytearray(BUFSIZE)
        mv = memoryview(buf)
        while True:
            try:
                n = self.ours.recv_into(buf)
            except OSError:
                n = 0
            if not n:  # pyfuse3 closed its session
                self.notices.put(None)
                return
            unique = UNIQUE.unpack_from(mv, 8)[0]
            self.to_pyfuse3.discard(unique)
            if unique == 0:
                self.notices.put(bytes(mv[:n]))
            elif unique == self.init_unique:
                msg = self._init_reply(mv[:n])
                if not self.init_replayed:
                    self._write([msg])
                if self.uring_offered:
                    self._start_uring(msg)
            elif unique in self.opens:
                self.opens.discard(unique)
                self._write([_open_reply(mv[:n])])
            else:
                self._write([mv[:n]])

    def _notify(self) -> None:
        while (msg := self.notices.get()) is not None:
            self._write([msg])


def _open_reply(msg: memoryview) -> bytes | memoryview:
    """pyfuse3's OPEN reply with every flag of OPEN_FLAGS, as C gives them: pyfuse3 has
    no NOFLUSH, and without it every close() would wait for a FLUSH -- for as long as
    no server runs, while one takes over (keeper.py)."""
    if len(msg) < OUT_HEADER.size + OPEN_OUT.size or OUT_HEADER.unpack_from(msg)[1]:
        return msg
    fh, flags = OPEN_OUT.unpack_from(msg, OUT_HEADER.size)
    patched = bytearray(msg)
    OPEN_OUT.pack_into(patched, OUT_HEADER.size, fh, flags | OPEN_FLAGS)
    return bytes(patched)


def _may_leave_sched_idle() -> bool:
    """Whether the daemon may move a thread out of SCHED_IDLE again (the kernel's
    can_nice(): CAP_SYS_NICE, or an RLIMIT_NICE that allows nice 0)."""
    return bool(libc.capget()[0] >> CAP_SYS_NICE & 1) \
        or resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20


def _stalled(f) -> int:
    """us some task waited for a CPU, in all (the "some" line of /proc/pressure/cpu)."""
    f.seek(0)
    line = f.readline()
    return int(line.rsplit(b"total=", 1)[1])


def _log_request(head: InHeader, n: int) -> None:
    log.debug("unique: %d, opcode: %s (%d), nodeid: %d, insize: %d, pid: %d", head.unique,
              OPCODES.get(head.opcode, "UNKNOWN"), head.opcode, head.nodeid, n, head.pid)


def _log_reply(parts: list) -> None:
    size, err, unique = OUT_HEADER.unpack_from(parts[0])
    if not unique:
        log.debug("   notify: code %d, size: %d", err, size)
    elif err:
        log.debug("   unique: %d, error: %d (%s), outsize: %d", unique, err,
                  os.strerror(-err), size)
    else:
        log.debug("   unique: %d, success, outsize: %d", unique, size)
