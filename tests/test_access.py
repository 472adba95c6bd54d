"""Who may do what in the tree: a non-root user reads what mode/owner/group allow and
changes nothing; root chmods, chowns, renames and removes through the mount."""
from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import (
    KSYM_OBJ,
    ROOT,
    TASKS_OBJ,
    Daemon,
    bpf_objects,
    bpfdumpfs,
    eventually,
    listing,
    mount_bpffs,
    need,
    need_kernel,
    own_daemon,
    readline,
    unmount,
)

USER = "bpfdumpfs-test"
LINES = 40


def expected() -> bytes:
    """What one seq_file of tests/bpf/access.bpf.c reads."""
    return b"".join(f"A {i:04d} for access tests\n".encode() for i in range(LINES))


@pytest.fixture(scope="module")
def user() -> pwd.struct_passwd:
    """The unprivileged test user (and its group of the same name), made if missing."""
    need_kernel()
    need(shutil.which("setpriv") is not None, "setpriv (util-linux)")
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", USER], check=True, capture_output=True)
        return pwd.getpwnam(USER)


def as_user(*cmd: str, env: dict | None = None, cwd: str = "/") -> subprocess.CompletedProcess:
    """Run CMD as the test user: its uid and gid only, no capabilities."""
    return subprocess.run(["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups",
                           "--inh-caps=-all", *cmd], capture_output=True, text=True, cwd=cwd,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C",
                               "LC_ALL": "C", **(env or {})}, timeout=60)


@pytest.fixture(scope="module")
def obj() -> str:
    return bpf_objects("access")["access"]


