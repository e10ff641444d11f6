"""The FUSE device and the mount: open ``/dev/fuse``, ``mount(2)`` it at a
directory, ``umount2(2)`` it, and register passthrough backing files.

Role: the system calls that make a FUSE mount exist, done by the daemon itself
(it runs as root: no fusermount3 helper, no libfuse).  Options are the ones
mount(8) and fuse3's helper know: the mount flags (``ro``, ``nodev``, ...) go
into ``mount(2)``'s flags, the FUSE options (``allow_other``,
``default_permissions``, ``max_read=``) into its data with the device's
``fd=``; ``fsname=`` is the source and ``subtype=`` makes the type
``fuse.SUBTYPE``.

Concurrency: plain blocking calls, made before serving starts and after it
ended; ``backing_open``/``backing_close`` are one ioctl each.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import stat

from . import kernel as k

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_DIRSYNC = 128
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25
MS_REMOUNT = 32
MNT_DETACH = 2

# option -> (flag, set?)
MOUNT_FLAGS = {
    "ro": (MS_RDONLY, True), "rw": (MS_RDONLY, False),
    "nosuid": (MS_NOSUID, True), "suid": (MS_NOSUID, False),
    "nodev": (MS_NODEV, True), "dev": (MS_NODEV, False),
    "noexec": (MS_NOEXEC, True), "exec": (MS_NOEXEC, False),
    "sync": (MS_SYNCHRONOUS, True), "async": (MS_SYNCHRONOUS, False),
    "dirsync": (MS_DIRSYNC, True),
    "noatime": (MS_NOATIME, True), "atime": (MS_NOATIME, False),
    "nodiratime": (MS_NODIRATIME, True), "diratime": (MS_NODIRATIME, False),
    "relatime": (MS_RELATIME, True), "norelatime": (MS_RELATIME, False),
    "strictatime": (MS_STRICTATIME, True), "nostrictatime": (MS_STRICTATIME, False),
    "lazytime": (MS_LAZYTIME, True), "nolazytime": (MS_LAZYTIME, False),
}
DATA_FLAGS = {"allow_other", "default_permissions"}
DATA_VALUED = {"max_read"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountOptions:
    """``-o`` words split into mount(2)'s flags, its data and the names."""

    def __init__(self, words, default_flags: int = MS_NOSUID | MS_NODEV):
        self.flags = default_flags
        self.data: list[str] = []
        self.fsname = "fuse"
        self.subtype = ""
        for w in words:
            key, eq, val = w.partition("=")
            if key in MOUNT_FLAGS and not eq:
                bit, on = MOUNT_FLAGS[key]
                self.flags = self.flags | bit if on else self.flags & ~bit
            elif key in DATA_FLAGS and not eq:
                if key not in self.data:
                    self.data.append(key)
            elif key in DATA_VALUED and eq:
                self.data.append(w)
            elif key == "fsname" and eq:
                self.fsname = val
            elif key == "subtype" and eq:
                self.subtype = val
            else:
                raise ValueError(f"unknown mount option {w!r}")

    @property
    def fstype(self) -> str:
        return f"fuse.{self.subtype}" if self.subtype else "fuse"


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def open_device() -> int:
    """A new FUSE connection's device descriptor (close-on-exec)."""
    return os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)


def mount(fd: int, mountpoint: str, opts: MountOptions) -> None:
    """Mount the connection ``fd`` at ``mountpoint`` (root only)."""
    st = os.stat(mountpoint)
    data = [f"fd={fd}", f"rootmode={stat.S_IFMT(st.st_mode):o}", "user_id=0", "group_id=0"]
    data += opts.data
    _check(_libc.mount(opts.fsname.encode(), os.fsencode(mountpoint), opts.fstype.encode(),
                       opts.flags, ",".join(data).encode()), f"mount {mountpoint}")


def _unescape(field: str) -> str:
    """A mountinfo path: spaces, tabs, newlines and backslashes are octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def device_of(real: str) -> str | None:
    """``MAJOR:MINOR`` of the FUSE filesystem mounted last at ``real`` (a path
    resolved before the mount: resolving it now would stat the mount, which
    may not be served yet), from /proc/self/mountinfo; None if not found."""
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 10 or _unescape(fields[4]) != real:
                    continue
                post = line.split(" - ", 1)[1].split()
                if post[0] == "fuse" or post[0].startswith("fuse."):
                    found = fields[2]
    except (OSError, IndexError):
        return None
    return found


def set_readahead(dev: str, kib: int) -> None:
    """The kernel's readahead for the filesystem ``dev`` (its backing device
    info, /sys/class/bdi/MAJOR:MINOR/read_ahead_kb): at most ``kib`` KiB are
    read ahead per file, in requests of up to the negotiated max_pages."""
    with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
        f.write(f"{kib}\n")


def unmount(mountpoint: str, lazy: bool = True) -> None:
    """Unmount (detached by default, as fuse3's helper does for root); a
    mount already gone is not an error."""
    ret = _libc.umount2(os.fsencode(mountpoint), MNT_DETACH if lazy else 0)
    if ret != 0:
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOENT):
            raise OSError(e, f"umount {mountpoint}: {os.strerror(e)}")


def backing_open(dev_fd: int, fd: int) -> int:
    """Register ``fd`` as a passthrough backing file; returns its backing id
    (> 0).  The kernel keeps its own reference: ``fd`` may be closed after."""
    arg = bytearray(k.BACKING_MAP.pack(fd, 0, 0))
    return fcntl.ioctl(dev_fd, k.DEV_IOC_BACKING_OPEN, arg, True)   # the syscall's return


def backing_close(dev_fd: int, backing_id: int) -> None:
    """Drop the daemon's registration of a backing id (files already opened
    with it keep it until their last close)."""
    fcntl.ioctl(dev_fd, k.DEV_IOC_BACKING_CLOSE, bytearray(backing_id.to_bytes(4, "little")),
                True)
