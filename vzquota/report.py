"""Machine-readable figures: ``--json`` of ``stat``/``show``/``list``, the text
of ``list``, and the per-quota records the metrics exporter reads.

Role: turn a ``QuotaState`` (plus where its figures came from) into plain
dicts with a versioned schema (``SCHEMA``; documented in vzquota(8), JSON
OUTPUT).  Every figure ``stat -t`` prints is there, in the same units (1 KiB
blocks rounded up, inodes, epoch seconds), plus the exact bytes.  A new field
may be added within a schema version; renaming or removing one, or changing a
unit, bumps it.

``gather`` and ``known_ids`` are the only ones that do I/O: they read quota
files and ask live mounts (``ping``) for their figures.

Concurrency: the formatters are pure functions of their arguments (``now`` is
passed in); ``gather`` is a short blocking read, safe from any one thread.
"""

from __future__ import annotations

import os
import re
import time

from . import control
from .errors import VzError
from .model import GROUP, USER, Counter, QuotaObject, QuotaState
from .qfile import QuotaFile, quota_dir, state_from_dict
from .units import kib

SCHEMA = 1


def counter(c: Counter, grace: int, blocks: bool, level: int) -> dict:
    """One resource: usage and limits (KiB for blocks), the grace deadline as
    ``stat`` shows it (0: none) and the grace period."""
    unit = kib if blocks else int
    shown = c.deadline if (c.usage > c.soft if level == 1 else c.usage >= c.soft) else 0
    out = {"usage": unit(c.usage), "softlimit": unit(c.soft), "hardlimit": unit(c.hard),
           "grace_deadline": shown, "grace_period": grace,
           "over_softlimit": bool(c.soft and c.usage > c.soft),
           "over_hardlimit": bool(c.hard and c.usage > c.hard)}
    if blocks:
        out["usage_bytes"] = c.usage
    return out


def level1(st: QuotaState) -> dict:
    return {"blocks": counter(st.level1.space, st.grace1.space, True, 1),
            "inodes": counter(st.level1.inodes, st.grace1.inodes, False, 1)}


def objects(st: QuotaState) -> list[tuple[str, int, QuotaObject]]:
    rows = [(USER, i, o) for i, o in st.users.items()]
    rows += [(GROUP, i, o) for i, o in st.groups.items()]
    rows.sort(key=lambda r: (r[1], r[0] != USER))
    return rows


def level2(st: QuotaState, *, active: bool) -> dict:
    out = {"on": st.ugid_on, "active": active, "limit": st.ugid_limit,
           "exceeded": st.ugid_exceeded, "total": len(st.users) + len(st.groups),
           "grace_period": {k: {"blocks": st.grace2(k).space, "inodes": st.grace2(k).inodes}
                            for k in (USER, GROUP)},
           "objects": []}
    for kind, ident, obj in objects(st):
        g = st.grace2(kind)
        out["objects"].append({"type": kind, "id": ident,
                               "blocks": counter(obj.space, g.space, True, 2),
                               "inodes": counter(obj.inodes, g.inodes, False, 2)})
    return out


def quota(st: QuotaState, now: int, *, source: str, live: bool, active: bool,
          ugid_active: bool, file: str | None, ugid: bool) -> dict:
    """One quota id.  ``source``: "mount" (live figures) or "file"; ``live``:
    a mount carries the id now; ``active``: it accounts the quota."""
    out = {"schema": SCHEMA, "quotaid": st.qid, "now": now, "source": source,
           "path": st.path, "file": file,
           "state": {"on": st.on, "mounted": live, "accounting": active,
                     "dirty": st.dirty,
                     "unclean": st.mounted and not live},
           "level1": level1(st)}
    if ugid:
        out["level2"] = level2(st, active=ugid_active)
    return out


def broken(qid: int, file: str | None, message: str) -> dict:
    """A quota whose figures cannot be had: ``{quotaid, file, error}`` as
    vzquota(8) documents it (nothing else is known of it)."""
    return {"quotaid": qid, "file": file, "error": message}


LIST_HEAD = "%10s %-5s %-7s %12s %12s %12s %10s %10s %10s  %s\n"
LIST_ROW = "%10d %-5s %-7s %12d%c%12d %12d %10d%c%10d %10d  %s\n"


def _mounted_word(q: dict) -> str:
    if "error" in q:
        return "no"         # no mount answered (gather asks the mount first)
    if q["state"].get("mounted"):
        return "yes"
    return "dead" if q["state"].get("unclean") else "no"


def format_list(quotas: list[dict], batch: bool = False) -> str:
    """``vzquota list``: one line per quota id (sorted by id).  With ``-b``:
    no header; id state mounted usage soft hard iusage isoft ihard path."""
    out = [] if batch else [LIST_HEAD % ("quotaid", "state", "mounted", "1k-blocks",
                                         "softlimit", "hardlimit", "inodes", "softlimit",
                                         "hardlimit", "path")]
    for q in sorted(quotas, key=lambda q: q["quotaid"]):
        if "error" in q:
            out.append("%10d %-5s %-7s  %s\n" % (q["quotaid"], "error", _mounted_word(q),
                                                q["error"]))
            continue
        b, i = q["level1"]["blocks"], q["level1"]["inodes"]
        state = "on" if q["state"]["on"] else "off"
        if batch:
            out.append("%d %s %s %d %d %d %d %d %d %s\n" % (
                q["quotaid"], state, _mounted_word(q), b["usage"], b["softlimit"],
                b["hardlimit"], i["usage"], i["softlimit"], i["hardlimit"], q["path"] or "-"))
            continue
        out.append(LIST_ROW % (
            q["quotaid"], state, _mounted_word(q),
            b["usage"], "*" if b["over_softlimit"] or b["over_hardlimit"] else " ",
            b["softlimit"], b["hardlimit"],
            i["usage"], "*" if i["over_softlimit"] or i["over_hardlimit"] else " ",
            i["softlimit"], i["hardlimit"], q["path"] or "-"))
    return "".join(out)


def known_ids() -> list[int]:
    """Every quota id with a quota file in the quota directory or a live
    mount's control socket in the run directory."""
    ids: set[int] = set()
    for d, pattern in ((quota_dir(), r"quota\.([0-9]+)"),
                       (control.run_dir(), r"([0-9]+)\.sock")):
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for name in names:
            m = re.fullmatch(pattern, name)
            if m and int(m.group(1)) > 0:
                ids.add(int(m.group(1)))
    return sorted(ids)


def gather(qid: int, file: str | None = None, *, ugid: bool = True) -> dict:
    """The figures of one id: from its live mount when one answers, else from
    its quota file.  Never raises a ``VzError``: a failure is an ``error``
    record."""
    qf = QuotaFile.for_id(qid, file)
    now = int(time.time())
    try:
        reply = control.request(qid, "ping", timeout=30)
    except VzError as e:
        return broken(qid, qf.path, e.message)
    if reply is not None:
        st = state_from_dict(reply["state"])
        return quota(st, int(reply.get("now", now)), source="mount", live=True,
                     active=bool(reply.get("active")),
                     ugid_active=bool(reply.get("ugid_active")), file=qf.path, ugid=ugid)
    try:
        st = qf.load()
    except VzError as e:
        return broken(qid, qf.path, e.message)
    return quota(st, now, source="file", live=False, active=False, ugid_active=False,
                 file=qf.path, ugid=ugid)
