"""The open-file budget is shared out by uid (simfs(8), RESOURCES): one user
holding every open it may get does not lock the container's root or its other
users out; root keeps a reserve of its own; the uid that hits its share is
logged (once per streak) and raised as an event for the hook."""

from __future__ import annotations

import errno
import os
import subprocess
import textwrap
import time

import pytest

from conftest import USER_PYTHON, py_as, vzquota
from simfs.inodes import OpenShares

# Holds opens of one file until refused, reports how many and with what, then
# waits (holding them) until told to go on.
HOG = textwrap.dedent("""
    import errno, os, sys
    path, go = sys.argv[1], sys.argv[2]
    held = []
    while True:
        try:
            held.append(os.open(path, os.O_RDONLY))
        except OSError as e:
            print(len(held), errno.errorcode[e.errno], flush=True)
            break
        if len(held) > 100000:
            print(len(held), "none", flush=True)
            break
    while not os.path.exists(go):
        import time
        time.sleep(0.05)
    for fd in held:
        os.close(fd)
    print("closed", flush=True)
""")

# What another user does while the hog holds its share: open, create, ls.
OTHER = textwrap.dedent("""
    import os, sys
    d = sys.argv[1]
    with open(os.path.join(d, "shared")) as f:
        f.read()
    with open(os.path.join(d, "new-%d" % os.getuid()), "w") as f:
        f.write("x")
    print(sorted(os.listdir(d)).count("shared"))
""")


def test_shares_plan():
    s = OpenShares(256)
    assert (s.reserve, s.pool, s.share) == (16, 240, 60)
    for _ in range(60):
        s.check(1000)
        s.take(1000)
    with pytest.raises(OSError) as e:
        s.check(1000)
    assert e.value.errno == errno.ENFILE
    assert list(s.events) == [(1000, 60, 60)]
    with pytest.raises(OSError):
        s.check(1000)
    assert len(s.events) == 1 and s.streaks[1000] == 2     # once per streak
    # three more users fill the pool; then only root gets in, up to the reserve
    for uid in (1001, 1002, 1003):
        for _ in range(60):
            s.check(uid)
            s.take(uid)
    with pytest.raises(OSError):
        s.check(1004)
    for _ in range(16):
        s.check(0)
        s.take(0)
    with pytest.raises(OSError):
        s.check(0)
    for _ in range(16):
        s.give(0)
    s.give(1000)
    s.check(1000)
    s.take(1000)
    assert 1000 not in s.streaks                           # the streak ended
    # root: its share plus the reserve
    r = OpenShares(256)
    for _ in range(76):
        r.check(0)
        r.take(0)
    with pytest.raises(OSError):
        r.check(0)
    r.check(1000)


@pytest.mark.fuse
def test_one_user_holding_its_share_locks_nobody_else_out(mounter, area, world_tmp):
    """The repro: with maxopen=256 uid 1000 held 256 opens of one file; then
    root's cat and touch and uid 1001's ls failed with ENFILE."""
    private, root = area
    calls = world_tmp / "hook-calls"
    hook = world_tmp / "hook.sh"
    hook.write_text(f"#!/bin/sh\nenv | grep '^VZQUOTA_' | sort | tr '\\n' ' ' >> {calls}\n"
                    f"echo >> {calls}\n")
    hook.chmod(0o755)
    vzquota("init", "101", "-p", str(private), "-b", "100000", "-B", "100000", "-i",
            "1000", "-I", "1000", "-e", "0", "-n", "0")
    vzquota("on", "101")
    m = mounter(private, root, "quotaid=101", "maxopen=256", f"hook={hook}")
    d = root / "d"
    d.mkdir()
    os.chmod(d, 0o1777)
    (d / "shared").write_text("data\n")
    go = world_tmp / "go"
    share = OpenShares(256).share
    hog = subprocess.Popen([USER_PYTHON, "-c", HOG, str(d / "shared"),
                            str(go)], user=1000, group=1000, stdout=subprocess.PIPE,
                           text=True)
    try:
        first = hog.stdout.readline().split()
        assert first == [str(share), "ENFILE"], first
        # a second hog process of the same uid gets nothing more
        r = py_as(1000, 1000, "import os,sys\ntry:\n    os.open(sys.argv[1], os.O_RDONLY)\n"
                  "except OSError as e:\n    print(e.errno)\n", str(d / "shared"))
        assert r.stdout.strip() == str(errno.ENFILE), r
        # root: cat, touch, ls
        assert subprocess.run(["cat", str(d / "shared")], capture_output=True,
                              text=True).stdout == "data\n"
        subprocess.run(["touch", str(d / "by-root")], check=True)
        assert "by-root" in subprocess.run(["ls", str(d)], capture_output=True, text=True,
                                           check=True).stdout
        # another user: open, create, ls
        r = py_as(1001, 1001, OTHER, str(d))
        assert r.returncode == 0 and r.stdout.strip() == "1", r
        r = subprocess.run(["ls", str(d)], user=1001, group=1001, capture_output=True,
                           text=True)
        assert r.returncode == 0 and "new-1001" in r.stdout, r
        # logged once for the streak, whatever the number of refusals
        lines = [ln for ln in m.logtext().splitlines()
                 if "uid 1000 holds its share of open files" in ln]
        assert len(lines) == 1, m.logtext()
        deadline = time.monotonic() + 15
        while not (calls.exists() and "VZQUOTA_EVENT=open_share" in calls.read_text()):
            assert time.monotonic() < deadline, "no hook call"
            time.sleep(0.05)
        call = calls.read_text()
        assert "VZQUOTA_UGID=1000" in call and f"VZQUOTA_USAGE={share}" in call, call
        assert "VZQUOTA_RESOURCE=openfiles" in call, call
    finally:
        go.touch()
        out, _ = hog.communicate(timeout=30)
    assert out.strip() == "closed"
    # the hog's uid is admitted again once it closed them (the streak ends)
    r = py_as(1000, 1000, OTHER, str(d))
    assert r.returncode == 0, r
    deadline = time.monotonic() + 10
    while "uid 1000: opens admitted again" not in m.logtext():
        assert time.monotonic() < deadline, m.logtext()
        time.sleep(0.05)
