"""Unit tests of the passthrough handlers (``simfs.ops.SimOperations``) without a mount.

The Operations object is driven directly, as the request loop would drive it, against a
temporary backing directory; the kernel's part is played by fake ``ctx`` and
``SetattrFields`` objects (as s3ql's ``t3_fs_api.py`` does).  Quota is off here:
these tests are about the passthrough itself: inode numbers and lookup counts,
ownership of new nodes, each operation's effect on the backing tree, and the
errno boundary (backing errors keep their errno, anything unexpected is logged
and becomes EIO).  ``readdir`` is driven with a stand-in for
a readdir token (the real one collects a kernel reply).

Everything runs as root (the backing calls chown to other uids).
"""

from __future__ import annotations

import errno
import logging
import inspect
import os
import stat
import subprocess
from pathlib import Path

import pytest

import fusewire
from fusewire import FUSEError

from simfs import lower
from simfs.inodes import ROOT
from simfs.ops import SimOperations


async def read(ops, fh, off, size):
    """ops.read answers at once, or returns an awaitable when it must wait."""
    r = ops.read(fh, off, size)
    return await r if inspect.isawaitable(r) else r

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="chown to other uids needs root"),
              pytest.mark.anyio]       # on the daemon's default loop (conftest's anyio_backend)

USER = 1000
GROUP = 1000
OTHER_GROUP = 4242


class Ctx:
    """What the request loop passes as ``ctx``: the calling process."""

    def __init__(self, uid: int = 0, gid: int = 0, umask: int = 0o022, pid: int | None = None):
        self.uid, self.gid, self.umask = uid, gid, umask
        self.pid = os.getpid() if pid is None else pid


class Fields:
    """A stand-in for ``fusewire.SetattrFields``."""

    def __init__(self, **kw):
        self.update_atime = self.update_mtime = self.update_ctime = False
        self.update_mode = self.update_uid = self.update_gid = False
        self.update_size = False
        for k, v in kw.items():
            assert hasattr(self, k), k
            setattr(self, k, v)


ROOT_CTX = Ctx()
USER_CTX = Ctx(USER, GROUP, umask=0o027)


@pytest.fixture
def backing(world_tmp) -> Path:
    d = world_tmp / "backing"
    d.mkdir()
    os.chmod(d, 0o755)
    return d


@pytest.fixture
def ops(backing):
    fd = os.open(backing, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    o = SimOperations(fd)
    yield o
    o.table.close_all()
    os.close(fd)


def errno_of(excinfo) -> int:
    return excinfo.value.errno


async def lookup(ops, name: bytes, parent: int = ROOT) -> fusewire.EntryAttributes:
    return ops.lookup(parent, name, ROOT_CTX)


async def create(ops, name: bytes, parent: int = ROOT, mode: int = 0o644,
                 flags: int = os.O_RDWR, ctx: Ctx = ROOT_CTX):
    fi, attr = ops.create(parent, name, stat.S_IFREG | mode, flags, ctx)
    return fi.fh, attr


# ---- lookup, getattr, forget --------------------------------------------------


async def test_root_is_inode_1_and_getattr_matches_backing(ops, backing):
    a = ops.getattr(ROOT, ROOT_CTX)
    st = os.stat(backing)
    assert a.st_ino == ROOT
    assert stat.S_ISDIR(a.st_mode) and a.st_mode == st.st_mode
    assert (a.st_uid, a.st_gid, a.st_nlink) == (st.st_uid, st.st_gid, st.st_nlink)
    assert a.st_mtime_ns == st.st_mtime_ns


async def test_lookup_gives_backing_inode_number_and_real_blocks(ops, backing):
    (backing / "f").write_bytes(b"x" * 10000)
    st = os.stat(backing / "f")
    a = await lookup(ops, b"f")
    assert a.st_ino == st.st_ino
    assert a.st_size == 10000
    assert a.st_blocks == st.st_blocks > 0
    assert a.st_blksize == st.st_blksize
    assert (a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns) == \
        (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)


async def test_lookup_counts_and_forget(ops, backing):
    (backing / "f").write_text("x")
    ino = (await lookup(ops, b"f")).st_ino
    assert (await lookup(ops, b"f")).st_ino == ino      # stable
    assert ops.table.inodes[ino].lookups == 2
    ops.forget([(ino, 1)])
    assert ops.table.inodes[ino].lookups == 1
    ops.forget([(ino, 1)])
    assert ino not in ops.table.inodes
    # forgotten and looked up again: the same number
    assert (await lookup(ops, b"f")).st_ino == ino


async def test_forget_of_unknown_inode_and_root_is_harmless(ops):
    ops.forget([(987654321, 3), (ROOT, 5)])
    assert ROOT in ops.table.inodes
    assert (ops.getattr(ROOT, ROOT_CTX)).st_ino == ROOT


async def test_lookup_dot_and_dotdot_of_root(ops):
    assert (await lookup(ops, b".")).st_ino == ROOT
    assert (await lookup(ops, b"..")).st_ino == ROOT   # never above the root


async def test_lookup_dotdot_of_subdir(ops, backing):
    (backing / "d" / "e").mkdir(parents=True)
    d = (await lookup(ops, b"d")).st_ino
    e = (await lookup(ops, b"e", d)).st_ino
    assert (await lookup(ops, b"..", e)).st_ino == d
    assert (await lookup(ops, b"..", d)).st_ino == ROOT


async def test_lookup_missing_is_a_cached_negative_entry(ops):
    a = await lookup(ops, b"nope")
    assert a.st_ino == 0 and a.entry_timeout > 0
    assert list(ops.table.inodes) == [ROOT]


async def test_getattr_of_unknown_inode_is_estale(ops):
    with pytest.raises(FUSEError) as ei:
        ops.getattr(123456789, ROOT_CTX)
    assert errno_of(ei) == errno.ESTALE


async def test_lookup_of_a_symlink_does_not_follow_it(ops, backing):
    os.symlink("/etc/passwd", backing / "esc")
    os.symlink("../../../..", backing / "up")
    a = await lookup(ops, b"esc")
    assert stat.S_ISLNK(a.st_mode)
    assert a.st_ino == os.lstat(backing / "esc").st_ino
    assert ops.readlink(a.st_ino, ROOT_CTX) == b"/etc/passwd"
    up = await lookup(ops, b"up")
    assert stat.S_ISLNK(up.st_mode)
    # a symlink is not a directory: nothing can be looked up "through" it
    with pytest.raises(FUSEError) as ei:
        await lookup(ops, b"passwd", a.st_ino)
    assert errno_of(ei) == errno.ENOTDIR
    with pytest.raises(FUSEError) as ei:
        ops.open(a.st_ino, os.O_RDONLY, ROOT_CTX)
    assert errno_of(ei) == errno.ELOOP


async def test_filesystem_mounted_below_is_hidden(ops, backing):
    sub = backing / "mnt"
    sub.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(sub)], check=True)
    try:
        (sub / "secret").write_text("other fs")
        with pytest.raises(FUSEError) as ei:
            await lookup(ops, b"mnt")
        assert errno_of(ei) != 0
        names = await readdir_names(ops, ROOT)
        assert b"mnt" not in names and names == [b".", b".."]
    finally:
        subprocess.run(["umount", "-l", str(sub)], check=True)


