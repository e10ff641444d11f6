"""``vzdqcheck``, ``vzdqdump``, ``vzdqload``: the other tools of the original
vzquota package, with its options, text format, messages and exit codes.

Role:

* ``vzdqcheck PATH`` counts the disk usage under PATH (1K blocks, inodes) the
  way the quota does and prints it;
* ``vzdqdump ID [-c FILE] [-f] -G|-U|-T`` prints the 2nd-level quota of an id
  (its status, grace times, per-uid/gid limits and grace deadlines) in the
  original's tab-separated text, from the quota file or (``-f``) from the live
  mount;
* ``vzdqload ID [-c FILE] -G|-U|-T`` reads that text from stdin into the quota
  file, so that migration scripts written for OpenVZ run unchanged.

The text format, the parsing rules (``sscanf`` of each non-comment line, extra
words ignored) and every message are the original's (src/vzdqcheck.c,
src/vzdqdump.c, src/vzdqload.c, include/quotadump.h, src/common.c).  One
deliberate difference: vzdqload refuses an object type of 2 (the original's
check lets it through into memory it does not own).

Concurrency: short-lived processes; vzdqload holds the quota file's lock for
its read-modify-write.
"""

from __future__ import annotations

import os
import re
import sys

from . import control
from .cli import (Out, Usage, globolize_path, parse_global, parse_qid,
                  quiet_on_closed_pipe, scan_path)
from .errors import EC_NOTRUN, EC_USAGE, VzError
from .gnugetopt import NO_ARG, REQUIRED, GetoptError, GetoptLong
from .model import GROUP, USER, QuotaObject, QuotaState
from .qfile import QuotaFile, state_from_dict
from .units import kib

STATUS_LABEL = "ugid_quota_status:"
GRACE_LABEL = "grace_time:"
NUMBER_LABEL = "ugid_number:"
UGID_LABEL = "ugid:"

CHECK_USAGE = """\
Usage: vzdqcheck [options] path
\t-h\thelp
\t-V\tversion info
\tpath\tscan path
"""
DUMP_USAGE = """\
Usage: vzdqdump quotaid [-c file] [-f] commands
Dumps user/group qouta information from quota file.
\t-c file\tuse given quota file
\t-f\tdump data from kernel rather than quota file
Commands specify what user/group information to dump:
\t-G\tgrace time
\t-U\tdisk limits
\t-T\texpiration times
"""
LOAD_USAGE = """\
Usage: vzdqload quotaid [-c file] commands
Loads user/group qouta information from stdin into quota file.
\t-c file\tuse given quota file
Commands specify what user/group information to load:
\t-G\tgrace time
\t-U\tdisk limits
\t-T\texpiration times
"""
_DUMP_LONG = {"quota-file": (REQUIRED, "c"), "gracetime": (NO_ARG, "G"),
              "limits": (NO_ARG, "U"), "exptimes": (NO_ARG, "T")}


def _prog(argv0: str, name: str) -> str:
    return os.path.basename(argv0) or name


def _run(fn, name: str, usage: str, argv: list[str] | None) -> int:
    argv = sys.argv if argv is None else [name, *argv]
    out = Out()
    try:
        return fn([_prog(argv[0], name), *argv[1:]], usage, out)
    except Usage as u:
        sys.stderr.write(u.text)
        return EC_USAGE
    except VzError as e:
        out.error(e.message)
        return e.code
    except KeyboardInterrupt:
        return 1


# ---- vzdqcheck ----------------------------------------------------------------

def _check(argv: list[str], usage: str, out: Out) -> int:
    parsed = parse_global(argv, usage, out)
    if isinstance(parsed, int):
        return parsed
    path = globolize_path(parsed[0][0])       # -h does not stop it, as in the original
    r = scan_path(path, out, ugids=False)
    sys.stdout.write(f"quota usage for {path}\n")
    sys.stdout.write("%11s%11s\n" % ("blocks", "inodes"))
    sys.stdout.write("%11u%11u\n" % (kib(r.space), r.inodes))
    return 0


