"""tools/bench.py's rows of issue 17 item 9 run for real: requests per write(2)
and the web benchmark (tools/webbench's fleet) in a ``--quick`` run, as root,
with every target (C-ll compiled from libfuse's example, native, simfs,
simfs+quota, simfs+pt).  The table is parsed: each row is there with a figure
in every column it fills."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def first_table(out: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| workload | unit |"))
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    rows: dict[str, dict[str, str]] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(head, cells))
    return head, rows


def number(cell: str) -> float:
    m = re.fullmatch(r"([\d,]+(?:\.\d+)?)(?: s| µs|x)?", cell)
    assert m, f"not a figure: {cell!r}"
    return float(m.group(1).replace(",", ""))


@pytest.fixture(scope="module")
def quick_run():
    if os.geteuid() != 0:
        pytest.skip("bench.py mounts: root only")
    r = subprocess.run([sys.executable, str(TOOLS / "bench.py"), "--quick",
                        "--only", "writes,web", "--writes", "500"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    return r


def row(rows: dict[str, dict[str, str]], prefix: str) -> dict[str, str]:
    hits = [v for k, v in rows.items() if k.startswith(prefix)]
    assert len(hits) == 1, (prefix, list(rows))
    return hits[0]


def test_requests_per_write_row(fuse, quick_run):
    head, rows = first_table(quick_run.stdout)
    assert {"C-ll", "native", "simfs", "simfs+quota", "simfs+pt"} <= set(head)
    w = row(rows, "requests per write(2) (500 pwrite of 4 KiB)")
    assert w["unit"] == "requests"
    assert number(w["native"]) == 0                   # no FUSE, no request
    # HANDLE_KILLPRIV_V2: one WRITE per write(2), no getxattr(security.capability)
    # each time (one for the first write at most: 1.002 shows as 1.00)
    for t in ("simfs", "simfs+quota", "simfs+pt"):
        assert w[t] == "1.00", (t, w)
    # C-ll counted by the kernel's fuse_request_send tracepoint: at least the WRITEs
    # (passthrough_ll negotiates no HANDLE_KILLPRIV_V2: a getxattr each time)
    if os.path.isdir("/sys/kernel/tracing/events/fuse/fuse_request_send"):
        assert number(w["C-ll"]) >= 1.0, w
    else:
        assert w["C-ll"].startswith("— ("), w
    assert w["goal"] == "≤ 1 requests ✓", w
    assert "1 request per write(2)" in quick_run.stdout
    # the tracing instance of the run is gone
    inst = "/sys/kernel/tracing/instances"
    if os.path.isdir(inst):
        assert not [d for d in os.listdir(inst) if d.startswith("simfs-bench-")]


def test_web_row(fuse, quick_run):
    if not (shutil.which("wrk") and shutil.which("busybox")):
        pytest.fail("tools/setup.sh --test installs wrk and busybox")
    _, rows = first_table(quick_run.stdout)
    w = row(rows, "web: 4 busybox httpd containers, wrk 2 s")
    assert w["unit"] == "req/min"
    for t in ("native", "C-ll", "simfs+quota", "simfs+pt"):
        assert number(w[t]) > 0, (t, w)             # a FAIL (e.g. a quota not exact)
    assert w["simfs"].startswith("—")                 # the fleet's mounts all have quotas
    assert w["goal"] == "≥ 0.95x native"
    assert re.fullmatch(r"[\d.]+x [✓✗] \(of native\)", w["simfs+quota / C"]), w
    assert re.fullmatch(r"[\d.]+x", w["pt / native"]), w
    # requests per HTTP request in the second table (open + release at least)
    cost = next(line for line in quick_run.stdout.splitlines()
                if line.startswith("| web: ") and "(HTTP request)" in line)
    assert "open" in cost and "release" in cost, cost
    # nothing of the fleet is left: its tree unmounted and removed
    tree = re.search(r"web: 4 containers in (\S+),", quick_run.stderr).group(1)
    with open("/proc/self/mountinfo") as f:
        assert tree not in f.read()
    assert not os.path.exists(tree)


def test_web_row_profile(fuse):
    """``--perf simfs+quota``: the web row's profile sums all the fleet's daemons
    (whose names, "quota N", hold a space) by symbol."""
    if os.geteuid() != 0 or not shutil.which("perf"):
        pytest.skip("needs root and perf")
    r = subprocess.run([sys.executable, str(TOOLS / "bench.py"), "--quick", "--only", "web",
                        "--web-n", "3", "--web-s", "1", "--no-c", "--no-pt", "--cpu", "0",
                        "--perf", "simfs+quota"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    prof = [line for line in r.stdout.splitlines()
            if line.startswith("| web: 3 busybox httpd containers, wrk 1 s (CPU 0) | simfs+quota |")]
    assert len(prof) == 1, r.stdout
    cells = [c.strip() for c in prof[0].strip("|").split("|")]
    assert int(cells[2].replace(",", "")) > 0                 # daemon samples
    assert float(cells[3].rstrip("%")) > 0                    # Python
    assert "quota " not in cells[-1] and "[.]" not in cells[-1], cells[-1]
