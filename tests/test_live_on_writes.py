"""A live `vzquota on` (and `recalc`) while a container's users keep creating and
unlinking files (issue 21, item 2): the recount converges (exit 0), the mount
never enforces a figure short of the tree, and after filling to the limit the
live usage equals the independent recount and never passed the hard limit.
Exactness against ``backing.recount`` (find + du), not the project's scanner."""

from __future__ import annotations

import errno
import os
import subprocess
import textwrap
import time

import pytest

from backing import Sampler, live, params, recount
from conftest import vzquota

K = 1024

# Creates and unlinks 256 KiB files in a loop until the stop file appears.
WRITER = textwrap.dedent("""
    import os, sys
    d, stop, tag = sys.argv[1], sys.argv[2], sys.argv[3]
    buf = b"w" * (256 << 10)
    i = 0
    while not os.path.exists(stop):
        try:
            with open(f"{d}/{tag}-{i % 8}", "wb") as f:
                f.write(buf)
        except OSError:
            pass
        try:
            os.unlink(f"{d}/{tag}-{(i + 4) % 8}")
        except OSError:
            pass
        i += 1
    print(i)
""")

# Writes 64 KiB chunks into new files until the quota refuses (EDQUOT).
FILL = textwrap.dedent("""
    import errno, os, sys
    d = sys.argv[1]
    buf = b"f" * (64 << 10)
    for i in range(100000):
        try:
            with open(f"{d}/fill-{i}", "wb") as f:
                for _ in range(16):
                    f.write(buf)
        except OSError as e:
            print(errno.errorcode[e.errno])
            break
""")


class Writers:
    """Two uid-1000 processes creating and unlinking 256 KiB files."""

    def __init__(self, root, world_tmp, n: int = 2):
        self.dir = root / "w"
        self.dir.mkdir(exist_ok=True)
        os.chown(self.dir, 1000, 1000)
        self.stop = world_tmp / f"stop-{time.monotonic_ns()}"
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self):
        from conftest import USER_PYTHON
        for t in range(self.n):
            self.procs.append(subprocess.Popen(
                [USER_PYTHON, "-c", WRITER, str(self.dir), str(self.stop), f"t{t}"],
                user=1000, group=1000, stdout=subprocess.PIPE, text=True))
        # wait until they are under way
        deadline = time.monotonic() + 30
        while len(os.listdir(self.dir)) < 2 * self.n:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.stop.touch()
        for p in self.procs:
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0
            assert int(out) > 0


def fill_tree(root, dirs: int = 20, files: int = 100):
    """A tree the scan needs a while for."""
    for d in range(dirs):
        (root / f"d{d}").mkdir()
        for f in range(files):
            (root / f"d{d}" / f"f{f}").write_bytes(b"x" * 100)


def diff(private, qid) -> list[str]:
    rc, lv = recount(private), live(qid)
    out = []
    if (lv.space, lv.inodes) != (rc.space, rc.inodes):
        out.append(f"level 1: live {lv.space}/{lv.inodes} != recount "
                   f"{rc.space}/{rc.inodes}")
    for name, a, b in (("uid", lv.users, rc.users), ("gid", lv.groups, rc.groups)):
        for i in sorted(set(a) | set(b)):
            if a.get(i, (0, 0)) != b.get(i, (0, 0)):
                out.append(f"{name} {i}: live {a.get(i)} != recount {b.get(i)}")
    return out


