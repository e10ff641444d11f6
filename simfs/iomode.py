"""The kernel's I/O mode of each open file, as the daemon answered its opens.

Role: decide, per open, whether the kernel reads a regular file itself from
the backing file (FUSE passthrough: FOPEN_PASSTHROUGH with a backing id) or
sends its reads to the daemon through the FUSE page cache (the caching mode),
and keep the one backing id all passthrough opens of an inode share.  Knows
nothing of quotas, except that every write must come to the daemon (to be
reserved and charged) and that nothing may allocate a block the daemon does
not see.

The kernel keeps one io mode per inode (fs/fuse/iomode.c, 6.18): while a
passthrough open of it exists, an open answered without FOPEN_PASSTHROUGH
fails (EIO, "FOPEN_PASSTHROUGH expected"), FOPEN_DIRECT_IO or not; while an
open in the caching mode exists (no DIRECT_IO, no PASSTHROUGH; or a direct_io
file with a shared mmap), a passthrough open fails.  FOPEN_DIRECT_IO
overrides FOPEN_PASSTHROUGH for read(2) and write(2) (fuse_file_read_iter,
fuse_file_write_iter): such an open's writes come to the daemon and land in
the backing file's page cache, where passthrough readers see them at once.
Its mmap still goes to the backing file (fuse_passthrough_mmap), so a shared
writable mapping writes the backing file unseen.  A write through a mapping
can never grow a file (past the end it is SIGBUS); it can only allocate
blocks where the file has holes.  So, per open of a regular file:

* while the inode has passthrough opens, every open is passthrough: a
  read-only one plainly, an open for writing (or with O_TRUNC) as
  PASSTHROUGH|DIRECT_IO (``WRITE``).  An open for reading and
  writing may map the file shared and writable (``SHARED``; an O_WRONLY
  descriptor cannot be mapped at all, mmap needs FMODE_READ): it is refused
  with ETXTBSY if the file has a hole (SEEK_HOLE before its size; unwritten
  extents count as holes: conservative), and from then on the daemon keeps
  the file hole-free (``mapped``; ``SimOperations``: a write past the end
  fills the gap with charged zeros first, and one past a gap of more than
  ``gap_zeros`` is refused with ETXTBSY, as a truncate that grows it is; a
  punch, a zeroed range (unwritten extents), an insert or a fallocate past
  the end with EOPNOTSUPP; a copy_file_range into it with EOPNOTSUPP, which the kernel
  turns into its splice copy: plain writes; what it frees stays charged
  while it is marked, ``Ledger.pinned``: the mapping can free blocks with
  MADV_REMOVE and fill them again unseen).  Not only while it is open: a
  mapping outlives its descriptor and the open's RELEASE (tried: mmap(2),
  close, RELEASE, truncate up, a store allocated a block with no request;
  Python's mmap keeps a duplicate descriptor, its RELEASE comes at munmap).
  The mark ends once nothing can map the file: at the last release of the
  inode (no handle left) the daemon asks the kernel to forget it
  (FUSE_NOTIFY_PRUNE of that inode from the loop after the reply, again
  10 ms, 100 ms and 1 s later (``forget_retry``) while it is still marked
  and unopened: ``SimOperations.release``, ``Pruner.forget_soon``).  A mapping holds the
  file's path (backing_file_open), so the kernel keeps the inode while one
  exists; else it drops it with its unused cached dentry and its FORGET
  ends the mark (``forgotten``; measured on 6.18: a FORGET within 12 ms
  of the close, 1 time in 12 after the retry, none while mapped and none
  at munmap, which sends no request).  And a growing truncate or an
  open of a marked inode that has no handle ends the mark if no one holds
  the backing file open for writing (``written``: a mapping holds a
  writable open, the kernel's backing file), as for a truncate right after
  the last close, before any FORGET (a PRUNE cannot drop an inode whose
  path the truncate holds), or one after munmap.  Under pyfuse3 nothing is
  passthrough, nothing marked;
* otherwise a read-only open is passthrough unless the inode has a caching
  open (then it is one itself, coherent with the writer), the file is smaller
  than ``min_size`` (small hot files stay in the FUSE page cache with
  keep_cache, where a hot read costs no request) or it has a hole
  (``stay_cached``); an open for writing is a caching one, as without
  passthrough.

Any user's read-only open may be passthrough: a passthrough reader holds off
no writer.  A file with a hole is never made passthrough by a reader, so
that an O_RDWR open is refused only if a writer (who may write the file
anyway) made the hole while passthrough readers had it.

Backing ids: one per inode, registered (FUSE_DEV_IOC_BACKING_OPEN) with the
descriptor of its first passthrough open.  At the last passthrough release
it is not closed but *parked* on the inode's record, so that the next
passthrough open of the file reuses it without an ioctl (an open and a close
cost two ioctls less).  A parked id is only a registration: the kernel ends
the inode's passthrough mode at its last passthrough close whatever the
daemon keeps, so every decision here counts handles (``passthrough``,
``cached``), never ids: a file with only a parked id is a file without
passthrough readers (a writer's open of it is a caching one, as before).  A
parked id holds a kernel reference to the backing file (not a descriptor of
the daemon's: RLIMIT_NOFILE does not see it), so it is closed (``unpark``)
when ``max_parked`` are parked (the least recently released first), when the
file loses its last link through the mount (unlink, a rename over it; and a
release of a file unlinked through the mount does not park), and when the record's
O_PATH descriptor is closed (the record leaves the table, or its descriptor
leaves the table's LRU: ``InodeTable.on_unpark``).  So a parked id never
keeps a backing inode the daemon would not keep anyway, never outlives its
record (it is kept with the record and its generation: a number the backing
filesystem reused can never get an old file's id), and is never the last
reference to an unlinked file.  A READ open that can share an id (the inode
has passthrough handles, or a parked id) needs no descriptor of its own
(``ops.LazyHandle``), and with a parked id no size and hole check either
(``ready``) unless the file was opened for writing or truncated through the
mount since its last check, or a writer had it open at that check
(``unchecked``, kept only for inodes with an id: bounded as the ids are).

Concurrency: called from the plain (never awaiting) open, create, tmpfile,
release, unlink and rename handlers and the inode table's drop and eviction
on the request loop's thread, so a decision and the reply that carries it are
one step: the counts here and the kernel's modes never disagree, except that
the kernel leaves a mode before it sends RELEASE, so the counts can only lag
on the side of a passthrough answer, whose backing id is still registered.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import logging
import os
import signal
import stat
from collections import OrderedDict

from fusewire import kernel

log = logging.getLogger(__name__)


class Mode(enum.IntEnum):
    """decide's answers."""
    CACHING = 0     # not passthrough (caching, or direct_io for O_DIRECT), as without it
    READ = 1        # passthrough, read-only
    WRITE = 2       # passthrough with DIRECT_IO: reads and writes come to the daemon
    SHARED = 3      # WRITE, and may map the file shared and writable (O_RDWR)


