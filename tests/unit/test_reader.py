"""Reader over a stand-in seq_file, and the Budget, UID_SHARE and Pace it answers to:
pure logic, no kernel. What a FUSE read sees (the dump's bytes in order, short only
at the end, errors after the output before them), how far a producer reads ahead
of a reader that stopped, and what release gives back."""
from __future__ import annotations

import errno
import random
import threading
import time
from collections.abc import Callable, Hashable, Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpfdumpfs.core import LEARN_READS, QUICK_NS, Pace
from bpfdumpfs.errors import DumperError
from bpfdumpfs.reader import (
    MAX_AHEAD,
    MAX_PIECES,
    READ_AHEAD,
    UID_SHARE,
    Budget,
    Reader,
)

DATA = random.Random(22).randbytes(4 << 20)
CHUNK = 1000  # bytes per kernel read of the stand-in, unless a test says otherwise


def eventually(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Whether COND() becomes true within TIMEOUT seconds (polled, never a fixed wait)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    return True


def chunked(data: bytes, size: int = CHUNK) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


class FakeStream:
    """Stands in for dumpers.Stream: Reader calls read_chunk() (bytes, b"" at the end,
    or DumperError), reads .label and calls close(). With a GATE, each kernel read
    first takes one permit of it: a producer as slow as the test wants."""

    label = "test/fake"

    def __init__(self, items: Iterable[bytes | Exception],
                 gate: threading.Semaphore | None = None) -> None:
        self.items = iter(items)
        self.gate = gate
        self.produced = 0      # bytes handed to the reader
        self.calls = 0
        self.inside = 0        # threads inside read_chunk now
        self.closed = 0
        self.misuse: list[str] = []  # raising would be swallowed by a producer thread

    def read_chunk(self) -> bytes:
        if self.closed:
            self.misuse.append("read_chunk after close")
        self.inside += 1
        try:
            if self.gate is not None and not self.gate.acquire(timeout=10):
                self.misuse.append("gate never opened")
                return b""
            self.calls += 1
            item = next(self.items, b"")
            if isinstance(item, Exception):
                raise item
            self.produced += len(item)
            return item
        finally:
            self.inside -= 1

    def close(self) -> None:
        if self.inside:
            self.misuse.append("close while a kernel read is in progress")
        self.closed += 1


def reader_of(stream: FakeStream, budget: Budget | None = None,
              uid: Hashable = (1000, "pid:[1]")) -> Reader:
    return Reader(stream, Pace(), (budget or Budget(0)).account(uid))


def joined(pieces: list) -> bytes:
    return b"".join(bytes(p) for p in pieces)


class Consumer:
    """Reads a Reader the way FUSE does, checking each reply against DATA."""

    def __init__(self, reader: Reader, data: bytes = DATA) -> None:
        self.reader, self.data, self.pos = reader, data, 0

    def read(self, size: int) -> bytes:
        out = joined(self.reader.read(size))
        assert out == self.data[self.pos:self.pos + size], (self.pos, size, len(out))
        self.pos += len(out)
        return out

    def drain(self, size: int) -> None:
        while self.read(size):
            pass
        assert self.pos == len(self.data)


@pytest.fixture
def cleanup():
    """Readers (and gates) to release at the end, so no producer thread outlives its test."""
    readers: list[tuple[Reader, threading.Semaphore | None]] = []
    yield lambda r, gate=None: readers.append((r, gate)) or r
    for r, gate in readers:
        r.release()
        if gate is not None:
            gate.release(1000)


# -- reads -------------------------------------------------------------------------

@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(1, 40_000), min_size=1, max_size=20),
       st.lists(st.integers(1, 70_000), min_size=1, max_size=8),
       st.integers(0, 300_000))
