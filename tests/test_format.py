"""Exact text of stat/show (vzquota.format), SPEC section 3."""

from vzquota.format import format_ugid, format_usage
from vzquota.model import Counter, Graces, QuotaObject, QuotaState
from vzquota.units import UNLIMITED

NOW = 1_700_000_000
DAY = 86400
K = 1024
HEAD = "   resource          usage       softlimit      hardlimit    grace\n"


def spec_state(**kw) -> QuotaState:
    """The SPEC's example: blocks over soft with 2 days of grace left."""
    st = QuotaState(qid=101, path="/vz/private/101")
    st.level1.space = Counter(1234568 * K, 1048576 * K, 1153434 * K, NOW + 2 * DAY)
    st.level1.inodes = Counter(21000, 200000, 220000, 0)
    st.grace1 = Graces(3 * DAY, 5 * DAY)
    for k, v in kw.items():
        setattr(st, k, v)
    return st


def test_usage_spec_example():
    assert format_usage(spec_state(), NOW) == (
        HEAD
        + "  1k-blocks        1234568*        1048576        1153434    2days\n"
        + "     inodes          21000          200000         220000         \n")


def test_usage_rounds_bytes_up():
    st = QuotaState(qid=1)
    st.level1.space = Counter(1, 0, 0, 0)
    st.level1.inodes = Counter(1, 0, 0, 0)
    assert format_usage(st, NOW).splitlines()[1] == (
        "  1k-blocks              1               0              0         ")


def test_usage_grace_strings():
    st = spec_state()
    def grace(left):
        st.level1.space.deadline = NOW + left
        return format_usage(st, NOW).splitlines()[1][-8:]
    assert grace(29) == "   00:00"
    assert grace(30) == "   00:01"
    assert grace(DAY) == "   1days"
    assert grace(0) == "    none"
    assert grace(-100) == "    none"
    assert grace(3 * 3600 + 25 * 60) == "   03:25"


def test_usage_star_and_deadline_rules():
    st = QuotaState(qid=1)
    # equal to soft: not over, deadline hidden even though one is stored
    st.level1.space = Counter(1000 * K, 1000 * K, 2000 * K, NOW + 60)
    # over hard only (soft 0): star
    st.level1.inodes = Counter(11, 0, 10, 0)
    assert format_usage(st, NOW) == (
        HEAD
        + "  1k-blocks           1000            1000           2000         \n"
        + "     inodes             11*              0             10         \n")
    # one byte over soft: star and deadline
    st.level1.space.usage = 1000 * K + 1
    assert format_usage(st, NOW).splitlines()[1] == (
        "  1k-blocks           1001*           1000           2000    00:01")


def test_usage_unlimited_and_wide_numbers_push_right():
    st = QuotaState(qid=1)
    st.level1.space = Counter(5 * K, UNLIMITED * K, UNLIMITED * K, 0)
    st.level1.inodes = Counter(3, UNLIMITED, UNLIMITED, 0)
    assert format_usage(st, NOW).splitlines()[1:] == [
        "  1k-blocks              5  9223372036854775807 9223372036854775807         ",
        "     inodes              3  9223372036854775807 9223372036854775807         ",
    ]


def test_usage_batch():
    st = spec_state()
    assert format_usage(st, NOW, batch=True) == (
        "       1234568        1048576        1153434 %14d         259200\n" % (NOW + 2 * DAY)
        + "         21000         200000         220000              0         432000\n")
    # deadline hidden at or under soft in -b too
    st.level1.space.usage = 1048576 * K
    assert format_usage(st, NOW, batch=True).splitlines()[0] == (
        "       1048576        1048576        1153434              0         259200")


def ugid_state(**kw) -> QuotaState:
    """The SPEC's -t example: 2nd level on, one user with 1 MiB, 12 inodes."""
    st = spec_state(ugid_on=True, ugid_limit=100, on=True, mounted=True)
    st.user_grace = Graces(7 * DAY, 7 * DAY)
    st.group_grace = Graces(0, 0)              # the SPEC's example: no group graces
    st.users[500] = QuotaObject(Counter(1024 * K, 10000 * K, 12000 * K, 0),
                                Counter(12, 0, 0, 0))
    for k, v in kw.items():
        setattr(st, k, v)
    return st


GRACE_TABLE = (
    "User/group grace times and quotafile flags:\n"
    " type block_exp_time inode_exp_time  dqi_flags\n"
    " user          7days          7days         0h\n"
    "group                                       0h\n")
OBJ_HEAD = ("ID           type  resource       usage   softlimit   hardlimit    grace status\n")


