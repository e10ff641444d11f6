"""The container's own quota administrator: 2nd-level limits and grace times
set from inside the container, through its mount (OpenVZ's container root ran
setquota for its users; quotactl cannot reach a FUSE filesystem, so simfs
offers a virtual attribute of the root directory instead).

Role: the decisions.  A mount started with ``-o quota_admin[=UID]`` lets one
caller -- the uid the host names as the container's root, 0 by default -- write
``ADMIN_XATTR`` on the root directory; ``QuotaAdmin.request`` checks who
calls, checks what was sent and applies it through ``LiveQuota.handle`` as a
``setlimit2`` control request: the same schema (``service.REQUESTS``), rules
(hard >= soft) and quota-file save as ``vzquota setlimit2`` from the host,
applied live, undone whole when the save fails.  Only ``setlimit2`` gets
through: the 1st level, the ugid limit and everything else stay the host's.
A refusal is an ``OSError`` with an errno (``EPERM`` for any other caller) and
a log line; every change is logged with the caller's uid and pid (at most
``LOG_BURST`` lines per ``LOG_WINDOW`` seconds, the rest counted).

The value written is one JSON object, the keys of a ``setlimit2`` request:
``{"kind": "user"|"group", "id": N, "bsoft": KiB, "bhard": KiB, "isoft": N,
"ihard": N}`` or ``{"kind": ..., "bgrace": S, "igrace": S}`` (``"cmd":
"setlimit2"`` may be given too).  Limits of 0 clear.

It also makes what any caller reads of the quota from inside
(``caller_view``: the virtual ``user.vzquota`` attribute of the root).

Pure Python, no FUSE: simfs/ops.py only passes the caller and the value here.

Concurrency: called on the mount's event loop, as control requests are, so
nothing else changes the state while a request is applied.
"""

from __future__ import annotations

import errno
import json
import logging
import time
from typing import Callable

from .errors import EC_LIVE, EC_LOCKED, EC_NOTRUN, EC_USAGE, VzError
from .model import GROUP, USER
from .service import LiveQuota, validate_request

log = logging.getLogger(__name__)

ADMIN_XATTR = b"user.vzquota.admin"   # write-only, virtual, on the root only
MAX_REQUEST = 4096                    # bytes of JSON; a longer value is refused unread
LOG_BURST = 30                        # log lines about requests from inside ...
LOG_WINDOW = 60.0                     # ... per this many seconds; the rest are counted

# VzError codes of LiveQuota.handle -> the errno the caller gets
ERRNO_OF = {EC_USAGE: errno.EINVAL, EC_LIVE: errno.EINVAL, EC_NOTRUN: errno.ESRCH,
            EC_LOCKED: errno.EBUSY}


