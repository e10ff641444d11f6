#!/usr/bin/env python3
"""Benchmark: vzquota.scan.scan() against GNU ``du -s`` on the same tree.

Role: a developer tool, not part of the product. Builds a tree of N small files
in ~N/100 directories (with some hard links and symlinks) in a temp dir, or uses
the tree given with ``--tree``; checks that scan()'s space equals
``du -s --block-size=1`` and its inode count equals ``find | wc -l`` (minus
extra hard links); times both warm (best of 3) and, with ``--cold`` (root),
after ``echo 3 > /proc/sys/vm/drop_caches``. ``--repeat R`` repeats every
measurement R times (du and scan() alternating, so load from other processes
hits both alike) and prints the median of the per-round timings and ratios.
``--workers`` / ``--start`` set ``vzquota.scan.WORKERS`` / ``START`` (e.g.
``--workers 1`` for the sequential walk, ``--start spawn`` for the daemon's way
of starting workers).

Concurrency: single-threaded (scan() may fork worker processes); nothing else
should write the tree meanwhile.

    python tools/bench_scan.py [-n 100000] [--tree DIR] [--cold] [--no-per-id]
                               [--repeat R] [--workers N] [--start fork|spawn]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vzquota import scan as scanmod  # noqa: E402
from vzquota.scan import scan  # noqa: E402


def build(root: str, n: int) -> None:
    per_dir = 100
    data = b"x" * 100
    for i in range(n):
        d, j = divmod(i, per_dir)
        dpath = os.path.join(root, f"d{d // 32}", f"s{d}")
        if j == 0:
            os.makedirs(dpath, exist_ok=True)
        p = os.path.join(dpath, f"f{j}")
        if j % 50 == 49:                 # 2% hard links to the previous file
            os.link(os.path.join(dpath, f"f{j - 1}"), p)
        elif j % 50 == 48:               # 2% symlinks
            os.symlink(f"../s{d}/f0", p)
        else:
            with open(p, "wb") as f:
                f.write(data)


def best(fn, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def du_bytes(tree: str) -> int:
    out = subprocess.run(["du", "-s", "--block-size=1", tree], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[0])


def find_inodes(tree: str) -> int:
    out = subprocess.run(["find", tree, "-printf", "%i\\n"], check=True,
                         capture_output=True, text=True).stdout
    return len(set(out.split()))


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=100_000, help="files to create")
    ap.add_argument("--tree", help="scan this existing tree instead of building one")
    ap.add_argument("--cold", action="store_true", help="also time with dropped caches")
    ap.add_argument("--no-per-id", action="store_true", help="scan(per_id=False)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; report medians")
    ap.add_argument("--workers", type=int, help="vzquota.scan.WORKERS")
    ap.add_argument("--start", choices=("fork", "spawn"), help="vzquota.scan.START")
    args = ap.parse_args()
    if args.workers is not None:
        scanmod.WORKERS = args.workers
    if args.start:
        scanmod.START = args.start
    per_id = not args.no_per_id

    tmp = None
    tree = args.tree
    if tree is None:
        tmp = tempfile.mkdtemp(prefix="bench_scan.")
        tree = os.path.join(tmp, "tree")
        os.mkdir(tree)
        t = time.perf_counter()
        build(tree, args.n)
        print(f"built {args.n} files in {time.perf_counter() - t:.1f} s: {tree}")
    try:
        res = scan(tree, per_id=per_id)
        du, inodes = du_bytes(tree), find_inodes(tree)
        assert res.space == du, (res.space, du)
        assert res.inodes == inodes, (res.inodes, inodes)
        if per_id:
            assert sum(v[0] for v in res.users.values()) == res.space
            assert sum(v[1] for v in res.groups.values()) == res.inodes
        print(f"check ok: space {res.space} B = du -s -B1, inodes {res.inodes} = find")

        def cold(fn):
            drop_caches()
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        kinds = [("warm", best)] + ([("cold", cold)] if args.cold else [])
        rounds: dict[str, list[tuple[float, float]]] = {k: [] for k, _ in kinds}
        for _ in range(args.repeat):
            for name, timer in kinds:
                rounds[name].append((timer(lambda: du_bytes(tree)),
                                     timer(lambda: scan(tree, per_id))))
        med = statistics.median
        print(f"{'cache':<6} {'du -s':>9} {'scan()':>9} {'ratio':>7}"
              + ("   (medians of %d rounds; ratio = median of per-round ratios)"
                 % args.repeat if args.repeat > 1 else ""))
        for name, rs in rounds.items():
            t_du, t_scan = med(r[0] for r in rs), med(r[1] for r in rs)
            ratio = med(r[1] / r[0] for r in rs)
            print(f"{name:<6} {t_du:>8.3f}s {t_scan:>8.3f}s {ratio:>6.2f}x")
    finally:
        if tmp:
            shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
