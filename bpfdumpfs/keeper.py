"""The keeper of a mount's FUSE connection, and the servers it starts.

    bpfdumpfs mount MNT     the keeper: mounts MNT, or takes it over, and holds its
      |                     connection (/dev/fuse) and its control socket
      +- server             serves the tree (mount.serve): pyfuse3 and the data plane

The dumpers are pins in bpffs and a file's node id is its pin's (inodes.py), so a new
server knows all that the one before knew but the files it had open, and those it
makes again when their readers come back (files.OpenFiles.open). So the mount need
never go dead:

- a server that dies (kill -9, a crash) leaves the connection with the keeper, which
  has the kernel send again what the server had taken and not answered
  (FUSE_NOTIFY_RESEND, Linux 6.9) and starts another at once: readers wait a moment;
- `bpfdumpfs mount MNT` while a keeper holds MNT takes the mount over through that
  keeper's control socket (an upgrade): the old server stops taking requests, answers
  those it has and exits, the connection and the kernel's INIT request pass over
  (SCM_RIGHTS), and the old keeper exits; no unmount, no new mount;
- under systemd the connection is also left in the service manager's fd store
  (FDSTORE=1), so that a restart of the unit takes it back.

The server is the only one that unmounts nothing: the keeper decides. A server is told
to go with SIGTERM (it drains: core.drain) and dies with its keeper (PR_SET_PDEATHSIG).
The keeper is one thread and holds nothing but the connection; whatever could crash
runs in the server.
"""
from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import select
import selectors
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from .device import unmount
from .errors import DumperError

log = logging.getLogger(__name__)

CONTROL_DIR = "/run/bpfdumpfs"   # the keepers' control sockets, root's only
FUSE_NOTIFY_RESEND = 7           # include/uapi/linux/fuse.h
OUT_HEADER = struct.Struct("<IiQ")
RESPAWNS = 5   # servers in a row that die before they serve: the keeper gives up
DRAIN = 2.0                      # s a leaving server waits for pyfuse3's answers
LEAVE_WAIT = DRAIN + 3.0         # s the keeper waits for a leaving server, then SIGKILL
HANDOVER_WAIT = LEAVE_WAIT + 5.0  # s a new keeper waits for the connection
PR_SET_PDEATHSIG = 1
FD_NAME, STATE_NAME = "fuse", "fuse-state"   # in the systemd fd store
MSG_MAX = 1 << 16


@dataclass
class Connection:
    """A mount's FUSE connection and what a server needs to serve it."""
    fd: int
    init: bytes | None = None   # the kernel's INIT request, once a server saw it
    generation: int = 0         # the server's (inodes.fh_base)

    def state(self) -> bytes:
        return json.dumps({"init": base64.b64encode(self.init).decode() if self.init
                           else None, "generation": self.generation}).encode()

    @classmethod
    def from_state(cls, fd: int, data: bytes) -> Connection:
        """The connection FD with DATA (state()) of the keeper before: its next server."""
        d = json.loads(data)
        init = base64.b64decode(d["init"]) if d.get("init") else None
        return cls(fd, init, int(d.get("generation", 0)) + 1)

    def alive(self) -> bool:
        """Whether the connection still serves a mount (not unmounted, not aborted)."""
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        return not any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL)
                       for _, ev in p.poll(0))

    def resend(self) -> None:
        """Have the kernel send again the requests a server took and did not answer."""
        try:
            os.write(self.fd, OUT_HEADER.pack(OUT_HEADER.size, FUSE_NOTIFY_RESEND, 0))
        except OSError as e:
            # before Linux 6.9: those readers wait until the mount goes
            log.error("FUSE_NOTIFY_RESEND: %s; requests the server before had taken are "
                      "lost (it needs Linux 6.9)", e)


def control_path(mountpoint: str) -> str:
    """The control socket of the keeper of MOUNTPOINT (an absolute path)."""
    digest = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:32]
    return os.path.join(CONTROL_DIR, f"{digest}.sock")


def _peer_is_root(s: socket.socket) -> bool:
    creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1] == 0


