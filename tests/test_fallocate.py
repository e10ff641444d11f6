"""fallocate(2), lseek(SEEK_DATA/SEEK_HOLE) and copy_file_range(2) through a
quota'd mount, on ext4, XFS, btrfs and tmpfs (issue 17 items 4, 5, 6; SPEC 4
"Every allocating call goes through the quota").

Every step runs in a child process (as root, or as uid 1000 for the 2nd
level) and is followed by the independent recount (find + du) at both levels.
What is checked: each mode does what it does natively; the blocks a call would
allocate are refused with EDQUOT before anything is allocated (nothing charged,
the file unchanged); reaching the hard limit exactly is allowed; a punch
credits; a copy past the limit is short, then refused; SEEK_DATA/SEEK_HOLE see
the backing file's holes.  That the daemon served each call (and the kernel did
not fall back) is read from its request counts.
"""

from __future__ import annotations

import errno
import json
import os

import pytest

import backing as bk
from conftest import py_as

K = 1024
MiB = 1 << 20
NOTSUP = errno.errorcode[errno.EOPNOTSUPP]   # "ENOTSUP": the same number
KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE, INSERT_RANGE = 0x1, 0x2, 0x8, 0x10, 0x20

# One step, stdlib only (also run as uid 1000): prints the result (or the
# errno's name) and the file's size and st_blocks after.
STEP = r"""
import ctypes, errno, json, os, sys
op, path = sys.argv[1], sys.argv[2]
a = [int(x) for x in sys.argv[3:len(sys.argv) - (op == "copy")]]
libc = ctypes.CDLL(None, use_errno=True)
out = {}
try:
    if op == "fallocate":
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if libc.fallocate(fd, ctypes.c_int(a[0]), ctypes.c_long(a[1]), ctypes.c_long(a[2])):
            raise OSError(ctypes.get_errno(), "fallocate")
        out["r"] = 0
    elif op == "write":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        out["r"] = os.pwrite(fd, bytes([a[2]]) * a[1], a[0])
    elif op == "seek":
        fd = os.open(path, os.O_RDONLY)
        out["r"] = os.lseek(fd, a[1], a[0])
    elif op == "copy":
        src = os.open(path, os.O_RDONLY)
        path = sys.argv[-1]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        out["r"] = os.copy_file_range(src, fd, a[2], a[0], a[1])
except OSError as e:
    out["r"] = errno.errorcode[e.errno]
st = os.stat(path)
out["size"], out["space"] = st.st_size, st.st_blocks * 512
print(json.dumps(out))
"""


def step(who: int, op: str, path, *args) -> dict:
    r = py_as(who, who, STEP, op, str(path), *map(str, args))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def served(root, op: str) -> int:
    """How many ``op`` requests the daemon has answered."""
    return json.loads(os.getxattr(root, "trusted.simfs.requests")).get(op, 0)


def usage(qm, who: int) -> int:
    """Live space at the level that limits ``who`` (1st for root, its uid's for 1000)."""
    lv = qm.live()
    return lv.space if who == 0 else lv.users.get(who, (0, 0))[0]


def quota_for(backing_quota, who: int, hard_k: int):
    """A mount whose limit for ``who`` is ``hard_k`` KiB: the 1st level for
    root, the 2nd level (uid 1000's) for 1000, with a roomy 1st level; and a
    directory of ``who``'s own."""
    if who == 0:
        qm = backing_quota(B=hard_k)
    else:
        qm = backing_quota(B=64 * K * K, ugid={who: (hard_k, 1000)})
    d = qm.root / f"d{who}"
    d.mkdir()
    os.chown(d, who, who)
    return qm, d


WHO = [pytest.param(0, id="level1-root"), pytest.param(1000, id="level2-uid1000")]


