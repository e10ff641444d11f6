"""vzquota says what the original says: every message, usage text, warning, stream
and exit code, compared whole (stdout, stderr, exit code).

Each expected text was derived by reading the original's sources
(``kolyshkin/vzquota``); the comment at each case names the C function that
prints it.  Reminders of how the original prints: ``error()`` (src/common.c)
writes ``vzquota : (error) `` + the format + ``\\n`` on stderr, so a format that
already ends in ``\\n`` leaves an empty line; ``debug()`` writes the format as is
(warnings on stderr, info on stdout); ``usage()`` writes the usage text on
stderr and exits 2; getopt errors are glibc's, with the quota id as the program
name (parse_options() hands getopt the arguments from the id on).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading

import pytest

from conftest import VZQUOTA, vzquota
from vzquota import __version__
from vzquota.qfile import QuotaFile

QID = "101"
LIMITS = ["-b", "1000", "-B", "1200", "-i", "100", "-I", "120", "-e", "0", "-n", "0"]

# src/main.c: cmd_usage
GLOBAL_USAGE = (
    "Usage: vzquota [options] command quotaid [command-options-and-arguments]\n\n"
    "vzquota commands are:\n"
    "\tinit       Initialize quota data for given quotaid\n"
    "\ton         Turn on quota accounting for given quotaid\n"
    "\toff        Turn off quota accounting for given quotaid\n"
    "\tdrop       Delete quota limits from file\n"
    "\tsetlimit   Set quota limits for given quotaid\n"
    "\tsetlimit2  Set L2 quota limits for given quotaid and QUGID\n"
    "\treload2    Reload L2 quota limits from quota file for given quotaid\n"
    "\tstat       Show usage and quota limits for given quotaid\n"
    "\tshow       Show usage and quota limits from quota file\n")
# src/stat.c: quotashow_usage, vestat_usage
SHOW_USAGE = (
    "Usage: vzquota show quotaid [-p <mount_path>] [-c <quota_file>]\n"
    "\t[-R,--relative]\n"
    "\t[-t,--user-group]\n"
    "\t(Specify the --help global option for a list of other help options)\n")
STAT_USAGE = (
    "Usage: vzquota stat quotaid [-p <mount_path>] [-c <quota_file>]\n"
    "\t[-R,--relative]\n"
    "\t[-f,--force]\n"
    "\t[-t,--user-group]\n"
    "\t(Specify the --help global option for a list of other help options)\n")
# src/quotaon.c: quotainit_usage, quotaon_usage, quotaugidset_usage, quotaoff_usage
INIT_USAGE = (
    "Usage: vzquota init <quotaid> -p <mount_path> [-c <quota_file>]\n"
    "\t[-R,--relative]\n"
    "\t[-s,--sub-quotas 1|0]\n"
    "\t[-u,--ugid-limit <ugid_limit>]\n"
    "\t-b,--block-softlimit <block_soft_limit>\n"
    "\t-B,--block-hardlimit <block_hard_limit>\n"
    "\t-i,--inode-softlimit <inode_soft_limit>\n"
    "\t-I,--inode-hardlimit <inode_hard_limit>\n"
    "\t-e,--block-exptime <block_expiration_time>\n"
    "\t-n,--inode-exptime <inode_expiration_time>\n")
ON_USAGE = (
    "Usage: vzquota on <quotaid> [-p <mount_path>] [-c <quota_file>]\n"
    "\t[-R,--relative]\n"
    "\t[-f,--force]\n"
    "\t[-s,--sub-quotas 1|0]\n"
    "\t[-u,--ugid-limit <ugid_limit>]\n"
    "\t[-b <block_soft_limit>] [-B <block_hard_limit>]\n"
    "\t[-i <inode_soft_limit>] [-I <inode_hard_limit>]\n"
    "\t[-e <block_expiration_time>] [-n <inode_expiration_time>]\n")
SETLIMIT2_USAGE = (
    "Usage: \n"
    "\tvzquota setlimit2 <quotaid> [-p <mount_path>] [-c <quota_file>]\n"
    "\t\t[-R,--relative]\n"
    "\t\t[-u|-g] <ugid>\n"
    "\t\t<block_soft_limit> <block_hard_limit>\n"
    "\t\t<inode_soft_limit> <inode_hard_limit>\n"
    "\tvzquota setlimit2 <quotaid> [-p <mount_path>] [-c <quota_file>] -t\n"
    "\t\t[-R,--relative]\n"
    "\t\t<block-grace> <inode-grace>\n")
OFF_USAGE = (
    "Usage: vzquota off <quotaid> [-p <mount_path>] [-c <quota_file>]\n"
    "\t[-R,--relative]\n"
    "\t[-f,--force]\n")
# src/common.c: time_usage
TIME_USAGE = (
    "Available time formats:\n"
    "1. dd:hh:mm:ss\n"
    "2. xxA, where A - h/H(hour);d/D(day);w/W(week);m/M(month);y/Y(year)\n"
    "For instance: 7D - 7 days; 01w - 1 week; 3m - 3 months\n")
# open_quota_file() of src/quota_io.c
NO_FILE = ("vzquota : (error) Can't open quota file for id 101, maybe you need to "
           "reinitialize quota: No such file or directory\n")


@pytest.fixture
def private(world_tmp):
    p = world_tmp / "private"
    p.mkdir()
    return p


def run(*args: str, env: dict | None = None) -> tuple[int, str, str]:
    r = subprocess.run([VZQUOTA, *args], capture_output=True, text=True,
                       env=None if env is None else {**os.environ, **env})
    return r.returncode, r.stdout, r.stderr


def init(private, *extra):
    return vzquota("init", QID, "-p", str(private), *LIMITS, *extra)


def kib_of(*paths) -> int:
    return -(-sum(os.lstat(p).st_blocks * 512 for p in paths) // 1024)


# ---- global options, help, version (parse_global_options(), main()) -------------

@pytest.mark.parametrize("args", [[], ["-h"], ["--help"], ["-v"], ["-h", "-q"]])
def test_global_usage_on_stderr_exit_2(args):
    # parse_global_options(): no command -> usage(cmd_usage); -h with no command too
    assert run(*args) == (2, "", GLOBAL_USAGE)


@pytest.mark.parametrize("args", [["-V"], ["--version"], ["-h", "-V"], ["-V", "show"]])
def test_version_on_stdout_exit_0(args):
    # version(): printf("Vzquota version %s\n") and exit(EC_SUCCESS), wherever -V is
    assert run(*args) == (0, f"Vzquota version {__version__}\n", "")


def test_help_of_a_command_is_its_usage():
    # -h sets argc to -1, so the command's parse_options() calls usage(opt_usage)
    assert run("-h", "show", QID) == (2, "", SHOW_USAGE)
    assert run("--help", "init") == (2, "", INIT_USAGE)


def test_bad_global_option_is_getopts_message_then_usage():
    # glibc getopt_long's own line, then usage(cmd_usage)
    assert run("-x", "show", QID) == (2, "", "vzquota: invalid option -- 'x'\n" + GLOBAL_USAGE)
    assert run("--frob") == (2, "", "vzquota: unrecognized option '--frob'\n" + GLOBAL_USAGE)


def test_unknown_command():
    # main(): fprintf(stderr, "Unknown command: '%s'\n\n") then usage(cmd_usage)
    assert run("frob", QID) == (2, "", "Unknown command: 'frob'\n\n" + GLOBAL_USAGE)


# ---- command options (parse_options(), getopt_long) ----------------------------

def test_command_getopt_errors_name_the_quota_id():
    assert run("show", QID, "-x") == (2, "", "101: invalid option -- 'x'\n" + SHOW_USAGE)
    assert run("show", QID, "-c") == (
        2, "", "101: option requires an argument -- 'c'\n" + SHOW_USAGE)
    assert run("show", QID, "--frob=1") == (
        2, "", "101: unrecognized option '--frob=1'\n" + SHOW_USAGE)
    assert run("stat", QID, "--user-group=1") == (
        2, "", "101: option '--user-group' doesn't allow an argument\n" + STAT_USAGE)
    assert run("show", QID, "--quota-file") == (
        2, "", "101: option '--quota-file' requires an argument\n" + SHOW_USAGE)
    assert run("on", QID, "--block=5") == (2, "", (
        "101: option '--block=5' is ambiguous; possibilities: '--block-softlimit' "
        "'--block-hardlimit' '--block-exptime'\n") + ON_USAGE)
    assert run("off", QID, "-t") == (2, "", "101: invalid option -- 't'\n" + OFF_USAGE)


@pytest.mark.parametrize("qid", ["", "abc", "²", "١٢٣", "1e3", "12x", "99999999999", "-"])
def test_bad_quota_ids_are_usage_errors(qid):
    # str2uint(): strtol over ASCII digits, nothing left over -- else usage()
    assert run("show", qid) == (2, "", SHOW_USAGE)
    assert run("setlimit", qid, "-b", "1") == (2, "", ON_USAGE.replace(" on ", " setlimit "))


def test_stat_of_a_bad_id_is_its_usage():
    # vestat_proc() -> parse_options(): str2uint("abc") fails -> usage(vestat_usage)
    for args in (["stat", "abc"], ["stat", "abc", "-t"], ["stat", "abc", "--json"]):
        assert run(*args) == (2, "", STAT_USAGE), args


def test_batch_ugid_limit_prints_signed(private):
    # print_ugid_status(): printf("%d %d %d\n", count, buf_size, limit) of
    # unsigned ints in batch mode; "limit %u" in the table
    init(private, "-s", "1", "-u", "4294967295")
    rc, out, _ = run("-b", "show", QID, "-t")
    assert rc == 0 and out.splitlines()[3] == "0 2 -1", out
    assert "Ugids: loaded 0, total 2, limit 4294967295\n" in run("show", QID, "-t")[1]
    vzquota("setlimit", QID, "-u", "2147483648")
    assert run("-b", "show", QID, "-t")[1].splitlines()[3] == "0 2 -2147483648"
    vzquota("setlimit", QID, "-u", "2147483647")
    assert run("-b", "show", QID, "-t")[1].splitlines()[3] == "0 2 2147483647"


def test_missing_quota_id_is_usage():
    assert run("init") == (2, "", INIT_USAGE)
    assert run("setlimit2") == (2, "", SETLIMIT2_USAGE)


def test_negative_id_is_looked_up_as_unsigned(world_tmp):
    # str2uint("-1") is 4294967295; messages print it with %d
    rc, out, err = run("show", "-1")
    assert (rc, out) == (11, "")
    assert err == ("vzquota : (error) Can't open quota file for id -1, maybe you need "
                   "to reinitialize quota: No such file or directory\n"
                   "vzquota : (error) Quota file must exist for show command\n")


def test_long_option_prefixes_and_ignored_options(private):
    # getopt_long takes unique prefixes; -r/--rsquash and --nocheck are ignored
    vzquota("init", QID, "-p", str(private), "--block-s", "1000",
            "--block-h", "1200", "--inode-s", "100", "--inode-h", "120", "--block-e", "0",
            "--inode-e", "0", "-r", "1", "--rsquash=0")
    assert run("on", QID, "--nocheck", "-r", "1") == (0, "", "")
    assert "1000" in vzquota("show", QID).stdout


def test_bad_limit_values(private):
    assert run("init", QID, "-p", str(private), *LIMITS[:-2], "-n", "1x") == (2, "", TIME_USAGE)
    assert run("init", QID, "-p", str(private), *LIMITS[:-2], "-n", "10s") == (2, "", TIME_USAGE)
    assert run("init", QID, "-p", str(private), *LIMITS[:-2], "-n", "1:60") == (2, "", TIME_USAGE)
    assert run("init", QID, "-p", str(private), "-b", "1x", *LIMITS[2:]) == (2, "", INIT_USAGE)
    assert run("init", QID, "-p", str(private), "-b", "²", *LIMITS[2:]) == (2, "", INIT_USAGE)
    assert run("init", QID, "-p", str(private), *LIMITS, "-s", "2") == (2, "", INIT_USAGE)
    assert run("init", QID, "-p", str(private), *LIMITS, "-u", "x") == (2, "", INIT_USAGE)
    assert run("init", QID, "-p", str(private), *LIMITS[2:]) == (2, "", INIT_USAGE)
    assert run("setlimit", QID) == (2, "", ON_USAGE.replace(" on ", " setlimit "))
    assert not QuotaFile.for_id(101).exists()          # nothing half-written


def test_c_and_r_together():
    # parse_options(): error(EC_USAGE, 0, "-c and -R options can't be set together\n")
    assert run("show", QID, "-c", "/x", "-R") == (
        2, "", "vzquota : (error) -c and -R options can't be set together\n\n")


def test_relative_without_path_and_with_a_missing_path(world_tmp):
    # get_quota_file_name(): no -p leaves the VZ4 name NULL; a missing one fails
    # stat(); both are error(EC_NOQUOTAFILE, errno, ...): exit 11
    assert run("show", QID, "-R") == (
        11, "", "vzquota : (error) can't open quota config file (null)\n\n")
    gone = world_tmp / "gone" / "fs"
    assert run("stat", QID, "-R", "-p", str(gone)) == (11, "", (
        f"vzquota : (error) can't open quota config file {world_tmp}/gone/quota.fs\n"
        ": No such file or directory\n"))
    for cmd in (["on"], ["off"], ["setlimit", "-b", "1"], ["reload2"], ["drop"]):
        assert run(cmd[0], QID, "-R", *cmd[1:])[0] == 11, cmd


def test_relative_quota_file_next_to_the_private_area(private):
    vzquota("init", QID, "-p", str(private), *LIMITS, "-R")
    assert (private.parent / "quota.private").exists()
    assert not QuotaFile.for_id(101).exists()
    assert run("show", QID, "-R", "-p", str(private))[0] == 0


def test_no_directory_is_created_for_a_named_file(private, world_tmp):
    # open_quota_file(): error(0, errno, "create quota file '%s'"), exit 4
    target = world_tmp / "new" / "dir" / "q"
    assert run("init", QID, "-p", str(private), *LIMITS, "-c", str(target)) == (4, "", (
        f"vzquota : (error) create quota file '{target}': No such file or directory\n"))
    assert not (world_tmp / "new").exists()


def test_show_ignores_an_extra_argument(private):
    init(private)
    assert run("show", QID, "extra") == run("show", QID)


# ---- missing, corrupt and running quota files ----------------------------------

def test_missing_file_messages():
    # quotashow_proc(): open_quota_file()'s error, then its own
    assert run("show", QID) == (11, "", NO_FILE + (
        "vzquota : (error) Quota file must exist for show command\n"))
    # vestat_proc(): the file is read before the kernel is asked -> 11, not 6
    for cmd in (["stat"], ["on"], ["off"], ["drop"], ["setlimit", "-b", "1"], ["reload2"],
                ["setlimit2", "-u", "5", "1", "2", "3", "4"]):
        assert run(cmd[0], QID, *cmd[1:]) == (11, "", NO_FILE), cmd


def test_corrupt_files(private):
    init(private)
    path = QuotaFile.for_id(101).path
    good = open(path, "rb").read()

    def write(data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)
    # check_quota_file(): debug(LOG_ERROR, "...file is broken\n") -- no empty line
    write(good.replace(b'"on":false', b'"on":true '))
    broken = ("vzquota : (error) Quota file check sum is invalid for id 101; "
              "file is broken\n")
    assert run("show", QID) == (4, "", broken)
    assert run("stat", QID) == (4, "", broken)
    assert run("setlimit", QID, "-b", "5") == (4, "", broken)
    # get_quota_version(): error(0, 0, "Can't detect quota file version; ...")
    write(b"\xfe\xdc\xbc\x27" + good)
    assert run("show", QID) == (4, "", "vzquota : (error) Can't detect quota file "
                                "version; file is not a VZ quota file\n")
    # read_field(): a short read is error(0, 0, "quota file is corrupted")
    # a checksum that checks out over a field that does not
    body = good.split(b"\n")[1].replace(b'"on":false', b'"on":"no"')
    import hashlib
    write(b"vzquota-simfs-quota 1\n" + body + b"\nsha256 "
          + hashlib.sha256(body).hexdigest().encode() + b"\n")
    assert run("show", QID) == (4, "", "vzquota : (error) quota file is corrupted\n")
    write(good)
    assert run("show", QID)[0] == 0


def test_short_files_are_damaged_as_the_original_says(private):
    """The original reads an 8-byte header (magic, flags), then its magic, then the
    checksum at the end of the file before any other field: an empty or 4-byte
    file is a short read, a file cut after its header fails the checksum."""
    init(private)
    path = QuotaFile.for_id(101).path
    good = open(path, "rb").read()
    short = "vzquota : (error) quota file is corrupted\n"
    broken = "vzquota : (error) Quota file check sum is invalid for id 101; file is broken\n"
    alien = ("vzquota : (error) Can't detect quota file version; file is not a VZ "
             "quota file\n")
    for data, err in ((b"", short), (good[:4], short), (b"\0\0\0\0", short),
                      (good[:100], broken), (good[:8], broken), (good[:-1], broken),
                      (b"\xfe" * 100, alien), (b"garbage\n", alien)):
        with open(path, "wb") as f:
            f.write(data)
        for cmd in (["show"], ["stat"], ["setlimit", "-b", "5"], ["on"]):
            assert run(cmd[0], QID, *cmd[1:]) == (4, "", err), (data[:10], cmd)


def test_show_of_a_running_quota_warns(private):
    init(private)
    qf = QuotaFile.for_id(101)
    st = qf.load()
    st.mounted = True
    qf.save(st)
    rc, out, err = run("show", QID)
    # quotashow_proc(): debug(LOG_WARNING, "Quota is running, so data ...\n")
    assert (rc, err) == (0, "vzquota : (warning) Quota is running, so data reported "
                         "from quota file may not reflect current values\n")
    assert out == run("-q", "show", QID)[1]
    assert run("-q", "show", QID)[2] == ""


# ---- on / off / stat / reload2 without a live mount ------------------------------

def test_on_off_stat_offline(private):
    init(private)
    # quota_off(): error(0, 0, "Quota is not running for id %d"), exit 6
    assert run("off", QID) == (6, "", "vzquota : (error) Quota is not running for id 101\n")
    assert run("on", QID) == (0, "", "")
    # quota_on(): debug(LOG_WARNING, "Quota is running for id %d already\n"), exit 5
    assert run("on", QID) == (5, "", "vzquota : (warning) Quota is running for id 101 already\n")
    # on with nothing mounted is the original's kernel quota on without a
    # mount: stat answers with the figures, off switches it off quietly
    assert run("stat", QID) == (0, run("show", QID)[1], "")
    assert run("off", QID) == (0, "", "")
    # vestat_proc(): error(EC_NOTRUN, 0, "Quota accounting is off, try vzquota show id\n")
    assert run("stat", QID) == (6, "", "vzquota : (error) Quota accounting is off, try "
                                "vzquota show id\n\n")
    assert run("stat", QID, "-t") == run("stat", QID)
    # quota_off() with the file saying "on" while nothing runs it (its mount did
    # not stop cleanly: the original after a reboot): the error, the repair, exit 0
    qf = QuotaFile.for_id(101)
    st = qf.load()
    st.on = st.mounted = True
    qf.save(st)
    assert run("stat", QID)[0] == 6
    assert run("off", QID) == (0, "", (
        "vzquota : (error) Quota is not running for id 101\n"
        "vzquota : (warning) Repairing quota: it was incorrectly marked as running "
        "for id 101\n"))
    # quota_reload_ugid(): quota not running -> nothing to do, exit 0
    assert run("reload2", QID) == (0, "", "")


def test_verbose_info_goes_to_stdout(private):
    init(private)
    # debug(LOG_INFO, ...) prints on stdout (vdebug_print(): above LOG_WARNING)
    assert run("-v", "setlimit", QID, "-b", "1000") == (
        0, "vzquota : (info) Quota limits were set for id 101\n", "")
    assert run("-v", "drop", QID) == (0, "vzquota : (info) Quota file was deleted for id 101\n", "")


# ---- limits: checks and warnings (check_limits()) --------------------------------

def test_hard_below_soft_is_refused_with_an_empty_line(private):
    init(private)
    assert run("setlimit", QID, "-b", "1000", "-B", "900") == (
        2, "", "vzquota : (error) block_hard_limit [900] < block_soft_limit [1000]\n\n")
    assert run("setlimit", QID, "-i", "50", "-I", "40") == (
        2, "", "vzquota : (error) inode_hard_limit [40] < inode_soft_limit [50]\n\n")
    assert "1000           1200" in vzquota("show", QID).stdout


def test_limits_below_usage_warn(private):
    (private / "f").write_bytes(b"x" * 100_000)
    used = kib_of(private, private / "f")
    init(private)
    assert run("setlimit", QID, "-B", "20") == (2, "", (
        "vzquota : (error) block_hard_limit [20] < block_soft_limit [1000]\n\n"))
    # check_limits(qd, 1) in quota_set(): only the limits given are checked
    assert run("setlimit", QID, "-b", "10") == (0, "", (
        f"vzquota : (warning) block_soft_limit [10] < block_current_usage [{used}]\n"))
    assert run("setlimit", QID, "-b", "10", "-B", "20", "-i", "1") == (0, "", (
        f"vzquota : (warning) block_hard_limit [20] < block_current_usage [{used}]\n"
        "vzquota : (warning) inode_soft_limit [1] < inode_current_usage [2]\n"))
    assert run("setlimit", QID, "-I", "1") == (0, "", (
        "vzquota : (warning) inode_hard_limit [1] < inode_current_usage [2]\n"))
    assert run("-q", "setlimit", QID, "-I", "1") == (0, "", "")
    # check_limits(qd, 0) in quota_init(): every limit is checked
    rc, _, err = run("init", QID, "-p", str(private), "-b", "10", "-B", "20", "-i", "1",
                     "-I", "1", "-e", "0", "-n", "0")
    assert (rc, err) == (0, (
        "vzquota : (warning) Quota file exists, it will be overwritten\n"
        f"vzquota : (warning) block_hard_limit [20] < block_current_usage [{used}]\n"
        "vzquota : (warning) inode_hard_limit [1] < inode_current_usage [2]\n"))


def test_vzctl_unlimited_and_wrapping_limits(private):
    long_max = str(2**63 - 1)
    vzquota("init", QID, "-p", str(private), "-b", long_max, "-B", long_max, "-i", long_max,
            "-I", long_max, "-e", "0", "-n", "0")
    # (u64)LONG_MAX << 10 bytes, shown in 1K blocks; str2u32() keeps the low 32 bits
    lines = vzquota("show", QID).stdout.splitlines()
    assert lines[1].split()[2:4] == ["18014398509481983", "18014398509481983"]
    assert lines[2].split()[2:4] == ["4294967295", "4294967295"]
    # 2**54 blocks is 2**64 bytes: the hard limit wraps to 0 and is refused
    assert run("setlimit", QID, "-b", "1", "-B", str(2**54)) == (
        2, "", "vzquota : (error) block_hard_limit [0] < block_soft_limit [1]\n\n")


def test_second_level_off_keeps_no_objects(private):
    for n, (uid, gid) in enumerate([(1001, 2001), (1002, 2002), (1003, 2003), (1004, 0)]):
        f = private / f"f{n}"
        f.write_text("x")
        os.chown(f, uid, gid)
    # 9 objects: users 0 1001-1004, groups 0 2001-2003
    init(private)
    out = vzquota("show", QID, "-t").stdout
    # print_ugid_status(): its format strings, no object table when there are none
    assert out.split("\n")[3:] == [
        "User/group quota: off,inactive", "Ugids: loaded 0, total 0, limit 0",
        "Ugid limit was exceeded: no", "", "User/group grace times and quotafile flags:",
        "%5s %14s %14s %10s" % ("type", "block_exp_time", "inode_exp_time", "dqi_flags"),
        # the 2nd-level graces start at the kernel quota's week (the original: 0)
        "%5s %14s %14s %9Xh" % ("user", "7days", "7days", 0),
        "%5s %14s %14s %9Xh" % ("group", "7days", "7days", 0), ""]
    init(private, "-u", "5")            # -u alone does not turn the 2nd level on
    assert "*Ugids: loaded 0, total 0, limit 5" not in vzquota("show", QID, "-t").stdout
    assert "Ugids: loaded 0, total 0, limit 5" in vzquota("show", QID, "-t").stdout
    rc, _, err = run("init", QID, "-p", str(private), *LIMITS, "-s", "1", "-u", "5")
    assert (rc, err) == (0, "vzquota : (warning) Quota file exists, it will be overwritten\n"
                         "vzquota : (warning) ugid_limit [5] < ugid_current_usage [9]\n")
    out = vzquota("show", QID, "-t").stdout
    assert "*Ugids: loaded 0, total 9, limit 5\nUgid limit was exceeded: no\n" in out
    # quota_on(): check_limits(qd, 0), then quota_syscall_on() cannot load them all
    assert run("on", QID) == (0, "", (
        "vzquota : (warning) ugid_limit [5] < ugid_current_usage [9]\n"
        "vzquota : (warning) Quotas were not loaded for some users/groups for id 101 "
        "due to ugid limit\n"))
    warnings = ("vzquota : (warning) ugid_limit [5] < ugid_current_usage [9]\n"
                "vzquota : (warning) Quotas were not loaded for some users/groups for id "
                "101 due to ugid limit\n")
    vzquota("off", QID)                 # offline, between mounts: switched off
    assert run("-v", "on", QID) == (0, (
        "vzquota : (info) User/group quota was activated with ugid limit of 5\n"
        "vzquota : (info) Quota was switched on for id 101\n"), warnings)
    vzquota("off", QID)
    # setlimit2 with the 2nd level off: quota_setugid()'s message, exit 6
    init(private, "-s", "0")
    assert run("setlimit2", QID, "-u", "1001", "1", "2", "3", "4") == (
        6, "", "vzquota : (error) Second level quota accounting is off\n")
    assert run("setlimit2", QID, "-u", "1001", "1", "2", "3") == (2, "", SETLIMIT2_USAGE)
    assert run("setlimit2", QID, "-t", "1x", "2") == (2, "", SETLIMIT2_USAGE)


def test_stat_force_reads_no_file(mounter, area):
    private, root = area
    vzquota("init", QID, "-p", str(private), *LIMITS, "-s", "1", "-u", "10")
    vzquota("on", QID)
    mounter(private, root, f"quotaid={QID}")
    rc, out, err = run("stat", QID, "-t")
    assert (rc, err) == (0, "") and "User/group quota: on,active\n" in out
    # print_ugid_status(): with -f the file's status is unknown: "-", batch -1
    rc, out, err = run("stat", QID, "-t", "-f")
    assert (rc, err) == (0, "") and "User/group quota: -,active\n" in out
    rc, out, err = run("-b", "stat", QID, "-t", "-f")
    assert (rc, err) == (0, "") and out.splitlines()[2] == "-1 1"
    # the live mount's answers keep the original's words
    assert run("on", QID) == (5, "", "vzquota : (warning) Quota is running for id 101 already\n")
    assert run("init", QID, "-p", str(private), *LIMITS) == (
        5, "", "vzquota : (error) Quota is running, stop it first\n")
    assert run("setlimit", QID, "-b", "2000", "-B", "1000") == (
        2, "", "vzquota : (error) block_hard_limit [1000] < block_soft_limit [2000]\n\n")
    vzquota("off", QID)
    assert run("stat", QID) == (6, "", "vzquota : (error) Quota accounting is off, try "
                                "vzquota show id\n\n")


# ---- streams and the live channel -----------------------------------------------

def test_closed_pipe_ends_quietly(private):
    init(private)
    r = subprocess.run(["bash", "-c", f"{VZQUOTA} show {QID} -t | head -1"],
                       capture_output=True, text=True)
    assert (r.returncode, r.stdout, r.stderr) == (
        0, "   resource          usage       softlimit      hardlimit    grace\n", "")
    # a reader gone before the first write: SIGPIPE, as the C original, no words
    p = subprocess.Popen([VZQUOTA, "show", QID, "-t"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read()
    assert (p.wait(), err) == (-signal.SIGPIPE, b"")


def test_stuck_daemon_times_out_with_exit_3(private):
    from vzquota import control
    init(private)
    os.makedirs(control.run_dir(), exist_ok=True)
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(control.socket_path(101))
    srv.listen(1)
    held = []
    done = threading.Event()

    def serve():                        # accept, read, never answer
        conn, _ = srv.accept()
        held.append(conn)
        done.wait(60)
    t = threading.Thread(target=serve)
    t.start()
    try:
        assert run("stat", QID, env={"VZQUOTA_TIMEOUT": "1"}) == (3, "", (
            "vzquota : (error) The mount of quota id 101 did not answer within 1 seconds\n"))
    finally:
        done.set()
        t.join(5)
        for c in held:
            c.close()
        srv.close()
