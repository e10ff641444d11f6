"""The inode table: every backing inode the kernel knows, by (st_dev, st_ino),
with a bounded number of descriptors.

Role: maps FUSE inode numbers to ``Inode`` records: the kernel's lookup count,
the number of open handles, what the quota charged for the inode (its owner and
allocated bytes), and how to reach the backing inode without a path: a kernel
*file handle* (``name_to_handle_at``), re-opened as an ``O_PATH`` descriptor
(``open_by_handle_at`` on a descriptor of the private area) when needed.  Only
an LRU of at most ``Budget.cached`` such descriptors stays open, so no number of
lookups (``ls -l`` of a huge directory) can fill the daemon's descriptor table;
an inode's handle is made when its descriptor leaves the LRU (``LAZY`` until
then), so one the kernel forgets first never costs the call.
``Inode.fd`` gives the descriptor, re-opening it on a miss; in the common case
(it is in the LRU) it costs a dictionary move.  A caller may use at most a few
``.fd`` values at once (the LRU keeps at least 16).

The table itself is bounded too: its records are lean (``Inode``), kept in
least-recently-looked-up order, and past ``max_inodes`` (``-o maxinodes``)
``on_full`` tells the operations, which ask the kernel to forget the oldest
(``oldest``; ``simfs.prune.Pruner``, FUSE_NOTIFY_PRUNE) and drop them at
their FORGET.

Pinned descriptors are never evicted: the root's, those of inodes unlinked
through the mount while the kernel still holds them (so that they stay alive
and their numbers cannot be reused, as on a local filesystem), up to
``Budget.pinned`` (past it, those with open handles too: at most one per
handle, which ``Budget.files`` bounds; a reader's handle may have no
descriptor of its own, ``ops.LazyHandle``, so the record's holds the file
for it, reopened before the unlink if it had left the LRU: ``unlinking``); and, on a backing filesystem without file handles (checked
at start), every inode's, up to ``Budget.pinned``: past it, new lookups fail
with ENFILE (``has_room``).

FUSE inode numbers are the backing ``st_ino`` except that the private area's
root is 1 (FUSE's ROOT_ID) and a backing inode numbered 1 takes the
root's number: a bijection, so numbers are stable across lookups and hard links
share one inode.  An unlinked inode that is neither pinned nor open is dead:
if the backing filesystem reuses its number, ``adopt`` notices, tells
``on_reused`` (the ledger frees the dead inode's charge) and starts the record anew,
as a new *generation* of the number (returned in every entry: the kernel then
drops what it holds of the old inode); a record whose descriptor was evicted
is checked the same way at its next lookup (another file handle behind the
same number: removed and made anew behind the mount).

Counts: the kernel's lookups (``adopt``, ``ref``, ``forget``), the open
handles (``opened``, ``closed``) and the ledger's hold (``hold``, ``unhold``)
change only through the table's methods, and ``_let_go`` alone decides that an
inode leaves (nothing refers to it and ``on_leave`` does not keep it).

Concurrency: used only from the event loop that serves the mount; no method
awaits, so each call is atomic with respect to other requests.  The one
exception is ``Closer``'s thread, which only closes descriptors of unlinked
inodes after the table has dropped them.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import resource
import stat
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable

from . import lower
from .config import DEFAULT, Config
from .lower import OPATH_FLAGS

log = logging.getLogger(__name__)

ROOT = 1

# An inode record's file handle not made yet: made (name_to_handle_at, ~1.5 us)
# only when its descriptor leaves the LRU, so a lookup whose inode is
# forgotten before that never pays for it
LAZY = b""


@dataclass(frozen=True)
class Budget:
    """How the daemon's descriptors are shared out."""
    cached: int      # inode descriptors in the LRU
    pinned: int      # inode descriptors never evicted
    files: int       # handles of open files and directories (one fd each at most)

    @classmethod
    def plan(cls, limit: int, config: Config = DEFAULT) -> "Budget":
        """Shares for an RLIMIT_NOFILE of ``limit``, keeping ``config.reserve_fds``
        (cached_fds, pinned_fds and max_open at most)."""
        avail = max(limit - config.reserve_fds, 64)
        cached = max(16, min(config.cached_fds, avail // 4))
        pinned = max(16, min(config.pinned_fds, avail // 4))
        files = max(16, min(config.max_open, avail - cached - pinned))
        return cls(cached, pinned, files)


class OpenShares:
    """The open-file budget (``Budget.files``) shared out by uid, so that one
    user cannot lock the others out.

    The last ``reserve`` handles (1/``config.root_reserve`` of the budget) are
    the container's root's (uid 0) alone; of the rest, the *pool*, one uid may
    hold at most ``share`` (1/``config.user_share`` of it), root included (root may hold its
    share plus the reserve).  So while one user holds all it may, the pool
    still has room for three times as much for everyone else, and root keeps
    the reserve whatever the others hold.

    A uid refused because it holds its share is logged once per *streak* (from
    its first refusal until it is admitted again, with the number of refusals
    then), and queued in ``events`` for the mount's hook (bounded: the oldest
    goes).  A full pool is logged once per streak too.

    Pure bookkeeping: no I/O but logging; used from the event loop only.
    """

    EVENTS_MAX = 64

    def __init__(self, files: int, config: Config = DEFAULT):
        self.files = files
        self.reserve = max(1, files // config.root_reserve)
        self.pool = files - self.reserve
        self.share = max(1, self.pool // config.user_share)
        self.held: dict[int, int] = {}       # uid -> handles held
        self.total = 0
        self.streaks: dict[object, int] = {}  # uid or "pool" -> refusals so far
        self.events: deque[tuple[int, int, int]] = deque(maxlen=self.EVENTS_MAX)

    def why_not(self, uid: int) -> str | None:
        """None if ``uid`` may open one more file or directory, else why not."""
        held = self.held.get(uid, 0)
        if uid == 0:
            if self.total >= self.files:
                return "pool"
            if held >= self.share + self.reserve:
                return "share"
            return None
        if held >= self.share:
            return "share"
        if self.total >= self.pool:
            return "pool"
        return None

    def check(self, uid: int) -> None:
        """Raise ENFILE unless ``uid`` may open one more."""
        why = self.why_not(uid)
        if why is None:
            return
        key = uid if why == "share" else "pool"
        n = self.streaks.get(key, 0)
        self.streaks[key] = n + 1
        if not n:
            if why == "share":
                log.warning("uid %d holds its share of open files (%d of a budget of "
                            "%d): its further opens fail with ENFILE until it closes some",
                            uid, self.held.get(uid, 0), self.files)
                self.events.append((uid, self.held.get(uid, 0), self.share))
            else:
                log.warning("the open-file budget is full (%d of %d held, the last %d "
                            "kept for root): opens fail with ENFILE", self.total,
                            self.files, self.reserve)
        if why == "share":
            raise OSError(errno.ENFILE, f"uid {uid} holds its share of open files")
        raise OSError(errno.ENFILE, "open files budget exhausted")

    def take(self, uid: int) -> None:
        """``uid`` now holds one more (after ``check``)."""
        self.held[uid] = self.held.get(uid, 0) + 1
        self.total += 1
        if self.streaks:
            self._end_streak(uid)
            if self.total < self.pool:
                self._end_streak("pool")

    def _end_streak(self, key) -> None:
        n = self.streaks.pop(key, 0)
        if n:
            who = f"uid {key}" if key != "pool" else "the open-file budget"
            log.info("%s: opens admitted again after %d refused", who, n)

    def give(self, uid: int) -> None:
        """``uid`` closed one."""
        n = self.held.get(uid, 0) - 1
        if n > 0:
            self.held[uid] = n
        else:
            self.held.pop(uid, None)
        self.total -= 1


class Inode:
    """One inode the kernel holds (or the daemon keeps, see ``SimOperations``).

    Lean on purpose, there may be ``max_inodes`` of them: 10 slots (112 bytes
    with the object and GC headers) and no ``__dict__``; the three flags share
    one slot; the table is a class attribute of the table's own subclass
    (``InodeTable.Inode``); uid, gid, mode and small sizes are shared int
    objects (``InodeTable.share``); the file handle is kept as one small int
    (``InodeTable.pack``), made only once the descriptor leaves the LRU
    (``LAZY``, a shared object, until then)."""
    __slots__ = ("ino", "_fd", "handle", "_flags", "lookups", "opens", "space",
                 "uid", "gid", "mode")
    table: "InodeTable"

    def _flag(bit: int):
        def get(self) -> bool:
            return self._flags & bit != 0

        def put(self, on: bool) -> None:
            self._flags = self._flags | bit if on else self._flags & ~bit
        return property(get, put)

    pinned = _flag(1)         # its descriptor is never evicted
    unlinked = _flag(2)       # its last name is gone
    freed = _flag(4)          # and the quota has given back what it held
    held = _flag(8)           # kept by the ledger after the kernel let go (InodeTable.hold)
    del _flag

    @property
    def generation(self) -> int:
        """FUSE's generation of this number: bumped each time the backing
        filesystem reuses it for a new inode (``InodeTable.adopt``); the
        bits of ``_flags`` above the four flags."""
        return self._flags >> 4

    def __init__(self, ino: int, st: os.stat_result, handle):
        self.ino = ino
        self._fd = -1             # O_PATH|O_NOFOLLOW descriptor while it has one
        self.handle = handle      # kernel file handle (packed); LAZY: not made yet
                                  # (made when its descriptor is evicted); None:
                                  # the fd is pinned
        self._flags = 0
        self.lookups = 0          # kernel lookup count
        self.opens = 0            # open file handles
        self.reset(st)

    def reset(self, st: os.stat_result) -> None:
        # InodeTable.share inlined (a new record's hot path): the shared
        # object when there is one, else share() to make it one
        table = self.table
        get = table._shared.get
        space = st.st_blocks * 512
        if space < table.shared_space:
            v = get(space)
            space = v if v is not None else table.share(space)
        self.space = space        # bytes, as last charged
        v = st.st_uid             # the owner the quota charges
        s = get(v)
        self.uid = s if s is not None else table.share(v)
        v = st.st_gid
        s = get(v)
        self.gid = s if s is not None else table.share(v)
        v = st.st_mode
        s = get(v)
        self.mode = s if s is not None else table.share(v)
        self._flags &= ~14        # neither unlinked, freed nor held (pinned and the
                                  # generation kept)

    @property
    def fd(self) -> int:
        """An O_PATH descriptor of the backing inode (ESTALE if it is gone)."""
        fd = self._fd
        if fd >= 0:
            if not self._flags & 1:       # not pinned (the flag read directly: hot)
                self.table.lru.move_to_end(self.ino)
            return fd
        return self.table.reopen(self)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class Closer:
    """Closes the descriptors of unlinked inodes in one worker thread.  The last
    close of an unlinked backing inode is where the backing filesystem frees it
    (ext4 truncates and evicts it inside close(2)): about a quarter of the
    daemon's time under ``rm``, serialised with every other request when done on
    the loop.  The thread only ever closes descriptors the table gave up; the
    queue holds no more of them than the table held.  Woken by the first
    descriptor, it waits ``GATHER`` seconds and closes what came meanwhile
    too: under ``rm`` one wake-up (two context switches, the GIL handed
    over and back) per millisecond instead of one per file."""

    GATHER = 0.001

    def __init__(self, idle: float = DEFAULT.closer_idle):
        # seconds without work before the thread ends (a process without
        # threads may fork: see vzquota.scan)
        self.idle = idle
        self._q: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.wakeups = 0          # times the thread woke up to close some

    def close(self, fd: int) -> None:
        self._q.put(fd)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="simfs-closer",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        q = self._q
        while True:
            try:
                fd = q.get(timeout=self.idle)
            except queue.Empty:
                with self._lock:
                    if q.empty():
                        self._thread = None
                        return
                continue
            self.wakeups += 1
            time.sleep(self.GATHER)      # let the next ones come: one wake-up for all
            while True:
                try:
                    os.close(fd)
                except OSError as e:
                    log.warning("closing the descriptor of an unlinked inode: %s", e)
                try:
                    fd = q.get_nowait()
                except queue.Empty:
                    break



def no_handles_message(failed: tuple[str, int] | None, pinned: int) -> tuple[int, str]:
    """The log level and line for a mount that cannot keep inodes by file
    handle; ``failed``: the call that failed and its errno (None: file handles
    were not asked for).  The line names the call and the errno, so that a
    filesystem without file handles (``name_to_handle_at``: EOPNOTSUPP) is not
    confused with a process that may not open them: ``open_by_handle_at``
    refused with EPERM by a seccomp filter (systemd-nspawn's, a container
    runtime's) or for want of CAP_DAC_READ_SEARCH, on a filesystem that has them."""
    cost = f"one descriptor per cached inode, at most {pinned} inodes"
    if failed is None:
        return logging.INFO, f"file handles not used: {cost}"
    call, err = failed
    name = "EOPNOTSUPP" if err == errno.EOPNOTSUPP else errno.errorcode.get(err, str(err))
    what = f"{call} failed with {name} ({os.strerror(err)})"
    if call == "open_by_handle_at" and err in (errno.EPERM, errno.EACCES):
        return logging.WARNING, (
            f"file handles refused: {what}, although the private area's filesystem has "
            "them (name_to_handle_at worked): this process may not open them -- a seccomp "
            "filter (e.g. systemd-nspawn's or a container runtime's) or a missing "
            f"CAP_DAC_READ_SEARCH, not the filesystem; {cost} (run simfs on the host, "
            "outside the container, or allow the call: systemd-nspawn "
            "--system-call-filter=open_by_handle_at)")
    if call == "name_to_handle_at" and err in (errno.EOPNOTSUPP, errno.ENOTSUP):
        return logging.INFO, (f"the private area's filesystem has no file handles "
                              f"({what}): {cost}")
    return logging.WARNING, f"file handles unusable: {what}: {cost}"


class InodeTable:
    def __init__(self, root_fd: int, budget: Budget | None = None,
                 file_handles: bool = True, config: Config = DEFAULT):
        # Inode records of this table know it through their class
        self.Inode = type("Inode", (Inode,), {"__slots__": (), "table": self})
        self._shared: dict[int, int] = {}
        self._head = b""          # the common header of file handles (pack)
        self._tail = 0            # and the length of what follows it
        # The cap: past it, the daemon asks the kernel to forget the least
        # recently looked-up inodes it may (simfs.prune.Pruner).  ``inodes``
        # is kept in that order: a lookup of a known inode moves it to the end.
        self.max_inodes = config.max_inodes
        self.prune_slack = config.prune_slack
        self.shared_max = config.shared_max
        self.shared_space = config.shared_space
        self.peak = 0             # most inodes held at once
        self.pruned = 0           # inodes the kernel was asked to forget
        self.dropped = 0          # inodes that left the table
        self.on_full: Callable[[], None] | None = None   # called once past the cap
        self.full = False         # on_full was called, no prune pass ran since
        st = os.fstat(root_fd)
        self.dev = st.st_dev
        self.root_ino = st.st_ino
        self.budget = budget or Budget.plan(resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                                            config)
        self.inodes: dict[int, Inode] = {}
        # the daemon sets one (Mount.prepare); without it (unit tests, tools)
        # every descriptor is closed inline
        self.closer: Closer | None = None
        self.lru: OrderedDict[int, Inode] = OrderedDict()
        self.pinned = 0
        # The ledger's say when an inode is about to leave (no lookup, open or
        # hold left): ``on_leave`` may keep it (returns True, having held
        # it); ``on_dropped`` hears that it left; ``on_reused`` that a dead
        # inode's number came back for a new backing inode.
        self.on_leave: Callable[[Inode], bool] | None = None
        self.on_dropped: Callable[[Inode], None] | None = None
        self.on_reused: Callable[[Inode], None] | None = None
        # Inodes with something the operations keep only while the record
        # holds its descriptor (a parked passthrough backing id,
        # simfs.iomode): ``on_unpark`` is told before that descriptor closes
        # (the record leaves the table or its descriptor the LRU).
        self.parked: dict[int, object] = {}
        self.on_unpark: Callable[[Inode], None] | None = None
        self._warned_pins = False
        # open_by_handle_at wants an open (not O_PATH) descriptor of the filesystem
        self.mount_fd = lower.reopen(root_fd, os.O_RDONLY | os.O_DIRECTORY)
        self.handles_error: tuple[str, int] | None = None   # (call, errno) if they fail
        self.file_handles = file_handles and self._handles_work(root_fd)
        if not self.file_handles:
            level, text = no_handles_message(self.handles_error, self.budget.pinned)
            log.log(level, "%s", text)
        root = self.Inode(ROOT, st, None)
        root._fd = root_fd
        root.pinned = True        # not counted: the root is not the container's
        root.lookups = 1 << 62    # never forgotten
        self.inodes[ROOT] = root

    def _handles_work(self, root_fd: int) -> bool:
        """Whether inodes can be kept by file handle: the root's handle made
        and opened again.  Else ``handles_error`` says which call failed."""
        call = "name_to_handle_at"
        try:
            h = lower.handle_of(root_fd)
            call = "open_by_handle_at"
            os.close(lower.open_handle(self.mount_fd, h))
            self._head, self._tail = h[:8], len(h) - 8
            return True
        except OSError as e:
            self.handles_error = (call, e.errno)
            return False

    def share(self, v: int) -> int:
        """One int object for each value (up to ``shared_max`` of them): a record's
        uid, gid and mode cost a pointer, not an int each."""
        shared = self._shared
        got = shared.get(v)
        if got is not None:
            return got
        if len(shared) < self.shared_max:
            shared[v] = v
        return v

    def pack(self, handle: bytes, st_ino: int) -> int | bytes:
        """A file handle as kept: the int of what follows the filesystem's
        common header; when its first 32 bits are the inode's number (ext4's
        and XFS's: number, generation), only the rest, as a negative int
        (32 bytes for ext4, against 64 for the bytes); the bytes themselves
        if the header differs."""
        if handle[:8] != self._head or len(handle) != 8 + self._tail:
            return handle
        tail = int.from_bytes(handle[8:], "little")
        if tail & 0xFFFFFFFF == st_ino & 0xFFFFFFFF:
            return ~(tail >> 32)
        return tail

    def unpack(self, handle: int | bytes, ino: int) -> bytes:
        """The file handle of the inode numbered ``ino`` (FUSE's number)."""
        if type(handle) is int:
            if handle < 0:
                handle = (~handle << 32) | (self.fuse_ino(ino) & 0xFFFFFFFF)
            return self._head + handle.to_bytes(self._tail, "little")
        return handle

    def _handle_of(self, fd: int, st: os.stat_result) -> int | bytes:
        return self.pack(lower.handle_of(fd), st.st_ino)

    @property
    def root(self) -> Inode:
        return self.inodes[ROOT]

    def fuse_ino(self, st_ino: int) -> int:
        if st_ino == self.root_ino:
            return ROOT
        if st_ino == ROOT:
            return self.root_ino
        return st_ino

    def get(self, ino: int) -> Inode:
        try:
            return self.inodes[ino]
        except KeyError:
            raise OSError(errno.ESTALE, f"unknown inode {ino}") from None

    def find(self, st_ino: int) -> Inode | None:
        return self.inodes.get(self.fuse_ino(st_ino))

    def check_dev(self, st: os.stat_result) -> None:
        if st.st_dev != self.dev:
            log.warning("a mount point inside the private area is hidden (inode %d)",
                        st.st_ino)
            raise OSError(errno.ENOTSUP, "mount point inside the private area")

    # ---- descriptors ---------------------------------------------------------------

    def open_fds(self) -> int:
        """Inode descriptors held now (the root's excluded)."""
        return len(self.lru) + self.pinned

    def has_room(self) -> bool:
        """Whether one more inode can be adopted (always, with file handles)."""
        return self.file_handles or self.pinned < self.budget.pinned

    def need_room(self) -> None:
        if not self.has_room():
            raise OSError(errno.ENFILE, "inode descriptor budget exhausted")

    def _cache(self, inode: Inode, fd: int) -> None:
        inode._fd = fd
        lru = self.lru
        lru[inode.ino] = inode
        if len(lru) > self.budget.cached:
            self._shrink()

    def _shrink(self) -> None:
        """Close the least recently used descriptors past ``Budget.cached``."""
        lru = self.lru
        while len(lru) > self.budget.cached:
            self._uncache(lru.popitem(last=False)[1])

    def evict(self, inode: Inode) -> None:
        """Close ``inode``'s cached descriptor now (as the LRU does)."""
        del self.lru[inode.ino]
        self._uncache(inode)

    def _uncache(self, old: Inode) -> None:
        """``old`` left the LRU: make its file handle if it has none yet
        (``LAZY``), then close its descriptor.  Should the handle fail (not
        expected on a filesystem whose handles worked at start), it keeps
        the descriptor pinned, within ``Budget.pinned``, or is lost (ESTALE
        at its next use), as an inode without a handle would be."""
        if old.handle is LAZY:
            try:
                old.handle = self.pack(lower.handle_of(old._fd), self.fuse_ino(old.ino))
            except OSError as e:
                old.handle = None
                if self.pinned < self.budget.pinned:
                    old.pinned = True
                    self.pinned += 1
                    return
                log.warning("inode %d: no file handle (%s): its descriptor is closed, "
                            "ESTALE from now on", old.ino, e)
        if self.parked and old.ino in self.parked and self.on_unpark is not None:
            self.on_unpark(old)
        os.close(old._fd)
        old._fd = -1

    def reopen(self, inode: Inode) -> int:
        if inode.handle is None or inode.handle is LAZY:
            raise OSError(errno.ESTALE, f"inode {inode.ino} has no descriptor")
        fd = lower.open_handle(self.mount_fd, self.unpack(inode.handle, inode.ino))
        self._cache(inode, fd)
        return fd

    def stale(self, inode: Inode) -> bool:
        """An unlinked inode nothing keeps alive: its number may be reused."""
        return inode.unlinked and inode._fd < 0 and inode.opens <= 0

    def unlinking(self, st_ino: int) -> None:
        """The last link of backing inode ``st_ino`` is about to go: an open
        one gets its descriptor back now, while its file handle still opens
        it (an unlinked inode's does not), so that ``keep`` holds the file
        for its readers (a reader's handle may have no descriptor of its
        own: ``ops.LazyHandle``)."""
        inode = self.inodes.get(self.fuse_ino(st_ino))
        if inode is not None and inode.opens > 0 and inode._fd < 0:
            try:
                self.reopen(inode)
            except OSError:
                pass                      # gone already: nothing to hold

    def keep(self, inode: Inode) -> None:
        """``inode`` lost its last name: pin its descriptor so that it stays alive
        for the kernel references to it (within ``Budget.pinned``; past it
        too for an inode with open handles, which ``Budget.files`` bounds:
        its handles may have no descriptor of their own)."""
        if inode._flags & 1:              # pinned already
            return
        if self.pinned >= self.budget.pinned and inode.opens <= 0:
            if not self._warned_pins:
                self._warned_pins = True
                log.warning("more than %d unlinked inodes held at once: further ones "
                            "are not kept alive (ESTALE once evicted)", self.budget.pinned)
            return
        if inode._fd < 0:
            try:
                self.reopen(inode)
            except OSError:
                return            # already gone
        del self.lru[inode.ino]
        inode._flags |= 1                 # pinned
        self.pinned += 1

    # ---- references ----------------------------------------------------------------

    def adopt(self, fd: int, st: os.stat_result) -> Inode:
        """Count one kernel reference to the inode behind ``fd`` (which the table
        now owns: kept as its descriptor, or closed)."""
        ino = st.st_ino
        if ino == self.root_ino or ino == ROOT:
            ino = self.fuse_ino(ino)
        inodes = self.inodes
        inode = inodes.get(ino)
        if inode is None:
            # a new record (the hot path: written out, no helper calls)
            handle = LAZY if self.file_handles else None
            if handle is None and self.pinned >= self.budget.pinned:
                os.close(fd)
                raise OSError(errno.ENFILE, "inode descriptor budget exhausted")
            inode = inodes[ino] = self.Inode(ino, st, handle)
            n = len(inodes) - 1               # the root is not counted
            if n > self.peak:
                self.peak = n
            if n > self.max_inodes and not self.full and self.on_full is not None:
                self.full = True
                self.on_full()
            if handle is not None:
                inode._fd = fd
                lru = self.lru
                lru[ino] = inode
                if len(lru) > self.budget.cached:
                    self._shrink()
            else:
                inode._fd = fd
                inode.pinned = True
                self.pinned += 1
            inode.lookups = 1
            return inode
        if inode._flags & 2 and inode._fd < 0 and inode.opens <= 0:     # stale()
            # the backing filesystem reused a dead inode's number: a new
            # generation of it (the kernel then drops what it still holds of
            # the old one instead of taking one for the other)
            if self.on_reused is not None:
                self.on_reused(inode)
            inode.reset(st)
            inode._flags += 16
            if inode.handle is not None:
                inode.handle = LAZY       # made again when its descriptor goes
        elif inode._fd < 0 and inode.handle is not None:
            # No descriptor of ours kept the backing inode alive: its number
            # may have been reused behind the mount (removed from the host's
            # side, made anew).  Another file handle is another inode: a new
            # generation (its charge stays with the record, as the next
            # reconcile corrects it; a recount makes it exact).
            try:
                handle = self._handle_of(fd, st)
            except OSError:
                handle = inode.handle
            if handle != inode.handle:
                inode.handle = handle
                inode.mode = self.share(st.st_mode)
                inode._flags += 16
        del inodes[ino]                   # recent(): the last to be pruned
        inodes[ino] = inode
        if inode._fd >= 0:
            os.close(fd)
        elif inode.handle is not None:
            self._cache(inode, fd)
        else:
            inode._fd = fd
            inode.pinned = True
            self.pinned += 1
        inode.lookups += 1
        return inode

    def ref(self, inode: Inode) -> None:
        """Count one more kernel reference to a known ``inode`` (a readdirplus
        entry, a hard link made through the mount)."""
        inode.lookups += 1
        self.recent(inode)

    def recent(self, inode: Inode) -> None:
        """``inode`` was looked up again: the last to be pruned (see max_inodes)."""
        inodes = self.inodes
        del inodes[inode.ino]
        inodes[inode.ino] = inode

    def over(self) -> int:
        """How many inodes a prune should have the kernel forget now: down to
        1/``prune_slack`` below the cap once past it (the root is not counted)."""
        n = len(self.inodes) - 1
        if n <= self.max_inodes:
            return 0
        return n - (self.max_inodes - self.max_inodes // self.prune_slack)

    def oldest(self, n: int, prunable: Callable[[Inode], bool]) -> list[int]:
        """Up to ``n`` numbers of the least recently looked-up inodes for which
        ``prunable`` holds; every inode looked at (taken or not) moves to the
        end, so the next call looks at others."""
        out: list[int] = []
        seen: list[Inode] = []
        for inode in self.inodes.values():
            if len(out) >= n or len(seen) >= 4 * n:
                break
            seen.append(inode)
            if (inode.ino != ROOT and inode.lookups > 0 and inode.opens <= 0
                    and not inode.pinned and not inode.unlinked and prunable(inode)):
                out.append(inode.ino)
        for inode in seen:
            self.recent(inode)
        return out

    def lookup(self, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        """Resolve one name in ``parent`` and count a kernel reference to it."""
        if name == b"." or (name == b".." and parent.ino == ROOT):
            st = os.fstat(parent.fd)
            self.ref(parent)
            return parent, st
        pfd = parent._fd                  # parent.fd, inlined (hot)
        if pfd < 0:
            pfd = self.reopen(parent)
        elif not parent._flags & 1:
            self.lru.move_to_end(parent.ino)
        fd = os.open(name, OPATH_FLAGS, dir_fd=pfd)     # open_path
        try:
            st = os.fstat(fd)
            if st.st_dev != self.dev:
                self.check_dev(st)
        except BaseException:
            os.close(fd)
            raise
        return self.adopt(fd, st), st

    def forget(self, ino: int, n: int) -> Inode | None:
        """Drop ``n`` kernel references; returns the inode if it left the table."""
        inode = self.inodes.get(ino)
        if inode is None or ino == ROOT:
            return None
        inode.lookups -= n
        if inode.lookups > 0:
            return None
        return self._let_go(inode)

    def opened(self, inode: Inode) -> None:
        """An open handle of ``inode`` was made."""
        inode.opens += 1

    def closed(self, inode: Inode) -> Inode | None:
        """One of its open handles was released; returns the inode if it left."""
        inode.opens -= 1
        if inode.opens > 0 or inode.lookups > 0:
            return None
        return self._let_go(inode)

    def hold(self, inode: Inode) -> None:
        """Keep ``inode`` in the table although the kernel let go (the ledger:
        its charge is not complete yet)."""
        inode.held = True

    def unhold(self, inode: Inode) -> Inode | None:
        """End ``hold``; returns the inode if it left the table."""
        if not inode.held:
            return None
        inode.held = False
        return self._let_go(inode)

    def _let_go(self, inode: Inode) -> Inode | None:
        """The one place where an inode leaves the table: when nothing refers
        to it (no kernel lookup, no open handle, no hold) and ``on_leave``
        does not keep it."""
        if (inode.lookups > 0 or inode.opens > 0 or inode._flags & 8
                or self.inodes.get(inode.ino) is not inode):
            return None
        if self.on_leave is not None and self.on_leave(inode):
            return None
        self.drop(inode)
        if self.on_dropped is not None:
            self.on_dropped(inode)
        return inode

    def drop(self, inode: Inode) -> None:
        if self.parked and inode.ino in self.parked and self.on_unpark is not None:
            self.on_unpark(inode)
        del self.inodes[inode.ino]
        self.dropped += 1
        flags = inode._flags              # the flags read and written directly: hot
        if flags & 1:                     # pinned
            inode._flags = flags & ~1
            self.pinned -= 1
        else:
            self.lru.pop(inode.ino, None)
        if inode._fd >= 0:
            if flags & 2 and self.closer is not None:      # unlinked
                self.closer.close(inode._fd)
            else:
                os.close(inode._fd)
            inode._fd = -1

    def close_all(self) -> None:
        self.on_unpark = None     # the kernel frees backing ids with the connection
        for inode in list(self.inodes.values()):
            if inode.ino != ROOT:
                self.drop(inode)
        os.close(self.mount_fd)
