#!/usr/bin/env python3
"""Benchmark: simfs against libfuse's C passthrough, native, and any other mount.

Role: a developer tool, not part of the product; the judge of issue 8.  One run
makes one temp dir under /tmp (every target sits on the same backing
filesystem) and mounts there:

* ``C-ll``: libfuse's low-level C passthrough ``passthrough_ll``, compiled at
  bench time from ``/usr/share/doc/libfuse3-dev/examples/passthrough_ll.c``
  into the temp dir (never kept), mounted with
  ``-o cache=always,timeout=10,no_writeback,xattr``: the same "kernel caches
  metadata, no write-back cache" semantics simfs keeps.  Ratios are to it.
* ``native``: a plain directory of the backing filesystem.
* ``simfs``: simfs with the quota off.
* ``simfs+quota``: simfs with both quota levels on (generous limits, so
  nothing is refused; the 2nd level follows uid/gid 0).
* ``simfs+pt``: the same quota, mounted ``-o passthrough``: files opened
  read-only are read by the kernel from the backing file (no READ request);
  ``--no-pt`` leaves it out.  The columns "pt / native" and "pt / daemon" are
  its figure against native's and against simfs+quota's (reads through the
  daemon).
* any ``--extra 'NAME=command {src} {mnt}'``: a mount command run in the
  foreground (``{src}`` is an empty source dir, ``{mnt}`` the mount point),
  e.g. simfs under another event loop:
  ``--extra 'trio=simfs {src} {mnt} -f -o loop=trio'``.

Each workload runs ``--rounds`` times (default 3); within a round it runs on
every target back to back, in an order rotated each round (interleaved, so a
load that drifts spreads evenly); the table shows the median per target.  For
each timed section the daemon's CPU time (utime+stime of its process tree,
from /proc) and, for simfs, the FUSE requests it answered (its
``trusted.simfs.requests`` counts) are recorded, so the second table shows
requests per operation and CPU per request.

Run as root (mounting, drop_caches):

    .venv/bin/python tools/bench.py [--quick] [--rounds N] [--only ROW,...]
                                    [--extra NAME=CMD ...]

The ``kernel`` workload has the rows of what the kernel offers through the
quota (issue 17): 4 KiB random reads of a hot file, a small page opened, read
and closed (a web server's request), the page cache grown per byte read cold,
of a large file and of small ones (``--files``/5 of 16 KiB, under
passthrough_min: read through the FUSE page cache on a default mount) ("x": KiB
grown / KiB read, lower is better; the files' own pages, by cachestat(2), the
mount's copy and the backing file's: 2x where both stay), fallocate and punch,
and copy_file_range.

The ``writes`` workload counts the FUSE requests per ``pwrite(2)`` of 4 KiB
(simfs: its own counts; another FUSE mount: the kernel's
``fuse:fuse_request_send`` tracepoint on its connection; the goal is 1).  The
``web`` workload is tools/webbench's fleet (loaded as a module, as webbench loads
tools/density), once per round: native, passthrough_ll, simfs+quota, simfs+pt,
requests/min against native (goal >= 0.95x), the quotas checked exact.

``--image MIB`` runs everything on a fresh journaled ext4 in a loop image: on an
ext4 without a journal (this machine's /) every create looks up each inode freed
in the last minutes (``recently_deleted``), which the rows before and other jobs
decide, natively and in every daemon alike.

Cache state: "cold" rows run right after ``sync; echo 3 > drop_caches`` (for a
FUSE mount that also makes the kernel forget its inodes); "warm" rows do not.
Numbers are noisy on a shared machine: the load average is printed at the start
and the end.

Cleanup: the daemons run in the foreground as children in their own session (a
terminal Ctrl-C reaches only this script); ``finally`` unmounts each mount point
with ``umount`` and waits for its daemon (terminating only that pid if it does
not exit), turns the quota off, and removes the temp dir only when nothing is
mounted under it any more.  SIGTERM/SIGHUP are handled like Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import mmap
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)

BIN = os.path.dirname(sys.executable)
SIMFS = os.path.join(BIN, "simfs")
VZQUOTA = os.path.join(BIN, "vzquota")
PASSTHROUGH_LL = "/usr/share/doc/libfuse3-dev/examples/passthrough_ll.c"
C_OPTIONS = "cache=always,timeout=10,no_writeback,xattr"
COUNTS_XATTR = "trusted.simfs.requests"
MiB = 1 << 20
REF = "C-ll"
PT = "simfs+pt"


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


TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of ``pid`` and its descendants."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICK
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError, IndexError):
            pass
    return total


# ---- targets -----------------------------------------------------------------

class Target:
    """Where a workload runs: a native dir, or a mount served by a daemon."""

    def __init__(self, name: str, work: str, cmd: list[str] | None = None,
                 logfile: str | None = None, src: str | None = None):
        self.name, self.work, self.cmd, self.logfile = name, work, cmd, logfile
        self.src = src            # the backing directory a mount serves (None: native)
        self.root = work
        self.proc: subprocess.Popen | None = None
        self.mounted = False
        self.has_counts = False

    # metering
    def cpu(self) -> float | None:
        if self.proc is None or self.proc.poll() is not None:
            return None
        return tree_cpu(self.proc.pid)

    def counts(self) -> dict[str, int] | None:
        if not self.has_counts:
            return None
        try:
            return json.loads(os.getxattr(self.root, COUNTS_XATTR))
        except (OSError, ValueError):
            return None

    # life
    def start(self, timeout: float = 60.0) -> None:
        if self.cmd is None:
            return
        with open(self.logfile, "ab") as lf:
            self.proc = subprocess.Popen(self.cmd, stdout=lf, stderr=lf,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not is_mountpoint(self.root):
            if self.proc.poll() is not None and self.proc.returncode != 0:
                raise BenchError(f"{self.name} exited {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} did not mount {self.root} in {timeout}s: "
                                 f"{self.tail()}")
            time.sleep(0.01)
        self.mounted = True
        try:
            json.loads(os.getxattr(self.root, COUNTS_XATTR))
            self.has_counts = True
        except (OSError, ValueError):
            pass

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
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        for _ in range(10):
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
                log(f"{self.name} exited {rc}: {self.tail()}")
        except subprocess.TimeoutExpired:
            log(f"{self.name} pid {self.proc.pid} did not exit; terminating it")
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


# ---- results -----------------------------------------------------------------

LOWER = ("s", "µs", "x", "requests")      # units where lower is better


@dataclass
class Row:
    name: str
    unit: str            # "ops/s", "MiB/s", "MB/s": higher is better; "s", "µs": lower
    goal: str            # e.g. ">=0.6", "<=1.3"
    ops: str             # what one "op" is for the per-op columns
    values: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)      # seconds per op
    reqs: dict[str, list[dict]] = field(default_factory=dict)      # requests per section
    nops: dict[str, list[float]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)   # why a target has no figure
    ref: str = REF       # the goal's reference: C-ll, or "native" (the web row)
    absolute: bool = False   # the goal is simfs+quota's own figure (requests per write)

    def median(self, target: str) -> float | None:
        v = self.values.get(target)
        return statistics.median(v) if v else None

    def fmt(self, target: str) -> str:
        if target in self.failed:
            return f"FAIL ({self.failed[target]})"
        v = self.median(target)
        if v is None:
            return f"— ({self.notes[target]})" if target in self.notes else "—"
        if self.unit == "requests":
            return f"{v:.2f}"
        if self.unit == "s":
            return f"{v:.2f} s"
        if self.unit == "µs":
            return f"{v:.1f} µs"
        if self.unit == "x":
            return f"{v:.2f}x"
        return f"{v:,.0f}"

    def ratio(self, target: str, ref: str = REF) -> float | None:
        a, b = self.median(target), self.median(ref)
        return a / b if a and b else None

    def speed(self, target: str, ref: str) -> str:
        """How ``target`` does against ``ref``: > 1 is better, whatever the unit."""
        a, b = self.median(target), self.median(ref)
        if not a or not b:
            return "—"
        return f"{(b / a if self.unit in LOWER else a / b):.2f}x"

    def meets(self, r: float | None) -> str:
        if r is None:
            return ""
        op, lim = self.goal[:2], float(self.goal[2:])
        return " ✓" if (r >= lim if op == ">=" else r <= lim) else " ✗"

    def quota_cost(self) -> float | None:
        """How many times slower quota on is than quota off (>1 = slower)."""
        a, b = self.median("simfs+quota"), self.median("simfs")
        if self.unit == "x":
            return None
        if not a or not b:
            return None
        return a / b if self.unit in LOWER else b / a

    def per_op_requests(self, target: str) -> tuple[float, str] | None:
        samples = self.reqs.get(target)
        if not samples:
            return None
        total: dict[str, float] = {}
        n = sum(self.nops[target])
        for d in samples:
            for k, v in d.items():
                total[k] = total.get(k, 0) + v
        allreq = sum(total.values())
        top = sorted(total.items(), key=lambda kv: -kv[1])[:4]
        detail = " ".join(f"{k} {v / n:.2g}" for k, v in top if v / n >= 0.01)
        return allreq / n, detail


class Results:
    def __init__(self, targets: list[str]):
        self.targets = targets
        self.rows: dict[str, Row] = {}
        self.perf: Profiler | None = None
        # (row, target) -> the profile of its first round (``--perf``)
        self.profiles: dict[tuple[str, str], Profile] = {}

    def row(self, name: str, unit: str, goal: str, ops: str) -> Row:
        r = self.rows.get(name)
        if r is None:
            r = self.rows[name] = Row(name, unit, goal, ops)
        return r

    def fail(self, name: str, target: str, why: str) -> None:
        r = self.rows.get(name) or self.row(name, "s", "<=0", "op")
        r.failed[target] = why
        log(f"  {name:<46} {target:<12} FAILED: {why}")

    def table(self) -> str:
        cols = [t for t in [REF] + [t for t in self.targets if t != REF] if t in self.targets]
        pt = PT in self.targets
        out = ["| workload | unit | " + " | ".join(cols) +
               " | simfs+quota / C | goal | quota on/off |"
               + (" pt / native | pt / daemon |" if pt else ""),
               "|---|---|" + "---:|" * len(cols) + "---:|---|---:|" + ("---:|---:|" if pt else "")]
        for r in self.rows.values():
            ratio = None if r.unit == "x" else r.ratio("simfs+quota", r.ref)
            qc = r.quota_cost()
            goal = f"{r.goal[:2].replace('>=', '≥ ').replace('<=', '≤ ')}{r.goal[2:]}"
            if r.absolute:            # the goal is simfs+quota's own figure, as shown
                v = r.median("simfs+quota")
                cell = "—" if ratio is None else f"{ratio:.2f}x"
                goal += f" {r.unit}{r.meets(None if v is None else round(v, 2))}"
            else:
                cell = ("—" if ratio is None else f"{ratio:.2f}x") + r.meets(ratio)
                goal += "x" + ("" if r.ref == REF else f" {r.ref}")
                if r.ref != REF and ratio is not None:
                    cell += f" (of {r.ref})"
            out.append(f"| {r.name} | {r.unit} | " + " | ".join(r.fmt(t) for t in cols) +
                       f" | {cell} | {goal} | {'—' if qc is None else f'{qc:.2f}x'} |"
                       + (f" {r.speed(PT, 'native')} | {r.speed(PT, 'simfs+quota')} |"
                          if pt else ""))
        return "\n".join(out)

    def cost_table(self) -> str:
        cols = [t for t in self.targets if t != "native"]
        out = ["| workload (per op) | " + " | ".join(f"{t} CPU µs" for t in cols) +
               " | " + " | ".join(f"{t} req/op" for t in cols if t.startswith("simfs")) +
               " | simfs+quota µs/req | requests per op (simfs+quota) |",
               "|---|" + "---:|" * len(cols) +
               "---:|" * len([t for t in cols if t.startswith("simfs")]) + "---:|---|"]
        for r in self.rows.values():
            cells = []
            for t in cols:
                c = r.cpu.get(t)
                cells.append(f"{statistics.median(c) * 1e6:,.1f}" if c else "—")
            for t in cols:
                if t.startswith("simfs"):
                    q = r.per_op_requests(t)
                    cells.append(f"{q[0]:.2f}" if q else "—")
            q = r.per_op_requests("simfs+quota")
            c = r.cpu.get("simfs+quota")
            per_req = (f"{statistics.median(c) * 1e6 / q[0]:.1f}"
                       if q and c and q[0] else "—")
            out.append(f"| {r.name} ({r.ops}) | " + " | ".join(cells) +
                       f" | {per_req} | {q[1] if q else '—'} |")
        return "\n".join(out)


    def profile_table(self) -> str:
        out = ["| workload | target | daemon samples | Python | kernel | libc | libfuse "
               "| other | top symbols (self, % of the daemon's samples) |",
               "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for (row, target), p in self.profiles.items():
            out.append(f"| {row} | {target} | {p.samples:,} | " +
                       " | ".join(f"{p.share.get(k, 0.0):.0f}%" for k in PROFILE_KINDS) +
                       " | " + ", ".join(f"{sym} {pct:.0f}%" for sym, pct in p.top) + " |")
        return "\n".join(out)


@dataclass
class Profile:
    samples: int
    share: dict[str, float]               # PROFILE_KINDS -> % of the daemon's samples
    top: list[tuple[str, float]]          # its heaviest symbols (self)


PROFILE_KINDS = ("python", "kernel", "libc", "libfuse", "other")


class Profiler:
    """``--perf``: samples the whole machine (``perf record -a``, or the one
    ``--cpu``) during each section of the chosen targets' first round and
    keeps what the target's daemon (every thread of its process) spent its
    samples in: the Python interpreter (libpython and extension modules),
    the kernel, libc, libfuse, the rest; and its heaviest symbols.  perf
    costs every target it watches, so a run with ``--perf`` gives profiles,
    not figures for the table."""

    def __init__(self, targets: set[str], cpu: int | None, where: str):
        self.targets, self.cpu, self.where = targets, cpu, where
        self.n = 0

    def start(self) -> tuple[subprocess.Popen, str]:
        self.n += 1
        path = os.path.join(self.where, f"perf-{self.n}.data")
        cmd = ["perf", "record", "-q", "-F", "2000", "-o", path]
        cmd += ["-C", str(self.cpu)] if self.cpu is not None else ["-a"]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        time.sleep(0.5)                   # perf's buffers mapped, counters on
        return p, path

    @staticmethod
    def _halt(p: subprocess.Popen) -> None:
        """perf writes its samples out on SIGINT; killed after 60 s."""
        p.send_signal(signal.SIGINT)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    @staticmethod
    def abort(p: subprocess.Popen, path: str) -> None:
        """The section failed: stop perf and drop its samples (a perf left
        running would hold the temp dir's filesystem, and the run's clean-up
        could not unmount it)."""
        Profiler._halt(p)
        with contextlib.suppress(OSError):
            os.unlink(path)

    @staticmethod
    def stop(p: subprocess.Popen, path: str, pid: int | list[int]) -> Profile | None:
        """``pid``: the daemon, or all the daemons of a row (the web fleet's)."""
        tids: set[int] = set()
        for one in ([pid] if isinstance(pid, int) else pid):
            try:
                tids |= {int(t) for t in os.listdir(f"/proc/{one}/task")}
            except OSError:
                tids.add(one)
        Profiler._halt(p)
        try:
            def report(key: str) -> list[tuple[int, str]]:
                """(samples, key) of the daemon's threads, heaviest first."""
                out = subprocess.run(
                    ["perf", "report", "-i", path, "--stdio", "-q", "-g", "none",
                     "-F", f"sample,pid,{key}", "-t", ";"],
                    capture_output=True, text=True, timeout=120).stdout
                got: dict[str, int] = {}
                for line in out.splitlines():
                    # "  47 ;  27037:quota 4 ;[.] sym": a comm may hold spaces
                    f = line.split(";", 2)
                    m = re.match(r"\s*(\d+)\s*$", f[0]) if len(f) == 3 else None
                    t = re.match(r"\s*(\d+):", f[1]) if m else None
                    if m and t and int(t.group(1)) in tids and f[2].strip():
                        k = f[2].strip()
                        got[k] = got.get(k, 0) + int(m.group(1))
                return sorted(((n, k) for k, n in got.items()), reverse=True)
            dsos = report("dso")
            syms = report("sym")
        except (OSError, subprocess.TimeoutExpired):
            return None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
        samples = sum(n for n, _ in dsos)
        if not samples:
            return Profile(0, {}, [])
        share = dict.fromkeys(PROFILE_KINDS, 0.0)
        for n, dso in dsos:
            kind = ("kernel" if "kernel" in dso else
                    "python" if "python" in dso or ".cpython-" in dso or dso.startswith(
                        ("_", "libffi")) else
                    "libc" if dso.startswith(("libc.", "libc-", "ld-linux")) else
                    "libfuse" if "libfuse" in dso else "other")
            share[kind] += 100.0 * n / samples
        top = [(re.sub(r"^\[[k.]\]\s+", "", sym)[:40], 100.0 * n / samples)
               for n, sym in syms[:6]]
        return Profile(samples, share, top)


class Meter:
    """Times one section of a workload on one target, with the daemon's CPU
    and request counts over the same section."""

    def __init__(self, res: Results, target: Target):
        self.res, self.t = res, target

    @contextlib.contextmanager
    def section(self, name: str, unit: str, goal: str, work: float, nops: float,
                ops: str = "op", quiet: bool = False) -> Iterator[dict]:
        """``work``: amount for the rate (ops, MiB) or the count for "µs"; ``nops``:
        operations, for CPU and requests per op.  The section may put its own
        figure in the dict it is given (``value``, in ``unit``) in place of
        the one from its time (dbench's throughput)."""
        r = self.res.row(name, unit, goal, ops)
        over: dict[str, float] = {}
        prof = self.res.perf
        watch = None
        if (prof is not None and self.t.name in prof.targets and self.t.proc is not None
                and (name, self.t.name) not in self.res.profiles):
            watch = prof.start()
        c0 = self.t.counts()
        cpu0 = self.t.cpu()
        t0 = time.perf_counter()
        try:
            yield over
        except BaseException:
            if watch is not None:             # a failed section: perf stops with it
                prof.abort(*watch)
            raise
        dt = time.perf_counter() - t0
        cpu1 = self.t.cpu()
        c1 = self.t.counts()
        if watch is not None:
            p = prof.stop(*watch, self.t.proc.pid)
            if p is not None:
                self.res.profiles[(name, self.t.name)] = p
        value = over.get("value")
        if value is None:
            value = {"s": dt, "µs": dt / work * 1e6}.get(unit, work / dt if dt else 0.0)
        r.values.setdefault(self.t.name, []).append(value)
        r.nops.setdefault(self.t.name, []).append(nops)
        if cpu0 is not None and cpu1 is not None:
            r.cpu.setdefault(self.t.name, []).append((cpu1 - cpu0) / nops)
        if c0 is not None and c1 is not None:
            d = {k: v - c0.get(k, 0) for k, v in c1.items() if v - c0.get(k, 0)}
            if d.get("getxattr"):
                d["getxattr"] -= 1            # our own reading of the counts
            r.reqs.setdefault(self.t.name, []).append({k: v for k, v in d.items() if v})
        if not quiet:                     # (else the caller logs its own figure)
            log(f"  {name:<46} {self.t.name:<12} {value:,.2f} {unit}")


# ---- workloads -------------------------------------------------------------------

def aligned(n: int, fill: bool = False) -> mmap.mmap:
    """A page-aligned buffer: a bytearray from malloc is 16 bytes off a page,
    which makes the kernel's copy to/from it 3-5x slower here (AMD EPYC)."""
    m = mmap.mmap(-1, n)
    if fill:
        m.write(os.urandom(n))
    return m


@dataclass
class Sizes:
    seq: int
    bs: int
    rand: int
    rand_ops: int
    files: int
    statfs: int
    dbench_s: int
    tree: str
    tree_label: str
    smallreads: int = 20000
    writes: int = 1000
    web_n: int = 20
    web_s: int = 5
    cpu: int | None = None          # --cpu
    c_exe: str | None = None        # the compiled passthrough_ll (None: --no-c)


def wl_files(m: Meter, d: str, z: Sizes) -> None:
    top = os.path.join(d, "small")
    os.mkdir(top)
    n = z.files
    names = [os.path.join(top, f"f{i:06d}") for i in range(n)]
    data = b"x" * 100
    with m.section(f"create {n:,} files (100 B each)", "ops/s", ">=0.6", n, n, "file"):
        for p in names:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)
    drop_caches()
    with m.section(f"stat {n:,} files ({cold()})", "ops/s", ">=0.6", n, n, "file"):
        for p in names:
            os.stat(p)
    with m.section(f"delete {n:,} files", "ops/s", ">=0.4", n, n, "file"):
        for p in names:
            os.unlink(p)
    os.rmdir(top)


