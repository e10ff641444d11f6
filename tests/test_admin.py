"""What an admin sees around a mount: messages after a crash, on a dead mount,
as non-root; lock files gone after a clean stop; the source df shows.

Exactness is checked against ``du``/``find``, not the project's scanner.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from conftest import SIMFS, VZQUOTA, vzquota

K = 1024
QID = "101"


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "--block-size=1", "-s", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[0])


def find_count(path: Path) -> int:
    out = subprocess.run(["find", str(path)], check=True, capture_output=True).stdout
    return out.count(b"\n")


def init_on(private: Path, *extra: str) -> None:
    vzquota("init", QID, "-p", str(private), "-b", "100000", "-B", "120000",
            "-i", "1000", "-I", "1200", "-e", "1d", "-n", "1d", *extra)
    vzquota("on", QID)


def test_on_after_a_crash_warns_and_recounts(mounter, area):
    private, root = area
    init_on(private)
    m = mounter(private, root, f"quotaid={QID}", "checkpoint=3600")
    for i in range(10):
        (root / f"f{i}").write_bytes(b"x" * (20 * K))
    m.kill()                      # no clean stop: the file still says "mounted"
    (private / "host-side").write_bytes(b"y" * (30 * K))   # uncounted so far
    r = vzquota("on", QID, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stderr == (f"vzquota : (warning) Incorrect quota shutdown for id {QID}, "
                        "recalculating disk usage\n")
    show = vzquota("-b", "show", QID).stdout.split()
    assert int(show[0]) == -(-du_bytes(private) // K)
    assert int(show[5]) == find_count(private)
    # a second `on` now finds it on and cleanly counted: the original's answer
    r = vzquota("on", QID, check=False)
    # quota_on(): debug(LOG_WARNING, "Quota is running for id %d already\n")
    assert (r.returncode, r.stderr) == (5, f"vzquota : (warning) Quota is running for id "
                                        f"{QID} already\n")


def test_simfs_on_a_dead_mount_says_so(mounter, area):
    private, root = area
    m = mounter(private, root)
    m.proc.kill()                 # the daemon dies; the mount stays, dead
    m.proc.wait()
    r = subprocess.run([SIMFS, str(private), str(root)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "dead mount" in r.stderr and "Transport endpoint is not connected" in r.stderr
    assert f"umount -l {root}" in r.stderr
    assert "does not exist" not in r.stderr
    subprocess.run(["umount", "-l", str(root)], check=True)
    m2 = mounter(private, root)   # the advice works
    assert m2.umount() == 0


def test_non_root_is_told_to_be_root(area, monkeypatch, capsys):
    # In-process with a non-root effective uid: the venv may sit where other
    # uids cannot execute it.
    from simfs import cli as simfs_cli
    from vzquota import cli as vz_cli
    private, root = area
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert simfs_cli.main([str(private), str(root)]) == 1
    assert "simfs: must be run as root" in capsys.readouterr().err
    assert vz_cli.main(["show", QID]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vzquota : (error) vzquota must be run as root"), err


def test_lock_files_are_removed_at_a_clean_stop(mounter, area):
    private, root = area
    init_on(private)
    rundir = Path(os.environ["VZQUOTA_RUNDIR"])
    m = mounter(private, root, f"quotaid={QID}")
    held = sorted(p.name for p in rundir.iterdir())
    assert f"{QID}.lock" in held and f"{QID}.sock" in held
    assert any(n.startswith("private-") for n in held)
    assert m.umount() == 0
    assert sorted(rundir.iterdir()) == []
    m2 = mounter(private, root, f"quotaid={QID}")      # and mounts again
    assert m2.umount() == 0


def test_source_is_dev_simfs(mounter, area):
    private, root = area
    mounter(private, root)
    with open("/proc/self/mountinfo") as f:
        fields = next(ln for ln in f if ln.split()[4] == str(root)).split()
    assert fields[fields.index("-") + 2] == "/dev/simfs"
    df = subprocess.run(["df", "--output=source", str(root)], capture_output=True,
                        text=True, check=True).stdout.split()
    assert df[-1] == "/dev/simfs"
    assert str(private) not in open("/proc/mounts").read()


MYQUOTA = (Path(__file__).resolve().parent.parent / "tools" / "myquota").read_text()


def test_myquota_says_quota_is_off(mounter, area, world_tmp):
    from conftest import py_as
    private, root = area
    mounter(private, root)                       # a mount without a quota
    r = py_as(1001, 1001, MYQUOTA, str(root))
    assert r.returncode == 1
    assert r.stderr == f"myquota: quota is off for {root}\n"
    r = py_as(1001, 1001, MYQUOTA, str(world_tmp))  # not simfs at all
    assert r.returncode == 1
    assert "is not a simfs container root" in r.stderr and "Errno" not in r.stderr


def test_docs_are_for_root_and_link_nothing_outside():
    repo = Path(__file__).resolve().parent.parent
    readme = (repo / "README.md").read_text()
    import re
    for target in re.findall(r"\]\(([^)]+)\)", readme):
        assert "://" not in target and not target.startswith(".."), target
        assert (repo / target.split("#")[0]).exists(), target
    for doc in [readme, (repo / "tools" / "README.md").read_text()]:
        assert not re.search(r"^\s*`?sudo ", doc, re.M), "the README says: as root"
    simfs_8 = (repo / "man" / "simfs.8").read_text()
    assert "0700" in readme and "0700" in simfs_8
    assert "omit the" not in simfs_8          # readdir lists . and ..


def test_background_daemon_never_logs_nowhere(fuse, area):
    """Without /dev/log the daemon logs to a file, and says so at start."""
    from conftest import is_mountpoint
    from simfs.daemon import FALLBACK_LOG
    private, root = area
    before = os.path.getsize(FALLBACK_LOG) if os.path.exists(FALLBACK_LOG) else 0
    r = subprocess.run([SIMFS, str(private), str(root)], capture_output=True, text=True,
                       timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        if os.path.exists("/dev/log"):
            assert "no syslog" not in r.stderr        # it logs to syslog then
        else:
            assert r.stderr == (f"simfs: no syslog (/dev/log): the daemon logs to "
                                f"{FALLBACK_LOG}\n")
            # written just after the daemon said it is ready
            deadline = time.monotonic() + 10
            while True:
                with open(FALLBACK_LOG) as f:
                    f.seek(before)
                    if f"mounted {private} at {root}" in f.read():
                        break
                assert time.monotonic() < deadline, "no 'mounted' line in the log"
                time.sleep(0.02)
    finally:
        if is_mountpoint(str(root)):
            subprocess.run(["umount", str(root)], check=True)