def test_ugid_spec_layout():
    st = ugid_state()
    assert format_ugid(st, NOW, active=True, live=True) == (
        "User/group quota: on,active\n"
        "Ugids: loaded 1, total 1, limit 100\n"
        "Ugid limit was exceeded: no\n"
        "\n" + GRACE_TABLE + "\n"
        "User/group objects:\n" + OBJ_HEAD
        + "500          user 1k-blocks        1024       10000       12000          loaded\n"
        + "500          user    inodes          12           0           0          loaded\n")


def test_ugid_sorting_and_object_grace():
    st = ugid_state()
    st.groups[500] = QuotaObject(Counter(2 * K, 0, 0, 0), Counter(1, 0, 0, 0))
    st.groups[0] = QuotaObject(Counter(0, 0, 0, 0), Counter(3, 3, 0, NOW + 90))
    # usage == soft: the object's deadline is still shown (>= rule)
    st.users[1000] = QuotaObject(Counter(10 * K, 10 * K, 20 * K, NOW + DAY),
                                 Counter(1, 5, 0, NOW + 60))
    lines = format_ugid(st, NOW, active=True, live=True).splitlines()
    assert lines[1] == "Ugids: loaded 4, total 4, limit 100"
    assert lines[lines.index("User/group objects:") + 2:] == [
        "0           group 1k-blocks           0           0           0          loaded",
        "0           group    inodes           3           3           0    00:02 loaded",
        "500          user 1k-blocks        1024       10000       12000          loaded",
        "500          user    inodes          12           0           0          loaded",
        "500         group 1k-blocks           2           0           0          loaded",
        "500         group    inodes           1           0           0          loaded",
        "1000         user 1k-blocks          10          10          20    1days loaded",
        "1000         user    inodes           1           5           0          loaded",
    ]


def test_ugid_show_after_off_and_no_objects():
    st = ugid_state(mounted=False, ugid_on=False, users={})
    assert format_ugid(st, NOW, active=False, live=False) == (
        "User/group quota: off,inactive\n"
        "Ugids: loaded 0, total 0, limit 100\n"
        "Ugid limit was exceeded: no\n"
        "\n" + GRACE_TABLE)


def test_ugid_show_of_a_stopped_quota_has_no_status():
    st = ugid_state(mounted=False)
    out = format_ugid(st, NOW, active=False, live=False)
    assert "User/group quota: on,inactive\n" in out
    assert "Ugids: loaded 0, total 1, limit 100\n" in out
    assert out.endswith(
        "500          user 1k-blocks        1024       10000       12000" + " " * 16 + "\n"
        "500          user    inodes          12           0           0" + " " * 16 + "\n")


def test_ugid_over_limit():
    st = ugid_state(ugid_limit=2, ugid_exceeded=True)
    st.groups[500] = QuotaObject(Counter(0, 0, 0, 0), Counter(1, 0, 0, 0))
    st.groups[7] = QuotaObject(Counter(0, 0, 0, 0), Counter(1, 0, 0, 0))
    out = format_ugid(st, NOW, active=True, live=True)
    assert "*Ugids: loaded 2, total 3, limit 2\nUgid limit was exceeded: yes\n" in out
    rows = out.splitlines()[-6:]
    assert [r[-12:] for r in rows] == ["      loaded"] * 4 + ["       dirty"] * 2


def test_ugid_exceeded_when_loaded_reaches_limit():
    st = ugid_state(ugid_limit=1)
    out = format_ugid(st, NOW, active=True, live=True)
    assert "\nUgids: loaded 1, total 1, limit 1\nUgid limit was exceeded: yes\n" in out


def test_ugid_batch():
    st = ugid_state()
    st.users[500].space.soft = 1000 * K        # over soft, timer running
    st.users[500].space.deadline = NOW + 600
    assert format_ugid(st, NOW, active=True, live=True, batch=True) == (
        "1 1\n"
        "1 1 100\n"
        "0\n"
        " user 604800 604800         0h\n"
        "group 0 0         0h\n"
        "500          user 1k-blocks        1024        1000       12000 %d    1 0\n" % (NOW + 600)
        + "500          user    inodes          12           0           0        0    1 0\n")


def test_ugid_batch_unloaded_sets_exceeded_flag():
    st = ugid_state(ugid_limit=1)
    st.groups[9] = QuotaObject()
    lines = format_ugid(st, NOW, active=True, live=True, batch=True).splitlines()
    assert lines[:3] == ["1 1", "1 2 1", "1"]
    assert lines[-1].endswith("    0 1")
