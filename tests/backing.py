"""Backing filesystems for the tests and for ``tools/torture``, and the two
invariants checked on them (SPEC section 4).

Role:
- ``make_backing(kind, workdir, mountdir)`` makes a small backing filesystem of
  ``kind`` (``ext4``, ``xfs``, ``btrfs``: a sparse loop image of ``IMAGE_MB``
  in ``workdir``; ``tmpfs``: a size-limited tmpfs), mounts it at ``mountdir``
  and creates a private area on it (``private``, mode 0755, root's).
  ``Backing.destroy()`` always unmounts it and deletes the image, also when
  something is still mounted on top of it (a simfs mount of its private area is
  unmounted first) or when set-up failed half way.
- ``recount(private)`` is the independent recount the invariants compare with:
  ``find -xdev -printf`` (st_blocks, owner, device+inode), cross-checked with
  ``du --block-size=1 -s -x``; never the project's own scanner.  What counts
  (SPEC 4): every inode of the tree once, the root directory included, hard
  links once, space = ``st_blocks * 512``, per owner uid and gid.
- ``live(qid)`` reads the live figures of a mount over the control channel
  (bytes, exact); ``usage_diff(private, qid)`` lists every difference at both
  levels; ``wait_usage_matches`` syncs and waits (bounded) until there is none,
  since the daemon may settle charges after the last close or at forget.
- ``Sampler`` polls the live figures in a tight loop from a thread and records
  the highest usage it saw of every quota object and every sample over a
  non-zero hard limit (1st level: any hard limit, 0 allows nothing).
- ``RACER`` is the source of the stdlib-only writer (``tests/racer.py``) that
  races at the limit as another uid.

The pytest fixtures: ``backing`` (parametrized over ``KINDS``, ids
ext4/xfs/btrfs/tmpfs) and ``backing_quota`` (a quota-carrying simfs mount of a
backing's private area, with per-uid/gid limits).  Request ``backing`` (or
``backing_quota``) *before* ``mounter`` in a test's arguments so the simfs
mount goes first at teardown; ``destroy`` copes with the other order too.

Concurrency: everything here runs in the test process; ``Sampler`` is one
thread that only reads the control socket.  Needs root (mount, losetup).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("ext4", "xfs", "btrfs", "tmpfs")
# mkfs.xfs (xfsprogs >= 5.19) refuses filesystems smaller than 300 MiB; btrfs
# needs about 115 MiB.  One size for all keeps the figures comparable.  The
# images are sparse: a fresh one costs a few MiB of real disk.
IMAGE_MB = 300

MKFS = {
    # -N: room for the 100k-entry directory of tools/torture (the default
    # for a 300 MiB ext4 is about 77k inodes)
    "ext4": ["mkfs.ext4", "-q", "-F", "-b", "4096", "-N", "200000"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}
TOOLS = {"ext4": "mkfs.ext4", "xfs": "mkfs.xfs", "btrfs": "mkfs.btrfs"}

RACER = (Path(__file__).with_name("racer.py")).read_text()


def _mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, fs type, source) of every mount we can see."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mp = left.split()[4].replace("\\040", " ")
            rest = right.split()
            out.append((mp, rest[0], rest[1] if len(rest) > 1 else ""))
    return out


def is_mounted(path: str | Path) -> bool:
    real = os.path.realpath(path)
    return any(mp == real for mp, _, _ in _mountinfo())


def missing_tool(kind: str) -> str | None:
    """Why ``kind`` cannot be made here (a missing mkfs), or None."""
    tool = TOOLS.get(kind)
    if tool and shutil.which(tool) is None:
        return f"{tool} is missing (tools/setup.sh installs it)"
    return None


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")


def _umount(path: str, wait: float) -> bool:
    """Unmount ``path``; retry while busy for up to ``wait`` seconds (a daemon
    that was just unmounted above it may still hold it), then lazily."""
    deadline = time.monotonic() + wait
    while is_mounted(path):
        r = subprocess.run(["umount", path], capture_output=True, text=True)
        if r.returncode == 0:
            continue
        if time.monotonic() > deadline:
            subprocess.run(["umount", "-l", path], capture_output=True)
            return False
        time.sleep(0.05)
    return True


def simfs_roots_on(top: str) -> list[str]:
    """Mount points of the simfs daemons whose private area lies on ``top``
    (found by their command line: ``simfs PRIVATE ROOT ...``; a FUSE mount's
    source does not name the private area)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        for i, a in enumerate(args[:3]):
            if os.path.basename(a) == "simfs":
                pos = [x for x in args[i + 1:] if not x.startswith("-")]
                if len(pos) >= 2:
                    priv = os.path.realpath(os.path.join(cwd, pos[0]))
                    if priv == top or priv.startswith(top + "/"):
                        out.append(os.path.realpath(os.path.join(cwd, pos[1])))
                break
    return out


