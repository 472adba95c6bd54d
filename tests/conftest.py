"""Shared fixtures: one real bpfdumpfs mount (with the built-ins) for the session."""
from __future__ import annotations

import socket

import pytest
from helpers import CI, Daemon, mount_bpffs, need_kernel, unmount


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a skipped test is a failed test: nothing that needs the kernel may slip by."""
    outcome = yield
    rep = outcome.get_result()
    if CI and rep.skipped and not hasattr(rep, "wasxfail"):
        rep.outcome = "failed"
        rep.longrepr = f"skipped in CI (CI=true), which counts as a failure: {rep.longrepr}"


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory):
    """A private bpffs holding this session's dumper pins."""
    need_kernel()
    path = mount_bpffs(tmp_path_factory.mktemp("state"))
    yield path
    unmount(path)


@pytest.fixture(scope="session")
def tree(tmp_path_factory, state_dir):
    """The daemon, mounted with the built-in dumpers; yields it (.mnt, .state)."""
    d = Daemon(tmp_path_factory.mktemp("tree") / "mnt", state_dir).start()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def read_builtin(tree):
    """read_builtin(NAME) -> the bytes `cat MNT/TARGET/NAME` prints."""
    def read(name: str) -> bytes:
        found = list(tree.mnt.glob(f"*/{name}"))
        assert len(found) == 1, f"built-in {name} not in the tree: {found}; {tree.output()}"
        return found[0].read_bytes()
    return read


@pytest.fixture
def bare(tmp_path):
    """A bpffs state dir that no daemon serves."""
    need_kernel()
    state = mount_bpffs(tmp_path / "bare")
    yield state
    unmount(state)


@pytest.fixture
def host_listener():
    """A TCP port listening in the host's network namespace."""
    s = socket.create_server(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()
