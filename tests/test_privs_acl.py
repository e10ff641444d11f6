"""Set-user-ID and friends, and POSIX ACLs, through real mounts (SPEC section 4,
issue 17 items 3 and 7).

simfs asks for HANDLE_KILLPRIV_V2: the kernel then sends one request per
write(2) (no GETXATTR of ``security.capability`` before each) and says, by a
flag on write, setattr and open, when set-user-ID and set-group-ID must go.
The daemon writes as root, so the backing filesystem keeps them: the daemon
clears them.  Every case is compared with the same steps on a local (ext4)
directory: the mount must do what a local filesystem does.

simfs asks for FUSE_POSIX_ACL: the kernel checks ACLs for every uid, the
backing filesystem stores them, default ACLs are inherited at create (the
umask does not apply under one), the mode follows the ACL's mask and a chmod
the mask; ACL blocks are charged like other xattr blocks, exactly on ext4,
XFS, btrfs and tmpfs.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

import backing as bk
from conftest import py_as, vzquota

pytestmark = pytest.mark.fuse

QID = "117"
COUNTS = "trusted.simfs.requests"
CAP = "security.capability"
# struct vfs_cap_data, revision 2, effective: cap_net_raw permitted
CAP_VALUE = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)

# One step as some uid on ``path``, then the mode it left (octal).
ACT = r"""
import os, sys
act, path = sys.argv[1], sys.argv[2]
if act == "write":
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, b"x", 0)
    os.close(fd)
elif act == "ftruncate":
    fd = os.open(path, os.O_WRONLY)
    os.ftruncate(fd, 1)
    os.close(fd)
elif act == "truncate":
    os.truncate(path, 2)
elif act == "otrunc":
    os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))
elif act == "chown":
    os.chown(path, int(sys.argv[3]), int(sys.argv[4]))
print(oct(os.stat(path).st_mode & 0o7777))
"""


def counts(root) -> dict[str, int]:
    return json.loads(os.getxattr(root, COUNTS))


@pytest.fixture(params=["plain", "quota"])
def mount(request, mounter, area):
    """A mount without quota, or with one (the write path differs)."""
    private, root = area
    opts = ["dev", "suid"]
    if request.param == "quota":
        vzquota("init", QID, "-p", str(private), "-b", "100000", "-B", "100000",
                "-i", "1000", "-I", "1000", "-e", "1d", "-n", "1d")
        vzquota("on", QID)
        opts.append(f"quotaid={QID}")
    m = mounter(private, root, *opts)
    os.chmod(root, 0o1777)
    return private, root, m


@pytest.fixture
def local(world_tmp):
    d = world_tmp / "local"
    d.mkdir()
    os.chmod(d, 0o1777)
    return d


def act(uid: int, gid: int, what: str, path: Path, *args: str) -> int:
    r = py_as(uid, gid, ACT, what, str(path), *args)
    assert r.returncode == 0, r.stderr
    return int(r.stdout, 8)


def prepared(d: Path, name: str, mode: int, owner=(1000, 1000), cap: bool = False) -> Path:
    p = d / name
    p.write_bytes(b"\x7fELF....")
    os.chown(p, *owner)
    os.chmod(p, mode)
    if cap:
        os.setxattr(p, CAP, CAP_VALUE)
    return p


def has_cap(p: Path) -> bool:
    try:
        os.getxattr(p, CAP)
    except OSError as e:
        assert e.errno == errno.ENODATA, e
        return False
    return True


# ---- item 3: set-user-ID, set-group-ID, security.capability ---------------------------


def test_non_root_write_clears_setuid_root_write_keeps_it(mount):
    """The repro: a uid 1000 write to a 04777 file kept the bit (the daemon
    writes as root).  Now it goes, on the mount and in the private area;
    root's write keeps it (CAP_FSETID, as locally)."""
    private, root, _ = mount
    f = prepared(root, "f", 0o4777, owner=(0, 0))
    assert act(1000, 1000, "write", f) == 0o777
    assert os.stat(private / "f").st_mode & 0o7777 == 0o777
    g = prepared(root, "g", 0o4777, owner=(0, 0))
    assert act(0, 0, "write", g) == 0o4777
    assert os.stat(private / "g").st_mode & 0o7777 == 0o4777