def wl_random(m: Meter, d: str, z: Sizes) -> None:
    path = os.path.join(d, "rand.dat")
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(z.rand // MiB):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    rng = random.Random(4242)
    pages = z.rand // 4096
    offs = [rng.randrange(pages) * 4096 for _ in range(z.rand_ops)]
    block = aligned(4096, fill=True)
    rbuf = [aligned(4096)]
    n = len(offs)
    drop_caches()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        with m.section(f"4 KiB random read, {z.rand // MiB} MiB file ({cold()})", "ops/s",
                       ">=0.6", n, n, "read"):
            for off in offs:
                if os.preadv(fd, rbuf, off) != 4096:
                    raise BenchError("short random read")
    finally:
        os.close(fd)
    fd = os.open(path, os.O_WRONLY)
    try:
        with m.section(f"4 KiB random write + final fsync, {z.rand // MiB} MiB file",
                       "ops/s", ">=0.5", n, n, "write"):
            for off in offs:
                if os.pwritev(fd, [block], off) != 4096:
                    raise BenchError("short random write")
            os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(path)


def wl_seq(m: Meter, d: str, z: Sizes) -> None:
    path = os.path.join(d, "seq.dat")
    buf = aligned(z.bs, fill=True)
    size, bs = z.seq, z.bs
    nio = size / bs
    drop_caches()
    with m.section(f"seq write {size // MiB} MiB + fsync ({bs // 1024} KiB writes)",
                   "MiB/s", ">=0.95", size / MiB, nio, "write(2)"):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = size
            while left > 0:
                left -= os.write(fd, buf if left >= bs else memoryview(buf)[:left])
            os.fsync(fd)
        finally:
            os.close(fd)
    for state in (cold(), "warm") if CAN_DROP else ("warm",):
        if state == "cold":
            drop_caches()
        rbuf = aligned(bs)
        total = 0
        with m.section(f"seq read {size // MiB} MiB ({state}, {bs // 1024} KiB reads)",
                       "MiB/s", ">=0.95", size / MiB, nio, "read(2)"):
            fd = os.open(path, os.O_RDONLY)
            try:
                while True:
                    n = os.readv(fd, [rbuf])
                    if not n:
                        break
                    total += n
            finally:
                os.close(fd)
        if total != size:
            raise BenchError(f"read {total} bytes of {path}, expected {size}")
    os.unlink(path)


def wl_statfs(m: Meter, d: str, z: Sizes) -> None:
    os.statvfs(d)
    with m.section("statfs latency", "µs", "<=2", z.statfs, z.statfs, "call"):
        for _ in range(z.statfs):
            os.statvfs(d)


def wl_dbench(m: Meter, d: str, z: Sizes) -> None:
    if not shutil.which("dbench"):
        raise BenchError("dbench is not installed (apt-get install dbench)")
    w = os.path.join(d, "dbench")
    os.mkdir(w)
    with m.section("dbench, 2 clients", "MB/s", ">=0.5", 1, z.dbench_s, "second") as over:
        out = run(["dbench", "-D", w, "-t", str(z.dbench_s), "2"]).stdout
        hit = re.findall(r"Throughput ([0-9.]+) MB/sec", out)
        if not hit:
            raise BenchError("no throughput in dbench's output")
        over["value"] = float(hit[-1])          # dbench's own figure, not 1/time
    shutil.rmtree(w, ignore_errors=True)


def wl_tree(m: Meter, d: str, z: Sizes) -> None:
    dst = os.path.join(d, "tree")
    tree = z.tree
    n = sum(len(ds) + len(fs) for _, ds, fs in os.walk(tree)) + 1
    # warm the source so that cp -a measures the destination side
    run(["bash", "-o", "pipefail", "-c", 'tar -cf - -C "$1" . | cat >/dev/null', "_", tree])
    with m.section(f"cp -a {z.tree_label}", "s", "<=1.3", 1, n, "entry"):
        run(["cp", "-a", tree, dst])
    drop_caches()
    with m.section(f"du -s of it ({cold()})", "s", "<=1.3", 1, n, "entry"):
        run(["du", "-s", dst])
    drop_caches()
    with m.section(f"tar -cf - of it \\| cat ({cold()}, reads data)", "s", "<=1.3", 1, n,
                   "entry"):
        run(["bash", "-o", "pipefail", "-c", 'tar -cf - -C "$1" tree | cat >/dev/null',
             "_", d])
    with m.section("rm -r of it", "s", "<=1.3", 1, n, "entry"):
        run(["rm", "-r", dst])


def cached_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1])
    raise BenchError("no Cached: in /proc/meminfo")


