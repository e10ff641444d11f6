"""The request loop through real mounts: the default binding is the project's
own protocol layer (fusewire), whose reader thread (``runtime=thread``, the
default) blocks in read(2) on the device and runs each request's handler at
once under the loop's lock; one that suspends (fsync goes to a worker thread)
continues as a task of the asyncio loop, at most ``MAX_PENDING`` (64) at once,
the FUSE device unread meanwhile.  ``runtime=uvloop`` serves the same way from
a reader callback; trio runs the same layer with a task per coroutine handler;
``-o fuse=pyfuse3`` selects the pyfuse3 fallback.

Many parallel fsyncs (more than 64 at once) all complete with their data while
other requests are answered; an unmount with fsyncs in flight stops cleanly
(both under the reader thread and the reader callback).
"""

from __future__ import annotations

import os
import signal
import threading

import pytest

import backing as bk
from conftest import vzquota

QID = "131"


def maps(m) -> str:
    with open(f"/proc/{m.proc.pid}/maps") as f:
        return f.read()


def test_default_binding_is_fusewire_without_libfuse(mounter, area):
    private, root = area
    m = mounter(private, root)
    (root / "f").write_bytes(b"x")
    assert (private / "f").read_bytes() == b"x"
    log = m.logtext()
    assert "request loop: thread, fusewire's reader thread" in log
    assert "FUSE 7." in log and "negotiated" in log
    mapped = maps(m)
    assert "libfuse3" not in mapped and "pyfuse3" not in mapped
    assert len(os.listdir(f"/proc/{m.proc.pid}/task")) >= 2      # the reader thread


def test_uvloop_serves_from_a_reader_callback(mounter, area):
    private, root = area
    m = mounter(private, root, "runtime=uvloop")
    (root / "f").write_bytes(b"x")
    os.fsync(os.open(root / "f", os.O_RDONLY))
    assert (private / "f").read_bytes() == b"x"
    assert "request loop: uvloop, fusewire's reader callback" in m.logtext()


def test_thread_is_fusewires_only(mounter, area):
    import subprocess
    private, root = area
    from conftest import SIMFS
    r = subprocess.run([SIMFS, str(private), str(root), "-f", "-o",
                        "fuse=pyfuse3,runtime=thread"], capture_output=True, text=True)
    assert r.returncode == 2 and "runtime=thread is fusewire's" in r.stderr


def test_trio_runs_the_same_layer(mounter, area):
    private, root = area
    m = mounter(private, root, "runtime=trio")
    (root / "f").write_bytes(b"x")
    os.fsync(os.open(root / "f", os.O_RDONLY))
    assert (private / "f").read_bytes() == b"x"
    assert "request loop: trio, fusewire's reader tasks" in m.logtext()


def test_pyfuse3_fallback(mounter, area):
    import pyfuse3  # noqa: F401  (tools/setup.sh --test installs the extra)
    private, root = area
    m = mounter(private, root, "fuse=pyfuse3", "dev", "suid")
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"through pyfuse3")
    assert (private / "d" / "f").read_bytes() == b"through pyfuse3"
    assert sorted(os.listdir(root / "d")) == ["f"]
    assert "request loop: uvloop, pyfuse3's" in m.logtext()      # worker tasks (PyPI's)
    assert "libfuse3" in maps(m)


def _fsync_storm(root, n: int, rounds: int,
                 started: threading.Event | None = None) -> list[BaseException]:
    """``n`` threads each write their own file and fsync it ``rounds`` times,
    all released at once (then ``started`` is set); returns what failed."""
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def worker(i: int) -> None:
        try:
            fd = os.open(root / f"w{i}", os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                start.wait(timeout=60)
                if started is not None:
                    started.set()
                for r in range(rounds):
                    os.pwrite(fd, bytes([i % 251]) * 4096, r * 4096)
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as e:      # reported by the test
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
        assert not t.is_alive(), "an fsync never returned"
    return errors


@pytest.mark.parametrize("runtime", ["thread", "uvloop"])
def test_more_parallel_fsyncs_than_tasks(mounter, area, runtime):
    private, root = area
    vzquota("init", QID, "-p", str(private), "-b", "100000", "-B", "100000",
            "-i", "1000", "-I", "1000", "-e", "1d", "-n", "1d")
    vzquota("on", QID)
    mounter(private, root, f"quotaid={QID}", f"runtime={runtime}")
    stop = threading.Event()
    stats = [0]

    def stat_loop() -> None:          # other requests go on meanwhile
        while not stop.is_set():
            os.stat(root)
            os.listdir(root)
            stats[0] += 1
    t = threading.Thread(target=stat_loop)
    t.start()
    try:
        errors = _fsync_storm(root, 120, 3)
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert stats[0] > 0
    for i in range(120):
        assert (private / f"w{i}").read_bytes() == bytes([i % 251]) * 4096 * 3
    bk.assert_usage_matches(private, QID, ugid=False)   # against find + du


@pytest.mark.parametrize("runtime", ["thread", "uvloop"])
def test_unmount_with_fsyncs_in_flight(mounter, area, runtime):
    private, root = area
    m = mounter(private, root, f"runtime={runtime}")
    started = threading.Event()
    t = threading.Thread(target=_fsync_storm, args=(root, 40, 50, started))
    t.start()
    # stop the daemon while the storm runs: it finishes what it started
    assert started.wait(timeout=60)
    m.proc.send_signal(signal.SIGTERM)
    t.join(timeout=300)
    assert not t.is_alive()
    assert m.wait() == 0, m.logtext()
    assert "Traceback" not in m.logtext()


def test_large_reads_cold_and_partly_cached(mounter, area):
    """Large reads the backing page cache cannot serve at once go to a worker
    thread (RWF_NOWAIT first): the data is the file's, whether all of it, part
    of it or none of it was cached, at every offset and across the end."""
    private, root = area
    mounter(private, root)
    data = os.urandom(8 << 20) + b"tail"          # not a multiple of anything
    (root / "f").write_bytes(data)
    os.sync()

    def drop(backing_ranges) -> None:
        fd = os.open(root / "f", os.O_RDONLY)     # the mount's own page cache
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        fd = os.open(private / "f", os.O_RDONLY)  # the backing file's, in part
        for off, length in backing_ranges:
            os.posix_fadvise(fd, off, length, os.POSIX_FADV_DONTNEED)
        os.close(fd)

    for ranges in ([(0, 0)], [(3 << 20, 0)], [(1 << 20, 1 << 20), (5 << 20, 100_000)], []):
        drop(ranges)
        fd = os.open(root / "f", os.O_RDONLY)
        try:
            got = bytearray()
            off = 0
            while True:
                chunk = os.pread(fd, 1 << 20, off)
                if not chunk:
                    break
                got += chunk
                off += len(chunk)
        finally:
            os.close(fd)
        assert got == data, f"backing ranges dropped: {ranges}"
    drop([(0, 0)])
    with open(root / "f", "rb") as f:                 # odd offsets and sizes
        for off in (0, 4095, (4 << 20) + 3, len(data) - 70_000, len(data) - 4, len(data)):
            f.seek(off)
            assert f.read(300_000) == data[off:off + 300_000]
