"""The mount service's children are titled after the mount they serve
(issue 18 item 10): ``ps`` shows "simfs: quota ID: PRIVATE on ROOT (mount)",
so ``pkill -f 'simfs --service'`` stops the service alone, and every mount
goes on."""

from __future__ import annotations

import os
import signal
import subprocess

from backing import wait_usage_matches
from conftest import SIMFS, is_mountpoint, vzquota
from test_service import Service, alive, daemon_pid, init_on, ppid, simfs, wait_for


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode().strip()


def test_children_are_titled_after_their_mount(fuse, world_tmp, tmp_path):
    s = Service(tmp_path / "service.log")
    mounts = []
    try:
        for i, qid in enumerate((101, 102)):
            private, root = world_tmp / f"p{i}", world_tmp / f"r{i}"
            private.mkdir()
            root.mkdir()
            init_on(qid, private)
            r = simfs(str(private), str(root), "-o", f"quotaid={qid}")
            assert r.returncode == 0, r.stderr
            mounts.append((qid, private, root))
        plain_p, plain_r = world_tmp / "plain-p", world_tmp / "plain-r"
        plain_p.mkdir()
        plain_r.mkdir()
        r = simfs(str(plain_p), str(plain_r))
        assert r.returncode == 0, r.stderr
        pids = []
        for qid, private, root in mounts:
            pid = daemon_pid(qid)
            assert ppid(pid) == s.proc.pid
            assert cmdline(pid) == f"simfs: quota {qid}: {private} on {root} (mount)"
            pids.append(pid)
        ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
        assert f"simfs: no quota: {plain_p} on {plain_r} (mount)" in ps, ps
        # what the admin typed matches the service and none of its
        # mounts (other services may run on the machine: only ours are checked)
        got = {int(p) for p in subprocess.run(["pgrep", "-f", "simfs --service"],
                                              capture_output=True, text=True).stdout.split()}
        assert s.proc.pid in got and not got & set(pids), (got, pids)
        os.kill(s.proc.pid, signal.SIGTERM)
        assert s.proc.wait(30) == 0
        for (qid, private, root), pid in zip(mounts, pids):
            assert alive(pid) and is_mountpoint(str(root))
            (root / "after").write_bytes(b"x" * 8192)
            assert wait_usage_matches(private, qid) == []
    finally:
        s.stop()
        for _, _, root in mounts:
            subprocess.run(["umount", str(root)], check=False)
        subprocess.run(["umount", str(world_tmp / "plain-r")], check=False,
                       stderr=subprocess.DEVNULL)