class _LogBudget:
    """At most LOG_BURST lines per LOG_WINDOW seconds; the lines left out are
    counted and named in the next line that is written."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.start = 0.0
        self.used = 0
        self.skipped = 0

    def line(self, msg: str, *args) -> None:
        now = self.clock()
        if now - self.start >= LOG_WINDOW:
            self.start, self.used = now, 0
        if self.used >= LOG_BURST:
            self.skipped += 1
            return
        self.used += 1
        if self.skipped:
            msg += " (%d more requests from inside were not logged)"
            args += (self.skipped,)
            self.skipped = 0
        log.warning(msg, *args)


_budget_without_quota = _LogBudget(time.monotonic)


def caller_view(q, admin: "QuotaAdmin | None", uid: int, gid: int,
                groups: Callable[[], set[int]]) -> bytes:
    """The caller's own view of quota engine ``q``, as JSON: the container's
    1st level, and the 2nd-level objects of the caller's uid and gids
    (``groups()``: its supplementary ones, read only when needed; root and
    the quota administrator see all)."""
    st = q.state

    def obj(o) -> dict:
        return {"blocks": {"usage": -(-o.space.usage // 1024), "soft": o.space.soft // 1024,
                           "hard": o.space.hard // 1024, "deadline": o.space.deadline},
                "inodes": {"usage": o.inodes.usage, "soft": o.inodes.soft,
                           "hard": o.inodes.hard, "deadline": o.inodes.deadline}}
    out = {"quotaid": st.qid, "now": q.now(), "container": obj(st.level1),
           "grace": {"blocks": st.grace1.space, "inodes": st.grace1.inodes},
           "ugid": {"active": q.ugid_active}}
    if admin is not None:
        out["admin"] = admin.describe(uid)
    if q.ugid_active:
        if uid == 0 or (admin is not None and admin.allows(uid)):
            uids, gids = set(st.users), set(st.groups)
        else:
            uids = {uid}
            gids = {gid} | set(groups())
        for kind, ids in ((USER, uids), (GROUP, gids)):
            table = st.table(kind)
            g = st.grace2(kind)
            out[kind + "s"] = {str(i): obj(table[i]) for i in sorted(ids) if i in table}
            out[kind + "_grace"] = {"blocks": g.space, "inodes": g.inodes}
    return json.dumps(out, sort_keys=True).encode() + b"\n"


def refuse_without_quota(uid: int, pid: int) -> None:
    """A write of ADMIN_XATTR on a mount that carries no quota: EPERM."""
    _budget_without_quota.line("quota limits from inside refused: uid %d (pid %d): "
                               "this mount has no quota", uid, pid)
    raise OSError(errno.EPERM, "this mount has no quota")


class QuotaAdmin:
    """Who may set the 2nd-level limits of ``live`` from inside (``uid``; None
    when the host did not allow it), and the way they are set."""

    def __init__(self, live: LiveQuota, uid: int | None,
                 clock: Callable[[], float] = time.monotonic):
        self.live = live
        self.uid = uid
        self.budget = _LogBudget(clock)

    def allows(self, uid: int) -> bool:
        return self.uid is not None and uid == self.uid

    def describe(self, uid: int) -> dict:
        """For the caller's report: whether the host allows administration
        from inside, and whether this caller is the administrator."""
        return {"enabled": self.uid is not None, "you": self.allows(uid)}

    def request(self, uid: int, pid: int, value: bytes) -> None:
        """Apply one request written by ``uid`` (process ``pid``), or raise
        ``OSError`` with the errno to answer; either way one log line."""
        qid = self.live.state.qid
        who = f"uid {uid} (pid {pid})"
        try:
            if self.uid is None:
                raise OSError(errno.EPERM, "the host has not allowed quota administration "
                              "from inside (no -o quota_admin)")
            if uid != self.uid:
                raise OSError(errno.EPERM, f"only uid {self.uid} may set quota limits "
                              "from inside")
            req = self._parse(value)
            what = self._apply(req)
        except OSError as e:
            self.budget.line("quota %d: limits from inside refused: %s: %s (%s)", qid, who,
                             e.strerror, errno.errorcode.get(e.errno, e.errno))
            raise
        self.budget.line("quota %d: %s inside the container set %s", qid, who, what)

    # ---- the parts -----------------------------------------------------------

    @staticmethod
    def _parse(value: bytes) -> dict:
        """The JSON of a setlimit2 request, checked against the control
        socket's schema; EINVAL when it is anything else."""
        if len(value) > MAX_REQUEST:
            raise OSError(errno.EINVAL, f"bad request: longer than {MAX_REQUEST} bytes")
        try:
            req = json.loads(value)
        except (ValueError, RecursionError):
            raise OSError(errno.EINVAL, "bad request: not valid JSON") from None
        if type(req) is not dict:
            raise OSError(errno.EINVAL, "bad request: not a JSON object")
        cmd = req.setdefault("cmd", "setlimit2")
        if cmd != "setlimit2":
            raise OSError(errno.EINVAL, f"bad request: only setlimit2 is allowed from "
                          f"inside, not {str(cmd)[:40]!r}")
        try:
            return validate_request(req)
        except VzError as e:
            raise OSError(errno.EINVAL, e.message) from None

    def _apply(self, req: dict) -> str:
        """Apply a valid request through LiveQuota.handle; returns what was done,
        for the log."""
        live = self.live
        engine = live.engine
        if live.dropped or engine is None:
            raise OSError(errno.ESRCH, "the container's quota is off")
        if not engine.ugid_active:
            raise OSError(errno.ESRCH, "per-user and per-group quotas are off in this "
                          "container")
        st = live.state
        kind = GROUP if req.get("kind") == GROUP else USER
        if "id" in req:
            limits = (req["bsoft"], req["bhard"], req["isoft"], req["ihard"])
            what = (f"the limits of {kind} {req['id']}: blocks {limits[0]} soft, "
                    f"{limits[1]} hard (1K); inodes {limits[2]} soft, {limits[3]} hard")
            if req["id"] not in st.table(kind):
                if not any(limits):
                    return what + " (it had none)"      # nothing to clear: no new object
                if len(st.users) + len(st.groups) >= st.ugid_limit:
                    raise OSError(errno.EDQUOT, f"the container tracks at most "
                                  f"{st.ugid_limit} uids and gids (ugid limit)")
        else:
            what = (f"the {kind} grace times: blocks {req['bgrace']} s, "
                    f"inodes {req['igrace']} s")
        try:
            live.handle(req)
        except VzError as e:
            raise OSError(ERRNO_OF.get(e.code, errno.EIO), e.message.strip()) from None
        return what
