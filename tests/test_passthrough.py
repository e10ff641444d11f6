"""simfs as a plain passthrough (no quota), through a real FUSE mount.

Each test mounts a fresh private area at a fresh mount point (the ``mounted``
fixture: options ``dev,suid``, as for a container root) and checks that what a
process does through the mount behaves as on a local filesystem, and lands in
the private area as it would have there:

* files: create/read/write, write-only files, O_APPEND, O_TRUNC, O_EXCL,
  O_DIRECT, sparse files, mmap reads, truncate, fsync, open-unlinked files;
* metadata: chmod, chown, utimes (UTIME_NOW/UTIME_OMIT), real st_blocks and
  st_blksize, stable inode numbers, hard links sharing one inode, xattrs;
* directories, symlinks, fifos, sockets, device nodes, rename flags;
* ownership of new nodes for a non-root caller (uid/gid 1000 in a child
  process): its gid or the setgid parent's, setgid inherited by subdirs, umask;
* errors from the backing filesystem keep their errno and never kill the
  daemon (ENOTEMPTY, EEXIST, ENOENT, EACCES, EXDEV, ENOSPC);
* real trees: ``cp -a`` + ``diff -r``, a ``tar`` round trip with hard links,
  symlinks, modes, owners, times and xattrs;
* safety: symlinks of the private area are never followed by the daemon, a
  chroot into the mount cannot reach the host, a filesystem mounted below the
  private area is not crossed;
* the ``simfs`` program: clean umount/SIGTERM, background mode, ``mount -t
  fuse.simfs``, and its error exits.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import SIMFS, as_user, is_mountpoint, py_as

pytestmark = pytest.mark.fuse

UID = GID = 1000
OTHER_GID = 4242

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(old))


def utimensat(path: Path, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    ts = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    if _libc.utimensat(AT_FDCWD, bytes(path), ts, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))


def errno_of(fn, *args, **kw) -> int:
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno
    raise AssertionError(f"{fn.__name__}{args} did not fail")


def wait_until(cond, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def alive(m) -> None:
    """The daemon survived whatever the test did and still serves."""
    assert m.proc.poll() is None, m.logtext()
    assert is_mountpoint(str(m.root))
    os.stat(m.root)


@pytest.fixture
def shared(mounted):
    """The mount with a directory everyone may write in (like /tmp, no sticky)."""
    private, root, m = mounted
    (root / "shared").mkdir()
    os.chmod(root / "shared", 0o777)
    return private, root, m


# ---- files --------------------------------------------------------------------------


def test_create_write_read_lands_in_private_area(mounted):
    private, root, m = mounted
    (root / "f").write_bytes(b"hello")
    with open(root / "f", "r+b") as f:
        f.seek(3)
        f.write(b"p me")
    assert (root / "f").read_bytes() == b"help me"
    assert (private / "f").read_bytes() == b"help me"
    assert os.stat(root / "f").st_ino == os.stat(private / "f").st_ino


def test_large_file_roundtrip(mounted):
    private, root, m = mounted
    data = os.urandom(3 << 20) + b"tail"
    (root / "big").write_bytes(data)
    assert (root / "big").read_bytes() == data
    assert (private / "big").read_bytes() == data


def test_write_only_file(mounted):
    private, root, m = mounted
    fd = os.open(root / "w", os.O_WRONLY | os.O_CREAT, 0o200)
    try:
        assert os.write(fd, b"secret") == 6
        assert errno_of(os.read, fd, 1) == errno.EBADF
    finally:
        os.close(fd)
    assert stat.S_IMODE(os.stat(root / "w").st_mode) == 0o200
    fd = os.open(root / "w", os.O_WRONLY)
    os.pwrite(fd, b"S", 0)
    os.close(fd)
    assert (private / "w").read_bytes() == b"Secret"


def test_o_append(mounted):
    private, root, m = mounted
    (root / "log").write_bytes(b"one\n")
    fd = os.open(root / "log", os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"two\n")
        os.write(fd, b"three\n")
    finally:
        os.close(fd)
    with open(root / "log", "ab") as f:
        f.write(b"four\n")
    assert (private / "log").read_bytes() == b"one\ntwo\nthree\nfour\n"


def test_o_excl(mounted):
    private, root, m = mounted
    fd = os.open(root / "x", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.close(fd)
    assert errno_of(os.open, root / "x", os.O_WRONLY | os.O_CREAT | os.O_EXCL) == errno.EEXIST
    os.symlink("dangling", root / "l")
    assert errno_of(os.open, root / "l", os.O_WRONLY | os.O_CREAT | os.O_EXCL) == errno.EEXIST
    assert not (private / "dangling").exists()


def test_o_trunc(mounted):
    private, root, m = mounted
    (root / "t").write_bytes(b"x" * 100000)
    fd = os.open(root / "t", os.O_RDWR | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"new")
    finally:
        os.close(fd)
    assert (private / "t").read_bytes() == b"new"
    assert os.stat(root / "t").st_size == 3


def test_other_open_flags(mounted):
    private, root, m = mounted
    (root / "f").write_bytes(b"data")
    os.symlink("f", root / "l")
    for fl in (os.O_NOFOLLOW, os.O_NOATIME, os.O_NONBLOCK, os.O_SYNC, os.O_DSYNC,
               os.O_CLOEXEC, os.O_NOCTTY, os.O_NOFOLLOW | os.O_SYNC):
        fd = os.open(root / "f", os.O_RDWR | fl)
        try:
            assert os.pread(fd, 10, 0) in (b"data", b"Data"), fl
            os.pwrite(fd, b"D", 0)
        finally:
            os.close(fd)
    assert (private / "f").read_bytes() == b"Data"
    fd = os.open(root / "new", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_SYNC, 0o600)
    os.write(fd, b"x")
    os.close(fd)
    assert (private / "new").read_bytes() == b"x"
    assert errno_of(os.open, root / "l", os.O_RDONLY | os.O_NOFOLLOW) == errno.ELOOP
    assert errno_of(os.open, root / "f", os.O_RDONLY | os.O_DIRECTORY) == errno.ENOTDIR
    fd = os.open(root / "l", os.O_PATH | os.O_NOFOLLOW)
    try:
        assert stat.S_ISLNK(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def test_o_direct(mounted):
    private, root, m = mounted
    buf = mmap.mmap(-1, 8192)          # page aligned, as O_DIRECT wants
    buf.write(b"A" * 4096 + b"B" * 4096)
    fd = os.open(root / "d", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        assert os.pwritev(fd, [buf], 0) == 8192
        back = mmap.mmap(-1, 8192)
        assert os.preadv(fd, [back], 0) == 8192
        assert back[:] == buf[:]
    finally:
        os.close(fd)
    # a normal open sees what was written directly
    assert (root / "d").read_bytes() == b"A" * 4096 + b"B" * 4096
    fd = os.open(root / "d", os.O_RDONLY | os.O_DIRECT)
    try:
        back = mmap.mmap(-1, 4096)
        assert os.preadv(fd, [back], 4096) == 4096
        assert back[:] == b"B" * 4096
    finally:
        os.close(fd)
    assert (private / "d").read_bytes()[4095:4097] == b"AB"


def test_sparse_file_and_real_blocks(mounted):
    private, root, m = mounted
    with open(root / "sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"middle")
    st, bst = os.stat(root / "sparse"), os.stat(private / "sparse")
    assert st.st_size == 64 << 20
    assert st.st_blocks == bst.st_blocks < 1024          # not 64 MiB of blocks
    assert st.st_blksize == bst.st_blksize
    with open(root / "sparse", "rb") as f:
        f.seek((32 << 20) - 3)
        assert f.read(9) == b"\0\0\0middle"
    assert os.stat(root / "sparse").st_blocks == os.stat(private / "sparse").st_blocks


def test_st_blocks_follow_writes(mounted):
    private, root, m = mounted
    (root / "f").write_bytes(b"x" * 100000)
    st, bst = os.stat(root / "f"), os.stat(private / "f")
    assert st.st_blocks == bst.st_blocks >= 100000 // 512
    assert st.st_blksize == bst.st_blksize


def test_truncate(mounted):
    private, root, m = mounted
    (root / "f").write_bytes(b"0123456789")
    os.truncate(root / "f", 4)
    assert (private / "f").read_bytes() == b"0123"
    with open(root / "f", "r+b") as f:
        os.ftruncate(f.fileno(), 8)
    assert (root / "f").read_bytes() == b"0123\0\0\0\0"
    assert os.stat(root / "f").st_size == 8


def test_mmap_read_and_shared_write(mounted):
    private, root, m = mounted
    data = bytes(range(256)) * 64
    (root / "m").write_bytes(data)
    with open(root / "m", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert mm[:] == data
        assert mm[1000:1004] == data[1000:1004]
    with open(root / "m", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        mm[0:5] = b"HELLO"
        mm.flush()
    assert (private / "m").read_bytes()[:5] == b"HELLO"


def test_fsync_fdatasync_and_fsyncdir(mounted):
    private, root, m = mounted
    (root / "d").mkdir()
    fd = os.open(root / "d" / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"durable")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(root / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    assert (private / "d" / "f").read_bytes() == b"durable"


def test_flush_on_each_close_of_a_dup(mounted):
    private, root, m = mounted
    fd = os.open(root / "f", os.O_RDWR | os.O_CREAT, 0o644)
    fd2 = os.dup(fd)
    os.write(fd, b"abc")
    os.close(fd)                       # flush, not release
    os.write(fd2, b"def")
    os.close(fd2)                      # flush + release
    assert (private / "f").read_bytes() == b"abcdef"


def test_unlinked_open_file_works_until_last_close(mounted):
    private, root, m = mounted
    fd = os.open(root / "gone", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"before")
        os.unlink(root / "gone")
        assert not (root / "gone").exists()
        assert not (private / "gone").exists()
        assert os.pread(fd, 100, 0) == b"before"
        os.pwrite(fd, b" and after", 6)
        assert os.pread(fd, 100, 0) == b"before and after"
        st = os.fstat(fd)
        assert st.st_nlink == 0 and st.st_size == 16
        os.ftruncate(fd, 6)
        assert os.fstat(fd).st_size == 6
    finally:
        os.close(fd)
    # nothing left behind (no .fuse_hidden files)
    assert os.listdir(private) == [] == os.listdir(root)


def test_unlinked_open_file_with_the_name_reused(mounted):
    private, root, m = mounted
    (root / "n").write_bytes(b"old")
    f = open(root / "n", "rb")
    try:
        os.unlink(root / "n")
        (root / "n").write_bytes(b"new one")
        assert f.read() == b"old"
        assert (root / "n").read_bytes() == b"new one"
    finally:
        f.close()


# ---- metadata -------------------------------------------------------------------------


def test_chmod_chown(mounted):
    private, root, m = mounted
    (root / "f").write_bytes(b"x")
    os.chmod(root / "f", 0o4750)
    os.chown(root / "f", UID, OTHER_GID)
    st = os.stat(root / "f")
    assert stat.S_IMODE(st.st_mode) == 0o750        # chown clears set-user-ID
    assert (st.st_uid, st.st_gid) == (UID, OTHER_GID)
    os.chmod(root / "f", 0o6711)
    bst = os.stat(private / "f")
    assert (stat.S_IMODE(bst.st_mode), bst.st_uid, bst.st_gid) == (0o6711, UID, OTHER_GID)
    os.chown(root / "f", -1, GID)
    assert os.stat(private / "f").st_gid == GID
    assert os.stat(private / "f").st_uid == UID


def test_lchown_of_a_symlink(mounted):
    private, root, m = mounted
    (root / "t").write_bytes(b"x")
    os.symlink("t", root / "l")
    os.chown(root / "l", UID, GID, follow_symlinks=False)
    assert os.lstat(private / "l").st_uid == UID
    assert os.stat(private / "t").st_uid == 0


def test_utimes_explicit_now_and_omit(mounted):
    private, root, m = mounted
    f = root / "f"
    f.write_bytes(b"x")
    os.utime(f, ns=(1_000_000_001, 2_000_000_002))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 2_000_000_002)
    bst = os.stat(private / "f")
    assert (bst.st_atime_ns, bst.st_mtime_ns) == (1_000_000_001, 2_000_000_002)

    before = time.time_ns()
    os.utime(f, None)                               # UTIME_NOW for both
    after = time.time_ns()
    st = os.stat(f)
    for t in (st.st_atime_ns, st.st_mtime_ns):
        assert before - 10**9 <= t <= after + 10**9

    os.utime(f, ns=(1_000_000_001, 2_000_000_002))
    utimensat(f, (0, UTIME_OMIT), (1234, 5678))     # atime untouched
    st = os.stat(private / "f")
    assert st.st_atime_ns == 1_000_000_001
    assert st.st_mtime_ns == 1234 * 10**9 + 5678
    utimensat(f, (99, 0), (0, UTIME_OMIT))          # mtime untouched
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (99 * 10**9, 1234 * 10**9 + 5678)
    before = time.time_ns()
    utimensat(f, (0, UTIME_OMIT), (0, UTIME_NOW))   # only mtime: now
    st = os.stat(f)
    assert st.st_atime_ns == 99 * 10**9
    assert st.st_mtime_ns >= before - 10**9


def test_utimes_of_a_symlink_itself(mounted):
    private, root, m = mounted
    os.symlink("/nonexistent", root / "l")
    os.utime(root / "l", ns=(5 * 10**9, 6 * 10**9), follow_symlinks=False)
    assert os.lstat(private / "l").st_mtime_ns == 6 * 10**9


def test_inode_numbers_are_stable_and_match_the_private_area(mounted):
    private, root, m = mounted
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"x")
    first = {n: os.lstat(root / n).st_ino for n in ("d", "d/f")}
    for n, ino in first.items():
        assert ino == os.lstat(private / n).st_ino
    assert os.stat(root).st_ino == 1
    # make the kernel forget its cached inodes, then look again
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")
    assert {n: os.lstat(root / n).st_ino for n in first} == first
    os.rename(root / "d" / "f", root / "g")
    assert os.lstat(root / "g").st_ino == first["d/f"]


def test_hard_links_share_one_inode(mounted):
    private, root, m = mounted
    (root / "a").write_bytes(b"one")
    (root / "d").mkdir()
    os.link(root / "a", root / "d" / "b")
    sa, sb = os.stat(root / "a"), os.stat(root / "d" / "b")
    assert sa.st_ino == sb.st_ino and sa.st_nlink == sb.st_nlink == 2
    assert os.stat(private / "d" / "b").st_ino == os.stat(private / "a").st_ino
    with open(root / "d" / "b", "ab") as f:
        f.write(b" two")
    assert (root / "a").read_bytes() == b"one two"
    os.unlink(root / "a")
    assert os.stat(root / "d" / "b").st_nlink == 1
    assert (root / "d" / "b").read_bytes() == b"one two"


def test_hard_link_to_symlink(mounted):
    private, root, m = mounted
    os.symlink("target", root / "l")
    os.link(root / "l", root / "l2", follow_symlinks=False)
    assert os.lstat(root / "l2").st_ino == os.lstat(root / "l").st_ino
    assert os.readlink(root / "l2") == "target"


def test_xattrs(mounted):
    private, root, m = mounted
    f = root / "f"
    f.write_bytes(b"x")
    os.setxattr(f, "user.a", b"1")
    os.setxattr(f, "user.bin", b"\0\xff" * 100)
    assert os.getxattr(f, "user.bin") == b"\0\xff" * 100
    assert sorted(os.listxattr(f)) == ["user.a", "user.bin"]
    assert os.getxattr(private / "f", "user.a") == b"1"
    os.setxattr(f, "user.a", b"2", os.XATTR_REPLACE)
    assert errno_of(os.setxattr, f, "user.a", b"3", os.XATTR_CREATE) == errno.EEXIST
    assert errno_of(os.setxattr, f, "user.new", b"3", os.XATTR_REPLACE) == errno.ENODATA
    os.removexattr(f, "user.a")
    assert os.listxattr(f) == ["user.bin"]
    assert errno_of(os.getxattr, f, "user.a") == errno.ENODATA
    assert errno_of(os.removexattr, f, "user.a") == errno.ENODATA
    # directories, trusted.*, and the getfattr/setfattr tools
    (root / "d").mkdir()
    os.setxattr(root / "d", "trusted.t", b"v")
    assert os.getxattr(private / "d", "trusted.t") == b"v"
    subprocess.run(["setfattr", "-n", "user.tool", "-v", "yes", str(root / "d")], check=True)
    out = subprocess.run(["getfattr", "-d", "--absolute-names", str(root / "d")],
                         check=True, capture_output=True, text=True).stdout
    assert 'user.tool="yes"' in out


def test_xattrs_of_symlinks_and_special_files_as_locally(mounted, world_tmp):
    """l*xattr on a symlink acts on the link itself (trusted.* allowed, user.*
    refused), fifos and device nodes likewise: the same answers as a local fs."""
    private, root, m = mounted
    local = world_tmp / "local"
    local.mkdir()

    def probe(top: Path) -> list:
        (top / "t").write_bytes(b"x")
        os.symlink("t", top / "l")
        os.mkfifo(top / "fifo")
        os.mknod(top / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        out = []
        for n in ("l", "fifo", "null"):
            for key in ("trusted.k", "user.k"):
                try:
                    os.setxattr(top / n, key, b"v", follow_symlinks=False)
                    out.append((n, key, "ok"))
                except OSError as e:
                    out.append((n, key, errno.errorcode[e.errno]))
            out.append((n, sorted(os.listxattr(top / n, follow_symlinks=False))))
        out.append(("t", os.listxattr(top / "t")))
        return out
    got = probe(root)
    assert got == probe(local)
    assert ("l", "trusted.k", "ok") in got and ("t", []) in got
    assert os.getxattr(private / "l", "trusted.k", follow_symlinks=False) == b"v"
    assert os.getxattr(root / "l", "trusted.k", follow_symlinks=False) == b"v"
    os.removexattr(root / "l", "trusted.k", follow_symlinks=False)
    assert os.listxattr(private / "l", follow_symlinks=False) == []


def test_xattr_size_probe_and_erange(mounted):
    private, root, m = mounted
    (root / "f").write_bytes(b"x")
    os.setxattr(root / "f", "user.long", b"v" * 3000)
    libc_get = _libc.getxattr
    libc_get.restype = ctypes.c_ssize_t
    n = libc_get(bytes(root / "f"), b"user.long", None, ctypes.c_size_t(0))
    assert n == 3000
    buf = ctypes.create_string_buffer(10)
    assert libc_get(bytes(root / "f"), b"user.long", buf, ctypes.c_size_t(10)) == -1
    assert ctypes.get_errno() == errno.ERANGE


# ---- directories, links, special nodes, rename ------------------------------------------


def test_mkdir_rmdir_readdir(mounted):
    private, root, m = mounted
    (root / "d" / "e").mkdir(parents=True)
    names = {f"f{i:04d}" for i in range(1500)}     # several readdir buffers
    for n in names:
        (private / "d" / n).write_bytes(b"")
    assert set(os.listdir(root / "d")) == names | {"e"}
    with os.scandir(root / "d") as it:
        kinds = {e.name: e.is_dir(follow_symlinks=False) for e in it}
    assert kinds["e"] and not kinds["f0000"]
    assert os.stat(root / "d").st_nlink == os.stat(private / "d").st_nlink == 3
    os.rmdir(root / "d" / "e")
    assert not (private / "d" / "e").exists()
    shutil.rmtree(root / "d")
    assert os.listdir(private) == []


def test_readdir_lists_dot_and_dotdot_like_a_local_directory(mounted):
    private, root, m = mounted
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"")
    for rel in ("", "d", "d/e"):
        mine = subprocess.run(["ls", "-a", str(root / rel)], capture_output=True,
                              text=True, check=True).stdout
        local = subprocess.run(["ls", "-a", str(private / rel)], capture_output=True,
                               text=True, check=True).stdout
        assert mine == local, rel
    out = subprocess.run(["ls", "-aid", str(root / "d"), str(root / "d" / "..")],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == str(os.stat(root / "d").st_ino) and out[2] == "1"
    assert os.listdir(root / "d") == os.listdir(private / "d")   # no dots there


def test_ls_and_find_walk(mounted):
    private, root, m = mounted
    (private / "a" / "b").mkdir(parents=True)
    (private / "a" / "b" / "c").write_text("x")
    os.symlink("b/c", private / "a" / "l")
    out = subprocess.run(["find", str(root), "-printf", "%P %y\n"], check=True,
                         capture_output=True, text=True).stdout.split("\n")
    assert sorted(x for x in out if x.strip()) == [" d", "a d", "a/b d", "a/b/c f", "a/l l"]
    r = subprocess.run(["ls", "-la", str(root / "a")], capture_output=True, text=True)
    assert r.returncode == 0 and "l -> b/c" in r.stdout


def test_symlink_readlink(mounted):
    private, root, m = mounted
    os.symlink("/etc/shadow", root / "abs")
    os.symlink("../../../..", root / "up")
    long = "x/" * 1000
    os.symlink(long, root / "long")
    assert os.readlink(root / "abs") == "/etc/shadow" == os.readlink(private / "abs")
    assert os.readlink(root / "up") == "../../../.."
    assert os.readlink(root / "long") == long
    assert stat.S_ISLNK(os.lstat(root / "abs").st_mode)
    assert errno_of(os.readlink, root / "missing") == errno.ENOENT
    (root / "f").write_bytes(b"")
    assert errno_of(os.readlink, root / "f") == errno.EINVAL


def test_fifo(mounted):
    private, root, m = mounted
    os.mkfifo(root / "fifo", 0o640)
    assert stat.S_ISFIFO(os.lstat(private / "fifo").st_mode)
    r = os.open(root / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(root / "fifo", os.O_WRONLY)
    try:
        os.write(w, b"through the pipe")
        assert os.read(r, 100) == b"through the pipe"
    finally:
        os.close(w)
        os.close(r)


def test_unix_socket(mounted):
    private, root, m = mounted
    path = str(root / "sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(path)
        srv.listen(1)
        assert stat.S_ISSOCK(os.lstat(private / "sock").st_mode)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        cli.connect(path)
        conn, _ = srv.accept()
        cli.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        conn.close()
        cli.close()
    finally:
        srv.close()
    os.mknod(root / "sock2", stat.S_IFSOCK | 0o600)
    assert stat.S_ISSOCK(os.lstat(private / "sock2").st_mode)


def test_device_nodes(mounted):
    private, root, m = mounted
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))
    os.mknod(root / "loop", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    st = os.lstat(private / "loop")
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(7, 0)
    assert os.stat(root / "loop").st_rdev == os.makedev(7, 0)
    assert os.stat(root / "null").st_rdev == os.makedev(1, 3)
    # "dev" is on: the nodes work through the mount
    with open(root / "null", "wb") as f:
        f.write(b"discarded")
    with open(root / "zero", "rb") as f:
        assert f.read(8) == b"\0" * 8


def test_mknod_regular_file(mounted):
    private, root, m = mounted
    os.mknod(root / "reg", stat.S_IFREG | 0o640)
    os.mknod(root / "reg0")                           # mode 0: a regular file 0600
    st = os.lstat(private / "reg")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert stat.S_ISREG(os.lstat(private / "reg0").st_mode)
    (root / "reg").write_bytes(b"ok")
    assert (private / "reg").read_bytes() == b"ok"


def test_concurrent_clients(mounted):
    """Many processes at once, each with its own files: nothing mixed up."""
    private, root, m = mounted
    code = textwrap.dedent("""
        import os, sys
        d = sys.argv[1]
        os.mkdir(d)
        for i in range(40):
            p = os.path.join(d, "f%d" % i)
            data = (d + str(i)).encode() * 500
            with open(p, "wb") as f:
                f.write(data)
            with open(p, "rb") as f:
                assert f.read() == data, p
            os.rename(p, p + ".done")
        print(len(os.listdir(d)))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root / f"w{k}")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(8)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "40", err
    for k in range(8):
        d = private / f"w{k}"
        assert (d / "f7.done").read_bytes() == (str(root / f"w{k}") + "7").encode() * 500
    alive(m)


