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

from .errors import EC_LIVE, VzError

DEFAULT_RUNDIR = "/run/vzquota"
MAX_LINE = 1 << 24


def run_dir() -> str:
    return os.environ.get("VZQUOTA_RUNDIR") or DEFAULT_RUNDIR


def socket_path(qid: int) -> str:
    return os.path.join(run_dir(), f"{qid}.sock")


def lock_path(qid: int) -> str:
    return os.path.join(run_dir(), f"{qid}.lock")


def ensure_run_dir() -> str:
    d = run_dir()
    os.makedirs(d, mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)
    return d


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


def encode(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def request(qid: int, cmd: str, timeout: float = 600.0, **args) -> dict | None:
    """Send one request to the live mount of ``qid``.  Returns its answer, or
    None when no mount carries the id.  A refusal raises ``VzError`` with the
    code the mount gave."""
    path = socket_path(qid)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
                return None
            raise VzError(EC_LIVE, f"Can't reach the mount of quota id {qid} "
                          f"at {path}: {e.strerror}") from None
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
        except OSError as e:
            raise VzError(EC_LIVE, f"The mount of quota id {qid} did not answer: "
                          f"{e.strerror or e}") from None
    finally:
        s.close()
    try:
        reply = json.loads(buf)
    except ValueError:
        raise VzError(EC_LIVE, f"The mount of quota id {qid} gave no valid answer") from None
    if not reply.get("ok"):
        raise VzError(int(reply.get("code", EC_LIVE)), str(reply.get("message", "refused")))
    return reply
