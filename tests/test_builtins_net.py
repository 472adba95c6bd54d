"""The network built-in dumpers (tcp, tcp6, udp, udp6, unix, netlink, ipv6_route)
checked against /proc/net in the same network namespace. Dumper output only ever
comes from the `read_builtin` fixture; /proc/net is the independent second source.

Socket tables change while we look (other programs, timers), so socket dumps are
compared as sets of lines, /proc read right before and right after the dump: every
line /proc shows both times must be in the dump, and every dump line must be one
/proc showed at least once. The only column masked is tcp's tm->when (jiffies left
on a timer), which moves between any two reads; when the host keeps changing the
table, later rounds also mask tcp's "sl" (a line's position, shifted by any socket
that comes or goes) and check it separately: it must count the lines 0, 1, 2, ...
The sockets each test creates are then checked field by field (address, state,
uid, inode), so a dumper that printed nothing of its own could not pass on the
strength of an empty table.

Not covered here: a dump with no socket at all (the header alone). That needs a
namespace of its own, and the dumper runs in the test's namespace.
"""
import os
import re
import resource
import socket
import struct
import time

import pytest
from helpers import eventually

ATTEMPTS = 5
TCP_CLOSE_WAIT = 8  # include/net/tcp_states.h


# ---------------------------------------------------------------- helpers

def text_lines(data: bytes) -> list[str]:
    text = data.decode("latin-1")  # unix paths are raw bytes
    assert text.endswith("\n"), f"dump does not end with a newline: {text[-200:]!r}"
    return text[:-1].split("\n")


def proc_lines(name: str) -> list[str]:
    with open(f"/proc/net/{name}", "rb") as f:
        return text_lines(f.read())


def mask_when(line: str) -> str:
    """tcp/tcp6 lines: blank out the tm->when half of the 6th column, in place."""
    tokens = list(re.finditer(r"\S+", line))
    if len(tokens) < 6 or ":" not in tokens[5].group():
        return line
    tr_when = tokens[5]
    colon = line.index(":", tr_when.start())
    return line[:colon + 1] + "X" * (tr_when.end() - colon - 1) + line[tr_when.end():]


def mask_sl_when(line: str) -> str:
    """Also blank "sl": in tcp dumps it is the line's position, so one socket
    coming or going shifts it on every later line."""
    sl, colon, rest = mask_when(line).partition(":")
    return "X" * len(sl) + colon + rest


def same(line: str) -> str:
    return line


def dump_vs_proc(read_builtin, name: str, mask=same, loose=None):
    """Read /proc, the dumper, /proc again; until the dump agrees with /proc.

    Returns (dump lines, /proc lines before, /proc lines after) of the agreeing
    round. Fails on the header, or when no round agrees: a line /proc showed both
    times is missing from the dump, or the dump shows a line /proc never did.
    The later rounds compare with `loose` (if given) instead of `mask`, for tables
    that keep changing under a busy host.
    """
    for attempt in range(ATTEMPTS):
        m = loose if loose and attempt >= ATTEMPTS // 2 else mask
        before = proc_lines(name)
        dump = text_lines(read_builtin(name))
        after = proc_lines(name)
        assert dump[0] == before[0], f"{name}: header differs from /proc/net/{name}"
        assert dump.count(dump[0]) == 1, f"{name}: header printed more than once"
        b, a, d = (set(map(m, lines[1:])) for lines in (before, after, dump))
        missing = sorted((b & a) - d)
        extra = sorted(d - (b | a))
        if not missing and not extra:
            return dump, before, after
        time.sleep(0.2)  # not a wait for state: a pause before the next of ATTEMPTS rounds
    pytest.fail(f"{name}: dump and /proc/net/{name} disagree\n"
                f"missing from the dump: {missing}\nonly in the dump: {extra}")