def main_check(argv: list[str] | None = None) -> int:
    return quiet_on_closed_pipe(_run, _check, "vzdqcheck", CHECK_USAGE, argv)


# ---- vzdqdump / vzdqload: options ---------------------------------------------

def _dump_options(argv: list[str], usage: str, out: Out, shortopts: str,
                  longopts: dict) -> tuple[int, str | None, bool, set] | int:
    """parse_global_options() then parse_options() as vzdqdump.c/vzdqload.c call
    them: the quota id first, then -c FILE, -f and the commands -G -U -T."""
    parsed = parse_global(argv, usage, out)
    if isinstance(parsed, int):
        return parsed
    args, helped = parsed
    if helped:
        raise Usage(usage)
    try:
        qid = parse_qid(args[0])
    except ValueError:
        raise Usage(usage) from None
    qfile, force, what = None, False, set()
    try:
        for key, val in GetoptLong(args, shortopts, longopts):
            if key == "c":
                qfile = val
            elif key == "f":
                force = True
            else:
                what.add(key)
    except GetoptError as e:
        raise Usage(e.text + usage) from None
    if not what:
        raise Usage(usage)
    return qid, qfile, force, what


def _objects(st: QuotaState) -> list[tuple[int, int, QuotaObject]]:
    """sort_dquot(): by id; a user before a group of the same id."""
    rows = [(i, 0, o) for i, o in st.users.items()] + [(i, 1, o) for i, o in st.groups.items()]
    rows.sort(key=lambda r: (r[0], r[1]))
    return rows


# ---- vzdqdump -------------------------------------------------------------------

def _dump(argv: list[str], usage: str, out: Out) -> int:
    parsed = _dump_options(argv, usage, out, "c:fGUT", {**_DUMP_LONG,
                                                        "kernel": (NO_ARG, "f")})
    if isinstance(parsed, int):
        return parsed
    qid, qfile, force, what = parsed
    if not force:
        st = QuotaFile.for_id(qid, qfile).load()
        status = 1 if st.ugid_on else 0
    else:
        try:
            reply = control.request(qid, "stat", save=False)
        except VzError as e:
            if e.code != EC_NOTRUN:
                raise
            reply = None
        if reply is None or not reply.get("active", True):
            raise VzError(EC_NOTRUN, "Quota accounting is off")
        st = state_from_dict(reply["state"])
        status = 1 if reply.get("ugid_active") else 0
    w = sys.stdout.write
    w(f"{STATUS_LABEL}\t{status}\n")
    if not status:
        return 0
    if "G" in what:
        w(f"#{GRACE_LABEL}\ttype\tblock\tinode\n")
        for i, kind in enumerate((USER, GROUP)):
            g = st.grace2(kind)
            w(f"{GRACE_LABEL}\t{i}\t{g.space}\t{g.inodes}\n")
    if "U" in what or "T" in what:
        objs = _objects(st)
        w(f"{NUMBER_LABEL}\t{len(objs)}\n")
        if objs:
            w(f"#{UGID_LABEL}\tID\ttype" + ("\tbsoft\tbhard\tisoft\tihard" if "U" in what
                                          else "") + ("\tbtime\titime" if "T" in what
                                                      else "") + "\n")
            for ugid, kind, o in objs:
                line = f"{UGID_LABEL}\t{ugid}\t{kind}"
                if "U" in what:
                    line += (f"\t{kib(o.space.soft)}\t{kib(o.space.hard)}"
                             f"\t{o.inodes.soft}\t{o.inodes.hard}")
                if "T" in what:
                    bt = 0 if o.space.usage < o.space.soft else o.space.deadline
                    it = 0 if o.inodes.usage < o.inodes.soft else o.inodes.deadline
                    line += f"\t{bt}\t{it}"
                w(line + "\n")
    return 0


def main_dump(argv: list[str] | None = None) -> int:
    return quiet_on_closed_pipe(_run, _dump, "vzdqdump", DUMP_USAGE, argv)


# ---- vzdqload -------------------------------------------------------------------

