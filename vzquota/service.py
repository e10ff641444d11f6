"""The quota of one id as a running mount holds it, and the commands that change
limits (shared by the offline CLI and the live mount).

Role: ``apply_limits``/``apply_limits2`` validate and merge limits into a
``QuotaState``.  ``LiveQuota`` is the pure part of a mount's quota: it loads the
quota file at mount time, decides whether a rescan is needed, owns the engine
while accounting is on, answers the control requests (stat, on, off, setlimit,
setlimit2, reload2, recalc, drop) and saves the file (checkpoints and the clean
stop).  Scanning is passed in as a function so that the mount can run it in a
worker thread while it keeps serving.

Concurrency: synchronous; called from the mount's trio loop only (the scan
function it is given runs elsewhere and only its result comes back here).
"""

from __future__ import annotations

import dataclasses as dc
import logging
import os
import time
from typing import Callable

from .engine import QuotaEngine
from .errors import (EC_LIVE, EC_NOTRUN, EC_RUN, EC_USAGE, VzError)
from .model import GROUP, USER, QuotaObject, QuotaState
from .qfile import QuotaFile, state_to_dict
from .scan import ScanResult

log = logging.getLogger(__name__)

# limit keys: values in 1K blocks (b*), inodes (i*) or seconds (*grace)
LIMIT_KEYS = ("bsoft", "bhard", "isoft", "ihard", "bgrace", "igrace", "ugid_on",
              "ugid_limit", "path")

# ---- the control requests' schema ----------------------------------------------
#
# Every request a live mount answers is checked here before anything acts on it:
# one JSON object with "cmd" and only the keys its command takes, each of its
# type and range (see ``REQUESTS``).  Anything else is refused with EC_LIVE and
# "bad request: ..." and changes nothing.

MAX_VALUE = 2**63 - 1           # the largest limit, count or time (units.UNLIMITED)
MAX_UGID = 2**32 - 2            # uid/gid range (2**32 - 1 is "no id")
MAX_PATH = 4096

# A live recount may hold the calls that allocate or change names while one
# pass scans, for at most this many seconds (``holds``).
HOLD_MAX = 3.0
# While the figures in use are stale (the first pass of a live `on`), a pass
# holds those calls until it ends, however long it takes; a call that would
# allocate fails with EDQUOT once it has waited this many seconds (simfs -o
# recountwait), rather than going on unchecked.
RECOUNT_WAIT = 10.0


def holds(n: int, why: str | None, last: float | None,
          hold_max: float = HOLD_MAX) -> bool:
    """Whether pass ``n`` (0: the first) of a live recount holds the calls that
    allocate or change names while it scans, letting them go after
    ``hold_max`` seconds at the latest (0: never): a pass they cannot
    disturb is exact.  A pass after one that was not exact holds them when
    that one (``last`` seconds) was short enough to be made again within
    ``hold_max``.  A first pass asked for by ``recalc`` holds nothing: the
    mount's own figures are enforced meanwhile, and it is exact if nothing
    changed.

    (A pass made while the figures in use are stale, ``why`` "stale": quota
    was off, so those figures may be short, holds them until it ends whatever
    ``hold_max`` says: see ``simfs.mount.Mount.recalc`` and RECOUNT_WAIT.)"""
    if n == 0 and why == "stale":
        return True
    if hold_max <= 0 or n == 0:
        return False
    return last is not None and last <= hold_max


def _bad(why: str) -> VzError:
    return VzError(EC_LIVE, f"bad request: {why}")


def _v_int(name: str, v: object) -> int:
    if type(v) is not int or not 0 <= v <= MAX_VALUE:
        raise _bad(f"{name} must be an integer from 0 to {MAX_VALUE}")
    return v


def _v_bool(name: str, v: object) -> bool:
    if type(v) is not bool:
        raise _bad(f"{name} must be true or false")
    return v


def _v_ugid(name: str, v: object) -> int:
    if type(v) is not int or not 0 <= v <= MAX_UGID:
        raise _bad(f"{name} must be an integer from 0 to {MAX_UGID}")
    return v


def _v_kind(name: str, v: object) -> str:
    if v not in (USER, GROUP) or type(v) is not str:
        raise _bad(f"{name} must be {USER!r} or {GROUP!r}")
    return v


def _v_path(name: str, v: object) -> str:
    if (type(v) is not str or not v.startswith("/") or "\0" in v
            or len(v) > MAX_PATH):
        raise _bad(f"{name} must be an absolute path")
    return v


