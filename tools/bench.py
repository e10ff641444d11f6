#!/usr/bin/env python3
"""Benchmark: the same workloads natively, through simfs, and through simfs+quota.

Role: a developer tool, not part of the product.  Creates one temp dir under
/tmp (so every variant sits on the same backing filesystem) holding a native
work dir, and two private areas mounted with simfs: one plain, one with a quota
(generous limits, so nothing is refused).  Each workload runs on the three
targets back to back (interleaved, to spread drifting machine load evenly), then
a markdown table is printed with the figures and the slowdown ratios.

Run as root (mounting, drop_caches):

    .venv/bin/python tools/bench.py [--quick] [--size-mb N] [--tree DIR]

Cache state: "cold" rows run right after ``sync; echo 3 > drop_caches`` (the
page, dentry and inode caches, which for simfs also makes the kernel forget its
FUSE inodes); "warm" rows do not.  Without root's drop_caches everything is warm
and the table says so.  Numbers are noisy on a shared machine: load average is
printed at the start and at the end.

Cleanup: the simfs daemons run in the foreground (``-f``) as children in their
own session (a terminal Ctrl-C reaches only this script); ``finally`` unmounts
each root with ``umount`` and waits for its daemon (terminating only that pid if
it does not exit), turns the quota off, and removes the temp dir only when
nothing is mounted under it any more.  SIGTERM/SIGHUP are handled like Ctrl-C.
"""

from __future__ import annotations

import argparse
import mmap
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.path.insert(0, TOP)
from vzquota.scan import scan  # noqa: E402

BIN = os.path.dirname(sys.executable)
SIMFS = os.path.join(BIN, "simfs")
VZQUOTA = os.path.join(BIN, "vzquota")
MiB = 1 << 20
TARGETS = ("native", "simfs", "simfs+quota")


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---- small helpers -----------------------------------------------------------