CACHING, READ, WRITE, SHARED = Mode


def has_hole(fd: int, size: int | None = None) -> bool:
    """Whether the open file ``fd`` (of ``size`` bytes, if known) has a hole
    before its end (an unwritten extent the backing filesystem reports as one
    counts: conservative)."""
    if size is None:
        size = os.fstat(fd).st_size
    if size == 0:
        return False
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) < size
    except OSError as e:
        if e.errno == errno.ENXIO:
            return False
        raise


def written(fd: int) -> bool:
    """Whether anyone holds the file ``fd`` (open read-only, by the caller)
    open for writing, a shared writable mapping included (it holds a writable
    open of the file: for a passthrough one, the kernel's backing file): a
    read lease cannot be taken then (fs/locks.c, check_conflicting_open).
    The lease is given up at once; an open for writing that comes meanwhile
    (a host process's) waits for that, and its break signal is SIGURG,
    ignored (not SIGIO, which would end the daemon).  True when no lease
    can be taken at all (leases disabled, a filesystem without them):
    conservative."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:
        return True
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False


class IoModes:
    """Passthrough and caching opens per inode number, and their backing ids.

    ``enabled`` is set by the mount when it asks the kernel for passthrough
    (the default; not with ``-o nopassthrough``); it goes off again if the
    kernel cannot do it at all.  ``min_size``: a read-only open of a smaller
    file is passthrough only if the inode has passthrough handles already.
    ``max_parked``: backing ids kept between opens at most (Config
    ``backing_parked``; 0: each is closed at its inode's last release).
    Handles carry ``backing`` (their backing id, 0 if none) and ``cached``
    (in the caching mode).  ``opened`` and ``closed`` count the
    registrations and closes of backing ids (ioctls) so far."""

    __slots__ = ("enabled", "min_size", "max_parked", "passthrough", "backing", "parked",
                 "cached", "mapped", "unchecked", "opened", "closed")

    def __init__(self, max_parked: int = 0) -> None:
        self.enabled = False
        self.min_size = 0
        self.max_parked = max_parked
        self.passthrough: dict[int, int] = {}   # inode -> its passthrough handles
        self.backing: dict[int, int] = {}       # inode -> its backing id, while it has some
        # inode -> (its record, the record's generation, its backing id), of
        # inodes without passthrough handles; least recently released first
        self.parked: OrderedDict[int, tuple[object, int, int]] = OrderedDict()
        self.cached: dict[int, int] = {}        # inode -> its caching-mode handles
        self.mapped: set[int] = set()           # inodes a SHARED writer had open
        # inodes with a backing id (active or parked) opened for writing or
        # truncated since ``stay_cached`` last checked them with no writer
        # open: their next first passthrough open checks again (``ready``)
        self.unchecked: set[int] = set()
        self.opened = 0                         # backing ids registered so far
        self.closed = 0                         # and closed

    def busy(self, ino: int) -> bool:
        """Whether a passthrough handle has inode ``ino`` (the kernel must not
        be asked to forget it; a parked backing id does not count)."""
        return ino in self.passthrough

    def decide(self, node, flags: int) -> int:
        """How an open of ``node`` with ``flags`` is answered (CACHING, READ,
        WRITE or SHARED); READ may still become CACHING for a small or
        sparse file (``stay_cached``) and SHARED is refused for a sparse one (``refuse_sparse``),
        once the open has its descriptor.  By handle counts only: a parked
        backing id changes nothing."""
        if not self.enabled or not stat.S_ISREG(node.mode):
            return CACHING
        acc = flags & os.O_ACCMODE
        if acc == os.O_RDONLY and not flags & os.O_TRUNC:
            return CACHING if self.cached.get(node.ino) else READ
        if node.ino not in self.passthrough:
            return CACHING
        return SHARED if acc == os.O_RDWR else WRITE

    def ready(self, node) -> bool:
        """Whether a READ open of ``node`` can share a backing id as it is,
        with no descriptor of its own and no check (``ops.LazyHandle``): the
        inode has passthrough handles (the kernel wants passthrough), or an id
        is parked on its record (the same record and generation) and nothing
        has opened the file for writing or truncated it through the mount
        since ``stay_cached`` found it neither small nor sparse with no writer
        open.  (A file changed behind the mount meanwhile is not seen: such a
        change can only make a reader's open passthrough where a check would
        have kept it cached.)"""
        ino = node.ino
        if ino in self.passthrough:
            return True
        if not self.parked:
            return False
        p = self.parked.get(ino)
        return (p is not None and p[0] is node and p[1] == node._flags >> 4
                and ino not in self.unchecked)

    def small(self, node) -> bool:
        """Whether a READ open of ``node`` that would be its first passthrough
        open is read through the page cache for its size alone (below
        ``min_size``), known without an open of the file (``stay_cached``
        decides the others once the open has its descriptor)."""
        return (self.min_size > 0 and node.ino not in self.passthrough
                and os.fstat(node.fd).st_size < self.min_size)

    def writing(self, ino: int) -> None:
        """Inode ``ino`` is being opened for writing (or with O_TRUNC), or
        truncated, through the mount: a backing id it has needs a check again
        before an open skips it (``ready``)."""
        if ino in self.backing or ino in self.parked:
            self.unchecked.add(ino)

    def stay_cached(self, node, fd: int) -> bool:
        """Whether a READ open of ``node`` (descriptor ``fd``) that would be
        the inode's first passthrough open is better served through the page
        cache: a file below ``min_size``, or one with a hole.  Not a sparse
        one: a passthrough reader of it would make its writers' O_RDWR opens
        fail (``refuse_sparse``), and a reader must not lock out writers (any
        user may read a world-readable sparse file, e.g. lastlog)."""
        ino = node.ino
        if ino in self.passthrough:
            return False                  # the kernel wants passthrough now
        # the size by lseek: 0.3 µs, an fstat 1 µs (its stat_result); the
        # descriptor's offset does not matter (every read and write of a
        # handle is positional)
        size = os.lseek(fd, 0, os.SEEK_END)
        if (self.min_size > 0 and size < self.min_size) or has_hole(fd, size):
            return True
        if ino in self.parked:            # checked: later opens may skip it (``ready``)
            self._checked(ino, fd)
        return False

    def _checked(self, ino: int, fd: int) -> None:
        """Inode ``ino``, which has a backing id, was found neither small nor
        sparse through its open descriptor ``fd``: later opens may skip the
        check unless a writer has it open now (an O_DIRECT one is in no mode
        count: its writes could make a hole unseen here)."""
        if written(fd):
            self.unchecked.add(ino)
        else:
            self.unchecked.discard(ino)

    @staticmethod
    def refuse_sparse(fd: int) -> None:
        """ETXTBSY for a SHARED writer of a file with a hole: its shared
        mapping could fill the hole without the daemon seeing it."""
        if has_hole(fd):
            raise OSError(errno.ETXTBSY, "a sparse file open for passthrough reading")

    def forgotten(self, table, inos) -> list:
        """The kernel dropped references to ``inos``: one it forgot has no
        mapping left (a mapping of a passthrough file holds the file's path,
        so the kernel keeps the inode while one exists), and may have holes
        again.  Returns the records still in the table whose mark ended (their
        charge may go down now: ``Ledger.pinned``)."""
        ended = []
        for ino in inos:
            node = table.inodes.get(ino)
            if (node is None or node.lookups <= 0) and ino in self.mapped:
                self.mapped.discard(ino)
                if node is not None:
                    ended.append(node)
        return ended

    def caching(self, h) -> None:
        """Handle ``h`` was answered in the caching mode."""
        h.cached = True
        ino = h.inode.ino
        self.cached[ino] = self.cached.get(ino, 0) + 1

    def backing_for(self, channel, h, shared: bool = False) -> int:
        """The backing id of ``h``'s inode for one more passthrough handle
        ``h``: one per inode (the kernel refuses a second backing file for an
        inode, EBUSY), registered at its first passthrough open with that
        open's descriptor, or the one parked on its record since its last
        release.  0 if the kernel refuses it: this file is then served by the
        daemon (per file: a backing it cannot stack on, ELOOP; or passthrough
        off altogether)."""
        node = h.inode
        ino = node.ino
        bid = self.backing.get(ino, 0)
        if not bid:
            parked = self.parked.pop(ino, None) if self.parked else None
            if parked is not None:
                if parked[0] is node and parked[1] == node._flags >> 4:
                    bid = parked[2]           # no ioctl
                else:                         # another file's (cannot happen: unpark)
                    self._close(channel, parked[2])
            if not bid:
                if channel is None or not channel.negotiated & kernel.PASSTHROUGH:
                    self.enabled = False              # not offered (or another binding)
                    return 0
                try:
                    bid = channel.backing_open(h.fd)
                except OSError as e:
                    log.warning("passthrough refused by the kernel (%s): reads go through "
                                "the daemon", e.strerror or e)
                    if e.errno in (errno.EPERM, errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS):
                        self.enabled = False          # never, on this kernel or device
                    return 0
                self.opened += 1
                self._checked(ino, h.fd)
            self.backing[ino] = bid
        h.backing = bid
        self.passthrough[ino] = self.passthrough.get(ino, 0) + 1
        if shared:
            self.mapped.add(ino)
        return bid

    def released(self, channel, h) -> None:
        """Handle ``h`` was released: the last passthrough handle of an inode
        parks its backing id on the inode's record (closes it if the file
        lost its last link through the mount, the record has no descriptor,
        or parking is off)."""
        ino = h.inode.ino
        if h.backing:
            left = self.passthrough.pop(ino) - 1
            if left:
                self.passthrough[ino] = left
                return
            bid = self.backing.pop(ino)           # the last one
            node = h.inode
            # parked only while the record holds its descriptor (one evicted
            # from the LRU while the file was open is not: a parked id must
            # not keep a file the daemon does not)
            # (a file removed behind the mount is parked: the record's own
            # descriptor holds it as long, and both go with the record)
            if self.max_parked > 0 and node._fd >= 0 and not node.unlinked:
                parked = self.parked
                parked[ino] = (node, node._flags >> 4, bid)
                if len(parked) > self.max_parked:
                    old, (_, _, obid) = parked.popitem(last=False)
                    self.unchecked.discard(old)
                    self._close(channel, obid)
                return
            self.unchecked.discard(ino)
            self._close(channel, bid)
        elif h.cached:
            left = self.cached.pop(ino) - 1
            if left:
                self.cached[ino] = left

    def unpark(self, channel, ino: int) -> None:
        """Close the backing id parked on inode ``ino``, if any: the file lost
        its last link through the mount, or its record's descriptor is being
        closed (``InodeTable.on_unpark``)."""
        parked = self.parked.pop(ino, None)
        if parked is not None:
            self.unchecked.discard(ino)
            self._close(channel, parked[2])

    def _close(self, channel, bid: int) -> None:
        self.closed += 1
        if channel is None:
            return
        try:
            channel.backing_close(bid)
        except OSError as e:
            log.warning("closing passthrough backing id %d: %s", bid, e)
