"""Times before 1970 through a quota'd mount, on ext4, XFS, btrfs and tmpfs.

fuse_attr's seconds are unsigned on the wire, but the kernel reads them as
time64_t.  simfs packed them unsigned: a file dated before 1970 made every
answer carrying its attributes fail to encode (EIO), after the handler had
done its work.  One user of a shared directory could so lock everyone out of
listing it (readdirplus), a tar with old dates failed, and each failed entry
left a lookup the kernel never got: the inode (and its blocks, charged to its
owner) stayed after its last unlink.  An audit found it; this is its repro.
"""

from __future__ import annotations

import os
import subprocess

import pytest

import backing as bk
from conftest import py_as

pytestmark = pytest.mark.parametrize("backing", bk.params(), indirect=True)

OLD = [-1_500_000_000, -86_400 * 365 * 10**9, -((1 << 31) - 1) * 10**9 + 7]   # ns, down to 1901

# uid 1000 dates files of its own in the shared directory before 1970
PLANT = r"""
import os, sys
d, times = sys.argv[1], [int(t) for t in sys.argv[2:]]
for i, t in enumerate(times):
    p = os.path.join(d, f"old{i}")
    with open(p, "wb") as f:
        f.write(b"o" * 5000)
    os.utime(p, ns=(t, t))
    os.link(p, p + ".link")
"""

# uid 1001 lists the directory (readdirplus), stats, writes and removes its own
OTHER = r"""
import os, sys
d = sys.argv[1]
names = sorted(os.listdir(d))
print(" ".join(names))
for e in os.scandir(d):
    e.stat(follow_symlinks=False)
for i in range(20):
    with open(os.path.join(d, f"mine{i}"), "wb") as f:
        f.write(b"m" * (64 << 10))
for n in os.listdir(d):
    if n.startswith("mine"):
        os.unlink(os.path.join(d, n))
"""


def test_times_before_1970_as_on_the_backing(backing_quota):
    qm = backing_quota()
    d = qm.root / "shared"
    d.mkdir()
    os.chmod(d, 0o1777)
    r = py_as(1000, 1000, PLANT, str(d), *map(str, OLD))
    assert r.returncode == 0, r.stderr
    for i, t in enumerate(OLD):
        st, back = os.stat(d / f"old{i}"), os.stat(qm.private / "shared" / f"old{i}")
        assert st.st_mtime_ns == back.st_mtime_ns == t
        assert st.st_atime_ns == back.st_atime_ns == t
        assert st.st_nlink == 2
    r = py_as(1001, 1001, OTHER, str(d))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == sorted([f"old{i}" for i in range(len(OLD))]
                                      + [f"old{i}.link" for i in range(len(OLD))])
    ls = subprocess.run(["ls", "-l", "--time-style=+%Y", str(d)], capture_output=True,
                        text=True)
    assert ls.returncode == 0, ls.stderr
    assert ls.stdout.count(" 1969 ") >= 2, ls.stdout
    # tar keeps them
    tar = subprocess.run(["tar", "-C", str(qm.root), "-cf", "-", "shared"],
                         capture_output=True)
    assert tar.returncode == 0, tar.stderr
    (qm.root / "copy").mkdir()
    x = subprocess.run(["tar", "-C", str(qm.root / "copy"), "-xf", "-"], input=tar.stdout,
                       capture_output=True)
    assert x.returncode == 0, x.stderr
    assert os.stat(qm.root / "copy/shared/old1").st_mtime_ns == OLD[1]
    qm.assert_exact()
    # every name removable, nothing left charged once gone
    subprocess.run(["rm", "-rf", str(d), str(qm.root / "copy")], check=True)
    assert not (qm.private / "shared").exists()
    qm.assert_exact()
    assert qm.live().users.get(1000, (0, 0)) == (0, 0)
