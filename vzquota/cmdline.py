"""What vzquota's commands share (``vzquota``, ``vzdqcheck``, ``vzdqdump``,
``vzdqload``): the original's message levels (``Out``), its usage exception,
its global options and quota id parsing, the scan with its messages, the
``stat`` answer of its kernel (a live mount's figures, the file's between
mounts, or why there are none) and the exit by SIGPIPE on a closed pipe.

Role: a library both command modules import (neither imports the other).

Concurrency: one short-lived process; a request to a live mount holds no lock.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

from . import __version__, control, progress
from .errors import EC_EXDEV, EC_LIVE, EC_NOTRUN, EC_SYSERR, CrossDevice, VzError
from .gnugetopt import NO_ARG, GetoptError, GetoptLong
from .model import QuotaState
from .qfile import QuotaFile, state_to_dict
from .scan import scan
from .units import c_strtol

LOG_ERROR, LOG_WARNING, LOG_INFO = 1, 2, 3
class Usage(Exception):
    """Print ``text`` on stderr as is and exit 2 (the original's usage())."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


@dataclass
class Out:
    """The original's debug levels: -q errors only, default warnings, -v info."""

    level: int = LOG_WARNING
    batch: int = 0

    def warn(self, msg: str) -> None:
        if self.level >= LOG_WARNING:
            sys.stderr.write(f"vzquota : (warning) {msg}")

    def info(self, msg: str) -> None:
        if self.level >= LOG_INFO:
            sys.stdout.write(f"vzquota : (info) {msg}")

    @staticmethod
    def error(msg: str) -> None:
        sys.stderr.write(f"vzquota : (error) {msg}\n")



def parse_qid(text: str) -> int:
    """A quota id as the original's str2uint reads it (strtol, ASCII digits, an
    optional sign; a negative id names the same unsigned id, -1 = 4294967295).
    Values outside what an unsigned or signed 32-bit id can spell are refused
    (the original would silently act on another id)."""
    value = c_strtol(text)
    if not -2**31 <= value < 2**32:
        raise ValueError("quota id out of range")
    return value % 2**32


def globolize_path(path: str) -> str:
    """globolize_path() of the original: an absolute path as given, a relative
    one after the current directory and a slash (not normalized)."""
    return path if path.startswith("/") else os.path.join(os.getcwd(), path)



def scan_path(path: str, out: Out, ugids: bool):
    """scan() of src/quotacheck.c, with its messages."""
    out.info(f"scan mount point begin '{path}'\n")
    try:
        os.stat(path)
    except OSError as e:
        raise VzError(EC_SYSERR, f"quota check : stat {path}: {e.strerror}") from None
    if not os.path.isdir(path):
        raise VzError(EC_SYSERR, f"quota check : path {path} is not dir")
    shown = progress.counter(f"vzquota: counting {path}", quiet=out.level < LOG_WARNING)
    try:
        r = scan(path, per_id=ugids, progress=shown)
    except CrossDevice:
        shown.close()
        raise VzError(EC_EXDEV, "quota check : crossing mount point") from None
    except VzError:
        shown.close()
        raise
    except OSError as e:
        shown.close()
        raise VzError(EC_SYSERR, f"quota check : {e.filename or path}: "
                      f"{e.strerror}") from None
    shown.close(r.inodes)
    return r



def request(qid: int, cmd: str, **args) -> dict | None:
    """One request to the live mount of ``qid`` (None: no mount carries it).
    A mount that stops while it is asked (``umount`` returns before the daemon
    has saved and gone: vzctl runs ``stat -f`` and ``off`` right after it)
    takes the question into its socket's backlog and drops it when it exits;
    once its socket is gone -- it is removed after the last save -- that is
    no mount, not a failed one."""
    try:
        return control.request(qid, cmd, **args)
    except VzError as e:
        if e.code == EC_LIVE and not os.path.exists(control.socket_path(qid)):
            return None
        raise



def between_mounts(st: QuotaState) -> bool:
    """The quota is on and its last mount stopped cleanly (or none has run
    yet): the state the original's kernel quota was in when it was on with
    nothing mounted.  ``stat`` answers with the file's figures, ``off``
    switches it off, ``on`` says it is running already."""
    return st.on and not st.mounted


def kernel_stat(qid: int, qf: QuotaFile, save: bool, read_file: bool = True,
                off_message: str = "Quota accounting is off, try vzquota show id\n"
                ) -> dict:
    """What the original's kernel answered for ``stat``: the live mount's
    figures, or between mounts the quota file's (``between_mounts``); else
    exit 6, saying so when the quota's mount is dead (``dead_mount_error``)."""
    answered = True             # a mount answered (its quota may be off)
    try:
        reply = request(qid, "stat", save=save)
        answered = reply is not None
    except VzError as e:
        if e.code != EC_NOTRUN:
            raise
        reply = None
    if reply is not None and reply.get("active", True):
        return reply
    st = None
    if not answered:            # no mount: between mounts, or a dead one?
        try:
            st = qf.load()
        except VzError:
            if read_file:
                raise
    if st is not None and between_mounts(st):
        return {"ok": True, "active": True, "ugid_active": st.ugid_on and st.ugid_limit > 0,
                "dropped": False, "now": int(time.time()), "state": state_to_dict(st),
                "between_mounts": True}
    if not answered:
        dead = dead_mount_error(qid, st)
        if dead is not None:
            raise dead
    raise VzError(EC_NOTRUN, off_message)


def _dead_simfs_mounts(timeout: float = 1.0) -> list[str]:
    """Mount points of simfs mounts whose daemon is gone: a statfs of the
    mount point (always a request to the daemon, where a stat may be served
    from the kernel's cache) fails with ENOTCONN.  Each runs in a thread given
    ``timeout`` seconds, so a live mount that hangs cannot hang the caller."""
    import errno
    import threading
    found: list[str] = []
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        try:
            fstype = fields[fields.index("-", 6) + 1]
        except (ValueError, IndexError):
            continue
        if fstype != "fuse.simfs":
            continue
        point = (fields[4].replace("\\040", " ").replace("\\011", "\t")
                 .replace("\\012", "\n").replace("\\134", "\\"))
        result: list[int] = []

        def probe(path: str = point) -> None:
            try:
                os.statvfs(path)
                result.append(0)
            except OSError as e:
                result.append(e.errno or -1)
        t = threading.Thread(target=probe, daemon=True)
        t.start()
        t.join(timeout)
        if result and result[0] == errno.ENOTCONN:
            found.append(point)
    return found


def dead_mount_error(qid: int, st: QuotaState | None) -> VzError | None:
    """When the mount that served ``qid`` died (its daemon killed: the control
    socket is left behind, or the file says a mount was accounting it) and a
    dead simfs mount ("Transport endpoint is not connected") is still in
    place, an error naming it and how to clear it; else None."""
    sock_left = os.path.exists(control.socket_path(qid))
    if not sock_left and not (st is not None and st.mounted):
        return None
    dead = _dead_simfs_mounts()
    if not dead:
        return None
    sid = qid - 2**32 if qid >= 2**31 else qid
    if len(dead) == 1:
        where, how = f" at {dead[0]}", f"umount -l {dead[0]}"
    else:
        where, how = "", ("umount -l ROOT (the dead simfs mounts: "
                          + ", ".join(dead) + ")")
    return VzError(EC_NOTRUN, f"The simfs mount of quota id {sid}{where} is dead: its "
                   "daemon is gone and the mount answers \"Transport endpoint is not "
                   f"connected\"; clear it with {how}, then mount it again (the "
                   "quota is recounted)")



def parse_global(argv: list[str], usage: str, out: Out) -> tuple[list[str], bool] | int:
    """parse_global_options() of src/common.c: ``+hvqVb``, --help, --version.
    Returns (the arguments after them, help asked) or an exit code."""
    parser = GetoptLong(argv, "+hvqVb", {"help": (NO_ARG, "h"), "version": (NO_ARG, "V")})
    helped = False
    try:
        for key, _ in parser:
            if key == "h":
                helped = True
            elif key == "V":
                sys.stdout.write(f"Vzquota version {__version__}\n")
                return 0
            elif key == "v":
                out.level += 1
            elif key == "b":
                out.batch += 1
            elif key == "q":
                out.level = LOG_ERROR
    except GetoptError as e:
        raise Usage(e.text + usage) from None
    if not parser.rest:
        raise Usage(usage)
    return parser.rest, helped



def quiet_on_closed_pipe(fn, *args) -> int:
    """Run ``fn``; a reader that went away (``| head -1``) ends the process the
    way it ends the C original: killed by SIGPIPE, without a word."""
    try:
        rc = fn(*args)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGPIPE)
        return EC_SYSERR
