"""Reading the binary quota files of the original OpenVZ vzquota.

Role: ``vzquota import`` turns an OpenVZ node's ``/var/vzquota/quota.N`` into
this project's quota file.  The layout (facts from the original's
``src/quota_io.c`` and headers, see vzquota(8)):

* header: ``int magic``, ``int flags`` -- magic 0xFEDCBA98 (version 1),
  0xFEDCBB00 (2), 0xFEDCBC27 (3); flags QUOTA_ON 1, QUOTA_DIRTY 2,
  QUOTA_UGID_ON 4;
* the 1st-level stat, whose struct depends on the version: v1 keeps limits and
  usage in 32-bit 1K blocks, v2 in 64-bit bytes (v2 and v1 are 1-level only),
  v3 is ``struct vz_quota_stat`` (``dq_stat`` + ``dq_info``: bytes, inodes,
  deadlines, grace times);
* ``size_t path_len`` and the path (no NUL; 0 = a relative quota);
* v3 only: ``struct ugid_info`` (ugid limit, loaded count, flags, number of
  objects, the user and group grace times), then that many ``struct ugid_obj``
  (id, type 0 user / 1 group, a ``dq_stat``, flags), then a 64-bit checksum:
  the XOR of the file's preceding 8-byte words (the last one zero-padded).

C struct layout differs between the 64-bit (x86_64) and 32-bit (i386) builds
of the original (``time_t``/``size_t`` width, alignment of 64-bit fields);
both are read: the one whose sizes add up to the file's length is taken.

Errors are the original's (``VzError``, exit code 4): "Can't detect quota file
version; file is not a VZ quota file", "quota file is corrupted", "Quota file
check sum is invalid for id N; file is broken", and the check of the object
count and types.

Concurrency: pure functions over bytes; the caller holds whatever lock it needs.
"""

from __future__ import annotations

import errno
import functools
import operator
import os
import struct
import sys
from dataclasses import dataclass

from .errors import EC_NOQUOTAFILE, EC_QUOTAFILE, VzError
from .model import GROUP, USER, Counter, QuotaObject, QuotaState
from .qfile import CORRUPTED, NOT_A_QUOTA_FILE, bad_checksum, no_gc

MAGIC_V1, MAGIC_V2, MAGIC_V3 = 0xFEDCBA98, 0xFEDCBB00, 0xFEDCBC27
VERSIONS = {MAGIC_V1: 1, MAGIC_V2: 2, MAGIC_V3: 3}
QUOTA_ON, QUOTA_DIRTY, QUOTA_UGID_ON = 0x1, 0x2, 0x4
MAX_FILE = 1 << 30


@dataclass(frozen=True)
class Abi:
    """Struct layouts of one build of the original (little-endian).

    ``dq_stat``: bhard, bsoft, btime, bcurrent, ihard, isoft, itime, icurrent;
    ``dq_info``: bexpire, iexpire, flags; the old stats in their field order."""

    name: str
    dq_stat: str          # struct format of dq_stat
    dq_info: str
    stat_v1: str          # bhard bsoft bexpire btime bcurrent ihard isoft icurrent iexpire itime options
    stat_v2: str
    size_t: str
    ugid_head: str        # limit, count, flags, buf_size

    def size(self, fmt: str) -> int:
        return struct.calcsize("<" + fmt)


# x86_64: 8-byte time_t/size_t, 64-bit fields 8-aligned, structs padded to 8
X86_64 = Abi("x86_64", dq_stat="QQqQIIqI4x", dq_info="qqI4x",
             stat_v1="IIqqIIIIqqi4x", stat_v2="QQqqQIII4xqqi4x", size_t="Q",
             ugid_head="IIII")
# i386: 4-byte time_t/size_t, 64-bit fields 4-aligned
I386 = Abi("i386", dq_stat="QQiQIIiI", dq_info="iiI",
           stat_v1="IIiiIIIIiii", stat_v2="QQiiQIIIiii", size_t="I", ugid_head="IIII")
ABIS = (X86_64, I386)


def checksum(data: bytes) -> int:
    """XOR of the little-endian 8-byte words of ``data``, zero-padded."""
    pad = (-len(data)) % 8
    return functools.reduce(operator.xor, memoryview(data + b"\0" * pad).cast("Q"), 0) \
        if sys.byteorder == "little" else functools.reduce(
            operator.xor, struct.unpack(f"<{(len(data) + pad) // 8}Q", data + b"\0" * pad), 0)


def _counter(usage: int, soft: int, hard: int, deadline: int) -> Counter:
    return Counter(usage=usage, soft=soft, hard=hard, deadline=max(0, deadline))


def _layout_fits(data: bytes, version: int, abi: Abi) -> bool:
    """Do the sizes of this layout add up to the length of ``data``?"""
    stat = {1: abi.stat_v1, 2: abi.stat_v2, 3: abi.dq_stat + abi.dq_info}[version]
    off = 8 + abi.size(stat)
    sz = abi.size(abi.size_t)
    if len(data) < off + sz:
        return False
    (path_len,) = struct.unpack_from("<" + abi.size_t, data, off)
    off += sz + path_len
    if version < 3:
        return len(data) == off
    info = abi.size(abi.ugid_head + abi.dq_info + abi.dq_info)
    if path_len > len(data) or len(data) < off + info:
        return False
    buf_size = struct.unpack_from("<" + abi.ugid_head, data, off)[3]
    obj = abi.size("II" + abi.dq_stat + "I")
    obj += (-obj) % (8 if abi is X86_64 else 4)
    return len(data) == off + info + buf_size * obj + 8


