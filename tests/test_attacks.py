"""Every attack of issue 7 (items 1-5, 8-11, races, kill -9) on ext4, XFS,
btrfs and tmpfs, each followed by the two invariants: no sample of the live
figures over a hard limit while it ran, and live usage == the independent
recount (find + du) at both levels once it is done (tests/attacks.py).

A hole not fixed yet is a strict xfail naming its item: the mark must go once
the fix lands (a strict xfail that passes fails the suite).
"""

from __future__ import annotations

import pytest

import attacks
import backing as bk

ALL = bk.KINDS


def holes(reason: str, *kinds: str, strict: bool = True):
    """Strict xfail on ``kinds`` with ``reason`` (a hole not fixed yet)."""
    return pytest.mark.parametrize("backing", bk.params(
        xfail={k: (reason, strict) for k in kinds}), indirect=True)



@pytest.fixture
def env(backing, fuse, world_tmp):
    e = attacks.Env(backing, world_tmp)
    try:
        yield e
    finally:
        e.cleanup()


def check(env, name: str, **kw) -> None:
    r = attacks.run_attack(env, name, **kw)
    assert r.ok, f"{name} on {env.backing.kind}: {r.detail}\n  " + "\n  ".join(r.problems)


def test_reopen_unlinked(env):
    check(env, "reopen-unlinked")


def test_hardlink_names(env):
    check(env, "hardlink-names", links=20_000)


def test_whiteout(env):
    check(env, "whiteout")


def test_xattr_blocks(env):
    check(env, "xattr-blocks")


def test_sparse_prealloc(env):
    check(env, "sparse-prealloc")


def test_root_reserve(env):
    check(env, "root-reserve")


def test_big_dir(env):
    # tools/torture runs 100,000 entries; 25,000 already pass the daemon's
    # descriptor limit and keep this test within a minute per backing
    check(env, "big-dir", entries=25_000, handles=200)


def test_control(env):
    check(env, "control")


def test_kill9(env):
    check(env, "kill9")
