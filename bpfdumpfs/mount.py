"""The daemon: pin the built-ins, mount the tree, serve until SIGINT/SIGTERM.

The state directory (pins in a bpffs) holds every dumper, so the daemon keeps
nothing that a crash could lose: a restart mounts the same tree again, after
clearing the dead FUSE mount a killed daemon leaves behind.
"""
from __future__ import annotations

import dataclasses
import errno
import faulthandler
import hashlib
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

import pyfuse3
import trio

from . import config, libc, targets
from .builtins import Builtin, builtins, missing_target, reason
from .device import Device
from .dumpers import DumperError, StateDir
from .limits import Limits
from .metrics import Metrics
from .ops import Operations
from .pins import LINK_CACHE_MAX

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


M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8
TRIM_EVERY = 0.5        # seconds between looks for freed buffers to give back
TRIM_SLACK = 2 << 20    # spare bytes gained since the last trim that are worth a trim
PAGE = os.sysconf("SC_PAGE_SIZE")
FD_SPARE = 64           # files the daemon holds besides seq_files and cached links (~20)


def _bound_memory() -> None:
    """Keep freed read buffers out of the daemon's RSS. glibc gives reading threads
    arenas of their own, and malloc_trim cannot shrink the top of those: after a
    burst of streams, up to ~10 MiB stayed resident in the second arena of two.
    One arena costs no contention here, since nearly every allocation is made
    under the GIL. Chunks of 128 KiB and more are mapped (and so returned) one by
    one, instead of glibc raising that threshold as buffers come and go."""
    libc.lib.mallopt(M_ARENA_MAX, 1)
    libc.lib.mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def _raise_fd_limit(limits: Limits) -> None:
    """Let the daemon hold the files its own limits allow: a seq_file per open file
    and a link per cached dumper. A systemd service starts with a soft RLIMIT_NOFILE
    of 1024 (what keeps select() working; nothing here uses it), which would fail
    opens with EIO long before max_handles; the hard limit is the one to go by. If
    even that is too low, say so at start."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # an open file holds its seq_file and, when its dumper is not cached, a link of its
    # own (to re-run it for a seek back)
    need = 2 * limits.max_handles + LINK_CACHE_MAX + FD_SPARE
    if limits.max_handles and hard < need:
        log.warning("RLIMIT_NOFILE is %d, and max_handles (%d) with the link cache (%d) "
                    "needs %d: opens beyond it will fail with EIO; raise it (ulimit -n; "
                    "LimitNOFILE= for the service) or lower max_handles", hard,
                    limits.max_handles, LINK_CACHE_MAX, need)


def _spare() -> int:
    """The daemon's resident bytes that malloc does not hold in use: what a trim could
    give back, besides what is not malloc's (code, stacks, Python's object arenas),
    which moves little. Its count of in-use bytes is a walk of its bins, us."""
    with open("/proc/self/statm", "rb") as f:
        rss = int(f.read().split()[1]) * PAGE
    m = libc.lib.mallinfo2()
    return rss - m.uordblks - m.hblkhd


async def _give_back_memory(ops: Operations) -> None:
    """Readers' buffers come and go in bursts (32 streams of a large dump hold tens
    of MiB at once), and glibc keeps what they leave in its heaps, in fragments,
    until told. Once the spare bytes (_spare) are TRIM_SLACK above their lowest
    since the last trim, and no file is being read ahead, glibc is told: soon after
    a burst, even while other files stay open (a `less` left open must not keep the
    daemon's memory up), and again for what is freed or faulted back in after that
    trim -- but not in the middle of streams, whose buffers the heap reuses and
    whose reads a trim (ms, holding the heap) would hold up.

    Neither count alone will do. glibc's free bytes include what a trim gave back,
    so a burst that came and went between two looks, faulting those pages back in,
    left them where they were (+9-11 MiB kept in 4 of 10 trials). RSS counts what is
    in use, so a look while paused readers held their read-ahead took that as the
    new low, and nothing was given back when they closed (+12 MiB, every time)."""
    low = _spare()
    while True:
        await trio.sleep(TRIM_EVERY)
        if ops.streaming():
            continue
        spare = _spare()
        low = min(low, spare)
        if spare - low > TRIM_SLACK:
            await trio.to_thread.run_sync(libc.lib.malloc_trim, 0)
            low = _spare()


@dataclass
class BuiltinReport:
    done: list[str]               # "TARGET/NAME pinned" or "... updated"
    unavailable: dict[str, str]   # TARGET/NAME -> why it is not served, one line


def pin_builtins(state: StateDir) -> BuiltinReport:
    """Pin each built-in dumper that is not pinned yet, and give each one pinned by
    an earlier version this version's program.

    A built-in that this kernel has no target for, or whose every variant the
    verifier refuses, is reported (a warning, and in .stats and `status`) and
    skipped: the tree still serves everything else.
    """
    report = BuiltinReport([], {})
    have = set(targets.running_kernel())
    for b in builtins():
        try:
            if b.target not in have:
                raise missing_target(b)
            sha = hashlib.sha256(b.object.read_bytes()).hexdigest()[:16]
            if state.pin_path(b.target, b.name).exists():
                if _update_builtin(state, b, sha):
                    report.done.append(f"{b.target}/{b.name} updated")
                continue
            with b.load() as d:
                d.pin(state, b.name, mode=b.mode)
                state.meta.set(b.target, b.name, d.link_info().id, origin="builtin", object=sha,
                               reader_dependent=list(d.reader_dependent))
            report.done.append(f"{b.target}/{b.name} pinned")
        except DumperError as e:
            why = reason(e)
            report.unavailable[f"{b.target}/{b.name}"] = why
            log.warning("built-in %s/%s is not served: %s", b.target, b.name, why)
            if e.log:
                log.info("verifier log of %s:\n%s", b.name, e.log)
    return report


def _update_builtin(state: StateDir, b: Builtin, sha: str) -> bool:
    """Give the pinned built-in B this version's program, if an earlier
    version pinned it (LINK_UPDATE: the link, its pin, mode and open files stay; later
    opens run the new program). Each built-in's record names the object it came from
    (SHA), so a restart loads nothing; a pin with no record (older versions made none)
    is taken for a built-in if its program has the name of one of the built-in's
    variants. A pin made by add, a config file or adopt (recorded with their origin)
    is the operator's: left alone."""
    with state.get(b.target, b.name) as pinned:
        link_id = pinned.link_info().id
        record = state.meta.get(b.target, b.name, link_id)
        if record.get("origin", "builtin") != "builtin" or record.get("object") == sha:
            return False
        old = pinned.info()
        if old.prog_name not in {v.name for v in b.variants}:
            return False  # another tool's dumper under a built-in's name
        with b.load() as shipped:
            changed = old.prog_tag != shipped.info().prog_tag
            if changed:
                pinned.replace_program(shipped)
            helpers = list(shipped.reader_dependent)
        state.meta.set(b.target, b.name, link_id, origin="builtin", object=sha,
                       reader_dependent=helpers)
    return changed


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, fstype, source) of every mount, from /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, source = right.split()[:2]
            found.append((_unescape(left.split()[4]), fstype, _unescape(source)))
    return found


