"""Exit codes and the one error type every vzquota layer raises.

Role: the codes are part of the user contract (SPEC section 3; vzquota(8) EXIT
STATUS mirrors this table, and a test checks that it does). The CLI turns a
``VzError`` into ``vzquota : (error) <message>`` on stderr and its exit code.

Concurrency: constants and exception classes only.
"""

from __future__ import annotations

EC_OK = 0
EC_SYSERR = 1          # system error
EC_USAGE = 2           # usage error (also soft > hard, bad time)
EC_LIVE = 3            # the live mount refused or failed the request
EC_QUOTAFILE = 4       # quota file error (corrupt, unreadable)
EC_RUN = 5             # quota already on
EC_NOTRUN = 6          # quota not on
EC_LOCKED = 7          # quota file locked by another vzquota
EC_EXDEV = 8           # the scan crossed a mount point
EC_UGID_NOTRUN = 9     # stat -t with the 2nd level inactive
EC_QUOTADIRTY = 10     # show of a dirty file
EC_NOQUOTAFILE = 11    # no quota file
EC_NOPATH = 13         # no path known for the quota

EXIT_CODES = {
    EC_OK: "success",
    EC_SYSERR: "system error",
    EC_USAGE: "usage error (also soft limit above hard limit, bad time)",
    EC_LIVE: "the live mount refused or failed the request",
    EC_QUOTAFILE: "quota file error (corrupt, unreadable)",
    EC_RUN: "quota is already on",
    EC_NOTRUN: "quota is not on",
    EC_LOCKED: "quota file is locked by another vzquota",
    EC_EXDEV: "the scan crossed a mount point",
    EC_UGID_NOTRUN: "stat -t with the 2nd level quota inactive",
    EC_QUOTADIRTY: "show of a dirty quota file (printed, but usage may be wrong)",
    EC_NOQUOTAFILE: "no quota file",
    EC_NOPATH: "no path is known for the quota",
}


class VzError(Exception):
    """A failure the user must see: a message and an exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class CrossDevice(VzError):
    """The scanner met another filesystem mounted inside the private area."""

    def __init__(self, path: str):
        super().__init__(EC_EXDEV, f"Quota tree {path!s} crosses a mount point; "
                         "another filesystem is mounted inside the private area")
        self.path = path


class QuotaExceeded(Exception):
    """An allocation was refused (maps to EDQUOT). ``level`` is 1 or 2.
    ``event``: what the refusal is about, for the owner to report once the
    refusal is final (``QuotaEngine.report``); None when nothing is to be."""

    def __init__(self, level: int, what: str, room: int = 0, event: dict | None = None):
        super().__init__(f"level {level} {what} quota exceeded")
        self.level = level
        self.what = what
        self.room = room
        self.event = event
