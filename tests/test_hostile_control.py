"""Hostile input to the root daemon and its files (issue 7, items 11, 13, 14):
control requests that are malformed, nested, oversized or of the wrong types;
quota, temporary, lock and log files reached through planted symlinks or
unsafe directories; a FIFO or a poisoned quota file; simfs arguments that
would hang or kill the daemon; a live change that cannot be saved."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess

import pytest

from conftest import SIMFS, VZQUOTA, is_mountpoint, vzquota
from vzquota import control, errors
from vzquota.qfile import MAGIC, VERSION, QuotaFile
from vzquota.service import validate_request

K = 1024
QID = "101"


def init(private, *extra, b="1000", B="1200"):
    vzquota("init", QID, "-p", str(private), "-b", b, "-B", B, "-i", "100", "-I", "120",
            "-e", "1d", "-n", "1d", *extra)


def raw_request(data: bytes) -> dict:
    """Send raw bytes to the mount's control socket; returns its answer."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    try:
        s.connect(control.socket_path(int(QID)))
        try:
            s.sendall(data)
        except BrokenPipeError:
            pass
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    return json.loads(buf)


def hard_limit() -> int:
    r = control.request(int(QID), "stat", save=False)
    return r["state"]["level1"][0][2]


@pytest.fixture
def qmounted(mounter, area):
    private, root = area
    init(private)
    vzquota("on", QID)
    m = mounter(private, root, f"quotaid={QID}")
    return private, root, m


# ---- item 11: the control channel --------------------------------------------

def test_nested_and_oversized_requests_leave_the_daemon_alive(qmounted):
    _, root, m = qmounted
    r = raw_request(b"[" * 200_000 + b"\n")
    assert r["ok"] is False and r["code"] == errors.EC_LIVE
    r = raw_request(b'{"cmd":"ping","x":"' + b"a" * (control.MAX_REQUEST + 10) + b'"}\n')
    assert r["ok"] is False and "longer" in r["message"]
    r = raw_request(b'{"cmd":"setlimit","limits":' + b'{"a":' * 5000 + b"1" + b"}" * 5001
                    + b"\n")
    assert r["ok"] is False
    assert m.proc.poll() is None
    assert hard_limit() == 1200 * K
    (root / "alive").write_bytes(b"yes")


@pytest.mark.parametrize("req", [
    {"cmd": "setlimit", "limits": {"bhard": -5}},
    {"cmd": "setlimit", "limits": {"bhard": "5"}},
    {"cmd": "setlimit", "limits": {"bhard": 5.5}},
    {"cmd": "setlimit", "limits": {"bhard": True}},
    {"cmd": "setlimit", "limits": {"bhard": 2**70}},
    {"cmd": "setlimit", "limits": {"bgrace": -1}},
    {"cmd": "setlimit", "limits": {"ugid_on": 1}},
    {"cmd": "setlimit", "limits": {"nonsense": 1}},
    {"cmd": "setlimit", "limits": [1, 2]},
    {"cmd": "setlimit", "force": "yes"},
    {"cmd": "setlimit2", "kind": "user", "id": -1, "bsoft": 0, "bhard": 0, "isoft": 0,
     "ihard": 0},
    {"cmd": "setlimit2", "kind": "user", "id": 2**40, "bsoft": 0, "bhard": 0, "isoft": 0,
     "ihard": 0},
    {"cmd": "setlimit2", "kind": "other", "id": 5, "bsoft": 0, "bhard": 0, "isoft": 0,
     "ihard": 0},
    {"cmd": "setlimit2", "kind": "user", "id": 5},
    {"cmd": "setlimit2", "kind": "user", "bgrace": "1d", "igrace": 0},
    {"cmd": "stat", "save": "no"},
    {"cmd": ["stat"]},
    {"cmd": "explode"},
    ["cmd", "stat"],
    "stat",
])
def test_wrong_types_and_ranges_are_refused_and_change_nothing(qmounted, req):
    r = raw_request(json.dumps(req).encode() + b"\n")
    assert r["ok"] is False and r["code"] == errors.EC_LIVE, r
    assert r["message"].startswith("bad request")
    assert hard_limit() == 1200 * K
    assert vzquota("show", QID, check=False).returncode == 0     # file loads


