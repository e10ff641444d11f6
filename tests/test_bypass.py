"""Quota bypasses a hostile container tried (issue 7, items 1-5 and 8), through
real mounts, mostly as uid 1000.

After each scenario the live usage must equal an independent recount of the
private area at both levels: ``find -printf`` over every inode (hard links
once, ``%b`` = st_blocks) cross-checked with ``du --block-size=1 -s``; never
the project's own scanner.  Freeing an unlinked inode waits for the kernel's
FORGET, which is asynchronous, so the comparison is a wait-for.
"""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import USER_PYTHON, py_as, vzquota
from vzquota import control

K = 1024
QID = "101"


# ---- the independent recount -------------------------------------------------------------


def recount(private) -> dict:
    """Usage of a private area by find(1) and du(1): level 1 and per uid/gid."""
    out = subprocess.run(["find", str(private), "-xdev", "-printf", r"%i %b %U %G\n"],
                         check=True, capture_output=True, text=True).stdout
    seen: dict[str, tuple[int, int, int]] = {}
    for line in out.splitlines():
        ino, blocks, uid, gid = line.split()
        seen[ino] = (int(blocks) * 512, int(uid), int(gid))
    users: dict[int, list[int]] = {}
    groups: dict[int, list[int]] = {}
    for space, uid, gid in seen.values():
        for table, key in ((users, uid), (groups, gid)):
            row = table.setdefault(key, [0, 0])
            row[0] += space
            row[1] += 1
    space = sum(v[0] for v in seen.values())
    du = subprocess.run(["du", "--block-size=1", "-s", "-x", str(private)], check=True,
                        capture_output=True, text=True).stdout.split()[0]
    assert int(du) == space, (du, space)
    return {"level1": (space, len(seen)),
            "users": {k: tuple(v) for k, v in users.items()},
            "groups": {k: tuple(v) for k, v in groups.items()}}


def live() -> dict:
    r = control.request(int(QID), "stat", save=False)
    assert r is not None
    st = r["state"]

    def per_id(table) -> dict:
        return {row[0]: (row[1][0], row[2][0]) for row in table if row[1][0] or row[2][0]}
    return {"level1": (st["level1"][0][0], st["level1"][1][0]),
            "users": per_id(st["users"]), "groups": per_id(st["groups"])}


def assert_exact(private, timeout: float = 10.0) -> None:
    """Live usage equals the recount at both levels (waiting for the kernel's
    asynchronous FORGET of unlinked inodes, up to ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        want, got = recount(private), live()
        if want == got or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert got == want


def usage() -> int:
    return live()["level1"][0]


# ---- mounts --------------------------------------------------------------------------------


@pytest.fixture
def qmount(mounter, area):
    """``qmount(hard_kib, ihard)``: 1st level hard limits, the 2nd level on (uid
    1000 unlimited unless set), root 1777 so that uid 1000 can write."""
    def start(hard="1024", ihard="1000", private=None, root=None):
        private = private or area[0]
        root = root or area[1]
        vzquota("init", QID, "-p", str(private), "-b", "0", "-B", hard, "-i", "0",
                "-I", ihard, "-e", "0", "-n", "0", "-s", "1", "-u", "50")
        vzquota("on", QID)
        m = mounter(private, root, "dev", "suid", f"quotaid={QID}")
        os.chmod(root, 0o1777)
        return private, root, m
    return start


@pytest.fixture
def loopfs(world_tmp):
    """``loopfs(kind, mib, *mkfs_options)``: a fresh ext4 or XFS filesystem in a
    loop image of its own, mounted; unmounted at teardown.  Ask for it before
    ``qmount`` so that the simfs mount on it goes first."""
    mounts: list[Path] = []

    def make(kind: str, mib: int, *options: str) -> Path:
        d = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=world_tmp))
        os.chmod(d, 0o755)
        img, mnt = d / "img", d / "mnt"
        mnt.mkdir()
        with open(img, "wb") as f:
            f.truncate(mib << 20)
        mkfs = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"]}[kind]
        subprocess.run([*mkfs, *options, str(img)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
        mounts.append(mnt)
        os.chmod(mnt, 0o755)
        return mnt
    yield make
    for mnt in reversed(mounts):
        subprocess.run(["umount", str(mnt)], check=False)


def private_on(mnt: Path) -> tuple[Path, Path]:
    """A private area on ``mnt`` and a mount point beside the image."""
    private, root = mnt / "private", mnt.parent / "root"
    private.mkdir()
    root.mkdir()
    return private, root


def run_as(code: str, *args: str, uid: int = 1000) -> str:
    r = py_as(uid, uid, code, *args)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


# ---- 1. an unlinked file reopened through /proc/self/fd -----------------------------------

REOPEN = r"""
import os, sys
p, how, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
os.write(fd, b"a" * 4096)
os.close(fd)
o = os.open(p, os.O_PATH)
if how == "unlink":
    os.unlink(p)
