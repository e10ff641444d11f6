"""``vzquota``: the command line, compatible with OpenVZ's vzquota 3.x.

Role: parse ``vzquota [-h -V -q -v -b] COMMAND QUOTA_ID [options]``, then act on
the live mount of that id (over the control channel) when there is one, or on
the quota file otherwise.  Every failure is a ``VzError``: printed as
``vzquota : (error) <message>`` on stderr, returned as its exit code (the table
in ``errors.py`` and in vzquota(8)).

Concurrency: one short-lived process.  Offline changes hold the quota file's
lock for the whole read-modify-write; a request to a live mount holds no lock
(the mount itself saves the file).
"""

from __future__ import annotations

import getopt
import json
import os
import sys
import time

from . import __version__, control, progress, report
from .engine import QuotaEngine
from .errors import (EC_NOPATH, EC_NOTRUN, EC_QUOTADIRTY, EC_RUN, EC_SYSERR,
                     EC_UGID_NOTRUN, EC_USAGE, VzError)
from .format import format_ugid, format_usage
from .model import QuotaState
from .qfile import QuotaFile, state_from_dict
from .scan import scan
from .service import apply_limits, apply_limits2
from .units import parse_blocks, parse_count, parse_time

USAGE = """\
Usage: vzquota [options] command quotaid [command-options]
Options:
  -h  help            -V  version
  -q  quiet           -v  verbose
  -b  batch output (stat, show)
Commands:
  init      quotaid -p path -b bsoft -B bhard -i isoft -I ihard -e btime -n itime
                    [-s 0|1] [-u ugid_limit] [-c file | -R]
  on        quotaid [-p path] [limits] [-s 0|1] [-u ugid_limit] [-f] [-c file | -R]
  off       quotaid [-f] [-c file | -R]
  drop      quotaid [-f] [-c file | -R]
  setlimit  quotaid [-p path] [limits] [-s 0|1] [-u ugid_limit] [-f] [-c file | -R]
  setlimit2 quotaid [-c file] -u|-g ugid bsoft bhard isoft ihard
  setlimit2 quotaid [-c file] [-u|-g] -t btime itime
  reload2   quotaid [-c file]
  stat      quotaid [-t] [-f] [-c file | -R]
  show      quotaid [-t] [-c file | -R]
  recalc    quotaid [-p path] [-c file | -R]
  list      [--json]     every known quota id (stat and show take --json too)
Limits: -b/-B block soft/hard limit in 1K blocks (K/M/G/T suffixes, 'unlimited'),
  -i/-I inode soft/hard limit, -e/-n block/inode grace: seconds,
  [[[dd:]hh:]mm:]ss, or N with a suffix h/d/w/m/y.
Exit status: 0 ok, 1 system error, 2 usage error, 3 live mount refused,
  4 quota file error, 5 quota already on, 6 quota not on, 7 quota file locked,
  8 scan crossed a mount point, 9 stat -t with 2nd level inactive,
  10 show of a dirty file, 11 no quota file, 13 no path known.
"""

LONG = {"block-softlimit=": "-b", "block-hardlimit=": "-B", "inode-softlimit=": "-i",
        "inode-hardlimit=": "-I", "block-exptime=": "-e", "inode-exptime=": "-n",
        "sub-quotas=": "-s", "ugid-limit=": "-u", "quota-file=": "-c", "force": "-f",
        "path=": "-p"}
COMMANDS = ("init", "on", "off", "drop", "setlimit", "setlimit2", "reload2", "stat",
            "show", "recalc", "list")


class Out:
    def __init__(self, quiet: bool = False, verbose: int = 0):
        self.quiet = quiet
        self.verbose = verbose

    def warn(self, msg: str) -> None:
        if not self.quiet:
            print(f"vzquota : (warning) {msg}", file=sys.stderr)

    def info(self, msg: str) -> None:
        if self.verbose:
            print(f"vzquota : (info) {msg}", file=sys.stderr)


def usage_error(msg: str) -> VzError:
    return VzError(EC_USAGE, f"{msg}; see vzquota -h")


def _num(value: str, parse, what: str) -> int:
    try:
        return parse(value)
    except ValueError as e:
        raise usage_error(f"bad {what} '{value}': {e}") from None


