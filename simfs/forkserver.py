"""The mount service (``simfs --service``): one resident process that has
imported everything a mount daemon needs and forks one child per mount, so
that the children share those pages copy-on-write.

Role: the service never serves FUSE, never touches a quota and never runs an
event loop.  It imports the daemon's modules, collects and freezes its heap
(``gc.freeze()``: the imported objects move to a generation the collector never
visits, so a child's collections do not dirty the shared pages), binds
``<rundir>/simfs.sock`` (mode 0600; rundir is ``$VZQUOTA_RUNDIR`` or
``/run/vzquota``) and then only accepts and forks.  Each child becomes exactly
the daemon a standalone ``simfs`` would have forked: it takes the client's
command line, working directory, environment and standard descriptors (passed
over the socket with SCM_RIGHTS), runs the same start-up code
(``cli.start_daemon``) and reports readiness over the connection the way the
standalone daemon reports it over its pipe ("ok", or the message that the
client prints).  From then on the child is on its own: its own FUSE session,
control socket, quota file, signals and unmount.  A crash of one child takes
down that mount only; a crash or stop of the service takes down no mount (new
mounts fall back to standalone daemons until it is back).

The client side (``delegate``) is what ``simfs PRIVATE ROOT`` tries first when
not in the foreground and ``SIMFS_SERVICE`` is not ``0``: it imports nothing
heavy, so a mount through the service costs the client a Python start and one
round trip.  When nobody listens on the socket it returns None and ``simfs``
forks its own daemon as before.

Concurrency: the service is single-threaded and blocking: accept, fork, close,
and nothing else, so one slow or hostile client cannot stall it (the child
reads the request, with a timeout, after the fork).  SIGCHLD is ignored in the
service so children are reaped by the kernel; each child restores every
signal disposition before it runs anything.  Forking is safe because the
service has no threads.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys

SOCKET_NAME = "simfs.sock"
REQUEST_TIMEOUT = 10.0
MAX_REQUEST = 1 << 20


def socket_path() -> str:
    from vzquota.control import run_dir
    return os.path.join(run_dir(), SOCKET_NAME)


# ---- the client (runs in the short-lived ``simfs`` command) ------------------

def delegate(argv: list[str]) -> int | None:
    """Ask the service to mount; None when no service listens."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            s.connect(socket_path())
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR, errno.EACCES):
                return None
            raise
        req = json.dumps({"argv": argv, "cwd": os.getcwd(),
                          "env": dict(os.environ)}).encode()
        fds = []
        null = None
        for fd in (0, 1, 2):
            try:
                os.fstat(fd)
                fds.append(fd)
            except OSError:
                if null is None:
                    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                fds.append(null)
        socket.send_fds(s, [req[:1]], fds)
        s.sendall(req[1:])
        s.shutdown(socket.SHUT_WR)
        if null is not None:
            os.close(null)
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
    msg = reply.decode(errors="replace")
    if msg == "ok":
        return 0
    print(f"simfs: {msg or 'the mount daemon died during start-up'}", file=sys.stderr)
    return 1


# ---- the service --------------------------------------------------------------

# Modules a daemon imports only once it starts its event loop, for each
# runtime it may choose (``-o runtime=``); imported here when present, so that
# the children share them too.  No loop ever runs in the service.
RUNTIME_MODULES = ("asyncio", "uvloop", "anyio._backends._asyncio",
                   "trio", "anyio._backends._trio", "trio.socket", "trio.to_thread")


def preload() -> None:
    """Import what a mount daemon imports, so the children share it."""
    import importlib
    import logging.handlers  # noqa: F401  (the daemon's syslog handler)

    import vzquota.control  # noqa: F401
    import vzquota.qfile  # noqa: F401
    import vzquota.scan  # noqa: F401
    import vzquota.service  # noqa: F401

    from . import cli, mount, ops  # noqa: F401
    try:
        # set up before a child replaces its environment: setproctitle takes
        # over the memory of argv and environ, where the children's titles go,
        # at its first use (cli.set_title)
        import setproctitle
        setproctitle.setproctitle(setproctitle.getproctitle())
    except ImportError:
        pass
    for name in RUNTIME_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def serve(foreground_log: bool = True) -> int:
    """Run the service until SIGTERM/SIGINT.  Returns the exit status."""
    import fcntl
    import gc
    import logging
    import signal
    import threading

    from vzquota import control

    from . import cli

    log = logging.getLogger("simfs.service")
    cli.setup_logging(False, None, daemon=False)
    preload()
    control.ensure_run_dir()
    path = socket_path()
    lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print(f"simfs: a mount service already runs on {path}", file=sys.stderr)
        return 1
    try:
        os.unlink(path)          # stale: we hold the lock
    except FileNotFoundError:
        pass
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    lsock.bind(path)
    os.chmod(path, 0o600)
    lsock.listen(128)

    stop = []

    def on_signal(sig, _frame):
        stop.append(sig)
        lsock.close()            # wakes accept() with an error
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # the kernel reaps our children
    if threading.active_count() != 1:
        log.error("the service has threads: forking would not be safe")
        return 1
    gc.collect()
    gc.freeze()
    log.info("mount service ready on %s (pid %d)", path, os.getpid())
    try:
        while not stop:
            try:
                conn, _ = lsock.accept()
            except OSError as e:
                if stop:
                    break
                if e.errno in (errno.EINTR, errno.ECONNABORTED, errno.EMFILE, errno.ENFILE):
                    continue
                raise
            try:
                pid = os.fork()
            except OSError as e:
                log.error("fork failed: %s", e)
                conn.close()
                continue
            if pid == 0:
                code = 1
                try:
                    lsock.close()
                    os.close(lock_fd)
                    code = child(conn)
                finally:
                    os._exit(code)
            conn.close()
    finally:
        try:
            os.unlink(path)      # ours: we hold the lock
        except OSError:
            pass
        lsock.close()
        os.close(lock_fd)
    log.info("mount service stopped (the mounts it started go on)")
    return 0


def child(conn: socket.socket) -> int:
    """In the forked child: read the request, become the client's daemon."""
    import signal

    from vzquota import control

    from . import cli

    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    try:
        conn.settimeout(REQUEST_TIMEOUT)
        if not control.peer_allowed(conn):
            return 1
        data, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, 3)
        while len(data) <= MAX_REQUEST:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        req = json.loads(data)
        if len(fds) != 3 or not isinstance(req.get("argv"), list):
            raise ValueError("malformed request")
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
            os.close(fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        conn.settimeout(None)
    except (OSError, ValueError, TypeError, KeyError) as e:
        try:
            conn.sendall(f"the mount service could not read the request: {e}".encode())
        except OSError:
            pass
        return 1
    return cli.start_daemon(req["argv"], conn.detach())
