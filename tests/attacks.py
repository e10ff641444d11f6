"""The attacks of issue 7 as reusable scenarios, each followed by the two
invariants (SPEC section 4); shared by ``tests/test_attacks.py`` and
``tools/torture``.

Role: ``Env`` owns one backing filesystem and the simfs mount of its private
area (quota id ``QID``); ``Env.quota(...)`` empties the private area, inits a
fresh quota and mounts it.  Each attack ``fn(env) -> str`` runs one repro of
issue 7 against that mount and returns what it saw (raising ``AssertionError``
when the daemon gave way).  ``run_attack(env, name)`` wraps an attack: a
``Sampler`` polls the live figures throughout (invariant (a): never over a hard
limit) and, once the attack is done and synced, the live usage must equal the
independent recount at both levels (invariant (b)).  The result row is what
``tools/torture`` prints.

Mounts: ``Env`` starts its simfs daemons itself (``mounts.SimMount``, ``-f``
children, logs in ``workdir``), stops them with ``umount`` and, in
``cleanup()``, clears whatever is left; a daemon log with a traceback or an
ERROR line is one of the problems ``run_attack`` reports (a daemon killed by a
request is a finding, not a broken teardown).  Other uids run stdlib snippets through the
system Python (``backing.user_python``).

Concurrency: the test (or torture) process drives everything; writers are
child processes; the sampler is one thread.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import backing as bk

K = 1024
MiB = 1 << 20
QID = "101"
UID, GID = 1000, 1000          # the container user of the single-user attacks


def vzq(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    import shutil
    import sys
    exe = os.path.join(os.path.dirname(sys.executable), "vzquota")
    if not os.path.exists(exe):
        exe = shutil.which("vzquota") or "vzquota"
    r = subprocess.run([exe, *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"vzquota {' '.join(args)} -> {r.returncode}: {r.stderr.strip()}")
    return r


def py_as(uid: int, gid: int, code: str, *args: str, timeout: float = 300) -> str:
    """Run a stdlib snippet as uid:gid; returns its stdout (raises on failure)."""
    r = subprocess.run([bk.user_python(), "-c", code, *args], user=uid, group=gid,
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"snippet as {uid} failed: {r.stderr.strip()[-1500:]}")
    return r.stdout


def daemon_pid(mount) -> int:
    return mount.proc.pid


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@dataclass
class Env:
    backing: bk.Backing
    workdir: Path                               # mount points and daemon logs go here
    mount: object = None                        # the current SimMount
    sampler: bk.Sampler | None = None           # paused while no mount runs
    root: Path | None = None
    n: int = 0
    mounts: list = field(default_factory=list)  # every SimMount started
    logs_seen: int = 0                          # mounts whose logs were checked

    def start_mount(self, private: Path, root: Path, *options: str):
        from mounts import SimMount
        m = SimMount(private, root, list(options), self.workdir / f"simfs{len(self.mounts)}.log")
        self.mounts.append(m)
        return m.start()

    def log_problems(self) -> list[str]:
        """Tracebacks / ERROR lines in the logs of the mounts since last asked."""
        out = []
        for m in self.mounts[self.logs_seen:]:
            text = m.logtext()
            if "Traceback" in text or " ERROR " in text:
                lines = text.splitlines()
                first = next((i for i, l in enumerate(lines)
                              if "Traceback" in l or " ERROR " in l), 0)
                tail = [l for l in lines[first:] if l.strip()][-3:]
                out.append(f"daemon log {m.log.name}: " + " | ".join(
                    [lines[first].strip()] + [l.strip() for l in tail]))
        self.logs_seen = len(self.mounts)
        return out

    def cleanup(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        for m in reversed(self.mounts):
            m.cleanup()

    @property
    def private(self) -> Path:
        return self.backing.private

    def stop(self) -> None:
        """Clean stop of the current mount (umount; the daemon must exit 0)."""
        if self.sampler is not None:
            self.sampler.pause()
        if self.mount is not None and self.mount.proc.poll() is None:
            rc = self.mount.umount()
            assert rc == 0, f"simfs exited {rc}:\n{self.mount.logtext()[-3000:]}"
        self.mount = None

    def quota(self, B: int, I: int, ugid: dict | None = None, keep: bool = False,
              ugid_limit: int = 64) -> "Env":
        """Empty the private area (unless ``keep``), init a quota (1K blocks,
        hard = soft), mount it; the root is mode 1777."""
        self.stop()
        if not keep:
            for e in os.listdir(self.private):
                subprocess.run(["rm", "-rf", "--one-file-system", str(self.private / e)],
                               check=True)
        vzq("init", QID, "-p", str(self.private), "-b", str(B), "-B", str(B),
            "-i", str(I), "-I", str(I), "-e", "1d", "-n", "1d", "-s", "1",
            "-u", str(ugid_limit))
        for key, (bh, ih) in (ugid or {}).items():
            kind, i = ("-g", key[1]) if isinstance(key, tuple) else ("-u", key)
            vzq("setlimit2", QID, kind, str(i), str(bh), str(bh), str(ih), str(ih))
        vzq("on", QID)
        return self.remount()

    def remount(self) -> "Env":
        self.n += 1
        self.root = self.workdir / f"root{self.n}"
        self.root.mkdir()
        self.mount = self.start_mount(self.private, self.root, "dev", "suid",
                                      f"quotaid={QID}")
        os.chmod(self.root, 0o1777)
        if self.sampler is not None:
            self.sampler.resume()
        return self

    def kill9(self) -> None:
        """A crash: SIGKILL the daemon and clear its dead mount."""
        if self.sampler is not None:
            self.sampler.pause()
        self.mount.kill()
        self.mount = None

    def userdir(self, name: str = "u", uid: int = UID, gid: int = GID) -> Path:
        d = self.root / name
        d.mkdir()
        os.chown(d, uid, gid)
        return d


# ---- the attacks ---------------------------------------------------------------------

REOPEN = r"""
import os, sys, errno
p, total = sys.argv[1], int(sys.argv[2])
os.close(os.open(p, os.O_WRONLY | os.O_CREAT, 0o644))
o = os.open(p, os.O_PATH)
if sys.argv[3] == "unlink":
    os.unlink(p)
