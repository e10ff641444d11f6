"""Events at the limits, at both levels: one log line per crossing, and the
admin's hook run once per event with the figures in its environment."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from conftest import py_as, vzquota

K = 1024


def wait_for(cond, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def hook_calls(path: Path) -> list[dict]:
    if not path.exists():
        return []
    calls = []
    for line in path.read_text().splitlines():
        calls.append(dict(w.split("=", 1) for w in line.split()))
    return calls


WRITE = """
import os, sys
try:
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
    for _ in range(10):
        os.write(fd, b"u" * int(sys.argv[2]))
except OSError as e:
    print(e.errno)
"""


def test_soft_grace_and_hard_events_log_once_and_run_the_hook(mounter, area, world_tmp):
    private, root = area
    calls = world_tmp / "hook-calls"
    hook = world_tmp / "hook.sh"
    hook.write_text(f"#!/bin/sh\nenv | grep '^VZQUOTA_' | sort | tr '\\n' ' ' >> {calls}\n"
                    f"echo >> {calls}\n")
    hook.chmod(0o755)
    vzquota("init", "101", "-p", str(private), "-b", "100", "-B", "100000", "-i", "1000",
            "-I", "1000", "-e", "3", "-n", "1d", "-s", "1", "-u", "50")
    vzquota("on", "101")
    m = mounter(private, root, "quotaid=101", f"hook={hook}")
    vzquota("setlimit2", "101", "-u", "1001", "0", "50", "0", "0")
    (root / "u").mkdir()
    os.chown(root / "u", 1001, 1001)

    def lines(pattern: str) -> list[str]:
        return [ln for ln in m.logtext().splitlines() if pattern in ln]

    # level 2: uid 1001 hits its 50K hard limit (refused more than once)
    r = py_as(1001, 1001, WRITE, str(root / "u" / "f"), str(40 * K))
    assert r.stdout.strip() == str(errno.EDQUOT), r.stderr
    r = py_as(1001, 1001, WRITE, str(root / "u" / "g"), str(40 * K))
    assert r.stdout.strip() == str(errno.EDQUOT), r.stderr
    wait_for(lambda: lines("level 2 user 1001 space: allocation refused at the hard limit"),
             "the level 2 refusal")
    # level 1: the soft limit passed, then the grace expires, then a refusal
    (root / "big").write_bytes(b"x" * (200 * K))
    wait_for(lambda: lines("level 1 container space: passed its soft limit"), "soft")
    wait_for(lambda: lines("level 1 container space: grace time expired"), "expiry",
             timeout=60)
    try:
        (root / "more").write_bytes(b"y" * K)
        raise AssertionError("a write past the expired grace was allowed")
    except OSError as e:
        assert e.errno == errno.EDQUOT
    wait_for(lambda: lines("level 1 container space: allocation refused: grace time "
                           "expired"), "the grace refusal")
    got = wait_for(lambda: len(hook_calls(calls)) >= 4 and hook_calls(calls), "4 hooks")
    # one line per crossing
    assert len(lines("level 2 user 1001 space: allocation refused at the hard limit")) == 1
    assert len(lines("level 1 container space: passed its soft limit")) == 1
    assert len(lines("level 1 container space: grace time expired")) == 1
    assert len(lines("allocation refused: grace time expired")) == 1
    by_event = {}
    for c in got:
        by_event.setdefault((c["VZQUOTA_EVENT"], c["VZQUOTA_LEVEL"]), []).append(c)
    assert sorted(by_event) == [("grace", "1"), ("grace_expired", "1"),
                                ("hardlimit", "2"), ("softlimit", "1")]
    assert all(len(v) == 1 for v in by_event.values()), got
    h = by_event[("hardlimit", "2")][0]
    assert (h["VZQUOTA_ID"], h["VZQUOTA_TYPE"], h["VZQUOTA_UGID"],
            h["VZQUOTA_RESOURCE"]) == ("101", "user", "1001", "space")
    assert int(h["VZQUOTA_HARDLIMIT"]) == 50 * K and int(h["VZQUOTA_REQUEST"]) > 0
    s = by_event[("softlimit", "1")][0]
    assert s["VZQUOTA_TYPE"] == "container" and int(s["VZQUOTA_SOFTLIMIT"]) == 100 * K
    assert int(s["VZQUOTA_USAGE"]) > 100 * K and int(s["VZQUOTA_GRACE_DEADLINE"]) > 0
    assert s["VZQUOTA_PATH"] == str(private)


def test_hook_must_be_an_absolute_path(area):
    import subprocess
    from conftest import SIMFS
    private, root = area
    r = subprocess.run([SIMFS, str(private), str(root), "-o", "hook=alert.sh"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "absolute path" in r.stderr


def _hook(world_tmp: Path) -> tuple[Path, Path]:
    calls = world_tmp / "hook-calls"
    hook = world_tmp / "hook.sh"
    hook.write_text(f"#!/bin/sh\nenv | grep '^VZQUOTA_' | sort | tr '\\n' ' ' >> {calls}\n"
                    f"echo >> {calls}\n")
    hook.chmod(0o755)
    return hook, calls


FILL = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
size, upto = int(sys.argv[2]), int(sys.argv[3])
n = 0
try:
    while upto <= 0 or n < upto:
        n += os.write(fd, b"z" * size)
except OSError as e:
    print("errno", e.errno)
print("wrote", n)
"""


def test_only_refusals_the_caller_saw_are_reported(mounter, area, world_tmp):
    """Issue 18 item 6: writes near the limit that succeed (their reservation
    with room to spare did not fit, the exact one did) report nothing; the one
    EDQUOT a writer gets is one refusal, with the writer's request size."""
    from backing import wait_usage_matches
    private, root = area
    hook, calls = _hook(world_tmp)
    vzquota("init", "102", "-p", str(private), "-b", "2048", "-B", "2048", "-i", "1000",
            "-I", "1000", "-e", "1d", "-n", "1d", "-s", "1", "-u", "50")
    vzquota("on", "102")
    m = mounter(private, root, "quotaid=102", f"hook={hook}")
    os.chmod(root, 0o1777)
    # 1 KiB writes up to 1.5 MiB of a 2 MiB limit: every one succeeds
    r = py_as(1000, 1000, FILL, str(root / "small"), str(K), str(1536 * K))
    assert r.stdout.split() == ["wrote", str(1536 * K)], r.stdout + r.stderr
    time.sleep(2.5)                      # two looks of the watcher
    assert "refused" not in m.logtext(), m.logtext()
    assert hook_calls(calls) == []
    # 64 KiB writes until EDQUOT: one refusal seen by the writer, one reported
    r = py_as(1000, 1000, FILL, str(root / "big"), str(64 * K), "0")
    assert f"errno {errno.EDQUOT}" in r.stdout, r.stdout + r.stderr
    got = wait_for(lambda: hook_calls(calls), "the hook")
    time.sleep(2.5)
    lines = [ln for ln in m.logtext().splitlines() if "refused" in ln]
    assert len(lines) == 1, lines
    assert "level 1 container space: allocation refused at the hard limit" in lines[0]
    assert "refusals)" not in lines[0] and lines[0].endswith(f"request {64 * K}"), lines[0]
    got = hook_calls(calls)
    assert len(got) == 1, got
    assert (got[0]["VZQUOTA_EVENT"], got[0]["VZQUOTA_REQUEST"], got[0]["VZQUOTA_COUNT"]) \
        == ("hardlimit", str(64 * K), "1")
    assert wait_usage_matches(private, 102) == []