@contextlib.contextmanager
def reachable_daemon(*args: str) -> Iterator[Daemon]:
    """A daemon with ARGS on a mount point the test user can reach (pytest's tmp dirs
    are 0700), on a bpffs of its own; all of it gone afterwards."""
    need_kernel()
    base = Path(tempfile.mkdtemp(prefix="bpfdumpfs-access-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        with own_daemon(base, *args) as d:
            yield d
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def served(user):
    with reachable_daemon("--no-builtins") as d:
        yield d


# name -> (mode, owner, group, may the test user read it?)
ACCESS = {
    "root_only": ("0400", None, None, False),          # the default
    "group_readable": ("0440", None, USER, True),      # the user's group
    "other_group": ("0440", None, "nogroup", False),
    "owned": ("0400", USER, None, True),
    "owned_rw": ("0600", USER, None, True),
    "world": ("0444", None, None, True),
    "others_only": ("0004", None, None, True),
}


@pytest.fixture(scope="module")
def dumpers(served, obj):
    """The ACCESS dumpers, added once with the CLI (at once: each add is a new Python)."""
    def add(name):
        mode, owner, group, _ = ACCESS[name]
        args = ["add", name, obj, "--mode", mode, "--state-dir", str(served.state)]
        args += ["--owner", owner] if owner else []
        args += ["--group", group] if group else []
        return bpfdumpfs(*args, check=False)
    with ThreadPoolExecutor(max_workers=8) as pool:
        for name, p in zip(ACCESS, pool.map(add, ACCESS), strict=True):
            assert p.returncode == 0 and p.stdout == f"{served.mnt}/task/{name}\n", p.stderr
    yield served.mnt / "task"
    for name in ACCESS:
        (served.state / "task" / name).unlink(missing_ok=True)


# -- reading ------------------------------------------------------------------------------

def test_the_tree_is_mounted_for_all_users_with_kernel_permission_checks(served):
    with open("/proc/self/mountinfo") as f:
        line = next(ln for ln in f if ln.split()[4] == str(served.mnt))
    options = line.partition(" - ")[2].split()[2].split(",")
    assert "allow_other" in options and "default_permissions" in options


def test_the_user_lists_every_dumper_with_its_access(dumpers, user):
    p = as_user("ls", "-ln", str(dumpers))
    assert p.returncode == 0, p.stderr
    shown = {ln.split()[-1]: ln.split() for ln in p.stdout.splitlines()[1:]}
    assert set(shown) == set(ACCESS)
    gid = {None: "0", USER: str(user.pw_gid), "nogroup": str(grp.getgrnam("nogroup").gr_gid)}
    for name, (mode, owner, group, _) in ACCESS.items():
        assert shown[name][0] == "-" + stat.filemode(int(mode, 8))[1:], name
        assert shown[name][2:4] == [str(user.pw_uid) if owner else "0", gid[group]], name


@pytest.mark.parametrize("name", sorted(ACCESS))
def test_mode_owner_and_group_decide_who_reads(dumpers, name):
    path = dumpers / name
    p = as_user("cat", str(path))
    if ACCESS[name][3]:
        assert (p.returncode, p.stderr) == (0, "")
        assert p.stdout.encode() == expected()
    else:
        assert (p.returncode, p.stdout) == (1, "")
        assert p.stderr == f"cat: {path}: Permission denied\n"
    assert path.read_bytes() == expected()     # root reads every dumper


def test_the_user_reads_the_metadata_of_what_it_may_read(dumpers):
    p = as_user("getfattr", "-d", "--absolute-names", str(dumpers / "group_readable"))
    assert p.returncode == 0 and 'user.bpfdump.target="task"' in p.stdout
    assert 'user.bpfdump.prog_name="dump_access"' in p.stdout
    p = as_user("getfattr", "-n", "user.bpfdump.target", str(dumpers / "root_only"))
    assert p.returncode == 1 and "Permission denied" in p.stderr


# -- changing: never as a user ----------------------------------------------------------------

# what the user runs (paths relative to MNT/task; {mnt} is the mount) -> what it must print
REFUSED = {
    "rm": (["rm", "{t}/group_readable"],
           "rm: cannot remove '{t}/group_readable': Permission denied"),
    "rm-own-file": (["rm", "-f", "{t}/owned_rw"],
                    "rm: cannot remove '{t}/owned_rw': Permission denied"),
    "mv": (["mv", "{t}/owned", "{t}/renamed"],
           "mv: cannot move '{t}/owned' to '{t}/renamed': Permission denied"),
    "chmod": (["chmod", "0444", "{t}/group_readable"],
              "chmod: changing permissions of '{t}/group_readable': Operation not permitted"),
    "chmod-own-file": (["chmod", "0444", "{t}/owned"],
                       "chmod: changing permissions of '{t}/owned': Operation not permitted"),
    "chown": (["chown", USER, "{t}/group_readable"],
              "chown: changing ownership of '{t}/group_readable': Operation not permitted"),
    "chgrp-own-file": (["chgrp", USER, "{t}/owned"],
                       "chgrp: changing group of '{t}/owned': Operation not permitted"),
    "touch-times": (["touch", "-c", "-d", "2000-01-01", "{t}/owned_rw"],
                    "touch: setting times of '{t}/owned_rw': Operation not permitted"),
    "touch-existing": (["touch", "{t}/owned_rw"],
                       "touch: cannot touch '{t}/owned_rw': Permission denied"),
    "touch-create": (["touch", "{t}/newfile"], "touch: cannot touch '{t}/newfile': "
                     "Permission denied"),
    "write": (["dd", "if=/dev/null", "of={t}/owned_rw", "status=none"],
              "dd: failed to open '{t}/owned_rw': Permission denied"),
    "truncate": (["truncate", "-s", "0", "{t}/owned_rw"],
                 "truncate: cannot open '{t}/owned_rw' for writing: Permission denied"),
    "mkdir": (["mkdir", "{t}/newdir"],
              "mkdir: cannot create directory '{t}/newdir': Permission denied"),
    "mkdir-target": (["mkdir", "{mnt}/newtarget"],
                     "mkdir: cannot create directory '{mnt}/newtarget': Permission denied"),
    "symlink": (["ln", "-s", "x", "{t}/link"],
                "ln: failed to create symbolic link '{t}/link': Permission denied"),
    "setfattr": (["setfattr", "-n", "user.note", "-v", "1", "{t}/owned_rw"],
                 "setfattr: {t}/owned_rw: Operation not permitted"),
    "setfattr-unreadable": (["setfattr", "-n", "user.note", "-v", "1", "{t}/group_readable"],
                            "setfattr: {t}/group_readable: Permission denied"),
    "removexattr": (["setfattr", "-x", "user.bpfdump.target", "{t}/owned_rw"],
                    "setfattr: {t}/owned_rw: Operation not permitted"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_the_user_changes_nothing(served, dumpers, case):
    argv, message = REFUSED[case]
    fill = {"t": str(dumpers), "mnt": str(served.mnt)}
    before = listing(served.state)
    p = as_user(*[a.format(**fill) for a in argv])
    assert p.returncode != 0
    assert p.stderr.strip() == message.format(**fill)
    assert listing(served.state) == before
    assert sorted(os.listdir(dumpers)) == sorted(ACCESS)


# -- changing: root, through the mount ---------------------------------------------------------

def test_root_chmods_chowns_renames_and_removes_through_the_mount(served, obj, user):
    state, t = served.state, served.mnt / "task"
    p = bpfdumpfs("add", "byroot", obj, "--state-dir", str(state), check=False)
    assert p.returncode == 0, p.stderr
    link_id = os.getxattr(t / "byroot", "user.bpfdump.link_id")
    assert as_user("cat", str(t / "byroot")).returncode == 1

    os.chmod(t / "byroot", 0o440)
    assert stat.S_IMODE(os.stat(state / "task" / "byroot").st_mode) == 0o440
    os.chown(t / "byroot", user.pw_uid, grp.getgrnam("nogroup").gr_gid)
    st = os.stat(state / "task" / "byroot")
    assert (st.st_uid, st.st_gid) == (user.pw_uid, grp.getgrnam("nogroup").gr_gid)
    assert as_user("cat", str(t / "byroot")).stdout.encode() == expected()   # now its owner

    os.rename(t / "byroot", t / "renamed")
    assert not (state / "task" / "byroot").exists()
    st2 = os.stat(state / "task" / "renamed")
    assert (st2.st_ino, st2.st_mode, st2.st_uid) == (st.st_ino, st.st_mode, st.st_uid)
    assert os.getxattr(t / "renamed", "user.bpfdump.link_id") == link_id
    info = bpfdumpfs("info", "task/renamed", "--state-dir", str(state), check=False)
    shown = dict(ln.split(None, 1) for ln in info.stdout.splitlines())
    assert shown["origin"] == "cli", info.stdout + info.stderr

    with pytest.raises(OSError) as e:                    # a link's target is fixed
        os.rename(t / "renamed", served.mnt / "ksym" / "renamed")
    assert e.value.errno in (errno.EINVAL, errno.EXDEV)
    with pytest.raises(OSError) as e:                    # and names are checked
        os.rename(t / "renamed", t / "bad.name")
    assert e.value.errno == errno.EINVAL
    assert sorted(os.listdir(state / "task")) == sorted([*ACCESS, "renamed"])

    os.unlink(t / "renamed")
    assert not (state / "task" / "renamed").exists()
    assert "renamed" not in os.listdir(t)


def test_not_even_root_creates_files_or_directories(served, dumpers):
    before = listing(served.state)
    for make in (lambda: open(dumpers / "new", "x"), lambda: os.mkdir(dumpers / "d"),
                 lambda: os.mkdir(served.mnt / "newtarget"),
                 lambda: os.symlink("x", dumpers / "sym"),
                 lambda: os.link(dumpers / "world", dumpers / "hard")):
        with pytest.raises(PermissionError):
            make()
    assert listing(served.state) == before


# -- the CLI, as a user -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def user_python(user) -> tuple[str, dict]:
    """A Python the test user can run bpfdumpfs with (this one, or the system's with this
    one's site-packages), and its environment."""
    site = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(
        [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]))}
    for python, env in ((sys.executable, {}), (shutil.which("python3") or "", site)):
        if python and as_user(python, "-c", "import bpfdumpfs.cli", env=env,
                              cwd=str(ROOT)).returncode == 0:
            return python, env
    need(False, f"a Python that {USER} can run bpfdumpfs with")


# case -> (argv, words the one-line error must hold)
CLI_REFUSED = {
    "add": (["add", "mine", TASKS_OBJ],   # a built-in's object: readable by all
            ["Operation not permitted", "root"]),
    "add-unreadable-object": (["add", "mine", "{secret}"], ["{secret}", "Permission denied"]),
    "pin": (["pin", "mine", "{link_id}"], ["Operation not permitted", "root"]),
    "rm": (["rm", "task/world"], ["task/world", "Permission denied", "root"]),
}


@pytest.mark.parametrize("case", list(CLI_REFUSED))
def test_the_cli_refuses_a_user_clearly(served, dumpers, obj, user_python, case):
    python, env = user_python
    state = served.state
    secret = served.mnt.parent / "secret.bpf.o"     # in a directory the user can search
    shutil.copy(obj, secret)
    os.chmod(secret, 0o600)
    fill = {"secret": str(secret),
            "link_id": os.getxattr(dumpers / "world", "user.bpfdump.link_id").decode()}
    argv, words = CLI_REFUSED[case]
    before = listing(state)
    p = as_user(python, "-m", "bpfdumpfs", *[a.format(**fill) for a in argv], "--state-dir",
                str(state), env=env, cwd=str(ROOT))
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 1 and p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bpfdumpfs: "), p.stderr
    for w in words:
        assert w.format(**fill) in lines[0], f"{w!r} not in {lines[0]!r}"
    assert listing(state) == before


# -- a container's root: uid 0 on the host, with podman's default capabilities ------------

# podman's default set, none of them in effect beyond what they name (rootful containers
# run in the initial user namespace, so this is what their root holds)
CONTAINER_CAPS = "chown,dac_override,fowner,fsetid,kill,net_bind_service,setfcap,setgid," \
                 "setpcap,setuid,sys_chroot"


def as_container_root(*cmd: str) -> subprocess.CompletedProcess:
    bounding = "-all," + ",".join(f"+{c}" for c in CONTAINER_CAPS.split(","))
    return subprocess.run(["setpriv", f"--bounding-set={bounding}", *cmd],
                          capture_output=True, text=True, timeout=60)


def test_a_containers_root_reads_only_world_readable_dumpers(dumpers, served):
    """uid 0 owns the pins, and CAP_DAC_OVERRIDE passes the kernel's mode check: the
    daemon asks for CAP_SYS_ADMIN before it shows a dumper that is not world-readable."""
    p = as_container_root("cat", str(dumpers / "world"))
    assert p.returncode == 0 and p.stdout.encode() == expected(), p.stderr
    for name in ("root_only", "owned", "group_readable"):
        p = as_container_root("cat", str(dumpers / name))
        assert p.returncode == 1 and p.stderr.strip().endswith("Permission denied"), name
    assert "needs CAP_SYS_ADMIN" in served.output()
    # real root still reads them
    assert (dumpers / "root_only").read_bytes() == expected()


@pytest.mark.parametrize("cmd", [["rm", "-f", "{f}"], ["mv", "{f}", "{d}/moved"],
                                 ["chmod", "0444", "{f}"], ["chown", "nobody", "{f}"]])
def test_a_containers_root_changes_nothing(dumpers, served, cmd):
    before = listing(served.state)
    f = dumpers / "root_only"
    p = as_container_root(*(c.format(f=f, d=dumpers) for c in cmd))
    assert p.returncode == 1
    assert p.stderr.strip().endswith(("Operation not permitted", "Permission denied"))
    assert listing(served.state) == before
    assert "changes need uid 0 with CAP_SYS_ADMIN or CAP_BPF" in served.output()


def test_stats_opens_count_in_the_users_limit(user):
    """A user holding .stats open without reading spends its own handles, not everyone's."""
    with reachable_daemon("--max-handles-per-uid", "3") as d:
        stats = d.mnt / ".stats"
        held = subprocess.Popen(["setpriv", f"--reuid={USER}", f"--regid={USER}",
                                 "--clear-groups", "sh", "-c",
                                 f"exec 3<{stats} 4<{stats} 5<{stats}; echo held; exec sleep 30"],
                                stdout=subprocess.PIPE)
        try:
            assert readline(held.stdout, what="the held opens") == b"held\n"
            p = as_user("cat", str(stats))
            assert p.returncode == 1 and "Too many open files" in p.stderr
            assert (d.mnt / "task" / "tasks").read_bytes()  # root is not affected
        finally:
            held.kill()
            held.wait()
        assert eventually(lambda: as_user("cat", str(stats)).returncode == 0)


def test_per_user_limits_count_root_of_each_pid_namespace_apart():
    """A container's root is uid 0 too: its open files do not use up the host root's."""
    with reachable_daemon("--max-handles-per-uid", "2") as d:
        f = d.mnt / "ksym" / "kallsyms"
        held = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
                                 "sh", "-c", f"exec 3<{f} 4<{f}; echo held; exec sleep 30"],
                                stdout=subprocess.PIPE)
        try:
            assert readline(held.stdout, what="the held opens") == b"held\n"
            with open(f, "rb") as a, open(f, "rb") as b:
                assert a.read(10) and b.read(10)
        finally:
            held.kill()
            held.wait()