def test_rename(mounted):
    private, root, m = mounted
    (root / "a").write_bytes(b"A")
    (root / "b").write_bytes(b"B")
    (root / "d").mkdir()
    os.rename(root / "a", root / "d" / "a2")
    assert (private / "d" / "a2").read_bytes() == b"A"
    os.rename(root / "d" / "a2", root / "b")          # replaces
    assert (root / "b").read_bytes() == b"A"
    assert sorted(os.listdir(private)) == ["b", "d"]
    os.rename(root / "d", root / "e")
    assert (private / "e").is_dir()
    (root / "f").mkdir()
    (root / "f" / "x").write_bytes(b"")
    assert errno_of(os.rename, root / "e", root / "f") == errno.ENOTEMPTY
    assert errno_of(os.rename, root / "e", root / "e" / "sub") == errno.EINVAL
    assert errno_of(os.rename, root / "b", root / "e") == errno.EISDIR
    assert errno_of(os.rename, root / "e", root / "b") == errno.ENOTDIR


def test_rename_noreplace(mounted):
    private, root, m = mounted
    (root / "a").write_bytes(b"A")
    (root / "b").write_bytes(b"B")
    assert errno_of(renameat2, root / "a", root / "b", RENAME_NOREPLACE) == errno.EEXIST
    assert (root / "b").read_bytes() == b"B"
    renameat2(root / "a", root / "c", RENAME_NOREPLACE)
    assert sorted(os.listdir(private)) == ["b", "c"]