@pytest.mark.parametrize("backing", bk.params(), indirect=True)
def test_fallocate_each_mode(backing_quota):
    """Each mode through the mount does what it does on the backing and is
    charged exactly: mode 0 extends, KEEP_SIZE preallocates past the end,
    PUNCH_HOLE credits, ZERO_RANGE (not on tmpfs: EOPNOTSUPP, as natively).
    COLLAPSE_RANGE/INSERT_RANGE: EOPNOTSUPP (the kernel's FUSE client never
    sends them), nothing charged."""
    qm = backing_quota()
    f = qm.root / "f"
    before = served(qm.root, "fallocate")
    out = step(0, "fallocate", f, 0, 0, MiB)
    assert out == {"r": 0, "size": MiB, "space": MiB}, out
    qm.assert_exact()
    out = step(0, "fallocate", f, KEEP_SIZE, MiB, MiB)
    assert out == {"r": 0, "size": MiB, "space": 2 * MiB}, out
    qm.assert_exact()
    u = qm.live().space
    out = step(0, "fallocate", f, PUNCH_HOLE | KEEP_SIZE, 256 * K, 256 * K)
    assert out == {"r": 0, "size": MiB, "space": 2 * MiB - 256 * K}, out
    assert qm.live().space == u - 256 * K          # the punch credited
    qm.assert_exact()
    step(0, "write", f, 512 * K, 64 * K, 0x61)
    out = step(0, "fallocate", f, ZERO_RANGE, 500 * K, 100 * K)
    if qm.backing.kind == "tmpfs":
        assert out["r"] == NOTSUP, out
    else:
        assert out["r"] == 0, out
        with open(f, "rb") as fh:
            fh.seek(500 * K)
            assert fh.read(100 * K) == bytes(100 * K)
    qm.assert_exact()
    for mode in (COLLAPSE_RANGE, INSERT_RANGE):
        out = step(0, "fallocate", f, mode, 0, 64 * K)
        assert out["r"] == NOTSUP and out["size"] == MiB, out
    qm.assert_exact()
    assert served(qm.root, "fallocate") >= before + 4
    with open(f, "rb") as fh:
        assert fh.read(256 * K) == bytes(256 * K)
    f.unlink()
    qm.assert_exact()


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("backing", bk.params(), indirect=True)
def test_fallocate_at_the_limit(backing_quota, who):
    """At the hard limit (1st level as root, 2nd level as uid 1000): a
    fallocate of one block more than is left fails with EDQUOT and allocates
    and charges nothing (mode 0, KEEP_SIZE, ZERO_RANGE); one of exactly what is
    left reaches the limit; a punch credits and makes room again."""
    qm, d = quota_for(backing_quota, who, 4 * K)
    hard = 4 * MiB
    f = d / "f"
    out = step(who, "write", f, 0, 64 * K, 0x61)
    assert out["r"] == 64 * K, out
    room = hard - usage(qm, who)
    assert room > MiB, room
    for mode in (0, KEEP_SIZE, ZERO_RANGE):
        u = usage(qm, who)
        out = step(who, "fallocate", f, mode, 64 * K, room + 4 * K)
        if qm.backing.kind == "tmpfs" and mode == ZERO_RANGE:
            assert out["r"] in ("EDQUOT", NOTSUP), out
        else:
            assert out["r"] == "EDQUOT", out
        assert out["size"] == 64 * K and out["space"] == 64 * K, out   # nothing allocated
        assert usage(qm, who) == u                                      # nothing charged
        qm.assert_exact()
    out = step(who, "fallocate", f, 0, 64 * K, room)
    assert out["r"] == 0 and out["size"] == 64 * K + room, out
    assert usage(qm, who) == hard                   # exactly the limit is allowed
    qm.assert_exact()
    # writing into preallocated blocks at the limit allocates nothing: not
    # refused.  tmpfs shows its fallocated pages nowhere but in st_blocks
    # (SEEK_DATA and mincore see holes), so there they are counted as holes:
    # refused at the limit, nothing charged (README, caveats).
    out = step(who, "write", f, 128 * K, 256 * K, 0x70)
    if qm.backing.kind == "tmpfs":
        assert out["r"] == "EDQUOT", out
    else:
        assert out["r"] == 256 * K, out
    assert out["size"] == 64 * K + room and usage(qm, who) == hard, out
    qm.assert_exact()
    out = step(who, "fallocate", f, KEEP_SIZE, 64 * K + room, 4 * K)
    assert out["r"] == "EDQUOT", out
    assert usage(qm, who) == hard
    out = step(who, "fallocate", f, PUNCH_HOLE | KEEP_SIZE, 128 * K, 256 * K)
    assert out["r"] == 0, out
    assert usage(qm, who) == hard - 256 * K         # credited
    qm.assert_exact()
    # the room a punch made is room again, past the end too (KEEP_SIZE)
    out = step(who, "fallocate", f, KEEP_SIZE, 64 * K + room, 256 * K)
    assert out["r"] == 0 and out["size"] == 64 * K + room, out
    assert usage(qm, who) == hard
    qm.assert_exact()
    f.unlink()
    qm.assert_exact()


