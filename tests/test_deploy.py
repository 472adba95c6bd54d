"""deploy/: the container image and the Kubernetes manifests.

The manifests are validated offline against the Kubernetes JSON schemas that
kubernetes-validate ships, plus the rules the API server and bpfdumpfs add.

The image is built for real with podman from a Debian base made locally with
debootstrap (kept between runs as localhost/debian:bookworm), and run as a
sidecar that serves an unprivileged app container through a shared volume:
the way the DaemonSet serves a node (the daemon in the host's pid namespace)
and the way the sidecar serves its pod (one pid and network namespace for
both). Slow: about 2.5 minutes the first time on a machine (debootstrap, pip,
compiling pyfuse3), under half a minute after that.
"""
from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT, eventually, fstype, need, need_kernel, unmount

DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
KUBE_VERSIONS = ["1.29", "latest"]  # 1.29: the first with native sidecars

# -- the manifests ----------------------------------------------------------------


@pytest.fixture(scope="module")
def kv():
    try:
        import kubernetes_validate
    except ImportError:
        kubernetes_validate = None
    need(kubernetes_validate is not None, "kubernetes-validate (pip install -e '.[test]')")
    return kubernetes_validate


def load(path: Path) -> list[dict]:
    import yaml
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def version(kv, v: str) -> str:
    return kv.utils.latest_version() if v == "latest" else v


def by_kind(kind: str) -> dict:
    found = [d for p in MANIFESTS for d in load(p) if d["kind"] == kind]
    assert len(found) == 1, f"one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"] if doc["kind"] == "DaemonSet" else doc["spec"]


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def test_manifests_exist():
    assert {p.name for p in MANIFESTS} >= {"daemonset.yaml", "sidecar-pod.yaml"}


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_kubernetes_schema(kv, path, kube):
    docs = load(path)
    assert docs
    for doc in docs:
        # strict: an unknown (say, misspelled) field is an error, as kubectl's
        # server-side field validation makes it
        kv.validate(doc, version(kv, kube), strict=True)


DELETE = object()


def _set(path: list, value):
    """A change to a manifest: PATH set to VALUE (or deleted)."""
    def mutate(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        if value is DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return mutate


BROKEN = {
    "misspelled field": ("DaemonSet", _set(["spec", "template", "spec", "hostPid"], True)),
    "wrong type": ("DaemonSet", _set(["spec", "template", "spec", "containers", 0,
                                      "securityContext", "privileged"], "yes")),
    "missing containers": ("Pod", _set(["spec", "containers"], DELETE)),
    "missing volume name": ("Pod", _set(["spec", "volumes", 0, "name"], DELETE)),
    "string for a number": ("Pod", _set(["spec", "initContainers", 0, "startupProbe",
                                      "periodSeconds"], "1s")),
}


@pytest.mark.parametrize("what", BROKEN)
def test_a_broken_manifest_fails_validation(kv, what):
    """The validation is real: a manifest broken in any of these ways is refused."""
    kind, mutate = BROKEN[what]
    doc = copy.deepcopy(by_kind(kind))
    kv.validate(doc, version(kv, "latest"), strict=True)  # as shipped: valid
    mutate(doc)
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, version(kv, "latest"), strict=True)


def check_propagation(spec: dict) -> None:
    """What the API server adds to the schema: known propagation modes, and
    Bidirectional for privileged containers only."""
    for c in containers(spec):
        for m in c.get("volumeMounts", []):
            mode = m.get("mountPropagation", "None")
            assert mode in {"None", "HostToContainer", "Bidirectional"}, (c["name"], mode)
            if mode == "Bidirectional":
                assert c.get("securityContext", {}).get("privileged") is True, c["name"]


def mount_point_below_volume(c: dict) -> tuple[dict, str]:
    """(the Bidirectional volumeMount, the tree's path relative to it).

    The tree is mounted strictly below the volume: a volume that is itself a
    dead FUSE mount (a SIGKILLed daemon's) cannot be bound again by the runtime."""
    assert c["args"][0].startswith("/"), c["args"]
    mnt = c["args"][0]
    bidir = [m for m in c["volumeMounts"] if m.get("mountPropagation") == "Bidirectional"]
    assert len(bidir) == 1, bidir
    base = bidir[0]["mountPath"].rstrip("/")
    assert mnt.startswith(base + "/") and mnt != base + "/", (mnt, base)
    return bidir[0], mnt[len(base) + 1:]


