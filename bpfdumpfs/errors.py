"""The one exception type of bpfdumpfs.

Every failure a user can cause or meet -- a kernel refusal, a bad name, a missing
parameter -- is a DumperError: an OSError whose errno is what `cat`, `ls` and shell
scripts see, whose message says what was attempted on what, and whose hint says how
to fix it. A verifier rejection also carries the verifier log.
"""
from __future__ import annotations

import errno as _errno
import os


class DumperError(OSError):
    """errno + what was attempted + how to fix it (+ the verifier log, if any)."""

    errno: int

    def __init__(self, err: int | None, what: str, hint: str = "", log: str = "") -> None:
        # an OSError passed on may carry no errno: it failed all the same
        super().__init__(err or _errno.EIO, what)
        self.what = what
        self.hint = hint
        self.log = log

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        text = f"{self.what}: {os.strerror(self.errno)} ({name})"
        return f"{text}; {self.hint}" if self.hint else text
