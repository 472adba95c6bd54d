"""The systemd unit and the daemon's sd_notify protocol (systemd is not PID 1 here)."""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys

import pytest
from helpers import ROOT, Daemon, fstype, mount_bpffs, need, unmount

UNIT = ROOT / "systemd" / "bpfdumpfs.service"


def test_unit_verifies(tmp_path):
    need(shutil.which("systemd-analyze") is not None, "systemd-analyze")
    # as installed, but pointing at this checkout's command
    exe = shutil.which("bpfdumpfs") or str(ROOT / ".venv" / "bin" / "bpfdumpfs")
    unit = tmp_path / "bpfdumpfs.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/bpfdumpfs", exe))
    p = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "bpfdumpfs.service" not in p.stderr, p.stderr  # no warnings about our unit


def test_unit_keeps_the_mount_visible_and_caps_bounded():
    text = UNIT.read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["Type"] == "notify"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["Restart"] == "on-failure"
    assert settings["DeviceAllow"] == "/dev/fuse rw"
    # any of these would give the service its own mount namespace and hide the tree
    for hides in ("PrivateTmp", "ProtectSystem", "ProtectHome", "PrivateDevices",
                  "ReadOnlyPaths", "ProtectKernelModules", "ProtectKernelTunables",
                  "PrivateMounts", "MountFlags"):
        assert hides not in settings, hides
    assert unit_caps() == {"CAP_SYS_ADMIN", "CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE",
                           "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_CHOWN", "CAP_SETUID",
                           "CAP_SETGID", "CAP_SETPCAP", "CAP_SYS_CHROOT", "CAP_SYSLOG",
                           "CAP_SYS_NICE"}


def unit_caps() -> set[str]:
    line = next(ln for ln in UNIT.read_text().splitlines()
                if ln.startswith("CapabilityBoundingSet="))
    return set(line.partition("=")[2].split())


def test_the_units_capabilities_are_enough_for_readers_in_other_namespaces(tmp_path):
    """The daemon under the unit's bounding set and no_new_privs, as systemd starts it:
    its pid-namespace helper can still drop to nobody in an empty root, and its network
    threads still enter readers' namespaces."""
    need(shutil.which("setpriv") is not None, "setpriv (util-linux)")
    bounding = "-all," + ",".join("+" + c.removeprefix("CAP_").lower() for c in unit_caps())
    state = mount_bpffs(tmp_path / "state")
    d = Daemon(tmp_path / "mnt", state, "--config-dir", str(tmp_path / "none"),
               prefix=["setpriv", f"--bounding-set={bounding}", "--no-new-privs"])
    try:
        d.start()
        for ns in (["--pid", "--fork", "--mount-proc"], ["--net"]):
            target = "task/tasks" if "--pid" in ns else "tcp/tcp"
            p = subprocess.run(["unshare", *ns, "cat", str(d.mnt / target)],
                               capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, p.stderr + d.output()
        # root reads kernel addresses, as from /proc/kallsyms: the kernel shows them only
        # if the seq_file's maker holds CAP_SYSLOG (at perf_event_paranoid >= 2)
        with open("/proc/kallsyms") as f:
            proc_addr = f.readline().split()[0]
        with open(d.mnt / "ksym" / "kallsyms") as f:
            addr = f.readline().split()[0]
        assert int(proc_addr, 16) and int(addr, 16), (proc_addr, addr, d.output())
    finally:
        d.stop()
        unmount(state)


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(60)
    yield path, s
    s.close()


def test_ready_after_mount_and_stopping_on_sigterm(tmp_path, notify_socket, monkeypatch):
    path, sock = notify_socket
    state = mount_bpffs(tmp_path / "state")
    mnt = tmp_path / "mnt"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    d = Daemon(mnt, state, "--config-dir", str(tmp_path / "none"))
    try:
        d.start()
        msg = sock.recv(4096).decode()
        assert msg.startswith("READY=1\n"), msg
        assert f"STATUS=serving {mnt}" in msg and f"MAINPID={d.proc.pid}" in msg
        # READY came after the tree was mounted with the built-ins pinned
        assert fstype(mnt) == "fuse.bpfdumpfs"
        assert (mnt / "task" / "tasks").exists()
        d.proc.send_signal(signal.SIGHUP)
        assert sock.recv(4096) == b"RELOADING=1"
        assert sock.recv(4096) == b"READY=1"
        d.proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"
        assert d.proc.wait(timeout=30) == 0
        assert fstype(mnt) is None
    finally:
        d.stop()
        unmount(state)


def test_ready_is_not_sent_before_the_mount_exists(tmp_path, notify_socket, monkeypatch):
    """A daemon that cannot mount never says READY (systemd then reports the failure)."""
    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    p = subprocess.run([sys.executable, "-m", "bpfdumpfs", "mount", str(tmp_path / "mnt"),
                        "--state-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1 and "not on a bpffs" in p.stderr
    sock.settimeout(0.5)
    with pytest.raises(socket.timeout):
        sock.recv(4096)