def test_schema_accepts_what_the_cli_sends():
    for req in ({"cmd": "ping"}, {"cmd": "stat", "save": True}, {"cmd": "off"},
                {"cmd": "on", "limits": {"bsoft": 1, "path": "/vz/private/1"}},
                {"cmd": "setlimit", "limits": {"bhard": 2**63 - 1, "ugid_on": True,
                                               "ugid_limit": 10}, "force": False},
                {"cmd": "setlimit2", "kind": "group", "id": 0, "bsoft": 1, "bhard": 2,
                 "isoft": 3, "ihard": 4},
                {"cmd": "setlimit2", "kind": "user", "bgrace": 60, "igrace": 0},
                {"cmd": "reload2"}, {"cmd": "recalc"}, {"cmd": "drop"}):
        assert validate_request(req) is req


def test_live_setlimit_that_cannot_be_saved_is_not_applied(mounter, area, world_tmp,
                                                            monkeypatch):
    private, root = area
    qdir = world_tmp / "qdir"
    qdir.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700", "tmpfs", str(qdir)],
                   check=True)
    try:
        monkeypatch.setenv("VZQUOTA_DIR", str(qdir))
        init(private)
        vzquota("on", QID)
        mounter(private, root, f"quotaid={QID}")
        subprocess.run(["mount", "-o", "remount,ro", str(qdir)], check=True)
        try:
            r = vzquota("setlimit", QID, "-b", "10", "-B", "20", check=False)
            assert r.returncode == errors.EC_SYSERR, r.stderr
            assert "Read-only" in r.stderr
            assert hard_limit() == 1200 * K                      # not applied
            (root / "fits").write_bytes(b"f" * (100 * K))       # and not enforced
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(qdir)], check=True)
        vzquota("setlimit", QID, "-b", "10", "-B", "20")
        assert hard_limit() == 20 * K
        subprocess.run(["umount", str(root)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(qdir)], check=False)


# ---- item 13: planted symlinks, unsafe directories, the log file ---------------

def test_symlinked_quota_file_is_refused(area, world_tmp):
    private, _ = area
    init(private)
    qf = QuotaFile.for_id(int(QID))
    elsewhere = world_tmp / "planted"
    os.rename(qf.path, elsewhere)
    os.symlink(elsewhere, qf.path)
    r = vzquota("show", QID, check=False)
    assert r.returncode == errors.EC_QUOTAFILE and "symbolic link" in r.stderr


def test_temp_and_lock_symlinks_are_not_followed(area, world_tmp):
    private, _ = area
    init(private)
    qf = QuotaFile.for_id(int(QID))
    st = qf.load()
    victim = world_tmp / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, f"{qf.path}.tmp{os.getpid()}")       # the temp name we use
    qf.save(st)
    assert victim.read_bytes() == b"precious"
    assert qf.load() == st
    os.unlink(qf.path + ".lock")
    created = world_tmp / "created"
    os.symlink(created, qf.path + ".lock")
    with pytest.raises(errors.VzError) as e:
        with qf.lock():
            pass
    assert "symbolic link" in e.value.message
    assert not created.exists()


def test_quota_dir_writable_by_others_is_refused(area, tmp_path):
    private, _ = area
    init(private)
    qdir = os.path.dirname(QuotaFile.for_id(int(QID)).path)
    os.chmod(qdir, 0o777)
    r = vzquota("show", QID, check=False)
    assert r.returncode == errors.EC_QUOTAFILE and "not safe" in r.stderr
    os.chmod(qdir, 0o755)
    os.chown(QuotaFile.for_id(int(QID)).path, 1000, 1000)
    r = vzquota("show", QID, check=False)
    assert r.returncode == errors.EC_QUOTAFILE and "not safe" in r.stderr