def test_group_executable_setgid_goes_on_chown(mount):
    private, root, _ = mount
    f = prepared(root, "f", 0o2775)
    assert act(0, 0, "chown", f, "1001", "1001") == 0o775
    assert os.stat(private / "f").st_mode & 0o7777 == 0o775
    # not group-executable (a locking mark): root's chown keeps it, as locally
    g = prepared(root, "g", 0o2765)
    assert act(0, 0, "chown", g, "1001", "1001") == 0o2765


CASES = [
    # (mode, uid of the step, step, its arguments, owner of the file)
    (0o4755, 1000, "write", ()), (0o2755, 1000, "write", ()), (0o2745, 1000, "write", ()),
    (0o6775, 1000, "write", ()), (0o6775, 0, "write", ()),
    (0o4755, 1000, "ftruncate", ()), (0o6775, 1000, "truncate", ()),
    (0o6775, 0, "truncate", ()), (0o6775, 1000, "otrunc", ()), (0o6775, 0, "otrunc", ()),
    (0o6775, 0, "chown", ("1001", "1001")), (0o6765, 0, "chown", ("1001", "1001")),
    (0o6775, 1000, "chown", ("1000", "1000")), (0o2745, 1000, "chown", ("-1", "1000")),
    (0o1777, 1000, "write", ()),
    # set-group-ID not group-executable, the caller outside the file's group
    (0o2745, 1000, "write", (), (1000, 2000)), (0o2747, 1001, "write", (), (1000, 2000)),
    (0o2747, 1001, "truncate", (), (1000, 2000)), (0o2747, 1001, "otrunc", (), (1000, 2000)),
    (0o2745, 1000, "chown", ("-1", "1000"), (1000, 2000)),
    (0o2745, 0, "chown", ("-1", "1000"), (1000, 2000)),
]


def test_every_kill_case_as_on_a_local_filesystem(mount, local):
    """Write, ftruncate, truncate, open(O_TRUNC) and chown, by uid 1000 and by
    root, on files with set-user-ID/set-group-ID (group-executable or not):
    the mode left equals what the same step leaves on a local ext4 file."""
    private, root, _ = mount
    for i, (mode, uid, what, extra, *owner) in enumerate(CASES):
        own = owner[0] if owner else (1000, 1000)
        got = act(uid, uid, what, prepared(root, f"c{i}", mode, own), *extra)
        want = act(uid, uid, what, prepared(local, f"c{i}", mode, own), *extra)
        assert (oct(mode), uid, what, own, oct(got)) == (oct(mode), uid, what, own, oct(want))
        assert os.stat(private / f"c{i}").st_mode & 0o7777 == got


# One step (as ACT, without the stat after it).
STEP = r"""
import os, sys
what, path = sys.argv[1], sys.argv[2]
if what == "otrunc":
    os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))
else:
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, b"x", 0)
    os.close(fd)
"""


@pytest.mark.parametrize("binding", ["builtin", "pyfuse3"])
def test_a_kill_shows_at_once_to_a_mode_only_stat(mounter, area, local, binding):
    """open(O_TRUNC) and a write by someone else than the owner clear
    set-user-ID (and a group-executable set-group-ID) as on a local
    filesystem, and a stat that asks for the mode only (statx STATX_MODE, as
    ``stat -c %a`` does) sees it at once.  Before, it saw the mode the kernel
    kept (the reply to an open or a write carries no attributes) until its
    attribute timeout, and under pyfuse3 an O_TRUNC cleared nothing at all
    (the kernel leaves an atomic O_TRUNC's kill to the filesystem)."""
    private, root = area
    mounter(private, root, "dev", "suid", f"fuse={binding}")
    os.chmod(root, 0o1777)
    for i, (mode, what) in enumerate([(0o4777, "otrunc"), (0o6777, "otrunc"),
                                      (0o2777, "otrunc"), (0o2767, "otrunc"),
                                      (0o4777, "write"), (0o6777, "write")]):
        seen = []
        for d in (root, local):
            f = prepared(d, f"k{i}", mode)
            r = py_as(1001, 1001, STEP, what, str(f))       # no stat of its own
            assert r.returncode == 0, r.stderr
            seen.append(subprocess.run(["stat", "-c", "%a", str(f)], capture_output=True,
                                       text=True, check=True).stdout.strip())
        assert (oct(mode), what, seen[0]) == (oct(mode), what, seen[1])
        assert os.stat(private / f"k{i}").st_mode & 0o7777 == int(seen[1], 8)


