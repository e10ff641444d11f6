"""Quota scanner: counts the inodes and allocated space of a directory tree.

Role: the usage figures that ``init``, ``recalc`` and a dirty-triggered rescan
store (SPEC section 4): every inode of the tree once, the root directory
included, hard links once, space = ``st_blocks * 512``; optionally the same per
owner uid and per owner gid. Symlinks are never followed; another filesystem
mounted inside the tree raises ``CrossDevice``.

Safety: the tree belongs to a container and we run as root, so the walk never
resolves a path string. Each directory is opened relative to its parent's fd
with ``O_NOFOLLOW | O_DIRECTORY``, checked with ``fstat`` (same device, same
inode as listed) and read with ``os.scandir(fd)`` + ``lstat``-style stats.

File descriptors: the walk is an explicit depth-first stack of frames, one per
directory on the current path (a few small Python objects, no recursion). A
directory is read to the end at once; only its subdirectory names are kept. Its
fd stays open only while it has subdirectories still to visit, so a long chain
costs one fd. At most ``MAX_FDS`` frames hold an fd; beyond that the
shallowest is closed and reopened later by walking down, one ``openat`` per
component, from the nearest ancestor still open (the root fd never closes), its
identity checked by inode. Pathological trees thus cost extra ``openat`` calls,
never unbounded fds.

Concurrency: the scan may run while a mount keeps serving the tree. Entries that
vanish meanwhile are skipped; the result is exact once writers are quiet. The
function holds no shared state; ``progress`` is called from the calling thread.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Callable

from .errors import CrossDevice

MAX_FDS = 64                 # directory fds held at once besides the root's
PROGRESS_EVERY = 10_000      # inodes between progress() calls (checked per directory)

_OPEN_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)  # vanished / replaced meanwhile


@dataclass
class ScanResult:
    space: int = 0                      # allocated bytes
    inodes: int = 0
    users: dict[int, list[int]] = field(default_factory=dict)   # uid -> [bytes, inodes]
    groups: dict[int, list[int]] = field(default_factory=dict)  # gid -> [bytes, inodes]


class _Frame:
    """One directory on the current path: where it is and what is left in it."""

    __slots__ = ("fd", "name", "ino", "todo")

    def __init__(self, fd: int, name: str, ino: int):
        self.fd, self.name, self.ino = fd, name, ino
        self.todo: list[tuple[str, int]] = []   # subdirectories still to visit


def _path(stack: list[_Frame], depth: int, name: str) -> str:
    """The path of ``name`` inside ``stack[depth]``, for messages only."""
    return "/".join([f.name for f in stack[:depth + 1]] + [name])


def _open_dir(stack: list[_Frame], depth: int, name: str, ino: int, dev: int) -> int | None:
    """Open ``name`` under ``stack[depth]`` without following links; None if it is
    gone or no longer the directory we listed. Raises CrossDevice for a mount point."""
    try:
        fd = os.open(name, _OPEN_FLAGS, dir_fd=stack[depth].fd)
    except OSError as e:
        if e.errno in _GONE:
            return None
        raise
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if st.st_dev != dev:
        os.close(fd)
        raise CrossDevice(_path(stack, depth, name))
    if st.st_ino != ino:            # replaced since we listed it: not ours to count
        os.close(fd)
        return None
    return fd


def scan(path: str, per_id: bool = True,
         progress: Callable[[int], None] | None = None) -> ScanResult:
    """Count the tree under ``path`` (see the module docstring).

    Missing or unreadable ``path`` raises the OSError; ``CrossDevice`` names the
    first entry found on another filesystem."""
    root_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    stack: list[_Frame] = []
    try:
        st = os.fstat(root_fd)
        dev = st.st_dev
        blocks, inodes = st.st_blocks, 1
        ids: dict[int, list[int]] = {}          # uid << 32 | gid -> [blocks, inodes]
        if per_id:
            ids[st.st_uid << 32 | st.st_gid] = [st.st_blocks, 1]
        seen: set[int] = set()                  # inode numbers of hard-linked files
        next_report = PROGRESS_EVERY
        n_open = 0                              # frames other than the root holding an fd
        low = 1                                 # no frame below this index holds an fd
        frame = _Frame(root_fd, path.rstrip("/"), st.st_ino)
        stack.append(frame)

        while True:
            # -- read the current directory to the end --------------------------
            todo = frame.todo
            # (a directory removed since we opened it just reads empty: glibc maps
            # getdents ENOENT to end-of-directory)
            with os.scandir(frame.fd) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if st.st_dev != dev:
                        raise CrossDevice(_path(stack, len(stack) - 1, e.name))
                    if st.st_mode & 0o170000 == 0o040000:   # S_ISDIR
                        todo.append((e.name, st.st_ino))
                    elif st.st_nlink > 1:
                        ino = st.st_ino
                        if ino in seen:
                            continue
                        seen.add(ino)
                    b = st.st_blocks
                    blocks += b
                    inodes += 1
                    if per_id:
                        k = st.st_uid << 32 | st.st_gid
                        a = ids.get(k)
                        if a is None:
                            ids[k] = [b, 1]
                        else:
                            a[0] += b
                            a[1] += 1
            if progress is not None and inodes >= next_report:
                progress(inodes)
                next_report = inodes + PROGRESS_EVERY

            # -- pick the next directory: depth first, closing what is done -----
            frame = None
            while stack:
                top = stack[-1]
                if not top.todo:
                    if top.fd >= 0 and top.fd != root_fd:
                        os.close(top.fd)
                        n_open -= 1
                    top.fd = -1
                    stack.pop()
                    continue
                if top.fd < 0:                  # evicted earlier: walk down again
                    opened, first = _reopen(stack, dev)
                    n_open += opened
                    low = min(low, first)
                    if top.fd < 0:              # the path vanished under us
                        top.todo.clear()
                        continue
                name, ino = top.todo.pop()
                fd = _open_dir(stack, len(stack) - 1, name, ino, dev)
                if fd is None:
                    continue
                if not top.todo and top.fd != root_fd:   # parent no longer needed
                    os.close(top.fd)
                    top.fd = -1
                    n_open -= 1
                frame = _Frame(fd, name, ino)
                stack.append(frame)
                n_open += 1
                low = min(low, len(stack) - 1)
                while n_open > MAX_FDS:          # evict the shallowest open frame
                    while stack[low].fd < 0:
                        low += 1
                    os.close(stack[low].fd)
                    stack[low].fd = -1
                    n_open -= 1
                break
            if frame is None:
                break

        res = ScanResult(space=blocks * 512, inodes=inodes)
        for k, (b, n) in ids.items():
            for table, i in ((res.users, k >> 32), (res.groups, k & 0xFFFFFFFF)):
                a = table.get(i)
                if a is None:
                    table[i] = [b * 512, n]
                else:
                    a[0] += b * 512
                    a[1] += n
        return res
    finally:
        for f in stack:
            if f.fd >= 0 and f.fd != root_fd:
                os.close(f.fd)
        os.close(root_fd)


def _reopen(stack: list[_Frame], dev: int) -> tuple[int, int]:
    """Reopen the closed frames from the nearest open ancestor down to the top of
    ``stack``; returns (fds opened, index of the first). Stops early if a
    directory on the way is gone (the top then stays closed)."""
    i = len(stack) - 1
    while stack[i].fd < 0:
        i -= 1
    opened = 0
    for j in range(i + 1, len(stack)):
        fd = _open_dir(stack, j - 1, stack[j].name, stack[j].ino, dev)
        if fd is None:
            break
        stack[j].fd = fd
        opened += 1
    return opened, i + 1