LIMIT_SCHEMA: dict[str, Callable[[str, object], object]] = {
    "bsoft": _v_int, "bhard": _v_int, "isoft": _v_int, "ihard": _v_int,
    "bgrace": _v_int, "igrace": _v_int, "ugid_on": _v_bool, "ugid_limit": _v_int,
    "path": _v_path,
}


def _v_limits(name: str, v: object) -> dict:
    if type(v) is not dict:
        raise _bad(f"{name} must be an object")
    for key, val in v.items():
        check = LIMIT_SCHEMA.get(key)
        if check is None:
            raise _bad(f"unknown limit {key!r}")
        check(f"{name}.{key}", val)
    return v


# cmd -> {key: checker}; keys are optional unless listed in REQUIRED.
REQUESTS: dict[str, dict[str, Callable[[str, object], object]]] = {
    "ping": {},
    "stat": {"save": _v_bool},
    "on": {"limits": _v_limits},
    "off": {},
    "setlimit": {"limits": _v_limits, "force": _v_bool},
    "setlimit2": {"kind": _v_kind, "id": _v_ugid, "bsoft": _v_int, "bhard": _v_int,
                  "isoft": _v_int, "ihard": _v_int, "bgrace": _v_int, "igrace": _v_int},
    "reload2": {},
    "recalc": {},
    "drop": {},
    "events": {},
}


def validate_request(req: object) -> dict:
    """Check one decoded control request against ``REQUESTS``; returns it, or
    raises ``VzError(EC_LIVE, "bad request: ...")``."""
    if type(req) is not dict:
        raise _bad("not a JSON object")
    cmd = req.get("cmd")
    if type(cmd) is not str or cmd not in REQUESTS:
        raise _bad(f"unknown command {str(cmd)[:40]!r}")
    schema = REQUESTS[cmd]
    for key, val in req.items():
        if key == "cmd":
            continue
        check = schema.get(key)
        if check is None:
            raise _bad(f"{cmd} takes no {str(key)[:40]!r}")
        check(key, val)
    if cmd == "setlimit2":
        limits = ("bsoft", "bhard", "isoft", "ihard")
        if "id" in req:
            want, other = limits, ("bgrace", "igrace")
        else:
            want, other = ("bgrace", "igrace"), limits
        missing = [k for k in want if k not in req]
        extra = [k for k in other if k in req]
        if missing or extra:
            raise _bad("setlimit2 takes id, bsoft, bhard, isoft, ihard or "
                       "bgrace, igrace")
    return req


def check_pair(kind: str, soft: int, hard: int) -> None:
    if hard < soft:
        # check_limits() of the original; its format ends in "\n" (an empty line)
        raise VzError(EC_USAGE, f"{kind}_hard_limit [{hard}] < {kind}_soft_limit [{soft}]\n")


