"""The per-inode ledger of charges: what the quota charged for each inode the
mount knows, kept true to what the backing filesystem really allocates.

Role: the one place that turns backing allocations into quota charges.  The
FUSE handlers (``simfs.ops``) translate requests; around each backing call
that may allocate they call this ledger, in this order, with no await between
(the handlers that allocate are plain functions, so none can be written):

    before_write / before_fallocate / before_node / before_name   reserve
    (the backing call)
    after_write / after_node / after_name          commit what it really took
    failed(...)                                    or release, if it failed

and it hears from the inode table when an inode leaves it (``leaving``,
``dropped``, ``reused``).  Everything else here follows from what backing
filesystems do behind a write:

- *Late allocations.*  ext4 allocates a file's blocks (and its extent-tree
  blocks) at writeback, XFS preallocates past the end.  A write far from
  every limit is reserved with ``write_slack`` to spare and committed with what
  ``st_blocks`` really grew by; near a limit the file's allocation is first
  forced (``_force_allocation``: trim, writeback when its extent map may
  change) so that only the blocks not yet allocated cost anything.  A file
  closed while blocks are still delayed is *followed* (``followed``) until
  they are allocated, and charged then (``sweep``, run by the mount).
- *Gaps.*  What was already allocated is charged only as far as the hard
  limits allow (``_reconcile``); the rest waits in ``gapped`` and is charged
  when room comes back (``_charge_gaps``).  An inode the kernel let go of
  while gapped or followed is *held* in the table (``held``, a reference of
  the ledger's, at most ``gaps_held``) until its charge is complete; past that
  bound it is counted in ``lost_gaps``.
- *XFS.*  A regular file opened for writing gets exact allocation
  (``opened``); one that cannot has its preallocation past the end trimmed
  after each write (``_trim``).
- *Extent maps.*  What a fallocate may add to a file's extent map is guessed
  from its extent count (``_map_blocks``).
- *The host's root reserve.*  Root writes for every caller, so a non-root
  caller is kept out of the blocks the backing filesystem reserves for the
  host's root (``host_check``, ``_host_room``).
- *Directories* grow when they take a name: each such call reserves
  ``dir_growth`` (raised to the largest growth seen) for the directory's owner.

An inode unlinked while the kernel can still reach it stays charged until it
leaves the table (``dropped``); it is freed once (``_free``).

The backing filesystem is reached through ``Backing`` (its stat, extent map,
writeback...), so the ledger runs against a fake one in its unit tests
(tests/test_ledger.py).

Concurrency: the event loop only; no method awaits but ``sweep``, which awaits
only a file's writeback in a worker thread and reads its stat after it.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import itertools
import logging
import os
import time
from typing import Callable

import anyio

from vzquota.engine import INFINITE, QuotaEngine
from vzquota.errors import QuotaExceeded

from . import lower
from .config import DEFAULT, Config

log = logging.getLogger(__name__)

# More extents than this and an ext4 file needs blocks for its extent tree,
# allocated at writeback.
EXTENTS_IN_INODE = 4
# The longest extent ext4 maps (an unwritten one: 32767 blocks; a written one 32768).
EXTENT_MAX = 32767


def in_thread(fn: Callable, *args):
    """An awaitable running ``fn(*args)`` in a worker thread.  Under asyncio a
    plain executor future: the request loop (fusewire's reader thread, which
    sees the loop as its running loop, or its reader callback) first runs a
    handler outside any task, where anyio cannot tell which loop it is on."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:          # trio
        return anyio.to_thread.run_sync(fn, *args)
    return loop.run_in_executor(None, fn, *args)


def _writeback(fd: int) -> None:
    """Write ``fd`` back and wait for it; a failure only leaves it followed."""
    try:
        lower.start_writeback(fd, wait=True)
    except OSError:
        pass


def _writeback_and_close(fd: int) -> None:
    """In a worker thread: ``_writeback`` of ``fd``, then close it."""
    try:
        _writeback(fd)
    finally:
        os.close(fd)