def parse_ovz(data: bytes, qid: int) -> QuotaState:
    """The state an OpenVZ quota file holds, for quota id ``qid``."""
    sid = qid - 2**32 if qid >= 2**31 else qid
    if len(data) < 8:
        raise VzError(EC_QUOTAFILE, CORRUPTED)
    magic, flags = struct.unpack_from("<II", data, 0)
    version = VERSIONS.get(magic)
    if version is None:
        raise VzError(EC_QUOTAFILE, NOT_A_QUOTA_FILE)
    abi = next((a for a in ABIS if _layout_fits(data, version, a)), X86_64)
    if version == 3 and len(data) >= 16:
        if checksum(data[:-8]) != struct.unpack_from("<Q", data, len(data) - 8)[0]:
            raise VzError(EC_QUOTAFILE, bad_checksum(sid))
    try:
        with no_gc():
            return _parse(data, qid, sid, version, flags, abi)
    except struct.error:
        raise VzError(EC_QUOTAFILE, CORRUPTED) from None


def _parse(data: bytes, qid: int, sid: int, version: int, flags: int, abi: Abi) -> QuotaState:
    st = QuotaState(qid=qid)
    off = 8
    if version == 3:
        (bhard, bsoft, btime, bcur, ihard, isoft, itime, icur) = struct.unpack_from(
            "<" + abi.dq_stat, data, off)
        off += abi.size(abi.dq_stat)
        bexp, iexp, _flags = struct.unpack_from("<" + abi.dq_info, data, off)
        off += abi.size(abi.dq_info)
    else:
        fmt = abi.stat_v1 if version == 1 else abi.stat_v2
        (bhard, bsoft, bexp, btime, bcur, ihard, isoft, icur, iexp, itime,
         _options) = struct.unpack_from("<" + fmt, data, off)
        off += abi.size(fmt)
        if version == 1:                    # 1K blocks -> bytes (block2size)
            bhard, bsoft, bcur = bhard * 1024, bsoft * 1024, bcur * 1024
    st.level1.space = _counter(bcur, bsoft, bhard, btime)
    st.level1.inodes = _counter(icur, isoft, ihard, itime)
    st.grace1.space, st.grace1.inodes = max(0, bexp), max(0, iexp)
    (path_len,) = struct.unpack_from("<" + abi.size_t, data, off)
    off += abi.size(abi.size_t)
    if path_len:
        raw = data[off:off + path_len]
        if len(raw) != path_len:
            raise VzError(EC_QUOTAFILE, CORRUPTED)
        st.path = os.fsdecode(raw.split(b"\0", 1)[0])
        off += path_len
    # QUOTA_ON means "accounted right now" in the original: copied from a node
    # where it ran, the next `on` must warn of an incorrect shutdown and recount,
    # as the original's would -- this project's "on" + "mounted" say the same.
    st.on = st.mounted = bool(flags & QUOTA_ON)
    # reformat_quota(): a v2 file needs a recount in v3
    st.dirty = bool(flags & QUOTA_DIRTY) or version == 2
    st.ugid_on = bool(flags & QUOTA_UGID_ON)
    if version < 3:
        return st
    limit, _count, _cflags, buf_size = struct.unpack_from("<" + abi.ugid_head, data, off)
    off += abi.size(abi.ugid_head)
    for grace in (st.user_grace, st.group_grace):
        bexp, iexp, _flags = struct.unpack_from("<" + abi.dq_info, data, off)
        grace.space, grace.inodes = max(0, bexp), max(0, iexp)
        off += abi.size(abi.dq_info)
    st.ugid_limit = limit
    obj_fmt = "II" + abi.dq_stat + "I"
    obj_size = abi.size(obj_fmt)
    obj_size += (-obj_size) % (8 if abi is X86_64 else 4)
    if off + buf_size * obj_size > len(data) - 8:
        raise VzError(EC_QUOTAFILE, CORRUPTED)
    count = 0
    # the objects, as one run of fixed-size records (padded to obj_size)
    records = struct.iter_unpack(
        "<" + obj_fmt + "x" * (obj_size - abi.size(obj_fmt)),
        data[off:off + buf_size * obj_size])
    for n, (ugid, kind, bhard, bsoft, btime, bcur, ihard, isoft, itime, icur,
            _oflags) in enumerate(records):
        if kind >= 2:
            raise VzError(EC_QUOTAFILE, f"{n} ugid object has incorrect type: id={ugid}, "
                          f"type={kind}; quota file is corrupted")
        table = st.users if kind == 0 else st.groups
        if ugid not in table:
            count += 1
        table[ugid] = QuotaObject(Counter(bcur, bsoft, bhard, btime if btime > 0 else 0),
                                  Counter(icur, isoft, ihard, itime if itime > 0 else 0))
    if count != buf_size:
        raise VzError(EC_QUOTAFILE, "Number of ugid objects read from quota file is not "
                      "equal to one in 2-level quota statistics; quota file is corrupted "
                      f"for id {sid}\n")
    return st


def read_ovz_file(path: str, qid: int) -> QuotaState:
    """Read the OpenVZ quota file at ``path`` (errors as the original words them)."""
    sid = qid - 2**32 if qid >= 2**31 else qid
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        code = EC_NOQUOTAFILE if e.errno == errno.ENOENT else EC_QUOTAFILE
        raise VzError(code, f"Can't open quota file for id {sid}, maybe you need to "
                      f"reinitialize quota: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not os.path.stat.S_ISREG(info.st_mode) or info.st_size > MAX_FILE:
            raise VzError(EC_QUOTAFILE, NOT_A_QUOTA_FILE)
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            if sum(map(len, chunks)) > MAX_FILE:
                raise VzError(EC_QUOTAFILE, NOT_A_QUOTA_FILE)
    except OSError as e:
        raise VzError(EC_QUOTAFILE, f"read quota file: {e.strerror}") from None
    finally:
        os.close(fd)
    return parse_ovz(b"".join(chunks), qid)
