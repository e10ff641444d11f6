"""The event loop for a session served by a reader thread.

Role: ``new_event_loop()`` makes the standard library's asyncio loop with two
changes, so that a thread blocked in ``read(2)`` on ``/dev/fuse`` can answer
requests inline while everything else the daemon does stays on the loop:

- the loop holds its ``lock`` (``LOCK_ATTR``) whenever it runs anything and
  lets go of it only while it waits in ``epoll_wait``; the reader thread takes
  the same lock around each request.  So a request's handler and any callback
  or task step of the loop never run at the same time: each sees the other's
  work whole, exactly as when both ran on one thread.
- a callback scheduled from another thread (``call_soon``/``call_at`` not on
  the loop's thread: a handler run by the reader that creates a task, cancels
  one, completes a future or sets a timer) wakes the loop, so it is run at
  once and not at the loop's next wake-up.

Concurrency: the lock is a plain ``threading.Lock``; whoever holds it may use
the loop's non-thread-safe methods.  The reader gives the loop its turn
before the next request whenever the loop has something to run (a timer due,
a callback scheduled, an event: ``_Selector.must_yield``), so a stream of
requests cannot hold up timers, signals or the control socket, and the order
is that of one thread.  uvloop cannot be used this way (it has no
hook around its poll), so a session on uvloop reads from a reader callback.
"""

from __future__ import annotations

import asyncio
import math
import selectors
import threading
import time

LOCK_ATTR = "fusewire_lock"

_get_ident = threading.get_ident
_monotonic = time.monotonic


class _Selector(selectors.EpollSelector):
    """epoll that lets go of the loop's lock while it waits.

    The loop must get its turn as it would on one thread: a timer that is due,
    or a callback a handler scheduled, runs before the next request.  The lock
    alone does not give that (it is not fair, and the loop thread may not even
    be scheduled yet when the reader comes back with the next request), so the
    loop tells the reader when its wait ends at the latest (``due``), when it
    waits for the lock (``waiting``) and when it was woken from the reader's
    thread (``kicked``); seeing any of these the reader waits until the loop
    has had its turn (``yield_to_loop``)."""

    def __init__(self, lock: threading.Lock):
        super().__init__()
        self._lock = lock
        self.due = math.inf               # monotonic time the loop's wait ends by
        self.waiting = 0                  # the loop waits for the lock
        self.kicked = False               # woken from another thread, not yet run
        self.turns = 0                    # the loop's turns so far
        self.turn = threading.Condition(threading.Lock())

    def select(self, timeout=None):
        lock = self._lock
        self.due = math.inf if timeout is None else _monotonic() + timeout
        lock.release()
        try:
            return super().select(timeout)
        finally:
            turn = self.turn
            with turn:
                self.waiting += 1
            lock.acquire()
            with turn:
                self.waiting -= 1
                self.kicked = False
                self.due = math.inf
                self.turns += 1
                turn.notify_all()

    def must_yield(self) -> bool:
        """Whether the reader should let the loop run first (unlocked: a hint)."""
        return bool(self.waiting or self.kicked or _monotonic() >= self.due)

    def yield_to_loop(self, running) -> None:
        """From the reader, before it takes the lock: wait until the loop has
        had a turn (or stopped running: ``running()`` false)."""
        turn = self.turn
        with turn:
            seen = self.turns
            while self.turns == seen and running():
                turn.wait(0.005)


class Loop(asyncio.SelectorEventLoop):
    """asyncio's selector loop holding ``fusewire_lock`` while it runs."""

    def __init__(self):
        self.fusewire_lock = threading.Lock()
        self.fusewire_selector = _Selector(self.fusewire_lock)
        super().__init__(self.fusewire_selector)

    def run_forever(self):
        with self.fusewire_lock:
            return super().run_forever()

    def call_soon(self, callback, *args, context=None):
        handle = super().call_soon(callback, *args, context=context)
        if self._thread_id != _get_ident():
            self._kick()                    # from the reader thread: wake the loop
        return handle

    def call_at(self, when, callback, *args, context=None):
        handle = super().call_at(when, callback, *args, context=context)
        if self._thread_id != _get_ident():
            self._kick()
        return handle

    def _kick(self) -> None:
        if self._thread_id is not None:     # running: its turn before the next request
            self.fusewire_selector.kicked = True
        self._write_to_self()


def new_event_loop() -> Loop:
    return Loop()