@dataclass
class Backing:
    """One mounted backing filesystem with a private area on it."""

    kind: str
    mnt: Path                       # where the backing filesystem is mounted
    image: Path | None = None       # the loop image (None for tmpfs)
    private: Path = field(init=False)

    def __post_init__(self) -> None:
        self.private = self.mnt / "private"

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.mnt)

    def reserve_bytes(self) -> int:
        """Blocks only root may use (f_bfree - f_bavail), in bytes."""
        s = self.statvfs()
        return (s.f_bfree - s.f_bavail) * s.f_frsize

    def destroy(self) -> None:
        """Unmount everything on or from this backing, then the backing itself,
        detach its loop device and delete its image.  Safe to call twice."""
        mnt = os.path.realpath(self.mnt)
        on_top = [mp for mp, _, _ in _mountinfo() if mp.startswith(mnt + "/")]
        on_top += [mp for mp in simfs_roots_on(mnt) if is_mounted(mp)]
        for mp in reversed(on_top):
            _umount(mp, 10.0)
        if is_mounted(mnt):
            _umount(mnt, 20.0)
        if self.image is not None:
            r = subprocess.run(["losetup", "-j", str(self.image)],
                               capture_output=True, text=True)
            for line in r.stdout.splitlines():
                dev = line.split(":", 1)[0]
                subprocess.run(["losetup", "-d", dev], capture_output=True)
            try:
                os.unlink(self.image)
            except FileNotFoundError:
                pass


def make_backing(kind: str, workdir: Path, mountdir: Path,
                 size_mb: int = IMAGE_MB) -> Backing:
    """Make, mount and prepare a backing filesystem (see the module doc).
    On any failure everything made so far is undone before raising."""
    if kind not in KINDS:
        raise ValueError(f"unknown backing filesystem {kind!r} (one of {', '.join(KINDS)})")
    why = missing_tool(kind)
    if why:
        raise RuntimeError(why)
    mountdir.mkdir(parents=True, exist_ok=True)
    os.chmod(mountdir, 0o755)
    b = Backing(kind, mountdir)
    try:
        if kind == "tmpfs":
            _run("mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755",
                 f"simfs-test-{os.getpid()}", str(mountdir))
        else:
            b.image = workdir / f"{kind}.img"
            with open(b.image, "wb") as f:
                f.truncate(size_mb << 20)
            _run(*MKFS[kind], str(b.image))
            _run("mount", "-o", "loop", str(b.image), str(mountdir))
        os.chmod(mountdir, 0o755)
        b.private.mkdir(mode=0o755)
        os.chmod(b.private, 0o755)
    except BaseException:
        b.destroy()
        raise
    return b


# ---- the independent recount ---------------------------------------------------------

@dataclass
class Usage:
    """Usage of a tree or of a live quota: bytes and inodes, per uid and gid
    (ids with nothing charged are left out)."""

    space: int
    inodes: int
    users: dict[int, tuple[int, int]]
    groups: dict[int, tuple[int, int]]


