"""Tests of vzquota.scan on real temporary trees (run as root: chown, mount)."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from vzquota import scan as scanmod
from vzquota.errors import EC_EXDEV, CrossDevice
from vzquota.scan import scan


def du_bytes(path) -> int:
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[0])


def find_inodes(path) -> int:
    """Distinct inodes of the tree, as `find -printf %i | sort -u | wc -l`."""
    out = subprocess.run(["find", str(path), "-printf", "%i\\n"], check=True,
                         capture_output=True, text=True).stdout
    return len(set(out.split()))


def alloc(*paths) -> int:
    return sum(os.lstat(p).st_blocks * 512 for p in paths)


def write(path, data=b"x" * 10000):
    with open(path, "wb") as f:
        f.write(data)


def check_totals(path, res=None):
    res = res or scan(str(path))
    assert res.space == du_bytes(path)
    assert res.inodes == find_inodes(path)
    assert sum(v[0] for v in res.users.values()) == res.space
    assert sum(v[1] for v in res.users.values()) == res.inodes
    assert sum(v[0] for v in res.groups.values()) == res.space
    assert sum(v[1] for v in res.groups.values()) == res.inodes
    return res


def test_empty_root_counts_itself(tmp_path):
    res = scan(str(tmp_path))
    assert res.inodes == 1
    assert res.space == alloc(tmp_path)
    check_totals(tmp_path)


def test_files_dirs_fifo_symlink(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    write(tmp_path / "d" / "f")
    os.mkfifo(tmp_path / "d" / "e" / "fifo")
    os.symlink("f", tmp_path / "d" / "link")
    res = check_totals(tmp_path)
    assert res.inodes == 6
    assert res.space == alloc(tmp_path, tmp_path / "d", tmp_path / "d" / "e",
                              tmp_path / "d" / "f", tmp_path / "d" / "link")


def test_hard_links_once(tmp_path):
    write(tmp_path / "a")
    (tmp_path / "sub").mkdir()
    os.link(tmp_path / "a", tmp_path / "b")
    os.link(tmp_path / "a", tmp_path / "sub" / "c")
    res = check_totals(tmp_path)
    assert res.inodes == 3
    assert res.space == alloc(tmp_path, tmp_path / "sub", tmp_path / "a")


def test_sparse_file_counts_allocated(tmp_path):
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(1 << 30)
        f.seek(1 << 20)
        f.write(b"y" * 4096)
    res = check_totals(tmp_path)
    assert res.space == alloc(tmp_path, tmp_path / "sparse")
    assert res.space < 1 << 20


def test_symlink_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    write(outside / "big", b"z" * (4 << 20))
    tree = tmp_path / "tree"
    tree.mkdir()
    os.symlink(outside / "big", tree / "to_file")
    os.symlink(outside, tree / "to_dir")
    res = check_totals(tree)
    assert res.inodes == 3
    assert res.space == alloc(tree, tree / "to_file", tree / "to_dir")
    assert res.space < 1 << 20


def test_per_uid_gid_attribution(tmp_path):
    os.chown(tmp_path, 0, 0)
    write(tmp_path / "u1", b"a" * 20000)
    os.chown(tmp_path / "u1", 1001, 2001)
    (tmp_path / "d").mkdir()
    os.chown(tmp_path / "d", 1001, 2002)
    write(tmp_path / "d" / "u2")
    os.chown(tmp_path / "d" / "u2", 1002, 2001)
    os.symlink("u2", tmp_path / "d" / "l")
    os.chown(tmp_path / "d" / "l", 1002, 2002, follow_symlinks=False)
    res = check_totals(tmp_path)
    a = alloc
    assert res.users == {
        0: [a(tmp_path), 1],
        1001: [a(tmp_path / "u1", tmp_path / "d"), 2],
        1002: [a(tmp_path / "d" / "u2", tmp_path / "d" / "l"), 2],
    }
    assert res.groups == {
        0: [a(tmp_path), 1],
        2001: [a(tmp_path / "u1", tmp_path / "d" / "u2"), 2],
        2002: [a(tmp_path / "d", tmp_path / "d" / "l"), 2],
    }


def test_per_id_off(tmp_path):
    write(tmp_path / "f")
    res = scan(str(tmp_path), per_id=False)
    assert res.users == {} and res.groups == {}
    assert res.inodes == 2 and res.space == du_bytes(tmp_path)


def test_mount_point_raises_cross_device(tmp_path):
    mnt = tmp_path / "a" / "mnt"
    mnt.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    try:
        with pytest.raises(CrossDevice) as ei:
            scan(str(tmp_path))
        assert ei.value.code == EC_EXDEV
        assert ei.value.path == f"{tmp_path}/a/mnt"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    check_totals(tmp_path)


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError):
        scan(str(tmp_path / "nope"))


def test_root_not_a_directory(tmp_path):
    write(tmp_path / "f")
    with pytest.raises(NotADirectoryError):
        scan(str(tmp_path / "f"))


def _nfds():
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def rm_rf():
    """Removes paths with GNU rm: shutil.rmtree in 3.11 recurses per level."""
    paths = []
    yield paths.append
    for p in paths:
        subprocess.run(["rm", "-rf", str(p)], check=True)


def test_deep_tree(tmp_path, rm_rf, monkeypatch):
    depth = 3000
    tree = tmp_path / "deep"
    tree.mkdir()
    rm_rf(tree)
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(depth):            # the path is far beyond PATH_MAX
            os.mkdir("d", dir_fd=fd)
            if i % 100 == 0:
                os.close(os.open(f"f{i}", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
            new = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = new
    finally:
        os.close(fd)
    peak = []
    base = _nfds()
    monkeypatch.setattr(scanmod, "PROGRESS_EVERY", 1)
    res = scan(str(tree), progress=lambda n: peak.append(_nfds() - base))
    assert res.inodes == 1 + depth + depth // 100
    assert max(peak) <= 3                 # a chain needs one fd at a time
    check_totals(tree, res)
    assert _nfds() == base


def test_fd_budget_eviction(tmp_path, monkeypatch):
    """A comb: each level holds leaf dirs and the next level, so parents stay
    pending while the walk goes deeper; the fd budget forces evict + reopen."""
    monkeypatch.setattr(scanmod, "MAX_FDS", 4)
    monkeypatch.setattr(scanmod, "PROGRESS_EVERY", 1)
    reopens = []
    real_reopen = scanmod._reopen
    monkeypatch.setattr(scanmod, "_reopen",
                        lambda *a: reopens.append(1) or real_reopen(*a))
    d = tmp_path
    for i in range(150):
        for leaf in ("a", "b", "c"):
            (d / leaf).mkdir()
            write(d / leaf / "f", b"q")
        d = d / "z"
        d.mkdir()
    base = _nfds()
    peak = []
    res = scan(str(tmp_path), progress=lambda n: peak.append(_nfds() - base))
    check_totals(tmp_path, res)
    assert res.inodes == 1 + 150 * 7
    assert max(peak) <= 4 + 1
    assert reopens                         # the budget was actually exercised
    assert _nfds() == base


def _vanish_during_scan(tmp_path, monkeypatch):
    """Scan 20 dirs that are deleted as soon as the root has been read."""
    for i in range(20):
        (tmp_path / f"d{i}").mkdir()
        write(tmp_path / f"d{i}" / "f")
    gone = []

    def progress(n):
        if not gone:                      # after the root is read: delete the rest
            gone.append(1)
            subprocess.run(["rm", "-rf"] + [str(tmp_path / f"d{i}") for i in range(20)],
                           check=True)

    monkeypatch.setattr(scanmod, "PROGRESS_EVERY", 1)
    res = scan(str(tmp_path), progress=progress)
    assert gone
    return res


def test_vanishing_entries_are_skipped(tmp_path, monkeypatch):
    res = _vanish_during_scan(tmp_path, monkeypatch)
    assert 21 <= res.inodes <= 41          # the root + listed dirs + what was read


def test_progress_called_sparingly(tmp_path, monkeypatch):
    monkeypatch.setattr(scanmod, "PROGRESS_EVERY", 500)
    for i in range(30):
        (tmp_path / f"d{i}").mkdir()
        for j in range(100):
            (tmp_path / f"d{i}" / f"f{j}").touch()
    calls = []
    res = scan(str(tmp_path), progress=calls.append)
    assert res.inodes == 1 + 30 * 101
    assert 1 < len(calls) <= res.inodes // 500
    assert calls == sorted(calls)


def test_mixed_tree_matches_du_and_find(tmp_path):
    _build_mixed(tmp_path)
    check_totals(tmp_path)


def test_directory_removed_after_open(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write(tmp_path / "b" / "f")
    real_open = scanmod._open_dir

    def open_then_remove(stack, depth, name, ino, dev):
        fd = real_open(stack, depth, name, ino, dev)
        if name == "a":
            os.rmdir(tmp_path / "a")      # reading the open fd now fails ENOENT
        return fd

    monkeypatch.setattr(scanmod, "_open_dir", open_then_remove)
    res = scan(str(tmp_path))
    assert res.inodes == 4                # root, a (counted when listed), b, b/f
    assert not (tmp_path / "a").exists()


# -- the parallel walk (forced on small trees) -------------------------------------

@pytest.fixture(params=["fork", "spawn"])
def parallel(request, monkeypatch):
    """Every scan() goes parallel right after reading the root, 2 workers."""
    monkeypatch.setattr(scanmod, "WORKERS", 2)
    monkeypatch.setattr(scanmod, "PARALLEL_MIN", 0)
    monkeypatch.setattr(scanmod, "PARALLEL_MIN_SPAWN", 0)
    monkeypatch.setattr(scanmod, "START", request.param)
    monkeypatch.setattr(scanmod, "BATCH_MAX", 1)     # many small hand-overs
    return request.param


def _no_children():
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def _build_mixed(root, n=40):
    for i in range(n):
        d = root / f"d{i % 7}" / f"s{i}"
        d.mkdir(parents=True, exist_ok=True)
        write(d / "f", b"w" * (i * 1000))
        if i % 3 == 0:
            os.link(d / "f", d / "hl")
        if i % 4 == 0:
            os.symlink("f", d / "sl")
        if i % 5 == 0:
            os.mkfifo(d / "p")


def test_parallel_matches_sequential(tmp_path, parallel, monkeypatch):
    _build_mixed(tmp_path)
    os.chown(tmp_path / "d1", 1234, 5678)
    base = _nfds()
    spawned = []
    real = scanmod._Worker
    monkeypatch.setattr(scanmod, "_Worker", lambda m: spawned.append(m) or real(m))
    res = check_totals(tmp_path)
    assert spawned == [parallel, parallel]
    assert _nfds() == base
    _no_children()
    monkeypatch.setattr(scanmod, "WORKERS", 1)
    assert scan(str(tmp_path)) == res


def test_parallel_hard_links_across_workers_count_once(tmp_path, parallel):
    write(tmp_path / "orig", b"h" * 50000)
    for i in range(30):                   # one link per unit: units go to both workers
        (tmp_path / f"d{i}").mkdir()
        os.link(tmp_path / "orig", tmp_path / f"d{i}" / "link")
        write(tmp_path / f"d{i}" / "own")
    res = check_totals(tmp_path)
    assert res.inodes == 1 + 1 + 30 * 2
    assert res.users[0][0] == res.space


def test_parallel_cross_device_from_worker(tmp_path, parallel, monkeypatch):
    monkeypatch.setattr(scanmod, "UNITS_PER_WORKER", 0)   # no split: a worker meets it
    mnt = tmp_path / "a" / "b" / "mnt"
    mnt.mkdir(parents=True)
    (tmp_path / "c").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    base = _nfds()
    try:
        with pytest.raises(CrossDevice) as ei:
            scan(str(tmp_path))
        assert ei.value.code == EC_EXDEV
        assert ei.value.path == f"{tmp_path}/a/b/mnt"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert _nfds() == base
    _no_children()


def test_parallel_cross_device_while_splitting(tmp_path, parallel):
    mnt = tmp_path / "a" / "mnt"
    mnt.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    try:
        with pytest.raises(CrossDevice) as ei:
            scan(str(tmp_path))
        assert ei.value.path == f"{tmp_path}/a/mnt"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    _no_children()


# The fault is injected by monkeypatching, which only a forked worker inherits.
@pytest.mark.parametrize("parallel", ["fork"], indirect=True)
def test_parallel_worker_oserror_propagates(tmp_path, parallel, monkeypatch):
    monkeypatch.setattr(scanmod, "UNITS_PER_WORKER", 0)
    (tmp_path / "a" / "bad").mkdir(parents=True)
    real_open = scanmod._open_dir

    def failing(stack, depth, name, ino, dev):
        if name == "bad":
            raise OSError(errno.EIO, "Input/output error", "bad")
        return real_open(stack, depth, name, ino, dev)

    monkeypatch.setattr(scanmod, "_open_dir", failing)
    with pytest.raises(OSError) as ei:
        scan(str(tmp_path))
    assert ei.value.errno == errno.EIO and ei.value.filename == "bad"
    _no_children()


def test_parallel_vanishing_entries_are_skipped(tmp_path, parallel, monkeypatch):
    res = _vanish_during_scan(tmp_path, monkeypatch)
    assert 21 <= res.inodes <= 41
    _no_children()


def test_parallel_progress_and_fd_budget(tmp_path, parallel, monkeypatch):
    """The comb of test_fd_budget_eviction, walked by workers with a tiny budget."""
    monkeypatch.setattr(scanmod, "MAX_FDS", 4)
    monkeypatch.setattr(scanmod, "PROGRESS_EVERY", 100)
    monkeypatch.setattr(scanmod, "UNITS_PER_WORKER", 0)
    d = tmp_path
    for i in range(100):
        for leaf in ("a", "b", "c"):
            (d / leaf).mkdir()
            write(d / leaf / "f", b"q")
        d = d / "z"
        d.mkdir()
    calls = []
    res = scan(str(tmp_path), progress=calls.append)
    check_totals(tmp_path, res)
    assert res.inodes == 1 + 100 * 7
    assert calls and calls == sorted(calls)


def test_small_tree_stays_in_process(tmp_path, monkeypatch):
    monkeypatch.setattr(scanmod, "WORKERS", 2)
    monkeypatch.setattr(scanmod, "_Worker", lambda m: pytest.fail("worker started"))
    _build_mixed(tmp_path)
    check_totals(tmp_path)


def test_start_method_auto(monkeypatch):
    import threading
    assert scanmod._start_method() == "fork"          # pytest runs single-threaded
    ev = threading.Event()
    t = threading.Thread(target=ev.wait)
    t.start()
    try:
        assert scanmod._start_method() is None        # threads: no fork, sequential
    finally:
        ev.set()
        t.join()
