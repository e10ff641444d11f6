"""``simfs PRIVATE ROOT [-o OPTS] [-f] [-d]``: mount a private area at a root;
``simfs --service``: run the mount service.

Role: parse the command line and the ``-o`` options (the same words fuse3's
mount helper passes for ``mount -t fuse.simfs`` and fstab lines), check what can
be checked before mounting, then either serve in the foreground (``-f``), or
hand the mount to the mount service when one runs (``forkserver.delegate``;
``SIMFS_SERVICE=0`` never does), or fork a daemon: in both cases the command
returns 0 once the mount is usable, or prints why it failed and returns 1.
``start_daemon`` is the daemon's start, shared by the standalone fork and the
service's children.

Concurrency: runs before any event loop exists; the fork happens before the
loop starts, and the child alone runs it.  The path to the service imports
nothing heavy (no FUSE binding, no event loop, no logging).
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import json
import logging
import os
import re
import resource
import stat
import sys

from . import __version__

log = logging.getLogger("simfs")

# Options handed to the FUSE binding as they are (mount flags and FUSE options).
FUSE_FLAGS = {"ro", "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime",
              "noatime", "diratime", "nodiratime", "relatime", "norelatime",
              "strictatime", "nostrictatime", "lazytime", "nolazytime", "sync",
              "async", "dirsync", "allow_other", "default_permissions"}
FUSE_VALUED = {"fsname", "subtype", "max_read"}
# Words mount(8)/fstab may pass that mean nothing to a running filesystem.
IGNORED = {"defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group",
           "nofail", "_netdev", "loop"}
SIMFS_VALUED = {"quotaid", "quotafile", "log", "checkpoint", "runtime", "hook", "maxopen",
                "fuse", "recounthold", "recountwait", "maxinodes"}
# simfs's own flags: quota_off_ok lets a quota id whose quota is off be mounted
# (unenforced, on purpose); without it such a mount is refused.  passthrough:
# a writable mount serves read-only opens by FUSE passthrough too (a read-only
# mount always does; see ops.SimOperations._open_mode).
SIMFS_FLAGS = {"quota_off_ok", "passthrough"}
# Own options whose value may be left out: the default then.
SIMFS_OPTIONAL = {"quota_admin": "0"}
# Where the daemon logs when there is no syslog socket (/dev/log) to log to.
FALLBACK_LOG = "/var/log/simfs.log"
# The source df and /proc/mounts show, inside the container too (as OpenVZ
# showed): never the host's private path.
DEFAULT_FSNAME = "/dev/simfs"
MAX_QUOTAID = 2**32 - 1
MAX_UGID = 2**32 - 2
MAX_CHECKPOINT = 86400.0
MAX_RECOUNTHOLD = 60.0
MAX_RECOUNTWAIT = 3600.0
_DIGITS = re.compile(r"[0-9]+")                          # ASCII only (not str.isdigit)
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")


class UsageError(Exception):
    pass


def parse_options(words: list[str], private: str) -> tuple[set[str], dict[str, str]]:
    """Split ``-o`` words into mount/FUSE options and simfs's own."""
    fuse = {"allow_other", "default_permissions", f"fsname={DEFAULT_FSNAME}",
            "subtype=simfs"}
    own: dict[str, str] = {}
    for opt in words:
        key, eq, val = opt.partition("=")
        if not key:
            continue
        if key in FUSE_FLAGS and not eq:
            fuse.add(key)
        elif key in FUSE_VALUED and eq:
            fuse = {o for o in fuse if not o.startswith(key + "=")}
            fuse.add(opt)
        elif key in SIMFS_VALUED and eq:
            own[key] = val
        elif key in SIMFS_OPTIONAL:
            own[key] = val if eq else SIMFS_OPTIONAL[key]
        elif key == "debug" and not eq:
            own["debug"] = "1"
        elif key in SIMFS_FLAGS and not eq:
            own[key] = "1"
        elif key in IGNORED or key.startswith("x-") or key == "comment":
            continue
        else:
            raise UsageError(f"unknown mount option: {opt}")
    if "quotaid" in own:
        q = own["quotaid"]
        if not _DIGITS.fullmatch(q) or not 0 < int(q) <= MAX_QUOTAID:
            raise UsageError(f"quotaid must be a positive integer up to {MAX_QUOTAID}, "
                             f"not {q!r}")
    if "quota_admin" in own:
        u = own["quota_admin"]
        if not _DIGITS.fullmatch(u) or not int(u) <= MAX_UGID:
            raise UsageError(f"quota_admin= takes a uid from 0 to {MAX_UGID}, not {u!r}")
    if "runtime" in own:
        from .mount import RUNTIMES
        if own["runtime"] not in RUNTIMES:
            raise UsageError(f"runtime must be one of {', '.join(RUNTIMES)}, "
                             f"not {own['runtime']!r}")
    if "fuse" in own:
        from .binding import BINDINGS
        if own["fuse"] not in BINDINGS:
            raise UsageError(f"fuse must be one of {', '.join(BINDINGS)}, "
                             f"not {own['fuse']!r}")
    if "maxopen" in own:
        v = own["maxopen"]
        if not _DIGITS.fullmatch(v) or not 16 <= int(v) <= 1 << 20:
            raise UsageError(f"maxopen must be a number of open files from 16 to "
                             f"{1 << 20}, not {v!r}")
    if "maxinodes" in own:
        v = own["maxinodes"]
        if not _DIGITS.fullmatch(v) or not 64 <= int(v) <= 1 << 30:
            raise UsageError(f"maxinodes must be a number of inodes from 64 to "
                             f"{1 << 30}, not {v!r}")
    if "checkpoint" in own:
        c = own["checkpoint"]
        if not _DECIMAL.fullmatch(c) or not 0 < float(c) <= MAX_CHECKPOINT:
            raise UsageError(f"checkpoint must be a number of seconds above 0 and up to "
                             f"{MAX_CHECKPOINT}, not {c!r}")
    if "recounthold" in own:
        c = own["recounthold"]
        if not _DECIMAL.fullmatch(c) or not 0 <= float(c) <= MAX_RECOUNTHOLD:
            raise UsageError(f"recounthold must be a number of seconds from 0 to "
                             f"{MAX_RECOUNTHOLD:g}, not {c!r}")
    if "recountwait" in own:
        c = own["recountwait"]
        if not _DECIMAL.fullmatch(c) or not 0 <= float(c) <= MAX_RECOUNTWAIT:
            raise UsageError(f"recountwait must be a number of seconds from 0 to "
                             f"{MAX_RECOUNTWAIT:g}, not {c!r}")
    for key in ("quotafile", "log", "hook"):
        if key in own and not own[key]:
            raise UsageError(f"{key}= needs a file name")
    if "hook" in own and not os.path.isabs(own["hook"]):
        raise UsageError(f"hook= needs an absolute path, not {own['hook']!r}")
    if "quota_off_ok" in own and "quotaid" not in own:
        raise UsageError("quota_off_ok goes with quotaid=N")
    return fuse, own


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simfs",
        description="Mount a container's private area at its root with per-container "
                    "disk quotas (vzquota) and a statfs that shows the quota.",
        epilog="Options for -o: quotaid=N (account and enforce quota id N), "
               "quotafile=FILE, checkpoint=SECS (save usage this often, default 30), "
               "maxopen=N (files and directories the container may hold open at once, "
               "default 65536; one uid at most a quarter, the last sixteenth for "
               "root only), recounthold=SECS (how long a live recount may hold "
               "allocating calls, default 3, 0 never), "
               "recountwait=SECS (how long a call that allocates may wait for the "
               "first recount pass of a live vzquota on before it fails with EDQUOT, "
               "default 10), "
               "maxinodes=N (inodes the daemon keeps before it asks the kernel to "
               "forget the least recently used, default 200000; needs FUSE 7.45), "
               "quota_off_ok (mount even though the quota is off: nothing enforced "
               "until vzquota on), "
               "passthrough (a writable mount lets the kernel read files opened "
               "read-only itself, as a read-only mount always does; an open for "
               "writing then gets ETXTBSY while such a reader has the file open), "
               "log=FILE, hook=CMD (run at quota limit events), "
               "quota_admin[=UID] (that uid, 0 by default, may set its container's "
               "per-user and per-group limits from inside), "
               "runtime=uvloop|asyncio|trio (event loop, default uvloop), "
               "fuse=builtin|pyfuse3 (the FUSE binding: the project's own protocol layer, "
               "the default, or pyfuse3 from the optional extra), "
               "debug; and the usual mount options (ro, rw, dev, suid, exec, "
               "noatime, allow_other, fsname=, ...). Default: nodev,nosuid, "
               "fsname=/dev/simfs. "
               "Exit status: 0 mounted, 1 the mount failed, 2 usage error.")
    p.add_argument("private", nargs="?", help="the private area (backing directory)")
    p.add_argument("root", nargs="?", help="the mount point")
    p.add_argument("-o", dest="options", action="append", default=[],
                   metavar="OPTS", help="comma-separated mount options")
    p.add_argument("-f", dest="foreground", action="store_true",
                   help="stay in the foreground")
    p.add_argument("-d", dest="debug", action="store_true",
                   help="debug logging (implies -f)")
    p.add_argument("--service", action="store_true",
                   help="run the mount service in the foreground: later simfs commands "
                        "ask it for their mount daemon (a fork that shares its memory) "
                        "instead of starting their own; SIMFS_SERVICE=0 bypasses it")
    p.add_argument("-V", "--version", action="version", version=f"simfs {__version__}")
    return p


