"""The quota file: persistent state of one quota id, and its lock.

Role: load, validate and atomically replace ``quota.<id>``.  Format (text, so the
bytes are the same on every architecture)::

    vzquota-simfs-quota 1\\n          magic and format version
    {canonical JSON of the state}\\n  sorted keys, no spaces, ASCII
    sha256 <hex of the JSON line>\\n

A file whose magic, version, checksum or fields do not check out raises
``VzError(EC_QUOTAFILE)``; a missing one ``VzError(EC_NOQUOTAFILE)``.  ``save``
writes a temporary file, fsyncs it, renames it over the old one and fsyncs the
directory, so a crash leaves either the old or the new file, never a torn one.

Concurrency: one writer at a time per quota id, by ``flock`` on ``quota.<id>.lock``
beside the file (``QuotaLock``).  Readers need no lock (the rename is atomic).
The daemon takes the lock only for the moment of a save; the CLI holds it for a
whole offline command, and never while it waits on a live mount.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass
from typing import Callable

from .errors import EC_LOCKED, EC_NOQUOTAFILE, EC_QUOTAFILE, EC_SYSERR, VzError
from .model import Counter, Graces, QuotaObject, QuotaState

MAGIC = "vzquota-simfs-quota"
VERSION = 1
DEFAULT_DIR = "/var/lib/vzquota"


def quota_dir() -> str:
    return os.environ.get("VZQUOTA_DIR") or DEFAULT_DIR


def default_path(qid: int) -> str:
    return os.path.join(quota_dir(), f"quota.{qid}")


# ---- (de)serialisation -------------------------------------------------------

def _counter_out(c: Counter) -> list[int]:
    return [c.usage, c.soft, c.hard, c.deadline]


def _obj_out(o: QuotaObject) -> list[list[int]]:
    return [_counter_out(o.space), _counter_out(o.inodes)]


MAX_NUMBER = (2**63 - 1) * 1024     # the largest limit (in bytes) the CLI can set


def _int(v: object) -> int:
    if type(v) is not int or not 0 <= v <= MAX_NUMBER:
        raise ValueError(f"bad number {str(v)[:40]}")
    return v


def _ints(values: list) -> None:
    """``_int`` of every value, in a few passes at C speed."""
    if values and (not set(map(type, values)) <= {int} or min(values) < 0
                   or max(values) > MAX_NUMBER):
        raise ValueError("bad number")


def _counter_in(v: object) -> Counter:
    if not isinstance(v, list) or len(v) != 4:
        raise ValueError("bad counter")
    return Counter(*(_int(x) for x in v))


def _obj_in(v: object) -> QuotaObject:
    if not isinstance(v, list) or len(v) != 2:
        raise ValueError("bad quota object")
    return QuotaObject(_counter_in(v[0]), _counter_in(v[1]))


def _graces_in(v: object) -> Graces:
    if not isinstance(v, list) or len(v) != 2:
        raise ValueError("bad graces")
    return Graces(_int(v[0]), _int(v[1]))


def _table_out(table: dict[int, QuotaObject]) -> list:
    """[[id, [usage, soft, hard, deadline] x 2], ...] sorted by id, in one pass."""
    return [[i, [s.usage, s.soft, s.hard, s.deadline], [n.usage, n.soft, n.hard, n.deadline]]
            for i, s, n in ((i, o.space, o.inodes) for i, o in sorted(table.items()))]


def state_to_dict(st: QuotaState) -> dict:
    return {
        "qid": st.qid,
        "path": st.path,
        "level1": _obj_out(st.level1),
        "grace1": [st.grace1.space, st.grace1.inodes],
        "ugid_on": st.ugid_on,
        "ugid_limit": st.ugid_limit,
        "user_grace": [st.user_grace.space, st.user_grace.inodes],
        "group_grace": [st.group_grace.space, st.group_grace.inodes],
        "users": _table_out(st.users),
        "groups": _table_out(st.groups),
        "ugid_exceeded": st.ugid_exceeded,
        "on": st.on,
        "mounted": st.mounted,
        "dirty": st.dirty,
    }


def state_from_dict(d: dict) -> QuotaState:
    def flag(name: str) -> bool:
        v = d[name]
        if type(v) is not bool:
            raise ValueError(f"bad flag {name}")
        return v

    def table(name: str) -> dict[int, QuotaObject]:
        # [[id, [usage, soft, hard, deadline] x 2], ...]: the shapes checked row
        # by row, the numbers all at once (a file may hold 100,000s of rows)
        rows = d[name]
        if type(rows) is not list:
            raise ValueError(f"bad {name}")
        flat: list = []
        extend = flat.extend
        for row in rows:
            if type(row) is not list or len(row) != 3:
                raise ValueError(f"bad {name} row")
            _, a, b = row
            if type(a) is not list or type(b) is not list or len(a) != 4 or len(b) != 4:
                raise ValueError(f"bad {name} row")
            extend(a)
            extend(b)
        _ints([row[0] for row in rows])
        _ints(flat)
        return {row[0]: QuotaObject(Counter(*row[1]), Counter(*row[2])) for row in rows}

    path = d["path"]
    if path is not None and not isinstance(path, str):
        raise ValueError("bad path")
    return QuotaState(
        qid=_int(d["qid"]), path=path, level1=_obj_in(d["level1"]),
        grace1=_graces_in(d["grace1"]), ugid_on=flag("ugid_on"),
        ugid_limit=_int(d["ugid_limit"]), user_grace=_graces_in(d["user_grace"]),
        group_grace=_graces_in(d["group_grace"]), users=table("users"),
        groups=table("groups"), ugid_exceeded=flag("ugid_exceeded"), on=flag("on"),
        mounted=flag("mounted"), dirty=flag("dirty"))


def encode(st: QuotaState) -> bytes:
    with no_gc():
        return _encode(st)


def _encode(st: QuotaState) -> bytes:
    body = json.dumps(state_to_dict(st), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True)
    digest = hashlib.sha256(body.encode("ascii")).hexdigest()
    return f"{MAGIC} {VERSION}\n{body}\nsha256 {digest}\n".encode("ascii")


# The words of the original (src/quota_io.c) for a file it cannot use.
NOT_A_QUOTA_FILE = "Can't detect quota file version; file is not a VZ quota file"
CORRUPTED = "quota file is corrupted"


def bad_checksum(qid: int | str) -> str:
    return f"Quota file check sum is invalid for id {qid}; file is broken"


def corrupt_error(where: str, why: str = CORRUPTED) -> VzError:
    """The one error for a quota file whose contents do not check out, in the
    original's words (``why`` is one of them; ``where`` is kept for callers)."""
    return VzError(EC_QUOTAFILE, why)


