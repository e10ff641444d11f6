"""The quota rules of SPEC section 4, on the engine alone (no mount, fake clock)."""

from __future__ import annotations

import pytest

from vzquota.engine import QuotaEngine
from vzquota.errors import QuotaExceeded
from vzquota.model import QuotaState

K = 1024


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def engine(bsoft=100, bhard=120, isoft=10, ihard=12, bgrace=60, igrace=60,
           ugid_limit=0, clock=None) -> QuotaEngine:
    st = QuotaState(qid=101)
    st.level1.space.soft, st.level1.space.hard = bsoft * K, bhard * K
    st.level1.inodes.soft, st.level1.inodes.hard = isoft, ihard
    st.grace1.space, st.grace1.inodes = bgrace, igrace
    if ugid_limit:
        st.ugid_on, st.ugid_limit = True, ugid_limit
    return QuotaEngine(st, clock or Clock())


def test_hard_limit_is_inclusive():
    e = engine(bsoft=0, bhard=120)
    e.commit(e.reserve(0, 0, 120 * K))
    assert e.state.level1.space.usage == 120 * K
    with pytest.raises(QuotaExceeded):
        e.reserve(0, 0, 1)


def test_level1_zero_hard_limit_allows_nothing():
    e = engine(bsoft=0, bhard=0, isoft=0, ihard=0)
    with pytest.raises(QuotaExceeded):
        e.reserve(0, 0, 1)
    with pytest.raises(QuotaExceeded):
        e.reserve(0, 0, 0, 1)


def test_reserve_holds_until_commit_or_release():
    e = engine(bsoft=0, bhard=100)
    r = e.reserve(0, 0, 60 * K)
    with pytest.raises(QuotaExceeded):
        e.reserve(0, 0, 60 * K)          # the first reservation counts
    e.release(r)
    assert e.state.level1.space.usage == 0
    r = e.reserve(0, 0, 60 * K)
    e.commit(r, 4 * K)                    # charge what was really allocated
    assert e.state.level1.space.usage == 4 * K
    assert e.state.level1.space.rsv == 0


def test_soft_crossing_starts_timer_then_expiry_refuses():
    clock = Clock()
    e = engine(bsoft=100, bhard=200, bgrace=60, clock=clock)
    e.commit(e.reserve(0, 0, 100 * K))
    assert e.state.level1.space.deadline == 0     # equal to soft is not over
    e.commit(e.reserve(0, 0, 10 * K))
    assert e.state.level1.space.deadline == clock.t + 60
    clock.t += 59
    e.commit(e.reserve(0, 0, K))                  # still in grace
    clock.t += 1
    with pytest.raises(QuotaExceeded):
        e.reserve(0, 0, K)
    assert e.room(0, 0) == 0


def test_dropping_strictly_below_soft_clears_timer():
    clock = Clock()
    e = engine(bsoft=100, bhard=200, clock=clock)
    e.commit(e.reserve(0, 0, 110 * K))
    assert e.state.level1.space.deadline
    e.free(0, 0, 10 * K)                          # back to exactly soft
    assert e.state.level1.space.deadline
    e.free(0, 0, K)
    assert e.state.level1.space.deadline == 0


def test_grace_zero_allows_exactly_one_crossing():
    e = engine(bsoft=100, bhard=200, bgrace=0)
    e.commit(e.reserve(0, 0, 101 * K))
    with pytest.raises(QuotaExceeded):
        e.reserve(0, 0, K)


def test_inode_limits():
    e = engine(isoft=2, ihard=3, igrace=0)
    for _ in range(3):
        e.commit(e.reserve(0, 0, 0, 1))
    with pytest.raises(QuotaExceeded):
        e.reserve(0, 0, 0, 1)
    e.free(0, 0, 0, 1)
    assert e.state.level1.inodes.usage == 2


def test_free_never_fails_and_clamps(caplog):
    e = engine()
    e.free(0, 0, 10 * K, 1)
    assert e.state.level1.space.usage == 0 and e.state.level1.inodes.usage == 0
    assert "underflow" in caplog.text


def test_room_is_tightest_level():
    e = engine(bsoft=0, bhard=1000, ugid_limit=10)
    e.state.users[500] = e.state.users.get(500) or __import__("vzquota.model").model.QuotaObject()
    e.state.users[500].space.hard = 10 * K
    assert e.room(500, 500) == 10 * K
    assert e.room(501, 500) == 1000 * K


def test_level2_all_or_nothing():
    e = engine(bsoft=0, bhard=1000, ugid_limit=10)
    from vzquota.model import QuotaObject
    e.state.groups[7] = QuotaObject()
    e.state.groups[7].space.hard = 5 * K
    with pytest.raises(QuotaExceeded):
        e.reserve(500, 7, 6 * K)
    assert e.state.level1.space.rsv == 0
    assert 500 not in e.state.users or e.state.users[500].space.rsv == 0
    e.commit(e.reserve(500, 8, 6 * K))            # another group is fine
    assert e.state.users[500].space.usage == 6 * K
    assert e.state.groups[8].space.usage == 6 * K


def test_ugid_limit_refuses_one_more_id():
    e = engine(bsoft=0, bhard=1000, ugid_limit=3)
    e.commit(e.reserve(1, 1, K, 1))               # uid 1 + gid 1
    e.commit(e.reserve(2, 1, K, 1))               # uid 2: three ids now
    with pytest.raises(QuotaExceeded):
        e.reserve(3, 1, K, 1)
    assert e.state.ugid_exceeded
    assert e.state.level1.space.usage == 2 * K


def test_transfer_moves_usage_and_refuses_full_owner():
    from vzquota.model import QuotaObject
    e = engine(bsoft=0, bhard=1000, ugid_limit=10)
    e.commit(e.reserve(1, 1, 10 * K, 1))
    e.state.users[2] = QuotaObject()
    e.state.users[2].space.hard = 5 * K
    with pytest.raises(QuotaExceeded):
        e.transfer(1, 1, 2, 1, 10 * K, 1)
    assert e.state.users[1].space.usage == 10 * K
    assert e.state.users[2].space.usage == 0
    e.transfer(1, 1, 3, 1, 10 * K, 1)
    assert 1 not in e.state.users                 # emptied, no limits: dropped
    assert e.state.users[3].space.usage == 10 * K
    assert e.state.users[3].inodes.usage == 1
    assert e.state.level1.space.usage == 10 * K   # 1st level unchanged


def test_set_usage_replaces_and_restarts_timers():
    clock = Clock()
    e = engine(bsoft=100, bhard=200, ugid_limit=10, clock=clock)
    e.set_usage(150 * K, 3, {5: [150 * K, 3]}, {6: [150 * K, 3]})
    assert e.state.level1.space.usage == 150 * K
    assert e.state.level1.space.deadline == clock.t + 60
    assert e.state.users[5].inodes.usage == 3
    e.set_usage(10 * K, 1, {}, {})
    assert e.state.users == {} and e.state.groups == {}
    assert e.state.level1.space.deadline == 0
