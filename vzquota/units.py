"""Parsing and printing of the CLI's units: times, 1 KiB blocks, inode counts.

Role: the edge between what a user types or reads (SPEC section 3: 1 KiB blocks,
``[[[dd:]hh:]mm:]ss`` or ``N<h|d|w|m|y>`` times, ``HH:MM`` / ``<d>days`` grace
strings) and the model's integers (bytes, counts, epoch seconds). Parsers raise
``ValueError`` with a message fit for the user; the CLI maps it to exit code 2.

Concurrency: pure functions and constants only; safe from any thread.
"""

from __future__ import annotations

import re

UNLIMITED = 2**63 - 1
"""The value of the word ``unlimited`` (1 KiB blocks or inodes)."""

MINUTE = 60
HOUR = 60 * MINUTE
DAY = 24 * HOUR

_TIME_SUFFIX = {"s": 1, "h": HOUR, "d": DAY, "w": 7 * DAY, "m": 30 * DAY, "y": 365 * DAY}
_BLOCK_SUFFIX = {"k": 1, "m": 1024, "g": 1024**2, "t": 1024**3}
_CLOCK_FIELDS = ((1, 60, "seconds"), (MINUTE, 60, "minutes"), (HOUR, 24, "hours"),
                 (DAY, None, "days"))
_DIGITS = re.compile(r"[0-9]+")
_TIME_HELP = ("use seconds, [[[dd:]hh:]mm:]ss, or a number with a suffix "
              "h (hours), d (days), w (weeks), m (30-day months), y (365-day years)")


def parse_time(s: str) -> int:
    """Return the seconds meant by ``s`` (a grace period).

    Forms: ``90`` (seconds); ``[[[dd:]hh:]mm:]ss`` with ss, mm < 60 and hh < 24 as
    in the original (so ``90:00`` is refused), e.g. ``7:00:00:00``; ``N`` followed by
    one of s/h/d/w/m/y, case-insensitive (m = 30 days, y = 365 days), e.g. ``7d``.
    """
    text = s.strip()
    if not text:
        raise ValueError(f"empty time; {_TIME_HELP}")
    if text.startswith("-"):
        raise ValueError(f"negative time {s!r}")
    if _DIGITS.fullmatch(text):
        return int(text)
    unit = _TIME_SUFFIX.get(text[-1].lower())
    if unit is not None:
        number = text[:-1]
        if not _DIGITS.fullmatch(number):
            raise ValueError(f"bad time {s!r}; {_TIME_HELP}")
        return int(number) * unit
    fields = text.split(":")
    if len(fields) > 4 or not all(_DIGITS.fullmatch(f) for f in fields):
        raise ValueError(f"bad time {s!r}; {_TIME_HELP}")
    total = 0
    # rightmost first: seconds, minutes, hours, days; only days are unbounded
    for text_value, (scale, bound, name) in zip(reversed(fields), _CLOCK_FIELDS):
        value = int(text_value)
        if bound is not None and value >= bound:
            raise ValueError(f"bad time {s!r}: {name} must be below {bound}")
        total += value * scale
    return total


def parse_blocks(s: str) -> int:
    """Return a space value in 1 KiB blocks.

    A plain integer is 1 KiB blocks; a K/M/G/T suffix (any case, powers of 1024)
    scales it (``1K`` = 1 block, ``1M`` = 1024 blocks); ``unlimited`` is UNLIMITED.
    """
    text = s.strip()
    if text.lower() == "unlimited":
        return UNLIMITED
    scale = 1
    if text and text[-1].lower() in _BLOCK_SUFFIX:
        scale = _BLOCK_SUFFIX[text[-1].lower()]
        text = text[:-1]
    if not _DIGITS.fullmatch(text):
        raise ValueError(f"bad block value {s!r}: use a non-negative integer of 1K blocks, "
                         "optionally with a K/M/G/T suffix, or 'unlimited'")
    value = int(text) * scale
    if value > UNLIMITED:
        raise ValueError(f"block value {s!r} is too large")
    return value


def parse_count(s: str) -> int:
    """Return an inode count: a non-negative integer or ``unlimited`` (UNLIMITED)."""
    text = s.strip()
    if text.lower() == "unlimited":
        return UNLIMITED
    if not _DIGITS.fullmatch(text):
        raise ValueError(f"bad inode count {s!r}: use a non-negative integer or 'unlimited'")
    value = int(text)
    if value > UNLIMITED:
        raise ValueError(f"inode count {s!r} is too large")
    return value


def kib(nbytes: int) -> int:
    """Bytes to 1 KiB blocks, rounded up."""
    return -(-nbytes // 1024)


def format_time_left(seconds: int) -> str:
    """A span as the grace column prints it: ``<d>days`` or ``HH:MM``; 0 gives "".

    Rounded to the nearest minute (30 s rounds up), so 29 s is ``00:00`` and
    86370 s is ``1days``. Also used for grace *periods* in the ``-t`` table.
    """
    if seconds <= 0:
        return ""
    minutes = (seconds + 30) // 60
    if minutes >= 1440:
        return f"{minutes // 1440}days"
    return f"{minutes // 60 % 24:02d}:{minutes % 60:02d}"


def format_deadline(deadline: int, now: int) -> str:
    """The grace column for a timer: "" when none runs, ``none`` once expired."""
    if not deadline:
        return ""
    if deadline <= now:
        return "none"
    return format_time_left(deadline - now)
