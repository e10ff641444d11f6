"""``vzdqcheck``, ``vzdqdump``, ``vzdqload``: the other tools of the original
vzquota package, with its options, text format, messages and exit codes.

Role:

* ``vzdqcheck PATH`` counts the disk usage under PATH (1K blocks, inodes) the
  way the quota does and prints it;
* ``vzdqdump ID [-c FILE] [-f] -F|-G|-U|-T`` prints the 2nd-level quota of an
  id (its status, grace times, per-uid/gid limits and grace deadlines) and with
  ``-F`` the 1st level (usage, limits, deadline, grace) in the original's text
  (vzquota 3.x), from the quota file or (``-f``) from the live mount;
* ``vzdqload ID [-c FILE] -F|-G|-U|-T`` reads that text from stdin into the
  quota file, so that migration scripts written for OpenVZ (vzctl 4.x's
  vzmigrate: ``-U -G -T -F``) run unchanged.

The text format, the parsing rules (``sscanf`` of each non-comment line, extra
words ignored) and every message are the original's (src/vzdqcheck.c,
src/vzdqdump.c, src/vzdqload.c, include/quotadump.h, src/common.c).  Deliberate
differences: vzdqload refuses an object type of 2 (the original's check lets
it through into memory it does not own), and a number outside its field's
range (a negative one, an id of 2**40, a 5,000-digit one) is refused with a
usage error naming it, where the original's sscanf silently wrapped it.

Concurrency: short-lived processes; vzdqload holds the quota file's lock for
its read-modify-write.
"""

from __future__ import annotations

import os
import re
import sys

from .cmdline import (Out, Usage, globolize_path, kernel_stat, parse_global, parse_qid,
                      quiet_on_closed_pipe, scan_path)
from .errors import EC_USAGE, VzError
from .gnugetopt import NO_ARG, REQUIRED, GetoptError, GetoptLong
from .model import GROUP, USER, QuotaObject, QuotaState
from .qfile import QuotaFile, state_from_dict
from .units import kib

FIRST_LEVEL_LABEL = "first_level_quota:"
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
# src/vzdqdump.c, src/vzdqload.c of vzquota 3.x (3.1 fixed the "qouta" typo
# and added -F, the 1st level, which vzctl 4.x's vzmigrate passes).
DUMP_USAGE = """\
Usage: vzdqdump quotaid [-c file] [-f] commands
Dumps user/group quota information from quota file.
\t-c file\tuse given quota file
\t-f\tdump data from kernel rather than quota file
Commands specify what user/group information to dump:
\t-F\tfirst level quota
\t-G\tgrace time
\t-U\tdisk limits
\t-T\texpiration times
"""
LOAD_USAGE = """\
Usage: vzdqload quotaid [-c file] commands
Loads user/group quota information from stdin into quota file.
\t-c file\tuse given quota file
Commands specify what user/group information to load:
\t-F\tfirst level quota
\t-G\tgrace time
\t-U\tdisk limits
\t-T\texpiration times
"""
_DUMP_LONG = {"quota-file": (REQUIRED, "c"), "first": (NO_ARG, "F"),
              "gracetime": (NO_ARG, "G"), "limits": (NO_ARG, "U"),
              "exptimes": (NO_ARG, "T")}


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
    parsed = _dump_options(argv, usage, out, "c:fFGUT", {**_DUMP_LONG,
                                                         "kernel": (NO_ARG, "f")})
    if isinstance(parsed, int):
        return parsed
    qid, qfile, force, what = parsed
    if not force:
        st = QuotaFile.for_id(qid, qfile).load()
        status = 1 if st.ugid_on else 0
    else:
        # the kernel's figures: the live mount's, or the file's between mounts
        reply = kernel_stat(qid, QuotaFile.for_id(qid, qfile), save=False,
                            read_file=False, off_message="Quota accounting is off")
        st = state_from_dict(reply["state"])
        status = 1 if reply.get("ugid_active") else 0
    w = sys.stdout.write
    w(f"{STATUS_LABEL}\t{status}\n")
    if status:
        _dump_level2(st, what, w)
    if "F" in what:
        # the 1st level: usage soft hard deadline grace, in bytes (as the
        # original's kernel units) and inodes
        s, i = st.level1.space, st.level1.inodes
        w(f"{FIRST_LEVEL_LABEL}\n")
        w(f"{s.usage} {s.soft} {s.hard} {s.deadline} {st.grace1.space}\n")
        w(f"{i.usage} {i.soft} {i.hard} {i.deadline} {st.grace1.inodes}\n")
    return 0


