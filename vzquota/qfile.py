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

import errno
import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass

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


def _int(v: object) -> int:
    if type(v) is not int or v < 0:
        raise ValueError(f"bad number {v!r}")
    return v


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
        "users": [[i, *_obj_out(o)] for i, o in sorted(st.users.items())],
        "groups": [[i, *_obj_out(o)] for i, o in sorted(st.groups.items())],
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
        out = {}
        for row in d[name]:
            if not isinstance(row, list) or len(row) != 3:
                raise ValueError(f"bad {name} row")
            out[_int(row[0])] = _obj_in(row[1:])
        return out

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
    body = json.dumps(state_to_dict(st), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True)
    digest = hashlib.sha256(body.encode("ascii")).hexdigest()
    return f"{MAGIC} {VERSION}\n{body}\nsha256 {digest}\n".encode("ascii")


def decode(data: bytes, where: str) -> QuotaState:
    def corrupt(why: str) -> VzError:
        return VzError(EC_QUOTAFILE, f"Quota file {where} is corrupt ({why}); "
                       "recreate it with vzquota init")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise corrupt("not a quota file") from None
    lines = text.split("\n")
    if len(lines) != 4 or lines[3] != "":
        raise corrupt("truncated or not a quota file")
    head, body, check = lines[:3]
    magic, _, version = head.partition(" ")
    if magic != MAGIC:
        raise corrupt("bad magic")
    if version != str(VERSION):
        raise VzError(EC_QUOTAFILE, f"Quota file {where} has unsupported format "
                      f"version {version}")
    if check != "sha256 " + hashlib.sha256(body.encode("ascii")).hexdigest():
        raise corrupt("checksum mismatch")
    try:
        return state_from_dict(json.loads(body))
    except (ValueError, KeyError, TypeError) as e:
        raise corrupt(f"bad contents: {e}") from None


# ---- file I/O ----------------------------------------------------------------

@dataclass
class QuotaFile:
    """The quota file of one id at ``path``."""

    qid: int
    path: str

    @classmethod
    def for_id(cls, qid: int, path: str | None = None) -> "QuotaFile":
        return cls(qid, path or default_path(qid))

    def missing(self) -> VzError:
        return VzError(EC_NOQUOTAFILE, f"Can't open quota file for id {self.qid}, maybe "
                       "you need to reinitialize quota: No such file or directory")

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def load(self) -> QuotaState:
        try:
            with open(self.path, "rb") as f:
                data = f.read(1 << 26)
        except FileNotFoundError:
            raise self.missing() from None
        except OSError as e:
            raise VzError(EC_QUOTAFILE, f"Can't read quota file {self.path}: "
                          f"{e.strerror}") from None
        st = decode(data, self.path)
        if st.qid != self.qid:
            raise VzError(EC_QUOTAFILE, f"Quota file {self.path} belongs to quota id "
                          f"{st.qid}, not {self.qid}")
        return st

    def save(self, st: QuotaState) -> None:
        """Atomically replace the file with ``st`` (temp, fsync, rename, fsync dir)."""
        d = os.path.dirname(os.path.abspath(self.path))
        tmp = f"{self.path}.tmp{os.getpid()}"
        data = encode(st)
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise VzError(EC_SYSERR, f"Can't write quota file {self.path}: "
                          f"{e.strerror}") from None

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            raise self.missing() from None
        except OSError as e:
            raise VzError(EC_SYSERR, f"Can't remove quota file {self.path}: "
                          f"{e.strerror}") from None
        for extra in (self.path + ".lock",):
            try:
                os.unlink(extra)
            except OSError:
                pass

    def lock(self, wait: float | None = None) -> "QuotaLock":
        return QuotaLock(self.path + ".lock", self.qid, wait)


def lock_wait_default() -> float:
    try:
        return float(os.environ.get("VZQUOTA_LOCK_WAIT", "5"))
    except ValueError:
        return 5.0


class QuotaLock:
    """``with QuotaLock(...)``: exclusive flock of one quota id, waiting up to
    ``wait`` seconds (default $VZQUOTA_LOCK_WAIT or 5), then EC_LOCKED."""

    def __init__(self, path: str, qid: int, wait: float | None = None):
        self.path = path
        self.qid = qid
        self.wait = lock_wait_default() if wait is None else wait
        self.fd = -1

    def try_acquire(self) -> bool:
        if self.fd < 0:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700,
                        exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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
                    raise VzError(EC_LOCKED, f"Quota file for id {self.qid} is locked "
                                  "by another vzquota; try again later")
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
