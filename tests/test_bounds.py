"""What a hostile container cannot do to the root daemon, through a real mount:

* POSIX ACLs: never stored or shown unenforced: the kernel checks them
  (FUSE_POSIX_ACL) for every uid, those set through the mount and those
  already stored in the private area alike (see also test_privs_acl.py);
* descriptors: the daemon's open files stay within its budget whatever the
  container looks up or opens; past the budget the container gets an error
  and the daemon keeps serving, its control channel included;
* memory: open directory handles cost a bounded amount each, however large
  the directory.
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
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


def test_acl_denying_a_uid_is_enforced(mounted):
    """The repro: an ACL denying uid 1001 was stored, shown by getfacl, and yet
    uid 1001 read the file (the kernel checked the mode bits only).  With
    FUSE_POSIX_ACL the kernel checks the ACL: uid 1001 is refused, others read,
    and getfacl shows what is enforced, on the mount as in the private area."""
    private, root, m = mounted
    f = root / "secret"
    f.write_text("secret\n")
    os.chmod(f, 0o644)
    subprocess.run(["setfacl", "-m", "u:1001:---", str(f)], check=True)
    assert py_as(1001, 1001, READ_AS, str(f)).stdout.strip() == str(errno.EACCES)
    assert py_as(1002, 1002, READ_AS, str(f)).stdout == "secret\n\n"
    want = ["user::rw-", "user:1001:---", "group::r--", "mask::r--", "other::r--"]
    for p in (f, private / "secret"):
        out = subprocess.run(["getfacl", "-cp", str(p)], capture_output=True, text=True,
                             check=True).stdout
        assert out.split() == want
    # a default ACL on a directory, and a file created in it inherits it
    (root / "d").mkdir()
    subprocess.run(["setfacl", "-d", "-m", "u:1001:---", str(root / "d")], check=True)
    (root / "d" / "new").write_text("new\n")
    assert py_as(1001, 1001, READ_AS, str(root / "d" / "new")).stdout.strip() == \
        str(errno.EACCES)
    assert "system.posix_acl_default" in os.listxattr(private / "d")
    assert "system.posix_acl_access" in os.listxattr(root / "d" / "new")
    alive(m)


def test_acls_already_in_the_private_area_are_enforced(mounted):
    """An ACL put on the backing file from the host is shown inside the mount
    and enforced there; removed through the mount, it is gone on the host."""
    private, root, m = mounted
    (private / "f").write_text("data\n")
    os.chmod(private / "f", 0o644)
    (private / "d").mkdir()
    os.chmod(private / "d", 0o777)
    subprocess.run(["setfacl", "-m", "u:1001:---", str(private / "f")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "u:1001:---", str(private / "d")], check=True)
    os.setxattr(private / "f", "user.kept", b"1")
    f = root / "f"
    assert sorted(os.listxattr(f)) == ["system.posix_acl_access", "user.kept"]
    assert "system.posix_acl_default" in os.listxattr(root / "d")
    out = subprocess.run(["getfacl", "-cp", str(f)], capture_output=True, text=True,
                         check=True).stdout
    assert "user:1001:---" in out
    assert py_as(1001, 1001, READ_AS, str(f)).stdout.strip() == str(errno.EACCES)
    assert py_as(1002, 1002, READ_AS, str(f)).stdout == "data\n\n"
    r = py_as(1002, 1002, "import sys\nopen(sys.argv[1] + '/g', 'w').write('g')\n",
              str(root / "d"))
    assert r.returncode == 0, r.stderr
    assert py_as(1001, 1001, READ_AS, str(root / "d" / "g")).stdout.strip() == \
        str(errno.EACCES)
    os.removexattr(f, "system.posix_acl_access")
    assert os.listxattr(private / "f") == ["user.kept"]
    assert py_as(1001, 1001, READ_AS, str(f)).stdout == "data\n\n"
    alive(m)


def test_cp_a_and_tar_keep_acls(mounted, world_tmp):
    """cp -a and tar --acls copy ACLs into the mount, as onto a local
    filesystem with ACLs, and the copies are enforced."""
    private, root, m = mounted
    src = world_tmp / "src"
    src.mkdir()
    (src / "plain").write_text("p\n")
    (src / "acl").write_text("a\n")
    subprocess.run(["setfacl", "-m", "u:1001:---", str(src / "acl")], check=True)
    assert subprocess.run(["cp", "-a", str(src / "plain"), str(root / "plain")]).returncode == 0
    r = subprocess.run(["cp", "-a", str(src / "acl"), str(root / "acl")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r
    assert (root / "acl").read_text() == "a\n"
    tarball = world_tmp / "t.tar"
    subprocess.run(["tar", "--acls", "-cf", str(tarball), "-C", str(src), "."], check=True)
    (root / "x").mkdir()
    r = subprocess.run(["tar", "--acls", "-xf", str(tarball), "-C", str(root / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r
    assert (root / "x" / "acl").read_text() == "a\n"
    for p in (private / "acl", private / "x" / "acl"):
        out = subprocess.run(["getfacl", "-cp", str(p)], capture_output=True, text=True,
                             check=True).stdout
        assert "user:1001:---" in out, p
    for p in (root / "acl", root / "x" / "acl"):
        assert py_as(1001, 1001, READ_AS, str(p)).stdout.strip() == str(errno.EACCES)
    assert not any(n.startswith("system.posix_acl") for n in os.listxattr(private / "plain"))
    alive(m)


# ---- descriptors ----------------------------------------------------------------------


def daemon_fds(m) -> int:
    return len(os.listdir(f"/proc/{m.proc.pid}/fd"))


def daemon_rss(m) -> int:
    with open(f"/proc/{m.proc.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024


def big_dir(private, n: int):
    """``n`` files in private/big, each holding its own name."""
    d = private / "big"
    d.mkdir()
    for i in range(n):
        fd = os.open(d / f"f{i:06d}", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, f"f{i:06d}".encode())
        os.close(fd)
    os.chmod(d, 0o755)
    return d


READ_ALL = textwrap.dedent("""
    import os, sys
    d = sys.argv[1]
    bad = [n for n in sorted(os.listdir(d)) if open(os.path.join(d, n)).read() != n]
    print(len(os.listdir(d)), len(bad))