def is_mountpoint(path: str) -> bool:
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].encode().decode("unicode_escape")
                if mp == real:
                    return True
    except OSError:
        return os.path.ismount(path)
    return False


def dead_mount(path: str) -> bool:
    """True when ``path`` is a FUSE mount whose daemon is gone."""
    try:
        os.stat(path)
        os.statvfs(path)     # the root's attributes may be cached; statfs is not
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def dead_mount_message(path: str) -> str:
    return (f"{path} is a dead mount (Transport endpoint is not connected): the simfs "
            f"daemon that served it is gone; clear it with 'umount -l {path}' "
            "and mount again")


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




# Words mount(8) passes along on a remount (from the mount table) that stay as
# they are: FUSE's own kernel options, and ours.
REMOUNT_KEEPS = {"remount", "defaults", "allow_other", "default_permissions", "fsname",
                 "subtype", "user_id", "group_id", "rootmode", "blksize", "max_read",
                 "fd", "debug"}


def remount(root: str, words: list[str]) -> int:
    """``mount -o remount,...`` of a simfs mount: fuse3's mount helper hands it
    to us, and the kernel does it (the daemon keeps serving, unaware).  The
    per-mount flags start from the mount's current ones, because a remount
    sets all of them."""
    import ctypes

    # the mount(2) flags a remount may change: the words a mount takes
    from fusewire.device import MOUNT_FLAGS as REMOUNT_FLAGS
    from fusewire.device import MS_REMOUNT
    real = os.path.realpath(root)
    current = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].encode().decode("unicode_escape") == real:
                current = fields        # the last one is the top mount
    if current is None or current[current.index("-") + 1] != "fuse.simfs":
        print(f"simfs: remount: {root} is not a simfs mount", file=sys.stderr)
        return 1
    flags = 0
    for word in current[5].split(","):
        if word in ("ro", "nosuid", "nodev", "noexec"):
            flags |= REMOUNT_FLAGS[word][0]
    asked: dict[str, str] = {}
    for word in words:
        key, eq, val = word.partition("=")
        if key in REMOUNT_FLAGS:
            bit, on = REMOUNT_FLAGS[key]
            flags = flags | bit if on else flags & ~bit
        elif key in SIMFS_VALUED:
            asked[key] = val            # the last one counts, as for a mount
        elif key in SIMFS_OPTIONAL:
            asked[key] = val if eq else SIMFS_OPTIONAL[key]
        elif key not in REMOUNT_KEEPS and key not in IGNORED and key not in SIMFS_FLAGS \
                and not key.startswith("x-"):
            print(f"simfs: remount cannot change {word} (only the mount flags: ro, rw, "
                  "nosuid, nodev, noexec, atime flags, sync)", file=sys.stderr)
            return 2
    if asked:
        # mount(8) passes fstab's options along: the same values are fine, a
        # changed one cannot take effect on a running daemon
        why = changed_options(real, asked)
        if why:
            print(f"simfs: remount cannot change {why}: the running mount keeps its "
                  "options; unmount and mount again to change them", file=sys.stderr)
            return 2
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                           ctypes.c_ulong, ctypes.c_void_p]
    if libc.mount(None, real.encode(), None, flags | MS_REMOUNT, None) != 0:
        err = ctypes.get_errno()
        print(f"simfs: remount of {root} failed: {os.strerror(err)}", file=sys.stderr)
        return 1
    return 0


