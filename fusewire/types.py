"""What handlers receive and return: errors, attributes, file info, statfs
figures, the caller's context, setattr's fields and a readdir listing.

Role: plain value classes (``__slots__``) with the names a pyfuse3 filesystem
already knows (``st_ino``, ``entry_timeout``, ``fh``, ``keep_cache`` ...), so a
filesystem written for one binding reads the same on this one; each knows how
to encode itself onto the wire (``kernel``).

Concurrency: none; a value belongs to the request that made it.
"""

from __future__ import annotations

import errno as _errno
import os

from . import kernel as k

_NS = 1_000_000_000


class FUSEError(Exception):
    """Raised by a handler: the request is answered with ``errno``."""

    __slots__ = ("errno",)

    def __init__(self, errno: int):
        super().__init__(errno)
        self.errno = errno

    def __str__(self) -> str:
        return os.strerror(self.errno)


class RequestContext:
    """Who sent the request: the caller's uid, gid, pid, and the umask of
    create, mkdir and mknod (0 for other requests).  ``groups`` is the
    caller's supplementary groups when the kernel sent them (CREATE_SUPP_GROUP,
    create/mkdir/mknod/symlink only), else None.  ``flags``: setxattr's
    XATTR_CREATE/XATTR_REPLACE.  ``kill_suidgid``: with HANDLE_KILLPRIV_V2, an
    open or create (O_TRUNC) that must clear set-user-ID/set-group-ID, or a
    setxattr of an ACL that must clear set-group-ID (the kernel's flags)."""

    __slots__ = ("uid", "gid", "pid", "umask", "groups", "flags", "kill_suidgid")

    def __init__(self, uid: int = 0, gid: int = 0, pid: int = 0, umask: int = 0,
                 groups: tuple[int, ...] | None = None, flags: int = 0,
                 kill_suidgid: bool = False):
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.umask = umask
        self.groups = groups
        self.flags = flags
        self.kill_suidgid = kill_suidgid

    def __repr__(self) -> str:
        return f"RequestContext(uid={self.uid}, gid={self.gid}, pid={self.pid})"


class BasicContext(RequestContext):
    """A RequestContext of uid, gid and pid only: what most requests carry,
    made with fewer arguments (the session makes one per request).  The rest
    are class attributes at their defaults (they come before the slots of
    the same names), so only three are stored: half the cost; read-only."""

    __slots__ = ()
    umask = 0
    groups = None
    flags = 0
    kill_suidgid = False

    def __init__(self, uid: int, gid: int, pid: int):
        self.uid = uid
        self.gid = gid
        self.pid = pid


_SPLIT: dict[float, tuple[int, int]] = {}
_NEGATIVE: dict[float, "EntryAttributes"] = {}     # EntryAttributes.negative's
_NEGATIVE_OUT: dict[float, bytes] = {}              # and their encoding


def _split(t: float) -> tuple[int, int]:
    """A timeout as the wire's (seconds, nanoseconds), remembered for the few
    values a filesystem uses."""
    r = _SPLIT.get(t)
    if r is None:
        r = (int(t), int(t % 1 * _NS))
        if len(_SPLIT) < 64:
            _SPLIT[t] = r
    return r


