"""The control channel between ``vzquota`` and a live simfs mount.

Role: where the channel lives and what crosses it.  Each mount that carries a
quota id listens on a unix socket ``<rundir>/<id>.sock`` (rundir:
``$VZQUOTA_RUNDIR`` or ``/run/vzquota``, mode 0700, root's) and holds an flock on
``<rundir>/<id>.lock`` for its whole life (a second mount of the id is refused).
A request is one JSON object on one line; the answer is one JSON line,
``{"ok": true, ...}`` or ``{"ok": false, "code": N, "message": "..."}``.

Who may talk: the server accepts a peer only if its credentials (SO_PEERCRED)
say uid 0 *and* its root directory is the host's (so root inside a container,
chrooted into the mount, is turned away even if it could see the socket).

Concurrency: the client is blocking and short-lived; ``peer_allowed`` is a pure
check the server calls per connection.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct

from .errors import EC_LIVE, EC_SYSERR, VzError
from .qfile import open_safe_file
from .rundir import run_dir

MAX_LINE = 1 << 24           # an answer (it carries the whole state)
MAX_REQUEST = 64 * 1024      # a request; a longer one is refused unread


def socket_path(qid: int) -> str:
    return os.path.join(run_dir(), f"{qid}.sock")


def lock_path(qid: int) -> str:
    return os.path.join(run_dir(), f"{qid}.lock")


def ensure_run_dir() -> int:
    """Create the run directory if needed and return a descriptor of it, after
    checking it is root's and not a symlink; its mode is set to 0700."""
    d = run_dir()
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise VzError(EC_SYSERR, f"Can't create run directory {d}: {e.strerror}") from None
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise VzError(EC_SYSERR, f"Can't open run directory {d}: {e.strerror}") from None
    st = os.fstat(fd)
    if st.st_uid not in (0, os.geteuid()):
        os.close(fd)
        raise VzError(EC_SYSERR, f"Run directory {d} is not safe: it must be owned by "
                      f"root (owner {st.st_uid})")
    os.fchmod(fd, 0o700)
    return fd


def bind_private(sock: socket.socket, path: str) -> None:
    """Bind the Unix socket ``sock`` at ``path`` with mode 0600 from the start
    (under umask 0177): a chmod after bind would leave a moment when the
    socket has the mode the process's umask gave it."""
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)        # (already so; whatever umask the caller had)


def open_lock(dfd: int, name: str) -> int:
    """Open (create) lock file ``name`` in the run directory ``dfd``, refusing
    a symlink or anything but a regular file of root's."""
    return open_safe_file(dfd, name, os.O_RDWR | os.O_CREAT,
                          f"Lock file {os.path.join(run_dir(), name)}", EC_SYSERR)


def peer_allowed(sock: socket.socket) -> bool:
    """True when the peer is the host's root (uid 0, same root directory)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    if uid != 0:
        return False
    try:
        mine = os.stat("/")
        theirs = os.stat(f"/proc/{pid}/root")
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def _server_is_root(sock: socket.socket) -> bool:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.geteuid())


def encode(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


DEFAULT_TIMEOUT = 10.0
# A mount working on a long request (the recount of a live `on` or `recalc`)
# sends a space this often until its answer (answers may start with blanks):
# the client's timeout applies to each read, so it waits while the mount works.
KEEPALIVE = 0.5


def request_timeout() -> float:
    """Seconds a client waits for a mount's answer: ``$VZQUOTA_TIMEOUT`` (a
    positive number) or DEFAULT_TIMEOUT."""
    try:
        value = float(os.environ.get("VZQUOTA_TIMEOUT", ""))
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if 0 < value < 1e9 else DEFAULT_TIMEOUT


def request(qid: int, cmd: str, timeout: float | None = None, **args) -> dict | None:
    """Send one request to the live mount of ``qid``.  Returns its answer, or
    None when no mount carries the id.  A refusal raises ``VzError`` with the
    code the mount gave; a mount that does not answer within ``timeout``
    seconds (default: ``request_timeout()``) raises ``VzError`` (EC_LIVE).
    The timeout is per read: a mount still working on the request sends a
    space every ``KEEPALIVE`` seconds, so a long recount is waited for."""
    path = socket_path(qid)
    if timeout is None:
        timeout = request_timeout()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except TimeoutError:
            raise VzError(EC_LIVE, f"The mount of quota id {qid} did not answer within "
                          f"{timeout:g} seconds") from None
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
                return None
            raise VzError(EC_LIVE, f"Can't reach the mount of quota id {qid} "
                          f"at {path}: {e.strerror}") from None
        if not _server_is_root(s):
            raise VzError(EC_LIVE, f"The control socket {path} of quota id {qid} is not "
                          "served by root: refusing to use it")
        try:
            s.sendall(encode({"cmd": cmd, **args}))
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_LINE:
                    break
        except TimeoutError:
            raise VzError(EC_LIVE, f"The mount of quota id {qid} did not answer within "
                          f"{timeout:g} seconds") from None
        except OSError as e:
            raise VzError(EC_LIVE, f"The mount of quota id {qid} did not answer: "
                          f"{e.strerror or e}") from None
    finally:
        s.close()
    try:
        reply = json.loads(buf)
        if type(reply) is not dict:
            raise ValueError("not an object")
    except (ValueError, RecursionError):
        raise VzError(EC_LIVE, f"The mount of quota id {qid} gave no valid answer") from None
    if not reply.get("ok"):
        raise VzError(int(reply.get("code", EC_LIVE)), str(reply.get("message", "refused")))
    return reply
