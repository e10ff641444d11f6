"""Parked passthrough backing ids at the unit level: the real handlers
(``SimOperations`` open, release, unlink, rename, forget) and the inode table
over a real directory, with a channel that stands in for /dev/fuse and
counts the backing ids registered and closed.  What needs a small
configuration (the LRU of descriptors, the bound) is checked here; the
mounted behaviour on the four backings in test_passthrough_parked.py."""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace

import pytest

from fusewire import kernel
from simfs import iomode
from simfs.config import Config
from simfs.inodes import ROOT
from simfs.ops import SimOperations

CTX = SimpleNamespace(uid=0, gid=0, pid=os.getpid(), umask=0o022)


class Channel:
    """The kernel's side of backing ids: registered ones, by id."""
    negotiated = kernel.PASSTHROUGH

    def __init__(self):
        self.next = 1
        self.live: dict[int, int] = {}      # backing id -> st_ino of its file
        self.opened = self.closed = 0

    def backing_open(self, fd: int) -> int:
        bid = self.next
        self.next += 1
        self.live[bid] = os.fstat(fd).st_ino
        self.opened += 1
        return bid

    def backing_close(self, bid: int) -> None:
        del self.live[bid]
        self.closed += 1

    def invalidate_inode(self, *a) -> None:
        pass


@pytest.fixture
def area(world_tmp):
    d = world_tmp / "area"
    d.mkdir()
    return d


