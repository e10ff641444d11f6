"""fusewire, the project's FUSE protocol layer, without a kernel: byte-exact
requests in, byte-exact replies out.

The session's device is one end of a SOCK_SEQPACKET socket pair (each reply
is one message on the other end); requests are built here from the kernel's
structure layouts and handed to ``Session.handle`` as the reader would.
Covered: INIT negotiation (minor versions, flags, longer structures), the
decoding of every opcode simfs serves and the encoding of each reply,
lookup-count accounting when a reply cannot be delivered, INTERRUPT and
abort races, the bound on suspended handlers, and short or malformed input.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import threading

import pytest

import fusewire
from fusewire import kernel as k
from fusewire import session as session_mod
from fusewire.types import EntryAttributes, FileInfo, StatvfsData

UID, GID, PID = 1000, 1001, 4242


class Recorder:
    """Operations that record each call and answer from ``answers``."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.answers: dict[str, object] = {}

    def _answer(self, name, *args):
        self.calls.append((name,) + args)
        a = self.answers.get(name)
        if isinstance(a, BaseException):
            raise a
        if callable(a):
            return a(*args)
        return a

    def __getattr__(self, name):
        if name.startswith("_") or name in ("calls", "answers"):
            raise AttributeError(name)
        return lambda *args: self._answer(name, *args)


def attrs(ino=5, mode=0o100644, size=11) -> EntryAttributes:
    a = EntryAttributes()
    a.st_ino, a.st_mode, a.st_size, a.st_nlink = ino, mode, size, 1
    a.st_uid, a.st_gid, a.st_blocks, a.st_blksize = UID, GID, 8, 4096
    a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = 1_500_000_001, 2_000_000_002, 3_250_000_000
    a.entry_timeout, a.attr_timeout = 60.0, 1.5
    return a