def test_rename_exchange(mounted):
    private, root, m = mounted
    (root / "a").write_bytes(b"file")
    (root / "d").mkdir()
    (root / "d" / "in").write_bytes(b"inside")
    ino_a, ino_d = os.stat(root / "a").st_ino, os.stat(root / "d").st_ino
    renameat2(root / "a", root / "d", RENAME_EXCHANGE)
    assert (root / "d").read_bytes() == b"file"
    assert (root / "a" / "in").read_bytes() == b"inside"
    assert (os.stat(root / "a").st_ino, os.stat(root / "d").st_ino) == (ino_d, ino_a)
    assert (private / "a" / "in").exists() and (private / "d").is_file()
    assert errno_of(renameat2, root / "a", root / "nope", RENAME_EXCHANGE) == errno.ENOENT


# ---- ownership for a non-root caller ----------------------------------------------------

MAKE_NODES = textwrap.dedent("""
    import os, socket, sys
    os.umask(int(sys.argv[2], 8))
    d = sys.argv[1]
    with open(os.path.join(d, "file"), "w") as f:
        f.write("mine")
    os.mkdir(os.path.join(d, "dir"), 0o777)
    os.mkdir(os.path.join(d, "dir", "sub"), 0o777)
    os.symlink("file", os.path.join(d, "link"))
    os.mkfifo(os.path.join(d, "fifo"), 0o666)
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.path.join(d, "sock"))
    s.close()
    os.link(os.path.join(d, "file"), os.path.join(d, "hard"))
    print("ok")
""")


