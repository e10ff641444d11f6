"""The df formula (``simfs.statfs``) against SPEC section 5 as written.

``spec_figures`` transcribes the formula of SPEC section 5 line by line (with
max/min, as the spec states it); ``simfs.statfs.quota_figures`` is the cheap
form the daemon answers every statfs with.  They must agree on every input:
edge cases (usage over soft, soft 0, a host disk shorter than the quota, inode
figures alike) and many seeded random draws.  The mounted behaviour (``df``
inside a quota'd root) is tested in test_quota_mount.py.
"""

from __future__ import annotations

import os
import random
from types import SimpleNamespace

import pytest

from simfs.statfs import FIELDS, host_figures, quota_figures


def spec_figures(lower, soft_bytes, usage_bytes, isoft, icur):
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
    return dict(f_bsize=lower.f_bsize, f_frsize=b, f_blocks=f_blocks, f_bfree=f_bfree,
                f_bavail=f_bavail, f_files=f_files, f_ffree=f_ffree,
                f_favail=min(f_ffree, lower.f_favail), f_namemax=lower.f_namemax)


def lower(bsize=4096, frsize=4096, blocks=1 << 20, bfree=1 << 19, bavail=(1 << 19) - 100,
          files=1 << 16, ffree=1 << 15, favail=(1 << 15) - 10, namemax=255):
    return SimpleNamespace(f_bsize=bsize, f_frsize=frsize, f_blocks=blocks, f_bfree=bfree,
                           f_bavail=bavail, f_files=files, f_ffree=ffree, f_favail=favail,
                           f_namemax=namemax)


EDGES = [
    (lower(), 1 << 30, 1 << 20, 1000, 10),             # far under the soft limits
    (lower(), 1 << 30, 1 << 31, 1000, 5000),           # over both soft limits: 100%
    (lower(), 0, 0, 0, 0),                             # soft 0
    (lower(bfree=10, bavail=5, ffree=3, favail=1), 1 << 30, 4096, 1000, 1),  # host short
    (lower(frsize=0, bsize=1024), 10 << 20, 12345, 7, 7),  # no f_frsize: f_bsize counts
    (lower(), 4095, 0, 1, 0),                          # less than one block of room
]


@pytest.mark.parametrize("args", EDGES)
def test_quota_figures_edges_follow_the_spec(args):
    assert dict(zip(FIELDS, quota_figures(*args))) == spec_figures(*args)


def test_quota_figures_random_draws_follow_the_spec():
    rnd = random.Random(20261130)
    for _ in range(20000):
        b = rnd.choice((512, 1024, 4096, 65536))
        lo = lower(bsize=b, frsize=rnd.choice((0, b)), blocks=rnd.randrange(1 << 40),
                   bfree=rnd.randrange(1 << 30), bavail=rnd.randrange(1 << 30),
                   ffree=rnd.randrange(1 << 24), favail=rnd.randrange(1 << 24))
        args = (lo, rnd.randrange(1 << 42), rnd.randrange(1 << 42),
                rnd.randrange(1 << 26), rnd.randrange(1 << 26))
        assert dict(zip(FIELDS, quota_figures(*args))) == spec_figures(*args), args


def test_host_figures_pass_through_unchanged():
    st = os.statvfs("/")
    assert host_figures(st) == tuple(getattr(st, k) for k in FIELDS)
