"""What the tests and tools/torture share to mount and to act, without pytest:
the commands of this environment (``SIMFS``, ``VZQUOTA`` next to the running
Python), ``SimMount`` (one simfs daemon in the foreground as a child process,
always unmountable), ``is_mountpoint``, ``vzquota(...)``, and runners for steps
as other uids (``as_user``, ``py_as``).

``tests/conftest.py`` re-exports all of it (``from conftest import SIMFS`` keeps
working); ``tests/attacks.py`` imports it from here, so that ``tools/torture``
runs from an installed environment that has no pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

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
        extra = os.environ.get("SIMFS_TEST_OPTIONS")    # e.g. passthrough: every mount
        if extra:
            self.options = self.options + [o for o in extra.split(",")
                                           if o and o not in self.options]
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
