"""The kernel's I/O mode of each open file, as the daemon answered its opens.

Role: decide, per open, whether the kernel reads a regular file itself from
the backing file (FUSE passthrough: FOPEN_PASSTHROUGH with a backing id) or
sends its reads to the daemon through the FUSE page cache (the caching mode),
and keep the one backing id all passthrough opens of an inode share.  Knows
nothing of quotas: an open for writing is simply never passthrough (its
writes must come to the daemon to be reserved and charged).

The kernel keeps one io mode per inode (fs/fuse/iomode.c, 6.18): while a
passthrough open of it exists, an open answered without FOPEN_PASSTHROUGH
fails (EIO, "FOPEN_PASSTHROUGH expected"), FOPEN_DIRECT_IO or not; while an
open in the caching mode exists (no DIRECT_IO, no PASSTHROUGH; or a direct_io
file with a shared mmap), a passthrough open fails.  Even with
FOPEN_DIRECT_IO (reads and writes to the daemon) a passthrough file's mmap
goes to the backing file, where a shared writable mapping would fill holes
unseen.  So, per open:

* a read-only open by the file's owner or by root is passthrough unless the
  inode has a caching-mode open (then it is one itself, as without
  passthrough);
* an open for writing (or with O_TRUNC) is refused with ETXTBSY while the
  inode has a passthrough open, as for a running program, and is otherwise a
  caching one.

Only the owner and root: a passthrough reader holds off every writer, which
locally only the owner may do (a read lease, F_SETLEASE), so no user can keep
others from writing a file that is merely readable to him.

Concurrency: called from the plain (never awaiting) open, create, tmpfile and
release handlers on the request loop's thread, so a decision and the reply
that carries it are one step: the counts here and the kernel's modes never
disagree, except that the kernel leaves a mode before it sends RELEASE, so the
counts can only lag on the side of a refusal.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from fusewire import kernel

log = logging.getLogger(__name__)


class IoModes:
    """Passthrough and caching opens per inode number, and their backing ids.

    ``enabled`` is set by the mount (a read-only mount, or ``-o passthrough``)
    when it asks the kernel for passthrough; it goes off again if the kernel
    cannot do it at all.  Handles carry ``backing`` (their backing id, 0 if
    none) and ``cached`` (in the caching mode)."""

    __slots__ = ("enabled", "passthrough", "backing", "cached")

    def __init__(self) -> None:
        self.enabled = False
        self.passthrough: dict[int, int] = {}   # inode -> its passthrough handles
        self.backing: dict[int, int] = {}       # inode -> its backing id
        self.cached: dict[int, int] = {}        # inode -> its caching-mode handles

    def busy(self, ino: int) -> bool:
        """Whether a passthrough handle has inode ``ino`` (the kernel must not
        be asked to forget it)."""
        return ino in self.passthrough

    def decide(self, node, flags: int, uid: int) -> bool:
        """Whether an open of ``node`` with ``flags`` by ``uid`` is answered
        passthrough; raises ETXTBSY for a writer while passthrough readers
        have it (before anything is done for the open)."""
        if not self.enabled or not stat.S_ISREG(node.mode):
            return False
        if flags & os.O_ACCMODE == os.O_RDONLY and not flags & os.O_TRUNC:
            return (uid == 0 or uid == node.uid) and not self.cached.get(node.ino)
        if self.passthrough.get(node.ino):
            raise OSError(errno.ETXTBSY, "open for reading by passthrough")
        return False

    def caching(self, h) -> None:
        """Handle ``h`` was answered in the caching mode."""
        h.cached = True
        ino = h.inode.ino
        self.cached[ino] = self.cached.get(ino, 0) + 1

    def backing_for(self, channel, h) -> int:
        """The backing id of ``h``'s inode for one more passthrough handle
        ``h``: one per inode (the kernel refuses a second backing file for an
        inode, EBUSY), registered at its first passthrough open with that
        open's descriptor and closed at its last release.  0 if the kernel
        refuses it: this file is then served by the daemon (per file: a
        backing it cannot stack on, ELOOP; or passthrough off altogether)."""
        ino = h.inode.ino
        bid = self.backing.get(ino, 0)
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
            self.backing[ino] = bid
        h.backing = bid
        self.passthrough[ino] = self.passthrough.get(ino, 0) + 1
        return bid

    def released(self, channel, h) -> None:
        """Handle ``h`` was released: the last passthrough handle of an inode
        closes its backing id."""
        ino = h.inode.ino
        if h.backing:
            left = self.passthrough.pop(ino) - 1
            if left:
                self.passthrough[ino] = left
                return
            bid = self.backing.pop(ino)           # the last one: its backing id goes
            try:
                channel.backing_close(bid)
            except OSError as e:
                log.warning("closing passthrough backing id %d: %s", bid, e)
        elif h.cached:
            left = self.cached.pop(ino) - 1
            if left:
                self.cached[ino] = left
