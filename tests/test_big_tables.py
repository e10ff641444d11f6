"""100,000 uid/gid objects: ``show -t`` and ``import`` in the original's time.

The original prints ``show -t`` of 100,000 objects in 0.41-0.58 s; each of ours
must take at most 1.5 times that (0.87 s).  What is measured is the command's
own processor time (user + system, from the kernel's rusage of the child), not
the wall clock, which other work on the machine stretches (this suite runs
mounts and racers beside it).  Before: 1.2 s for show -t, 1.4 s for import
(the cyclic garbage collector walking every new object over and over, and
one Python call per number validated or unpacked).
"""

from __future__ import annotations

import os
import struct
import subprocess
from functools import reduce
from operator import xor

from conftest import VZQUOTA
from vzquota.model import Counter, QuotaObject, QuotaState
from vzquota.qfile import QuotaFile

N = 100_000
ORIGINAL = 0.58          # the slower of the original's times
BOUND = 1.5 * ORIGINAL


def measured(*args: str) -> tuple[float, bytes]:
    """Best of three runs' processor time (the least disturbed), and the output."""
    best, out = None, b""
    for _ in range(3):
        r0 = os.times()
        r = subprocess.run([VZQUOTA, *args], capture_output=True)
        r1 = os.times()
        assert r.returncode == 0, r.stderr
        cpu = (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)
        best = cpu if best is None else min(best, cpu)
        out = r.stdout
    return best, out


def test_show_t_of_100000_objects(world_tmp):
    st = QuotaState(qid=101, path=str(world_tmp), ugid_on=True, ugid_limit=2 * N)
    st.level1.space.soft = st.level1.space.hard = 1 << 40
    st.level1.inodes.soft = st.level1.inodes.hard = 1 << 24
    for i in range(N // 2):
        st.users[1000 + i] = QuotaObject(Counter(4096 * (i % 100), 1000 << 10, 2000 << 10),
                                         Counter(i % 50, 100, 200))
        st.groups[1000 + i] = QuotaObject(Counter(4096 * (i % 100)), Counter(i % 50))
    QuotaFile.for_id(101).save(st)
    cpu, out = measured("show", "101", "-t")
    lines = out.decode().splitlines()
    assert len(lines) == 3 + 11 + 2 * N           # level 1, the -t head, 2 rows each
    assert lines[-1] == "%-11d %5s %9s %11d %11d %11d %8s %6s" % (
        50999, "group", "inodes", 49, 0, 0, "", "")
    assert cpu <= BOUND, f"show -t took {cpu:.2f} s of processor time (bound {BOUND:.2f})"
    cpu, out = measured("-b", "show", "101", "-t")
    assert cpu <= BOUND, f"-b show -t took {cpu:.2f} s (bound {BOUND:.2f})"


def test_import_of_100000_objects(world_tmp):
    """An OpenVZ v3 file (x86_64 layout) with 100,000 objects."""
    b = bytearray(struct.pack("<II", 0xFEDCBC27, 4))                  # QUOTA_UGID_ON
    b += struct.pack("<QQqQIIqI4x", 1 << 40, 1 << 40, 0, 4096, 1 << 24, 1 << 24, 0, 5)
    b += struct.pack("<qqI4x", 86400, 86400, 0)
    path = str(world_tmp).encode()
    b += struct.pack("<Q", len(path)) + path
    b += struct.pack("<IIII", 2 * N, 0, 0, N) + struct.pack("<qqI4x", 604800, 604800, 0) * 2
    rec = struct.Struct("<IIQQqQIIqI4xI4x")
    b += b"".join(rec.pack(1000 + i // 2, i % 2, 2000 << 10, 1000 << 10, 0,
                           4096 * (i % 100), 200, 100, 0, i % 50, 1) for i in range(N))
    b += b"\0" * (-len(b) % 8)
    data = bytes(b)
    data += struct.pack("<Q", reduce(xor, memoryview(data).cast("Q"), 0))
    f = world_tmp / "quota.7"
    f.write_bytes(data)
    cpu, _ = measured("-q", "import", "7", str(f))
    assert cpu <= BOUND, f"import took {cpu:.2f} s of processor time (bound {BOUND:.2f})"
    st = QuotaFile.for_id(7).load()
    assert len(st.users) == len(st.groups) == N // 2
    assert st.users[1000].space.soft == 1000 << 10 and st.groups[50999].inodes.usage == 49