class EntryAttributes:
    """An inode's attributes with their cache times (an entry when answering
    a lookup or a create; ``st_ino`` 0 is a negative entry).  ``from_stat``
    keeps the ``os.stat_result`` itself and encodes from it (the ``st_*``
    names still read through to it)."""

    __slots__ = ("st_ino", "generation", "entry_timeout", "attr_timeout", "st_mode",
                 "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize",
                 "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "_st")

    def __init__(self):
        self._st = None
        self.st_ino = 0
        self.generation = 0
        self.entry_timeout = 300.0
        self.attr_timeout = 300.0
        self.st_mode = 0
        self.st_nlink = 0
        self.st_uid = 0
        self.st_gid = 0
        self.st_rdev = 0
        self.st_size = 0
        self.st_blksize = 4096
        self.st_blocks = 0
        self.st_atime_ns = 0
        self.st_mtime_ns = 0
        self.st_ctime_ns = 0

    @classmethod
    def from_stat(cls, st: os.stat_result, ino: int, timeout: float,
                  generation: int = 0) -> "EntryAttributes":
        """The attributes of ``st`` as inode ``ino``."""
        a = cls.__new__(cls)
        a._st = st
        a.st_ino = ino
        a.generation = generation
        a.entry_timeout = a.attr_timeout = timeout
        return a

    @classmethod
    def negative(cls, timeout: float) -> "EntryAttributes":
        """A negative entry (``st_ino`` 0) the kernel caches for ``timeout``
        seconds: one shared instance per timeout, made and encoded once (a
        lookup of a missing name is common: an exclusive create starts with
        one), not to be changed."""
        a = _NEGATIVE.get(timeout)
        if a is None:
            a = cls()
            a.entry_timeout = timeout
            if len(_NEGATIVE) < 64:
                _NEGATIVE_OUT[timeout] = a.entry_out()
                _NEGATIVE[timeout] = a
        return a

    def __getattr__(self, name: str):
        # an st_* field of one made by from_stat: read from its stat
        st = object.__getattribute__(self, "_st")
        if st is None or not name.startswith("st_"):
            raise AttributeError(name)
        return getattr(st, name)

    def _attr(self) -> tuple:
        st = self._st
        if st is not None:
            at, mt, ct = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
            return (self.st_ino, st.st_size, st.st_blocks,
                    at // _NS, mt // _NS, ct // _NS, at % _NS, mt % _NS, ct % _NS,
                    st.st_mode, st.st_nlink, st.st_uid, st.st_gid,
                    st.st_rdev & 0xFFFFFFFF, st.st_blksize, 0)
        at, mt, ct = self.st_atime_ns, self.st_mtime_ns, self.st_ctime_ns
        return (self.st_ino, self.st_size, self.st_blocks,
                at // _NS, mt // _NS, ct // _NS, at % _NS, mt % _NS, ct % _NS,
                self.st_mode, self.st_nlink, self.st_uid, self.st_gid,
                self.st_rdev & 0xFFFFFFFF, self.st_blksize, 0)

    def entry_out(self) -> bytes:
        """struct fuse_entry_out."""
        st = self._st
        if st is not None:
            # from a stat (every answer but a negative entry): its items 7-9
            # are the whole seconds of atime, mtime, ctime; 0, 3-5 mode,
            # nlink, uid, gid
            et = self.entry_timeout
            et = _SPLIT.get(et) or _split(et)
            at = self.attr_timeout
            at = _SPLIT.get(at) or _split(at)
            ino = self.st_ino
            return _ENTRY_OUT_PACK(
                ino, self.generation, et[0], at[0], et[1], at[1],
                ino, st.st_size, st.st_blocks, st[7], st[8], st[9],
                st.st_atime_ns % _NS, st.st_mtime_ns % _NS, st.st_ctime_ns % _NS,
                st[0], st[3], st[4], st[5], st.st_rdev & 0xFFFFFFFF, st.st_blksize, 0)
        if _NEGATIVE.get(self.entry_timeout) is self:      # negative(): encoded once
            return _NEGATIVE_OUT[self.entry_timeout]
        et = _SPLIT.get(self.entry_timeout) or _split(self.entry_timeout)
        at = _SPLIT.get(self.attr_timeout) or _split(self.attr_timeout)
        return _ENTRY_OUT_PACK(self.st_ino, self.generation, et[0], at[0], et[1], at[1],
                               *self._attr())

    def attr_out(self) -> bytes:
        """struct fuse_attr_out."""
        at = _SPLIT.get(self.attr_timeout) or _split(self.attr_timeout)
        st = self._st
        if st is not None:
            return _ATTR_OUT_PACK(
                at[0], at[1], 0,
                self.st_ino, st.st_size, st.st_blocks, st[7], st[8], st[9],
                st.st_atime_ns % _NS, st.st_mtime_ns % _NS, st.st_ctime_ns % _NS,
                st[0], st[3], st[4], st[5], st.st_rdev & 0xFFFFFFFF, st.st_blksize, 0)
        return _ATTR_OUT_PACK(at[0], at[1], 0, *self._attr())

    def __repr__(self) -> str:
        return f"EntryAttributes(st_ino={self.st_ino}, st_mode={self.st_mode:o})"


_ENTRY_OUT_PACK = k.ENTRY_OUT.pack
_ATTR_OUT_PACK = k.ATTR_OUT.pack


class FileInfo:
    """The answer to open and create: the handle, and how the kernel treats
    the file (``direct_io``: no page cache; ``keep_cache``: keep what it has
    cached; ``nonseekable``; ``noflush``: no FLUSH at close; ``backing_id``: a
    passthrough file registered with ``Session.backing_open``, its reads and
    writes then go to it without the daemon)."""

    __slots__ = ("fh", "direct_io", "keep_cache", "nonseekable", "noflush", "backing_id")

    def __init__(self, fh: int = 0, direct_io: bool = False, keep_cache: bool = False,
                 nonseekable: bool = False, noflush: bool = False, backing_id: int = 0):
        self.fh = fh
        self.direct_io = direct_io
        self.keep_cache = keep_cache
        self.nonseekable = nonseekable
        self.noflush = noflush
        self.backing_id = backing_id

    def open_out(self) -> bytes:
        flags = ((k.FOPEN_DIRECT_IO if self.direct_io else 0)
                 | (k.FOPEN_KEEP_CACHE if self.keep_cache else 0)
                 | (k.FOPEN_NONSEEKABLE if self.nonseekable else 0)
                 | (k.FOPEN_NOFLUSH if self.noflush else 0))
        if self.backing_id:
            # the kernel refuses a passthrough open with any other flag
            flags = (flags & k.FOPEN_PASSTHROUGH_MASK) | k.FOPEN_PASSTHROUGH
        return k.OPEN_OUT.pack(self.fh, flags, self.backing_id)


class StatvfsData:
    """The figures of statfs (in ``f_frsize`` units)."""

    __slots__ = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                 "f_ffree", "f_favail", "f_namemax")

    def __init__(self):
        self.f_bsize = self.f_frsize = 4096
        self.f_blocks = self.f_bfree = self.f_bavail = 0
        self.f_files = self.f_ffree = self.f_favail = 0
        self.f_namemax = 255

    def statfs_out(self) -> bytes:
        return k.STATFS_OUT.pack(self.f_blocks, self.f_bfree, self.f_bavail, self.f_files,
                                 self.f_ffree, self.f_bsize, self.f_namemax, self.f_frsize, 0)


