"""The inode table: every backing inode the kernel knows, by (st_dev, st_ino).

Role: maps FUSE inode numbers to ``Inode`` records that hold an ``O_PATH``
descriptor of the backing inode (so a rename in the backing tree never leaves a
stale path), the kernel's lookup count, the number of open handles, and what
the quota charged for the inode (its owner and allocated bytes).

FUSE inode numbers are the backing ``st_ino`` except that the private area's
root is 1 (``pyfuse3.ROOT_INODE``) and a backing inode numbered 1 takes the
root's number: a bijection, so numbers are stable across lookups and hard links
share one inode.  While an ``Inode`` exists its ``O_PATH`` descriptor keeps the
backing inode alive, so its number cannot be reused under us.

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
import stat
import threading

from .lower import open_path

log = logging.getLogger(__name__)

ROOT = 1


class Inode:
    __slots__ = ("ino", "fd", "lookups", "opens", "space", "uid", "gid", "mode",
                 "unlinked", "freed")

    def __init__(self, ino: int, fd: int, st: os.stat_result):
        self.ino = ino
        self.fd = fd              # O_PATH|O_NOFOLLOW descriptor of the backing inode
        self.lookups = 0          # kernel lookup count
        self.opens = 0            # open file handles
        self.space = st.st_blocks * 512   # allocated bytes, as last charged
        self.uid = st.st_uid      # owner the quota charges
        self.gid = st.st_gid
        self.mode = st.st_mode
        self.unlinked = False     # its last name is gone
        self.freed = False        # and the quota has given back what it held

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class Closer:
    """Closes the descriptors of unlinked inodes in one worker thread.  The last
    close of an unlinked backing inode is where the backing filesystem frees it
    (ext4 truncates and evicts it inside close(2)): about a quarter of the
    daemon's time under ``rm``, serialised with every other request when done on
    the loop.  The thread only ever closes descriptors the table gave up; the
    queue holds no more of them than the table held."""

    IDLE = 1.0      # seconds without work before the thread ends (a process
                    # without threads may fork: see vzquota.scan)

    def __init__(self):
        self._q: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def close(self, fd: int) -> None:
        self._q.put(fd)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="simfs-closer",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                fd = self._q.get(timeout=self.IDLE)
            except queue.Empty:
                with self._lock:
                    if self._q.empty():
                        self._thread = None
                        return
                continue
            try:
                os.close(fd)
            except OSError as e:
                log.warning("closing the descriptor of an unlinked inode: %s", e)



class InodeTable:
    def __init__(self, root_fd: int):
        st = os.fstat(root_fd)
        self.dev = st.st_dev
        self.root_ino = st.st_ino
        self.inodes: dict[int, Inode] = {}
        # the daemon sets one (Mount.prepare); without it (unit tests, tools)
        # every descriptor is closed inline
        self.closer: Closer | None = None
        root = Inode(ROOT, root_fd, st)
        root.lookups = 1 << 62    # never forgotten
        self.inodes[ROOT] = root

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

    def adopt(self, fd: int, st: os.stat_result) -> Inode:
        """Count one kernel reference to the inode behind ``fd`` (which the table
        now owns: it is closed if the inode is already known)."""
        ino = self.fuse_ino(st.st_ino)
        inode = self.inodes.get(ino)
        if inode is None:
            inode = self.inodes[ino] = Inode(ino, fd, st)
        else:
            os.close(fd)
        inode.lookups += 1
        return inode

    def lookup(self, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        """Resolve one name in ``parent`` and count a kernel reference to it."""
        if name == b"." or (name == b".." and parent.ino == ROOT):
            st = os.fstat(parent.fd)
            parent.lookups += 1
            return parent, st
        fd = open_path(name, parent.fd)
        try:
            st = os.fstat(fd)
            self.check_dev(st)
        except BaseException:
            os.close(fd)
            raise
        return self.adopt(fd, st), st

    def forget(self, ino: int, n: int) -> Inode | None:
        """Drop ``n`` kernel references; returns the inode if it is now unused."""
        inode = self.inodes.get(ino)
        if inode is None or ino == ROOT:
            return None
        inode.lookups -= n
        if inode.lookups <= 0 and inode.opens <= 0:
            self.drop(inode)
            return inode
        return None

    def drop(self, inode: Inode) -> None:
        del self.inodes[inode.ino]
        if inode.unlinked and self.closer is not None:
            self.closer.close(inode.fd)
        else:
            os.close(inode.fd)

    def close_all(self) -> None:
        for inode in list(self.inodes.values()):
            if inode.ino != ROOT:
                self.drop(inode)
