"""``vzquota``: the command line, compatible with OpenVZ's vzquota 3.x.

Role: parse ``vzquota [-h -V -q -v -b] COMMAND QUOTA_ID [options]`` exactly as
the original does (glibc ``getopt_long`` with its error lines, per-command usage
texts, ``strtol``-style numbers), then act on the live mount of that id (over the
control channel) when there is one, or on the quota file otherwise.  Every
message is the original's (read from ``kolyshkin/vzquota``: src/main.c,
src/common.c, src/quotaon.c, src/stat.c, src/quota_io.c, src/quotacheck.c):
errors ``vzquota : (error) ...`` and warnings ``vzquota : (warning) ...`` on
stderr, ``(info)`` lines (``-v``) on stdout, with the empty line the original
prints where its format string ends in ``\\n``.  A failure is a ``VzError``
(printed, returned as its exit code) or a ``Usage`` (a usage text on stderr,
exit 2).  Beyond the original: ``recalc`` and ``import`` (of an OpenVZ binary
quota file), block suffixes K/M/G/T and the word ``unlimited``.

Concurrency: one short-lived process.  Offline changes hold the quota file's
lock for the whole read-modify-write; a request to a live mount holds no lock
(the mount itself saves the file).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

from . import report
# what the commands share (vzdq's commands import it too)
from .cmdline import (Out, Usage, between_mounts, globolize_path, kernel_stat,
                      parse_global, parse_qid, quiet_on_closed_pipe, request,
                      scan_path)
from .engine import QuotaEngine
from .errors import (EC_NOQUOTAFILE, EC_NOTRUN, EC_QUOTADIRTY, EC_QUOTAFILE, EC_RUN,
                     EC_SYSERR, EC_UGID_NOTRUN, EC_USAGE, VzError)
from .format import format_ugid, format_usage
from .gnugetopt import NO_ARG, REQUIRED, GetoptError, GetoptLong
from .model import QuotaObject, QuotaState, default_ugid_graces
from .qfile import QuotaFile, no_gc, state_from_dict
from .service import apply_limits, apply_limits2
from .units import c_strtol, kib, parse_blocks, parse_count, parse_time

PROG = "vzquota"


# src/main.c: cmd_usage (printed by usage() with program_name).
USAGE = """\
Usage: vzquota [options] command quotaid [command-options-and-arguments]

vzquota commands are:
\tinit       Initialize quota data for given quotaid
\ton         Turn on quota accounting for given quotaid
\toff        Turn off quota accounting for given quotaid
\tdrop       Delete quota limits from file
\tsetlimit   Set quota limits for given quotaid
\tsetlimit2  Set L2 quota limits for given quotaid and QUGID
\treload2    Reload L2 quota limits from quota file for given quotaid
\tstat       Show usage and quota limits for given quotaid
\tshow       Show usage and quota limits from quota file
"""

# src/common.c: time_usage (printed for a bad -e/-n value).
TIME_USAGE = """\
Available time formats:
1. dd:hh:mm:ss
2. xxA, where A - h/H(hour);d/D(day);w/W(week);m/M(month);y/Y(year)
For instance: 7D - 7 days; 01w - 1 week; 3m - 3 months
"""

# src/quotaon.c and src/stat.c: the per-command usage texts ("%s %s" is
# "vzquota <command>").
_LIMITS_USAGE = """\
Usage: vzquota {cmd} <quotaid> [-p <mount_path>] [-c <quota_file>]
\t[-R,--relative]
\t[-f,--force]
\t[-s,--sub-quotas 1|0]
\t[-u,--ugid-limit <ugid_limit>]
\t[-b <block_soft_limit>] [-B <block_hard_limit>]
\t[-i <inode_soft_limit>] [-I <inode_hard_limit>]
\t[-e <block_expiration_time>] [-n <inode_expiration_time>]
"""
_OFF_USAGE = """\
Usage: vzquota {cmd} <quotaid> [-p <mount_path>] [-c <quota_file>]
\t[-R,--relative]
\t[-f,--force]
"""
_RELOAD_USAGE = """\
Usage: vzquota {cmd} <quotaid> [-p <mount_path>] [-c <quota_file>]
\t[-R,--relative]
"""
USAGES = {
    "init": """\
