"""Unit tests of the ledger of charges (``simfs.ledger.Ledger``) on a fake
backing filesystem: no loop image, no mount, no real file.

The fake plays what backing filesystems do behind a write that the ledger
exists for: blocks allocated late (ext4's delayed allocation, allocated at
writeback), preallocation past the end (XFS), an extent map that grows, the
host's root reserve (f_bavail).  A real quota engine decides; the fake inode
table lets an inode go as the real one does (no lookup, open or hold left,
and the ledger does not keep it).
"""

from __future__ import annotations

import errno
import os
from types import SimpleNamespace

import pytest

from vzquota.engine import QuotaEngine
from vzquota.errors import QuotaExceeded
from vzquota.model import QuotaState

from simfs.config import DEFAULT, Config
from simfs.ledger import Ledger

B = 4096
K = 1024


class FakeFile:
    """One backing inode: ``data`` bytes allocated, ``late`` more the
    filesystem allocates at writeback (delayed), ``past`` preallocated past
    the end, ``extents`` extents mapped."""

    def __init__(self, ino: int, uid: int = 1000, gid: int = 1000, data: int = 0,
                 size: int = 0, directory: bool = False):
        self.ino, self.uid, self.gid = ino, uid, gid
        self.data, self.late, self.past, self.size = data, 0, 0, size
        self.extents = 1 if data else 0
        self.mode = (0o40755 if directory else 0o100644)

    @property
    def blocks(self) -> int:
        return (self.data + self.past) // 512

    def stat(self):
        return SimpleNamespace(st_ino=self.ino, st_blocks=self.blocks, st_size=self.size,
                               st_mode=self.mode, st_uid=self.uid, st_gid=self.gid,
                               st_atime_ns=0, st_mtime_ns=0, st_nlink=1)

    def write(self, off: int, n: int, delayed: bool = False) -> None:
        """Write ``n`` bytes at ``off`` into a hole: allocated now, or later."""
        new = -(-n // B) * B
        if delayed:
            self.late += new
        else:
            self.data += new
        self.size = max(self.size, off + n)
        self.extents += 1


class FakeBacking:
    """The calls ``Ledger`` makes (``simfs.ledger.Backing``), on FakeFiles by fd."""

    def __init__(self):
        self.files: dict[int, FakeFile] = {}
        self.avail = 1 << 40          # f_bavail in bytes
        self.writebacks = 0

    def add(self, f: FakeFile) -> int:
        fd = 100 + len(self.files)
        self.files[fd] = f
        return fd

    def fstat(self, fd):
        return self.files[fd].stat()

    def fstatvfs(self, fd):
        return SimpleNamespace(f_bavail=self.avail // B, f_frsize=B)

    def listxattr(self, fd):
        return []

    def utime(self, fd, ns=None):
        pass

    def reopen(self, fd, flags):
        return fd

    def close(self, fd):
        pass

    def dup(self, fd):
        return fd

    def extents(self, fd, start):
        f = self.files[fd]
        return int(f.past > 0) if start else f.extents

    def mapping(self, fd, n, bs):
        f = self.files[fd]
        return f.data + f.late, f.late > 0, False

    def nothing_delayed(self, fd, bs):
        return self.files[fd].late == 0

    def unallocated(self, fd, start, end, bs):
        f = self.files[fd]
        s = max(start // bs * bs, -(-f.size // bs) * bs)     # what lies past the end
        e = -(-end // bs) * bs
        return [(s, e)] if e > s else []

    def punch(self, fd, off, n):
        self.files[fd].past = 0

    def deliberate_prealloc(self, fd):
        return False

    def exact_allocation(self, fd, bs):
        return False

    def syncfs(self, fd):
        for f in self.files.values():
            self.writeback_file(f)

    def writeback_file(self, f: FakeFile) -> None:
        f.data += f.late
        f.late = 0

    def writeback(self, fd):
        self.writebacks += 1
        self.writeback_file(self.files[fd])

    def writeback_and_close(self, fd):
        self.writeback(fd)


class FakeInode:
    def __init__(self, ino: int, fd: int, f: FakeFile):
        self.ino, self.fd = ino, fd
        self.space, self.uid, self.gid, self.mode = f.data + f.past, f.uid, f.gid, f.mode
        self.unlinked = self.freed = self.held = False
        self.lookups, self.opens = 1, 0

    def __hash__(self):
        return self.ino

    def __eq__(self, other):
        return self is other


class FakeTable:
    """What the ledger uses of ``InodeTable``, letting an inode go as it does."""

    def __init__(self, fs: FakeBacking):
        self.fs = fs
        self.inodes: dict[int, FakeInode] = {}
        self.root = self.add(FakeFile(1, 0, 0, directory=True))
        self.root.lookups = 1 << 62
        self.on_leave = self.on_dropped = self.on_reused = None
        self.kept = set()

    def add(self, f: FakeFile) -> FakeInode:
        inode = FakeInode(f.ino, self.fs.add(f), f)
        self.inodes[f.ino] = inode
        return inode

    def find(self, st_ino):
        return self.inodes.get(st_ino)

    def keep(self, inode):
        self.kept.add(inode.ino)

    def hold(self, inode):
        inode.held = True

    def unhold(self, inode):
        inode.held = False
        self._let_go(inode)

    def forget(self, ino, n):
        inode = self.inodes[ino]
        inode.lookups -= n
        self._let_go(inode)

    def _let_go(self, inode):
        if inode.lookups > 0 or inode.opens > 0 or inode.held:
            return
        if self.on_leave is not None and self.on_leave(inode):
            return
        del self.inodes[inode.ino]
        self.on_dropped(inode)


@pytest.fixture
def fs():
    return FakeBacking()


@pytest.fixture
def led(fs):
    table = FakeTable(fs)
    led = Ledger(table, B, backing=fs)
    st = QuotaState(qid=1)
    st.level1.space.hard = 1 << 30
    st.level1.inodes.hard = 1000
    led.quota = QuotaEngine(st)
    return led


def usage(led) -> int:
    return led.quota.state.level1.space.usage


def reserved(led) -> int:
    return led.quota.state.level1.space.rsv


def new_file(led, ino: int, data: int = 0, uid: int = 1000) -> FakeInode:
    """A file already charged for what it holds."""
    f = FakeFile(ino, uid, uid, data=data, size=data)
    inode = led.table.add(f)
    led.quota.charge(inode.uid, inode.gid, inode.space, 1)
    return inode


def handle(inode, user: bool = False):
    return SimpleNamespace(fd=inode.fd, inode=inode, user=user, wrote=False, trim=False)


def test_a_write_far_from_every_limit_commits_what_the_backing_allocated(led, fs):
    inode = new_file(led, 10)
    h = handle(inode)
    n, res, tree = led.before_write(h, 0, 10000)
    assert n == 10000 and not tree
    assert reserved(led) == 3 * B + DEFAULT.write_slack     # the span, with slack
    fs.files[h.fd].write(0, 10000)
    st = led.after_write(h, res, tree)
    assert st.st_blocks * 512 == 3 * B
    assert usage(led) == inode.space == 3 * B and reserved(led) == 0
    assert h.wrote


def test_near_the_limit_a_write_is_short_then_refused(led, fs):
    inode = new_file(led, 10)
    led.quota.state.level1.space.hard = usage(led) + 2 * B
    h = handle(inode)
    n, res, tree = led.before_write(h, 0, 5 * B)
    assert n == 2 * B                          # the prefix that fits: a short write
    fs.files[h.fd].write(0, n)
    led.after_write(h, res, tree)
    assert usage(led) == led.quota.state.level1.space.hard and reserved(led) == 0
    with pytest.raises(QuotaExceeded):
        led.before_write(h, 2 * B, B)
    assert reserved(led) == 0


def test_a_failed_write_releases_and_charges_what_it_left(led, fs):
    inode = new_file(led, 10)
    h = handle(inode)
    n, res, tree = led.before_write(h, 0, 4 * B)
    fs.files[h.fd].write(0, B)                 # ENOSPC after one block
    led.failed_write(h, res)
    assert reserved(led) == 0 and usage(led) == inode.space == B


def test_late_blocks_past_the_hard_limit_wait_in_gapped_until_room_comes_back(led, fs):
    other = new_file(led, 11, data=4 * B)
    inode = new_file(led, 10)
    led.quota.state.level1.space.hard = usage(led) + 2 * B
    fs.files[inode.fd].write(0, 6 * B)         # allocated behind the reservation
    led.changed(inode)
    assert usage(led) == led.quota.state.level1.space.hard    # never over the limit
    assert inode in led.gapped and led.gaps() == 1
    # another file goes: room comes back, the gap is charged
    del led.table.inodes[other.ino]
    led.unlinked(fs.fstat(other.fd))
    assert inode.space == 6 * B and inode not in led.gapped and led.gaps() == 0
    assert usage(led) == 6 * B


def test_a_gapped_inode_is_held_after_the_kernel_lets_go_until_its_charge_completes(led, fs):
    other = new_file(led, 11, data=4 * B)
    inode = new_file(led, 10)
    led.quota.state.level1.space.hard = usage(led) + B
    fs.files[inode.fd].write(0, 3 * B)
    led.table.forget(inode.ino, 1)             # the kernel lets go
    assert inode.held and inode in led.held and led.table.inodes[10] is inode
    assert led.busy(inode)
    led.table.forget(other.ino, 1)
    del fs.files[other.fd]
    other.unlinked = True
    led._free(other)                           # as dropped() frees an unlinked inode
    assert 10 not in led.table.inodes          # charged in full, then let go
    assert not led.held and not led.gapped and usage(led) == 3 * B


def test_past_the_bound_a_gapped_inode_is_let_go_and_counted_lost(led, fs):
    led.config = Config(gaps_held=0)
    inode = new_file(led, 10)
    led.quota.state.level1.space.hard = usage(led)
    fs.files[inode.fd].write(0, B)
    led.table.forget(inode.ino, 1)
    assert 10 not in led.table.inodes and led.lost_gaps == 1 and led.gaps() == 1
    led.refresh()                              # a recount charged it
    assert led.gaps() == 0


def test_a_file_closed_with_delayed_blocks_is_followed_until_they_are_allocated(led, fs):
    inode = new_file(led, 10)
    inode.opens = 1
    h = handle(inode)
    n, res, tree = led.before_write(h, 0, 2 * B)
    fs.files[h.fd].write(0, 2 * B, delayed=True)
    led.after_write(h, res, tree)
    assert usage(led) == 0                     # nothing allocated yet
    led.closing(h, h.fd)
    assert inode in led.followed
    inode.opens = 0
    led.table.forget(inode.ino, 1)             # kept while followed
    assert inode.held and 10 in led.table.inodes
    fs.writeback(inode.fd)                     # the filesystem allocates them
    import asyncio
    asyncio.run(led.sweep())
    assert usage(led) == inode.space == 2 * B
    assert not led.followed and 10 not in led.table.inodes


def test_at_a_clean_stop_followed_files_are_charged(led, fs):
    inode = new_file(led, 10)
    fs.files[inode.fd].write(0, B, delayed=True)
    h = handle(inode)
    h.wrote = True
    led.closing(h, h.fd)
    assert inode in led.followed
    led.charge_followed()
    assert usage(led) == B and not led.followed


def test_a_non_root_caller_stays_out_of_the_hosts_root_reserve(led, fs):
    inode = new_file(led, 10)
    fs.avail = 3 * B
    n, res, _ = led.before_write(handle(inode, user=True), 0, 4 * B)
    assert n == 3 * B                          # a short write, up to the edge
    led.release(res)
    fs.avail = 0
    led._host_next = 0                         # (read again at most every host_ttl s)
    with pytest.raises(OSError) as e:
        led.before_write(handle(inode, user=True), 0, 4 * B)
    assert e.value.errno == errno.ENOSPC
    fs.avail = 3 * B
    led._host_next = 0
    n, res, _ = led.before_write(handle(inode, user=False), 0, 4 * B)   # root may
    led.release(res)
    led.quota = None                           # and with the quota off
    n, res, _ = led.before_write(handle(inode, user=True), 0, 4 * B)
    assert n == 3 * B and res is None          # a short write, up to the edge
    fs.avail -= n                              # (what that write took)
    with pytest.raises(OSError) as e:
        led.host_check(1000, B)
    assert e.value.errno == errno.ENOSPC
    led.host_check(0, 1 << 30)                 # root is never held back


def test_a_directory_taking_a_name_is_charged_its_growth_and_the_guess_grows(led, fs):
    d = led.table.add(FakeFile(20, 1000, 1000, data=B, directory=True))
    led.quota.charge(1000, 1000, B, 1)
    res = led.before_name(d, 1000)
    assert reserved(led) == DEFAULT.dir_growth * B
    fs.files[d.fd].data += 6 * B               # grew more than guessed
    led.after_name(d, res)
    assert reserved(led) == 0 and usage(led) == 7 * B
    assert led.dir_growth == 6 * B
    fs.files[d.fd].data = B
    led.dir_changed(d)                         # a name left: it shrank
    assert usage(led) == B


def test_a_new_node_is_reserved_then_charged_and_its_directory_too(led, fs):
    d = led.table.root
    held = led.before_node(d, 1000, 1000, 1000, space=B)
    assert led.quota.state.level1.inodes.rsv == 1
    f = FakeFile(30, 1000, 1000, data=B, size=10)
    inode = led.table.add(f)
    led.after_node(d, inode, f.stat(), held)
    assert led.quota.state.level1.inodes.usage == 1 and usage(led) == B
    assert reserved(led) == 0 and led.quota.state.level1.inodes.rsv == 0
    held = led.before_node(None, 1000, 1000, 1000)
    led.failed_node(held)
    assert led.quota.state.level1.inodes.rsv == 0


def test_an_unlinked_inode_stays_charged_until_it_leaves_and_is_freed_once(led, fs):
    inode = new_file(led, 10, data=2 * B)
    inode.opens = 1
    led.unlinked(fs.fstat(inode.fd))
    assert inode.unlinked and 10 in led.table.kept
    assert usage(led) == 2 * B                 # still reachable through its handle
    inode.opens = 0
    led.table.forget(10, 1)
    assert usage(led) == 0 and led.quota.state.level1.inodes.usage == 0
    led.reused(inode)                          # its number comes back: not freed again
    assert usage(led) == 0 and led.quota.state.level1.inodes.usage == 0


def test_fallocate_reserves_the_range_and_a_punch_is_never_refused(led, fs):
    from simfs import lower
    inode = new_file(led, 10)
    h = handle(inode)
    led.quota.state.level1.space.hard = 4 * B
    with pytest.raises(QuotaExceeded):
        led.before_fallocate(h, 0, 0, 8 * B)
    res = led.before_fallocate(h, 0, 0, 4 * B)
    assert reserved(led) == 4 * B
    fs.files[h.fd].data, fs.files[h.fd].size = 4 * B, 4 * B
    led.after_write(h, res)
    assert usage(led) == 4 * B
    # at the limit a punch still goes, and credits what it freed
    res = led.before_fallocate(h, lower.FALLOC_FL_PUNCH_HOLE | lower.FALLOC_FL_KEEP_SIZE,
                               0, 2 * B)
    fs.files[h.fd].data = 2 * B
    led.after_write(h, res)
    assert usage(led) == 2 * B and reserved(led) == 0


def test_on_xfs_preallocation_past_the_end_is_trimmed_not_charged(fs):
    table = FakeTable(fs)
    led = Ledger(table, B, xfs=True, backing=fs)
    led.quota = QuotaEngine(QuotaState(qid=1))
    led.quota.state.level1.space.hard = 1 << 30
    led.quota.state.level1.inodes.hard = 10
    inode = new_file(led, 10)
    h = handle(inode)
    led.opened(h)
    assert h.trim                              # no exact allocation: trimmed
    n, res, tree = led.before_write(h, 0, B)
    f = fs.files[h.fd]
    f.write(0, B)
    f.past = 16 * B                            # speculative preallocation
    led.after_write(h, res, tree)
    assert f.past == 0 and usage(led) == inode.space == B