# The original reads a fixed 8-byte header (magic, flags) first: a shorter file
# is a short read ("quota file is corrupted"); then the magic ("Can't detect
# quota file version"); then, before any other field, the checksum at the end of
# the file, so a file cut anywhere after its header is "check sum is invalid".
HEADER_SIZE = 8
HEADER = f"{MAGIC} {VERSION}\n".encode("ascii")


@contextlib.contextmanager
def no_gc():
    """Hold the cyclic garbage collector while 100,000s of acyclic objects are
    made (a quota file's uid/gid table, its text): each of its passes would
    walk them all again (show -t of 100,000 objects: 0.55 s of 1.1 s)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def decode(data: bytes, where: str, qid: int | None = None) -> QuotaState:
    """Check and parse a quota file's bytes, with the original's message for
    each kind of damage, in the order it finds them (src/quota_io.c:
    read_field(), get_quota_version(), do_check_quota_file())."""
    with no_gc():
        return _decode(data, where, qid)


def _decode(data: bytes, where: str, qid: int | None) -> QuotaState:
    def corrupt(why: str = CORRUPTED) -> VzError:
        return corrupt_error(where, why)
    if len(data) < HEADER_SIZE:
        raise corrupt()
    if data[:len(HEADER)] != HEADER[:len(data)]:
        raise corrupt(NOT_A_QUOTA_FILE)
    text = data.decode("ascii", "replace")
    lines = text.split("\n")
    sums = (len(lines) == 4 and lines[3] == "" and lines[1].isascii() and
            lines[2] == "sha256 " + hashlib.sha256(lines[1].encode("ascii")).hexdigest())
    if not sums:
        raise corrupt(bad_checksum(where if qid is None else qid))
    body = lines[1]
    try:
        d = json.loads(body)
        if type(d) is not dict:
            raise ValueError("not an object")
        return state_from_dict(d)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise corrupt() from None


# ---- file I/O ----------------------------------------------------------------
#
# Safety: root reads and writes these files, and a directory writable by
# someone else would let that someone plant a symlink where the quota file, its
# temporary file or its lock will be opened.  So the directory is opened once
# and checked (owned by root, not writable by group or others), everything
# inside it is reached relative to that descriptor with O_NOFOLLOW (the
# temporary file also with O_EXCL), and the quota file must be a regular file
# owned by root and not writable by others.  Opening never blocks (O_NONBLOCK:
# a FIFO in its place is refused, not waited on).  No directory is created
# except the default quota directory itself (``quota_dir()``).

MAX_FILE = 1 << 26


def _owners() -> tuple[int, ...]:
    return (0, os.geteuid())


def open_safe_dir(path: str, what: str, code: int, create: bool = False) -> int:
    """Open directory ``path`` (creating it, mode 0700, when ``create``) and check
    that nobody but root can change what is in it; returns its descriptor."""
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise VzError(EC_SYSERR, f"Can't create {what} {path}: {e.strerror}") from None
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid not in _owners() or st.st_mode & 0o022:
            raise VzError(code, f"{what.capitalize()} {path} is not safe: it must be owned "
                          "by root and not writable by group or others "
                          f"(owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_safe_file(dfd: int, name: str, flags: int, where: str, code: int,
                   mode: int = 0o600) -> int:
    """Open ``name`` in directory ``dfd`` without following a symlink and without
    blocking; refuse anything but a regular file of root's that others cannot
    write.  OSError (ENOENT...) passes through."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode,
                     dir_fd=dfd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise VzError(code, f"{where} is a symbolic link: refusing to use it") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise VzError(code, f"{where} is not a regular file")
        if st.st_uid not in _owners() or st.st_mode & 0o022:
            raise VzError(code, f"{where} is not safe: it must be owned by root and not "
                          "writable by group or others (owner "
                          f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})")
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class QuotaFile:
    """The quota file of one id at ``path``."""

    qid: int
    path: str

    @classmethod
    def for_id(cls, qid: int, path: str | None = None) -> "QuotaFile":
        return cls(qid, path or default_path(qid))

    @property
    def signed_id(self) -> int:
        """The id as the original's messages print it (``%d``: 4294967295 is -1)."""
        return self.qid - 2**32 if self.qid >= 2**31 else self.qid

    def missing(self) -> VzError:
        return VzError(EC_NOQUOTAFILE, f"Can't open quota file for id {self.signed_id}, maybe "
                       "you need to reinitialize quota: No such file or directory")

    @property
    def dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def open_dir(self, create: bool = False) -> int:
        """The checked directory of the file (only the default one is created)."""
        d = self.dir
        create = create and d == os.path.abspath(quota_dir())
        return open_safe_dir(d, "quota directory", EC_QUOTAFILE, create)

    def exists(self) -> bool:
        try:
            os.stat(self.path, follow_symlinks=False)
            return True
        except OSError:
            return False

    def load(self) -> QuotaState:
        try:
            dfd = self.open_dir()
        except FileNotFoundError:
            raise self.missing() from None
        except OSError as e:
            raise VzError(EC_QUOTAFILE, f"Can't open quota file for id {self.signed_id}, "
                          f"maybe you need to reinitialize quota: {e.strerror}") from None
        try:
            fd = open_safe_file(dfd, self.name, os.O_RDONLY, f"Quota file {self.path}",
                                EC_QUOTAFILE)
            try:
                data = os.read(fd, MAX_FILE + 1)
            finally:
                os.close(fd)
        except FileNotFoundError:
            raise self.missing() from None
        except OSError as e:
            raise VzError(EC_QUOTAFILE, f"Can't open quota file for id {self.signed_id}, "
                          f"maybe you need to reinitialize quota: {e.strerror}") from None
        finally:
            os.close(dfd)
        if len(data) > MAX_FILE:
            raise corrupt_error(self.path)
        st = decode(data, self.path, self.signed_id)
        if st.qid != self.qid:
            raise VzError(EC_QUOTAFILE, f"Quota file {self.path} belongs to quota id "
                          f"{st.qid}, not {self.qid}")
        return st

    def save(self, st: QuotaState) -> None:
        """Atomically replace the file with ``st`` (temp, fsync, rename, fsync dir)."""
        data = encode(st)
        tmp = f"{self.name}.tmp{os.getpid()}"
        try:
            dfd = self.open_dir(create=True)
        except OSError as e:
            raise VzError(EC_SYSERR, f"Can't write quota file {self.path}: "
                          f"{e.strerror}") from None
        made = False
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(tmp, flags, 0o600, dir_fd=dfd)
            except FileExistsError:      # left by a crashed process with our pid
                os.unlink(tmp, dir_fd=dfd)
                fd = os.open(tmp, flags, 0o600, dir_fd=dfd)
            made = True
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.name, src_dir_fd=dfd, dst_dir_fd=dfd)
            made = False
            os.fsync(dfd)
        except OSError as e:
            raise VzError(EC_SYSERR, f"Can't write quota file {self.path}: "
                          f"{e.strerror}") from None
        finally:
            if made:
                try:
                    os.unlink(tmp, dir_fd=dfd)
                except OSError:
                    pass
            os.close(dfd)

    def remove(self) -> None:
        try:
            dfd = self.open_dir()
        except FileNotFoundError:
            raise self.missing() from None
        except OSError as e:
            raise VzError(EC_SYSERR, f"Can't remove quota file {self.path}: "
                          f"{e.strerror}") from None
        try:
            try:
                os.unlink(self.name, dir_fd=dfd)
            except FileNotFoundError:
                raise self.missing() from None
            except OSError as e:
                raise VzError(EC_SYSERR, f"Can't remove quota file {self.path}: "
                              f"{e.strerror}") from None
            try:
                os.unlink(self.name + ".lock", dir_fd=dfd)
            except OSError:
                pass
        finally:
            os.close(dfd)

    def lock(self, wait: float | None = None) -> "QuotaLock":
        return QuotaLock(self.path + ".lock", self.qid, wait,
                         opener=lambda: self.open_dir(create=True))


