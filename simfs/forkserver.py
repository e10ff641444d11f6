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
(``daemon.start_daemon``) and reports readiness over the connection the way the
standalone daemon reports it over its pipe ("ok", or the message that the
client prints).  From then on the child is on its own: its own FUSE session,
control socket, quota file, signals and unmount.  A crash of one child takes
down that mount only; a crash or stop of the service takes down no mount (new
mounts fall back to standalone daemons until it is back).

The client side (``client.delegate``) is what ``simfs PRIVATE ROOT`` tries
first when not in the foreground and ``SIMFS_SERVICE`` is not ``0``: it imports
nothing heavy, so a mount through the service costs the client a Python start
and one round trip.  When nobody listens on the socket it returns None and
``simfs`` forks its own daemon as before.  Under systemd the service tells
READY=1 once it listens (``simfs-mountd.service``, ``Type=notify``).

Concurrency: the service is single-threaded: one select() loop that accepts,
reads each request without blocking (at most MAX_PENDING at once; further
connections wait in the listen backlog, unaccepted), drops a client that has
not sent its whole request within REQUEST_TIMEOUT seconds, checks the request
against its schema (``validate``: argv a list of strings, cwd an absolute
path, env an object of strings, three descriptors), and only then forks: an
idle, slow or malformed client costs no process.  SIGCHLD is ignored in the
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

from .client import socket_path

REQUEST_TIMEOUT = 10.0       # seconds a client has to send its whole request
MAX_REQUEST = 1 << 20        # bytes of one request
MAX_ARGS = 4096              # words of its command line
MAX_PENDING = 32             # requests being read at once; more wait in the backlog


# ---- the service --------------------------------------------------------------

# Modules a daemon imports only once it starts its event loop, for each
# runtime it may choose (``-o runtime=``); imported here when present, so that
# the children share them too.  No loop ever runs in the service.
RUNTIME_MODULES = ("asyncio", "fusewire.loop", "uvloop", "anyio._backends._asyncio",
                   "trio", "anyio._backends._trio", "trio.socket", "trio.to_thread")


def preload() -> None:
    """Import what a mount daemon imports, so the children share it."""
    import importlib
    import logging.handlers  # noqa: F401  (the daemon's syslog handler)

    import vzquota.control  # noqa: F401
    import vzquota.qfile  # noqa: F401
    import vzquota.scan  # noqa: F401
    import vzquota.service  # noqa: F401

    from . import daemon, mount, ops, options  # noqa: F401
    options.parser()             # argparse and its gettext look-ups, once
    "x".encode().decode("unicode_escape")   # the codec mount points may need
    try:
        # set up before a child replaces its environment: setproctitle takes
        # over the memory of argv and environ, where the children's titles go,
        # at its first use (daemon.set_title)
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
    import selectors
    import signal
    import threading
    import time

    from vzquota import control

    from .daemon import notify, setup_logging

    log = logging.getLogger("simfs.service")
    setup_logging(False, None, daemon=False)
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
    control.bind_private(lsock, path)     # 0600 from the start, never wider
    lsock.listen(128)
    lsock.setblocking(False)

    stop = []
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def on_signal(sig, _frame):
        stop.append(sig)         # the wake-up pipe ends select()
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # the kernel reaps our children
    if threading.active_count() != 1:
        log.error("the service has threads: forking would not be safe")
        return 1
    sel = selectors.DefaultSelector()
    sel.register(wake_r, selectors.EVENT_READ, "wake")
    pending: dict[socket.socket, Pending] = {}
    accepting = False
    paused_until = 0.0           # accept() ran out of descriptors: wait a little

    def drop(p: Pending, why: str | None) -> None:
        sel.unregister(p.conn)
        del pending[p.conn]
        if why:
            try:
                p.conn.setblocking(True)
                p.conn.settimeout(0.5)
                p.conn.sendall(why.encode())
            except OSError:
                pass
        p.close()

    gc.collect()
    gc.freeze()
    log.info("mount service ready on %s (pid %d)", path, os.getpid())
    notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=listening on {path}")
    try:
        while not stop:
            now = time.monotonic()
            want = len(pending) < MAX_PENDING and now >= paused_until
            if want and not accepting:
                sel.register(lsock, selectors.EVENT_READ, "listen")
            elif accepting and not want:
                sel.unregister(lsock)       # the rest wait in the listen backlog
            accepting = want
            deadlines = [p.deadline for p in pending.values()]
            if not accepting and len(pending) < MAX_PENDING:
                deadlines.append(paused_until)
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            for key, _ in sel.select(timeout):
                if key.data == "wake":
                    try:
                        while os.read(wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                elif key.data == "listen":
                    while len(pending) < MAX_PENDING:
                        try:
                            conn, _ = lsock.accept()
                        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                            break
                        except OSError as e:
                            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                                           errno.ENOMEM):
                                log.warning("accept failed: %s; pausing", e.strerror)
                                paused_until = time.monotonic() + 0.5
                                break
                            raise
                        if not control.peer_allowed(conn):
                            conn.close()
                            continue
                        conn.setblocking(False)
                        p = Pending(conn, time.monotonic() + REQUEST_TIMEOUT)
                        pending[conn] = p
                        sel.register(conn, selectors.EVENT_READ, p)
                else:
                    p = key.data
                    try:
                        done = p.receive()
                    except (OSError, ValueError) as e:
                        drop(p, f"the mount service could not read the request: {e}")
                        continue
                    if not done:
                        continue
                    sel.unregister(p.conn)
                    del pending[p.conn]
                    try:
                        req = validate(p.data, p.fds)
                    except ValueError as e:
                        p.conn.setblocking(True)
                        p.conn.settimeout(0.5)
                        try:
                            p.conn.sendall(f"the mount service refused the request: "
                                           f"{e}".encode())
                        except OSError:
                            pass
                        p.close()
                        continue
                    start_child(p, req, log, sel, pending, (lsock, lock_fd, wake_r, wake_w))
            now = time.monotonic()
            for p in [p for p in pending.values() if p.deadline <= now]:
                drop(p, f"the mount service timed out waiting for the request "
                        f"({REQUEST_TIMEOUT:g} s)")
    finally:
        signal.set_wakeup_fd(-1)
        for p in list(pending.values()):
            p.close()
        sel.close()
        os.close(wake_r)
        os.close(wake_w)
        try:
            os.unlink(path)      # ours: we hold the lock
        except OSError:
            pass
        lsock.close()
        os.close(lock_fd)
    log.info("mount service stopped (the mounts it started go on)")
    return 0


