"""``mount -o remount`` with one of simfs's own options changed (quotaid=,
hook=, maxopen=, ...) is refused with exit status 2, as simfs(8) says; the same
values (mount(8) passes fstab's options along) are fine.  Mounting over a
non-empty mount point warns (issue 18 item 16)."""

from __future__ import annotations

import os
import subprocess

from backing import wait_usage_matches
from conftest import SIMFS, vzquota


def remount(root, opts: str) -> subprocess.CompletedProcess:
    # what fuse3's mount helper hands to simfs on `mount -o remount,...`
    return subprocess.run([SIMFS, "/dev/simfs", str(root), "-o",
                           f"rw,remount,{opts},user_id=0,group_id=0,allow_other"],
                          capture_output=True, text=True)


def test_remount_refuses_a_changed_simfs_option(mounter, area, world_tmp):
    private, root = area
    hook = world_tmp / "hook"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    vzquota("init", "101", "-p", str(private), "-b", "1000", "-B", "2000", "-i", "100",
            "-I", "200", "-e", "1d", "-n", "1d", "-s", "1", "-u", "20")
    vzquota("on", "101")
    same = f"quotaid=101,maxopen=100,hook={hook}"
    mounter(private, root, "dev", "suid", *same.split(","))
    # the same values, as mount(8) passes them from fstab: done
    r = remount(root, f"ro,{same},quota_off_ok")
    assert r.returncode == 0, r.stderr
    r = remount(root, f"rw,{same}")
    assert r.returncode == 0, r.stderr
    for changed, running in (("quotaid=102", "quotaid=101"), ("maxopen=200", "maxopen=100"),
                             ("hook=/bin/true", f"hook={hook}"),
                             ("checkpoint=5", "checkpoint=30"), ("quotaid=x", None)):
        r = remount(root, f"ro,{same},{changed}")
        assert r.returncode == 2, (changed, r.stderr)
        assert f"remount cannot change {changed}" in r.stderr, r.stderr
        if running:
            assert f"the mount runs with {running}" in r.stderr, r.stderr
    with open("/proc/self/mountinfo") as f:      # nothing was changed: still rw
        line = next(ln for ln in f if ln.split()[4] == str(root))
    assert "rw" in line.split()[5].split(",")
    (root / "still-writable").write_text("x")
    assert wait_usage_matches(private, 101) == []     # the quota kept counting


def test_remount_adding_a_quota_id_is_refused(mounter, area):
    private, root = area
    mounter(private, root)
    r = remount(root, "ro,quotaid=5")
    assert r.returncode == 2 and "the mount runs with no quotaid" in r.stderr, r.stderr


def test_mounting_over_a_non_empty_root_warns(fuse, area, monkeypatch):
    private, root = area
    (root / "left-over").write_text("hidden by the mount")
    monkeypatch.setenv("SIMFS_SERVICE", "0")
    r = subprocess.run([SIMFS, str(private), str(root)], capture_output=True, text=True,
                       timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        assert f"warning: mount point {root} is not empty" in r.stderr, r.stderr
        assert not os.path.exists(root / "left-over")
    finally:
        subprocess.run(["umount", str(root)], check=False)
    r = subprocess.run([SIMFS, str(private), str(root / "left-over")], capture_output=True,
                       text=True)
    assert r.returncode == 1 and "warning" not in r.stderr
