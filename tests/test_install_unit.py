"""Installed like software, and run by systemd: ``pip install .`` into a new
virtual environment gives working commands, man pages and the unit; the
command lines of ``simfs@.service`` mount, recover a killed daemon and stop
(run here by hand, since there is no systemd as PID 1); ``mount -o remount``.

Exactness after recovery is checked against ``du``/``find``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from conftest import BIN, SIMFS, is_mountpoint, vzquota
from vzquota import control

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "simfs@.service"
K = 1024
QID = "101"


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "--block-size=1", "-s", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[0])


def find_count(path: Path) -> int:
    return subprocess.run(["find", str(path)], check=True,
                          capture_output=True).stdout.count(b"\n")


def mountinfo_opts(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return next(ln for ln in f if ln.split()[4] == str(root)).split()[5].split(",")


# ---- pip install . ------------------------------------------------------------

@pytest.mark.slow
def test_pip_install_into_a_new_venv(fuse, tmp_path, area):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "fusewire", "simfs", "vzquota", "man",
                 "systemd", "logrotate"):
        p = REPO / name
        (shutil.copytree if p.is_dir() else shutil.copy)(p, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # The dependencies come from the test environment (no download).
    site = subprocess.run([str(venv / "bin/python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q",
                        "--no-deps", str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    vbin = venv / "bin"
    assert subprocess.run([str(vbin / "simfs"), "-V"], capture_output=True,
                          text=True).stdout.startswith("simfs ")
    assert subprocess.run([str(vbin / "vzquota"), "-V"], capture_output=True,
                          text=True).stdout.startswith("Vzquota version")   # version() of the original
    assert subprocess.run([str(vbin / "simfs-service")], capture_output=True).returncode == 2
    for page in ("simfs.8", "vzquota.8", "vzquota-metrics.8", "vzdqcheck.8", "vzdqdump.8",
                 "vzdqload.8"):
        assert (venv / "share/man/man8" / page).read_text() == (REPO / "man" / page).read_text()
    assert (venv / "share/simfs-vzquota/logrotate/simfs").read_text() == \
        (REPO / "logrotate/simfs").read_text()
    for unit in ("simfs@.service", "simfs-mountd.service", "simfs.target",
                 "vzquota-metrics.service", "vzquota-metrics.timer"):
        assert (venv / "lib/systemd/system" / unit).read_text() == \
            (REPO / "systemd" / unit).read_text()
    gen = venv / "lib/systemd/system-generators/simfs-generator"
    assert gen.read_text() == (REPO / "systemd/simfs-generator").read_text()
    assert os.access(gen, os.X_OK)
    for example in (REPO / "systemd/examples").iterdir():
        assert (venv / "share/doc/simfs-vzquota/examples" / example.name).read_text() == \
            example.read_text()
    # mount(8)'s helper calling convention, a real mount, a clean stop
    private, root = area
    (private / "f").write_text("hello")
    r = subprocess.run([str(vbin / "mount.fuse.simfs"), str(private), str(root), "-n",
                        "-o", "rw,dev,suid"], capture_output=True, text=True, timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        assert is_mountpoint(str(root))
        assert (root / "f").read_text() == "hello"
        assert "nodev" not in mountinfo_opts(root)
        # the default binding is the project's own: no libfuse, no pyfuse3 mapped
        pid = int(Path(os.environ.get("VZQUOTA_RUNDIR", "/run/vzquota"),
                       "private-%d-%d.lock" % (os.stat(private).st_dev,
                                               os.stat(private).st_ino)).read_text())
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "simfs" in Path(f"/proc/{pid}/cmdline").read_text()
        assert "libfuse3" not in maps and "pyfuse3" not in maps
    finally:
        subprocess.run(["umount", str(root)], check=False)
    assert not is_mountpoint(str(root))


def test_system_commands_do_not_point_into_this_checkout():
    """tools/setup.sh installs a copy: moving the checkout breaks no mount."""
    for tool in ("simfs", "vzquota", "simfs-service"):
        path = shutil.which(tool, path="/usr/local/sbin")
        assert path is not None, f"{tool} is not installed (run tools/setup.sh)"
        assert not os.path.realpath(path).startswith(str(REPO) + "/"), path


# ---- the systemd unit -----------------------------------------------------------

def unit_lines(key: str, qid: str, mainpid: int | None = None) -> list[str]:
    """The command of ``key=`` in the unit, for instance ``qid``, with the
    installed path replaced by this environment's."""
    for line in UNIT.read_text().splitlines():
        if line.startswith(key + "="):
            cmd = line.split("=", 1)[1].replace("%i", qid)
            if mainpid is not None:
                cmd = cmd.replace("$MAINPID", str(mainpid))
            words = cmd.split()
            assert words[0].startswith("/usr/local/sbin/")
            words[0] = str(BIN / Path(words[0]).name)
            return words
    raise AssertionError(f"no {key}= in {UNIT}")


def test_unit_file_shape():
    text = UNIT.read_text()
    for want in ("Type=notify", "Restart=on-failure", "ExecStartPre=", "ExecStop=",
                 "WantedBy=multi-user.target"):
        assert want in text, want


