"""simfs's command line and ``-o`` options: the words it takes (the same
mount.fuse.simfs and fuse3's mount helper pass for ``mount -t fuse.simfs`` and
fstab lines), their checks (``parse_options``: a ``UsageError`` says what is
wrong, exit 2), the argparse parser, and the values a mount runs with
(``option_values``), which a remount compares against (``changed_options``).

Role: a library of the ``simfs`` command, of the daemon's start (the mount
service's children parse the command line again) and of remount.  It imports
only ``os`` and ``json`` at load time.
"""

from __future__ import annotations

import json
import os

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
                "fuse", "recounthold", "recountwait", "maxinodes", "maxparked"}
# simfs's own flags: quota_off_ok lets a quota id whose quota is off be mounted
# (unenforced, on purpose); without it such a mount is refused.  A mount
# reads files of passthrough_min bytes or more by FUSE passthrough (see
# simfs.iomode); passthrough: every file, whatever its size; nopassthrough:
# none (every read through the daemon).
SIMFS_FLAGS = {"quota_off_ok", "passthrough", "nopassthrough"}
# Own options whose value may be left out: the default then.
SIMFS_OPTIONAL = {"quota_admin": "0"}
# The source df and /proc/mounts show, inside the container too (as OpenVZ
# showed): never the host's private path.
DEFAULT_FSNAME = "/dev/simfs"
MAX_QUOTAID = 2**32 - 1
MAX_UGID = 2**32 - 2
MAX_CHECKPOINT = 86400.0
MAX_RECOUNTHOLD = 60.0
MAX_RECOUNTWAIT = 3600.0
# The kernel takes max_read as a u32 (fs/fuse/inode.c, fsparam_u32); 0 is
# refused here, as a value that cannot mean a read size.
MAX_MAX_READ = 2**32 - 1
# fsname= and subtype=: what mountinfo, df and fstab can show as one word.
MAX_NAME = 255
# The numeric options: (type, low, high, whether low itself is refused, what
# the value is, for the error).  A float takes ASCII digits with at most one
# point; an int digits only.
RANGES = {
    "quotaid": (int, 0, MAX_QUOTAID, True, f"a quota id from 1 to {MAX_QUOTAID}"),
    "quota_admin": (int, 0, MAX_UGID, False, f"a uid from 0 to {MAX_UGID}"),
    "maxopen": (int, 16, 1 << 20, False,
                f"a number of open files from 16 to {1 << 20}"),
    "maxinodes": (int, 64, 1 << 30, False, f"a number of inodes from 64 to {1 << 30}"),
    "maxparked": (int, 0, 1 << 16, False,
                  f"a number of backing ids from 0 to {1 << 16}"),
    "checkpoint": (float, 0.0, MAX_CHECKPOINT, True,
                   f"a number of seconds above 0 and up to {MAX_CHECKPOINT:g}"),
    "recounthold": (float, 0.0, MAX_RECOUNTHOLD, False,
                    f"a number of seconds from 0 to {MAX_RECOUNTHOLD:g}"),
    "recountwait": (float, 0.0, MAX_RECOUNTWAIT, False,
                    f"a number of seconds from 0 to {MAX_RECOUNTWAIT:g}"),
    # a FUSE option, checked here too: the kernel would refuse it only at the
    # mount(2) (EINVAL, exit 1)
    "max_read": (int, 0, MAX_MAX_READ, True, f"a number of bytes from 1 to {MAX_MAX_READ}"),
}
NAMES = ("fsname", "subtype")


def _digits(text: str) -> bool:
    """ASCII digits only (not str.isdigit, which takes other scripts' digits)."""
    return text.isascii() and text.isdigit()


def _decimal(text: str) -> bool:
    """``12``, ``1.5``, ``1.``, ``.5``: ASCII digits with at most one point."""
    whole, _, frac = text.partition(".")
    return bool(whole or frac) and all(not p or _digits(p) for p in (whole, frac))


class UsageError(Exception):
    pass


def parse_options(words: list[str], private: str) -> tuple[set[str], dict[str, str]]:
    """Split ``-o`` words into mount/FUSE options and simfs's own."""
    fuse = {"allow_other", "default_permissions", f"fsname={DEFAULT_FSNAME}",
            "subtype=simfs"}
    own: dict[str, str] = {}
    valued: dict[str, str] = {}         # the FUSE options' values, to check
    for opt in words:
        key, eq, val = opt.partition("=")
        if not key:
            continue
        if key in FUSE_FLAGS and not eq:
            fuse.add(key)
        elif key in FUSE_VALUED and eq:
            fuse = {o for o in fuse if not o.startswith(key + "=")}
            fuse.add(opt)
            valued[key] = val
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
    for key in NAMES:
        v = valued.get(key)
        if v is not None and (not v or len(v) > MAX_NAME or not v.isprintable()
                              or any(c.isspace() or c == "," for c in v)):
            raise UsageError(f"{key}= takes a name of 1 to {MAX_NAME} printable characters "
                             f"without spaces or commas, not {v!r}")
    for key, (kind, low, high, above, what) in RANGES.items():
        v = own.get(key, valued.get(key))
        if v is None:
            continue
        n = kind(v) if (_digits(v) if kind is int else _decimal(v)) else None
        if n is None or n < low or (above and n == low) or n > high:
            raise UsageError(f"{key}= takes {what}, not {v!r}")
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
    if own.get("runtime") == "thread" and own.get("fuse", "builtin") != "builtin":
        raise UsageError("runtime=thread is fusewire's (fuse=builtin); "
                         "pyfuse3 runs on uvloop, asyncio or trio")
    for key in ("quotafile", "log", "hook"):
        if key in own and not own[key]:
            raise UsageError(f"{key}= needs a file name")
    if "hook" in own and not os.path.isabs(own["hook"]):
        raise UsageError(f"hook= needs an absolute path, not {own['hook']!r}")
    if "quota_off_ok" in own and "quotaid" not in own:
        raise UsageError("quota_off_ok goes with quotaid=N")
    if "passthrough" in own and "nopassthrough" in own:
        raise UsageError("passthrough and nopassthrough exclude each other")
    return fuse, own