SYS_CACHESTAT = 451           # the same number on every architecture (Linux 6.5)


def file_cached_kib(path: str) -> int | None:
    """KiB of ``path``'s own page cache (cachestat(2) over the whole file), or
    None where the kernel has no cachestat."""
    import ctypes
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    rng = (ctypes.c_uint64 * 2)(0, 0)           # off 0, len 0: to the end
    cs = (ctypes.c_uint64 * 5)()                # nr_cache, nr_dirty, ...
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.syscall(ctypes.c_long(SYS_CACHESTAT), ctypes.c_int(fd), rng, cs,
                         ctypes.c_uint(0)) != 0:
            if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
                return None
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)
    return cs[0] * PAGE // 1024


def copies_kib(t: "Target", path: str) -> int | None:
    """KiB cached of the file at ``path`` under ``t``'s root: the mount's copy
    plus the backing file's (natively the file itself), whatever else runs
    on the machine; None without cachestat."""
    mine = file_cached_kib(path)
    if mine is None or t.src is None:
        return mine
    backing = file_cached_kib(os.path.join(t.src, os.path.relpath(path, t.root)))
    return None if backing is None else mine + backing


_libc = None
PAGE = os.sysconf("SC_PAGE_SIZE")
SMALL_FILE = 16 << 10        # the small files of the page-cache row: read through the
                             # FUSE page cache on a default mount (passthrough_min)


