"""vzdqcheck, vzdqdump, vzdqload: the original package's other tools, compared
whole (stdout, stderr, exit code) with what their sources print
(src/vzdqcheck.c, src/vzdqdump.c, src/vzdqload.c, include/quotadump.h; the
messages go through error() of src/common.c, prefix "vzquota : ")."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, vzquota
from vzquota import __version__
from vzquota.qfile import QuotaFile

VZDQCHECK, VZDQDUMP, VZDQLOAD = (str(BIN / n) for n in ("vzdqcheck", "vzdqdump", "vzdqload"))
LIMITS = ["-b", "100000", "-B", "120000", "-i", "1000", "-I", "1200", "-e", "1d", "-n", "1d"]
DUMP_USAGE = (      # vzdqdump.c (3.x): dump_usage
    "Usage: vzdqdump quotaid [-c file] [-f] commands\n"
    "Dumps user/group quota information from quota file.\n"
    "\t-c file\tuse given quota file\n"
    "\t-f\tdump data from kernel rather than quota file\n"
    "Commands specify what user/group information to dump:\n"
    "\t-F\tfirst level quota\n"
    "\t-G\tgrace time\n\t-U\tdisk limits\n\t-T\texpiration times\n")
LOAD_USAGE = (      # vzdqload.c (3.x): dump_usage
    "Usage: vzdqload quotaid [-c file] commands\n"
    "Loads user/group quota information from stdin into quota file.\n"
    "\t-c file\tuse given quota file\n"
    "Commands specify what user/group information to load:\n"
    "\t-F\tfirst level quota\n"
    "\t-G\tgrace time\n\t-U\tdisk limits\n\t-T\texpiration times\n")


def run(tool: str, *args: str, stdin: str = "", cwd=None) -> tuple[int, str, str]:
    r = subprocess.run([tool, *args], capture_output=True, text=True, input=stdin, cwd=cwd)
    return r.returncode, r.stdout, r.stderr


def make_tree(top: Path) -> None:
    """Files of several owners (uid:gid) and sizes."""
    top.mkdir()
    for name, size, uid, gid in (("a", 5000, 1001, 2001), ("b", 70000, 1001, 2002),
                                 ("c", 1, 1002, 2002), ("d", 0, 0, 2001)):
        (top / name).write_bytes(b"x" * size)
        os.chown(top / name, uid, gid)
    (top / "sub").mkdir()
    os.chown(top / "sub", 1003, 0)
    (top / "sub" / "e").write_bytes(b"y" * 9000)
    os.link(top / "sub" / "e", top / "sub" / "e2")


def du_kib(path: Path) -> int:
    out = subprocess.run(["du", "--block-size=1", "-s", str(path)], capture_output=True,
                         text=True, check=True).stdout
    return -(-int(out.split()[0]) // 1024)


def find_count(path: Path) -> int:
    """Distinct inodes under ``path`` (a hard link counts once)."""
    out = subprocess.run(["find", str(path), "-printf", "%i\\n"], capture_output=True,
                         text=True, check=True)
    return len(set(out.stdout.split()))


# ---- vzdqcheck -----------------------------------------------------------------

def test_vzdqcheck_counts_like_du_and_find(world_tmp):
    top = world_tmp / "tree"
    make_tree(top)
    expected = (f"quota usage for {top}\n" + "%11s%11s\n" % ("blocks", "inodes")
                + "%11u%11u\n" % (du_kib(top), find_count(top)))
    assert run(VZDQCHECK, str(top)) == (0, expected, "")
    # globolize_path(): a relative path is the current directory, "/", the path
    assert run(VZDQCHECK, "tree", cwd=world_tmp) == (
        0, expected.replace(str(top), f"{world_tmp}/tree"), "")


def test_vzdqcheck_usage_version_and_errors(world_tmp):
    usage = "Usage: vzdqcheck [options] path\n\t-h\thelp\n\t-V\tversion info\n\tpath\tscan path\n"
    assert run(VZDQCHECK) == (2, "", usage)
    assert run(VZDQCHECK, "-h") == (2, "", usage)
    assert run(VZDQCHECK, "-x", "/") == (2, "", "vzdqcheck: invalid option -- 'x'\n" + usage)
    assert run(VZDQCHECK, "-V") == (0, f"Vzquota version {__version__}\n", "")
    # scan() of src/quotacheck.c
    assert run(VZDQCHECK, str(world_tmp / "gone")) == (1, "", (
        f"vzquota : (error) quota check : stat {world_tmp}/gone: No such file or directory\n"))


# ---- vzdqdump / vzdqload -------------------------------------------------------

@pytest.fixture
def two(world_tmp):
    """Quotas 101 and 102 over two identical trees, the 2nd level on."""
    a, b = world_tmp / "a", world_tmp / "b"
    make_tree(a)
    make_tree(b)
    for qid, top in (("101", a), ("102", b)):
        vzquota("init", qid, "-p", str(top), *LIMITS, "-s", "1", "-u", "20")
    return a, b


def test_vzdqdump_text(two):
    vzquota("setlimit2", "101", "-u", "1001", "10", "500", "1", "100")   # over soft
    vzquota("setlimit2", "101", "-g", "2002", "1000", "2000", "10", "20")
    vzquota("setlimit2", "101", "-t", "2d", "3h")
    vzquota("setlimit2", "101", "-g", "-t", "4w", "50")
    st = QuotaFile.for_id(101).load()
    ids = sorted([(u, 0) for u in st.users] + [(g, 1) for g in st.groups])
    assert ids == [(0, 0), (0, 1), (1001, 0), (1002, 0), (1003, 0), (2001, 1), (2002, 1)]
    b_dl, i_dl = st.users[1001].space.deadline, st.users[1001].inodes.deadline
    assert b_dl > 0 and i_dl > 0
    # vzdqdump.c main(): status, graces, number, header, rows sorted by id
    rc, out, err = run(VZDQDUMP, "101", "-G", "-U", "-T")
    assert (rc, err) == (0, "")
    assert out == (
        "ugid_quota_status:\t1\n"
        "#grace_time:\ttype\tblock\tinode\n"
        f"grace_time:\t0\t{2 * 86400}\t{3 * 3600}\n"
        f"grace_time:\t1\t{28 * 86400}\t50\n"
        "ugid_number:\t7\n"
        "#ugid:\tID\ttype\tbsoft\tbhard\tisoft\tihard\tbtime\titime\n"
        "ugid:\t0\t0\t0\t0\t0\t0\t0\t0\n"
        "ugid:\t0\t1\t0\t0\t0\t0\t0\t0\n"
        f"ugid:\t1001\t0\t10\t500\t1\t100\t{b_dl}\t{i_dl}\n"
        "ugid:\t1002\t0\t0\t0\t0\t0\t0\t0\n"
        "ugid:\t1003\t0\t0\t0\t0\t0\t0\t0\n"
        "ugid:\t2001\t1\t0\t0\t0\t0\t0\t0\n"
        "ugid:\t2002\t1\t1000\t2000\t10\t20\t0\t0\n")
    assert run(VZDQDUMP, "101", "-U")[1].splitlines()[2] == "#ugid:\tID\ttype\tbsoft\tbhard\tisoft\tihard"
    assert run(VZDQDUMP, "101", "-T")[1].splitlines()[5] == f"ugid:\t1001\t0\t{b_dl}\t{i_dl}"
    assert run(VZDQDUMP, "101", "-G") == (0, "".join(out.splitlines(True)[:4]), "")


def test_dump_of_one_quota_loads_into_another(two):
    vzquota("setlimit2", "101", "-u", "1001", "10", "500", "1", "100")
    vzquota("setlimit2", "101", "-u", "1002", "300", "400", "30", "40")
    vzquota("setlimit2", "101", "-g", "2001", "1000", "2000", "10", "20")
    vzquota("setlimit2", "101", "-u", "-t", "2d", "3h")
    vzquota("setlimit2", "101", "-g", "-t", "4w", "50")
    assert vzquota("show", "101", "-t").stdout != vzquota("show", "102", "-t").stdout
    dump = run(VZDQDUMP, "101", "-G", "-U", "-T")[1]
    assert run(VZDQLOAD, "102", "-G", "-U", "-T", stdin=dump) == (0, "", "")
    # loaded, the file is dirty (show exits 10): the next start recounts
    for flags in ([], ["-b"]):
        shown = vzquota(*flags, "show", "102", "-t", check=False)
        assert shown.returncode == 10
        assert vzquota(*flags, "show", "101", "-t").stdout == shown.stdout
    assert run(VZDQDUMP, "102", "-G", "-U", "-T") == (0, dump, "")


def test_vzdqload_bad_input_changes_nothing(two):
    before = open(QuotaFile.for_id(102).path, "rb").read()
    # vzdqload.c err(): error(EC_USAGE, 0, "Invalid input data: %s", line) -- the
    # line keeps its newline, so an empty line follows
    assert run(VZDQLOAD, "102", "-G", stdin="garbage 1\n") == (
        2, "", "vzquota : (error) Invalid input data: garbage 1\n\n")
    assert run(VZDQLOAD, "102", "-G", stdin="ugid_quota_status:\t2\n") == (
        2, "", "vzquota : (error) Invalid input data: ugid_quota_status:\t2\n\n")
    # read_line(): end of input, then err() with what it last read (a comment here)
    assert run(VZDQLOAD, "102", "-G", stdin="ugid_quota_status: 1\n#c\n") == (2, "", (
        "vzquota : (error) End of input file\n"
        "vzquota : (error) Invalid input data: #c\n\n"))
    assert run(VZDQLOAD, "102", "-U", stdin="") == (2, "", (
        "vzquota : (error) End of input file\nvzquota : (error) Invalid input data: \n"))
    assert run(VZDQLOAD, "102", "-U",
               stdin="ugid_quota_status: 1\nugid_number: 1\nugid: 5 2 1 2 3 4\n") == (
        2, "", "vzquota : (error) Invalid input data: ugid: 5 2 1 2 3 4\n\n")
    assert open(QuotaFile.for_id(102).path, "rb").read() == before
    # status 0: nothing to load, nothing written
    assert run(VZDQLOAD, "102", "-U", stdin="ugid_quota_status: 0\n") == (0, "", "")
    assert open(QuotaFile.for_id(102).path, "rb").read() == before


def test_vzdqdump_and_vzdqload_options(two, world_tmp):
    assert run(VZDQDUMP, "101") == (2, "", DUMP_USAGE)
    assert run(VZDQDUMP) == (2, "", DUMP_USAGE)
    assert run(VZDQDUMP, "-h", "101", "-G") == (2, "", DUMP_USAGE)
    assert run(VZDQDUMP, "x1", "-G") == (2, "", DUMP_USAGE)
    assert run(VZDQDUMP, "101", "-x") == (2, "", "101: invalid option -- 'x'\n" + DUMP_USAGE)
    assert run(VZDQLOAD, "101", "-f") == (2, "", "101: invalid option -- 'f'\n" + LOAD_USAGE)
    assert run(VZDQLOAD, "101") == (2, "", LOAD_USAGE)
    assert run(VZDQDUMP, "-V") == (0, f"Vzquota version {__version__}\n", "")
    # the quota file: open_quota_file()'s message and 11; -c names another
    assert run(VZDQDUMP, "103", "-G") == (11, "", (
        "vzquota : (error) Can't open quota file for id 103, maybe you need to "
        "reinitialize quota: No such file or directory\n"))
    copy = world_tmp / "copy"
    shutil.copy(QuotaFile.for_id(101).path, copy)
    assert run(VZDQDUMP, "101", "-c", str(copy), "-G") == run(VZDQDUMP, "101", "-G")
    # -f asks the live mount; none here
    assert run(VZDQDUMP, "101", "-f", "-G") == (
        6, "", "vzquota : (error) Quota accounting is off\n")
    # the 2nd level off: the status line only
    vzquota("init", "103", "-p", str(two[0]), *LIMITS)
    assert run(VZDQDUMP, "103", "-G", "-U") == (0, "ugid_quota_status:\t0\n", "")


def test_vzmigrate_dump_and_load_with_first_level(two, world_tmp):
    """vzctl 4.x's vzmigrate, word for word: ``vzdqdump $VEID -U -G -T -F >
    dump`` on the source, ``vzdqload $VEID -U -G -T -F < dump && vzquota
    reload2 $VEID`` on the destination (another quota directory: another host)."""
    _, copy = two                          # the tree rsync made on the destination
    vzquota("setlimit2", "101", "-u", "1001", "10", "500", "1", "100")   # over soft
    vzquota("setlimit2", "101", "-g", "-t", "4w", "50")
    vzquota("setlimit", "101", "-b", "1", "-e", "5h")                    # over soft: deadline
    st = QuotaFile.for_id(101).load()
    s, i = st.level1.space, st.level1.inodes
    assert s.deadline > 0
    rc, dump, err = run(VZDQDUMP, "101", "-U", "-G", "-T", "-F")
    assert (rc, err) == (0, "")
    # vzdqdump.c: the 2nd level, then FIRST_LEVEL_LABEL and two lines of
    # usage soft hard btime bexpire (bytes) / icurrent isoft ihard itime iexpire
    assert dump.endswith(
        "first_level_quota:\n"
        f"{s.usage} 1024 122880000 {s.deadline} 18000\n"
        f"{i.usage} 1000 1200 {i.deadline} 86400\n"), dump
    dump_file = world_tmp / "quotadump.101"
    dump_file.write_text(dump)
    dest = world_tmp / "dest-host"
    env = dict(os.environ, VZQUOTA_DIR=str(dest))
    subprocess.run([str(BIN / "vzquota"), "init", "101", "-p", str(copy), *LIMITS, "-s", "1",
                    "-u", "20"], env=env, check=True)
    r = subprocess.run(["sh", "-c", f"{VZDQLOAD} 101 -U -G -T -F < {dump_file} && "
                        f"{BIN / 'vzquota'} reload2 101"], env=env, capture_output=True,
                       text=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    got = QuotaFile(101, str(dest / "quota.101")).load()
    assert got.level1 == st.level1 and got.grace1 == st.grace1
    assert got.dirty                    # rsync's copy was counted by no mount: recount
    assert got.group_grace == st.group_grace and got.user_grace == st.user_grace
    assert got.users[1001].space.hard == 500 * 1024
    r = subprocess.run([VZDQDUMP, "101", "-U", "-G", "-T", "-F"], env=env,
                       capture_output=True, text=True)
    assert r.stdout == dump


def test_vzdqload_first_level_errors_are_the_originals(two):
    before = open(QuotaFile.for_id(102).path, "rb").read()
    # vzdqload.c, -F: fprintf(stderr, "Invalid input data: %s\n", line), exit 2
    assert run(VZDQLOAD, "102", "-F", stdin="ugid_quota_status: 0\nfirst_level:\n") == (
        2, "", "Invalid input data: first_level:\n\n")
    assert run(VZDQLOAD, "102", "-F", stdin="ugid_quota_status: 0\n") == (
        2, "", "vzquota : (error) End of input file\nInvalid input data: \n")
    assert run(VZDQLOAD, "102", "-F",
               stdin="ugid_quota_status: 0\nfirst_level_quota:\n1 2 3\n") == (
        2, "", "Invalid input data: 1 2 3\n\n")
    assert open(QuotaFile.for_id(102).path, "rb").read() == before
    # the 2nd level off: -F alone loads the 1st level
    assert run(VZDQLOAD, "102", "-F", stdin=(
        "ugid_quota_status: 0\nfirst_level_quota:\n4096 10240 20480 0 60\n"
        "7 10 20 0 120\n")) == (0, "", "")
    st = QuotaFile.for_id(102).load()
    assert (st.level1.space.usage, st.level1.space.soft, st.level1.space.hard) == (
        4096, 10240, 20480)
    assert (st.level1.inodes.usage, st.grace1.space, st.grace1.inodes) == (7, 60, 120)


BIG = "9" * 5000


@pytest.mark.parametrize("what,stdin,message", [
    ("-U", f"ugid: {2**40} 0 1 2 3 4", f"ugid id {2**40} is out of range (0 to 4294967294)"),
    ("-U", "ugid: -1 0 1 2 3 4", "ugid id -1 is out of range (0 to 4294967294)"),
    ("-U", "ugid: 5 0 -1 2 3 4", "block soft limit -1 is out of range (0 to 18014398509481983)"),
    ("-U", f"ugid: 5 0 1 {2**54} 3 4",
     f"block hard limit {2**54} is out of range (0 to 18014398509481983)"),
    ("-U", f"ugid: 5 1 1 2 3 {2**32}", f"inode hard limit {2**32} is out of range (0 to 4294967295)"),
    ("-U", f"ugid: 5 0 1 {BIG} 3 4",
     "block hard limit 99999999999999999999...(5000 digits) is out of range "
     "(0 to 18014398509481983)"),
    ("-T", f"ugid: 5 0 {2**63} 0", f"block grace deadline {2**63} is out of range "
     "(0 to 9223372036854775807)"),
    ("-G", "grace_time: 0 -5 0", "block grace time -5 is out of range (0 to 9223372036854775807)"),
    ("-U", f"ugid_number: {BIG}", None),
])
def test_vzdqload_refuses_out_of_range_numbers(two, what, stdin, message):
    """No wrap, no traceback: a number outside its field is a usage error."""
    before = open(QuotaFile.for_id(102).path, "rb").read()
    if not stdin.startswith("ugid_number") and what != "-G":
        stdin = "ugid_number: 1\n" + stdin
    text = "ugid_quota_status: 1\n" + stdin + "\n"
    rc, out, err = run(VZDQLOAD, "102", what, stdin=text)
    last = text.splitlines(True)[-1]
    if message is None:
        message = ("ugid_number 99999999999999999999...(5000 digits) is out of range "
                   "(0 to 4294967295)")
    assert (rc, out) == (2, "") and "Traceback" not in err
    assert err == (f"vzquota : (error) {message}: refused, nothing was loaded\n"
                   f"vzquota : (error) Invalid input data: {last}\n")
    assert open(QuotaFile.for_id(102).path, "rb").read() == before
    # the 1st level (-F): the same check, then the -F part's own message
    rc, out, err = run(VZDQLOAD, "102", "-F", stdin=(
        f"ugid_quota_status: 0\nfirst_level_quota:\n1 2 3 4 {BIG}\n1 2 3 4 5\n"))
    assert rc == 2 and err.endswith(f"Invalid input data: 1 2 3 4 {BIG}\n\n")
    assert "block grace time" in err and "Traceback" not in err
    assert open(QuotaFile.for_id(102).path, "rb").read() == before
