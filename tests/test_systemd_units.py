"""The systemd units, checked without booting a systemd: ``systemd-analyze
verify`` reads every unit as the installed manager would (syntax, known keys,
the executables in place), and the command lines of ``simfs-mountd.service``
(the mount service) and ``simfs@.service`` (one container root through it) run
here for real, as systemd would run them, with a NOTIFY_SOCKET of the test's
own: READY=1 once mounted, a killed daemon seen by the unit's watcher (exit 1,
so Restart=on-failure mounts again), the service stopped the way
``KillMode=process`` stops it (its main process only) with the mounts going
on, and a clean stop.  ``simfs-generator`` (simfs.target wants every
configured root) runs on a config directory of the test's.  Exactness after
the restart is checked against ``du``/``find``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from conftest import BIN, is_mountpoint, vzquota
from vzquota import control

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
K = 1024
QID = "101"


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "--block-size=1", "-s", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[0])


def find_count(path: Path) -> int:
    return subprocess.run(["find", str(path)], check=True,
                          capture_output=True).stdout.count(b"\n")


def unit_keys(name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def command(name: str, key: str, qid: str = QID, mainpid: int | None = None) -> list[str]:
    """The command of ``key=`` in unit ``name``, for instance ``qid``, with
    the installed path replaced by this environment's."""
    (cmd,) = unit_keys(name)[key]
    cmd = cmd.replace("%i", qid)
    if mainpid is not None:
        cmd = cmd.replace("$MAINPID", str(mainpid))
    words = cmd.split()
    assert words[0].startswith("/usr/local/sbin/")
    words[0] = str(BIN / Path(words[0]).name)
    return words


def test_systemd_analyze_verify(tmp_path):
    """Every unit as systemd reads it (the installed commands must exist:
    tools/setup.sh puts them in /usr/local/sbin)."""
    assert shutil.which("systemd-analyze"), ("systemd-analyze is missing (package systemd, "
                                             "which tools/setup.sh --test installs with "
                                             "systemd-container)")
    for f in UNITS.iterdir():
        if f.suffix in (".service", ".target", ".timer"):
            shutil.copy(f, tmp_path / f.name)
    shutil.copy(UNITS / "simfs@.service", tmp_path / f"simfs@{QID}.service")
    names = [f"./{n}" for n in ("simfs-mountd.service", f"simfs@{QID}.service",
                                "simfs.target", "vzquota-metrics.service",
                                "vzquota-metrics.timer")]
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *names], cwd=tmp_path,
                       capture_output=True, text=True,
                       env=dict(os.environ, SYSTEMD_LOG_LEVEL="notice"))
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    # and it does catch a broken unit
    bad = tmp_path / "simfs-mountd.service"
    bad.write_text(bad.read_text().replace("/usr/local/sbin/simfs ", "/nonexistent/simfs "))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", "./simfs-mountd.service"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and "/nonexistent/simfs" in r.stderr


def test_unit_shapes():
    svc = unit_keys("simfs-mountd.service")
    assert svc["KillMode"] == ["process"]          # stopping it takes no root down
    assert svc["Type"] == ["notify"] and svc["ExecStart"][0].endswith("simfs --service")
    inst = unit_keys("simfs@.service")
    assert inst["Type"] == ["notify"] and inst["Restart"] == ["on-failure"]
    assert "simfs-mountd.service" in inst["Wants"][0]
    assert "simfs-mountd.service" in " ".join(inst["After"])
    target = unit_keys("simfs.target")
    assert target["WantedBy"] == ["multi-user.target"]
    for example in (UNITS / "examples").iterdir():
        keys = unit_keys(f"examples/{example.name}")
        assert keys.get("After"), example