def punch(fd: int, off: int, length: int) -> None:
    """fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)."""
    global _libc
    import ctypes
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if _libc.fallocate(fd, 0x02 | 0x01, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def page_cache_row(m: Meter, name: str, paths: list[str], buf: list, size: int) -> None:
    """Row ``name``: the page cache grown by reading the cold files at
    ``paths`` (``size`` bytes in all) whole, per byte read.  The files' own
    pages (their copy in the mount and the backing file's), by cachestat(2):
    what other jobs cache meanwhile does not count; without cachestat, the
    machine's "Cached:" (which does)."""
    f0 = [copies_kib(m.t, p) for p in paths]
    c0 = cached_kib()
    with m.section(name, "x", "<=1.1", 1, size / MiB, "MiB"):
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                while os.readv(fd, buf):
                    pass
            finally:
                os.close(fd)
    grown = (sum(copies_kib(m.t, p) for p in paths) - sum(f0) if None not in f0
             else cached_kib() - c0)
    m.res.rows[name].values[m.t.name][-1] = grown / (size >> 10)


def wl_kernel(m: Meter, d: str, z: Sizes) -> None:
    # a web server's request: open, read a 4 KiB page, close (100 pages)
    top = os.path.join(d, "pages")
    os.mkdir(top)
    names = [os.path.join(top, f"p{i:03d}.html") for i in range(100)]
    for p in names:
        with open(p, "wb") as f:
            f.write(os.urandom(4096))
    for p in names:                                    # warm: looked up, cached
        with open(p, "rb") as f:
            f.read()
    n = z.smallreads
    with m.section("open + read 4 KiB + close (warm)", "ops/s", ">=0.6", n, n, "open"):
        for i in range(n):
            fd = os.open(names[i % 100], os.O_RDONLY)
            os.read(fd, 8192)
            os.close(fd)
    shutil.rmtree(top)
    # 4 KiB random reads of a hot file (read once before)
    path = os.path.join(d, "hot.dat")
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(z.rand // MiB):
            f.write(chunk)
    rng = random.Random(4243)
    pages = z.rand // 4096
    # 25 times the cold row's reads: 8,192 hot reads take ~12 ms, where one
    # time slice of another job moves the figure by a third
    offs = [rng.randrange(pages) * 4096 for _ in range(25 * z.rand_ops)]
    rbuf = [aligned(4096)]
    big = [aligned(MiB)]
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(2):                    # hot: read twice (the first read after
            os.lseek(fd, 0, os.SEEK_SET)      # the writes may refill what an
            while os.readv(fd, big):          # attribute change invalidated)
                pass
        with m.section(f"4 KiB random read, {z.rand // MiB} MiB file (hot)", "ops/s",
                       ">=0.6", len(offs), len(offs), "read"):
            for off in offs:
                if os.preadv(fd, rbuf, off) != 4096:
                    raise BenchError("short random read")
    finally:
        os.close(fd)
    # the page cache grown by a cold read, per byte read
    if CAN_DROP:
        # and by small files (under passthrough_min: read through the FUSE
        # page cache on a default mount), written before the caches are dropped
        small = os.path.join(d, "small")
        os.mkdir(small)
        smalls = [os.path.join(small, f"s{i:04d}") for i in range(z.files // 5)]
        for p in smalls:
            with open(p, "wb") as f:
                f.write(os.urandom(SMALL_FILE))
        drop_caches()
        page_cache_row(m, f"page cache grown / bytes read ({z.rand // MiB} MiB, cold)",
                       [path], big, z.rand)
        page_cache_row(m, f"page cache grown / bytes read ({len(smalls):,} files of "
                       f"{SMALL_FILE >> 10} KiB, cold)", smalls, rbuf, len(smalls) * SMALL_FILE)
        shutil.rmtree(small)
    # copy_file_range of the whole file, 1 MiB calls
    dst = os.path.join(d, "copy.dat")
    fi = os.open(path, os.O_RDONLY)
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with m.section(f"copy_file_range {z.rand // MiB} MiB (1 MiB calls) + fsync",
                       "MiB/s", ">=0.6", z.rand / MiB, z.rand / MiB, "call"):
            off = 0
            while off < z.rand:
                k = os.copy_file_range(fi, fo, MiB, off, off)
                if k <= 0:
                    raise BenchError("copy_file_range copied nothing")
                off += k
            os.fsync(fo)
    finally:
        os.close(fi)
        os.close(fo)
    if os.path.getsize(dst) != z.rand:
        raise BenchError("copy_file_range: wrong size")
    os.unlink(dst)
    os.unlink(path)
    # fallocate 256 KiB at a time, then punch it all back
    path = os.path.join(d, "falloc.dat")
    step = 256 << 10
    calls = z.rand // step
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with m.section(f"fallocate {z.rand // MiB} MiB (256 KiB calls, mode 0)", "ops/s",
                       ">=0.6", calls, calls, "call"):
            for i in range(calls):
                os.posix_fallocate(fd, i * step, step)
        name = f"fallocate PUNCH_HOLE {z.rand // MiB} MiB (256 KiB calls)"
        try:
            with m.section(name, "ops/s", ">=0.6", calls, calls, "call"):
                for i in range(calls):
                    punch(fd, i * step, step)
        except OSError as e:                  # passthrough_ll has mode 0 only
            m.res.fail(name, m.t.name, short(e))
    finally:
        os.close(fd)
    os.unlink(path)


TRACEFS = "/sys/kernel/tracing"


@contextlib.contextmanager
def fuse_requests_traced(path: str) -> Iterator[dict[str, int]]:
    """Counts the requests the kernel sends to the FUSE connection of the mount
    at ``path`` while the block runs, by opcode, with the ``fuse:fuse_request_send``
    tracepoint in a tracefs instance of our own (filtered on the connection, so
    other mounts do not count; the global trace is not touched).  Raises
    BenchError where the kernel has no such tracepoint or events were lost."""
    ev = os.path.join(TRACEFS, "events", "fuse", "fuse_request_send")
    if not os.path.isdir(ev):
        raise BenchError(f"no fuse:fuse_request_send tracepoint in {TRACEFS}")
    dev = os.stat(path).st_dev
    kdev = (os.major(dev) << 20) | os.minor(dev)         # the kernel's dev_t
    inst = os.path.join(TRACEFS, "instances", f"simfs-bench-{os.getpid()}")
    os.mkdir(inst)
    out: dict[str, int] = {}
    try:
        iev = os.path.join(inst, "events", "fuse", "fuse_request_send")
        with open(os.path.join(iev, "filter"), "w") as f:
            f.write(f"connection == {kdev}\n")
        with open(os.path.join(iev, "enable"), "w") as f:
            f.write("1\n")
        try:
            yield out
        finally:
            with open(os.path.join(iev, "enable"), "w") as f:
                f.write("0\n")
        with open(os.path.join(inst, "trace")) as f:
            text = f.read()
        m = re.search(r"entries-in-buffer/entries-written: (\d+)/(\d+)", text)
        if m and m.group(1) != m.group(2):
            raise BenchError(f"tracing lost events ({m.group(1)} of {m.group(2)} kept)")
        for op in re.findall(r"fuse_request_send: .*? opcode \d+ \(FUSE_(\w+)\)", text):
            out[op.lower()] = out.get(op.lower(), 0) + 1
    finally:
        os.rmdir(inst)


def wl_writes(m: Meter, d: str, z: Sizes) -> None:
    """FUSE requests per write(2): --writes pwrite(2) of 4 KiB, each extending
    a new file.  simfs: its own counts (``trusted.simfs.requests``); another
    FUSE mount (C-ll): the kernel's ``fuse:fuse_request_send`` tracepoint,
    filtered to its connection; native: none.  Issue 17's goal is 1."""
    t = m.t
    path = os.path.join(d, "writes.dat")
    n = z.writes
    name = f"requests per write(2) ({n:,} pwrite of 4 KiB)"
    r = m.res.row(name, "requests", "<=1", "write(2)")
    r.absolute = True
    had = len(r.values.get(t.name, []))
    block = aligned(4096, fill=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        got: dict[str, int] | None = None
        why = None
        if t.has_counts:
            a, b = t.counts(), t.counts()    # what one reading of the counts costs
            own = {k: v - a.get(k, 0) for k, v in b.items() if v - a.get(k, 0)}
            with m.section(name, "requests", "<=1", n, n, "write(2)", quiet=True):
                c0 = t.counts()
                for i in range(n):
                    os.pwritev(fd, [block], i * 4096)
                c1 = t.counts()
            got = {k: v - c0.get(k, 0) - own.get(k, 0) for k, v in c1.items()}
        elif t.src is not None:
            try:
                with fuse_requests_traced(t.root) as traced:
                    with m.section(name, "requests", "<=1", n, n, "write(2)", quiet=True):
                        for i in range(n):
                            os.pwritev(fd, [block], i * 4096)
                got = traced
            except (BenchError, OSError) as e:
                why = short(e) if isinstance(e, OSError) else str(e)
        else:
            with m.section(name, "requests", "<=1", n, n, "write(2)", quiet=True):
                for i in range(n):
                    os.pwritev(fd, [block], i * 4096)
            got = {}                        # no FUSE: no request
    finally:
        os.close(fd)
    if got is None:                         # no figure: "—" and why
        for data in (r.values, r.nops, r.cpu):
            del data.get(t.name, [])[had:]
        r.notes[t.name] = why or "not counted"
        log(f"  {name:<46} {t.name:<12} not counted: {r.notes[t.name]}")
    else:
        got = {k: v for k, v in got.items() if v}
        r.values[t.name][-1] = sum(got.values()) / n
        if t.name in r.reqs:
            r.reqs[t.name][-1] = got
        elif t.src is not None:
            r.reqs.setdefault(t.name, []).append(got)
        log(f"  {name:<46} {t.name:<12} {sum(got.values()) / n:.3f} requests "
            f"({', '.join(f'{k} {v}' for k, v in sorted(got.items())) or 'none'})")
    os.unlink(path)


_webbench = None


def webbench_module():
    """tools/webbench, loaded as webbench loads tools/density."""
    global _webbench
    if _webbench is None:
        from importlib.machinery import SourceFileLoader
        _webbench = SourceFileLoader("webbench", os.path.join(HERE, "webbench")).load_module()
    return _webbench


WEB_TARGETS = ("native", REF, "simfs+quota", PT)


def web_row(z: Sizes) -> str:
    where = f"CPU {z.cpu}" if z.cpu is not None else "all CPUs"
    return f"web: {z.web_n} busybox httpd containers, wrk {z.web_s} s ({where})"


def run_web(res: Results, targets: list[Target], z: Sizes, rnd: int) -> None:
    """tools/webbench's fleet, once per round: ``--web-n`` containers, each a
    private area with its quota (both levels) and its own busybox httpd, loaded
    by wrk for ``--web-s`` seconds: natively (the servers on the private areas),
    through one passthrough_ll per area (C-ll), one simfs mount per area with
    its quota (simfs+quota) and the same with ``-o passthrough`` (simfs+pt), in
    an order rotated each round.  After each simfs load every quota must be
    exact against du/find, live and in the quota file after unmount (else the
    cell is FAIL).  Requests/min; the goal is >= 0.95x native."""
    name = web_row(z)
    r = res.row(name, "req/min", ">=0.95", "HTTP request")
    r.ref = "native"
    have = {t.name for t in targets}
    cfgs = [c for c in WEB_TARGETS if c in have and (c != REF or z.c_exe)]
    for c in have - set(cfgs):
        r.notes.setdefault(c, "quota mounts only" if c == "simfs" else "not run")
    missing = [p for p in ("wrk", "busybox") if not shutil.which(p)]
    if missing:
        for c in cfgs:
            res.fail(name, c, f"needs {' and '.join(missing)}")
        return
    cfgs = cfgs[rnd % len(cfgs):] + cfgs[:rnd % len(cfgs)]
    wb = webbench_module()
    args = argparse.Namespace(n=z.web_n, duration=z.web_s, connections=1,
                              jobs=min(10, z.web_n), server="busybox", mode="service",
                              passthrough=False, keep=False, json=True)
    saved = {k: os.environ.get(k) for k in ("VZQUOTA_DIR", "VZQUOTA_RUNDIR")}
    w = None
    cs: list[Target] = []
    ok = False
    try:
        w = wb.WebBench(args)        # its own temp tree under /tmp, its own VZQUOTA_*
        log(f"  web: {z.web_n} containers in {w.tmp}, order {', '.join(cfgs)}")
        w.setup()
        w.start_service()
        ids = range(1, z.web_n + 1)
        for cfg in cfgs:
            mounted = False
            try:
                w.failed = False
                if cfg == "native":
                    w.serve(w.private)
                elif cfg == REF:
                    cs = [Target(f"{REF}-{i}", w.root(i),
                                 [z.c_exe, "-f", "-o", f"source={w.private(i)},{C_OPTIONS}",
                                  w.root(i)], os.path.join(w.tmp, f"c{i}.log"), w.private(i))
                          for i in ids]
                    for t in cs:
                        t.start()
                    w.serve(w.root)
                else:
                    w.options = "passthrough" if cfg == PT else ""
                    mounted = True
                    w.pool(w.mount_one, ids)
                    w.serve(w.root)
                if cfg == REF:
                    procs = [t.proc.pid for t in cs if t.proc]
                else:
                    procs = [w.pids[i] for i in ids] if mounted else []
                counting = mounted
                c0 = [json.loads(os.getxattr(w.root(i), COUNTS_XATTR)) for i in ids] \
                    if counting else []
                prof = res.perf
                watch = None
                if (prof is not None and cfg in prof.targets and procs
                        and (name, cfg) not in res.profiles):
                    watch = prof.start()          # the first round: all the daemons
                cpu0 = sum(tree_cpu(p) for p in procs)
                t0 = time.perf_counter()
                try:
                    rpm = w.load(cfg)
                except BaseException:
                    if watch is not None:
                        prof.abort(*watch)
                    raise
                dt = time.perf_counter() - t0
                cpu1 = sum(tree_cpu(p) for p in procs)
                if watch is not None:
                    got = prof.stop(*watch, procs)
                    if got is not None:
                        res.profiles[(name, cfg)] = got
                c1 = [json.loads(os.getxattr(w.root(i), COUNTS_XATTR)) for i in ids] \
                    if counting else []
                w.stop_servers()
                if w.failed:
                    raise BenchError("a server answered non-2xx")
                nreq = rpm * min(dt, z.web_s) / 60         # wrk's count, about
                r.values.setdefault(cfg, []).append(rpm)
                r.nops.setdefault(cfg, []).append(nreq)
                if procs:
                    r.cpu.setdefault(cfg, []).append((cpu1 - cpu0) / nreq)
                if counting:
                    d: dict[str, int] = {}
                    for a, b in zip(c0, c1):
                        for k, v in b.items():
                            d[k] = d.get(k, 0) + v - a.get(k, 0)
                    d["getxattr"] = d.get("getxattr", 0) - z.web_n   # our own readings
                    r.reqs.setdefault(cfg, []).append({k: v for k, v in d.items() if v})
                per = "".join(f", {k} {v / nreq:.2g}" for k, v in sorted(
                    r.reqs[cfg][-1].items(), key=lambda kv: -kv[1])[:5]) if counting else ""
                log(f"  {name:<46} {cfg:<12} {rpm:,.0f} req/min"
                    + (f" (per HTTP request{per})" if per else ""))
                if mounted:
                    bad = w.check("live", live=True)
                    w.pool(w.unmount_one, ids)
                    mounted = False
                    bad += w.check("in the quota files after unmount", live=False)
                    if bad:
                        raise BenchError(f"{bad} quota(s) not exact (du/find)")
            except (BenchError, OSError, RuntimeError) as e:
                res.fail(name, cfg, short(e) if isinstance(e, OSError) else str(e)[:80])
            finally:
                w.stop_servers()
                for t in cs:
                    t.stop()
                cs = []
                if mounted:
                    for i in ids:
                        subprocess.run(["umount", w.root(i)], capture_output=True)
        ok = True
    except (BenchError, OSError, RuntimeError) as e:
        for c in cfgs:
            if c not in r.values:
                res.fail(name, c, str(e)[:80])
    finally:
        for t in cs:
            t.stop()
        if w is not None:
            w.cleanup(ok)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


WORKLOADS: dict[str, Callable[[Meter, str, Sizes], None]] = {
    "files": wl_files, "random": wl_random, "seq": wl_seq, "statfs": wl_statfs,
    "dbench": wl_dbench, "tree": wl_tree, "kernel": wl_kernel, "writes": wl_writes,
    "web": None,                      # run_web: once per round, every target in it
}


# ---- main ------------------------------------------------------------------------

def default_tree() -> str:
    for cand in ("/usr/lib/python3.11", sysconfig.get_paths()["stdlib"]):
        if os.path.isdir(cand):
            return cand
    raise BenchError("no Python standard library directory found; use --tree")


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


def build_c_reference(base: str) -> str:
    """Compile passthrough_ll.c into the temp dir; returns the binary."""
    if not os.path.exists(PASSTHROUGH_LL):
        raise BenchError(f"{PASSTHROUGH_LL} is missing (apt-get install libfuse3-dev)")
    flags = run(["pkg-config", "fuse3", "--cflags", "--libs"]).stdout.split()
    exe = os.path.join(base, "passthrough_ll")
    run(["cc", "-O2", "-Wall", "-o", exe, PASSTHROUGH_LL, *flags])
    return exe


def on_signal(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Workloads (--only): " + ", ".join(WORKLOADS))
    ap.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke run")
    ap.add_argument("--rounds", type=int, help="rounds per workload (default 3, quick 1)")
    ap.add_argument("--only", help="comma-separated workloads to run (default all)")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=CMD",
                    help="another target: a mount command run in the foreground, with "
                         "{src} and {mnt} (repeatable)")
    ap.add_argument("--no-c", action="store_true", help="skip the C reference")
    ap.add_argument("--no-pt", action="store_true",
                    help="skip simfs+pt (the quota mount with -o passthrough)")
    ap.add_argument("--size-mb", type=int, help="sequential file size (default 512, quick 32)")
    ap.add_argument("--bs-kb", type=int, default=1024, help="sequential I/O size (KiB)")
    ap.add_argument("--rand-mb", type=int, help="random I/O file size (default 64, quick 16)")
    ap.add_argument("--rand-ops", type=int, help="random reads and writes (default 8192, quick 1000)")
    ap.add_argument("--files", type=int, help="small files (default 5000, quick 500)")
    ap.add_argument("--statfs", type=int, help="statfs calls (default 20000, quick 2000)")
    ap.add_argument("--dbench-s", type=int, help="dbench seconds (default 10, quick 3)")
    ap.add_argument("--writes", type=int,
                    help="4 KiB pwrite(2) calls of the requests-per-write row (default 1000)")
    ap.add_argument("--web-n", type=int,
                    help="containers of the web row (tools/webbench; default 20, quick 4)")
    ap.add_argument("--web-s", type=int,
                    help="seconds of wrk load per target of the web row (default 5, quick 2)")
    ap.add_argument("--tree", help="tree to copy (default /usr/lib/python3.11 or the stdlib)")
    ap.add_argument("--tmp", default="/tmp", help="where to make the temp dir (default /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    ap.add_argument("--image", type=int, metavar="MIB",
                    help="run every target on a fresh ext4 (with its journal) in a loop "
                         "image of MIB MiB made under --tmp (removed at the end): one "
                         "clean backing filesystem, whatever --tmp's is and whatever "
                         "else runs there")
    ap.add_argument("--cpu", type=int, default=None, metavar="N",
                    help="run every daemon and workload on CPU N only (all targets "
                         "alike): measures the cost per request without the cost of "
                         "waking another, idle CPU, which dominates in some VMs")
    ap.add_argument("--perf", metavar="TARGETS",
                    help="comma-separated targets (e.g. C-ll,simfs+quota) whose daemons "
                         "perf samples in each section of the first round: a third table "
                         "of where their time goes (perf slows what it watches: the "
                         "figures of such a run are not for comparison)")
    a = ap.parse_args()
    q = a.quick
    if a.perf and not shutil.which("perf"):
        log("--perf needs perf (apt-get install linux-perf)")
        return 2
    rounds = a.rounds or (1 if q else 3)
    tree = a.tree or default_tree()
    if q and not a.tree:
        tree = os.path.join(tree, "email")      # a small subtree for the smoke run
    if (a.web_n is not None and not 2 <= a.web_n <= 1000) or \
            (a.web_s is not None and not 1 <= a.web_s <= 600) or \
            (a.writes is not None and a.writes < 1):
        log("--web-n must be 2..1000, --web-s 1..600, --writes at least 1")
        return 2
    only = [w.strip() for w in a.only.split(",")] if a.only else list(WORKLOADS)
    for w in only:
        if w not in WORKLOADS:
            log(f"unknown workload {w!r}; known: {', '.join(WORKLOADS)}")
            return 2
    extras: list[tuple[str, str]] = []
    for e in a.extra:
        name, sep, cmd = e.partition("=")
        if not sep or not name or "{mnt}" not in cmd:
            log(f"--extra wants NAME=COMMAND with {{mnt}} (and {{src}}): {e!r}")
            return 2
        extras.append((name, cmd))

    if os.geteuid() != 0:
        log("must run as root (mounting)")
        return 2
    for b in (SIMFS, VZQUOTA):
        if not os.access(b, os.X_OK):
            log(f"{b} is missing (run tools/setup.sh)")
            return 2
    if not os.path.exists("/dev/fuse"):
        log("/dev/fuse is missing")
        return 2

    if a.cpu is not None:
        try:
            os.sched_setaffinity(0, {a.cpu})      # inherited by every child
        except (OSError, ValueError) as e:
            log(f"--cpu {a.cpu}: {e}")
            return 2
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    img_dir = img_mnt = None
    where = a.tmp
    if a.image:
        img_dir = tempfile.mkdtemp(prefix="simfs-bench-img-", dir=a.tmp)
        img_mnt = os.path.join(img_dir, "fs")
        os.mkdir(img_mnt)
        img = os.path.join(img_dir, "ext4.img")
        try:
            with open(img, "wb") as f:
                f.truncate(a.image * MiB)
            run(["mkfs.ext4", "-q", "-F", img])
            run(["mount", "-o", "loop", img, img_mnt])
        except (BenchError, OSError, KeyboardInterrupt) as e:
            log(f"--image: {e}")
            shutil.rmtree(img_dir, ignore_errors=True)
            return 1
        where = img_mnt
    base = tempfile.mkdtemp(prefix="simfs-bench-", dir=where)
    os.chmod(base, 0o755)
    os.environ["VZQUOTA_DIR"] = os.path.join(base, "vzquota")
    os.environ["VZQUOTA_RUNDIR"] = os.path.join(base, "run")
    os.mkdir(os.environ["VZQUOTA_DIR"])
    qid = 900000 + os.getpid() % 100000

    def area(name: str) -> tuple[str, str]:
        src, mnt = os.path.join(base, f"src-{name}"), os.path.join(base, f"mnt-{name}")
        os.mkdir(src)
        os.mkdir(mnt)
        return src, mnt

    targets: list[Target] = []
    quota_on = False
    quota_pt = False
    ok = False
    interrupted = False
    info = machine_info(base)
    load0 = loadavg()
    t_start = time.monotonic()
    res: Results | None = None
    try:
        log(f"temp dir {base}; tree {tree}; drop_caches {'yes' if CAN_DROP else 'NO'}; "
            f"{rounds} round(s)")
        c_exe = None
        if not a.no_c:
            exe = c_exe = build_c_reference(base)
            src, mnt = area("c")
            targets.append(Target(REF, mnt, [exe, "-f", "-o",
                                             f"source={src},{C_OPTIONS}", mnt],
                                  os.path.join(base, "c.log"), src))
        native = os.path.join(base, "native")
        os.mkdir(native)
        targets.append(Target("native", native))
        src, mnt = area("simfs")
        targets.append(Target("simfs", mnt, [SIMFS, src, mnt, "-f"],
                              os.path.join(base, "simfs.log"), src))
        src, mnt = area("quota")
        run([VZQUOTA, "init", str(qid), "-p", src, "-b", "1T", "-B", "1T",
             "-i", "100000000", "-I", "100000000", "-e", "7d", "-n", "7d",
             "-s", "1", "-u", "1000"])
        run([VZQUOTA, "on", str(qid)])
        quota_on = True
        targets.append(Target("simfs+quota", mnt, [SIMFS, src, mnt, "-f", "-o",
                                                   f"quotaid={qid}"],
                              os.path.join(base, "quota.log"), src))
        if not a.no_pt:
            src, mnt = area("pt")
            run([VZQUOTA, "init", str(qid + 1), "-p", src, "-b", "1T", "-B", "1T",
                 "-i", "100000000", "-I", "100000000", "-e", "7d", "-n", "7d",
                 "-s", "1", "-u", "1000"])
            run([VZQUOTA, "on", str(qid + 1)])
            quota_pt = True
            targets.append(Target(PT, mnt, [SIMFS, src, mnt, "-f", "-o",
                                            f"quotaid={qid + 1},passthrough"],
                                  os.path.join(base, "pt.log"), src))
        for i, (name, cmd) in enumerate(extras):
            src, mnt = area(f"x{i}")
            argv = [w.replace("{src}", src).replace("{mnt}", mnt) for w in shlex.split(cmd)]
            if argv and argv[0] == "simfs":
                argv[0] = SIMFS
            targets.append(Target(name, mnt, argv, os.path.join(base, f"x{i}.log"), src))
        for t in targets:
            t.start()
            log(f"{t.name}: {'pid ' + str(t.proc.pid) if t.proc else 'native'} at {t.root}"
                f"{' (request counts)' if t.has_counts else ''}")
        run([VZQUOTA, "stat", str(qid), "-t"])          # both levels must be live

        files = sum(len(ds) + len(fs) for _, ds, fs in os.walk(tree)) + 1
        mib = int(run(["du", "-s", "--block-size=1", tree]).stdout.split()[0]) / MiB
        z = Sizes(seq=(a.size_mb or (32 if q else 512)) * MiB, bs=a.bs_kb * 1024,
                  rand=(a.rand_mb or (16 if q else 64)) * MiB,
                  rand_ops=a.rand_ops or (1000 if q else 8192),
                  files=a.files or (500 if q else 5000),
                  statfs=a.statfs or (2000 if q else 20000),
                  dbench_s=a.dbench_s or (3 if q else 10),
                  tree=tree, tree_label=f"{tree} ({files:,} entries, {mib:.0f} MiB)",
                  smallreads=2000 if q else 20000,
                  writes=a.writes or 1000,
                  web_n=a.web_n or (4 if q else 20), web_s=a.web_s or (2 if q else 5),
                  cpu=a.cpu, c_exe=c_exe)
        res = Results([t.name for t in targets])
        if a.perf:
            res.perf = Profiler({x.strip() for x in a.perf.split(",")}, a.cpu, base)
        for rnd in range(rounds):
            for w in only:
                log(f"round {rnd + 1}/{rounds}: {w}")
                if w == "web":
                    run_web(res, targets, z, rnd)
                    continue
                order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
                for t in order:
                    try:
                        WORKLOADS[w](Meter(res, t), t.root, z)
                    except (BenchError, OSError) as e:
                        res.fail(f"{w} (aborted)", t.name, short(e))
                        empty_dir(t.root)
        quota_usage = run([VZQUOTA, "stat", str(qid), "-t"]).stdout
        ok = True
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; cleaning up")
    except BenchError as e:
        log(f"error: {e}")
    finally:
        for t in reversed(targets):
            try:
                t.stop()
            except Exception as e:        # keep cleaning up the others
                log(f"stopping {t.root}: {e}")
        for on, q_ in ((quota_on, qid), (quota_pt, qid + 1)):
            if not on:
                continue
            p = subprocess.run([VZQUOTA, "off", str(q_)], capture_output=True, text=True)
            if p.returncode not in (0, 6):
                log(f"vzquota off {q_} exited {p.returncode}: {p.stderr.strip()}")
        left = mounts_under(base)
        if left:
            log(f"NOT removing {base}: still mounted: {left}")
        elif a.keep or (not ok and not interrupted):
            if not a.keep:                # keep the logs, drop the data
                for p in os.listdir(base):
                    if not p.endswith(".log"):
                        shutil.rmtree(os.path.join(base, p), ignore_errors=True)
            log(f"kept {base} (logs: *.log)")
        else:
            shutil.rmtree(base, ignore_errors=True)
        if img_mnt is not None:
            if os.path.exists(base) or mounts_under(img_mnt):
                log(f"NOT removing the image {img_dir} (mounted at {img_mnt}): "
                    f"{base} is kept or in use")
            else:
                p = subprocess.run(["umount", img_mnt], capture_output=True, text=True)
                if p.returncode == 0:
                    shutil.rmtree(img_dir, ignore_errors=True)
                else:
                    log(f"umount {img_mnt}: {p.stderr.strip()}; the image stays in {img_dir}")

    if not ok:
        if res is not None and res.rows:
            print(res.table())
        return 130 if interrupted else 1
    print(f"## simfs benchmark ({'quick' if q else 'full'} run, {rounds} round(s), "
          f"medians; {time.monotonic() - t_start:.0f} s)\n")
    print(res.table())
    print()
    print(f"Units: ops/s, MiB/s, MB/s, req/min higher is better; s, µs, x and requests "
          f"lower.  "
          f"\"simfs+quota / C\" = simfs+quota's figure / {REF}'s (passthrough_ll -o "
          f"{C_OPTIONS}); \"quota on/off\" = how many times slower quota on is.  "
          f"cold = after sync + drop_caches.  Each round runs every target back to back, "
          f"in an order rotated each round.")
    notes = []
    if any(r.absolute for r in res.rows.values()):
        notes.append("\"requests per write(2)\": the FUSE requests per pwrite(2) of 4 KiB "
                     "(simfs: the daemon's own counts; other FUSE mounts: the kernel's "
                     "fuse:fuse_request_send tracepoint on that connection; native: none); "
                     "the goal (issue 17 item 9) is 1 request per write(2) on simfs+quota, "
                     "the ratio column is against C-ll's.")
    if any(r.ref == "native" for r in res.rows.values()):
        notes.append("\"web\": tools/webbench's fleet (one busybox httpd per container, "
                     "each on its own private area, wrk one thread per server), served "
                     "natively, through one passthrough_ll per area (C-ll), one simfs mount "
                     "per area with its quota (simfs+quota) and the same -o passthrough "
                     "(simfs+pt); in its own temp tree under /tmp (not --image); the quotas "
                     "checked exact after each simfs load (else FAIL).  Its ratio is against "
                     "native; the goal (issue 17 item 9) is >= 0.95x native on one CPU "
                     "(--cpu).  Per op in the second table: per HTTP request, all daemons.")
    if notes:
        print()
        print("\n".join(notes))
    print()
    print("Daemon cost per operation (medians; CPU = user+system of the daemon's "
          "process tree; requests = simfs's own counts):\n")
    print(res.cost_table())
    if res.profiles:
        print("\nWhere the daemons' time goes (perf, first round; Python = the "
              "interpreter and extension modules):\n")
        print(res.profile_table())
    print(f"\nQuota: id {qid}, both levels on, limits 1T / 1e8 inodes (never reached); "
          f"vzquota stat -t at the end:\n```\n{quota_usage.rstrip()}\n```")
    print("\nMachine:")
    for line in info:
        print(f"- {line}")
    print(f"- CPUs used: {'only CPU %d (--cpu)' % a.cpu if a.cpu is not None else 'all'}")
    if a.image:
        print(f"- every target on a fresh ext4 with its journal, a {a.image} MiB loop image "
              f"(--image) made under {a.tmp}")
    print(f"- load average at start: {load0}; at end: {loadavg()} "
          "(other jobs share the machine: numbers are noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
