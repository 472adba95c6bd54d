"""Seekable's offsets over a stand-in Reader: pure logic, no kernel (the end-to-end
tests of seeking are in test_fidelity.py, test_access.py and test_namespaces.py)."""
from __future__ import annotations

import random

import pytest

from bpfdumpfs.errors import DumperError
from bpfdumpfs.seek import BACK, Seekable

DUMP = bytes(random.Random(1).randrange(256) for _ in range(300_000))


class FakeStream:
    label = "test/fake"


class FakeReader:
    """A seq_file's output in chunks of CHUNK, as Reader.read returns it."""

    def __init__(self, data: bytes, runs: list, chunk: int = 32768) -> None:
        self.data, self.at, self.chunk = data, 0, chunk
        self.stream = FakeStream()
        self.released = False
        runs.append(self)

    quick = True
    streaming = False

    def read(self, size: int) -> list:
        assert not self.released
        out = []
        while size and self.at < len(self.data):
            n = min(size, self.chunk - self.at % self.chunk, len(self.data) - self.at)
            out.append(memoryview(self.data)[self.at:self.at + n])
            self.at += n
            size -= n
        return out

    def park(self, size: int, deliver) -> bool:
        return False

    def release(self) -> None:
        self.released = True


def seekable(data: bytes = DUMP) -> tuple[Seekable, list]:
    runs: list = []
    return Seekable(FakeReader(data, runs), lambda: FakeReader(data, runs)), runs


def read(s: Seekable, offset: int, size: int) -> bytes:
    return b"".join(s.read(offset, size))


def test_random_offsets_get_their_bytes_and_runs_again_only_beyond_back():
    s, runs = seekable()
    rng = random.Random(7)
    for _ in range(1000):
        off = rng.choice([s.pos, s.pos - rng.randrange(1, BACK), rng.randrange(len(DUMP) + 9)])
        off = max(off, 0)
        size = rng.choice([1, 4096, 65536, 131072])
        before, kept, made = s.pos, len(s.back), len(runs)
        assert read(s, off, size) == DUMP[off:off + size], (off, size)
        assert len(runs) == made + (off < before - kept), (off, before, kept)
    assert all(r.released for r in runs[:-1]) and not runs[-1].released
    assert len(s.back) <= BACK


def test_sequential_reads_never_run_again_and_keep_only_back():
    s, runs = seekable()
    pos = 0
    while chunk := read(s, pos, 1):  # dd bs=1
        pos += len(chunk)
        if pos > 100_000:
            break
    while chunk := read(s, pos, 1 << 20):
        pos += len(chunk)
    assert pos == len(DUMP) and len(runs) == 1 and len(s.back) == BACK
    assert bytes(s.back) == DUMP[-BACK:]


def test_a_read_across_the_kept_bytes_and_the_position_is_whole():
    s, _ = seekable()
    read(s, 0, 100_000)
    assert read(s, 90_000, 20_000) == DUMP[90_000:110_000]
    assert s.pos == 110_000


def test_a_re_run_that_fails_leaves_the_file_where_it_was():
    runs: list = []

    def fail():
        raise DumperError(5, "remaking")
    s = Seekable(FakeReader(DUMP, runs), fail)
    read(s, 0, 200_000)
    with pytest.raises(DumperError):
        read(s, 0, 10)
    assert read(s, 200_000, 10) == DUMP[200_000:200_010] and not runs[0].released


def test_a_re_run_finishing_after_release_releases_its_seq_file():
    runs: list = []
    s = Seekable(FakeReader(DUMP, runs), lambda: (s.release(), FakeReader(DUMP, runs))[1])
    read(s, 0, 200_000)
    with pytest.raises(DumperError):
        read(s, 0, 10)
    assert len(runs) == 2 and all(r.released for r in runs)