def tcp_vs_proc(read_builtin, name: str):
    """dump_vs_proc for tcp/tcp6, where "sl" numbers the printed lines, as in /proc."""
    dump, before, after = dump_vs_proc(read_builtin, name, mask_when, mask_sl_when)
    assert [int(line.split(":")[0]) for line in dump[1:]] == list(range(len(dump) - 1))
    return dump, before, after


def ip4(addr: str) -> str:
    """/proc's spelling of an IPv4 address: the __be32 printed as a native u32."""
    return f'{struct.unpack("=I", socket.inet_pton(socket.AF_INET, addr))[0]:08X}'


def ip6(addr: str) -> str:
    raw = socket.inet_pton(socket.AF_INET6, addr)
    return "".join(f'{struct.unpack("=I", raw[i:i + 4])[0]:08X}' for i in range(0, 16, 4))


def endpoint(sock_addr, fam) -> str:
    spell = ip4 if fam == socket.AF_INET else ip6
    return f"{spell(sock_addr[0])}:{sock_addr[1]:04X}"


def find(lines: list[str], local: str, remote: str | None = None) -> list[str]:
    out = []
    for line in lines[1:]:
        t = line.split()
        if t[1] == local and (remote is None or t[2] == remote):
            out.append(line)
    return out


def inode(sock) -> int:
    return os.fstat(sock.fileno()).st_ino


class Sockets:
    """Sockets a test owns; closed at teardown."""

    def __init__(self):
        self.all = []

    def add(self, *socks):
        self.all.extend(socks)
        return socks[0] if len(socks) == 1 else socks

    def close(self):
        for s in self.all:
            s.close()


@pytest.fixture
def owned():
    s = Sockets()
    yield s
    s.close()


def room_for_fds(n: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n if hard == resource.RLIM_INFINITY
                                                    else min(n, hard), hard))


def chown(sock, uid: int):
    """A socket's uid column is its sk_uid; chown of the socket inode sets it."""
    os.fchown(sock.fileno(), uid, -1)


# ---------------------------------------------------------------- tcp, tcp6

def tcp_set(owned, fam, addr, uid0):
    """A listener, an established pair, a request socket and a time-wait socket."""
    lst = owned.add(socket.socket(fam, socket.SOCK_STREAM))
    lst.bind((addr, 0))
    chown(lst, uid0)
    lst.listen(16)
    cli = owned.add(socket.socket(fam, socket.SOCK_STREAM))
    cli.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # timer "tr" 2
    cli.connect(lst.getsockname()[:2])
    srv, _ = lst.accept()
    owned.add(srv)
    chown(cli, uid0 + 1)
    chown(srv, uid0 + 2)
    for _ in range(4):  # request/response turns: interactive ("pingpong") mode
        cli.sendall(b"?")
        srv.recv(1)
        srv.sendall(b"!")
        cli.recv(1)
    cli.sendall(b"x" * 100)  # left unread: rx_queue 0x64 on srv

    # TCP_DEFER_ACCEPT drops the handshake's final bare ACK, so the server side
    # stays a request socket (SYN_RECV) until data comes, which it never does.
    deferred = owned.add(socket.socket(fam, socket.SOCK_STREAM))
    deferred.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 30)
    deferred.bind((addr, 0))
    chown(deferred, uid0 + 3)
    deferred.listen(4)
    pending = owned.add(socket.socket(fam, socket.SOCK_STREAM))
    pending.connect(deferred.getsockname()[:2])

    # The side that closes first ends in TIME_WAIT.
    tw_cli = socket.socket(fam, socket.SOCK_STREAM)
    tw_cli.connect(lst.getsockname()[:2])
    tw_srv, _ = lst.accept()
    tw_name = tw_cli.getsockname()
    tw_cli.close()
    assert eventually(lambda: tcp_state(tw_srv) == TCP_CLOSE_WAIT), \
        f"the peer's FIN never came: state {tcp_state(tw_srv)}"
    tw_srv.close()
    return dict(lst=lst, cli=cli, srv=srv, deferred=deferred, pending=pending, tw=tw_name)


