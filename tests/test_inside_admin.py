"""Issue 19: the container's root manages its users' 2nd-level quotas from
inside, through the mount (``-o quota_admin[=UID]``, the virtual attribute
``user.vzquota.admin``), with quota-tools-shaped commands (``tools/myquota``
as ``quota``, ``repquota``, ``setquota``).

Every step "inside" runs chrooted into the mount, as uid 0 or as uid 1000, with
the container's own /etc/passwd and /etc/group and myquota copied in.  Live
usage is checked against the independent recount (find + du) at the end.
"""

from __future__ import annotations

import errno
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import backing as bk
from conftest import SIMFS, USER_PYTHON, is_mountpoint, vzquota
from simfs import options as simfs_options
from vzquota import control

K = 1024
QID = "101"
MYQUOTA = Path(__file__).resolve().parent.parent / "tools" / "myquota"
ADMIN = "user.vzquota.admin"

# Runs a program of the container (argv[4], a path inside it) or a Python
# snippet (argv[4] == "-c") chrooted into argv[1] as uid argv[2], gid argv[3].
# The modules myquota needs are imported before the chroot: the container has
# no Python of its own.
RUNNER = r"""
import errno, getopt, json, os, signal, sys
root, uid, gid, prog = sys.argv[1:5]
os.chroot(root)
os.chdir("/")
os.setgroups([int(gid)])
os.setgid(int(gid))
os.setuid(int(uid))
if prog == "-c":
    code = sys.argv[5]
    sys.argv = ["-c"] + sys.argv[6:]
    exec(compile(code, "<inside>", "exec"))
else:
    sys.argv = [prog] + sys.argv[5:]
    with open(prog) as f:
        exec(compile(f.read(), prog, "exec"), {"__name__": "__main__", "__file__": prog})
"""
# The same, first entering a user namespace that maps ids 0-65535 to
# $USERNS_BASE.. (as a user-namespaced container does): the parent, root of the
# host, writes the maps; the child becomes the namespace's root (the host's
# uid $USERNS_BASE), then goes on as RUNNER.
USERNS = r"""
import ctypes, os, sys
base = int(os.environ["USERNS_BASE"])
r, w = os.pipe()
r2, w2 = os.pipe()
pid = os.fork()
if pid:
    os.read(r, 1)
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(f"0 {base} 65536\n")
    os.write(w2, b"x")
    sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:   # CLONE_NEWUSER
    os._exit(90)
os.write(w, b"x")
os.read(r2, 1)
os.setgid(0)
os.setuid(0)
""" + RUNNER

PASSWD = ("root:x:0:0:root:/root:/bin/sh\n"
          "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
          "alice:x:1000:1000:Alice:/home/alice:/bin/sh\n"
          "bob:x:1001:1001:Bob:/home/bob:/bin/sh\n")
GROUP = "root:x:0:\nalice:x:1000:\nbob:x:1001:\nstaff:x:50:alice,bob\n"

WRITE = ("import os,sys\n"
         "fd=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT|os.O_APPEND, 0o644)\n"
         "try:\n"
         "    n=os.write(fd, b'w'*int(sys.argv[2])); print(n)\n"
         "except OSError as e:\n"
         "    print('ERR', e.errno)\n")
SETX = ("import os,sys\n"
        "try:\n"
        "    os.setxattr('/', sys.argv[1], sys.argv[2].encode()); print('ok')\n"
        "except OSError as e:\n"
        "    print('ERR', e.errno)\n")


def inside(root: Path, uid: int, prog: str, *args: str, gid: int | None = None,
           userns: int | None = None):
    """Run ``prog`` (quota, repquota, setquota, or "-c" CODE) inside the
    container as ``uid`` (of a user namespace mapping 0.. to ``userns``.., if
    given)."""
    gid = uid if gid is None else gid
    path = prog if prog == "-c" else f"/usr/local/bin/{prog}"
    env = dict(os.environ, USERNS_BASE=str(userns or 0))
    return subprocess.run([USER_PYTHON, "-c", USERNS if userns else RUNNER, str(root),
                           str(uid), str(gid), path, *args],
                          capture_output=True, text=True, timeout=60, env=env)