def apply_limits(st: QuotaState, limits: dict) -> None:
    """Merge 1st-level limits (``LIMIT_KEYS``; blocks in KiB) into ``st``."""
    l1 = st.level1
    bsoft = limits.get("bsoft", l1.space.soft // 1024)
    bhard = limits.get("bhard", l1.space.hard // 1024)
    isoft = limits.get("isoft", l1.inodes.soft)
    ihard = limits.get("ihard", l1.inodes.hard)
    check_pair("block", bsoft, bhard)
    check_pair("inode", isoft, ihard)
    l1.space.soft, l1.space.hard = bsoft * 1024, bhard * 1024
    l1.inodes.soft, l1.inodes.hard = isoft, ihard
    if "bgrace" in limits:
        st.grace1.space = limits["bgrace"]
    if "igrace" in limits:
        st.grace1.inodes = limits["igrace"]
    if "ugid_limit" in limits:          # as the original: -u alone does not turn -s on
        st.ugid_limit = limits["ugid_limit"]
    if "ugid_on" in limits:
        st.ugid_on = bool(limits["ugid_on"])
    if limits.get("path"):
        if not same_path(st.path, limits["path"]):
            st.dirty = True         # usage was counted for another tree: recount
        st.path = limits["path"]


def same_path(stored: str | None, path: str) -> bool:
    """Whether a quota that last counted ``stored`` may trust its usage at ``path``."""
    if stored is None or stored == path:
        return True
    try:
        return os.path.samefile(stored, path)
    except OSError:
        return False


def apply_limits2(st: QuotaState, req: dict) -> None:
    """2nd-level limits of one uid/gid (``kind``, ``id``, bsoft, bhard, isoft,
    ihard; blocks in KiB) or the graces of a type (``kind``, bgrace, igrace)."""
    kind = GROUP if req.get("kind") == GROUP else USER
    if "id" not in req:
        g = st.grace2(kind)
        g.space, g.inodes = req["bgrace"], req["igrace"]
        return
    check_pair("block", req["bsoft"], req["bhard"])
    check_pair("inode", req["isoft"], req["ihard"])
    obj = st.table(kind).setdefault(req["id"], QuotaObject())
    obj.space.soft, obj.space.hard = req["bsoft"] * 1024, req["bhard"] * 1024
    obj.inodes.soft, obj.inodes.hard = req["isoft"], req["ihard"]


def upper_bound(r: ScanResult, growth) -> ScanResult:
    """A pass's count plus what was charged while it ran (``engine.Growth``):
    not less than the usage at its end, whatever the pass missed (as long as
    no directory moved meanwhile: the mount checks that)."""
    out = ScanResult(r.space + growth.space, r.inodes + growth.inodes,
                     {k: list(v) for k, v in r.users.items()},
                     {k: list(v) for k, v in r.groups.items()})
    for mine, more in ((out.users, growth.users), (out.groups, growth.groups)):
        for k, (b, n) in more.items():
            if not b and not n:
                continue
            a = mine.setdefault(k, [0, 0])
            a[0] += b
            a[1] += n
    return out


def apply_scan(engine: QuotaEngine, r: ScanResult) -> None:
    engine.set_usage(r.space, r.inodes, r.users, r.groups)


def _limits_of(st: QuotaState) -> tuple:
    """Everything a control request may change, as plain values (not usage)."""
    def obj(o: QuotaObject) -> tuple:
        return tuple((c.soft, c.hard, c.deadline) for c in (o.space, o.inodes))
    return ((st.path, st.ugid_on, st.ugid_limit, st.ugid_exceeded, st.on, st.mounted,
             st.dirty, dc.replace(st.grace1), dc.replace(st.user_grace),
             dc.replace(st.group_grace)),
            obj(st.level1),
            {kind: {i: obj(o) for i, o in st.table(kind).items()} for kind in (USER, GROUP)})


def _restore_limits(st: QuotaState, snap: tuple) -> None:
    """Undo a change ``_limits_of`` took a snapshot before; the Counter objects
    stay the same (reservations in flight may point at them)."""
    def obj(o: QuotaObject, vals: tuple) -> None:
        for c, (soft, hard, deadline) in zip((o.space, o.inodes), vals):
            c.soft, c.hard, c.deadline = soft, hard, deadline
    flags, level1, tables = snap
    (st.path, st.ugid_on, st.ugid_limit, st.ugid_exceeded, st.on, st.mounted, st.dirty,
     st.grace1, st.user_grace, st.group_grace) = flags
    obj(st.level1, level1)
    for kind in (USER, GROUP):
        live, old = st.table(kind), tables[kind]
        for i in list(live):
            if i in old:
                obj(live[i], old[i])
            elif not any((c.usage, c.rsv) for c in (live[i].space, live[i].inodes)):
                del live[i]
            else:
                obj(live[i], ((0, 0, 0), (0, 0, 0)))


class LiveQuota:
    """The quota of one id inside one mount.  ``engine`` is None while off.

    After a live ``drop`` the quota is *dropped*: the mount serves as a plain
    passthrough but keeps its control channel (and the id's lock), so a new
    quota file (``vzquota init``) can be turned on in it again with ``on``.
    """

    def __init__(self, qfile: QuotaFile, path: str, scan: Callable[[], ScanResult],
                 clock: Callable[[], float] = time.time):
        self.qfile = qfile
        self.path = path
        self.scan = scan
        self.clock = clock
        self.state: QuotaState = qfile.load()
        self.engine: QuotaEngine | None = None
        self.dropped = False
        # Why a recount is wanted: None, "recalc" (asked for), or "stale" (the
        # figures are known to be wrong: quota was off, or the 2nd level was).
        self.recalc_wanted: str | None = None
        # (uid, gid, bytes) of files no scan can see but that stay charged
        # (unlinked, not yet given back); the mount fills this in.
        self.orphans: Callable[[], list[tuple[int, int, int]]] = list
        # How many files hold blocks the hard limits left uncharged (allocated
        # late by the backing filesystem at the limit); the mount fills this in.
        self.gaps: Callable[[], int] = lambda: 0
        # Limit events of the mount's life per (event, level, resource): the
        # mount's events.Watcher.totals (the "events" request; metrics).
        self.event_totals: dict[tuple[str, int, str], int] = {}
        # The ``why`` of a live recount that could not be exact: the mount
        # tries again (at quiet moments, and now and then) until one is.
        self.inexact: str | None = None

    def _apply(self, engine: QuotaEngine, result: ScanResult) -> None:
        apply_scan(engine, result)
        for uid, gid, space in self.orphans():
            engine.charge(uid, gid, space, 1)

    # ---- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """At mount time, before any request: if quota is on, make usage exact
        (rescan when the last run did not stop cleanly, usage is dirty or the
        quota last counted another path) and mark the file as being accounted."""
        st = self.state
        moved = not same_path(st.path, self.path)
        if moved:
            st.dirty = True
        st.path = self.path
        if not st.on:
            st.dirty = True      # changes made while mounted go uncounted
            self.save()
            return
        engine = QuotaEngine(st, self.clock)
        if st.mounted or st.dirty:
            why = ("the last mount did not stop cleanly" if st.mounted else
                   "it last counted another path" if moved else "usage is dirty")
            log.info("quota %d: %s, recounting %s", st.qid, why, self.path)
            self._apply(engine, self.scan())
            log.info("quota %d: recounted: %d bytes, %d inodes", st.qid,
                     st.level1.space.usage, st.level1.inodes.usage)
        engine.refresh_timers()
        st.dirty = False
        st.mounted = True
        self.engine = engine
        self.save()

    def stop(self) -> None:
        """The clean stop: give back what files unlinked but still open hold
        (their space goes with the mount), save usage, clear the accounting mark;
        mark usage dirty if files hold blocks a hard limit left uncharged."""
        if self.dropped:
            self._stop_dropped()
            return
        if self.engine is not None:
            for uid, gid, space in self.orphans():
                self.engine.free(uid, gid, space, 1)
            gaps = self.gaps()
            if gaps:
                # the saved usage is short of what those files hold
                log.info("quota %d: %d files hold blocks a hard limit left uncharged: "
                         "marked dirty, the next start recounts", self.state.qid, gaps)
                self.state.dirty = True
        self.state.mounted = False
        self.save()

    def _stop_dropped(self) -> None:
        """A quota file made (``init``) while the mount ran without quota has
        missed changes: mark it dirty so that the next start recounts."""
        try:
            with self.qfile.lock():
                st = self.qfile.load()
                st.dirty, st.mounted = True, False
                self.qfile.save(st)
        except VzError:
            pass

    def save(self) -> None:
        with self.qfile.lock():
            self.qfile.save(self.state)
        if self.engine is not None:
            self.engine.changed = False

    def checkpoint(self) -> bool:
        if self.engine is not None and self.engine.changed:
            self.save()
            return True
        return False

    # ---- control requests ------------------------------------------------------

    def reply(self, **extra) -> dict:
        return {"ok": True, "active": self.engine is not None,
                "ugid_active": self.engine is not None and self.engine.ugid_active,
                "dropped": self.dropped,
                "now": int(self.clock()), "state": state_to_dict(self.state), **extra}

    def handle(self, req: object) -> dict:
        """Answer one control request (checked first: ``validate_request``).  A
        change is saved before it is answered; when the save fails it is undone
        and the error raised.  A request that needs a recount sets
        ``recalc_wanted``; the mount runs it and calls ``finish_recalc``."""
        req = validate_request(req)
        cmd = req["cmd"]
        if "limits" in req:
            req["limits"] = {k: v for k, v in req["limits"].items() if k != "path"}
        if cmd == "ping":
            return self.reply()
        if cmd == "events":
            return {"ok": True, "events": [
                {"event": e, "level": lv, "resource": r, "count": n}
                for (e, lv, r), n in sorted(self.event_totals.items())]}
        if cmd == "stat":
            if self.engine is None:
                raise VzError(EC_NOTRUN, "Quota accounting is off, try vzquota show id\n")
            if req.get("save"):
                self.save()
            return self.reply()
        if self.dropped:
            return self._handle_dropped(req)
        snap = _limits_of(self.state)
        engine = self.engine
        try:
            return self._change(req)
        except BaseException:
            _restore_limits(self.state, snap)
            self.engine = engine
            self.recalc_wanted = None
            raise

    def _change(self, req: dict) -> dict:
        cmd = req["cmd"]
        st = self.state
        if cmd == "on":
            if self.engine is not None:
                raise VzError(EC_RUN, f"Quota is already running for id {st.qid}")
            apply_limits(st, req.get("limits", {}))
            engine = QuotaEngine(st, self.clock)
            engine.refresh_timers()
            st.on = st.mounted = True
            self.engine = engine
            self.recalc_wanted = "stale"    # changes made while off went uncounted
            self.save()
            return self.reply()
        if cmd == "off":
            if self.engine is None:
                raise VzError(EC_NOTRUN, f"Quota is not running for id {st.qid}")
            self.engine = None
            self.inexact = None
            st.on = st.mounted = False
            st.dirty = True
            self.save()
            return self.reply()
        if cmd == "setlimit":
            was_ugid = self.engine is not None and self.engine.ugid_active
            apply_limits(st, req.get("limits", {}))
            if req.get("force"):
                st.dirty = True
            if self.engine is not None:
                self.engine.refresh_timers()
                if self.engine.ugid_active and not was_ugid:
                    self.recalc_wanted = "stale"
            self.save()
            return self.reply()
        if cmd == "setlimit2":
            apply_limits2(st, req)
            if self.engine is not None:
                self.engine.refresh_timers()
            self.save()
            return self.reply()
        if cmd == "reload2":
            stored = self.qfile.load()
            for kind in (USER, GROUP):
                live = st.table(kind)
                for ugid, obj in stored.table(kind).items():
                    cur = live.setdefault(ugid, QuotaObject())
                    for c, s in ((cur.space, obj.space), (cur.inodes, obj.inodes)):
                        c.soft, c.hard = s.soft, s.hard
                st.grace2(kind).space = stored.grace2(kind).space
                st.grace2(kind).inodes = stored.grace2(kind).inodes
            if self.engine is not None:
                self.engine.refresh_timers()
            return self.reply()
        if cmd == "recalc":
            if self.engine is not None:    # off: the next `on` recounts anyway
                self.recalc_wanted = "recalc"
            return self.reply()
        if cmd == "drop":
            self.qfile.remove()
            self.engine = None
            self.inexact = None
            self.dropped = True
            return {"ok": True}
        raise VzError(EC_LIVE, f"unknown request {cmd!r}")

    def _handle_dropped(self, req: dict) -> dict:
        """Requests to a mount whose quota was dropped: ``on`` attaches the quota
        file that exists now (``vzquota init`` made it) and recounts; limits go
        to that file; the rest is refused as with quota off."""
        cmd = req["cmd"]
        qid = self.state.qid
        if cmd == "on":
            st = self.qfile.load()
            apply_limits(st, req.get("limits", {}))
            st.path = self.path
            engine = QuotaEngine(st, self.clock)
            engine.refresh_timers()
            st.on = st.mounted = True
            st.dirty = False
            with self.qfile.lock():
                self.qfile.save(st)
            self.state, self.engine, self.dropped = st, engine, False
            self.recalc_wanted = "stale"    # nothing was counted while dropped
            return self.reply()
        if cmd in ("setlimit", "setlimit2"):
            with self.qfile.lock():
                st = self.qfile.load()
                if cmd == "setlimit":
                    apply_limits(st, req.get("limits", {}))
                    if req.get("force"):
                        st.dirty = True
                else:
                    apply_limits2(st, req)
                QuotaEngine(st, self.clock).refresh_timers()
                self.qfile.save(st)
            return self.reply()
        if cmd == "drop":
            with self.qfile.lock():
                self.qfile.remove()
            return {"ok": True}
        raise VzError(EC_NOTRUN, f"Quota is not running for id {qid}")

    # ---- recounting while serving -----------------------------------------------

    def finish_recalc(self, result: ScanResult, quiet: bool, last: bool,
                      why: str | None, bound: ScanResult | None = None) -> bool:
        """Apply a recount made while serving.  ``quiet``: nothing changed while
        it ran, so it is exact: applied, returns True.  A pass that was not
        quiet is not applied (returns False: the mount tries again) unless the
        figures in use are stale (``why`` is "stale": they may be short): then
        ``bound`` (the pass plus what was charged while it ran: never short,
        see ``upper_bound``) is applied at once, or, when there is none, the
        pass itself at the ``last`` pass; the quota is marked dirty.  After a
        ``last`` pass that was not exact, ``inexact`` says so (the mount keeps
        trying); an exact one clears it."""
        if self.engine is None:
            self.inexact = None
            return True
        if quiet:
            self.inexact = None
        elif last:
            self.inexact = why or "recalc"
        if not quiet and (why != "stale" or (bound is None and not last)):
            return False
        self._apply(self.engine, result if quiet or bound is None else bound)
        self.state.dirty = not quiet
        self.save()
        return quiet

    def inexact_error(self, passes: int, why: str | None) -> VzError:
        qid = self.state.qid
        if why == "stale":
            what = ("the figures are approximate and the quota file is marked dirty "
                    "until a recount is exact")
        else:
            what = "the figures were left as they were"
        return VzError(EC_LIVE, f"Usage of quota id {qid} kept changing during "
                       f"{passes} recount passes, so the recount is not exact: {what}; "
                       f"the mount recounts again at quiet moments, or run "
                       f"'vzquota recalc {qid}' when writers are quiet")
