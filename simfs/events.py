"""Events at the quota limits: one log line per crossing, and the admin's hook.

Role: every ``events_every`` seconds (``simfs.config.Config``), ``Watcher.poll`` compares each counter of
the live quota (the 1st level and every uid/gid at the 2nd) with what it saw
last time, and drains the refusals the engine queued (``engine.events``):

- ``softlimit``: a grace timer started (usage passed the soft limit);
- ``grace_expired``: a running grace timer reached its deadline;
- ``softbelow``: usage went back below the soft limit (the timer cleared);
- ``hardbelow``: usage went back below what it was when it reached the hard
  limit (at or over it, or refused at it), so allocations fit again;
- ``hardlimit``: an allocation was refused at a hard limit (or past an expired
  grace: ``grace``; or for one uid/gid too many, a create or a chown:
  ``ugid_limit``).

Refusals are only those that went back to the caller as EDQUOT (the engine
queues them at the errno boundary, with the caller's request size), never a
reservation the caller recovered from.

Each event is logged once (refusals of the same counter at most once per
``refusal_every`` seconds, with the number folded in), and, when the mount
has ``hook=CMD``, CMD runs with the figures in its environment (``hook_env``).
Hooks run as separate processes started by the event loop (anyio; never
blocking a request),
at most ``hooks_max`` at once; an event that finds them all busy is logged as
not hooked, never silently lost.  ``check_hook`` is what the mount checks of
CMD before it starts.

``Watcher.totals`` counts every event of the mount's life per (event, level,
resource), each refusal once (also those folded into one line or dropped from
the engine's queue): the counters ``vzquota-metrics`` exports.

A soft crossing that is undone within one interval is not seen (the timer
starts and clears between two looks).

Concurrency: ``poll`` runs on the mount's event loop between requests and
reads the engine without awaiting, so it sees a consistent state.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass, field

from .config import DEFAULT

log = logging.getLogger(__name__)


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
                "softbelow": "back below its soft limit, grace time cleared",
                "hardbelow": "back below its hard limit",
                "hardlimit": "allocation refused at the hard limit",
                "grace": "allocation refused: grace time expired",
                "ugid_limit": "refused: one uid/gid more than the 2nd level tracks "
                              "(ugid limit)"}[self.event]
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


def check_hook(path: str) -> str | None:
    """Why ``path`` cannot serve as a hook (None when it can): it must exist,
    be a regular file, and be executable."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"hook {path} cannot be used: {e.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"hook {path} is not a regular file"
    if not st.st_mode & 0o111 or not os.access(path, os.X_OK):
        return f"hook {path} is not executable (chmod +x it)"
    return None


@dataclass
class _Seen:
    deadline: int = 0
    expired: bool = False
    hard_mark: int | None = None   # usage when it reached the hard limit (None: below)


@dataclass
class Watcher:
    qid: int
    seen: dict = field(default_factory=dict)         # key -> _Seen
    last_refusal: dict = field(default_factory=dict)  # key -> (time logged, pending)
    # every event of the mount's life, per (event, level, resource)
    totals: dict = field(default_factory=dict)
    _engine: object = None
    _counted: dict = field(default_factory=dict)      # _engine.refusals already in totals
    refusal_every: float = DEFAULT.refusal_every      # seconds between lines of one counter

    def count(self, key: tuple, n: int = 1) -> None:
        self.totals[key] = self.totals.get(key, 0) + n

    def _take_refusals(self, engine) -> None:
        """Add the refusals ``engine`` counted since the last look to totals
        (also those of an engine replaced meanwhile, by ``vzquota off``/``on``)."""
        if engine is not self._engine:
            if self._engine is not None:
                self._take_refusals(self._engine)
            self._engine, self._counted = engine, {}
        if engine is None:
            return
        for key, n in engine.refusals.items():
            done = self._counted.get(key, 0)
            if n != done:
                self.count(key, n - done)
                self._counted[key] = n

    def poll(self, engine, now: float | None = None) -> list[Event]:
        """The events since the last poll (pure but for the clock)."""
        now = time.time() if now is None else now
        out: list[Event] = []
        self._take_refusals(engine)
        if engine is None:
            return out
        st = engine.state
        refused_hard = {}
        for r in engine.events:
            if r["event"] == "hardlimit":
                refused_hard[(r["level"], r["type"], r["ugid"], r["resource"])] = r["usage"]
        counters = [((1, "container", None), st.level1)]
        if engine.ugid_active:
            counters += [((2, "user", i), o) for i, o in st.users.items()]
            counters += [((2, "group", i), o) for i, o in st.groups.items()]
        alive = set()
        for (level, kind, ugid), obj in counters:
            for res, c in (("space", obj.space), ("inodes", obj.inodes)):
                key = (level, kind, ugid, res)
                alive.add(key)
                seen = self.seen.get(key)
                if seen is None:
                    seen = self.seen[key] = _Seen()
                got = []
                if c.deadline and c.deadline != seen.deadline:
                    got.append("softlimit")
                    seen.expired = False
                elif not c.deadline and seen.deadline and c.soft and c.usage < c.soft:
                    got.append("softbelow")
                if c.deadline and not seen.expired and now >= c.deadline and c.usage > c.soft:
                    got.append("grace_expired")
                    seen.expired = True
                seen.deadline = c.deadline
                if not c.deadline:
                    seen.expired = False
                if level == 1 or c.hard:
                    # at the hard limit: at or over it now, or refused at it
                    mark = refused_hard.get(key)
                    if c.usage >= c.hard:
                        mark = c.usage if mark is None else max(mark, c.usage)
                    if mark is not None:
                        seen.hard_mark = mark if seen.hard_mark is None \
                            else max(seen.hard_mark, mark)
                    elif seen.hard_mark is not None and c.usage < seen.hard_mark:
                        got.append("hardbelow")
                        seen.hard_mark = None
                else:
                    seen.hard_mark = None
                for event in got:
                    out.append(Event(event, self.qid, level, kind, ugid, res,
                                     c.usage, c.soft, c.hard, c.deadline))
                    self.count((event, level, res))
        for key in list(self.seen):
            if key not in alive:
                del self.seen[key]
        while engine.events:
            r = engine.events.popleft()
            key = (r["event"], r["level"], r["type"], r["ugid"], r["resource"])
            ev = Event(r["event"], self.qid, r["level"], r["type"], r["ugid"], r["resource"],
                       r["usage"], r["soft"], r["hard"], r["deadline"], r["request"])
            logged, pending = self.last_refusal.get(key, (None, None))
            if logged is not None and now - logged < self.refusal_every:
                if pending is None:
                    pending = ev
                else:
                    pending.count += 1
                self.last_refusal[key] = (logged, pending)
                continue
            self.last_refusal[key] = (now, None)
            out.append(ev)
        for key, (logged, pending) in list(self.last_refusal.items()):
            if now - logged >= self.refusal_every:
                if pending is not None:
                    self.last_refusal[key] = (now, None)
                    out.append(pending)
                else:
                    del self.last_refusal[key]
        return out
