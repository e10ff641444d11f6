"""Every tunable of a mount, in one object.

Role: ``Config`` holds each figure the daemon runs by (descriptor budget,
inode cap, open-file shares, the ledger's ages and bounds, cache times, the
recount's pacing...), each field with its default and meaning.  The command
line builds one from the mount options (``from_options``: the fields that
have an option); the mount passes it to the operations, the inode table, the
ledger and the pruner; nothing else keeps a module constant for a tunable.
simfs(8), RESOURCES, lists the same fields (tests/test_docs.py checks it).

A field's ``metadata`` says its meaning (``doc``) and, for those a mount
option sets, the option's name (``option``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vzquota.service import HOLD_MAX, RECOUNT_WAIT


def _f(default, doc: str, option: str | None = None):
    return field(default=default, metadata={"doc": doc, "option": option})


@dataclass(frozen=True)
class Config:
    # ---- descriptors and open files (simfs.inodes: Budget, OpenShares) ----------------
    max_open: int = _f(65536, "open files and directories the container may hold at "
                       "once, one descriptor each", "maxopen")
    reserve_fds: int = _f(160, "descriptors kept for the daemon's own use (control "
                          "socket and clients, quota file, checkpoints, fsync threads)")
    cached_fds: int = _f(4096, "O_PATH descriptors of looked-up inodes kept open (an "
                         "LRU; the others are reopened from their file handle)")
    pinned_fds: int = _f(4096, "descriptors never evicted: inodes unlinked while the "
                         "container still holds them, or every inode on a backing "
                         "filesystem without file handles")
    root_reserve: int = _f(16, "1/N of max_open (at least 1) only uid 0 may use")
    user_share: int = _f(4, "one uid may hold at most 1/N of the rest of max_open")
    # ---- the inode table's cap (simfs.inodes, simfs.prune) ----------------------------
    max_inodes: int = _f(200_000, "inodes the daemon keeps before it asks the kernel to "
                         "forget the least recently looked-up ones", "maxinodes")
    prune_slack: int = _f(16, "a prune pass goes down to 1/N below max_inodes")
    prune_max: int = _f(2048, "inodes asked of the kernel per prune pass at most")
    prune_gap: float = _f(0.005, "seconds between prune passes at least")
    prune_gap_max: float = _f(1.0, "seconds between prune passes at most while the "
                              "kernel lets none go (the gap doubles after each such pass)")
    prune_every: float = _f(1.0, "seconds between the mount's checks of the table "
                            "against its cap")
    forget_retry: float = _f(0.01, "seconds after the last close of a file kept without "
                             "holes (a shared writer beside passthrough readers) after which "
                             "the kernel is asked again to forget it if it has not (then 10 "
                             "and 100 times that)")
    shared_max: int = _f(4096, "distinct uid, gid, mode and size values inode records "
                         "share (one int object each)")
    shared_space: int = _f(1 << 20, "allocations below this many bytes are shared "
                           "values too")
    # ---- the request handlers (simfs.ops) --------------------------------------------
    entry_timeout: float = _f(60.0, "seconds the kernel caches entries and attributes "
                              "(every change comes through the daemon)")
    read_nowait: int = _f(32 << 10, "bytes from which a read the backing page cache "
                          "cannot serve at once goes to a worker thread")
    passthrough_min: int = _f(128 << 10, "bytes from which a file opened for reading only is "
                              "read by passthrough when no open of it is already (a smaller "
                              "one stays in the FUSE page cache; -o passthrough: 0)")
    backing_parked: int = _f(1024, "passthrough backing ids kept registered after their "
                             "file's last close, so that its next passthrough open needs "
                             "no ioctl (the least recently closed go first; 0: none)",
                             "maxparked")
    acl_negative: int = _f(4096, "directories remembered (for entry_timeout seconds, "
                           "or until a default ACL is set through the mount) to have no "
                           "default ACL, so that a create there reads none")
    gap_zeros: int = _f(1 << 20, "bytes of a gap past the end of a file kept without "
                        "holes (a shared writer beside passthrough readers) written with "
                        "zeros; a write past a larger gap is refused (ETXTBSY)")
    readahead_kb: int = _f(1024, "KiB the kernel reads ahead in a file of the mount "
                           "(its read_ahead_kb, set once INIT is answered; default "
                           "binding only): 1024 is one READ of the largest size")
    # ---- the ledger of charges (simfs.ledger) ----------------------------------------
    write_slack: int = _f(1 << 20, "bytes of room a write needs past itself to be "
                          "reserved without looking at its file; closer to a limit "
                          "the file's allocation is forced first")
    dir_growth: int = _f(4, "blocks reserved for a directory taking one more name "
                         "(raised to the largest growth seen)")
    host_edge: int = _f(64 << 20, "bytes left to non-root callers on the backing "
                        "filesystem below which its f_bavail is read before every "
                        "allocation")
    host_ttl: float = _f(1.0, "seconds between reads of the backing filesystem's "
                         "f_bavail above host_edge")
    gaps_held: int = _f(1024, "inodes kept after the kernel let go because a hard "
                        "limit left part of their blocks uncharged")
    follow_max: int = _f(4096, "files closed with delayed blocks followed at once (past "
                         "it a last close forces its file's allocation)")
    sweep_max: int = _f(512, "followed files looked at per sweep")
    writeback_age: float = _f(2.0, "seconds after its close from which a followed "
                              "file's writeback is done by the sweep")
    sweep_every: float = _f(1.0, "seconds between sweeps of followed files")
    # ---- the quota's life on the mount (simfs.mount) -----------------------------------
    checkpoint: float = _f(30.0, "seconds between saves of the usage to the quota file",
                           "checkpoint")
    recount_hold: float = _f(HOLD_MAX, "seconds one live recount pass may hold the requests "
                             "that change names or allocations (0: never)", "recounthold")
    recount_wait: float = _f(RECOUNT_WAIT, "seconds a call that would allocate waits "
                             "for a live `on`'s first recount pass (its figures may be "
                             "short) before it fails with EDQUOT", "recountwait")
    recount_passes: int = _f(5, "live recount passes made before one is given up as "
                             "not exact")
    retry_quiet: float = _f(1.0, "seconds without a change of names or allocations "
                            "after which an inexact recount is made again")
    retry_first: float = _f(10.0, "seconds after which it is made again anyway "
                            "(doubling after each inexact one)")
    retry_max: float = _f(300.0, "seconds between such retries at most")
    events_every: float = _f(1.0, "seconds between looks at the quota's counters for "
                             "limit events")
    refusal_every: float = _f(60.0, "seconds between log lines of refusals of one "
                              "counter (the next line says how many)")
    hooks_max: int = _f(4, "hook processes running at once (-o hook)")
    closer_idle: float = _f(1.0, "seconds without work after which the thread that "
                            "closes unlinked inodes' descriptors ends")

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def from_options(cls, own: dict, **more) -> "Config":
        """A Config with the mount options ``own`` (name -> value, already
        checked by the command line) in the fields that have one."""
        kw = dict(more)
        for f in dataclasses.fields(cls):
            opt = f.metadata["option"]
            if opt is not None and own.get(opt) is not None:
                kw[f.name] = type(f.default)(own[opt])
        return cls(**kw)

    def replace(self, **kw) -> "Config":
        return dataclasses.replace(self, **kw)


DEFAULT = Config()