def test_nodes_of_a_non_root_user_belong_to_it(shared):
    private, root, m = shared
    r = py_as(UID, GID, MAKE_NODES, str(root / "shared"), "022")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    for n in ("file", "dir", "dir/sub", "link", "fifo", "sock"):
        for p in (root / "shared" / n, private / "shared" / n):
            st = os.lstat(p)
            assert (st.st_uid, st.st_gid) == (UID, GID), (p, st)
    assert stat.S_IMODE(os.stat(private / "shared" / "file").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(private / "shared" / "dir").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(private / "shared" / "fifo").st_mode) == 0o644
    assert os.stat(root / "shared" / "hard").st_ino == os.stat(root / "shared" / "file").st_ino
    # the user's own files: it can write, chmod and utime them
    r = py_as(UID, GID, textwrap.dedent("""
        import os, sys
        p = sys.argv[1]
        with open(p, "a") as f:
            f.write("+more")
        os.chmod(p, 0o600)
        os.truncate(p, 6)
        os.utime(p, None)
        os.utime(p, ns=(10**9, 2 * 10**9))
        print(open(p).read())
    """), str(root / "shared" / "file"))
    assert r.returncode == 0 and r.stdout.strip() == "mine+m", r.stderr
    st = os.stat(private / "shared" / "file")
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_mtime_ns == 2 * 10**9


