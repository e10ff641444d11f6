"""O_TMPFILE through a quota mount (FUSE_TMPFILE): the nameless file is
charged from its creation (one inode and its blocks, to its owner), freed at
its last close, and stays charged once linkat gives it a name.  Each case ends
with the live usage equal to the independent recount, at both levels."""

from __future__ import annotations

import errno
import os

import pytest

import backing as bk
from conftest import py_as, vzquota

QID = "161"
K = 1024

# As uid 1000: an O_TMPFILE file of 256 KiB in the root, kept open while the
# parent reads the live figures (one line on stdout, then waits for stdin),
# then linked as "kept" when argv[2] says so.
SCRIPT = r"""
import os, sys
root, link = sys.argv[1], sys.argv[2] == "link"
try:
    fd = os.open(root, os.O_TMPFILE | os.O_RDWR, 0o640)
except OSError as e:
    print("ERR", e.errno, flush=True)
    sys.exit(0)
os.write(fd, b"t" * (256 * 1024))
os.fsync(fd)
print("OPEN", flush=True)
sys.stdin.readline()
if link:
    # linkat(AT_SYMLINK_FOLLOW) through the magic link (a dst_dir_fd makes
    # Python call linkat; without it, link(2), which links the magic link itself)
    d = os.open(root, os.O_PATH | os.O_DIRECTORY)
    os.link(f"/proc/self/fd/{fd}", "kept", dst_dir_fd=d, follow_symlinks=True)
os.close(fd)
print("DONE", flush=True)
"""


@pytest.fixture
def tmount(mounter, area):
    private, root = area
    os.chmod(private, 0o777)
    vzquota("init", QID, "-p", str(private), "-b", "10000", "-B", "12000", "-i", "100",
            "-I", "120", "-e", "1d", "-n", "1d", "-s", "1", "-u", "100")
    vzquota("on", QID)
    mounter(private, root, "dev", "suid", f"quotaid={QID}")
    return private, root


def live_uid(uid: int) -> tuple[int, int]:
    state = bk.live_state(QID)
    for row in state.get("users", []):
        if row[0] == uid:
            return row[1][0], row[2][0]
    return 0, 0


def run_tmpfile(root, link: bool):
    import subprocess
    p = subprocess.Popen([bk.user_python(), "-c", SCRIPT, str(root), "link" if link else "-"],
                         user=1000, group=1000, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    first = p.stdout.readline().split()
    return p, first


@pytest.mark.parametrize("link", [False, True], ids=["closed", "linked"])
def test_tmpfile_is_charged_to_its_owner(tmount, link):
    private, root = tmount
    before = bk.live(QID)
    p, first = run_tmpfile(root, link)
    try:
        assert first == ["OPEN"], first
        during = bk.live(QID)
        assert during.inodes == before.inodes + 1
        assert during.space >= before.space + 256 * K
    finally:
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "DONE"
        p.wait(30)
    if link:
        st = os.stat(private / "kept")
        assert (st.st_uid, st.st_gid, st.st_size) == (1000, 1000, 256 * K)
        assert (root / "kept").read_bytes() == b"t" * (256 * K)
    else:
        assert os.listdir(private) == []
    # freed at the last close (the kernel's FORGET may come a moment later)
    bk.assert_usage_matches(private, QID, ugid=True)


def test_tmpfile_at_the_inode_limit_is_edquot(tmount):
    private, root = tmount
    for i in range(119):                          # the root itself is the 120th
        (root / f"f{i}").write_bytes(b"")
    p, first = run_tmpfile(root, False)
    p.wait(30)
    assert first == ["ERR", str(errno.EDQUOT)], first
    bk.assert_usage_matches(private, QID, ugid=True)
