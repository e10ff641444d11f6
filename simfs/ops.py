"""The FUSE request handlers: translate each request into calls on the backing
tree (``lower``, ``inodes``) and on the quota engine (``vzquota.engine``).

Role: translation only.  The quota engine decides; this module reserves before
every allocating backing call, commits what the backing filesystem really
allocated (``st_blocks`` after minus before), releases on failure, and frees on
unlink/rmdir/truncate/rename-over.  An unlinked inode the kernel can still
reach (an open handle, or a lookup reference through which /proc/PID/fd reopens
it) stays charged, and every write to it is reserved as any other; it is freed
exactly once, when it leaves the inode table (its FORGET or last release).
Blocks the backing filesystem allocates late (ext4 extent blocks at writeback,
XFS preallocation) are charged when they appear and when a file settles (near
a limit before each write, at its last release, at FORGET), never past a hard
limit: what a limit leaves over waits in ``gapped`` until space is freed, the
inode kept in the table meanwhile (up to GAPS_HELD of them) even once the
kernel let go of it. A file closed while ext4 still has blocks to allocate for
it is followed (``unsettled``, kept in the table too) until they are, and
charged then (``sweep``, run periodically by the mount). Every handler goes
through ``errno_boundary``, the one place where ``OSError`` becomes its errno, a
quota refusal becomes ``EDQUOT`` and anything unexpected is logged with its
traceback and answered with ``EIO``.
It also counts the requests answered per operation (``counts``, shown to the
host's root as the virtual ``trusted.simfs.requests`` attribute of the root).
Missing names are answered as negative entries the kernel caches, and FLUSH
with ENOSYS (the kernel then stops sending it): fewer round trips.

Concurrency: the binding (simfs.binding) runs handlers on one event loop on one
thread.  Handlers do
their backing I/O inline (pread/pwrite are fast and offloading measured slower),
except fsync and the part of a large read the page cache cannot serve at once,
which go to a worker thread (reads touch no quota state).  No handler awaits
between a reservation and its commit or release, so a charge is never seen half
done; ``sweep`` awaits only a file's writeback, and reads its stat after it.
The kernel write-back cache stays off so that ``EDQUOT`` is returned by write(2) itself.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import inspect
import itertools
import json
import logging
import os
import resource
import stat
import time
from dataclasses import dataclass
from typing import Callable

import anyio

import fusewire
from fusewire import FUSEError, get_sup_groups, readdir_reply

from vzquota.engine import INFINITE, QuotaEngine
from vzquota.errors import QuotaExceeded
from vzquota.inside import ADMIN_XATTR, refuse_without_quota
from vzquota.model import GROUP, USER

from . import lower
from .inodes import MAX_INODES, MAX_OPEN, ROOT, Budget, Inode, InodeTable, OpenShares
from .statfs import host_figures, quota_figures

log = logging.getLogger(__name__)

# Below this many bytes left to non-root users on the backing filesystem, its
# f_bavail is read again before each allocation; above it, at most every HOST_TTL s.
HOST_EDGE = 64 << 20
HOST_TTL = 1.0
# A write is answered without looking at the file when this much room is left
# past it; closer to a limit the file is settled first (see write).
SETTLE_ZONE = 1 << 20
# More extents than this and an ext4 file needs blocks for its extent tree,
# allocated at writeback.
EXTENTS_IN_INODE = 4
# The longest extent ext4 maps (an unwritten one: 32767 blocks; a written one 32768).
EXTENT_MAX = 32767
DIR_GROWTH = 4                  # blocks reserved for a directory taking a new name
GAPS_HELD = 1024                # gapped inodes kept in the table after the kernel let go
# Files closed while ext4 still had to allocate their delayed blocks, followed
# until it has (see sweep): at most UNSETTLED_MAX at once (past it a last close
# settles its file as a write near a limit does); SWEEP_MAX looked at per sweep; one
# older than SETTLE_AGE seconds has its writeback done by the sweep.
UNSETTLED_MAX = 4096
SWEEP_MAX = 512
SETTLE_AGE = 2.0
QUOTA_XATTR = b"user.vzquota"   # read-only, virtual, on the root only
COUNTS_XATTR = b"trusted.simfs.requests"   # read-only, virtual, root only: request counts
OPTIONS_XATTR = b"trusted.simfs.options"   # read-only, virtual, root only: simfs's -o values
INODES_XATTR = b"trusted.simfs.inodes"     # read-only, virtual, root only: the inode table
VIRTUAL_XATTRS = (QUOTA_XATTR, COUNTS_XATTR, OPTIONS_XATTR, INODES_XATTR)
# POSIX ACLs: with FUSE_POSIX_ACL negotiated (fusewire) the kernel checks them
# (default_permissions with the ACL) and the backing filesystem keeps them: they
# pass through (SimOperations.acl).  Where the kernel would not check them (the
# pyfuse3 fallback, which does not ask for it) the mount behaves as a filesystem
# without ACL support: these are refused with EOPNOTSUPP and ACLs already in the
# private area are not shown, never stored or shown unenforced.
ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
ACL_XATTRS = frozenset((ACL_ACCESS, ACL_DEFAULT))
TIMEOUT = 60.0                  # entry/attr cache: every change comes through us
# Reads of at least this many bytes that the backing page cache cannot serve at
# once (RWF_NOWAIT) go to a worker thread.
READ_NOWAIT = 32 << 10
# Inodes asked of the kernel per prune pass at most (see prune): a pass is a
# few milliseconds of the loop.  Passes are PRUNE_GAP seconds apart at least,
# twice that after each pass after which no inode left the table (the kernel
# uses them all), up to PRUNE_GAP_MAX.
PRUNE_MAX = 2048
PRUNE_GAP = 0.005
PRUNE_GAP_MAX = 1.0


# Handlers that may change names or allocations: ``SimOperations.mutations``
# sums their counts (a live recount is exact only if none ran meanwhile).
# (open, release and fsync only reconcile: what they change shows in the engine's
# generation, so readers do not count.)
MUTATING = frozenset({"setattr", "mknod", "mkdir", "symlink", "create", "link", "unlink",
                      "rmdir", "rename", "write", "setxattr", "removexattr", "fallocate",
                      "tmpfile", "copy_file_range"})
# Handlers a live recount may hold while it scans (``SimOperations.gate``):
# everything that may change names or allocations (open only with O_TRUNC).
HELD = MUTATING | {"release", "fsync"}


def in_thread(fn: Callable, *args):
    """An awaitable running ``fn(*args)`` in a worker thread.  Under asyncio a
    plain executor future: the request loop (fusewire's reader callback, or a
    patched pyfuse3's) first runs a handler outside any task, where anyio
    cannot tell which loop it is on."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:          # trio
        return anyio.to_thread.run_sync(fn, *args)
    return loop.run_in_executor(None, fn, *args)


def _writeback(fd: int) -> None:
    """Write ``fd`` back and wait for it; a failure only leaves it unsettled."""
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


# Held requests that never allocate (they free, or change no usage): they wait
# for the gate however long it holds; the others at most its ``limit``.
FREEING = frozenset({"unlink", "rmdir", "removexattr", "release", "fsync", "open"})


def may_allocate(op: str, args: tuple) -> bool:
    if op in FREEING:
        return False
    if op == "setattr":             # (inode, attr, fields, fh, ctx)
        f = args[2]
        return bool(f.update_size or f.update_uid or f.update_gid)
    return True


async def _held(gate, call: Callable, ops: "SimOperations", args: tuple, op: str):
    """A request a live recount holds (``SimOperations.gate``): run once it
    lets it go; the FUSE layer drives the coroutine a plain handler returns.
    One that would allocate and waits longer than the gate's ``limit`` fails
    with EDQUOT (simfs/mount.py Mount.recalc: never checked against a figure
    that may be short, never let through unchecked)."""
    limit = getattr(gate, "limit", None)
    try:
        await gate.wait(limit if limit is not None and may_allocate(op, args) else None)
    except TimeoutError:
        gate.refused += 1
        raise FUSEError(errno.EDQUOT) from None
    r = call(ops, *args)
    while hasattr(r, "__await__"):          # held again by a newer pass
        r = await r
    return r


def errno_boundary(fn: Callable) -> Callable:
    """The one errno boundary: only FUSEError may leave a handler.  A handler
    that never awaits stays a plain function (the request loop answers it
    inline, and no await can be written between a reservation and its
    commit); one that awaits (read, fsync, fsyncdir) stays a coroutine."""
    op = fn.__name__

    def failed(self: "SimOperations", args: tuple, e: BaseException) -> FUSEError:
        if isinstance(e, QuotaExceeded):
            if self.quota is not None:
                self.quota.report(e)     # final: the caller gets EDQUOT
            return FUSEError(errno.EDQUOT)
        if isinstance(e, OSError):
            return FUSEError(e.errno or errno.EIO)
        log.exception("unexpected error in %s%r", op, args[:2])
        return FUSEError(errno.EIO)

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapper(self: "SimOperations", *args):
            gate = self.gate
            if gate is not None and op in HELD:
                await gate.wait()        # a live recount holds it (simfs/mount.py)
            self.counts[op] += 1
            watch = self.watch
            if watch is not None:        # a live recount is running (simfs/mount.py)
                mark = watch.before(op, args)
            try:
                return await fn(self, *args)
            except FUSEError:
                raise
            except Exception as e:
                raise failed(self, args, e) from None
            finally:
                if watch is not None:
                    watch.after(op, mark)
        return wrapper

    @functools.wraps(fn)
    def plain(self: "SimOperations", *args):
        gate = self.gate
        if gate is not None and (op in HELD or op == "open" and args[1] & os.O_TRUNC):
            return _held(gate, plain, self, args, op)    # a live recount holds it
        self.counts[op] += 1
        watch = self.watch
        if watch is None:
            try:
                return fn(self, *args)
            except FUSEError:
                raise
            except Exception as e:
                raise failed(self, args, e) from None
        mark = watch.before(op, args)    # a live recount is running (simfs/mount.py)
        try:
            return fn(self, *args)
        except FUSEError:
            raise
        except Exception as e:
            raise failed(self, args, e) from None
        finally:
            watch.after(op, mark)
    return plain


@dataclass
class Handle:
    fd: int
    inode: Inode
    user: bool = False      # opened by a non-root caller: kept out of the root reserve
    wrote: bool = False     # written through: settled at its last release
    trim: bool = False      # XFS file without exact allocation: trimmed after each write
    uid: int = 0            # who opened it (its share of the budget: OpenShares)
    backing: int = 0        # passthrough backing id (reads bypass the daemon), 0 if none
    cached: bool = False    # in the kernel's caching io mode (not passthrough, not direct_io)
    gid: int = 0            # the opener's group and process (whose groups decide whether
    pid: int = 0            # a write clears a set-group-ID that is not group-executable)


@dataclass
class DirHandle:
    """An open directory: its own descriptor, read in getdents64 chunks (the
    memory per handle is one chunk, whatever the directory's size)."""
    inode: Inode
    fd: int
    buf: bytes = b""      # the chunk being listed
    pos: int = 0          # its next record
    off: int = 0          # the offset the kernel will ask for next (see readdir)
    uid: int = 0          # who opened it (OpenShares)


class SimOperations:
    """Passthrough of ``root_fd``'s tree with quota enforcement."""

    # vzquota.inside.QuotaAdmin of the mount's quota (set by the mount): who may
    # write ADMIN_XATTR from inside
    admin = None
    # INIT flags asked of the kernel beyond fusewire's defaults (fusewire.kernel):
    # HANDLE_KILLPRIV_V2 (one request per write(2): the kernel stops asking for
    # security.capability before each write and tells the daemon, by a flag on
    # write/setattr/open, when set-user-ID/set-group-ID must go: see
    # _kill_privs), POSIX_ACL (the kernel enforces ACLs; SETXATTR_EXT carries
    # its kill-sgid flag for an ACL change) and DONT_MASK (the kernel sends a
    # new node's mode unmasked with the umask beside it, so that a default ACL
    # replaces the umask as on a local filesystem: see _acl_inherited)
    fuse_want = (fusewire.kernel.HANDLE_KILLPRIV_V2 | fusewire.kernel.POSIX_ACL
                 | fusewire.kernel.SETXATTR_EXT | fusewire.kernel.DONT_MASK)
    # the fusewire.Session serving the mount (set by simfs.binding; None under
    # pyfuse3 and in unit tests): passthrough backing ids, notifications
    channel = None

    def __init__(self, root_fd: int, max_open: int = MAX_OPEN,
                 max_inodes: int = MAX_INODES):
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.table = InodeTable(root_fd, Budget.plan(limit, max_open), max_inodes=max_inodes)
        self.table.on_full = self._prune_soon
        self._prune_next = 0.0    # no prune pass before (time.monotonic)
        self._prune_gap = PRUNE_GAP
        self._prune_dropped = -1  # table.dropped at the last pass
        self.shares = OpenShares(self.table.budget.files)
        self.table.on_reused = self._reused
        self.bsize = os.fstatvfs(root_fd).f_bsize or 4096
        # XFS: regular files get exact allocation (see _exact)
        self.xfs = lower.fs_magic(root_fd) == lower.XFS_SUPER_MAGIC
        # What a directory may grow by when it takes one more name (ext4's
        # switch to an indexed directory adds 2 blocks); raised to the largest
        # growth seen, so the reservation stays an upper bound.
        self.dir_growth = DIR_GROWTH * self.bsize
        # the backing filesystem's f_bavail in bytes, as last read, less what
        # non-root callers allocated since (see _host_room)
        self._host_avail = 0
        self._host_next = 0.0
        # inodes holding blocks the hard limits left uncharged (see _reconcile)
        self.gapped: set[Inode] = set()
        # those of them the kernel let go, kept in the table by one reference
        # of ours (at most GAPS_HELD) until their gap is charged (see _hold)
        self.held: set[Inode] = set()
        self.lost_gaps = 0      # gapped inodes let go past GAPS_HELD
        # written files whose allocation may still change (delayed blocks at
        # their last close), oldest first, with the time they were closed
        self.unsettled: collections.OrderedDict[Inode, float] = collections.OrderedDict()
        self.quota: QuotaEngine | None = None
        self._nowait = True       # the backing filesystem takes RWF_NOWAIT reads
        self.handles: dict[int, Handle | DirHandle] = {}
        self._next_fh = 1
        # FUSE requests answered, per operation (a dict increment per request;
        # read through COUNTS_XATTR by tools/bench.py)
        self.counts: collections.Counter[str] = collections.Counter()
        # simfs's own -o values this mount runs with (OPTIONS_XATTR; set by simfs/daemon.py)
        self.mount_options: dict = {}
        # reads of read-only opens by the kernel itself (see _open_mode): set
        # by the mount (a read-only mount, or -o passthrough) when asked of
        # the kernel; off again if the kernel cannot do it at all
        self.passthrough = False
        # the kernel's io mode of each open inode, as the daemon answered it
        # (fs/fuse/iomode.c: never both at once): passthrough handles and the
        # one backing id they share, and handles in the caching mode
        self.pt_opens: dict[int, int] = {}    # inode -> its passthrough handles
        self.pt_backing: dict[int, int] = {}  # inode -> its backing id
        self.cached_opens: dict[int, int] = {}  # inode -> its caching-mode handles
        # Set by the mount while a live recount runs: sees every request before
        # and after (``before(op, args)``, ``after(op, mark)``), to tell whether
        # the recount can be made exact.
        self.watch = None
        # Set by the mount while a live recount holds the requests that may
        # change names or allocations (HELD): they wait on it; FORGETs
        # meanwhile are kept in ``deferred`` and done once it opens.
        self.gate = None
        self.deferred: list[tuple[int, int]] = []

    @property
    def acl(self) -> bool:
        """POSIX ACLs are enforced by the kernel on this mount (FUSE_POSIX_ACL
        negotiated): they pass through; otherwise they are refused."""
        ch = self.channel
        return ch is not None and bool(ch.negotiated & fusewire.kernel.POSIX_ACL)

    @property
    def mutations(self) -> int:
        """Calls of MUTATING handlers so far."""
        counts = self.counts
        return sum(counts[op] for op in MUTATING)

    # ---- helpers -------------------------------------------------------------

    def _attrs(self, st: os.stat_result, ino: int | None = None) -> fusewire.EntryAttributes:
        return fusewire.EntryAttributes.from_stat(
            st, self.table.fuse_ino(st.st_ino) if ino is None else ino, TIMEOUT)

    def _room_for_a_handle(self, uid: int) -> None:
        """Every open file and directory holds one descriptor: refuse one more
        past the caller's share of the budget (``OpenShares``; the daemon keeps
        its own reserve besides)."""
        self.shares.check(uid)

    def _new_fh(self, h: Handle | DirHandle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = h
        self.shares.take(h.uid)
        return fh

    def _drop_fh(self, fh: int) -> Handle | DirHandle:
        h = self.handles.pop(fh)
        self.shares.give(h.uid)
        return h

    def _reconcile(self, inode: Inode, st: os.stat_result) -> None:
        """Charge the difference between what the inode allocates now and what
        was charged for it (a directory that grew, a truncate, blocks the
        backing filesystem allocated late).  What was already allocated is
        charged only as far as the hard limits allow: the rest waits in
        ``gapped`` until room comes back (``_settle_gaps``)."""
        inode.mode = st.st_mode
        new = st.st_blocks * 512
        q = self.quota
        if q is None or inode.freed:
            inode.space = new
            return
        delta = new - inode.space
        if delta > 0:
            delta = min(delta, q.room(inode.uid, inode.gid, soft=False))
        if delta:
            q.charge(inode.uid, inode.gid, delta)
            inode.space += delta
        if inode.space < new:
            self.gapped.add(inode)
        else:
            self.gapped.discard(inode)

    def _settle_gaps(self) -> None:
        """Charge what the hard limits left uncharged, now that room came back."""
        for inode in list(self.gapped):
            if self.table.inodes.get(inode.ino) is inode and not inode.freed:
                try:
                    st = os.fstat(inode.fd)
                except OSError:           # gone (ESTALE): nothing left to charge
                    self.gapped.discard(inode)
                    continue
                self._reconcile(inode, st)
            else:
                self.gapped.discard(inode)
        if self.held:
            for inode in [i for i in self.held
                          if i not in self.gapped and i not in self.unsettled]:
                self._unhold(inode)

    def _hold(self, inode: Inode) -> bool:
        """The kernel let go of ``inode``: if it holds blocks a hard limit left
        uncharged, keep it in the table (one reference of ours) so that they
        are charged once room comes back and a later unlink frees only what
        was charged; likewise while its allocation is unsettled (``sweep``).
        True if it is kept."""
        if inode in self.held:
            return False
        if inode in self.unsettled or (inode in self.gapped and len(self.held) < GAPS_HELD):
            self.held.add(inode)
            inode.lookups += 1
            return True
        return False

    def _unhold(self, inode: Inode) -> None:
        """Drop our reference to a held inode (its gap is charged, or it is
        gone); it leaves the table if the kernel holds it no more."""
        if inode in self.held:
            self.held.discard(inode)
            inode.lookups -= 1
            if (inode.lookups <= 0 and inode.opens <= 0
                    and self.table.inodes.get(inode.ino) is inode):
                self.table.drop(inode)
                self._dropped(inode)

    def _trim(self, fd: int, st: os.stat_result) -> bool:
        """Give back the blocks a file holds past its end (XFS's speculative
        preallocation), keeping its times.  True if there were any.  Only on
        XFS, and not in a file preallocated on purpose (fallocate with
        KEEP_SIZE: XFS marks it so, and keeps those blocks itself)."""
        if not self.xfs:
            return False
        end = -(-st.st_size // self.bsize) * self.bsize
        try:
            if lower.deliberate_prealloc(fd):
                return False
            if not lower.extents(fd, end):
                return False
            lower.punch(fd, end, st.st_blocks * 512 + self.bsize)
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        except OSError:           # no FIEMAP (tmpfs) or no hole punching
            return False
        return True

    def _exact(self, fd: int) -> bool:
        """On XFS, make a regular file allocate exactly what each write needs,
        inside the write (lower.exact_allocation): no speculative preallocation
        to charge now and see vanish later.  False for a file that cannot (it
        already maps extents): its writes are trimmed instead (Handle.trim)."""
        try:
            return lower.exact_allocation(fd, self.bsize)
        except OSError as e:
            log.warning("no exact allocation on XFS (%s): writes are trimmed", e)
            return False

    def _settle_file(self, fd: int, follow: bool) -> tuple[int, os.stat_result, bool]:
        """Make the backing filesystem allocate (or free) now what it would at
        writeback, and drop its preallocation past the end, so that what is
        charged stays true after the inode leaves the table.  Returns how many
        extents it maps, its stat, and whether that stat may still change
        (delayed blocks left, for ``sweep`` to settle).

        Its writeback is done and waited for when its extent map may change
        size then: more extents than the inode holds (ext4 adds extent-tree
        blocks at writeback, and frees one again when the completed I/O merges
        extents), or fewer but blocks beyond its data (an extent-tree block a
        truncate left, which the next writeback merges back into the inode).
        Delayed blocks left otherwise: ext4 may still allocate them in more
        pieces than the inode holds, and it takes them off its delayed count a
        moment before it adds them to ``st_blocks``, so a stat read while
        writeback allocates is short.  With ``follow`` such a file is returned
        as unsettled (``sweep`` charges it once they are allocated); without
        (a write near a limit, which must not wait for every block), a stat
        that shows it was read short (below the data), or may hide it (a
        block of extended attributes), is read again after the writeback."""
        st = os.fstat(fd)
        if self._trim(fd, st):
            st = os.fstat(fd)
        try:
            n = lower.extents(fd, 0)
            wait = n > EXTENTS_IN_INODE
            delayed = False
            if n and not wait:
                data, delayed, _ = lower.mapping(fd, n, self.bsize)
                st = os.fstat(fd)   # after the map: nothing delayed there, nothing in flight
                have = st.st_blocks * 512
                wait = have > data or (delayed and not follow and (
                    have < data or bool(os.listxattr(fd))))
            if wait:
                lower.start_writeback(fd, wait=True)
                st = os.fstat(fd)
                delayed = False
        except OSError:
            return 0, os.fstat(fd), False
        return n, st, delayed and follow

    def _unsettled(self, inode: Inode) -> None:
        """``inode`` was closed with delayed blocks: follow it until they are
        allocated (``sweep``)."""
        self.unsettled[inode] = time.monotonic()
        self.unsettled.move_to_end(inode)

    def _settled(self, inode: Inode) -> None:
        if self.unsettled.pop(inode, None) is not None and inode not in self.gapped:
            self._unhold(inode)

    async def sweep(self) -> None:
        """Charge what files closed with delayed blocks hold once the backing
        filesystem has allocated them (no delayed or unwritten extent left: a
        stat read then is exact, see ``_settle_file``); a file still unsettled
        SETTLE_AGE seconds after its close has its writeback done here, in a
        worker thread.  At most SWEEP_MAX files per call; run periodically
        by the mount (simfs/mount.py)."""
        now = time.monotonic()
        for inode, since in list(itertools.islice(self.unsettled.items(), SWEEP_MAX)):
            if inode.freed or self.table.inodes.get(inode.ino) is not inode:
                self._settled(inode)
                continue
            try:
                fd = lower.reopen(inode.fd, os.O_RDONLY | os.O_NOATIME)
            except OSError:           # gone, or not ours to open: nothing to follow
                self._settled(inode)
                continue
            try:
                if not lower.settled(fd, self.bsize):
                    if now - since < SETTLE_AGE:
                        continue
                    # the thread owns a duplicate: it stays valid (and is
                    # closed) even if this sweep is cancelled meanwhile
                    await in_thread(_writeback_and_close, os.dup(fd))
                    if inode.freed or self.unsettled.get(inode) != since:
                        continue      # gone, or closed again meanwhile
                self._reconcile(inode, os.fstat(fd))
                self._settled(inode)
            except OSError as e:
                log.warning("settling inode %d: %s", inode.ino, e)
                self._settled(inode)
            finally:
                os.close(fd)

    def settle_all(self) -> None:
        """At a clean stop: write back the backing filesystem and charge what
        every unsettled file holds then."""
        if not self.unsettled:
            return
        fd = lower.reopen(self.table.root.fd, os.O_RDONLY | os.O_DIRECTORY)
        try:
            lower.syncfs(fd)
        finally:
            os.close(fd)
        for inode in list(self.unsettled):
            if not inode.freed and self.table.inodes.get(inode.ino) is inode:
                try:
                    self._reconcile(inode, os.fstat(inode.fd))
                except OSError:
                    pass
            self._settled(inode)

    def refresh(self) -> None:
        """Re-read what every known inode allocates (after a recount: writes
        made while quota was off were not followed)."""
        for inode in list(self.table.inodes.values()):
            try:
                st = os.fstat(inode.fd)
            except OSError:           # gone (ESTALE): nothing to re-read
                continue
            inode.space, inode.uid, inode.gid = st.st_blocks * 512, st.st_uid, st.st_gid
        # the recount charged what they hold: no gap is left
        self.gapped.clear()
        self.lost_gaps = 0
        for inode in list(self.held):
            self._unhold(inode)

    def _reconcile_dir(self, parent: Inode) -> None:
        self._reconcile(parent, os.fstat(parent.fd))

    def _host_room(self) -> int:
        """Bytes non-root callers may still allocate on the backing filesystem:
        its f_bavail (root writes for them, so without this they would eat the
        blocks reserved for the host's root).  Read again at most every
        HOST_TTL seconds while far from the edge, before every call near it."""
        if self._host_avail < HOST_EDGE or time.monotonic() >= self._host_next:
            sv = os.fstatvfs(self.table.root.fd)
            self._host_avail = sv.f_bavail * sv.f_frsize
            self._host_next = time.monotonic() + HOST_TTL
        return self._host_avail

    def _host_check(self, ctx, amount: int) -> None:
        """ENOSPC for a non-root caller when ``amount`` bytes would not fit in
        the backing filesystem's f_bavail."""
        if ctx.uid != 0:
            if amount > self._host_room():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._host_avail -= amount

    def _reserve_dir(self, parent: Inode, ctx):
        """Before a call that adds a name to ``parent``: hold what the directory
        may grow by, for its owner (QuotaExceeded when that does not fit)."""
        self._host_check(ctx, self.dir_growth)
        return self._reserve(parent.uid, parent.gid, self.dir_growth)

    def _settle_dir(self, parent: Inode, res) -> None:
        """After it: charge what the directory really grew by."""
        self._release(res)
        before = parent.space
        self._reconcile_dir(parent)
        self.dir_growth = max(self.dir_growth, parent.space - before)

    def _new_owner(self, parent: Inode, ctx) -> tuple[int, int]:
        """uid, gid of a new node: the caller's, or the setgid parent's group."""
        pst = os.fstat(parent.fd)
        if pst.st_mode & stat.S_ISGID:
            return ctx.uid, pst.st_gid
        return ctx.uid, ctx.gid

    def _reserve(self, uid: int, gid: int, space: int = 0, inodes: int = 0):
        if self.quota is None:
            return None
        return self.quota.reserve(uid, gid, space, inodes)

    def _release(self, res) -> None:
        if res is not None and self.quota is not None:
            self.quota.release(res)

    def _make_node(self, parent: Inode, name: bytes, ctx, space: int,
                   make: Callable[[int, int], None]) -> tuple[Inode, os.stat_result]:
        """Reserve one inode (and ``space``), run ``make(uid, gid)`` which creates
        ``name`` in ``parent``, give it to the caller, commit what it took."""
        self.table.need_room()
        uid, gid = self._new_owner(parent, ctx)
        dres = self._reserve_dir(parent, ctx)
        try:
            res = self._reserve(uid, gid, space, 1)
        except BaseException:
            self._release(dres)
            raise
        try:
            make(uid, gid)
            try:
                os.chown(name, uid, gid, dir_fd=parent.fd, follow_symlinks=False)
                fd = lower.open_path(name, parent.fd)
            except BaseException:
                self._unmake(parent, name)
                raise
        except BaseException:
            self._release(res)
            self._release(dres)
            raise
        st = os.fstat(fd)
        inode = self.table.adopt(fd, st)
        if res is not None:
            self.quota.commit(res, st.st_blocks * 512, 1)
        inode.space, inode.uid, inode.gid = st.st_blocks * 512, st.st_uid, st.st_gid
        self._settle_dir(parent, dres)
        return inode, st

    @staticmethod
    def _unmake(parent: Inode, name: bytes) -> None:
        try:
            os.unlink(name, dir_fd=parent.fd)
        except IsADirectoryError:
            os.rmdir(name, dir_fd=parent.fd)
        except OSError:
            pass

    def _gone(self, st: os.stat_result) -> None:
        """A name whose inode (``st``, taken before) lost its last link.  An inode
        the kernel still holds (a lookup reference, an open handle) can be
        reopened through /proc/PID/fd: it stays charged until ``_dropped``."""
        inode = self.table.find(st.st_ino)
        if inode is None:
            if self.quota is not None:
                self.quota.free(st.st_uid, st.st_gid, st.st_blocks * 512, 1)
                if self.gapped:
                    self._settle_gaps()
            return
        inode.unlinked = True
        self.table.keep(inode)        # alive while the kernel can reach it
        self._unhold(inode)           # freed now if only we held it

    def _dropped(self, inode: Inode | None) -> None:
        """The kernel can no longer reach ``inode`` (left the table)."""
        if inode is not None:
            if inode in self.gapped and not inode.unlinked:
                self.lost_gaps += 1   # no longer followed (GAPS_HELD reached)
            self.gapped.discard(inode)
            self.held.discard(inode)
            self.unsettled.pop(inode, None)
            if inode.unlinked:
                self._free(inode)

    def _reused(self, inode: Inode) -> None:
        """The backing filesystem gave a dead inode's number to a new one: the
        dead one is settled now (the table then starts its record anew)."""
        self._free(inode)

    def _free(self, inode: Inode) -> None:
        """Give back what a gone inode held, once."""
        if not inode.freed:
            inode.freed = True
            if self.quota is not None:
                self.quota.free(inode.uid, inode.gid, inode.space, 1)
                if self.gapped:
                    self._settle_gaps()

    def _last_link(self, st: os.stat_result) -> bool:
        return stat.S_ISDIR(st.st_mode) or st.st_nlink <= 1

    # ---- the cap on inodes (InodeTable.max_inodes) ----------------------------

    def _prunable(self, inode: Inode) -> bool:
        """Whether the kernel may be asked to forget ``inode``: the table's own
        test (not the root, looked up, no open handle, not pinned, not
        unlinked) and no state of ours that needs it kept (held for a gap,
        unsettled, gapped, a passthrough handle)."""
        return (inode not in self.held and inode not in self.unsettled
                and inode not in self.gapped and inode.ino not in self.pt_opens)

    def _prune_soon(self) -> None:
        """The table went past its cap (from inside a handler): prune from the
        loop once this request is answered, never inside it."""
        if self.channel is None or not getattr(self.channel, "can_prune", False):
            # no PRUNE (pyfuse3, a kernel before 7.45): nothing to ask
            log.warning("%d inodes held, past maxinodes=%d: the kernel cannot be asked "
                        "to forget some (%s); the table holds what the kernel holds",
                        len(self.table.inodes) - 1, self.table.max_inodes,
                        "pyfuse3" if self.channel is None else
                        f"FUSE 7.{getattr(self.channel, 'minor', 0)}, PRUNE needs 7.45")
            return
        try:
            loop = asyncio.get_running_loop()
            delay = self._prune_next - time.monotonic()
            if delay > 0:
                loop.call_later(delay, self.prune)
            else:
                loop.call_soon(self.prune)
        except RuntimeError:      # trio: no timer here; a later lookup asks again
            if self._prune_next > time.monotonic():
                self.table.full = False
                return
            try:
                import trio
                trio.lowlevel.current_trio_token().run_sync_soon(self.prune)
            except Exception:
                self.table.full = False   # the mount's periodic check does it (Mount._prunes)

    def prune(self) -> int:
        """Ask the kernel to forget the least recently looked-up inodes we may
        let go of (``_prunable``), down to 1/16 below the cap, PRUNE_MAX at
        most per pass.  The kernel drops those it does not use and sends
        their FORGETs, which take them out of the table as any FORGET does
        (charged for good on the way: ``forget``); a later lookup of the same
        name adopts the same backing inode again (by its file handle, its
        number).  Returns how many were asked.  Run from the loop only."""
        table = self.table
        table.full = False
        channel = self.channel
        if channel is None or not getattr(channel, "can_prune", False):
            return 0
        n = table.over()
        if n <= 0:
            return 0
        # back off while the kernel lets nothing go (it uses every inode asked)
        if table.dropped == self._prune_dropped:
            self._prune_gap = min(self._prune_gap * 2, PRUNE_GAP_MAX)
        else:
            self._prune_gap = PRUNE_GAP
        self._prune_dropped = table.dropped
        self._prune_next = time.monotonic() + self._prune_gap
        ids = table.oldest(min(n, PRUNE_MAX), self._prunable)
        if not ids:
            return 0
        try:
            sent = channel.prune(ids)
        except OSError as e:
            if e.errno not in (errno.ENODEV, errno.ECONNABORTED, errno.EBADF):  # unmounted
                log.warning("asking the kernel to forget %d inodes failed: %s", len(ids), e)
            return 0
        table.pruned += sent
        log.debug("prune: %d inodes over, %d asked, next pass in %.3f s at the earliest",
                  n, sent, self._prune_gap)
        return sent

    def inodes_report(self) -> dict:
        t = self.table
        return {"inodes": len(t.inodes) - 1, "peak": t.peak, "max": t.max_inodes,
                "pruned": t.pruned, "held": len(self.held),
                "unsettled": len(self.unsettled), "descriptors": t.open_fds()}

    @staticmethod
    def _kill_privs(node: Inode, st: os.stat_result, caller: tuple[int, int, int] | None,
                    acl: bool = False, file_gid: int | None = None) -> None:
        """What a local filesystem does when a write, truncate or chown by
        someone without CAP_FSETID reaches a file (the kernel's kill flag
        says so: HANDLE_KILLPRIV_V2): set-user-ID goes, and set-group-ID when
        the file is group-executable or the caller (uid, gid, pid) is not in
        its group (``file_gid``: the group it had before a chown); an access
        ACL set by someone neither in the file's group nor CAP_FSETID drops
        set-group-ID (``acl``: the kernel's flag already says so).  The daemon
        runs as root (CAP_FSETID), so the backing filesystem keeps them: they
        are cleared here, by a chmod of the backing inode (``st``: its stat
        now).  ``security.capability`` needs nothing: the backing filesystem
        drops it at every write, truncate and chown, root's too, as it does
        locally."""
        mode = st.st_mode
        if acl:
            kill = mode & stat.S_ISGID
        elif stat.S_ISDIR(mode):          # (the kernel never asks: a directory keeps them)
            return
        else:
            kill = mode & stat.S_ISUID
            if mode & stat.S_ISGID:
                if mode & stat.S_IXGRP:
                    kill |= stat.S_ISGID
                elif caller is not None and caller[0] != 0:
                    # not group-executable (a locking mark): only a caller
                    # outside the file's group loses it (rare: /proc read here)
                    gid = st.st_gid if file_gid is None else file_gid
                    if caller[1] != gid and gid not in get_sup_groups(caller[2]):
                        kill |= stat.S_ISGID
        if kill and not stat.S_ISLNK(mode):
            os.chmod(lower.proc_path(node.fd), stat.S_IMODE(mode) & ~kill)
            node.mode = mode & ~kill

    def _acl_inherited(self, parent: Inode) -> bytes | None:
        """The default ACL of ``parent`` when ACLs are enforced, else None.  A
        node created there gets it from the backing filesystem (as its access
        ACL, and a directory as its default ACL too) with its mode masked by
        it instead of by the umask, as on a local filesystem: the daemon then
        creates with the caller's mode unmasked (the kernel sends it so:
        DONT_MASK) and keeps the mode the backing filesystem gave it."""
        if not self.acl:
            return None
        try:
            return os.getxattr(lower.proc_path(parent.fd), ACL_DEFAULT)
        except OSError:               # ENODATA: none; EOPNOTSUPP: no ACLs on the backing
            return None

    def _acl_cost(self, acl: bytes | None, directory: bool) -> int:
        """What inheriting default ACL ``acl`` may allocate: its blocks as an
        access ACL, and again as the default ACL of a directory."""
        if acl is None:
            return 0
        return self._xattr_cost(acl) * (2 if directory else 1)

    @staticmethod
    def _made_mode(inode: Inode, st: os.stat_result, made: list[int]) -> os.stat_result:
        """A node created under a default ACL keeps the mode the backing
        filesystem gave it (``made``), which giving it to its owner may have
        changed (a chown drops set-group-ID); the chmod sets the ACL's mask
        from the same group bits, so the ACL stays as it was inherited."""
        if made and stat.S_IMODE(st.st_mode) != stat.S_IMODE(made[0]):
            os.chmod(lower.proc_path(inode.fd), stat.S_IMODE(made[0]))
            st = os.fstat(inode.fd)
        return st

    # ---- lookup and attributes ---------------------------------------------

    @errno_boundary
    def lookup(self, parent_inode, name, ctx):
        parent = self.table.get(parent_inode)
        if name == b".." and parent_inode != ROOT:
            fd = lower.open_path(b"..", parent.fd)
            st = os.fstat(fd)
            inode = self.table.adopt(fd, st)
            return self._attrs(st, inode.ino)
        try:
            inode, st = self.table.lookup(parent, name)
        except FileNotFoundError:
            # A negative entry the kernel caches for TIMEOUT: a name created
            # through the mount replaces it at once.
            a = fusewire.EntryAttributes()
            a.st_ino = 0
            a.entry_timeout = TIMEOUT
            return a
        return self._attrs(st, inode.ino)

    def forget(self, inode_list):
        self.counts["forget"] += 1
        if self.gate is not None:
            self.deferred.extend(inode_list)
            return
        self.forget_now(inode_list)

    def forget_now(self, inode_list) -> None:
        for ino, n in inode_list:
            try:
                node = self.table.inodes.get(ino)
                if (node is not None and ino != ROOT and not node.unlinked
                        and node.lookups <= n and node.opens <= 0):
                    # leaving the table: charge what it holds now, for good
                    # (or keep it, if a hard limit left some of it uncharged)
                    self._reconcile(node, os.fstat(node.fd))
                    self._hold(node)
                self._dropped(self.table.forget(ino, n))
            except Exception:
                log.exception("forget of inode %d failed", ino)

    @errno_boundary
    def getattr(self, inode, ctx):
        node = self.table.get(inode)
        return self._attrs(os.fstat(node.fd), node.ino)

    @errno_boundary
    def setattr(self, inode, attr, fields, fh, ctx):
        node = self.table.get(inode)
        h = self.handles.get(fh) if fh is not None else None
        file_gid = None
        if fields.update_uid or fields.update_gid:
            st = os.fstat(node.fd)
            file_gid = st.st_gid
            uid = attr.st_uid if fields.update_uid else st.st_uid
            gid = attr.st_gid if fields.update_gid else st.st_gid
            if self.quota is not None and not node.freed:
                self.quota.transfer(node.uid, node.gid, uid, gid, node.space, 1)
            try:
                lower.fchown_path(node.fd, uid if fields.update_uid else -1,
                                  gid if fields.update_gid else -1)
            except BaseException:
                if self.quota is not None and not node.freed:
                    self.quota.transfer(uid, gid, node.uid, node.gid, node.space, 1,
                                        force=True)
                raise
            node.uid, node.gid = uid, gid
        if fields.update_mode:
            if stat.S_ISLNK(node.mode):
                raise OSError(errno.EOPNOTSUPP, "chmod of a symlink")
            os.chmod(lower.proc_path(node.fd), stat.S_IMODE(attr.st_mode))
        if fields.update_size:
            if isinstance(h, Handle):
                os.ftruncate(h.fd, attr.st_size)
            else:
                fd = lower.reopen(node.fd, os.O_WRONLY)
                try:
                    os.ftruncate(fd, attr.st_size)
                finally:
                    os.close(fd)
        if getattr(fields, "kill_suidgid", False) and not fields.update_mode:
            # a truncate by someone without CAP_FSETID, or a chown
            self._kill_privs(node, os.fstat(node.fd), (ctx.uid, ctx.gid, ctx.pid),
                             file_gid=file_gid)
        if fields.update_atime or fields.update_mtime:
            lower.utimens_path(
                node.fd,
                attr.st_atime_ns if fields.update_atime else None,
                attr.st_mtime_ns if fields.update_mtime else None)
        st = os.fstat(node.fd)
        if fields.update_size:
            self._reconcile(node, st)
            if self.gapped:
                self._settle_gaps()
        return self._attrs(st, node.ino)

    @errno_boundary
    def readlink(self, inode, ctx):
        node = self.table.get(inode)
        return lower.readlink_path(node.fd)

    # ---- creating nodes ----------------------------------------------------

    @errno_boundary
    def mknod(self, parent_inode, name, mode, rdev, ctx):
        parent = self.table.get(parent_inode)
        acl = self._acl_inherited(parent)
        perm = mode if acl is not None else mode & ~ctx.umask
        made: list[int] = []

        def make(uid: int, gid: int) -> None:
            os.mknod(name, perm, rdev, dir_fd=parent.fd)
            if acl is not None:
                made.append(os.stat(name, dir_fd=parent.fd, follow_symlinks=False).st_mode)
        inode, st = self._make_node(parent, name, ctx, self._acl_cost(acl, False), make)
        return self._attrs(self._made_mode(inode, st, made), inode.ino)

    @errno_boundary
    def mkdir(self, parent_inode, name, mode, ctx):
        parent = self.table.get(parent_inode)
        acl = self._acl_inherited(parent)
        perm = stat.S_IMODE(mode) if acl is not None else stat.S_IMODE(mode) & ~ctx.umask
        made: list[int] = []

        def make(uid: int, gid: int) -> None:
            os.mkdir(name, perm, dir_fd=parent.fd)
            if acl is not None:
                made.append(os.stat(name, dir_fd=parent.fd, follow_symlinks=False).st_mode)
        inode, st = self._make_node(parent, name, ctx,
                                    self.bsize + self._acl_cost(acl, True), make)
        if made:
            return self._attrs(self._made_mode(inode, st, made), inode.ino)
        # a new directory under a setgid one inherits the bit (parent's mode is cached)
        want = perm | (stat.S_ISGID if parent.mode & stat.S_ISGID else 0)
        if stat.S_IMODE(st.st_mode) != want:
            os.chmod(lower.proc_path(inode.fd), want)
            st = os.fstat(inode.fd)
        return self._attrs(st, inode.ino)

    @errno_boundary
    def symlink(self, parent_inode, name, target, ctx):
        parent = self.table.get(parent_inode)
        space = self.bsize if len(target) >= 60 else 0
        inode, st = self._make_node(
            parent, name, ctx, space,
            lambda uid, gid: os.symlink(target, name, dir_fd=parent.fd))
        return self._attrs(st, inode.ino)

    @errno_boundary
    def create(self, parent_inode, name, mode, flags, ctx):
        parent = self.table.get(parent_inode)
        self._room_for_a_handle(ctx.uid)
        # (ctx.kill_suidgid, O_TRUNC by someone without CAP_FSETID, has nothing
        # to clear here: the file is new, and locally O_TRUNC truncates only
        # a file that was there)
        acl = self._acl_inherited(parent)
        perm = stat.S_IMODE(mode) if acl is not None else stat.S_IMODE(mode) & ~ctx.umask
        fds: list[int] = []
        made: list[int] = []

        def make(uid: int, gid: int) -> None:
            fl = (flags & ~(os.O_DIRECT | os.O_NOFOLLOW)) | os.O_CREAT | os.O_EXCL
            fds.append(os.open(name, fl | os.O_NOFOLLOW | os.O_CLOEXEC, perm,
                               dir_fd=parent.fd))
            if acl is not None:
                made.append(os.fstat(fds[0]).st_mode)
        try:
            inode, st = self._make_node(parent, name, ctx, self._acl_cost(acl, False), make)
            if made:
                st = self._made_mode(inode, st, made)
            elif stat.S_IMODE(st.st_mode) != perm:
                os.chmod(lower.proc_path(inode.fd), perm)
                st = os.fstat(inode.fd)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        inode.opens += 1
        h = Handle(fds[0], inode, ctx.uid != 0, uid=ctx.uid, gid=ctx.gid, pid=ctx.pid)
        fh = self._new_fh(h)
        if self.xfs:
            h.trim = not self._exact(fds[0])
        fi = self._file_info(fh, flags)
        if not fi.direct_io:
            self._cached(h)
        return fi, self._attrs(st, inode.ino)

    @errno_boundary
    def tmpfile(self, parent_inode, mode, flags, ctx):
        """O_TMPFILE: a regular file with no name in the parent's filesystem,
        charged (one inode, and what it allocates) from its creation like any
        file; it is freed at its last close unless linkat gives it a name
        first (``link``)."""
        parent = self.table.get(parent_inode)
        self._room_for_a_handle(ctx.uid)
        self.table.need_room()
        acl = self._acl_inherited(parent)
        perm = stat.S_IMODE(mode) if acl is not None else stat.S_IMODE(mode) & ~ctx.umask
        uid, gid = self._new_owner(parent, ctx)
        res = self._reserve(uid, gid, self._acl_cost(acl, False), 1)
        try:
            dfd = lower.reopen(parent.fd, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fl = flags & ~(os.O_CREAT | os.O_EXCL | os.O_DIRECT | os.O_NOFOLLOW
                               | os.O_TMPFILE)
                fd = os.open(".", fl | os.O_TMPFILE | os.O_CLOEXEC, perm, dir_fd=dfd)
            finally:
                os.close(dfd)
            try:
                if acl is not None:       # keep the mode the default ACL gave it
                    perm = stat.S_IMODE(os.fstat(fd).st_mode)
                os.fchown(fd, uid, gid)
                if stat.S_IMODE(os.fstat(fd).st_mode) != perm:
                    os.fchmod(fd, perm)
                pfd = lower.reopen(fd, os.O_PATH)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            self._release(res)
            raise
        st = os.fstat(pfd)
        inode = self.table.adopt(pfd, st)
        if res is not None:
            self.quota.commit(res, st.st_blocks * 512, 1)
        inode.space, inode.uid, inode.gid = st.st_blocks * 512, st.st_uid, st.st_gid
        inode.unlinked = True         # no name: freed when the kernel lets go of it
        self.table.keep(inode)
        inode.opens += 1
        h = Handle(fd, inode, ctx.uid != 0, uid=ctx.uid, gid=ctx.gid, pid=ctx.pid)
        fh = self._new_fh(h)
        if self.xfs:
            h.trim = not self._exact(fd)
        fi = self._file_info(fh, flags)
        if not fi.direct_io:
            self._cached(h)
        return fi, self._attrs(st, inode.ino)

    @errno_boundary
    def link(self, inode, new_parent_inode, new_name, ctx):
        node = self.table.get(inode)
        parent = self.table.get(new_parent_inode)
        dres = self._reserve_dir(parent, ctx)
        try:
            lower.link_path(node.fd, parent.fd, new_name)
        except BaseException:
            self._release(dres)
            raise
        st = os.fstat(node.fd)
        node.lookups += 1
        node.unlinked = False         # an O_TMPFILE file (or one unlinked while open) named again
        self._settle_dir(parent, dres)
        return self._attrs(st, node.ino)

    # ---- removing and renaming --------------------------------------------

    @errno_boundary
    def unlink(self, parent_inode, name, ctx):
        parent = self.table.get(parent_inode)
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        os.unlink(name, dir_fd=parent.fd)
        if self._last_link(st):
            self._gone(st)
        self._reconcile_dir(parent)

    @errno_boundary
    def rmdir(self, parent_inode, name, ctx):
        parent = self.table.get(parent_inode)
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        os.rmdir(name, dir_fd=parent.fd)
        self._gone(st)
        self._reconcile_dir(parent)

    @errno_boundary
    def rename(self, parent_inode_old, name_old, parent_inode_new, name_new,
                     flags, ctx):
        old = self.table.get(parent_inode_old)
        new = self.table.get(parent_inode_new)
        victim = None
        adds = not flags & lower.RENAME_EXCHANGE    # a name new to ``new``
        if adds and not flags & lower.RENAME_NOREPLACE:
            try:
                victim = os.stat(name_new, dir_fd=new.fd, follow_symlinks=False)
                adds = False          # the entry is replaced in place
                src = os.stat(name_old, dir_fd=old.fd, follow_symlinks=False)
                if (src.st_ino, src.st_dev) == (victim.st_ino, victim.st_dev):
                    victim = None     # two links of one inode: rename does nothing
            except FileNotFoundError:
                pass
        dres = self._reserve_dir(new, ctx) if adds else None
        wres = None
        try:
            if flags & lower.RENAME_WHITEOUT:
                # the whiteout left at the old name is a new inode of the caller's
                owner = self._new_owner(old, ctx)
                wres = self._reserve(*owner, 0, 1)
            lower.renameat2(old.fd, name_old, new.fd, name_new, flags)
        except BaseException:
            self._release(wres)
            self._release(dres)
            raise
        if flags & lower.RENAME_WHITEOUT:
            self._whiteout(old, name_old, owner, wres)
        if victim is not None and self._last_link(victim):
            self._gone(victim)
        self._settle_dir(new, dres)
        if new is not old:
            self._reconcile_dir(old)

    def _whiteout(self, parent: Inode, name: bytes, owner: tuple[int, int], res) -> None:
        """Give the whiteout a rename left at ``name`` (made by the backing
        filesystem as root) to ``owner`` and charge it as such."""
        try:
            fd = lower.open_path(name, parent.fd)
        except OSError as e:
            self._release(res)
            log.warning("whiteout %r not found after the rename: %s", name, e)
            return
        try:
            try:
                lower.fchown_path(fd, *owner)
            except OSError as e:
                log.warning("whiteout %r left owned by root: %s", name, e)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self._release(res)
        if self.quota is not None:
            self.quota.charge(st.st_uid, st.st_gid, st.st_blocks * 512, 1)

    # ---- files ---------------------------------------------------------------

    def _file_info(self, fh: int, flags: int) -> fusewire.FileInfo:
        fi = fusewire.FileInfo(fh=fh)
        if flags & os.O_DIRECT:
            fi.direct_io = True
        else:
            fi.keep_cache = True
        return fi

    @errno_boundary
    def open(self, inode, flags, ctx):
        node = self.table.get(inode)
        pt = self._open_mode(node, flags)      # may refuse: before anything is done
        # O_NOFOLLOW would refuse the /proc/self/fd magic link itself (ELOOP):
        # the inode is already resolved without following anything.
        fl = flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT | os.O_NOFOLLOW)
        self._room_for_a_handle(ctx.uid)
        fd = lower.reopen(node.fd, fl)
        node.opens += 1
        h = Handle(fd, node, ctx.uid != 0, uid=ctx.uid, gid=ctx.gid, pid=ctx.pid)
        fh = self._new_fh(h)
        if self.xfs and flags & os.O_ACCMODE != os.O_RDONLY and stat.S_ISREG(node.mode):
            h.trim = not self._exact(fd)
        if flags & os.O_TRUNC:
            st = os.fstat(fd)
            self._reconcile(node, st)
            if getattr(ctx, "kill_suidgid", False):   # by someone without CAP_FSETID
                self._kill_privs(node, st, (ctx.uid, ctx.gid, ctx.pid))
        fi = self._file_info(fh, flags)
        if pt:
            fi.backing_id = self._backing_for(node, h)
        if not h.backing and not fi.direct_io:
            self._cached(h)
        return fi

    def _open_mode(self, node: Inode, flags: int) -> bool:
        """Whether an open is answered passthrough (its reads and mmaps then go
        from the kernel to the backing file, without the daemon).

        The kernel keeps one io mode per inode (fs/fuse/iomode.c, 6.18): while
        a passthrough open of it exists, an open answered without
        FOPEN_PASSTHROUGH fails (EIO, "FOPEN_PASSTHROUGH expected"), FOPEN_DIRECT_IO
        or not; while an open in the caching mode exists (no DIRECT_IO, no
        PASSTHROUGH; or a direct_io file with a shared mmap), a passthrough open
        fails.  An open for writing may never be passthrough: its writes must
        be reserved and charged here, and even with FOPEN_DIRECT_IO (reads and
        writes to the daemon) a passthrough file's mmap goes to the backing
        file, where a shared writable mapping would fill holes uncharged.  So:
        a read-only open is passthrough unless the inode has a caching-mode
        open (then it is one itself, as without passthrough); an open for
        writing (or O_TRUNC) is refused with ETXTBSY while the inode has a
        passthrough open, as for a running program, and is otherwise a
        caching one.  Decided and answered in one plain call (no await), so
        the daemon's counts and the kernel's modes never disagree: the kernel
        leaves a mode before it sends RELEASE, so the counts can only lag on
        the side of the refusal."""
        if not self.passthrough or not stat.S_ISREG(node.mode):
            return False
        if flags & os.O_ACCMODE == os.O_RDONLY and not flags & os.O_TRUNC:
            return not self.cached_opens.get(node.ino)
        if self.pt_opens.get(node.ino):
            raise OSError(errno.ETXTBSY, "open for reading by passthrough")
        return False

    def _cached(self, h: Handle) -> None:
        h.cached = True
        ino = h.inode.ino
        self.cached_opens[ino] = self.cached_opens.get(ino, 0) + 1

    def _backing_for(self, node: Inode, h: Handle) -> int:
        """The backing id of ``node`` for one more passthrough handle ``h``:
        one per inode (the kernel refuses a second backing file for an inode,
        EBUSY), registered at its first passthrough open with that open's
        descriptor and closed at its last release.  0 if the kernel refuses
        it: this file is then served by the daemon (per file: a backing it
        cannot stack on, ELOOP; or passthrough off altogether)."""
        ino = node.ino
        bid = self.pt_backing.get(ino, 0)
        if not bid:
            channel = self.channel
            if channel is None or not channel.negotiated & fusewire.kernel.PASSTHROUGH:
                self.passthrough = False          # not offered (or another binding)
                return 0
            try:
                bid = channel.backing_open(h.fd)
            except OSError as e:
                log.warning("passthrough refused by the kernel (%s): reads go through "
                            "the daemon", e.strerror or e)
                if e.errno in (errno.EPERM, errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS):
                    self.passthrough = False      # never, on this kernel or device
                return 0
            self.pt_backing[ino] = bid
        h.backing = bid
        self.pt_opens[ino] = self.pt_opens.get(ino, 0) + 1
        return bid

    @errno_boundary
    def read(self, fh, off, size):
        """What the backing page cache holds is answered here, at once; a read
        of READ_NOWAIT bytes or more that must wait for the disk returns an
        awaitable instead (the rest is read in a worker thread), which the
        request loop awaits, so a cold read does not stop the loop and
        readahead's requests reach the disk together."""
        fd = self.handles[fh].fd
        if size < READ_NOWAIT or not self._nowait:
            return os.pread(fd, size, off)
        buf = bytearray(size)
        try:
            n = os.preadv(fd, (buf,), off, os.RWF_NOWAIT)
            if n == size or n == 0:       # all of it, or the end of the file
                return memoryview(buf)[:n]
        except BlockingIOError:
            n = 0
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._nowait = False          # the backing filesystem cannot
            n = 0
        return self._read_rest(fd, buf, n, off)

    @staticmethod
    async def _read_rest(fd: int, buf: bytearray, n: int, off: int):
        """The part of a read the page cache could not serve, from a worker
        thread (past the errno boundary: its own errors become their errno)."""
        try:
            m = await in_thread(os.preadv, fd, (memoryview(buf)[n:],), off + n)
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None
        return memoryview(buf)[:n + m]

    @errno_boundary
    def write(self, fh, off, buf, kill_suidgid: bool = False):
        h = self.handles[fh]
        q = self.quota
        node = h.inode
        n = len(buf)
        want = lower.span(off, n, self.bsize)
        host = self._host_room() if h.user else INFINITE
        if q is None:
            if want > host:
                n, want = self._fit(h.fd, off, n, host, errno.ENOSPC)
            written = os.pwrite(h.fd, buf if n == len(buf) else buf[:n], off)
            if h.user:
                self._host_avail -= want
            if kill_suidgid:              # a writer without CAP_FSETID
                self._kill_privs(node, os.fstat(h.fd), (h.uid, h.gid, h.pid))
            return written
        uid, gid = node.uid, node.gid
        res = None
        tree = False
        if want <= host:
            try:
                # far from every limit: held with SETTLE_ZONE to spare, for
                # blocks the backing filesystem may allocate late (all released
                # at the commit)
                res = q.reserve(uid, gid, want + SETTLE_ZONE)
            except QuotaExceeded:
                pass
        if res is None:
            # Slow path, near a limit: first settle this file (its
            # preallocation past the end given back, its late blocks allocated
            # and charged), then only the blocks not yet allocated cost
            # anything; write the longest prefix that fits (a short write), or
            # refuse.
            extents, st, _ = self._settle_file(h.fd, follow=False)
            self._reconcile(node, st)
            room = q.room(uid, gid)
            tree = extents >= EXTENTS_IN_INODE
            if tree:
                # a new extent may need a block of the extent tree: reserved
                # too, and allocated before the commit (writeback below)
                room = max(0, room - self.bsize)
            try:
                n, want = self._fit(h.fd, off, n, min(room, host),
                                    errno.ENOSPC if host < room else errno.EDQUOT)
            except OSError as e:
                if e.errno != errno.EDQUOT:
                    raise
                # a refusal the caller sees, reported with its request size
                raise q.exceeded(uid, gid, want, request=len(buf)) from None
            res = q.reserve(uid, gid, want + (self.bsize if tree else 0), request=len(buf))
        h.wrote = True
        try:
            written = os.pwrite(h.fd, buf if n == len(buf) else buf[:n], off)
            if tree:
                _writeback(h.fd)
            st = os.fstat(h.fd)
            if h.trim and self._trim(h.fd, st):
                st = os.fstat(h.fd)
        except BaseException:
            q.release(res)
            raise
        delta = st.st_blocks * 512 - node.space
        if h.user:
            self._host_avail -= max(0, delta)
        if delta <= res.space:
            q.commit(res, delta)
            node.space += delta
        else:
            # more than the data (preallocation, a gap left before): charged
            # up to the hard limits, never over them
            q.release(res)
            self._reconcile(node, st)
        if kill_suidgid:                  # a writer without CAP_FSETID
            self._kill_privs(node, st, (h.uid, h.gid, h.pid))
        return written

    def _fit(self, fd: int, off: int, n: int, room: float, err: int) -> tuple[int, int]:
        """The longest prefix of a write of ``n`` bytes at ``off`` whose new
        blocks fit in ``room``, and what they cost; ``err`` when none does."""
        need = lower.unallocated(fd, off, off + n, self.bsize)
        cost = sum(e - s for s, e in need)
        if cost > room:
            n = lower.fit_prefix(need, off, n, int(room), self.bsize)
            if n <= 0:
                raise OSError(err, os.strerror(err))
            cost = sum(e - s for s, e in lower.unallocated(fd, off, off + n, self.bsize))
        return n, cost

    def _map_blocks(self, fd: int, holes: list[tuple[int, int]], splits: int) -> int:
        """What a call filling ``holes`` of ``fd`` and splitting ``splits``
        of its extents (a punch or a zero range splits at each end) may
        allocate for the file's extent map: a block once it maps more extents
        than its inode holds (ext4's extent tree, XFS's extent btree), one
        more per 300 extents.  Nothing where there is no FIEMAP (tmpfs has no
        such blocks)."""
        try:
            n = lower.extents(fd, 0)
        except OSError:
            return 0
        most = EXTENT_MAX * self.bsize
        n += splits + sum(-(-(e - s) // most) for s, e in holes)
        return 0 if n <= EXTENTS_IN_INODE else self.bsize * (1 + n // 300)

    @errno_boundary
    def fallocate(self, fh, mode, off, length):
        """fallocate(2) with its modes, at both quota levels.  The blocks of
        the range no extent maps yet (plus what the extent map may grow by)
        are reserved before the call: EDQUOT (or ENOSPC at the host's root
        reserve, for a non-root caller) before anything is allocated.  What
        the file really gained or lost (st_blocks after minus before) is
        committed after: a punch or a collapse credits.  A mode the backing
        filesystem lacks fails with its own EOPNOTSUPP, charging nothing."""
        h = self.handles[fh]
        node = h.inode
        q = self.quota
        if off < 0 or length <= 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        self._reconcile(node, os.fstat(h.fd))     # late blocks first: the commit is this call's
        if mode & (lower.FALLOC_FL_PUNCH_HOLE | lower.FALLOC_FL_COLLAPSE_RANGE
                   | lower.FALLOC_FL_INSERT_RANGE):
            new = []                              # no data block allocated
        else:                                     # 0, KEEP_SIZE, ZERO_RANGE, UNSHARE
            new = lower.unallocated(h.fd, off, off + length, self.bsize)
        splits = 2 if mode & (lower.FALLOC_FL_PUNCH_HOLE | lower.FALLOC_FL_ZERO_RANGE
                              | lower.FALLOC_FL_COLLAPSE_RANGE
                              | lower.FALLOC_FL_INSERT_RANGE) else 0
        need = sum(e - s for s, e in new) + self._map_blocks(h.fd, new, splits)
        if h.user:
            if need > self._host_room():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        try:
            res = self._reserve(node.uid, node.gid, need)
        except QuotaExceeded:
            if not mode & (lower.FALLOC_FL_PUNCH_HOLE | lower.FALLOC_FL_COLLAPSE_RANGE):
                raise
            # a call that frees is never refused (as ext4 lets a punch take an
            # extent block past a quota): a block its extent map may take
            # anyway is charged after, up to the hard limits
            res = None
        h.wrote = True
        try:
            lower.fallocate(h.fd, mode, off, length)
            st = os.fstat(h.fd)
        except BaseException:
            self._release(res)
            # a backing failure part way (ENOSPC) may leave blocks allocated
            self._reconcile(node, os.fstat(h.fd))
            raise
        delta = st.st_blocks * 512 - node.space
        if h.user:
            self._host_avail -= max(0, delta)
        if res is not None and delta <= res.space:
            q.commit(res, delta)
            node.space += delta
        else:
            # more than reserved (an extent map that grew more): charged up
            # to the hard limits, never over them (the rest waits in gapped)
            self._release(res)
            self._reconcile(node, st)
        if delta < 0 and self.gapped:
            self._settle_gaps()

    @errno_boundary
    def lseek(self, fh, off, whence):
        """SEEK_DATA/SEEK_HOLE answered from the backing file (ENXIO past
        its data or end passes through); the others too, though the kernel
        handles them itself.  The backing descriptor's own position is
        never used (reads and writes are positioned)."""
        return os.lseek(self.handles[fh].fd, off, whence)

    @errno_boundary
    def copy_file_range(self, fh_in, off_in, fh_out, off_out, length, flags):
        """copy_file_range between two files of the mount, by the backing
        filesystem (a reflink where it can, else an in-kernel copy), charged
        as a write of what the destination really gains (st_blocks after
        minus before; shared extents count as the backing filesystem counts
        them).  Reserved before like a write: far from every limit the
        range's span, near one the blocks the destination range does not
        map yet; a short copy when only a prefix fits, EDQUOT when nothing
        does."""
        if flags:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        src = self.handles[fh_in]
        h = self.handles[fh_out]
        node = h.inode
        q = self.quota
        # nothing is copied past the end of the source
        n = max(0, min(length, os.fstat(src.fd).st_size - off_in))
        if n == 0:
            return os.copy_file_range(src.fd, h.fd, 0, off_in, off_out)
        want = lower.span(off_out, n, self.bsize)
        host = self._host_room() if h.user else INFINITE
        res = None
        tree = False
        if q is not None:
            try:
                if want <= host:
                    res = q.reserve(node.uid, node.gid, want + SETTLE_ZONE)
            except QuotaExceeded:
                pass
            if res is None:
                # near a limit: settle the file, then only what it does not map
                # yet costs anything (as write's slow path)
                extents, st, _ = self._settle_file(h.fd, follow=False)
                self._reconcile(node, st)
                room = q.room(node.uid, node.gid)
                tree = extents >= EXTENTS_IN_INODE
                if tree:
                    room = max(0, room - self.bsize)
                n, want = self._fit(h.fd, off_out, n, min(room, host),
                                    errno.ENOSPC if host < room else errno.EDQUOT)
                res = q.reserve(node.uid, node.gid, want + (self.bsize if tree else 0))
        elif want > host:
            n, want = self._fit(h.fd, off_out, n, host, errno.ENOSPC)
        h.wrote = True
        try:
            copied = os.copy_file_range(src.fd, h.fd, n, off_in, off_out)
            if tree:
                _writeback(h.fd)
            st = os.fstat(h.fd)
            if h.trim and self._trim(h.fd, st):
                st = os.fstat(h.fd)
        except BaseException:
            self._release(res)
            self._reconcile(node, os.fstat(h.fd))
            raise
        delta = st.st_blocks * 512 - node.space
        if h.user:
            self._host_avail -= max(0, delta)
        if res is not None and delta <= res.space:
            q.commit(res, delta)
            node.space += delta
        else:
            self._release(res)
            self._reconcile(node, st)
        return copied

    @errno_boundary
    def flush(self, fh):
        # Nothing to do at close(2) (writes are never deferred and a handle's
        # usage is reconciled at release): ENOSYS makes the kernel stop
        # sending FLUSH for this mount, one round trip less per close(2).
        raise FUSEError(errno.ENOSYS)

    @errno_boundary
    def release(self, fh):
        h = self._drop_fh(fh)
        node = h.inode
        try:
            if node.opens == 1:
                pending = False
                if h.wrote:
                    # inline, as the writeback it starts always was (awaited,
                    # an unmount could abort the request before its reply)
                    _, st, pending = self._settle_file(
                        h.fd, follow=self.quota is not None
                        and len(self.unsettled) < UNSETTLED_MAX)
                else:
                    st = os.fstat(h.fd)
                self._reconcile(node, st)
                if pending:
                    self._unsettled(node)
        finally:
            if h.backing:
                left = self.pt_opens.pop(node.ino) - 1
                if left:
                    self.pt_opens[node.ino] = left
                else:                         # the last one: its backing id goes
                    bid = self.pt_backing.pop(node.ino)
                    try:
                        self.channel.backing_close(bid)
                    except OSError as e:
                        log.warning("closing passthrough backing id %d: %s", bid, e)
            elif h.cached:
                left = self.cached_opens.pop(node.ino) - 1
                if left:
                    self.cached_opens[node.ino] = left
            os.close(h.fd)
            node.opens -= 1
        if node.opens == 0 and node.lookups <= 0 and not self._hold(node):
            self.table.drop(node)
            self._dropped(node)

    @errno_boundary
    async def fsync(self, fh, datasync):
        h = self.handles[fh]
        await in_thread(os.fdatasync if datasync else os.fsync, h.fd)
        self._reconcile(h.inode, os.fstat(h.fd))

    # ---- directories ---------------------------------------------------------

    @errno_boundary
    def opendir(self, inode, ctx):
        node = self.table.get(inode)
        self._room_for_a_handle(ctx.uid)
        fd = lower.reopen(node.fd, os.O_RDONLY | os.O_DIRECTORY)
        return self._new_fh(DirHandle(node, fd, uid=ctx.uid))

    @errno_boundary
    def readdir(self, fh, start_id, token):
        """Stream the backing directory: each entry's next offset is the backing
        filesystem's own cookie (d_off), so a listing resumes where the kernel
        asks (lseek, as seekdir does) and stays correct while entries come and
        go.  ``.`` and ``..`` come first with offsets 1 and 2 (the root's ``..``
        is the root itself); the backing ones are skipped.  Each entry is
        lookup-counted (readdirplus) once the kernel has taken it."""
        h = self.handles[fh]
        if start_id < 2:
            for i, name in ((0, b"."), (1, b"..")):
                if start_id > i:
                    continue
                if name == b"." or h.inode.ino == ROOT:
                    st = os.fstat(h.fd)
                else:
                    st = os.stat(b"..", dir_fd=h.fd, follow_symlinks=False)
                if not readdir_reply(token, name, self._attrs(st), i + 1):
                    return
            start_id = 2
        if start_id != h.off:
            os.lseek(h.fd, 0 if start_id == 2 else start_id, os.SEEK_SET)
            h.buf, h.pos, h.off = b"", 0, start_id
        table = self.table
        emitted = False
        while True:
            if h.pos >= len(h.buf):
                h.buf, h.pos = lower.getdents(h.fd), 0
                if not h.buf:
                    return
            d_ino, d_off, reclen, name = lower.dirent(h.buf, h.pos)
            if name == b"." or name == b"..":
                h.pos += reclen
                continue
            fd = -1
            try:
                st = os.stat(name, dir_fd=h.fd, follow_symlinks=False)
                inode = table.find(st.st_ino)
                if inode is None or table.stale(inode):
                    if not table.has_room():
                        if emitted:
                            return
                        raise OSError(errno.ENFILE, "inode descriptor budget exhausted")
                    fd = lower.open_path(name, h.fd)
                    st = os.fstat(fd)
            except FileNotFoundError:
                h.pos += reclen             # gone since getdents saw it
                continue
            if st.st_dev != table.dev:      # a mount point: hidden
                if fd >= 0:
                    os.close(fd)
                h.pos += reclen
                continue
            if not readdir_reply(token, name, self._attrs(st), d_off):
                if fd >= 0:
                    os.close(fd)
                return
            emitted = True
            h.pos += reclen
            h.off = d_off
            if fd >= 0:
                table.adopt(fd, st)
            else:
                inode.lookups += 1
                table.recent(inode)

    @errno_boundary
    def releasedir(self, fh):
        os.close(self._drop_fh(fh).fd)

    @errno_boundary
    async def fsyncdir(self, fh, datasync):
        h = self.handles[fh]
        await in_thread(os.fdatasync if datasync else os.fsync, h.fd)

    # ---- filesystem ----------------------------------------------------------

    @errno_boundary
    def statfs(self, ctx):
        lst = os.statvfs(self.table.root.fd)
        q = self.quota
        if q is None:
            f = host_figures(lst)
        else:
            l1 = q.state.level1
            f = quota_figures(lst, l1.space.soft, l1.space.usage, l1.inodes.soft,
                              l1.inodes.usage)
        out = fusewire.StatvfsData()
        (out.f_bsize, out.f_frsize, out.f_blocks, out.f_bfree, out.f_bavail,
         out.f_files, out.f_ffree, out.f_favail, out.f_namemax) = f
        return out

    @errno_boundary
    def access(self, inode, mode, ctx):
        node = self.table.get(inode)
        st = os.fstat(node.fd)
        if ctx.uid == 0:
            return not (mode & os.X_OK) or bool(st.st_mode & 0o111) or stat.S_ISDIR(st.st_mode)
        if st.st_uid == ctx.uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid == ctx.gid or st.st_gid in get_sup_groups(ctx.pid):
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        return (bits & mode) == mode

    # ---- extended attributes ------------------------------------------------

    def _xattr_path(self, node: Inode) -> str:
        # The magic link resolves to the inode itself; for a symlink that is the
        # symlink (never its target), which then behaves as with l*xattr(2).
        return lower.proc_path(node.fd)

    def _no_acl(self, name: bytes) -> None:
        """ACLs pass through only where the kernel enforces them."""
        if name in ACL_XATTRS and not self.acl:
            raise OSError(errno.EOPNOTSUPP, "POSIX ACLs are not supported")

    @errno_boundary
    def setxattr(self, inode, name, value, ctx):
        if inode == ROOT and name == ADMIN_XATTR:
            if self.admin is None:
                refuse_without_quota(ctx.uid, ctx.pid)
            self.admin.request(ctx.uid, ctx.pid, value)
            return
        if inode == ROOT and name in VIRTUAL_XATTRS:
            raise OSError(errno.EPERM, "read-only virtual attribute")
        self._no_acl(name)
        node = self.table.get(inode)
        self._host_check(ctx, self._xattr_cost(value))
        res = self._reserve(node.uid, node.gid, self._xattr_cost(value))
        # XATTR_CREATE / XATTR_REPLACE as the caller asked (the fusewire
        # context; pyfuse3 checks them itself).  An access ACL
        # (set through the kernel's ACL code, with neither flag) also sets the
        # mode: the backing filesystem puts the ACL's mask in the group bits,
        # as it does locally.
        flags = getattr(ctx, "flags", 0) & (os.XATTR_CREATE | os.XATTR_REPLACE)
        try:
            os.setxattr(self._xattr_path(node), name, value, flags)
        except BaseException:
            self._release(res)
            raise
        self._release(res)
        st = os.fstat(node.fd)
        self._reconcile(node, st)
        if getattr(ctx, "kill_suidgid", False) and name == ACL_ACCESS:
            # set by someone neither in the file's group nor CAP_FSETID
            self._kill_privs(node, st, None, acl=True)

    def _xattr_cost(self, value: bytes) -> int:
        """Upper bound of what one setxattr allocates: a block for the
        attributes (ext4's xattr block, an XFS attr leaf), plus the value's own
        blocks when it is too big to sit in that block (XFS remote values)."""
        b = self.bsize
        return b + (-(-len(value) // b) * b if len(value) > b // 2 else 0)

    @errno_boundary
    def getxattr(self, inode, name, ctx):
        if inode == ROOT and name == QUOTA_XATTR:
            return self.quota_report(ctx)
        if inode == ROOT and name == COUNTS_XATTR:
            # trusted.*: the kernel lets only the host's CAP_SYS_ADMIN ask
            return json.dumps(self.counts, sort_keys=True).encode() + b"\n"
        if inode == ROOT and name == INODES_XATTR:
            # the inode table's size against its cap (tools/inodemem, tests)
            return json.dumps(self.inodes_report(), sort_keys=True).encode() + b"\n"
        if inode == ROOT and name == OPTIONS_XATTR:
            # what a remount compares its options with (simfs/options.py)
            return json.dumps(dict(self.mount_options, passthrough=self.passthrough),
                              sort_keys=True).encode() + b"\n"
        if inode == ROOT and name == ADMIN_XATTR:
            raise OSError(errno.ENODATA, "write-only virtual attribute")
        self._no_acl(name)
        node = self.table.get(inode)
        try:
            return os.getxattr(self._xattr_path(node), name)
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP and name in ACL_XATTRS:
                # a backing filesystem without ACLs: the file has none (the
                # kernel's permission check would fail on EOPNOTSUPP)
                raise OSError(errno.ENODATA, "no ACL") from None
            raise

    @errno_boundary
    def listxattr(self, inode, ctx):
        node = self.table.get(inode)
        names = [os.fsencode(n) for n in os.listxattr(self._xattr_path(node))]
        return names if self.acl else [n for n in names if n not in ACL_XATTRS]

    @errno_boundary
    def removexattr(self, inode, name, ctx):
        if inode == ROOT and (name in VIRTUAL_XATTRS or name == ADMIN_XATTR):
            raise OSError(errno.EPERM, "read-only virtual attribute")
        self._no_acl(name)
        node = self.table.get(inode)
        os.removexattr(self._xattr_path(node), name)
        self._reconcile(node, os.fstat(node.fd))

    def quota_report(self, ctx) -> bytes:
        """The caller's own view of the quota, as JSON: the container's 1st level,
        and the 2nd-level objects of the caller's uid and gids (root sees all)."""
        q = self.quota
        if q is None:
            raise OSError(errno.ENODATA, "quota is off")
        st = q.state

        def obj(o, graces=None) -> dict:
            return {"blocks": {"usage": -(-o.space.usage // 1024), "soft": o.space.soft // 1024,
                               "hard": o.space.hard // 1024, "deadline": o.space.deadline},
                    "inodes": {"usage": o.inodes.usage, "soft": o.inodes.soft,
                               "hard": o.inodes.hard, "deadline": o.inodes.deadline}}
        out = {"quotaid": st.qid, "now": q.now(), "container": obj(st.level1),
               "grace": {"blocks": st.grace1.space, "inodes": st.grace1.inodes},
               "ugid": {"active": q.ugid_active}}
        admin = self.admin
        if admin is not None:
            out["admin"] = admin.describe(ctx.uid)
        if q.ugid_active:
            if ctx.uid == 0 or (admin is not None and admin.allows(ctx.uid)):
                uids, gids = set(st.users), set(st.groups)
            else:
                uids = {ctx.uid}
                gids = {ctx.gid} | set(get_sup_groups(ctx.pid))
            for kind, ids in ((USER, uids), (GROUP, gids)):
                table = st.table(kind)
                g = st.grace2(kind)
                out[kind + "s"] = {str(i): obj(table[i]) for i in sorted(ids) if i in table}
                out[kind + "_grace"] = {"blocks": g.space, "inodes": g.inodes}
        return json.dumps(out, sort_keys=True).encode() + b"\n"