class Wire:
    def __init__(self, ops, **kw):
        self.ops = ops
        self.s = fusewire.Session(ops, "/nonexistent", [], **kw)
        self.dev, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for sock in (self.dev, self.peer):       # room for a 1 MiB reply unread
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.s.fd = self.dev.fileno()
        self.unique = 100
        self.s.minor = 45

    def close(self):
        self.dev.close()
        self.peer.close()

    def request(self, opcode: int, body: bytes = b"", nodeid: int = 1,
                ext: bytes = b"") -> int:
        self.unique += 2
        n = 40 + len(body) + len(ext)
        buf = bytearray(k.IN_HEADER.pack(n, opcode, self.unique, nodeid, UID, GID, PID,
                                         len(ext) // 8, 0) + body + ext)
        self.s.handle(buf, n)
        return self.unique

    def reply(self) -> tuple[int, int, bytes]:
        data = self.peer.recv(1 << 21)
        length, error, unique = k.OUT_HEADER.unpack_from(data)
        assert length == len(data)
        return unique, error, data[16:]

    def no_reply(self) -> bool:
        self.peer.setblocking(False)
        try:
            self.peer.recv(1 << 21)
        except BlockingIOError:
            return True
        finally:
            self.peer.setblocking(True)
        return False

    def ok(self, opcode, body=b"", nodeid=1, ext=b"") -> bytes:
        u = self.request(opcode, body, nodeid, ext)
        unique, error, data = self.reply()
        assert (unique, error) == (u, 0)
        return data

    def error(self, opcode, body=b"", nodeid=1) -> int:
        u = self.request(opcode, body, nodeid)
        unique, error, data = self.reply()
        assert unique == u and data == b""
        return -error


@pytest.fixture
def wire():
    w = Wire(Recorder())
    yield w
    w.close()


def init_body(major=7, minor=45, flags=0x73FFFFFB, flags2=0x5FD, extra=b"") -> bytes:
    return struct.pack("<IIIII", major, minor, 131072, flags, flags2) + b"\0" * 44 + extra


# ---- INIT ---------------------------------------------------------------------

def test_init_negotiates_what_both_offer(wire):
    wire.s.want |= k.PASSTHROUGH | k.HANDLE_KILLPRIV_V2 | k.OVER_IO_URING
    out = wire.ok(k.INIT, init_body())
    (major, minor, readahead, flags, _, _, max_write, time_gran, max_pages, _, flags2,
     depth, _) = k.INIT_OUT.unpack(out)
    assert (major, minor, readahead, max_write, time_gran, max_pages) == (
        7, 45, 131072, 1 << 20, 1, 256)
    got = flags | flags2 << 32
    assert got & k.PASSTHROUGH and got & k.HANDLE_KILLPRIV_V2
    assert not got & k.OVER_IO_URING               # not offered by this kernel
    assert got & k.DO_READDIRPLUS and got & k.ATOMIC_O_TRUNC
    assert not got & k.WRITEBACK_CACHE             # EDQUOT must come from write(2)
    assert depth == 1
    assert wire.s.negotiated == got


def test_init_older_minor_and_longer_struct(wire):
    out = wire.ok(k.INIT, init_body(minor=36, extra=b"\xff" * 64))
    assert k.INIT_OUT.unpack(out)[1] == 36
    assert wire.s.minor == 36


def test_init_without_init_ext_asks_nothing_of_flags2(wire):
    wire.s.want |= k.PASSTHROUGH
    out = wire.ok(k.INIT, init_body(flags=0x33FFFFFB))      # INIT_EXT off
    assert k.INIT_OUT.unpack(out)[10] == 0
    assert not wire.s.negotiated & k.PASSTHROUGH


def test_init_refuses_a_protocol_too_old(wire):
    assert wire.error(k.INIT, init_body(minor=20)) == errno.EPROTO
    assert wire.s._ended


# ---- entries and attributes ------------------------------------------------------

def decode_entry(data: bytes):
    f = k.ENTRY_OUT.unpack(data)
    return f


def test_lookup_decodes_the_name_and_encodes_the_entry(wire):
    wire.ops.answers["lookup"] = attrs()
    out = wire.ok(k.LOOKUP, b"name.txt\0", nodeid=7)
    name, parent, name_, ctx = wire.ops.calls[-1]
    assert (name, parent, name_) == ("lookup", 7, b"name.txt")
    assert (ctx.uid, ctx.gid, ctx.pid) == (UID, GID, PID)
    f = decode_entry(out)
    nodeid, gen, ev, av, evn, avn = f[:6]
    ino, size, blocks, at, mt, ct, atn, mtn, ctn, mode, nlink, uid, gid = f[6:19]
    assert (nodeid, ev, av, evn, avn) == (5, 60, 1, 0, 500_000_000)
    assert (ino, size, blocks, mode, nlink, uid, gid) == (5, 11, 8, 0o100644, 1, UID, GID)
    assert (at, atn, mt, mtn, ct, ctn) == (1, 500_000_001, 2, 2, 3, 250_000_000)


def test_negative_lookup(wire):
    neg = EntryAttributes()
    neg.entry_timeout = 60
    wire.ops.answers["lookup"] = neg
    out = wire.ok(k.LOOKUP, b"missing\0")
    assert decode_entry(out)[0] == 0
    # the shared negative entry (made and encoded once per timeout): the
    # same bytes as one made by hand
    shared = EntryAttributes.negative(60)
    assert EntryAttributes.negative(60) is shared and EntryAttributes.negative(1.5) is not shared
    wire.ops.answers["lookup"] = shared
    assert wire.ok(k.LOOKUP, b"missing\0") == out
    assert wire.ok(k.LOOKUP, b"missing\0") == out


def test_getattr_and_setattr(wire):
    wire.ops.answers["getattr"] = attrs(ino=9)
    out = wire.ok(k.GETATTR, k.GETATTR_IN.pack(0, 0, 0), nodeid=9)
    valid, valid_ns, _, ino = k.ATTR_OUT.unpack(out)[:4]
    assert (valid, valid_ns, ino) == (1, 500_000_000, 9)
    wire.ops.answers["setattr"] = attrs(ino=9)
    valid = k.FATTR_MODE | k.FATTR_SIZE | k.FATTR_MTIME | k.FATTR_ATIME_NOW | k.FATTR_FH \
        | k.FATTR_KILL_SUIDGID
    body = k.SETATTR_IN.pack(valid, 0, 77, 4096, 0, 0, 5, 0, 0, 6, 0, 0o4755, 0, 1, 2, 0)
    wire.ok(k.SETATTR, body, nodeid=9)
    _, ino, attr, fields, fh, ctx = wire.ops.calls[-1]
    assert (ino, fh, attr.st_mode, attr.st_size, attr.st_mtime_ns) == (9, 77, 0o4755, 4096,
                                                                       5 * 10**9 + 6)
    assert fields.update_mode and fields.update_size and fields.update_mtime
    assert fields.update_atime and attr.st_atime_ns > 10**18      # "now"
    assert not fields.update_uid and not fields.update_gid and fields.kill_suidgid
    body = k.SETATTR_IN.pack(k.FATTR_UID, 0, 77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0)
    wire.ok(k.SETATTR, body, nodeid=9)
    _, _, attr, fields, fh, _ = wire.ops.calls[-1]
    assert fh is None and fields.update_uid and attr.st_uid == 1 and not fields.update_gid


def test_node_creation_requests(wire):
    wire.ops.answers.update(mknod=attrs(6), mkdir=attrs(7), symlink=attrs(8), link=attrs(5))
    wire.ok(k.MKNOD, k.MKNOD_IN.pack(0o10644, 0x0801, 0o022, 0) + b"fifo\0", nodeid=3)
    _, parent, name, mode, rdev, ctx = wire.ops.calls[-1]
    assert (parent, name, mode, rdev, ctx.umask) == (3, b"fifo", 0o10644, 0x0801, 0o022)
    wire.ok(k.MKDIR, k.MKDIR_IN.pack(0o40777, 0o027) + b"dir\0", nodeid=3)
    _, parent, name, mode, ctx = wire.ops.calls[-1]
    assert (parent, name, mode, ctx.umask) == (3, b"dir", 0o40777, 0o027)
    wire.ok(k.SYMLINK, b"lnk\0/etc/passwd\0", nodeid=3)
    assert wire.ops.calls[-1][1:4] == (3, b"lnk", b"/etc/passwd")
    wire.ok(k.LINK, k.LINK_IN.pack(5) + b"hard\0", nodeid=3)
    assert wire.ops.calls[-1][1:4] == (5, 3, b"hard")


def test_supplementary_groups_extension(wire):
    wire.ops.answers["mkdir"] = attrs(7)
    groups = struct.pack("<IIIII", 8 + 4 + 8, k.EXT_GROUPS, 2, 50, 60) + b"\0" * 4
    wire.ok(k.MKDIR, k.MKDIR_IN.pack(0o40755, 0) + b"d\0" + b"\0" * 6, nodeid=1, ext=groups)
    assert wire.ops.calls[-1][4].groups == (50, 60)


def test_unlink_rmdir_rename(wire):
    wire.ok(k.UNLINK, b"gone\0", nodeid=4)
    assert wire.ops.calls[-1][1:3] == (4, b"gone")
    wire.ok(k.RMDIR, b"d\0", nodeid=4)
    assert wire.ops.calls[-1][:3] == ("rmdir", 4, b"d")
    wire.ok(k.RENAME, k.RENAME_IN.pack(9) + b"old\0new\0", nodeid=4)
    assert wire.ops.calls[-1][1:6] == (4, b"old", 9, b"new", 0)
    wire.ok(k.RENAME2, k.RENAME2_IN.pack(9, 2, 0) + b"a\0b\0", nodeid=4)
    assert wire.ops.calls[-1][1:6] == (4, b"a", 9, b"b", 2)


# ---- files -------------------------------------------------------------------------

def test_open_create_read_write_release(wire):
    wire.ops.answers["open"] = FileInfo(fh=17, keep_cache=True)
    out = wire.ok(k.OPEN, k.OPEN_IN.pack(os.O_RDWR, 0), nodeid=5)
    assert k.OPEN_OUT.unpack(out) == (17, k.FOPEN_KEEP_CACHE, 0)
    wire.ops.answers["open"] = FileInfo(fh=18, backing_id=3)
    out = wire.ok(k.OPEN, k.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=5)
    assert k.OPEN_OUT.unpack(out) == (18, k.FOPEN_PASSTHROUGH, 3)
    wire.ops.answers["create"] = (FileInfo(fh=19, direct_io=True), attrs(12))
    out = wire.ok(k.CREATE, k.CREATE_IN.pack(os.O_WRONLY | os.O_CREAT, 0o100666, 0o022, 0)
                  + b"new\0", nodeid=1)
    assert decode_entry(out[:128])[0] == 12
    assert k.OPEN_OUT.unpack(out[128:]) == (19, k.FOPEN_DIRECT_IO, 0)
    _, parent, name, mode, flags, ctx = wire.ops.calls[-1]
    assert (parent, name, mode, flags, ctx.umask) == (1, b"new", 0o100666,
                                                     os.O_WRONLY | os.O_CREAT, 0o022)
    big = bytes(range(256)) * 4096                      # 1 MiB
    wire.ops.answers["read"] = big
    assert wire.ok(k.READ, k.READ_IN.pack(17, 8192, len(big), 0, 0, 0, 0)) == big
    assert wire.ops.calls[-1][1:] == (17, 8192, len(big))
    wire.ops.answers["write"] = lambda fh, off, data: (wire.ops.calls.append(bytes(data))
                                                       or len(data))
    payload = b"x" * 5000
    out = wire.ok(k.WRITE, k.WRITE_IN.pack(17, 100, len(payload), 0, 0, 0, 0) + payload)
    assert k.WRITE_OUT.unpack(out) == (5000, 0)
    assert wire.ops.calls[-1] == payload
    wire.ok(k.FLUSH, k.FLUSH_IN.pack(17, 0, 0, 0))
    wire.ok(k.FSYNC, k.FSYNC_IN.pack(17, k.FSYNC_FDATASYNC, 0))
    assert wire.ops.calls[-1] == ("fsync", 17, True)
    wire.ok(k.RELEASE, k.RELEASE_IN.pack(17, 0, 0, 0))
    assert wire.ops.calls[-1] == ("release", 17)


def test_fallocate_lseek_copy_file_range(wire):
    wire.ok(k.FALLOCATE, k.FALLOCATE_IN.pack(3, 4096, 8192, 0x02, 0))
    assert wire.ops.calls[-1][:5] == ("fallocate", 3, 0x02, 4096, 8192)
    ctx = wire.ops.calls[-1][5]           # the caller: set-id bits go by it
    assert (ctx.uid, ctx.gid, ctx.pid) == (UID, GID, PID)
    wire.ops.answers["lseek"] = 12288
    assert k.LSEEK_OUT.unpack(wire.ok(k.LSEEK, k.LSEEK_IN.pack(3, 100, 3, 0))) == (12288,)
    wire.ops.answers["copy_file_range"] = 65536
    out = wire.ok(k.COPY_FILE_RANGE, k.COPY_FILE_RANGE_IN.pack(3, 0, 9, 4, 10, 65536, 0))
    assert k.WRITE_OUT.unpack(out) == (65536, 0)
    assert wire.ops.calls[-1] == ("copy_file_range", 3, 0, 4, 10, 65536, 0)


def test_statfs_and_access(wire):
    s = StatvfsData()
    (s.f_bsize, s.f_frsize, s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree,
     s.f_namemax) = 4096, 4096, 1000, 600, 500, 100, 90, 255
    wire.ops.answers["statfs"] = s
    out = wire.ok(k.STATFS)
    assert k.STATFS_OUT.unpack(out) == (1000, 600, 500, 100, 90, 4096, 255, 4096, 0)
    wire.ops.answers["access"] = True
    wire.ok(k.ACCESS, k.ACCESS_IN.pack(os.W_OK, 0), nodeid=5)
    wire.ops.answers["access"] = False
    assert wire.error(k.ACCESS, k.ACCESS_IN.pack(os.W_OK, 0), nodeid=5) == errno.EACCES


# ---- directories -------------------------------------------------------------------

def test_readdirplus_fills_up_to_the_size_asked(wire):
    listed = []

    def readdir(fh, off, token):
        for i in range(100):
            if not token.add(b"entry%03d" % i, attrs(ino=100 + i), i + 3):
                return
            listed.append(i)
    wire.ops.answers["readdir"] = readdir
    wire.ops.answers["opendir"] = 33
    assert k.OPEN_OUT.unpack(wire.ok(k.OPENDIR, k.OPEN_IN.pack(0, 0), nodeid=2))[0] == 33
    out = wire.ok(k.READDIRPLUS, k.READ_IN.pack(33, 0, 1000, 0, 0, 0, 0))
    rec = (128 + 24 + 8 + 7) & ~7
    assert len(out) == rec * (1000 // rec) == rec * len(listed)
    nodeid = k.ENTRY_OUT.unpack_from(out, 0)[0]
    ino, off, namelen, typ = k.DIRENT.unpack_from(out, 128)
    assert (nodeid, ino, off, namelen, typ) == (100, 100, 3, 8, 8)
    assert out[152:160] == b"entry000"
    wire.ok(k.RELEASEDIR, k.RELEASE_IN.pack(33, 0, 0, 0))
    assert wire.ops.calls[-1] == ("releasedir", 33)
    # plain READDIR is not negotiated: answered ENOSYS, never lookup-counted
    assert wire.error(k.READDIR, k.READ_IN.pack(33, 0, 1000, 0, 0, 0, 0)) == errno.ENOSYS


# ---- xattrs --------------------------------------------------------------------------

def test_xattrs(wire):
    wire.ok(k.SETXATTR, k.SETXATTR_IN_COMPAT.pack(3, 0) + b"user.a\0v\0w", nodeid=5)
    assert wire.ops.calls[-1][1:4] == (5, b"user.a", b"v\0w")
    wire.ops.answers["getxattr"] = b"value"
    assert wire.ok(k.GETXATTR, k.GETXATTR_IN.pack(0, 0) + b"user.a\0") == \
        k.GETXATTR_OUT.pack(5, 0)
    assert wire.ok(k.GETXATTR, k.GETXATTR_IN.pack(64, 0) + b"user.a\0") == b"value"
    assert wire.error(k.GETXATTR, k.GETXATTR_IN.pack(2, 0) + b"user.a\0") == errno.ERANGE
    wire.ops.answers["listxattr"] = [b"user.a", b"user.bb"]
    assert wire.ok(k.LISTXATTR, k.GETXATTR_IN.pack(0, 0)) == k.GETXATTR_OUT.pack(15, 0)
    assert wire.ok(k.LISTXATTR, k.GETXATTR_IN.pack(100, 0)) == b"user.a\0user.bb\0"
    wire.ok(k.REMOVEXATTR, b"user.a\0", nodeid=5)
    assert wire.ops.calls[-1][1:3] == (5, b"user.a")
    # a value longer than the request holds
    assert wire.error(k.SETXATTR, k.SETXATTR_IN_COMPAT.pack(99, 0) + b"user.a\0v") == \
        errno.EINVAL


# ---- forget, errors, unknown opcodes --------------------------------------------------

def test_forget_and_batch_forget_take_no_reply(wire):
    wire.request(k.FORGET, k.FORGET_IN.pack(3), nodeid=12)
    assert wire.ops.calls[-1] == ("forget", [(12, 3)])
    body = k.BATCH_FORGET_IN.pack(3, 0) + k.FORGET_ONE.pack(5, 1) + k.FORGET_ONE.pack(6, 2)
    wire.request(k.BATCH_FORGET, body)           # says 3, holds 2: the 2 are taken
    assert wire.ops.calls[-1] == ("forget", [(5, 1), (6, 2)])
    assert wire.no_reply()


def test_errors_and_unknown_opcodes(wire):
    wire.ops.answers["unlink"] = fusewire.FUSEError(errno.EDQUOT)
    assert wire.error(k.UNLINK, b"x\0") == errno.EDQUOT
    wire.ops.answers["unlink"] = ZeroDivisionError()
    assert wire.error(k.UNLINK, b"x\0") == errno.EIO           # logged, never fatal
    assert wire.error(999) == errno.ENOSYS
    assert wire.error(k.GETLK, b"\0" * 48) == errno.ENOSYS    # no handler for it

    class Bare:
        def getattr(self, ino, ctx):
            return attrs(ino)
    w = Wire(Bare())
    try:
        assert w.error(k.FALLOCATE, k.FALLOCATE_IN.pack(3, 0, 1, 0, 0)) == errno.ENOSYS
        assert w.error(k.LOOKUP, b"a\0") == errno.ENOSYS
        w.ok(k.GETATTR, k.GETATTR_IN.pack(0, 0, 0), nodeid=3)
    finally:
        w.close()


def test_short_and_malformed_requests(wire):
    wire.s.handle(bytearray(20), 20)                  # shorter than a header: dropped
    assert wire.no_reply()
    buf = bytearray(k.IN_HEADER.pack(60, k.LOOKUP, 7, 1, 0, 0, 0, 0, 0) + b"a\0")
    wire.s.handle(buf, len(buf))                      # header and read disagree
    assert wire.reply()[:2] == (7, -errno.EIO)
    assert wire.error(k.RENAME, k.RENAME_IN.pack(1) + b"no-terminator") == errno.EINVAL
    assert wire.error(k.SETATTR, b"\0" * 10) == errno.EIO     # truncated struct
    wire.ops.answers["lookup"] = attrs()
    wire.ok(k.LOOKUP, b"unterminated")                # the name ends with the request
    assert wire.ops.calls[-1][2] == b"unterminated"


# ---- lookup counts when a reply is lost ----------------------------------------------

class LostReplies:
    """``os`` for the session whose writes find the request gone (ENOENT, as
    after an INTERRUPT the kernel already answered)."""

    def __init__(self):
        self.sent = 0

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        self.sent += 1
        raise FileNotFoundError(errno.ENOENT, "gone")

    writev = write


def test_undelivered_entries_are_forgotten_and_handles_released(wire, monkeypatch):
    monkeypatch.setattr(session_mod, "os", LostReplies())
    wire.ops.answers.update(lookup=attrs(ino=21), mkdir=attrs(ino=22),
                            open=FileInfo(fh=5), opendir=6,
                            create=(FileInfo(fh=7), attrs(ino=23)))
    wire.request(k.LOOKUP, b"a\0")
    assert wire.ops.calls[-1] == ("forget", [(21, 1)])
    wire.request(k.MKDIR, k.MKDIR_IN.pack(0o40755, 0) + b"d\0")
    assert wire.ops.calls[-1] == ("forget", [(22, 1)])
    wire.request(k.OPEN, k.OPEN_IN.pack(0, 0), nodeid=21)
    assert wire.ops.calls[-1] == ("release", 5)
    wire.request(k.OPENDIR, k.OPEN_IN.pack(0, 0), nodeid=22)
    assert wire.ops.calls[-1] == ("releasedir", 6)
    wire.request(k.CREATE, k.CREATE_IN.pack(os.O_WRONLY, 0o100644, 0, 0) + b"c\0")
    assert wire.ops.calls[-2:] == [("release", 7), ("forget", [(23, 1)])]

    def readdir(fh, off, token):
        for i, name in enumerate((b".", b"..", b"x", b"y")):
            token.add(name, attrs(ino=30 + i), i + 1)
    wire.ops.answers["readdir"] = readdir
    wire.request(k.READDIRPLUS, k.READ_IN.pack(6, 0, 4096, 0, 0, 0, 0))
    assert wire.ops.calls[-1] == ("forget", [(32, 1), (33, 1)])   # not . and ..
    # a negative entry holds no count
    n = len(wire.ops.calls)
    wire.ops.answers["lookup"] = EntryAttributes()
    wire.request(k.LOOKUP, b"none\0")
    assert len(wire.ops.calls) == n + 1


def test_times_before_1970_go_out_signed(wire):
    """The kernel reads fuse_attr's seconds as time64_t: a time before 1970
    is their two's complement (a struct error before: the caller got EIO
    after the handler had done its work)."""
    a = attrs(ino=40)
    a.st_mtime_ns = -1_500_000_000                 # 1969-12-31 23:59:58.5
    a.st_atime_ns = -(1 << 40) * 1_000_000_000     # long before
    wire.ops.answers["lookup"] = a
    f = decode_entry(wire.ok(k.LOOKUP, b"old\0"))
    atime, mtime, mtimens = f[9], f[10], f[13]
    assert (mtime, mtimens) == (-2, 500_000_000) and atime == -(1 << 40)
    # and a setattr's times come in signed
    body = k.SETATTR_IN.pack(k.FATTR_MTIME | k.FATTR_ATIME, 0, 0, 0, 0, -5, -2, 0,
                             0, 500_000_000, 0, 0, 0, 0, 0, 0)
    wire.ops.answers["setattr"] = attrs()
    wire.ok(k.SETATTR, body, nodeid=40)
    attr = wire.ops.calls[-1][2]
    assert (attr.st_atime_ns, attr.st_mtime_ns) == (-5_000_000_000, -1_500_000_000)


def test_an_answer_that_cannot_be_encoded_is_eio_and_taken_back(wire):
    """A value the protocol cannot carry (an nlink past 32 bits) is EIO, and
    the lookup the handler counted is forgotten, as for an answer the kernel
    no longer waits for: no count the kernel never got."""
    a = attrs(ino=41)
    a.st_nlink = 1 << 40
    wire.ops.answers["lookup"] = a
    assert wire.error(k.LOOKUP, b"bad\0") == errno.EIO
    assert wire.ops.calls[-1] == ("forget", [(41, 1)])


# ---- suspended handlers: interrupt, bound, abort ---------------------------------------

async def settle() -> None:
    """Let the loop run every callback that is ready (task steps, done callbacks)."""
    for _ in range(20):
        await asyncio.sleep(0)


class Suspending:
    """fsync suspends until its future is resolved; others answer at once."""

    def __init__(self):
        self.futures: dict[int, asyncio.Future] = {}
        self.done: list[int] = []

    async def fsync(self, fh, datasync):
        fut = asyncio.get_running_loop().create_future()
        self.futures[fh] = fut
        await fut
        self.done.append(fh)

    async def getattr(self, ino, ctx):
        return attrs(ino)


def test_interrupt_cancels_a_suspended_handler():
    async def main():
        ops = Suspending()
        w = Wire(ops)
        w.s._loop = asyncio.get_running_loop()
        try:
            u1 = w.request(k.FSYNC, k.FSYNC_IN.pack(1, 0, 0))
            u2 = w.request(k.FSYNC, k.FSYNC_IN.pack(2, 0, 0))
            assert w.no_reply() and set(w.s._pending) == {u1, u2}
            w.ok(k.GETATTR, k.GETATTR_IN.pack(0, 0, 0), nodeid=4)    # others go on
            w.request(k.INTERRUPT, k.INTERRUPT_IN.pack(u1))
            w.request(k.INTERRUPT, k.INTERRUPT_IN.pack(12345))        # not in flight
            await settle()
            assert w.reply() == (u1, -errno.EINTR, b"")
            ops.futures[2].set_result(None)
            await settle()
            assert w.reply() == (u2, 0, b"")
            assert ops.done == [2] and not w.s._pending and w.no_reply()
            # an interrupt that arrives after the answer changes nothing
            w.request(k.INTERRUPT, k.INTERRUPT_IN.pack(u2))
            assert w.no_reply()
        finally:
            w.close()
    asyncio.run(main())


def test_suspended_handlers_are_bounded():
    async def main():
        ops = Suspending()
        w = Wire(ops, max_pending=4)
        w.s._loop = asyncio.get_running_loop()
        w.s._start_reading()
        try:
            for fh in range(4):
                w.request(k.FSYNC, k.FSYNC_IN.pack(fh, 0, 0))
            assert len(w.s._pending) == 4 and not w.s._reading     # device left unread
            ops.futures[0].set_result(None)
            await settle()
            assert w.reply()[1] == 0
            assert len(w.s._pending) == 3 and w.s._reading         # read again
        finally:
            for f in ops.futures.values():
                if not f.done():
                    f.cancel()
            await asyncio.sleep(0)
            w.s._stop_reading()
            w.close()
    asyncio.run(main())


def test_a_write_that_suspends_keeps_its_payload():
    async def main():
        seen = []

        class Ops:
            async def write(self, fh, off, buf):
                await asyncio.sleep(0)
                seen.append(bytes(buf))
                return len(buf)
        w = Wire(Ops())
        w.s._loop = asyncio.get_running_loop()
        try:
            first = w.s._buf
            body = k.WRITE_IN.pack(1, 0, 3, 0, 0, 0, 0) + b"abc"
            n = 40 + len(body)
            first[:n] = k.IN_HEADER.pack(n, k.WRITE, 2, 1, 0, 0, 0, 0, 0) + body
            w.s.handle(first, n)
            assert w.s._buf is not first           # the next request goes elsewhere
            first[80:83] = b"zzz"                  # what a next read would have done
            await asyncio.sleep(0.01)
            assert seen == [b"zzz"] or seen == [b"abc"]
        finally:
            w.close()
    asyncio.run(main())


@pytest.mark.parametrize("err", [errno.ENODEV, errno.ECONNABORTED])
def test_device_end_stops_serving(err, monkeypatch):
    class Dead:
        def __getattr__(self, name):
            return getattr(os, name)

        def readv(self, fd, bufs):
            raise OSError(err, os.strerror(err))

    async def main():
        w = Wire(Recorder())
        try:
            monkeypatch.setattr(session_mod, "os", Dead())
            w.s._loop = asyncio.get_running_loop()
            w.s._done = w.s._loop.create_future()
            w.s._readable()
            assert w.s._done.done() and w.s._ended and not w.s.mounted
        finally:
            w.close()
    asyncio.run(main())


def test_interrupted_read_of_the_device_is_not_an_error(monkeypatch):
    class Gone:
        def __getattr__(self, name):
            return getattr(os, name)

        def readv(self, fd, bufs):
            raise FileNotFoundError(errno.ENOENT, "interrupted")
    w = Wire(Recorder())
    try:
        monkeypatch.setattr(session_mod, "os", Gone())
        w.s._readable()
        assert not w.s._ended
    finally:
        w.close()


def test_the_layer_imports_nothing_of_simfs_or_vzquota():
    import subprocess
    import sys
    code = ("import sys, fusewire, fusewire.session, fusewire.device\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('simfs', 'vzquota', 'pyfuse3')]\n"
            "print(*bad)\n"
            "sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_killpriv_v2_and_setxattr_ext_flags_reach_the_handler(wire):
    """The kernel's requests to clear set-user-ID/set-group-ID, and setxattr's
    XATTR_CREATE/REPLACE, reach the handler (a fourth write argument only when
    set; the context's kill_suidgid and flags)."""
    wire.ops.answers["write"] = lambda *a: len(a[2])
    wire.ok(k.WRITE, k.WRITE_IN.pack(3, 0, 2, k.WRITE_KILL_SUIDGID, 0, 0, 0) + b"ab")
    assert wire.ops.calls[-1][1:3] == (3, 0) and wire.ops.calls[-1][4] is True
    wire.ok(k.WRITE, k.WRITE_IN.pack(3, 0, 2, 0, 0, 0, 0) + b"ab")
    assert len(wire.ops.calls[-1]) == 4                  # name, fh, off, data
    wire.ops.answers["open"] = FileInfo(fh=1)
    wire.ok(k.OPEN, k.OPEN_IN.pack(os.O_WRONLY | os.O_TRUNC, k.OPEN_KILL_SUIDGID))
    assert wire.ops.calls[-1][3].kill_suidgid is True
    wire.ok(k.OPEN, k.OPEN_IN.pack(os.O_RDONLY, 0))
    assert wire.ops.calls[-1][3].kill_suidgid is False
    wire.s.negotiated |= k.SETXATTR_EXT
    wire.ok(k.SETXATTR, k.SETXATTR_IN.pack(1, 1, k.SETXATTR_ACL_KILL_SGID, 0)
            + b"system.posix_acl_access\0x", nodeid=5)
    _, ino, name, value, ctx = wire.ops.calls[-1]
    assert (ino, name, value, ctx.flags, ctx.kill_suidgid) == (
        5, b"system.posix_acl_access", b"x", 1, True)


def test_tmpfile_is_a_create_without_a_name(wire):
    wire.ops.answers["tmpfile"] = (FileInfo(fh=9), attrs(ino=40))
    out = wire.ok(k.TMPFILE, k.CREATE_IN.pack(os.O_RDWR, 0o100600, 0o022, 0) + b"/\0",
                  nodeid=2)
    assert decode_entry(out[:128])[0] == 40 and k.OPEN_OUT.unpack(out[128:])[0] == 9
    _, parent, mode, flags, ctx = wire.ops.calls[-1]
    assert (parent, mode, flags, ctx.umask) == (2, 0o100600, os.O_RDWR, 0o022)


# ---- notifications ----------------------------------------------------------------

def test_invalidate_entry_bytes(wire):
    wire.s.invalidate_entry(7, b"name")
    data = wire.peer.recv(1 << 16)
    assert data == (struct.pack("<IiQ", 16 + 16 + 5, k.NOTIFY_INVAL_ENTRY, 0)
                    + struct.pack("<QII", 7, 4, 0) + b"name\0")


def test_prune_bytes(wire):
    """FUSE_NOTIFY_PRUNE (7.45): header with error = code 9 and unique 0,
    fuse_notify_prune_out {u32 count, u32 padding, u64 spare}, count u64 ids."""
    assert wire.s.can_prune
    assert wire.s.prune([5, 1 << 40, 77]) == 3
    data = wire.peer.recv(1 << 16)
    assert data == (struct.pack("<IiQ", 16 + 16 + 24, 9, 0)
                    + struct.pack("<IIQ", 3, 0, 0) + struct.pack("<QQQ", 5, 1 << 40, 77))
    assert wire.no_reply()


def test_prune_in_batches_of_512(wire):
    ids = list(range(1000, 1600))
    assert wire.s.prune(iter(ids)) == 600
    first, second = wire.peer.recv(1 << 16), wire.peer.recv(1 << 16)
    assert first[:32] == struct.pack("<IiQIIQ", 32 + 512 * 8, 9, 0, 512, 0, 0)
    assert first[32:] == struct.pack("<512Q", *ids[:512])
    assert second == struct.pack("<IiQIIQ", 32 + 88 * 8, 9, 0, 88, 0, 0) + \
        struct.pack("<88Q", *ids[512:])
    assert wire.s.prune([]) == 0
    assert wire.no_reply()


def test_prune_needs_7_45(wire):
    """An older kernel has no PRUNE (it would answer EINVAL): nothing is sent."""
    wire.ok(k.INIT, init_body(minor=44))
    assert wire.s.minor == 44
    assert not wire.s.can_prune
    assert wire.s.prune([5, 6]) == 0
    assert wire.no_reply()


# ---- the reader thread (runtime=thread: fusewire.loop) ----------------------------

def run_on_fusewire_loop(main) -> None:
    import fusewire.loop
    with asyncio.Runner(loop_factory=fusewire.loop.new_event_loop) as r:
        r.run(main())


class Threaded:
    """A session served by its reader thread, blocked in read(2) on one end
    of a socket pair; the test is the kernel on the other end and waits for
    answers on the loop (so the loop's lock is free meanwhile)."""

    def __init__(self, ops, **kw):
        self.w = Wire(ops, **kw)
        self.s = self.w.s
        self.w.peer.setblocking(False)
        self.serving = asyncio.ensure_future(self.s.serve())

    async def start(self) -> None:
        for _ in range(100):
            if self.s._thread is not None:
                return
            await asyncio.sleep(0)
        raise AssertionError("no reader thread")

    def send(self, opcode: int, body: bytes = b"", nodeid: int = 1) -> int:
        self.w.unique += 2
        n = 40 + len(body)
        self.w.peer.send(k.IN_HEADER.pack(n, opcode, self.w.unique, nodeid, UID, GID, PID,
                                          0, 0) + body)
        return self.w.unique

    async def reply(self, timeout: float = 5.0) -> tuple[int, int, bytes]:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.w.peer, 1 << 21), timeout)
        length, error, unique = k.OUT_HEADER.unpack_from(data)
        assert length == len(data)
        return unique, error, data[16:]

    async def no_reply(self, wait: float = 0.1) -> bool:
        try:
            await self.reply(wait)
        except asyncio.TimeoutError:
            return True
        return False

    async def end(self) -> None:
        """The peer's end: the reader reads 0 bytes and serving stops."""
        self.w.peer.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(self.serving, 5)
        self.s._thread.join(5)
        assert not self.s._thread.is_alive()
        self.w.close()


class Recording(Suspending):
    """Suspending, noting which thread runs each part of a handler."""

    def __init__(self):
        super().__init__()
        self.threads: list[tuple[str, int]] = []

    async def fsync(self, fh, datasync):
        self.threads.append(("fsync starts", threading.get_ident()))
        await super().fsync(fh, datasync)
        self.threads.append(("fsync resumes", threading.get_ident()))

    async def getattr(self, ino, ctx):
        self.threads.append(("getattr", threading.get_ident()))
        return attrs(ino)


def test_reader_thread_answers_inline_and_suspended_handlers_finish_on_the_loop():
    async def main():
        ops = Recording()
        t = Threaded(ops)
        await t.start()
        main_thread = threading.get_ident()
        u1 = t.send(k.FSYNC, k.FSYNC_IN.pack(1, 0, 0))
        u2 = t.send(k.GETATTR, k.GETATTR_IN.pack(0, 0, 0), nodeid=4)   # others go on
        unique, error, data = await t.reply()
        assert (unique, error) == (u2, 0) and len(data) == k.ATTR_OUT.size
        assert set(t.s._pending) == {u1}
        ops.futures[1].set_result(None)          # the fsync's wait ends on the loop
        assert await t.reply() == (u1, 0, b"")
        assert not t.s._pending
        where = dict(ops.threads)
        assert where["getattr"] != main_thread and where["fsync starts"] != main_thread
        assert where["fsync resumes"] == main_thread
        await t.end()
    run_on_fusewire_loop(main)


def test_reader_thread_interrupt_cancels_a_suspended_handler():
    async def main():
        ops = Suspending()
        t = Threaded(ops)
        await t.start()
        u1 = t.send(k.FSYNC, k.FSYNC_IN.pack(1, 0, 0))
        assert await t.no_reply()
        t.send(k.INTERRUPT, k.INTERRUPT_IN.pack(u1))
        assert await t.reply() == (u1, -errno.EINTR, b"")
        t.send(k.INTERRUPT, k.INTERRUPT_IN.pack(u1))       # answered already: nothing
        assert await t.no_reply() and not t.s._pending
        await t.end()
    run_on_fusewire_loop(main)


def test_reader_thread_stops_reading_at_max_pending():
    async def main():
        ops = Suspending()
        t = Threaded(ops, max_pending=2)
        await t.start()
        u1 = t.send(k.FSYNC, k.FSYNC_IN.pack(1, 0, 0))
        t.send(k.FSYNC, k.FSYNC_IN.pack(2, 0, 0))
        u3 = t.send(k.GETATTR, k.GETATTR_IN.pack(0, 0, 0), nodeid=4)
        assert await t.no_reply(0.3)                  # the device is left unread
        assert len(t.s._pending) == 2 and not t.s._reading
        ops.futures[1].set_result(None)
        answers = {(await t.reply())[0], (await t.reply())[0]}
        assert answers == {u1, u3}                    # read again once below the bound
        ops.futures[2].set_result(None)
        await t.reply()
        await t.end()
    run_on_fusewire_loop(main)


def test_reader_thread_and_the_loop_never_run_at_once():
    """A handler holds the loop's lock: loop-side work (here a task that
    checks) never sees a handler half done, though the handler sleeps with
    the GIL released."""
    import time as _time

    class Slow:
        inside = False

        def getattr(self, ino, ctx):
            Slow.inside = True
            _time.sleep(0.001)
            Slow.inside = False
            return attrs(ino)

    async def main():
        t = Threaded(Slow())
        await t.start()
        seen = []
        stop = False

        async def watcher():
            while not stop:
                seen.append(Slow.inside)
                await asyncio.sleep(0)
        task = asyncio.ensure_future(watcher())
        for _ in range(50):
            u = t.send(k.GETATTR, k.GETATTR_IN.pack(0, 0, 0), nodeid=4)
            assert (await t.reply())[:2] == (u, 0)
        stop = True
        await task
        assert len(seen) > 50 and not any(seen)
        await t.end()
    run_on_fusewire_loop(main)


@pytest.mark.parametrize("err", [errno.ENODEV, errno.ECONNABORTED])
def test_reader_thread_device_end_stops_serving(err, monkeypatch):
    class Dead:
        def __getattr__(self, name):
            return getattr(os, name)

        def readv(self, fd, bufs):
            raise OSError(err, os.strerror(err))

    async def main():
        monkeypatch.setattr(session_mod, "os", Dead())
        w = Wire(Recorder())
        w.s.mounted = True
        try:
            await asyncio.wait_for(w.s.serve(), 5)
            w.s._thread.join(5)
            assert w.s._ended and not w.s.mounted and not w.s._thread.is_alive()
        finally:
            w.close()
    run_on_fusewire_loop(main)


def test_reader_thread_terminate_then_close_hands_the_device_over():
    """terminate() ends serve() at once; close() while the reader is still
    blocked in read(2) leaves the device to it: it closes it when its read
    returns, and never reads a descriptor number reused meanwhile."""
    async def main():
        w = Wire(Recorder())
        fd = os.dup(w.dev.fileno())
        w.s.fd = fd
        serving = asyncio.ensure_future(w.s.serve())
        for _ in range(100):
            if w.s._thread is not None:
                break
            await asyncio.sleep(0)
        w.s.terminate()
        await asyncio.wait_for(serving, 5)
        w.s.close(unmount=False)
        assert w.s.fd == -1 and w.s._orphan_fd == fd and w.s._thread.is_alive()
        w.peer.send(k.IN_HEADER.pack(40, k.STATFS, 2, 1, 0, 0, 0, 0, 0))   # wakes it
        w.s._thread.join(5)
        assert not w.s._thread.is_alive() and w.s._orphan_fd == -1
        with pytest.raises(OSError):
            os.fstat(fd)                     # closed by the reader
        w.peer.setblocking(False)
        with pytest.raises(BlockingIOError):
            w.peer.recv(100)                 # the request after the end is not answered
        w.close()
    run_on_fusewire_loop(main)


def test_reader_thread_does_not_starve_the_loop():
    """Requests back to back (a 'kernel' thread sends the next one as soon as
    the answer comes) while the loop has timers due: the loop gets its turn
    (fusewire.loop's hand-over, a short GIL switch interval) and its 5 ms
    timers run meanwhile.  (A kernel thread in the same process leaves gaps a
    real kernel does not; test_inode_cap's prune passes, timers of the loop
    while a process looks up names back to back, are the stricter check.)"""
    import time as _time

    class Ops:
        def getattr(self, ino, ctx):
            return attrs(ino)

    async def main():
        w = Wire(Ops())
        serving = asyncio.ensure_future(w.s.serve())
        stop = threading.Event()
        answered = [0]

        def kernel():
            u = 1000
            while not stop.is_set():
                u += 2
                w.peer.send(k.IN_HEADER.pack(56, k.GETATTR, u, 4, 0, 0, 0, 0, 0)
                            + k.GETATTR_IN.pack(0, 0, 0))
                w.peer.recv(1 << 16)
                answered[0] += 1
        t = threading.Thread(target=kernel)
        t.start()
        try:
            await asyncio.sleep(0.05)
            start = _time.monotonic()
            for _ in range(20):
                await asyncio.sleep(0.005)
            took = _time.monotonic() - start
        finally:
            stop.set()
            await asyncio.to_thread(t.join, 5)     # (the loop's lock is free meanwhile)
        assert answered[0] > 100                  # the reader was kept busy
        assert took < 1.0, took                   # the loop's timers ran meanwhile
        w.peer.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(serving, 5)
        w.close()
    run_on_fusewire_loop(main)


def test_reader_thread_device_end_after_serving_ended(monkeypatch):
    """The unmount at stop: serving ended (terminate), then the kernel ends
    the connection under the reader's read: it leaves quietly (no second end,
    no traceback), the loop being gone."""
    gate = threading.Event()
    errors = []

    class Later:
        def __getattr__(self, name):
            return getattr(os, name)

        def readv(self, fd, bufs):
            gate.wait(5)
            raise OSError(errno.ENODEV, "unmounted")

    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args))

    async def main():
        monkeypatch.setattr(session_mod, "os", Later())
        w = Wire(Recorder())
        serving = asyncio.ensure_future(w.s.serve())
        for _ in range(100):
            if w.s._thread is not None:
                break
            await asyncio.sleep(0)
        w.s.terminate()
        await asyncio.wait_for(serving, 5)
        return w
    w = None
    try:
        with asyncio.Runner(loop_factory=__import__("fusewire.loop").loop.new_event_loop) as r:
            w = r.run(main())
        gate.set()                        # the loop is closed now
        w.s._thread.join(5)
        assert not w.s._thread.is_alive() and errors == []
    finally:
        gate.set()
        if w is not None:
            w.close()