def parse_command(cmd: str, args: list[str]) -> dict:
    """Options of one command into a dict of limits and switches."""
    if not args or not args[0].isdigit() or int(args[0]) <= 0:
        raise usage_error(f"{cmd}: a positive numeric quota id is required")
    o: dict = {"qid": int(args[0]), "limits": {}}
    shortopts = "b:B:i:I:e:n:s:u:c:p:fRtg:"
    if cmd == "setlimit2":     # with -t, -u/-g only say which type's graces
        shortopts = "c:ugtf" if "-t" in args else "c:u:g:tf"
    try:
        opts, rest = getopt.gnu_getopt(args[1:], shortopts, list(LONG))
    except getopt.GetoptError as e:
        raise usage_error(f"{cmd}: {e.msg}") from None
    lim = o["limits"]
    for opt, val in opts:
        opt = LONG.get(opt[2:] + ("=" if opt[2:] + "=" in LONG else ""), opt) \
            if opt.startswith("--") else opt
        if cmd == "setlimit2" and opt in ("-u", "-g"):
            o["kind"] = "user" if opt == "-u" else "group"
            if val:
                o["ugid"] = val
        elif opt == "-b":
            lim["bsoft"] = _num(val, parse_blocks, "block soft limit")
        elif opt == "-B":
            lim["bhard"] = _num(val, parse_blocks, "block hard limit")
        elif opt == "-i":
            lim["isoft"] = _num(val, parse_count, "inode soft limit")
        elif opt == "-I":
            lim["ihard"] = _num(val, parse_count, "inode hard limit")
        elif opt == "-e":
            lim["bgrace"] = _num(val, parse_time, "block grace time")
        elif opt == "-n":
            lim["igrace"] = _num(val, parse_time, "inode grace time")
        elif opt == "-s":
            if val not in ("0", "1"):
                raise usage_error(f"-s takes 0 or 1, not '{val}'")
            lim["ugid_on"] = val == "1"
        elif opt == "-u":
            lim["ugid_limit"] = _num(val, parse_count, "ugid limit")
        elif opt == "-p":
            lim["path"] = os.path.abspath(val)
        elif opt == "-c":
            o["file"] = val
        elif opt == "-R":
            o["relative"] = True
        elif opt == "-f":
            o["force"] = True
        elif opt == "-t":
            o["t"] = True
        elif opt == "-g":
            raise usage_error(f"{cmd}: -g is for setlimit2 only")
    o["rest"] = rest
    if cmd != "setlimit2" and rest:
        raise usage_error(f"{cmd}: unexpected argument '{rest[0]}'")
    return o


def quota_file(o: dict) -> QuotaFile:
    if o.get("file"):
        return QuotaFile.for_id(o["qid"], o["file"])
    if o.get("relative"):
        path = o["limits"].get("path")
        if not path:
            raise VzError(EC_NOPATH, "-R needs the quota path (-p)")
        path = path.rstrip("/")
        return QuotaFile.for_id(o["qid"], os.path.join(os.path.dirname(path),
                                                       "quota." + os.path.basename(path)))
    return QuotaFile.for_id(o["qid"])


def do_scan(path: str, out: Out):
    out.info(f"scanning {path}")
    shown = progress.counter(f"vzquota: counting {path}", quiet=out.quiet)
    try:
        r = scan(path, per_id=True, progress=shown)
    except VzError:
        shown.close()
        raise
    except OSError as e:
        shown.close()
        raise VzError(EC_SYSERR, f"Can't scan quota path {path}: {e.strerror}") from None
    shown.close(r.inodes)
    return r


def rescan(st: QuotaState, path: str | None, out: Out) -> None:
    if not path:
        raise VzError(EC_NOPATH, f"Quota path for id {st.qid} is not known; give it with -p")
    if not os.path.isdir(path):
        raise VzError(EC_NOPATH, f"Quota path {path} for id {st.qid} is not a directory")
    r = do_scan(path, out)
    QuotaEngine(st).set_usage(r.space, r.inodes, r.users, r.groups)
    st.path = path
    st.dirty = False
    st.mounted = False


def update_file(o: dict, change) -> int:
    """Offline read-modify-write of the quota file under its lock."""
    qf = quota_file(o)
    with qf.lock():
        st = qf.load()
        change(st)
        qf.save(st)
    return 0


def live(o: dict, cmd: str, **args) -> dict | None:
    return control.request(o["qid"], cmd, **args)


# ---- commands -----------------------------------------------------------------

