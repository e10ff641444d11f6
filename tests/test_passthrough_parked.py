"""Parked passthrough backing ids, through real mounts on the four backings.

A file's passthrough registration (FUSE_DEV_IOC_BACKING_OPEN, one backing id
per inode) is kept after its last close, parked on the inode's record, so
that the next passthrough open of the file needs no ioctl.  A parked id holds
the backing file open in the kernel, so it is bounded (``backing_parked``,
the least recently closed first) and closed when the file loses its last
link through the mount, when the kernel forgets the inode and when the
daemon closes the record's descriptor; it is never a reader: writers beside
it are served as without it.

Observables: the mount's inode report (``trusted.simfs.inodes``, "backing":
ids registered, closed, parked), checked once against the daemon's real
ioctls (strace); the backing filesystem's free blocks; what the mount reads.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import subprocess
import time

import pytest
from backing import params, recount

pytestmark = pytest.mark.fuse

COUNTS = "trusted.simfs.requests"
INODES = "trusted.simfs.inodes"
BOUND = 1024                    # Config.backing_parked's default


def counts(root) -> dict[str, int]:
    return json.loads(os.getxattr(root, COUNTS))


def ids(root) -> dict[str, int]:
    """The daemon's backing ids: "active" (inodes with passthrough opens),
    "parked", and "opened"/"closed" (ioctls so far)."""
    return json.loads(os.getxattr(root, INODES))["backing"]


def write_through(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read_through(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def free_bytes(backing) -> int:
    os.sync()                   # btrfs frees at its commit
    s = backing.statvfs()
    return s.f_bfree * s.f_frsize


def wait_until(cond, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_file_opened_again_and_again_registers_one_backing_id(backing, backing_quota):
    qm = backing_quota(B=64 << 10, opts=())          # the default: 128 KiB and more
    root = qm.root
    data = os.urandom(1 << 20)
    write_through(root / "f", data)
    c0, b0 = counts(root), ids(root)
    assert b0["active"] == b0["parked"] == 0
    # the daemon's ioctls on /dev/fuse, seen from outside (every thread)
    trace = qm.mount.log.with_name(f"strace-{backing.kind}.txt")
    st = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=ioctl", "-o", str(trace),
                           "-p", str(qm.mount.proc.pid)], stderr=subprocess.PIPE)
    try:
        wait_until(lambda: trace.exists() or st.poll() is not None, 10, "strace")
        time.sleep(0.3)                               # attached to every thread
        n = 50
        for _ in range(n):
            with open(root / "f", "rb") as f:
                assert f.read() == data
    finally:
        time.sleep(0.2)
        st.terminate()
        st.wait(10)
    c1, b1 = counts(root), ids(root)
    assert c1.get("read", 0) == c0.get("read", 0)     # every open was passthrough
    assert c1["open"] - c0.get("open", 0) == n
    assert b1["opened"] - b0["opened"] == 1           # one registration for 50 opens
    assert b1["closed"] == b0["closed"]
    assert (b1["active"], b1["parked"]) == (0, 1)
    text = trace.read_text()
    opens = re.findall(r"ioctl\(\d+, (?:FUSE_DEV_IOC_BACKING_OPEN|_IOC\(_IOC_WRITE, 0xe5, 0x1,)",
                       text)
    closes = re.findall(r"ioctl\(\d+, (?:FUSE_DEV_IOC_BACKING_CLOSE|_IOC\(_IOC_WRITE, 0xe5, 0x2,)",
                        text)
    assert (len(opens), len(closes)) == (1, 0), text[-2000:]
    qm.assert_exact()


def test_a_parked_id_goes_at_the_last_unlink_and_the_blocks_are_freed(backing, backing_quota):
    qm = backing_quota(B=256 << 10, opts=())
    root = qm.root
    size = 32 << 20
    base = free_bytes(backing)
    slack = 2 << 20
    # unlinked while the kernel still holds the inode (an O_PATH descriptor:
    # no FUSE open, no FORGET): the parked id goes at the unlink, the blocks
    # when the kernel lets go of the inode, as on a local filesystem
    write_through(root / "f", os.urandom(size))
    assert len(read_through(root / "f")) == size
    assert ids(root)["parked"] == 1
    assert free_bytes(backing) < base - size + slack
    held = os.open(root / "f", os.O_PATH)
    try:
        os.unlink(root / "f")
        b = ids(root)
        assert (b["parked"], b["opened"], b["closed"]) == (0, 1, 1)
    finally:
        os.close(held)
    wait_until(lambda: free_bytes(backing) > base - slack, what="the blocks freed")
    # a plain unlink, a rename over the file, and a hard link first (not the
    # last link: the id stays parked until the last one goes)
    for how in ("unlink", "rename", "link"):
        write_through(root / "g", os.urandom(size))
        assert len(read_through(root / "g")) == size
        assert ids(root)["parked"] == 1
        if how == "unlink":
            os.unlink(root / "g")
        elif how == "rename":
            write_through(root / "h", b"h")
            os.rename(root / "h", root / "g")
            assert (root / "g").read_bytes() == b"h"
        else:
            os.link(root / "g", root / "g2")
            os.unlink(root / "g")
            assert ids(root)["parked"] == 1
            assert len(read_through(root / "g2")) == size     # no new registration
            os.unlink(root / "g2")
        assert ids(root)["parked"] == 0, how
        wait_until(lambda: free_bytes(backing) > base - slack, what=f"blocks freed ({how})")
        if how == "rename":
            os.unlink(root / "g")
    b = ids(root)
    assert b["opened"] == b["closed"] == 4
    qm.assert_exact()


def test_a_file_without_links_is_not_parked(backing, backing_quota):
    qm = backing_quota(B=256 << 10, opts=())
    root = qm.root
    size = 16 << 20
    base = free_bytes(backing)
    write_through(root / "f", os.urandom(size))
    with open(root / "f", "rb") as f:
        assert len(f.read(4096)) == 4096
        os.unlink(root / "f")             # while it is open
        assert ids(root)["active"] == 1
    b = ids(root)
    assert (b["active"], b["parked"], b["opened"], b["closed"]) == (0, 0, 1, 1)
    wait_until(lambda: free_bytes(backing) > base - (2 << 20), what="the blocks freed")
    # removed from the host's side while open: the daemon does not see it
    # (no look at the links at each last close), and the record's own O_PATH
    # descriptor holds the file as long as a parked id could; both go when
    # the kernel forgets the inode, and then the blocks
    write_through(root / "g", os.urandom(size))
    with open(root / "g", "rb") as f:
        assert len(f.read(4096)) == 4096
        os.unlink(qm.private / "g")
    b = ids(root)
    assert (b["parked"], b["opened"], b["closed"]) == (1, 2, 1)
    held = free_bytes(backing)

    def forgotten():
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")
        return ids(root)["parked"] == 0
    wait_until(forgotten, what="the forget of the removed file")
    assert ids(root)["closed"] == 2
    wait_until(lambda: free_bytes(backing) > held + (8 << 20), what="its blocks freed")


def test_parked_ids_are_bounded_oldest_first(backing, backing_quota):
    qm = backing_quota(B=64 << 10, opts=("passthrough",))    # every size
    root = qm.root
    n = BOUND + 76
    (root / "d").mkdir()
    for i in range(n):
        write_through(root / "d" / str(i), b"%d\n" % i)
    for i in range(n):
        assert read_through(root / "d" / str(i)) == b"%d\n" % i
    b = ids(root)
    assert (b["opened"], b["parked"], b["closed"]) == (n, BOUND, n - BOUND)
    # the most recently closed are the ones parked: opened again, no ioctl
    c0 = counts(root).get("read", 0)
    for i in range(n - BOUND, n):
        assert read_through(root / "d" / str(i)) == b"%d\n" % i
    assert ids(root)["opened"] == n
    # the oldest were closed: registered again, each pushing out the oldest parked
    for i in range(10):
        assert read_through(root / "d" / str(i)) == b"%d\n" % i
    b = ids(root)
    assert (b["opened"], b["parked"], b["closed"]) == (n + 10, BOUND, n + 10 - BOUND)
    assert counts(root).get("read", 0) == c0          # all passthrough
    qm.assert_exact()


def test_maxparked_bounds_them_and_0_ends_each_id_at_its_last_close(backing, backing_quota):
    # -o maxparked=0: issue 17's letter, each registration closed at the last
    # release of its file (an ioctl at each first open and last close)
    qm = backing_quota(B=64 << 10, opts=("passthrough", "maxparked=0"))
    root = qm.root
    assert json.loads(os.getxattr(root, "trusted.simfs.options"))["maxparked"] == 0
    write_through(root / "f", b"f" * 8192)
    b0 = ids(root)
    with open(root / "f", "rb") as a:
        with open(root / "f", "rb") as b:             # a second reader shares the id
            assert a.read() == b.read() == b"f" * 8192
        b1 = ids(root)
        assert b1["opened"] - b0["opened"] == 1 and b1["closed"] == b0["closed"]
        assert b1["active"] == 1
    b2 = ids(root)                                   # the last close ended it
    assert (b2["active"], b2["parked"], b2["closed"] - b0["closed"]) == (0, 0, 1)
    for _ in range(3):
        assert read_through(root / "f") == b"f" * 8192
    b3 = ids(root)
    assert (b3["opened"] - b2["opened"], b3["closed"] - b2["closed"], b3["parked"]) == (3, 3, 0)
    qm.assert_exact()


@pytest.mark.parametrize("backing", params(only=("ext4",)), indirect=True)
def test_maxparked_3_keeps_the_three_last_closed(backing, backing_quota):
    root = backing_quota(B=64 << 10, opts=("passthrough", "maxparked=3")).root
    for i in range(5):
        write_through(root / f"g{i}", b"%d" % i)
        assert read_through(root / f"g{i}") == b"%d" % i
    b = ids(root)
    assert (b["opened"], b["parked"], b["closed"]) == (5, 3, 2)


def test_a_reused_inode_number_never_reads_the_old_files_data(backing, mounter, world_tmp):
    # a parked id belongs to its inode record: a number the backing
    # filesystem gives to a new file after the old one is gone (unlinked
    # through the mount, or forgotten by the kernel and removed behind it)
    # is a new registration, with the new file's data (no quota: files are
    # made and removed behind the mount)
    private = backing.private
    root = world_tmp / "root"
    root.mkdir()
    mounter(private, root)
    size = 1 << 20
    reused = 0
    for round_ in range(6):
        old = os.urandom(size)
        write_through(root / "a", old)
        ino = os.stat(root / "a").st_ino
        assert read_through(root / "a") == old                 # parked
        assert ids(root)["parked"] == 1
        if round_ % 2 == 0:
            os.unlink(root / "a")                              # through the mount
        else:
            # the kernel forgets the inode (its record leaves the table),
            # then the host removes the file
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2\n")
            wait_until(lambda: ids(root)["parked"] == 0, what="the forget")
            os.unlink(private / "a")
        assert ids(root)["parked"] == 0
        made = []
        for k in range(40):                                    # the number again, if it comes
            new = os.urandom(size)
            p = (private if round_ % 2 else root) / f"b{k}"
            write_through(p, new)
            made.append(p)
            if os.stat(p).st_ino == ino:
                reused += 1
                break
            time.sleep(0.02)            # the old inode is freed by the daemon's closer
        assert read_through(root / p.name) == new
        with open(root / p.name, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            assert m[:4096] == new[:4096]
        for q in made:
            os.unlink(root / q.name)        # through the mount: the parked id goes
        assert ids(root)["parked"] == 0
    b = ids(root)
    assert b["opened"] == b["closed"] == 12
    if backing.kind == "ext4":
        assert reused, "ext4 gave no inode number back: the test saw no reuse"


def test_writers_beside_a_parked_id_are_served_as_without_it(backing, backing_quota):
    qm = backing_quota(B=8 << 10, opts=())
    root = qm.root
    data = os.urandom(3 << 20)
    write_through(root / "f", data)
    assert read_through(root / "f") == data
    assert ids(root)["parked"] == 1
    c0 = counts(root)
    # a writer alone (the id parked): a caching open, as before; a reader
    # beside it is one too and sees each write at once; a shared mapping
    # works, even of a file with a hole (a passthrough writer's would be
    # refused: ETXTBSY)
    os.truncate(root / "f", 4 << 20)                   # a hole at the end
    fd = os.open(root / "f", os.O_RDWR)
    try:
        os.pwrite(fd, b"W" * 4096, 0)
        with open(root / "f", "rb") as r:
            assert r.read(4096) == b"W" * 4096
            os.pwrite(fd, b"X" * 4096, 8192)
            assert os.pread(r.fileno(), 4096, 8192) == b"X" * 4096
        with mmap.mmap(fd, 4 << 20, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            mm[(3 << 20) + 4096:(3 << 20) + 8192] = b"M" * 4096     # into the hole
            mm.flush()
        # appending through the quota up to its hard limit: EDQUOT, exact
        os.lseek(fd, 0, os.SEEK_END)
        chunk = os.urandom(1 << 20)
        with pytest.raises(OSError) as e:
            for _ in range(16):
                os.write(fd, chunk)
        assert e.value.errno == errno.EDQUOT
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    c1 = counts(root)
    assert c1["write"] - c0.get("write", 0) >= 3
    assert c1.get("read", 0) > c0.get("read", 0)       # the caching reader's reads came here
    qm.assert_exact()
    assert recount(qm.private).space <= (8 << 20) + (1 << 20)
    # the writer gone: the file still has holes (3 MiB to 3 MiB + 4 KiB and
    # past the mapped page), so a reader is a caching one; the id stays parked
    want = (b"W" * 4096 + data[4096:8192] + b"X" * 4096 + data[12288:]
            + b"\0" * 4096 + b"M" * 4096)
    got = read_through(root / "f")
    assert len(got) == size and got[:len(want)] == want
    b = ids(root)
    assert (b["active"], b["parked"], b["opened"], b["closed"]) == (0, 1, 1, 0)
    qm.assert_exact()
