"""The short CI run of tools/torture: one backing (tmpfs, the quickest), the
attacks that hold there today plus races and kill -9 rounds for ~40 s; the
summary must be clean and the exit status 0.  (The full matrix of attacks on
all four backings is tests/test_attacks.py.)  Also: a usage error exits 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

TORTURE = Path(__file__).resolve().parent.parent / "tools" / "torture"
# whiteout (item 3) and big-dir (items 9, 10) still fail on
# tmpfs: tests/test_attacks.py holds them as strict xfails; add them here once fixed
CLEAN_ON_TMPFS = ("reopen-unlinked,hardlink-names,xattr-blocks,sparse-prealloc,root-reserve,"
                  "control,race,kill9")


def test_torture_short_run_is_clean(fuse):
    r = subprocess.run([sys.executable, str(TORTURE), "--fs", "tmpfs", "--seconds", "40",
                        "--attacks", CLEAN_ON_TMPFS, "--seed", "1"],
                       capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "clean: every attack held both invariants" in r.stdout, out
    rows = [l for l in r.stdout.splitlines() if l.split()[:1] and l.split()[0] in
            CLEAN_ON_TMPFS.split(",")]
    assert len(rows) >= len(CLEAN_ON_TMPFS.split(",")), out
    assert all(l.split()[1] == "ok" and "= recount" in l for l in rows), out
    tmp = re.search(r"\(temp dir (\S+)\)", r.stdout).group(1)
    assert not os.path.exists(tmp), f"{tmp} was left behind"


def test_torture_usage_error():
    r = subprocess.run([sys.executable, str(TORTURE), "--attacks", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown attack 'nope'" in r.stderr
    r = subprocess.run([sys.executable, str(TORTURE), "--fs", "zfs"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr
