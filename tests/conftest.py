"""Shared fixtures: isolated quota/run directories, real simfs mounts in child
processes that always get unmounted, and a runner for steps as other uids.

FUSE: every machine here (CI included) runs as root with /dev/fuse.  If FUSE is
missing, tests that mount *fail* under CI=true and are skipped (with the
reason) elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from mounts import (BIN, SIMFS, VZQUOTA, USER_PYTHON, SimMount, as_user,  # noqa: F401
                    fuse_problem, is_mountpoint, py_as, vzquota)

try:
    import anyio  # noqa: F401  (the daemon's runtime layer and the async tests' plugin)
    import uvloop  # noqa: F401
except ImportError as e:
    pytest.exit(f"{e.name} is missing from this venv: run `bash tools/setup.sh` "
                "(simfs runs on anyio + uvloop)", returncode=4)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Each test gets its own quota directory and run directory."""
    monkeypatch.setenv("VZQUOTA_DIR", str(tmp_path / "vzquota"))
    monkeypatch.setenv("VZQUOTA_RUNDIR", str(tmp_path / "run"))
    monkeypatch.setenv("VZQUOTA_LOCK_WAIT", "2")


# Fixtures through which a test mounts FUSE: every test that uses one (directly
# or through another fixture) gets the ``fuse`` marker, so ``-m "not fuse"``
# runs the half that needs no mount.
MOUNTING_FIXTURES = {"fuse", "mounter", "mounted", "backing", "backing_quota"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if MOUNTING_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.fuse)


@pytest.fixture
def fuse():
    why = fuse_problem()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"FUSE is required in CI: {why}")
        pytest.skip(why)


@pytest.fixture
def anyio_backend():
    """Async tests (anyio's pytest plugin) run on simfs's default event loop."""
    return "asyncio", {"use_uvloop": True}


@pytest.fixture
def mounter(fuse, world_tmp, tmp_path):
    """``mounter(private, root, *options)`` starts a mount; every mount is
    unmounted at teardown, and its log must hold no traceback or error."""
    mounts: list[SimMount] = []

    def start(private: Path, root: Path, *options: str) -> SimMount:
        m = SimMount(private, root, list(options), tmp_path / f"simfs{len(mounts)}.log")
        mounts.append(m)
        return m.start()
    yield start
    for m in reversed(mounts):
        m.cleanup()
    for m in mounts:
        text = m.logtext()
        assert "Traceback" not in text and " ERROR " not in text, text


@pytest.fixture
def world_tmp():
    """A scratch directory every uid can traverse (pytest's own are 0700, and
    concurrent pytest sessions reset them), removed after the mounts in it."""
    d = Path(tempfile.mkdtemp(prefix="simfs-test-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    with open("/proc/self/mountinfo") as f:
        busy = [line.split()[4] for line in f if line.split()[4].startswith(str(d))]
    for mp in reversed(busy):
        subprocess.run(["umount", "-l", mp], check=False, stderr=subprocess.DEVNULL)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def area(world_tmp):
    """A private area and a mount point."""
    private = world_tmp / "private"
    root = world_tmp / "root"
    private.mkdir()
    root.mkdir()
    return private, root


@pytest.fixture
def mounted(mounter, area):
    """A plain passthrough mount (no quota) with the container-root options."""
    private, root = area
    m = mounter(private, root, "dev", "suid")
    return private, root, m


def assert_run_left_nothing(tmp: str) -> None:
    """A tool's run (tools/fstests, tools/torture) with temp dir ``tmp`` left
    nothing behind: not the dir, no mount under it, no process naming it."""
    assert not os.path.exists(tmp), f"{tmp} was left behind"
    with open("/proc/self/mountinfo") as f:
        left = [l.split()[4] for l in f if tmp in l]
    assert not left, f"still mounted: {left}"
    procs = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if tmp.encode() in f.read():
                    procs.append(pid)
        except OSError:
            pass
    assert not procs, f"processes of the run left: {procs}"


# Backing filesystems (ext4/xfs/btrfs/tmpfs loop images) and the invariants:
# see tests/backing.py.
from backing import backing, backing_quota  # noqa: E402,F401  (fixtures)