else:
    q = p + ".other"
    os.close(os.open(q, os.O_WRONLY | os.O_CREAT, 0o644))
    os.rename(q, p)
w = os.open(f"/proc/self/fd/{o}", os.O_RDWR)
done, err = 0, "none"
while done < total:
    try:
        n = os.write(w, b"r" * (1 << 20))
    except OSError as e:
        err = errno.errorcode.get(e.errno, str(e.errno)); break
    done += n
print(done, err)
os.close(w); os.close(o)
"""


def attack_reopen_unlinked(env: Env) -> str:
    """Item 1: writes to a file reopened through /proc/self/fd after unlink
    (and after rename over it) must be charged and refused at the limit."""
    env.quota(B=12 * K, I=1000)
    d = env.userdir()
    out = []
    for how in ("unlink", "rename"):
        done, err = py_as(UID, GID, REOPEN, str(d / f"f-{how}"), str(100 * MiB), how).split()
        out.append(f"{how}: {int(done) // K} KiB written, then {err}")
        assert err == "EDQUOT" and int(done) <= 12 * MiB, \
            f"{how}: wrote {int(done) // K} KiB under a 12 MiB hard limit ({err})"
    return "; ".join(out)


LINKS = r"""
import os, sys, errno
d, n = sys.argv[1], int(sys.argv[2])
f = os.path.join(d, "target")
open(f, "wb").close()
made, err = 0, "none"
for i in range(n):
    try:
        os.link(f, os.path.join(d, "%06d-" % i + "n" * 240))
    except OSError as e:
        err = errno.errorcode.get(e.errno, str(e.errno)); break
    made += 1
print(made, err)
"""


def attack_hardlink_names(env: Env, links: int = 60_000) -> str:
    """Item 2: many hard links with long names in one directory: the
    directory's growth must be refused at the limit (1st and 2nd level)."""
    env.quota(B=1024, I=1000, ugid={UID: (512, 1000)})
    d = env.userdir()
    made, err = py_as(UID, GID, LINKS, str(d), str(links)).split()
    size = os.lstat(env.private / "u").st_blocks * 512
    # btrfs and tmpfs report no blocks for a directory: nothing to charge there
    assert err == "EDQUOT" or size <= 512 * K, \
        f"{made} links with long names, a {size // K} KiB directory and no EDQUOT ({err})"
    return f"{made} links, then {err}; directory {size // K} KiB"