def test_log_file_is_private_and_not_followed(mounter, area, world_tmp):
    private, root = area
    logfile = world_tmp / "simfs.log"
    m = mounter(private, root, f"log={logfile}")
    assert stat.S_IMODE(os.stat(logfile).st_mode) == 0o600
    m.umount()
    target = world_tmp / "target"
    link = world_tmp / "link.log"
    os.symlink(target, link)
    r = subprocess.run([SIMFS, str(private), str(root), "-o", f"log={link}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "log file" in r.stderr
    assert not target.exists() and not is_mountpoint(str(root))


def test_run_dir_not_owned_by_root_is_refused(area, world_tmp, monkeypatch):
    private, root = area
    rundir = world_tmp / "run"
    rundir.mkdir()
    os.chown(rundir, 1000, 1000)
    monkeypatch.setenv("VZQUOTA_RUNDIR", str(rundir))
    r = subprocess.run([SIMFS, str(private), str(root)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "not safe" in r.stderr
    assert not is_mountpoint(str(root))


# ---- item 14: bad input, daemon side --------------------------------------------

def write_signed(path: str, body: str) -> None:
    digest = hashlib.sha256(body.encode()).hexdigest()
    with open(path, "w") as f:
        f.write(f"{MAGIC} {VERSION}\n{body}\nsha256 {digest}\n")


@pytest.mark.parametrize("body", [
    "[" * 100_000 + "]" * 100_000,
    '{"qid":' + "[" * 50_000 + "]" * 50_000 + "}",
    "[]",
    '"text"',
])
def test_nested_or_poisoned_quota_file_is_4(area, body):
    private, _ = area
    init(private)
    write_signed(QuotaFile.for_id(int(QID)).path, body)
    r = vzquota("show", QID, check=False)
    assert r.returncode == errors.EC_QUOTAFILE and "corrupt" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_poisoned_fields_are_4(area):
    private, _ = area
    init(private)
    path = QuotaFile.for_id(int(QID)).path
    good = json.loads(open(path).read().split("\n")[1])
    for key, value in (("level1", [[1.5, 0, 0, 0], [0, 0, 0, 0]]), ("users", {"1": 2}),
                       ("grace1", [-1, 0]), ("on", 1), ("path", 5),
                       ("level1", [[2**80, 0, 0, 0], [0, 0, 0, 0]])):
        bad = dict(good, **{key: value})
        write_signed(path, json.dumps(bad, sort_keys=True, separators=(",", ":")))
        r = vzquota("show", QID, check=False)
        assert r.returncode == errors.EC_QUOTAFILE, (key, r.stderr)
        assert "Traceback" not in r.stderr


def test_fifo_as_quota_file_does_not_hang(area):
    private, root = area
    init(private)
    path = QuotaFile.for_id(int(QID)).path
    os.unlink(path)
    os.mkfifo(path, 0o600)
    r = subprocess.run([VZQUOTA, "show", QID],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == errors.EC_QUOTAFILE and "regular file" in r.stderr
    r = subprocess.run([SIMFS, str(private), str(root), "-o", f"quotaid={QID}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "regular file" in r.stderr
    assert not is_mountpoint(str(root))


def test_quota_file_in_a_missing_dir_creates_no_directory(area, world_tmp):
    private, _ = area
    new = world_tmp / "new" / "dir"
    r = vzquota("init", QID, "-p", str(private), "-b", "1", "-B", "1", "-i", "1", "-I",
                "1", "-e", "0", "-n", "0", "-c", str(new / "q"), check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "(error)" in r.stderr
    assert not (world_tmp / "new").exists()


@pytest.mark.parametrize("opt", ["quotaid=\u00b2", "quotaid=\u0661\u0662\u0663",
                                 "quotaid=0", "quotaid=-1", "quotaid=99999999999",
                                 "checkpoint=nan", "checkpoint=inf", "checkpoint=-1",
                                 "checkpoint=0", "checkpoint=1e400", "checkpoint=\u0665",
                                 "quotafile=", "log="])
def test_simfs_bad_option_values_are_usage_errors(area, opt):
    private, root = area
    r = subprocess.run([SIMFS, str(private), str(root), "-o", opt], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("simfs: ") and "Traceback" not in r.stderr
    assert not is_mountpoint(str(root))


def test_mount_point_inside_private_area_is_refused(area):
    private, root = area
    sub = private / "sub"
    sub.mkdir()
    for a, b, word in ((private, sub, "inside the private area"),
                       (sub, private, "inside the mount point"),
                       (private, private, "inside")):
        r = subprocess.run([SIMFS, str(a), str(b)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 1 and word in r.stderr, r.stderr
        assert not is_mountpoint(str(b))


@pytest.mark.parametrize("wait", ["nan", "inf", "-1"])
def test_lock_wait_nonsense_does_not_wait_forever(area, monkeypatch, wait):
    private, _ = area
    init(private)
    lock = QuotaFile.for_id(int(QID)).lock(wait=0)
    with lock:
        env = dict(os.environ, VZQUOTA_LOCK_WAIT=wait)
        r = subprocess.run([VZQUOTA, "setlimit", QID, "-b", "500"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == errors.EC_LOCKED, r.stderr
