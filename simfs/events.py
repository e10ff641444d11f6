"""Events at the quota limits: one log line per crossing, and the admin's hook.

Role: every ``INTERVAL`` seconds, ``Watcher.poll`` compares each counter of
the live quota (the 1st level and every uid/gid at the 2nd) with what it saw
last time, and drains the refusals the engine queued (``engine.events``):

- ``softlimit``: a grace timer started (usage passed the soft limit);
- ``grace_expired``: a running grace timer reached its deadline;
- ``hardlimit``: an allocation was refused at a hard limit (or past an expired
  grace: ``grace``; or for one uid/gid too many: ``ugid_limit``).

Each event is logged once (refusals of the same counter at most once per
``REFUSAL_EVERY`` seconds, with the number folded in), and, when the mount
has ``hook=CMD``, CMD runs with the figures in its environment (``hook_env``).
Hooks run as separate processes started by the event loop (anyio; never
blocking a request),
at most ``HOOKS_MAX`` at once; an event that finds them all busy is logged as
not hooked, never silently lost.

A soft crossing that is undone within one interval is not seen (the timer
starts and clears between two looks).

Concurrency: ``poll`` runs on the mount's event loop between requests and
reads the engine without awaiting, so it sees a consistent state.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

INTERVAL = 1.0
REFUSAL_EVERY = 60.0
HOOKS_MAX = 4


@dataclass
class Event:
    event: str            # softlimit, grace_expired, hardlimit, grace, ugid_limit
    qid: int
    level: int            # 1 or 2
    type: str             # container, user, group
    ugid: int | None
    resource: str         # space, inodes, ugid
    usage: int = 0
    soft: int = 0
    hard: int = 0
    deadline: int = 0
    request: int = 0
    count: int = 1

    def line(self) -> str:
        who = "container" if self.level == 1 else f"{self.type} {self.ugid}"
        unit = " bytes" if self.resource == "space" else ""
        what = {"softlimit": "passed its soft limit, grace time started",
                "grace_expired": "grace time expired: no more allocations above the "
                                 "soft limit",
                "hardlimit": "allocation refused at the hard limit",
                "grace": "allocation refused: grace time expired",
                "ugid_limit": "allocation refused: too many distinct uids/gids"}[self.event]
        more = f" ({self.count} refusals)" if self.count > 1 else ""
        return (f"quota {self.qid}: level {self.level} {who} {self.resource}: {what}{more}; "
                f"usage {self.usage}{unit}, soft {self.soft}, hard {self.hard}"
                + (f", deadline {self.deadline}" if self.deadline else "")
                + (f", request {self.request}" if self.request else ""))


def hook_env(ev: Event, path: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "TZ")}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.update({"VZQUOTA_EVENT": ev.event, "VZQUOTA_ID": str(ev.qid),
                "VZQUOTA_LEVEL": str(ev.level), "VZQUOTA_TYPE": ev.type,
                "VZQUOTA_UGID": "" if ev.ugid is None else str(ev.ugid),
                "VZQUOTA_RESOURCE": ev.resource, "VZQUOTA_USAGE": str(ev.usage),
                "VZQUOTA_SOFTLIMIT": str(ev.soft), "VZQUOTA_HARDLIMIT": str(ev.hard),
                "VZQUOTA_GRACE_DEADLINE": str(ev.deadline),
                "VZQUOTA_REQUEST": str(ev.request), "VZQUOTA_COUNT": str(ev.count),
                "VZQUOTA_PATH": path})
    return env


@dataclass
class Watcher:
    qid: int
    seen: dict = field(default_factory=dict)         # key -> (deadline, expired)
    last_refusal: dict = field(default_factory=dict)  # key -> (time logged, pending)

    def poll(self, engine, now: float | None = None) -> list[Event]:
        """The events since the last poll (pure but for the clock)."""
        now = time.time() if now is None else now
        out: list[Event] = []
        if engine is None:
            return out
        st = engine.state
        counters = [((1, "container", None), st.level1)]
        if engine.ugid_active:
            counters += [((2, "user", i), o) for i, o in st.users.items()]
            counters += [((2, "group", i), o) for i, o in st.groups.items()]
        alive = set()
        for (level, kind, ugid), obj in counters:
            for res, c in (("space", obj.space), ("inodes", obj.inodes)):
                key = (level, kind, ugid, res)
                alive.add(key)
                deadline, expired = self.seen.get(key, (0, False))
                if c.deadline and c.deadline != deadline:
                    out.append(Event("softlimit", self.qid, level, kind, ugid, res,
                                     c.usage, c.soft, c.hard, c.deadline))
                    expired = False
                if c.deadline and not expired and now >= c.deadline and c.usage > c.soft:
                    out.append(Event("grace_expired", self.qid, level, kind, ugid, res,
                                     c.usage, c.soft, c.hard, c.deadline))
                    expired = True
                self.seen[key] = (c.deadline, expired if c.deadline else False)
        for key in list(self.seen):
            if key not in alive:
                del self.seen[key]
        while engine.events:
            r = engine.events.popleft()
            key = (r["event"], r["level"], r["type"], r["ugid"], r["resource"])
            ev = Event(r["event"], self.qid, r["level"], r["type"], r["ugid"], r["resource"],
                       r["usage"], r["soft"], r["hard"], r["deadline"], r["request"])
            logged, pending = self.last_refusal.get(key, (None, None))
            if logged is not None and now - logged < REFUSAL_EVERY:
                if pending is None:
                    pending = ev
                else:
                    pending.count += 1
                self.last_refusal[key] = (logged, pending)
                continue
            self.last_refusal[key] = (now, None)
            out.append(ev)
        for key, (logged, pending) in list(self.last_refusal.items()):
            if now - logged >= REFUSAL_EVERY:
                if pending is not None:
                    self.last_refusal[key] = (now, None)
                    out.append(pending)
                else:
                    del self.last_refusal[key]
        return out