def option_values(own: dict[str, str]) -> dict:
    """simfs's own ``-o`` values as the daemon runs them (defaults filled in),
    comparable between a mount and a remount."""
    from vzquota.service import HOLD_MAX, RECOUNT_WAIT

    from .inodes import MAX_INODES, MAX_OPEN
    return {"quotaid": int(own["quotaid"]) if "quotaid" in own else None,
            "quotafile": own.get("quotafile"), "log": own.get("log"),
            "hook": own.get("hook"), "checkpoint": float(own.get("checkpoint", 30)),
            "runtime": own.get("runtime", "uvloop"),
            "maxopen": int(own.get("maxopen", MAX_OPEN)),
            "recounthold": float(own.get("recounthold", HOLD_MAX)),
            "recountwait": float(own.get("recountwait", RECOUNT_WAIT)),
            "maxinodes": int(own.get("maxinodes", MAX_INODES)),
            "quota_admin": int(own["quota_admin"]) if "quota_admin" in own else None,
            "fuse": own.get("fuse", "builtin"),
            "passthrough": "passthrough" in own}


def changed_options(root: str, asked: dict[str, str]) -> str | None:
    """The first of ``asked`` (simfs's own options of a remount) whose value
    differs from the one the mount at ``root`` runs with, as ``key=value (the
    mount runs with ...)``; None when all are the same."""
    try:
        _, own = parse_options([f"{k}={v}" for k, v in asked.items()], "")
        want = option_values(own)
    except (UsageError, ValueError) as e:
        return f"{', '.join(f'{k}={v}' for k, v in asked.items())} ({e})"
    try:
        have = json.loads(os.getxattr(root, "trusted.simfs.options"))
    except (OSError, ValueError) as e:
        return (f"{', '.join(f'{k}={v}' for k, v in asked.items())} (cannot read the "
                f"running mount's options: {getattr(e, 'strerror', None) or e})")
    for key, val in asked.items():
        if want[key] != have.get(key):
            now = have.get(key)
            return (f"{key}={val} (the mount runs with "
                    f"{'no ' + key if now is None else f'{key}={now}'})")
    return None


