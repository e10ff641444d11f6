"""Progress on a terminal for init, recalc and a recount at mount; nothing in
a pipe or with -q.  The final count shown is the tree's (``find``)."""

from __future__ import annotations

import os
import pty
import re
import subprocess
from pathlib import Path

from conftest import SIMFS, VZQUOTA, is_mountpoint, vzquota


def find_count(path: Path) -> int:
    return subprocess.run(["find", str(path)], check=True,
                          capture_output=True).stdout.count(b"\n")


def on_a_terminal(*cmd: str) -> tuple[int, str]:
    """Run ``cmd`` with its standard error on a pseudo-terminal."""
    master, slave = os.openpty()
    proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:          # EIO: every writer closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(60), b"".join(chunks).decode(errors="replace")


def tree(private: Path, n: int) -> None:
    for d in range(n // 100):
        sub = private / f"d{d}"
        sub.mkdir()
        for i in range(100):
            (sub / f"f{i}").write_bytes(b"x")


def final_count(text: str) -> int:
    """The last count tqdm drew (e.g. '12.3k inodes' or '2501 inodes')."""
    counts = re.findall(r"(\d+(?:\.\d+)?)([kM]?) inodes", text)
    assert counts, text
    num, scale = counts[-1]
    return round(float(num) * {"": 1, "k": 1000, "M": 10**6}[scale])


def test_init_and_recalc_show_progress_on_a_terminal(area):
    private, _ = area
    tree(private, 12000)                 # past the scanner's first report
    want = find_count(private)
    code, text = on_a_terminal(VZQUOTA, "init", "101", "-p", str(private), "-b", "1G",
                               "-B", "1G", "-i", "1000000", "-I", "1000000",
                               "-e", "1d", "-n", "1d")
    assert code == 0, text
    assert "vzquota: counting" in text and "/s" in text
    assert abs(final_count(text) - want) <= want // 100     # 12.0k: 3 digits shown
    code, text = on_a_terminal(VZQUOTA, "recalc", "101")
    assert code == 0 and "vzquota: counting" in text
    code, text = on_a_terminal(VZQUOTA, "-q", "recalc", "101")
    assert code == 0 and text == ""
    r = vzquota("recalc", "101")        # a pipe: nothing
    assert r.stderr == ""


def test_recount_at_mount_shows_progress_on_a_terminal(mounter, area):
    private, root = area
    tree(private, 300)
    vzquota("init", "101", "-p", str(private), "-b", "1G", "-B", "1G", "-i", "100000",
            "-I", "100000", "-e", "1d", "-n", "1d")
    vzquota("on", "101")
    vzquota("setlimit", "101", "-f")    # dirty: the mount recounts
    code, text = on_a_terminal(SIMFS, str(private), str(root), "-o", "quotaid=101")
    try:
        assert code == 0, text
        assert "simfs: recounting" in text
        assert final_count(text) == find_count(private)
    finally:
        if is_mountpoint(str(root)):
            subprocess.run(["umount", str(root)], check=True)
