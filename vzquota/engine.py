"""The quota rules: check, reserve, commit, release, charge, free and transfer
across the 1st level (the whole private area) and the 2nd level (per uid and gid).

Role: the one place that decides whether an allocation may happen (SPEC section 4).
Shaped after the kernel's dquot: an allocation is *reserved* against every level
before the backing call (all or nothing: nothing is applied unless every counter
accepts), then *committed* with the amount really allocated, or *released*.
Freeing never fails; an underflow is clamped to 0 and logged.

Rules, per counter (space in bytes, inodes as counts):
- hard: refused when usage + reserved + new > hard (equal is allowed).  At the 1st
  level a hard limit of 0 allows nothing; at the 2nd level 0 means unlimited.
- soft (0 = none): crossing it starts the grace timer (now + grace) and is allowed;
  once the timer has expired every allocation above soft is refused; falling
  strictly below soft clears the timer.
- 2nd level: at most ``ugid_limit`` distinct uids+gids are tracked; an allocation
  for one more is refused and ``ugid_exceeded`` is set.

A refusal raises ``QuotaExceeded`` carrying what it is about (``event``), but
queues nothing: the caller may still recover (a write reserved with room to
spare tries again for what it really needs).  Only once the refusal is final,
when EDQUOT goes back to the caller, does the owner hand it to ``report``,
which queues it in ``events`` (bounded; counted in ``events_dropped`` past
``EVENTS_MAX``) and counts it in ``refusals`` (every one, per event, level and
resource); the engine itself never logs them.

Concurrency: synchronous, no I/O, no locks.  The owner (one simfs mount on its trio
loop, or one CLI process) calls it from one thread; since no method blocks, each
call is atomic with respect to other trio tasks.  ``generation`` counts changes so a
concurrent rescan can tell whether usage moved under it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Callable

from .errors import QuotaExceeded
from .model import GROUP, USER, Counter, Graces, QuotaObject, QuotaState

log = logging.getLogger(__name__)

INFINITE = float("inf")
EVENTS_MAX = 1024


class Reservation:
    """What one in-flight allocation holds: ``space`` bytes and ``inodes``
    inodes on each of ``objs`` (the quota objects it was checked against, with
    their graces and levels; None once released)."""

    __slots__ = ("objs", "space", "inodes", "uid", "gid")

    def __init__(self, objs: list | None, space: int, inodes: int, uid: int, gid: int):
        self.objs = objs
        self.space = space
        self.inodes = inodes
        self.uid = uid
        self.gid = gid


class Growth:
    """What was charged while a live recount pass ran (the positive part of
    every charge, per level, uid and gid): added to the pass's count, an upper
    bound of the usage when the pass was not exact (simfs/mount.py PassWatch)."""

    __slots__ = ("space", "inodes", "users", "groups")

    def __init__(self):
        self.space = self.inodes = 0
        self.users: dict[int, list[int]] = {}
        self.groups: dict[int, list[int]] = {}

    def add(self, uid: int | None, gid: int | None, space: int, inodes: int,
            level1: bool = True) -> None:
        space, inodes = max(0, space), max(0, inodes)
        if not space and not inodes:
            return
        if level1:
            self.space += space
            self.inodes += inodes
        for table, key in ((self.users, uid), (self.groups, gid)):
            if key is None:
                continue
            a = table.get(key)
            if a is None:
                table[key] = [space, inodes]
            else:
                a[0] += space
                a[1] += inodes

    def take(self, uid: int, gid: int, space: int, inodes: int) -> None:
        """Take back what ``add`` counted for an inode that is gone again."""
        self.space = max(0, self.space - space)
        self.inodes = max(0, self.inodes - inodes)
        for table, key in ((self.users, uid), (self.groups, gid)):
            a = table.get(key)
            if a is not None:
                a[0] = max(0, a[0] - space)
                a[1] = max(0, a[1] - inodes)


class QuotaEngine:
    """Accounting and enforcement of one quota id.  See the module docstring."""

    def __init__(self, state: QuotaState, clock: Callable[[], float] = time.time):
        self.state = state
        self.clock = clock
        self.generation = 0
        self.changed = False    # usage or limits changed since the last save
        # Refusals queued for the owner to report (bounded; the mount drains it).
        self.events: deque[dict] = deque()
        self.events_dropped = 0
        # Every refusal reported, per (event, level, resource) (for metrics).
        self.refusals: dict[tuple[str, int, str], int] = {}
        # Set while a live recount pass runs: every charge is added to it too.
        self.growth: Growth | None = None

    # ---- helpers -------------------------------------------------------------

    def now(self) -> int:
        return int(self.clock())

    @property
    def ugid_active(self) -> bool:
        return self.state.ugid_on and self.state.ugid_limit > 0

    def _objects(self, uid: int, gid: int, create: bool) -> list[tuple[QuotaObject, Graces, int]]:
        """The quota objects an inode owned by uid:gid is charged to, with their
        graces and level.  ``create`` adds missing 2nd-level objects (or raises
        when the ugid limit would be passed)."""
        st = self.state
        objs = [(st.level1, st.grace1, 1)]
        if not self.ugid_active:
            return objs
        missing = []
        for kind, ugid in ((USER, uid), (GROUP, gid)):
            if ugid < 0:
                continue
            obj = st.table(kind).get(ugid)
            if obj is None:
                if not create:
                    continue
                missing.append((kind, ugid))
            else:
                objs.append((obj, st.grace2(kind), 2))
        if missing:
            total = len(st.users) + len(st.groups)
            if total + len(missing) > st.ugid_limit:
                st.ugid_exceeded = True
                raise self._ugid_refused(*missing[0])
            for kind, ugid in missing:
                obj = QuotaObject()
                st.table(kind)[ugid] = obj
                objs.append((obj, st.grace2(kind), 2))
        return objs

    @staticmethod
    def _refuses(c: Counter, level: int, amount: int, now: int) -> bool:
        total = c.usage + c.rsv + amount
        if level == 1 or c.hard:
            if total > c.hard:
                return True
        if c.soft and total > c.soft and c.deadline and now >= c.deadline:
            return True
        return False

    @staticmethod
    def _room(c: Counter, level: int, now: int, soft: bool = True) -> float:
        used = c.usage + c.rsv
        room = INFINITE
        if level == 1 or c.hard:
            room = c.hard - used
        if soft and c.soft and c.deadline and now >= c.deadline:
            room = min(room, c.soft - used)
        return max(0, room)

    @staticmethod
    def _update_timer(c: Counter, grace: int, now: int) -> None:
        if c.soft and c.usage > c.soft:
            if not c.deadline:
                c.deadline = now + grace
        elif c.usage < c.soft or not c.soft:
            c.deadline = 0

    def _refused(self, obj: QuotaObject, level: int, uid: int, gid: int, resource: str,
                 amount: int, now: int, request: int | None = None) -> QuotaExceeded:
        """The refusal of ``amount`` on one counter, with what it is about
        (``event``); nothing is queued here (see ``report``)."""
        st = self.state
        c = obj.space if resource == "space" else obj.inodes
        if level == 1:
            kind, ugid = "container", None
        elif st.users.get(uid) is obj:
            kind, ugid = USER, uid
        else:
            kind, ugid = GROUP, gid
        hard = level == 1 or c.hard
        why = "hardlimit" if hard and c.usage + c.rsv + amount > c.hard else "grace"
        event = {"event": why, "level": level, "type": kind, "ugid": ugid,
                 "resource": resource, "usage": c.usage, "soft": c.soft, "hard": c.hard,
                 "deadline": c.deadline, "request": amount if request is None else request,
                 "time": now}
        room = self.room(uid, gid) if resource == "space" else 0
        return QuotaExceeded(level, resource, room, event=event)

    def _ugid_refused(self, kind: str, ugid: int, request: int = 1) -> QuotaExceeded:
        """One uid/gid too many for the 2nd level (``ugid_limit``)."""
        st = self.state
        event = {"event": "ugid_limit", "level": 2, "type": kind, "ugid": ugid,
                 "resource": "ugid", "usage": len(st.users) + len(st.groups), "soft": 0,
                 "hard": st.ugid_limit, "deadline": 0, "request": request,
                 "time": self.now()}
        return QuotaExceeded(2, "ugid", event=event)

    def exceeded(self, uid: int, gid: int, space: int, request: int | None = None
                 ) -> QuotaExceeded:
        """The refusal of ``space`` bytes for uid:gid when the owner found
        there is no room for it (the counter that refuses it, or else the one
        with the least room): to raise, and report like any other."""
        now = self.now()
        objs = self._objects(uid, gid, create=False)
        for obj, _, level in objs:
            if self._refuses(obj.space, level, space, now):
                return self._refused(obj, level, uid, gid, "space", space, now, request)
        obj, _, level = min(objs, key=lambda o: self._room(o[0].space, o[2], now))
        return self._refused(obj, level, uid, gid, "space", space, now, request)

    def report(self, exc: QuotaExceeded) -> None:
        """A refusal that went back to the caller (EDQUOT): count it and queue
        it for the owner to log (``events``; no I/O here)."""
        ev = exc.event
        if ev is None:
            return
        exc.event = None          # once
        key = (ev["event"], ev["level"], ev["resource"])
        self.refusals[key] = self.refusals.get(key, 0) + 1
        if len(self.events) >= EVENTS_MAX:
            self.events_dropped += 1
            return
        self.events.append(ev)

    def _touch(self) -> None:
        self.generation += 1
        self.changed = True

    # ---- allocation ----------------------------------------------------------

    def reserve(self, uid: int, gid: int, space: int = 0, inodes: int = 0,
                request: int | None = None) -> Reservation:
        """Check every level and hold ``space`` bytes and ``inodes`` inodes for an
        allocation by an inode owned by uid:gid.  Raises QuotaExceeded (nothing
        held) when any level refuses; its event names ``request`` (default:
        the amount refused) as what the caller asked for."""
        now = self.now()
        objs = self._objects(uid, gid, create=True)
        space = max(0, space)
        inodes = max(0, inodes)
        for obj, _, level in objs:
            if space and self._refuses(obj.space, level, space, now):
                raise self._refused(obj, level, uid, gid, "space", space, now, request)
            if inodes and self._refuses(obj.inodes, level, inodes, now):
                raise self._refused(obj, level, uid, gid, "inodes", inodes, now)
        for obj, _, _ in objs:
            obj.space.rsv += space
            obj.inodes.rsv += inodes
        return Reservation(objs, space, inodes, uid, gid)

    def release(self, res: Reservation) -> None:
        """Give back what ``res`` holds, charging nothing (once; again is a no-op)."""
        objs, res.objs = res.objs, None
        if objs is None:
            return
        space, inodes = res.space, res.inodes
        for obj, _, _ in objs:
            c = obj.space
            c.rsv = c.rsv - space if c.rsv > space else 0
            c = obj.inodes
            c.rsv = c.rsv - inodes if c.rsv > inodes else 0

    def commit(self, res: Reservation, space: int | None = None, inodes: int | None = None) -> None:
        """Turn a reservation into usage.  ``space``/``inodes`` are what was really
        allocated (default: what was reserved); the difference is not refused
        (the allocation already happened), as the kernel's claim does.  Charged
        to the objects the reservation was checked against: they hold a
        reservation, so none of them left its table meanwhile."""
        objs = res.objs
        self.release(res)
        space = res.space if space is None else space
        inodes = res.inodes if inodes is None else inodes
        if objs is None:                  # released before: an ordinary charge
            self.charge(res.uid, res.gid, space, inodes)
        elif space or inodes:
            if self.growth is not None:
                self.growth.add(res.uid, res.gid, space, inodes)
            self._apply(objs, space, inodes)
            if space < 0 or inodes < 0:
                self._drop_empty(res.uid, res.gid)

    def room(self, uid: int, gid: int, soft: bool = True) -> int:
        """Bytes an inode owned by uid:gid may still allocate before a refusal
        (``soft=False``: before a hard limit, ignoring expired graces)."""
        now = self.now()
        room = INFINITE
        for obj, _, level in self._objects(uid, gid, create=False):
            room = min(room, self._room(obj.space, level, now, soft))
        return int(min(room, 1 << 62))

    def charge(self, uid: int, gid: int, space: int = 0, inodes: int = 0) -> None:
        """Apply a change that already happened (positive or negative), without
        refusing: a commit's correction, a directory that grew, a free."""
        if not space and not inodes:
            return
        if self.growth is not None:
            self.growth.add(uid, gid, space, inodes)
        try:
            objs = self._objects(uid, gid, create=space > 0 or inodes > 0)
        except QuotaExceeded:
            # Already allocated: account what we can (the 1st level) and keep
            # the ugid-exceeded mark that _objects set.
            objs = self._objects(uid, gid, create=False)
        self._apply(objs, space, inodes)
        if space < 0 or inodes < 0:
            self._drop_empty(uid, gid)

    def _apply(self, objs: list, space: int, inodes: int) -> None:
        """Add ``space`` and ``inodes`` (either sign) to the usage of ``objs``
        and start or clear their grace timers."""
        now = self.now()
        for obj, graces, _ in objs:
            if space:
                self._add(obj.space, space, graces.space, now)
            if inodes:
                self._add(obj.inodes, inodes, graces.inodes, now)
        self._touch()

    def _add(self, c: Counter, amount: int, grace: int, now: int) -> None:
        c.usage += amount
        if c.usage < 0:
            log.warning("quota %s: usage underflow by %d, clamped to 0",
                        self.state.qid, -c.usage)
            c.usage = 0
        self._update_timer(c, grace, now)

    def free(self, uid: int, gid: int, space: int = 0, inodes: int = 0) -> None:
        """Release usage (unlink, truncate, rmdir).  Never fails."""
        self.charge(uid, gid, -space, -inodes)

    def _drop_empty(self, uid: int, gid: int) -> None:
        st = self.state
        for kind, ugid in ((USER, uid), (GROUP, gid)):
            obj = st.table(kind).get(ugid)
            if (obj is not None and not obj.space.usage and not obj.inodes.usage
                    and not obj.space.rsv and not obj.inodes.rsv
                    and not (obj.space.soft or obj.space.hard
                             or obj.inodes.soft or obj.inodes.hard)):
                del st.table(kind)[ugid]

    def transfer(self, uid: int, gid: int, new_uid: int, new_gid: int,
                 space: int, inodes: int = 1, force: bool = False) -> None:
        """chown/chgrp of an inode holding ``space`` bytes: charge the new owner
        first (refused with QuotaExceeded, nothing changed, when over its limit),
        then free the old one.  The 1st level does not change.  ``force`` skips
        the checks (to undo a transfer whose backing chown failed)."""
        if not self.ugid_active or (uid == new_uid and gid == new_gid):
            return
        st = self.state
        now = self.now()
        targets: list[tuple[str, int]] = []
        if new_uid != uid:
            targets.append((USER, new_uid))
        if new_gid != gid:
            targets.append((GROUP, new_gid))
        missing = [(k, i) for k, i in targets if i not in st.table(k)]
        if missing and not force and len(st.users) + len(st.groups) + len(missing) > st.ugid_limit:
            st.ugid_exceeded = True
            raise self._ugid_refused(*missing[0])
        for kind, ugid in targets:
            obj = st.table(kind).get(ugid)
            if obj is None or force:
                continue
            ids = (ugid, -1) if kind == USER else (-1, ugid)
            if space > 0 and self._refuses(obj.space, 2, space, now):
                raise self._refused(obj, 2, *ids, "space", space, now)
            if inodes > 0 and self._refuses(obj.inodes, 2, inodes, now):
                raise self._refused(obj, 2, *ids, "inodes", inodes, now)
        for kind, ugid in targets:
            obj = st.table(kind).setdefault(ugid, QuotaObject())
            grace = st.grace2(kind)
            obj.space.usage += space
            obj.inodes.usage += inodes
            self._update_timer(obj.space, grace.space, now)
            self._update_timer(obj.inodes, grace.inodes, now)
        for kind, ugid in targets:
            old = uid if kind == USER else gid
            obj = st.table(kind).get(old)
            if obj is None:
                continue
            grace = st.grace2(kind)
            obj.space.usage = max(0, obj.space.usage - space)
            obj.inodes.usage = max(0, obj.inodes.usage - inodes)
            self._update_timer(obj.space, grace.space, now)
            self._update_timer(obj.inodes, grace.inodes, now)
        if self.growth is not None:
            self.growth.add(new_uid if new_uid != uid else None,
                            new_gid if new_gid != gid else None, space, inodes, level1=False)
        self._drop_empty(uid, gid)
        self._touch()

    # ---- limits and usage from outside --------------------------------------

    def refresh_timers(self) -> None:
        """Start or clear grace timers after limits or usage were replaced."""
        st = self.state
        now = self.now()
        for c, g in ((st.level1.space, st.grace1.space), (st.level1.inodes, st.grace1.inodes)):
            self._update_timer(c, g, now)
        for kind in (USER, GROUP):
            grace = st.grace2(kind)
            for obj in st.table(kind).values():
                self._update_timer(obj.space, grace.space, now)
                self._update_timer(obj.inodes, grace.inodes, now)
        st.ugid_exceeded = st.ugid_exceeded and self.ugid_active
        self._touch()

    def set_usage(self, space: int, inodes: int,
                  users: dict[int, list[int]] | None = None,
                  groups: dict[int, list[int]] | None = None) -> None:
        """Replace usage with a scan's figures (limits are kept)."""
        st = self.state
        st.level1.space.usage = space
        st.level1.inodes.usage = inodes
        for kind, found in ((USER, users), (GROUP, groups)):
            table = st.table(kind)
            found = found or {}
            for ugid, obj in list(table.items()):
                if ugid not in found:
                    obj.space.usage = obj.inodes.usage = 0
            for ugid, (sp, ino) in found.items():
                obj = table.setdefault(ugid, QuotaObject())
                obj.space.usage, obj.inodes.usage = sp, ino
            for ugid in list(table):
                self._drop_empty(ugid if kind == USER else -1, ugid if kind == GROUP else -1)
        total = len(st.users) + len(st.groups)
        st.ugid_exceeded = bool(self.ugid_active and total > st.ugid_limit)
        self.refresh_timers()

    def statistics(self) -> dict[str, int]:
        st = self.state
        return {"space": st.level1.space.usage, "inodes": st.level1.inodes.usage,
                "ugids": len(st.users) + len(st.groups), "generation": self.generation}