def test_umask_of_the_caller_is_honoured(shared):
    private, root, m = shared
    r = py_as(UID, GID, MAKE_NODES, str(root / "shared"), "077")
    assert r.returncode == 0, r.stderr
    p = private / "shared"
    assert stat.S_IMODE(os.stat(p / "file").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(p / "dir").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(p / "fifo").st_mode) == 0o600
    r = py_as(UID, GID, "import os; os.umask(0); os.mkdir(%r, 0o777); "
              "os.close(os.open(%r, os.O_CREAT|os.O_WRONLY, 0o666))"
              % (str(root / "shared" / "open"), str(root / "shared" / "open" / "f")))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(p / "open").st_mode) == 0o777
    assert stat.S_IMODE(os.stat(p / "open" / "f").st_mode) == 0o666


def test_setgid_directory_gives_its_group_and_subdirs_inherit(shared):
    private, root, m = shared
    sg = root / "shared" / "sg"
    sg.mkdir()
    os.chown(sg, 0, OTHER_GID)
    os.chmod(sg, 0o2777)
    r = py_as(UID, GID, MAKE_NODES, str(sg), "022")
    assert r.returncode == 0, r.stderr
    psg = private / "shared" / "sg"
    for n in ("file", "dir", "dir/sub", "link", "fifo", "sock"):
        st = os.lstat(psg / n)
        assert (st.st_uid, st.st_gid) == (UID, OTHER_GID), (n, st)
    for n in ("dir", "dir/sub"):
        assert os.stat(psg / n).st_mode & stat.S_ISGID, n
        assert os.stat(sg / n).st_mode & stat.S_ISGID, n
    assert not os.stat(psg / "file").st_mode & stat.S_ISGID


DIFF_SCRIPT = textwrap.dedent("""
    import errno, json, os, socket, sys
    top = sys.argv[1]
    os.chdir(top)
    out = []
    def do(label, fn, *a, **k):
        try:
            r = fn(*a, **k)
            out.append([label, "ok" if r is None or not isinstance(r, (int, str, bytes, list))
                        else repr(sorted(r) if isinstance(r, list) else r)])
        except OSError as e:
            out.append([label, errno.errorcode[e.errno]])
    def write(p, data, flags=os.O_WRONLY | os.O_CREAT, mode=0o666):
        fd = os.open(p, flags, mode)
        try:
            return os.write(fd, data)
        finally:
            os.close(fd)
    for umask in (0o022, 0o077, 0o002, 0):
        os.umask(umask)
        u = "u%03o" % umask
        for d in ("own", "sgid", "sticky"):
            base = os.path.join(d, u)
            do(base + " mkdir", os.mkdir, base, 0o777)
            do(base + " f", write, base + "/f", b"data")
            do(base + " excl", write, base + "/f", b"x", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            do(base + " sub", os.mkdir, base + "/sub", 0o3777)
            do(base + " fifo", os.mkfifo, base + "/fifo", 0o666)
            do(base + " node", os.mknod, base + "/node", 0o644)
            do(base + " ln", os.symlink, "f", base + "/ln")
            do(base + " hard", os.link, base + "/f", base + "/hard")
            do(base + " sock", socket.socket(socket.AF_UNIX).bind, base + "/sock")
            do(base + " suid", os.chmod, base + "/f", 0o6775)
            do(base + " append", write, base + "/f", b"+", os.O_WRONLY | os.O_APPEND)
            do(base + " sgid", os.chmod, base + "/f", 0o2750)
            do(base + " trunc", os.truncate, base + "/f", 2)
            do(base + " xattr", os.setxattr, base + "/f", "user.k", b"v")
            do(base + " times", os.utime, base + "/fifo", ns=(10**9, 2 * 10**9))
            do(base + " rename", os.rename, base + "/hard", base + "/sub/moved")
    for d in ("own", "sgid", "sticky"):
        do(d + " unlink root's", os.unlink, d + "/rootfile")
        do(d + " rename root's", os.rename, d + "/rootfile", d + "/mine")
        do(d + " write root's", write, d + "/rootfile", b"x", os.O_WRONLY)
        do(d + " chown", os.chown, d + "/u022/f", os.getuid(), 4242)
        do(d + " chgrp own", os.chown, d + "/u022/f", -1, os.getgid())
        do(d + " list", os.listdir, d)
    print(json.dumps(out))
""")


def _prepare_diff_tree(top: Path) -> None:
    for d, mode, gid in (("own", 0o777, 0), ("sgid", 0o2777, OTHER_GID),
                         ("sticky", 0o1777, 0)):
        (top / d).mkdir()
        os.chown(top / d, 0, gid)
        os.chmod(top / d, mode)
        (top / d / "rootfile").write_bytes(b"root")
        os.chmod(top / d / "rootfile", 0o644)


def _tree_state(top: Path) -> dict:
    out = {}
    for p in sorted(top.rglob("*")):
        st = os.lstat(p)
        e = [stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_nlink]
        if stat.S_ISREG(st.st_mode):
            e += [p.read_bytes(), sorted((n, os.getxattr(p, n)) for n in os.listxattr(p))]
        elif stat.S_ISLNK(st.st_mode):
            e.append(os.readlink(p))
        elif stat.S_ISFIFO(st.st_mode):
            e.append(st.st_mtime_ns)
        out[str(p.relative_to(top))] = e
    return out


def test_a_user_sees_the_same_as_on_a_local_filesystem(mounted, world_tmp):
    """The same script of calls, as uid/gid 1000, in the mount and in a plain
    directory of the backing filesystem: same results, same resulting trees
    (owners, groups, setgid inheritance, umask, set-id bits cleared on write and
    chmod, sticky directories)."""
    private, root, m = mounted
    local = world_tmp / "local"       # a plain directory on the same filesystem
    local.mkdir()
    os.chmod(local, 0o755)
    _prepare_diff_tree(root)
    _prepare_diff_tree(local)
    mine = py_as(UID, GID, DIFF_SCRIPT, str(root))
    ref = py_as(UID, GID, DIFF_SCRIPT, str(local))
    assert mine.returncode == 0 and ref.returncode == 0, mine.stderr + ref.stderr
    got, want = json.loads(mine.stdout), json.loads(ref.stdout)
    assert got == want
    assert ["sticky unlink root's", "EPERM"] in got     # the script did test things
    assert ["sgid/u022 f", "4"] in got
    assert _tree_state(root) == _tree_state(local)
    assert _tree_state(private) == _tree_state(local)
    alive(m)


def test_permission_errors_for_a_non_root_user(mounted):
    private, root, m = mounted
    (root / "closed").mkdir(mode=0o700)
    (root / "closed" / "f").write_bytes(b"x")
    (root / "ro").write_bytes(b"root's")
    os.chmod(root / "ro", 0o644)
    code = textwrap.dedent("""
        import errno, os, sys
        r = sys.argv[1]
        def e(fn, *a):
            try:
                fn(*a)
            except OSError as x:
                return errno.errorcode[x.errno]
            return "ok"
        out = [e(os.listdir, r + "/closed"),
               e(os.stat, r + "/closed/f"),
               e(open, r + "/ro", "w"),
               e(os.mkdir, r + "/new"),
               e(os.chown, r + "/ro", os.getuid(), os.getgid()),
               e(os.chmod, r + "/ro", 0o777),
               e(os.unlink, r + "/ro"),
               e(os.setxattr, r + "/ro", "user.x", b"1"),
               e(os.utime, r + "/ro", (1, 1)),
               e(lambda: open(r + "/ro").read())]
        print(" ".join(out))
    """)
    r = py_as(UID, GID, code, str(root))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["EACCES", "EACCES", "EACCES", "EACCES", "EPERM", "EPERM",
                                "EACCES", "EACCES", "EPERM", "ok"]
    # exactly what the same calls give on the backing filesystem itself
    local = py_as(UID, GID, code, str(private))
    assert local.returncode == 0, local.stderr
    assert r.stdout == local.stdout
    assert (private / "ro").read_bytes() == b"root's"
    alive(m)