def test_security_capability_goes_as_locally(mount, local):
    """``security.capability`` goes at a non-root write (and, as locally, at
    root's, and at a truncate or chown); the kernel no longer asks for it
    before every write: the backing filesystem drops it under the daemon."""
    private, root, _ = mount
    for i, (uid, what, extra) in enumerate([(1000, "write", ()), (0, "write", ()),
                                           (1000, "truncate", ()),
                                           (0, "chown", ("1001", "1001"))]):
        for d in (root, local):
            f = prepared(d, f"cap{i}", 0o755, cap=True)
            assert has_cap(f)
            act(uid, uid, what, f, *extra)
        assert has_cap(root / f"cap{i}") == has_cap(local / f"cap{i}"), (uid, what)
        assert not has_cap(private / f"cap{i}"), (uid, what)


WRITES = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
for i in range(1000):
    os.pwrite(fd, b"w" * 4096, i * 4096)
os.close(fd)
"""


@pytest.mark.parametrize("uid", [1000, 0])
def test_one_request_per_write(mount, uid):
    """1000 pwrite(2) calls of 4 KiB cost 1000 WRITE requests; GETXATTR does
    not grow with them (without HANDLE_KILLPRIV_V2 the kernel asked for
    security.capability before each write: 1000 more).  What is left is per
    open, at most 2: the kernel's first write after the file's attributes
    changed asks for security.capability once, and its permission check may
    read a directory's ACL."""
    private, root, _ = mount
    f = prepared(root, "f", 0o644, owner=(uid, uid))
    for run in range(2):
        before = counts(root)
        r = py_as(uid, uid, WRITES, str(f))
        assert r.returncode == 0, r.stderr
        after = counts(root)
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        delta["getxattr"] -= 1                      # the second counts() itself
        assert delta["write"] == 1000, (run, delta)
        assert delta["getxattr"] <= 2, (run, delta)
    assert os.stat(private / "f").st_size == 1000 * 4096


# ---- item 7: POSIX ACLs -----------------------------------------------------------


READ = ("import sys\ntry:\n    print(open(sys.argv[1]).read(), end='')\n"
        "except OSError as e:\n    print(e.errno)\n")


def getfacl(p: Path) -> str:
    return subprocess.run(["getfacl", "-cp", str(p)], capture_output=True, text=True,
                          check=True).stdout