class _Libc:
    lib = ctypes.CDLL(None, use_errno=True)
    lib.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                              ctypes.c_char_p, ctypes.c_uint]


RENAME_WHITEOUT = 4
AT_FDCWD = -100


def attack_whiteout(env: Env) -> str:
    """Item 3: renameat2(RENAME_WHITEOUT) leaves a whiteout (a 0:0 char
    device) that is an inode like any other: charged, and refused at the inode
    hard limit.  (Needs CAP_MKNOD: run as root, who is limited too.)"""
    env.quota(B=10 * K, I=6)          # root dir + 5
    base = bk.live(QID).inodes
    made = 0
    err = "none"
    for i in range(10):
        a = env.root / f"w{i}"
        try:
            a.write_bytes(b"")
        except OSError as e:
            err = errno.errorcode.get(e.errno, str(e.errno))
            break
        r = _Libc.lib.renameat2(AT_FDCWD, str(a).encode(), AT_FDCWD,
                                str(env.root / f"v{i}").encode(), RENAME_WHITEOUT)
        if r != 0:
            e = ctypes.get_errno()
            err = errno.errorcode.get(e, str(e))
            break
        made += 1
    inodes = bk.recount(env.private).inodes
    assert inodes <= 6, f"{inodes} inodes on disk under an inode hard limit of 6 " \
                        f"({made} whiteout renames, then {err})"
    assert err in ("EDQUOT", "EINVAL", "EPERM"), f"{made} whiteout renames, then {err}"
    return f"base {base} inodes, {made} whiteout renames, then {err}"


XATTRS = r"""
import os, sys, errno
d, n = sys.argv[1], int(sys.argv[2])
made, err = 0, "none"
for i in range(n):
    p = os.path.join(d, "x%d" % i)
    try:
        open(p, "wb").close()
        os.setxattr(p, "user.big", b"a" * 3500)
    except OSError as e:
        err = errno.errorcode.get(e.errno, str(e.errno)); break
    made += 1
print(made, err)
"""


def attack_xattr_blocks(env: Env) -> str:
    """Item 4: large xattrs allocate blocks (ext4, XFS): reserved and charged,
    and deleting the files afterwards does not take usage below reality."""
    env.quota(B=1024, I=2000)
    d = env.userdir()
    made, err = py_as(UID, GID, XATTRS, str(d), "500").split()
    diff = bk.wait_usage_matches(env.private, QID)
    assert not diff, f"after {made} xattrs ({err}): " + "; ".join(diff)
    subprocess.run(["rm", "-rf", str(d)], check=True)
    return f"{made} files with a 3.5 KB xattr, then {err}"


SPARSE = r"""
import os, sys, errno, json
d = sys.argv[1]
res = {}
data = [0]
def attempt(name, fn):
    try:
        fn(); res[name] = "ok"
    except OSError as e:
        res[name] = errno.errorcode.get(e.errno, str(e.errno))
# a sparse file: 4 KiB every 1 MiB, fsync after each (extent blocks, final metadata)
def sparse():
    fd = os.open(os.path.join(d, "sparse"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for i in range(400):
            data[0] += os.pwrite(fd, b"s" * 4096, i * (1 << 20) + (i % 7) * 8192)
            os.fsync(fd)
    finally:
        os.close(fd)
attempt("sparse", sparse)
# appends in small pieces with reopen between (XFS speculative preallocation)
def appends():
    for j in range(40):
        fd = os.open(os.path.join(d, "app%d" % (j % 4)), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for _ in range(16):
                data[0] += os.write(fd, b"a" * 8192)
        finally:
            os.close(fd)
attempt("appends", appends)
# preallocation (emulated by glibc when the filesystem has no fallocate)
def prealloc():
    fd = os.open(os.path.join(d, "pre"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, 2 << 20)
        data[0] += 2 << 20
    finally:
        os.close(fd)
attempt("prealloc", prealloc)
# then fill up to the limit: real data written when EDQUOT comes
def fill():
    fd = os.open(os.path.join(d, "fill"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        while True:
            data[0] += os.write(fd, b"f" * 65536)
    finally:
        os.close(fd)
attempt("fill", fill)
print(json.dumps({"res": res, "data": data[0]}))
"""


