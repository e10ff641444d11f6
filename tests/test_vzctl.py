"""vzctl 4.x's own command lines, replayed through real mounts and unmounts.

The sequences are vzctl's (kolyshkin/vzctl, src/lib/quota.c and src/lib/fs.c):

* start, ``vps_quotaon``: ``vzquota show ID`` (11: ``vzquota init ID -b -B -i -I
  -p PRIVATE -e -n -s 0|1 [-u N]``), then ``quota_on``: ``vzquota on ID -b -B -i
  -I -e -n -s 0|1 [-u N]``; exit 11: init, once, and again; exit 5: ``vzquota
  setlimit ID -p PRIVATE -b -B -i -I -e -n [-u N]`` instead; then the mount;
* stop, ``fsumount``: ``umount ROOT``, then ``vzquota stat ID -f`` (quiet) and,
  when it says 0, ``vzquota off ID`` (exit 6 is fine).

A stop/start cycle must end with the quota the start asked for.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import backing as bk
from conftest import SIMFS, VZQUOTA, is_mountpoint, vzquota

QID = "101"

VZCTL = r'''
set -u
VZQUOTA="$1"; SIMFS="$2"; ID="$3"; PRIVATE="$4"; ROOT="$5"; UGIDLIMIT="$6"; STEP="$7"
DISKSPACE="100000 110000"; DISKINODES="1000 1100"; EXPTIME=600
set -- $DISKSPACE; B1=$1; B2=$2
set -- $DISKINODES; I1=$1; I2=$2

ugid_args() {       # is_2nd_level_quota_on(): a UGIDLIMIT other than 0
    if [ -n "$UGIDLIMIT" ] && [ "$UGIDLIMIT" != 0 ]; then echo "-s 1 -u $UGIDLIMIT";
    else echo "-s 0"; fi
}
quota_init() {
    $VZQUOTA init $ID -b $B1 -B $B2 -i $I1 -I $I2 -p $PRIVATE -e $EXPTIME -n $EXPTIME \
        $(ugid_args) || exit 20
}
quota_set() {
    if [ -n "$UGIDLIMIT" ] && [ "$UGIDLIMIT" != 0 ]; then U="-u $UGIDLIMIT"; else U=""; fi
    $VZQUOTA setlimit $ID -p $PRIVATE -b $B1 -B $B2 -i $I1 -I $I2 -e $EXPTIME \
        -n $EXPTIME $U || exit 21
}
start() {           # vps_quotaon() + quota_on(), then the mount
    $VZQUOTA show $ID >/dev/null 2>&1
    if [ $? -eq 11 ]; then quota_init; fi
    tried=0
    while :; do
        $VZQUOTA on $ID -b $B1 -B $B2 -i $I1 -I $I2 -e $EXPTIME -n $EXPTIME $(ugid_args)
        rc=$?
        if [ $rc -eq 11 ] && [ $tried -eq 0 ]; then tried=1; quota_init; continue; fi
        if [ $rc -eq 5 ]; then quota_set; rc=0; fi
        break
    done
    [ $rc -eq 0 ] || exit 22
    $SIMFS $PRIVATE $ROOT -o dev,suid,quotaid=$ID || exit 23
}
quotaon() {         # vzctl quotaon (vzmigrate on the new node): on, no mount
    $VZQUOTA on $ID -b $B1 -B $B2 -i $I1 -I $I2 -e $EXPTIME -n $EXPTIME $(ugid_args) \
        || exit 24
}
stop() {            # fsumount(): umount, then stat -f and off
    umount $ROOT || exit 30
    if $VZQUOTA stat $ID -f >/dev/null 2>&1; then
        $VZQUOTA off $ID
        rc=$?
        [ $rc -eq 0 ] || [ $rc -eq 6 ] || exit 31
    fi
}
$STEP
'''


def vzctl(step: str, private: Path, root: Path, ugidlimit: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", VZCTL, "vzctl", VZQUOTA, SIMFS, QID, str(private),
                           str(root), ugidlimit, step], capture_output=True, text=True)


def test_restart_with_a_2nd_level_switched_on(fuse, area):
    """The issue's run: a container started without UGIDLIMIT, stopped, started
    with UGIDLIMIT=100: the 2nd level must be on (stat -f -t exit 0), not left
    off by ``on`` -> 5 -> ``setlimit`` (no -s)."""
    private, root = area
    (private / "etc").mkdir()
    (private / "etc" / "f").write_bytes(b"x" * 8192)
    try:
        r = vzctl("start", private, root, "")
        assert r.returncode == 0, r.stdout + r.stderr
        assert vzquota("stat", QID, "-f", "-t", check=False).returncode == 9   # 2nd level off
        (root / "a").write_bytes(b"a" * 20000)
        r = vzctl("stop", private, root, "")
        assert (r.returncode, r.stderr) == (0, ""), r.stdout + r.stderr
        # after the clean unmount the quota is off, as vzctl's off left it
        assert vzquota("stat", QID, "-f", check=False).returncode == 6
        r = vzctl("start", private, root, "100")
        assert r.returncode == 0, r.stdout + r.stderr
        r = vzquota("stat", QID, "-f", "-t", check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "User/group quota: -,active\n" in r.stdout
        assert "limit 100\n" in r.stdout
        (root / "b").write_bytes(b"b" * 30000)
        bk.assert_usage_matches(private, QID)      # both levels equal the recount
        r = vzctl("stop", private, root, "100")
        assert (r.returncode, r.stderr) == (0, ""), r.stdout + r.stderr
        # and once more with the same parameters: on (not 5), same quota
        r = vzctl("start", private, root, "100")
        assert r.returncode == 0, r.stdout + r.stderr
        assert vzquota("stat", QID, "-t", check=False).returncode == 0
        bk.assert_usage_matches(private, QID)
        r = vzctl("stop", private, root, "100")
        assert (r.returncode, r.stderr) == (0, ""), r.stdout + r.stderr
        st = vzquota("show", QID, "-t")
        assert "User/group quota: on,inactive\n" in st.stdout
    finally:
        if is_mountpoint(str(root)):
            subprocess.run(["umount", str(root)], check=False)


def test_stat_force_after_a_clean_unmount_is_0_until_off(fuse, area):
    """As the original's kernel quota stayed on after the unmount: ``stat -f``
    answers 0 with the saved figures, ``off`` switches it off quietly (exit 0,
    nothing printed), then ``stat -f`` is 6 and ``off`` 6."""
    private, root = area
    vzquota("init", QID, "-p", str(private), "-b", "1000", "-B", "2000", "-i", "100",
            "-I", "200", "-e", "0", "-n", "0")
    vzquota("on", QID)
    try:
        subprocess.run([SIMFS, str(private), str(root), "-o", f"quotaid={QID}"], check=True)
        (root / "f").write_bytes(b"f" * 5000)
        live = vzquota("stat", QID).stdout
        subprocess.run(["umount", str(root)], check=True)
        r = subprocess.run([VZQUOTA, "stat", QID, "-f"], capture_output=True, text=True)
        assert (r.returncode, r.stdout, r.stderr) == (0, live, "")
        r = subprocess.run([VZQUOTA, "stat", QID, "-f", "-t"], capture_output=True,
                           text=True)
        assert r.returncode == 9 and "User/group quota: -,inactive\n" in r.stdout
        assert vzquota("on", QID, check=False).returncode == 5      # running already
        r = subprocess.run([VZQUOTA, "off", QID], capture_output=True, text=True)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
        r = subprocess.run([VZQUOTA, "stat", QID, "-f"], capture_output=True, text=True)
        assert r.returncode == 6 and r.stderr == (
            "vzquota : (error) Quota accounting is off, try vzquota show id\n\n")
        assert vzquota("off", QID, check=False).returncode == 6
    finally:
        if is_mountpoint(str(root)):
            subprocess.run(["umount", str(root)], check=False)


def test_stat_of_a_dead_mount_says_so(mounter, area):
    """The daemon killed, the mount left behind ("Transport endpoint is not
    connected"): stat says the mount is dead and how to clear it, not that
    accounting is off; once cleared, the original's words again."""
    private, root = area
    vzquota("init", QID, "-p", str(private), "-b", "1000", "-B", "2000", "-i", "100",
            "-I", "200", "-e", "0", "-n", "0")
    vzquota("on", QID)
    m = mounter(private, root, f"quotaid={QID}")
    m.proc.kill()
    m.proc.wait()
    try:
        for args in (["stat", QID], ["stat", QID, "-f"], ["stat", QID, "-t"]):
            r = subprocess.run([VZQUOTA, *args], capture_output=True, text=True)
            assert r.returncode == 6 and r.stdout == "", r.stderr
            assert r.stderr.startswith(f"vzquota : (error) The simfs mount of quota id {QID}")
            assert "is dead: its daemon is gone and the mount answers \"Transport endpoint " \
                   "is not connected\"; clear it with umount -l " in r.stderr, r.stderr
            assert str(root) in r.stderr
        if r.stderr.count("umount -l") == 1 and "dead simfs mounts" not in r.stderr:
            assert r.stderr == (
                f"vzquota : (error) The simfs mount of quota id {QID} at {root} is dead: its "
                "daemon is gone and the mount answers \"Transport endpoint is not "
                f"connected\"; clear it with umount -l {root}, then mount it again (the "
                "quota is recounted)\n")
    finally:
        subprocess.run(["umount", "-l", str(root)], check=True)
    r = subprocess.run([VZQUOTA, "stat", QID], capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (6, "vzquota : (error) Quota accounting is off, "
                                        "try vzquota show id\n\n")


def test_vzmigrate_to_a_new_node_then_start(fuse, area, world_tmp):
    """vzmigrate (offline) as vzctl 4.x runs it on the new node: ``vzctl
    quotainit`` and ``quotaon`` over the (still empty) private area, rsync of
    the tree, ``vzdqload ID -U -G -T -F < dump && vzquota reload2 ID``, then
    ``vzctl start``: the 2nd level is on with the old node's limits and the
    live usage equals the recount at both levels (the copy was counted by no
    mount: the load marks the file dirty and the start recounts)."""
    private, root = area
    old = world_tmp / "old-node"
    (old / "private" / "home").mkdir(parents=True)
    for n, (uid, size) in enumerate([(1001, 40000), (1002, 90000), (1001, 5000)]):
        f = old / "private" / "home" / f"f{n}"
        f.write_bytes(b"m" * size)
        os.chown(f, uid, uid)
    env = dict(os.environ, VZQUOTA_DIR=str(old / "vzquota"))
    for args in (["init", QID, "-b", "100000", "-B", "110000", "-i", "1000", "-I", "1100",
                  "-p", str(old / "private"), "-e", "600", "-n", "600", "-s", "1", "-u", "100"],
                 ["setlimit2", QID, "-u", "1001", "500", "600", "0", "0"],
                 ["setlimit2", QID, "-t", "1d", "2d"]):
        subprocess.run([VZQUOTA, *args], env=env, check=True, capture_output=True)
    dump = world_tmp / "quotadump.101"
    with open(dump, "w") as f:
        subprocess.run([str(Path(VZQUOTA).parent / "vzdqdump"),
                        QID, "-U", "-G", "-T", "-F"], env=env, check=True, stdout=f)
    try:
        for step in ("quota_init", "quotaon"):
            r = vzctl(step, private, root, "100")
            assert r.returncode == 0, r.stdout + r.stderr
        subprocess.run(["cp", "-a", f"{old / 'private'}/.", str(private)], check=True)
        r = subprocess.run(["sh", "-c", f"{Path(VZQUOTA).parent / 'vzdqload'} {QID} -U -G -T "
                            f"-F < {dump} && {VZQUOTA} reload2 {QID}"],
                           capture_output=True, text=True)
        assert (r.returncode, r.stderr) == (0, "")
        r = vzctl("start", private, root, "100")
        assert r.returncode == 0, r.stdout + r.stderr
        r = vzquota("stat", QID, "-t")
        assert "User/group quota: on,active\n" in r.stdout
        assert " user          1days          2days         0h\n" in r.stdout
        row = [x for x in r.stdout.splitlines() if x.startswith("1001 ") and "1k-blocks" in x]
        assert row and row[0].split()[4:6] == ["500", "600"], row
        bk.assert_usage_matches(private, QID)
        r = vzctl("stop", private, root, "100")
        assert (r.returncode, r.stderr) == (0, ""), r.stdout + r.stderr
    finally:
        if is_mountpoint(str(root)):
            subprocess.run(["umount", str(root)], check=False)
