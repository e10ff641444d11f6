"""Passthrough reads (FUSE_PASSTHROUGH): on a read-only mount, and on a
writable one mounted with ``-o passthrough``, the kernel reads a file opened
read-only from the backing file itself, so the daemon sees no READ and the
page cache holds one copy of what is read.

The kernel keeps one io mode per inode (fs/fuse/iomode.c): while a
passthrough open of it exists, every other open must be passthrough too
(else EIO), FOPEN_DIRECT_IO or not; while a caching open exists, no
passthrough open may start.  A writer's open may never be passthrough (its
writes, mmap included, must go through the quota), so the daemon decides per
open: a read-only open is passthrough unless the file has a caching open
(then it is one, as without passthrough), and an open for writing gets
ETXTBSY while a passthrough reader has the file open.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess

import pytest
from backing import recount

COUNTS = "trusted.simfs.requests"


def counts(root) -> dict[str, int]:
    return json.loads(os.getxattr(root, COUNTS))


def cached_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1])
    raise AssertionError("no Cached: in /proc/meminfo")


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


@pytest.fixture
def ro_mount(mounter, area):
    private, root = area
    data = os.urandom(32 << 20)
    (private / "big").write_bytes(data)
    (private / "small").write_bytes(b"hello\n")
    m = mounter(private, root, "ro")
    return private, root, m, data


def test_reads_of_a_read_only_mount_bypass_the_daemon(ro_mount):
    private, root, m, data = ro_mount
    before = counts(root)
    with open(root / "big", "rb") as f:
        assert f.read() == data
    with open(root / "small", "rb") as f:
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            assert mm[:] == b"hello\n"
    after = counts(root)
    assert after.get("read", 0) == before.get("read", 0)        # no READ at all
    assert after["open"] - before.get("open", 0) == 2
    assert json.loads(os.getxattr(root, "trusted.simfs.options"))["passthrough"] is True
    assert "PASSTHROUGH" in m.logtext()


def test_one_page_cache_copy(ro_mount):
    private, root, m, data = ro_mount
    drop_caches()
    base = cached_kib()
    with open(root / "big", "rb") as f:
        while f.read(1 << 20):
            pass
    grown = cached_kib() - base
    size = len(data) // 1024
    # through the daemon this was the FUSE copy plus the backing file's (~2x)
    assert grown < 1.5 * size, (grown, size)


def test_two_readers_of_one_file_at_once(ro_mount):
    # one backing id per inode: the kernel refuses a second backing file for
    # an inode (EBUSY), which made the second reader's open fail with EIO
    private, root, m, data = ro_mount
    before = counts(root)
    with open(root / "small", "rb") as a, open(root / "small", "rb") as b:
        assert a.read() == b.read() == b"hello\n"
        with open(root / "small", "rb") as c:
            assert c.read() == b"hello\n"
    with open(root / "small", "rb") as d:          # its id was closed and a new one made
        assert d.read() == b"hello\n"
    after = counts(root)
    assert after.get("read", 0) == before.get("read", 0)
    assert after["release"] - before.get("release", 0) == 4


def test_a_mount_remounted_writable_keeps_passthrough(ro_mount):
    private, root, m, data = ro_mount
    from conftest import SIMFS
    r = subprocess.run([SIMFS, "/dev/simfs", str(root), "-o", "remount,rw"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    reader = open(root / "small", "rb")                 # passthrough
    try:
        for flags in (os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(OSError) as e:
                os.open(root / "small", flags)
            assert e.value.errno == errno.ETXTBSY
        assert reader.read() == b"hello\n"
    finally:
        reader.close()
    with open(root / "small", "r+b") as w:              # readers gone: a writer may open
        w.write(b"HELLO")
        w.flush()
        before = counts(root).get("read", 0)
        with open(root / "small", "rb") as r:           # a reader beside it: cached, coherent
            assert r.read() == b"HELLO\n"
        assert counts(root).get("read", 0) > before
    assert (private / "small").read_bytes() == b"HELLO\n"
    before = counts(root).get("read", 0)
    with open(root / "small", "rb") as r:               # alone again: passthrough
        assert r.read() == b"HELLO\n"
    assert counts(root).get("read", 0) == before


def write_through(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def test_passthrough_on_a_writable_mount(backing, backing_quota):
    qm = backing_quota(B=64 << 10, opts=("passthrough",))
    root = qm.root
    assert json.loads(os.getxattr(root, "trusted.simfs.options"))["passthrough"] is True
    data = os.urandom(3 << 20)
    write_through(root / "f", data)                     # written through the daemon
    c0 = counts(root)
    with open(root / "f", "rb") as a, open(root / "f", "rb") as b:
        assert a.read() == data and b.read(4096) == data[:4096]
        with mmap.mmap(a.fileno(), 0, prot=mmap.PROT_READ) as mm:   # read-only mmap
            assert mm[-4096:] == data[-4096:]
        # no writer beside a passthrough reader: its writes could not be charged
        for flags in (os.O_WRONLY, os.O_RDWR | os.O_APPEND, os.O_WRONLY | os.O_TRUNC):
            with pytest.raises(OSError) as e:
                os.open(root / "f", flags)
            assert e.value.errno == errno.ETXTBSY
        # a truncate by name comes to the daemon and the reader sees it at once
        os.truncate(root / "f", 1 << 20)
        assert os.fstat(a.fileno()).st_size == 1 << 20
        assert os.pread(a.fileno(), 8192, (1 << 20) - 4096) == data[(1 << 20) - 4096:1 << 20]
    c1 = counts(root)
    assert c1.get("read", 0) == c0.get("read", 0)       # no READ reached the daemon
    data = data[:1 << 20]
    # a writer alone: a caching open, as without passthrough; a reader beside
    # it is one too and sees each write at once; a shared mmap works
    fd = os.open(root / "f", os.O_RDWR)
    try:
        os.pwrite(fd, b"W" * 4096, 0)
        with open(root / "f", "rb") as r:
            assert r.read(4096) == b"W" * 4096
            os.pwrite(fd, b"X" * 4096, 8192)
            assert os.pread(r.fileno(), 4096, 8192) == b"X" * 4096
        with mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            mm[4096:8192] = b"M" * 4096
            mm.flush()
        os.pwrite(fd, b"Z" * (8 << 10), 1 << 20)       # grows it through the quota
    finally:
        os.close(fd)
    want = b"W" * 4096 + b"M" * 4096 + b"X" * 4096 + data[12288:] + b"Z" * (8 << 10)
    assert (qm.private / "f").read_bytes() == want
    c2 = counts(root)
    assert c2["write"] - c1.get("write", 0) >= 4        # the mmap's page came as a WRITE
    with open(root / "f", "rb") as r:                   # alone again: passthrough
        assert r.read() == want
    assert counts(root).get("read", 0) == c2.get("read", 0)
    qm.assert_exact()
    # the quota still holds for every writer: nothing past the hard limit
    with pytest.raises(OSError) as e:
        write_through(root / "big", b"\0" * (80 << 20))
    assert e.value.errno == errno.EDQUOT
    qm.assert_exact()
    assert recount(qm.private).space <= (64 << 20) + (1 << 20)


def test_one_page_cache_copy_on_a_writable_mount(mounter, area):
    private, root = area
    data = os.urandom(32 << 20)
    (private / "big").write_bytes(data)
    mounter(private, root, "passthrough")
    drop_caches()
    base = cached_kib()
    with open(root / "big", "rb") as f:
        while f.read(1 << 20):
            pass
    grown = cached_kib() - base
    assert grown < 1.2 * (len(data) // 1024), (grown, len(data) // 1024)


def test_an_o_direct_writer_beside_passthrough_readers(mounter, area):
    # an O_DIRECT open is answered FOPEN_DIRECT_IO, which takes no io mode: a
    # reader that comes after it is passthrough and sees its writes at once
    # (both end in the backing file); its mmap fails with the kernel's ENODEV
    # while passthrough readers have the file open
    private, root = area
    (private / "f").write_bytes(b"a" * 8192)
    mounter(private, root, "passthrough")
    w = os.open(root / "f", os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4096)
        buf.write(b"D" * 4096)
        before = counts(root).get("read", 0)
        with open(root / "f", "rb") as r:
            assert r.read(8) == b"aaaaaaaa"
            assert os.pwritev(w, [buf], 0) == 4096
            assert os.pread(r.fileno(), 8, 0) == b"DDDDDDDD"
            with pytest.raises(OSError) as e:
                mmap.mmap(w, 4096, mmap.MAP_PRIVATE, mmap.PROT_READ)
            assert e.value.errno == errno.ENODEV
        assert counts(root).get("read", 0) == before
        with mmap.mmap(w, 4096, mmap.MAP_PRIVATE, mmap.PROT_READ) as m:   # readers gone
            assert m[:4] == b"DDDD"
    finally:
        os.close(w)
    assert (private / "f").read_bytes() == b"D" * 4096 + b"a" * 4096


def test_only_the_owner_or_root_reads_by_passthrough(mounter, area):
    # a passthrough reader holds off every writer (ETXTBSY): a user who may
    # only read a file must not be able to do that to its owner (locally only
    # the owner may, with a read lease), so his opens go through the page cache
    from mounts import USER_PYTHON
    private, root = area
    (private / "roots").write_bytes(b"r" * 100)
    (private / "mine").write_bytes(b"m" * 100)
    os.chown(private / "mine", 1000, 1000)
    os.chmod(private, 0o755)
    mounter(private, root, "passthrough")
    hold = ("import sys, time\n"
            "f = open(sys.argv[1], 'rb'); f.read(); print('open', flush=True)\n"
            "sys.stdin.read()\n")
    for name, blocked in (("roots", False), ("mine", True)):
        p = subprocess.Popen([USER_PYTHON, "-c", hold, str(root / name)], user=1000,
                             group=1000, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
        try:
            assert p.stdout.readline() == "open\n"
            if blocked:                     # his own file: passthrough
                with pytest.raises(OSError) as e:
                    os.open(root / name, os.O_WRONLY | os.O_APPEND)
                assert e.value.errno == errno.ETXTBSY
            else:                           # root's file: root may still write it
                fd = os.open(root / name, os.O_WRONLY | os.O_APPEND)
                os.write(fd, b"+")
                os.close(fd)
        finally:
            p.stdin.close()
            assert p.wait(30) == 0
    assert (private / "roots").read_bytes() == b"r" * 100 + b"+"
    with open(root / "mine", "ab") as f:      # his reader gone: root writes it
        f.write(b"+")
