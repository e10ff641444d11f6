"""The daemon's start, shared by the standalone ``simfs`` (which forks it)
and the mount service's children (``start_daemon``): the checks that can fail
before mounting (``checks``, with the messages the command prints), logging,
the ``Mount`` built from the options, the mount itself, the readiness report
("ok PID", or the reason the command prints) and serving until unmounted.

Role: a library of ``simfs.cli`` and ``simfs.forkserver``; it imports neither.

Concurrency: runs before any event loop exists; ``run`` starts the loop.
"""

from __future__ import annotations

import logging
import os
import resource
import stat
import sys

from .mountpoint import dead_mount, dead_mount_message, is_mountpoint
from .options import UsageError, check_mount, option_values, parse_options, parser
from .sdnotify import notify as sdnotify

log = logging.getLogger("simfs")

# Where the daemon logs when there is no syslog socket (/dev/log) to log to.
FALLBACK_LOG = "/var/log/simfs.log"
# The first byte of a readiness message that fails with a usage error (exit 2
# rather than 1): the service's children check the command line themselves.
USAGE_MARK = "\x02"


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _ancestry(path: str) -> set[tuple[int, int]]:
    """(dev, ino) of ``path`` and of every directory above it."""
    out = set()
    p = os.path.realpath(path)
    while True:
        try:
            out.add(_identity(p))
        except OSError:
            pass
        if p == "/":
            return out
        p = os.path.dirname(p)


def precheck(private: str, root: str) -> None:
    from .mount import MountError
    for path in (root, private):
        if dead_mount(path):
            raise MountError(dead_mount_message(path))
    if not os.path.isdir(private):
        what = "does not exist" if not os.path.exists(private) else "is not a directory"
        raise MountError(f"private area {private} {what}")
    if not os.path.exists(root):
        raise MountError(f"mount point {root} does not exist")
    if not os.path.isdir(root):
        raise MountError(f"mount point {root} is not a directory")
    if is_mountpoint(root):
        raise MountError(f"{root} is already a mount point")
    # The daemon would serve its own requests on the backing tree: a deadlock.
    if _identity(private) in _ancestry(root):
        raise MountError(f"mount point {root} is inside the private area {private}")
    if _identity(root) in _ancestry(private):
        raise MountError(f"private area {private} is inside the mount point {root}")
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: load the fuse module (modprobe fuse)")
    try:
        hidden = len(os.listdir(root))
    except OSError:
        hidden = 0
    if hidden:
        print(f"simfs: warning: mount point {root} is not empty: its {hidden} "
              f"entr{'y' if hidden == 1 else 'ies'} stay hidden while it is mounted",
              file=sys.stderr)


class ErrorBurst(logging.Filter):
    """Bounds what unexpected errors may write to the log, whatever a
    container's users make the daemon do: per ``window`` seconds, the first
    ``tracebacks`` errors with an exception are logged whole, the next ones
    up to ``lines`` as their message alone, and the rest not at all, counted;
    the first record of a later window says how many were left out.  Records
    without an exception always pass.  Thread-safe (worker threads log)."""

    def __init__(self, tracebacks: int = 20, lines: int = 200, window: float = 60.0):
        super().__init__()
        import threading
        import time
        self._clock = time.monotonic
        self._lock = threading.Lock()
        self.tracebacks, self.lines, self.window = tracebacks, lines, window
        self._start = -window
        self._seen = 0
        self.dropped = 0              # left out in the current window
        self._carry = 0               # left out in the windows before

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            now = self._clock()
            if now - self._start >= self.window:
                self._start, self._seen = now, 0
                self._carry += self.dropped
                self.dropped = 0
            if record.exc_info:
                self._seen += 1
                if self._seen > self.lines:
                    self.dropped += 1
                    return False
                if self._seen > self.tracebacks:
                    record.exc_info = record.exc_text = None
                    record.msg = f"{record.getMessage()} (traceback left out: more than " \
                                 f"{self.tracebacks} errors in {self.window:g} s)"
                    record.args = None
            if self._carry:
                record.msg = f"{record.getMessage()} [{self._carry} unexpected errors " \
                             f"not logged before this]"
                record.args = None
                self._carry = 0
        return True


def setup_logging(debug: bool, logfile, daemon: bool) -> None:
    from logging.handlers import SysLogHandler
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    fmt = logging.Formatter("%(asctime)s simfs[%(process)d] %(levelname)s %(name)s: %(message)s")
    if logfile:
        h: logging.Handler = logging.StreamHandler(logfile)
    elif daemon and os.path.exists("/dev/log"):
        h = SysLogHandler(address="/dev/log")
        fmt = logging.Formatter("simfs[%(process)d]: %(levelname)s %(message)s")
    elif daemon:
        # No syslog: keep every line in a file rather than drop it.
        h = logging.StreamHandler(open_log(FALLBACK_LOG))
    else:
        h = logging.StreamHandler(sys.stderr)
    h.setFormatter(fmt)
    h.addFilter(ErrorBurst())
    root.handlers[:] = [h]