def test_nothing_in_the_callers_directory_runs_as_root(tmp_path):
    """Started from a directory anyone may write to, the daemon moves to / and starts its
    helpers isolated: a cffi.py planted there is never imported."""
    planted = Path(tempfile.mkdtemp(prefix="bpfdumpfs-cwd-", dir="/tmp"))
    os.chmod(planted, 0o1777)
    proof = tmp_path / "proof"
    (planted / "cffi.py").write_text(f"open({str(proof)!r}, 'w').write('ran as root')\n")

    class FromPlanted(Daemon):
        def command(self) -> list[str]:
            script = Path(sys.executable).parent / "bpfdumpfs"
            return ["sh", "-c", 'cd "$0" && exec "$@"', str(planted), str(script), "mount",
                    str(self.mnt), "--state-dir", str(self.state), *self.args]

    state = mount_bpffs(tmp_path / "state")
    d = FromPlanted(tmp_path / "mnt", state, "--config-dir", str(tmp_path / "none")).start()
    try:
        assert os.readlink(f"/proc/{d.pid}/cwd") == "/"
        p = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "cat",
                            str(d.mnt / "task" / "tasks")], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0, p.stderr
        assert not proof.exists()
    finally:
        d.stop()
        unmount(state)
        shutil.rmtree(planted, ignore_errors=True)


