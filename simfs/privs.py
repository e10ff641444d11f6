"""Set-id bits and inherited ACLs: what a local filesystem does to a node's
mode that the daemon, writing as root, must do itself.

Role: helpers of the handlers (``simfs.ops``), no state.  With
FUSE_HANDLE_KILLPRIV_V2 the kernel flags each write, truncate, ``O_TRUNC``
open and chown that must clear set-user-ID / set-group-ID, and the daemon
clears them (``kill_privs``); with FUSE_POSIX_ACL and DONT_MASK a node
created under a default ACL gets its mode from that ACL, not the umask
(``inherited_acl``, ``keep_made_mode``).

Concurrency: stateless; called from the request loop.
"""

from __future__ import annotations

import os
import stat

from fusewire import get_sup_groups

from . import lower

ACL_DEFAULT = b"system.posix_acl_default"


def kill_privs(node, st: os.stat_result, caller: tuple[int, int, int] | None,
               acl: bool = False, file_gid: int | None = None) -> bool:
    """What a local filesystem does when a write, truncate or chown by
    someone without CAP_FSETID reaches a file (the kernel's kill flag
    says so: HANDLE_KILLPRIV_V2): set-user-ID goes, and set-group-ID when
    the file is group-executable or the caller (uid, gid, pid) is not in
    its group (``file_gid``: the group it had before a chown); an access
    ACL set by someone neither in the file's group nor CAP_FSETID drops
    set-group-ID (``acl``: the kernel's flag already says so).  The daemon
    runs as root (CAP_FSETID), so the backing filesystem keeps them: they
    are cleared here, by a chmod of the backing inode (``st``: its stat
    now).  ``security.capability`` needs nothing: the backing filesystem
    drops it at every write, truncate and chown, root's too, as it does
    locally.  Returns whether a bit was cleared."""
    mode = st.st_mode
    if acl:
        kill = mode & stat.S_ISGID
    elif stat.S_ISDIR(mode):          # (the kernel never asks: a directory keeps them)
        return False
    else:
        kill = mode & stat.S_ISUID
        if mode & stat.S_ISGID:
            if mode & stat.S_IXGRP:
                kill |= stat.S_ISGID
            elif caller is not None and caller[0] != 0:
                # not group-executable (a locking mark): only a caller
                # outside the file's group loses it (rare: /proc read here)
                gid = st.st_gid if file_gid is None else file_gid
                if caller[1] != gid and gid not in get_sup_groups(caller[2]):
                    kill |= stat.S_ISGID
    if kill and not stat.S_ISLNK(mode):
        os.chmod(lower.proc_path(node.fd), stat.S_IMODE(mode) & ~kill)
        node.mode = mode & ~kill
        return True
    return False


def inherited_acl(parent, enforced: bool) -> bytes | None:
    """The default ACL of ``parent`` when ACLs are ``enforced``, else None.  A
    node created there gets it from the backing filesystem (as its access
    ACL, and a directory as its default ACL too) with its mode masked by
    it instead of by the umask, as on a local filesystem: the daemon then
    creates with the caller's mode unmasked (the kernel sends it so:
    DONT_MASK) and keeps the mode the backing filesystem gave it."""
    if not enforced:
        return None
    try:
        return os.getxattr(lower.proc_path(parent.fd), ACL_DEFAULT)
    except OSError:               # ENODATA: none; EOPNOTSUPP: no ACLs on the backing
        return None


def keep_made_mode(inode, st: os.stat_result, made: list[int]) -> os.stat_result:
    """A node created under a default ACL keeps the mode the backing
    filesystem gave it (``made``), which giving it to its owner may have
    changed (a chown drops set-group-ID); the chmod sets the ACL's mask
    from the same group bits, so the ACL stays as it was inherited."""
    if made and stat.S_IMODE(st.st_mode) != stat.S_IMODE(made[0]):
        os.chmod(lower.proc_path(inode.fd), stat.S_IMODE(made[0]))
        st = os.fstat(inode.fd)
    return st
