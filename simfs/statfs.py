"""``df`` inside the container: the statfs figures of a quota'd root (SPEC section 5).

Role: a pure function from the backing filesystem's figures and the 1st-level
soft limits and usage to the figures the container sees.  Size is the soft limit,
used is the usage; when the host disk has less room than the quota would allow,
the size shrinks (the usage stays true).

Both functions return a plain tuple in ``FIELDS`` order: they run for every
``statfs`` request, so they avoid per-call objects and builtin calls (the
formula as SPEC section 5 writes it is the reference in tests/test_statfs.py).

Concurrency: pure.
"""

from __future__ import annotations

FIELDS = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
          "f_files", "f_ffree", "f_favail", "f_namemax")


def host_figures(lower) -> tuple:
    """The backing filesystem's figures (an ``os.statvfs_result``) as they are."""
    return (lower.f_bsize, lower.f_frsize, lower.f_blocks, lower.f_bfree,
            lower.f_bavail, lower.f_files, lower.f_ffree, lower.f_favail,
            lower.f_namemax)


def quota_figures(lower, soft_bytes: int, usage_bytes: int, isoft: int, icur: int) -> tuple:
    """The container's figures under a 1st-level quota (SPEC section 5)."""
    b = lower.f_frsize or lower.f_bsize
    free_q = (soft_bytes - usage_bytes) // b if soft_bytes > usage_bytes else 0
    adj = free_q - lower.f_bfree if free_q > lower.f_bfree else 0     # the disk is short
    bavail = lower.f_bavail if lower.f_bavail < free_q else free_q
    free_i = isoft - icur if isoft > icur else 0
    adj_i = free_i - lower.f_ffree if free_i > lower.f_ffree else 0
    ffree = free_i - adj_i
    favail = ffree if ffree < lower.f_favail else lower.f_favail
    return (lower.f_bsize, b, soft_bytes // b - adj, free_q - adj, bavail,
            isoft - adj_i, ffree, favail, lower.f_namemax)