def notify(state: str) -> None:
    """Tell systemd (Type=notify) how the mount is doing; a no-op elsewhere."""
    import socket
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", addr, e)


def mount_helper(argv: list[str] | None = None) -> int:
    """``mount.fuse.simfs SOURCE DIR [-sfnv] [-N NS] [-t TYPE] [-o OPTS]``: the
    calling convention mount(8) uses for helpers, turned into ``simfs``'s."""
    argv = sys.argv[1:] if argv is None else argv
    keep: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-t", "-N"):
            i += 2
            continue
        if a == "-o" and i + 1 < len(argv):
            keep += ["-o", argv[i + 1]]
            i += 2
            continue
        if a.startswith("-") and len(a) > 1 and set(a[1:]) <= set("sfnvi"):
            if "f" in a[1:]:
                return 0            # "fake": do everything but the mount
            i += 1
            continue
        keep.append(a)
        i += 1
    return main(keep)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    args = p.parse_args(argv)
    if args.service:
        if args.private or args.root or args.options:
            p.error("--service takes no other arguments")
        if os.geteuid() != 0:
            print("simfs: the mount service must run as root", file=sys.stderr)
            return 1
        from .forkserver import serve
        return serve()
    if args.root is None:
        p.error("the following arguments are required: private, root")
    words = [w for o in args.options for w in o.split(",")]
    if "remount" in words:
        if os.geteuid() != 0:
            print("simfs: must be run as root", file=sys.stderr)
            return 1
        return remount(args.root, words)
    try:
        fuse_opts, own = parse_options(words, os.path.abspath(args.private))
        if "quota_admin" in own and "quotaid" not in own:
            raise UsageError("quota_admin needs quotaid=N: without a quota there is "
                             "nothing to administer")
    except UsageError as e:
        print(f"simfs: {e}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("simfs: must be run as root (it mounts, and serves every uid of the "
              "container)", file=sys.stderr)
        return 1
    debug = args.debug or "debug" in own
    foreground = args.foreground or args.debug
    if not foreground and os.environ.get("SIMFS_SERVICE") != "0":
        from .forkserver import delegate
        code = delegate(argv)
        if code is not None:
            return code
    from .mount import MountError
    try:
        logfile = checks(args, own, foreground)
    except MountError as e:
        print(f"simfs: {e}", file=sys.stderr)
        return 1
    raise_fd_limit()
    m = build(args, fuse_opts, own)
    if foreground:
        setup_logging(debug, logfile, daemon=False)
        faulthandler.enable()
        return run(m, None)
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as pipe:
            msg = pipe.read().decode(errors="replace")
        if msg == "ok":
            return 0
        print(f"simfs: {msg or 'the mount daemon died during start-up'}", file=sys.stderr)
        return 1
    os.close(r)
    code = daemon(m, debug, logfile, w)
    os._exit(code)


def checks(args: argparse.Namespace, own: dict[str, str], foreground: bool):
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


def build(args: argparse.Namespace, fuse_opts: set[str], own: dict[str, str]):
    from .mount import Mount
    v = option_values(own)
    m = Mount(os.path.abspath(args.private), os.path.abspath(args.root), fuse_opts,
              quotaid=v["quotaid"], quotafile=v["quotafile"], checkpoint=v["checkpoint"],
              runtime=v["runtime"], hook=v["hook"], max_open=v["maxopen"],
              hold_max=v["recounthold"], recount_wait=v["recountwait"],
              max_inodes=v["maxinodes"],
              quota_admin=v["quota_admin"], fuse=v["fuse"],
              passthrough=v["passthrough"])
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
        logfile = checks(args, own, False)
    except (MountError, UsageError) as e:
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
    log.info("mounted %s at %s%s", m.private, m.root,
             f" with quota id {m.quotaid}" if m.quotaid else "")
    if m.live is not None and m.live.engine is None:
        log.warning("quota id %d is off (mounted with quota_off_ok): no limit is "
                    "enforced until 'vzquota on %d'", m.quotaid, m.quotaid)
    notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving {m.root}")
    if ready_fd is not None:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        tell("ok")
    os.umask(0)
    try:
        run_loop(m.serve, m.runtime, m.fuse)
    except BaseException:
        log.exception("the mount failed")
        return 1
    notify("STOPPING=1")
    log.info("unmounted %s", m.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