def attack_sparse_prealloc(env: Env) -> str:
    """Item 5: blocks the backing allocates after the daemon looked (extent
    blocks at writeback, the last metadata block at fsync, XFS speculative
    preallocation): settled usage == recount, never over the hard limit,
    EDQUOT only near the limit, nothing left charged for an empty tree."""
    env.quota(B=12 * K, I=1000)
    d = env.userdir()
    out = json.loads(py_as(UID, GID, SPARSE, str(d)))
    assert out["res"]["fill"] == "EDQUOT", out
    data = out["data"]
    diff = bk.wait_usage_matches(env.private, QID)
    assert not diff, f"{out}: " + "; ".join(diff)
    subprocess.run(["rm", "-rf", str(d)], check=True)
    diff = bk.wait_usage_matches(env.private, QID)
    assert not diff, "empty tree: " + "; ".join(diff)
    assert data >= 8 * MiB, f"EDQUOT at {data // K} KiB of file data under 12 MiB: {out}"
    return f"{out['res']}, EDQUOT at {data // K} KiB of data (12 MiB hard)"


def attack_root_reserve(env: Env) -> str:
    """Item 8: a container user stops at ENOSPC where the backing's f_bavail
    ends; it never writes into the blocks reserved for the host's root."""
    env.quota(B=1 << 30, I=100000)
    reserve = env.backing.reserve_bytes()
    env.stop()
    # fill the backing (as root, outside the private area) to 8 MiB above the reserve
    st = env.backing.statvfs()
    filler = env.backing.mnt / "filler"
    room = st.f_bavail * st.f_frsize - 8 * MiB
    if room > 0:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, room)
        finally:
            os.close(fd)
    try:
        env.quota(B=1 << 30, I=100000, keep=True)
        d = env.userdir()
        r = py_as(UID, GID, "import os,sys,errno\nfd=os.open(sys.argv[1],os.O_WRONLY|os.O_CREAT)\n"
                  "n=0\ntry:\n    while True: n+=os.write(fd,b'z'*65536)\n"
                  "except OSError as e: print(n, errno.errorcode[e.errno])\n", str(d / "z"))
        written, err = r.split()
        os.sync()
        st = env.backing.statvfs()
        left = st.f_bfree * st.f_frsize
        assert err in ("ENOSPC", "EDQUOT"), err
        assert left >= reserve - MiB, \
            f"the user wrote {int(written) // K} KiB into root's reserve: {left // K} KiB " \
            f"free of a {reserve // K} KiB reserve ({err})"
        os.unlink(d / "z")
    finally:
        env.stop()
        filler.unlink(missing_ok=True)
        env.remount()
    return f"reserve {reserve // K} KiB, user wrote {int(written) // K} KiB then {err}, " \
           f"{left // K} KiB left free"


