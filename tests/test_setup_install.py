"""Issue 18 item 14: what tools/setup.sh installs.  Its whole install path run
into a temporary prefix (SIMFS_PREFIX for the environment, SIMFS_DESTDIR for
the links and the copy): every command linked, ``man -w`` finds every page
(vzdqcheck, vzdqdump and vzdqload included) and man renders them, the logrotate
file is a root-owned copy that ``logrotate -d`` accepts; logrotate's
copytruncate rotates the log of a live daemon, which goes on writing at the
new end; and the README names every package setup.sh may install."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SETUP = REPO / "tools" / "setup.sh"
TOOLS = ("simfs", "vzquota", "simfs-service", "mount.fuse.simfs", "vzquota-metrics",
         "vzdqcheck", "vzdqdump", "vzdqload")
PAGES = ("simfs", "vzquota", "vzquota-metrics", "vzdqcheck", "vzdqdump", "vzdqload")


def test_readme_lists_every_package_setup_installs():
    r = subprocess.run(["bash", str(SETUP), "--packages"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pkgs = r.stdout.split()
    for want in ("fuse3", "man-db", "logrotate", "systemd-container", "debootstrap",
                 "busybox", "gcc", "dbench"):
        assert want in pkgs, (want, pkgs)
    readme = (REPO / "README.md").read_text()
    section = readme.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    missing = [p for p in pkgs if f"`{p}`" not in section]
    assert not missing, f"README's 'The two commands' does not name: {missing}"
    # and every package the script names in an apt_install line is in --packages
    text = SETUP.read_text()
    arrays = re.findall(r"^\w+_pkgs=\(([^)]*)\)", text, re.M)
    named = {w for a in arrays for w in a.split() if not w.startswith("#")}
    assert named <= set(pkgs), named - set(pkgs)


@pytest.mark.slow
def test_install_path_into_a_temp_prefix(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("tools/setup.sh runs as root")
    for tool in ("man", "logrotate"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing: tools/setup.sh installs it (man-db, logrotate)")
    env, dest = tmp_path / "env", tmp_path / "root"
    r = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "SIMFS_PREFIX": str(env),
                            "SIMFS_DESTDIR": str(dest)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"installing {dest}/etc/logrotate.d/simfs" in r.stdout, r.stdout
    sbin = dest / "usr/local/sbin"
    for tool in TOOLS:
        assert os.readlink(sbin / tool) == str(env / "bin" / tool), tool
        assert os.access(sbin / tool, os.X_OK), tool
    # mount(8) looks for /sbin/mount.TYPE: without ours there it runs fuse3's
    # helper, which adds dev,suid
    helper = dest / "sbin/mount.fuse.simfs"
    assert os.readlink(helper) == str(env / "bin/mount.fuse.simfs")
    assert os.access(helper, os.X_OK)
    # man finds and renders every page from the installed tree
    manpath = dest / "usr/local/share/man"
    for page in PAGES:
        w = subprocess.run(["man", "-M", str(manpath), "-w", page], capture_output=True,
                           text=True)
        link = manpath / "man8" / f"{page}.8"
        assert os.readlink(link) == str(env / "share/man/man8" / f"{page}.8"), page
        name = "vzdqdump" if page == "vzdqload" else page      # .so man8/vzdqdump.8
        assert w.returncode == 0 and os.path.realpath(w.stdout.strip()) == \
            os.path.realpath(manpath / "man8" / f"{name}.8"), (page, w.stdout, w.stderr)
        out = subprocess.run(["man", "-M", str(manpath), "-P", "cat", page],
                             capture_output=True, text=True,
                             env={**os.environ, "MANWIDTH": "80"})
        assert out.returncode == 0, (page, out.stderr)
        assert name.upper() in out.stdout.split("\n", 1)[0].upper(), (page, out.stdout[:200])
        assert page in out.stdout, page
    # the units and the generator: copies, not links into the environment
    units = dest / "usr/local/lib/systemd/system"
    for unit in ("simfs@.service", "simfs-mountd.service", "simfs.target",
                 "vzquota-metrics.service", "vzquota-metrics.timer"):
        assert stat.S_ISREG(os.lstat(units / unit).st_mode), unit
        assert (units / unit).read_text() == (REPO / "systemd" / unit).read_text(), unit
    gen = dest / "usr/local/lib/systemd/system-generators/simfs-generator"
    assert stat.S_ISREG(os.lstat(gen).st_mode) and os.access(gen, os.X_OK)
    # the logrotate file: a root-owned copy (not a link into the environment)
    conf = dest / "etc/logrotate.d/simfs"
    st = os.lstat(conf)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o644
    assert conf.read_text() == (REPO / "logrotate" / "simfs").read_text()
    d = subprocess.run(["logrotate", "-d", "-s", str(tmp_path / "state"), str(conf)],
                       capture_output=True, text=True)
    assert d.returncode == 0, d.stdout + d.stderr
    assert "/var/log/simfs.log" in d.stdout + d.stderr and "error" not in \
        (d.stdout + d.stderr).lower(), d.stdout + d.stderr
    subprocess.run(["rm", "-rf", str(env), str(env) + ".lock"], check=False)


def test_logrotate_copytruncate_rotates_a_live_daemons_log(mounter, area, tmp_path):
    """The installed rule, pointed at a live mount's -o log=FILE: rotated while
    the daemon holds it, the daemon's next lines go to the truncated file from
    its start (O_APPEND: no hole of NULs), nothing before is lost."""
    private, root = area
    log = tmp_path / "daemon.log"
    m = mounter(private, root, f"log={log}")
    (root / "f").write_text("x")
    before = log.read_text()
    assert "mounted" in before
    conf = tmp_path / "rotate.conf"
    conf.write_text((REPO / "logrotate" / "simfs").read_text()
                    .replace("/var/log/simfs.log", str(log)))
    r = subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "state"), str(conf)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    rotated = tmp_path / "daemon.log.1"
    assert rotated.read_text() == before
    assert log.stat().st_size == 0
    assert m.umount() == 0                       # logs "unmounted ..."
    after = log.read_bytes()
    assert b"\0" not in after and b"unmounted" in after, after[:200]
    assert after.startswith(b"20"), after[:80]   # a timestamp from offset 0