def write_inside(root: Path, uid: int, path: str, nbytes: int) -> str:
    r = inside(root, uid, "-c", WRITE, path, str(nbytes))
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def setx_inside(root: Path, uid: int, value: str, name: str = ADMIN) -> str:
    r = inside(root, uid, "-c", SETX, name, value)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def live_state() -> dict:
    r = control.request(int(QID), "stat", save=False)
    assert r is not None
    return r["state"]


def limits_of(kind: str, ugid: int) -> tuple | None:
    """(bsoft KiB, bhard KiB, isoft, ihard) of one object in the live state."""
    for row in live_state()[kind + "s"]:
        if row[0] == ugid:
            return (row[1][1] // K, row[1][2] // K, row[2][1], row[2][2])
    return None


def populate(root: Path, base: int = 0) -> None:
    """The container's own files: /etc/passwd, /etc/group, a home for alice
    and bob (owned by their uids, plus ``base`` as the host sees them),
    myquota linked as quota, repquota and setquota."""
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    for name, uid in (("alice", 1000), ("bob", 1001)):
        home = root / "home" / name
        home.mkdir(parents=True)
        os.chown(home, base + uid, base + uid)
    bindir = root / "usr" / "local" / "bin"
    bindir.mkdir(parents=True)
    shutil.copy(MYQUOTA, bindir / "myquota")
    os.chmod(bindir / "myquota", 0o755)
    for name in ("quota", "repquota", "setquota"):
        os.symlink("myquota", bindir / name)


@pytest.fixture
def container(mounter, area):
    """``container(*options, s="1", u="20")``: a quota (1st level roomy, 2nd
    level on) mounted with ``options`` and populated."""
    private, root = area

    def start(*options: str, s: str = "1", u: str = "20"):
        vzquota("init", QID, "-p", str(private), "-b", "100000", "-B", "100000",
                "-i", "1000", "-I", "1000", "-e", "1d", "-n", "1d", "-s", s, "-u", u)
        vzquota("on", QID)
        m = mounter(private, root, "dev", "suid", f"quotaid={QID}", *options)
        populate(root)
        return private, root, m
    return start


def rep_rows(out: str) -> dict[str, list[str]]:
    """repquota's rows by name (the text after the dashes line, to the blank)."""
    rows = {}
    lines = out.splitlines()
    i = lines.index("-" * 70) + 1
    while i < len(lines) and lines[i]:
        rows[lines[i].split()[0]] = lines[i].split()
        i += 1
    return rows


# ---- the whole path: set inside, enforced, listed, seen by the host, kept ----------

def test_container_root_sets_a_limit_the_user_hits_and_the_host_sees(container, mounter):
    private, root, m = container("quota_admin")
    r = inside(root, 0, "setquota", "-u", "alice", "100", "120", "0", "0", "/")
    assert r.returncode == 0, r.stderr
    assert r.stdout == r.stderr == ""
    assert limits_of("user", 1000) == (100, 120, 0, 0)

    # the user gets EDQUOT at the limit (a short write up to it, then refused)
    first = write_inside(root, 1000, "/home/alice/f", 200 * K)
    assert int(first) < 200 * K
    assert write_inside(root, 1000, "/home/alice/f", 4 * K) == f"ERR {errno.EDQUOT}"
    assert write_inside(root, 1001, "/home/bob/g", 200 * K) == str(200 * K)

    # repquota inside lists it, with the container's names
    r = inside(root, 0, "repquota", "/")
    assert r.returncode == 0, r.stderr
    # the 2nd level's grace times start at a week (vzquota(8): the kernel's default)
    assert r.stdout.startswith("*** Report for user quotas on device /dev/simfs\n"
                               "Block grace time: 7days; Inode grace time: 7days\n")
    rows = rep_rows(r.stdout)
    space, inodes = bk.recount(private).users[1000]      # her home and her file
    used = -(-space // K)
    assert 100 < used <= 120
    assert rows["alice"] in (["alice", "+-", str(used), "100", "120", grace, str(inodes),
                              "0", "0"] for grace in ("7days", "6days"))     # in grace
    assert "bob" in rows and "root" in rows and "#1000" not in r.stdout
    r2 = inside(root, 0, "repquota", "-n", "/")
    assert "#1000" in r2.stdout and "alice" not in r2.stdout

    # the user's own quota: over (at the hard limit), exit 1 as quota(1)
    r = inside(root, 1000, "quota")
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines()[0] == "Disk quotas for user alice (uid 1000): "
    assert re.search(rf"/dev/simfs +{used}\* +100 +120 ", r.stdout), r.stdout

    # uid 1000 cannot change anything (the kernel refuses it: root's 0755 root dir)
    r = inside(root, 1000, "setquota", "-u", "alice", "0", "0", "0", "0", "/")
    assert r.returncode == 1
    assert "setquota: Cannot write quota for 1000 on /dev/simfs: " in r.stderr
    assert limits_of("user", 1000) == (100, 120, 0, 0)

    # the host sees the same figures, and its own setlimit2 still works on them
    out = vzquota("stat", QID, "-t").stdout
    assert "%-11u %5s %9s %11d %11d %11d" % (1000, "user", "1k-blocks", used, 100, 120) in out
    vzquota("setlimit2", QID, "-u", "1000", "200", "300", "0", "0")
    rows = rep_rows(inside(root, 0, "repquota", "/").stdout)
    assert rows["alice"][3:5] == ["200", "300"]
    assert write_inside(root, 1000, "/home/alice/f", 8 * K) == str(8 * K)

    # the events log names the caller
    log = m.logtext()
    assert re.search(r"quota 101: uid 0 \(pid \d+\) inside the container set the limits "
                     r"of user 1000: blocks 100 soft, 120 hard", log), log

    # the limit survives a remount
    inside(root, 0, "setquota", "-u", "alice", "150", "160", "0", "5", "/")
    bk.assert_usage_matches(private, QID)
    assert m.umount() == 0
    out = vzquota("show", QID, "-t").stdout
    assert "%-11u %5s %9s" % (1000, "user", "1k-blocks") in out
    mounter(private, root, "dev", "suid", f"quotaid={QID}", "quota_admin")
    assert limits_of("user", 1000) == (150, 160, 0, 5)
    rows = rep_rows(inside(root, 0, "repquota", "/").stdout)
    assert rows["alice"][3:5] == ["150", "160"]
    assert write_inside(root, 1000, "/home/alice/f", 160 * K) != str(160 * K)
    bk.assert_usage_matches(private, QID)


def test_group_limits_grace_times_and_clearing(container):
    private, root, m = container("quota_admin")
    r = inside(root, 0, "setquota", "-g", "staff", "0", "0", "1", "2", "/")
    assert r.returncode == 0, r.stderr
    r = inside(root, 0, "setquota", "-t", "86400", "3600", "/")
    assert r.returncode == 0, r.stderr
    r = inside(root, 0, "setquota", "-g", "-t", "604800", "0", "/")
    assert r.returncode == 0, r.stderr
    st = live_state()
    assert st["user_grace"] == [86400, 3600] and st["group_grace"] == [604800, 0]
    assert limits_of("group", 50) == (0, 0, 1, 2)
    # the group limit bites: two files of group staff, not a third
    for name in ("a", "b"):
        r = inside(root, 1000, "-c", "open('/home/alice/%s', 'w')" % name, gid=50)
        assert r.returncode == 0, r.stderr
    r = inside(root, 1000, "-c", "open('/home/alice/c', 'w')", gid=50)
    assert "Disk quota exceeded" in r.stderr
    out = inside(root, 0, "repquota", "-g", "/").stdout
    assert "Block grace time: 7days; Inode grace time: 00:00" in out
    assert rep_rows(out)["staff"][1] == "-+"
    out = vzquota("stat", QID, "-t").stdout
    assert " user          1days          01:00         0h" in out
    assert "group          7days                        0h" in out
    # clearing: all zeros; for an id with no object, nothing is created
    assert inside(root, 0, "setquota", "-g", "50", "0", "0", "0", "0", "/").returncode == 0
    assert limits_of("group", 50) == (0, 0, 0, 0)
    assert inside(root, 0, "setquota", "-u", "4242", "0", "0", "0", "0", "/").returncode == 0
    assert limits_of("user", 4242) is None
    # human units: setquota takes K/M/G/T and k/m/g/t, repquota -s prints them
    assert inside(root, 0, "setquota", "bob", "1M", "2G", "3k", "4m", "/").returncode == 0
    assert limits_of("user", 1001) == (1024, 2 * 1024 * 1024, 3000, 4000000)
    rows = rep_rows(inside(root, 0, "repquota", "-s", "-v", "/").stdout)
    assert rows["bob"][2:5] == ["4K", "1024K", "2048M"]
    assert rows["bob"][-2:] == ["3000", "4000k"]
    bk.assert_usage_matches(private, QID)


# ---- who may write --------------------------------------------------------------------

def test_only_the_named_uid_may_write(container):
    """quota_admin=1000 (as for a user-namespaced container whose root is a
    mapped uid): uid 1000 may, root of the host's namespace may not; the root
    directory is 0777 so that the kernel lets every caller's request reach
    the daemon, which answers EPERM itself."""
    private, root, m = container("quota_admin=1000")
    os.chmod(root, 0o777)
    req = json.dumps({"kind": "user", "id": 1001, "bsoft": 10, "bhard": 20, "isoft": 0,
                      "ihard": 0})
    assert setx_inside(root, 0, req) == f"ERR {errno.EPERM}"
    assert setx_inside(root, 1001, req) == f"ERR {errno.EPERM}"
    assert limits_of("user", 1001) == (0, 0, 0, 0)
    assert setx_inside(root, 1000, req) == "ok"
    assert limits_of("user", 1001) == (10, 20, 0, 0)
    log = m.logtext()
    assert re.search(r"quota 101: limits from inside refused: uid 0 \(pid \d+\): only uid "
                     r"1000 may set quota limits from inside \(EPERM\)", log), log
    assert re.search(r"refused: uid 1001 \(pid \d+\)", log)
    assert re.search(r"uid 1000 \(pid \d+\) inside the container set the limits of user "
                     r"1001", log)
    # the administrator sees every id (repquota), others their own only
    r = inside(root, 1000, "repquota", "/")
    assert r.returncode == 0, r.stderr
    assert "bob" in rep_rows(r.stdout)
    r = inside(root, 1001, "repquota", "/")
    assert r.returncode == 1 and "Operation not permitted" in r.stderr
    # a sticky root directory: the kernel itself answers EPERM to non-owners
    os.chmod(root, 0o1777)
    assert setx_inside(root, 1001, req) == f"ERR {errno.EPERM}"
    # the attribute is write-only and cannot be removed
    r = inside(root, 0, "-c", "import os\ntry:\n os.getxattr('/', %r)\nexcept OSError as e:\n"
               " print(e.errno)\ntry:\n os.removexattr('/', %r)\nexcept OSError as e:\n"
               " print(e.errno)" % (ADMIN, ADMIN))
    assert r.stdout.split() == [str(errno.ENODATA), str(errno.EPERM)]
    assert ADMIN not in os.listxattr(root)
    bk.assert_usage_matches(private, QID)


def test_without_quota_admin_nobody_may_write(container):
    private, root, m = container()
    r = inside(root, 0, "setquota", "-u", "alice", "1", "2", "0", "0", "/")
    assert r.returncode == 1
    assert r.stderr == ("setquota: Cannot write quota for 1000 on /dev/simfs: "
                        "Operation not permitted\n"
                        "setquota: the host has not allowed quota administration inside "
                        "this container (simfs -o quota_admin)\n")
    assert limits_of("user", 1000) == (0, 0, 0, 0)
    assert "the host has not allowed quota administration from inside" in m.logtext()
    # root still reads everything
    r = inside(root, 0, "repquota", "/")
    assert r.returncode == 0 and "root" in rep_rows(r.stdout)


def test_quota_or_second_level_off_is_said_clearly(container):
    private, root, m = container("quota_admin", s="0", u="0")
    for cmd in (["setquota", "-u", "alice", "1", "2", "0", "0", "/"], ["repquota", "/"]):
        r = inside(root, 0, *cmd)
        assert r.returncode == 1
        assert f"{cmd[0]}: Mountpoint (or device) / not found or has no quota enabled." \
            in r.stderr
        assert "per-user and per-group quotas are off" in r.stderr
    r = inside(root, 1000, "quota")
    assert r.returncode == 1
    assert "quota: per-user and per-group quotas are off in this container" in r.stderr
    req = json.dumps({"kind": "user", "id": 1000, "bsoft": 1, "bhard": 2, "isoft": 0,
                      "ihard": 0})
    assert setx_inside(root, 0, req) == f"ERR {errno.ESRCH}"
    vzquota("off", QID)
    r = inside(root, 0, "setquota", "-u", "alice", "1", "2", "0", "0", "/")
    assert r.returncode == 1 and "the container's quota is off" in r.stderr
    assert setx_inside(root, 0, req) == f"ERR {errno.ESRCH}"


# ---- malformed requests ---------------------------------------------------------------

BAD = [
    "", "{", "[]", "null", "1", '"setlimit2"', "[" * 30000 + "]" * 30000,
    "[" * 2000 + "]" * 2000, '{"a":' * 800 + "1" + "}" * 800,
    '{"id": ' + "9" * 5000 + "}",
    json.dumps({"cmd": "setlimit", "limits": {"bhard": 1}}),
    json.dumps({"cmd": "off"}), json.dumps({"cmd": "drop"}),
    json.dumps({"cmd": "setlimit2", "limits": {"ugid_limit": 1}}),
    json.dumps({"kind": "user", "id": 1000}),
    json.dumps({"kind": "user", "id": 1000, "bsoft": 1, "bhard": 2, "isoft": 0,
                "ihard": 0, "bgrace": 5}),
    json.dumps({"kind": "user", "id": 1000, "bsoft": 20, "bhard": 10, "isoft": 0,
                "ihard": 0}),
    json.dumps({"kind": "user", "id": 1000, "bsoft": 0, "bhard": 0, "isoft": 9,
                "ihard": 1}),
    json.dumps({"kind": "user", "id": -1, "bsoft": 1, "bhard": 2, "isoft": 0, "ihard": 0}),
    json.dumps({"kind": "user", "id": 2**32 - 1, "bsoft": 1, "bhard": 2, "isoft": 0,
                "ihard": 0}),
    json.dumps({"kind": "user", "id": "1000", "bsoft": 1, "bhard": 2, "isoft": 0,
                "ihard": 0}),
    json.dumps({"kind": "user", "id": True, "bsoft": 1, "bhard": 2, "isoft": 0,
                "ihard": 0}),
    json.dumps({"kind": "user", "id": 1000, "bsoft": 1.5, "bhard": 2, "isoft": 0,
                "ihard": 0}),
    json.dumps({"kind": "user", "id": 1000, "bsoft": 2**63, "bhard": 2**63, "isoft": 0,
                "ihard": 0}),
    json.dumps({"kind": "project", "id": 1000, "bsoft": 1, "bhard": 2, "isoft": 0,
                "ihard": 0}),
    json.dumps({"kind": "user", "bgrace": -1, "igrace": 0}),
    json.dumps({"kind": "user", "id": 1000, "bsoft": 1, "bhard": 2, "isoft": 0,
                "ihard": 0, "path": "/"}),
    json.dumps({"kind": "user", "id": 1000, "bsoft": 1, "bhard": 2, "isoft": 0,
                "ihard": 0, "pad": "x" * 5000}),
]


def test_malformed_requests_are_refused_and_the_daemon_lives(container):
    private, root, m = container("quota_admin")
    write_inside(root, 1000, "/home/alice/f", 64 * K)
    before = live_state()
    code = ("import os, sys, json\n"
            "for v in json.loads(sys.stdin.read()):\n"
            "    try:\n"
            "        os.setxattr('/', %r, v.encode()); print('ok')\n"
            "    except OSError as e:\n"
            "        print(e.errno)\n" % ADMIN)
    r = subprocess.run([USER_PYTHON, "-c", RUNNER, str(root), "0", "0", "-c", code],
                       input=json.dumps(BAD), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    answers = r.stdout.split()
    assert len(answers) == len(BAD)
    assert answers == [str(errno.EINVAL)] * len(BAD), list(zip(BAD, answers))
    after = live_state()
    assert after == before                               # nothing half-applied
    assert m.proc.poll() is None                         # the daemon lives
    assert write_inside(root, 1000, "/home/alice/f", 4 * K) == str(4 * K)
    after = live_state()
    log = m.logtext()
    assert log.count("limits from inside refused: uid 0") == len(BAD)
    assert "Traceback" not in log
    # setquota's own checks say what quota-tools says
    r = inside(root, 0, "setquota", "-u", "alice", "10X", "1", "1", "1", "/")
    assert r.returncode == 1
    assert r.stderr.startswith("setquota: Bad block softlimit: 10X: Unknown space binary "
                               "unit. Valid units are K, M, G, T.\nUsage:\n")
    r = inside(root, 0, "setquota", "-u", "nosuch", "1", "1", "1", "1", "/")
    assert r.returncode == 1 and r.stderr == "setquota: user nosuch does not exist.\n"
    r = inside(root, 0, "setquota", "-u", "alice", "10", "5", "0", "0", "/")
    assert r.returncode == 1
    assert "Cannot write quota for 1000 on /dev/simfs: Invalid argument" in r.stderr
    r = inside(root, 0, "setquota", "-u", "alice", "1", "2", "3")
    assert r.returncode == 1 and "setquota: Bad number of arguments." in r.stderr
    r = inside(root, 0, "repquota", "/nowhere")
    assert r.returncode == 1
    assert r.stderr == ("repquota: Mountpoint (or device) /nowhere not found or has no "
                        "quota enabled.\nrepquota: Not all specified mountpoints are using "
                        "quota.\n")
    assert live_state() == after
    bk.assert_usage_matches(private, QID)


def test_new_ids_from_inside_stay_within_the_ugid_limit(container):
    # uids and gids 0, 1000 and 1001 own the files populate made: 6 of 7
    private, root, m = container("quota_admin", u="7")
    st = live_state()
    assert len(st["users"]) + len(st["groups"]) == 6
    for uid in (2000,):
        assert inside(root, 0, "setquota", str(uid), "1", "2", "0", "0", "/").returncode == 0
    r = inside(root, 0, "setquota", "3000", "1", "2", "0", "0", "/")
    assert r.returncode == 1
    assert "Disk quota exceeded" in r.stderr and "ugid limit" in r.stderr
    assert limits_of("user", 3000) is None


def test_user_namespaced_container(mounter, area):
    """A container in a user namespace (0-65535 -> 100000-165535): the daemon
    sees host ids; -o quota_admin=100000 names its root; myquota translates
    ids through /proc/self/uid_map both ways."""
    private, root = area
    base = 100000
    os.chown(private, base, base)
    vzquota("init", QID, "-p", str(private), "-b", "100000", "-B", "100000",
            "-i", "1000", "-I", "1000", "-e", "1d", "-n", "1d", "-s", "1", "-u", "20")
    vzquota("on", QID)
    m = mounter(private, root, "dev", "suid", f"quotaid={QID}", f"quota_admin={base}")
    populate(root, base)
    (root / "proc").mkdir()
    subprocess.run(["mount", "--bind", "/proc", str(root / "proc")], check=True)
    try:
        r = inside(root, 0, "setquota", "-u", "alice", "100", "120", "0", "0", "/",
                   userns=base)
        assert r.returncode == 0, r.stderr
        assert limits_of("user", base + 1000) == (100, 120, 0, 0)
        r = inside(root, 1000, "-c", WRITE, "/home/alice/f", str(200 * K), userns=base)
        assert int(r.stdout) < 200 * K, r.stderr
        r = inside(root, 1000, "-c", WRITE, "/home/alice/f", str(4 * K), userns=base)
        assert r.stdout.strip() == f"ERR {errno.EDQUOT}"
        r = inside(root, 0, "repquota", "/", userns=base)
        assert r.returncode == 0, r.stderr
        rows = rep_rows(r.stdout)
        assert rows["alice"][3:5] == ["100", "120"] and "root" in rows
        assert f"#{base}" not in r.stdout
        r = inside(root, 1000, "quota", userns=base)
        assert r.returncode == 1
        assert r.stdout.startswith("Disk quotas for user alice (uid 1000): \n")
        # the host's root is not this container's administrator
        r = inside(root, 0, "setquota", "-u", str(base + 1000), "0", "0", "0", "0", "/")
        assert r.returncode == 1 and "Operation not permitted" in r.stderr
        assert limits_of("user", base + 1000) == (100, 120, 0, 0)
        assert re.search(rf"uid {base} \(pid \d+\) inside the container set the limits of "
                         rf"user {base + 1000}", m.logtext())
    finally:
        subprocess.run(["umount", str(root / "proc")], check=False)
    bk.assert_usage_matches(private, QID)


# ---- the option -------------------------------------------------------------------------

def test_quota_admin_option_parsing(area):
    _, own = simfs_options.parse_options(["quotaid=5", "quota_admin"], "/p")
    assert own["quota_admin"] == "0"
    _, own = simfs_options.parse_options(["quotaid=5", "quota_admin=100000"], "/p")
    assert own["quota_admin"] == "100000"
    _, own = simfs_options.parse_options(["quotaid=5"], "/p")
    assert "quota_admin" not in own
    private, root = area
    for opt in ("quota_admin=x", "quota_admin=-1", "quota_admin=4294967295",
                "quota_admin=\u0661", "quota_admin="):
        r = subprocess.run([SIMFS, str(private), str(root), "-o", f"quotaid=5,{opt}"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.startswith("simfs: "), (opt, r.stderr)
    r = subprocess.run([SIMFS, str(private), str(root), "-o", "quota_admin"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "quota_admin needs quotaid" in r.stderr
    assert not is_mountpoint(str(root))


def test_remount_keeps_quota_admin(container):
    """mount(8) passes an fstab line's quota_admin along on a remount: the same
    value is fine, a changed or added one is refused (exit 2)."""
    private, root, m = container("quota_admin")

    def remount(opts: str) -> subprocess.CompletedProcess:
        return subprocess.run([SIMFS, "/dev/simfs", str(root), "-o",
                               f"remount,{opts},user_id=0,group_id=0,allow_other"],
                              capture_output=True, text=True, timeout=60)
    for same in (f"ro,quotaid={QID},quota_admin", "rw,quota_admin=0", "ro", "rw"):
        r = remount(same)
        assert r.returncode == 0, (same, r.stderr)
    r = remount("ro,quota_admin=1000")
    assert r.returncode == 2
    assert "remount cannot change quota_admin=1000 (the mount runs with quota_admin=0)" \
        in r.stderr, r.stderr
    assert inside(root, 0, "setquota", "alice", "1", "2", "0", "0", "/").returncode == 0


# ---- quota-tools' number and time formats ----------------------------------------------

def load_myquota():
    loader = importlib.machinery.SourceFileLoader("myquota", str(MYQUOTA))
    spec = importlib.util.spec_from_loader("myquota", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def test_formats_are_quota_tools():
    mq = load_myquota()
    assert [mq.time2str(s) for s in (0, 29, 30, 3600, 86400, 2 * 86400 - 31, 2 * 86400,
                                     7 * 86400)] == \
        ["00:00", "00:00", "00:01", "01:00", "24:00", "47:59", "2days", "7days"]
    assert [mq.space2str(k, True) for k in (0, 99, 100, 102399, 102400, 150000, 10**9)] == \
        ["0K", "99K", "100K", "102399K", "100M", "147M", "954G"]
    assert mq.space2str(150000, False) == "150000"
    assert [mq.number2str(n, True) for n in (0, 99999, 100000, 123456, 10**8)] == \
        ["0", "99999", "100k", "124k", "100m"]
    assert mq.str2space("1M") == (1024, None) and mq.str2space("0x10") == (16, None)
    assert mq.str2space("010") == (8, None) and mq.str2space("") == (0, None)
    assert mq.str2space("5X")[0] is None
    assert mq.str2number("3k") == (3000, None) and mq.str2number("3K")[0] is None
    assert mq.difftime2str(0, 100) == "" and mq.difftime2str(100, 100) == "none"