# ---- creating nodes -----------------------------------------------------------


async def test_create_write_read_flush_fsync_release(ops, backing):
    fh, a = await create(ops, b"f", mode=0o666)
    assert stat.S_ISREG(a.st_mode)
    assert stat.S_IMODE(a.st_mode) == 0o644             # umask 022
    assert ops.write(fh, 0, b"hello world") == 11
    assert ops.write(fh, 6, b"there") == 5
    assert await read(ops, fh, 0, 100) == b"hello there"
    assert await read(ops, fh, 6, 3) == b"the"
    assert await read(ops, fh, 100, 10) == b""
    with pytest.raises(FUSEError) as ei:    # the kernel then stops sending FLUSH
        ops.flush(fh)
    assert errno_of(ei) == errno.ENOSYS
    await ops.fsync(fh, False)
    await ops.fsync(fh, True)
    node = ops.table.inodes[a.st_ino]
    assert node.opens == 1
    ops.release(fh)
    assert node.opens == 0
    assert fh not in ops.handles
    assert (backing / "f").read_bytes() == b"hello there"
    assert a.st_ino == os.stat(backing / "f").st_ino


async def test_create_gives_caller_uid_gid_and_honours_umask(ops, backing):
    fh, a = await create(ops, b"mine", mode=0o666, ctx=USER_CTX)
    ops.release(fh)
    st = os.stat(backing / "mine")
    assert (st.st_uid, st.st_gid) == (USER, GROUP) == (a.st_uid, a.st_gid)
    assert stat.S_IMODE(st.st_mode) == 0o640            # umask 027


async def test_create_mode_with_special_bits_survives_chown(ops, backing):
    fh, a = await create(ops, b"suid", mode=0o4755, ctx=Ctx(USER, GROUP, umask=0))
    ops.release(fh)
    assert stat.S_IMODE(os.stat(backing / "suid").st_mode) == 0o4755


async def test_create_exclusive_on_existing_is_eexist(ops, backing):
    (backing / "f").write_text("keep")
    with pytest.raises(FUSEError) as ei:
        await create(ops, b"f")
    assert errno_of(ei) == errno.EEXIST
    assert (backing / "f").read_text() == "keep"


async def test_create_write_only_and_append(ops, backing):
    fh, _ = await create(ops, b"w", mode=0o200, flags=os.O_WRONLY)
    ops.write(fh, 0, b"abc")
    with pytest.raises(FUSEError) as ei:
        await read(ops, fh, 0, 3)
    assert errno_of(ei) == errno.EBADF
    ops.release(fh)
    assert stat.S_IMODE(os.stat(backing / "w").st_mode) == 0o200
    ino = (await lookup(ops, b"w")).st_ino
    fi = ops.open(ino, os.O_WRONLY | os.O_APPEND, ROOT_CTX)
    ops.write(fi.fh, 0, b"def")   # O_APPEND: the offset does not matter
    ops.release(fi.fh)
    assert (backing / "w").read_bytes() == b"abcdef"


