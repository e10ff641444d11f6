"""The ``simfs`` command's side of the mount service: ask it for a mount
(``delegate``) and turn a daemon's readiness message into the command's exit
status and words (``finish``).

Role: the lean path of ``simfs PRIVATE ROOT``.  A mount through the service
costs the command a Python start and one round trip, so this module imports
only ``os``, ``sys`` and the C modules ``_socket`` and ``_json`` (not
``socket``, ``json``, ``argparse`` or ``logging``: those imports were most of
the command's start-up).  The request is ``{"argv", "cwd", "env"}`` as JSON,
the standard descriptors go with its first byte (SCM_RIGHTS); the answer is the
daemon's readiness message: ``ok PID`` once the mount is usable, else the
reason (a first byte ``\\x02`` marks a usage error: exit 2).

Concurrency: one short-lived process, one connection.
"""

from __future__ import annotations

import errno  # built into the interpreter, as posix (os) is
import os
import sys

SOCKET_NAME = "simfs.sock"
USAGE_MARK = "\x02"          # as daemon.USAGE_MARK (that module is not imported here)


def socket_path() -> str:
    from vzquota.rundir import run_dir
    return os.path.join(run_dir(), SOCKET_NAME)


def _encode(argv: list[str], cwd: str, env: dict[str, str]) -> bytes:
    """The request as JSON (what ``json.dumps`` writes, ASCII-escaped)."""
    try:
        from _json import encode_basestring_ascii as q
    except ImportError:          # an interpreter without the C accelerator
        import json
        return json.dumps({"argv": argv, "cwd": cwd, "env": env}).encode()
    return ('{"argv": [' + ", ".join(map(q, argv)) + '], "cwd": ' + q(cwd)
            + ', "env": {' + ", ".join(q(k) + ": " + q(v) for k, v in env.items())
            + "}}").encode()


def delegate(argv: list[str], pid_out: list[int] | None = None) -> int | None:
    """Ask the service to mount; None when no service listens.  The daemon's
    pid is appended to ``pid_out`` when the mount is ready."""
    import _socket
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    null = None
    try:
        try:
            s.connect(socket_path())
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR, errno.EACCES):
                return None
            raise
        req = _encode(argv, os.getcwd(), dict(os.environ))
        fds = []
        for fd in (0, 1, 2):
            try:
                os.fstat(fd)
                fds.append(fd)
            except OSError:
                if null is None:
                    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                fds.append(null)
        rights = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)
        s.sendmsg([req[:1]], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
        s.sendall(req[1:])
        s.shutdown(_socket.SHUT_WR)
        reply = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    except OSError as e:
        print(f"simfs: the mount service failed: {e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        s.close()
        if null is not None:
            os.close(null)
    return finish(reply.decode(errors="replace"), pid_out)


def finish(msg: str, pid_out: list[int] | None = None) -> int:
    """The exit status of a readiness message, its reason printed."""
    word, _, pid = msg.partition(" ")
    if word == "ok" and (not pid or pid.isdigit()):
        if pid and pid_out is not None:
            pid_out.append(int(pid))
        return 0
    code = 1
    if msg.startswith(USAGE_MARK):
        msg, code = msg[1:], 2
    print(f"simfs: {msg or 'the mount daemon died during start-up'}", file=sys.stderr)
    return code