_TOKEN = re.compile(r"[ \t\n\v\f\r]*([^ \t\n\v\f\r]+)")
_UNSIGNED = re.compile(r"[ \t\n\v\f\r]*([+-]?)([0-9]+)")


def scan_line(line: str, fmt: str) -> tuple[int, list]:
    """``sscanf(line, fmt)`` for formats made of ``%s``, ``%u`` and ``%lu``:
    returns (the number of conversions, or -1 when the input ends before the
    first; the values)."""
    pos, values = 0, []
    for conv in re.findall(r"%(s|u|lu)", fmt):
        if not line[pos:].strip(" \t\n\v\f\r"):
            return (len(values) if values else -1), values
        if conv == "s":
            m = _TOKEN.match(line, pos)
            values.append(m.group(1))
        else:
            m = _UNSIGNED.match(line, pos)
            if m is None:
                break
            n = min(int(m.group(2)), 2**64 - 1)      # strtoul clamps
            if m.group(1) == "-":
                n = (-n) % 2**64
            values.append(n % 2**32 if conv == "u" else n)
        pos = m.end()
    return len(values), values


class _Input:
    """read_line() of src/vzdqload.c over stdin."""

    def __init__(self, f, out: Out):
        self.f, self.out, self.line = f, out, ""

    def read(self, argnum: int, fmt: str) -> list | None:
        self.line = ""
        while True:
            line = self.f.readline()
            if not line:
                self.out.error("End of input file")
                return None
            self.line = line
            if not line.startswith("#"):
                break
        n, values = scan_line(self.line, fmt)
        return values if n == argnum else None

    def bad(self) -> VzError:
        return VzError(EC_USAGE, f"Invalid input data: {self.line}")


def _load(argv: list[str], usage: str, out: Out) -> int:
    parsed = _dump_options(argv, usage, out, "c:GUT", _DUMP_LONG)
    if isinstance(parsed, int):
        return parsed
    qid, qfile, _force, what = parsed
    qf = QuotaFile.for_id(qid, qfile)
    qf.load()                                      # 11 / 4 before reading stdin
    inp = _Input(sys.stdin, out)
    with qf.lock():
        st = qf.load()
        v = inp.read(2, "%s%u")
        if v is None or v[0] != STATUS_LABEL or v[1] > 1:
            raise inp.bad()
        if not v[1]:
            return 0                                # 2nd level off: nothing is written
        if "G" in what:
            for i, kind in enumerate((USER, GROUP)):
                v = inp.read(4, "%s%u%lu%lu")
                if v is None or v[0] != GRACE_LABEL or v[1] != i:
                    raise inp.bad()
                g = st.grace2(kind)
                g.space, g.inodes = v[2] % 2**63, v[3] % 2**63
        number = 0
        if "U" in what or "T" in what:
            v = inp.read(2, "%s%u")
            if v is None or v[0] != NUMBER_LABEL:
                raise inp.bad()
            number = v[1]
        for _ in range(number):
            if "T" not in what:
                v = inp.read(7, "%s%u%u%u%u%u%u")
            elif "U" not in what:
                v = inp.read(5, "%s%u%u%lu%lu")
            else:
                v = inp.read(9, "%s%u%u%u%u%u%u%lu%lu")
            if v is None or v[0] != UGID_LABEL or v[2] >= 2:
                raise inp.bad()
            table = st.users if v[2] == 0 else st.groups
            obj = table.setdefault(v[1], QuotaObject())
            rest = v[3:]
            if "U" in what:
                obj.space.soft, obj.space.hard = rest[0] * 1024, rest[1] * 1024
                obj.inodes.soft, obj.inodes.hard = rest[2], rest[3]
                rest = rest[4:]
            if "T" in what:
                obj.space.deadline, obj.inodes.deadline = rest[0] % 2**63, rest[1] % 2**63
        qf.save(st)
    return 0


def main_load(argv: list[str] | None = None) -> int:
    return quiet_on_closed_pipe(_run, _load, "vzdqload", LOAD_USAGE, argv)