async def test_create_in_setgid_dir_takes_dir_group(ops, backing):
    d = backing / "shared"
    d.mkdir()
    os.chown(d, 0, OTHER_GROUP)
    os.chmod(d, 0o2777)
    dino = (await lookup(ops, b"shared")).st_ino
    fh, a = await create(ops, b"f", parent=dino, ctx=USER_CTX)
    ops.release(fh)
    assert (a.st_uid, a.st_gid) == (USER, OTHER_GROUP)
    sub = ops.mkdir(dino, b"sub", stat.S_IFDIR | 0o777, USER_CTX)
    st = os.stat(d / "sub")
    assert (st.st_uid, st.st_gid) == (USER, OTHER_GROUP)
    assert st.st_mode & stat.S_ISGID                      # subdirs inherit setgid
    assert stat.S_IMODE(st.st_mode) == 0o2750            # umask 027
    assert sub.st_mode == st.st_mode


async def test_mkdir_owner_mode_and_rmdir(ops, backing):
    a = ops.mkdir(ROOT, b"d", stat.S_IFDIR | 0o777, USER_CTX)
    st = os.stat(backing / "d")
    assert stat.S_ISDIR(a.st_mode) and a.st_ino == st.st_ino
    assert (st.st_uid, st.st_gid) == (USER, GROUP)
    assert stat.S_IMODE(st.st_mode) == 0o750
    assert not st.st_mode & stat.S_ISGID
    ops.rmdir(ROOT, b"d", ROOT_CTX)
    assert not (backing / "d").exists()


async def test_mkdir_existing_is_eexist(ops, backing):
    (backing / "d").mkdir()
    with pytest.raises(FUSEError) as ei:
        ops.mkdir(ROOT, b"d", stat.S_IFDIR | 0o755, ROOT_CTX)
    assert errno_of(ei) == errno.EEXIST


@pytest.mark.parametrize("kind, rdev", [(stat.S_IFIFO, 0), (stat.S_IFSOCK, 0),
                                        (stat.S_IFCHR, os.makedev(1, 3)),
                                        (stat.S_IFBLK, os.makedev(7, 0))])
