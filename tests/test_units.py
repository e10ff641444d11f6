"""Unit parsing and grace strings (vzquota.units)."""

import pytest

from vzquota.units import (UNLIMITED, format_deadline, format_time_left, kib,
                           parse_blocks, parse_count, parse_time)

DAY = 86400


# str2time() of the original (src/common.c)
@pytest.mark.parametrize("text, seconds", [
    ("0", 0), ("90", 90), ("  120", 120), ("\t7", 7),
    ("59", 59), ("1:00", 60), ("1:02:03", 3723), ("7:00:00:00", 7 * DAY),
    ("2:23:59:59", 3 * DAY - 1), ("100:00:00:00", 100 * DAY), ("0:0:0:5", 5),
    ("2h", 7200), ("2H", 7200), ("7d", 7 * DAY), ("01w", 7 * DAY), ("3m", 90 * DAY),
    ("1y", 365 * DAY), ("1Y", 365 * DAY), ("0d", 0), (" 2d", 2 * DAY),
])
def test_parse_time_ok(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text", [
    "", "   ", "-5", "-1d", "abc", "d", "7x", "1.5d", "7 d", "1:60", "60:00", "1:60:00",
    "24:00:00", "1:2:3:4:5", "1::2", ":5", "5:", "+5", "1e3", "45s", " 120 ", "²", "١٢٣",
    "x" * 300,
])
def test_parse_time_bad(text):
    with pytest.raises(ValueError):
        parse_time(text)


# str2u64() + block2ker(): strtoll, then bytes modulo 2**64; K/M/G/T and the word
# "unlimited" are this project's additions
@pytest.mark.parametrize("text, blocks", [
    ("0", 0), ("1000", 1000), ("1K", 1), ("1k", 1), ("10M", 10240), ("2g", 2 * 1024**2),
    ("1T", 1024**3), ("unlimited", 2**54 - 1), ("UNLIMITED", 2**54 - 1),
    (str(UNLIMITED), 2**54 - 1), (str(UNLIMITED + 1), 2**54 - 1), (" 5", 5), ("+5", 5),
    ("-1", 2**54 - 1), (str(2**54), 0), (str(2**54 + 3), 3),
])
def test_parse_blocks_ok(text, blocks):
    assert parse_blocks(text) == blocks


@pytest.mark.parametrize("text", ["", "K", "1.5M", "1P", "1KB", "ten", "1_000", "5 ",
                                  "²", "١٢٣", "0x10", "-"])
def test_parse_blocks_bad(text):
    with pytest.raises(ValueError):
        parse_blocks(text)


def test_parse_count():
    # str2u32(): strtol, then the low 32 bits
    assert parse_count("200000") == 200000
    assert parse_count("0") == 0
    assert parse_count("unlimited") == parse_count(str(UNLIMITED)) == 2**32 - 1
    assert parse_count("-1") == 2**32 - 1
    assert parse_count(str(2**32 + 7)) == 7
    for bad in ("", "1K", "x", "1.0", "²", "١٢٣", "1 "):
        with pytest.raises(ValueError):
            parse_count(bad)


def test_kib_rounds_up():
    assert [kib(n) for n in (0, 1, 1023, 1024, 1025, 4096)] == [0, 1, 1, 1, 2, 4]
    assert kib(UNLIMITED * 1024) == UNLIMITED


def test_format_time_left():
    assert format_time_left(0) == ""
    assert format_time_left(29) == "00:00"
    assert format_time_left(30) == "00:01"
    assert format_time_left(3600) == "01:00"
    assert format_time_left(DAY - 31) == "23:59"
    assert format_time_left(DAY - 30) == "1days"
    assert format_time_left(DAY) == "1days"
    assert format_time_left(2 * DAY - 1) == "2days"   # rounds to the minute first
    assert format_time_left(7 * DAY) == "7days"
    assert format_time_left(1000 * DAY) == "1000days"


def test_format_deadline():
    now = 1_700_000_000
    assert format_deadline(0, now) == ""
    assert format_deadline(now, now) == "none"
    assert format_deadline(now - 5, now) == "none"
    assert format_deadline(now + 29, now) == "00:00"
    assert format_deadline(now + 30, now) == "00:01"
    assert format_deadline(now + DAY, now) == "1days"
    assert format_deadline(now + 2 * DAY, now) == "2days"
    assert format_deadline(now + 5 * 3600 + 7 * 60, now) == "05:07"
