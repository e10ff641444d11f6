"""The FUSE kernel protocol (``include/uapi/linux/fuse.h``, 7.x): opcodes,
flags and the wire structures, as precompiled ``struct.Struct`` objects.

Role: data only, no I/O.  Every structure is little-endian native layout with
the kernel's explicit padding, so ``Struct.size`` equals the C ``sizeof``.
Decoders read with ``unpack_from`` at an offset and ignore trailing bytes, so
a newer kernel that appends fields to a structure is understood.

Concurrency: immutable module constants; safe from any thread.
"""

from __future__ import annotations

import struct

KERNEL_MAJOR = 7
KERNEL_MINOR = 45          # the newest minor this layer speaks
MIN_MINOR = 31             # older kernels are refused at INIT
ROOT_ID = 1

# ---- opcodes ------------------------------------------------------------------
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
SETLK = 32
SETLKW = 33
ACCESS = 34
CREATE = 35
INTERRUPT = 36
BMAP = 37
DESTROY = 38
IOCTL = 39
POLL = 40
NOTIFY_REPLY = 41
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SETUPMAPPING = 48
REMOVEMAPPING = 49
SYNCFS = 50
TMPFILE = 51
STATX = 52
COPY_FILE_RANGE_64 = 53

OPCODE_NAMES = {v: k.lower() for k, v in dict(globals()).items()
                if k.isupper() and isinstance(v, int) and 0 < v < 64
                and k not in ("KERNEL_MAJOR", "KERNEL_MINOR", "MIN_MINOR", "ROOT_ID")}

# ---- notifications (unique 0, error = code) --------------------------------------
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3
NOTIFY_DELETE = 6
NOTIFY_PRUNE = 9                     # 7.45: drop these inodes if unused
PRUNE_MINOR = 45

# ---- INIT flags (flags | flags2 << 32) -----------------------------------------
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
SPLICE_WRITE = 1 << 7
SPLICE_MOVE = 1 << 8
SPLICE_READ = 1 << 9
FLOCK_LOCKS = 1 << 10
HAS_IOCTL_DIR = 1 << 11
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
EXPLICIT_INVAL_DATA = 1 << 25
MAP_ALIGNMENT = 1 << 26
SUBMOUNTS = 1 << 27
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
SECURITY_CTX = 1 << 32
HAS_INODE_DAX = 1 << 33
CREATE_SUPP_GROUP = 1 << 34
HAS_EXPIRE_ONLY = 1 << 35
DIRECT_IO_ALLOW_MMAP = 1 << 36
PASSTHROUGH = 1 << 37
NO_EXPORT_SUPPORT = 1 << 38
HAS_RESEND = 1 << 39
ALLOW_IDMAP = 1 << 40
OVER_IO_URING = 1 << 41
REQUEST_TIMEOUT = 1 << 42

_INIT_FLAGS = """ASYNC_READ POSIX_LOCKS ATOMIC_O_TRUNC EXPORT_SUPPORT BIG_WRITES DONT_MASK SPLICE_WRITE
SPLICE_MOVE SPLICE_READ FLOCK_LOCKS HAS_IOCTL_DIR AUTO_INVAL_DATA DO_READDIRPLUS READDIRPLUS_AUTO
ASYNC_DIO WRITEBACK_CACHE NO_OPEN_SUPPORT PARALLEL_DIROPS HANDLE_KILLPRIV POSIX_ACL ABORT_ERROR
MAX_PAGES CACHE_SYMLINKS NO_OPENDIR_SUPPORT EXPLICIT_INVAL_DATA MAP_ALIGNMENT SUBMOUNTS
HANDLE_KILLPRIV_V2 SETXATTR_EXT INIT_EXT SECURITY_CTX HAS_INODE_DAX CREATE_SUPP_GROUP
HAS_EXPIRE_ONLY DIRECT_IO_ALLOW_MMAP PASSTHROUGH NO_EXPORT_SUPPORT HAS_RESEND ALLOW_IDMAP
OVER_IO_URING REQUEST_TIMEOUT"""
INIT_FLAG_NAMES = {globals()[n]: n for n in _INIT_FLAGS.split()}


def flag_names(flags: int) -> str:
    """``flags`` (INIT's 64-bit set) as names, for logs and tools."""
    return ",".join(n for v, n in sorted(INIT_FLAG_NAMES.items()) if flags & v) or "-"


# ---- other flags ------------------------------------------------------------
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FOPEN_PASSTHROUGH = 1 << 7
# what may go with FOPEN_PASSTHROUGH (fs/fuse/iomode.c)
FOPEN_PASSTHROUGH_MASK = (FOPEN_PASSTHROUGH | FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES
                          | FOPEN_NOFLUSH)

GETATTR_FH = 1 << 0
WRITE_CACHE = 1 << 0
WRITE_LOCKOWNER = 1 << 1
WRITE_KILL_SUIDGID = 1 << 2
FSYNC_FDATASYNC = 1 << 0
OPEN_KILL_SUIDGID = 1 << 0
SETXATTR_ACL_KILL_SGID = 1 << 0
RELEASE_FLUSH = 1 << 0