else:
    open(p + ".new", "w").close()
    os.rename(p + ".new", p)
w = os.open("/proc/self/fd/%d" % o, os.O_RDWR)
total = 0
try:
    while total < limit:
        total += os.write(w, b"x" * 65536)
    print("wrote", total)
except OSError as e:
    print("error", e.errno, total)
"""


@pytest.mark.parametrize("how", ["unlink", "rename"])
def test_reopened_unlinked_file_is_charged(qmount, how):
    private, root, _ = qmount("1024")
    out = run_as(REOPEN, str(root / "f"), how, str(8 << 20)).split()
    assert out[:2] == ["error", str(errno.EDQUOT)], out
    assert int(out[2]) < 1024 * K
    assert usage() <= 1024 * K
    assert_exact(private)              # all given back once the kernel forgets it


# ---- 2. every call that adds a name reserves the directory's growth -----------------------

LINKS = r"""
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
os.mkdir(d)
open(d + "/f", "w").close()
for i in range(n):
    try:
        os.link(d + "/f", d + "/%06d" % i + "x" * 200)
    except OSError as e:
        print("error", e.errno, i)
        break
else:
    print("linked", n)
"""


@pytest.mark.parametrize("level", [1, 2])
def test_hard_link_storm_refused_at_the_limit(qmount, level):
    if level == 1:
        private, root, _ = qmount("400")
    else:
        private, root, _ = qmount("100000")
        vzquota("setlimit2", QID, "-u", "1000", "0", "200", "0", "0")
    out = run_as(LINKS, str(root / "d"), "5000").split()
    assert out[:2] == ["error", str(errno.EDQUOT)], out
    if level == 1:
        assert usage() <= 400 * K
    else:
        assert live()["users"][1000][0] <= 200 * K
    assert_exact(private)


FILL = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
try:
    while True:
        os.write(fd, b"z" * 4096)
except OSError as e:
    print(e.errno)
"""

ADD_NAME = r"""
import os, socket, sys
kind, d = sys.argv[1], sys.argv[2]
new = d + "/new"
try:
    if kind == "create":
        open(new, "w").close()
    elif kind == "mkdir":
        os.mkdir(new)
    elif kind == "symlink":
        os.symlink("full", new)
    elif kind == "fifo":
        os.mkfifo(new)
    elif kind == "socket":
        socket.socket(socket.AF_UNIX).bind(new)
    elif kind == "link":
        os.link(d + "/old", new)
    elif kind == "rename":
        os.rename(d + "/old", new)
    print("done")
except OSError as e:
    print(e.errno)
"""


@pytest.mark.parametrize("kind", ["create", "mkdir", "symlink", "fifo", "socket", "link",
                                  "rename"])
def test_no_new_name_once_space_is_full(qmount, kind):
    private, root, _ = qmount("200")
    for name in ("old", "other"):
        run_as("open(__import__('sys').argv[1], 'w').close()", str(root / name))
    assert run_as(FILL, str(root / "full")) == str(errno.EDQUOT)
    assert usage() == 200 * K                       # full to the block
    assert run_as(ADD_NAME, kind, str(root)) == str(errno.EDQUOT)
    assert not os.path.lexists(root / "new")
    # replacing a name adds none: rename over an existing file still works
    run_as("import os,sys; os.rename(sys.argv[1], sys.argv[2])",
           str(root / "other"), str(root / "old"))
    assert_exact(private)


# ---- 3. renameat2(RENAME_WHITEOUT) ---------------------------------------------------------

WHITEOUT = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
d = sys.argv[1]
for a, b in zip(sys.argv[2::2], sys.argv[3::2]):
    if libc.renameat2(-100, os.fsencode(d + "/" + a), -100, os.fsencode(d + "/" + b), 4):
        print(a, b, ctypes.get_errno())
    else:
        print(a, b, 0)
"""


def test_rename_whiteout_is_the_callers_and_charged(qmount):
    private, root, _ = qmount("1024", "3")           # root dir + 2 inodes
    run_as("open(__import__('sys').argv[1], 'w').close()", str(root / "a"))
    # uid 1000 with CAP_MKNOD, which RENAME_WHITEOUT needs
    r = subprocess.run(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups",
                        "--inh-caps=+mknod", "--ambient-caps=+mknod", USER_PYTHON, "-c",
                        WHITEOUT, str(root), "a", "b", "b", "c"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["a b 0", f"b c {errno.EDQUOT}"]
    st = os.lstat(private / "a")                     # the whiteout: 0:0, the caller's
    assert os.major(st.st_rdev) == 0 and os.minor(st.st_rdev) == 0
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert live()["level1"][1] == 3
    assert_exact(private)


# ---- 4. xattr blocks -----------------------------------------------------------------------

XATTRS = r"""
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    p = "%s/x%04d" % (d, i)
    try:
        open(p, "w").close()
        os.setxattr(p, "user.big", os.urandom(3500))
    except OSError as e:
        print("error", e.errno, i)
        break