def test_a_state_dir_anyone_could_write_is_made_roots_before_serving(user, tmp_path):
    """On a bpffs mounted without mode= (1777), the test user makes task/ first. The
    daemon makes it root's: the user can no longer rename or remove root's pins there,
    and a symlink planted earlier is not served."""
    base = Path(tempfile.mkdtemp(prefix="bpfdumpfs-access-", dir="/tmp"))
    os.chmod(base, 0o755)
    state = base / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(state)], check=True)
    try:
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o1777
        assert as_user("mkdir", str(state / "task")).returncode == 0
        d = Daemon(base / "mnt", state, "--config-dir", str(tmp_path / "none")).start()
        try:
            for p in (state, state / "task"):
                st = os.lstat(p)
                assert st.st_uid == 0 and not st.st_mode & 0o022, p
            assert "made it root's" in d.output()
            pin = state / "task" / "tasks"
            assert pin.exists()
            assert as_user("mv", str(pin), str(state / "task" / "mine")).returncode != 0
            assert as_user("rm", "-f", str(pin)).returncode != 0 and pin.exists()
            os.symlink(pin, state / "task" / "alias")
            assert "alias" not in os.listdir(d.mnt / "task")
            assert not (d.mnt / "task" / "alias").exists()
        finally:
            d.stop()
    finally:
        unmount(state)
        shutil.rmtree(base, ignore_errors=True)