def test_reads_return_the_dump_in_order_whole_and_short_only_at_the_end(
        chunk_sizes: list[int], read_sizes: list[int], length: int):
    """Whatever the kernel's chunking and the reader's read sizes (smaller and larger
    than a kernel buffer, so producers start and stop), consecutive reads return the
    dump's bytes in order, each read whole until the end, then empty reads; no reply
    has more pieces than one writev should take; the seq_file is closed once."""
    data = DATA[:length]
    items, pos, i = [], 0, 0
    while pos < length:
        n = chunk_sizes[i % len(chunk_sizes)]
        items.append(data[pos:pos + n])
        pos, i = pos + n, i + 1
    stream = FakeStream(items)
    r = reader_of(stream)
    pos, i = 0, 0
    while True:
        size = read_sizes[i % len(read_sizes)]
        pieces = r.read(size)
        assert len(pieces) <= MAX_PIECES
        out = joined(pieces)
        assert out == data[pos:pos + size]
        pos, i = pos + len(out), i + 1
        if not out:
            break
    assert pos == length
    assert joined(r.read(4096)) == b""  # and still empty after the end
    r.release()
    assert eventually(lambda: stream.closed == 1), "seq_file not closed after release"
    assert stream.misuse == []


def test_a_small_read_runs_the_kernel_only_as_far_as_it_needs():
    """A read on demand makes kernel reads until it has its bytes, not the whole dump:
    `head -c 100` of a huge dump costs one kernel read."""
    stream = FakeStream(chunked(DATA))
    r = reader_of(stream)
    assert joined(r.read(100)) == DATA[:100]
    r.release()
    assert stream.calls == 1
    assert stream.closed == 1


def test_a_reply_of_many_kernel_chunks_is_joined_for_writev():
    """A read answered from more kernel chunks than MAX_PIECES comes back as fewer
    pieces (writev takes a bounded number), with the same bytes."""
    stream = FakeStream(chunked(DATA, 10))
    r = reader_of(stream)
    pieces = r.read(10 * (MAX_PIECES + 50))
    assert len(pieces) <= MAX_PIECES
    assert joined(pieces) == DATA[:10 * (MAX_PIECES + 50)]
    r.release()


# -- read-ahead --------------------------------------------------------------------

def test_a_streaming_reader_gets_read_ahead_bounded_by_read_ahead_reads(cleanup):
    """Two full reads in a row start a producer; while the reader pauses, it reads
    ahead READ_AHEAD reads' worth (overshooting by less than one kernel chunk) and
    no further; the bytes it held come back in order, and leave the budget as read."""
    size = 4096
    budget = Budget(0)
    stream = FakeStream(chunked(DATA))
    r = cleanup(reader_of(stream, budget))
    c = Consumer(r)
    c.read(size)
    c.read(size)
    assert eventually(lambda: stream.produced - c.pos >= READ_AHEAD * size
                      and not r.streaming), "no read-ahead while the reader paused"
    ahead = stream.produced - c.pos
    assert ahead < READ_AHEAD * size + CHUNK
    assert 0 < budget.held <= ahead  # the producer's bytes are what the budget counts
    c.drain(size)
    assert budget.held == 0 and budget.users == 0


def test_a_large_read_starts_a_producer_bounded_by_max_ahead(cleanup):
    """One full read larger than a kernel buffer streams at once (cat's 128 KiB reads),
    and its producer holds at most MAX_AHEAD bytes beyond one read."""
    size = 200_000  # > KERNEL_BUF on any page size up to 16 KiB; 2 * size > MAX_AHEAD
    chunk = 32768
    stream = FakeStream(chunked(DATA, chunk))
    r = cleanup(reader_of(stream))
    c = Consumer(r)
    c.read(size)
    assert eventually(lambda: stream.produced - c.pos >= size + MAX_AHEAD
                      and not r.streaming), "a large full read started no producer"
    assert stream.produced - c.pos < size + MAX_AHEAD + chunk
    c.drain(size)


