"""The cap on the inode table (``-o maxinodes``): past it, ask the kernel to
forget the least recently looked-up inodes (FUSE_NOTIFY_PRUNE, 7.45).

Role: policy only.  The table (``InodeTable``) keeps its records in
least-recently-looked-up order and says when it went past its cap
(``on_full``); the pruner picks the oldest ones nothing else needs
(``keep``: the ledger's and the passthrough's), asks the kernel through the
session (``channel().prune``) from the loop, never inside a request, and
backs off while the kernel lets nothing go.  The FORGETs that follow take
the inodes out of the table as any FORGET does.

Concurrency: the event loop only.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from typing import Callable

from .config import DEFAULT, Config

log = logging.getLogger(__name__)



class Pruner:
    """Prune passes over ``table``; ``channel()`` is the session serving the
    mount (None: pyfuse3, or not mounted), ``keep(inode)`` whether an inode
    must stay (the kernel is not asked to forget it).  A pass asks for
    ``config.prune_max`` inodes at most; passes are ``prune_gap`` seconds
    apart at least, twice that after each pass after which no inode left the
    table (the kernel uses them all), up to ``prune_gap_max``."""

    def __init__(self, table, channel: Callable[[], object], keep: Callable[[object], bool],
                 config: Config = DEFAULT):
        self.table = table
        self.config = config
        self.channel = channel
        self.keep = keep
        self._next = 0.0          # no pass before (time.monotonic)
        self._gap = self.config.prune_gap
        self._dropped = -1        # table.dropped at the last pass
        table.on_full = self.soon

    def soon(self) -> None:
        """The table went past its cap (from inside a handler): prune from the
        loop once this request is answered, never inside it."""
        channel = self.channel()
        if channel is None or not getattr(channel, "can_prune", False):
            # no PRUNE (pyfuse3, a kernel before 7.45): nothing to ask
            log.warning("%d inodes held, past maxinodes=%d: the kernel cannot be asked "
                        "to forget some (%s); the table holds what the kernel holds",
                        len(self.table.inodes) - 1, self.table.max_inodes,
                        "pyfuse3" if channel is None else
                        f"FUSE 7.{getattr(channel, 'minor', 0)}, PRUNE needs 7.45")
            return
        if not _later(self.prune, self._next - time.monotonic()):
            self.table.full = False   # the mount's periodic check does it (Mount._prunes)

    def forget_soon(self, ino: int, still: Callable[[int], bool]) -> None:
        """Ask the kernel to forget inode ``ino`` alone, from the loop once
        the request being handled is answered (never inside it), if
        ``still(ino)`` then, and again ``forget_retry`` seconds later, then
        10 and 100 times that, while ``still(ino)`` (asyncio; once under
        trio).  The kernel drops it if nothing uses it (no open file, no
        mapping, no working directory: its unused dentries go with it) and
        sends its FORGET; else it keeps it, silently.  The retries: RELEASE
        comes while the closing process is still in close(2) (the file's
        dentry is let go after it), so a first PRUNE may find the inode still
        in use (measured on 6.18: with one PRUNE alone, no FORGET in 5 s in 3
        of 16 tries; with the retries, 5 of 60 needed the second, a FORGET
        within 12 ms).  Nothing without PRUNE (pyfuse3, a kernel before
        7.45).  Used at the last release of an inode a shared writer had
        (simfs.iomode, ``IoModes.mapped``)."""
        channel = self.channel()
        if channel is None or not getattr(channel, "can_prune", False):
            return
        r = self.config.forget_retry

        def forget(tries: tuple[float, ...] = (r, 10 * r, 100 * r)) -> None:
            if not still(ino):
                return
            try:
                self.table.pruned += channel.prune((ino,))
            except OSError as e:
                if e.errno not in (errno.ENODEV, errno.ECONNABORTED, errno.EBADF):
                    log.warning("asking the kernel to forget inode %d failed: %s", ino, e)
                return
            if tries:
                _later(lambda: forget(tries[1:]), tries[0])
        _later(forget, 0.0)

    def prune(self) -> int:
        """Ask the kernel to forget the least recently looked-up inodes we may
        let go of (not ``keep``), down to 1/16 below the cap, ``prune_max`` at
        most per pass.  The kernel drops those it does not use and sends
        their FORGETs, which take them out of the table as any FORGET does
        (charged for good on the way: ``forget``); a later lookup of the same
        name adopts the same backing inode again (by its file handle, its
        number).  Returns how many were asked.  Run from the loop only."""
        table = self.table
        table.full = False
        channel = self.channel()
        if channel is None or not getattr(channel, "can_prune", False):
            return 0
        n = table.over()
        if n <= 0:
            return 0
        # back off while the kernel lets nothing go (it uses every inode asked)
        if table.dropped == self._dropped:
            self._gap = min(self._gap * 2, self.config.prune_gap_max)
        else:
            self._gap = self.config.prune_gap
        self._dropped = table.dropped
        self._next = time.monotonic() + self._gap
        ids = table.oldest(min(n, self.config.prune_max), lambda i: not self.keep(i))
        if not ids:
            return 0
        try:
            sent = channel.prune(ids)
        except OSError as e:
            if e.errno not in (errno.ENODEV, errno.ECONNABORTED, errno.EBADF):  # unmounted
                log.warning("asking the kernel to forget %d inodes failed: %s", len(ids), e)
            return 0
        table.pruned += sent
        log.debug("prune: %d inodes over, %d asked, next pass in %.3f s at the earliest",
                  n, sent, self._gap)
        return sent


def _later(fn: Callable[[], object], delay: float) -> bool:
    """Run ``fn`` from the loop, after ``delay`` seconds if positive (asyncio)
    or soon (trio: no timer here, and nothing if ``delay`` is positive).
    Whether it was scheduled."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:          # trio
        if delay > 0:
            return False
        try:
            import trio
            trio.lowlevel.current_trio_token().run_sync_soon(fn)
        except Exception:
            return False
        return True
    if delay > 0:
        loop.call_later(delay, fn)
    else:
        loop.call_soon(fn)
    return True