def _mounts() -> dict[str, str]:
    """mount point -> fstype."""
    return {point: fstype for point, fstype, _ in _mountinfo()}


def fsname(state: StateDir) -> str:
    """The FUSE fsname, which names the state dir so the CLI can find the tree."""
    path = os.path.realpath(state.path)
    return f"bpfdumpfs:{path}" if re.fullmatch(r"[^\s,\\]+", path) else "bpfdumpfs"


def bpfdumpfs_mounts() -> list[str]:
    return [p for p, fstype, _ in _mountinfo() if fstype == "fuse.bpfdumpfs"]


def mounts_of(state_dir) -> list[str]:
    """Mount points of bpfdumpfs trees serving STATE_DIR."""
    want = fsname(StateDir(state_dir))
    return [p for p, fstype, source in _mountinfo()
            if fstype == "fuse.bpfdumpfs" and source == want]


def clear_dead_mount(mountpoint: str) -> None:
    """Unmount a FUSE mount whose daemon is gone; refuse to mount over a live one.

    A dead mount may still answer stat() from the kernel's attribute cache, so
    liveness is asked with a readdir, which always reaches the daemon."""
    path = os.path.realpath(mountpoint)
    fstype = _mounts().get(path, "")
    if not fstype.startswith("fuse"):
        return
    try:
        os.listdir(path)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise
        log.warning("clearing the dead FUSE mount at %s (its daemon is gone)", path)
        subprocess.run(["fusermount3", "-uz", path], check=False)
        if path in _mounts():
            subprocess.run(["umount", "-l", path], check=False)
        return
    raise DumperError(errno.EBUSY, f"{path} is already a live FUSE mount ({fstype})",
                      f"unmount it first (fusermount3 -u {path}) or choose another mount point")


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) how the daemon is doing; a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    addr = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message.encode(), addr)
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
                    log.info("%s: unmounting", signal.Signals(signum).name)
                    sd_notify("STOPPING=1")
                    pyfuse3.terminate()
                    return
        nursery.start_soon(on_signals)
        nursery.start_soon(_give_back_memory, ops)
        # opens, reads and releases go to the device's threads: few requests wait here
        await pyfuse3.main(min_tasks=1, max_tasks=64)
        ops.shutdown()
        nursery.cancel_scope.cancel()