def test_shell_tools_as_a_user(shared):
    private, root, m = shared
    d = str(root / "shared")
    r = as_user(UID, GID, "sh", "-c",
                "umask 022 && mkdir -p a/b && echo hi > a/b/c && ln -s b/c a/l && "
                "cp -a a a2 && mv a2 a3 && cat a3/l && rm -r a3", cwd=d)
    assert r.returncode == 0 and r.stdout == "hi\n", r.stderr
    st = os.lstat(private / "shared" / "a" / "l")
    assert st.st_uid == UID and stat.S_ISLNK(st.st_mode)
    assert not (private / "shared" / "a3").exists()


# ---- errors from the backing filesystem ---------------------------------------------------


def test_errno_cases_and_the_daemon_survives(mounted, world_tmp):
    private, root, m = mounted
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"x")
    assert errno_of(os.rmdir, root / "d") == errno.ENOTEMPTY
    assert errno_of(os.mkdir, root / "d") == errno.EEXIST
    assert errno_of(os.symlink, "x", root / "d" / "f") == errno.EEXIST
    assert errno_of(os.link, root / "d" / "f", root / "d" / "f") == errno.EEXIST
    assert errno_of(os.mknod, root / "d" / "f", stat.S_IFIFO | 0o600) == errno.EEXIST
    assert errno_of(os.stat, root / "nope") == errno.ENOENT
    assert errno_of(os.unlink, root / "nope") == errno.ENOENT
    assert errno_of(os.rmdir, root / "d" / "f") == errno.ENOTDIR
    assert errno_of(os.unlink, root / "d") in (errno.EISDIR, errno.EPERM)
    assert errno_of(os.listdir, root / "d" / "f") == errno.ENOTDIR
    assert errno_of(os.getxattr, root / "d", "user.none") == errno.ENODATA
    outside = world_tmp / "outside"
    assert errno_of(os.rename, root / "d" / "f", outside) == errno.EXDEV
    assert errno_of(os.link, root / "d" / "f", outside) == errno.EXDEV
    assert errno_of(os.mkdir, root / ("n" * 256)) == errno.ENAMETOOLONG
    alive(m)
    assert (root / "d" / "f").read_bytes() == b"x"


def test_enospc_reaches_the_writer(mounter, world_tmp):
    private, root = world_tmp / "small", world_tmp / "small-root"
    private.mkdir()
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=64", "tmpfs",
                    str(private)], check=True)
    try:
        m = mounter(private, root)
        with open(root / "fill", "wb") as f:
            with pytest.raises(OSError) as ei:
                for _ in range(64):
                    f.write(b"z" * 65536)
                    f.flush()
        assert ei.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as ei:
            for i in range(100):
                (root / f"n{i}").write_bytes(b"")
        assert ei.value.errno == errno.ENOSPC
        alive(m)
        os.unlink(root / "fill")
        # The backing inode goes when the kernel forgets it: asynchronously.
        deadline = time.monotonic() + 10
        while True:
            try:
                (root / "after").write_bytes(b"room again")
                break
            except OSError as e:
                assert e.errno == errno.ENOSPC and time.monotonic() < deadline
                time.sleep(0.05)
        assert (private / "after").read_bytes() == b"room again"
        assert m.umount() == 0
    finally:
        if is_mountpoint(str(root)):
            subprocess.run(["umount", "-l", str(root)], check=False)
        subprocess.run(["umount", "-l", str(private)], check=True)


# ---- statfs -----------------------------------------------------------------------------