Usage: vzquota init <quotaid> -p <mount_path> [-c <quota_file>]
\t[-R,--relative]
\t[-s,--sub-quotas 1|0]
\t[-u,--ugid-limit <ugid_limit>]
\t-b,--block-softlimit <block_soft_limit>
\t-B,--block-hardlimit <block_hard_limit>
\t-i,--inode-softlimit <inode_soft_limit>
\t-I,--inode-hardlimit <inode_hard_limit>
\t-e,--block-exptime <block_expiration_time>
\t-n,--inode-exptime <inode_expiration_time>
""",
    "on": _LIMITS_USAGE.format(cmd="on"),
    "setlimit": _LIMITS_USAGE.format(cmd="setlimit"),
    "setlimit2": """\
Usage: 
\tvzquota setlimit2 <quotaid> [-p <mount_path>] [-c <quota_file>]
\t\t[-R,--relative]
\t\t[-u|-g] <ugid>
\t\t<block_soft_limit> <block_hard_limit>
\t\t<inode_soft_limit> <inode_hard_limit>
\tvzquota setlimit2 <quotaid> [-p <mount_path>] [-c <quota_file>] -t
\t\t[-R,--relative]
\t\t<block-grace> <inode-grace>
""",
    "off": _OFF_USAGE.format(cmd="off"),
    "drop": _OFF_USAGE.format(cmd="drop"),
    "reload2": _RELOAD_USAGE.format(cmd="reload2"),
    "stat": """\
Usage: vzquota stat quotaid [-p <mount_path>] [-c <quota_file>]
\t[-R,--relative]
\t[-f,--force]
\t[-t,--user-group]
\t(Specify the --help global option for a list of other help options)
""",
    "show": """\
Usage: vzquota show quotaid [-p <mount_path>] [-c <quota_file>]
\t[-R,--relative]
\t[-t,--user-group]
\t(Specify the --help global option for a list of other help options)
""",
    # not in the original: same form as reload2's
    "recalc": _RELOAD_USAGE.format(cmd="recalc"),
    "list": "Usage: vzquota list [--json]\n",
    "import": """\
Usage: vzquota import <quotaid> <openvz_quota_file> [-p <mount_path>] [-c <quota_file>]
\t[-R,--relative]
""",
}

_LIMIT_LONG = {
    "rsquash": (REQUIRED, "r"), "sub-quotas": (REQUIRED, "s"), "ugid-limit": (REQUIRED, "u"),
    "quota-file": (REQUIRED, "c"), "block-softlimit": (REQUIRED, "b"),
    "block-hardlimit": (REQUIRED, "B"), "block-exptime": (REQUIRED, "e"),
    "inode-softlimit": (REQUIRED, "i"), "inode-hardlimit": (REQUIRED, "I"),
    "inode-exptime": (REQUIRED, "n"), "relative": (NO_ARG, "R"),
}
_FILE_LONG = {"quota-file": (REQUIRED, "c"), "relative": (NO_ARG, "R")}
_FORCE = {"force": (NO_ARG, "f")}
# short options and long options of each command, as in the original's tables
OPTIONS: dict[str, tuple[str, dict[str, tuple[int, str]]]] = {
    "init": ("p:c:r:s:u:b:B:i:I:e:n:R", _LIMIT_LONG),
    "on": ("p:c:r:s:u:fb:B:i:I:e:n:R",
           {**_LIMIT_LONG, "nocheck": (NO_ARG, "nocheck"), **_FORCE}),
    "setlimit": ("p:c:r:s:u:fb:B:i:I:e:n:R", {**_LIMIT_LONG, **_FORCE}),
    "setlimit2": ("p:c:ugtR", {"quota-file": (REQUIRED, "c"), "uid": (REQUIRED, "u"),
                               "gid": (REQUIRED, "g"), "relative": (NO_ARG, "R")}),
    "off": ("p:fc:R", {**_FILE_LONG, **_FORCE}),
    "drop": ("p:fc:R", {**_FILE_LONG, **_FORCE}),
    "reload2": ("p:c:R", _FILE_LONG),
    "stat": ("p:c:tfR", {"quota-file": (REQUIRED, "c"), "user-group": (NO_ARG, "t"),
                         "relative": (NO_ARG, "R"), **_FORCE}),
    "show": ("p:c:tR", {"quota-file": (REQUIRED, "c"), "user-group": (NO_ARG, "t"),
                        "relative": (NO_ARG, "R")}),
    "recalc": ("p:c:R", _FILE_LONG),
    "import": ("p:c:R", _FILE_LONG),
    "list": ("", {}),
}
JSON_COMMANDS = ("list", "stat", "show")      # take --json (not in the original)
COMMANDS = tuple(OPTIONS)
LIMIT_OPTS = {"b": "bsoft", "B": "bhard", "i": "isoft", "I": "ihard", "e": "bgrace",
              "n": "igrace"}


@dataclass
class Opts:
    """One command line, after parse_options() of src/common.c."""

    cmd: str
    qid: int
    limits: dict = field(default_factory=dict)
    path: str | None = None
    file: str | None = None
    relative: bool = False
    force: bool = False
    nocheck: bool = False
    sqt: bool = False          # -s or -t given (FL_SQT)
    l2_user: bool = False
    l2_group: bool = False
    l2_grace: bool = False
    rest: list[str] = field(default_factory=list)

    @property
    def sid(self) -> int:
        """The id as the original's messages print it (``%d``)."""
        return self.qid - 2**32 if self.qid >= 2**31 else self.qid


