"""What a hostile container cannot do to the root daemon, through a real mount:

* POSIX ACLs: the kernel enforces only the mode bits on a simfs mount, so ACLs
  are refused (EOPNOTSUPP, as on a filesystem without ACL support) and ACLs
  already stored in the private area are not shown as if they were enforced;
* descriptors: the daemon's open files stay within its budget whatever the
  container looks up or opens; past the budget the container gets an error
  and the daemon keeps serving, its control channel included;
* memory: open directory handles cost a bounded amount each, however large
  the directory.
"""

from __future__ import annotations

import errno
import os
import subprocess
import textwrap
import time

import pytest

from conftest import is_mountpoint, py_as

pytestmark = pytest.mark.fuse

def errno_of(fn, *args, **kw) -> int:
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno
    raise AssertionError(f"{getattr(fn, '__name__', fn)}{args} did not fail")


def alive(m) -> None:
    assert m.proc.poll() is None, m.logtext()
    assert is_mountpoint(str(m.root))
    os.stat(m.root)


READ_AS = "import sys\ntry:\n    print(open(sys.argv[1]).read())\nexcept OSError as e:\n    print(e.errno)\n"


# ---- POSIX ACLs ------------------------------------------------------------------------


def test_acls_are_refused_not_stored_unenforced(mounted):
    """The repro: an ACL denying uid 1001 was stored, shown by getfacl, and yet
    uid 1001 read the file.  Now setting it fails as on a filesystem without
    ACLs, nothing lands in the private area, and what getfacl shows (the mode)
    is what the kernel enforces."""
    private, root, m = mounted
    f = root / "secret"
    f.write_text("secret\n")
    os.chmod(f, 0o644)
    r = subprocess.run(["setfacl", "-m", "u:1001:---", str(f)], capture_output=True, text=True)
    assert r.returncode != 0 and "Operation not supported" in r.stderr, r
    assert errno_of(os.setxattr, f, "system.posix_acl_access", b"\x02\0\0\0") == errno.EOPNOTSUPP
    (root / "d").mkdir()
    r = subprocess.run(["setfacl", "-d", "-m", "u:1001:---", str(root / "d")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Operation not supported" in r.stderr, r
    # nothing was stored in the private area
    for p in (private / "secret", private / "d"):
        assert not any(n.startswith("system.posix_acl") for n in os.listxattr(p))
    # what is shown is what is enforced: the mode bits, and uid 1001 may read
    out = subprocess.run(["getfacl", "-cp", str(f)], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["user::rw-", "group::r--", "other::r--"]
    assert py_as(1001, 1001, READ_AS, str(f)).stdout == "secret\n\n"
    alive(m)


def test_acls_already_in_the_private_area_are_not_shown(mounted):
    """An ACL put on the backing file from the host is not enforced inside the
    mount: it is not shown there either (getxattr/removexattr refuse the ACL
    names, listxattr leaves them out), and it stays untouched on the host."""
    private, root, m = mounted
    (private / "f").write_text("data\n")
    os.chmod(private / "f", 0o644)
    (private / "d").mkdir()
    subprocess.run(["setfacl", "-m", "u:1001:---", str(private / "f")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "u:1001:---", str(private / "d")], check=True)
    os.setxattr(private / "f", "user.kept", b"1")
    f = root / "f"
    assert os.listxattr(f) == ["user.kept"]
    assert not any(n.startswith("system.posix_acl") for n in os.listxattr(root / "d"))
    assert errno_of(os.getxattr, f, "system.posix_acl_access") == errno.EOPNOTSUPP
    assert errno_of(os.getxattr, root / "d", "system.posix_acl_default") == errno.EOPNOTSUPP
    assert errno_of(os.removexattr, f, "system.posix_acl_access") == errno.EOPNOTSUPP
    out = subprocess.run(["getfacl", "-cp", str(f)], capture_output=True, text=True,
                         check=True).stdout
    assert "1001" not in out
    # the kernel enforces the mode bits only (the ACL's mask is the group bits)
    assert py_as(1001, 1001, READ_AS, str(f)).stdout == "data\n\n"
    # the host's copy is left as it was
    host = subprocess.run(["getfacl", "-cp", str(private / "f")], capture_output=True,
                          text=True, check=True).stdout
    assert "user:1001:---" in host
    alive(m)


def test_cp_a_and_tar_of_acl_trees_degrade_like_a_filesystem_without_acls(mounted, world_tmp):
    private, root, m = mounted
    src = world_tmp / "src"
    src.mkdir()
    (src / "plain").write_text("p\n")
    (src / "acl").write_text("a\n")
    subprocess.run(["setfacl", "-m", "u:1001:r--", str(src / "acl")], check=True)
    # a file without an ACL copies cleanly; one with an ACL copies, with a complaint
    assert subprocess.run(["cp", "-a", str(src / "plain"), str(root / "plain")]).returncode == 0
    r = subprocess.run(["cp", "-a", str(src / "acl"), str(root / "acl")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Operation not supported" in r.stderr, r
    assert (root / "acl").read_text() == "a\n"
    tarball = world_tmp / "t.tar"
    subprocess.run(["tar", "--acls", "-cf", str(tarball), "-C", str(src), "."], check=True)
    (root / "x").mkdir()
    r = subprocess.run(["tar", "--acls", "-xf", str(tarball), "-C", str(root / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r
    assert (root / "x" / "acl").read_text() == "a\n"
    assert not any(n.startswith("system.posix_acl")
                   for p in private.rglob("*") for n in os.listxattr(p))
    alive(m)