def run(opts: MountOptions, ready=None) -> None:
    """Mount and serve in the foreground; READY() is called once the tree is up."""
    # paths as given, then away from the caller's directory, which another user may
    # write to: nothing is ever looked up there again (a helper's import, say)
    opts = dataclasses.replace(opts, mountpoint=os.path.abspath(opts.mountpoint),
                               state_dir=os.path.abspath(opts.state_dir),
                               config_dir=os.path.abspath(opts.config_dir))
    os.chdir("/")
    faulthandler.enable()
    _bound_memory()
    _raise_fd_limit(opts.limits)
    state = StateDir(opts.state_dir).ensure()
    report = pin_builtins(state) if opts.builtins else BuiltinReport([], {})
    if report.done:
        log.info("built-ins: %s", ", ".join(report.done))
    apply_config(opts, state)
    libc.lib.malloc_trim(0)  # libbpf's copy of the kernel BTF is freed by now
    clear_dead_mount(opts.mountpoint)
    os.makedirs(opts.mountpoint, exist_ok=True)
    ops = Operations(state, list(targets.running_kernel()),
                     Metrics(os.path.abspath(opts.mountpoint), str(state.path),
                             report.unavailable), opts.limits)
    # a worker per open file at most (each may be inside a kernel read), and some to spare
    device = Device(ops, opts.mountpoint, fsname(state),
                    max_workers=(opts.limits.max_handles or 4096) + 8, debug=opts.debug_fuse)
    try:
        session = device.mount()
    except OSError as e:
        raise DumperError(e.errno, f"mounting FUSE at {opts.mountpoint}",
                          "is /dev/fuse there (modprobe fuse)?") from None
    try:
        # the device logs every request and reply (--debug-fuse); libfuse would log
        # only the requests passed on to pyfuse3
        pyfuse3.init(ops, session, set())
    except RuntimeError as e:
        device.unmount()
        raise DumperError(errno.EIO, f"starting FUSE at {opts.mountpoint}: {e}",
                          "is fuse3 (libfuse3) installed?") from None
    try:
        device.start()
        log.info("serving %s from %s", opts.mountpoint, state.path)
        sd_notify(f"READY=1\nSTATUS=serving {opts.mountpoint} from {state.path}\n"
                  f"MAINPID={os.getpid()}")
        if ready:
            ready()
        trio.run(_serve, opts, state, ops, device)
    finally:
        pyfuse3.close(unmount=False)
        device.unmount()
        log.info("unmounted %s", opts.mountpoint)


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
        run(opts, ready)
    except DumperError as e:
        try:
            os.write(w, f"bpfdumpfs: {e}\n".encode())
        except OSError:
            log.error("%s", e)
        code = 1
    os._exit(code)
