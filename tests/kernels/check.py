"""The in-guest half of the kernel matrix (tests/kernels/run).

On the running kernel, for every built-in dumper: load it the way the daemon
does (each variant in the object's order until one loads, with the iter
parameters of builtins.PARAMS), read one seq_file of it to the end, and check
the output against things this process made or the kernel shows elsewhere.
Prints one JSON line about the kernel, then one per built-in:

    {"builtin": "tasks", "status": "ok", "lines": 73, "variant": "dump_tasks", ...}
    {"builtin": "vmas", "status": "fail", "failures": [{"variant", "stage", "errno",
     "errname", "reason", "log_tail", "libbpf"}, ...]}
    {"builtin": "cgroups", "status": "no target", ...}

Run as root: .venv/bin/python tests/kernels/check.py [--out FILE]
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import socket
import sys
import time
import traceback
from pathlib import Path

from bpfdumpfs import builtins, dumpers, kernel, stream, targets
from bpfdumpfs.errors import DumperError

LOG_TAIL = 30  # lines of verifier log and libbpf warnings kept per failure


class Failure(Exception):
    """A variant that did not make it, and at which step."""

    def __init__(self, stage: str, error: Exception, libbpf: list[str] = ()) -> None:
        super().__init__(stage)
        self.stage, self.error, self.libbpf = stage, error, list(libbpf)

    def record(self, variant: str) -> dict:
        e = self.error
        err = getattr(e, "errno", None)
        log = getattr(e, "log", "") or ""
        reason = builtins.reason(e) if isinstance(e, DumperError) else str(e)
        return {"variant": variant, "stage": self.stage, "errno": err,
                "errname": errno.errorcode.get(err, "") if err else "",
                "reason": reason, "log_tail": log.rstrip().splitlines()[-LOG_TAIL:],
                "libbpf": self.libbpf[-LOG_TAIL:]}


# -- what each dump must show ------------------------------------------------
# Every checker gets the dump's lines and the Probe (objects this process holds),
# and raises Failure("check", ...) through expect().

def expect(cond, what: str) -> None:
    if not cond:
        raise Failure("check", ValueError(what))


class Probe:
    """Objects the dumps must show: this process, a file it holds open, sockets,
    and the link being dumped (link: its kernel.LinkInfo)."""

    def __init__(self) -> None:
        self.link = None
        self.pid = os.getpid()
        self.exe = os.path.realpath(sys.executable)
        self.file = open(__file__, "rb")  # noqa: SIM115 (held for the files dump)
        self.path = os.path.realpath(__file__)
        self.sockets = {}
        for name, family, kind in (("tcp", socket.AF_INET, socket.SOCK_STREAM),
                                   ("tcp6", socket.AF_INET6, socket.SOCK_STREAM),
                                   ("udp", socket.AF_INET, socket.SOCK_DGRAM),
                                   ("udp6", socket.AF_INET6, socket.SOCK_DGRAM)):
            try:
                s = socket.socket(family, kind)
            except OSError:  # no IPv6 in this kernel: that dump is checked for form only
                continue
            s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            if kind == socket.SOCK_STREAM:
                s.listen()
            self.sockets[name] = s
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix_name = f"bpfdumpfs-check-{self.pid}"
        self.unix.bind("\0" + self.unix_name)
        self.netlink = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
        self.netlink.bind((0, 0))  # only bound netlink sockets are in the table

    def inode(self, s: socket.socket) -> int:
        return os.fstat(s.fileno()).st_ino


def own_lines(lines: list[str], pid: int) -> list[list[str]]:
    return [f for f in (ln.split() for ln in lines) if f and f[0] == str(pid)]


def check_tasks(lines, p):
    expect(lines[0].split() == ["PID", "TGID", "PPID", "S", "UID", "COMM"], "no tasks header")
    me = own_lines(lines[1:], p.pid)
    expect(me and me[0][1] == str(p.pid), f"no line for this process (pid {p.pid})")


def check_files(lines, p):
    expect(lines[0].split() == ["PID", "FD", "KIND", "PATH"], "no files header")
    fd = str(p.file.fileno())
    expect(any(f[1] == fd and f[-1] == p.path for f in own_lines(lines[1:], p.pid)),
           f"no line for fd {fd} ({p.path}) of pid {p.pid}")


def check_vmas(lines, p):
    me = own_lines(lines, p.pid)
    expect(me, f"no mapping of pid {p.pid}")
    expect(all(re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", f[1]) for f in me), "malformed range")
    expect(any(f[-1] == p.exe for f in me), f"{p.exe} is not among pid {p.pid}'s mappings")


def check_bpf_objects(kind: str):
    def check(lines, p):
        expect(all(re.match(r"\d+: \w+", ln) for ln in lines), "a line is not 'ID: TYPE ...'")
        own = {"links": f"{p.link.id}: iter ", "progs": f"{p.link.prog_id}: tracing "}.get(kind)
        expect(own is None or any(ln.startswith(own) for ln in lines),
               f"the dumper's own {kind[:-1]} ({own.strip() if own else ''}) is missing")
    return check


def check_inet(name: str):
    listening = "0A" if name.startswith("tcp") else "07"

    def check(lines, p):
        expect("local_address" in lines[0], "no /proc/net header")
        s = p.sockets.get(name)
        if s is None:
            return
        port = f":{s.getsockname()[1]:04X}"
        expect(any(f[1].endswith(port) and f[3] == listening
                   for f in (ln.split() for ln in lines[1:])),
               f"the socket bound to port {s.getsockname()[1]} is missing")
    return check


def check_unix(lines, p):
    expect(lines[0].startswith("Num       RefCount"), "no /proc/net/unix header")
    ino = str(p.inode(p.unix))
    expect(any(f[6:8] == [ino, "@" + p.unix_name] for f in (ln.split() for ln in lines[1:])),
           f"the socket @{p.unix_name} (inode {ino}) is missing")


def check_netlink(lines, p):
    expect(lines[0].split()[:2] == ["sk", "Eth"], "no /proc/net/netlink header")
    ino = str(p.inode(p.netlink))
    expect(any(ln.split()[-1] == ino for ln in lines[1:]),
           f"the netlink socket (inode {ino}) is missing")


def check_ipv6_route(lines, p):
    proc = Path("/proc/net/ipv6_route").read_text().splitlines()
    expect(sorted(lines) == sorted(proc), "differs from /proc/net/ipv6_route")


def check_kallsyms(lines, p):
    bad = next((ln for ln in lines
                if not re.fullmatch(r"[0-9a-f]{16} [A-Za-z] \S+(\t\[\S+\])?", ln)), None)
    expect(bad is None, f"not a kallsyms line: {bad!r}")
    expect(any(ln.endswith(" _stext") for ln in lines), "no _stext")


def check_slabinfo(lines, p):
    expect(lines[0].split() == ["name", "objsize", "size", "align", "flags"],
           "no slabinfo header")
    expect(any(ln.startswith("task_struct ") for ln in lines), "no task_struct cache")


def check_cgroups(lines, p):
    expect(re.fullmatch(r"\d+ 0 /", lines[0]), f"the first line is not the root: {lines[0]!r}")
    expect(all(re.fullmatch(r"\d+ \d+ /.*", ln) for ln in lines), "a line is not 'ID LEVEL /PATH'")


CHECKS = {
    "tasks": check_tasks, "files": check_files, "vmas": check_vmas,
    "maps": check_bpf_objects("maps"), "progs": check_bpf_objects("progs"),
    "links": check_bpf_objects("links"),
    "tcp": check_inet("tcp"), "tcp6": check_inet("tcp6"),
    "udp": check_inet("udp"), "udp6": check_inet("udp6"),
    "unix": check_unix, "netlink": check_netlink, "ipv6_route": check_ipv6_route,
    "kallsyms": check_kallsyms, "slabinfo": check_slabinfo, "cgroups": check_cgroups,
}


# -- loading and reading -------------------------------------------------------

def attach(b: builtins.Builtin, spec: kernel.ProgSpec, target: targets.Target) -> int:
    """An iter link of variant SPEC, made as Dumper.load makes it; returns its fd."""
    try:
        info, fds = dumpers.iter_params(target, b.params)
    except DumperError as e:
        raise Failure("params", e) from None
    try:
        try:
            loaded = kernel.load_program(str(b.object), spec.name)
        except DumperError as e:
            # libbpf's warnings of this load: kernel keeps them until the next load
            raise Failure("load", e, kernel._messages) from None
        try:
            return kernel.link_create_iter(loaded.fd, info)
        except DumperError as e:
            raise Failure("link", e) from None
        finally:
            os.close(loaded.fd)
    finally:
        for fd in fds:
            os.close(fd)


def dump(link: int, label: str) -> bytes:
    """One seq_file of LINK, read to the end as the daemon reads it."""
    try:
        out = stream.Stream(kernel.iter_create(link), label)
    except DumperError as e:
        raise Failure("open", e) from None
    try:
        return b"".join(iter(out.read_chunk, b""))
    except DumperError as e:
        raise Failure("read", e) from None
    finally:
        out.close()


def check(b: builtins.Builtin, have: dict[str, targets.Target], probe: Probe) -> dict:
    variants = [s for s in kernel.object_programs(str(b.object)) if s.iter_target]
    result = {"builtin": b.name, "target": variants[0].iter_target}
    target = have.get(result["target"])
    if target is None:
        return {**result, "status": "no target"}
    failures = []
    for spec in variants:
        try:
            link = attach(b, spec, target)
        except Failure as f:
            failures.append(f.record(spec.name))
            continue
        try:
            text = dump(link, f"{b.name}:{spec.name}").decode(errors="replace")
            lines = text.splitlines()
            expect(lines, "the dump is empty")
            expect(text.endswith("\n"), "the dump does not end with a newline")
            probe.link = kernel.link_info(link)
            CHECKS[b.name](lines, probe)
        except Failure as f:
            # the kernel took this variant: the next would be no different to read
            return {**result, "status": "fail", "failures": failures + [f.record(spec.name)]}
        finally:
            os.close(link)
        return {**result, "status": "ok", "lines": len(lines), "variant": spec.name,
                "failures": failures}
    return {**result, "status": "fail", "failures": failures}


def about_kernel() -> dict:
    release = os.uname().release
    kconfig = next((p for p in (f"/boot/config-{release}", "/proc/config.gz")
                    if os.path.exists(p)), None)
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return {"kernel": release, "version": Path("/proc/version").read_text().strip(),
            "kconfig": kconfig, "uptime": uptime}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="append the JSON lines to this file too")
    args = ap.parse_args()
    out = open(args.out, "a") if args.out else None  # noqa: SIM115

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    emit(about_kernel())
    have = targets.running_kernel()
    probe = Probe()
    for b in builtins.builtins():
        if b.name not in CHECKS:
            emit({"builtin": b.name, "status": "fail", "failures": [{
                "stage": "check", "reason": "tests/kernels/check.py has no check for it"}]})
            continue
        start = time.monotonic()
        try:
            emit({**check(b, have, probe), "seconds": round(time.monotonic() - start, 1)})
        except Exception as e:  # noqa: BLE001 (a bug here or in bpfdumpfs: the other built-ins still run)
            emit({"builtin": b.name, "status": "fail", "failures": [{
                "stage": "checker", "errno": getattr(e, "errno", None), "reason": repr(e),
                "log_tail": traceback.format_exc().splitlines()[-LOG_TAIL:]}]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
