"""Plain data of one quota: counters, limits, grace timers, flags.

Role: the shared vocabulary of the engine, the quota file, the formatter and the
CLI. Units: space in *bytes*, inodes as counts, times as integer epoch seconds.
The CLI converts to and from 1 KiB blocks at its edge.

Concurrency: plain mutable dataclasses with no locking; whoever owns a
``QuotaState`` (the engine inside one mount, or one CLI process holding the
file lock) is the only writer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

USER = "user"
GROUP = "group"


@dataclass
class Counter:
    """One resource (space or inodes) of one quota object."""

    usage: int = 0          # bytes or inodes in use
    soft: int = 0           # 0 = no soft limit (at the 1st level: see engine)
    hard: int = 0           # 0 = no hard limit at the 2nd level, nothing allowed at the 1st
    deadline: int = 0       # grace deadline, epoch seconds; 0 = no timer running
    rsv: int = 0            # reserved by allocations in flight (in memory only)

    def copy(self) -> "Counter":
        return Counter(self.usage, self.soft, self.hard, self.deadline, self.rsv)


@dataclass
class QuotaObject:
    """Space + inodes of one quota object (the whole area, one uid or one gid)."""

    space: Counter = field(default_factory=Counter)
    inodes: Counter = field(default_factory=Counter)

    def copy(self) -> "QuotaObject":
        return QuotaObject(self.space.copy(), self.inodes.copy())


@dataclass
class Graces:
    """Grace periods in seconds."""

    space: int = 0
    inodes: int = 0


# The grace times a 2nd level starts with: the kernel quota's defaults
# (include/linux/quota.h, later quotaio_v1.h: MAX_DQ_TIME and MAX_IQ_TIME,
# 7*24*60*60, one week), as the uid/gid quotas of the original's kernel had them.
# With 0 a soft limit would act as a hard one.
MAX_DQ_TIME = 604800
MAX_IQ_TIME = 604800


def default_ugid_graces() -> Graces:
    return Graces(MAX_DQ_TIME, MAX_IQ_TIME)


@dataclass
class QuotaState:
    """Everything the quota file stores about one quota id."""

    qid: int
    path: str | None = None                 # the private area
    level1: QuotaObject = field(default_factory=QuotaObject)
    grace1: Graces = field(default_factory=Graces)
    # 2nd level
    ugid_on: bool = False                   # -s 1
    ugid_limit: int = 0                     # -u N: distinct uids+gids tracked
    user_grace: Graces = field(default_factory=default_ugid_graces)
    group_grace: Graces = field(default_factory=default_ugid_graces)
    users: dict[int, QuotaObject] = field(default_factory=dict)
    groups: dict[int, QuotaObject] = field(default_factory=dict)
    ugid_exceeded: bool = False
    # flags
    on: bool = False            # `vzquota on` was given (accounting wanted)
    mounted: bool = False       # a mount is accounting it right now (crash detector)
    dirty: bool = False         # usage may be wrong: rescan before trusting it

    def table(self, kind: str) -> dict[int, QuotaObject]:
        return self.users if kind == USER else self.groups

    def grace2(self, kind: str) -> Graces:
        return self.user_grace if kind == USER else self.group_grace
