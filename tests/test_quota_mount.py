"""The 1st-level quota through a real mount (SPEC sections 4 and 5).

Every scenario ends by checking that the live usage equals an independent
recount of the private area (find + du, ``backing.recount``: ``assert_exact``),
the invariant that keeps accounting honest.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import time

import pytest

import backing as bk
from conftest import py_as, vzquota
from vzquota import control

K = 1024
QID = "101"


def init_quota(private, b="1000", B="1200", i="100", I="120", e="1d", n="1d", *extra):
    vzquota("init", QID, "-p", str(private), "-b", b, "-B", B, "-i", i, "-I", I,
            "-e", e, "-n", n, *extra)
    vzquota("on", QID)


def live() -> dict:
    r = control.request(int(QID), "stat", save=False)
    assert r is not None
    return r["state"]


def usage() -> tuple[int, int]:
    l1 = live()["level1"]
    return l1[0][0], l1[1][0]


def wait_for(cond, timeout: float = 10.0) -> None:
    """Wait until ``cond()`` holds: an unlinked inode is freed at the kernel's
    FORGET, which comes asynchronously (soon after the unlink or last close)."""
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)


def assert_exact(private) -> None:
    """Live usage (1st level) equals the independent recount of the private
    area, waiting (bounded) for the asynchronous FORGET of unlinked inodes."""
    bk.assert_usage_matches(private, QID, ugid=False)


@pytest.fixture
def qmount(mounter, area):
    def start(*limits, options=()):
        private, root = area
        init_quota(private, *limits)
        m = mounter(private, root, "dev", "suid", f"quotaid={QID}", *options)
        return private, root, m
    return start


def write_until_full(path, chunk=64 * K) -> tuple[int, OSError | None]:
    """Write until refused; returns (bytes written, the error)."""
    total = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        while True:
            try:
                n = os.write(fd, b"x" * chunk)
            except OSError as e:
                return total, e
            total += n
            if total > 1 << 30:
                return total, None
    finally:
        os.close(fd)


def test_hard_limit_exact_and_short_write(qmount):
    private, root, _ = qmount("0", "1200")
    base = usage()[0]
    total, err = write_until_full(root / "big")
    assert err is not None and err.errno == errno.EDQUOT
    assert usage()[0] == 1200 * K                  # reached exactly, not passed
    assert total == 1200 * K - base
    assert_exact(private)


def test_short_write_then_refusal(qmount):
    private, root, _ = qmount("0", "100")
    base = usage()[0]
    fd = os.open(root / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        n = os.write(fd, b"y" * (200 * K))
        assert n == 100 * K - base                 # a short count, not an error
        with pytest.raises(OSError) as e:
            os.write(fd, b"y" * 4096)
        assert e.value.errno == errno.EDQUOT
    finally:
        os.close(fd)
    assert (root / "f").stat().st_size == 100 * K - base
    assert_exact(private)


def test_overwrite_of_allocated_blocks_never_fails(qmount):
    private, root, _ = qmount("0", "200")
    write_until_full(root / "f")
    with open(root / "f", "r+b") as f:
        f.write(b"z" * (64 * K))                  # rewrite allocated blocks
        f.flush()
    assert (root / "f").read_bytes()[:4] == b"zzzz"
    assert_exact(private)


def test_soft_limit_grace_expiry_and_reset(qmount):
    private, root, _ = qmount("100", "1000", "100", "120", "2", "1d")
    (root / "a").write_bytes(b"a" * (120 * K))     # crosses soft: timer starts
    l1 = live()["level1"]
    assert l1[0][3] > 0
    (root / "b").write_bytes(b"b" * (8 * K))       # allowed during grace
    deadline = time.monotonic() + 10
    while True:                                    # wait for the timer to run out
        try:
            (root / "c").write_bytes(b"c" * (8 * K))
        except OSError as e:
            assert e.errno == errno.EDQUOT
            break
        assert time.monotonic() < deadline, "grace never expired"
        time.sleep(0.2)
    os.unlink(root / "c") if (root / "c").exists() else None
    os.unlink(root / "a")                          # strictly below soft again
    wait_for(lambda: live()["level1"][0][3] == 0)
    assert live()["level1"][0][3] == 0             # timer cleared
    (root / "d").write_bytes(b"d" * (8 * K))       # allowed again
    assert_exact(private)


def test_root_is_limited_like_everyone(qmount):
    private, root, _ = qmount("0", "300")
    assert os.geteuid() == 0
    os.chmod(root, 0o1777)
    _, err = write_until_full(root / "r")
    assert err is not None and err.errno == errno.EDQUOT
    r = py_as(1000, 1000, "import os,sys; f=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT);"
              "os.write(f, b'x'*8192)", str(root / "u"))
    assert "Disk quota exceeded" in r.stderr
    assert_exact(private)


@pytest.mark.parametrize("kind", ["file", "dir", "symlink", "fifo", "socket", "chardev"])
def test_inode_limit_each_kind(qmount, kind):
    private, root, _ = qmount("0", "100000", "0", "3")
    (root / "one").mkdir()                         # root dir + one = 2 inodes
    (root / "two").write_bytes(b"")                # 3 inodes: the hard limit
    target = root / "new"
    with pytest.raises(OSError) as e:
        if kind == "file":
            open(target, "w").close()
        elif kind == "dir":
            os.mkdir(target)
        elif kind == "symlink":
            os.symlink("two", target)
        elif kind == "fifo":
            os.mkfifo(target)
        elif kind == "socket":
            s = socket.socket(socket.AF_UNIX)
            try:
                s.bind(str(target))
            finally:
                s.close()
        elif kind == "chardev":
            os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    assert e.value.errno == errno.EDQUOT
    assert not os.path.lexists(target)
    assert_exact(private)


def test_each_kind_of_node_is_counted(qmount):
    private, root, _ = qmount("0", "100000", "0", "1000")
    inodes0 = usage()[1]
    (root / "d").mkdir()
    (root / "f").write_bytes(b"data")
    os.symlink("f", root / "l")
    os.symlink("x" * 300, root / "longlink")
    os.mkfifo(root / "p")
    os.mknod(root / "c", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(root / "s"))
    s.close()
    assert usage()[1] == inodes0 + 7
    assert_exact(private)


def test_link_is_free_and_hard_links_count_once(qmount):
    private, root, _ = qmount("0", "100000", "0", "1000")
    (root / "f").write_bytes(b"q" * (40 * K))
    before = usage()
    os.link(root / "f", root / "g")
    assert usage()[1] == before[1]
    assert usage()[0] - before[0] <= 4 * K          # at most a directory block
    os.unlink(root / "f")                           # one link left: still charged
    assert usage()[1] == before[1]
    assert_exact(private)
    os.unlink(root / "g")
    wait_for(lambda: usage()[1] == before[1] - 1)
    assert usage()[1] == before[1] - 1
    assert_exact(private)


def test_link_allowed_at_inode_limit(qmount):
    private, root, _ = qmount("0", "100000", "0", "2")
    (root / "f").write_bytes(b"1")                  # root + f = the limit
    os.link(root / "f", root / "g")                 # a link costs no inode
    assert (root / "g").read_bytes() == b"1"
    assert_exact(private)


def test_open_unlinked_file_charged_until_close(qmount):
    private, root, _ = qmount("0", "100000", "0", "1000")
    base = usage()
    f = open(root / "tmp", "wb")
    f.write(b"u" * (100 * K))
    f.flush()
    os.unlink(root / "tmp")
    assert usage()[0] >= base[0] + 100 * K          # still charged
    f.write(b"u" * (8 * K))
    f.flush()
    f.close()
    deadline = time.monotonic() + 5                 # release is asynchronous
    while usage() != base and time.monotonic() < deadline:
        time.sleep(0.02)
    assert usage() == base
    assert_exact(private)


def test_sparse_file_costs_allocated_space(qmount):
    private, root, _ = qmount("0", "1000")
    with open(root / "sparse", "wb") as f:
        f.seek(10 << 30)                            # 10 GiB hole
        f.write(b"end")
    assert (root / "sparse").stat().st_size == (10 << 30) + 3
    assert usage()[0] < 100 * K
    assert_exact(private)


def test_truncate_frees_and_extend_allocates_nothing(qmount):
    private, root, _ = qmount("0", "1000")
    (root / "t").write_bytes(b"t" * (200 * K))
    mid = usage()[0]
    os.truncate(root / "t", 10 * K)
    assert usage()[0] < mid - 150 * K
    os.truncate(root / "t", 100 << 20)              # extend: a hole, costs nothing
    assert usage()[0] < mid - 150 * K
    assert_exact(private)


def test_rename_over_frees_victim(qmount):
    private, root, _ = qmount("0", "1000")
    (root / "a").write_bytes(b"a" * (100 * K))
    (root / "b").write_bytes(b"b" * (200 * K))
    os.rename(root / "a", root / "b")
    assert (root / "b").read_bytes()[:1] == b"a"
    assert_exact(private)


def test_rmdir_frees_and_many_files(qmount):
    private, root, _ = qmount("0", "100000", "0", "10000")
    d = root / "many"
    d.mkdir()
    for i in range(300):                            # the directory grows
        (d / f"file-{i:04d}-with-a-long-name").write_bytes(b"m" * 100)
    assert_exact(private)
    subprocess.run(["rm", "-r", str(d)], check=True)
    assert_exact(private)


def test_statfs_under_soft(qmount):
    private, root, _ = qmount("1000", "1200", "100", "120")
    (root / "f").write_bytes(b"f" * (100 * K))
    sv = os.statvfs(root)
    space, inodes = usage()
    assert sv.f_blocks * sv.f_frsize == 1000 * K
    assert sv.f_bfree * sv.f_frsize == 1000 * K - space
    assert sv.f_bavail == sv.f_bfree
    assert sv.f_files == 100 and sv.f_ffree == 100 - inodes
    out = subprocess.run(["df", "-k", str(root)], capture_output=True, text=True).stdout
    size, used = out.splitlines()[1].split()[1:3]
    assert int(size) == 1000 and int(used) == -(-space // K)


def test_statfs_over_soft_shows_full(qmount):
    private, root, _ = qmount("100", "1200", "100", "120")
    (root / "f").write_bytes(b"f" * (300 * K))
    sv = os.statvfs(root)
    assert sv.f_bfree == 0 and sv.f_bavail == 0
    out = subprocess.run(["df", str(root)], capture_output=True, text=True).stdout
    assert out.splitlines()[1].split()[4] == "100%"


def test_statfs_quota_off_passes_host_figures(mounted):
    private, root, _ = mounted
    a, b = os.statvfs(private), os.statvfs(root)
    assert (a.f_blocks, a.f_frsize, a.f_files) == (b.f_blocks, b.f_frsize, b.f_files)
    assert abs(a.f_bfree - b.f_bfree) < 1024


def test_statfs_shrinks_when_host_is_short(mounter, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,nr_inodes=50", "tmpfs",
                    str(small)], check=True)
    try:
        private, root = small / "private", tmp_path / "root2"
        private.mkdir()
        root.mkdir()
        init_quota(private, "100000", "200000", "1000", "2000")
        m = mounter(private, root, f"quotaid={QID}")
        host = os.statvfs(small)
        sv = os.statvfs(root)
        space, inodes = usage()
        assert sv.f_bfree == host.f_bfree               # never more than the disk has
        assert sv.f_blocks * sv.f_frsize < 100000 * K   # the size shrank
        b = sv.f_frsize
        assert sv.f_blocks - sv.f_bfree == 100000 * K // b - (100000 * K - space) // b
        assert sv.f_ffree <= host.f_ffree
        m.umount()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_quota_survives_clean_remount(qmount, mounter, area):
    private, root, m = qmount("0", "1000")
    (root / "keep").write_bytes(b"k" * (50 * K))
    before = usage()
    assert m.umount() == 0
    show = vzquota("-b", "show", QID).stdout.split()
    assert int(show[0]) == -(-before[0] // K)
    m2 = mounter(private, root, f"quotaid={QID}")
    assert usage() == before
    m2.umount()


def test_kill_9_recovers_to_exact_usage(qmount, mounter, area):
    private, root, m = qmount("0", "10000", "0", "1000", options=["checkpoint=3600"])
    for i in range(20):
        (root / f"f{i}").write_bytes(b"k" * (10 * K))
    m.kill()                                        # no clean stop, no checkpoint
    assert vzquota("show", QID, check=False).returncode in (0, 10)
    m2 = mounter(private, root, f"quotaid={QID}")
    assert_exact(private)
    assert usage()[1] >= 21
    assert "did not stop cleanly" in m2.logtext()
    m2.umount()


def test_mount_without_quota_file_names_init(fuse, area):
    private, root = area
    from conftest import SIMFS
    r = subprocess.run([SIMFS, str(private), str(root), "-o", "quotaid=555"],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "vzquota init 555" in r.stderr


def test_second_mount_of_same_quota_id_refused(qmount, tmp_path):
    private, root, _ = qmount("0", "1000")
    other = tmp_path / "other"
    other.mkdir()
    from conftest import SIMFS
    r = subprocess.run([SIMFS, str(private), str(other), "-o", f"quotaid={QID}"],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "already mounted" in r.stderr
