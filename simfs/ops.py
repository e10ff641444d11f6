"""The FUSE request handlers: translate each request into calls on the backing
tree (``lower``, ``inodes``), with the ledger's calls around each that may
allocate.

Role: translation only, as libfuse's passthrough_hp: resolve the request's
numbers to records (``InodeTable``, ``handles``), make the backing system
call, build the reply.  Each handler that may allocate calls the ledger
(``simfs.ledger``) before the backing call (reserve: EDQUOT, or ENOSPC at the
host's root reserve, from the call itself) and after it (commit what the
backing filesystem really allocated, or release on failure); unlink, rmdir
and rename-over tell it what lost its last name; release tells it of a last
close.  Everything about charges (late allocations, gaps, the root reserve,
directory growth) is the ledger's; who may set the quota from inside and
what the caller sees of it (``user.vzquota``) are vzquota's.

Invariants (each allocating handler is a plain function, so no await can be
written inside it):
1. reserve, then the backing call, then commit or release: no await between,
   so no other request sees a charge half done;
2. the table alone counts lookups, opens and holds, and decides when an inode
   leaves it (the ledger charges it for good then);
3. every handler goes through ``errno_boundary`` (simfs.boundary), the one
   place where ``OSError`` becomes its errno, a quota refusal ``EDQUOT`` and
   anything unexpected ``EIO`` (logged with its traceback), and where a live
   recount holds or watches requests;
4. whether the kernel reads a file itself (passthrough) or through the daemon
   is decided per open by ``simfs.iomode``, in the same plain call as the
   reply that carries it.

It also counts the requests answered per operation (``counts``, shown to the
host's root as the virtual ``trusted.simfs.requests`` attribute of the root).
Missing names are answered as negative entries the kernel caches, and FLUSH
with ENOSYS (the kernel then stops sending it): fewer round trips.

Concurrency: the binding (simfs.binding) runs handlers on one event loop on
one thread.  Handlers do their backing I/O inline (pread/pwrite are fast and
offloading measured slower), except fsync and the part of a large read the
page cache cannot serve at once, which go to a worker thread (reads touch no
quota state).  The kernel write-back cache stays off so that ``EDQUOT`` is
returned by write(2) itself.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import resource
import stat
import time
from dataclasses import dataclass
from typing import Callable


import fusewire
from fusewire import FUSEError, get_sup_groups, readdir_reply

from vzquota.engine import QuotaEngine
from vzquota.inside import ADMIN_XATTR, caller_view, refuse_without_quota

from . import lower
from .boundary import MUTATING, errno_boundary
from . import iomode
from .iomode import IoModes
from .ledger import Ledger, in_thread
from .privs import inherited_acl, keep_made_mode, kill_privs
from .prune import Pruner
from .config import DEFAULT, Config
from .inodes import ROOT, Budget, Inode, InodeTable, OpenShares
from .statfs import host_figures, quota_figures

log = logging.getLogger(__name__)

_from_stat = fusewire.EntryAttributes.from_stat
_negative = fusewire.EntryAttributes.negative

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


@dataclass
class Handle:
    fd: int
    inode: Inode
    user: bool = False      # opened by a non-root caller: kept out of the root reserve
    wrote: bool = False     # written through: its allocation forced at its last release
    trim: bool = False      # XFS file without exact allocation: trimmed after each write
    uid: int = 0            # who opened it (its share of the budget: OpenShares)
    backing: int = 0        # passthrough backing id (reads bypass the daemon), 0 if none
    cached: bool = False    # in the kernel's caching io mode (not passthrough, not direct_io)
    gid: int = 0            # the opener's group and process (whose groups decide whether
    pid: int = 0            # a write clears a set-group-ID that is not group-executable)


class LazyHandle(Handle):
    """A reader's handle of a regular file that needs no descriptor of its
    own at its open: a passthrough one whose inode has a backing id already
    (another reader's, or one parked since its last release;
    ``IoModes.ready``: the kernel reads the file by that id), or one read
    through the page cache (a small file, or passthrough off: a hot file's
    reads are answered by the kernel's cache, keep_cache).  One is opened at
    the first use of ``fd`` (a READ, an lseek, an fsync, the source of a
    copy_file_range), with the open's flags; none, and no close, for an open
    that reads nothing from the daemon (3.8 µs saved per open and close)."""

    def __init__(self, inode: Inode, flags: int, user: bool, uid: int, gid: int,
                 pid: int) -> None:
        self.inode, self.flags, self.user = inode, flags, user
        self.uid, self.gid, self.pid = uid, gid, pid

    def __getattr__(self, name: str):
        # only for ``fd`` (every other field has its class default): the
        # descriptor, opened now and kept in the instance from then on
        if name != "fd":
            raise AttributeError(name)
        fd = self.fd = lower.reopen(self.inode.fd, self.flags)
        return fd


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
    # privs.kill_privs), POSIX_ACL (the kernel enforces ACLs; SETXATTR_EXT carries
    # its kill-sgid flag for an ACL change) and DONT_MASK (the kernel sends a
    # new node's mode unmasked with the umask beside it, so that a default ACL
    # replaces the umask as on a local filesystem: see privs.inherited_acl)
    fuse_want = (fusewire.kernel.HANDLE_KILLPRIV_V2 | fusewire.kernel.POSIX_ACL
                 | fusewire.kernel.SETXATTR_EXT | fusewire.kernel.DONT_MASK)
    # the fusewire.Session serving the mount (set by simfs.binding; None under
    # pyfuse3 and in unit tests): passthrough backing ids, notifications
    channel = None
    # under pyfuse3: notify_attrs(ino) makes the kernel drop the attributes it
    # holds of inode ino (set by simfs.binding; see _attrs_changed)
    notify_attrs = None

    @property
    def _killpriv(self) -> bool:
        """The kernel flags the calls that must clear set-user-ID (fusewire
        with HANDLE_KILLPRIV_V2 negotiated)."""
        ch = self.channel
        return ch is not None and bool(ch.negotiated & fusewire.kernel.HANDLE_KILLPRIV_V2)

    def _attrs_changed(self, node: Inode) -> None:
        """The daemon changed ``node``'s mode where no reply carries it (a kill
        at an open with O_TRUNC, a write, an ACL): the kernel would keep the
        mode it holds until its attribute timeout, and show it to a stat that
        asks for the mode only (statx STATX_MODE: ``stat -c %a``): make it
        drop its attributes now."""
        try:
            if self.channel is not None:
                self.channel.invalidate_inode(node.ino, -1, 0)     # attributes only
            elif self.notify_attrs is not None:
                self.notify_attrs(node.ino)
        except OSError:             # ENOENT: the kernel has let the inode go
            pass

    def __init__(self, root_fd: int, config: Config = DEFAULT):
        self.config = config
        # entry and attribute cache time (every change comes through us), and
        # the size from which a read the page cache cannot serve goes to a thread
        self.timeout = config.entry_timeout
        self.read_nowait = config.read_nowait
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.table = InodeTable(root_fd, Budget.plan(limit, config), config=config)
        self.pruner = Pruner(self.table, lambda: self.channel, self._kept, config)
        self.shares = OpenShares(self.table.budget.files, config)
        self.bsize = os.fstatvfs(root_fd).f_bsize or 4096
        # the charges per inode (it hears from the table when one leaves)
        self.ledger = Ledger(self.table, self.bsize,
                             lower.fs_magic(root_fd) == lower.XFS_SUPER_MAGIC, config=config)
        self._nowait = True       # the backing filesystem takes RWF_NOWAIT reads
        # and RWF_DONTCACHE ones (0 once it has refused one: btrfs, tmpfs)
        self._dontcache = lower.RWF_DONTCACHE
        self.handles: dict[int, Handle | DirHandle] = {}
        self._next_fh = 1
        # FUSE requests answered, per operation (a dict increment per request;
        # read through COUNTS_XATTR by tools/bench.py)
        self.counts: collections.Counter[str] = collections.Counter()
        # simfs's own -o values this mount runs with (OPTIONS_XATTR; set by simfs/daemon.py)
        self.mount_options: dict = {}
        # the kernel's io mode of each open file: passthrough or caching
        # (simfs.iomode; enabled by the mount unless -o nopassthrough)
        self.iomodes = IoModes(config.backing_parked)
        # what a shared passthrough mapping frees stays charged while it may
        # fill it again unseen (simfs.iomode ``mapped``)
        self.ledger.pinned = self.iomodes.mapped
        # a parked backing id lives no longer than its record's descriptor
        self.table.parked = self.iomodes.parked
        self.table.on_unpark = lambda node: self.iomodes.unpark(self.channel, node.ino)
        # directories known to have no default ACL: inode -> (its record, until)
        self._no_default_acl: dict[int, tuple[Inode, float]] = {}
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

    @property
    def quota(self) -> QuotaEngine | None:
        """The mount's quota engine (None: quota off), held by the ledger."""
        return self.ledger.quota

    @quota.setter
    def quota(self, engine: QuotaEngine | None) -> None:
        self.ledger.quota = engine

    # ---- helpers -------------------------------------------------------------

    def _attrs(self, st: os.stat_result, ino: int | None = None,
               generation: int = 0) -> fusewire.EntryAttributes:
        return fusewire.EntryAttributes.from_stat(
            st, self.table.fuse_ino(st.st_ino) if ino is None else ino, self.timeout,
            generation)

    def _entry(self, inode: Inode, st: os.stat_result) -> fusewire.EntryAttributes:
        """An entry reply: the inode's number and generation (a number the
        backing filesystem reused is a new generation), with ``st``."""
        return fusewire.EntryAttributes.from_stat(st, inode.ino, self.timeout,
                                                  inode._flags >> 4)

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

    def _new_owner(self, parent: Inode, ctx) -> tuple[int, int]:
        """uid, gid of a new node: the caller's, or the setgid parent's group."""
        pst = os.fstat(parent.fd)
        if pst.st_mode & stat.S_ISGID:
            return ctx.uid, pst.st_gid
        return ctx.uid, ctx.gid

    def _make_node(self, parent: Inode, name: bytes, ctx, space: int,
                   make: Callable[[int, int], None]) -> tuple[Inode, os.stat_result]:
        """Run ``make(uid, gid)``, which creates ``name`` in ``parent``, give the
        node to the caller, and adopt it; the ledger reserves one inode (and
        ``space``) before and charges what it took after."""
        self.table.need_room()
        uid, gid = self._new_owner(parent, ctx)
        led = self.ledger
        held = led.before_node(parent, ctx.uid, uid, gid, space)
        try:
            make(uid, gid)
            try:
                os.chown(name, uid, gid, dir_fd=parent.fd, follow_symlinks=False)
                fd = lower.open_path(name, parent.fd)
            except BaseException:
                self._unmake(parent, name)
                raise
        except BaseException:
            led.failed_node(held)
            raise
        st = os.fstat(fd)
        inode = self.table.adopt(fd, st)
        led.after_node(parent, inode, st, held)
        return inode, st

    @staticmethod
    def _unmake(parent: Inode, name: bytes) -> None:
        try:
            os.unlink(name, dir_fd=parent.fd)
        except IsADirectoryError:
            os.rmdir(name, dir_fd=parent.fd)
        except OSError:
            pass

    def _last_link(self, st: os.stat_result) -> bool:
        return stat.S_ISDIR(st.st_mode) or st.st_nlink <= 1

    # ---- the cap on inodes (InodeTable.max_inodes) ----------------------------

    def _kept(self, inode: Inode) -> bool:
        """Whether the kernel must not be asked to forget ``inode`` (beyond
        the table's own test): the ledger follows it, or a passthrough handle
        has it."""
        return self.ledger.busy(inode) or self.iomodes.busy(inode.ino)

    def _unmapped(self, node: Inode) -> bool:
        """End the ``mapped`` mark of ``node`` (simfs.iomode) if no handle has
        it and no one holds its backing file open for writing (no shared
        writable mapping can exist then); whether it is still marked."""
        if node.ino not in self.iomodes.mapped:
            return False
        if node.opens:
            return True
        try:
            fd = lower.reopen(node.fd, os.O_RDONLY)
        except OSError:
            return True                   # cannot tell: it stays
        try:
            if iomode.written(fd):
                return True
        finally:
            os.close(fd)
        self.iomodes.mapped.discard(node.ino)
        self._mark_ended((node,))
        return False

    def _unopened_mapped(self, ino: int) -> bool:
        """Whether inode ``ino`` is still marked ``mapped`` with no handle."""
        node = self.table.inodes.get(ino)
        return node is not None and node.opens == 0 and ino in self.iomodes.mapped

    def prune(self) -> int:
        """A prune pass now (``Pruner.prune``); how many inodes were asked."""
        return self.pruner.prune()

    def inodes_report(self) -> dict:
        t = self.table
        io = self.iomodes
        return {"inodes": len(t.inodes) - 1, "peak": t.peak, "max": t.max_inodes,
                "pruned": t.pruned, "held": len(self.ledger.held),
                "unsettled": len(self.ledger.followed), "descriptors": t.open_fds(),
                "backing": {"active": len(io.backing), "parked": len(io.parked),
                            "opened": io.opened, "closed": io.closed}}

    def _acl_cost(self, acl: bytes | None, directory: bool) -> int:
        """What inheriting default ACL ``acl`` may allocate: its blocks as an
        access ACL, and again as the default ACL of a directory."""
        if acl is None:
            return 0
        return self.ledger.xattr_cost(acl) * (2 if directory else 1)

    def _acl_inherited(self, parent: Inode) -> bytes | None:
        """The default ACL a node made in ``parent`` inherits (None: none, or
        ACLs not enforced).  That a directory has none is remembered for
        ``entry_timeout`` seconds (as long as the kernel keeps its own
        attributes), per inode record, and forgotten when a default ACL is
        set or removed through the mount: the probe, a getxattr through
        /proc, was most of what a create cost beyond the pyfuse3 mount's."""
        if not self.acl:
            return None
        now = time.monotonic()
        hit = self._no_default_acl.get(parent.ino)
        if hit is not None and hit[0] is parent and hit[1] > now:
            return None
        acl = inherited_acl(parent, True)
        if acl is None:
            cache = self._no_default_acl
            if len(cache) >= self.config.acl_negative:
                cache.clear()             # bounded: start over
            cache[parent.ino] = (parent, now + self.timeout)
        return acl

    # ---- lookup and attributes ---------------------------------------------

    @errno_boundary
    def lookup(self, parent_inode, name, ctx):
        table = self.table
        parent = table.inodes.get(parent_inode) or table.get(parent_inode)
        if name == b".." and parent_inode != ROOT:
            fd = lower.open_path(b"..", parent.fd)
            st = os.fstat(fd)
            inode = table.adopt(fd, st)
            return self._entry(inode, st)
        try:
            inode, st = table.lookup(parent, name)
        except FileNotFoundError:
            # A negative entry the kernel caches as long: a name created
            # through the mount replaces it at once.
            return _negative(self.timeout)
        return _from_stat(st, inode.ino, self.timeout, inode._flags >> 4)   # _entry

    def forget(self, inode_list):
        self.counts["forget"] += 1
        if self.gate is not None:
            self.deferred.extend(inode_list)
            return
        forget = self.table.forget
        for ino, n in inode_list:         # forget_now, inlined
            try:
                forget(ino, n)            # the ledger charges one that leaves
            except Exception:
                log.exception("forget of inode %d failed", ino)
        if self.iomodes.mapped:
            self._mark_ended(self.iomodes.forgotten(self.table,
                                                    (ino for ino, _ in inode_list)))

    def forget_now(self, inode_list) -> None:
        for ino, n in inode_list:
            try:
                self.table.forget(ino, n)   # the ledger charges one that leaves
            except Exception:
                log.exception("forget of inode %d failed", ino)
        if self.iomodes.mapped:
            self._mark_ended(self.iomodes.forgotten(self.table,
                                                    (ino for ino, _ in inode_list)))

    def _mark_ended(self, nodes) -> None:
        """No shared passthrough mapping can write these files any more: what
        such a mapping freed (``Ledger.pinned``) may be credited now."""
        for node in nodes:
            if not node.freed:
                try:
                    self.ledger.changed(node)
                except OSError:           # gone (ESTALE): dropped as it leaves
                    pass

    @errno_boundary
    def getattr(self, inode, ctx):
        table = self.table
        node = table.inodes.get(inode) or table.get(inode)
        return _from_stat(os.fstat(node.fd), node.ino, self.timeout)     # _attrs

    @errno_boundary
    def setattr(self, inode, attr, fields, fh, ctx):
        node = self.table.get(inode)
        h = self.handles.get(fh) if fh is not None else None
        if (fields.update_size and node.ino in self.iomodes.mapped
                and attr.st_size > os.fstat(node.fd).st_size and self._unmapped(node)):
            # the new range would be a hole in a file a SHARED writer may map
            raise OSError(errno.ETXTBSY, "growing a file mapped by passthrough")
        file_gid = None
        if fields.update_uid or fields.update_gid:
            st = os.fstat(node.fd)
            file_gid = st.st_gid
            uid = attr.st_uid if fields.update_uid else st.st_uid
            gid = attr.st_gid if fields.update_gid else st.st_gid
            self.ledger.before_chown(node, uid, gid)
            try:
                lower.fchown_path(node.fd, uid if fields.update_uid else -1,
                                  gid if fields.update_gid else -1)
            except BaseException:
                self.ledger.failed_chown(node, uid, gid)
                raise
            node.uid, node.gid = uid, gid
        if fields.update_mode:
            if stat.S_ISLNK(node.mode):
                raise OSError(errno.EOPNOTSUPP, "chmod of a symlink")
            os.chmod(lower.proc_path(node.fd), stat.S_IMODE(attr.st_mode))
        if fields.update_size:
            self.iomodes.writing(node.ino)
            if isinstance(h, Handle):
                os.ftruncate(h.fd, attr.st_size)
            else:
                fd = lower.reopen(node.fd, os.O_WRONLY)
                try:
                    os.ftruncate(fd, attr.st_size)
                finally:
                    os.close(fd)
        kill = getattr(fields, "kill_suidgid", None)
        if kill is None or not self._killpriv:
            # a binding without HANDLE_KILLPRIV_V2 (pyfuse3): the kernel
            # clears set-user-ID and a group-executable set-group-ID itself;
            # a truncate or chown by anyone but root is checked for the rest
            kill = ctx.uid != 0 and (fields.update_size or fields.update_uid
                                     or fields.update_gid)
        if kill and not fields.update_mode:
            # a truncate by someone without CAP_FSETID, or a chown
            kill_privs(node, os.fstat(node.fd), (ctx.uid, ctx.gid, ctx.pid),
                             file_gid=file_gid)
        if fields.update_atime or fields.update_mtime:
            lower.utimens_path(
                node.fd,
                attr.st_atime_ns if fields.update_atime else None,
                attr.st_mtime_ns if fields.update_mtime else None)
        if fields.update_size:
            self.ledger.changed(node)
        st = os.fstat(node.fd)
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
        return self._entry(inode, keep_made_mode(inode, st, made))

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
            return self._entry(inode, keep_made_mode(inode, st, made))
        # a new directory under a setgid one inherits the bit (parent's mode is cached)
        want = perm | (stat.S_ISGID if parent.mode & stat.S_ISGID else 0)
        if stat.S_IMODE(st.st_mode) != want:
            os.chmod(lower.proc_path(inode.fd), want)
            st = os.fstat(inode.fd)
        return self._entry(inode, st)

    @errno_boundary
    def symlink(self, parent_inode, name, target, ctx):
        parent = self.table.get(parent_inode)
        space = self.bsize if len(target) >= 60 else 0
        inode, st = self._make_node(
            parent, name, ctx, space,
            lambda uid, gid: os.symlink(target, name, dir_fd=parent.fd))
        return self._entry(inode, st)

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
                st = keep_made_mode(inode, st, made)
            elif stat.S_IMODE(st.st_mode) != perm:
                os.chmod(lower.proc_path(inode.fd), perm)
                st = os.fstat(inode.fd)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self.table.opened(inode)
        h = Handle(fds[0], inode, ctx.uid != 0, uid=ctx.uid, gid=ctx.gid, pid=ctx.pid)
        fh = self._new_fh(h)
        self.ledger.opened(h)
        fi = self._file_info(fh, flags)
        if not fi.direct_io:
            self.iomodes.caching(h)
        return fi, self._entry(inode, st)

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
        led = self.ledger
        held = led.before_node(None, ctx.uid, uid, gid, self._acl_cost(acl, False))
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
            led.failed_node(held)
            raise
        st = os.fstat(pfd)
        inode = self.table.adopt(pfd, st)
        led.after_node(None, inode, st, held)
        inode.unlinked = True         # no name: freed when the kernel lets go of it
        self.table.keep(inode)
        self.table.opened(inode)
        h = Handle(fd, inode, ctx.uid != 0, uid=ctx.uid, gid=ctx.gid, pid=ctx.pid)
        fh = self._new_fh(h)
        led.opened(h)
        fi = self._file_info(fh, flags)
        if not fi.direct_io:
            self.iomodes.caching(h)
        return fi, self._entry(inode, st)

    @errno_boundary
    def link(self, inode, new_parent_inode, new_name, ctx):
        node = self.table.get(inode)
        parent = self.table.get(new_parent_inode)
        res = self.ledger.before_name(parent, ctx.uid)
        try:
            lower.link_path(node.fd, parent.fd, new_name)
        except BaseException:
            self.ledger.release(res)
            raise
        st = os.fstat(node.fd)
        self.table.ref(node)
        node.unlinked = False         # an O_TMPFILE file (or one unlinked while open) named again
        self.ledger.after_name(parent, res)
        return self._entry(node, st)

    # ---- removing and renaming --------------------------------------------

    @errno_boundary
    def unlink(self, parent_inode, name, ctx):
        table = self.table
        parent = table.inodes.get(parent_inode) or table.get(parent_inode)
        pfd = parent.fd
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        if st.st_nlink <= 1:
            table.unlinking(st.st_ino)    # an open file stays readable
        os.unlink(name, dir_fd=pfd)
        if st.st_nlink <= 1 or stat.S_ISDIR(st.st_mode):     # _last_link
            self.ledger.unlinked(st)
            if self.iomodes.parked:       # its blocks go when nothing has it open
                self.iomodes.unpark(self.channel, table.fuse_ino(st.st_ino))
        self.ledger.dir_changed(parent)

    @errno_boundary
    def rmdir(self, parent_inode, name, ctx):
        parent = self.table.get(parent_inode)
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        os.rmdir(name, dir_fd=parent.fd)
        self.ledger.unlinked(st)
        self.ledger.dir_changed(parent)

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
            if victim is not None and self._last_link(victim):
                self.table.unlinking(victim.st_ino)   # an open file stays readable
        led = self.ledger
        dres = led.before_name(new, ctx.uid) if adds else None
        wres = None
        try:
            if flags & lower.RENAME_WHITEOUT:
                # the whiteout left at the old name is a new inode of the caller's
                owner = self._new_owner(old, ctx)
                wres = led.reserve(*owner, 0, 1)
            lower.renameat2(old.fd, name_old, new.fd, name_new, flags)
        except BaseException:
            led.release(wres)
            led.release(dres)
            raise
        if flags & lower.RENAME_WHITEOUT:
            self._whiteout(old, name_old, owner, wres)
        if victim is not None and self._last_link(victim):
            led.unlinked(victim)
            if self.iomodes.parked:
                self.iomodes.unpark(self.channel, self.table.fuse_ino(victim.st_ino))
        led.after_name(new, dres)
        if new is not old:
            led.dir_changed(old)

    def _whiteout(self, parent: Inode, name: bytes, owner: tuple[int, int], res) -> None:
        """Give the whiteout a rename left at ``name`` (made by the backing
        filesystem as root) to ``owner`` and charge it as such."""
        try:
            fd = lower.open_path(name, parent.fd)
        except OSError as e:
            self.ledger.release(res)
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
        self.ledger.made(st, res)

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
        io = self.iomodes
        if io.mapped and not node.opens and node.ino in io.mapped:
            self._unmapped(node)          # a mapping left since: the mark stays
        mode = io.decide(node, flags)
        # O_NOFOLLOW would refuse the /proc/self/fd magic link itself (ELOOP):
        # the inode is already resolved without following anything.
        fl = flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT | os.O_NOFOLLOW)
        self._room_for_a_handle(ctx.uid)
        if flags & (os.O_ACCMODE | os.O_TRUNC) == os.O_RDONLY:
            # a reader of a regular file that shares a backing id, or is read
            # through the page cache (small, or no passthrough), needs no
            # descriptor until a request needs one (LazyHandle): a hot file
            # never does
            if mode == iomode.READ and io.ready(node):
                lazy = iomode.READ        # and no size or hole check
            elif stat.S_ISREG(node.mode) and (mode == iomode.CACHING or io.small(node)):
                lazy = iomode.CACHING
            else:
                lazy = -1
            if lazy >= 0:
                self.table.opened(node)
                h = LazyHandle(node, fl, ctx.uid != 0, ctx.uid, ctx.gid, ctx.pid)
                fi = self._file_info(self._new_fh(h), flags)
                if lazy:
                    fi.backing_id = io.backing_for(self.channel, h)
                elif not fi.direct_io:
                    io.caching(h)
                return fi
        else:
            io.writing(node.ino)          # its id, if any, needs a check again
        fd = lower.reopen(node.fd, fl)
        try:
            if mode == iomode.SHARED:     # (an O_TRUNC one has just emptied it)
                io.refuse_sparse(fd)      # before anything else is done for the open
            elif mode == iomode.READ and io.stay_cached(node, fd):
                mode = iomode.CACHING
        except BaseException:
            os.close(fd)
            raise
        self.table.opened(node)
        h = Handle(fd, node, ctx.uid != 0, uid=ctx.uid, gid=ctx.gid, pid=ctx.pid)
        fh = self._new_fh(h)
        if flags & os.O_ACCMODE != os.O_RDONLY and stat.S_ISREG(node.mode):
            self.ledger.opened(h)
        if flags & os.O_TRUNC:
            self.ledger.changed(node, fd)
            # by someone without CAP_FSETID: the kernel's flag says so, or,
            # where the binding has none (pyfuse3: no HANDLE_KILLPRIV_V2, and
            # the kernel leaves an atomic O_TRUNC's kill to the filesystem),
            # anyone but root
            kill = getattr(ctx, "kill_suidgid", None)
            if kill is None or not self._killpriv:
                kill = ctx.uid != 0
            if kill and kill_privs(node, os.fstat(fd), (ctx.uid, ctx.gid, ctx.pid)):
                self._attrs_changed(node)
        fi = self._file_info(fh, flags)
        if mode:
            if mode != iomode.READ:       # its reads and writes come here
                fi.direct_io = True
            fi.backing_id = io.backing_for(self.channel, h, mode == iomode.SHARED)
        if not h.backing and not fi.direct_io:
            io.caching(h)
        return fi

    @errno_boundary
    def read(self, fh, off, size):
        """What the backing page cache holds is answered here, at once; a read
        of ``read_nowait`` bytes or more that must wait for the disk returns an
        awaitable instead (the rest is read in a worker thread), which the
        request loop awaits, so a cold read does not stop the loop and
        readahead's requests reach the disk together.

        A read for a handle in the kernel's caching mode fills the FUSE page
        cache, which then answers the file's reads: the backing file's pages
        it brings in are dropped (RWF_DONTCACHE, where the backing filesystem
        has it), so the page cache holds one copy of what is read, as by
        passthrough.  Pages the backing file had cached already stay."""
        h = self.handles[fh]
        fd = h.fd
        drop = self._dontcache if h.cached else 0
        if size < self.read_nowait or not self._nowait:
            if not drop:
                return os.pread(fd, size, off)
            buf = bytearray(size)
            return memoryview(buf)[:self._preadv(fd, buf, off, drop)]
        buf = bytearray(size)
        try:
            n = self._preadv(fd, buf, off, os.RWF_NOWAIT | drop)
            if n == size or n == 0:       # all of it, or the end of the file
                return memoryview(buf)[:n]
        except BlockingIOError:
            n = 0
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._nowait = False          # the backing filesystem cannot
            n = 0
        return self._read_rest(fd, buf, n, off, drop and self._dontcache)

    def _preadv(self, fd: int, buf, off: int, flags: int) -> int:
        """preadv2 with ``flags``; where the backing filesystem refuses
        RWF_DONTCACHE (EOPNOTSUPP), the mount stops asking for it and the read
        is made without it."""
        try:
            return os.preadv(fd, (buf,), off, flags)
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP or not flags & lower.RWF_DONTCACHE:
                raise
        self._dontcache = 0
        log.info("the backing filesystem refuses RWF_DONTCACHE reads: a file read "
                 "through the FUSE page cache stays cached in the backing file too")
        return os.preadv(fd, (buf,), off, flags & ~lower.RWF_DONTCACHE)

    @staticmethod
    async def _read_rest(fd: int, buf: bytearray, n: int, off: int, flags: int = 0):
        """The part of a read the page cache could not serve, from a worker
        thread (past the errno boundary: its own errors become their errno)."""
        # ``flags`` passed the kernel's check already: the RWF_NOWAIT read
        # before this one had them (its refusal turned RWF_DONTCACHE off)
        try:
            m = await in_thread(os.preadv, fd, (memoryview(buf)[n:],), off + n, flags)
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None
        return memoryview(buf)[:n + m]

    def opened_by_user(self, fh) -> bool:
        """Whether handle ``fh`` was opened by anyone but root: under a binding
        without HANDLE_KILLPRIV_V2 (pyfuse3), its writes are taken as those of
        a caller without CAP_FSETID (``write``'s ``kill_suidgid``)."""
        h = self.handles.get(fh)
        return h is not None and h.uid != 0

    @errno_boundary
    def write(self, fh, off, buf, kill_suidgid: bool = False):
        h = self.handles[fh]
        if self.iomodes.mapped and h.inode.ino in self.iomodes.mapped:
            size = os.fstat(h.fd).st_size
            if off > size:
                return self._write_past_a_gap(h, size, off, buf, kill_suidgid)
        led = self.ledger
        n, res, tree = led.before_write(h, off, len(buf))
        try:
            written = os.pwrite(h.fd, buf if n == len(buf) else buf[:n], off)
        except BaseException:
            led.failed_write(h, res)
            raise
        st = led.after_write(h, res, tree)
        if kill_suidgid:                  # a writer without CAP_FSETID
            if kill_privs(h.inode, st or os.fstat(h.fd), (h.uid, h.gid, h.pid)):
                self._attrs_changed(h.inode)
        return written

    def _write_past_a_gap(self, h: Handle, size: int, off: int, buf, kill_suidgid: bool):
        """A write at ``off`` past the end (``size``) of a file a SHARED writer
        has open (``simfs.iomode``): the gap is written with zeros first, in
        the same reservation, so that the file stays without holes (a shared
        mapping's store into a hole would allocate a block no quota sees).
        EDQUOT when not even the gap and one byte fit; nothing is written
        then.  A gap of more than ``config.gap_zeros`` is refused with
        ETXTBSY, as a truncate that makes such a file longer is: writing its
        zeros would hold the request loop for as long as that takes, and
        allocating it (fallocate) would leave unwritten extents, which a
        store through the mapping splits (tree blocks no request shows) and
        which SEEK_HOLE counts as a hole (a later O_RDWR open beside the
        readers would be refused)."""
        gap = off - size
        if gap > self.config.gap_zeros:
            raise OSError(errno.ETXTBSY, "a gap past the end of a file mapped by passthrough")
        led = self.ledger
        n, res, tree = led.before_write(h, size, gap + len(buf))
        if n <= gap:
            led.release(res)
            err = errno.EDQUOT if led.quota is not None else errno.ENOSPC
            raise OSError(err, os.strerror(err))
        try:
            zeros = bytes(gap)
            pos = size
            while pos < off:
                pos += os.pwrite(h.fd, zeros[pos - size:], pos)
            written = os.pwrite(h.fd, buf if n - gap == len(buf) else buf[:n - gap], off)
        except BaseException:
            led.failed_write(h, res)
            raise
        st = led.after_write(h, res, tree)
        if kill_suidgid:
            if kill_privs(h.inode, st or os.fstat(h.fd), (h.uid, h.gid, h.pid)):
                self._attrs_changed(h.inode)
        return written

    @errno_boundary
    def fallocate(self, fh, mode, off, length, ctx=None):
        """fallocate(2) with its modes, at both quota levels: the ledger
        reserves the blocks the range may take before the call (EDQUOT, or
        ENOSPC at the host's root reserve, before anything is allocated) and
        commits what the file really gained or lost after (a punch or a
        collapse credits).  A mode the backing filesystem lacks fails with
        its own EOPNOTSUPP, charging nothing.  As on a local filesystem, a
        caller without CAP_FSETID (``ctx``: anyone but root) takes the file's
        set-user-ID and set-group-ID bits with it: the FALLOCATE request
        carries no kill flag, so under HANDLE_KILLPRIV_V2 that is the
        daemon's to do (``privs.kill_privs``)."""
        h = self.handles[fh]
        if off < 0 or length <= 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if self.iomodes.mapped and h.inode.ino in self.iomodes.mapped and (
                mode & (lower.FALLOC_FL_PUNCH_HOLE | lower.FALLOC_FL_INSERT_RANGE
                        | lower.FALLOC_FL_ZERO_RANGE)
                or not mode & lower.FALLOC_FL_KEEP_SIZE and off > os.fstat(h.fd).st_size):
            # a hole in a file a SHARED writer may map (simfs.iomode); a
            # zeroed range is one too: ext4 and XFS make it unwritten, and a
            # store into it through the mapping splits extents, allocating
            # tree blocks no request shows
            raise OSError(errno.EOPNOTSUPP, "a hole while the file is mapped by passthrough")
        led = self.ledger
        res = led.before_fallocate(h, mode, off, length)
        try:
            lower.fallocate(h.fd, mode, off, length)
        except BaseException:
            led.failed_write(h, res)
            raise
        st = led.after_write(h, res)
        if ctx is not None and ctx.uid != 0:
            if kill_privs(h.inode, st or os.fstat(h.fd), (ctx.uid, ctx.gid, ctx.pid)):
                self._attrs_changed(h.inode)

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
        them): a short copy when only a prefix fits, EDQUOT when nothing
        does."""
        if flags:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        src = self.handles[fh_in]
        h = self.handles[fh_out]
        if self.iomodes.mapped and h.inode.ino in self.iomodes.mapped:
            # a reflink or a copy past the end could leave holes in a file a
            # SHARED writer may map (simfs.iomode): the kernel's fallback
            # (splice_copy_file_range) copies by plain writes instead
            raise OSError(errno.EOPNOTSUPP, "copy into a file mapped by passthrough")
        # nothing is copied past the end of the source
        n = max(0, min(length, os.fstat(src.fd).st_size - off_in))
        if n == 0:
            return os.copy_file_range(src.fd, h.fd, 0, off_in, off_out)
        led = self.ledger
        n, res, tree = led.before_write(h, off_out, n)
        try:
            copied = os.copy_file_range(src.fd, h.fd, n, off_in, off_out)
        except BaseException:
            led.failed_write(h, res)
            raise
        led.after_write(h, res, tree)
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
        fd = h.__dict__.get("fd", -1)     # -1: a LazyHandle that never opened one
        try:
            if node.opens == 1:
                self.ledger.closing(h, node.fd if fd < 0 else fd)
        finally:
            self.iomodes.released(self.channel, h)
            if fd >= 0:
                os.close(fd)
            self.table.closed(node)
            if node.opens == 0 and node.ino in self.iomodes.mapped:
                # no handle of a file a shared writer had: ask the kernel to
                # forget it, which it does unless a mapping still holds it;
                # its FORGET ends the mark (IoModes.forgotten)
                self.pruner.forget_soon(node.ino, self._unopened_mapped)

    @errno_boundary
    async def fsync(self, fh, datasync):
        h = self.handles[fh]
        await in_thread(os.fdatasync if datasync else os.fsync, h.fd)
        self.ledger.changed(h.inode, h.fd)

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
                    # adopt takes a stale record anew, as a new generation
                    gen = 0 if inode is None else (inode._flags >> 4) + 1
                else:
                    gen = inode._flags >> 4
            except FileNotFoundError:
                h.pos += reclen             # gone since getdents saw it
                continue
            if st.st_dev != table.dev:      # a mount point: hidden
                if fd >= 0:
                    os.close(fd)
                h.pos += reclen
                continue
            try:
                taken = readdir_reply(token, name, self._attrs(st, None, gen), d_off)
            except Exception:
                # an entry that cannot be encoded: the ones before it are
                # counted and go out (the kernel asks again from this one);
                # as the first, the listing fails (EIO), nothing counted
                if fd >= 0:
                    os.close(fd)
                if emitted:
                    log.exception("readdir: entry %r cannot be encoded", name)
                    return
                raise
            if not taken:
                if fd >= 0:
                    os.close(fd)
                return
            emitted = True
            h.pos += reclen
            h.off = d_off
            if fd >= 0:
                table.adopt(fd, st)
            else:
                table.ref(inode)

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
        q = self.ledger.quota
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
        if name == ACL_DEFAULT:
            self._no_default_acl.pop(node.ino, None)
        led = self.ledger
        cost = led.xattr_cost(value)
        led.host_check(ctx.uid, cost)
        res = led.reserve(node.uid, node.gid, cost)
        # XATTR_CREATE / XATTR_REPLACE as the caller asked (the fusewire
        # context; pyfuse3 checks them itself).  An access ACL
        # (set through the kernel's ACL code, with neither flag) also sets the
        # mode: the backing filesystem puts the ACL's mask in the group bits,
        # as it does locally.
        flags = getattr(ctx, "flags", 0) & (os.XATTR_CREATE | os.XATTR_REPLACE)
        try:
            os.setxattr(self._xattr_path(node), name, value, flags)
        finally:
            led.release(res)
        led.changed(node)
        if getattr(ctx, "kill_suidgid", False) and name == ACL_ACCESS:
            # set by someone neither in the file's group nor CAP_FSETID
            if kill_privs(node, os.fstat(node.fd), None, acl=True):
                self._attrs_changed(node)

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
            return json.dumps(dict(self.mount_options,
                                   passthrough_in_use=self.iomodes.enabled),
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
        if name == ACL_DEFAULT:
            self._no_default_acl.pop(node.ino, None)
        os.removexattr(self._xattr_path(node), name)
        self.ledger.changed(node)

    def quota_report(self, ctx) -> bytes:
        """The caller's own view of the quota (QUOTA_XATTR), as JSON."""
        if self.quota is None:
            raise OSError(errno.ENODATA, "quota is off")
        return caller_view(self.quota, self.admin, ctx.uid, ctx.gid,
                           lambda: get_sup_groups(ctx.pid))
