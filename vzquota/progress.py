"""Progress of a scan on a terminal: inodes so far, rate and elapsed time.

Role: ``counter(what, quiet)`` gives a callback for ``scan(progress=...)`` and
a ``close(total)``.  On a terminal (standard error is a tty) and unless quiet,
it draws one line with tqdm (a well-kept library that handles an unknown
total, the rate, the elapsed time, terminal width and redraw throttling);
otherwise both are no-ops, so pipes, logs and cron get nothing.

Concurrency: the callback runs in the scanning thread (``scan`` calls it
from its caller's thread); one counter belongs to one scan.
"""

from __future__ import annotations

import os
import sys
import time


class Counter:
    """Drawn from the first figure on (a scan that never reports draws only
    its final line, at ``close(total)``)."""

    def __init__(self, what: str, quiet: bool = False, stream=None):
        self.what = what
        self.stream = stream or sys.stderr
        self.bar = None
        self.t0 = time.time()
        try:
            self.tty = os.isatty(self.stream.fileno()) and not quiet
        except (AttributeError, OSError, ValueError):
            self.tty = False

    def _open(self) -> None:
        from tqdm import tqdm
        try:
            size = os.get_terminal_size(self.stream.fileno())
        except OSError:
            size = os.terminal_size((0, 0))
        # A fresh pty may say 0x0, with which tqdm draws nothing at all.
        self.bar = tqdm(desc=self.what, unit=" inodes", unit_scale=True, total=None,
                        file=self.stream, mininterval=0.2, leave=True,
                        ncols=size.columns or 80, nrows=size.lines or 24)
        self.bar.start_t = self.t0

    def __call__(self, inodes: int) -> None:
        if not self.tty:
            return
        if self.bar is None:
            self._open()
        if inodes > self.bar.n:
            self.bar.update(inodes - self.bar.n)

    def close(self, total: int | None = None) -> None:
        """End the line; ``total`` is the final count (None: the scan failed)."""
        if not self.tty:
            return
        if self.bar is None and total is not None:
            self._open()
        if self.bar is None:
            return
        if total is not None and total != self.bar.n:
            self.bar.update(total - self.bar.n)
        self.bar.close()
        self.bar = None
        self.tty = False


def counter(what: str, quiet: bool = False) -> Counter:
    return Counter(what, quiet)