class SetattrFields:
    """Which attributes a setattr changes (``update_*``), and whether the
    caller asked to drop set-user-ID/set-group-ID (``kill_suidgid``, only with
    HANDLE_KILLPRIV_V2)."""

    __slots__ = ("update_atime", "update_mtime", "update_ctime", "update_mode",
                 "update_uid", "update_gid", "update_size", "kill_suidgid")

    def __init__(self, valid: int = 0):
        self.update_atime = bool(valid & k.FATTR_ATIME)
        self.update_mtime = bool(valid & k.FATTR_MTIME)
        self.update_ctime = bool(valid & k.FATTR_CTIME)
        self.update_mode = bool(valid & k.FATTR_MODE)
        self.update_uid = bool(valid & k.FATTR_UID)
        self.update_gid = bool(valid & k.FATTR_GID)
        self.update_size = bool(valid & k.FATTR_SIZE)
        self.kill_suidgid = bool(valid & k.FATTR_KILL_SUIDGID)


class ReaddirToken:
    """Collects the entries of one READDIR(PLUS) answer up to the size the
    kernel asked for.  ``add`` returns False when an entry does not fit: the
    handler stops there and that entry is not taken (nor lookup-counted)."""

    __slots__ = ("plus", "size", "parts", "used")

    def __init__(self, size: int, plus: bool):
        self.plus = plus
        self.size = size
        self.parts: list[bytes] = []
        self.used = 0

    def add(self, name: bytes, attr: EntryAttributes, next_off: int) -> bool:
        namelen = len(name)
        base = (k.ENTRY_OUT.size if self.plus else 0) + k.DIRENT.size + namelen
        reclen = (base + 7) & ~7
        if self.used + reclen > self.size:
            return False
        dtype = (attr.st_mode & 0o170000) >> 12
        if self.plus:
            head = attr.entry_out() + k.DIRENT.pack(attr.st_ino, next_off, namelen, dtype)
        else:
            head = k.DIRENT.pack(attr.st_ino, next_off, namelen, dtype)
        self.parts.append(head + name + b"\0" * (reclen - base))
        self.used += reclen
        return True

    def data(self) -> bytes:
        return b"".join(self.parts)


def readdir_reply(token: ReaddirToken, name: bytes, attr: EntryAttributes,
                  next_off: int) -> bool:
    """pyfuse3's spelling of ``token.add``."""
    return token.add(name, attr, next_off)


def get_sup_groups(pid: int) -> set[int]:
    """The supplementary groups of process ``pid`` (from /proc; empty if it
    is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


def errno_of(e: OSError) -> int:
    return e.errno or _errno.EIO
