"""Is a path a mount point, a dead FUSE mount?  Read from
``/proc/self/mountinfo`` and a ``statfs``: what ``simfs``, its daemon's
start and ``simfs-service`` (the systemd unit's steps) all ask.

Role: a small library (``os`` and ``errno`` only), imported by the commands
and the daemon alike.
"""

from __future__ import annotations

import errno
import os


def mountinfo_path(field: str) -> str:
    """A mount point as /proc/self/mountinfo writes it (octal escapes of
    space, tab, newline and backslash), decoded."""
    if "\\" not in field:          # the common case: nothing to decode
        return field
    return field.encode().decode("unicode_escape")


def is_mountpoint(path: str) -> bool:
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                if mountinfo_path(line.split()[4]) == real:
                    return True
    except OSError:
        return os.path.ismount(path)
    return False


def dead_mount(path: str) -> bool:
    """True when ``path`` is a FUSE mount whose daemon is gone."""
    try:
        os.stat(path)
        os.statvfs(path)     # the root's attributes may be cached; statfs is not
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def dead_mount_message(path: str) -> str:
    return (f"{path} is a dead mount (Transport endpoint is not connected): the simfs "
            f"daemon that served it is gone; clear it with 'umount -l {path}' "
            "and mount again")