def cmd_init(o: dict, out: Out) -> int:
    lim = o["limits"]
    missing = [f for f, k in (("-b", "bsoft"), ("-B", "bhard"), ("-i", "isoft"),
                              ("-I", "ihard"), ("-e", "bgrace"), ("-n", "igrace"))
               if k not in lim]
    if "path" not in lim:
        missing.insert(0, "-p")
    if missing:
        raise usage_error("init: all of -p -b -B -i -I -e -n are required "
                          f"(missing {' '.join(missing)})")
    qf = quota_file(o)
    st = QuotaState(qid=o["qid"])
    apply_limits(st, lim)
    ping = live(o, "ping")
    if ping is not None and not ping.get("dropped"):
        raise VzError(EC_RUN, f"Quota is running for id {o['qid']}, stop it first")
    with qf.lock():
        if qf.exists():
            out.warn("Quota file exists, it will be overwritten")
        rescan(st, lim["path"], out)
        # A mount whose quota was dropped (drop -f) runs on uncounted: the
        # figure is not to be trusted until `on` recounts it there.
        st.dirty = ping is not None
        qf.save(st)
    return 0


def _live_any(o: dict) -> bool:
    """True when a mount carries the id (quota on or off inside it, not dropped)."""
    ping = live(o, "ping")
    return ping is not None and not ping.get("dropped")


def cmd_on(o: dict, out: Out) -> int:
    if live(o, "on", limits=o["limits"]) is not None:
        return 0

    def change(st: QuotaState) -> None:
        # No mount answered for the id: a file that still says "mounted" was
        # left by a mount that died (crash, kill -9, reboot), whatever "on" says.
        if st.on and not st.mounted and not o.get("force"):
            raise VzError(EC_RUN, f"Quota is already running for id {o['qid']}")
        apply_limits(st, o["limits"])
        if st.dirty or st.mounted or o.get("force"):
            if st.mounted:
                out.warn(f"Incorrect quota shutdown for id {o['qid']}, recalculating "
                         "disk usage")
            rescan(st, o["limits"].get("path") or st.path, out)
        QuotaEngine(st).refresh_timers()
        st.on = True
    return update_file(o, change)


def cmd_off(o: dict, out: Out) -> int:
    if live(o, "off") is not None:
        return 0

    def change(st: QuotaState) -> None:
        if not st.on:
            raise VzError(EC_NOTRUN, f"Quota is not running for id {o['qid']}")
        st.on = False
    return update_file(o, change)


def cmd_drop(o: dict, out: Out) -> int:
    qf = quota_file(o)
    if _live_any(o):
        if not o.get("force"):
            raise VzError(EC_RUN, f"Quota is running for id {o['qid']}, stop it first "
                          "(or use -f)")
        if live(o, "drop") is not None:
            return 0
    with qf.lock():
        qf.remove()
    return 0


def cmd_setlimit(o: dict, out: Out) -> int:
    if not o["limits"] and not o.get("force"):
        raise usage_error("setlimit: give at least one limit or flag")
    if live(o, "setlimit", limits=o["limits"], force=bool(o.get("force"))) is not None:
        return 0

    def change(st: QuotaState) -> None:
        apply_limits(st, o["limits"])
        if o.get("force"):
            st.dirty = True
        QuotaEngine(st).refresh_timers()
    return update_file(o, change)


def cmd_setlimit2(o: dict, out: Out) -> int:
    rest = o["rest"]
    req: dict = {"kind": o.get("kind", "user")}
    if o.get("t"):
        args = rest
        if len(args) != 2:
            raise usage_error("setlimit2 -t: two grace times are required (block inode)")
        req["bgrace"] = _num(args[0], parse_time, "block grace time")
        req["igrace"] = _num(args[1], parse_time, "inode grace time")
    else:
        if "ugid" not in o or len(rest) != 4:
            raise usage_error("setlimit2: -u|-g ugid bsoft bhard isoft ihard are required")
        if not o["ugid"].isdigit():
            raise usage_error(f"setlimit2: bad ugid '{o['ugid']}'")
        req["id"] = int(o["ugid"])
        req["bsoft"] = _num(rest[0], parse_blocks, "block soft limit")
        req["bhard"] = _num(rest[1], parse_blocks, "block hard limit")
        req["isoft"] = _num(rest[2], parse_count, "inode soft limit")
        req["ihard"] = _num(rest[3], parse_count, "inode hard limit")
    if live(o, "setlimit2", **req) is not None:
        return 0

    def change(st: QuotaState) -> None:
        apply_limits2(st, req)
        QuotaEngine(st).refresh_timers()
    return update_file(o, change)


def cmd_reload2(o: dict, out: Out) -> int:
    if live(o, "reload2") is None:
        raise VzError(EC_NOTRUN, f"Quota is not running for id {o['qid']}")
    return 0


