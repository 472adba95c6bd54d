"""Refusals logged in bounded number, on a clock the test moves: BURST lines per uid
per WINDOW seconds, the rest counted and the count logged with that uid's next
refusal after the window."""
from __future__ import annotations

import pytest

from bpfdumpfs import refusals
from bpfdumpfs.refusals import BURST, WINDOW, Refusals


class Clock:
    """time.monotonic for refusals.py, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class Log:
    """The logger Refusals writes to: its warning lines, formatted."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def warning(self, msg: str, *args) -> None:
        self.lines.append(msg % args)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(refusals, "time", c)
    return c


def test_burst_lines_per_uid_then_silence(clock):
    """A uid's first BURST refusals are logged, the last of them saying that more are
    counted, not logged; the rest of the window, nothing; another uid is not held
    back by it."""
    log = Log()
    r = Refusals(log)
    for i in range(3 * BURST):
        r.warn(1000, "refused open of %s by uid %d", f"task/t{i}", 1000)
        clock.now += 0.01
    assert len(log.lines) == BURST
    assert log.lines[0] == "refused open of task/t0 by uid 1000"
    assert all("counted, not logged" not in ln for ln in log.lines[:-1])
    assert log.lines[-1].startswith(f"refused open of task/t{BURST - 1} by uid 1000; "
                                    "further refusals of this uid are counted, not logged")
    r.warn(1001, "refused uid %d", 1001)
    assert log.lines[-1] == "refused uid 1001"


def test_after_the_window_the_count_is_logged_and_a_new_burst_begins(clock):
    log = Log()
    r = Refusals(log)
    for _ in range(BURST + 15):
        r.warn(7, "refused")
    clock.now += WINDOW - 0.001
    r.warn(7, "refused")  # still the same window: counted
    assert len(log.lines) == BURST
    clock.now += 0.001
    r.warn(7, "refused")
    count = (f"16 more refusals of uid 7 were not logged (at most {BURST} lines in "
             f"{WINDOW:g} s)")
    assert log.lines[BURST:] == [count, "refused"]
    for _ in range(BURST - 1):
        r.warn(7, "refused")
    assert len(log.lines) == 2 * BURST + 1  # the new window's burst, whole


def test_no_count_line_when_nothing_was_dropped(clock):
    log = Log()
    r = Refusals(log)
    r.warn(3, "refused")
    clock.now += WINDOW
    r.warn(3, "refused")
    assert log.lines == ["refused", "refused"]


def test_many_uids_are_remembered_in_bounded_number(clock):
    """A refusal from each of many uids (a user namespace's range) does not grow
    memory without bound."""
    r = Refusals(Log())
    for uid in range(100_000, 105_000):
        r.warn(uid, "refused")
    assert len(r.windows) <= 1024