else:
    print("done", n)
"""


@pytest.mark.parametrize("kind", ["ext4", "xfs"])
def test_xattr_blocks_reserved_and_reconciled(loopfs, qmount, kind):
    mnt = loopfs(kind, 300) if kind == "xfs" else loopfs(kind, 64, "-b", "4096", "-I", "256")
    private, root = private_on(mnt)
    qmount("400", private=private, root=root)
    out = run_as(XATTRS, str(root), "300").split()
    assert out[:2] == ["error", str(errno.EDQUOT)], out
    assert usage() <= 400 * K
    assert_exact(private)
    made = sorted(p for p in os.listdir(root) if p.startswith("x"))
    run_as("import os,sys\nfor p in sys.argv[1:]: os.removexattr(p, 'user.big')",
           *[str(root / p) for p in made[::2]])
    assert_exact(private)
    run_as("import os,sys\nfor p in sys.argv[1:]: os.unlink(p)", *[str(root / p) for p in made])
    assert_exact(private)


# ---- 8. the backing filesystem's root reserve ----------------------------------------------

FILL_HOST = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
total = 0
try:
    while True:
        total += os.write(fd, b"h" * 65536)
except OSError as e:
    print(e.errno, total)
"""


@pytest.mark.parametrize("quota", [True, False])
def test_users_stop_at_the_root_reserve(loopfs, mounter, qmount, quota):
    mnt = loopfs("ext4", 64, "-b", "4096", "-m", "50")
    private, root = private_on(mnt)
    if quota:
        qmount("1000000", private=private, root=root)
    else:
        mounter(private, root)
        os.chmod(root, 0o1777)
    sv = os.statvfs(mnt)
    reserve = (sv.f_bfree - sv.f_bavail) * sv.f_frsize
    avail = sv.f_bavail * sv.f_frsize
    assert reserve > 16 << 20
    err, total = run_as(FILL_HOST, str(root / "user")).split()
    assert int(err) == errno.ENOSPC
    assert int(total) > avail - (2 << 20)            # what was available, used
    os.sync()
    sv = os.statvfs(mnt)
    assert sv.f_bfree * sv.f_frsize > reserve - (256 << 10)   # the reserve is intact
    with open(root / "root-may", "wb") as f:         # the host's root may use it
        f.write(b"r" * (4 << 20))
    if quota:
        assert_exact(private)


# ---- 5. blocks the backing filesystem allocates after the daemon looked ------------------

APPEND_CYCLES = r"""
import os, sys
p = sys.argv[1]
total = 0
try:
    while True:                      # open, append 256 KiB, close: XFS keeps its
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:                         # preallocation across such closes
            for _ in range(4):
                total += os.write(fd, b"a" * 65536)
        finally:
            os.close(fd)
except OSError as e:
    print(e.errno, total)
"""

SPARSE = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
total = 0
try:
    for i in range(100000):          # one block every MiB: an extent each
        total += os.pwrite(fd, b"s" * 4096, i << 20)
except OSError as e:
    print(e.errno, total)
os.fsync(fd)
os.close(fd)
"""


@pytest.mark.parametrize("kind", ["ext4", "xfs"])
@pytest.mark.parametrize("load", ["append", "sparse"])
def test_late_blocks_never_over_the_limit(loopfs, qmount, kind, load):
    import backing as bk
    mnt = loopfs(kind, 300) if kind == "xfs" else loopfs(kind, 300, "-b", "4096")
    private, root = private_on(mnt)
    qmount("12288", private=private, root=root)
    sampler = bk.Sampler(QID)
    sampler.start()
    try:
        err, total = run_as(APPEND_CYCLES if load == "append" else SPARSE,
                            str(root / "f")).split()
    finally:
        sampler.stop()
    assert int(err) == errno.EDQUOT
    assert not sampler.violations, sampler.violations[:3]
    if load == "append":                            # refused at the data, not early
        assert int(total) > (12288 - 1024) * K
    assert_exact(private)
    os.unlink(root / "f")
    assert_exact(private)
    assert usage() == os.lstat(private).st_blocks * 512   # an empty tree: its root only
