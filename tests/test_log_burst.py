"""The log's bound on unexpected errors (``simfs.daemon.ErrorBurst``): a
container user who makes the daemon fail again and again (an audit wrote
24,000 tracebacks, 9.8 MB, in 7 s) gets a bounded log: per window, a few
whole tracebacks, then one line each, then nothing but a count, said once
the next window starts."""

from __future__ import annotations

import io
import logging

from simfs.daemon import ErrorBurst


def test_unexpected_errors_are_bounded_per_window():
    out = io.StringIO()
    h = logging.StreamHandler(out)
    h.setFormatter(logging.Formatter("%(message)s"))
    burst = ErrorBurst(tracebacks=2, lines=5, window=60.0)
    now = [1000.0]
    burst._clock = lambda: now[0]
    h.addFilter(burst)
    log = logging.getLogger("test-burst")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.handlers[:] = [h]
    for i in range(50):
        try:
            raise ValueError(f"boom {i}")
        except ValueError:
            log.exception("unexpected error %d", i)
    log.info("an ordinary line")
    text = out.getvalue()
    assert text.count("Traceback") == 2
    assert text.count("unexpected error") == 5
    assert text.count("traceback left out") == 3
    assert "unexpected error 5" not in text
    assert "an ordinary line" in text and burst.dropped == 45
    now[0] += 61                                   # the next window says how many
    log.info("later")
    assert "later [45 unexpected errors not logged before this]" in out.getvalue()
    try:
        raise ValueError("again")
    except ValueError:
        log.exception("once more")
    assert out.getvalue().count("Traceback") == 3