async def test_mknod(ops, backing, kind, rdev):
    a = ops.mknod(ROOT, b"n", kind | 0o666, rdev, USER_CTX)
    st = os.lstat(backing / "n")
    assert stat.S_IFMT(st.st_mode) == kind == stat.S_IFMT(a.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_rdev == rdev == a.st_rdev
    assert (st.st_uid, st.st_gid) == (USER, GROUP)


async def test_symlink_and_readlink(ops, backing):
    a = ops.symlink(ROOT, b"l", b"../../etc/shadow", USER_CTX)
    assert stat.S_ISLNK(a.st_mode)
    assert os.readlink(backing / "l") == "../../etc/shadow"
    st = os.lstat(backing / "l")
    assert (st.st_uid, st.st_gid) == (USER, GROUP)
    assert ops.readlink(a.st_ino, ROOT_CTX) == b"../../etc/shadow"
    long = b"x/" * 200
    b = ops.symlink(ROOT, b"long", long, ROOT_CTX)
    assert ops.readlink(b.st_ino, ROOT_CTX) == long


async def test_readlink_of_a_file_is_einval(ops, backing):
    (backing / "f").write_text("x")
    ino = (await lookup(ops, b"f")).st_ino
    with pytest.raises(FUSEError) as ei:
        ops.readlink(ino, ROOT_CTX)
    assert errno_of(ei) in (errno.EINVAL, errno.ENOENT)


async def test_link_shares_the_inode(ops, backing):
    (backing / "f").write_text("data")
    a = await lookup(ops, b"f")
    d = ops.mkdir(ROOT, b"d", stat.S_IFDIR | 0o755, ROOT_CTX)
    b = ops.link(a.st_ino, d.st_ino, b"g", ROOT_CTX)
    assert b.st_ino == a.st_ino
    assert b.st_nlink == 2
    assert ops.table.inodes[a.st_ino].lookups == 2     # link counts as a lookup
    assert os.stat(backing / "d" / "g").st_ino == os.stat(backing / "f").st_ino
    assert (await lookup(ops, b"g", d.st_ino)).st_ino == a.st_ino


async def test_link_of_a_symlink_links_the_symlink(ops, backing):
    os.symlink("/etc/passwd", backing / "l")
    a = await lookup(ops, b"l")
    b = ops.link(a.st_ino, ROOT, b"l2", ROOT_CTX)
    assert b.st_ino == a.st_ino
    assert os.readlink(backing / "l2") == "/etc/passwd"
    assert os.lstat(backing / "l2").st_ino == os.lstat(backing / "l").st_ino


async def test_link_to_existing_name_is_eexist(ops, backing):
    (backing / "f").write_text("a")
    (backing / "g").write_text("b")
    a = await lookup(ops, b"f")
    with pytest.raises(FUSEError) as ei:
        ops.link(a.st_ino, ROOT, b"g", ROOT_CTX)
    assert errno_of(ei) == errno.EEXIST


# ---- removing and renaming ------------------------------------------------------


async def test_unlink_and_rmdir_errors(ops, backing):
    (backing / "d").mkdir()
    (backing / "d" / "f").write_text("x")
    with pytest.raises(FUSEError) as ei:
        ops.rmdir(ROOT, b"d", ROOT_CTX)
    assert errno_of(ei) == errno.ENOTEMPTY
    with pytest.raises(FUSEError) as ei:
        ops.rmdir(ROOT, b"missing", ROOT_CTX)
    assert errno_of(ei) == errno.ENOENT
    with pytest.raises(FUSEError) as ei:
        ops.unlink(ROOT, b"d", ROOT_CTX)
    assert errno_of(ei) in (errno.EISDIR, errno.EPERM)
    dino = (await lookup(ops, b"d")).st_ino
    with pytest.raises(FUSEError) as ei:
        ops.rmdir(dino, b"f", ROOT_CTX)
    assert errno_of(ei) == errno.ENOTDIR
    ops.unlink(dino, b"f", ROOT_CTX)
    ops.rmdir(ROOT, b"d", ROOT_CTX)
    assert list(backing.iterdir()) == []


async def test_unlinked_file_stays_usable_until_last_release(ops, backing):
    fh, a = await create(ops, b"f")
    ops.write(fh, 0, b"still here")
    ops.unlink(ROOT, b"f", ROOT_CTX)
    assert not (backing / "f").exists()
    assert await read(ops, fh, 0, 100) == b"still here"
    ops.write(fh, 10, b"!")
    assert await read(ops, fh, 0, 100) == b"still here!"
    g = ops.getattr(a.st_ino, ROOT_CTX)
    assert g.st_nlink == 0 and g.st_size == 11
    node = ops.table.inodes[a.st_ino]
    assert node.unlinked
    ops.forget([(a.st_ino, 1)])            # the kernel forgets the name first
    assert a.st_ino in ops.table.inodes          # still open
    ops.release(fh)
    assert a.st_ino not in ops.table.inodes      # last close: gone


async def test_rename_plain_replaces(ops, backing):
    (backing / "a").write_text("A")
    (backing / "b").write_text("B")
    d = ops.mkdir(ROOT, b"d", stat.S_IFDIR | 0o755, ROOT_CTX)
    ops.rename(ROOT, b"a", d.st_ino, b"b", 0, ROOT_CTX)
    assert (backing / "d" / "b").read_text() == "A"
    ops.rename(d.st_ino, b"b", ROOT, b"b", 0, ROOT_CTX)
    assert (backing / "b").read_text() == "A"
    assert not (backing / "a").exists()


async def test_rename_noreplace(ops, backing):
    (backing / "a").write_text("A")
    (backing / "b").write_text("B")
    with pytest.raises(FUSEError) as ei:
        ops.rename(ROOT, b"a", ROOT, b"b", lower.RENAME_NOREPLACE, ROOT_CTX)
    assert errno_of(ei) == errno.EEXIST
    assert (backing / "b").read_text() == "B"
    ops.rename(ROOT, b"a", ROOT, b"c", lower.RENAME_NOREPLACE, ROOT_CTX)
    assert (backing / "c").read_text() == "A"


async def test_rename_exchange(ops, backing):
    (backing / "a").write_text("A")
    (backing / "d").mkdir()
    ops.rename(ROOT, b"a", ROOT, b"d", lower.RENAME_EXCHANGE, ROOT_CTX)
    assert (backing / "d").read_text() == "A"
    assert (backing / "a").is_dir()
    with pytest.raises(FUSEError) as ei:
        ops.rename(ROOT, b"a", ROOT, b"missing", lower.RENAME_EXCHANGE, ROOT_CTX)
    assert errno_of(ei) == errno.ENOENT


async def test_rename_dir_over_nonempty_dir_is_enotempty(ops, backing):
    (backing / "a").mkdir()
    (backing / "b").mkdir()
    (backing / "b" / "f").write_text("x")
    with pytest.raises(FUSEError) as ei:
        ops.rename(ROOT, b"a", ROOT, b"b", 0, ROOT_CTX)
    assert errno_of(ei) == errno.ENOTEMPTY


async def test_rename_between_hard_links_keeps_both(ops, backing):
    (backing / "a").write_text("A")
    os.link(backing / "a", backing / "b")
    ops.rename(ROOT, b"a", ROOT, b"b", 0, ROOT_CTX)
    assert (backing / "a").exists() and (backing / "b").exists()


async def test_renamed_inode_keeps_its_number_and_handle(ops, backing):
    (backing / "a").write_text("A")
    a = await lookup(ops, b"a")
    ops.rename(ROOT, b"a", ROOT, b"z", 0, ROOT_CTX)
    # the O_PATH descriptor follows the inode, not the name
    assert (ops.getattr(a.st_ino, ROOT_CTX)).st_size == 1
    assert (await lookup(ops, b"z")).st_ino == a.st_ino


# ---- setattr --------------------------------------------------------------------


async def test_setattr_mode(ops, backing):
    (backing / "f").write_text("x")
    ino = (await lookup(ops, b"f")).st_ino
    attr = fusewire.EntryAttributes()
    attr.st_mode = stat.S_IFREG | 0o4711
    a = ops.setattr(ino, attr, Fields(update_mode=True), None, ROOT_CTX)
    assert stat.S_IMODE(a.st_mode) == 0o4711
    assert stat.S_IMODE(os.stat(backing / "f").st_mode) == 0o4711


async def test_setattr_uid_gid_one_or_both(ops, backing):
    (backing / "f").write_text("x")
    ino = (await lookup(ops, b"f")).st_ino
    attr = fusewire.EntryAttributes()
    attr.st_uid, attr.st_gid = USER, OTHER_GROUP
    a = ops.setattr(ino, attr, Fields(update_uid=True), None, ROOT_CTX)
    assert (a.st_uid, a.st_gid) == (USER, 0)
    a = ops.setattr(ino, attr, Fields(update_gid=True), None, ROOT_CTX)
    assert (a.st_uid, a.st_gid) == (USER, OTHER_GROUP)
    st = os.stat(backing / "f")
    assert (st.st_uid, st.st_gid) == (USER, OTHER_GROUP)


async def test_setattr_chown_of_a_symlink_changes_the_link(ops, backing):
    target = backing / "t"
    target.write_text("x")
    os.symlink("t", backing / "l")
    ino = (await lookup(ops, b"l")).st_ino
    attr = fusewire.EntryAttributes()
    attr.st_uid, attr.st_gid = USER, GROUP
    ops.setattr(ino, attr, Fields(update_uid=True, update_gid=True), None, ROOT_CTX)
    assert os.lstat(backing / "l").st_uid == USER
    assert os.stat(target).st_uid == 0


async def test_setattr_size_with_and_without_handle(ops, backing):
    (backing / "f").write_bytes(b"0123456789")
    ino = (await lookup(ops, b"f")).st_ino
    attr = fusewire.EntryAttributes()
    attr.st_size = 4
    a = ops.setattr(ino, attr, Fields(update_size=True), None, ROOT_CTX)
    assert a.st_size == 4 and (backing / "f").read_bytes() == b"0123"
    fi = ops.open(ino, os.O_RDWR, ROOT_CTX)
    attr.st_size = 1 << 20                                 # sparse extension
    a = ops.setattr(ino, attr, Fields(update_size=True), fi.fh, ROOT_CTX)
    assert a.st_size == 1 << 20
    assert a.st_blocks < (1 << 20) // 512
    ops.release(fi.fh)


async def test_setattr_times(ops, backing):
    (backing / "f").write_text("x")
    os.utime(backing / "f", ns=(1_000_000_000, 2_000_000_000))
    ino = (await lookup(ops, b"f")).st_ino
    attr = fusewire.EntryAttributes()
    attr.st_atime_ns = 1_500_000_000_123_456_789
    attr.st_mtime_ns = 1_600_000_000_987_654_321
    a = ops.setattr(ino, attr, Fields(update_atime=True, update_mtime=True), None,
                          ROOT_CTX)
    assert (a.st_atime_ns, a.st_mtime_ns) == (attr.st_atime_ns, attr.st_mtime_ns)
    # only mtime (atime omitted)
    attr.st_atime_ns = 5
    attr.st_mtime_ns = 1_700_000_000_000_000_001
    a = ops.setattr(ino, attr, Fields(update_mtime=True), None, ROOT_CTX)
    st = os.stat(backing / "f")
    assert st.st_atime_ns == 1_500_000_000_123_456_789 == a.st_atime_ns
    assert st.st_mtime_ns == 1_700_000_000_000_000_001 == a.st_mtime_ns


async def test_setattr_times_of_a_symlink(ops, backing):
    os.symlink("/nonexistent", backing / "l")
    ino = (await lookup(ops, b"l")).st_ino
    attr = fusewire.EntryAttributes()
    attr.st_atime_ns = attr.st_mtime_ns = 1_234_000_000_000_000_000
    ops.setattr(ino, attr, Fields(update_atime=True, update_mtime=True), None, ROOT_CTX)
    assert os.lstat(backing / "l").st_mtime_ns == 1_234_000_000_000_000_000


# ---- open ------------------------------------------------------------------------


async def test_open_flags(ops, backing):
    (backing / "f").write_bytes(b"content")
    ino = (await lookup(ops, b"f")).st_ino
    fi = ops.open(ino, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME, ROOT_CTX)
    assert await read(ops, fi.fh, 0, 100) == b"content"
    with pytest.raises(FUSEError) as ei:
        ops.write(fi.fh, 0, b"x")
    assert errno_of(ei) == errno.EBADF
    ops.release(fi.fh)
    fi = ops.open(ino, os.O_WRONLY | os.O_TRUNC, ROOT_CTX)
    assert (backing / "f").read_bytes() == b""
    ops.release(fi.fh)


async def test_open_direct_sets_direct_io(ops, backing):
    (backing / "f").write_bytes(b"x" * 4096)
    ino = (await lookup(ops, b"f")).st_ino
    fi = ops.open(ino, os.O_RDWR | os.O_DIRECT, ROOT_CTX)
    assert fi.direct_io
    assert await read(ops, fi.fh, 1, 3) == b"xxx"          # unaligned is fine
    ops.release(fi.fh)
    fi = ops.open(ino, os.O_RDONLY, ROOT_CTX)
    assert not fi.direct_io
    ops.release(fi.fh)


async def test_two_handles_one_inode(ops, backing):
    fh, a = await create(ops, b"f")
    fi = ops.open(a.st_ino, os.O_RDONLY, ROOT_CTX)
    assert ops.table.inodes[a.st_ino].opens == 2
    ops.write(fh, 0, b"shared")
    assert await read(ops, fi.fh, 0, 10) == b"shared"
    ops.release(fh)
    ops.release(fi.fh)
    assert ops.table.inodes[a.st_ino].opens == 0


# ---- directories -----------------------------------------------------------------


async def readdir_names(ops, ino: int, start: int = 0, limit: int | None = None,
                        monkey=None) -> list[bytes]:
    """List a directory through opendir/readdir/releasedir with a stand-in reply."""
    got: list[tuple[bytes, int, int]] = []

    class Token:
        """What the request loop hands readdir (fusewire.ReaddirToken's add)."""

        def add(self, name, attr, next_id):
            if limit is not None and len(got) >= limit:
                return False
            got.append((name, attr.st_ino, next_id))
            return True
    fh = ops.opendir(ino, ROOT_CTX)
    ops.readdir(fh, start, Token())
    ops.releasedir(fh)
    readdir_names.last = got
    return [n for n, _, _ in got]


async def test_readdir_lists_entries_and_counts_lookups(ops, backing):
    for n in ("a", "b", "c"):
        (backing / n).write_text(n)
    (backing / "d").mkdir()
    os.symlink("/etc", backing / "l")
    names = await readdir_names(ops, ROOT)
    assert names[:2] == [b".", b".."]                     # as a local directory
    assert sorted(names[2:]) == [b"a", b"b", b"c", b"d", b"l"]
    for name, ino, _ in readdir_names.last[2:]:
        assert ino == os.lstat(backing / os.fsdecode(name)).st_ino
        assert ops.table.inodes[ino].lookups == 1        # readdirplus counts
    assert [ino for _, ino, _ in readdir_names.last[:2]] == [ROOT, ROOT]
    assert ops.table.root.lookups == 1 << 62             # dots are not counted


async def test_readdir_dots_of_a_subdir(ops, backing):
    (backing / "d" / "e").mkdir(parents=True)
    d = (await lookup(ops, b"d")).st_ino
    e = (await lookup(ops, b"e", d)).st_ino
    names = await readdir_names(ops, e)
    assert names == [b".", b".."]
    assert [ino for _, ino, _ in readdir_names.last] == [e, d]
    assert ops.table.inodes[d].lookups == 1 and ops.table.inodes[e].lookups == 1


async def test_readdir_resumes_and_does_not_count_refused_entries(ops, backing):
    for i in range(10):
        (backing / f"f{i}").write_text("x")
    first = await readdir_names(ops, ROOT, limit=4)
    assert first[:2] == [b".", b".."] and len(first) == 4
    counted = [ino for ino, n in ops.table.inodes.items() if ino != ROOT]
    assert len(counted) == 2                              # the 5th was refused
    resume = readdir_names.last[-1][2]
    rest = await readdir_names(ops, ROOT, start=resume)
    assert sorted(first[2:] + rest) == sorted(f"f{i}".encode() for i in range(10))
    assert len(ops.table.inodes) == 11


async def test_fsyncdir(ops, backing):
    (backing / "d").mkdir()
    ino = (await lookup(ops, b"d")).st_ino
    fh = ops.opendir(ino, ROOT_CTX)
    await ops.fsyncdir(fh, False)
    await ops.fsyncdir(fh, True)
    ops.releasedir(fh)
    assert fh not in ops.handles


async def test_opendir_of_a_file_is_enotdir(ops, backing):
    (backing / "f").write_text("x")
    ino = (await lookup(ops, b"f")).st_ino
    with pytest.raises(FUSEError) as ei:
        ops.opendir(ino, ROOT_CTX)
    assert errno_of(ei) == errno.ENOTDIR


# ---- statfs, access, xattrs ---------------------------------------------------------


async def test_statfs_is_the_backing_filesystems(ops, backing):
    s = ops.statfs(ROOT_CTX)
    v = os.statvfs(backing)
    assert (s.f_bsize, s.f_frsize, s.f_blocks, s.f_files, s.f_namemax) == \
        (v.f_bsize, v.f_frsize, v.f_blocks, v.f_files, v.f_namemax)
    # free figures move with other activity on the host: allow some slack
    assert abs(s.f_bfree - v.f_bfree) < 1 << 16
    assert abs(s.f_ffree - v.f_ffree) < 1 << 12


async def test_access(ops, backing):
    f = backing / "f"
    f.write_text("x")
    os.chown(f, USER, GROUP)
    os.chmod(f, 0o640)
    ino = (await lookup(ops, b"f")).st_ino
    assert ops.access(ino, os.R_OK | os.W_OK, ROOT_CTX)
    assert not ops.access(ino, os.X_OK, ROOT_CTX)    # root needs one x bit
    assert ops.access(ino, os.R_OK | os.W_OK, Ctx(USER, GROUP))
    assert not ops.access(ino, os.X_OK, Ctx(USER, GROUP))
    assert ops.access(ino, os.R_OK, Ctx(2000, GROUP))        # group
    assert not ops.access(ino, os.W_OK, Ctx(2000, GROUP))
    assert not ops.access(ino, os.R_OK, Ctx(2000, 2000))     # other
    assert ops.access(ROOT, os.X_OK, ROOT_CTX)


async def test_xattrs(ops, backing):
    (backing / "f").write_text("x")
    ino = (await lookup(ops, b"f")).st_ino
    ops.setxattr(ino, b"user.one", b"1", ROOT_CTX)
    ops.setxattr(ino, b"user.two", b"\x00binary\xff", ROOT_CTX)
    assert ops.getxattr(ino, b"user.two", ROOT_CTX) == b"\x00binary\xff"
    assert sorted(ops.listxattr(ino, ROOT_CTX)) == [b"user.one", b"user.two"]
    assert os.getxattr(backing / "f", "user.one") == b"1"
    ops.removexattr(ino, b"user.one", ROOT_CTX)
    assert ops.listxattr(ino, ROOT_CTX) == [b"user.two"]
    with pytest.raises(FUSEError) as ei:
        ops.getxattr(ino, b"user.one", ROOT_CTX)
    assert errno_of(ei) == errno.ENODATA
    with pytest.raises(FUSEError) as ei:
        ops.removexattr(ino, b"user.one", ROOT_CTX)
    assert errno_of(ei) == errno.ENODATA


async def test_xattrs_on_directory_and_root(ops, backing):
    ops.setxattr(ROOT, b"user.r", b"root", ROOT_CTX)
    assert os.getxattr(backing, "user.r") == b"root"
    (backing / "d").mkdir()
    ino = (await lookup(ops, b"d")).st_ino
    ops.setxattr(ino, b"trusted.t", b"v", ROOT_CTX)
    assert ops.getxattr(ino, b"trusted.t", ROOT_CTX) == b"v"


async def test_user_xattrs_on_a_symlink_are_refused_like_a_local_fs(ops, backing):
    os.symlink("/etc/passwd", backing / "l")
    ino = (await lookup(ops, b"l")).st_ino
    with pytest.raises(FUSEError) as ei:
        ops.setxattr(ino, b"user.x", b"1", ROOT_CTX)
    assert errno_of(ei) == errno.EPERM
    assert ops.listxattr(ino, ROOT_CTX) == []
    with pytest.raises(FUSEError) as ei:
        ops.getxattr(ino, b"user.x", ROOT_CTX)
    assert errno_of(ei) == errno.ENODATA
    # the target was never touched
    assert b"user.x" not in [os.fsencode(n) for n in os.listxattr("/etc/passwd")]


async def test_trusted_xattrs_of_a_symlink_are_its_own(ops, backing):
    target = backing / "t"
    target.write_text("x")
    os.symlink("t", backing / "l")
    os.setxattr(backing / "l", "trusted.pre", b"old", follow_symlinks=False)
    ino = (await lookup(ops, b"l")).st_ino
    assert ops.listxattr(ino, ROOT_CTX) == [b"trusted.pre"]
    assert ops.getxattr(ino, b"trusted.pre", ROOT_CTX) == b"old"
    ops.setxattr(ino, b"trusted.new", b"1", ROOT_CTX)
    ops.removexattr(ino, b"trusted.pre", ROOT_CTX)
    assert os.listxattr(backing / "l", follow_symlinks=False) == ["trusted.new"]
    assert os.listxattr(target) == []                     # never the target


async def test_quota_xattr_without_quota_is_enodata(ops):
    with pytest.raises(FUSEError) as ei:
        ops.getxattr(ROOT, b"user.vzquota", ROOT_CTX)
    assert errno_of(ei) == errno.ENODATA


# ---- the errno boundary -------------------------------------------------------------


async def test_unexpected_exception_is_eio_and_logged(ops, caplog):
    caplog.set_level(logging.ERROR, logger="simfs.ops")
    with pytest.raises(FUSEError) as ei:
        await read(ops, 99999, 0, 10)                      # KeyError inside
    assert errno_of(ei) == errno.EIO
    assert any("unexpected error in read" in r.getMessage() and r.exc_info
               for r in caplog.records)


async def test_oserror_keeps_its_errno(ops, monkeypatch):
    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "mkdir", boom)
    with pytest.raises(FUSEError) as ei:
        ops.mkdir(ROOT, b"d", stat.S_IFDIR | 0o755, ROOT_CTX)
    assert errno_of(ei) == errno.ENOSPC