EXT_GROUPS = 32            # fuse_ext_header.type of the supplementary groups

# ---- device ioctls --------------------------------------------------------------
# _IOW(229, 1, struct fuse_backing_map) and _IOW(229, 2, uint32_t)
DEV_IOC_BACKING_OPEN = 0x4010E501
DEV_IOC_BACKING_CLOSE = 0x4004E502

# ---- structures -----------------------------------------------------------------
S = struct.Struct
IN_HEADER = S("<IIQQIIIHH")          # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = S("<IiQ")               # len error unique
# fuse_attr: ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode
#            nlink uid gid rdev blksize flags; the seconds are __u64 on the wire
#            but the kernel reads them as time64_t: a time before 1970 is their
#            two's complement, so they are packed signed
ATTR_FMT = "QQQqqqIIIIIIIIII"
ENTRY_OUT = S("<QQQQII" + ATTR_FMT)  # nodeid generation entry_valid attr_valid (+nsec) attr
ATTR_OUT = S("<QII" + ATTR_FMT)      # attr_valid attr_valid_nsec dummy attr
FORGET_IN = S("<Q")
BATCH_FORGET_IN = S("<II")
FORGET_ONE = S("<QQ")
GETATTR_IN = S("<IIQ")               # getattr_flags dummy fh
SETATTR_IN = S("<IIQQQqqqIIIIIIII")  # valid pad fh size lock_owner atime mtime ctime (signed)
                                     # atimensec mtimensec ctimensec mode unused4 uid gid unused5
MKNOD_IN = S("<IIII")                # mode rdev umask padding
MKDIR_IN = S("<II")                  # mode umask
RENAME_IN = S("<Q")
RENAME2_IN = S("<QII")               # newdir flags padding
LINK_IN = S("<Q")
OPEN_IN = S("<II")                   # flags open_flags
CREATE_IN = S("<IIII")               # flags mode umask open_flags
OPEN_OUT = S("<QIi")                 # fh open_flags backing_id
RELEASE_IN = S("<QIIQ")              # fh flags release_flags lock_owner
FLUSH_IN = S("<QIIQ")
READ_IN = S("<QQIIQII")              # fh offset size read_flags lock_owner flags padding
WRITE_IN = S("<QQIIQII")             # fh offset size write_flags lock_owner flags padding
WRITE_IN_COMPAT_SIZE = 24
WRITE_OUT = S("<II")
STATFS_OUT = S("<QQQQQIIII24x")      # blocks bfree bavail files ffree bsize namelen frsize pad spare
FSYNC_IN = S("<QII")
SETXATTR_IN = S("<IIII")             # size flags setxattr_flags padding (SETXATTR_EXT)
SETXATTR_IN_COMPAT = S("<II")        # size flags
GETXATTR_IN = S("<II")
GETXATTR_OUT = S("<II")
ACCESS_IN = S("<II")
INIT_IN = S("<IIII")                 # major minor max_readahead flags
INIT_IN_FLAGS2 = S("<I")             # at offset 16 with INIT_EXT
INIT_OUT = S("<IIIIHHIIHHIIH22x")    # major minor max_readahead flags max_background
                                     # congestion_threshold max_write time_gran max_pages
                                     # map_alignment flags2 max_stack_depth request_timeout
INTERRUPT_IN = S("<Q")
FALLOCATE_IN = S("<QQQII")           # fh offset length mode padding
LSEEK_IN = S("<QQII")                # fh offset whence padding
LSEEK_OUT = S("<Q")
COPY_FILE_RANGE_IN = S("<QQQQQQQ")   # fh_in off_in nodeid_out fh_out off_out len flags
DIRENT = S("<QQII")                  # ino off namelen type
NOTIFY_INVAL_INODE_OUT = S("<Qqq")
NOTIFY_INVAL_ENTRY_OUT = S("<QII")   # parent namelen flags
NOTIFY_DELETE_OUT = S("<QQII")       # parent child namelen padding
NOTIFY_PRUNE_OUT = S("<IIQ")         # count padding spare, then count uint64 node ids
BACKING_MAP = S("<iIQ")              # fd flags padding
EXT_HEADER = S("<II")                # size type
SUPP_GROUPS = S("<I")                # nr_groups, then that many uint32

assert IN_HEADER.size == 40 and OUT_HEADER.size == 16
assert ENTRY_OUT.size == 128 and ATTR_OUT.size == 104
assert SETATTR_IN.size == 88 and READ_IN.size == 40 and WRITE_IN.size == 40
assert STATFS_OUT.size == 80 and INIT_OUT.size == 64 and OPEN_OUT.size == 16
assert COPY_FILE_RANGE_IN.size == 56 and FALLOCATE_IN.size == 32