def settled(private, qid, timeout: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        d = diff(private, qid)
        if not d or time.monotonic() > deadline:
            return d
        time.sleep(0.1)


@pytest.mark.parametrize("backing", params(only=("ext4", "xfs")), indirect=True)
def test_on_under_writes_is_exact_and_the_limit_holds(backing, backing_quota, world_tmp):
    """The repro: `off`, then `on` while two uid-1000 writers create and unlink
    256 KiB files: `on` exited 3 and the mount enforced the last pass's figure,
    so after filling to the limit the live usage said hard while the recount
    said more."""
    hard = 60000                                  # KiB
    qm = backing_quota(B=hard, I=100000)
    fill_tree(qm.root)
    vzquota("off", qm.qid)
    (qm.root / "while-off").write_bytes(b"o" * (512 * K))        # uncounted
    with Writers(qm.root, world_tmp):
        for _ in range(3):
            r = vzquota("on", qm.qid, check=False)
            assert r.returncode == 0, r.stderr
            vzquota("off", qm.qid)
        r = vzquota("on", qm.qid, check=False)
        assert r.returncode == 0, r.stderr
    assert not settled(qm.private, qm.qid), diff(qm.private, qm.qid)
    # fill to the limit as uid 1000, while the writers run again
    sampler = Sampler(qm.qid)
    sampler.start()
    try:
        with Writers(qm.root, world_tmp):
            from conftest import USER_PYTHON
            r = subprocess.run([USER_PYTHON, "-c", FILL, str(qm.root / "w")], user=1000,
                               group=1000, capture_output=True, text=True, timeout=300)
            assert r.stdout.strip() == "EDQUOT", r
    finally:
        sampler.stop()
    assert not sampler.violations, sampler.violations
    assert sampler.samples > 0, sampler.errors
    assert not settled(qm.private, qm.qid), diff(qm.private, qm.qid)
    assert live(qm.qid).space <= hard * K


@pytest.mark.parametrize("runtime", ["uvloop", "trio", "fuse=pyfuse3"])
@pytest.mark.parametrize("backing", params(only=("ext4",)), indirect=True)
def test_recalc_under_steady_writes_converges(backing, backing_quota, mounter, world_tmp,
                                              runtime):
    """`recalc` while two uid-1000 writers create and unlink files: exit 3
    every time before; now it is exact (exit 0) and the figures match."""
    qm = backing_quota(B=200000, I=100000)
    fill_tree(qm.root)
    if runtime != "uvloop":
        qm.mount.umount()
        opt = runtime if "=" in runtime else f"runtime={runtime}"
        mounter(qm.private, qm.root, "dev", "suid", f"quotaid={qm.qid}", opt)
    (qm.private / "from-host").write_bytes(b"h" * (300 * K))     # not counted yet
    with Writers(qm.root, world_tmp):
        for _ in range(3):
            r = vzquota("recalc", qm.qid, check=False)
            assert r.returncode == 0, r.stderr
    assert not settled(qm.private, qm.qid), diff(qm.private, qm.qid)


@pytest.mark.parametrize("backing", params(only=("ext4",)), indirect=True)
def test_an_inexact_recalc_is_made_exact_at_the_first_quiet_moment(backing, backing_quota,
                                                                   mounter, world_tmp):
    """Without holding (-o recounthold=0) a `recalc` under steady writes cannot
    be exact: it says so (exit 3) and leaves the mount's own figures, and the
    mount recounts again by itself once the writers stop, not only at the next
    mount."""
    qm = backing_quota(B=200000, I=100000)
    fill_tree(qm.root)
    qm.mount.umount()
    m = mounter(qm.private, qm.root, "dev", "suid", f"quotaid={qm.qid}", "recounthold=0")
    (qm.private / "from-host").write_bytes(b"h" * (512 * K))      # not counted yet
    with Writers(qm.root, world_tmp):
        r = vzquota("recalc", qm.qid, check=False)
        assert r.returncode == 3 and "not exact" in r.stderr, r
        assert "recounts again at quiet moments" in r.stderr
    deadline = time.monotonic() + 20
    while "the recount is exact now" not in m.logtext():
        assert time.monotonic() < deadline, m.logtext()
        time.sleep(0.1)
    assert not settled(qm.private, qm.qid), diff(qm.private, qm.qid)


@pytest.mark.parametrize("backing", params(only=("ext4",)), indirect=True)
def test_the_first_pass_of_on_holds_whatever_recounthold(backing, backing_quota, mounter,
                                                         world_tmp):
    """-o recounthold=0 (never hold a pass of `recalc`) does not open the
    window of a live `on`: its first pass holds the calls that allocate or
    change names until it ends, so it is exact under steady writes (it was
    not: exit 3 and an upper bound)."""
    qm = backing_quota(B=200000, I=100000)
    fill_tree(qm.root)
    qm.mount.umount()
    m = mounter(qm.private, qm.root, "dev", "suid", f"quotaid={qm.qid}", "recounthold=0")
    for i in range(3):
        vzquota("off", qm.qid)
        (qm.root / f"while-off-{i}").write_bytes(b"o" * (512 * K))        # uncounted
        with Writers(qm.root, world_tmp):
            r = vzquota("on", qm.qid, check=False)
            assert r.returncode == 0, r
        assert not settled(qm.private, qm.qid), (i, diff(qm.private, qm.qid))
    assert "recounted (pass 1, allocations held" in m.logtext()


def _user_py(code: str, *args: str) -> subprocess.Popen:
    from conftest import USER_PYTHON
    return subprocess.Popen([USER_PYTHON, "-c", code, *args], user=1000, group=1000,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _on(qid) -> subprocess.Popen:
    from conftest import VZQUOTA
    return subprocess.Popen([VZQUOTA, "on", str(qid)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _slow_scan_mount(qm, mounter, monkeypatch, go, *options):
    """Remount ``qm`` with live recount passes that wait for the file ``go``
    before they scan (SIMFS_TEST_SCAN_WAIT): a first pass as long as the
    test wants, as a tree too big to scan within the hold would make it."""
    qm.mount.umount()
    monkeypatch.setenv("SIMFS_TEST_SCAN_WAIT", str(go))
    try:
        return mounter(qm.private, qm.root, "dev", "suid", f"quotaid={qm.qid}", *options)
    finally:
        monkeypatch.delenv("SIMFS_TEST_SCAN_WAIT")


def _pass_began(go) -> None:
    """Wait until a pass of the ``_slow_scan_mount`` waits for ``go``."""
    mark = go.parent / (go.name + ".waiting")
    deadline = time.monotonic() + 60
    while not mark.exists():
        assert time.monotonic() < deadline, "no recount pass began"
        time.sleep(0.01)


@pytest.mark.parametrize("backing", params(only=("ext4", "xfs")), indirect=True)
def test_a_first_pass_longer_than_the_hold_enforces_nothing_short(backing, backing_quota,
                                                                   mounter, world_tmp,
                                                                   monkeypatch):
    """The window left open by the hold (issue 21 item 2): a live `on` whose
    first pass outlasts -o recounthold let the held calls go on against the
    stored figures, short of what was written while the quota was off; a
    uid-1000 fill during the pass then reached the hard limit by those
    figures, and the tree ended 4 MiB over it.  Now the first pass holds until
    it ends: the fill goes on afterwards, against exact figures."""
    hard = 30000                                  # KiB
    qm = backing_quota(B=hard, I=100000)
    fill_tree(qm.root)
    go = world_tmp / "go"
    m = _slow_scan_mount(qm, mounter, monkeypatch, go, "recounthold=0.2")
    vzquota("off", qm.qid)
    (qm.root / "while-off").write_bytes(b"o" * (4096 * K))        # uncounted
    sampler = Sampler(qm.qid)
    with Writers(qm.root, world_tmp):
        on = _on(qm.qid)
        _pass_began(go)
        time.sleep(0.5)                   # the pass has outlasted the hold (0.2 s)
        sampler.start()
        fill = _user_py(FILL, str(qm.root / "w"))
        try:
            fill.wait(timeout=3)          # (it finished here, past the limit)
        except subprocess.TimeoutExpired:
            pass
        held = fill.poll() is None
        go.touch()                        # the pass scans and ends
        out, err = fill.communicate(timeout=300)
        assert out.strip() == "EDQUOT", (out, err)
        on_out, on_err = on.communicate(timeout=120)
    sampler.stop()
    assert not sampler.violations, sampler.violations
    assert not settled(qm.private, qm.qid), diff(qm.private, qm.qid)
    rc = recount(qm.private)
    assert rc.space <= hard * K, (rc.space - hard * K, "bytes over the hard limit")
    assert on.returncode == 0, on_err
    assert held, "the fill was not held during the first pass"
    assert "recounted (pass 1, allocations held" in m.logtext()


@pytest.mark.parametrize("backing", params(only=("ext4",)), indirect=True)
def test_on_while_a_recount_runs_holds_at_once(backing, backing_quota, mounter, world_tmp,
                                               monkeypatch):
    """An `on` that comes while an earlier recount still scans (a `recalc`,
    or the mount's own retry) waits for it to end before its own first pass;
    the calls that allocate are held from the moment the `on` arrives, not
    only from that pass on, so none is checked against the stored figures."""
    hard = 30000                                  # KiB
    qm = backing_quota(B=hard, I=100000)
    fill_tree(qm.root, dirs=4)
    (qm.root / "w").mkdir()
    os.chown(qm.root / "w", 1000, 1000)
    go = world_tmp / "go"
    _slow_scan_mount(qm, mounter, monkeypatch, go)
    from conftest import VZQUOTA
    rec = subprocess.Popen([VZQUOTA, "recalc", str(qm.qid)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    _pass_began(go)                       # the recalc's pass waits, holding nothing
    vzquota("off", qm.qid)
    (qm.root / "while-off").write_bytes(b"o" * (4096 * K))        # uncounted
    on = _on(qm.qid)
    deadline = time.monotonic() + 30
    while vzquota("stat", qm.qid, check=False).returncode != 0:   # accounting again
        assert time.monotonic() < deadline
        time.sleep(0.05)
    fill = _user_py(FILL, str(qm.root / "w"))
    try:
        fill.wait(timeout=2)              # (it ran to the limit of the stored figures)
    except subprocess.TimeoutExpired:
        pass
    held = fill.poll() is None
    go.touch()
    out, err = fill.communicate(timeout=300)
    assert out.strip() == "EDQUOT", (out, err)
    on.communicate(timeout=120)
    rec.communicate(timeout=120)
    assert not settled(qm.private, qm.qid), diff(qm.private, qm.qid)
    rc = recount(qm.private)
    assert rc.space <= hard * K, (rc.space - hard * K, "bytes over the hard limit")
    assert on.returncode == 0
    assert held, "the fill was not held while the earlier recount ended"


@pytest.mark.parametrize("runtime", ["runtime=uvloop", "runtime=trio", "fuse=pyfuse3"])
@pytest.mark.parametrize("backing", params(only=("ext4",)), indirect=True)
def test_a_call_held_longer_than_recountwait_fails_with_edquot(backing, backing_quota,
                                                               mounter, world_tmp,
                                                               monkeypatch, runtime):
    """-o recountwait bounds how long a call that allocates waits for the first
    pass of a live `on`: then it fails with EDQUOT (never goes on unchecked);
    an unlink (it only frees) waits for the pass and succeeds."""
    qm = backing_quota(B=200000, I=100000)
    fill_tree(qm.root, dirs=2)
    for d in ("w", "u"):              # apart: a held unlink holds its directory's lock
        (qm.root / d).mkdir()
        os.chown(qm.root / d, 1000, 1000)
    (qm.root / "u" / "old").write_bytes(b"x" * (64 * K))
    os.chown(qm.root / "u" / "old", 1000, 1000)
    go = world_tmp / "go"
    m = _slow_scan_mount(qm, mounter, monkeypatch, go, "recountwait=0.5", runtime)
    vzquota("off", qm.qid)
    (qm.root / "while-off").write_bytes(b"o" * (512 * K))         # uncounted
    on = _on(qm.qid)
    _pass_began(go)
    timed = textwrap.dedent("""
        import errno, os, sys, time
        t = time.monotonic()
        try:
            if sys.argv[2] == "write":
                with open(sys.argv[1], "wb") as f:
                    f.write(b"n" * 65536)
            else:
                os.unlink(sys.argv[1])
            print("ok", time.monotonic() - t)
        except OSError as e:
            print(errno.errorcode[e.errno], time.monotonic() - t)
    """)
    write = _user_py(timed, str(qm.root / "w" / "new"), "write")
    unlink = _user_py(timed, str(qm.root / "u" / "old"), "unlink")
    w_out, _ = write.communicate(timeout=60)
    time.sleep(1.0)
    assert unlink.poll() is None, (unlink.communicate(), m.logtext())    # waits for the pass
    go.touch()
    u_out, _ = unlink.communicate(timeout=60)
    on_out, on_err = on.communicate(timeout=60)
    res, took = w_out.split()
    assert res == "EDQUOT" and 0.4 < float(took) < 5, w_out
    assert u_out.split()[0] == "ok" and float(u_out.split()[1]) > 1.0, u_out
    assert on.returncode == 0, on_err
    assert not (qm.root / "w" / "new").exists()
    assert not settled(qm.private, qm.qid), diff(qm.private, qm.qid)
    assert "waited 0.5 s for a recount pass and were refused (EDQUOT)" in m.logtext()


def test_which_passes_hold():
    from vzquota.service import holds
    assert holds(0, "stale", None) and not holds(0, "recalc", None)
    assert holds(1, "recalc", 0.5) and not holds(1, "recalc", 10.0)
    assert holds(0, "stale", None, 0) and not holds(1, "recalc", 0.1, 0)


def test_recounthold_option():
    from simfs.options import UsageError, parse_options
    assert parse_options(["recounthold=0.5"], "/p")[1]["recounthold"] == "0.5"
    assert parse_options(["recounthold=0"], "/p")[1]["recounthold"] == "0"
    for bad in ("-1", "61", "nan", "inf", "x", ""):
        with pytest.raises(UsageError):
            parse_options([f"recounthold={bad}"], "/p")
    assert parse_options(["recountwait=0"], "/p")[1]["recountwait"] == "0"
    assert parse_options(["recountwait=3600"], "/p")[1]["recountwait"] == "3600"
    for bad in ("-1", "3601", "nan", "x", ""):
        with pytest.raises(UsageError):
            parse_options([f"recountwait={bad}"], "/p")


def test_upper_bound_adds_what_was_charged():
    from vzquota.engine import Growth
    from vzquota.scan import ScanResult
    from vzquota.service import upper_bound
    g = Growth()
    g.add(1000, 100, 8192, 2)
    g.add(1000, 100, -4096, -1)                  # frees are not taken off
    g.add(None, 7, 4096, 1, level1=False)        # a chgrp: the new group only
    g.add(1001, 100, 4096, 1)
    g.take(1001, 100, 4096, 1)                   # made and gone within the pass
    r = ScanResult(100, 1, {0: [100, 1]}, {0: [100, 1]})
    b = upper_bound(r, g)
    assert (b.space, b.inodes) == (100 + 8192, 3)
    assert b.users == {0: [100, 1], 1000: [8192, 2]}
    assert b.groups == {0: [100, 1], 100: [8192, 2], 7: [4096, 1]}
    assert r.users == {0: [100, 1]}                # the pass itself is left as it was


def test_what_an_inexact_pass_applies(tmp_path):
    """finish_recalc: an exact pass is applied; one that was not is applied
    only while the figures in use are stale (may be short), as its upper bound
    at once, or, when it has none, as the pass itself at the last pass; a
    ``recalc`` pass that was not exact leaves the mount's figures."""
    from vzquota.engine import QuotaEngine
    from vzquota.model import QuotaState
    from vzquota.qfile import QuotaFile
    from vzquota.scan import ScanResult
    from vzquota.service import LiveQuota
    qf = QuotaFile(5, str(tmp_path / "quota.5"))
    st = QuotaState(qid=5)
    st.level1.space.hard = st.level1.inodes.hard = 1 << 40
    qf.save(st)
    lq = LiveQuota(qf, str(tmp_path), scan=lambda: ScanResult(0, 0, {}, {}))
    lq.engine = QuotaEngine(lq.state)
    lq.engine.set_usage(100, 1, {0: [100, 1]}, {0: [100, 1]})

    def usage():
        return lq.state.level1.space.usage

    passed = ScanResult(500, 5, {0: [500, 5]}, {0: [500, 5]})
    bound = ScanResult(900, 9, {0: [900, 9]}, {0: [900, 9]})
    assert not lq.finish_recalc(passed, False, False, "recalc", bound)
    assert usage() == 100 and not lq.state.dirty
    assert not lq.finish_recalc(passed, False, True, "recalc", bound)
    assert usage() == 100 and lq.inexact == "recalc"
    assert not lq.finish_recalc(passed, False, False, "stale", None)
    assert usage() == 100
    assert not lq.finish_recalc(passed, False, False, "stale", bound)      # at once
    assert usage() == 900 and lq.state.dirty
    assert not lq.finish_recalc(passed, False, True, "stale", None)
    assert usage() == 500 and lq.inexact == "stale"
    assert lq.finish_recalc(passed, True, False, "stale", None)
    assert usage() == 500 and not lq.state.dirty and lq.inexact is None


@pytest.mark.parametrize("backing", params(only=("ext4",)), indirect=True)
def test_on_waits_for_a_first_pass_longer_than_the_client_timeout(backing, backing_quota,
                                                                   mounter, world_tmp,
                                                                   monkeypatch):
    """A live `on` over a tree whose first pass takes longer than the
    client's timeout (VZQUOTA_TIMEOUT, 10 s by default; 2 s here) waited that
    long and reported "did not answer" (exit 3) while the mount went on and
    turned the quota on: vzctl took a working start for a failed one.  The
    mount now tells the client it is still working (a space every 0.5 s), so
    `on` waits for the pass and exits 0, with exact figures."""
    qm = backing_quota(B=200000, I=100000)
    fill_tree(qm.root)
    go = world_tmp / "go"
    _slow_scan_mount(qm, mounter, monkeypatch, go)
    vzquota("off", qm.qid)
    (qm.root / "while-off").write_bytes(b"o" * (1024 * K))        # uncounted
    from conftest import VZQUOTA
    on = subprocess.Popen([VZQUOTA, "on", str(qm.qid)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, VZQUOTA_TIMEOUT="2"))
    _pass_began(go)
    time.sleep(6)                         # the client's timeout, three times over
    assert on.poll() is None, on.communicate()
    go.touch()                            # the pass scans and ends
    out, err = on.communicate(timeout=120)
    assert on.returncode == 0, (out, err)
    assert "did not answer" not in err
    assert vzquota("stat", qm.qid, check=False).returncode == 0
    assert not settled(qm.private, qm.qid), diff(qm.private, qm.qid)