async def test_failed_create_leaves_nothing_behind(ops, backing, monkeypatch):
    real_chown = os.chown

    def bad_chown(*a, **k):
        raise OSError(errno.EIO, "chown failed")
    monkeypatch.setattr(os, "chown", bad_chown)
    with pytest.raises(FUSEError) as ei:
        await create(ops, b"f", ctx=USER_CTX)
    assert errno_of(ei) == errno.EIO
    monkeypatch.setattr(os, "chown", real_chown)
    assert list(backing.iterdir()) == []
    assert not ops.handles


def test_counts_change_only_through_the_inode_table():
    """Item 2 of issue 20: lookups, opens and holds change only through the
    table's methods (``node.lookups += 1`` was written in ops.py), so that the
    table alone decides when an inode leaves."""
    import ast
    import simfs
    counts = {"lookups", "opens", "held", "_flags"}
    where = []
    for path in sorted(Path(simfs.__file__).parent.glob("*.py")):
        if path.name == "inodes.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = (node.targets if isinstance(node, ast.Assign) else
                       [node.target] if isinstance(node, ast.AugAssign) else [])
            for t in targets:
                for e in ast.walk(t):
                    if isinstance(e, ast.Attribute) and e.attr in counts:
                        where.append(f"{path.name}:{node.lineno} {e.attr}")
    assert where == []