def test_a_user_retrying_refused_opens_cannot_flood_the_log(user):
    with reachable_daemon("--max-handles-per-uid", "1") as d:
        f = d.mnt / "task" / "tasks"
        loop = (f"import errno\nkeep = open({str(f)!r}, 'rb')\nn = 0\n"
                f"for _ in range(2000):\n"
                f"    try:\n        open({str(f)!r}, 'rb')\n"
                f"    except OSError as e:\n        n += e.errno == errno.EMFILE\n"
                f"print(n)\n")
        p = as_user(sys.executable, "-c", loop)
        assert p.stdout.strip() == "2000", p.stderr
        refusals = [ln for ln in d.output().splitlines() if "refused" in ln]
        assert len(refusals) == 10, refusals[-3:]
        assert "counted, not logged" in refusals[-1]


# reads 2 MiB of a file, then 256 KiB from its start again, and prints those
SEEK_BACK = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
assert len(os.read(fd, 2 << 20)) == 2 << 20
sys.stdout.write(os.pread(fd, 256 << 10, 0).decode())
"""


def addresses_shown(text: str) -> bool:
    """Whether a kallsyms dump shows real addresses (the kernel prints 0s to those it
    does not trust with them)."""
    lines = text.splitlines()
    assert len(lines) > 1000, text[:200]
    return any(int(ln.split()[0], 16) for ln in lines[:1000])


def test_a_world_readable_ksym_dumper_shows_each_reader_what_its_pin_would(served, user):
    """The ksym iterator decides from its creator's credentials whether to show
    addresses: each seq_file is made with no more capabilities than its reader has, so
    the tree shows a user, and a container's root, the zeros the pin shows them; root
    sees addresses. view = daemon is the explicit opt-out."""
    state = served.state
    bpfdumpfs("add", "pubsyms", KSYM_OBJ, "--mode", "0444", "--state-dir", str(state))
    bpfdumpfs("add", "daemonsyms", KSYM_OBJ, "--mode", "0444", "--view", "daemon",
              "--state-dir", str(state))
    os.chmod(state, 0o755)  # the pin itself, read directly by the same users
    os.chmod(state / "ksym", 0o755)
    try:
        f, pin = served.mnt / "ksym" / "pubsyms", state / "ksym" / "pubsyms"
        assert addresses_shown(f.read_text())
        for run in (as_user, as_container_root):
            direct = run("cat", str(pin))
            assert direct.returncode == 0 and not addresses_shown(direct.stdout), run
            through = run("cat", str(f))
            assert through.returncode == 0 and not addresses_shown(through.stdout), run
            # a seek back past what the open kept re-runs it, with the same rights
            back = run("python3", "-c", SEEK_BACK, str(f))
            assert back.returncode == 0 and not addresses_shown(back.stdout), run
        assert addresses_shown(as_user("cat", str(served.mnt / "ksym" / "daemonsyms")).stdout)
    finally:
        for name in ("pubsyms", "daemonsyms"):
            (state / "ksym" / name).unlink()
