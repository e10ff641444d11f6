"""How many FUSE requests simfs makes the kernel send, through a real mount.

The daemon counts the requests it answers per operation and shows the counts
to the host's root as the virtual attribute ``trusted.simfs.requests`` of the
mount's root (JSON).  These tests check the counts against what a process did,
and the request savings that rest on them: a missing name is cached by the
kernel (one LOOKUP, not one per stat), and close(2) stops costing a FLUSH after
the first one.
"""

from __future__ import annotations

import errno
import json
import os

import pytest

from conftest import py_as

COUNTS = "trusted.simfs.requests"


def counts(root) -> dict[str, int]:
    return json.loads(os.getxattr(root, COUNTS))


def test_counts_follow_what_a_process_does(mounted):
    private, root, m = mounted
    (private / "f").write_bytes(b"x")
    before = counts(root)
    st = os.stat(root / "f")
    after = counts(root)
    assert st.st_size == 1
    assert after.get("lookup", 0) == before.get("lookup", 0) + 1
    fd = os.open(root / "f", os.O_RDONLY)
    os.close(fd)
    assert counts(root).get("open", 0) == after.get("open", 0) + 1


def test_counts_attribute_is_read_only_and_hosts_only(mounted):
    private, root, m = mounted
    with pytest.raises(OSError) as ei:
        os.setxattr(root, COUNTS, b"{}")
    assert ei.value.errno == errno.EPERM
    with pytest.raises(OSError) as ei:
        os.removexattr(root, COUNTS)
    assert ei.value.errno == errno.EPERM
    # trusted.* needs the host's CAP_SYS_ADMIN: an ordinary user gets nothing
    p = py_as(1000, 1000, "import os, sys\n"
              "try:\n    os.getxattr(sys.argv[1], sys.argv[2])\n"
              "except OSError as e:\n    print(e.errno)\n", str(root), COUNTS)
    assert p.stdout.strip() == str(errno.ENODATA), p.stderr


def test_missing_name_is_looked_up_once_and_then_created(mounted):
    private, root, m = mounted
    before = counts(root).get("lookup", 0)
    for _ in range(5):
        assert not os.path.exists(root / "nope")
    assert counts(root).get("lookup", 0) == before + 1
    # created through the mount: the cached negative entry is replaced at once
    (root / "nope").write_bytes(b"here")
    assert (root / "nope").read_bytes() == b"here"
    assert (private / "nope").read_bytes() == b"here"
    os.mkdir(root / "d")
    assert not os.path.exists(root / "d" / "x")
    os.rename(root / "nope", root / "d" / "x")
    assert (root / "d" / "x").read_bytes() == b"here"


def test_close_sends_at_most_one_flush_per_mount(mounted):
    private, root, m = mounted
    for i in range(5):
        fd = os.open(root / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"data %d" % i)
        os.close(fd)
    c = counts(root)
    assert c.get("create", 0) == 5
    assert c.get("flush", 0) <= 1
    for i in range(5):
        assert (private / f"f{i}").read_bytes() == b"data %d" % i


def _bdi_readahead_kb(root) -> int:
    st = os.stat(root)
    with open(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb") as f:
        return int(f.read())


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def test_cold_sequential_read_costs_one_read_per_mib(mounter, area):
    """The mount's readahead is one 1 MiB request (its max_pages), not the
    kernel's default 128 KiB: a cold sequential read of 1 MiB read(2)s through
    the daemon (nopassthrough) costs one READ per MiB (it cost eight)."""
    if os.environ.get("SIMFS_TEST_FUSE", "builtin") != "builtin":
        pytest.skip("the readahead is set by fusewire (the pyfuse3 fallback keeps 128 KiB)")
    private, root = area
    mounter(private, root, "nopassthrough")
    assert _bdi_readahead_kb(root) == 1024
    mib = 1 << 20
    data = os.urandom(mib) * 16
    (private / "big").write_bytes(data)
    _drop_caches()
    if "passthrough" in os.environ.get("SIMFS_TEST_OPTIONS", ""):
        pytest.skip("a passthrough read sends no READ at all")
    before = counts(root).get("read", 0)
    fd = os.open(root / "big", os.O_RDONLY)
    try:
        got = bytearray()
        while chunk := os.read(fd, mib):
            got += chunk
    finally:
        os.close(fd)
    assert got == data
    reads = counts(root).get("read", 0) - before
    assert 16 <= reads <= 18, reads      # 16 MiB: one READ per MiB (the first may split)
