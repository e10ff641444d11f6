"""The mount service (``simfs --service``): a mount served by one of its forked
children behaves as one served by a standalone daemon, a crash of one mount
leaves the others alone, and without the service ``simfs`` starts its own.
Also the short CI runs of ``tools/density`` and ``tools/webbench``.

Exactness is checked against ``du``/``find``, not the project's scanner.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SIMFS, is_mountpoint, py_as, vzquota
from vzquota import control
from vzquota.qfile import QuotaFile, state_to_dict

K = 1024
TOOLS = Path(__file__).resolve().parent.parent / "tools"


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "--block-size=1", "-s", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[0])


def find_count(path: Path) -> int:
    """Inodes under ``path`` (hard links once)."""
    out = subprocess.run(["find", str(path), "-printf", r"%i\n"], check=True,
                         capture_output=True).stdout
    return len(set(out.split()))


def wait_for(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def daemon_pid(qid: int) -> int:
    with open(control.lock_path(qid)) as f:
        return int(f.read().split()[0])


class Service:
    def __init__(self, log: Path):
        self.log = log
        logf = open(log, "ab")
        self.proc = subprocess.Popen([SIMFS, "--service"], stdin=subprocess.DEVNULL,
                                     stdout=logf, stderr=logf, start_new_session=True)
        logf.close()
        sock = os.path.join(control.run_dir(), "simfs.sock")
        wait_for(lambda: os.path.exists(sock) or self.proc.poll() is not None,
                 "the service's socket")
        assert self.proc.poll() is None, log.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(30)


@pytest.fixture
def service(fuse, world_tmp, tmp_path):
    s = Service(tmp_path / "service.log")
    yield s
    s.stop()
    text = s.log.read_text(errors="replace")
    assert "Traceback" not in text and " ERROR " not in text, text


def simfs(*args: str, standalone: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if standalone:
        env["SIMFS_SERVICE"] = "0"
    return subprocess.run([SIMFS, *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=60)


def areas(top: Path, n: int) -> list[tuple[Path, Path]]:
    out = []
    for i in range(1, n + 1):
        p, r = top / f"private{i}", top / f"root{i}"
        p.mkdir()
        r.mkdir()
        out.append((p, r))
    return out


def file_state(qid: int) -> dict:
    return state_to_dict(QuotaFile.for_id(qid).load())


def init_on(qid: int, private: Path) -> None:
    vzquota("init", str(qid), "-p", str(private), "-b", "1000", "-B", "1200",
            "-i", "1000", "-I", "1200", "-e", "1d", "-n", "1d", "-s", "1", "-u", "20")
    vzquota("on", str(qid))


def life(qid: int, private: Path, root: Path, standalone: bool) -> dict:
    """One container's life through ``simfs`` (daemon mode): mount, write as
    root and as a user, hit the hard limit, stop with umount.  Returns what a
    user sees, to compare between the two paths."""
    r = simfs(str(private), str(root), "-o", f"dev,suid,quotaid={qid}", standalone=standalone)
    assert r.returncode == 0, r.stderr
    assert is_mountpoint(str(root))
    pid = daemon_pid(qid)
    os.chmod(root, 0o1777)
    (root / "a").write_bytes(b"x" * 50 * K)
    w = py_as(1001, 1001, "import sys; open(sys.argv[1], 'wb').write(b'y' * 20480)",
              str(root / "b"))
    assert w.returncode == 0, w.stderr
    os.mkdir(root / "d")
    (root / "d" / "c").write_bytes(b"z" * 7000)
    os.link(root / "a", root / "d" / "hard")
    full = py_as(0, 0, "import os, sys\n"
                 "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT)\n"
                 "n = 0\n"
                 "try:\n"
                 "    while n < 1 << 30: n += os.write(fd, b'q' * 65536)\n"
                 "except OSError as e: print(e.errno, n)\n", str(root / "big"))
    live = control.request(qid, "stat", save=False)["state"]
    statfs = os.statvfs(root)
    stat_t = vzquota("stat", str(qid), "-t").stdout
    exact_live = (live["level1"][0][0], live["level1"][1][0]) == (du_bytes(private),
                                                                   find_count(private))
    users = {row[0]: row[1][0] > 0 for row in live["users"]}
    assert subprocess.run(["umount", str(root)]).returncode == 0
    wait_for(lambda: not alive(pid), "the daemon to exit after umount")
    show = vzquota("show", str(qid)).stdout
    state = file_state(qid)

    def same(text: str) -> str:
        """The text without what differs between two containers: the id, the
        path, and the grace left (the two lives run seconds apart)."""
        text = text.replace(str(private), "PRIVATE").replace(str(qid), "ID")
        return re.sub(r"(?m)^(\s+(?:1k-blocks|inodes)\s+\S+\s+\S+\s+\S+).*$", r"\1", text)
    return {"full": full.stdout.split()[0], "statfs": (statfs.f_blocks, statfs.f_files),
            "stat_t": same(stat_t), "show": same(show),
            "exact_live": exact_live, "users": users, "mounted": state["mounted"],
            "exact_file": (state["level1"][0][0], state["level1"][1][0])
            == (du_bytes(private), find_count(private)),
            "locks": sorted(os.listdir(control.run_dir()))}


def test_service_and_standalone_behave_the_same(service, world_tmp):
    (p1, r1), (p2, r2) = areas(world_tmp, 2)
    init_on(7771, p1)
    init_on(7772, p2)
    # the first through a child of the service, the second through its own daemon
    r = simfs(str(p1), str(r1), "-o", "quotaid=7771")
    assert r.returncode == 0, r.stderr
    assert ppid(daemon_pid(7771)) == service.proc.pid
    assert subprocess.run(["umount", str(r1)]).returncode == 0
    wait_for(lambda: not os.path.exists(control.lock_path(7771)), "the lock file to go")
    via = life(7771, p1, r1, standalone=False)
    alone = life(7772, p2, r2, standalone=True)
    assert via["full"] == str(122)         # EDQUOT
    assert via["exact_live"] and via["exact_file"] and not via["mounted"]
    assert via == alone


def test_errors_are_the_same_through_the_service(service, world_tmp):
    (p1, r1), (p2, r2) = areas(world_tmp, 2)
    init_on(1, p1)
    cases = [
        (str(world_tmp / "nope"), str(r1), "-o", "quotaid=1"),
        (str(p2), str(r2), "-o", "quotaid=7"),                  # no quota file
        (str(p1), str(world_tmp / "nope"), "-o", "quotaid=1"),
        (str(p1), str(r1), "-o", "quotaid=1,bogus"),             # usage: exit 2
        (str(p1), str(r1), "-o", "quota_admin"),                 # usage: no quotaid
        (str(p1), str(r1), "-o", "maxopen=1"),                   # usage: out of range
    ]
    for args in cases:
        a = simfs(*args)
        b = simfs(*args, standalone=True)
        assert (a.returncode, a.stderr) == (b.returncode, b.stderr), args
        assert a.returncode in (1, 2) and a.stderr.startswith("simfs: "), a.stderr
        if args[-1] in ("quotaid=1,bogus", "quota_admin", "maxopen=1"):
            assert a.returncode == 2, args          # the service's child says usage
        assert "Traceback" not in a.stderr
    # a second mount of the same id is refused the same way, and the first
    # mount is untouched
    assert simfs(str(p1), str(r1), "-o", "quotaid=1").returncode == 0
    a = simfs(str(p1), str(r2), "-o", "quotaid=1")
    b = simfs(str(p1), str(r2), "-o", "quotaid=1", standalone=True)
    assert a.returncode == b.returncode == 1 and a.stderr == b.stderr, (a.stderr, b.stderr)
    (r1 / "f").write_bytes(b"1" * 4096)
    assert control.request(1, "stat", save=False)["state"]["level1"][0][0] == du_bytes(p1)
    assert subprocess.run(["umount", str(r1)]).returncode == 0


def test_a_crash_takes_down_one_mount_only(service, world_tmp):
    pairs = areas(world_tmp, 3)
    for qid, (p, r) in enumerate(pairs, 1):
        init_on(qid, p)
        assert simfs(str(p), str(r), "-o", f"quotaid={qid}").returncode == 0
        (r / "f").write_bytes(b"x" * (qid * 10 * K))
    pids = [daemon_pid(q) for q in (1, 2, 3)]
    assert all(ppid(p) == service.proc.pid for p in pids)
    os.kill(pids[1], signal.SIGKILL)
    wait_for(lambda: not alive(pids[1]), "the killed daemon to go")
    with pytest.raises(OSError):
        os.stat(pairs[1][1] / "f")
    subprocess.run(["umount", "-l", str(pairs[1][1])], check=True)
    # the others and the service go on
    for qid in (1, 3):
        p, r = pairs[qid - 1]
        assert (r / "f").read_bytes() == b"x" * (qid * 10 * K)
        (r / "g").write_bytes(b"y" * 5000)
        st = control.request(qid, "stat", save=False)["state"]
        assert (st["level1"][0][0], st["level1"][1][0]) == (du_bytes(p), find_count(p))
    assert service.proc.poll() is None
    # the crashed one mounts again through the service and recounts
    p, r = pairs[1]
    (p / "written-while-down").write_bytes(b"z" * 9000)
    m = simfs(str(p), str(r), "-o", "quotaid=2")
    assert m.returncode == 0, m.stderr
    st = control.request(2, "stat", save=False)["state"]
    assert (st["level1"][0][0], st["level1"][1][0]) == (du_bytes(p), find_count(p))
    for _, r in pairs:
        assert subprocess.run(["umount", str(r)]).returncode == 0


def test_signals_reach_a_child_as_a_standalone_daemon(service, world_tmp):
    (p, r), = areas(world_tmp, 1)
    init_on(1, p)
    assert simfs(str(p), str(r), "-o", "quotaid=1").returncode == 0
    (r / "f").write_bytes(b"x" * 3000)
    pid = daemon_pid(1)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not alive(pid), "the daemon to stop on SIGTERM")
    wait_for(lambda: not is_mountpoint(str(r)), "the mount to go")
    st = file_state(1)
    assert not st["mounted"]                # a clean stop, as a standalone daemon's
    assert (st["level1"][0][0], st["level1"][1][0]) == (du_bytes(p), find_count(p))
    assert control.request(1, "stat", save=False) is None


def test_without_the_service_simfs_runs_its_own_daemon(service, world_tmp):
    (p1, r1), (p2, r2) = areas(world_tmp, 2)
    init_on(1, p1)
    init_on(2, p2)
    assert simfs(str(p1), str(r1), "-o", "quotaid=1").returncode == 0
    assert service.stop() == 0
    assert not os.path.exists(os.path.join(control.run_dir(), "simfs.sock"))
    # the mount it started goes on
    (r1 / "f").write_bytes(b"x" * 8000)
    st = control.request(1, "stat", save=False)["state"]
    assert st["level1"][0][0] == du_bytes(p1)
    # a new mount falls back to a daemon of its own
    assert simfs(str(p2), str(r2), "-o", "quotaid=2").returncode == 0
    assert ppid(daemon_pid(2)) != service.proc.pid
    for r in (r1, r2):
        assert subprocess.run(["umount", str(r)]).returncode == 0


def test_only_root_may_ask_the_service(service, world_tmp):
    sock = os.path.join(control.run_dir(), "simfs.sock")
    assert os.stat(sock).st_mode & 0o777 == 0o600
    r = py_as(1001, 1001, "import socket, sys\n"
              "s = socket.socket(socket.AF_UNIX)\n"
              "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n    print(e.errno)\n",
              sock)
    assert r.stdout.strip() in ("13", "1"), r.stdout + r.stderr     # EACCES / EPERM
    second = subprocess.run([SIMFS, "--service"], capture_output=True, text=True, timeout=60)
    assert second.returncode == 1 and "already runs" in second.stderr


# The service as ``simfs --service`` runs it, but with os.chmod doing nothing:
# what bind itself made is what others could see until a chmod came.
NO_CHMOD = ("import os, sys\n"
            "os.chmod = lambda *a, **k: None\n"
            "from simfs.cli import main\n"
            "sys.argv[0] = 'simfs'\n"
            "sys.exit(main())\n")


def test_the_service_socket_is_never_wider_than_0600(fuse, world_tmp, tmp_path):
    """The socket is bound with mode 0600, whatever the umask: it was bound
    and then chmod'ed, so for a moment it had the umask's 0755 (seen once by
    test_only_root_may_ask_the_service).  Here the chmod does nothing and the
    umask is 022: the socket's first mode is what bind gave it."""
    sock = os.path.join(control.run_dir(), "simfs.sock")
    with open(tmp_path / "service.log", "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-c", NO_CHMOD, "--service"],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True, umask=0o022)
    try:
        modes = set()
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                modes.add(os.stat(sock).st_mode & 0o777)
            except FileNotFoundError:
                continue
            if is_listening(sock):
                break
        assert proc.poll() is None, (tmp_path / "service.log").read_text()
        assert modes == {0o600}, [oct(m) for m in modes]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_bind_private_ignores_the_umask(tmp_path):
    import socket
    old = os.umask(0)
    try:
        s = socket.socket(socket.AF_UNIX)
        control.bind_private(s, str(tmp_path / "s"))
        s.close()
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "s").st_mode & 0o777 == 0o600


def is_listening(path: str) -> bool:
    import socket
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def run_tool(name: str, *args: str) -> dict:
    r = subprocess.run([sys.executable, str(TOOLS / name), *args, "--json"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["service", "standalone"])
def test_density_short(fuse, mode):
    d = run_tool("density", "-n", "10", "-j", "5", "--rounds", "1", "--settle", "0",
                 "--mode", mode)
    assert d["exact_live"] == d["exact_file"] == 10
    assert d["pss_idle"][0] > 0 and d["ready_alone"][1] > 0


def test_webbench_short(fuse):
    d = run_tool("webbench", "-n", "4", "-d", "2", "--passthrough")
    assert d["rpm_native"] > 0 and d["rpm_simfs"] > 0 and d["rpm_simfs+pt"] > 0
    assert d["ratio_pt"] > 0
    assert d["exact_live"] == d["exact_file"] == 4     # (the passthrough run's, and
    # any inexact quota of either run fails the tool: exit 1)
