"""A quota id whose quota is off is never mounted silently unenforced
(issue 18 item 1): ``simfs PRIV ROOT -o quotaid=ID`` after ``vzquota init``
without ``vzquota on`` is refused, standalone and through the mount service,
unless ``-o quota_off_ok`` asks for it; then ``vzquota on`` enforces at once."""

from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest

from backing import recount, wait_usage_matches
from conftest import SIMFS, is_mountpoint, py_as, vzquota

K = 1024

WRITE = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
n = 0
try:
    while n < int(sys.argv[2]):
        n += os.write(fd, b"x" * 65536)
except OSError as e:
    print("errno", e.errno)
print("wrote", n)
"""


def init_off(private, qid="8410"):
    vzquota("init", qid, "-p", str(private), "-b", "1024", "-B", "2048", "-i", "100",
            "-I", "200", "-e", "1d", "-n", "1d", "-s", "1", "-u", "100")


@pytest.mark.parametrize("via", ["standalone", "foreground"])
def test_a_quota_that_is_off_is_refused(fuse, area, via, monkeypatch):
    private, root = area
    init_off(private)
    monkeypatch.setenv("SIMFS_SERVICE", "0")
    cmd = [SIMFS, str(private), str(root), "-o", "quotaid=8410"]
    if via == "foreground":
        cmd.append("-f")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "vzquota on 8410" in r.stderr and "quota_off_ok" in r.stderr, r.stderr
    assert not is_mountpoint(str(root))
    # nothing was changed in the file by the refusal
    assert "dirty" not in vzquota("show", "8410", check=False).stderr


def test_quota_off_ok_mounts_unenforced_then_on_enforces(mounter, area):
    private, root = area
    init_off(private)
    m = mounter(private, root, "quotaid=8410", "quota_off_ok")
    os.chmod(root, 0o1777)
    # explicitly unenforced: 3 MiB over a 2 MiB hard limit is allowed
    r = py_as(1000, 1000, WRITE, str(root / "big"), str(3 << 20))
    assert r.stdout.split()[-1] == str(3 << 20), r.stdout + r.stderr
    assert "quota id 8410 is off" in m.logtext() or "not enforced" in m.logtext()
    os.unlink(root / "big")
    # vzquota on switches the live mount on: recounted, then enforced
    vzquota("on", "8410")
    r = py_as(1000, 1000, WRITE, str(root / "f"), str(3 << 20))
    assert f"errno {errno.EDQUOT}" in r.stdout, r.stdout + r.stderr
    assert wait_usage_matches(private, 8410) == []
    assert recount(private).space <= 2048 * K


def test_quota_off_ok_needs_a_quota_id(fuse, area):
    private, root = area
    r = subprocess.run([SIMFS, str(private), str(root), "-o", "quota_off_ok"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "quotaid" in r.stderr


def test_the_unit_follows_the_same_rule(fuse, area, tmp_path, monkeypatch):
    """simfs@.service: QUOTA=yes with the quota off (``start`` run without
    ``prestart``'s ``vzquota on``) is refused the same way; QUOTA=no says the
    quota file is not used; OPTIONS=quota_off_ok is the explicit way."""
    from test_install_unit import unit_lines
    private, root = area
    conf = tmp_path / "etc-simfs"
    conf.mkdir()
    monkeypatch.setenv("SIMFS_CONFDIR", str(conf))
    monkeypatch.setenv("SIMFS_SERVICE", "0")
    init_off(private, "101")
    (conf / "101.conf").write_text(f"ROOT={root}\nQUOTA=yes\n")
    r = subprocess.run(unit_lines("ExecStart", "101"), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "vzquota on 101" in r.stderr, r.stderr
    assert not is_mountpoint(str(root))
    (conf / "101.conf").write_text(f"ROOT={root}\nQUOTA=no\n")
    r = subprocess.run(unit_lines("ExecStartPre", "101"), capture_output=True, text=True)
    assert r.returncode == 0 and "QUOTA=no" in r.stderr and "nothing is enforced" in r.stderr
    (conf / "101.conf").write_text(f"ROOT={root}\nQUOTA=yes\nOPTIONS=quota_off_ok\n")
    p = subprocess.Popen(unit_lines("ExecStart", "101"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not is_mountpoint(str(root)):
            assert p.poll() is None, p.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        vzquota("on", "101")         # the live mount enforces from now on
        (root / "a").write_bytes(b"a" * 4096)
        assert wait_usage_matches(private, 101) == []
    finally:
        subprocess.run(["umount", str(root)], check=False)
        assert p.wait(30) == 0