def lock_wait_default() -> float:
    """$VZQUOTA_LOCK_WAIT seconds (a finite number from 0 to 3600), else 5."""
    try:
        wait = float(os.environ.get("VZQUOTA_LOCK_WAIT", "5"))
    except ValueError:
        return 5.0
    return wait if 0 <= wait <= 3600 else 5.0     # nan and inf fail both tests


class QuotaLock:
    """``with QuotaLock(...)``: exclusive flock of one quota id, waiting up to
    ``wait`` seconds (default $VZQUOTA_LOCK_WAIT or 5), then EC_LOCKED."""

    def __init__(self, path: str, qid: int, wait: float | None = None,
                 opener: Callable[[], int] | None = None):
        self.path = path
        self.qid = qid
        self.wait = lock_wait_default() if wait is None else wait
        self.fd = -1
        d = os.path.dirname(os.path.abspath(path))
        self.opener = opener or (lambda: open_safe_dir(d, "quota directory",
                                                       EC_QUOTAFILE))

    def try_acquire(self) -> bool:
        if self.fd < 0:
            dfd = self.opener()
            try:
                self.fd = open_safe_file(dfd, os.path.basename(self.path),
                                         os.O_RDWR | os.O_CREAT,
                                         f"Lock file {self.path}", EC_QUOTAFILE)
            finally:
                os.close(dfd)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            return False

    def __enter__(self) -> "QuotaLock":
        deadline = time.monotonic() + self.wait
        try:
            while not self.try_acquire():
                if time.monotonic() >= deadline:
                    # open_quota_file() of the original (src/quota_io.c)
                    sid = self.qid - 2**32 if self.qid >= 2**31 else self.qid
                    raise VzError(EC_LOCKED, "can't lock quota file, some quota operations "
                                  f"are performing for id {sid}")
                time.sleep(0.05)
        except OSError as e:
            self.release()
            raise VzError(EC_SYSERR, f"Can't lock quota file {self.path}: "
                          f"{e.strerror}") from None
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __exit__(self, *exc: object) -> None:
        self.release()
