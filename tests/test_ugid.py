"""The 2nd-level quota (per uid and gid inside a container) through a real mount.

Each scenario checks the live usage, per id too, against an independent
recount (find + du, ``backing.recount``).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import backing as bk
from conftest import py_as, vzquota
from vzquota import control

K = 1024
QID = "101"
WRITE = ("import os,sys\n"
         "fd=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT|os.O_APPEND, 0o644)\n"
         "try:\n"
         "    n=os.write(fd, b'w'*int(sys.argv[2])); print(n)\n"
         "except OSError as e:\n"
         "    print('ERR', e.errno)\n")


def live() -> dict:
    r = control.request(int(QID), "stat", save=False)
    assert r is not None
    return r


def per_id(table: list) -> dict[int, tuple[int, int]]:
    return {row[0]: (row[1][0], row[2][0]) for row in table
            if row[1][0] or row[2][0]}


def assert_exact(private) -> None:
    """Live usage, both levels, equals the independent recount (bounded wait
    for the asynchronous FORGET of unlinked inodes)."""
    bk.assert_usage_matches(private, QID)


@pytest.fixture
def ugmount(mounter, area):
    def start(ugid_limit="20"):
        private, root = area
        vzquota("init", QID, "-p", str(private), "-b", "100000", "-B", "100000",
                "-i", "1000", "-I", "1000", "-e", "1d", "-n", "1d", "-s", "1",
                "-u", ugid_limit)
        vzquota("on", QID)
        m = mounter(private, root, "dev", "suid", f"quotaid={QID}")
        os.chmod(root, 0o1777)
        return private, root, m
    return start


def write_as(uid, gid, path, nbytes) -> str:
    r = py_as(uid, gid, WRITE, str(path), str(nbytes))
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_charged_to_owner_uid_and_gid(ugmount):
    private, root, _ = ugmount()
    assert write_as(1001, 2001, root / "a", 40 * K) == str(40 * K)
    assert write_as(1002, 2001, root / "b", 80 * K) == str(80 * K)
    assert write_as(1002, 2002, root / "c", 8 * K) == str(8 * K)
    st = live()["state"]
    users = per_id(st["users"])
    assert users[1001][1] == 1 and users[1002][1] == 2
    assert users[1001][0] >= 40 * K and users[1002][0] >= 88 * K
    assert per_id(st["groups"])[2001][1] == 2
    assert_exact(private)


def test_user_at_hard_limit_refused_while_others_write(ugmount):
    private, root, _ = ugmount()
    vzquota("setlimit2", QID, "-u", "1001", "0", "100", "0", "0")   # live: bites at once
    out = write_as(1001, 1001, root / "a", 200 * K)
    assert out == str(100 * K)                      # short write up to the limit
    assert write_as(1001, 1001, root / "a", 4 * K) == f"ERR {errno.EDQUOT}"
    assert write_as(1002, 1002, root / "b", 200 * K) == str(200 * K)
    assert write_as(0, 0, root / "c", 200 * K) == str(200 * K)
    assert_exact(private)


def test_group_limit_and_inode_limit(ugmount):
    private, root, _ = ugmount()
    vzquota("setlimit2", QID, "-g", "3000", "0", "0", "0", "2")
    assert write_as(1001, 3000, root / "a", 1) == "1"
    assert write_as(1002, 3000, root / "b", 1) == "1"
    r = py_as(1003, 3000, "open(__import__('sys').argv[1], 'w')", str(root / "c"))
    assert "Disk quota exceeded" in r.stderr
    assert write_as(1003, 3001, root / "d", 1) == "1"
    assert_exact(private)


def test_chown_to_full_user_refused_and_file_untouched(ugmount):
    private, root, _ = ugmount()
    write_as(1001, 1001, root / "big", 64 * K)
    vzquota("setlimit2", QID, "-u", "1002", "0", "16", "0", "0")
    with pytest.raises(OSError) as e:
        os.chown(root / "big", 1002, -1)
    assert e.value.errno == errno.EDQUOT
    st = os.stat(private / "big")
    assert (st.st_uid, st.st_gid) == (1001, 1001)
    os.chown(root / "big", 1003, 1004)              # an unlimited owner is fine
    st = live()["state"]
    assert 1001 not in per_id(st["users"])
    assert per_id(st["users"])[1003][1] == 1 and per_id(st["groups"])[1004][1] == 1
    assert st["level1"][1][0] == 2                  # the 1st level did not change
    assert_exact(private)


def test_ugid_limit_refuses_one_more_id(ugmount):
    private, root, _ = ugmount(ugid_limit="3")      # root's uid 0 + gid 0 are two
    assert write_as(1001, 0, root / "a", 1) == "1"   # third id: uid 1001
    r = py_as(1002, 0, "open(__import__('sys').argv[1], 'w')", str(root / "b"))
    assert "Disk quota exceeded" in r.stderr
    out = vzquota("stat", QID, "-t").stdout
    assert "Ugid limit was exceeded: yes" in out
    assert "Ugids: loaded 3, total 3, limit 3" in out
    assert_exact(private)


def test_stat_t_format(ugmount):
    private, root, _ = ugmount()
    write_as(500, 500, root / "f", 1024 * K)
    vzquota("setlimit2", QID, "-u", "500", "10000", "12000", "0", "0")
    vzquota("setlimit2", QID, "-t", "7d", "7d")
    out = vzquota("stat", QID, "-t").stdout.splitlines()
    i = out.index("User/group quota: on,active")
    assert out[i + 1].startswith("Ugids: loaded ")
    assert out[i + 2] == "Ugid limit was exceeded: no"
    assert out[i + 3] == ""
    assert out[i + 4] == "User/group grace times and quotafile flags:"
    assert out[i + 5] == " type block_exp_time inode_exp_time  dqi_flags"
    assert out[i + 6] == " user          7days          7days         0h"
    assert out[i + 9] == "User/group objects:"
    assert out[i + 10] == ("ID           type  resource       usage   softlimit   "
                           "hardlimit    grace status")
    rows = [r for r in out[i + 11:] if r.startswith("500 ")]
    usage = -(-os.stat(private / "f").st_blocks * 512 // K)
    assert rows[0] == "%-11u %5s %9s %11d %11d %11d %8s %6s" % (
        500, "user", "1k-blocks", usage, 10000, 12000, "", "loaded")
    assert rows[1] == "%-11u %5s %9s %11d %11d %11d %8s %6s" % (
        500, "user", "inodes", 1, 0, 0, "", "loaded")


def test_stat_t_inactive_is_9(mounter, area):
    private, root = area
    vzquota("init", QID, "-p", str(private), "-b", "1000", "-B", "1000", "-i", "100",
            "-I", "100", "-e", "0", "-n", "0")
    vzquota("on", QID)
    mounter(private, root, f"quotaid={QID}")
    r = vzquota("stat", QID, "-t", check=False)
    assert r.returncode == 9
    assert "User/group quota: off,inactive" in r.stdout


def test_turning_level2_on_live_recounts(mounter, area):
    private, root = area
    vzquota("init", QID, "-p", str(private), "-b", "100000", "-B", "100000", "-i", "1000",
            "-I", "1000", "-e", "0", "-n", "0")
    vzquota("on", QID)
    mounter(private, root, f"quotaid={QID}")
    os.chmod(root, 0o1777)
    write_as(1001, 1001, root / "a", 8 * K)        # level 2 off: not tracked per id
    vzquota("setlimit", QID, "-s", "1", "-u", "10")  # live: on at once, recounted
    st = live()
    assert st["ugid_active"]
    assert per_id(st["state"]["users"])[1001][1] == 1
    vzquota("setlimit2", QID, "-u", "1001", "0", "12", "0", "0")
    assert write_as(1001, 1001, root / "a", 64 * K) != str(64 * K)
    assert_exact(private)


def test_crash_recovery_per_id(ugmount, mounter):
    private, root, m = ugmount()
    for uid in (1001, 1002, 1003):
        write_as(uid, uid + 1000, root / f"f{uid}", uid * 10)
    m.kill()
    m2 = mounter(private, root, f"quotaid={QID}")
    assert_exact(private)
    m2.umount()


def test_each_user_sees_only_own_quota(ugmount):
    private, root, _ = ugmount()
    vzquota("setlimit2", QID, "-u", "1001", "100", "200", "10", "20")
    vzquota("setlimit2", QID, "-u", "1002", "300", "400", "30", "40")
    write_as(1001, 1001, root / "a", 8 * K)
    write_as(1002, 1002, root / "b", 8 * K)
    code = "import os,sys; sys.stdout.write(os.getxattr(sys.argv[1], 'user.vzquota').decode())"
    mine = json.loads(py_as(1001, 1001, code, str(root)).stdout)
    assert set(mine["users"]) == {"1001"}
    assert mine["users"]["1001"]["blocks"]["hard"] == 200
    assert set(mine["groups"]) == {"1001"}
    assert mine["container"]["blocks"]["soft"] == 100000
    theirs = json.loads(py_as(1002, 1002, code, str(root)).stdout)
    assert set(theirs["users"]) == {"1002"}
    everyone = json.loads(os.getxattr(root, "user.vzquota"))
    assert {"1001", "1002"} <= set(everyone["users"])
    assert "user.vzquota" not in os.listxattr(root)
    with pytest.raises(OSError):
        os.setxattr(root, "user.vzquota", b"{}")
    r = py_as(1001, 1001, Path(__file__).parent.parent.joinpath("tools", "myquota")
              .read_text(), str(root))
    assert r.returncode == 0, r.stderr
    assert "1001" in r.stdout and "1002" not in r.stdout


def test_show_t_after_stop_keeps_limits(ugmount):
    private, root, m = ugmount()
    vzquota("setlimit2", QID, "-u", "1001", "100", "200", "10", "20")
    write_as(1001, 1001, root / "a", 8 * K)
    m.umount()
    out = vzquota("show", QID, "-t").stdout
    assert "%-11u %5s %9s" % (1001, "user", "1k-blocks") in out
    assert "%11d %11d" % (100, 200) in out


def test_2nd_level_grace_starts_at_a_week(ugmount):
    """A new 2nd level has the kernel quota's grace times (MAX_DQ_TIME and
    MAX_IQ_TIME: a week), so a per-user soft limit is a soft one: a write past
    it succeeds and starts the grace; the hard limit still holds."""
    private, root, _ = ugmount()
    out = vzquota("stat", QID, "-t").stdout
    assert " user          7days          7days         0h\n" in out
    assert "group          7days          7days         0h\n" in out
    assert "user 604800 604800 0h group 604800 604800 0h" in " ".join(
        vzquota("-b", "stat", QID, "-t").stdout.split())
    r = vzquota("setlimit2", QID, "-u", "1001", "5M", "6M", "0", "0")
    assert r.stderr == ""                        # a grace time: nothing to warn about
    assert write_as(1001, 1001, root / "big", 5632 * K) == str(5632 * K)   # past soft
    assert write_as(1001, 1001, root / "big", 64 * K) == str(64 * K)       # in grace
    row = [line for line in vzquota("stat", QID, "-t").stdout.splitlines()
           if line.startswith("1001 ") and "user 1k-blocks" in line][0]
    assert row.split()[6] in ("7days", "6days"), row
    written = write_as(1001, 1001, root / "big", 1024 * K)   # up to the hard limit only
    users = per_id(live()["state"]["users"])
    assert users[1001][0] <= 6 * 1024 * K
    assert written != str(1024 * K)
    assert write_as(1001, 1001, root / "big", 64 * K) == f"ERR {errno.EDQUOT}"
    assert_exact(private)


def test_setlimit2_warns_of_a_soft_limit_with_no_grace(ugmount):
    private, root, _ = ugmount()
    vzquota("setlimit2", QID, "-t", "0", "1d")
    r = vzquota("setlimit2", QID, "-u", "1001", "100", "200", "5", "10")
    assert r.stderr == (
        "vzquota : (warning) The user block grace time is 0, so the block soft limit "
        "of uid 1001 acts as a hard limit; set a grace time with vzquota setlimit2 "
        f"{QID} -t BGRACE IGRACE\n")
    vzquota("setlimit2", QID, "-g", "-t", "1d", "1d")
    vzquota("setlimit2", QID, "-g", "2001", "0", "0", "5", "10")
    r = vzquota("setlimit2", QID, "-g", "-t", "1d", "0")
    assert r.stderr == ("vzquota : (warning) The group inode grace time is now 0, so the "
                        "inode soft limits of 1 gids act as hard limits\n")
    assert vzquota("-q", "setlimit2", QID, "-u", "1002", "100", "200", "0", "0").stderr == ""
    # with a grace of 0 the first crossing ends it: the soft limit acts as a hard one
    assert write_as(1001, 1001, root / "f", 152 * K) == str(152 * K)
    assert write_as(1001, 1001, root / "f", 4 * K) == f"ERR {errno.EDQUOT}"
    assert_exact(private)