def test_default_acl_inherited_and_enforced_as_locally(mount, local):
    """A directory with a default ACL denying uid 1001: what uid 1000 creates
    in it (umask 077, which a default ACL replaces) gets the ACL and the mode
    a local directory gives, and uid 1001 cannot read it."""
    private, root, _ = mount
    make = ("import os, sys\nos.umask(0o077)\nd = sys.argv[1]\n"
            "with open(os.path.join(d, 'f'), 'w') as f:\n    f.write('data')\n"
            "os.mkdir(os.path.join(d, 'sub'))\nos.mkfifo(os.path.join(d, 'fifo'), 0o666)\n"
            "with open(os.path.join(d, 'sub', 'g'), 'w') as f:\n    f.write('deep')\n"
            "t = os.open(d, os.O_TMPFILE | os.O_WRONLY, 0o666)\nos.write(t, b'tmp')\n"
            "dfd = os.open(d, os.O_RDONLY)\n"
            "os.link(f'/proc/self/fd/{t}', 'tmp', dst_dir_fd=dfd, follow_symlinks=True)\n"
            "os.close(t)\n")
    for top in (root, local):
        d = top / "d"
        d.mkdir(mode=0o777)
        os.chmod(d, 0o777)
        subprocess.run(["setfacl", "-d", "-m", "u:1001:---,g::rwx,m::rwx,o::r-x", str(d)],
                       check=True)
        r = py_as(1000, 1000, make, str(d))
        assert r.returncode == 0, r.stderr
    for name in ("f", "sub", "fifo", "sub/g", "tmp"):
        m, l = root / "d" / name, local / "d" / name
        assert os.lstat(m).st_mode == os.lstat(l).st_mode, name
        assert getfacl(m) == getfacl(l), name
        assert getfacl(private / "d" / name) == getfacl(l), name
        assert "user:1001:---" in getfacl(m)
    assert py_as(1001, 1001, READ, str(root / "d" / "f")).stdout.strip() == str(errno.EACCES)
    assert py_as(1001, 1001, READ, str(root / "d" / "sub" / "g")).stdout.strip() == \
        str(errno.EACCES)
    assert py_as(1002, 1002, READ, str(root / "d" / "f")).stdout == "data"
    # without a default ACL the umask applies, as before
    r = py_as(1000, 1000, "import os, sys\nos.umask(0o077)\nopen(sys.argv[1], 'w').close()\n"
              "os.mkdir(sys.argv[1] + '.d', 0o777)\n", str(root / "plain"))
    assert r.returncode == 0, r.stderr
    assert os.stat(root / "plain").st_mode & 0o777 == 0o600
    assert os.stat(root / "plain.d").st_mode & 0o777 == 0o700


def test_a_default_acl_set_after_creates_is_inherited_at_once(mount, local):
    """The daemon remembers that a directory has no default ACL (a create
    there reads none): setting one through the mount ends that at once (the
    next create's mode is masked by the ACL, not the umask, as locally), and
    removing it again brings the umask back."""
    private, root, _ = mount
    make = "import os, sys\nos.umask(0o077)\nopen(sys.argv[1], 'w').close()\n"
    for top in (root, local):
        d = top / "late"
        d.mkdir(mode=0o777)
        os.chmod(d, 0o777)
        for name in ("a", "b"):                 # remembered: no default ACL
            assert py_as(1000, 1000, make, str(d / name)).returncode == 0
        subprocess.run(["setfacl", "-d", "-m", "u:1001:---,g::rwx,m::rwx,o::r-x", str(d)],
                       check=True)
        assert py_as(1000, 1000, make, str(d / "c")).returncode == 0
        subprocess.run(["setfacl", "-k", str(d)], check=True)
        assert py_as(1000, 1000, make, str(d / "e")).returncode == 0
    for name in ("a", "b", "c", "e"):
        m, l = root / "late" / name, local / "late" / name
        assert os.lstat(m).st_mode == os.lstat(l).st_mode, name
        assert getfacl(m) == getfacl(l), name
    assert os.stat(root / "late" / "c").st_mode & 0o777 == 0o664   # the ACL's mask
    assert os.stat(root / "late" / "e").st_mode & 0o777 == 0o600   # the umask again