def test_generator_wants_every_configured_root(tmp_path):
    """simfs-generator, installed as setup.sh installs it (next to the units),
    makes simfs.target want simfs@ID for each /etc/simfs/ID.conf."""
    lib = tmp_path / "lib/systemd"
    (lib / "system").mkdir(parents=True)
    (lib / "system-generators").mkdir()
    shutil.copy(UNITS / "simfs@.service", lib / "system")
    gen = lib / "system-generators/simfs-generator"
    shutil.copy(UNITS / "simfs-generator", gen)
    conf = tmp_path / "etc-simfs"
    conf.mkdir()
    for name in ("101.conf", "7.conf", "0101.conf", "abc.conf", "12.conf.bak", "5"):
        (conf / name).write_text("ROOT=/vz/root/x\n")
    out = tmp_path / "out"
    for d in ("normal", "early", "late"):
        (out / d).mkdir(parents=True)
    r = subprocess.run([str(gen), str(out / "normal"), str(out / "early"), str(out / "late")],
                       env=dict(os.environ, SIMFS_CONFDIR=str(conf)), capture_output=True,
                       text=True)
    assert r.returncode == 0 and not r.stdout and not r.stderr, r.stderr
    wants = out / "normal/simfs.target.wants"
    assert sorted(p.name for p in wants.iterdir()) == ["simfs@101.service",
                                                      "simfs@7.service"]
    for p in wants.iterdir():
        assert os.readlink(p) == str(lib / "system/simfs@.service")
    assert not any((out / "early").iterdir()) and not any((out / "late").iterdir())
    # no config directory: nothing, and no failure at boot
    r = subprocess.run([str(gen), str(tmp_path / "none")],
                       env=dict(os.environ, SIMFS_CONFDIR=str(tmp_path / "missing")))
    assert r.returncode == 0 and not (tmp_path / "none").exists()


class Notify:
    """A NOTIFY_SOCKET that collects what a unit's process tells systemd."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)

    def wait_ready(self, proc: subprocess.Popen, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the unit's process exited with {proc.returncode}"
            try:
                msg = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            if "READY=1" in msg:
                return msg
        raise AssertionError("no READY=1")

    def quiet(self) -> list[str]:
        """What else arrived (nothing may: the daemon is not the main process)."""
        got = []
        self.sock.settimeout(0.05)
        try:
            while True:
                got.append(self.sock.recv(4096).decode())
        except socket.timeout:
            pass
        self.sock.settimeout(0.2)
        return got


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def pss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("Pss:"))


def daemon_pid(qid: str) -> int:
    with open(control.lock_path(int(qid))) as f:
        return int(f.read().split()[0])


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_trap(pid: int) -> None:
    """Until the watcher's shell catches SIGTERM (its trap is set)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(ln.split()[1], 16) for ln in f if ln.startswith("SigCgt:"))
        if caught & (1 << (signal.SIGTERM - 1)):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"simfs-watch" in f.read():
                    return
        time.sleep(0.01)
    raise AssertionError("the watcher's shell never set its trap")