""")


def test_ls_l_of_a_huge_directory_keeps_the_daemon_s_descriptors_bounded(mounted):
    """The repro: ``ls -l`` of a 100k-entry directory left one O_PATH descriptor
    per entry in the daemon, which then answered EMFILE to everything.  Now only
    an LRU of them stays open, and every inode is still reachable (each file is
    opened and read again after the LRU has turned over)."""
    from simfs.config import DEFAULT
    CACHED_FDS = DEFAULT.cached_fds
    private, root, m = mounted
    n = CACHED_FDS + 2000
    big_dir(private, n)
    before = daemon_fds(m)
    r = subprocess.run(["ls", "-l", str(root / "big")], capture_output=True, text=True,
                       user=1000, group=1000)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == n + 1
    after = daemon_fds(m)
    assert after <= before + CACHED_FDS, (before, after)
    # find(1) sees what a local listing sees, inode numbers included
    got = subprocess.run(["find", str(root / "big"), "-mindepth", "1", "-printf", "%f %i %s\n"],
                         capture_output=True, text=True, check=True).stdout
    want = subprocess.run(["find", str(private / "big"), "-mindepth", "1", "-printf",
                           "%f %i %s\n"], capture_output=True, text=True, check=True).stdout
    assert sorted(got.splitlines()) == sorted(want.splitlines())
    r = py_as(1000, 1000, READ_ALL, str(root / "big"))
    assert r.stdout.split() == [str(n), "0"], r.stderr
    # the kernel sends the last RELEASEs after the reader has exited
    deadline = time.monotonic() + 10
    while daemon_fds(m) > before + CACHED_FDS:
        assert time.monotonic() < deadline, (before, daemon_fds(m))
        time.sleep(0.05)
    alive(m)


def test_open_files_beyond_the_budget_get_enfile_and_the_daemon_serves_on(mounter, area):
    """Every open file or directory holds a descriptor of the daemon's: past
    ``maxopen`` (past its uid's share of it) the container gets ENFILE, not the
    daemon EMFILE."""
    from simfs.inodes import OpenShares
    private, root = area
    m = mounter(private, root, "maxopen=40")
    (root / "d").mkdir()
    os.chmod(root / "d", 0o777)
    code = textwrap.dedent("""
        import errno, os, sys
        d = sys.argv[1]
        held, errs = [], []
        for i in range(60):
            try:
                if i % 2:
                    held.append(os.open(d, os.O_RDONLY | os.O_DIRECTORY))
                else:
                    held.append(os.open(f"{d}/f{i}", os.O_RDWR | os.O_CREAT, 0o644))
            except OSError as e:
                errs.append(errno.errorcode[e.errno])
        print(len(held), sorted(set(errs)))
        for fd in held:
            os.close(fd)
        fd = os.open(f"{d}/after", os.O_RDWR | os.O_CREAT, 0o644)
        os.write(fd, b"ok")
        os.close(fd)
        print(open(f"{d}/after").read())
    """)
    r = py_as(1000, 1000, code, str(root / "d"))
    assert r.returncode == 0, r.stderr
    # one uid gets its share of the budget (see test_open_shares.py)
    share = OpenShares(40).share
    assert r.stdout.split("\n")[:2] == [f"{share} ['ENFILE']", "ok"], r.stdout
    alive(m)


def test_an_unlinked_file_held_by_the_container_stays_reachable_after_the_lru_turns(mounted):
    """A file unlinked while held by an O_PATH descriptor can still be reopened
    through /proc (as on a local filesystem), even after enough other lookups
    to evict every cached descriptor."""
    from simfs.config import DEFAULT
    CACHED_FDS = DEFAULT.cached_fds
    private, root, m = mounted
    big_dir(private, CACHED_FDS + 500)
    code = textwrap.dedent("""
        import os, sys
        root = sys.argv[1]
        with open(root + "/victim", "w") as f:
            f.write("still here")
        o = os.open(root + "/victim", os.O_PATH)
        os.unlink(root + "/victim")
        for n in os.listdir(root + "/big"):
            os.lstat(root + "/big/" + n)
        os.system("ls -l " + root + "/big > /dev/null")
        print(open(f"/proc/self/fd/{o}").read(), os.fstat(o).st_nlink)
    """)
    r = py_as(0, 0, code, str(root))
    assert r.stdout.split("\n")[0] == "still here 0", (r.stdout, r.stderr)
    alive(m)


@pytest.mark.parametrize("runtime", ["uvloop", "asyncio", "trio"])
def test_control_channel_survives_emfile_at_accept(mounter, area, runtime):
    """The repro: once the daemon's descriptor table was full, the next
    ``vzquota`` connection killed it (EMFILE from accept()).  Here the host
    lowers the daemon's limit live and floods the control socket: accept fails,
    the daemon backs off, and answers once descriptors are free again."""
    import socket

    from conftest import vzquota
    from vzquota import control
    private, root = area
    vzquota("init", "101", "-p", str(private), "-b", "100000", "-B", "120000", "-i", "1000",
            "-I", "1200", "-e", "1d", "-n", "1d")
    vzquota("on", "101")
    m = mounter(private, root, "quotaid=101", f"runtime={runtime}")
    soft, hard = resource.prlimit(m.proc.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(m.proc.pid, resource.RLIMIT_NOFILE, (daemon_fds(m) + 8, hard))
    conns = []
    for _ in range(14):
        s = socket.socket(socket.AF_UNIX)
        s.connect(control.socket_path(101))
        conns.append(s)
    deadline = time.monotonic() + 20
    while "accept failed" not in m.logtext():
        assert time.monotonic() < deadline, m.logtext()
        time.sleep(0.05)
    assert m.proc.poll() is None, m.logtext()
    for s in conns:
        s.close()
    resource.prlimit(m.proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert vzquota("stat", "101").returncode == 0
    (root / "f").write_bytes(b"x")
    alive(m)


# ---- memory ---------------------------------------------------------------------------


def test_open_directory_handles_cost_bounded_memory(mounted):
    """The repro: each opendir copied the whole listing (300 handles on a
    100k-entry directory: 32 MB -> 1.13 GB).  Now a handle holds one chunk of
    entries, whatever the directory's size."""
    private, root, m = mounted
    n, handles = 20000, 100
    big_dir(private, n)
    code = textwrap.dedent("""
        import os, sys
        d, k = sys.argv[1], int(sys.argv[2])
        fds = [os.open(d, os.O_RDONLY | os.O_DIRECTORY) for _ in range(k)]
        print(len(os.listdir(d)), flush=True)
        sys.stdin.readline()
    """)
    os.listdir(root / "big")                   # warm the inode table first
    base = daemon_rss(m)
    p = subprocess.Popen([sys_python(), "-c", code, str(root / "big"), str(handles)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         user=1000, group=1000)
    try:
        assert p.stdout.readline().strip() == str(n)
        grown = daemon_rss(m) - base
    finally:
        p.stdin.close()
        p.wait()
    assert grown < handles * 64 * 1024 + 8 * 1024 * 1024, grown
    alive(m)


def sys_python() -> str:
    from conftest import USER_PYTHON
    return USER_PYTHON


# ---- directory listings ---------------------------------------------------------------


def test_listing_while_entries_come_and_go_has_no_duplicates_and_skips_none(mounted):
    """Entries created and removed during a listing may or may not appear, but
    those present throughout appear exactly once, and no name twice."""
    import threading
    private, root, m = mounted
    d = root / "d"
    d.mkdir()
    stable = {f"s{i:05d}" for i in range(3000)}
    for name in stable:
        (private / "d" / name).write_bytes(b"")
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            p = d / f"c{i % 400:05d}"
            if i // 400 % 2:
                p.unlink(missing_ok=True)
            else:
                p.write_bytes(b"")
            i += 1
    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(10):
            names = os.listdir(d)
            assert len(names) == len(set(names))
            assert stable <= set(names)
    finally:
        stop.set()
        t.join()
    alive(m)


def test_seekdir_telldir_and_rewinddir(mounted):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.readdir.restype = ctypes.c_void_p
    libc.readdir.argtypes = libc.telldir.argtypes = libc.closedir.argtypes = \
        libc.rewinddir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    private, root, m = mounted
    for i in range(500):
        (private / f"n{i:04d}").write_bytes(b"")
    NAME = 19                                   # offsetof(struct dirent64, d_name)

    def read_all(dp) -> list[bytes]:
        out = []
        while True:
            e = libc.readdir(dp)
            if not e:
                return out
            out.append(ctypes.string_at(e + NAME))
    dp = libc.opendir(bytes(root))
    first = [ctypes.string_at(libc.readdir(dp) + NAME) for _ in range(200)]
    pos = libc.telldir(dp)
    rest = read_all(dp)
    libc.seekdir(dp, pos)
    again = read_all(dp)
    libc.rewinddir(dp)
    whole = read_all(dp)
    libc.closedir(dp)
    assert again == rest
    assert whole == first + rest
    assert first[:2] == [b".", b".."]
    assert sorted(whole[2:]) == sorted(f"n{i:04d}".encode() for i in range(500))
    alive(m)


# ---- a backing filesystem without file handles (unit level: the table alone) -------------


def test_without_file_handles_inodes_keep_descriptors_up_to_a_cap(world_tmp):
    """Where name_to_handle_at is unsupported every known inode keeps its
    descriptor, so their number is capped: past it a lookup fails with ENFILE
    (nothing leaks), and a forgotten inode makes room again."""
    from simfs.inodes import Budget, InodeTable
    d = world_tmp / "area"
    d.mkdir()
    for i in range(40):
        (d / f"f{i}").write_bytes(b"")
    root_fd = os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    table = InodeTable(root_fd, Budget(cached=16, pinned=20, files=16), file_handles=False)
    try:
        got = []
        for i in range(20):
            got.append(table.lookup(table.root, f"f{i}".encode())[0])
        assert all(n.handle is None and n.pinned for n in got)
        before = len(os.listdir("/proc/self/fd"))
        assert errno_of(table.lookup, table.root, b"f20") == errno.ENFILE
        assert len(os.listdir("/proc/self/fd")) == before
        assert table.lookup(table.root, b"f3")[0] is got[3]      # a known one: no new fd
        table.forget(got[0].ino, 1)
        assert table.lookup(table.root, b"f20")[0].lookups == 1
        assert table.open_fds() == 20
    finally:
        table.close_all()
        os.close(root_fd)


def test_with_file_handles_the_lru_turns_and_every_inode_stays_reachable(world_tmp):
    from simfs.inodes import Budget, InodeTable
    d = world_tmp / "area"
    d.mkdir()
    for i in range(100):
        (d / f"f{i}").write_bytes(b"%d" % i)
    root_fd = os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    table = InodeTable(root_fd, Budget(cached=16, pinned=16, files=16))
    try:
        assert table.file_handles
        nodes = [table.lookup(table.root, f"f{i}".encode())[0] for i in range(100)]
        assert table.open_fds() == 16
        for i, n in enumerate(nodes):
            assert os.fstat(n.fd).st_ino == os.stat(d / f"f{i}").st_ino
            assert table.open_fds() <= 16
        # an unlinked inode held by the kernel is pinned (kept alive), within its cap
        nodes[5].fd                                  # in the LRU when it is unlinked
        os.unlink(d / "f5")
        table.keep(nodes[5])
        for n in nodes[20:60]:
            n.fd
        assert os.fstat(nodes[5].fd).st_nlink == 0
    finally:
        table.close_all()
        os.close(root_fd)


def test_the_anyio_parts_a_daemon_uses_are_loaded_before_it_serves():
    """anyio loads its parts at first use; the signal task's first use came
    once test_control_channel_survives_emfile_at_accept had filled the
    daemon's descriptor table (EMFILE reading anyio/_core/_signals.py), and
    the daemon ended.  Importing the mount module loads them."""
    code = ("import sys, simfs.mount; "
            "print(all(m in sys.modules for m in ('anyio._core._signals', 'anyio.to_thread')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "True", (r.stdout, r.stderr)
