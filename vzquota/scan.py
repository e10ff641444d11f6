"""Quota scanner: counts the inodes and allocated space of a directory tree.

Role: the usage figures that ``init``, ``recalc`` and a dirty-triggered rescan
store (SPEC section 4): every inode of the tree once, the root directory
included, hard links once, space = ``st_blocks * 512``; optionally the same per
owner uid and per owner gid. Symlinks are never followed; another filesystem
mounted inside the tree raises ``CrossDevice``.

Safety: the tree belongs to a container and we run as root, so the walk never
resolves a path string. Each directory is opened relative to its parent's fd
with ``O_NOFOLLOW | O_DIRECTORY``, checked with ``fstat`` (same device, same
inode as listed), listed with ``os.listdir(fd)`` and its entries stat'ed with
``os.lstat(name, dir_fd=fd)`` (no link followed). Path strings are built for
messages only.

File descriptors: the walk is an explicit depth-first stack of frames, one per
directory on the current path (a few small Python objects, no recursion). A
directory is read to the end at once; only its subdirectory names are kept. Its
fd stays open only while it has subdirectories still to visit, so a long chain
costs one fd. At most ``MAX_FDS`` frames hold an fd; beyond that the
shallowest is closed and reopened later by walking down, one ``openat`` per
component, from the nearest ancestor still open (the root fd never closes), its
identity checked by inode. Pathological trees thus cost extra ``openat`` calls,
never unbounded fds.

Speed (the requirement: as fast as ``du -s``; ``tools/bench_scan.py`` measures
it): the cost is one ``fstatat`` plus the creation of a Python stat result per
entry, which alone makes one Python process slower than ``du``. Big trees are
therefore walked by several processes (``WORKERS``, default: the CPUs we may
run on). The scan first walks in-process; a tree that is done within
``PARALLEL_MIN`` inodes never starts a worker. Otherwise the subdirectories
still pending on the walk's stack become work units; the largest (by
``st_nlink``, i.e. most subdirectories) are split one level further in-process
until there are ``UNITS_PER_WORKER`` per worker. The parent then only
coordinates: it opens each unit (the same checks as above), hands the fd over
an ``AF_UNIX`` ``SOCK_SEQPACKET`` socket (``SCM_RIGHTS``) to whichever worker
asks, largest first, in batches that shrink as the queue empties, and merges
the workers' totals. Each worker walks its units exactly like the sequential
walk, with its own fd budget, and keeps every non-directory with
``st_nlink > 1`` aside (inode -> blocks, owner) instead of counting it; the
parent counts the union of those maps once, so hard links split across workers
count once. A ``CrossDevice`` or ``OSError`` in a worker is sent back and
re-raised in the caller as the same type with the same path / errno; the other
workers are then killed and reaped.

Workers are forked only when the process has a single thread (the ``vzquota``
CLI: about 2 ms each; ``/proc/self/task`` is checked). A forked child only walks,
talks over its socket and leaves with ``os._exit``. With other threads alive
(the simfs daemon calls ``scan()`` from a trio worker thread) forking is unsafe,
since locks held by the other threads stay locked in the child, so ``START =
"auto"`` walks sequentially there. ``START = "spawn"`` instead starts each worker
as a fresh interpreter (``python -I -S -c ...`` via subprocess, 40-70 ms to
start) that receives everything over its socket. That mode is tested but not the
default: measured on a 100k-file tree it was slower than the sequential walk
(the late-starting worker gets little work).

Settled figures: before walking, the scan flushes the tree's filesystem
(``syncfs``), so that blocks it would allocate only at writeback (ext4's
delayed allocation and extent-tree blocks) are allocated, and counted, now;
otherwise ``st_blocks`` may grow after the scan has read it.

Concurrency: the scan may run while a mount keeps serving the tree. Entries that
vanish meanwhile are skipped; the result is exact once writers are quiet (a
live mount passes ``skip``, the files it counts itself: see simfs/mount.py
``PassWatch``). The
function holds no shared state; ``progress`` is called from the calling thread
only, with a non-decreasing count (hard-linked files are counted as met, so the
count may exceed the final total slightly). Worker processes never outlive the
call.
"""

