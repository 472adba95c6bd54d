"""Create a seq_file in the reader's namespaces, not the daemon's.

The kernel scopes what an iterator shows to the task that creates the seq_file:
network targets to its network namespace, task targets to its pid namespace.
The daemon creates every seq_file, so without this a reader in a container
would see the host.

- Network: one thread per network namespace setns()es into it and then does
  nothing but BPF_ITER_CREATE for readers of that namespace. setns(CLONE_NEWNET)
  changes only the calling thread, so no other work can ever run there. A thread
  idle for NET_IDLE seconds ends (it keeps its namespace alive while it lives).
- Pid: setns(CLONE_NEWPID) does not move the caller, only its future children,
  so a helper process (`python -I -m bpfdumpfs.nshelper`, de-privileged and
  chrooted: see there) forks a short-lived child into the namespace for each
  seq_file. It receives the link fd over a unix socket (SCM_RIGHTS) and sends
  the seq_file back. A helper ends after nshelper.IDLE seconds without a
  request; at most MAX_PID_HELPERS run at once (MAX_PER_UID started for one
  user's readers, likewise network threads), each answers within
  HELPER_DEADLINE seconds or is killed (its open fails with EAGAIN), and at most
  MAX_PENDING opens wait for one.
"""
from __future__ import annotations

import array
import errno
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass

import trio

from . import libc
from .dumpers import Dumper
from .errors import DumperError
from .nshelper import IDLE

log = logging.getLogger(__name__)

NET_TARGETS = frozenset({"tcp", "udp", "unix", "netlink", "ipv6_route"})
PID_TARGETS = frozenset({"task", "task_file", "task_vma"})
NET_IDLE = 30.0
MAX_NET_THREADS = 64   # namespaces with a thread at once; beyond, opens there get EAGAIN
MAX_PID_HELPERS = 64   # helper processes at once, likewise
MAX_PER_UID = 16       # of each, started for one user's readers
MAX_PENDING = 16       # opens waiting for one helper
HELPER_DEADLINE = 5.0  # seconds a helper has to answer before it is killed
# opens waiting for another namespace, all told: each holds one of pyfuse3's 64 tasks,
# and the rest must stay free for lookups, listings and host readers (mount.py)
MAX_WAITING = 32
CLONE_NEWNET, CLONE_NEWPID = 0x40000000, 0x20000000

def kind_of(target: str) -> str | None:
    """'net' or 'pid' for targets the kernel scopes to a namespace, else None."""
    return "net" if target in NET_TARGETS else "pid" if target in PID_TARGETS else None


def ns_name(pid: int | str, kind: str) -> str:
    """The namespace of KIND of PID, as the kernel names it ("net:[4026531840]"):
    reading the link costs a third of a stat of it, and names the same inode."""
    return os.readlink(f"/proc/{pid}/ns/{kind}")


@dataclass
class _Job:
    dumper: Dumper
    token: trio.lowlevel.TrioToken
    done: trio.Event
    fd: int = -1
    error: DumperError | None = None


class _NetThread:
    """A thread living in one network namespace, creating seq_files there."""

    def __init__(self, ns_fd: int, ino: int, on_exit, owner: int) -> None:
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.ino = ino
        self.owner = owner  # the uid whose reader started it
        self.ready = threading.Event()
        self.failed: OSError | None = None
        self.on_exit = on_exit
        self.thread = threading.Thread(target=self._run, args=(ns_fd,), daemon=True,
                                       name=f"netns-{ino}")
        self.thread.start()
        self.ready.wait()
        if self.failed:
            raise self.failed

    def _run(self, ns_fd: int) -> None:
        try:
            libc.setns(ns_fd, CLONE_NEWNET)
        except OSError as e:
            self.failed = e
            self.ready.set()
            return
        finally:
            os.close(ns_fd)
        self.ready.set()
        while True:
            try:
                job = self.jobs.get(timeout=NET_IDLE)
            except queue.Empty:
                job = None
            if job is None:
                self.on_exit(self)
                # a job queued after on_exit still gets an answer, in this namespace
                while True:
                    try:
                        late = self.jobs.get_nowait()
                    except queue.Empty:
                        return
                    if late is not None:
                        self._do(late)
            self._do(job)

    def _do(self, job: _Job) -> None:
        try:
            job.fd = job.dumper.open_fd()
        except DumperError as e:
            job.error = e
        job.token.run_sync_soon(job.done.set)