def tcp_state(sock) -> int:
    """The TCP state of SOCK (tcpi_state, the first byte of struct tcp_info)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def proc_fields(name: str, fam, local, remote) -> list[str]:
    """The columns /proc/net/NAME shows for the socket LOCAL -> REMOTE (none if none)."""
    found = find(proc_lines(name), endpoint(local, fam), endpoint(remote, fam))
    return found[0].split() if found else []


def tcp_set_settled(name: str, fam, s: dict) -> bool:
    """Whether /proc/net/NAME shows tcp_set's sockets as the checks expect them: the
    request socket and the time-wait socket there, and the client's data acknowledged
    (its timer the keepalive, no longer the retransmit timer)."""
    req = proc_fields(name, fam, s["deferred"].getsockname(), s["pending"].getsockname())
    tw = proc_fields(name, fam, s["tw"], s["lst"].getsockname())
    cli = proc_fields(name, fam, s["cli"].getsockname(), s["cli"].getpeername())
    return req[3:4] == ["03"] and tw[3:4] == ["06"] and cli[5:6] != [] \
        and cli[5].startswith("02:")


@pytest.mark.parametrize("name,fam,addr", [
    ("tcp", socket.AF_INET, "127.0.0.1"),
    ("tcp6", socket.AF_INET6, "::1"),
    ("tcp6", socket.AF_INET6, "::ffff:127.0.0.1"),  # IPv4-mapped: still tcp6
])
def test_tcp_matches_proc(read_builtin, owned, name, fam, addr):
    s = tcp_set(owned, fam, addr, 4200)
    assert eventually(lambda: tcp_set_settled(name, fam, s)), \
        f"/proc/net/{name} never showed the sockets as set up:\n" + "\n".join(proc_lines(name))
    dump, _, _ = tcp_vs_proc(read_builtin, name)
    ep = lambda a: endpoint(a, fam)  # noqa: E731

    nobody = ("0.0.0.0", 0) if fam == socket.AF_INET else ("::", 0)

    def one(local, remote=nobody):
        found = find(dump, ep(local), ep(remote))
        assert len(found) == 1, f"{name}: want one line for {local}->{remote}: {found}"
        t = found[0].split()
        return t, found[0]

    t, line = one(s["lst"].getsockname())
    assert (t[3], t[7], t[9]) == ("0A", "4200", str(inode(s["lst"]))), line
    t, line = one(s["cli"].getsockname(), s["cli"].getpeername())
    assert (t[3], t[7], t[9]) == ("01", "4201", str(inode(s["cli"]))), line
    assert t[5].startswith("02:"), f"keepalive timer not shown: {line}"
    t, line = one(s["srv"].getsockname(), s["srv"].getpeername())
    assert (t[3], t[7], t[9]) == ("01", "4202", str(inode(s["srv"]))), line
    assert t[4] == "00000000:00000064", f"unread bytes not in rx_queue: {line}"
    # The request socket: listener's address, uid of the listener, no inode.
    t, line = one(s["deferred"].getsockname(), s["pending"].getsockname())
    assert (t[3], t[7], t[9]) == ("03", "4203", "0"), line
    t, line = one(s["tw"], s["lst"].getsockname())
    assert (t[3], t[5][:3], t[7], t[9]) == ("06", "03:", "0", "0"), line


def test_tcp4_lines_padded_like_proc(read_builtin, owned):
    """/proc/net/tcp pads every line to 149 characters; tcp6 does not pad."""
    tcp_set(owned, socket.AF_INET, "127.0.0.1", 4300)
    dump = text_lines(read_builtin("tcp"))
    assert {len(line) for line in dump} == {149}
    dump6 = text_lines(read_builtin("tcp6"))
    assert dump6[0] == proc_lines("tcp6")[0]
    assert not any(line.endswith(" ") for line in dump6)


@pytest.mark.parametrize("name,fam,addr", [
    ("tcp", socket.AF_INET, "127.0.0.1"),
    ("tcp6", socket.AF_INET6, "::1"),
])
def test_tcp_sl_counts_lines_across_buffers(read_builtin, owned, name, fam, addr):
    """Enough sockets of both families for several 32 KiB kernel buffers: the other
    family's sockets are filtered out, objects cut off at a buffer's end are run
    again, and still "sl" numbers the printed lines 0, 1, 2, ... like /proc.
    Only a read() asking for more than the 32 KiB kernel buffer can cut an object
    off, and a reader's read()s start small (Python's grow past 32 KiB once about
    256 KiB are in), hence a dump of a few hundred KiB."""
    room_for_fds(5000)
    for _ in range(2400):
        for f, a in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            s = owned.add(socket.socket(f, socket.SOCK_STREAM))
            s.bind((a, 0))
            s.listen(1)
    dump, _, _ = tcp_vs_proc(read_builtin, name)  # checks sl is 0, 1, 2, ...
    assert len("\n".join(dump)) > 300 * 1024
    mine = {endpoint(s.getsockname(), fam) for s in owned.all if s.family == fam}
    assert mine <= {line.split()[1] for line in dump[1:]}


# ---------------------------------------------------------------- udp, udp6

@pytest.mark.parametrize("name,fam,addr", [
    ("udp", socket.AF_INET, "127.0.0.1"),
    ("udp6", socket.AF_INET6, "::1"),
    ("udp6", socket.AF_INET6, "::ffff:127.0.0.1"),
])
def test_udp_matches_proc(read_builtin, owned, name, fam, addr):
    bound = owned.add(socket.socket(fam, socket.SOCK_DGRAM))
    bound.bind((addr, 0))
    chown(bound, 4400)
    conn = owned.add(socket.socket(fam, socket.SOCK_DGRAM))
    conn.connect(bound.getsockname()[:2])
    chown(conn, 4401)
    conn.send(b"hello")  # queued, unread, on `bound`
    dump, _, _ = dump_vs_proc(read_builtin, name)

    found = find(dump, endpoint(bound.getsockname(), fam))
    assert len(found) == 1, found
    t = found[0].split()
    assert (t[3], t[7], t[9]) == ("07", "4400", str(inode(bound))), found[0]
    assert t[4] != "00000000:00000000", f"queued datagram not in rx_queue: {found[0]}"
    found = find(dump, endpoint(conn.getsockname(), fam), endpoint(bound.getsockname(), fam))
    assert len(found) == 1, found
    t = found[0].split()
    assert (t[3], t[7], t[9]) == ("01", "4401", str(inode(conn))), found[0]


def test_udp4_lines_padded_like_proc(read_builtin, owned):
    """/proc/net/udp pads every line to 127 characters; udp6 does not pad."""
    s = owned.add(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    s.bind(("127.0.0.1", 0))
    assert {len(line) for line in text_lines(read_builtin("udp"))} == {127}
    assert not any(line.endswith(" ") for line in text_lines(read_builtin("udp6")))


def test_udp_many_sockets(read_builtin, owned):
    """Several kernel buffers' worth; sl is /proc's hash bucket, so whole lines agree."""
    room_for_fds(700)
    for _ in range(300):
        for f, a in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            s = owned.add(socket.socket(f, socket.SOCK_DGRAM))
            s.bind((a, 0))
    for name, fam in (("udp", socket.AF_INET), ("udp6", socket.AF_INET6)):
        dump, _, _ = dump_vs_proc(read_builtin, name)
        assert len("\n".join(dump)) > 32768
        mine = {endpoint(s.getsockname(), fam) for s in owned.all if s.family == fam}
        assert mine <= {line.split()[1] for line in dump[1:]}


# ---------------------------------------------------------------- headers

@pytest.mark.parametrize("name,kind,fam,addr", [
    ("tcp6", socket.SOCK_STREAM, socket.AF_INET, "127.0.0.1"),
    ("tcp", socket.SOCK_STREAM, socket.AF_INET6, "::1"),
    ("udp6", socket.SOCK_DGRAM, socket.AF_INET, "127.0.0.1"),
    ("udp", socket.SOCK_DGRAM, socket.AF_INET6, "::1"),
])
def test_header_survives_filtered_first_sockets(read_builtin, owned, name, kind, fam, addr):
    """Fill the table with the other family: the iteration then almost surely
    starts with sockets this dumper filters out, and the header must not go with
    them (dump_vs_proc checks it is the first line, once)."""
    for _ in range(200):
        s = owned.add(socket.socket(fam, kind))
        s.bind((addr, 0))
        if kind == socket.SOCK_STREAM:
            s.listen(1)
    if name.startswith("tcp"):
        dump, _, _ = tcp_vs_proc(read_builtin, name)
    else:
        dump, _, _ = dump_vs_proc(read_builtin, name)
    assert not any(line.split()[1] == endpoint(s.getsockname(), fam)
                   for s in owned.all for line in dump[1:]), "other family leaked in"


# ---------------------------------------------------------------- unix

def test_unix_matches_proc(read_builtin, owned, tmp_path):
    path = str(tmp_path / "listener.sock")
    lst = owned.add(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    lst.bind(path)
    lst.listen(1)
    abstract = owned.add(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
    abstract.bind(f"\0bpfdumpfs\0test\x01{os.getpid()}")
    auto = owned.add(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
    auto.bind("")  # autobind: a 5 hex digit abstract name
    pair = owned.add(*socket.socketpair())
    dump, before, after = dump_vs_proc(read_builtin, "unix")

    by_inode = {line.split()[6]: line for line in dump[1:]}
    want = {
        lst: ("00010000", "0001", "01", path),
        abstract: ("00000000", "0002", "01", f"@bpfdumpfs@test\x01{os.getpid()}"),
        pair[0]: ("00000000", "0001", "03", None),
        pair[1]: ("00000000", "0001", "03", None),
    }
    for sock, (flags, typ, st, shown) in want.items():
        line = by_inode.get(str(inode(sock)))
        assert line is not None, f"socket inode {inode(sock)} not in the dump"
        assert line in before + after, f"not as /proc shows it: {line!r}"
        t = line.split(" ")
        assert (t[3], t[4], t[5]) == (flags, typ, st), line
        if shown is None:
            assert len(line.split()) == 7, f"unbound socket shows a path: {line!r}"
        else:
            assert line.endswith(" " + shown), line
    line = by_inode[str(inode(auto))]
    assert re.fullmatch(r".* @[0-9a-f]{5}", line), line


# ---------------------------------------------------------------- netlink

def test_netlink_matches_proc(read_builtin, owned):
    route = owned.add(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE))
    route.bind((0, 0x1 | 0x400))  # RTMGRP_LINK | RTMGRP_IPV6_ROUTE
    generic = owned.add(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW,
                                      16))  # NETLINK_GENERIC
    generic.bind((0, 0))
    dump, before, after = dump_vs_proc(read_builtin, "netlink")

    by_inode = {line.split()[9]: line for line in dump[1:]}
    for sock, proto, groups in ((route, "0", "00000401"), (generic, "16", "00000000")):
        line = by_inode.get(str(inode(sock)))
        assert line is not None, f"netlink socket inode {inode(sock)} not in the dump"
        t = line.split()
        assert (t[1], t[2], t[3]) == (proto, str(sock.getsockname()[0]), groups), line
        assert line in before + after


# ---------------------------------------------------------------- ipv6_route

def test_ipv6_route_byte_for_byte(read_builtin):
    for _ in range(2):
        with open("/proc/net/ipv6_route", "rb") as f:
            before = f.read()
        dump = read_builtin("ipv6_route")
        with open("/proc/net/ipv6_route", "rb") as f:
            after = f.read()
        if before == after:
            assert dump == before
            assert dump, "no routes at all: not even the null entry"
            return
    pytest.fail("/proc/net/ipv6_route kept changing between reads")