from __future__ import annotations

import ctypes
import errno
import heapq
import marshal
import os
import select
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

from .errors import CrossDevice

MAX_FDS = 64                 # directory fds held at once besides the root's
PROGRESS_EVERY = 10_000      # inodes between progress() calls (checked per directory)
WORKERS: int | None = None   # walker processes for big trees; None: usable CPUs
PARALLEL_MIN = 4_000         # inodes counted in-process before workers are forked
PARALLEL_MIN_SPAWN = 40_000  # the same when workers must be spawned (slower start)
UNITS_PER_WORKER = 16        # split pending subtrees until there are this many
BATCH_MAX = 16               # units (fds) handed over in one message
START = "auto"               # "fork", "spawn", or "auto": fork iff single-threaded,
                             # else sequential

_OPEN_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)  # vanished / replaced meanwhile
_CHUNK = 32 * 1024           # bytes of a worker's result per message
_MSG_MAX = _CHUNK + 1024     # receive buffer: every message is smaller


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
        self.todo: list[tuple[str, int, int]] = []   # subdirs to visit: name, ino, nlink


class _Acc:
    """Running totals of one walker. Hard-linked non-directories are kept in
    ``links`` (ino -> (blocks, uid << 32 | gid)) and counted by ``result()``."""

    __slots__ = ("per_id", "blocks", "inodes", "ids", "links")

    def __init__(self, per_id: bool):
        self.per_id = per_id
        self.blocks = self.inodes = 0
        self.ids: dict[int, list[int]] = {}          # uid << 32 | gid -> [blocks, inodes]
        self.links: dict[int, tuple[int, int]] = {}

    def count(self) -> int:
        return self.inodes + len(self.links)

    def merge(self, blocks: int, inodes: int, ids: dict, links: dict) -> None:
        self.blocks += blocks
        self.inodes += inodes
        mine = self.ids
        for k, (b, n) in ids.items():
            a = mine.get(k)
            if a is None:
                mine[k] = [b, n]
            else:
                a[0] += b
                a[1] += n
        self.links.update(links)        # one inode, one entry: dedupes across walkers

    def result(self) -> ScanResult:
        blocks, inodes = self.blocks, self.inodes + len(self.links)
        ids = {k: list(v) for k, v in self.ids.items()} if self.per_id else {}
        for b, k in self.links.values():
            blocks += b
            if self.per_id:
                a = ids.setdefault(k, [0, 0])
                a[0] += b
                a[1] += 1
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


def _syncfs(fd: int) -> None:
    """Write back the dirty data of the filesystem behind ``fd`` (syncfs(2));
    a failure is only a less settled count, never an error of the scan."""
    try:
        ctypes.CDLL(None, use_errno=True).syncfs(fd)
    except (OSError, AttributeError):
        pass


def scan(path: str, per_id: bool = True,
         progress: Callable[[int], None] | None = None,
         skip: frozenset[int] = frozenset()) -> ScanResult:
    """Count the tree under ``path`` (see the module docstring).

    ``skip``: inode numbers of non-directories to leave out (a live mount
    counts those itself); given, the walk is sequential.
    Missing or unreadable ``path`` raises the OSError; ``CrossDevice`` names the
    first entry found on another filesystem."""
    root_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    stack: list[_Frame] = []
    try:
        _syncfs(root_fd)
        st = os.fstat(root_fd)
        dev = st.st_dev
        acc = _Acc(per_id)
        acc.blocks, acc.inodes = st.st_blocks, 1
        if per_id:
            acc.ids[st.st_uid << 32 | st.st_gid] = [st.st_blocks, 1]
        stack.append(_Frame(root_fd, path.rstrip("/"), st.st_ino))
        workers = _n_workers()
        method = _start_method() if workers > 1 and not skip else None  # None: sequential
        budget = None if method is None else (
            PARALLEL_MIN if method == "fork" else PARALLEL_MIN_SPAWN)
        reporter = _Reporter(progress)
        if not _walk(stack, dev, acc, reporter.own, budget, skip):
            _Parallel(stack, dev, acc, reporter, workers, method).run()
        return acc.result()
    finally:
        for f in stack:
            if f.fd >= 0 and f.fd != root_fd:
                os.close(f.fd)
        os.close(root_fd)