def parse_command(cmd: str, args: list[str]) -> Opts:
    """parse_options() of src/common.c for one command; ``args`` start at the id."""
    usage = USAGES[cmd]
    if not args:
        raise Usage(usage)
    try:
        o = Opts(cmd, parse_qid(args[0]))
    except ValueError:
        raise Usage(usage) from None
    shortopts, longopts = OPTIONS[cmd]
    setugid = cmd == "setlimit2"
    parser = GetoptLong(args, shortopts, longopts)   # args[0], the id, names the program
    try:
        for key, val in parser:
            if key == "nocheck":
                o.nocheck = True
            elif key == "r":
                pass                                  # --rsquash: deprecated, ignored
            elif key == "s":
                if val not in ("0", "1"):
                    raise Usage(usage)
                o.limits["ugid_on"] = val == "1"
                o.sqt = True
            elif key == "u" and setugid:
                o.l2_user = True
            elif key == "u":
                try:
                    o.limits["ugid_limit"] = c_strtol(val) % 2**32
                except ValueError:
                    raise Usage(usage) from None
            elif key == "g":
                o.l2_group = True
            elif key == "t":
                if setugid:
                    o.l2_grace = True
                else:
                    o.sqt = True
            elif key == "c":
                o.file = val
            elif key == "f":
                o.force = True
            elif key == "p":
                o.path = globolize_path(val)
                o.limits["path"] = o.path
            elif key in ("b", "B", "i", "I"):
                parse = parse_blocks if key in "bB" else parse_count
                try:
                    o.limits[LIMIT_OPTS[key]] = parse(val)
                except ValueError:
                    raise Usage(usage) from None
            elif key in ("e", "n"):
                try:
                    o.limits[LIMIT_OPTS[key]] = parse_time(val)
                except ValueError:
                    raise Usage(TIME_USAGE) from None
            elif key == "R":
                o.relative = True
    except GetoptError as e:
        raise Usage(e.text + usage) from None
    o.rest = parser.rest
    if o.relative and o.file:
        raise VzError(EC_USAGE, "-c and -R options can't be set together\n")
    return o