def check_mount(own: dict[str, str]) -> None:
    """What a mount's whole set of options must hold (a remount passes only
    some of them)."""
    if "quota_admin" in own and "quotaid" not in own:
        raise UsageError("quota_admin needs quotaid=N: without a quota there is "
                         "nothing to administer")


_parser = None


def parser():
    """simfs's command line (argparse, imported here: the command's way to
    the mount service never builds it).  Built once per process (the mount
    service builds it before forking: its children only parse)."""
    global _parser
    if _parser is None:
        _parser = _build_parser()
    return _parser


def _build_parser():
    import argparse

    from . import __version__
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
               "passthrough (the kernel reads every file opened read-only from the "
               "backing file itself, not only those of 128 KiB or more), "
               "nopassthrough (every read through the daemon), "
               "maxparked=N (passthrough registrations kept after their file's last "
               "close for its next open, default 1024; 0: each ended at the last close), "
               "log=FILE, hook=CMD (run at quota limit events), "
               "quota_admin[=UID] (that uid, 0 by default, may set its container's "
               "per-user and per-group limits from inside), "
               "runtime=thread|uvloop|asyncio|trio (how requests are read: a reader "
               "thread, the default, or the event loop itself; default uvloop with "
               "fuse=pyfuse3), "
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


def default_runtime(fuse: str) -> str:
    """-o runtime= when not given: fusewire's reader thread, uvloop for pyfuse3
    (simfs.binding's ``runtimes``, named here without importing the binding)."""
    return "thread" if fuse == "builtin" else "uvloop"


def option_values(own: dict[str, str]) -> dict:
    """simfs's own ``-o`` values as the daemon runs them (defaults filled in),
    comparable between a mount and a remount."""
    from .config import DEFAULT as D
    return {"quotaid": int(own["quotaid"]) if "quotaid" in own else None,
            "quotafile": own.get("quotafile"), "log": own.get("log"),
            "hook": own.get("hook"), "checkpoint": float(own.get("checkpoint", D.checkpoint)),
            "runtime": own.get("runtime") or default_runtime(own.get("fuse", "builtin")),
            "maxopen": int(own.get("maxopen", D.max_open)),
            "recounthold": float(own.get("recounthold", D.recount_hold)),
            "recountwait": float(own.get("recountwait", D.recount_wait)),
            "maxinodes": int(own.get("maxinodes", D.max_inodes)),
            "maxparked": int(own.get("maxparked", D.backing_parked)),
            "quota_admin": int(own["quota_admin"]) if "quota_admin" in own else None,
            "fuse": own.get("fuse", "builtin"),
            "passthrough": "passthrough" in own,
            "nopassthrough": "nopassthrough" in own}


# Flags a remount compares with the running mount (quota_off_ok only matters
# when a mount starts: a remount may pass it, as fstab lines do, freely).
REMOUNT_COMPARED = ("passthrough", "nopassthrough")


def changed_options(root: str, asked: dict[str, str]) -> str | None:
    """The first of ``asked`` (simfs's own options of a remount; a flag of
    ``REMOUNT_COMPARED`` as ``flag: None``) whose value differs from the one the
    mount at ``root`` runs with, as ``key=value (the mount runs with ...)``;
    None when all are the same."""
    words = [k if v is None else f"{k}={v}" for k, v in asked.items()]
    try:
        _, own = parse_options(words, "")
        want = option_values(own)
    except (UsageError, ValueError) as e:
        return f"{', '.join(words)} ({e})"
    try:
        have = json.loads(os.getxattr(root, "trusted.simfs.options"))
    except (OSError, ValueError) as e:
        return (f"{', '.join(words)} (cannot read the "
                f"running mount's options: {getattr(e, 'strerror', None) or e})")
    for word, (key, val) in zip(words, asked.items()):
        if want[key] != have.get(key):
            now = have.get(key)
            if val is None:
                return f"{word} (the mount runs without it)"
            return (f"{word} (the mount runs with "
                    f"{'no ' + key if now is None else f'{key}={now}'})")
    return None
