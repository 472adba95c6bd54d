"""The FUSE connection: opens, reads and releases served by a pool of threads,
every other request relayed to pyfuse3.

pyfuse3 runs each request through trio, about 65 us of Python per round trip on
this kind of machine -- and a `cat` of a small dump is four of them (OPEN, READ,
READ at the end, RELEASE), more than lxcfs spends on a whole open. Kernel reads
of a seq_file also block, so in trio they need a thread hand-off each.

So the daemon owns /dev/fuse. It mounts it itself and gives pyfuse3 one end of a
SOCK_SEQPACKET socketpair as its session ("/dev/fd/N": libfuse reads requests
from it and writes replies and notifications to it, one message each). Worker
threads take turns reading /dev/fuse: READ and RELEASE of any open file, and the
OPEN of a dumper whose link is cached, and the getxattrs `ls -l` makes of every
file, they answer at once through the small interface of `Served` (ops.py serves
it, with files.py). A READ
blocks only the worker that took it, and a READ of a file being read ahead that
must wait is left with its producer, which answers it. Everything else (lookups,
listings, first opens, opens in another namespace, changes) goes to pyfuse3
whole, and its answers come back through the relay thread.
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import queue
import socket
import struct
import threading
import time
from typing import NamedTuple, Protocol

import pyfuse3

from . import libc
from .files import OPEN_FLAGS, Answer, ReadLater


class Served(Protocol):
    """What the device's threads ask of the tree: each call answers without waiting on
    trio, may run concurrently with trio and with the others, and fails with
    pyfuse3.FUSEError(errno)."""

    def open_quick(self, inode: int, flags: int, uid: int, pid: int) -> int | None:
        """The fh of an open answered now (its seq_file made by make_quick), or None
        to pass the OPEN to pyfuse3."""

    def make_quick(self, fh: int) -> None:
        """Make what open_quick() promised; called right after the answer is written."""

    def read_handle(self, fh: int, offset: int, size: int, answer: Answer | None = None,
                    tag: int = 0) -> list | ReadLater:
        """The pieces of the reply, or, given ANSWER, a read left to be answered by
        answer(tag, ...) (PARKED) or not made since it may wait (MAY_WAIT)."""

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
OPEN_IN = struct.Struct("<II")            # flags, open_flags
OPEN_OUT = struct.Struct("<QIi")          # fh, open_flags, backing_id
READ_IN = struct.Struct("<QQI")           # fh, offset, size
FH_IN = struct.Struct("<Q")               # fuse_release_in starts with fh
UNIQUE = struct.Struct("<Q")              # at offset 8 of fuse_out_header
BODY = IN_HEADER.size                     # where a request's own struct starts
GETXATTR_IN = struct.Struct("<II")        # size, padding; the name follows
FUSE_OPEN, FUSE_READ, FUSE_RELEASE, FUSE_GETXATTR, FUSE_INTERRUPT = 14, 15, 18, 22, 36
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
BUFSIZE = 256 * 4096 + 4096
FIRST_WORKERS = 2   # workers started with the mount
REPLIERS = 2        # threads writing the answers to parked reads
SPIN = 200e-6       # seconds the leader asks for a next request before it sleeps
MAX_WAITING = 4     # a worker that finds this many others waiting for the lead retires
# a message must fit the socket's buffer whole (a READ reply of .stats, a listing)
SOCKET_BUF = 4 << 20
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # not in Python's socket module

MS_NOSUID, MS_NODEV, MNT_DETACH = 2, 4, 2


class Device:
    """One FUSE mount: /dev/fuse, its worker threads, and the relay to pyfuse3."""

    def __init__(self, ops: Served, mountpoint: str, fsname: str, max_workers: int,
                 debug: bool = False) -> None:
        self.ops = ops
        self.debug = debug  # log every request and reply, in libfuse's debug format
        self.mountpoint = mountpoint
        self.fsname = fsname
        self.max_workers = max_workers
        self.fd = -1
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (self.ours, self.theirs):
            for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF),
                                 (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
                try:
                    s.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUF)
                except PermissionError:
                    # FORCE needs CAP_NET_ADMIN, which the systemd unit does not grant;
                    # up to net.core.[wr]mem_max, which fits pyfuse3's small replies
                    s.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUF)
        self.lock = threading.Lock()
        self.lead = threading.Lock()  # held by the one worker reading /dev/fuse
        self.workers = 0
        self.waiting = 0              # workers waiting for the lead
        self.unmounted = threading.Event()  # the mount is gone: workers stop
        self.notices: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.answers: queue.SimpleQueue[tuple] = queue.SimpleQueue()  # (unique, result)

    def mount(self) -> str:
        """Mount the tree; returns the session path to give pyfuse3.init()."""
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        opts = (f"fd={self.fd},rootmode=40000,user_id=0,group_id=0,allow_other,"
                "default_permissions")
        try:
            libc.mount(self.fsname, self.mountpoint, "fuse.bpfdumpfs", MS_NOSUID | MS_NODEV,
                       opts)
        except OSError:
            os.close(self.fd)
            raise
        # libfuse takes this end over (and closes it at fuse_session_destroy)
        return f"/dev/fd/{self.theirs.detach()}"

    def start(self) -> None:
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

    def unmount(self) -> None:
        """Detach the mount, unless it is gone already (what is mounted there now, if
        anything, is someone else's)."""
        if not self.unmounted.is_set():
            try:
                libc.umount2(self.mountpoint, MNT_DETACH)
            except OSError:
                pass  # gone meanwhile: what matters is that it is not ours any more
        self.unmounted.set()

    # -- workers ----------------------------------------------------------------------
    def _spawn(self) -> None:
        self.workers += 1
        threading.Thread(target=self._work, name="fuse-worker", daemon=True).start()

    def _work(self) -> None:
        """Wait to lead, then lead: read requests and answer them until one may block
        (a kernel read of a dumper not known to be quick), which is answered after
        handing the lead to another worker. So the common requests are answered by
        one thread, with no hand-offs, and no request ever waits behind a slow one."""
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
            self.lead.acquire()
            with self.lock:
                self.waiting -= 1
            while True:
                try:
                    n = self._next_request(buf)
                except OSError as e:
                    if e.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                        continue  # ENOENT: the request was interrupted before we took it
                    if e.errno != errno.ENODEV:
                        log.error("reading /dev/fuse: %s", e)
                    self.unmounted.set()  # ENODEV: unmounted
                    self.lead.release()
                    break
                head = InHeader._make(IN_HEADER.unpack_from(mv))
                if self.debug:
                    _log_request(head, n)
                # opens, releases, passing requests on and quick reads never wait long,
                # and a read of a file read ahead is left for its producer to answer
                if self._dispatch(mv, n, head, wait=False):
                    continue
                with self.lock:
                    if not self.waiting and self.workers < self.max_workers:
                        self._spawn()
                self.lead.release()
                self._dispatch(mv, n, head, wait=True)
                break

    def _next_request(self, buf: mmap.mmap) -> int:
        """The next request, into BUF. For SPIN seconds the leader asks again and again
        rather than sleep: a reader's next request follows its last answer within tens
        of us, and on a VM a vCPU that halts pays a hypervisor exit and an IPI to wake
        (most of a small dump's per-open cost here). Idle longer, it sleeps in a blocking
        read: the fd's O_NONBLOCK is the leader's alone to set, since only the leader
        reads (and poll() would fail with EINVAL where RLIMIT_NOFILE is 0)."""
        deadline = 0.0
        while True:
            try:
                return os.readv(self.fd, [buf])
            except BlockingIOError:
                now = time.perf_counter()
                if not deadline:
                    deadline = now + SPIN
                elif now > deadline:
                    os.set_blocking(self.fd, True)
                    try:
                        return os.readv(self.fd, [buf])
                    finally:
                        os.set_blocking(self.fd, False)

    def _dispatch(self, mv: memoryview, n: int, head: InHeader, wait: bool) -> bool:
        """Answer the request, or pass it on to pyfuse3. Unless WAIT, a read that may
        wait long is parked with its producer, or else left (returning False, having
        done nothing) for a worker that may wait."""
        opcode, unique = head.opcode, head.unique
        try:
            if opcode == FUSE_READ:
                fh, offset, size = READ_IN.unpack_from(mv, BODY)
                out = self.ops.read_handle(fh, offset, size, None if wait else self._answer,
                                           unique)
                if out is ReadLater.MAY_WAIT:
                    return False
                if out is not ReadLater.PARKED:
                    self._reply(unique, *out)
                return True
            if opcode == FUSE_RELEASE:
                self.ops.release_handle(FH_IN.unpack_from(mv, BODY)[0])
                self._reply(unique)
                return True
            if opcode == FUSE_OPEN:
                fh = self.ops.open_quick(head.nodeid, OPEN_IN.unpack_from(mv, BODY)[0],
                                         head.uid, head.pid)
                if fh is not None:
                    # answered first: the seq_file is made while the answer travels
                    self._reply(unique, OPEN_OUT.pack(fh, OPEN_FLAGS, 0))
                    self.ops.make_quick(fh)
                    return True
            if opcode == FUSE_GETXATTR:
                name = bytes(mv[BODY + GETXATTR_IN.size:n]).split(b"\0", 1)[0]
                err = self.ops.xattr_refusal(name)
                if err:
                    self._reply_error(unique, err)
                    return True
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
        try:
            self.ours.sendall(mv[:n])
        except OSError as e:
            log.error("passing a FUSE request to pyfuse3: %s", e)
            self._reply_error(unique, errno.EIO)
        return True

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
            if UNIQUE.unpack_from(mv, 8)[0] == 0:
                self.notices.put(bytes(mv[:n]))
            else:
                self._write([mv[:n]])

    def _notify(self) -> None:
        while (msg := self.notices.get()) is not None:
            self._write([msg])


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