def quota_file(o: Opts, create: bool = False) -> QuotaFile:
    """get_quota_file_name() of src/quota_io.c: -c FILE; with -R the file next to
    the -p directory (``quota.<name>``); else the default place."""
    if o.file:
        return QuotaFile.for_id(o.qid, o.file)
    if o.relative:
        # get_quota_file_name() of the original: error(EC_NOQUOTAFILE, ...)
        if not o.path:
            raise VzError(EC_NOQUOTAFILE, "can't open quota config file (null)\n")
        path = o.path.rstrip("/") or "/"
        name = os.path.join(os.path.dirname(path), "quota." + os.path.basename(path))
        if not create:
            try:
                os.stat(name)
            except OSError as e:
                raise VzError(EC_NOQUOTAFILE, f"can't open quota config file {name}\n"
                              f": {e.strerror}") from None
        return QuotaFile.for_id(o.qid, name)
    return QuotaFile.for_id(o.qid)


def load(qf: QuotaFile) -> QuotaState:
    return qf.load()


def creatable(o: Opts, qf: QuotaFile) -> None:
    """open_quota_file(O_CREAT) of the original: a file named by -c or -R goes
    where it is named, into a directory that exists (none is created)."""
    if (o.file or o.relative) and not os.path.isdir(os.path.dirname(qf.path) or "."):
        raise VzError(EC_QUOTAFILE, f"create quota file '{qf.path}': No such file or "
                      "directory")


def rescan(st: QuotaState, path: str | None, out: Out) -> None:
    """calc_current_usage(): uid/gid objects are counted only with the 2nd level on."""
    if not path:
        raise VzError(13, "path to mount point can't be read from config file,\n"
                      "use -p <mount_point> option\n")
    r = scan_path(path, out, st.ugid_on)
    if not st.ugid_on:
        st.users.clear()
        st.groups.clear()
    QuotaEngine(st).set_usage(r.space, r.inodes, r.users if st.ugid_on else {},
                              r.groups if st.ugid_on else {})
    st.ugid_exceeded = False     # offline: no id was refused
    st.path = path
    st.dirty = False
    st.mounted = False


def limit_warnings(st: QuotaState, out: Out, given: set | None) -> None:
    """The warnings of check_limits() (src/quotaon.c); ``given`` None = all."""
    def g(key: str) -> bool:
        return given is None or key in given
    s, i = st.level1.space, st.level1.inodes
    if s.hard < s.usage and g("bhard"):
        out.warn(f"block_hard_limit [{kib(s.hard)}] < block_current_usage [{kib(s.usage)}]\n")
    elif s.soft < s.usage and g("bsoft"):
        out.warn(f"block_soft_limit [{kib(s.soft)}] < block_current_usage [{kib(s.usage)}]\n")
    if i.hard < i.usage and g("ihard"):
        out.warn(f"inode_hard_limit [{i.hard}] < inode_current_usage [{i.usage}]\n")
    elif i.soft < i.usage and g("isoft"):
        out.warn(f"inode_soft_limit [{i.soft}] < inode_current_usage [{i.usage}]\n")
    n = len(st.users) + len(st.groups)
    if st.ugid_on and st.ugid_limit < n and g("ugid_limit"):
        out.warn(f"ugid_limit [{st.ugid_limit}] < ugid_current_usage [{n}]\n")


def on_messages(st: QuotaState, out: Out, sid: int) -> None:
    """What quota_syscall_on() of the original says when it turns a quota on:
    more uid/gid objects (with usage or limits) than the ugid limit cannot all
    be loaded (a warning), then whether the 2nd level is active (info)."""
    def real(o: QuotaObject) -> bool:
        return any((c.usage, c.soft, c.hard) != (0, 0, 0) for c in (o.space, o.inodes))
    active = st.ugid_on and st.ugid_limit > 0
    n = sum(map(real, st.users.values())) + sum(map(real, st.groups.values()))
    if active and n > st.ugid_limit:
        out.warn(f"Quotas were not loaded for some users/groups for id {sid} due to "
                 "ugid limit\n")
    if st.ugid_on:
        out.info(f"User/group quota was activated with ugid limit of {st.ugid_limit}\n")
    else:
        out.info("User/group quota is off\n")