def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a command; a non-zero exit is an error with its stderr."""
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {p.returncode}: "
                         f"{(p.stderr or p.stdout).strip()[:2000]}")
    return p


def short(e: BaseException) -> str:
    """A table-sized reason: the first error line, or the strerror."""
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    text = str(e)
    for line in text.splitlines()[1:] + text.splitlines()[:1]:
        if "Cannot open" in line or "Permission" in line or ": " in line:
            return line.rsplit(": ", 1)[-1][:60]
    return text[:60]


def timed_cmd(cmd: list[str]) -> float:
    t = time.perf_counter()
    run(cmd)
    return time.perf_counter() - t


def is_mountpoint(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def mounts_under(path: str) -> list[str]:
    real = os.path.realpath(path).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(real)]


CAN_DROP = os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_caches() -> None:
    os.sync()
    if CAN_DROP:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def cold() -> str:
    return "cold" if CAN_DROP else "warm"


def best(fn: Callable[[], object], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def fs_type(path: str) -> str:
    real = os.path.realpath(path)
    best_mp, best_line = "", ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            if (real == mp or real.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best_mp):
                best_mp, best_line = mp, line
    if not best_line:
        return "?"
    post = best_line.split(" - ", 1)[1].split()
    return f"{post[0]} ({post[1]} on {best_mp})"


def machine_info(base: str) -> list[str]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) // 1024} MiB"
    except (OSError, ValueError, IndexError):
        pass
    return [f"nproc: {os.cpu_count()}  (cpu: {cpu}; RAM {mem})",
            f"kernel: {platform.release()}",
            f"backing fs of {base}: {fs_type(base)}",
            f"python: {platform.python_version()} ({sys.executable})"]


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# ---- results -----------------------------------------------------------------

HIGHER_BETTER = {"MiB/s", "ops/s"}


@dataclass
class Row:
    name: str
    unit: str                     # "s", "µs/call", "MiB/s", "ops/s"
    values: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def fmt(self, target: str) -> str:
        if target in self.failed:
            return f"FAIL ({self.failed[target]})"
        v = self.values.get(target)
        if v is None:
            return "—"
        if self.unit == "s":
            return f"{v:.3f} s"
        if self.unit == "µs/call":
            return f"{v:.1f} µs"
        return f"{v:,.0f} {self.unit}"

    def slowdown(self, a: str, b: str) -> str:
        """How many times slower ``a`` is than ``b`` (>1 = slower)."""
        va, vb = self.values.get(a), self.values.get(b)
        if not va or not vb:
            return "—"
        r = vb / va if self.unit in HIGHER_BETTER else va / vb
        return f"{r:.2f}x"


class Results:
    def __init__(self):
        self.rows: list[Row] = []

    def row(self, name: str, unit: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        r = Row(name, unit)
        self.rows.append(r)
        return r

    def put(self, name: str, unit: str, target: str, value: float) -> None:
        r = self.row(name, unit)
        r.values[target] = value
        log(f"  {name:<44} {target:<12} {r.fmt(target)}")

    def fail(self, name: str, unit: str, target: str, why: str) -> None:
        """A workload step that failed on one target: shown as FAIL, run goes on."""
        r = self.row(name, unit)
        r.failed[target] = why
        log(f"  {name:<44} {target:<12} FAILED: {why}")

    def timed(self, name: str, unit: str, target: str, cmd: list[str]) -> None:
        try:
            self.put(name, unit, target, timed_cmd(cmd))
        except BenchError as e:
            self.fail(name, unit, target, short(e))

    def table(self) -> str:
        out = ["| workload | native | simfs | simfs+quota | ratio simfs/native "
               "| ratio quota/simfs |",
               "|---|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            out.append(f"| {r.name} | {r.fmt('native')} | {r.fmt('simfs')} | "
                       f"{r.fmt('simfs+quota')} | {r.slowdown('simfs', 'native')} | "
                       f"{r.slowdown('simfs+quota', 'simfs')} |")
        return "\n".join(out)


# ---- mounts --------------------------------------------------------------------

class Mount:
    """One simfs daemon in the foreground, in its own session."""

    def __init__(self, private: str, root: str, options: list[str], logfile: str):
        self.private, self.root, self.options, self.logfile = private, root, options, logfile
        self.proc: subprocess.Popen | None = None
        self.mounted = False

    def start(self, timeout: float = 60.0) -> None:
        cmd = [SIMFS, self.private, self.root, "-f"]
        if self.options:
            cmd += ["-o", ",".join(self.options)]
        with open(self.logfile, "ab") as lf:
            self.proc = subprocess.Popen(cmd, stdout=lf, stderr=lf, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while not is_mountpoint(self.root):
            if self.proc.poll() is not None:
                raise BenchError(f"simfs exited {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"simfs did not mount {self.root} in {timeout}s: {self.tail()}")
            time.sleep(0.01)
        self.mounted = True

    def tail(self) -> str:
        try:
            with open(self.logfile, errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """umount (a few tries, then lazily), then wait for our daemon."""
        if self.proc is None:
            return
        if not self.mounted and self.proc.poll() is None:
            # Interrupted while mounting: SIGTERM is simfs's clean stop too.
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        for attempt in range(10):
            if not is_mountpoint(self.root):
                break
            p = subprocess.run(["umount", self.root], capture_output=True, text=True)
            if p.returncode == 0:
                break
            log(f"umount {self.root} failed ({p.stderr.strip()}), retrying")
            time.sleep(0.5)
        else:
            log(f"lazy umount of {self.root}")
            subprocess.run(["umount", "-l", self.root], capture_output=True)
        try:
            rc = self.proc.wait(30)
            if rc != 0:
                log(f"simfs for {self.root} exited {rc}: {self.tail()}")
        except subprocess.TimeoutExpired:
            log(f"simfs pid {self.proc.pid} did not exit; terminating it")
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


# ---- workloads -------------------------------------------------------------------

def aligned(n: int, fill: bool = False) -> mmap.mmap:
    """A page-aligned buffer: a bytearray from malloc is 16 bytes off a page,
    which makes the kernel's copy to/from it 3-5x slower here (AMD EPYC)."""
    m = mmap.mmap(-1, n)
    if fill:
        m.write(os.urandom(n))
    return m