def recount(private: str | Path, sync: bool = True) -> Usage:
    """Count the tree with find(1) (and check the space with du(1)).  Every
    inode once (by device+inode), the root included; space = st_blocks*512."""
    if sync:
        os.sync()
    r = subprocess.run(["find", str(private), "-xdev", "-printf", r"%D %i %b %U %G\n"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        # an entry that vanished meanwhile is the only expected complaint
        raise RuntimeError(f"find failed: {r.stderr.strip()}")
    seen: set[tuple[str, str]] = set()
    space = inodes = 0
    users: dict[int, list[int]] = {}
    groups: dict[int, list[int]] = {}
    for line in r.stdout.splitlines():
        dev, ino, blocks, uid, gid = line.split()
        if (dev, ino) in seen:
            continue
        seen.add((dev, ino))
        nbytes = int(blocks) * 512
        space += nbytes
        inodes += 1
        for table, key in ((users, int(uid)), (groups, int(gid))):
            acc = table.setdefault(key, [0, 0])
            acc[0] += nbytes
            acc[1] += 1
    du = subprocess.run(["du", "--block-size=1", "-s", "-x", str(private)],
                        capture_output=True, text=True)
    if du.returncode == 0:
        du_space = int(du.stdout.split()[0])
        if du_space != space:
            raise RuntimeError(f"find and du disagree on {private}: {space} != {du_space} "
                               "(the tree changed while counting?)")
    return Usage(space, inodes,
                 {k: (v[0], v[1]) for k, v in users.items()},
                 {k: (v[0], v[1]) for k, v in groups.items()})


def live_state(qid: int | str) -> dict:
    """The live state of a mount (control channel, no save)."""
    from vzquota import control
    r = control.request(int(qid), "stat", save=False)
    if r is None:
        raise RuntimeError(f"no live mount carries quota id {qid}")
    return r["state"]


def _table(rows: list) -> dict[int, tuple[int, int]]:
    return {int(row[0]): (row[1][0], row[2][0]) for row in rows if row[1][0] or row[2][0]}


def live(qid: int | str, state: dict | None = None) -> Usage:
    st = state if state is not None else live_state(qid)
    return Usage(st["level1"][0][0], st["level1"][1][0],
                 _table(st["users"]), _table(st["groups"]))


def usage_diff(private: str | Path, qid: int | str, ugid: bool = True) -> list[str]:
    """Every difference between the live usage and the recount, at both levels
    (the 2nd level only when ``ugid``), as readable lines; empty = equal."""
    rc = recount(private)
    lv = live(qid)
    out = []
    if lv.space != rc.space:
        out.append(f"1st level space: live {lv.space} != recount {rc.space} "
                   f"({lv.space - rc.space:+d} bytes)")
    if lv.inodes != rc.inodes:
        out.append(f"1st level inodes: live {lv.inodes} != recount {rc.inodes} "
                   f"({lv.inodes - rc.inodes:+d})")
    if ugid:
        for name, a, b in (("uid", lv.users, rc.users), ("gid", lv.groups, rc.groups)):
            for i in sorted(set(a) | set(b)):
                la, lb = a.get(i, (0, 0)), b.get(i, (0, 0))
                if la != lb:
                    out.append(f"{name} {i}: live (space {la[0]}, inodes {la[1]}) != "
                               f"recount (space {lb[0]}, inodes {lb[1]})")
    return out


def wait_usage_matches(private: str | Path, qid: int | str, ugid: bool = True,
                       timeout: float = 10.0) -> list[str]:
    """Sync and compare until live usage equals the recount or ``timeout``
    passes (charges may settle after the last close or at forget).  Returns the
    last differences (empty = it matched)."""
    deadline = time.monotonic() + timeout
    while True:
        diff = usage_diff(private, qid, ugid)
        if not diff or time.monotonic() > deadline:
            return diff
        time.sleep(0.1)


def assert_usage_matches(private: str | Path, qid: int | str, ugid: bool = True,
                         timeout: float = 10.0) -> None:
    """Invariant (b): once writers stop and data is synced, live usage equals
    the independent recount at both levels."""
    diff = wait_usage_matches(private, qid, ugid, timeout)
    assert not diff, "live usage != independent recount:\n  " + "\n  ".join(diff)


# ---- invariant (a): sampling while writers race ---------------------------------------

class Sampler(threading.Thread):
    """Polls the live figures of ``qid`` until ``stop()``; records the highest
    usage seen per quota object and every sample above a hard limit."""

    def __init__(self, qid: int | str):
        super().__init__(daemon=True, name=f"sampler-{qid}")
        self.qid = qid
        self._stop_evt = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._idle = threading.Event()
        self.samples = 0
        self.errors: list[str] = []
        self.violations: list[str] = []
        # key -> (max usage seen, hard limit at that moment)
        self.max: dict[str, tuple[int, int]] = {}

    def _see(self, key: str, counter: list, level1: bool) -> None:
        usage, hard = counter[0], counter[2]
        best = self.max.get(key)
        if best is None or usage > best[0]:
            self.max[key] = (usage, hard)
        if (level1 or hard) and usage > hard and len(self.violations) < 50:
            self.violations.append(f"{key}: usage {usage} > hard {hard}")

    def sample(self) -> None:
        st = live_state(self.qid)
        self.samples += 1
        self._see("level1 space", st["level1"][0], True)
        self._see("level1 inodes", st["level1"][1], True)
        for kind, rows in (("uid", st["users"]), ("gid", st["groups"])):
            for row in rows:
                self._see(f"{kind} {row[0]} space", row[1], False)
                self._see(f"{kind} {row[0]} inodes", row[2], False)

    def pause(self) -> None:
        """Stop sampling (e.g. while the mount is stopped on purpose)."""
        self._go.clear()
        self._idle.wait(30)

    def resume(self) -> None:
        self._idle.clear()
        self._go.set()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            if not self._go.is_set():
                self._idle.set()
                self._go.wait(0.1)
                continue
            self._idle.clear()
            try:
                self.sample()
            except Exception as e:          # a dead daemon must not hang the test
                if len(self.errors) < 20:
                    self.errors.append(f"{type(e).__name__}: {e}")
                time.sleep(0.01)

    def stop(self) -> "Sampler":
        self._stop_evt.set()
        self.join(30)
        return self

    def worst(self, key: str) -> tuple[int, int]:
        return self.max.get(key, (0, 0))


# ---- racing writers as other uids ------------------------------------------------------

def user_python() -> str:
    """A Python other uids can execute (the venv's may sit under a 0700 home)."""
    return next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                 if os.access(p, os.X_OK)), sys.executable)