def set_from_line(st: QuotaState, limits: dict) -> None:
    """set_quotas_from_line(): limits, plus the dirty marks of turning the 2nd
    level on (-s 0 -> 1) or giving it a first ugid limit (-u 0 -> N)."""
    was_on, was_limit = st.ugid_on, st.ugid_limit
    apply_limits(st, limits)
    if "ugid_on" in limits and not was_on and st.ugid_on:
        st.dirty = True
    if "ugid_limit" in limits and not was_limit and st.ugid_limit and st.ugid_on:
        st.dirty = True


def live(o: Opts, cmd: str, **args) -> dict | None:
    return request(o.qid, cmd, **args)


def live_state(reply: dict) -> QuotaState:
    return state_from_dict(reply["state"])


# ---- commands (src/quotaon.c, src/stat.c) ---------------------------------------

def cmd_init(o: Opts, out: Out) -> int:
    lim = o.limits
    if not o.path or any(k not in lim for k in LIMIT_OPTS.values()):
        raise Usage(USAGES["init"])
    qf = quota_file(o, create=True)
    ping = live(o, "ping")
    if ping is not None and not ping.get("dropped"):
        raise VzError(EC_RUN, "Quota is running, stop it first")
    creatable(o, qf)
    st = QuotaState(qid=o.qid)
    with qf.lock():
        if qf.exists():
            out.warn("Quota file exists, it will be overwritten\n")
        apply_limits(st, {k: v for k, v in lim.items() if k != "path"})
        rescan(st, o.path, out)
        # A mount whose quota was dropped (drop -f) runs on uncounted: the
        # figure is not to be trusted until `on` recounts it there.
        st.dirty = ping is not None
        if o.relative:
            st.path = o.path
        limit_warnings(st, out, None)
        QuotaEngine(st).refresh_timers()
        st.ugid_exceeded = False
        qf.save(st)
    out.info(f"quota initialization for id {o.sid} complete\n")
    return 0


def cmd_on(o: Opts, out: Out) -> int:
    qf = quota_file(o)
    load(qf)                                  # the original reads the file first
    reply = live(o, "ping")
    if reply is not None:
        if reply.get("active"):
            out.warn(f"Quota is running for id {o.sid} already\n")
            return EC_RUN
        reply = live(o, "on", limits=o.limits)
        if reply is not None and "state" in reply:
            limit_warnings(live_state(reply), out, None)
            on_messages(live_state(reply), out, o.sid)
        out.info(f"Quota was switched on for id {o.sid}\n")
        return 0
    with qf.lock():
        st = qf.load()
        force = o.force
        if o.path and st.path and st.path != o.path:
            force = True                      # a new place: count it again
        if st.on and not st.mounted and not o.force:
            out.warn(f"Quota is running for id {o.sid} already\n")
            return EC_RUN
        set_from_line(st, o.limits)
        if not st.ugid_on or not st.ugid_limit:
            st.users.clear()
            st.groups.clear()
            st.user_grace, st.group_grace = default_ugid_graces(), default_ugid_graces()
            st.ugid_exceeded = False
        again = False
        if st.mounted and not o.nocheck:
            out.warn(f"Incorrect quota shutdown for id {o.sid}, recalculating disk usage\n")
            again = True
        if st.dirty and not again and not o.nocheck:
            out.info(f"quota usage is invalid for id {o.sid}, recalculating disk usage...\n")
            again = True
        if force and not again:
            out.info(f"Force quota checking for id {o.sid}...\n")
            again = True
        if again:
            rescan(st, o.path or st.path, out)
        limit_warnings(st, out, None)
        QuotaEngine(st).refresh_timers()
        on_messages(st, out, o.sid)
        st.on = True
        qf.save(st)
    out.info(f"Quota was switched on for id {o.sid}\n")
    return 0


