"""Refusals logged in bounded number: one user retrying a refused open in a loop
wrote 32,108 lines (4.9 MB) in 5 s. Each uid gets BURST lines per WINDOW seconds;
the rest are counted, and the count is logged with that uid's next refusal after
the window."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

BURST = 10
WINDOW = 10.0
_KEEP = 1024  # uids remembered at most; older windows are dropped first


@dataclass
class _Window:
    start: float
    logged: int = 0
    dropped: int = 0


class Refusals:
    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.windows: dict[int, _Window] = {}
        self.lock = threading.Lock()  # refusals come from trio and the device's threads

    def warn(self, uid: int, msg: str, *args) -> None:
        """log.warning(MSG, *ARGS) for a refusal of UID, unless UID is over its share."""
        now = time.monotonic()
        with self.lock:
            w = self.windows.get(uid)
            if w is None or now - w.start >= WINDOW:
                if w is not None and w.dropped:
                    self.log.warning("%d more refusals of uid %d were not logged (at most %d "
                                     "lines in %g s)", w.dropped, uid, BURST, WINDOW)
                self.windows.pop(uid, None)
                if len(self.windows) >= _KEEP:
                    del self.windows[next(iter(self.windows))]
                w = self.windows[uid] = _Window(now)
            if w.logged >= BURST:
                w.dropped += 1
                return
            w.logged += 1
            last = w.logged == BURST
        self.log.warning(msg + ("; further refusals of this uid are counted, not logged, "
                                f"for {WINDOW:g} s" if last else ""), *args)