def wl_seq(res: Results, target: str, d: str, size: int, bs: int) -> None:
    path = os.path.join(d, "seq.dat")
    buf = aligned(bs, fill=True)
    drop_caches()
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left > 0:
            n = os.write(fd, buf if left >= bs else memoryview(buf)[:left])
            left -= n
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t
    res.put(f"seq write {size // MiB} MiB + fsync ({bs // 1024} KiB writes)", "MiB/s",
            target, size / MiB / dt)

    for state in (cold(), "warm") if CAN_DROP else ("warm",):
        if state == "cold":
            drop_caches()
        rbuf = aligned(bs)
        total = 0
        t = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        try:
            while True:
                n = os.readv(fd, [rbuf])
                if not n:
                    break
                total += n
        finally:
            os.close(fd)
        dt = time.perf_counter() - t
        if total != size:
            raise BenchError(f"read {total} bytes of {path}, expected {size}")
        res.put(f"seq read {size // MiB} MiB ({state}, {bs // 1024} KiB reads)", "MiB/s",
                target, size / MiB / dt)
    os.unlink(path)


def wl_random(res: Results, target: str, d: str, fsize: int, nops: int) -> None:
    path = os.path.join(d, "rand.dat")
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(fsize // MiB):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    rng = random.Random(4242)
    pages = fsize // 4096
    offs = [rng.randrange(pages) * 4096 for _ in range(nops)]
    block = aligned(4096, fill=True)
    rbuf = [aligned(4096)]

    drop_caches()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        t = time.perf_counter()
        for off in offs:
            if os.preadv(fd, rbuf, off) != 4096:
                raise BenchError("short random read")
        dt = time.perf_counter() - t
    finally:
        os.close(fd)
    res.put(f"4 KiB random read, {fsize // MiB} MiB file ({cold()}, FADV_RANDOM)", "ops/s",
            target, nops / dt)

    fd = os.open(path, os.O_WRONLY)
    try:
        t = time.perf_counter()
        for off in offs:
            if os.pwritev(fd, [block], off) != 4096:
                raise BenchError("short random write")
        os.fsync(fd)
        dt = time.perf_counter() - t
    finally:
        os.close(fd)
    res.put(f"4 KiB random write, {fsize // MiB} MiB file (+ final fsync)", "ops/s",
            target, nops / dt)
    os.unlink(path)


def wl_files(res: Results, target: str, d: str, nfiles: int) -> None:
    top = os.path.join(d, "small")
    os.mkdir(top)
    names = [os.path.join(top, f"f{i:06d}") for i in range(nfiles)]
    data = b"x" * 100
    t = time.perf_counter()
    for p in names:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
    res.put(f"create {nfiles} files (100 B each)", "s", target, time.perf_counter() - t)
    drop_caches()
    t = time.perf_counter()
    for p in names:
        os.stat(p)
    res.put(f"stat {nfiles} files ({cold()})", "s", target, time.perf_counter() - t)
    t = time.perf_counter()
    for p in names:
        os.unlink(p)
    res.put(f"delete {nfiles} files", "s", target, time.perf_counter() - t)
    os.rmdir(top)


def wl_tree(res: Results, target: str, d: str, tree: str, label: str) -> tuple[int, int]:
    dst = os.path.join(d, "tree")
    # Warm the source so that cp -a measures the destination side.
    run(["bash", "-o", "pipefail", "-c", 'tar -cf - -C "$1" . | cat >/dev/null', "_", tree])
    res.put(f"cp -a {label}", "s", target, timed_cmd(["cp", "-a", tree, dst]))
    drop_caches()
    res.timed(f"du -s ({cold()})", "s", target, ["du", "-s", dst])
    drop_caches()
    res.timed(f"tar -cf /dev/null ({cold()}; GNU tar skips file data)", "s", target,
              ["tar", "-cf", "/dev/null", "-C", d, "tree"])
    drop_caches()
    res.timed(f"tar -cf - \\| cat >/dev/null ({cold()}; reads data)", "s", target,
              ["bash", "-o", "pipefail", "-c", 'tar -cf - -C "$1" tree | cat >/dev/null',
               "_", d])
    drop_caches()
    res.timed(f"find -type f -exec cat ({cold()}; reads data)", "s", target,
              ["bash", "-o", "pipefail", "-c",
               'find "$1" -type f -exec cat {} + >/dev/null', "_", dst])
    # scanner vs du, warm, best of 3 (both warmed by one untimed run)
    run(["du", "-s", dst])
    r = scan(dst)
    res.put("du -s (warm, best of 3)", "s", target, best(lambda: run(["du", "-s", dst])))
    res.put("vzquota scan (warm, best of 3)", "s", target, best(lambda: scan(dst)))
    res.put("rm -r tree", "s", target, timed_cmd(["rm", "-r", dst]))
    return r.space, r.inodes


def wl_statfs(res: Results, target: str, d: str, n: int) -> None:
    os.statvfs(d)
    t = time.perf_counter()
    for _ in range(n):
        os.statvfs(d)
    res.put(f"statfs latency ({n} calls)", "µs/call", target,
            (time.perf_counter() - t) / n * 1e6)


# ---- main ------------------------------------------------------------------------

def default_tree() -> str:
    for cand in ("/usr/lib/python3.11", sysconfig.get_paths()["stdlib"]):
        if os.path.isdir(cand):
            return cand
    raise BenchError("no Python standard library directory found; use --tree")


def tree_stats(tree: str) -> tuple[int, int]:
    files = 0
    size = 0
    for _, dirs, fnames in os.walk(tree):
        files += len(dirs) + len(fnames)
    size = int(run(["du", "-s", "--block-size=1", tree]).stdout.split()[0])
    return files, size


def empty_dir(d: str) -> None:
    for name in os.listdir(d):
        p = os.path.join(d, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.unlink(p)
            except OSError:
                pass


def on_signal(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, a ~30 s smoke run")
    ap.add_argument("--size-mb", type=int, help="sequential file size (default 512, quick 32)")
    ap.add_argument("--bs-kb", type=int, default=1024, help="sequential I/O size (KiB)")
    ap.add_argument("--rand-mb", type=int, help="random I/O file size (default 64, quick 16)")
    ap.add_argument("--rand-ops", type=int, help="random reads and writes (default 8192, quick 1000)")
    ap.add_argument("--files", type=int, help="small files (default 5000, quick 500)")
    ap.add_argument("--statfs", type=int, help="statfs calls (default 20000, quick 2000)")
    ap.add_argument("--tree", help="tree to copy (default /usr/lib/python3.11 or the stdlib)")
    ap.add_argument("--tmp", default="/tmp", help="where to make the temp dir (default /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    a = ap.parse_args()
    q = a.quick
    size = (a.size_mb or (32 if q else 512)) * MiB
    bs = a.bs_kb * 1024
    rand_size = (a.rand_mb or (16 if q else 64)) * MiB
    rand_ops = a.rand_ops or (1000 if q else 8192)
    nfiles = a.files or (500 if q else 5000)
    nstatfs = a.statfs or (2000 if q else 20000)
    tree = a.tree or default_tree()
    if q and not a.tree:
        tree = os.path.join(tree, "email")      # a small subtree for the smoke run

    if os.geteuid() != 0:
        log("must run as root (mounting simfs)")
        return 2
    for b in (SIMFS, VZQUOTA):
        if not os.access(b, os.X_OK):
            log(f"{b} is missing (run tools/setup.sh)")
            return 2
    if not os.path.exists("/dev/fuse"):
        log("/dev/fuse is missing")
        return 2

    signal.signal(signal.SIGINT, signal.default_int_handler)   # even if inherited ignored
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    base = tempfile.mkdtemp(prefix="simfs-bench-", dir=a.tmp)
    os.chmod(base, 0o755)
    os.environ["VZQUOTA_DIR"] = os.path.join(base, "vzquota")
    os.environ["VZQUOTA_RUNDIR"] = os.path.join(base, "run")
    qid = 900000 + os.getpid() % 100000
    dirs = {"native": os.path.join(base, "native"),
            "simfs": os.path.join(base, "root-plain"),
            "simfs+quota": os.path.join(base, "root-quota")}
    priv_plain = os.path.join(base, "private-plain")
    priv_quota = os.path.join(base, "private-quota")
    for p in (*dirs.values(), priv_plain, priv_quota, os.environ["VZQUOTA_DIR"]):
        os.mkdir(p)
    mounts: list[Mount] = []
    quota_on = False
    res = Results()
    info = machine_info(base)
    load0 = loadavg()
    ok = False
    interrupted = False
    t_start = time.monotonic()
    try:
        log(f"temp dir {base}; tree {tree}; drop_caches {'yes' if CAN_DROP else 'NO'}")
        m = Mount(priv_plain, dirs["simfs"], [], os.path.join(base, "simfs-plain.log"))
        mounts.append(m)
        m.start()
        run([VZQUOTA, "init", str(qid), "-p", priv_quota, "-b", "1T", "-B", "1T",
             "-i", "100000000", "-I", "100000000", "-e", "7d", "-n", "7d"])
        run([VZQUOTA, "on", str(qid)])
        quota_on = True
        m = Mount(priv_quota, dirs["simfs+quota"], [f"quotaid={qid}"],
                  os.path.join(base, "simfs-quota.log"))
        mounts.append(m)
        m.start()
        run([VZQUOTA, "stat", str(qid)])          # accounting must be live

        ntree, tsize = tree_stats(tree)
        label = f"{tree} ({ntree} entries, {tsize / MiB:.0f} MiB)"

        def each(what: str, fn: Callable[[str], object]) -> dict[str, object]:
            """Run one workload on every target; a failure is noted, not fatal."""
            log(what)
            out = {}
            for t in TARGETS:
                try:
                    out[t] = fn(t)
                except (BenchError, OSError) as e:
                    res.fail(f"{what} (aborted)", "s", t, short(e))
                    empty_dir(dirs[t])
            return out

        each("sequential I/O", lambda t: wl_seq(res, t, dirs[t], size, bs))
        each("random I/O", lambda t: wl_random(res, t, dirs[t], rand_size, rand_ops))
        each("small files", lambda t: wl_files(res, t, dirs[t], nfiles))
        scans = each("tree copy / du / tar / scan / rm",
                     lambda t: wl_tree(res, t, dirs[t], tree, label))
        if len(set(scans.values())) > 1:
            log(f"WARNING: scan results differ between targets: {scans}")
        each("statfs", lambda t: wl_statfs(res, t, dirs[t], nstatfs))
        quota_usage = run([VZQUOTA, "stat", str(qid)]).stdout
        ok = True
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; cleaning up")
    except BenchError as e:
        log(f"error: {e}")
    finally:
        for m in reversed(mounts):
            try:
                m.stop()
            except Exception as e:        # keep cleaning up the others
                log(f"stopping {m.root}: {e}")
        if quota_on:
            p = subprocess.run([VZQUOTA, "off", str(qid)], capture_output=True, text=True)
            if p.returncode not in (0, 6):
                log(f"vzquota off {qid} exited {p.returncode}: {p.stderr.strip()}")
        left = mounts_under(base)
        if left:
            log(f"NOT removing {base}: still mounted: {left}")
        elif a.keep or (not ok and not interrupted):
            if not a.keep:                # keep the logs, drop the data
                for p in (dirs["native"], priv_plain, priv_quota):
                    shutil.rmtree(p, ignore_errors=True)
            log(f"kept {base} (logs: simfs-*.log)")
        else:
            shutil.rmtree(base, ignore_errors=True)

    if not ok:
        if res.rows:
            print(res.table())
        return 130 if interrupted else 1
    print(f"## simfs benchmark ({'quick' if q else 'full'} run, "
          f"{time.monotonic() - t_start:.0f} s)\n")
    print(res.table())
    print()
    print("Ratios are slowdown factors (>1 = slower; for MiB/s and ops/s, the inverse "
          "ratio of the throughputs).")
    print(f"cold = after sync + drop_caches (page, dentry and inode caches); "
          f"warm = no drop.  {'' if CAN_DROP else 'drop_caches was NOT possible: all warm. '}"
          "Each workload runs native, simfs, simfs+quota back to back.")
    print(f"Quota: id {qid}, limits 1T blocks / 1e8 inodes (never reached); "
          f"vzquota stat at the end:\n```\n{quota_usage.rstrip()}\n```")
    print("\nMachine:")
    for line in info:
        print(f"- {line}")
    print(f"- load average at start: {load0}; at end: {loadavg()} "
          "(other jobs may share the machine: numbers are noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
