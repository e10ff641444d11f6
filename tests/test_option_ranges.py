"""simfs's numeric ``-o`` options (simfs.options.RANGES): each takes its whole
range, ends included or not as simfs(8) says, refuses one step beyond either
end and anything but ASCII digits (and one point for seconds), with a message
naming the option; through the command, such a mount exits 2 and mounts nothing.
No mount is made."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from simfs.options import RANGES, UsageError, parse_options

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
}


def test_every_numeric_option_has_cases():
    assert set(CASES) == set(RANGES)


@pytest.mark.parametrize("key", sorted(CASES))
def test_range_ends(key):
    good, bad = CASES[key]
    extra = ["quotaid=7"] if key != "quotaid" else []
    for v in good:
        assert parse_options(extra + [f"{key}={v}"], "/p")[1][key] == v
    for v in bad:
        with pytest.raises(UsageError) as e:
            parse_options(extra + [f"{key}={v}"], "/p")
        assert str(e.value).startswith(f"{key}= takes ") and repr(v) in str(e.value)


def test_the_command_exits_2(tmp_path):
    private, root = tmp_path / "p", tmp_path / "r"
    private.mkdir()
    root.mkdir()
    simfs = os.path.join(os.path.dirname(sys.executable), "simfs")
    r = subprocess.run([simfs, "-o", "maxopen=15", str(private), str(root)], capture_output=True, text=True,
                       timeout=60, env={"SIMFS_SERVICE": "0", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2, r
    assert "maxopen= takes a number of open files from 16 to 1048576, not '15'" in r.stderr
    with open("/proc/self/mountinfo") as f:
        assert str(root) not in f.read()