def take_over(mountpoint: str, state_dir: str) -> Connection | None:
    """The connection of MOUNTPOINT from the keeper holding it, which then leaves, with
    what its server left unanswered sent again; None if no keeper holds it. Refused
    unless it serves STATE_DIR too."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with s:
        try:
            s.connect(control_path(mountpoint))
        except FileNotFoundError:
            return None
        except ConnectionRefusedError:
            # a killed keeper's (a live one listens before its socket is in place)
            with contextlib.suppress(OSError):
                os.unlink(control_path(mountpoint))
            return None
        if not _peer_is_root(s):
            # planted where others may write (a volume shared with an app): not a keeper
            log.warning("ignoring %s: the process listening there is not root's",
                        control_path(mountpoint))
            return None
        s.settimeout(HANDOVER_WAIT)
        s.send(json.dumps({"op": "takeover", "pid": os.getpid(),
                           "state_dir": state_dir}).encode())
        try:
            msg, fds, _, _ = socket.recv_fds(s, MSG_MAX, 1)
        except OSError as e:
            raise DumperError(e.errno or errno.EIO, f"taking {mountpoint} over from its "
                              f"keeper: {e}", "see the log of the daemon serving it") from None
    if not fds:
        answer = json.loads(msg or b"{}")
        if answer.get("uring"):
            raise DumperError(errno.EBUSY, f"{mountpoint} is served over io_uring, which "
                              "cannot be handed over", f"stop its daemon first (fusermount3 "
                              f"-u {mountpoint}), then mount")
        served = answer.get("state_dir")
        if served and served != state_dir:
            raise DumperError(errno.EBUSY, f"{mountpoint} is already a live FUSE mount, "
                              f"served from {served}", f"unmount it first (fusermount3 -u "
                              f"{mountpoint}), or take it over with --state-dir {served}")
        raise DumperError(errno.EIO, f"the keeper of {mountpoint} did not hand it over",
                          "see the log of the daemon serving it")
    conn = Connection.from_state(fds[0], msg)
    conn.resend()  # what the server before left unanswered
    log.info("took %s over from its keeper (server generation %d)", mountpoint,
             conn.generation)
    return conn


def from_fd_store() -> tuple[Connection, int] | None:
    """The connection systemd kept in its fd store for this service (what a server had
    taken sent again), and the memfd its state is kept in; None if none was passed
    (sd_listen_fds)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(os.environ.get("LISTEN_FDS", "0"))
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    fds = {names[i] if i < len(names) else "": 3 + i for i in range(count)}
    for fd in fds.values():
        os.set_inheritable(fd, False)
    fd, state_fd = fds.pop(FD_NAME, -1), fds.pop(STATE_NAME, -1)
    for other in fds.values():
        os.close(other)
    if fd < 0 or state_fd < 0:
        for other in (fd, state_fd):
            if other >= 0:
                os.close(other)
        return None
    conn = Connection.from_state(fd, os.pread(state_fd, MSG_MAX, 0) or b"{}")
    if not conn.alive():
        os.close(fd)
        os.close(state_fd)
        return None
    conn.resend()
    log.info("took the connection over from the service manager's fd store (server "
             "generation %d)", conn.generation)
    return conn, state_fd


def systemd_restarting(unit: str, jobs: str) -> bool:
    """Whether `systemctl list-jobs --plain --no-legend` output JOBS has UNIT being
    restarted (or started again), rather than stopped."""
    for line in jobs.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == unit and fields[2] != "stop":
            return True
    return False


def _own_unit() -> str | None:
    """The systemd service this process runs in, from its cgroup."""
    try:
        with open("/proc/self/cgroup") as f:
            path = f.read().strip().rsplit(":", 1)[-1]
    except OSError:
        return None
    unit = path.rstrip("/").rsplit("/", 1)[-1]
    return unit if unit.endswith(".service") else None