def start_racer(root: Path, uid: int, gid: int, seconds: float, seed: int,
                ops: str = "all", name: str | None = None,
                until_refused: bool = False) -> subprocess.Popen:
    """Start one writer as uid:gid in ``root`` (its own dir ``root/r<seed>``,
    made here, plus ``root/shared``); it prints a JSON summary when done.
    ``until_refused``: it goes on past ``seconds`` until one of its calls got
    EDQUOT (tests/racer.py: at most MORE_MAX seconds more)."""
    own = root / (name or f"r{seed}")
    own.mkdir(exist_ok=True)
    os.chown(own, uid, gid)
    shared = root / "shared"
    if not shared.exists():
        shared.mkdir()
        os.chmod(shared, 0o1777)
    return subprocess.Popen([user_python(), "-c", RACER, str(own), str(shared),
                             str(seconds), str(seed), ops, "1" if until_refused else "0"],
                            user=uid, group=gid, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish_racers(procs: list[subprocess.Popen], timeout: float = 120.0) -> list[dict]:
    """Wait for the writers; returns their summaries (a crash is an error)."""
    out = []
    for p in procs:
        so, se = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"racer exited {p.returncode}: {se.strip()[-2000:]}")
        out.append(json.loads(so.strip().splitlines()[-1]))
    return out


