"""What the daemon holds of the host: memory given back after bursts of reads, and
the file descriptors its limits allow."""
from __future__ import annotations

import logging
import os
import resource
from collections.abc import Callable

import trio

from . import libc
from .limits import Limits
from .pins import LINK_CACHE_MAX

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8
TRIM_EVERY = 0.5        # seconds between looks for freed buffers to give back
TRIM_SLACK = 2 << 20    # spare bytes gained since the last trim that are worth a trim
PAGE = os.sysconf("SC_PAGE_SIZE")
FD_SPARE = 64           # files the daemon holds besides seq_files and cached links (~20)


def bound_memory() -> None:
    """Keep freed read buffers out of the daemon's RSS. glibc gives reading threads
    arenas of their own, and malloc_trim cannot shrink the top of those: after a
    burst of streams, up to ~10 MiB stayed resident in the second arena of two.
    One arena costs no contention here, since nearly every allocation is made
    under the GIL. Chunks of 128 KiB and more are mapped (and so returned) one by
    one, instead of glibc raising that threshold as buffers come and go."""
    libc.lib.mallopt(M_ARENA_MAX, 1)
    libc.lib.mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def raise_fd_limit(limits: Limits) -> None:
    """Let the daemon hold the files its own limits allow: a seq_file per open file
    and a link per cached dumper. A systemd service starts with a soft RLIMIT_NOFILE
    of 1024 (what keeps select() working; nothing here uses it), which would fail
    opens with EIO long before max_handles; the hard limit is the one to go by. If
    even that is too low, say so at start."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # an open file holds its seq_file and, when its dumper is not cached, a link of its
    # own (to re-run it for a seek back)
    need = 2 * limits.max_handles + LINK_CACHE_MAX + FD_SPARE
    if limits.max_handles and hard < need:
        log.warning("RLIMIT_NOFILE is %d, and max_handles (%d) with the link cache (%d) "
                    "needs %d: opens beyond it will fail with EIO; raise it (ulimit -n; "
                    "LimitNOFILE= for the service) or lower max_handles", hard,
                    limits.max_handles, LINK_CACHE_MAX, need)


def _spare() -> int:
    """The daemon's resident bytes that malloc does not hold in use: what a trim could
    give back, besides what is not malloc's (code, stacks, Python's object arenas),
    which moves little. Its count of in-use bytes is a walk of its bins, us."""
    with open("/proc/self/statm", "rb") as f:
        rss = int(f.read().split()[1]) * PAGE
    m = libc.lib.mallinfo2()
    return rss - m.uordblks - m.hblkhd


async def give_back_memory(streaming: Callable[[], bool],
                           release: Callable[[bool], None]) -> None:
    """Readers' buffers come and go in bursts (32 streams of a large dump hold tens
    of MiB at once), and glibc keeps what they leave in its heaps, in fragments,
    until told. Once the spare bytes (_spare) are TRIM_SLACK above their lowest
    since the last trim, and no file is being read ahead, glibc is told: soon after
    a burst, even while other files stay open (a `less` left open must not keep the
    daemon's memory up), and again for what is freed or faulted back in after that
    trim -- but not in the middle of streams, whose buffers the heap reuses and
    whose reads a trim (ms, holding the heap) would hold up.

    Neither count alone will do. glibc's free bytes include what a trim gave back,
    so a burst that came and went between two looks, faulting those pages back in,
    left them where they were (+9-11 MiB kept in 4 of 10 trials). RSS counts what is
    in use, so a look while paused readers held their read-ahead took that as the
    new low, and nothing was given back when they closed (+12 MiB, every time).

    RELEASE(streaming) gives back the read-ahead chunks the data plane keeps for
    streams to come (core.trim): all but a stream's worth while files stream, so
    that a burst's do not stay while one stream goes on, and all after."""
    low = _spare()
    while True:
        await trio.sleep(TRIM_EVERY)
        busy = streaming()
        await trio.to_thread.run_sync(release, busy)
        if busy:
            continue
        spare = _spare()
        low = min(low, spare)
        if spare - low > TRIM_SLACK:
            await trio.to_thread.run_sync(trim_memory)
            low = _spare()


def trim_memory() -> None:
    """Give what malloc holds free back to the system."""
    libc.lib.malloc_trim(0)