def probes_status(c: dict, mnt: str) -> None:
    assert c["startupProbe"]["exec"]["command"] == ["bpfdumpfs", "status", mnt]


def test_daemonset_serves_the_nodes_run_bpfdump():
    ds = by_kind("DaemonSet")
    check_propagation(pod_spec(ds))
    spec = pod_spec(ds)
    # readers anywhere on the node must be visible to the daemon by pid
    assert spec["hostPID"] is True
    (c,) = spec["containers"]
    assert c["securityContext"]["privileged"] is True
    vm, rel = mount_point_below_volume(c)
    volume = next(v for v in spec["volumes"] if v["name"] == vm["name"])
    assert os.path.join(volume["hostPath"]["path"], rel) == "/run/bpfdump"
    probes_status(c, c["args"][0])
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/sys/fs/bpf"}
    assert ds["spec"]["selector"]["matchLabels"].items() <= \
        ds["spec"]["template"]["metadata"]["labels"].items()


def test_sidecar_pod_serves_an_unprivileged_app():
    pod = by_kind("Pod")
    spec = pod_spec(pod)
    check_propagation(spec)
    # the app's pids must be visible to the sidecar's daemon
    assert spec["shareProcessNamespace"] is True
    (side,) = [c for c in containers(spec) if c.get("args", [""])[0].startswith("/")]
    (app,) = spec["containers"]
    assert side is not app and side.get("restartPolicy") == "Always"  # a native sidecar
    assert side["securityContext"]["privileged"] is True
    vm, _ = mount_point_below_volume(side)
    mnt = side["args"][0]
    probes_status(side, mnt)
    # preStop unmounts whatever state the daemon is in, so the emptyDir can go
    cmd = side["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "fusermount3" and cmd[1].startswith("-u") and cmd[-1] == mnt
    volume = next(v for v in spec["volumes"] if v["name"] == vm["name"])
    assert "emptyDir" in volume
    # the app: no privilege at all, and the tree propagated into its mount
    sc = app["securityContext"]
    assert not sc.get("privileged") and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    (am,) = [m for m in app["volumeMounts"] if m["name"] == vm["name"]]
    assert am["mountPropagation"] == "HostToContainer" and am["mountPath"] == vm["mountPath"]


# -- the image, for real -------------------------------------------------------------

PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
# podman's default ulimits cannot be set here (no CAP_SYS_RESOURCE): these can
RUN = ["run", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=1000:1000"]
BASE = "localhost/debian:bookworm"
IMAGE = "localhost/bpfdumpfs:test"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
SERVE_TIMEOUT = 90

# Run in the app container as nobody: listen (optionally), then report what the
# tree shows to this process: listening TCP ports, task names, or the errno.
APP = r"""
import json, os, socket, sys, time
root, avoid, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if mode in ("listen", "serve"):
    while True:  # a port number other than the host's own listener
        s = socket.create_server(("127.0.0.1", 0))
        if s.getsockname()[1] != avoid:
            break
    print(s.getsockname()[1], flush=True)
    if mode == "serve":
        while True:  # not a wait for state: the app lives on, listening, until killed
            time.sleep(3600)
out = {"uid": os.getuid(),
       "capeff": [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0]}
for name in ("tcp/tcp", "task/tasks"):
    try:
        lines = open(f"{root}/{name}").read().splitlines()[1:]
    except OSError as e:
        out[name] = e.errno
        continue
    if name == "tcp/tcp":
        f = [l.split() for l in lines]
        out[name] = sorted({int(x[1].rsplit(":", 1)[1], 16) for x in f if x[3] == "0A"})
    else:
        out[name] = sorted({l.split(None, 5)[5] for l in lines})
print(json.dumps(out), flush=True)
"""


def listening_ports(text: str) -> set[int]:
    rows = [line.split() for line in text.splitlines()[1:]]
    return {int(r[1].rsplit(":", 1)[1], 16) for r in rows if r[3] == "0A"}


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {p.returncode}\n{p.stderr}")
    return p


def image_id(name: str) -> str | None:
    p = podman("image", "inspect", "--format", "{{.Id}}", name, check=False)
    return p.stdout.strip() if p.returncode == 0 else None


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """The image of deploy/Containerfile, built from this checkout."""
    need_kernel()
    for tool in ("podman", "runc", "debootstrap"):
        need(shutil.which(tool) is not None, f"{tool} (apt-get install podman runc debootstrap)")
    log = tmp_path_factory.mktemp("image") / "build.log"
    p = subprocess.run(["sh", DEPLOY / "make-base-image", BASE], capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, f"deploy/make-base-image: {p.stderr}"
    old = image_id(IMAGE)
    ca = ["-v", f"{HOST_CA}:/host-ca.crt:ro"] if HOST_CA.exists() else []
    with open(log, "w") as out:
        p = subprocess.run([*PODMAN, "build", "--pull=never", "--jobs", "2",
                            "--ignorefile", "deploy/containerignore", *ca,
                            "-f", "deploy/Containerfile", "-t", IMAGE, "."],
                           cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=900)
    assert p.returncode == 0, f"podman build failed:\n{log.read_text()[-4000:]}"
    new = image_id(IMAGE)
    if old and old != new:  # the image a previous run built (its layers stay cached)
        podman("rmi", old, check=False)
    return IMAGE


def test_image_has_no_compiler_and_runs_the_package(image):
    p = podman(*RUN, "--rm", "--entrypoint", "sh", image, "-c", r"""
        for t in gcc cc clang; do command -v $t >/dev/null && echo "has $t"; done
        dev='gcc|gcc-12|cpp|cpp-12|libc6-dev|python3-dev|python3.11-dev|libfuse3-dev'
        dpkg-query -W -f '${Package}\n' | grep -E "^($dev)\$" | sed 's/^/has /'
        bpfdumpfs --help >/dev/null && fusermount3 -V >/dev/null &&
            python3 -c 'import ctypes; ctypes.CDLL("libbpf.so.1")' && echo ok""", check=False)
    assert p.stdout.split() == ["ok"], p.stdout + p.stderr


class Shared:
    """A host directory shared with the containers (`mount --make-shared`), as
    /run is on a node and the kubelet's pod directories are."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        path.chmod(0o755)
        subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
        subprocess.run(["mount", "--make-shared", str(path)], check=True)

    def close(self) -> None:
        for sub in self.path.iterdir() if fstype(self.path) else []:
            for _ in range(3):  # a dead mount may sit under a live one
                unmount(sub)
        unmount(self.path)


@pytest.fixture
def shared(tmp_path):
    s = Shared(tmp_path / "shared")
    yield s
    s.close()


@pytest.fixture
def names():
    """Container names for this test, removed (whatever their state) afterwards."""
    made: list[str] = []

    def name(role: str) -> str:
        made.append(f"bpfdumpfs-test-{os.getpid()}-{role}")
        return made[-1]
    yield name
    for n in reversed(made):
        podman("rm", "--force", "--time", "0", n, check=False)


def serving(path: Path) -> bool:
    """A live bpfdumpfs mount at PATH (statfs always reaches the daemon)."""
    if fstype(path) != "fuse.bpfdumpfs":
        return False
    try:
        os.statvfs(path)
    except OSError:
        return False
    return True


def wait_serving(container: str, path: Path) -> None:
    """Until CONTAINER serves PATH; fails if it stops, or in SERVE_TIMEOUT seconds."""
    def status() -> str:
        return podman("inspect", "--format", "{{.State.Status}}", container).stdout.strip()
    eventually(lambda: serving(path) or status() != "running", SERVE_TIMEOUT, 0.1)
    if not serving(path):
        logs = podman("logs", container, check=False)
        raise AssertionError(f"{container} ({status()}) did not serve {path} in time:\n"
                             f"{logs.stdout}{logs.stderr}")


def wait_exited(container: str) -> int:
    p = podman("wait", container, timeout=60)
    return int(p.stdout.strip())


def dead(path: Path) -> bool:
    try:
        os.statvfs(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


UNPRIVILEGED = ["--cap-drop=all", "--user", "65534:65534", "--security-opt",
                "no-new-privileges", "--read-only"]


def app_reads(report: dict, port: int, host_port: int) -> None:
    """The app is unprivileged, and tcp/tcp shows it its own network namespace."""
    assert report["uid"] == 65534 and int(report["capeff"], 16) == 0, report
    assert report["tcp/tcp"] == [port], (report, host_port)


def test_node_daemon_serves_unprivileged_containers(image, shared, names, host_listener):
    """As the DaemonSet: the daemon in the host's pid namespace (and here its
    network namespace) mounts the tree below a shared volume; an app in
    namespaces of its own reads it through a HostToContainer (rslave) volume
    and sees its own sockets and processes, not the host's."""
    side, app = names("node"), names("app")
    tree = shared.path / "bpfdump"
    podman(*RUN, "-d", "--name", side, "--privileged", "--pid=host",
           "--network=host", "-v", f"{shared.path}:/host/run:rshared", image,
           "/host/run/bpfdump")
    wait_serving(side, tree)
    # the probe command of the manifests
    p = podman("exec", side, "bpfdumpfs", "status", "/host/run/bpfdump", check=False)
    assert p.returncode == 0 and "served by pid" in p.stdout, p.stdout + p.stderr

    podman(*RUN, "-d", "--name", app, *UNPRIVILEGED, "--network=none",
           "-v", f"{shared.path}:/run/bpfdumpfs:ro,rslave", "--entrypoint", "python3", image,
           "-c", APP, "/run/bpfdumpfs/bpfdump", str(host_listener), "serve")
    assert eventually(lambda: podman("logs", app).stdout.split(), 30, step=0.1), \
        f"{app} printed no port in 30 s: {podman('logs', app).stderr}"
    port = int(podman("logs", app).stdout.split()[0])

    def read() -> dict:
        p = podman("exec", app, "python3", "-c", APP, "/run/bpfdumpfs/bpfdump",
                   str(host_listener), "read", check=False)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    report = read()
    app_reads(report, port, host_listener)
    # its own pid namespace: its processes, and nothing of the daemon's (the helper
    # that made the seq_file there is reaped before the open returns)
    assert set(report["task/tasks"]) == {"python3"}, report
    # the host, reading the same tree, sees its own
    assert host_listener in listening_ports((tree / "tcp" / "tcp").read_text())
    assert port not in listening_ports((tree / "tcp" / "tcp").read_text())

    # SIGKILL (say, the OOM killer): a dead mount is left; the restarted daemon
    # clears it and mounts the tree again, and the app sees the new one
    podman("kill", "--signal", "KILL", side)
    wait_exited(side)
    assert dead(tree)
    podman("start", side)
    wait_serving(side, tree)
    logs = podman("logs", side)
    assert "clearing the dead FUSE mount" in logs.stdout + logs.stderr
    app_reads(read(), port, host_listener)

    # SIGTERM: the daemon unmounts the tree, on the host too, and exits 0
    podman("stop", "--time", "30", side, timeout=60)
    assert wait_exited(side) == 0
    assert fstype(tree) is None
    assert read()["tcp/tcp"] == errno.ENOENT


def test_sidecar_serves_its_pod(image, shared, names, host_listener):
    """As the sidecar Pod: one pid and network namespace for the pod
    (shareProcessNamespace), the tree below the shared volume; an app with
    no capabilities, as nobody, reads its pod's sockets and processes."""
    side = names("sidecar")
    tree = shared.path / "tree"
    podman(*RUN, "-d", "--name", side, "--privileged", "--network=none",
           "-v", f"{shared.path}:/run/bpfdumpfs:rshared", image, "/run/bpfdumpfs/tree")
    wait_serving(side, tree)

    def app(*ns: str) -> dict:
        p = subprocess.run([*PODMAN, *RUN, "--rm", *ns, *UNPRIVILEGED, "-v",
                            f"{shared.path}:/run/bpfdumpfs:ro,rslave", "--entrypoint",
                            "python3", image, "-c", APP, "/run/bpfdumpfs/tree",
                            str(host_listener), "listen"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        port, report = p.stdout.splitlines()
        return int(port), json.loads(report)

    port, report = app("--pid", f"container:{side}", "--network", f"container:{side}")
    app_reads(report, port, host_listener)
    # the pod's pid namespace: the daemon and the app, nothing of the host
    assert {"bpfdumpfs", "python3"} <= set(report["task/tasks"]) and \
        "kthreadd" not in report["task/tasks"], report

    # without the shared pid namespace the daemon cannot tell whose namespaces
    # to use, and refuses rather than show its own
    _, report = app("--network", f"container:{side}")
    assert report["tcp/tcp"] == report["task/tasks"] == errno.EACCES, report

    # the preStop hook, then SIGTERM: nothing is left in the volume
    p = podman("exec", side, "fusermount3", "-uz", "/run/bpfdumpfs/tree", check=False)
    assert p.returncode == 0, p.stderr
    assert fstype(tree) is None
    podman("stop", "--time", "30", side, timeout=60)
    assert wait_exited(side) == 0, podman("logs", side).stderr


# Run as a debugging container would be, as root with CAP_SYS_PTRACE: read task dumps
# (which made the old helper live in the container's pid namespace) while looking for
# any process that is not the container's own, and try on it what reached host root.
ATTACK = r"""
import ctypes, errno, json, os, sys, threading
tree = sys.argv[1]
found, wrote, attached = {}, [], []
libc = ctypes.CDLL(None, use_errno=True)
stop = threading.Event()

def read():
    while not stop.is_set():
        open(f"{tree}/task/tasks", "rb").read()

def status(pid):
    with open(f"/proc/{pid}/status") as f:
        st = dict(ln.rstrip().split(":\t", 1) for ln in f if ":\t" in ln)
    return {"uid": st["Uid"].split()[1], "capeff": st["CapEff"], "capbnd": st["CapBnd"]}

def attack(pid):
    try:
        found[pid] = status(pid)
        found[pid]["environ"] = len(open(f"/proc/{pid}/environ", "rb").read())
        found[pid]["root"] = os.listdir(f"/proc/{pid}/root")
    except OSError:
        pass
    try:
        open(f"/proc/{pid}/root/proof", "w")
        wrote.append(pid)
    except OSError:
        pass
    if libc.ptrace(16, pid, 0, 0) == 0:  # PTRACE_ATTACH: allowed by CAP_SYS_PTRACE
        attached.append(pid)
        libc.ptrace(17, pid, 0, 0)

t = threading.Thread(target=read)
t.start()
for _ in range(5000):
    for p in os.listdir("/proc"):
        if p.isdigit() and int(p) not in (1, os.getpid()) and int(p) not in found:
            attack(int(p))
stop.set()
t.join()
try:
    open(f"{tree}/ksym/kallsyms", "rb").read(1)
    kallsyms = "read"
except OSError as e:
    kallsyms = errno.errorcode[e.errno]
tasks = open(f"{tree}/task/tasks").read().splitlines()[1:]
print(json.dumps({"found": found, "wrote": wrote, "attached": attached, "kallsyms": kallsyms,
                  "tasks": [ln.split()[5] for ln in tasks]}))
"""


def test_a_ptrace_capable_container_gets_nothing_through_the_tree(image, tree, names):
    """The critical escape: a container run with --cap-add SYS_PTRACE reached the daemon's
    helper in its pid namespace, as root with every capability, and wrote host files
    through /proc/PID/root. Now the only process of the daemon's ever there is the child
    that makes one seq_file and is reaped before the open returns; whoever catches it
    (CAP_SYS_PTRACE in the initial user namespace may attach to anything in its
    namespace) finds nobody with no capabilities, no environment, an empty read-only
    root, and the link of the dumper this container was allowed to open."""
    p = podman(*RUN, "--rm", "--name", names("ptrace"), "--cap-add", "SYS_PTRACE",
               "-v", f"{tree.mnt}:/tree:ro,rslave", "--entrypoint", "python3", image,
               "-c", ATTACK, "/tree", timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["wrote"] == [], report
    for pid, seen in report["found"].items():
        assert seen["uid"] == "65534" and int(seen["capbnd"], 16) & ~(1 << 39) == 0, (pid, seen)
        assert seen.get("environ", 0) == 0 and seen.get("root", []) == [], (pid, seen)
    assert report["kallsyms"] == "EACCES", report
    assert report["tasks"] == ["python3"], report  # the tree still serves it, and only it
