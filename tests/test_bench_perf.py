"""tools/bench.py --perf: the profile table of where a daemon's time goes is
made from real samples of the daemon's own threads (a statfs stream: the
daemon spends its samples in the interpreter and the kernel, and the shares
add up to the whole), and the option's errors exit 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "tools" / "bench.py"

pytestmark = pytest.mark.fuse


def test_perf_profiles_the_daemon_of_the_targets_asked():
    p = subprocess.run([sys.executable, str(BENCH), "--quick", "--only", "statfs", "--no-c",
                        "--no-pt", "--cpu", "0", "--perf", "simfs+quota"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    table = p.stdout.split("Where the daemons' time goes", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| statfs latency")]
    assert len(rows) == 1, table                # simfs+quota only, not simfs
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == "simfs+quota"
    samples = int(cells[2].replace(",", ""))
    assert samples > 20                         # 2,000 statfs answered while sampled
    shares = [float(c.rstrip("%")) for c in cells[3:8]]
    assert abs(sum(shares) - 100) < 2, shares
    python, kernel = shares[0], shares[1]
    assert python > 5 and kernel > 5, shares    # a Python daemon in and out of the kernel
    assert re.search(r"\d+%", cells[8]), cells[8]


def test_perf_unknown_tool_or_bad_usage_exits_2(tmp_path):
    env = {"PATH": str(tmp_path)}                # no perf on this PATH
    p = subprocess.run([sys.executable, str(BENCH), "--quick", "--perf", "simfs"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2
    assert "--perf needs perf" in p.stderr


def test_a_failed_section_stops_its_perf():
    """C-ll has no PUNCH_HOLE: that section fails on it.  The perf watching it
    must stop with it (one left running held the temp dir's image mounted:
    the run could not clean up) and the run goes on to the end."""
    before = set(subprocess.run(["pgrep", "-x", "perf"], capture_output=True,
                                text=True).stdout.split())
    p = subprocess.run([sys.executable, str(BENCH), "--quick", "--only", "kernel", "--no-pt",
                        "--cpu", "0", "--perf", "C-ll"],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "FAIL (Operation not supported)" in p.stdout       # the failed section
    left = set(subprocess.run(["pgrep", "-x", "perf"], capture_output=True,
                              text=True).stdout.split()) - before
    assert not left, f"perf left running: {left}"
    assert "kept" not in p.stderr and "NOT removing" not in p.stderr