def test_a_stopped_reader_holds_no_more_than_its_users_share(cleanup):
    """A producer whose user has spent UID_SHARE of the budget stops while its reader
    waits for nothing (a `less` left open); the reader's reads are then made on
    demand, still whole and in order, and the budget empties as they are read."""
    limit = 20_000
    budget = Budget(limit)
    data = DATA[:300_000]
    stream = FakeStream(chunked(data))
    r = cleanup(reader_of(stream, budget, uid="u"))
    c = Consumer(r, data)
    c.read(8192)
    c.read(8192)  # a producer may hold 3 * 8192 > UID_SHARE * limit
    assert eventually(lambda: not r.streaming), "the producer never stopped"
    assert limit * UID_SHARE <= budget.held < limit * UID_SHARE + CHUNK
    for _ in range(5):
        c.read(8192)
    c.drain(8192)
    assert budget.held == 0


def test_one_users_stopped_readers_leave_read_ahead_for_another_user(cleanup):
    """One user's stopped readers hold at most UID_SHARE of the budget, so another
    user's reader still gets read-ahead; all together hold at most the budget."""
    limit = 40_000
    budget = Budget(limit)
    a, b = (1000, "pid:[4026531836]"), (1001, "pid:[4026531836]")
    held: list[Consumer] = []
    data = DATA[:300_000]
    for uid in (a, a, b):  # one at a time, so each producer settles before the next
        stream = FakeStream(chunked(data))
        c = Consumer(cleanup(reader_of(stream, budget, uid)), data)
        c.read(8192)
        c.read(8192)
        assert eventually(lambda r=c.reader: not r.streaming), "a producer never stopped"
        held.append(c)
    assert budget.held_by(a) < limit * UID_SHARE + CHUNK
    assert budget.held_by(b) > 0, "the second user got no read-ahead"
    assert budget.held < limit + CHUNK
    # reading on frees the budget as the bytes are handed out
    for c in held:
        c.drain(65536)
    assert budget.held == 0 and budget.users == 0


def test_no_producer_while_the_budget_is_spent_and_one_once_it_is_not(cleanup):
    """Full reads in a row start no producer while the budget is spent by others: the
    reads are answered on demand; once budget is freed, the next full read streams."""
    limit = 50_000
    budget = Budget(limit)
    other = budget.account("someone else")
    other.add(limit)
    stream = FakeStream(chunked(DATA))
    r = cleanup(reader_of(stream, budget, "me"))
    c = Consumer(r)
    for _ in range(4):
        c.read(4096)
        assert not r.streaming
        assert stream.produced - c.pos < CHUNK  # read on demand, nothing ahead
    other.add(-limit)
    c.read(4096)
    assert eventually(lambda: stream.produced - c.pos >= READ_AHEAD * 4096), \
        "no producer once the budget was given back"
    c.drain(4096)


# -- a slow producer ---------------------------------------------------------------

def streaming_gated(cleanup, items: list, size: int = 4096) -> tuple[Reader, FakeStream,
                                                                      threading.Semaphore]:
    """A reader whose producer has started and waits inside a kernel read for the gate:
    two full reads of SIZE have been made (with 9 kernel reads of CHUNK)."""
    gate = threading.Semaphore(9)
    stream = FakeStream(items, gate)
    r = cleanup(reader_of(stream), gate)
    assert joined(r.read(size)) == DATA[:size]
    assert joined(r.read(size)) == DATA[size:2 * size]
    assert eventually(lambda: stream.inside == 1), "the producer did not start"
    return r, stream, gate


def test_a_read_waits_for_a_slow_producer_and_gets_whole_bytes(cleanup):
    """A read of more than the producer has read so far waits for it, and returns
    whole, not short, once the slow kernel reads have caught up."""
    r, _stream, gate = streaming_gated(cleanup, chunked(DATA))
    got: list = []
    t = threading.Thread(target=lambda: got.append(joined(r.read(4096))))
    t.start()
    # the read waits for the producer (were the gate opened before it waits, the
    # producer would rightly read on for the read-ahead: not what is tested here)
    assert eventually(lambda: r.want == 4096), "the read did not wait for the producer"
    for _ in range(4):  # 808 bytes were pending: 4 more kernel reads answer 4096
        assert not got
        gate.release()
    t.join(5)
    assert not t.is_alive() and got == [DATA[8192:12288]]


def test_a_parked_read_is_answered_by_the_producer_from_its_thread(cleanup):
    """park() leaves a read with the producer, which calls deliver(pieces) from its own
    thread once it has the bytes; park() declines a read it can answer at once."""
    r, _stream, gate = streaming_gated(cleanup, chunked(DATA))
    delivered: list = []
    assert r.park(4096, lambda out: delivered.append((threading.current_thread(), out)))
    gate.release(4)
    assert eventually(lambda: delivered), "the parked read was never answered"
    thread, out = delivered[0]
    assert thread is not threading.current_thread()
    assert joined(out) == DATA[8192:12288]
    # 712 bytes are pending now: a read of fewer is answered by the caller, not parked
    assert not r.park(500, lambda out: delivered.append(out))
    assert len(delivered) == 1


def test_park_declines_without_a_producer():
    """A reader that does not stream has no producer to leave a read with."""
    r = reader_of(FakeStream(chunked(DATA)))
    assert not r.park(4096, lambda out: pytest.fail("delivered without a producer"))
    r.release()


def test_a_parked_read_gets_the_error_the_producer_met(cleanup):
    """A kernel error met by the producer is delivered to the read parked with it."""
    items = [*chunked(DATA[:9 * CHUNK]), DumperError(errno.EIO, "reading dumper test/fake")]
    r, _stream, gate = streaming_gated(cleanup, items)
    assert joined(r.read(808)) == DATA[8192:9000]  # what was read before the error
    delivered: list = []
    assert r.park(4096, delivered.append)
    gate.release()
    assert eventually(lambda: delivered), "the parked read was never answered"
    assert isinstance(delivered[0], DumperError) and delivered[0].errno == errno.EIO


# -- errors ------------------------------------------------------------------------

@pytest.mark.parametrize("producer", [True, False], ids=["producer", "on-demand"])
def test_a_kernel_error_surfaces_after_the_output_before_it(producer: bool):
    """The bytes read before a kernel error are all returned (the last read short),
    and the read after them raises the error -- again at every read after -- whether
    a producer or the reader itself met it."""
    data = DATA[:50_000]
    budget = Budget(0 if producer else 1)
    if not producer:
        budget.account("someone else").add(1)  # spent: every read is made on demand
    stream = FakeStream([*chunked(data), DumperError(errno.E2BIG, "reading dumper test/fake")])
    r = reader_of(stream, budget)
    c = Consumer(r, data)
    size = 4096
    while c.pos + size <= len(data):
        c.read(size)
    c.read(size)  # the rest, short
    assert c.pos == len(data)
    for _ in range(2):
        with pytest.raises(DumperError) as e:
            r.read(size)
        assert e.value.errno == errno.E2BIG
    r.release()
    assert eventually(lambda: stream.closed == 1)


def test_a_bug_in_the_stream_fails_that_reader_with_eio_not_the_producer(caplog):
    """An unexpected exception inside the producer's kernel reads becomes EIO for that
    reader (after the bytes read before it), and is logged."""
    size = 4096
    data = DATA[:9 * CHUNK]
    stream = FakeStream([*chunked(data), RuntimeError("bug")])
    r = reader_of(stream)
    c = Consumer(r, data)
    c.read(size)
    c.read(size)  # a producer starts, and meets the bug
    assert len(c.read(size)) == len(data) - 2 * size
    with pytest.raises(DumperError) as e:
        r.read(size)
    assert e.value.errno == errno.EIO and "internal error" in str(e.value)
    assert any(rec.exc_info and isinstance(rec.exc_info[1], RuntimeError)
               for rec in caplog.records), "the bug was not logged"
    r.release()


# -- release -----------------------------------------------------------------------

