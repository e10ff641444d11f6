"""Passthrough reads (FUSE_PASSTHROUGH): by default (``-o nopassthrough``
turns it off), the kernel reads a file of ``passthrough_min`` bytes or more
opened read-only from the backing file itself, so the daemon sees no READ and
the page cache holds one copy of what is read; ``-o passthrough`` does so
for every file, whatever its size.

The kernel keeps one io mode per inode (fs/fuse/iomode.c): while a
passthrough open of it exists, every other open must be passthrough too
(else EIO), FOPEN_DIRECT_IO or not; while a caching open exists, no
passthrough open may start.  So while a file has passthrough readers, a
writer is answered PASSTHROUGH|DIRECT_IO: its reads and writes come to the
daemon (charged; the readers see them at once), only its mmap goes to the
backing file.  A writer that may map the file shared (O_RDWR) is refused
(ETXTBSY) if the file has holes, and from then on while the file may be
mapped the daemon keeps it without holes (a store through a mapping can only
allocate where there is a hole): at the last close it asks the kernel to
forget the inode, which the kernel does unless a mapping holds it.  Any
user's read-only open may be passthrough.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap
import os
import subprocess
import time

import pytest
from backing import recount
from mounts import SIMFS

COUNTS = "trusted.simfs.requests"


def counts(root) -> dict[str, int]:
    return json.loads(os.getxattr(root, COUNTS))


def cached_kib(*paths) -> int:
    """KiB of page cache the files at ``paths`` hold themselves (cachestat(2),
    Linux 6.5: the machine's Cached: moves with other jobs)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    total = 0
    for path in paths:
        rng = (ctypes.c_uint64 * 2)(0, 0)       # the whole file
        cs = (ctypes.c_uint64 * 5)()            # nr_cache first
        fd = os.open(path, os.O_RDONLY)
        try:
            if libc.syscall(ctypes.c_long(451), ctypes.c_int(fd), rng, cs,
                            ctypes.c_uint(0)) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
        finally:
            os.close(fd)
        total += cs[0] * os.sysconf("SC_PAGE_SIZE") // 1024
    return total


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
    m = mounter(private, root, "ro", "passthrough")
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
    assert json.loads(os.getxattr(root, "trusted.simfs.options"))["passthrough_in_use"] is True
    assert "PASSTHROUGH" in m.logtext()


def test_one_page_cache_copy(ro_mount):
    private, root, m, data = ro_mount
    drop_caches()
    base = cached_kib(root / "big", private / "big")
    with open(root / "big", "rb") as f:
        while f.read(1 << 20):
            pass
    grown = cached_kib(root / "big", private / "big") - base
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
    with open(root / "small", "rb") as d:          # its id, parked at the last close, again
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
        before = counts(root)
        # writers beside it: passthrough with direct I/O, written through the daemon
        w = os.open(root / "small", os.O_RDWR)
        try:
            assert os.pwrite(w, b"HE", 0) == 2
            assert reader.read() == b"HEllo\n"         # at once, from the backing file
        finally:
            os.close(w)
        fd = os.open(root / "small", os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"+")
        os.close(fd)
        assert os.pread(reader.fileno(), 16, 0) == b"HEllo\n+"
        after = counts(root)
        assert after["write"] - before.get("write", 0) == 2
        assert after.get("read", 0) == before.get("read", 0)
    finally:
        reader.close()
    with open(root / "small", "r+b") as w:              # readers gone: a caching writer
        w.write(b"HELLO")
        w.flush()
        before = counts(root).get("read", 0)
        with open(root / "small", "rb") as r:           # a reader beside it: cached, coherent
            assert r.read() == b"HELLO\n+"
        assert counts(root).get("read", 0) > before
    assert (private / "small").read_bytes() == b"HELLO\n+"
    before = counts(root).get("read", 0)
    with open(root / "small", "rb") as r:               # alone again: passthrough
        assert r.read() == b"HELLO\n+"
    assert counts(root).get("read", 0) == before


def write_through(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def test_passthrough_on_a_writable_mount(backing, backing_quota):
    qm = backing_quota(B=64 << 10, opts=("passthrough",))
    root = qm.root
    assert json.loads(os.getxattr(root, "trusted.simfs.options"))["passthrough_in_use"] is True
    data = os.urandom(3 << 20)
    write_through(root / "f", data)                     # written through the daemon
    c0 = counts(root)
    with open(root / "f", "rb") as a, open(root / "f", "rb") as b:
        assert a.read() == data and b.read(4096) == data[:4096]
        with mmap.mmap(a.fileno(), 0, prot=mmap.PROT_READ) as mm:   # read-only mmap
            assert mm[-4096:] == data[-4096:]
        # a writer beside a passthrough reader: its writes come to the daemon
        # (charged) and the reader sees them at once
        for flags in (os.O_WRONLY, os.O_RDWR):
            fd = os.open(root / "f", flags)
            try:
                os.pwrite(fd, data[:4096], 0)
            finally:
                os.close(fd)
        assert os.pread(a.fileno(), 4096, 0) == data[:4096]
        # a truncate by name comes to the daemon and the reader sees it at once
        os.truncate(root / "f", 1 << 20)
        assert os.fstat(a.fileno()).st_size == 1 << 20
        assert os.pread(a.fileno(), 8192, (1 << 20) - 4096) == data[(1 << 20) - 4096:1 << 20]
    c1 = counts(root)
    assert c1.get("read", 0) == c0.get("read", 0)       # no READ reached the daemon
    assert c1["write"] - c0.get("write", 0) >= 2
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
    base = cached_kib(root / "big", private / "big")
    with open(root / "big", "rb") as f:
        while f.read(1 << 20):
            pass
    grown = cached_kib(root / "big", private / "big") - base
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


def test_any_users_read_is_passthrough_and_holds_off_no_writer(mounter, area):
    # a passthrough reader no longer holds off writers (they are answered
    # PASSTHROUGH|DIRECT_IO), so a user who may only read a file reads it by
    # passthrough too, and its owner writes it meanwhile
    from mounts import USER_PYTHON
    private, root = area
    (private / "roots").write_bytes(b"r" * 100)
    (private / "mine").write_bytes(b"m" * 100)
    os.chown(private / "mine", 1000, 1000)
    os.chmod(private, 0o755)
    mounter(private, root, "passthrough")
    hold = ("import os, sys\n"
            "f = open(sys.argv[1], 'rb'); f.read(); print('open', flush=True)\n"
            "sys.stdin.readline()\n"
            "print(os.pread(f.fileno(), 200, 0).decode(), flush=True)\n")
    for name in ("roots", "mine"):
        before = counts(root)
        p = subprocess.Popen([USER_PYTHON, "-c", hold, str(root / name)], user=1000,
                             group=1000, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
        try:
            assert p.stdout.readline() == "open\n"
            for flags in (os.O_WRONLY | os.O_APPEND, os.O_RDWR):
                fd = os.open(root / name, flags)
                os.write(fd, b"+")
                os.close(fd)
            p.stdin.write("\n")
            p.stdin.flush()
            assert p.stdout.readline() == "+" + name[0] * 99 + "+\n"
        finally:
            p.stdin.close()
            assert p.wait(30) == 0
        after = counts(root)
        assert after.get("read", 0) == before.get("read", 0)   # the user's reads: none
        assert after["write"] - before.get("write", 0) == 2
    assert (private / "roots").read_bytes() == b"+" + b"r" * 99 + b"+"


# ---- writers beside passthrough readers, on the four backings -----------------

BIG = 3 << 20


def holes(path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return size > 0 and os.lseek(fd, 0, os.SEEK_HOLE) < size
    finally:
        os.close(fd)


def test_a_writer_beside_a_passthrough_reader(backing, backing_quota):
    qm = backing_quota(B=8 << 10, opts=())      # the default: files of 128 KiB or more
    root = qm.root
    data = os.urandom(BIG)
    write_through(root / "f", data)
    c0 = counts(root)
    r = open(root / "f", "rb")
    try:
        assert r.read(4096) == data[:4096]
        w = os.open(root / "f", os.O_RDWR)
        try:
            assert os.pwrite(w, b"W" * 8192, 4096) == 8192
            assert os.pread(r.fileno(), 8192, 4096) == b"W" * 8192     # at once
            assert os.pread(w, 4, 4096) == b"WWWW"
            # appending through the quota up to its hard limit
            os.lseek(w, 0, os.SEEK_END)
            chunk = os.urandom(1 << 20)
            with pytest.raises(OSError) as e:
                for _ in range(64):
                    os.write(w, chunk)
            assert e.value.errno == errno.EDQUOT
            size = os.fstat(w).st_size
            assert os.fstat(r.fileno()).st_size == size
            assert os.pread(r.fileno(), 4096, size - 4096) == os.pread(w, 4096, size - 4096)
        finally:
            os.close(w)
        c1 = counts(root)
        # the reader's reads never came to the daemon; the writer's did
        assert c1["write"] - c0.get("write", 0) >= 2
    finally:
        r.close()
    qm.assert_exact()
    assert recount(qm.private).space <= (8 << 20) + (1 << 20)


def test_a_shared_mapping_of_a_passthrough_writer(backing, backing_quota):
    qm = backing_quota(B=64 << 10, opts=())
    root = qm.root
    data = os.urandom(BIG)
    write_through(root / "f", data)
    r = open(root / "f", "rb")
    try:
        r.read(1)
        c0 = counts(root)
        fd = os.open(root / "f", os.O_RDWR)     # no hole: may map it shared
        mm = mmap.mmap(fd, BIG, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        mm[8192:16384] = b"M" * 8192
        mm.flush()
        assert os.pread(r.fileno(), 8192, 8192) == b"M" * 8192
        assert counts(root)["write"] == c0.get("write", 0)   # the mapping's: to the backing file
        os.close(fd)                # Python's mmap keeps a duplicate: not released
        try:
            # so the file stays without holes while it may be mapped
            with pytest.raises(OSError) as e:
                os.truncate(root / "f", 2 * BIG)
            assert e.value.errno == errno.ETXTBSY
            w = os.open(root / "f", os.O_WRONLY)
            try:
                with pytest.raises(OSError) as e:      # a punch: EOPNOTSUPP
                    lower_fallocate(w, 0x03, 0, 4096)
                assert e.value.errno == errno.EOPNOTSUPP
                # a write past the end: the gap is written with zeros, charged
                assert os.pwrite(w, b"E" * 100, BIG + (1 << 20)) == 100
                assert not holes(qm.private / "f")
                qm.assert_exact()
                # a copy past the end: the kernel's fallback, plain writes
                assert os.copy_file_range(r.fileno(), w, 4096, 0,
                                          os.fstat(w).st_size + 65536) == 4096
                assert not holes(qm.private / "f")
            finally:
                os.close(w)
            mm[0:4] = b"LAST"
            mm.flush()
        finally:
            mm.close()
    finally:
        r.close()
    got = (qm.private / "f").read_bytes()
    assert got[:4] == b"LAST" and got[8192:16384] == b"M" * 8192
    assert got[BIG:BIG + (1 << 20)] == bytes(1 << 20)
    qm.assert_exact()
    # unmapped and released: holes are allowed again, at once
    os.truncate(root / "f", 2 * BIG)
    assert holes(qm.private / "f")
    qm.assert_exact()


def test_a_sparse_file_is_read_through_the_page_cache(backing, backing_quota):
    # a reader must not lock writers out: a passthrough reader of a sparse
    # file would make every O_RDWR open of it fail (its shared mapping could
    # fill the hole unseen), and any user may read a world-readable sparse
    # file (lastlog).  So a reader of a sparse file is a caching one.
    from mounts import USER_PYTHON
    qm = backing_quota(B=64 << 10, opts=())
    root = qm.root
    with open(root / "s", "wb") as f:           # a hole in the middle
        f.write(os.urandom(1 << 20))
        f.seek(2 << 20)
        f.write(os.urandom(1 << 20))
    os.chmod(root / "s", 0o644)
    assert holes(qm.private / "s")
    hold = ("import sys\n"
            "f = open(sys.argv[1], 'rb'); f.read(1); print('open', flush=True)\n"
            "sys.stdin.readline()\n")
    drop_caches()
    before = counts(root)
    p = subprocess.Popen([USER_PYTHON, "-c", hold, str(root / "s")], user=1000, group=1000,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "open\n"
        assert counts(root).get("read", 0) > before.get("read", 0)   # through the daemon
        fd = os.open(root / "s", os.O_RDWR)     # root's writer is not locked out
        try:
            m = mmap.mmap(fd, 3 << 20, mmap.MAP_SHARED)
            m[(1 << 20) + 4096:(1 << 20) + 8192] = b"m" * 4096   # fills the hole
            m.flush()
            m.close()
        finally:
            os.close(fd)
    finally:
        p.stdin.close()
        assert p.wait(30) == 0
    qm.assert_exact()


def test_a_hole_made_beside_a_passthrough_reader_refuses_a_shared_writer(
        backing, backing_quota):
    # a writer (O_WRONLY: it cannot map) beside a passthrough reader may
    # make a hole; then an O_RDWR open, which could fill it by a mapping,
    # is refused while the reader has the file
    qm = backing_quota(B=64 << 10, opts=())
    root = qm.root
    write_through(root / "s", os.urandom(1 << 20))
    r = open(root / "s", "rb")
    try:
        r.read(1)
        w = os.open(root / "s", os.O_WRONLY)    # cannot map: may open
        try:
            with pytest.raises(OSError) as e:
                mmap.mmap(w, 4096, mmap.MAP_SHARED, mmap.PROT_WRITE)
            assert e.value.errno == errno.EACCES
            os.pwrite(w, b"x" * 4096, 2 << 20)  # past the end: a hole, charged
            assert os.pread(r.fileno(), 4096, 2 << 20) == b"x" * 4096
        finally:
            os.close(w)
        assert holes(qm.private / "s")
        with pytest.raises(OSError) as e:       # could fill the hole by a mapping
            os.open(root / "s", os.O_RDWR)
        assert e.value.errno == errno.ETXTBSY
    finally:
        r.close()
    qm.assert_exact()
    fd = os.open(root / "s", os.O_RDWR)         # no reader: a caching writer, as ever
    os.close(fd)


@contextlib.contextmanager
def beside_a_reader(path):
    """A passthrough reader of ``path`` (read once) and, beside it, an O_RDWR
    descriptor (a SHARED writer: the file is kept without holes)."""
    r = open(path, "rb")
    try:
        r.read(1)
        fd = os.open(path, os.O_RDWR)
        try:
            yield r, fd
        finally:
            os.close(fd)
    finally:
        r.close()


def map_shared(fd: int, length: int) -> int:
    """mmap(2) of ``fd``, shared and writable, by libc: Python's mmap keeps a
    duplicate of the descriptor (so the file stays open, its handle
    unreleased, while the mapping exists); this one holds no descriptor."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long)
    addr = libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return addr


def unmap(addr: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.msync.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    assert libc.msync(addr, length, 4) == 0         # MS_SYNC
    assert libc.munmap(addr, length) == 0


def test_a_closed_shared_writer_leaves_the_file_free_to_grow(backing, backing_quota):
    # once the SHARED writer and the readers have closed and nothing maps
    # the file, a growing truncate (a hole) works at once: before, the file
    # was kept without holes until the kernel forgot the inode (ETXTBSY)
    qm = backing_quota(B=64 << 10, opts=())
    root = qm.root
    write_through(root / "f", os.urandom(BIG))
    with beside_a_reader(root / "f") as (r, fd):
        assert os.pwrite(fd, b"W" * 4096, 4096) == 4096
        with pytest.raises(OSError) as e:       # while it is open: kept whole
            os.truncate(root / "f", 2 * BIG)
        assert e.value.errno == errno.ETXTBSY
    qm.assert_exact()
    os.truncate(root / "f", 2 * BIG)            # at once
    assert os.stat(root / "f").st_size == 2 * BIG
    assert holes(qm.private / "f")
    qm.assert_exact()
    fd = os.open(root / "f", os.O_WRONLY)       # and a punch works again
    try:
        lower_fallocate(fd, 0x03, 0, 65536)
    finally:
        os.close(fd)
    qm.assert_exact()


def test_the_kernel_forgets_a_closed_shared_writers_file(backing, backing_quota):
    # at the last release of a file a SHARED writer had, the daemon asks the
    # kernel to forget the inode (FUSE_NOTIFY_PRUNE): with no mapping left it
    # does so at once, its dentry cached but unused (no drop_caches), and
    # the FORGET ends the mark
    qm = backing_quota(B=64 << 10, opts=())
    root = qm.root
    write_through(root / "f", os.urandom(BIG))
    os.stat(root / "f")                         # its dentry is cached
    f0 = counts(root).get("forget", 0)
    with beside_a_reader(root / "f") as (r, fd):
        os.pwrite(fd, b"W" * 4096, 0)
    # within 12 ms measured (up to 1 s: the last retry); before, only when
    # something else dropped the dentry cache meanwhile
    deadline = time.monotonic() + 2
    while counts(root).get("forget", 0) == f0:
        assert time.monotonic() < deadline, "no FORGET after the last close"
        time.sleep(0.01)
    l0 = counts(root).get("lookup", 0)
    os.truncate(root / "f", 2 * BIG)
    assert counts(root).get("lookup", 0) > l0   # the kernel looked the name up again
    assert holes(qm.private / "f")
    qm.assert_exact()


def test_a_mapping_held_after_the_last_close_keeps_the_file_whole(backing, backing_quota):
    # a shared writable mapping outlives its descriptor (and the handle's
    # RELEASE): it holds the inode, which the kernel keeps, and the file
    # stays without holes until it is gone
    qm = backing_quota(B=64 << 10, opts=())
    root = qm.root
    write_through(root / "f", os.urandom(BIG))
    with beside_a_reader(root / "f") as (r, fd):
        addr = map_shared(fd, BIG)
    try:
        c0 = counts(root)
        with pytest.raises(OSError) as e:
            os.truncate(root / "f", 2 * BIG)
        assert e.value.errno == errno.ETXTBSY
        time.sleep(0.2)
        c1 = counts(root)
        assert c1.get("forget", 0) == c0.get("forget", 0)     # the kernel kept it
        assert c1.get("release", 0) == c0.get("release", 0)   # all were released
        ctypes.memmove(addr + 8192, b"M" * 8192, 8192)         # a store: no request
        with pytest.raises(OSError) as e:
            os.truncate(root / "f", 2 * BIG)
        assert e.value.errno == errno.ETXTBSY
        w = os.open(root / "f", os.O_WRONLY)
        try:
            with pytest.raises(OSError) as e:   # a punch: EOPNOTSUPP, as before
                lower_fallocate(w, 0x03, 0, 4096)
            assert e.value.errno == errno.EOPNOTSUPP
            # a write past the end: the gap is written with zeros, charged
            assert os.pwrite(w, b"E" * 100, BIG + (1 << 20)) == 100
        finally:
            os.close(w)
        assert not holes(qm.private / "f")
        qm.assert_exact()
    finally:
        unmap(addr, BIG)
    got = (qm.private / "f").read_bytes()
    assert got[8192:16384] == b"M" * 8192
    assert not holes(qm.private / "f")
    qm.assert_exact()
    os.truncate(root / "f", 4 * BIG)            # unmapped: it may grow at once
    assert holes(qm.private / "f")
    qm.assert_exact()


def test_a_gap_that_does_not_fit_is_refused_whole(backing, backing_quota):
    qm = backing_quota(B=6 << 10, opts=())
    root = qm.root
    write_through(root / "f", os.urandom(BIG))
    write_through(root / "filler", os.urandom(2 << 20))    # about 900 KiB left
    with beside_a_reader(root / "f") as (r, fd):
        size = os.fstat(fd).st_size
        with pytest.raises(OSError) as e:       # a 1 MiB gap of zeros does not fit
            os.pwrite(fd, b"z", size + (1 << 20))
        assert e.value.errno == errno.EDQUOT
        assert os.fstat(fd).st_size == size
        assert os.pwrite(fd, b"z", size + 8192) == 1     # a small gap does
        assert os.fstat(fd).st_size == size + 8193
    assert not holes(qm.private / "f")
    qm.assert_exact()


def test_a_large_gap_or_a_zeroed_range_is_refused(backing, backing_quota):
    # a file kept without holes (a shared writer beside a passthrough reader):
    # a write past a gap of more than gap_zeros (1 MiB) gets ETXTBSY, as a
    # growing truncate does, and nothing changes: its zeros would hold the
    # request loop, and a gap allocated by fallocate would be unwritten
    # extents, which stores through the mapping split (ext4, XFS: tree
    # blocks no request shows) and SEEK_HOLE counts as a hole.  A zeroed
    # range (unwritten extents too) gets EOPNOTSUPP, as a punch does.  A gap
    # of exactly 1 MiB is written with zeros and charged.
    qm = backing_quota(B=64 << 10, opts=())
    root = qm.root
    data = os.urandom(BIG)
    write_through(root / "f", data)
    with beside_a_reader(root / "f") as (r, fd):   # marks the file
        for gap in (100 << 20, (1 << 20) + 1):
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"T" * 10, BIG + gap)
            assert e.value.errno == errno.ETXTBSY, gap
            assert os.fstat(fd).st_size == BIG
        with pytest.raises(OSError) as e:
            lower_fallocate(fd, 0x10, 0, 64 << 10)       # FALLOC_FL_ZERO_RANGE
        assert e.value.errno == errno.EOPNOTSUPP
        assert os.pread(r.fileno(), 64 << 10, 0) == data[:64 << 10]
        qm.assert_exact()
        assert os.pwrite(fd, b"T" * 10, BIG + (1 << 20)) == 10
        assert os.fstat(fd).st_size == BIG + (1 << 20) + 10
        assert os.pread(r.fileno(), 4096, BIG + 4096) == bytes(4096)
    assert not holes(qm.private / "f")
    assert os.stat(qm.private / "f").st_blocks * 512 >= BIG + (1 << 20) + 10
    qm.assert_exact()


def test_what_a_shared_mapping_frees_stays_charged_until_it_is_gone(backing, backing_quota):
    # madvise(MADV_REMOVE) through a shared passthrough mapping punches the
    # backing file with no request, and a store fills the hole again with
    # none either: an audit credited the punch at the last close and then
    # took uid 1000 to 40 times its hard limit.  What such a mapping frees now
    # stays charged while the file is marked; once nothing can map it (the
    # kernel forgot the inode) the charge follows the file again.
    qm = backing_quota(B=64 << 10, opts=(), ugid={1000: (8 << 10, 100)})
    root = qm.root
    d = root / "u"
    d.mkdir()
    os.chown(d, 1000, 1000)
    f = d / "f"
    write_through(f, os.urandom(4 << 20))
    os.chown(f, 1000, 1000)
    qm.assert_exact()
    charged = qm.live().users[1000][0]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    with beside_a_reader(f) as (r, fd):
        addr = map_shared(fd, 4 << 20)
        assert libc.madvise(addr, 4 << 20, mmap.MADV_REMOVE) == 0, ctypes.get_errno()
        assert os.stat(qm.private / "u/f").st_blocks * 512 < 1 << 20     # punched
    try:
        time.sleep(0.3)                                 # every handle released
        assert qm.live().users[1000][0] == charged      # not credited
        ctypes.memset(addr, 0x41, 4 << 20)              # filled again, no request
    finally:
        unmap(addr, 4 << 20)
    assert qm.live().users[1000][0] == charged
    assert qm.live().users[1000][0] <= 8 << 20
    deadline = time.monotonic() + 10                    # the kernel forgets it
    while time.monotonic() < deadline:
        try:
            qm.assert_exact(timeout=0.5)
            break
        except AssertionError:
            time.sleep(0.2)
    qm.assert_exact()
    f.unlink()
    qm.assert_exact()
    assert qm.live().users.get(1000, (0, 0))[0] <= 8 << 10


def lower_fallocate(fd: int, mode: int, off: int, length: int) -> None:
    from simfs import lower
    lower.fallocate(fd, mode, off, length)


def test_small_files_stay_in_the_page_cache_by_default(mounter, area):
    private, root = area
    (private / "small").write_bytes(b"s" * 4096)
    (private / "big").write_bytes(b"b" * (1 << 20))
    m = mounter(private, root)
    opts = json.loads(os.getxattr(root, "trusted.simfs.options"))
    assert opts["passthrough_in_use"] is True and opts["passthrough"] is False
    # -o passthrough (every size) is a change a remount must refuse
    for flag in ("passthrough", "nopassthrough"):
        r = subprocess.run([SIMFS, "/dev/simfs", str(root), "-o", f"remount,{flag}"],
                           capture_output=True, text=True)
        assert r.returncode == 2, r
        assert f"cannot change {flag} (the mount runs without it)" in r.stderr, r
    before = counts(root).get("read", 0)
    for _ in range(3):
        assert (root / "small").read_bytes() == b"s" * 4096
    assert counts(root).get("read", 0) - before == 1      # once, then the page cache
    before = counts(root).get("read", 0)
    assert (root / "big").read_bytes() == b"b" * (1 << 20)
    assert counts(root).get("read", 0) == before           # passthrough
    assert "PASSTHROUGH" in m.logtext()


def test_nopassthrough_reads_through_the_daemon(mounter, area):
    private, root = area
    (private / "big").write_bytes(b"b" * (1 << 20))
    m = mounter(private, root, "nopassthrough")
    assert json.loads(os.getxattr(root, "trusted.simfs.options"))["passthrough_in_use"] is False
    r = subprocess.run([SIMFS, "/dev/simfs", str(root), "-o", "remount,rw,nopassthrough"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r                          # the same flag: fine
    before = counts(root).get("read", 0)
    assert (root / "big").read_bytes() == b"b" * (1 << 20)
    assert counts(root).get("read", 0) > before


def uncached(path, data: bytes, kind: str) -> None:
    """``path`` written with ``data`` and none of it left in the page cache
    (on tmpfs, whose pages are the file, all of it)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert cached_kib(path) == (len(data) >> 10 if kind == "tmpfs" else 0)


# RWF_DONTCACHE (Linux 6.14): ext4 and XFS take it; btrfs and tmpfs refuse it
# (EOPNOTSUPP), so there the backing file keeps its copy as before (tmpfs's
# pages are the file itself)
DROPS_BEHIND = {"ext4": True, "xfs": True, "btrfs": False, "tmpfs": False}


def test_a_file_read_through_the_daemon_is_cached_once(backing, backing_quota):
    """A file read through the FUSE page cache (small files, under
    passthrough_min; a large one open for writing too, so not passthrough) is
    one copy in the page cache: the backing file's pages the daemon's READs
    bring in are dropped (RWF_DONTCACHE) where the backing filesystem can;
    pages it had cached already stay; an O_DIRECT reader (no FUSE copy) keeps
    the backing file's."""
    files = {"s8k": os.urandom(8 << 10), "s64k": os.urandom(64 << 10),
             "big": os.urandom(4 << 20), "warm": os.urandom(64 << 10),
             "direct": os.urandom(64 << 10)}
    backing.private.mkdir(exist_ok=True)
    for name, d in files.items():
        uncached(backing.private / name, d, backing.kind)
    assert (backing.private / "warm").read_bytes() == files["warm"]  # cached behind
    qm = backing_quota()
    root, private = qm.root, qm.private
    c0 = counts(root).get("read", 0)
    for name in ("s8k", "s64k", "warm"):
        assert (root / name).read_bytes() == files[name]
        assert (root / name).read_bytes() == files[name]          # the page cache's
    with open(root / "big", "r+b") as f:                          # a writer: caching
        assert f.read() == files["big"]
        f.seek(0)
        assert f.read() == files["big"]
        # while it is open: its last close ends the caching mode (a reader's
        # open of a file this large is passthrough)
        assert cached_kib(root / "big") == 4 << 10
        assert cached_kib(private / "big") == (0 if DROPS_BEHIND[backing.kind] else 4 << 10)
    assert counts(root).get("read", 0) > c0                       # through the daemon
    for name in ("s8k", "s64k"):
        kib = len(files[name]) >> 10
        assert cached_kib(root / name) == kib, name               # FUSE's copy
        want = 0 if DROPS_BEHIND[backing.kind] else kib
        assert cached_kib(private / name) == want, (name, backing.kind)
    assert cached_kib(private / "warm") == 64                     # it stays cached
    fd = os.open(root / "direct", os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 64 << 10)
        assert os.preadv(fd, (buf,), 0) == 64 << 10 and buf[:] == files["direct"]
    finally:
        os.close(fd)
    assert cached_kib(root / "direct") == 0                       # no FUSE copy
    assert cached_kib(private / "direct") == 64                   # so the backing's stays
    qm.assert_exact()
    said = "refuses RWF_DONTCACHE" in qm.mount.logtext()       # the admin is told
    assert said is not DROPS_BEHIND[backing.kind]