def test_statfs_is_the_host_filesystems(mounted):
    private, root, m = mounted
    s, b = os.statvfs(root), os.statvfs(private)
    assert (s.f_bsize, s.f_frsize, s.f_blocks, s.f_files, s.f_namemax) == \
        (b.f_bsize, b.f_frsize, b.f_blocks, b.f_files, b.f_namemax)
    assert abs(s.f_bavail - b.f_bavail) < 1 << 16
    r = subprocess.run(["df", "-P", str(root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    line = r.stdout.splitlines()[1].split()
    assert line[0] == "/dev/simfs" and line[-1] == str(root)
    assert int(line[1]) == b.f_blocks * b.f_frsize // 1024
    r = subprocess.run(["df", "-i", str(root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ---- real trees -------------------------------------------------------------------------


def _tree_source() -> Path:
    for cand in sorted(Path("/usr/lib").glob("python3*/email")):
        if cand.is_dir():
            return cand
    pytest.skip("no /usr/lib/python3*/email tree to copy")


def test_cp_a_and_diff_r(mounted):
    private, root, m = mounted
    src = _tree_source()
    subprocess.run(["cp", "-a", str(src), str(root / "email")], check=True)
    r = subprocess.run(["diff", "-r", str(src), str(root / "email")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["diff", "-r", str(src), str(private / "email")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for dirpath, dirs, files in os.walk(src):
        for n in dirs + files:
            a = os.lstat(os.path.join(dirpath, n))
            rel = os.path.relpath(os.path.join(dirpath, n), src)
            b = os.lstat(root / "email" / rel)
            assert (a.st_mode, a.st_uid, a.st_gid) == (b.st_mode, b.st_uid, b.st_gid), rel
            if not stat.S_ISDIR(a.st_mode):
                assert (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns), rel
    # what the mount shows is what the private area holds, attribute for attribute
    for dirpath, dirs, files in os.walk(private):
        for n in dirs + files:
            p = Path(dirpath, n)
            b = os.lstat(p)
            a = os.lstat(root / p.relative_to(private))
            for k in ("st_ino", "st_mode", "st_nlink", "st_uid", "st_gid", "st_size",
                      "st_blocks", "st_blksize", "st_mtime_ns", "st_ctime_ns"):
                assert getattr(a, k) == getattr(b, k), (p, k)


def _make_tar_source(src: Path) -> None:
    (src / "dir" / "sub").mkdir(parents=True)
    (src / "dir" / "file").write_bytes(b"content\n" * 1000)
    os.link(src / "dir" / "file", src / "dir" / "sub" / "hardlink")
    os.symlink("../file", src / "dir" / "sub" / "symlink")
    os.symlink("/etc/shadow", src / "abs-link")
    (src / "user-file").write_bytes(b"belongs to 1000")
    os.chown(src / "user-file", UID, GID)
    os.chown(src / "dir" / "sub", UID, OTHER_GID)
    os.lchown(src / "abs-link", UID, GID)
    (src / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "suid", 0o4755)
    os.chmod(src / "dir" / "sub", 0o2750)
    (src / "private").write_bytes(b"secret")
    os.chmod(src / "private", 0o600)
    with open(src / "sparse", "wb") as f:
        f.truncate(1 << 20)
    os.mkfifo(src / "fifo", 0o640)
    os.setxattr(src / "dir" / "file", "user.colour", b"blue")
    os.setxattr(src / "dir", "user.dirattr", b"\x01\x02")
    os.setxattr(src / "abs-link", "trusted.linkattr", b"on the link", follow_symlinks=False)
    for i, p in enumerate(sorted(src.rglob("*"), reverse=True)):
        os.utime(p, ns=(1_600_000_000_000_000_000 + i, 1_500_000_000_000_000_000 + i * 1000),
                 follow_symlinks=False)


def _snapshot(top: Path) -> dict:
    out = {}
    inodes: dict[int, str] = {}
    for p in sorted(top.rglob("*")):
        rel = str(p.relative_to(top))
        st = os.lstat(p)
        entry = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
                 "mtime": st.st_mtime_ns if not stat.S_ISDIR(st.st_mode) else None,
                 "links_to": inodes.setdefault(st.st_ino, rel)}
        if stat.S_ISLNK(st.st_mode):
            entry["target"] = os.readlink(p)
            entry["xattrs"] = {n: os.getxattr(p, n, follow_symlinks=False)
                               for n in os.listxattr(p, follow_symlinks=False)}
        else:
            entry["xattrs"] = {n: os.getxattr(p, n) for n in os.listxattr(p)
                               if n.startswith("user.")}
            if stat.S_ISREG(st.st_mode):
                entry["data"] = p.read_bytes()
        out[rel] = entry
    return out


def test_tar_round_trip(mounted, world_tmp):
    private, root, m = mounted
    src, out = world_tmp / "src", world_tmp / "out"
    src.mkdir()
    out.mkdir()
    _make_tar_source(src)
    tar = ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "--format=posix"]
    subprocess.run(tar + ["-cpf", str(world_tmp / "a.tar"), "-C", str(src), "."], check=True)
    subprocess.run(tar + ["-xpf", str(world_tmp / "a.tar"), "-C", str(root)], check=True)
    want = _snapshot(src)
    assert _snapshot(root) == want
    assert _snapshot(private) == want
    st = os.stat(root / "dir" / "file")
    assert st.st_nlink == 2 and st.st_ino == os.stat(root / "dir" / "sub" / "hardlink").st_ino
    subprocess.run(tar + ["-cpf", str(world_tmp / "b.tar"), "-C", str(root), "."], check=True)
    subprocess.run(tar + ["-xpf", str(world_tmp / "b.tar"), "-C", str(out)], check=True)
    assert _snapshot(out) == want


# ---- safety -----------------------------------------------------------------------------

CHROOT_PROBE = textwrap.dedent("""
    import errno, os, sys
    os.chroot(sys.argv[1])
    os.chdir("/")
    def probe(p):
        try:
            with open(p, "rb") as f:
                return f.read().decode()
        except OSError as e:
            return errno.errorcode[e.errno]
    for p in ("/escape", "/up/etc/shadow", "/up/up/up/escape", "/d/../../../etc/shadow",
              "/etc/hostname"):
        print(p, probe(p))
    print("cwd", os.listdir("/up/../.."))
""")


def test_symlink_escape_from_a_chroot_stays_inside(mounted):
    private, root, m = mounted
    os.symlink("/etc/shadow", root / "escape")
    os.symlink("../../..", root / "up")
    (root / "d").mkdir()
    r = subprocess.run([sys.executable, "-c", CHROOT_PROBE, str(root)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    for p in ("/escape", "/up/etc/shadow", "/up/up/up/escape", "/d/../../../etc/shadow",
              "/etc/hostname"):
        assert res[p] == "ENOENT", (p, res[p])       # no /etc in the container
    assert sorted(eval(res["cwd"])) == ["d", "escape", "up"]
    # with a container /etc, the links reach the container's files
    (root / "etc").mkdir()
    (root / "etc" / "shadow").write_text("container shadow")
    r = subprocess.run([sys.executable, "-c", CHROOT_PROBE, str(root)],
                       capture_output=True, text=True)
    res = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    for p in ("/escape", "/up/etc/shadow", "/up/up/up/escape", "/d/../../../etc/shadow"):
        assert res[p] == "container shadow", (p, res[p])
    # the daemon never followed the links: they are intact and read literally
    assert os.readlink(private / "escape") == "/etc/shadow"
    assert os.readlink(root / "escape") == "/etc/shadow"
    assert os.readlink(root / "up") == "../../.."
    assert stat.S_ISLNK(os.lstat(private / "up").st_mode)


def test_daemon_never_follows_a_symlink_swapped_into_the_private_area(mounted, world_tmp):
    """Replace a directory of the private area by a symlink to a host directory
    behind the daemon's back: creating and listing through the mount must never
    touch the host directory."""
    private, root, m = mounted
    host = world_tmp / "host"
    host.mkdir()
    (host / "host-file").write_text("host")
    (root / "d").mkdir()
    os.stat(root / "d")                              # the daemon holds the inode now
    os.rename(private / "d", private / "moved")
    os.symlink(str(host), private / "d")
    # the kernel's cached inode is the directory itself, wherever it went
    (root / "d" / "created").write_text("x")
    assert (private / "moved" / "created").read_text() == "x"
    assert not (host / "created").exists()
    # once looked up again, d is a symlink: the kernel resolves it as the link
    # says (from the caller's root), the daemon still never follows it
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")
    assert stat.S_ISLNK(os.lstat(root / "d").st_mode)
    assert os.readlink(root / "d") == str(host)
    assert sorted(os.listdir(host)) == ["host-file"]
    # a symlink to a file: chmod/xattr through the link's own name never hit the target
    os.symlink(str(host / "host-file"), private / "f")
    mode = os.stat(host / "host-file").st_mode
    assert errno_of(os.setxattr, root / "f", "user.x", b"1", follow_symlinks=False) == errno.EPERM
    assert os.stat(host / "host-file").st_mode == mode
    assert "user.x" not in os.listxattr(host / "host-file")
    alive(m)


def test_filesystem_mounted_below_is_not_crossed(mounter, area):
    private, root = area
    inner = private / "inner"
    inner.mkdir()
    (inner / "under").write_text("hidden by the tmpfs")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(inner)], check=True)
    try:
        (inner / "other-fs-secret").write_text("must not show")
        m = mounter(private, root)
        (root / "visible").write_text("x")
        assert "inner" not in os.listdir(root)
        assert not os.path.exists(root / "inner" / "other-fs-secret")
        r = subprocess.run(["find", str(root)], capture_output=True, text=True)
        assert "other-fs-secret" not in r.stdout
        alive(m)
        assert m.umount() == 0
    finally:
        subprocess.run(["umount", str(inner)], check=True)


# ---- the simfs program -------------------------------------------------------------------


def test_umount_leaves_nothing_behind(mounted):
    private, root, m = mounted
    (root / "f").write_text("x")
    fd = os.open(root / "f", os.O_RDONLY)
    os.close(fd)
    assert m.umount() == 0
    assert not is_mountpoint(str(root))
    assert os.listdir(root) == []
    assert os.listdir(private) == ["f"]
    assert "Traceback" not in m.logtext()


def test_sigterm_stops_cleanly(mounted):
    private, root, m = mounted
    (root / "f").write_text("x")
    m.proc.send_signal(signal.SIGTERM)
    assert m.wait() == 0, m.logtext()
    assert not is_mountpoint(str(root))
    assert (private / "f").read_text() == "x"


def _daemon_pid(private: Path) -> int:
    st = os.stat(private)
    lock = Path(os.environ["VZQUOTA_RUNDIR"]) / f"private-{st.st_dev}-{st.st_ino}.lock"
    return int(lock.read_text().split()[0])


def test_background_mode(fuse, area, world_tmp):
    private, root = area
    log = world_tmp / "bg.log"
    try:
        r = subprocess.run([SIMFS, str(private), str(root), "-o", f"log={log}"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert is_mountpoint(str(root))                  # mounted when it returns
        (root / "f").write_text("bg")
        assert (private / "f").read_text() == "bg"
        pid = _daemon_pid(private)
        assert pid_alive(pid)
        subprocess.run(["umount", str(root)], check=True)
        wait_until(lambda: not pid_alive(pid), what="the daemon to exit")
        assert not is_mountpoint(str(root))
        text = log.read_text()
        assert "Traceback" not in text and " ERROR " not in text, text
        assert "unmounted" in text
    finally:
        if is_mountpoint(str(root)):
            subprocess.run(["umount", "-l", str(root)], check=False)


def test_mount_t_fuse_simfs(fuse, area, world_tmp):
    if not shutil.which("mount.fuse3") and not os.path.exists("/sbin/mount.fuse3"):
        pytest.skip("mount.fuse3 is missing (fuse3 package)")
    if not shutil.which("simfs", path="/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin"):
        pytest.skip("simfs is not installed in the PATH (run tools/setup.sh)")
    private, root = area
    log = world_tmp / "mount.log"
    try:
        # libmount leaves dev,suid out of a helper's options (only nodev,nosuid
        # are passed); /sbin/mount.fuse.simfs finds them in mount(8)'s own
        r = subprocess.run(["mount", "-t", "fuse.simfs", str(private), str(root),
                            "-o", f"dev,suid,log={log}"], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr
        assert is_mountpoint(str(root))
        with open("/proc/self/mountinfo") as f:
            line = next(ln for ln in f if ln.split()[4] == str(root))
        assert "fuse.simfs" in line
        assert "nodev" not in line.split()[5] and "nosuid" not in line.split()[5]
        os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        with open(root / "null", "wb") as f:              # dev is on
            f.write(b"x")
        pid = _daemon_pid(private)
        r = subprocess.run(["mount", "-o", "remount,ro", str(root)], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        with open("/proc/self/mountinfo") as f:
            flags = next(ln for ln in f if ln.split()[4] == str(root)).split()[5].split(",")
        assert "ro" in flags and "nodev" not in flags and "nosuid" not in flags, flags
        subprocess.run(["umount", str(root)], check=True)
        wait_until(lambda: not pid_alive(pid), what="the daemon to exit")
        assert "Traceback" not in log.read_text()
    finally:
        if is_mountpoint(str(root)):
            subprocess.run(["umount", "-l", str(root)], check=False)


def test_mount_t_fuse_simfs_default_is_nodev_nosuid(fuse, area, world_tmp):
    """mount(8) runs /sbin/mount.fuse.simfs (tools/setup.sh links it there),
    not fuse3's helper, which would add dev,suid: without dev,suid a mount
    through mount(8) is nodev,nosuid like simfs's own; remounts go through
    the same helper and keep them."""
    helper = "/sbin/mount.fuse.simfs"
    if not os.path.exists(helper):
        pytest.skip(f"{helper} is missing (run tools/setup.sh)")
    private, root = area
    log = world_tmp / "mount.log"

    def opts() -> list[str]:
        with open("/proc/self/mountinfo") as f:
            return next(ln for ln in f if ln.split()[4] == str(root)).split()[5].split(",")

    try:
        r = subprocess.run(["mount", "-t", "fuse.simfs", str(private), str(root),
                            "-o", f"log={log}"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert "nodev" in opts() and "nosuid" in opts(), opts()
        os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        assert errno_of(open, root / "null", "wb") == errno.EACCES
        pid = _daemon_pid(private)
        r = subprocess.run(["mount", "-o", "remount,ro", str(root)], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert {"ro", "nodev", "nosuid"} <= set(opts()), opts()
        assert errno_of(open, root / "f", "w") == errno.EROFS
        r = subprocess.run(["mount", "-o", "remount,rw", str(root)], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert {"rw", "nodev", "nosuid"} <= set(opts()), opts()
        (root / "f").write_text("x")
        assert pid_alive(pid)                   # the same daemon serves on
        subprocess.run(["fusermount3", "-u", str(root)], check=True)
        wait_until(lambda: not pid_alive(pid), what="the daemon to exit")
        assert "Traceback" not in log.read_text()
    finally:
        if is_mountpoint(str(root)):
            subprocess.run(["fusermount3", "-u", str(root)], check=False)
        if is_mountpoint(str(root)):
            subprocess.run(["umount", "-l", str(root)], check=False)


def test_default_is_nodev_nosuid(mounter, area):
    private, root = area
    mounter(private, root)
    with open("/proc/self/mountinfo") as f:
        opts = next(ln for ln in f if ln.split()[4] == str(root)).split()[5].split(",")
    assert "nodev" in opts and "nosuid" in opts
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    assert errno_of(open, root / "null", "wb") == errno.EACCES


def _simfs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SIMFS, *args], capture_output=True, text=True, timeout=30)


def test_error_exits(fuse, area, world_tmp):
    private, root = area
    r = _simfs(str(world_tmp / "nope"), str(root))
    assert r.returncode == 1 and "private area" in r.stderr and "does not exist" in r.stderr
    (world_tmp / "file").write_text("")
    r = _simfs(str(world_tmp / "file"), str(root))
    assert r.returncode == 1 and "not a directory" in r.stderr
    r = _simfs(str(private), str(world_tmp / "nomnt"))
    assert r.returncode == 1 and "mount point" in r.stderr and "does not exist" in r.stderr
    r = _simfs(str(private), str(world_tmp / "file"))
    assert r.returncode == 1 and "not a directory" in r.stderr
    r = _simfs(str(private), str(root), "-o", "frobnicate")
    assert r.returncode == 2 and "unknown mount option: frobnicate" in r.stderr
    r = _simfs(str(private), str(root), "-o", "quotaid=abc")
    assert r.returncode == 2 and "quotaid" in r.stderr
    r = _simfs(str(private))
    assert r.returncode == 2 and "usage" in r.stderr.lower()
    assert not is_mountpoint(str(root))


def test_second_mount_is_refused(mounted, world_tmp):
    private, root, m = mounted
    r = _simfs(str(private), str(root))
    assert r.returncode == 1 and "already a mount point" in r.stderr
    other = world_tmp / "other"
    other.mkdir()
    r = _simfs(str(private), str(other), "-f")
    assert r.returncode == 1 and "already mounted" in r.stderr, r.stderr
    assert not is_mountpoint(str(other))
    alive(m)