class Notify:
    """A NOTIFY_SOCKET that collects what the service tells systemd."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def wait_ready(self, proc: subprocess.Popen, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the service exited with {proc.returncode}"
            self.sock.settimeout(0.2)
            try:
                msg = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            if "READY=1" in msg:
                return msg
        raise AssertionError("no READY=1 from the service")


def test_unit_mounts_recovers_a_killed_daemon_and_stops(fuse, area, tmp_path, monkeypatch):
    private, root = area
    conf = tmp_path / "etc-simfs"
    conf.mkdir()
    (conf / f"{QID}.conf").write_text(f"# container {QID}\nROOT={root}\n"
                                      "OPTIONS=dev,suid,checkpoint=3600\n")
    monkeypatch.setenv("SIMFS_CONFDIR", str(conf))
    vzquota("init", QID, "-p", str(private), "-b", "100000", "-B", "120000",
            "-i", "1000", "-I", "1200", "-e", "1d", "-n", "1d")
    notify = Notify(tmp_path / "notify")
    env = dict(os.environ, NOTIFY_SOCKET=str(notify.path))
    logf = open(tmp_path / "service.log", "ab")
    procs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        r = subprocess.run(unit_lines("ExecStartPre", QID), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        p = subprocess.Popen(unit_lines("ExecStart", QID), env=env, stdout=logf,
                             stderr=logf, stdin=subprocess.DEVNULL)
        procs.append(p)
        notify.wait_ready(p)
        assert is_mountpoint(str(root))
        return p, r.stderr

    try:
        p, _ = start()
        assert "nodev" not in mountinfo_opts(root)
        for i in range(10):
            (root / f"f{i}").write_bytes(b"x" * (20 * K))
        p.send_signal(signal.SIGKILL)          # the daemon crashes
        assert p.wait() == -signal.SIGKILL     # Restart=on-failure applies
        (private / "from-host").write_bytes(b"y" * (30 * K))
        p, said = start()                      # what systemd does next
        assert f"{root} is a dead mount" in said
        assert f"Incorrect quota shutdown for id {QID}" in said
        state = control.request(int(QID), "stat", save=False)["state"]
        assert state["level1"][0][0] == du_bytes(private)
        assert state["level1"][1][0] == find_count(private)
        r = subprocess.run(unit_lines("ExecStop", QID, p.pid), capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert p.poll() == 0                   # stop waited for a clean exit
        assert not is_mountpoint(str(root))
        assert list(Path(os.environ["VZQUOTA_RUNDIR"]).iterdir()) == []
        show = vzquota("-b", "show", QID).stdout.split()
        assert int(show[0]) == -(-du_bytes(private) // K)
        # started again after a clean stop: "already running" is not an error
        p, said = start()
        assert "Incorrect" not in said
        r = subprocess.run(unit_lines("ExecStop", QID, p.pid), capture_output=True, text=True)
        assert r.returncode == 0 and p.poll() == 0
    finally:
        logf.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if is_mountpoint(str(root)):
            subprocess.run(["umount", "-l", str(root)], check=False)
        notify.sock.close()
    text = (tmp_path / "service.log").read_text()
    assert "Traceback" not in text, text


def test_unit_config_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMFS_CONFDIR", str(tmp_path))
    cmd = unit_lines("ExecStartPre", "7")
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "cannot read" in r.stderr and "7.conf" in r.stderr
    (tmp_path / "7.conf").write_text("PRIVATE=/nowhere\n")
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "ROOT=" in r.stderr
    (tmp_path / "7.conf").write_text("ROOT=/x\nBOGUS=1\n")
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "7.conf:2" in r.stderr
    assert "Traceback" not in r.stderr


# ---- remount ----------------------------------------------------------------------

def test_remount_ro_and_rw(mounter, area):
    private, root = area
    mounter(private, root, "dev", "suid")
    (root / "a").write_text("a")
    # what fuse3's mount helper hands to simfs on `mount -o remount,ro`
    r = subprocess.run([SIMFS, "/dev/simfs", str(root), "-o",
                        "rw,remount,ro,user_id=0,group_id=0,allow_other"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    opts = mountinfo_opts(root)
    assert "ro" in opts and "nodev" not in opts and "nosuid" not in opts
    with pytest.raises(OSError) as e:
        (root / "b").write_text("b")
    assert e.value.errno == 30                 # EROFS
    assert (root / "a").read_text() == "a"     # still serving
    # through fuse3's mount helper, which mount(8) runs for `mount -o remount,rw`
    # when /sbin/mount.fuse.simfs is missing (tools/setup.sh links it there)
    helper = shutil.which("mount.fuse3", path="/sbin:/usr/sbin")
    assert helper, "fuse3's mount helper is missing (apt-get install fuse3)"
    r = subprocess.run([helper, "/dev/simfs", str(root), "-t", "fuse.simfs",
                        "-o", "remount,rw"], capture_output=True, text=True,
                       env=dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}"))
    assert r.returncode == 0, r.stderr
    assert "rw" in mountinfo_opts(root)
    (root / "b").write_text("b")
    r = subprocess.run([SIMFS, "x", str(root), "-o", "remount,quotaid=5,max_write=1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "remount cannot change max_write=1" in r.stderr