def _walk(stack: list[_Frame], dev: int, acc: _Acc,
          progress: Callable[[int], None] | None, budget: int | None = None,
          skip: frozenset[int] = frozenset()) -> bool:
    """Walk depth first from ``stack[-1]`` (open, checked, not yet read) until the
    stack is empty (True), or until ``acc`` holds ``budget`` inodes (False: the
    stack is left as it is, each frame with the subdirectories still to visit).
    ``stack[0]``'s fd is the caller's and never closed here."""
    root_fd = stack[0].fd
    frame = stack[-1]
    listdir, lstat = os.listdir, os.lstat
    blocks, inodes = acc.blocks, acc.inodes
    ids, links, per_id = acc.ids, acc.links, acc.per_id
    next_report = acc.count() + PROGRESS_EVERY
    n_open = sum(1 for f in stack[1:] if f.fd >= 0)   # frames besides stack[0] with an fd
    low = 1                                           # no frame below this holds an fd
    try:
        while True:
            # -- read the current directory to the end --------------------------
            todo = frame.todo
            fd = frame.fd
            # (a directory removed since we opened it just reads empty: glibc maps
            # getdents ENOENT to end-of-directory)
            for name in listdir(fd):
                try:
                    st = lstat(name, dir_fd=fd)
                except FileNotFoundError:
                    continue
                if st.st_dev != dev:
                    raise CrossDevice(_path(stack, len(stack) - 1, name))
                if st.st_mode & 0o170000 == 0o040000:   # S_ISDIR
                    todo.append((name, st.st_ino, st.st_nlink))
                elif skip and st.st_ino in skip:
                    continue
                elif st.st_nlink > 1:                   # counted once, by result()
                    links[st.st_ino] = (st.st_blocks, st.st_uid << 32 | st.st_gid)
                    continue
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
            if progress is not None and inodes + len(links) >= next_report:
                progress(inodes + len(links))
                next_report = inodes + len(links) + PROGRESS_EVERY
            if budget is not None and inodes + len(links) >= budget:
                return False

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
                name, ino, _ = top.todo.pop()
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
                return True
    finally:
        acc.blocks, acc.inodes = blocks, inodes


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


# -- parallel walk ---------------------------------------------------------------

def _n_workers() -> int:
    if WORKERS is not None:
        return WORKERS
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _start_method() -> str | None:
    """How to start workers; None: don't (walk sequentially)."""
    if START != "auto":
        return START
    try:
        single = len(os.listdir("/proc/self/task")) == 1
    except OSError:
        single = False
    return "fork" if single else None


class _Reporter:
    """Calls ``progress`` (in the calling thread) each ``PROGRESS_EVERY`` inodes of
    the sum of the parent's own count and the workers' last reported counts."""

    def __init__(self, progress: Callable[[int], None] | None):
        self.progress = progress
        self.mine = 0
        self.theirs: dict[int, int] = {}
        self.next = PROGRESS_EVERY
        self.own = None if progress is None else self._own

    def _own(self, n: int) -> None:
        self.mine = n
        self.check()

    def worker(self, w: int, n: int) -> None:
        self.theirs[w] = n
        self.check()

    def check(self) -> None:
        total = self.mine + sum(self.theirs.values())
        if self.progress is not None and total >= self.next:
            self.progress(total)
            self.next = total + PROGRESS_EVERY