class Keeper:
    """Hold CONN for MOUNTPOINT, and keep a server serving it (SERVE, in a child
    process) until the mount goes, the keeper is stopped, or another takes over."""

    def __init__(self, mountpoint: str, state_dir: str, conn: Connection,
                 serve: Callable[[Connection, socket.socket], None],
                 ready: Callable[[], None], notify: Callable[..., None],
                 state_fd: int = -1, private_fds: tuple[int, ...] = ()) -> None:
        self.mountpoint = mountpoint
        self.state_dir = state_dir
        self.conn = conn
        self.serve = serve
        self.ready = ready
        self.notify = notify            # sd_notify(message, fds=())
        self.state_fd = state_fd        # the memfd kept in systemd's fd store, -1 if none
        self.private_fds = private_fds  # the keeper's own until READY(), not servers'
        self.server = 0                 # its pid; 0 while none runs
        self.pidfd = -1
        self.link: socket.socket | None = None
        self.was_ready = False
        self.failures = 0               # servers in a row that died before they served
        # FUSE over io_uring: what a server's rings held is not sent again (its requests
        # fail ECANCELED), and requests queued for them may wait for good after it: such
        # a mount is neither handed over nor served on after its server died
        self.uring = False
        self.leaving: str | None = None   # why the server was told to go: stop, leave, handover
        self.successor: socket.socket | None = None
        self.left_at = 0.0
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_w.setblocking(False)
        self.listener = self._listen()

    # -- set-up ---------------------------------------------------------------------
    def _listen(self) -> socket.socket:
        """The control socket, put in place atomically over one a keeper before left."""
        os.makedirs(CONTROL_DIR, mode=0o700, exist_ok=True)
        path = control_path(self.mountpoint)
        tmp = f"{path}.{os.getpid()}"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        s.bind(tmp)
        os.chmod(tmp, 0o600)
        s.listen(4)
        os.rename(tmp, path)
        self.bound_ino = os.stat(path).st_ino  # to remove it later only if still ours
        return s

    def _store(self) -> None:
        """Leave the connection with systemd too (its fd store), with what a server
        needs to serve it: a keeper started by a restart of the unit takes it back."""
        if not os.environ.get("FDSTORE") or not os.environ.get("NOTIFY_SOCKET"):
            return
        if self.state_fd < 0:
            self.state_fd = os.memfd_create("bpfdumpfs-fuse-state", os.MFD_CLOEXEC)
            self.notify(f"FDSTORE=1\nFDNAME={FD_NAME}", [self.conn.fd])
            self.notify(f"FDSTORE=1\nFDNAME={STATE_NAME}", [self.state_fd])
        self._save_state()

    def _save_state(self) -> None:
        """The connection's state (Connection.state) into the fd store's memfd, if any."""
        if self.state_fd >= 0:
            os.ftruncate(self.state_fd, 0)
            os.pwrite(self.state_fd, self.conn.state(), 0)

    # -- the loop -------------------------------------------------------------------
    def run(self) -> int:
        """Serve until the mount goes or the keeper is stopped; the exit status."""
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self._on_signal)
        self.selector.register(self.listener, selectors.EVENT_READ, self._on_control)
        self._store()
        self._spawn()
        while True:
            timeout = None
            if self.leaving and self.server:
                timeout = max(0.0, self.left_at + LEAVE_WAIT - time.monotonic())
            events = self.selector.select(timeout)
            if not events and self.leaving and self.server:
                log.warning("server %d did not leave in %g s: killing it", self.server,
                            LEAVE_WAIT)
                os.kill(self.server, signal.SIGKILL)
            for key, _ in events:
                key.data()
            if not self.server:
                code = self._after_server()
                if code is not None:
                    return code

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        keeper = os.getpid()
        pid = os.fork()
        if pid == 0:  # the server
            code = 1
            try:
                ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() != keeper:  # it died meanwhile
                    os._exit(1)
                if not self.was_ready:  # READY() closes them in the keeper
                    for fd in self.private_fds:
                        os.close(fd)
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                for s in (ours, self.listener, self.wake_r, self.wake_w):
                    s.close()
                self.selector.close()
                self.serve(self.conn, theirs)
                code = 0
            except BaseException:
                log.exception("the server failed")
            finally:
                logging.shutdown()
                os._exit(code)
        theirs.close()
        self.server, self.link = pid, ours
        self.pidfd = os.pidfd_open(pid)
        self.selector.register(self.pidfd, selectors.EVENT_READ, self._on_exit)
        self.selector.register(ours, selectors.EVENT_READ, self._on_message)
        log.info("server %d started (generation %d)", pid, self.conn.generation)

    def _on_message(self) -> None:
        """What the server tells: the kernel's INIT request, that it serves."""
        assert self.link is not None
        try:
            msg = self.link.recv(MSG_MAX)
        except OSError:
            msg = b""
        if not msg:
            self.selector.unregister(self.link)
            self.link.close()
            self.link = None
            return
        d = json.loads(msg)
        if d.get("uring") and not self.uring:
            self.uring = True
            if self.state_fd >= 0:  # a restart of the unit would not serve it either
                self.notify(f"FDSTOREREMOVE=1\nFDNAME={FD_NAME}")
        if "init" in d:
            self.conn.init = base64.b64decode(d["init"])
            self._save_state()
        if d.get("ready"):
            self.failures = 0
            if not self.was_ready:
                self.was_ready = True
                self.ready()

    def _on_exit(self) -> None:
        _, status = os.waitpid(self.server, 0)
        how = (f"was killed by {signal.Signals(-os.waitstatus_to_exitcode(status)).name}"
               if os.WIFSIGNALED(status) else f"exited {os.waitstatus_to_exitcode(status)}")
        (log.info if self.leaving else log.error)("server %d %s", self.server, how)
        self.selector.unregister(self.pidfd)
        os.close(self.pidfd)
        if self.link is not None:
            self.selector.unregister(self.link)
            self.link.close()
            self.link = None
        self.server = 0

    def _after_server(self) -> int | None:
        """The server is gone: go on with another, or end (the exit status)."""
        alive = self.conn.alive()
        if self.leaving == "handover" and self.successor is not None and alive:
            try:
                socket.send_fds(self.successor, [self.conn.state()], [self.conn.fd])
                log.info("handed %s over", self.mountpoint)
                return 0
            except OSError as e:
                log.error("handing %s over: %s; serving on", self.mountpoint, e)
            self.successor.close()
            self.successor, self.leaving = None, None
        if self.leaving == "leave":
            log.info("left %s in the service manager's fd store", self.mountpoint)
            return 0
        if self.uring and alive and self.leaving != "stop":
            log.error("the server of %s, which served FUSE over io_uring, died: unmounting "
                      "(a mount served over io_uring cannot be served on)", self.mountpoint)
            return self._end(1, alive)
        if self.leaving == "stop" or not alive:
            return self._end(0, alive)
        self.failures += 1
        if self.failures == RESPAWNS:
            log.error("%d servers in a row died before they served: unmounting %s",
                      RESPAWNS, self.mountpoint)
            return self._end(1, alive)
        self.conn.resend()
        self.conn.generation += 1
        self._save_state()
        self._spawn()
        return None

    def _end(self, code: int, alive: bool) -> int:
        """The mount ends (unmounted here if still ALIVE), and so does the keeper, with
        exit status CODE."""
        if alive:
            unmount(self.mountpoint)
        log.info("unmounted %s", self.mountpoint)
        with contextlib.suppress(OSError):
            if os.stat(control_path(self.mountpoint)).st_ino == self.bound_ino:
                os.unlink(control_path(self.mountpoint))
        self.listener.close()
        return code

    def _tell_server_to_go(self, why: str) -> None:
        if not self.leaving:
            self.leaving, self.left_at = why, time.monotonic()
        if self.server:
            os.kill(self.server, signal.SIGTERM)

    def _on_signal(self) -> None:
        for signum in self.wake_r.recv(64):
            if signum == signal.SIGHUP:
                if self.server:
                    os.kill(self.server, signal.SIGHUP)
            elif signum in (signal.SIGTERM, signal.SIGINT):
                unit = _own_unit() if self.state_fd >= 0 else None
                leave = unit is not None and systemd_restarting(unit, _systemctl_jobs())
                log.info("%s: %s", signal.Signals(signum).name,
                         "leaving the mount to the next start of " + str(unit) if leave
                         else "unmounting")
                self.notify("STOPPING=1")
                self._tell_server_to_go("leave" if leave else "stop")

    def _on_control(self) -> None:
        """A new keeper asks for the connection (an upgrade)."""
        c, _ = self.listener.accept()
        try:
            c.settimeout(1.0)
            ask = json.loads(c.recv(MSG_MAX) or b"{}") if _peer_is_root(c) else {}
            ok = ask.get("op") == "takeover" and not self.leaving
            if ok and self.uring:
                log.warning("refused to hand %s over to pid %s: it is served over io_uring",
                            self.mountpoint, ask.get("pid"))
                c.send(json.dumps({"uring": True}).encode())
                ok = False
            elif ok and ask.get("state_dir") != self.state_dir:
                log.warning("refused to hand %s over to pid %s: it would serve %s, not %s",
                            self.mountpoint, ask.get("pid"), ask.get("state_dir"),
                            self.state_dir)
                c.send(json.dumps({"state_dir": self.state_dir}).encode())
                ok = False
        except (OSError, ValueError):
            ok = False
        if not ok:
            c.close()
            return
        c.settimeout(None)
        log.info("a new keeper takes %s over", self.mountpoint)
        self.successor = c
        self._tell_server_to_go("handover")


def _systemctl_jobs() -> str:
    try:
        return subprocess.run(["systemctl", "list-jobs", "--plain", "--no-legend"],
                              capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
