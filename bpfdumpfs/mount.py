"""The daemon: pin the built-ins, mount the tree (or take it over), and keep it served
until SIGINT/SIGTERM (keeper.py); and the server, which serves it.

The state directory (pins in a bpffs) holds every dumper, so the daemon keeps
nothing that a crash could lose: a server that dies is replaced under the same mount,
and a daemon started after the whole daemon died mounts the same tree again, after
clearing the dead FUSE mount left behind.
"""
from __future__ import annotations

import array
import dataclasses
import errno
import faulthandler
import functools
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass

import pyfuse3
import trio

from . import config, core, keeper, mounts, resources, targets
from .builtins import BuiltinReport, pin_builtins
from .device import Device, unmount
from .device import mount as mount_fuse
from .errors import DumperError
from .keeper import Connection, Keeper
from .limits import Limits
from .metrics import Metrics
from .ops import Operations
from .state import StateDir

log = logging.getLogger(__name__)

DEFAULT_MOUNTPOINT = "/run/bpfdump"
DEFAULT_BACKGROUND_LOG = "/var/log/bpfdumpfs.log"


@dataclass
class MountOptions:
    mountpoint: str = DEFAULT_MOUNTPOINT
    state_dir: str = StateDir().path.as_posix()
    config_dir: str = config.DEFAULT_CONFIG_DIR
    builtins: bool = True
    debug_fuse: bool = False
    log_file: str | None = None  # --background: DEFAULT_BACKGROUND_LOG
    limits: Limits = Limits()