def test_release_gives_back_the_read_ahead_and_closes_the_seq_file_once():
    """Release of a reader whose producer holds read-ahead gives its bytes back to
    the budget at once and closes the seq_file exactly once."""
    budget = Budget(0)
    stream = FakeStream(chunked(DATA))
    r = reader_of(stream, budget)
    c = Consumer(r)
    c.read(4096)
    c.read(4096)
    assert eventually(lambda: budget.held > 0 and not r.streaming)
    r.release()
    assert budget.held == 0 and budget.users == 0
    assert eventually(lambda: stream.closed == 1)
    assert stream.closed == 1 and stream.misuse == []


def test_a_seq_file_is_closed_only_once_a_kernel_read_inside_it_returns():
    """Release while a producer is inside a kernel read leaves the seq_file open
    until that read returns; what it read then is given back to the budget."""
    budget = Budget(0)
    gate = threading.Semaphore(9)
    stream = FakeStream(chunked(DATA), gate)
    r = reader_of(stream, budget)
    r.read(4096)
    r.read(4096)
    assert eventually(lambda: stream.inside == 1), "the producer did not start"
    r.release()
    assert stream.closed == 0  # the producer is still inside read_chunk
    gate.release(1000)
    assert eventually(lambda: stream.closed == 1), "not closed after the read returned"
    assert budget.held == 0
    assert stream.misuse == []


def test_a_read_on_demand_in_progress_at_release_closes_after_it():
    """Release during a reader's own kernel read: the read returns its bytes, and the
    seq_file is closed after it; a later read is refused with EBADF."""
    gate = threading.Semaphore(0)
    stream = FakeStream(chunked(DATA), gate)
    r = reader_of(stream)
    got: list = []
    t = threading.Thread(target=lambda: got.append(joined(r.read(100))))
    t.start()
    assert eventually(lambda: stream.inside == 1)
    r.release()
    assert stream.closed == 0
    gate.release(1000)
    t.join(5)
    assert got == [DATA[:100]]
    assert stream.closed == 1 and stream.misuse == []
    with pytest.raises(DumperError) as e:
        r.read(CHUNK)  # 900 bytes pending are not enough: it would need the kernel
    assert e.value.errno == errno.EBADF
    assert stream.calls == 1


# -- Budget and Pace ---------------------------------------------------------------

def test_budget_of_zero_is_never_spent():
    b = Budget(0)
    a = b.account(1)
    a.add(1 << 40)
    assert not a.spent and not b.account(2).spent


def test_one_user_spends_its_share_and_leaves_the_rest_to_others():
    """A user who holds UID_SHARE of the budget is spent; another user is not, until
    everyone together holds the whole budget, when all are."""
    b = Budget(1000)
    me, you = b.account((0, "pid:[1]")), b.account((0, "pid:[2]"))  # root in two pid ns
    me.add(int(1000 * UID_SHARE) - 1)
    assert not me.spent
    me.add(1)
    assert me.spent and not you.spent
    you.add(1000 - int(1000 * UID_SHARE) - 1)
    assert not you.spent
    you.add(1)
    assert you.spent and me.spent


def test_budget_given_back_forgets_the_user():
    """Bytes given back leave the budget, and a user holding none is not remembered
    (a long-running daemon sees many users come and go)."""
    b = Budget(100)
    a = b.account(7)
    a.add(80)
    a.add(-80)
    assert b.held == 0 and b.users == 0 and not a.spent


def test_pace_learns_before_calling_a_dumper_quick():
    """A dumper is quick only after LEARN_READS reads that averaged under QUICK_NS."""
    p = Pace()
    for _ in range(LEARN_READS - 1):
        p.record(1000)
        assert not p.quick
    p.record(1000)
    assert p.quick


def test_pace_one_slow_read_makes_a_dumper_slow_at_once_and_it_recovers():
    """One read slower than QUICK_NS makes the dumper slow at once; quick reads after
    it make it quick again, gradually (a moving average)."""
    p = Pace()
    for _ in range(10):
        p.record(1000)
    p.record(QUICK_NS * 4)
    assert not p.quick
    p.record(1000)
    assert not p.quick  # one quick read does not undo a slow one
    for _ in range(20):
        p.record(1000)
    assert p.quick