def cmd_off(o: Opts, out: Out) -> int:
    qf = quota_file(o)
    readable = True
    try:
        load(qf)
    except VzError as e:
        if not o.force:
            raise
        out.error(e.message)
        out.warn(f"Force switching quota off for id {o.sid} (quota file may be "
                 "inconsistent)\n")
        readable = False
    reply = live(o, "ping")
    if reply is not None and reply.get("active"):
        live(o, "off")
        out.info(f"Quota was switched off for id {o.sid}\n")
        return 0
    if readable and reply is None:
        with qf.lock():
            st = qf.load()
            if between_mounts(st):
                # the original's kernel quota was on: switched off quietly
                st.on = False
                qf.save(st)
                out.info(f"Quota was switched off for id {o.sid}\n")
                return 0
    out.error(f"Quota is not running for id {o.sid}")
    if not readable:
        return EC_NOTRUN
    with qf.lock():
        st = qf.load()
        if not st.on:
            return EC_NOTRUN
        out.warn(f"Repairing quota: it was incorrectly marked as running for id {o.sid}\n")
        st.on = False
        qf.save(st)
    out.info(f"Quota was switched off for id {o.sid}\n")
    return 0


def cmd_drop(o: Opts, out: Out) -> int:
    qf = quota_file(o)
    if not qf.exists():
        raise qf.missing()
    ping = live(o, "ping")
    if ping is not None and not ping.get("dropped"):
        out.warn(f"Quota is running for id {o.sid}\n")
        if not o.force:
            return EC_RUN
        out.warn("Force quota file delete\n")
        if live(o, "drop") is not None:
            out.info(f"Quota file was deleted for id {o.sid}\n")
            return 0
    with qf.lock():
        qf.remove()
    out.info(f"Quota file was deleted for id {o.sid}\n")
    return 0


def cmd_setlimit(o: Opts, out: Out) -> int:
    lim = o.limits
    if not (o.path or any(k in lim for k in LIMIT_OPTS.values()) or o.sqt
            or "ugid_limit" in lim or o.force):
        raise Usage(USAGES["setlimit"])
    qf = quota_file(o)
    load(qf)
    given = set(lim)
    reply = live(o, "setlimit", limits=lim, force=o.force)
    if reply is not None:
        if "state" in reply:
            limit_warnings(live_state(reply), out, given)
        out.info(f"Quota limits were set for id {o.sid}\n")
        return 0
    with qf.lock():
        st = qf.load()
        set_from_line(st, lim)
        limit_warnings(st, out, given)
        if o.force:
            st.dirty = True
        QuotaEngine(st).refresh_timers()
        qf.save(st)
    out.info(f"Quota limits were set for id {o.sid}\n")
    return 0


def cmd_setlimit2(o: Opts, out: Out) -> int:
    rest = o.rest
    req: dict = {"kind": "group" if o.l2_group else "user"}
    try:
        if o.l2_grace:
            if len(rest) != 2:
                raise ValueError
            req["bgrace"], req["igrace"] = parse_time(rest[0]), parse_time(rest[1])
        else:
            if len(rest) != 5:
                raise ValueError
            req["id"] = c_strtol(rest[0]) % 2**32
            req["bsoft"], req["bhard"] = parse_blocks(rest[1]), parse_blocks(rest[2])
            req["isoft"], req["ihard"] = parse_count(rest[3]), parse_count(rest[4])
    except ValueError:
        raise Usage(USAGES["setlimit2"]) from None
    qf = quota_file(o)
    st = load(qf)
    reply = live(o, "ping")
    if reply is not None and reply.get("active"):
        if not reply.get("ugid_active"):
            raise VzError(EC_NOTRUN, "Second level quota accounting is off")
        reply = live(o, "setlimit2", **req)
        if reply is not None and "state" in reply:
            zero_grace_warnings(live_state(reply), req, out, o.sid)
        return 0
    # Not in the original (it needs a running quota): offline, the file keeps
    # the limits for the next mount -- as long as the 2nd level is on.
    if not st.ugid_on:
        raise VzError(EC_NOTRUN, "Second level quota accounting is off")

    def change(st: QuotaState) -> None:
        apply_limits2(st, req)
        QuotaEngine(st).refresh_timers()
    with qf.lock():
        st = qf.load()
        change(st)
        qf.save(st)
    zero_grace_warnings(st, req, out, o.sid)
    return 0