def test_units_mount_through_the_service(fuse, area, tmp_path, monkeypatch):
    private, root = area
    conf = tmp_path / "etc-simfs"
    conf.mkdir()
    (conf / f"{QID}.conf").write_text(f"ROOT={root}\nOPTIONS=dev,suid,checkpoint=3600\n")
    monkeypatch.setenv("SIMFS_CONFDIR", str(conf))
    vzquota("init", QID, "-p", str(private), "-b", "100000", "-B", "120000",
            "-i", "1000", "-I", "1200", "-e", "1d", "-n", "1d", "-s", "1", "-u", "20")
    svc_notify = Notify(tmp_path / "svc-notify")
    notify = Notify(tmp_path / "notify")
    logf = open(tmp_path / "units.log", "ab")
    procs: list[subprocess.Popen] = []

    def run(cmd: list[str], sock: Notify) -> subprocess.Popen:
        p = subprocess.Popen(cmd, env=dict(os.environ, NOTIFY_SOCKET=str(sock.path)),
                             stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        procs.append(p)
        return p

    def start() -> tuple[subprocess.Popen, str]:
        r = subprocess.run(command("simfs@.service", "ExecStartPre"), capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        p = run(command("simfs@.service", "ExecStart"), notify)
        notify.wait_ready(p)
        assert is_mountpoint(str(root))
        return p, r.stderr

    try:
        service = run(command("simfs-mountd.service", "ExecStart"), svc_notify)
        assert "READY=1" in svc_notify.wait_ready(service)
        watcher, _ = start()
        daemon = daemon_pid(QID)
        assert parent(daemon) == service.pid      # a fork of the service ...
        assert daemon != watcher.pid              # ... watched by the unit's process
        assert notify.quiet() == []               # READY=1 came from the main process only
        # the watcher is a shell and a tail: a container costs its daemon's
        # memory, not a second Python (READY=1 comes before the exec: wait
        # until the shell runs, or a loaded machine measures the Python)
        wait_for_trap(watcher.pid)
        kids = Path(f"/proc/{watcher.pid}/task/{watcher.pid}/children").read_text().split()
        watch_kb = pss_kb(watcher.pid) + sum(pss_kb(int(k)) for k in kids)
        assert watch_kb < 1.5 * K, watch_kb
        assert "nodev" not in open("/proc/self/mountinfo").read().split(str(root), 1)[1] \
            .split("\n", 1)[0]
        for i in range(10):
            (root / f"f{i}").write_bytes(b"x" * (20 * K))

        # the daemon crashes: the watcher fails, so Restart=on-failure applies
        os.kill(daemon, signal.SIGKILL)
        assert watcher.wait(30) == 1              # within tail's second
        assert "died and left a dead mount" in (tmp_path / "units.log").read_text()
        (private / "from-host").write_bytes(b"y" * (30 * K))
        watcher, said = start()                    # what systemd does next
        assert f"{root} is a dead mount" in said
        assert f"Incorrect quota shutdown for id {QID}" in said
        daemon = daemon_pid(QID)
        assert parent(daemon) == service.pid
        state = control.request(int(QID), "stat", save=False)["state"]
        assert state["level1"][0][0] == du_bytes(private)
        assert state["level1"][1][0] == find_count(private)

        # systemctl stop simfs-mountd: KillMode=process signals its main process only
        service.send_signal(signal.SIGTERM)
        assert service.wait(30) == 0
        assert alive(daemon) and watcher.poll() is None
        (root / "after-service-stop").write_bytes(b"z" * (10 * K))
        assert os.statvfs(root).f_blocks > 0

        # systemctl stop simfs@101: ExecStop, then the main process ends by itself
        r = subprocess.run(command("simfs@.service", "ExecStop", mainpid=watcher.pid),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert watcher.poll() == 0 and not alive(daemon)
        assert not is_mountpoint(str(root))
        show = vzquota("-b", "show", QID).stdout.split()
        assert int(show[0]) == -(-du_bytes(private) // K)

        # without the service the unit still mounts (simfs -f is the main
        # process); SIGTERM, as systemd sends it after a busy umount, stops it
        watcher, _ = start()
        assert daemon_pid(QID) == watcher.pid
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(60) == 0
        assert not is_mountpoint(str(root))

        # with the service back, SIGTERM to the watcher reaches the daemon
        service = run(command("simfs-mountd.service", "ExecStart"), svc_notify)
        svc_notify.wait_ready(service)
        watcher, _ = start()
        daemon = daemon_pid(QID)
        assert parent(daemon) == service.pid
        wait_for_trap(watcher.pid)
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(60) == 0
        assert not alive(daemon) and not is_mountpoint(str(root))
        assert int(vzquota("-b", "show", QID).stdout.split()[0]) == -(-du_bytes(private) // K)

        # a busy root: ExecStop's umount fails, the daemon detaches it lazily
        watcher, _ = start()
        daemon = daemon_pid(QID)
        busy = open(root / "f1", "rb")
        try:
            r = subprocess.run(command("simfs@.service", "ExecStop", mainpid=watcher.pid),
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0 and f"SIGTERM to its daemon (pid {daemon})" in r.stderr
            assert watcher.wait(30) == 0 and not alive(daemon)
            assert not is_mountpoint(str(root))
        finally:
            busy.close()
        assert int(vzquota("-b", "show", QID).stdout.split()[0]) == -(-du_bytes(private) // K)
    finally:
        logf.close()
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if is_mountpoint(str(root)):
            subprocess.run(["umount", "-l", str(root)], check=False)
        notify.sock.close()
        svc_notify.sock.close()
    text = (tmp_path / "units.log").read_text()
    assert "Traceback" not in text, text