class _Worker:
    """The parent's handle on one walker process."""

    def __init__(self, method: str):
        self.pid = -1
        self.proc: subprocess.Popen | None = None
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.data: list[bytes] = []
        self.done = False
        try:
            if method == "fork":
                pid = os.fork()
                if pid == 0:                    # child: walk, report, _exit; nothing else
                    try:
                        _serve(child.fileno())
                    finally:
                        os._exit(0)
                self.pid = pid
            else:
                root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
                boot = (f"import sys; sys.path.insert(0, {root!r}); "
                        f"from vzquota.scan import _serve; _serve({child.fileno()})")
                self.proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", boot], pass_fds=[child.fileno()],
                    stdin=subprocess.DEVNULL)
                self.pid = self.proc.pid
        finally:
            child.close()

    def reap(self, kill: bool) -> None:
        self.sock.close()
        if self.pid < 0:
            return
        if kill:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            self.proc.wait()
        else:
            os.waitpid(self.pid, 0)
        self.pid = -1


class _Parallel:
    """The coordinating side of a parallel scan (see the module docstring)."""

    def __init__(self, stack: list[_Frame], dev: int, acc: _Acc,
                 reporter: _Reporter, n: int, method: str):
        self.dev, self.acc, self.reporter = dev, acc, reporter
        self.n, self.method = n, method
        self.held: list[_Frame] = []    # frames opened here to split units
        # units: heap of (-nlink, seq, chain, name, ino); chain[-1] is the parent dir
        self.units: list = []
        self.paths: dict[int, str] = {}  # unit number -> path, for error messages
        for i, f in enumerate(stack):
            chain = stack[:i + 1]
            for name, ino, nlink in f.todo:
                self.units.append((-nlink, len(self.units), chain, name, ino))
            f.todo = []
        heapq.heapify(self.units)

    def run(self) -> None:
        workers: list[_Worker] = []
        try:
            setup = b"S" + marshal.dumps(
                (self.dev, self.acc.per_id, PROGRESS_EVERY, MAX_FDS, BATCH_MAX))
            for _ in range(self.n):
                w = _Worker(self.method)
                workers.append(w)
                w.sock.sendall(setup)
            self._split()               # while the workers start
            self._serve(workers)
            for w in workers:
                w.reap(kill=False)
        finally:
            for w in workers:
                if w.pid >= 0:
                    w.reap(kill=True)
            for f in self.held:
                if f.fd >= 0:
                    os.close(f.fd)

    def _split(self) -> None:
        """Read the largest units here, one level, until there are enough."""
        units, acc = self.units, self.acc
        seq = len(units)
        while units and len(units) < UNITS_PER_WORKER * self.n and len(self.held) < MAX_FDS:
            nlink, _, chain, name, ino = units[0]
            if -nlink <= 2:             # no subdirectories: nothing to split
                break
            heapq.heappop(units)
            fd = self._open(chain, name, ino)
            if fd is None:
                continue
            frame = _Frame(fd, name, ino)
            self.held.append(frame)
            sub = chain + [frame]
            _walk(sub, self.dev, acc, self.reporter.own, budget=0)
            for n, i, nl in frame.todo:
                heapq.heappush(units, (-nl, seq, sub, n, i))
                seq += 1
            if not frame.todo:
                os.close(frame.fd)
                frame.fd = -1
            frame.todo = []

    def _open(self, chain: list[_Frame], name: str, ino: int) -> int | None:
        """Open unit ``name`` of ``chain[-1]``, reopening evicted ancestors for the
        moment (closed again at once: the fd budget holds here too)."""
        if chain[-1].fd >= 0:
            return _open_dir(chain, len(chain) - 1, name, ino, self.dev)
        opened, first = _reopen(chain, self.dev)
        try:
            if chain[-1].fd < 0:
                return None
            return _open_dir(chain, len(chain) - 1, name, ino, self.dev)
        finally:
            for f in chain[first:first + opened]:
                os.close(f.fd)
                f.fd = -1

    def _batch(self) -> tuple[list, list[int]]:
        """Open the next units, largest first; fewer per batch as the queue empties."""
        units = self.units
        want = min(BATCH_MAX, max(1, -(-len(units) // (2 * self.n))))
        meta, fds = [], []
        try:
            while units and len(fds) < want:
                _, _, chain, name, ino = heapq.heappop(units)
                fd = self._open(chain, name, ino)
                if fd is not None:
                    fds.append(fd)
                    self.paths[len(self.paths)] = _path(chain, len(chain) - 1, name)
                    meta.append((len(self.paths) - 1, ino))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return meta, fds

    def _serve(self, workers: list[_Worker]) -> None:
        live = {w.sock.fileno(): (i, w) for i, w in enumerate(workers)}
        while live:
            ready, _, _ = select.select(list(live), [], [])
            for fileno in ready:
                i, w = live[fileno]
                msg = w.sock.recv(_MSG_MAX)
                tag, body = msg[:1], msg[1:]
                if tag == b"R":                     # ready for more work
                    self.reporter.worker(i, marshal.loads(body))
                    meta, fds = self._batch()
                    if fds:
                        try:
                            socket.send_fds(w.sock, [b"U" + marshal.dumps(meta)], fds)
                        finally:
                            for fd in fds:
                                os.close(fd)
                    else:
                        w.sock.sendall(b"Q")
                elif tag == b"P":
                    self.reporter.worker(i, marshal.loads(body))
                elif tag == b"D":
                    w.data.append(body)
                elif tag == b"E":
                    self.acc.merge(*marshal.loads(b"".join(w.data)))
                    w.data = []
                    del live[fileno]
                elif tag == b"X":
                    raise self._rebuild(marshal.loads(b"".join(w.data)))
                else:
                    raise RuntimeError(f"scan worker {w.pid} exited unexpectedly")


    def _rebuild(self, err: tuple) -> BaseException:
        """The exception a worker reported, as the caller would have got it
        (the worker names a unit by its number: "<n>/rest/of/path")."""
        kind = err[0]
        if kind == "xdev":
            unit, _, rest = err[1].partition("/")
            return CrossDevice("/".join(filter(None, (self.paths[int(unit)], rest))))
        if kind == "os":
            return OSError(*err[1:]) if err[3] is not None else OSError(err[1], err[2])
        return RuntimeError(f"scan worker failed: {err[1]}")


def _serve(sock_fd: int) -> None:
    """A worker's life (forked or spawned): walk the units the parent sends,
    report, return. Uses only its socket, fds and os calls."""
    sock = socket.socket(fileno=sock_fd)
    send = sock.sendall
    try:
        global PROGRESS_EVERY, MAX_FDS, BATCH_MAX
        msg = sock.recv(_MSG_MAX)
        if msg[:1] != b"S":
            return
        dev, per_id, PROGRESS_EVERY, MAX_FDS, BATCH_MAX = marshal.loads(msg[1:])
        acc = _Acc(per_id)

        def report(n: int) -> None:
            send(b"P" + marshal.dumps(n))

        while True:
            send(b"R" + marshal.dumps(acc.count()))
            msg, fds, _, _ = socket.recv_fds(sock, _MSG_MAX, BATCH_MAX)
            if msg[:1] != b"U":                 # "Q", or the parent is gone
                break
            try:
                for (unit, ino), fd in zip(marshal.loads(msg[1:]), fds):
                    stack = [_Frame(fd, str(unit), ino)]
                    try:
                        _walk(stack, dev, acc, report)
                    finally:
                        for f in stack[1:]:
                            if f.fd >= 0:
                                os.close(f.fd)
            finally:
                for fd in fds:
                    os.close(fd)
        tag, data = b"E", marshal.dumps((acc.blocks, acc.inodes, acc.ids, acc.links))
    except CrossDevice as e:
        tag, data = b"X", marshal.dumps(("xdev", e.path))
    except OSError as e:
        filename = e.filename if isinstance(e.filename, (str, bytes, type(None))) else None
        tag, data = b"X", marshal.dumps(("os", e.errno, e.strerror, filename))
    except BaseException as e:          # noqa: BLE001 - reported, then the caller raises
        tag, data = b"X", marshal.dumps(("error", repr(e)))
    try:                                # the result, or the error, in chunks
        for i in range(0, len(data), _CHUNK):
            send(b"D" + data[i:i + _CHUNK])
        send(tag)
    finally:
        sock.close()
