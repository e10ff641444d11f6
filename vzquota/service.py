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

import logging
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


def check_pair(kind: str, soft: int, hard: int) -> None:
    if hard < soft:
        raise VzError(EC_USAGE, f"{kind}_hard_limit [{hard}] < {kind}_soft_limit [{soft}]")


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
    if "ugid_limit" in limits:
        st.ugid_limit = limits["ugid_limit"]
        if "ugid_on" not in limits:
            st.ugid_on = st.ugid_limit > 0 or st.ugid_on
    if "ugid_on" in limits:
        st.ugid_on = bool(limits["ugid_on"])
    if limits.get("path"):
        st.path = limits["path"]


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


def apply_scan(engine: QuotaEngine, r: ScanResult) -> None:
    engine.set_usage(r.space, r.inodes, r.users, r.groups)


class LiveQuota:
    """The quota of one id inside one mount.  ``engine`` is None while off."""

    def __init__(self, qfile: QuotaFile, path: str, scan: Callable[[], ScanResult],
                 clock: Callable[[], float] = time.time):
        self.qfile = qfile
        self.path = path
        self.scan = scan
        self.clock = clock
        self.state: QuotaState = qfile.load()
        self.engine: QuotaEngine | None = None
        self.recalc_wanted = False
        # (uid, gid, bytes) of files no scan can see but that stay charged
        # (unlinked while open); the mount fills this in.
        self.orphans: Callable[[], list[tuple[int, int, int]]] = list

    def _apply(self, engine: QuotaEngine, result: ScanResult) -> None:
        apply_scan(engine, result)
        for uid, gid, space in self.orphans():
            engine.charge(uid, gid, space, 1)

    # ---- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """At mount time, before any request: if quota is on, make usage exact
        (rescan when the last run did not stop cleanly or usage is dirty) and
        mark the file as being accounted."""
        st = self.state
        st.path = self.path
        if not st.on:
            st.dirty = True      # changes made while mounted go uncounted
            self.save()
            return
        engine = QuotaEngine(st, self.clock)
        if st.mounted or st.dirty:
            why = "the last mount did not stop cleanly" if st.mounted else "usage is dirty"
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
        """The clean stop: save usage and clear the accounting mark."""
        self.state.mounted = False
        self.save()

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
                "now": int(self.clock()), "state": state_to_dict(self.state), **extra}

    def handle(self, req: dict) -> dict:
        """Answer one control request.  A request that needs a recount sets
        ``recalc_wanted``; the mount runs it and calls ``finish_recalc``."""
        cmd = req.get("cmd")
        st = self.state
        if isinstance(req.get("limits"), dict):
            req["limits"].pop("path", None)     # a live mount's path is its own
        if cmd == "ping":
            return self.reply()
        if cmd == "stat":
            if self.engine is None:
                raise VzError(EC_NOTRUN, "Quota accounting is off, try vzquota show id")
            if req.get("save"):
                self.save()
            return self.reply()
        if cmd == "on":
            if self.engine is not None:
                raise VzError(EC_RUN, f"Quota is already running for id {st.qid}")
            apply_limits(st, req.get("limits", {}))
            engine = QuotaEngine(st, self.clock)
            engine.refresh_timers()
            st.on = st.mounted = True
            self.engine = engine
            self.recalc_wanted = True   # changes made while off went uncounted
            self.save()
            return self.reply()
        if cmd == "off":
            if self.engine is None:
                raise VzError(EC_NOTRUN, f"Quota is not running for id {st.qid}")
            self.engine = None
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
                    self.recalc_wanted = True
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
            self.recalc_wanted = True
            return self.reply()
        if cmd == "drop":
            self.engine = None
            self.qfile.remove()
            return {"ok": True}
        raise VzError(EC_LIVE, f"unknown request {cmd!r}")

    def finish_recalc(self, result: ScanResult, generation: int) -> bool:
        """Apply a recount if nothing changed while it ran (returns False to
        ask for another pass)."""
        if self.engine is None:
            return True
        if self.engine.generation != generation:
            return False
        self._apply(self.engine, result)
        self.state.dirty = False
        self.save()
        return True