@pytest.mark.parametrize("backing", bk.params(), indirect=True)
def test_seek_data_and_hole(backing_quota):
    """SEEK_DATA/SEEK_HOLE through the mount answer what the backing file
    says: the holes of a sparse file are seen (the kernel's own fallback
    would see none), ENXIO past the data."""
    qm = backing_quota()
    f = qm.root / "sparse"
    step(0, "write", f, 0, 4 * K, 0x61)
    step(0, "write", f, MiB, 4 * K, 0x62)
    size = MiB + 4 * K
    before = served(qm.root, "lseek")
    want = [(os.SEEK_HOLE, 0, 4 * K), (os.SEEK_DATA, 4 * K, MiB),
            (os.SEEK_HOLE, MiB, size), (os.SEEK_DATA, 0, 0),
            (os.SEEK_DATA, size, "ENXIO"), (os.SEEK_HOLE, size + 1, "ENXIO")]
    for whence, off, expect in want:
        got = step(0, "seek", f, whence, off)["r"]
        native = step(0, "seek", qm.private / "sparse", whence, off)["r"]
        assert got == native == expect, (whence, off, got, native, expect)
    assert served(qm.root, "lseek") >= before + len(want)
    qm.assert_exact()


@pytest.mark.parametrize("backing", bk.params(), indirect=True)
def test_copy_file_range_within_the_limit(backing_quota):
    """A copy inside the mount is made by the backing filesystem (a reflink
    on XFS and btrfs) and charged as what the destination gains."""
    qm = backing_quota()
    src, dst = qm.root / "src", qm.root / "dst"
    step(0, "write", src, 0, MiB, 0x73)
    before = served(qm.root, "copy_file_range")
    out = step(0, "copy", src, 0, 0, MiB, dst)
    assert out["r"] == MiB and out["size"] == MiB, out
    assert served(qm.root, "copy_file_range") > before
    assert dst.read_bytes() == src.read_bytes()
    qm.assert_exact()
    # into the middle of what the destination holds: nothing new to allocate
    out = step(0, "copy", src, 0, 256 * K, 256 * K, dst)
    assert out["r"] == 256 * K and out["size"] == MiB, out
    qm.assert_exact()
    dst.unlink()
    qm.assert_exact()


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("backing", bk.params(), indirect=True)
def test_copy_file_range_past_the_limit(backing_quota, who):
    """A copy that does not fit is short (what fits, as a write at the limit),
    the next one fails with EDQUOT; never over the hard limit; both levels
    exact."""
    qm, d = quota_for(backing_quota, who, 4 * K)
    hard = 4 * MiB
    src, dst = d / "src", d / "dst"
    out = step(who, "write", src, 0, 3 * MiB, 0x73)
    assert out["r"] == 3 * MiB, out
    room = hard - usage(qm, who)
    assert 512 * K < room < 2 * MiB, room
    before = served(qm.root, "copy_file_range")
    out = step(who, "copy", src, 0, 0, 2 * MiB, dst)
    assert served(qm.root, "copy_file_range") > before     # not the kernel's fallback
    copied = out["r"]
    assert isinstance(copied, int) and room - 8 * K <= copied <= room, (out, room)
    assert usage(qm, who) <= hard
    qm.assert_exact()
    out = step(who, "copy", src, copied, copied, 2 * MiB - copied, dst)
    assert out["r"] == "EDQUOT" and out["size"] == copied, out
    assert usage(qm, who) <= hard
    assert dst.read_bytes() == src.read_bytes()[:copied]
    assert os.stat(dst).st_blocks * 512 == copied
    qm.assert_exact()
    dst.unlink()
    qm.assert_exact()


# ---- COLLAPSE_RANGE / INSERT_RANGE, by the handler itself ------------------------------
# The kernel's FUSE client never sends these modes (test_fallocate_each_mode), so
# the handler is driven directly, as the request loop would, on an ext4
# directory (the test host's /tmp; ext4 has both modes) with a real engine.

class Ctx:
    uid = gid = 0
    umask = 0o022
    pid = os.getpid()


def du(path) -> int:
    import subprocess
    return int(subprocess.run(["du", "--block-size=1", "-s", "-x", str(path)],
                              capture_output=True, text=True, check=True).stdout.split()[0])


@pytest.fixture
def qops(world_tmp):
    from simfs import lower
    from simfs.ops import SimOperations
    from vzquota.engine import QuotaEngine
    from vzquota.model import QuotaState
    from vzquota.scan import scan
    d = world_tmp / "backing"
    d.mkdir()
    fd = os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    if lower.fs_magic(fd) != 0xEF53:
        os.close(fd)
        pytest.skip("needs /tmp on ext4 (COLLAPSE_RANGE/INSERT_RANGE)")
    o = SimOperations(fd)
    st = QuotaState(qid=1)
    st.level1.space.hard = st.level1.inodes.hard = 1 << 40
    o.quota = QuotaEngine(st)
    r = scan(str(d))
    o.quota.set_usage(r.space, r.inodes, r.users, r.groups)
    yield o, d
    o.table.close_all()
    os.close(fd)