def test_mode_and_mask_stay_in_sync(mount, local):
    private, root, _ = mount
    for d in (root, local):
        f = d / "f"
        f.write_text("x")
        os.chown(f, 1000, 1000)
        os.chmod(f, 0o664)
        subprocess.run(["setfacl", "-m", "u:1001:rw-,g:2000:r--", str(f)], check=True)
        os.chmod(f, 0o640)                       # the group bits become the mask
    assert getfacl(root / "f") == getfacl(local / "f")
    assert "mask::r--" in getfacl(root / "f")
    assert py_as(1001, 1001, READ, str(root / "f")).stdout == "x"
    r = py_as(1001, 1001, "import sys\ntry:\n    open(sys.argv[1], 'a')\n    print(0)\n"
              "except OSError as e:\n    print(e.errno)\n", str(root / "f"))
    assert r.stdout.strip() == str(errno.EACCES)          # the mask allows no write
    for d in (root, local):
        subprocess.run(["setfacl", "-m", "m::rwx", str(d / "f")], check=True)
    assert os.stat(root / "f").st_mode & 0o777 == os.stat(local / "f").st_mode & 0o777 == 0o670
    assert os.stat(private / "f").st_mode & 0o777 == 0o670
    r = py_as(1001, 1001, "import sys\nopen(sys.argv[1], 'a').write('y')\n", str(root / "f"))
    assert r.returncode == 0, r.stderr
    # an ACL removed leaves the mode bits only
    for d in (root, local):
        subprocess.run(["setfacl", "-b", str(d / "f")], check=True)
    assert getfacl(root / "f") == getfacl(local / "f")
    assert getfacl(root / "f").split() == ["user::rw-", "group::rw-", "other::---"]
    assert os.stat(root / "f").st_mode == os.stat(local / "f").st_mode
    assert py_as(1001, 1001, READ, str(root / "f")).stdout.strip() == str(errno.EACCES)


