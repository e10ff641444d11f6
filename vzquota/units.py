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
"""LONG_MAX: vzctl's "unlimited" (stored as 2**54 - 1 blocks, 2**32 - 1 inodes)."""

MINUTE = 60
HOUR = 60 * MINUTE
DAY = 24 * HOUR

_TIME_SUFFIX = {"h": HOUR, "d": DAY, "w": 7 * DAY, "m": 30 * DAY, "y": 365 * DAY}
_BLOCK_SUFFIX = {"k": 1, "m": 1024, "g": 1024**2, "t": 1024**3}
_CLOCK_SCALE = (1, MINUTE, HOUR, DAY)
_C_SPACE = " \t\n\v\f\r"
_STRTOL = re.compile(r"[+-]?[0-9]+")
_ASCII_DIGITS = re.compile(r"[0-9]+")
LONG_MIN, LONG_MAX = -2**63, 2**63 - 1
BLOCK_WRAP = 2**54
"""Block limits wrap like the original's ``(u64)blocks << 10`` in bytes."""
U32 = 2**32


def c_strtol(s: str) -> int:
    """The whole of ``s`` read as C's ``strtol(s, &end, 10)`` with ``*end == 0``
    required (the original's ``str2uint``/``str2u32``/``str2u64``): leading C
    white space, an optional sign, ASCII digits only; out-of-range values clamp
    to LONG_MIN/LONG_MAX as strtol does.  Raises ValueError otherwise."""
    text = s.lstrip(_C_SPACE)
    if not _STRTOL.fullmatch(text):
        raise ValueError(f"not a number: {s!r}")
    return max(LONG_MIN, min(LONG_MAX, int(text)))


def parse_time(s: str) -> int:
    """Return the seconds meant by ``s`` (a grace period), as the original's
    ``str2time`` reads it.

    Forms: ``90`` (seconds); ``[[[dd:]hh:]mm:]ss`` with ss, mm < 60 and hh < 24
    (so ``90:00`` is refused), e.g. ``7:00:00:00``; ``N`` followed by one of
    h/d/w/m/y, either case (m = 30 days, y = 365 days), e.g. ``7d``.  Leading
    blanks are skipped; anything else raises ValueError.
    """
    if not s or len(s) >= 256:
        raise ValueError("bad time")
    text = s.lstrip(" \t")
    if s[-1] in "0123456789":
        if _ASCII_DIGITS.fullmatch(text):
            return min(int(text), LONG_MAX)
        fields = text.split(":")
        if len(fields) > 4 or not all(_ASCII_DIGITS.fullmatch(f) for f in fields):
            raise ValueError("bad time")
        total = 0
        for i, value in enumerate(reversed(fields)):
            seconds = int(value) * _CLOCK_SCALE[i]
            if i < 3 and seconds >= _CLOCK_SCALE[i + 1]:
                raise ValueError("bad time")
            total += seconds
        return total
    unit = _TIME_SUFFIX.get(s[-1].lower()) if s[-1].isascii() else None
    number = s[:-1].lstrip(" \t")
    if unit is None or not _ASCII_DIGITS.fullmatch(number):
        raise ValueError("bad time")
    return unit * min(int(number), LONG_MAX)


def parse_blocks(s: str) -> int:
    """Return a block limit in 1 KiB blocks, as the original stores it.

    A number as ``strtoll`` reads it (a sign is allowed; -1 is all ones), kept
    the way the original keeps it: in bytes, modulo 2**64, so the result is the
    value modulo 2**54 (LONG_MAX, vzctl's "unlimited", gives 18014398509481983;
    2**54 wraps to 0).  Beyond the original: a K/M/G/T suffix (any case, powers
    of 1024) and the word ``unlimited`` (LONG_MAX).
    """
    text = s
    scale = 1
    if text.strip(_C_SPACE).lower() == "unlimited":
        return LONG_MAX % BLOCK_WRAP
    if text and text[-1].lower() in _BLOCK_SUFFIX:
        scale = _BLOCK_SUFFIX[text[-1].lower()]
        text = text[:-1]
    return (c_strtol(text) * scale) % BLOCK_WRAP


def parse_count(s: str) -> int:
    """Return an inode limit or count as the original's ``str2u32`` keeps it:
    ``strtol`` then the low 32 bits (LONG_MAX gives 4294967295).  Beyond the
    original: the word ``unlimited`` (the same 4294967295)."""
    if s.strip(_C_SPACE).lower() == "unlimited":
        return U32 - 1
    return c_strtol(s) % U32


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