async def test_the_table_lets_an_inode_go_when_nothing_refers_to_it(ops, backing):
    (backing / "f").write_bytes(b"x")
    a = await lookup(ops, b"f")
    node = ops.table.get(a.st_ino)
    fh = ops.open(a.st_ino, os.O_RDONLY, ROOT_CTX).fh
    ops.forget([(a.st_ino, 1)])
    assert ops.table.inodes.get(a.st_ino) is node          # still open
    ops.table.hold(node)
    ops.release(fh)
    assert ops.table.inodes.get(a.st_ino) is node          # still held
    ops.table.unhold(node)
    assert a.st_ino not in ops.table.inodes


def test_written_sees_a_writable_open_and_a_shared_mapping(tmp_path):
    # simfs.iomode.written: whether anyone holds a file open for writing, a
    # shared writable mapping included (a read lease cannot be taken then)
    import ctypes
    import mmap
    import signal
    from simfs import iomode
    p = tmp_path / "f"
    p.write_bytes(b"x" * 8192)

    def probe() -> bool:
        fd = os.open(p, os.O_RDONLY)
        try:
            return iomode.written(fd)
        finally:
            os.close(fd)

    assert probe() is False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    w = os.open(p, os.O_RDWR)
    assert probe() is True
    addr = libc.mmap(None, 8192, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, w, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    os.close(w)
    assert probe() is True                  # the mapping holds a writable open
    assert libc.munmap(addr, 8192) == 0
    assert probe() is False
    # a host process opening the file for writing while the lease is held
    # waits until it is given up, and its break signal does not end the
    # daemon (SIGIO would)
    import fcntl
    import subprocess
    import sys
    import time
    real = fcntl.fcntl
    writer = []

    def fcntl_then_break(fd, cmd, arg=0):
        r = real(fd, cmd, arg)
        if cmd == fcntl.F_SETLEASE and arg == fcntl.F_RDLCK:
            writer.append(subprocess.Popen(
                [sys.executable, "-c", f"import os; os.close(os.open({str(p)!r}, os.O_WRONLY))"]))
            time.sleep(0.3)
            assert writer[0].poll() is None     # it waits for the lease
        return r

    fcntl.fcntl = fcntl_then_break
    try:
        assert probe() is False
    finally:
        fcntl.fcntl = real
    assert writer[0].wait(10) == 0


def test_reopen_in_a_forked_child_opens_the_childs_own_descriptor(tmp_path):
    """lower.reopen looks the descriptor up in a held /proc/self/fd; that
    directory descriptor names one process, so a forked child must open its
    own: one inheriting the parent's would re-open the parent's descriptor of
    that number (here: the other file)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"parent's")
    b.write_bytes(b"child's")
    pa = os.open(a, os.O_PATH)
    fd = lower.reopen(pa, os.O_RDONLY)            # the held directory is opened now
    assert os.read(fd, 100) == b"parent's"
    os.close(fd)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                  # the child: the same number, another file
        try:
            pb = os.open(b, os.O_PATH)
            os.dup2(pb, pa)
            got = os.read(lower.reopen(pa, os.O_RDONLY), 100)
            os.write(w, got)
        finally:
            os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    assert os.read(r, 100) == b"child's" and status == 0
    os.close(r)
    fd = lower.reopen(pa, os.O_RDONLY)            # the parent's still its own
    assert os.read(fd, 100) == b"parent's"
    os.close(fd)
    os.close(pa)