def _room(running, owner: int, dumper: Dumper, what: str, limit: int) -> None:
    """DumperError(EAGAIN) unless one more of RUNNING (helpers or threads) may start for a
    reader of uid OWNER: LIMIT in all, MAX_PER_UID for one user's readers."""
    running = list(running)
    mine = sum(r.owner == owner for r in running)
    if len(running) >= limit or mine >= MAX_PER_UID:
        raise DumperError(errno.EAGAIN, f"opening dumper {dumper.label}: {len(running)} {what} "
                          f"run, {mine} of them for uid {owner}",
                          f"retry later (at most {limit}, {MAX_PER_UID} a user)")


class _PidHelper:
    """`python -I -m bpfdumpfs.nshelper` for one pid namespace."""

    def __init__(self, ns_fd: int, ino: int, owner: int) -> None:
        self.owner = owner  # the uid whose reader started it
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # isolated (-I) and from /: nothing on the import path that another user wrote
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-m", "bpfdumpfs.nshelper", str(ns_fd),
                 str(theirs.fileno())],
                pass_fds=(ns_fd, theirs.fileno()), stdin=subprocess.DEVNULL, cwd="/",
                env={})  # nothing of the daemon's environment for whoever reads its own
        finally:
            theirs.close()
            os.close(ns_fd)
        self.ino = ino
        self.sock = trio.socket.from_stdlib_socket(ours)
        self.lock = trio.Lock()
        self.pending = 0

    async def open_fd(self, dumper: Dumper) -> int:
        if self.pending >= MAX_PENDING:
            raise DumperError(errno.EAGAIN, f"opening dumper {dumper.label} in pid namespace "
                              f"{self.ino}: {self.pending} opens wait there already",
                              "retry later")
        self.pending += 1
        try:
            with trio.fail_after(HELPER_DEADLINE):
                async with self.lock:
                    await self.sock.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                      array.array("i", [dumper.fd]))])
                    msg, anc, _flags, _addr = await self.sock.recvmsg(64, socket.CMSG_SPACE(4))
        except trio.TooSlowError:
            self.proc.kill()  # a helper that does not answer serves nobody again
            self.proc.wait(timeout=1)  # SIGKILL: gone in a moment, and then forgotten
            raise DumperError(errno.EAGAIN, f"opening dumper {dumper.label} in pid namespace "
                              f"{self.ino}: its helper did not answer within "
                              f"{HELPER_DEADLINE:g} s", "retry: a new helper serves the next "
                              "open (a host this busy answers late)") from None
        finally:
            self.pending -= 1
        if not msg:
            raise ConnectionError("namespace helper exited")
        if msg[:1] == b"e":
            raise DumperError(int(msg[1:]), f"opening dumper {dumper.label} in pid "
                              f"namespace {self.ino}")
        fds = array.array("i")
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        if len(fds) != 1:
            raise ConnectionError("namespace helper sent no fd")
        return fds[0]

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Namespaces:
    """Opens seq_files in a reader's network or pid namespace."""

    def __init__(self) -> None:
        self.mine = {"net": ns_name("self", "net"), "pid": ns_name("self", "pid")}
        self.net: dict[int, _NetThread] = {}
        self.pid: dict[int, _PidHelper] = {}
        self.waiting = 0  # opens waiting for a helper or a thread now (trio's thread only)
        self.lock = threading.Lock()  # net threads remove themselves from another thread

    def at_home(self, kind: str, reader_pid: int) -> bool:
        """Whether READER_PID is in the daemon's namespace of KIND (False if unknown)."""
        try:
            return reader_pid > 0 and ns_name(reader_pid, kind) == self.mine[kind]
        except OSError:
            return False

    def foreign(self, kind: str, reader_pid: int) -> tuple[int, int] | None:
        """(ns fd, ns inode) of READER_PID's namespace of KIND if it is not the daemon's.

        Raises DumperError(EACCES) when the reader cannot be seen from the daemon
        (pid 0 in the request, or already gone): its namespace is unknown, and
        the daemon's own view must not leak to it."""
        if reader_pid <= 0:
            raise DumperError(errno.EACCES, "the reader's pid is not visible to the daemon, "
                              "so its namespace is unknown",
                              "share the pid namespace with the daemon (podman --pid "
                              "container:SIDECAR, Kubernetes shareProcessNamespace), or "
                              "set the dumper's view to daemon")
        if self.at_home(kind, reader_pid):
            return None
        path = f"/proc/{reader_pid}/ns/{kind}"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise DumperError(errno.EACCES, f"reading the {kind} namespace of reader pid "
                              f"{reader_pid}", e.strerror or str(e)) from None
        return fd, os.fstat(fd).st_ino

    async def open_fd(self, dumper: Dumper, target: str, reader_pid: int, owner: int) -> int:
        """A seq_file of DUMPER (of TARGET) as READER_PID would create it itself; OWNER,
        the reader's uid as FUSE gives it, is whose share a new helper or thread spends."""
        kind = kind_of(target)
        found = self.foreign(kind, reader_pid) if kind else None
        if found is None:
            return dumper.open_fd()
        ns_fd, ino = found
        if self.waiting >= MAX_WAITING:
            os.close(ns_fd)
            raise DumperError(errno.EAGAIN, f"opening dumper {dumper.label}: {self.waiting} "
                              "opens wait for other namespaces already", "retry later")
        # the open now waits for another thread or process, and the caller's dumper may
        # be closed meanwhile (a cached one, when its pin changes): use a handle of our own
        self.waiting += 1
        try:
            with dumper.dup() as mine:
                if kind == "net":
                    return await self._in_net(ns_fd, ino, mine, owner)
                return await self._in_pid(ns_fd, ino, mine, owner)
        finally:
            self.waiting -= 1

    async def _in_net(self, ns_fd: int, ino: int, dumper: Dumper, owner: int) -> int:
        with self.lock:
            t = self.net.get(ino)
            if t is None:
                try:
                    _room(self.net.values(), owner, dumper, "network namespace threads",
                          MAX_NET_THREADS)
                except DumperError:
                    os.close(ns_fd)
                    raise
                try:
                    t = self.net[ino] = _NetThread(ns_fd, ino, self._net_gone, owner)
                except OSError as e:
                    raise DumperError(e.errno, f"entering network namespace {ino}") from None
            else:
                os.close(ns_fd)
            job = _Job(dumper, trio.lowlevel.current_trio_token(), trio.Event())
            t.jobs.put(job)
        await job.done.wait()
        if job.error:
            raise job.error
        return job.fd

    def _net_gone(self, t: _NetThread) -> None:
        with self.lock:
            if self.net.get(t.ino) is t:
                del self.net[t.ino]

    async def _in_pid(self, ns_fd: int, ino: int, dumper: Dumper, owner: int) -> int:
        """A seq_file from the namespace's helper. A helper found gone (ended when idle;
        its namespace's inode number may since name a new namespace) is replaced once:
        the first open in a namespace never fails for an earlier one's helper."""
        self._reap()
        try:
            for attempt in (1, 2):
                helper = self.pid.get(ino)
                if helper is None:
                    _room(self.pid.values(), owner, dumper, "pid namespace helpers",
                          MAX_PID_HELPERS)
                    helper = self.pid[ino] = _PidHelper(os.dup(ns_fd), ino, owner)
                try:
                    return await helper.open_fd(dumper)
                except (ConnectionError, OSError) as e:
                    if isinstance(e, DumperError):
                        if e.errno == errno.EAGAIN and helper.proc.poll() is not None:
                            self._forget(ino, helper)  # killed at its deadline
                        raise
                    self._forget(ino, helper)
                    if attempt == 2:
                        raise DumperError(errno.ESRCH, f"opening dumper {dumper.label} in pid "
                                          f"namespace {ino}", f"its helper failed: {e}"
                                          ) from None
            raise AssertionError("not reached: the second attempt returns or raises")
        finally:
            os.close(ns_fd)

    def _forget(self, ino: int, helper: _PidHelper) -> None:
        if self.pid.get(ino) is helper:
            del self.pid[ino]
        helper.close()

    def counts(self) -> tuple[int, int]:
        """(pid-namespace helpers, network-namespace threads) running now."""
        self._reap()
        return len(self.pid), len(self.net)

    async def reap_idle(self) -> None:
        """Collect helpers that ended idle, every IDLE seconds, until cancelled: neither
        a zombie nor its socket outlives a quiet namespace for long."""
        while True:
            await trio.sleep(IDLE)
            self._reap()

    def _reap(self) -> None:
        """Forget helpers that ended (idle), and collect their exit status."""
        for ino, h in list(self.pid.items()):
            if h.proc.poll() is not None:
                del self.pid[ino]
                h.close()

    def close(self) -> None:
        with self.lock:
            for t in list(self.net.values()):
                t.jobs.put(None)
        for h in list(self.pid.values()):
            h.close()
        self.pid.clear()