def attack_big_dir(env: Env, entries: int = 100_000, handles: int = 300) -> str:
    """Items 9, 10: a directory of ``entries`` names; ``handles`` opendir
    handles and one ``ls -l`` must leave the daemon's memory and descriptors
    bounded, and the daemon (and its control channel) alive."""
    env.quota(B=1 << 30, I=10 * entries)
    env.stop()
    big = env.private / "big"
    big.mkdir()
    for i in range(entries):
        os.close(os.open(big / f"entry-{i:06d}", os.O_WRONLY | os.O_CREAT, 0o644))
    env.quota(B=1 << 30, I=10 * entries, keep=True)
    pid = daemon_pid(env.mount)
    rss0 = rss_kib(pid)
    fds = []
    try:
        for _ in range(handles):
            fd = os.open(env.root / "big", os.O_RDONLY | os.O_DIRECTORY)
            fds.append(fd)
            os.lseek(fd, 0, os.SEEK_SET)
        # read a little from each handle (getdents of the first block)
        for fd in fds:
            with os.scandir(fd) as it:
                next(it, None)
        rss1 = rss_kib(pid)
    finally:
        for fd in fds:
            os.close(fd)
    r = subprocess.run(["ls", "-l", str(env.root / "big")], capture_output=True)
    nfds = fd_count(pid)
    alive = bk.live_state(QID) is not None
    st = os.stat(env.root / "big")
    assert r.returncode == 0, r.stderr[-500:]
    assert alive and st.st_ino
    assert rss1 - rss0 < 128 * K, \
        f"{handles} opendir handles took the daemon from {rss0 // K} to {rss1 // K} MiB"
    # bounded by the daemon's LRU of O_PATH descriptors, not by the entries
    from simfs.config import DEFAULT
    bound = DEFAULT.cached_fds + 128
    assert entries > bound and nfds < bound, \
        f"after ls -l of {entries} entries the daemon holds {nfds} fds (bound {bound})"
    return f"{entries} entries: rss {rss0 // K}->{rss1 // K} MiB with {handles} handles, " \
           f"{nfds} fds after ls -l"


def attack_control(env: Env) -> str:
    """Item 11: malformed control requests (deep nesting, wrong types,
    negative limits, garbage, a huge line) never kill the daemon nor poison
    its state: it keeps answering, the limits stay, the file stays loadable."""
    env.quota(B=4096, I=1000)
    from vzquota import control
    before = bk.live_state(QID)
    bad = [b"[" * 100000 + b"\n",
           b'{"cmd": "setlimit", "limits": {"bhard": "x"}}\n',
           b'{"cmd": "setlimit", "limits": {"bhard": -5, "bsoft": -7}}\n',
           b'{"cmd": "setlimit", "limits": [1, 2]}\n',
           b'{"cmd": "setlimit2", "kind": "user", "ugid": -1, "limits": "z"}\n',
           b'{"cmd": 5}\n', b'"just a string"\n', b'\xff\xfe garbage\n', b"{}\n",
           b'{"cmd": "setlimit", "limits": {"isoft": 1e308}}\n',
           b"x" * (1 << 20) + b"\n"]
    answers = []
    for msg in bad:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect(control.socket_path(int(QID)))
            s.sendall(msg)
            s.shutdown(socket.SHUT_WR)
            buf = b""
            while True:
                c = s.recv(65536)
                if not c:
                    break
                buf += c
            answers.append(buf[:80])
        except OSError as e:
            answers.append(f"{type(e).__name__}".encode())
        finally:
            s.close()
        try:
            alive = control.request(int(QID), "ping", timeout=10) is not None
        except Exception:
            alive = False
        assert alive and env.mount.proc.poll() is None, \
            f"the daemon stopped answering after {msg[:40]!r}"
    after = bk.live_state(QID)
    assert after["level1"][0][1:3] == before["level1"][0][1:3], "limits changed"
    assert after["level1"][1][1:3] == before["level1"][1][1:3], "limits changed"
    (env.root / "still").write_bytes(b"ok")
    env.stop()
    r = vzq("show", QID, check=False)
    assert r.returncode == 0, f"show after malformed requests: {r.returncode} {r.stderr}"
    env.remount()
    return f"{len(bad)} malformed requests, daemon alive, limits kept, file loadable"


def attack_kill9(env: Env, seconds: float = 6.0, rounds: int = 2, seed: int = 7) -> str:
    """Random ``kill -9`` of the daemon while writers race, then a remount:
    the next mount recounts and the live usage equals the recount."""
    env.quota(B=12 * K, I=500, ugid=RACE_UGID)
    rnd = random.Random(seed)
    for r in range(rounds):
        if r:       # room for the next round: the last one's files go (as root)
            for e in os.listdir(env.root):
                subprocess.run(["rm", "-rf", str(env.root / e)], check=False)
        procs = start_racers(env, seconds)
        try:
            time.sleep(rnd.uniform(0.3, seconds * 0.8))       # a random instant
            env.kill9()
        finally:
            for p in procs:
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        env.remount()
        diff = bk.wait_usage_matches(env.private, QID)
        assert not diff, f"after kill -9 #{r + 1} and remount: " + "; ".join(diff)
    return f"{rounds} kill -9 + remount, recount matched each time"