def zero_grace_warnings(st: QuotaState, req: dict, out: Out, sid: int) -> None:
    """Not in the original: a soft limit with a grace time of 0 acts as a hard
    one (its first crossing ends the grace at once), so ``setlimit2`` warns
    when it sets one, or sets a grace time of 0 under existing soft limits."""
    kind = req["kind"]
    grace = st.grace2(kind)
    who = "uid" if kind == "user" else "gid"
    fix = f"vzquota setlimit2 {sid} {'-g ' if kind == 'group' else ''}-t BGRACE IGRACE"
    if "id" in req:
        for res, soft, time_ in (("block", req["bsoft"], grace.space),
                                 ("inode", req["isoft"], grace.inodes)):
            if soft and not time_:
                out.warn(f"The {kind} {res} grace time is 0, so the {res} soft limit of "
                         f"{who} {req['id']} acts as a hard limit; set a grace time with "
                         f"{fix}\n")
        return
    for res, time_, attr in (("block", req["bgrace"], "space"),
                             ("inode", req["igrace"], "inodes")):
        n = sum(1 for o in st.table(kind).values() if getattr(o, attr).soft)
        if not time_ and n:
            out.warn(f"The {kind} {res} grace time is now 0, so the {res} soft limits of "
                     f"{n} {who}s act as hard limits\n")


def cmd_reload2(o: Opts, out: Out) -> int:
    load(quota_file(o))
    reply = live(o, "ping")
    if reply is not None and reply.get("active") and reply.get("ugid_active"):
        live(o, "reload2")
    return 0


def print_state(st: QuotaState, now: int, o: Opts, out: Out, *, active: bool,
                live_figures: bool, unknown_status: bool = False) -> None:
    sys.stdout.write(format_usage(st, now, bool(out.batch)))
    if o.sqt:
        with no_gc():
            text = format_ugid(st, now, active=active, live=live_figures,
                               batch=bool(out.batch), unknown_status=unknown_status)
        sys.stdout.write(text)


def live_stat(o: Opts, qf: QuotaFile) -> dict:
    """The answer to ``stat`` (the file is read and checked first, unless -f):
    ``kernel_stat``; exit 6 when accounting is off."""
    if not o.force:
        load(qf)
    return kernel_stat(o.qid, qf, save=not o.force, read_file=not o.force)


def cmd_stat(o: Opts, out: Out) -> int:
    reply = live_stat(o, quota_file(o))
    st = live_state(reply)
    print_state(st, reply["now"], o, out, active=reply["ugid_active"], live_figures=True,
                unknown_status=o.force)
    if o.sqt and not reply["ugid_active"]:
        return EC_UGID_NOTRUN
    return 0


def load_for_show(qf: QuotaFile, out: Out) -> QuotaState:
    """The file ``show`` prints; a missing one adds the original's second line."""
    try:
        return load(qf)
    except VzError as e:
        if e.code != EC_NOQUOTAFILE:
            raise
        out.error(e.message)
        raise VzError(EC_NOQUOTAFILE, "Quota file must exist for show command") from None


def cmd_show(o: Opts, out: Out) -> int:
    qf = quota_file(o)
    st = load_for_show(qf, out)
    if st.mounted:
        out.warn("Quota is running, so data reported from quota file may not reflect "
                 "current values\n")
    print_state(st, int(time.time()), o, out,
                active=st.mounted and st.ugid_on and st.ugid_limit > 0, live_figures=False)
    return EC_QUOTADIRTY if st.dirty else 0


def cmd_recalc(o: Opts, out: Out) -> int:
    qf = quota_file(o)
    load(qf)
    if live(o, "recalc") is not None:
        return 0
    with qf.lock():
        st = qf.load()
        rescan(st, o.path or st.path, out)
        qf.save(st)
    return 0