class Backing:
    """The calls the ledger makes on the backing filesystem (each raises
    OSError only).  tests/test_ledger.py replaces it with a fake one."""
    fstat = staticmethod(os.fstat)
    fstatvfs = staticmethod(os.fstatvfs)
    listxattr = staticmethod(os.listxattr)
    utime = staticmethod(os.utime)
    reopen = staticmethod(lower.reopen)
    close = staticmethod(os.close)
    dup = staticmethod(os.dup)
    extents = staticmethod(lower.extents)
    mapping = staticmethod(lower.mapping)
    nothing_delayed = staticmethod(lower.settled)
    unallocated = staticmethod(lower.unallocated)
    punch = staticmethod(lower.punch)
    deliberate_prealloc = staticmethod(lower.deliberate_prealloc)
    exact_allocation = staticmethod(lower.exact_allocation)
    syncfs = staticmethod(lower.syncfs)
    writeback = staticmethod(_writeback)
    writeback_and_close = staticmethod(_writeback_and_close)


class Ledger:
    """Charges per inode of one mount's table.  See the module docstring."""

    def __init__(self, table, bsize: int, xfs: bool = False, backing: Backing | None = None,
                 config: Config = DEFAULT):
        self.table = table
        self.config = config
        self.slack = config.write_slack
        self.fs = backing or Backing()
        self._fstat = self.fs.fstat     # (on every commit: one lookup less)
        self.bsize = bsize
        self.xfs = xfs                # regular files get exact allocation (opened)
        self.quota: QuotaEngine | None = None
        # What a directory may grow by when it takes one more name (ext4's
        # switch to an indexed directory adds 2 blocks); raised to the largest
        # growth seen, so the reservation stays an upper bound.
        self.dir_growth = config.dir_growth * bsize
        # the backing filesystem's f_bavail in bytes, as last read, less what
        # non-root callers allocated since (see _host_room)
        self._host_avail = 0
        self._host_next = 0.0
        # inodes holding blocks the hard limits left uncharged (see _reconcile)
        self.gapped: set = set()
        # those of them (and followed ones) the kernel let go, kept in the
        # table by a hold of ours (at most config.gaps_held gapped) until charged
        self.held: set = set()
        self.lost_gaps = 0      # gapped inodes let go past config.gaps_held
        # written files whose allocation may still change (delayed blocks at
        # their last close), oldest first, with the time they were closed
        self.followed: collections.OrderedDict = collections.OrderedDict()
        # inode numbers whose charge is never lowered (the ops' set of files a
        # shared passthrough mapping may write unseen, simfs.iomode ``mapped``):
        # such a mapping can free blocks (MADV_REMOVE punches the backing
        # file) and fill them again with no request, so what it frees stays
        # charged until the mark ends (then ``changed``)
        self.pinned: set = set()
        table.on_leave = self.leaving
        table.on_dropped = self.dropped
        table.on_reused = self.reused

    # ---- figures -------------------------------------------------------------

    def gaps(self) -> int:
        """Inodes whose charge is short of what they allocate (the hard limits
        left it so), followed or no longer followed."""
        return len(self.gapped) + self.lost_gaps

    def busy(self, inode) -> bool:
        """Whether the ledger needs ``inode`` kept in the table (the kernel must
        not be asked to forget it)."""
        return inode in self.held or inode in self.followed or inode in self.gapped

    # ---- reservations --------------------------------------------------------

    def reserve(self, uid: int, gid: int, space: int = 0, inodes: int = 0):
        q = self.quota
        if q is None:
            return None
        return q.reserve(uid, gid, space, inodes)

    def release(self, res) -> None:
        if res is not None and self.quota is not None:
            self.quota.release(res)

    def _host_room(self) -> int:
        """Bytes non-root callers may still allocate on the backing filesystem:
        its f_bavail (root writes for them, so without this they would eat the
        blocks reserved for the host's root).  Read again at most every
        ``host_ttl`` seconds while far from the edge (``host_edge``), before
        every call near it."""
        if self._host_avail < self.config.host_edge or time.monotonic() >= self._host_next:
            sv = self.fs.fstatvfs(self.table.root.fd)
            self._host_avail = sv.f_bavail * sv.f_frsize
            self._host_next = time.monotonic() + self.config.host_ttl
        return self._host_avail

    def host_check(self, uid: int, amount: int) -> None:
        """ENOSPC for a non-root caller when ``amount`` bytes would not fit in
        the backing filesystem's f_bavail; else count them as taken."""
        if uid != 0:
            if amount > self._host_room():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._host_avail -= amount

    # ---- charges after the fact ----------------------------------------------

    def _reconcile(self, inode, st: os.stat_result) -> None:
        """Charge the difference between what the inode allocates now and what
        was charged for it (a directory that grew, a truncate, blocks the
        backing filesystem allocated late).  What was already allocated is
        charged only as far as the hard limits allow: the rest waits in
        ``gapped`` until room comes back (``_charge_gaps``)."""
        inode.mode = st.st_mode
        new = st.st_blocks * 512
        q = self.quota
        if q is None or inode.freed:
            inode.space = new
            return
        delta = new - inode.space
        if delta > 0:
            delta = min(delta, q.room(inode.uid, inode.gid, soft=False))
        elif delta < 0 and inode.ino in self.pinned:
            delta = 0                 # freed under a mapping that may fill it again
        if delta:
            q.charge(inode.uid, inode.gid, delta)
            inode.space += delta
        if inode.space < new:
            self.gapped.add(inode)
        else:
            self.gapped.discard(inode)

    def changed(self, inode, fd: int | None = None) -> None:
        """``inode`` may allocate more or less than before (a truncate, an
        attribute set or removed, an fsync): charge the difference; what it
        gave back may complete other inodes' charges."""
        self._reconcile(inode, self.fs.fstat(inode.fd if fd is None else fd))
        if self.gapped:
            self._charge_gaps()

    def _charge_gaps(self) -> None:
        """Charge what the hard limits left uncharged, now that room came back."""
        table = self.table
        for inode in list(self.gapped):
            if table.inodes.get(inode.ino) is inode and not inode.freed:
                try:
                    st = self.fs.fstat(inode.fd)
                except OSError:           # gone (ESTALE): nothing left to charge
                    self.gapped.discard(inode)
                    continue
                self._reconcile(inode, st)
            else:
                self.gapped.discard(inode)
        if self.held:
            for inode in [i for i in self.held
                          if i not in self.gapped and i not in self.followed]:
                self._unhold(inode)

    # ---- holding inodes the kernel let go -------------------------------------

    def leaving(self, inode) -> bool:
        """The table is about to let ``inode`` go (no lookup, open or hold
        left): charge what it holds now, for good; keep it (True: held by
        the ledger) while its charge is short (a hard limit left a gap, up to
        ``gaps_held`` such inodes) or its allocation is still followed."""
        if inode.unlinked or inode in self.held:
            return False
        # no lookup left: no mapping (which holds the kernel's inode) either,
        # so what one freed may be credited now
        self.pinned.discard(inode.ino)
        try:
            self._reconcile(inode, self.fs.fstat(inode.fd))
        except OSError:
            return False
        if inode in self.followed or (inode in self.gapped
                                      and len(self.held) < self.config.gaps_held):
            self.held.add(inode)
            self.table.hold(inode)
            return True
        return False

    def _unhold(self, inode) -> None:
        """Drop the ledger's hold of ``inode`` (its charge is complete, or it
        is gone); the table lets it go if nothing else holds it."""
        if inode in self.held:
            self.held.discard(inode)
            self.table.unhold(inode)

    def dropped(self, inode) -> None:
        """``inode`` left the table: the kernel can no longer reach it."""
        if inode in self.gapped and not inode.unlinked:
            self.lost_gaps += 1       # no longer followed (gaps_held reached)
        self.gapped.discard(inode)
        self.held.discard(inode)
        self.followed.pop(inode, None)
        if inode.unlinked:
            self._free(inode)

    def reused(self, inode) -> None:
        """The backing filesystem gave a dead inode's number to a new one: the
        dead one is freed now (the table then starts its record anew, without
        the ledger's hold)."""
        self._free(inode)
        self.gapped.discard(inode)
        self.held.discard(inode)
        self.followed.pop(inode, None)

    def _free(self, inode) -> None:
        """Give back what a gone inode held, once."""
        if not inode.freed:
            inode.freed = True
            if self.quota is not None:
                self.quota.free(inode.uid, inode.gid, inode.space, 1)
                if self.gapped:
                    self._charge_gaps()

    # ---- new nodes and names -------------------------------------------------

    def before_name(self, parent, uid: int):
        """Before a call that adds a name to ``parent`` (by a caller ``uid``):
        hold what the directory may grow by, for its owner."""
        self.host_check(uid, self.dir_growth)
        return self.reserve(parent.uid, parent.gid, self.dir_growth)

    def after_name(self, parent, res) -> None:
        """After it: charge what the directory really grew by."""
        self.release(res)
        before = parent.space
        self._reconcile(parent, self.fs.fstat(parent.fd))
        self.dir_growth = max(self.dir_growth, parent.space - before)

    def dir_changed(self, parent) -> None:
        """A name left ``parent`` (it may have shrunk)."""
        self._reconcile(parent, self.fs.fstat(parent.fd))

    def before_node(self, parent, caller_uid: int, uid: int, gid: int, space: int = 0):
        """Before a call that makes a node owned by uid:gid (``parent`` None:
        a nameless one, O_TMPFILE): hold one inode and ``space``, and the
        directory's growth; returns what ``after_node`` or ``failed_node``
        takes."""
        dres = self.before_name(parent, caller_uid) if parent is not None else None
        try:
            return dres, self.reserve(uid, gid, space, 1)
        except BaseException:
            self.release(dres)
            raise

    def after_node(self, parent, inode, st: os.stat_result, held) -> None:
        """After it: charge the new ``inode`` what it allocates (``st``)."""
        dres, res = held
        space = st.st_blocks * 512
        if res is not None:
            self.quota.commit(res, space, 1)
        inode.space, inode.uid, inode.gid = space, st.st_uid, st.st_gid
        if parent is not None:
            self.after_name(parent, dres)

    def failed_node(self, held) -> None:
        dres, res = held
        self.release(res)
        self.release(dres)

    def made(self, st: os.stat_result, res) -> None:
        """A node the backing filesystem made on its own (a rename's whiteout,
        ``st``; ``res`` held its inode) is charged as such."""
        self.release(res)
        if self.quota is not None:
            self.quota.charge(st.st_uid, st.st_gid, st.st_blocks * 512, 1)

    def unlinked(self, st: os.stat_result) -> None:
        """A name whose inode (``st``, taken before) lost its last link.  An inode
        the kernel still holds (a lookup reference, an open handle) can be
        reopened through /proc/PID/fd: it stays charged until ``dropped``."""
        inode = self.table.find(st.st_ino)
        if inode is None:
            if self.quota is not None:
                self.quota.free(st.st_uid, st.st_gid, st.st_blocks * 512, 1)
                if self.gapped:
                    self._charge_gaps()
            return
        inode.unlinked = True
        self.table.keep(inode)        # alive while the kernel can reach it
        self._unhold(inode)           # freed now if only we held it

    def before_chown(self, inode, uid: int, gid: int) -> None:
        """Before a chown: move its charge to the new owner (QuotaExceeded
        if it does not fit there)."""
        if self.quota is not None and not inode.freed:
            self.quota.transfer(inode.uid, inode.gid, uid, gid, inode.space, 1)

    def failed_chown(self, inode, uid: int, gid: int) -> None:
        if self.quota is not None and not inode.freed:
            self.quota.transfer(uid, gid, inode.uid, inode.gid, inode.space, 1, force=True)

    # ---- writes --------------------------------------------------------------

    def opened(self, h) -> None:
        """A regular file opened for writing (``h``): on XFS, make it allocate
        exactly what each write needs, inside the write: no speculative
        preallocation to charge now and see vanish later.  A file that cannot
        (it already maps extents) has its writes trimmed instead (``h.trim``)."""
        if self.xfs:
            try:
                h.trim = not self.fs.exact_allocation(h.fd, self.bsize)
            except OSError as e:
                log.warning("no exact allocation on XFS (%s): writes are trimmed", e)
                h.trim = True

    def before_write(self, h, off: int, n: int) -> tuple[int, object, bool]:
        """Before writing ``n`` bytes at ``off`` through handle ``h`` (a write,
        a copy_file_range's destination): reserve, and say how many bytes may
        be written (a prefix when only that fits: a short write), the
        reservation, and whether the file's extent tree must be written back
        before the commit.  EDQUOT (ENOSPC at the host's root reserve, for a
        non-root caller) when nothing fits."""
        q = self.quota
        if q is None:
            if h.user:
                want = lower.span(off, n, self.bsize)
                host = self._host_room()
                if want > host:
                    n, want = self._fit(h.fd, off, n, host, errno.ENOSPC)
                self._host_avail -= want
            return n, None, False
        want = lower.span(off, n, self.bsize)
        host = self._host_room() if h.user else INFINITE
        node = h.inode
        uid, gid = node.uid, node.gid
        if want <= host:
            try:
                # far from every limit: held with write_slack to spare, for
                # blocks the backing filesystem may allocate late (all
                # released at the commit)
                return n, q.reserve(uid, gid, want + self.slack), False
            except QuotaExceeded:
                pass
        # Near a limit: first force this file's allocation (its preallocation
        # past the end given back, its late blocks allocated and charged),
        # then only the blocks not yet allocated cost anything; write the
        # longest prefix that fits (a short write), or refuse.
        extents, st, _ = self._force_allocation(h.fd, follow=False)
        self._reconcile(node, st)
        room = q.room(uid, gid)
        tree = extents >= EXTENTS_IN_INODE
        if tree:
            # a new extent may need a block of the extent tree: reserved too,
            # and allocated before the commit (after_write writes it back)
            room = max(0, room - self.bsize)
        try:
            n2, want = self._fit(h.fd, off, n, min(room, host),
                                 errno.ENOSPC if host < room else errno.EDQUOT)
        except OSError as e:
            if e.errno != errno.EDQUOT:
                raise
            # a refusal the caller sees, reported with its request size
            raise q.exceeded(uid, gid, want, request=n) from None
        return n2, q.reserve(uid, gid, want + (self.bsize if tree else 0), request=n), tree

    def before_fallocate(self, h, mode: int, off: int, length: int):
        """Before fallocate(2) of ``h``: the blocks of the range no extent maps
        yet, plus what the extent map may grow by, reserved (EDQUOT, or
        ENOSPC at the host's root reserve for a non-root caller, before
        anything is allocated).  A call that frees (a punch, a collapse) is
        never refused: a block its extent map may take anyway is charged
        after, up to the hard limits."""
        node = h.inode
        self._reconcile(node, self.fs.fstat(h.fd))    # late blocks first: the commit is this call's
        if mode & (lower.FALLOC_FL_PUNCH_HOLE | lower.FALLOC_FL_COLLAPSE_RANGE
                   | lower.FALLOC_FL_INSERT_RANGE):
            new = []                              # no data block allocated
        else:                                     # 0, KEEP_SIZE, ZERO_RANGE, UNSHARE
            new = self.fs.unallocated(h.fd, off, off + length, self.bsize)
        splits = 2 if mode & (lower.FALLOC_FL_PUNCH_HOLE | lower.FALLOC_FL_ZERO_RANGE
                              | lower.FALLOC_FL_COLLAPSE_RANGE
                              | lower.FALLOC_FL_INSERT_RANGE) else 0
        need = sum(e - s for s, e in new) + self._map_blocks(h.fd, new, splits)
        if h.user:
            if need > self._host_room():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if self.quota is None:
                self._host_avail -= need   # (with the quota on: what it took, after)
        try:
            return self.reserve(node.uid, node.gid, need)
        except QuotaExceeded:
            if not mode & (lower.FALLOC_FL_PUNCH_HOLE | lower.FALLOC_FL_COLLAPSE_RANGE):
                raise
            return None

    def after_write(self, h, res, tree: bool = False) -> os.stat_result | None:
        """After a write, fallocate or copy_file_range through ``h`` succeeded:
        commit what the file really gained or lost (``st_blocks`` after minus
        before), up to the hard limits when that is more than was reserved
        (the rest waits in ``gapped``).  Returns the file's stat (None with
        the quota off: nothing is followed then)."""
        q = self.quota
        if q is None:
            return None
        h.wrote = True
        fd = h.fd
        try:
            if tree:
                self.fs.writeback(fd)
            st = self._fstat(fd)
            if h.trim and self._trim(fd, st):
                st = self._fstat(fd)
        except BaseException:
            self.release(res)
            raise
        node = h.inode
        delta = st.st_blocks * 512 - node.space
        if h.user and delta > 0:
            self._host_avail -= delta
        if res is not None and delta <= res.space:
            q.commit(res, delta)
            node.space += delta
        else:
            # more than reserved (preallocation, an extent map that grew, a
            # gap left before): charged up to the hard limits, never over them
            self.release(res)
            self._reconcile(node, st)
        if delta < 0 and self.gapped:
            self._charge_gaps()
        return st

    def failed_write(self, h, res) -> None:
        """The backing call failed: release, and charge what a failure part way
        (ENOSPC) may have left allocated."""
        self.release(res)
        if self.quota is not None:
            h.wrote = True
            self._reconcile(h.inode, self._fstat(h.fd))

    def _fit(self, fd: int, off: int, n: int, room: float, err: int) -> tuple[int, int]:
        """The longest prefix of a write of ``n`` bytes at ``off`` whose new
        blocks fit in ``room``, and what they cost; ``err`` when none does."""
        need = self.fs.unallocated(fd, off, off + n, self.bsize)
        cost = sum(e - s for s, e in need)
        if cost > room:
            n = lower.fit_prefix(need, off, n, int(room), self.bsize)
            if n <= 0:
                raise OSError(err, os.strerror(err))
            cost = sum(e - s for s, e in self.fs.unallocated(fd, off, off + n, self.bsize))
        return n, cost

    def _map_blocks(self, fd: int, holes: list[tuple[int, int]], splits: int) -> int:
        """What a call filling ``holes`` of ``fd`` and splitting ``splits``
        of its extents (a punch or a zero range splits at each end) may
        allocate for the file's extent map: a block once it maps more extents
        than its inode holds (ext4's extent tree, XFS's extent btree), one
        more per 300 extents.  Nothing where there is no FIEMAP (tmpfs has no
        such blocks)."""
        try:
            n = self.fs.extents(fd, 0)
        except OSError:
            return 0
        most = EXTENT_MAX * self.bsize
        n += splits + sum(-(-(e - s) // most) for s, e in holes)
        return 0 if n <= EXTENTS_IN_INODE else self.bsize * (1 + n // 300)

    def _trim(self, fd: int, st: os.stat_result) -> bool:
        """Give back the blocks a file holds past its end (XFS's speculative
        preallocation), keeping its times.  True if there were any.  Only on
        XFS, and not in a file preallocated on purpose (fallocate with
        KEEP_SIZE: XFS marks it so, and keeps those blocks itself)."""
        if not self.xfs:
            return False
        fs = self.fs
        end = -(-st.st_size // self.bsize) * self.bsize
        try:
            if fs.deliberate_prealloc(fd):
                return False
            if not fs.extents(fd, end):
                return False
            fs.punch(fd, end, st.st_blocks * 512 + self.bsize)
            fs.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        except OSError:           # no FIEMAP (tmpfs) or no hole punching
            return False
        return True

    def _force_allocation(self, fd: int, follow: bool) -> tuple[int, os.stat_result, bool]:
        """Make the backing filesystem allocate (or free) now what it would at
        writeback, and drop its preallocation past the end, so that what is
        charged stays true after the inode leaves the table.  Returns how many
        extents it maps, its stat, and whether that stat may still change
        (delayed blocks left, for ``sweep`` to charge).

        Its writeback is done and waited for when its extent map may change
        size then: more extents than the inode holds (ext4 adds extent-tree
        blocks at writeback, and frees one again when the completed I/O merges
        extents), or fewer but blocks beyond its data (an extent-tree block a
        truncate left, which the next writeback merges back into the inode).
        Delayed blocks left otherwise: ext4 may still allocate them in more
        pieces than the inode holds, and it takes them off its delayed count a
        moment before it adds them to ``st_blocks``, so a stat read while
        writeback allocates is short.  With ``follow`` such a file is returned
        as still changing (``sweep`` charges it once they are allocated);
        without (a write near a limit, which must not wait for every block),
        a stat that shows it was read short (below the data), or may hide it
        (a block of extended attributes), is read again after the writeback."""
        fs = self.fs
        st = fs.fstat(fd)
        if self._trim(fd, st):
            st = fs.fstat(fd)
        try:
            n = fs.extents(fd, 0)
            wait = n > EXTENTS_IN_INODE
            delayed = False
            if n and not wait:
                data, delayed, _ = fs.mapping(fd, n, self.bsize)
                st = fs.fstat(fd)   # after the map: nothing delayed there, nothing in flight
                have = st.st_blocks * 512
                wait = have > data or (delayed and not follow and (
                    have < data or bool(fs.listxattr(fd))))
            if wait:
                fs.writeback(fd)
                st = fs.fstat(fd)
                delayed = False
        except OSError:
            return 0, fs.fstat(fd), False
        return n, st, delayed and follow

    # ---- the last close, and files followed after it --------------------------

    def closing(self, h, fd: int) -> None:
        """The last open handle of ``h.inode`` (its descriptor ``fd``; a reader
        without one of its own gives the record's) is being closed: charge
        what the file holds now, its late allocations forced first if it was
        written through; a file whose delayed blocks are not allocated yet is
        followed (``sweep``), up to ``follow_max`` files at once."""
        node = h.inode
        pending = False
        if h.wrote:
            # inline, as the writeback it starts always was (awaited, an
            # unmount could abort the request before its reply)
            _, st, pending = self._force_allocation(
                fd, follow=self.quota is not None
                and len(self.followed) < self.config.follow_max)
        else:
            st = self._fstat(fd)
        self._reconcile(node, st)
        if pending:
            self.followed[node] = time.monotonic()
            self.followed.move_to_end(node)

    def _unfollow(self, inode) -> None:
        if self.followed.pop(inode, None) is not None and inode not in self.gapped:
            self._unhold(inode)

    async def sweep(self) -> None:
        """Charge what files closed with delayed blocks hold once the backing
        filesystem has allocated them (no delayed or unwritten extent left: a
        stat read then is exact, see ``_force_allocation``); a file still
        followed ``writeback_age`` seconds after its close has its writeback
        done here, in a worker thread.  At most ``sweep_max`` files per call; run
        periodically by the mount (simfs/mount.py)."""
        fs = self.fs
        now = time.monotonic()
        cfg = self.config
        for inode, since in list(itertools.islice(self.followed.items(), cfg.sweep_max)):
            if inode.freed or self.table.inodes.get(inode.ino) is not inode:
                self._unfollow(inode)
                continue
            try:
                fd = fs.reopen(inode.fd, os.O_RDONLY | os.O_NOATIME)
            except OSError:           # gone, or not ours to open: nothing to follow
                self._unfollow(inode)
                continue
            try:
                if not fs.nothing_delayed(fd, self.bsize):
                    if now - since < cfg.writeback_age:
                        continue
                    # the thread owns a duplicate: it stays valid (and is
                    # closed) even if this sweep is cancelled meanwhile
                    await in_thread(fs.writeback_and_close, fs.dup(fd))
                    if inode.freed or self.followed.get(inode) != since:
                        continue      # gone, or closed again meanwhile
                self._reconcile(inode, fs.fstat(fd))
                self._unfollow(inode)
            except OSError as e:
                log.warning("charging inode %d after its writeback: %s", inode.ino, e)
                self._unfollow(inode)
            finally:
                fs.close(fd)

    def charge_followed(self) -> None:
        """At a clean stop: write back the backing filesystem and charge what
        every followed file holds then."""
        if not self.followed:
            return
        fs = self.fs
        fd = fs.reopen(self.table.root.fd, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fs.syncfs(fd)
        finally:
            fs.close(fd)
        for inode in list(self.followed):
            if not inode.freed and self.table.inodes.get(inode.ino) is inode:
                try:
                    self._reconcile(inode, fs.fstat(inode.fd))
                except OSError:
                    pass
            self._unfollow(inode)

    def refresh(self) -> None:
        """Re-read what every known inode allocates (after a recount: writes
        made while quota was off were not followed)."""
        for inode in list(self.table.inodes.values()):
            try:
                st = self.fs.fstat(inode.fd)
            except OSError:           # gone (ESTALE): nothing to re-read
                continue
            inode.space, inode.uid, inode.gid = st.st_blocks * 512, st.st_uid, st.st_gid
        # the recount charged what they hold: no gap is left
        self.gapped.clear()
        self.lost_gaps = 0
        for inode in list(self.held):
            if inode not in self.followed:
                self._unhold(inode)

    def xattr_cost(self, value: bytes) -> int:
        """Upper bound of what one setxattr allocates: a block for the
        attributes (ext4's xattr block, an XFS attr leaf), plus the value's own
        blocks when it is too big to sit in that block (XFS remote values)."""
        b = self.bsize
        return b + (-(-len(value) // b) * b if len(value) > b // 2 else 0)