def print_state(st: QuotaState, now: int, o: dict, batch: bool, *, active: bool,
                live_figures: bool) -> None:
    sys.stdout.write(format_usage(st, now, batch))
    if o.get("t"):
        sys.stdout.write(format_ugid(st, now, active=active, live=live_figures, batch=batch))


def cmd_stat(o: dict, out: Out, batch: bool) -> int:
    reply = live(o, "stat", save=not o.get("force"))
    if reply is None:
        raise VzError(EC_NOTRUN, "Quota accounting is off, try vzquota show id")
    st = state_from_dict(reply["state"])
    print_state(st, reply["now"], o, batch, active=reply["ugid_active"], live_figures=True)
    if o.get("t") and not reply["ugid_active"]:
        return EC_UGID_NOTRUN
    return 0


def cmd_show(o: dict, out: Out, batch: bool) -> int:
    st = quota_file(o).load()
    print_state(st, int(time.time()), o, batch,
                active=st.mounted and st.ugid_on and st.ugid_limit > 0, live_figures=False)
    if st.dirty:
        return EC_QUOTADIRTY
    return 0


def cmd_recalc(o: dict, out: Out) -> int:
    if live(o, "recalc") is not None:
        return 0
    return update_file(o, lambda st: rescan(st, o["limits"].get("path") or st.path, out))


def cmd_list(rest: list[str], batch: bool, as_json: bool) -> int:
    if rest:
        raise usage_error(f"list: unexpected argument '{rest[0]}'")
    quotas = [report.gather(qid, ugid=False) for qid in report.known_ids()]
    if as_json:
        sys.stdout.write(json.dumps({"schema": report.SCHEMA, "now": int(time.time()),
                                     "quotas": quotas}, indent=1) + "\n")
    else:
        sys.stdout.write(report.format_list(quotas, batch))
    return 0


def cmd_json(cmd: str, o: dict) -> int:
    """stat/show --json: the same figures and exit codes as the text."""
    qf = quota_file(o)
    if cmd == "stat":
        reply = live(o, "stat", save=not o.get("force"))
        if reply is None:
            raise VzError(EC_NOTRUN, "Quota accounting is off, try vzquota show id")
        st = state_from_dict(reply["state"])
        doc = report.quota(st, reply["now"], source="mount", live=True,
                           active=reply["active"], ugid_active=reply["ugid_active"],
                           file=qf.path, ugid=bool(o.get("t")))
        code = EC_UGID_NOTRUN if o.get("t") and not reply["ugid_active"] else 0
    else:
        st = qf.load()
        doc = report.quota(st, int(time.time()), source="file",
                           live=_live_any(o), active=False, ugid_active=False,
                           file=qf.path, ugid=bool(o.get("t")))
        code = EC_QUOTADIRTY if st.dirty else 0
    sys.stdout.write(json.dumps(doc, indent=1) + "\n")
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Out()
    batch = False
    try:
        i = 0
        while i < len(argv) and argv[i].startswith("-"):
            for ch in argv[i][1:]:
                if ch == "h":
                    sys.stdout.write(USAGE)
                    return 0
                if ch == "V":
                    print(f"vzquota version {__version__} (simfs)")
                    return 0
                if ch == "q":
                    out.quiet = True
                elif ch == "v":
                    out.verbose += 1
                elif ch == "b":
                    batch = True
                else:
                    raise usage_error(f"unknown option -{ch}")
            i += 1
        if i >= len(argv):
            sys.stderr.write(USAGE)
            return EC_USAGE
        cmd = argv[i]
        if cmd not in COMMANDS:
            raise usage_error(f"unknown command '{cmd}'")
        if os.geteuid() != 0:
            raise VzError(EC_SYSERR, "vzquota must be run as root (the host's root "
                          "owns the quota files and the live mounts)")
        rest = argv[i + 1:]
        as_json = "--json" in rest
        if as_json:
            if cmd not in ("list", "stat", "show"):
                raise usage_error(f"{cmd}: --json is for list, stat and show")
            rest = [a for a in rest if a != "--json"]
        if cmd == "list":
            return cmd_list(rest, batch, as_json)
        o = parse_command(cmd, rest)
        if as_json:
            return cmd_json(cmd, o)
        if cmd == "stat":
            return cmd_stat(o, out, batch)
        if cmd == "show":
            return cmd_show(o, out, batch)
        return globals()[f"cmd_{cmd}"](o, out)
    except VzError as e:
        print(f"vzquota : (error) {e.message}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return EC_SYSERR


if __name__ == "__main__":
    sys.exit(main())