def cmd_import(o: Opts, out: Out) -> int:
    """Not in the original: an OpenVZ binary quota file (``/var/vzquota/quota.N``,
    versions 1-3) becomes this project's quota file of the id, figures intact."""
    from .ovzfile import read_ovz_file
    if len(o.rest) != 1:
        raise Usage(USAGES["import"])
    st = read_ovz_file(o.rest[0], o.qid)
    if o.path:
        st.path = o.path
    qf = quota_file(o, create=True)
    ping = live(o, "ping")
    if ping is not None and not ping.get("dropped"):
        raise VzError(EC_RUN, "Quota is running, stop it first")
    creatable(o, qf)
    with qf.lock():
        if qf.exists():
            out.warn("Quota file exists, it will be overwritten\n")
        st.dirty = st.dirty or ping is not None     # a dropped mount runs uncounted
        qf.save(st)
    out.info(f"quota file {o.rest[0]} imported for id {o.sid}\n")
    return 0


def cmd_list(args: list[str], out: Out, as_json: bool) -> int:
    """Not in the original: every quota id with a file or a live mount."""
    if args:
        raise Usage(USAGES["list"])
    quotas = [report.gather(qid, ugid=False) for qid in report.known_ids()]
    if as_json:
        sys.stdout.write(json.dumps({"schema": report.SCHEMA, "now": int(time.time()),
                                     "quotas": quotas}, indent=1) + "\n")
    else:
        sys.stdout.write(report.format_list(quotas, bool(out.batch)))
    return 0


def cmd_json(o: Opts, out: Out) -> int:
    """stat/show --json (not in the original): the same figures, checks and exit
    codes as the text."""
    qf = quota_file(o)
    if o.cmd == "stat":
        reply = live_stat(o, qf)
        st = live_state(reply)
        idle = bool(reply.get("between_mounts"))     # on, nothing mounted
        doc = report.quota(st, reply["now"], source="file" if idle else "mount",
                           live=not idle, active=reply["active"] and not idle,
                           ugid_active=reply["ugid_active"] and not idle,
                           file=qf.path, ugid=o.sqt)
        code = EC_UGID_NOTRUN if o.sqt and not reply["ugid_active"] else 0
    else:
        st = load_for_show(qf, out)
        ping = live(o, "ping")
        doc = report.quota(st, int(time.time()), source="file",
                           live=ping is not None and not ping.get("dropped"), active=False,
                           ugid_active=False, file=qf.path, ugid=o.sqt)
        code = EC_QUOTADIRTY if st.dirty else 0
    sys.stdout.write(json.dumps(doc, indent=1) + "\n")
    return code


HANDLERS = {"init": cmd_init, "on": cmd_on, "off": cmd_off, "drop": cmd_drop,
            "setlimit": cmd_setlimit, "setlimit2": cmd_setlimit2, "reload2": cmd_reload2,
            "stat": cmd_stat, "show": cmd_show, "recalc": cmd_recalc, "import": cmd_import,
            "list": cmd_list}


def run(argv: list[str]) -> int:
    out = Out()
    try:
        parsed = parse_global([PROG, *argv], USAGE, out)
        if isinstance(parsed, int):
            return parsed
        args, helped = parsed
        cmd = args[0]
        if cmd not in HANDLERS:
            raise Usage(f"Unknown command: '{cmd}'\n\n{USAGE}")
        if helped:
            raise Usage(USAGES[cmd])
        if os.geteuid() != 0:
            raise VzError(EC_SYSERR, "vzquota must be run as root (the host's root "
                          "owns the quota files and the live mounts)")
        rest = args[1:]
        as_json = cmd in JSON_COMMANDS and "--json" in rest
        if as_json:
            rest = [a for a in rest if a != "--json"]
        if cmd == "list":
            return cmd_list(rest, out, as_json)
        o = parse_command(cmd, rest)
        if as_json:
            return cmd_json(o, out)
        return HANDLERS[cmd](o, out)
    except Usage as u:
        sys.stderr.write(u.text)
        return EC_USAGE
    except VzError as e:
        out.error(e.message)
        return e.code
    except KeyboardInterrupt:
        return EC_SYSERR


def main(argv: list[str] | None = None) -> int:
    return quiet_on_closed_pipe(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
