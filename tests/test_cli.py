"""The vzquota command line: every exit code, the exact output of stat/show, the
quota file's safety, and the call pattern of scripts written for the original."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import threading

import pytest

from conftest import VZQUOTA, as_user, vzquota
from vzquota import control, errors
from vzquota.qfile import QuotaFile

QID = "101"
LIMITS = ["-b", "1000", "-B", "1200", "-i", "100", "-I", "120", "-e", "0", "-n", "0"]


@pytest.fixture
def private(world_tmp):
    p = world_tmp / "private"
    p.mkdir()
    return p


def init(private, *extra):
    return vzquota("init", QID, "-p", str(private), *LIMITS, *extra)


def code(*args) -> int:
    return vzquota(*args, check=False).returncode


def test_show_output_byte_for_byte(private):
    init(private)
    (private / "f").write_bytes(b"x" * 5000)     # from the host: not seen until recalc
    r = vzquota("show", QID)
    st = os.stat(private)
    blocks = -(-(st.st_blocks * 512) // 1024)
    assert r.stdout == (
        "   resource          usage       softlimit      hardlimit    grace\n"
        f"  1k-blocks {blocks:14d}            1000           1200         \n"
        "     inodes              1             100            120         \n")
    vzquota("recalc", QID)
    r = vzquota("-b", "show", QID)
    lines = r.stdout.splitlines()
    assert lines[1] == "%14d %14d %14d %14d %14d" % (2, 100, 120, 0, 0)


def test_locked_file_is_7(private):
    init(private)
    fd = os.open(QuotaFile.for_id(101).path + ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        env = dict(os.environ, VZQUOTA_LOCK_WAIT="0.2")
        r = subprocess.run([VZQUOTA, "setlimit", QID, "-b", "500"], env=env,
                           capture_output=True, text=True)
        # open_quota_file() of src/quota_io.c
        assert (r.returncode, r.stdout, r.stderr) == (errors.EC_LOCKED, "", (
            "vzquota : (error) can't lock quota file, some quota operations are "
            "performing for id 101\n"))
    finally:
        os.close(fd)
    assert "1000" in vzquota("show", QID).stdout     # unchanged


def test_scan_crossing_mount_point_is_8(private):
    inner = private / "mnt"
    inner.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inner)], check=True)
    try:
        r = vzquota("init", QID, "-p", str(private), *LIMITS, check=False)
        assert r.returncode == errors.EC_EXDEV
        assert "mount point" in r.stderr
    finally:
        subprocess.run(["umount", str(inner)], check=True)


def test_no_path_is_13_and_system_error_is_1(private, world_tmp):
    # scan() of src/quotacheck.c: a missing -p directory is a system error (1)
    r = vzquota("init", QID, "-p", str(private / "nope"), *LIMITS, check=False)
    assert (r.returncode, r.stdout, r.stderr) == (
        errors.EC_SYSERR, "",
        f"vzquota : (error) quota check : stat {private / 'nope'}: No such file or directory\n")
    init(private)
    assert code("recalc", QID, "-p", str(world_tmp / "gone")) == errors.EC_SYSERR
    st = QuotaFile.for_id(101).load()
    st.path = None
    QuotaFile.for_id(101).save(st)
    # get_quota_path() of src/quota_io.c: no path anywhere
    r = vzquota("recalc", QID, check=False)
    assert (r.returncode, r.stderr) == (errors.EC_NOPATH, (
        "vzquota : (error) path to mount point can't be read from config file,\n"
        "use -p <mount_point> option\n\n"))
    blocker = world_tmp / "file"
    blocker.write_text("")
    env = dict(os.environ, VZQUOTA_DIR=str(blocker / "sub"))
    r = subprocess.run([VZQUOTA, "init", "102", "-p", str(private), *LIMITS], env=env,
                       capture_output=True, text=True)
    assert r.returncode == errors.EC_SYSERR and "(error)" in r.stderr


def test_live_channel_failure_is_3(private):
    init(private)
    os.makedirs(control.run_dir(), exist_ok=True)
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(control.socket_path(101))
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        conn.recv(100)
        conn.sendall(b"garbage\n")
        conn.close()
    t = threading.Thread(target=serve)
    t.start()
    try:
        assert code("stat", QID) == errors.EC_LIVE
    finally:
        t.join(5)
        srv.close()


def test_drop(private):
    init(private)
    vzquota("drop", QID)
    assert code("show", QID) == errors.EC_NOQUOTAFILE
    assert code("drop", QID) == errors.EC_NOQUOTAFILE


def test_init_twice_warns(private):
    init(private)
    r = init(private)
    # quota_init(): debug(LOG_WARNING, "Quota file exists, it will be overwritten\n")
    assert r.stderr == "vzquota : (warning) Quota file exists, it will be overwritten\n"
    assert vzquota("-q", "init", QID, "-p", str(private), *LIMITS).stderr == ""


def test_setlimit_offline_and_dirty_flag(private):
    init(private)
    vzquota("setlimit", QID, "-B", "5000", "-I", "500")
    assert "5000" in vzquota("show", QID).stdout
    assert code("setlimit", QID, "-f") == 0
    assert code("show", QID) == errors.EC_QUOTADIRTY   # printed, then 10
    vzquota("on", QID)                                  # a dirty file is rescanned
    assert code("show", QID) == 0


def test_setlimit2_offline_kept_for_next_mount(private):
    init(private, "-s", "1", "-u", "10")
    vzquota("setlimit2", QID, "-u", "500", "100", "200", "10", "20")
    vzquota("setlimit2", QID, "-g", "-t", "1d", "2h")
    r = vzquota("show", QID, "-t")
    assert "500          user 1k-blocks           0         100         200" in r.stdout
    assert "group          1days          02:00         0h" in r.stdout


def test_vzctl_call_pattern_runs_unchanged(private):
    """The way vzctl drives vzquota: show->11->init->on; on->5->setlimit; off->6."""
    script = f"""
set -u
VZQUOTA={VZQUOTA}
$VZQUOTA show {QID} >/dev/null 2>&1
if [ $? -eq 11 ]; then
    $VZQUOTA init {QID} -b 1000 -B 1200 -i 100 -I 120 -e 0 -n 0 -p {private} || exit 21
fi
$VZQUOTA on {QID} -b 1000 -B 1200 -i 100 -I 120 -e 0 -n 0 -p {private} || exit 22
$VZQUOTA on {QID} -b 2000 -B 2400 -i 100 -I 120 -e 0 -n 0 -p {private} >/dev/null 2>&1
rc=$?
if [ $rc -eq 5 ]; then
    $VZQUOTA setlimit {QID} -b 2000 -B 2400 -i 100 -I 120 -e 0 -n 0 || exit 23
else
    exit 24
fi
$VZQUOTA off {QID} || exit 25
$VZQUOTA off {QID} >/dev/null 2>&1
[ $? -eq 6 ] || exit 26
$VZQUOTA show {QID}
"""
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "           2000           2400" in r.stdout


def test_non_root_cannot_reach_live_channel(private):
    init(private)
    os.makedirs(control.run_dir(), exist_ok=True)
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(control.socket_path(101))
    srv.listen(1)
    try:
        os.chmod(os.path.dirname(control.run_dir()), 0o755)
        r = as_user(1000, 1000, "/usr/bin/python3", "-c",
                    "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])",
                    control.socket_path(101))
        assert r.returncode != 0 and "Permission denied" in r.stderr
    finally:
        srv.close()
