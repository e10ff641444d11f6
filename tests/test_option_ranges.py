"""simfs's numeric ``-o`` options (simfs.options.RANGES, max_read= of FUSE's
included): each takes its whole range, ends included or not as simfs(8) says,
refuses one step beyond either end and anything but ASCII digits (and one point
for seconds), with a message naming the option; fsname= and subtype= take a
non-empty word; through the command, such a mount exits 2 and mounts nothing.
No mount is made."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from simfs.options import MAX_NAME, NAMES, RANGES, UsageError, parse_options

# option -> (accepted values, refused values)
CASES = {
    "quotaid": (["1", "4294967295"], ["0", "4294967296", "-1", "1.5", "٣"]),
    "quota_admin": (["0", "4294967294"], ["4294967295", "-1", "x", "٣"]),
    "maxopen": (["16", "1048576"], ["15", "1048577", "16.0", ""]),
    "maxinodes": (["64", "1073741824"], ["63", "1073741825", "1e3"]),
    "maxparked": (["0", "65536"], ["65537", "-1", "1.0", "x"]),
    "checkpoint": (["0.001", "86400", ".5", "1."], ["0", "0.0", "86400.1", ".", "1..2",
                                                     "inf", "nan", "-1"]),
    "recounthold": (["0", "60", "0.5"], ["60.01", "-0", "1e1", "nan"]),
    "recountwait": (["0", "3600", "10"], ["3600.5", "x", "nan", "inf"]),
    # the kernel's u32 (fs/fuse/inode.c); it would take 0, 0x10 and 010 too
    "max_read": (["1", "4096", "4294967295"], ["0", "4294967296", "abc", "", "0x10",
                                              "-1", "4k"]),
}


def fuse_value(fuse: set[str], key: str) -> str:
    return next(o.partition("=")[2] for o in fuse if o.startswith(key + "="))


def test_every_numeric_option_has_cases():
    assert set(CASES) == set(RANGES)


@pytest.mark.parametrize("key", sorted(CASES))
def test_range_ends(key):
    good, bad = CASES[key]
    extra = ["quotaid=7"] if key != "quotaid" else []
    for v in good:
        fuse, own = parse_options(extra + [f"{key}={v}"], "/p")
        assert (fuse_value(fuse, key) if key == "max_read" else own[key]) == v
    for v in bad:
        with pytest.raises(UsageError) as e:
            parse_options(extra + [f"{key}={v}"], "/p")
        assert str(e.value).startswith(f"{key}= takes ") and repr(v) in str(e.value)


@pytest.mark.parametrize("key", NAMES)
def test_names(key):
    for v in ("x", "/dev/simfs", "ct-101.a:b=c", "n" * MAX_NAME):
        assert fuse_value(parse_options([f"{key}={v}"], "/p")[0], key) == v
    for v in ("", "a b", "a\tb", "a\nb", "n" * (MAX_NAME + 1), "a\x01"):
        with pytest.raises(UsageError) as e:
            parse_options([f"{key}={v}"], "/p")
        assert str(e.value).startswith(f"{key}= takes a name") and repr(v) in str(e.value)


@pytest.mark.parametrize("opt, message", [
    ("maxopen=15", "maxopen= takes a number of open files from 16 to 1048576, not '15'"),
    ("max_read=abc", "max_read= takes a number of bytes from 1 to 4294967295, not 'abc'"),
    ("fsname=", "fsname= takes a name of 1 to 255 printable characters without spaces or "
                "commas, not ''"),
    ("subtype=", "subtype= takes a name"),
])
def test_the_command_exits_2(tmp_path, opt, message):
    private, root = tmp_path / "p", tmp_path / "r"
    private.mkdir()
    root.mkdir()
    simfs = os.path.join(os.path.dirname(sys.executable), "simfs")
    r = subprocess.run([simfs, "-o", opt, str(private), str(root)], capture_output=True, text=True,
                       timeout=60, env={"SIMFS_SERVICE": "0", "PATH": "/usr/bin:/bin"})
    try:
        assert r.returncode == 2, r
        assert message in r.stderr
        with open("/proc/self/mountinfo") as f:
            assert str(root) not in f.read()
    finally:
        with open("/proc/self/mountinfo") as f:
            if str(root) in f.read():
                subprocess.run(["fusermount3", "-u", str(root)], check=False)