RACERS = [(1001, 2001), (1002, 2001), (1003, 2002), (1004, 2002)] * 2
RACE_UGID = {1001: (4096, 150), 1002: (4096, 150), 1003: (4096, 150),
             1004: (4096, 150), ("g", 2002): (6144, 250)}


def start_racers(env: Env, seconds: float, ops: str = "all") -> list:
    procs: list = []
    try:
        for i, (uid, gid) in enumerate(RACERS):
            procs.append(bk.start_racer(env.root, uid, gid, seconds, seed=i + 100 * env.n,
                                        ops=ops))
    except BaseException:
        for p in procs:
            p.kill()
            p.wait()
        raise
    return procs


def attack_race(env: Env, seconds: float = 8.0, ops: str = "all") -> str:
    """Invariant (a) under load: 8 writers (4 uids, 2 gids) race at the 1st-
    and 2nd-level hard limits."""
    env.quota(B=12 * K, I=500, ugid=RACE_UGID)
    procs = start_racers(env, seconds, ops)
    try:
        summary = bk.merge_summaries(bk.finish_racers(procs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    refused = sum(r.get("EDQUOT", 0) for r in summary.values())
    ops_done = sum(sum(r.values()) for r in summary.values())
    assert refused, f"the writers never reached a limit: {summary}"
    return f"{ops_done} ops, {refused} EDQUOT"


ATTACKS: dict[str, Callable[[Env], str]] = {
    "reopen-unlinked": attack_reopen_unlinked,       # item 1
    "hardlink-names": attack_hardlink_names,         # item 2
    "whiteout": attack_whiteout,                     # item 3
    "xattr-blocks": attack_xattr_blocks,             # item 4
    "sparse-prealloc": attack_sparse_prealloc,       # item 5
    "root-reserve": attack_root_reserve,             # item 8
    "big-dir": attack_big_dir,                       # items 9, 10
    "control": attack_control,                       # item 11
    "race": attack_race,
    "kill9": attack_kill9,
}


@dataclass
class Result:
    attack: str
    ok: bool
    detail: str
    usage: str = ""            # live vs recount after the attack
    peak: str = ""             # max 1st-level space seen vs the hard limit
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


def run_attack(env: Env, name: str, **kw) -> Result:
    """Run one attack with the sampler on, then check both invariants."""
    t0 = time.monotonic()
    env.log_problems()                           # only this attack's logs count
    problems: list[str] = []
    detail = ""
    sampler = env.sampler = bk.Sampler(QID)
    sampler._go.clear()                          # resumed by the attack's first mount
    sampler.start()
    try:
        detail = ATTACKS[name](env, **kw)
    except AssertionError as e:
        problems.append(str(e))
    except Exception as e:                       # the attack itself broke: report it
        problems.append(f"{type(e).__name__}: {e}")
    finally:
        sampler.stop()
        env.sampler = None
    peak = ""
    if sampler is not None:
        for key in sorted({v.split(":")[0] for v in sampler.violations}):
            usage, hard = sampler.worst(key)
            problems.append(f"over the hard limit: {key} reached {usage} > {hard}")
        usage, hard = sampler.worst("level1 space")
        peak = f"{usage // K} / {hard // K} KiB"
        problems += [f"sampler: {e}" for e in sampler.errors[:3]]
    usage_txt = ""
    if env.mount is not None and env.mount.proc.poll() is None:
        try:
            diff = bk.wait_usage_matches(env.private, QID)
            lv = bk.live(QID)
            usage_txt = (f"{lv.space // K} KiB/{lv.inodes} ino "
                         + ("= recount" if not diff else "!= recount"))
            problems += diff
        except Exception as e:
            problems.append(f"recount: {type(e).__name__}: {e}")
    else:
        problems.append("the daemon is not running after the attack")
    problems += env.log_problems()
    return Result(name, not problems, detail or (problems[0] if problems else ""),
                  usage_txt, peak, problems, time.monotonic() - t0)
