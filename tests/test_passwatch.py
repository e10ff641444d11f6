"""PassWatch (simfs/mount.py): when a live recount pass may be applied as exact.
Real handlers on a real backing directory, a real engine and the real scanner;
the independent figure is ``du``/``find`` of the backing tree."""

from __future__ import annotations

import inspect
import os
import stat
import subprocess

import pytest

from simfs.inodes import ROOT
from simfs.mount import PassWatch
from simfs.ops import SimOperations


async def read(ops, fh, off, size):
    """ops.read answers at once, or returns an awaitable when it must wait."""
    r = ops.read(fh, off, size)
    return await r if inspect.isawaitable(r) else r
from vzquota.engine import QuotaEngine
from vzquota.model import QuotaState
from vzquota.scan import scan

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
              pytest.mark.anyio]

K = 1024


class Ctx:
    def __init__(self):
        self.uid, self.gid, self.umask, self.pid = 0, 0, 0o022, os.getpid()


CTX = Ctx()


def du(path) -> tuple[int, int]:
    space = int(subprocess.run(["du", "--block-size=1", "-s", "-x", str(path)],
                               capture_output=True, text=True, check=True).stdout.split()[0])
    inos = subprocess.run(["find", str(path), "-xdev", "-printf", "%i\n"],
                          capture_output=True, text=True, check=True).stdout.split()
    return space, len(set(inos))


@pytest.fixture
def qops(world_tmp):
    d = world_tmp / "backing"
    d.mkdir()
    for i in range(20):
        (d / f"f{i}").write_bytes(b"x" * (i * K))
    fd = os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    o = SimOperations(fd)
    st = QuotaState(qid=1)
    st.level1.space.hard = st.level1.inodes.hard = 1 << 40
    o.quota = QuotaEngine(st)
    r = scan(str(d))
    o.quota.set_usage(r.space, r.inodes, r.users, r.groups)
    yield o, d
    o.table.close_all()
    os.close(fd)


async def open_file(ops, name: bytes) -> int:
    ino = (ops.lookup(ROOT, name, CTX)).st_ino
    fi = ops.open(ino, os.O_WRONLY | os.O_APPEND, CTX)
    return fi.fh


async def test_writes_to_a_file_open_at_the_start_keep_the_pass_exact(qops):
    ops, d = qops
    fh = await open_file(ops, b"f3")
    watch = PassWatch(ops, ops.quota)
    ops.watch = watch
    size = os.stat(d / "f3").st_size
    for i in range(10):                           # while the scan "runs"
        ops.write(fh, size + i * 64 * K, b"w" * (64 * K))
    result = scan(str(d), skip=watch.skip)
    ops.write(fh, size + 10 * 64 * K, b"w" * (64 * K))     # after its stat too
    ops.watch = None
    assert watch.complete(result)
    assert (result.space, result.inodes) == du(d)
    ops.release(fh)


@pytest.mark.parametrize("change", ["rename", "late-open-write", "create", "unlink",
                                    "tmpfile"])
async def test_other_changes_spoil_the_pass(qops, change):
    ops, d = qops
    watch = PassWatch(ops, ops.quota)
    ops.watch = watch
    if change == "rename":
        ops.rename(ROOT, b"f1", ROOT, b"g1", 0, CTX)
    elif change == "late-open-write":
        fh = await open_file(ops, b"f2")
        ops.write(fh, 0, b"w" * (64 * K))
        ops.release(fh)
    elif change == "create":
        fi, _ = ops.create(ROOT, b"new", stat.S_IFREG | 0o644, os.O_RDWR, CTX)
        ops.release(fi.fh)
    elif change == "tmpfile":             # nameless: spoils the pass, no name to look at
        fi, _ = ops.tmpfile(ROOT, stat.S_IFREG | 0o600, os.O_RDWR, CTX)
        ops.write(fi.fh, 0, b"t" * (16 * K))
        ops.release(fi.fh)
    else:
        ops.unlink(ROOT, b"f5", CTX)
    ops.watch = None
    assert not watch.complete(scan(str(d), skip=watch.skip))


async def test_reading_does_not_spoil_the_pass(qops):
    ops, d = qops
    watch = PassWatch(ops, ops.quota)
    ops.watch = watch
    ino = (ops.lookup(ROOT, b"f4", CTX)).st_ino
    fi = ops.open(ino, os.O_RDONLY, CTX)
    assert await read(ops, fi.fh, 0, 100) == b"x" * 100
    ops.release(fi.fh)
    ops.watch = None
    result = scan(str(d), skip=watch.skip)
    assert watch.complete(result)
    assert (result.space, result.inodes) == du(d)


async def test_fallocate_and_copies_into_a_hot_file_keep_the_pass_exact(qops):
    """fallocate on a file open at the start, and copy_file_range into it (its
    destination is the third argument), are accounted for: the pass stays
    exact; a copy into a file not open at the start spoils it."""
    ops, d = qops
    ino = (ops.lookup(ROOT, b"f3", CTX)).st_ino
    hot = ops.open(ino, os.O_RDWR, CTX).fh
    src = ops.open((ops.lookup(ROOT, b"f19", CTX)).st_ino, os.O_RDONLY, CTX).fh
    watch = PassWatch(ops, ops.quota)
    ops.watch = watch
    ops.fallocate(hot, 0, 64 * K, 256 * K)
    ops.fallocate(hot, 0x3, 64 * K, 64 * K)                  # punch, keep size
    assert ops.copy_file_range(src, 0, hot, 512 * K, 19 * K, 0) == 19 * K
    result = scan(str(d), skip=watch.skip)
    ops.watch = None
    assert watch.complete(result)
    assert (result.space, result.inodes) == du(d)
    ops.release(hot)
    watch = PassWatch(ops, ops.quota)
    ops.watch = watch
    cold = ops.open((ops.lookup(ROOT, b"f5", CTX)).st_ino, os.O_RDWR, CTX).fh
    ops.copy_file_range(src, 0, cold, 64 * K, 19 * K, 0)
    ops.watch = None
    assert not watch.complete(scan(str(d), skip=watch.skip))
    for fh in (src, cold):
        ops.release(fh)
