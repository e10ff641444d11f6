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


def test_back_below_and_ugid_limit_events(mounter, area, world_tmp):
    """Issue 18 item 7: going back below a soft and a hard limit is an event
    (quota_nld's *BELOW); a chown refused because the 2nd level tracks no more
    uids/gids is logged and hooked."""
    from backing import wait_usage_matches
    private, root = area
    hook, calls = _hook(world_tmp)
    vzquota("init", "103", "-p", str(private), "-b", "100000", "-B", "200000", "-i", "1000",
            "-I", "1000", "-e", "1d", "-n", "1d", "-s", "1", "-u", "4")
    vzquota("on", "103")
    m = mounter(private, root, "quotaid=103", f"hook={hook}")
    os.chmod(root, 0o1777)
    vzquota("setlimit2", "103", "-u", "-t", "86400", "86400")     # 2nd-level graces
    vzquota("setlimit2", "103", "-u", "1000", "100", "200", "0", "0")

    def lines(pattern: str) -> list[str]:
        return [ln for ln in m.logtext().splitlines() if pattern in ln]
    r = py_as(1000, 1000, FILL, str(root / "a"), str(150 * K), str(150 * K))
    assert r.stdout.split() == ["wrote", str(150 * K)], r.stdout + r.stderr
    wait_for(lambda: lines("level 2 user 1000 space: passed its soft limit"), "soft")
    r = py_as(1000, 1000, FILL, str(root / "b"), str(4 * K), "0")
    assert f"errno {errno.EDQUOT}" in r.stdout, r.stdout + r.stderr
    wait_for(lambda: lines("level 2 user 1000 space: allocation refused at the hard"), "hard")
    os.unlink(root / "b")
    wait_for(lambda: lines("level 2 user 1000 space: back below its hard limit"), "hardbelow")
    os.unlink(root / "a")
    wait_for(lambda: lines("level 2 user 1000 space: back below its soft limit"), "softbelow")
    # the 2nd level tracks at most 4 ids (uid 0, gid 0, uid 1000 with its
    # limits, and one more): each file given to a new uid takes one
    for uid in range(2000, 2010):
        (root / f"c{uid}").write_bytes(b"c")
        try:
            os.chown(root / f"c{uid}", uid, -1)
        except OSError as e:
            assert e.errno == errno.EDQUOT
            break
    else:
        raise AssertionError("no chown was refused at the ugid limit")
    wait_for(lambda: lines("refused: one uid/gid more than the 2nd level tracks"), "ugid")
    got = wait_for(lambda: [c for c in hook_calls(calls) if c["VZQUOTA_EVENT"] in
                            ("ugid_limit", "hardbelow", "softbelow")]
                   if len(hook_calls(calls)) >= 5 else None, "the hooks")
    events = sorted(c["VZQUOTA_EVENT"] for c in got)
    assert events == ["hardbelow", "softbelow", "ugid_limit"], hook_calls(calls)
    u = next(c for c in got if c["VZQUOTA_EVENT"] == "ugid_limit")
    assert (u["VZQUOTA_LEVEL"], u["VZQUOTA_TYPE"], u["VZQUOTA_RESOURCE"],
            u["VZQUOTA_HARDLIMIT"]) == ("2", "user", "ugid", "4")
    assert wait_usage_matches(private, 103) == []


def test_a_hook_that_cannot_run_is_refused_at_mount(fuse, area, world_tmp, monkeypatch):
    import subprocess
    from conftest import SIMFS, is_mountpoint
    private, root = area
    monkeypatch.setenv("SIMFS_SERVICE", "0")
    plain = world_tmp / "not-executable"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o644)
    for hook, why in ((world_tmp / "missing", "No such file"),
                      (plain, "not executable"), (world_tmp, "not a regular file")):
        r = subprocess.run([SIMFS, str(private), str(root), "-o", f"hook={hook}"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and f"hook {hook}" in r.stderr and why in r.stderr, \
            r.stderr
        assert not is_mountpoint(str(root))