def test_collapse_credits_and_insert_charges_what_it_takes(qops):
    import stat as st_
    ops, d = qops
    fi, _ = ops.create(1, b"f", st_.S_IFREG | 0o644, os.O_RDWR, Ctx())
    fh = fi.fh
    ops.fallocate(fh, 0, 0, MiB)
    ops.write(fh, 0, b"d" * (512 * K))
    assert ops.quota.state.level1.space.usage == du(d)
    before = ops.quota.state.level1.space.usage
    ops.fallocate(fh, COLLAPSE_RANGE, 256 * K, 256 * K)
    assert os.stat(d / "f").st_size == 768 * K
    assert ops.quota.state.level1.space.usage == before - 256 * K == du(d)   # credited
    ops.fallocate(fh, INSERT_RANGE, 0, 128 * K)
    assert os.stat(d / "f").st_size == 896 * K
    assert ops.quota.state.level1.space.usage == du(d)
    with open(d / "f", "rb") as f:
        data = f.read()
    assert data[:128 * K] == bytes(128 * K) and data[128 * K:384 * K] == b"d" * (256 * K)
    # at the limit: a collapse is never refused for quota
    ops.quota.state.level1.space.hard = ops.quota.state.level1.space.usage
    ops.fallocate(fh, COLLAPSE_RANGE, 0, 64 * K)
    assert ops.quota.state.level1.space.usage == du(d)
    ops.release(fh)
    assert ops.quota.state.level1.space.usage == du(d)


@pytest.mark.parametrize("backing", bk.params(only=("ext4",)), indirect=True)
def test_fallocate_keeps_out_of_the_root_reserve(backing, backing_quota):
    """The daemon allocates as root: a fallocate by another uid that would
    need more than the backing's f_bavail fails with ENOSPC before anything
    is allocated (it would eat into root's reserve); root inside may."""
    qm = backing_quota(B=1 << 30)
    reserve = backing.reserve_bytes()
    assert reserve > 8 * MiB, reserve
    st = backing.statvfs()
    fd = os.open(backing.mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - 4 * MiB)
    finally:
        os.close(fd)
    d = qm.root / "u"
    d.mkdir()
    os.chown(d, 1000, 1000)
    out = step(1000, "fallocate", d / "f", 0, 0, 8 * MiB)
    assert out == {"r": "ENOSPC", "size": 0, "space": 0}, out
    qm.assert_exact()
    out = step(1000, "fallocate", d / "f", 0, 0, 2 * MiB)
    assert out == {"r": 0, "size": 2 * MiB, "space": 2 * MiB}, out
    out = step(0, "fallocate", qm.root / "r", 0, 0, 8 * MiB)
    assert out["r"] == 0, out
    qm.assert_exact()


@pytest.mark.parametrize("backing", bk.params(), indirect=True)
def test_fallocate_by_anyone_but_root_clears_set_id_bits(backing_quota):
    """A fallocate, of any mode, by a caller without CAP_FSETID takes
    set-user-ID and a group-executable set-group-ID with it, as on the
    backing filesystem itself (ext4, XFS, btrfs and tmpfs all do); root's
    keeps them.  The FALLOCATE request carries no kill flag (under
    HANDLE_KILLPRIV_V2 the kernel leaves the kill to the daemon), so before
    this the bits stayed."""
    qm = backing_quota()
    d = qm.root / "d"
    d.mkdir()
    os.chmod(d, 0o1777)
    native = qm.private.parent / "native"          # the backing filesystem itself
    native.mkdir()
    os.chmod(native, 0o1777)
    steps = [(1000, 0, 0, MiB), (1000, KEEP_SIZE, MiB, MiB),
             (1000, PUNCH_HOLE | KEEP_SIZE, 0, 64 * K), (0, 0, 0, MiB)]
    if qm.backing.kind != "tmpfs":
        steps.append((1000, ZERO_RANGE, 0, 64 * K))
    for i, (who, *args) in enumerate(steps):
        seen = []
        for where in (d, native):
            f = where / f"f{i}"
            f.write_bytes(bytes(128 * K))
            os.chown(f, 1001, 1001)
            os.chmod(f, 0o6777)
            out = step(who, "fallocate", f, *args)
            assert out["r"] == 0, (who, args, out)
            seen.append(os.stat(f).st_mode & 0o7777)
        assert seen[0] == seen[1] == (0o6777 if who == 0 else 0o777), (who, args, seen)
        assert os.stat(qm.private / "d" / f"f{i}").st_mode & 0o7777 == seen[0]
    qm.assert_exact()