def make(area, config: Config) -> tuple[SimOperations, Channel]:
    fd = os.open(area, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    ops = SimOperations(fd, config)
    ops.channel = ch = Channel()
    ops.iomodes.enabled = True
    ops.iomodes.min_size = 0
    return ops, ch


def close(ops) -> None:
    ops.table.close_all()


def read_once(ops, name: bytes) -> tuple[int, int]:
    """A lookup, a read-only open and its release; (inode, backing id)."""
    ino = ops.lookup(ROOT, name, CTX).st_ino
    fi = ops.open(ino, os.O_RDONLY, CTX)
    bid = fi.backing_id
    ops.release(fi.fh)
    return ino, bid


def test_reopens_reuse_the_parked_id_and_writers_are_not_readers(area):
    (area / "f").write_bytes(b"x" * 8192)
    ops, ch = make(area, Config())
    io = ops.iomodes
    try:
        ino, bid = read_once(ops, b"f")
        assert bid and ch.opened == 1 and list(io.parked) == [ino]
        for _ in range(10):
            fi = ops.open(ino, os.O_RDONLY, CTX)
            assert fi.backing_id == bid
            ops.release(fi.fh)
        assert (ch.opened, ch.closed) == (1, 0)
        # a parked id is not a reader: not busy, and a writer is a caching open
        assert not io.busy(ino) and not io.passthrough
        node = ops.table.get(ino)
        assert io.decide(node, os.O_RDWR) == iomode.CACHING
        assert io.decide(node, os.O_WRONLY) == iomode.CACHING
        w = ops.open(ino, os.O_RDWR, CTX)
        assert not w.backing_id and not w.direct_io and io.cached == {ino: 1}
        r = ops.open(ino, os.O_RDONLY, CTX)        # beside a writer: caching too
        assert not r.backing_id
        ops.release(r.fh)
        ops.release(w.fh)
        assert list(io.parked) == [ino] and ch.live == {bid: os.stat(area / "f").st_ino}
        assert ops.pruner is not None and ops._kept(node) is False
    finally:
        close(ops)


def test_the_bound_closes_the_least_recently_released_first(area):
    for i in range(6):
        (area / f"f{i}").write_bytes(b"%d" % i)
    ops, ch = make(area, Config(backing_parked=3))
    io = ops.iomodes
    try:
        inos = [read_once(ops, b"f%d" % i)[0] for i in range(6)]
        assert (ch.opened, ch.closed) == (6, 3)
        assert list(io.parked) == inos[3:]
        read_once(ops, b"f3")                      # the oldest parked, used again: no ioctl
        assert ch.opened == 6 and list(io.parked) == inos[4:] + inos[3:4]
        read_once(ops, b"f0")                      # pushes out f4
        assert (ch.opened, ch.closed) == (7, 4)
        assert list(io.parked) == [inos[5], inos[3], inos[0]]
        assert len(ch.live) == 3
    finally:
        close(ops)


def test_a_record_that_leaves_the_table_or_the_lru_closes_its_parked_id(area):
    for i in range(40):
        (area / f"f{i}").write_bytes(b"%d" % i)
    ops, ch = make(area, Config(cached_fds=16))
    io = ops.iomodes
    try:
        assert ops.table.budget.cached == 16
        # FORGET to zero: the record leaves, its id is closed
        ino, bid = read_once(ops, b"f0")
        ops.forget([(ino, 1)])
        assert ino not in ops.table.inodes and not io.parked and ch.live == {}
        # the record's descriptor leaves the LRU: its id is closed (the
        # daemon no longer keeps the file; neither does a parked id)
        ino, bid = read_once(ops, b"f1")
        assert ops.table.get(ino)._fd >= 0 and list(io.parked) == [ino]
        for i in range(2, 40):
            ops.lookup(ROOT, b"f%d" % i, CTX)
        assert ops.table.get(ino)._fd < 0 and not io.parked and ch.live == {}
        # back in the LRU: a new registration
        fi = ops.open(ino, os.O_RDONLY, CTX)
        assert fi.backing_id not in (0, bid) and ch.opened == 3
        # a record whose descriptor left the LRU while the file was open (by
        # a descriptor of its own) does not park its id at the last close
        ops.table.evict(ops.table.get(ino))
        ops.release(fi.fh)
        assert not io.parked and ch.live == {} and ch.opened == ch.closed == 3
        # a reader without a descriptor of its own (an id to share) charges
        # its last close by the record's, which takes it back: parked then
        read_once(ops, b"f1")
        fi = ops.open(ino, os.O_RDONLY, CTX)
        assert "fd" not in vars(ops.handles[fi.fh]) and ch.opened == 4
        ops.table.evict(ops.table.get(ino))
        ops.release(fi.fh)
        assert ops.table.get(ino)._fd >= 0 and list(io.parked) == [ino]
        assert ch.opened == 4 and ch.closed == 3
    finally:
        close(ops)


def test_the_last_link_gone_through_the_mount_closes_the_parked_id(area):
    for name in ("a", "b", "c"):
        (area / name).write_bytes(name.encode() * 4096)
    ops, ch = make(area, Config())
    io = ops.iomodes
    try:
        ino_a, _ = read_once(ops, b"a")
        ops.link(ino_a, ROOT, b"a2", CTX)          # two links: the first unlink keeps it
        ops.unlink(ROOT, b"a", CTX)
        assert list(io.parked) == [ino_a]
        ops.unlink(ROOT, b"a2", CTX)
        assert not io.parked and ch.live == {}
        ino_b, _ = read_once(ops, b"b")
        ops.rename(ROOT, b"c", ROOT, b"b", 0, CTX)   # over it
        assert ino_b not in io.parked and ch.live == {}
        # a file removed behind the mount is parked at its release (the
        # daemon does not look at its links), and its id goes with the record,
        # whose own descriptor holds the file as long
        ino_c = ops.lookup(ROOT, b"b", CTX).st_ino
        fi = ops.open(ino_c, os.O_RDONLY, CTX)
        os.unlink(area / "b")                        # behind the mount
        ops.release(fi.fh)
        assert list(io.parked) == [ino_c] and ch.opened == 3 and ch.closed == 2
        ops.forget([(ino_c, 1)])
        assert not io.parked and ch.live == {} and ch.opened == ch.closed == 3
    finally:
        close(ops)


def test_a_new_generation_of_a_number_never_gets_the_old_id(area):
    (area / "f").write_bytes(b"f" * 4096)
    ops, ch = make(area, Config())
    io = ops.iomodes
    try:
        ino, bid = read_once(ops, b"f")
        node = ops.table.get(ino)
        node._flags += 16                            # as InodeTable.adopt does at a reuse
        fi = ops.open(ino, os.O_RDONLY, CTX)
        assert fi.backing_id != bid and bid not in ch.live
        ops.release(fi.fh)
        assert io.parked[ino][1] == node._flags >> 4
        assert stat.S_ISREG(node.mode)
    finally:
        close(ops)


def own_fds() -> set[int]:
    """This process's descriptors (not the one the listing itself used)."""
    return {int(n) for n in os.listdir("/proc/self/fd")
            if os.path.lexists(f"/proc/self/fd/{n}")}


class Fields:
    """A stand-in for ``fusewire.SetattrFields`` (a truncate)."""
    update_atime = update_mtime = update_ctime = False
    update_mode = update_uid = update_gid = False
    update_size = True


def test_a_reader_sharing_an_id_opens_no_descriptor_until_it_needs_one(area):
    (area / "f").write_bytes(b"d" * 8192)
    ops, ch = make(area, Config())
    try:
        ino, bid = read_once(ops, b"f")
        before = own_fds()
        fi = ops.open(ino, os.O_RDONLY, CTX)       # the parked id: nothing opened
        fi2 = ops.open(ino, os.O_RDONLY, CTX)      # an active one: the same
        assert fi.backing_id == fi2.backing_id == bid and own_fds() == before
        ops.release(fi2.fh)
        # an lseek (SEEK_DATA/SEEK_HOLE reach the daemon) opens one then
        assert ops.lseek(fi.fh, 0, os.SEEK_HOLE) == 8192
        assert len(own_fds() - before) == 1
        ops.release(fi.fh)
        assert own_fds() == before and (ch.opened, ch.closed) == (1, 0)
    finally:
        close(ops)


@pytest.mark.parametrize("how", ["open for writing", "truncate", "O_DIRECT writer"])
def test_an_id_is_checked_again_after_a_writer_or_a_truncate(area, how):
    """A parked id skips the size and hole check only while nothing has
    opened the file for writing or truncated it since its check: a writer
    that left a hole makes the next reader a caching open, as the check
    would (a passthrough reader of a sparse file would lock O_RDWR openers
    out); an O_DIRECT writer, in no mode count, open while the id was
    registered, too."""
    (area / "f").write_bytes(b"d" * 8192)
    ops, ch = make(area, Config())
    io = ops.iomodes
    try:
        ino = ops.lookup(ROOT, b"f", CTX).st_ino
        w = None
        if how == "O_DIRECT writer":
            w = ops.open(ino, os.O_WRONLY | os.O_DIRECT, CTX)
        ino, bid = read_once(ops, b"f")
        assert bid and list(io.parked) == [ino]
        if how == "open for writing":
            w = ops.open(ino, os.O_WRONLY, CTX)
        if how == "truncate":
            attr = SimpleNamespace(st_size=1 << 20)
            ops.setattr(ino, attr, Fields(), None, CTX)
        else:
            os.ftruncate(ops.handles[w.fh].fd, 1 << 20)   # a hole past 8192
            ops.release(w.fh)
        assert ino in io.unchecked
        fi = ops.open(ino, os.O_RDONLY, CTX)
        assert fi.backing_id == 0 and "fd" in vars(ops.handles[fi.fh])
        ops.release(fi.fh)
        # filled again: passthrough by the parked id, checked, then lazy
        os.truncate(area / "f", 8192)
        fi = ops.open(ino, os.O_RDONLY, CTX)
        assert fi.backing_id == bid and ino not in io.unchecked
        ops.release(fi.fh)
        fi = ops.open(ino, os.O_RDONLY, CTX)
        assert fi.backing_id == bid and "fd" not in vars(ops.handles[fi.fh])
        ops.release(fi.fh)
        assert (ch.opened, ch.closed) == (1, 0)
    finally:
        close(ops)


@pytest.mark.parametrize("passthrough", [True, False])
def test_a_reader_through_the_page_cache_opens_a_descriptor_at_its_first_read(area, passthrough):
    """A small file (below min_size), or any file with passthrough off, is
    read through the page cache: its open needs no descriptor (a hot file's
    reads never reach the daemon); the first READ opens one, with the
    open's flags, and the release closes it."""
    (area / "small").write_bytes(b"s" * 1000)
    (area / "big").write_bytes(b"b" * 100_000)
    ops, ch = make(area, Config())
    io = ops.iomodes
    io.enabled = passthrough
    io.min_size = 64 << 10
    try:
        small = ops.lookup(ROOT, b"small", CTX).st_ino
        big = ops.lookup(ROOT, b"big", CTX).st_ino
        before = own_fds()
        fi = ops.open(small, os.O_RDONLY, CTX)
        assert not fi.backing_id and fi.keep_cache and io.cached == {small: 1}
        assert own_fds() == before
        assert bytes(ops.read(fi.fh, 0, 4096)) == b"s" * 1000
        (fd,) = own_fds() - before
        assert os.readlink(f"/proc/self/fd/{fd}") == str(area / "small")
        assert os.fstat(fd).st_ino == small and os.get_blocking(fd)
        ops.release(fi.fh)
        assert own_fds() == before and not io.cached
        # a large one: passthrough (a descriptor to register) or, without,
        # through the page cache like the small one
        fi = ops.open(big, os.O_RDONLY, CTX)
        assert bool(fi.backing_id) == passthrough
        assert len(own_fds() - before) == (1 if passthrough else 0)
        ops.release(fi.fh)
        # a writer's open is never lazy
        fi = ops.open(small, os.O_RDWR, CTX)
        assert len(own_fds() - before) == 1
        ops.release(fi.fh)
        assert ch.opened == (1 if passthrough else 0)
    finally:
        close(ops)


@pytest.mark.parametrize("how", ["unlink", "rename over it"])
def test_a_reader_without_a_descriptor_reads_a_file_removed_after_its_record_left_the_lru(
        area, how):
    """A reader's handle without a descriptor of its own relies on the
    record's: one whose descriptor had left the LRU gets it back before the
    last link goes, so the file stays readable until the last close."""
    (area / "f").write_bytes(b"u" * 1000)
    (area / "g").write_bytes(b"g")
    ops, ch = make(area, Config())
    ops.iomodes.min_size = 64 << 10
    try:
        ino = ops.lookup(ROOT, b"f", CTX).st_ino
        fi = ops.open(ino, os.O_RDONLY, CTX)
        assert "fd" not in vars(ops.handles[fi.fh])
        ops.table.evict(ops.table.get(ino))
        if how == "unlink":
            ops.unlink(ROOT, b"f", CTX)
        else:
            ops.rename(ROOT, b"g", ROOT, b"f", 0, CTX)
        assert not (area / "f").exists() if how == "unlink" else \
            (area / "f").read_bytes() == b"g"
        assert bytes(ops.read(fi.fh, 0, 4096)) == b"u" * 1000
        assert ops.getattr(ino, CTX).st_size == 1000
        ops.release(fi.fh)
    finally:
        close(ops)