def _dump_level2(st: QuotaState, what: set, w) -> None:
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


def main_dump(argv: list[str] | None = None) -> int:
    return quiet_on_closed_pipe(_run, _dump, "vzdqdump", DUMP_USAGE, argv)


# ---- vzdqload -------------------------------------------------------------------
#
# Each line is read as the original's sscanf reads it, but no number is wrapped:
# the original's %u/%lu turn -1 into 4294967295 and 2**40 into 0 (root's limits
# replaced), so here a number outside its field's range is refused (exit 2) with
# what it is, its range, and then the original's "Invalid input data" line.

_TOKEN = re.compile(r"[ \t\n\v\f\r]*([^ \t\n\v\f\r]+)")
_NUMBER = re.compile(r"[ \t\n\v\f\r]*([+-]?)([0-9]+)")
_DIGITS_MAX = 40                 # longer than any range below: not converted


class Num(int):
    """A number as the input spelled it (``text``), for messages."""

    text: str

    @classmethod
    def of(cls, sign: str, digits: str) -> "Num":
        if len(digits.lstrip("0")) > _DIGITS_MAX:
            n = cls(-1 if sign == "-" else 10**_DIGITS_MAX)     # out of every range
            n.text = f"{sign}{digits[:20]}...({len(digits)} digits)"
        else:
            n = cls(-int(digits) if sign == "-" else int(digits))
            n.text = f"{sign}{digits}"
        return n


def scan_line(line: str, fmt: str) -> tuple[int, list]:
    """``sscanf(line, fmt)`` for formats made of ``%s``, ``%u``, ``%lu`` and
    ``%llu``: returns (the number of conversions, or -1 when the input ends
    before the first; the values, numbers exact and signed as written)."""
    pos, values = 0, []
    for conv in re.findall(r"%(s|u|lu|llu)", fmt):
        if not line[pos:].strip(" \t\n\v\f\r"):
            return (len(values) if values else -1), values
        if conv == "s":
            m = _TOKEN.match(line, pos)
            values.append(m.group(1))
        else:
            m = _NUMBER.match(line, pos)
            if m is None:
                break
            values.append(Num.of(m.group(1), m.group(2)))
        pos = m.end()
    return len(values), values


U32_MAX = 2**32 - 1
UGID_MAX = 2**32 - 2             # 2**32 - 1 is "no id" (-1)
TIME_MAX = 2**63 - 1             # time_t
BLOCKS_MAX = 2**54 - 1           # 1K blocks: the largest block limit (bytes fit 64 bits)
BYTES_MAX = BLOCKS_MAX * 1024


class _Input:
    """read_line() of src/vzdqload.c over stdin."""

    def __init__(self, f, out: Out):
        self.f, self.out, self.line = f, out, ""

    def read(self, argnum: int, fmt: str) -> list | None:
        self.line = ""                      # read_line() clears its buffer first
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

    def bad_first(self) -> Usage:
        # the -F part of vzdqload.c: fprintf(stderr, "Invalid input data: %s\n")
        return Usage(f"Invalid input data: {self.line}\n")

    def check(self, values: list, fields: list[tuple[str, int, int]],
              first: bool = False) -> None:
        """Refuse (exit 2) a number outside its field's range, naming it, then
        the original's "Invalid input data" line (``first``: the -F part's)."""
        for v, (what, lo, hi) in zip(values, fields):
            if not lo <= v <= hi:
                self.out.error(f"{what} {v.text} is out of range ({lo} to {hi}): "
                               "refused, nothing was loaded")
                raise self.bad_first() if first else self.bad()


_LIMITS = [("block soft limit", 0, BLOCKS_MAX), ("block hard limit", 0, BLOCKS_MAX),
           ("inode soft limit", 0, U32_MAX), ("inode hard limit", 0, U32_MAX)]
_TIMES = [("block grace deadline", 0, TIME_MAX), ("inode grace deadline", 0, TIME_MAX)]


