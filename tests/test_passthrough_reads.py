"""Passthrough reads (FUSE_PASSTHROUGH): on a read-only mount the kernel reads
the backing file itself, so the daemon sees no READ and the page cache holds
one copy of what is read.

The kernel lets no open of an inode be anything but passthrough while a
passthrough open of it exists (fs/fuse/iomode.c), and a writer's open may
never be one (its writes must go through the quota), so only a read-only
mount uses it; a mount made writable behind the daemon's back (mount(8)
remounts without asking simfs) stops using it at the first open for writing.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess

import pytest

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


def test_a_mount_made_writable_stops_passthrough(ro_mount):
    private, root, m, data = ro_mount
    reader = open(root / "small", "rb")                 # passthrough
    try:
        # -i: the kernel remounts without asking simfs (whether mount(8) runs a
        # helper for a remount depends on the system)
        subprocess.run(["mount", "-i", "-o", "remount,rw", str(root)], check=True)
        with pytest.raises(OSError) as e:
            open(root / "small", "r+b")
        assert e.value.errno == errno.ETXTBSY
        assert reader.read() == b"hello\n"
    finally:
        reader.close()
    with open(root / "small", "r+b") as w:              # readers gone: a writer may open
        w.write(b"HELLO")
        w.flush()
        with open(root / "small", "rb") as r:           # a reader beside it: cached, coherent
            assert r.read() == b"HELLO\n"
    assert (private / "small").read_bytes() == b"HELLO\n"
    assert "passthrough stops" in m.logtext()


def test_simfs_refuses_to_remount_a_passthrough_mount_writable(ro_mount, tmp_path):
    private, root, m, data = ro_mount
    from conftest import SIMFS
    r = subprocess.run([SIMFS, "/dev/simfs", str(root), "-o", "remount,rw"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "passthrough" in r.stderr
    assert "ro" in next(ln for ln in open("/proc/self/mountinfo")
                        if ln.split()[4] == str(root)).split()[5].split(",")