def merge_summaries(summaries: list[dict]) -> dict:
    total: dict[str, dict[str, int]] = {}
    for s in summaries:
        for op, results in s.items():
            acc = total.setdefault(op, {})
            for k, v in results.items():
                acc[k] = acc.get(k, 0) + v
    return total


# ---- pytest fixtures -------------------------------------------------------------------

try:
    import pytest
except ImportError:                         # tools/torture may run without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(params=KINDS)
    def backing(request, tmp_path, world_tmp):
        """A mounted backing filesystem (ext4, xfs, btrfs, tmpfs) with an empty
        private area ``backing.private``; always unmounted and deleted after."""
        why = missing_tool(request.param)
        if why:
            if os.environ.get("CI"):
                pytest.fail(f"backing {request.param} is required in CI: {why}")
            pytest.skip(why)
        if os.geteuid() != 0:
            pytest.skip("backing filesystems need root")
        workdir = Path(tempfile.mkdtemp(prefix=f"img-{request.param}-", dir=tmp_path))
        b = make_backing(request.param, workdir, world_tmp / f"backing-{request.param}")
        try:
            yield b
        finally:
            b.destroy()

    def params(xfail: dict | None = None, only: tuple[str, ...] = KINDS):
        """Parameters for ``@pytest.mark.parametrize("backing", params(...),
        indirect=True)``: the backings in ``only``, with a strict xfail mark on
        the kinds named in ``xfail`` (kind -> reason) -- a known hole on some
        backings only; the mark must go once it is fixed.  A value
        ``(reason, False)`` makes the mark non-strict: only for a hole a random
        race shows in most runs but not all."""
        marks = {}
        for k, v in (xfail or {}).items():
            reason, strict = (v, True) if isinstance(v, str) else v
            marks[k] = [pytest.mark.xfail(strict=strict, reason=reason)]
        return [pytest.param(k, id=k, marks=marks.get(k, [])) for k in only]

    @dataclass
    class QuotaMount:
        backing: Backing
        private: Path
        root: Path
        mount: object               # conftest.SimMount
        qid: str

        def assert_exact(self, ugid: bool = True, timeout: float = 10.0) -> None:
            assert_usage_matches(self.private, self.qid, ugid, timeout)

        def live(self) -> Usage:
            return live(self.qid)

    @pytest.fixture
    def backing_quota(backing, mounter, world_tmp):
        """``backing_quota(B=..., I=..., ugid={uid_or_-gid: (bhard_k, ihard)})``:
        init a quota (1K blocks; 2nd level on) on ``backing.private``, mount it
        with simfs (dev,suid and ``opts``) at a fresh root (mode 1777) and
        return a ``QuotaMount``.  ``ugid`` keys are uids, or ``("g", gid)`` for groups."""
        from conftest import vzquota
        made = []

        def start(B: int = 1 << 20, I: int = 100000, ugid: dict | None = None,
                  ugid_limit: int = 64, qid: str = "101", opts: tuple = ()) -> QuotaMount:
            root = world_tmp / f"root{len(made)}"
            root.mkdir()
            vzquota("init", qid, "-p", str(backing.private), "-b", str(B), "-B", str(B),
                    "-i", str(I), "-I", str(I), "-e", "1d", "-n", "1d",
                    "-s", "1", "-u", str(ugid_limit))
            for key, (bh, ih) in (ugid or {}).items():
                if isinstance(key, tuple):
                    vzquota("setlimit2", qid, "-g", str(key[1]), str(bh), str(bh),
                            str(ih), str(ih))
                else:
                    vzquota("setlimit2", qid, "-u", str(key), str(bh), str(bh),
                            str(ih), str(ih))
            vzquota("on", qid)
            m = mounter(backing.private, root, "dev", "suid", f"quotaid={qid}", *opts)
            os.chmod(root, 0o1777)
            qm = QuotaMount(backing, backing.private, root, m, qid)
            made.append(qm)
            return qm
        return start