def sd_notify(message: str, fds: list[int] | None = None) -> None:
    """Tell systemd (Type=notify) how the daemon is doing, and give it FDS to keep (the
    fd store); a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    addr = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            # (socket.send_fds would drop the address)
            ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] \
                if fds else []
            s.sendmsg([message.encode()], ancdata, 0, addr)
    except OSError as e:
        log.warning("sd_notify to %s: %s", path, e)


def apply_config(opts: MountOptions, state: StateDir) -> None:
    """Apply the config directory; errors are logged, never fatal to the daemon."""
    try:
        report = config.apply(opts.config_dir, state)
    except DumperError as e:
        log.error("config %s not applied: %s", opts.config_dir, e)
        return
    for line in report.applied:
        log.info("config: %s", line)
    for line in report.errors:
        log.error("config: %s", line)


async def _serve(opts: MountOptions, state: StateDir, ops: Operations,
                 device: Device) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(ops.serve)

        async def on_unmount() -> None:
            await trio.to_thread.run_sync(device.wait_unmounted, abandon_on_cancel=True)
            log.info("%s was unmounted", opts.mountpoint)
            pyfuse3.terminate()
        nursery.start_soon(on_unmount)

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM,
                                           signal.SIGHUP) as signals:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("SIGHUP: applying %s", opts.config_dir)
                        sd_notify("RELOADING=1")
                        await trio.to_thread.run_sync(apply_config, opts, state)
                        sd_notify("READY=1")
                        continue
                    # the keeper unmounts, or hands the mount over
                    log.info("%s: leaving", signal.Signals(signum).name)
                    await trio.to_thread.run_sync(device.drain, keeper.DRAIN)
                    pyfuse3.terminate()
                    return
        nursery.start_soon(on_signals)
        nursery.start_soon(resources.give_back_memory, ops.streaming, core.trim)
        # opens, reads and releases go to the device's threads: few requests wait here
        await pyfuse3.main(min_tasks=1, max_tasks=64)
        ops.shutdown()
        nursery.cancel_scope.cancel()


def serve(opts: MountOptions, state: StateDir, report: BuiltinReport, conn: Connection,
          link: socket.socket) -> None:
    """Serve CONN until the mount goes or the keeper says (keeper.py): the server."""
    def tell(what: dict) -> None:
        try:
            link.send(json.dumps(what).encode())
        except OSError as e:
            log.error("telling the keeper: %s", e)
    ops = Operations(state, list(targets.running_kernel()),
                     Metrics(opts.mountpoint, str(state.path), report.unavailable),
                     opts.limits, conn.generation)
    # a worker per open file at most (each may be inside a kernel read), and some to spare
    device = Device(ops, opts.mountpoint, max_workers=(opts.limits.max_handles or 4096) + 8,
                    debug=opts.debug_fuse, generation=conn.generation)
    try:
        # the device logs every request and reply (--debug-fuse); libfuse would log
        # only the requests passed on to pyfuse3
        pyfuse3.init(ops, device.session(), set())
    except RuntimeError as e:
        raise DumperError(errno.EIO, f"starting FUSE at {opts.mountpoint}: {e}",
                          "is fuse3 (libfuse3) installed?") from None
    try:
        device.start(conn.fd, conn.init, tell)
        log.info("serving %s from %s", opts.mountpoint, state.path)
        tell({"ready": True})
        trio.run(_serve, opts, state, ops, device)
    finally:
        pyfuse3.close(unmount=False)


def _connect(opts: MountOptions, state: StateDir) -> tuple[Connection, int]:
    """The mount's connection: kept by systemd for this service, taken over from the
    keeper holding it, or a new mount; and the fd-store memfd (-1 if none)."""
    stored = keeper.from_fd_store()
    if stored:
        return stored
    conn = keeper.take_over(opts.mountpoint, str(state.path))
    if conn:
        return conn, -1
    mounts.clear_dead_mount(opts.mountpoint)
    os.makedirs(opts.mountpoint, exist_ok=True)
    try:
        return Connection(mount_fuse(opts.mountpoint, mounts.fsname(state))), -1
    except OSError as e:
        raise DumperError(e.errno, f"mounting FUSE at {opts.mountpoint}",
                          "is /dev/fuse there (modprobe fuse)?") from None


def run(opts: MountOptions, ready=None, private_fds: tuple[int, ...] = ()) -> None:
    """Mount (or take the mount over) and keep it served in the foreground (keeper.py);
    READY() is called once the tree is up, and closes PRIVATE_FDS, which servers do not
    keep."""
    # paths as given, then away from the caller's directory, which another user may
    # write to: nothing is ever looked up there again (a helper's import, say)
    opts = dataclasses.replace(opts, mountpoint=os.path.abspath(opts.mountpoint),
                               state_dir=os.path.abspath(opts.state_dir),
                               config_dir=os.path.abspath(opts.config_dir))
    os.chdir("/")
    faulthandler.enable()
    resources.bound_memory()
    resources.raise_fd_limit(opts.limits)
    state = StateDir(opts.state_dir).ensure()
    report = pin_builtins(state) if opts.builtins else BuiltinReport([], {})
    if report.done:
        log.info("built-ins: %s", ", ".join(report.done))
    apply_config(opts, state)
    resources.trim_memory()  # libbpf's copy of the kernel BTF is freed by now
    conn, state_fd = _connect(opts, state)

    def serving() -> None:
        sd_notify(f"READY=1\nSTATUS=serving {opts.mountpoint} from {state.path}\n"
                  f"MAINPID={os.getpid()}")
        if ready:
            ready()
    try:
        code = Keeper(opts.mountpoint, str(state.path), conn,
                      functools.partial(serve, opts, state, report), serving, sd_notify,
                      state_fd, private_fds).run()
    except BaseException:
        unmount(opts.mountpoint)  # rather than leave it dead
        raise
    if code:
        raise DumperError(errno.EIO, f"{opts.mountpoint}: the server kept failing",
                          "see the log above")


def run_background(opts: MountOptions) -> int:
    """Fork a daemon and return once its tree is mounted (0) or it failed (1).

    The daemon's stdio is detached from the caller's terminal and pipes (so
    `cmd | ...` and CI runs do not wait for it); it logs to opts.log_file.
    """
    log_file = opts.log_file or DEFAULT_BACKGROUND_LOG
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as f:
            msg = f.read().decode()
        if msg.startswith("ready"):
            print(f"bpfdumpfs: mounted {opts.mountpoint} (daemon pid {pid}, log {log_file})")
            return 0
        sys.stderr.write(msg or f"bpfdumpfs: the daemon exited before mounting; see {log_file}\n")
        return 1
    os.close(r)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    logfd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(logfd, 2)

    def ready() -> None:
        os.write(w, b"ready")
        os.close(w)
    code = 0
    try:
        run(opts, ready, (w,))
    except DumperError as e:
        try:
            os.write(w, f"bpfdumpfs: {e}\n".encode())
        except OSError:
            log.error("%s", e)
        code = 1
    os._exit(code)