class Pending:
    """A connection whose request is being read, without blocking the
    service: its bytes, the descriptors that came with them, its deadline."""

    __slots__ = ("conn", "deadline", "data", "fds")

    def __init__(self, conn: socket.socket, deadline: float):
        self.conn = conn
        self.deadline = deadline
        self.data = b""
        self.fds: list[int] = []

    def receive(self) -> bool:
        """Read what is there; True once the client has sent it all."""
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.conn, 65536, 3)
            except (BlockingIOError, InterruptedError):
                return False
            self.fds += fds
            if len(self.fds) > 3:
                raise ValueError("more than 3 descriptors")
            if not data:
                return True
            self.data += data
            if len(self.data) > MAX_REQUEST:
                raise ValueError(f"longer than {MAX_REQUEST} bytes")

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
        self.conn.close()


def _strings(v: object) -> bool:
    return type(v) is str and "\0" not in v


def validate(data: bytes, fds: list[int]) -> dict:
    """The request's schema: ``{"argv": [str, ...], "cwd": "/abs", "env":
    {str: str}}`` and exactly three descriptors (standard input, output and
    error); raises ValueError saying what does not match."""
    try:
        req = json.loads(data)
    except (ValueError, RecursionError):
        raise ValueError("not valid JSON") from None
    if type(req) is not dict or set(req) != {"argv", "cwd", "env"}:
        raise ValueError("an object with argv, cwd and env is expected")
    argv, cwd, env = req["argv"], req["cwd"], req["env"]
    if type(argv) is not list or not 0 < len(argv) <= MAX_ARGS \
            or not all(_strings(a) for a in argv):
        raise ValueError(f"argv must be a list of 1 to {MAX_ARGS} strings")
    if not _strings(cwd) or not cwd.startswith("/"):
        raise ValueError("cwd must be an absolute path")
    if type(env) is not dict or not all(
            _strings(k) and k and "=" not in k and _strings(v) for k, v in env.items()):
        raise ValueError("env must be an object of strings (NAME: value)")
    if len(fds) != 3:
        raise ValueError("standard input, output and error must come with it")
    return req


def start_child(p: Pending, req: dict, log, sel, pending: dict, own_fds: tuple) -> None:
    """Fork the daemon of one checked request; the parent keeps nothing of it."""
    try:
        pid = os.fork()
    except OSError as e:
        log.error("fork failed: %s", e)
        p.conn.setblocking(True)
        try:
            p.conn.sendall(f"the mount service could not fork: {e.strerror}".encode())
        except OSError:
            pass
        p.close()
        return
    if pid == 0:
        code = 1
        try:
            import signal
            signal.set_wakeup_fd(-1)
            sel.close()
            for other in pending.values():
                other.close()
            lsock, *fds = own_fds
            lsock.close()
            for fd in fds:
                os.close(fd)
            code = child(p.conn, req, p.fds)
        finally:
            os._exit(code)
    p.close()


def child(conn: socket.socket, req: dict, fds: list[int]) -> int:
    """In the forked child: take the client's descriptors, directory and
    environment, become the client's daemon."""
    import signal

    from .daemon import start_daemon

    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    try:
        conn.setblocking(True)
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
            os.close(fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
    except OSError as e:
        try:
            conn.sendall(f"the mount service could not take the request: "
                         f"{e.strerror or e}".encode())
        except OSError:
            pass
        return 1
    return start_daemon(req["argv"], conn.detach())
