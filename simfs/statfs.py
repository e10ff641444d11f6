"""``df`` inside the container: the statfs figures of a quota'd root (SPEC section 5).

Role: a pure function from the backing filesystem's figures and the 1st-level
soft limits and usage to the figures the container sees.  Size is the soft limit,
used is the usage; when the host disk has less room than the quota would allow,
the size shrinks (the usage stays true).

Concurrency: pure.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Figures:
    f_bsize: int
    f_frsize: int
    f_blocks: int
    f_bfree: int
    f_bavail: int
    f_files: int
    f_ffree: int
    f_favail: int
    f_namemax: int


def host_figures(lower) -> Figures:
    """The backing filesystem's figures (an ``os.statvfs_result``) as they are."""
    return Figures(lower.f_bsize, lower.f_frsize, lower.f_blocks, lower.f_bfree,
                   lower.f_bavail, lower.f_files, lower.f_ffree, lower.f_favail,
                   lower.f_namemax)


def quota_figures(lower, soft_bytes: int, usage_bytes: int, isoft: int, icur: int) -> Figures:
    """The container's figures under a 1st-level quota (SPEC section 5)."""
    b = lower.f_frsize or lower.f_bsize
    free_q = max(0, soft_bytes - usage_bytes) // b
    adj = max(0, free_q - lower.f_bfree)
    f_bfree = free_q - adj
    f_bavail = min(lower.f_bavail, free_q)
    f_blocks = soft_bytes // b - adj
    free_i = max(0, isoft - icur)
    adj_i = max(0, free_i - lower.f_ffree)
    f_ffree = free_i - adj_i
    f_files = isoft - adj_i
    return Figures(lower.f_bsize, b, f_blocks, f_bfree, f_bavail, f_files, f_ffree,
                   min(f_ffree, lower.f_favail), lower.f_namemax)