def open_log(path: str):
    """The log file, root's only (0600); never through a symlink, never a FIFO."""
    from .mount import MountError
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise MountError(f"can't open log file {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise MountError(f"log file {path} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", buffering=1)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            top = int(f.read())
    except (OSError, ValueError):
        top = hard
    for want in (top, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return
        except (ValueError, OSError):
            continue


def notify(state: str) -> None:
    """Tell systemd (Type=notify) how the mount is doing; a no-op elsewhere."""
    why = sdnotify(state)
    if why:
        log.warning("%s", why)


def checks(args, own: dict[str, str], foreground: bool):
    """What can fail before the daemon starts; returns the open log file."""
    # The daemon's own files (locks, socket, log, quota file) are root's only;
    # the passthrough itself runs with umask 0 (``run``): the kernel has
    # already applied the caller's umask to every mode it sends.
    os.umask(0o077)
    precheck(args.private, args.root)
    if "quotaid" in own and "quota_off_ok" not in own:
        quota_is_on(int(own["quotaid"]), own.get("quotafile"))
    if "hook" in own:
        from .events import check_hook
        from .mount import MountError
        why = check_hook(own["hook"])
        if why:
            raise MountError(why)
    logfile = open_log(own["log"]) if "log" in own else None
    if logfile is None and not foreground and not os.path.exists("/dev/log"):
        print(f"simfs: no syslog (/dev/log): the daemon logs to {FALLBACK_LOG}",
              file=sys.stderr)
        logfile = open_log(FALLBACK_LOG)
    return logfile


def quota_is_on(qid: int, quotafile: str | None) -> None:
    """Refuse to mount a quota id whose quota is off (it would enforce
    nothing); ``-o quota_off_ok`` asks for it explicitly.  A missing or
    unreadable quota file is left to ``Mount.prepare`` to report."""
    from vzquota.errors import VzError
    from vzquota.qfile import QuotaFile

    from .mount import MountError
    qf = QuotaFile.for_id(qid, quotafile)
    try:
        if not qf.exists() or qf.load().on:
            return
    except VzError:
        return
    raise MountError(f"the quota of id {qid} is off: this mount would enforce no limit; "
                     f"turn it on first with 'vzquota on {qid}', or mount with "
                     f"-o quota_off_ok to serve without accounting until then")


def build(args, fuse_opts: set[str], own: dict[str, str]):
    from .config import Config
    from .mount import Mount
    v = option_values(own)
    m = Mount(os.path.abspath(args.private), os.path.abspath(args.root), fuse_opts,
              quotaid=v["quotaid"], quotafile=v["quotafile"], runtime=v["runtime"],
              hook=v["hook"], config=Config.from_options(v),
              quota_admin=v["quota_admin"], fuse=v["fuse"],
              passthrough=v["passthrough"], nopassthrough=v["nopassthrough"])
    m.option_values = v         # shown to a remount (ops.OPTIONS_XATTR)
    return m


def daemon(m, debug: bool, logfile, ready_fd: int) -> int:
    """The daemon's own start: a session of its own, logging, mount, serve."""
    os.setsid()
    setup_logging(debug, logfile, daemon=True)
    return run(m, ready_fd)


def start_daemon(argv: list[str], ready_fd: int) -> int:
    """A child of the mount service becomes the daemon ``simfs argv`` would
    have forked (the client already checked the usage and the uid): the same
    checks, in the same order, with the same messages."""
    from .mount import MountError

    def fail(msg: str) -> int:
        os.write(ready_fd, msg.encode())
        os.close(ready_fd)
        return 1
    try:
        args = parser().parse_args(argv)
        words = [w for o in args.options for w in o.split(",")]
        fuse_opts, own = parse_options(words, os.path.abspath(args.private))
        check_mount(own)
        logfile = checks(args, own, False)
    except UsageError as e:
        return fail(USAGE_MARK + str(e))
    except MountError as e:
        return fail(str(e))
    except (SystemExit, TypeError):
        return fail(f"bad command line: {' '.join(argv)}")
    raise_fd_limit()
    m = build(args, fuse_opts, own)
    set_title(m)
    return daemon(m, args.debug or "debug" in own, logfile, ready_fd)


def set_title(m) -> None:
    """What ps shows for a child of the mount service (it would otherwise
    show the service's own command line, ``simfs --service``): the mount it
    serves."""
    try:
        from setproctitle import setproctitle
    except ImportError:          # an older environment: the title stays
        return
    quota = f"quota {m.quotaid}: " if m.quotaid is not None else "no quota: "
    setproctitle(f"simfs: {quota}{m.private} on {m.root} (mount)")


def run(m, ready_fd: int | None) -> int:
    """Prepare, mount, report readiness on ``ready_fd`` (daemon) and serve."""
    from .mount import MountError
    from .mount import run as run_loop

    def tell(msg: str) -> None:
        if ready_fd is not None:
            os.write(ready_fd, msg.encode())
            os.close(ready_fd)
    try:
        m.prepare()
        m.ops.mount_options = m.option_values
        try:
            m.fuse_init()
        except BaseException:
            m.abort()
            raise
    except MountError as e:
        log.error("%s", e)
        tell(str(e))
        if ready_fd is None:
            print(f"simfs: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        log.exception("start-up failed")
        tell(f"start-up failed: {e}")
        if ready_fd is None:
            print(f"simfs: start-up failed: {e}", file=sys.stderr)
        return 1
    notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving {m.root}")
    if ready_fd is not None:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        tell(f"ok {os.getpid()}")   # first: the log line is not what the caller waits for
    log.info("mounted %s at %s%s", m.private, m.root,
             f" with quota id {m.quotaid}" if m.quotaid else "")
    if m.live is not None and m.live.engine is None:
        log.warning("quota id %d is off (mounted with quota_off_ok): no limit is "
                    "enforced until 'vzquota on %d'", m.quotaid, m.quotaid)
    os.umask(0)
    try:
        run_loop(m.serve, m.runtime, m.fuse)
    except BaseException:
        log.exception("the mount failed")
        return 1
    notify("STOPPING=1")
    log.info("unmounted %s", m.root)
    return 0