def test_setting_an_acl_outside_the_group_drops_setgid(mount, local):
    """uid 1000, not in the file's group, sets an access ACL: set-group-ID
    goes (SETXATTR_ACL_KILL_SGID), as locally; root's setfacl keeps it."""
    private, root, _ = mount
    for d in (root, local):
        for name in ("mine", "roots"):
            f = d / name
            f.write_text("x")
            os.chown(f, 1000, 2000)
            os.chmod(f, 0o2754)
        r = subprocess.run(["setfacl", "-m", "u:1001:r--", str(d / "mine")], user=1000,
                           group=1000, extra_groups=[], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        subprocess.run(["setfacl", "-m", "u:1001:r--", str(d / "roots")], check=True)
    for name in ("mine", "roots"):
        assert os.stat(root / name).st_mode == os.stat(local / name).st_mode, name
        assert getfacl(root / name) == getfacl(local / name), name
    assert os.stat(root / "mine").st_mode & 0o7777 == 0o754
    assert os.stat(root / "roots").st_mode & 0o7777 == 0o2754


def test_setxattr_create_and_replace_flags(mount):
    private, root, _ = mount
    f = root / "f"
    f.write_text("x")
    os.setxattr(f, "user.a", b"1", os.XATTR_CREATE)
    with pytest.raises(OSError) as ei:
        os.setxattr(f, "user.a", b"2", os.XATTR_CREATE)
    assert ei.value.errno == errno.EEXIST
    with pytest.raises(OSError) as ei:
        os.setxattr(f, "user.b", b"2", os.XATTR_REPLACE)
    assert ei.value.errno == errno.ENODATA
    os.setxattr(f, "user.a", b"3", os.XATTR_REPLACE)
    assert os.getxattr(private / "f", "user.a") == b"3"
    assert "user.b" not in os.listxattr(private / "f")


def test_acls_refused_where_the_kernel_would_not_check_them(mounter, area):
    """The pyfuse3 fallback does not ask for FUSE_POSIX_ACL: there ACLs are
    still refused, never stored unenforced."""
    pytest.importorskip("pyfuse3")
    private, root = area
    mounter(private, root, "dev", "suid", "fuse=pyfuse3")
    f = root / "f"
    f.write_text("x")
    r = subprocess.run(["setfacl", "-m", "u:1001:---", str(f)], capture_output=True, text=True)
    assert r.returncode != 0 and "Operation not supported" in r.stderr, r
    assert not any(n.startswith("system.posix_acl") for n in os.listxattr(private / "f"))


# ---- ACL blocks through the quota, on every backing -------------------------------


def big_acl(n: int, start: int = 5000) -> str:
    """An ACL of ``n`` named users: too big for the inode, it takes a block."""
    return ",".join(f"u:{start + i}:r--" for i in range(n))


MAKE_UNDER = (
    "import os, sys\nd = sys.argv[1]\n"
    "for i in range(5):\n    open(os.path.join(d, f'f{i}'), 'w').close()\n"
    "    os.mkdir(os.path.join(d, f's{i}'))\n"
)


def test_acl_blocks_charged_exactly(backing, backing_quota):
    """Access and default ACLs set by setfacl, and default ACLs inherited by
    what uid 1000 creates, on ext4, XFS, btrfs and tmpfs: live usage equals
    the independent recount at both levels, and after the ACLs go again."""
    qm = backing_quota(ugid={1000: (100000, 1000)})
    root = qm.root
    d = root / "d"
    d.mkdir()
    os.chown(d, 1000, 1000)
    files = []
    for i in range(3):
        f = root / f"f{i}"
        f.write_bytes(b"x" * 100)
        os.chown(f, 1000, 1000)
        files.append(f)
    acl = big_acl(150)
    for f in files:
        r = subprocess.run(["setfacl", "-m", acl, str(f)], user=1000, group=1000,
                           extra_groups=[], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    subprocess.run(["setfacl", "-d", "-m", acl, str(d)], check=True)
    r = py_as(1000, 1000, MAKE_UNDER, str(d))
    assert r.returncode == 0, r.stderr
    assert "user:5149:r--" in getfacl(d / "f4")
    assert "default:user:5149:r--" in getfacl(d / "s4")
    if backing.kind in ("ext4", "xfs"):     # the ACL took a block of its own
        assert os.stat(qm.private / "f0").st_blocks * 512 >= 8192
        assert os.stat(qm.private / "d" / "f0").st_blocks * 512 >= 4096
    qm.assert_exact()
    for f in files:
        subprocess.run(["setfacl", "-b", str(f)], check=True)
    subprocess.run(["setfacl", "-R", "-b", str(d)], check=True)
    qm.assert_exact()


@pytest.mark.parametrize("backing", bk.params(only=("ext4", "xfs")), indirect=True)
def test_acl_over_the_limit_is_refused(backing, backing_quota):
    """An ACL whose block would take uid 1000 over its hard limit is refused
    with EDQUOT and nothing is left charged."""
    qm = backing_quota(ugid={1000: (8, 100)})        # 8 KiB for uid 1000
    f = qm.root / "f"
    f.write_bytes(b"")
    os.chown(f, 1000, 1000)
    g = qm.root / "g"
    g.write_bytes(b"y" * 4096)
    os.chown(g, 1000, 1000)
    os.sync()
    qm.assert_exact()
    acl = big_acl(200)
    for p in (f, g):
        subprocess.run(["setfacl", "-m", acl, str(p)], capture_output=True)
    users = qm.live().users
    assert users.get(1000, (0, 0))[0] <= 8 * 1024
    r = subprocess.run(["setfacl", "-m", big_acl(200, 9000), str(qm.root / "g")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "quota" in r.stderr.lower(), r
    qm.assert_exact()


def test_backing_without_acls(mounter, world_tmp):
    """A backing filesystem without ACLs (ramfs has no xattrs at all): the
    kernel's permission checks still work for every uid (the daemon answers
    that a file has no ACL, not EOPNOTSUPP, which the kernel would return
    from open), and setting an ACL fails as on that filesystem."""
    mnt = world_tmp / "ramfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "simfs-test-ramfs", str(mnt)], check=True)
    try:
        private, root = mnt / "private", world_tmp / "root"
        private.mkdir(mode=0o755)
        os.chmod(private, 0o755)
        root.mkdir()
        (private / "f").write_text("data")
        os.chmod(private / "f", 0o644)
        (private / "g").write_text("data")
        os.chmod(private / "g", 0o640)
        m = mounter(private, root, "dev", "suid")
        assert py_as(1001, 1001, READ, str(root / "f")).stdout == "data"
        assert py_as(1001, 1001, READ, str(root / "g")).stdout.strip() == str(errno.EACCES)
        r = subprocess.run(["setfacl", "-m", "u:1001:r--", str(root / "g")],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "Operation not supported" in r.stderr, r
        (root / "d").mkdir()
        (root / "d" / "new").write_text("x")
        assert py_as(1001, 1001, READ, str(root / "d" / "new")).stdout == "x"
        m.umount()
    finally:
        bk._umount(str(mnt), 10.0)