def _load(argv: list[str], usage: str, out: Out) -> int:
    parsed = _dump_options(argv, usage, out, "c:FGUT", _DUMP_LONG)
    if isinstance(parsed, int):
        return parsed
    qid, qfile, _force, what = parsed
    qf = QuotaFile.for_id(qid, qfile)
    qf.load()                                      # 11 / 4 before reading stdin
    inp = _Input(sys.stdin, out)
    with qf.lock():
        st = qf.load()
        v = inp.read(2, "%s%u")
        if v is None or v[0] != STATUS_LABEL or not 0 <= v[1] <= 1:
            raise inp.bad()
        status = v[1]
        if status:
            _load_level2(st, what, inp)
        if "F" in what:
            _load_level1(st, inp)
        if status or "F" in what:
            # Not in the original, whose kernel counted the private area while
            # the quota was on, mounted or not: here what was copied in from the
            # host (vzmigrate's rsync into the new node's private area, before
            # this load) was counted by no mount, so the next start recounts.
            st.dirty = True
            qf.save(st)
    return 0


def _load_level2(st: QuotaState, what: set, inp: _Input) -> None:
    if "G" in what:
        for i, kind in enumerate((USER, GROUP)):
            v = inp.read(4, "%s%u%lu%lu")
            if v is None or v[0] != GRACE_LABEL or v[1] != i:
                raise inp.bad()
            inp.check(v[2:], [("block grace time", 0, TIME_MAX),
                              ("inode grace time", 0, TIME_MAX)])
            g = st.grace2(kind)
            g.space, g.inodes = int(v[2]), int(v[3])
    number = 0
    if "U" in what or "T" in what:
        v = inp.read(2, "%s%u")
        if v is None or v[0] != NUMBER_LABEL:
            raise inp.bad()
        inp.check(v[1:], [("ugid_number", 0, U32_MAX)])
        number = v[1]
    for _ in range(number):
        if "T" not in what:
            v, fields = inp.read(7, "%s%u%u%u%u%u%u"), _LIMITS
        elif "U" not in what:
            v, fields = inp.read(5, "%s%u%u%lu%lu"), _TIMES
        else:
            v, fields = inp.read(9, "%s%u%u%u%u%u%u%lu%lu"), _LIMITS + _TIMES
        if v is None or v[0] != UGID_LABEL or v[2] not in (0, 1):
            raise inp.bad()
        inp.check(v[1:], [("ugid id", 0, UGID_MAX), ("ugid type", 0, 1), *fields])
        table = st.users if v[2] == 0 else st.groups
        obj = table.setdefault(int(v[1]), QuotaObject())
        rest = [int(x) for x in v[3:]]
        if "U" in what:
            obj.space.soft, obj.space.hard = rest[0] * 1024, rest[1] * 1024
            obj.inodes.soft, obj.inodes.hard = rest[2], rest[3]
            rest = rest[4:]
        if "T" in what:
            obj.space.deadline, obj.inodes.deadline = rest[0], rest[1]


def _load_level1(st: QuotaState, inp: _Input) -> None:
    """The -F part of vzdqload.c: the label, then usage soft hard deadline
    grace for space (bytes) and for inodes."""
    v = inp.read(1, "%s")
    if v is None or not v[0].startswith(FIRST_LEVEL_LABEL):
        raise inp.bad_first()
    space = inp.read(5, "%llu%llu%llu%lu%lu")
    if space is None:
        raise inp.bad_first()
    inp.check(space, [("block usage", 0, BYTES_MAX), ("block soft limit", 0, BYTES_MAX),
                      ("block hard limit", 0, BYTES_MAX),
                      ("block grace deadline", 0, TIME_MAX),
                      ("block grace time", 0, TIME_MAX)], first=True)
    inodes = inp.read(5, "%u%u%u%lu%lu")
    if inodes is None:
        raise inp.bad_first()
    inp.check(inodes, [("inode usage", 0, U32_MAX), ("inode soft limit", 0, U32_MAX),
                       ("inode hard limit", 0, U32_MAX),
                       ("inode grace deadline", 0, TIME_MAX),
                       ("inode grace time", 0, TIME_MAX)], first=True)
    for c, vals in ((st.level1.space, space), (st.level1.inodes, inodes)):
        c.usage, c.soft, c.hard, c.deadline = (int(x) for x in vals[:4])
    st.grace1.space, st.grace1.inodes = int(space[4]), int(inodes[4])


def main_load(argv: list[str] | None = None) -> int:
    return quiet_on_closed_pipe(_run, _load, "vzdqload", LOAD_USAGE, argv)
