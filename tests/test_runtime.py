"""The event loops simfs can run on (``-o runtime=``), through real mounts.

The default (uvloop) serves every other mounted test; here the two others
serve a quota'd mount: files, EDQUOT from write(2), the control channel
(a live ``stat`` and ``setlimit``) and a clean stop on SIGTERM that leaves the quota
file marked as stopped (``vzquota show`` refuses a dirty one).
"""

from __future__ import annotations

import errno
import os
import signal

import pytest

from conftest import vzquota
from vzquota import control

QID = "101"


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_runtime_serves_a_quota_mount(mounter, area, runtime):
    private, root = area
    vzquota("init", QID, "-p", str(private), "-b", "1000", "-B", "1000", "-i", "100",
            "-I", "100", "-e", "1d", "-n", "1d")
    vzquota("on", QID)
    m = mounter(private, root, f"quotaid={QID}", f"runtime={runtime}")
    (root / "f").write_bytes(b"x" * 300_000)
    assert (private / "f").read_bytes() == b"x" * 300_000
    fd = os.open(root / "g", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError) as ei:
            for _ in range(100):
                os.write(fd, b"y" * 100_000)
        assert ei.value.errno == errno.EDQUOT
    finally:
        os.close(fd)
    r = control.request(int(QID), "stat", save=False)
    assert r is not None and r["ok"]
    vzquota("setlimit", QID, "-b", "2000", "-B", "2000")
    with open(root / "g", "ab") as f:
        f.write(b"z" * 100_000)                 # room again, at once
    assert (private / "g").read_bytes().endswith(b"z" * 100_000)
    m.proc.send_signal(signal.SIGTERM)
    assert m.wait() == 0, m.logtext()
    assert vzquota("show", QID, check=False).returncode == 0    # stopped cleanly, not dirty
