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
import sys
import time
from pathlib import Path

import pytest

try:
    import anyio  # noqa: F401  (the daemon's runtime layer and the async tests' plugin)
    import uvloop  # noqa: F401
except ImportError as e:
    pytest.exit(f"{e.name} is missing from this venv: run `bash tools/setup.sh` "
                "(simfs runs on anyio + uvloop)", returncode=4)

BIN = Path(sys.executable).parent
SIMFS = str(BIN / "simfs")
VZQUOTA = str(BIN / "vzquota")


def fuse_problem() -> str | None:
    if os.geteuid() != 0:
        return "tests that mount need root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not os.path.exists(SIMFS):
        return f"{SIMFS} is not installed (run tools/setup.sh)"
    return None


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Each test gets its own quota directory and run directory."""
    monkeypatch.setenv("VZQUOTA_DIR", str(tmp_path / "vzquota"))
    monkeypatch.setenv("VZQUOTA_RUNDIR", str(tmp_path / "run"))
    monkeypatch.setenv("VZQUOTA_LOCK_WAIT", "2")


def is_mountpoint(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


class SimMount:
    """One simfs daemon in the foreground (-f) as a child process."""

    def __init__(self, private: Path, root: Path, options: list[str], log: Path):
        self.private, self.root, self.options, self.log = private, root, options, log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "SimMount":
        cmd = [SIMFS, str(self.private), str(self.root), "-f"]
        binding = os.environ.get("SIMFS_TEST_FUSE")     # the CI subset on the fallback
        if binding and not any(o.startswith("fuse=") for o in self.options):
            self.options = self.options + [f"fuse={binding}"]
        if self.options:
            cmd += ["-o", ",".join(self.options)]
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
        logf.close()
        deadline = time.monotonic() + timeout
        while not is_mountpoint(str(self.root)):
            if self.proc.poll() is not None:
                raise AssertionError(f"simfs exited with {self.proc.returncode}:\n"
                                     + self.log.read_text())
            if time.monotonic() > deadline:
                raise AssertionError("simfs did not mount in time:\n" + self.log.read_text())
            time.sleep(0.01)
        return self

    def umount(self) -> int:
        """A clean stop: umount, then the daemon must exit 0."""
        subprocess.run(["umount", str(self.root)], check=True)
        return self.wait()

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """Simulate a crash: SIGKILL, then clear the dead mount."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        subprocess.run(["umount", "-l", str(self.root)], check=False,
                       stderr=subprocess.DEVNULL)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if is_mountpoint(str(self.root)):
                subprocess.run(["umount", "-l", str(self.root)], check=False,
                               stderr=subprocess.DEVNULL)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        elif is_mountpoint(str(self.root)):
            subprocess.run(["umount", "-l", str(self.root)], check=False,
                           stderr=subprocess.DEVNULL)

    def logtext(self) -> str:
        return self.log.read_text(errors="replace")


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


def vzquota(*args: str, check: bool = True, input: str | None = None):
    """Run the vzquota CLI; returns the CompletedProcess."""
    r = subprocess.run([VZQUOTA, *args], capture_output=True, text=True, input=input)
    if check and r.returncode != 0:
        raise AssertionError(f"vzquota {' '.join(args)} -> {r.returncode}\n{r.stdout}{r.stderr}")
    return r


def as_user(uid: int, gid: int, *cmd: str, cwd: str | None = None,
            groups: list[int] | None = None) -> subprocess.CompletedProcess:
    """Run a command as uid:gid (a child process), capturing its output."""
    return subprocess.run(list(cmd), user=uid, group=gid, extra_groups=groups or [],
                          capture_output=True, text=True, cwd=cwd)


# A Python other uids can execute (the venv's may sit under root's 0700 home).
USER_PYTHON = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                    if os.access(p, os.X_OK)), sys.executable)


def py_as(uid: int, gid: int, code: str, *args: str) -> subprocess.CompletedProcess:
    """Run a stdlib-only Python snippet as uid:gid."""
    return as_user(uid, gid, USER_PYTHON, "-c", code, *args)


# Backing filesystems (ext4/xfs/btrfs/tmpfs loop images) and the invariants:
# see tests/backing.py.
from backing import backing, backing_quota  # noqa: E402,F401  (fixtures)
