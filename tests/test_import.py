"""``vzquota import``: binary quota files of the original OpenVZ vzquota, built here
byte by byte from the layout its sources give (src/quota_io.c, include/quota_io.h,
include/vzquota.h, include/linux/vzquota.h), carry every figure over.

The builders below write each field at its offset in the C structs of the
original's x86_64 build (8-byte time_t and size_t, 64-bit fields 8-aligned, each
struct padded to 8) or of its i386 build (4-byte time_t and size_t, 4-aligned):
header {int magic; int flags}, then the 1st-level stat of the version, then
{size_t path_len; char path[]}, and for version 3 {struct ugid_info} (limit,
count, flags, buf_size, dq_info[2]), buf_size {struct ugid_obj} and the 64-bit
XOR checksum of all the 8-byte words before it (chksum_quota_file()).
"""

from __future__ import annotations

import struct
import subprocess
import time

import pytest

from conftest import VZQUOTA, vzquota
from vzquota.qfile import QuotaFile

QID = "101"
K = 1024
MAGIC = {1: 0xFEDCBA98, 2: 0xFEDCBB00, 3: 0xFEDCBC27}
QUOTA_ON, QUOTA_DIRTY, QUOTA_UGID_ON = 1, 2, 4


def put(buf: bytearray, off: int, fmt: str, *values) -> None:
    end = off + struct.calcsize("<" + fmt)
    if len(buf) < end:
        buf.extend(b"\0" * (end - len(buf)))
    struct.pack_into("<" + fmt, buf, off, *values)


def xor_words(data: bytes) -> int:
    data = data + b"\0" * (-len(data) % 8)
    value = 0
    for i in range(0, len(data), 8):
        value ^= int.from_bytes(data[i:i + 8], "little")
    return value


def dq_stat_64(buf, off, bhard, bsoft, btime, bcur, ihard, isoft, itime, icur):
    """struct dq_stat, x86_64: 56 bytes."""
    put(buf, off + 0, "Q", bhard)
    put(buf, off + 8, "Q", bsoft)
    put(buf, off + 16, "q", btime)
    put(buf, off + 24, "Q", bcur)
    put(buf, off + 32, "I", ihard)
    put(buf, off + 36, "I", isoft)
    put(buf, off + 40, "q", itime)
    put(buf, off + 48, "I", icur)
    put(buf, off + 52, "I", 0)            # padding


def dq_stat_32(buf, off, bhard, bsoft, btime, bcur, ihard, isoft, itime, icur):
    """struct dq_stat, i386: 44 bytes."""
    put(buf, off + 0, "Q", bhard)
    put(buf, off + 8, "Q", bsoft)
    put(buf, off + 16, "i", btime)
    put(buf, off + 20, "Q", bcur)
    put(buf, off + 28, "I", ihard)
    put(buf, off + 32, "I", isoft)
    put(buf, off + 36, "i", itime)
    put(buf, off + 40, "I", icur)


def build_v3(level1: dict, graces: tuple, path: bytes, flags: int, limit: int,
             ugid_graces: tuple, objects: list, abi: str = "x86_64",
             buf_size: int | None = None) -> bytes:
    wide = abi == "x86_64"
    stat, tsz, info_size, dqinfo = (dq_stat_64, "q", 24, 24) if wide else (dq_stat_32, "i", 12, 12)
    obj_size = 72 if wide else 56
    b = bytearray()
    put(b, 0, "I", MAGIC[3])
    put(b, 4, "i", flags)
    stat(b, 8, **level1)                         # struct vz_quota_stat: dq_stat ...
    info = 8 + (56 if wide else 44)              # ... then dq_info
    put(b, info, tsz, graces[0])
    put(b, info + (8 if wide else 4), tsz, graces[1])
    put(b, info + (16 if wide else 8), "I", 0)
    off = info + info_size
    put(b, off, "Q" if wide else "I", len(path))            # size_t path_len
    off += 8 if wide else 4
    b[off:off] = path
    off += len(path)
    put(b, off, "IIII", limit, 0, 0, len(objects) if buf_size is None else buf_size)
    for i, (bexp, iexp) in enumerate(ugid_graces):         # dq_info ugid_info[2]
        g = off + 16 + i * dqinfo
        put(b, g, tsz, bexp)
        put(b, g + (8 if wide else 4), tsz, iexp)
        put(b, g + (16 if wide else 8), "I", 0)
    off += 16 + 2 * dqinfo
    for n, (ugid, kind, st, oflags) in enumerate(objects):  # struct ugid_obj
        o = off + n * obj_size
        put(b, o, "II", ugid, kind)
        stat(b, o + 8, **st)
        put(b, o + 8 + (56 if wide else 44), "I", oflags)
    end = off + len(objects) * obj_size
    b.extend(b"\0" * (end - len(b)))
    del b[end:]
    return bytes(b) + struct.pack("<Q", xor_words(bytes(b)))


NOW = 0       # set by the `now` fixture: deadlines are relative to the test's start


@pytest.fixture(autouse=True)
def now():
    global NOW, LEVEL1, OBJECTS
    NOW = int(time.time())
    LEVEL1, OBJECTS = level1_and_objects()
    return NOW


def level1_and_objects():
    return dict(bhard=2_000_000 * K, bsoft=1_000_000 * K, btime=NOW + 3 * 86400,
              bcur=1_234_567 * K + 5, ihard=220_000, isoft=200_000, itime=0, icur=21_000), [
    (0, 0, dict(bhard=0, bsoft=0, btime=0, bcur=40 * K, ihard=0, isoft=0, itime=0, icur=9), 1),
    (1001, 0, dict(bhard=12_000 * K, bsoft=10_000 * K, btime=NOW + 86400, bcur=11_000 * K,
                   ihard=120, isoft=100, itime=NOW + 7200, icur=100), 1),
    (1001, 1, dict(bhard=0, bsoft=0, btime=0, bcur=5 * K, ihard=50, isoft=40, itime=0,
                   icur=3), 1),
    (70000, 1, dict(bhard=900 * K, bsoft=800 * K, btime=0, bcur=0, ihard=0, isoft=0,
                    itime=0, icur=0), 2),
    ]


LEVEL1: dict = {}
OBJECTS: list = []


def expected_batch_show_t(abi_note: str = "") -> str:
    """`vzquota -b show 101 -t` of that state, row by row from print_status() and
    print_ugid_status() of src/stat.c (batch formats)."""
    rows = [
        # blocks: usage soft hard deadline(only while over soft) grace; then inodes
        "%14d %14d %14d %14d %14d" % (1_234_568, 1_000_000, 2_000_000, NOW + 3 * 86400, 7 * 86400),
        "%14d %14d %14d %14d %14d" % (21_000, 200_000, 220_000, 0, 86400),
        "1 0",            # 2nd level on in the file; not active (no mount)
        "0 4 10",         # loaded, total, limit
        "0",
        "%5s %d %d %9Xh" % ("user", 3 * 86400, 86400, 0),
        "%5s %d %d %9Xh" % ("group", 7200, 600, 0),
        # objects by id, user first; grace shown when usage >= soft; the status
        # is derived ("0 0": no mount accounts it), the file's per-object flags
        # (1 loaded, 2 dirty) are not kept, as vzquota(8) says under import
        "%-11d %5s %9s %11d %11d %11d %8s %6s" % (0, "user", "1k-blocks", 40, 0, 0, "0", "0 0"),
        "%-11d %5s %9s %11d %11d %11d %8s %6s" % (0, "user", "inodes", 9, 0, 0, "0", "0 0"),
        "%-11d %5s %9s %11d %11d %11d %8s %6s" % (1001, "user", "1k-blocks", 11_000, 10_000,
                                                  12_000, str(NOW + 86400), "0 0"),
        "%-11d %5s %9s %11d %11d %11d %8s %6s" % (1001, "user", "inodes", 100, 100, 120,
                                                  str(NOW + 7200), "0 0"),
        "%-11d %5s %9s %11d %11d %11d %8s %6s" % (1001, "group", "1k-blocks", 5, 0, 0, "0", "0 0"),
        "%-11d %5s %9s %11d %11d %11d %8s %6s" % (1001, "group", "inodes", 3, 40, 50, "0", "0 0"),
        "%-11d %5s %9s %11d %11d %11d %8s %6s" % (70000, "group", "1k-blocks", 0, 800, 900, "0",
                                                  "0 0"),
        "%-11d %5s %9s %11d %11d %11d %8s %6s" % (70000, "group", "inodes", 0, 0, 0, "0", "0 0"),
    ]
    return "".join(r + "\n" for r in rows)


def v3(abi="x86_64", flags=QUOTA_UGID_ON, **kw) -> bytes:
    return build_v3(LEVEL1, (7 * 86400, 86400), b"/vz/private/101", flags, 10,
                    ((3 * 86400, 86400), (7200, 600)), OBJECTS, abi=abi, **kw)


def run(*args: str) -> tuple[int, str, str]:
    r = subprocess.run([VZQUOTA, *args], capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


@pytest.mark.parametrize("abi", ["x86_64", "i386"])
def test_import_v3_carries_every_figure(tmp_path, abi):
    src = tmp_path / "quota.101"
    src.write_bytes(v3(abi))
    assert run("import", QID, str(src)) == (0, "", "")
    assert run("-b", "show", QID, "-t") == (0, expected_batch_show_t(), "")
    st = QuotaFile.for_id(101).load()
    assert st.path == "/vz/private/101"
    assert st.level1.space.usage == 1_234_567 * K + 5         # bytes, not rounded
    assert (st.on, st.mounted, st.dirty) == (False, False, False)
    # the human form of the same: the 1st-level rows and the 2nd-level status
    out = vzquota("show", QID, "-t").stdout.splitlines()
    assert out[1] == "%11s %14d%c %14d %14d %8s" % ("1k-blocks", 1234568, "*", 1000000,
                                                     2000000, "3days")
    assert out[3:6] == ["User/group quota: on,inactive", "Ugids: loaded 0, total 4, limit 10",
                        "Ugid limit was exceeded: no"]


def test_import_flags_and_path(tmp_path, world_tmp):
    src = tmp_path / "quota.101"
    src.write_bytes(v3(flags=QUOTA_UGID_ON | QUOTA_DIRTY | QUOTA_ON))
    private = world_tmp / "p"
    private.mkdir()
    assert run("import", QID, str(src), "-p", str(private)) == (0, "", "")
    # QUOTA_ON: copied from a node where it ran -- as the original, show warns and
    # the dirty flag makes it exit 10 after printing
    rc, out, err = run("show", QID)
    assert (rc, err) == (10, "vzquota : (warning) Quota is running, so data reported "
                         "from quota file may not reflect current values\n")
    assert QuotaFile.for_id(101).load().path == str(private)
    # the next `on` recounts, as the original's did after an incorrect shutdown
    rc, out, err = run("on", QID)
    assert (rc, out, err) == (0, "", "vzquota : (warning) Incorrect quota shutdown for id "
                              "101, recalculating disk usage\n")
    # an import over an existing file: init's warning
    assert run("import", QID, str(src)) == (
        0, "", "vzquota : (warning) Quota file exists, it will be overwritten\n")


def old_stat(version: int, abi: str) -> bytes:
    """Versions 1 and 2: header, struct vz_quota_stat_old1/old2, path (no 2nd level)."""
    b = bytearray()
    put(b, 0, "I", MAGIC[version])
    put(b, 4, "i", 0)
    wide = abi == "x86_64"
    t = "q" if wide else "i"
    if version == 1:            # 32-bit 1K blocks
        fields = [("I", 2000), ("I", 1000), (t, 3600), (t, NOW + 600), ("I", 1500),
                  ("I", 300), ("I", 200), ("I", 250), (t, 7200), (t, NOW + 60), ("i", 0)]
    else:                       # 64-bit bytes
        fields = [("Q", 2000 * K), ("Q", 1000 * K), (t, 3600), (t, NOW + 600),
                  ("Q", 1500 * K - 100), ("I", 300), ("I", 200), ("I", 250), (t, 7200),
                  (t, NOW + 60), ("i", 0)]
    off = 8
    for fmt, value in fields:
        size = struct.calcsize(fmt)
        align = min(size, 8 if wide else 4)
        off += -off % align
        put(b, off, fmt, value)
        off += size
    off += -(off - 8) % (8 if wide else 4)         # the struct's tail padding
    put(b, off, "Q" if wide else "I", 3)
    b[off + (8 if wide else 4):] = b"/vz"
    return bytes(b)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("abi", ["x86_64", "i386"])
def test_import_old_versions(tmp_path, version, abi):
    src = tmp_path / "quota.101"
    src.write_bytes(old_stat(version, abi))
    assert run("import", QID, str(src)) == (0, "", "")
    rc, out, err = run("-b", "show", QID)
    # reformat_quota(): a version 2 file is marked dirty (show exits 10)
    assert (rc, err) == (10 if version == 2 else 0, "")
    assert out == ("%14d %14d %14d %14d %14d\n" % (1500, 1000, 2000, NOW + 600, 3600)
                   + "%14d %14d %14d %14d %14d\n" % (250, 200, 300, NOW + 60, 7200))
    assert QuotaFile.for_id(101).load().path == "/vz"


def test_import_errors(tmp_path):
    src = tmp_path / "quota.101"
    good = v3()

    def attempt(data: bytes) -> tuple[int, str, str]:
        src.write_bytes(data)
        return run("import", QID, str(src))
    # get_quota_version()
    assert attempt(b"\x01\x02\x03\x04" + good[4:]) == (4, "", (
        "vzquota : (error) Can't detect quota file version; file is not a VZ quota file\n"))
    # check_quota_file(): debug(LOG_ERROR, ...) ends in one newline
    flipped = bytearray(good)
    flipped[40] ^= 1
    assert attempt(bytes(flipped)) == (4, "", (
        "vzquota : (error) Quota file check sum is invalid for id 101; file is broken\n"))
    # read_field(): short read
    assert attempt(good[:6]) == (4, "", "vzquota : (error) quota file is corrupted\n")
    # read_quota_file(): a bad object type
    bad_type = build_v3(LEVEL1, (0, 0), b"", 0, 10, ((0, 0), (0, 0)),
                        [(5, 7, OBJECTS[0][2], 0)])
    assert attempt(bad_type) == (4, "", (
        "vzquota : (error) 0 ugid object has incorrect type: id=5, type=7; "
        "quota file is corrupted\n"))
    # ... and a count that does not match the objects (one id twice)
    twice = build_v3(LEVEL1, (0, 0), b"", 0, 10, ((0, 0), (0, 0)),
                     [(5, 0, OBJECTS[0][2], 0), (5, 0, OBJECTS[0][2], 0)])
    assert attempt(twice) == (4, "", (
        "vzquota : (error) Number of ugid objects read from quota file is not equal to "
        "one in 2-level quota statistics; quota file is corrupted for id 101\n\n"))
    assert not QuotaFile.for_id(101).exists()          # nothing half-imported
    # open_quota_file()
    assert run("import", QID, str(tmp_path / "none")) == (11, "", (
        "vzquota : (error) Can't open quota file for id 101, maybe you need to "
        "reinitialize quota: No such file or directory\n"))
    assert run("import", QID) == (2, "", (
        "Usage: vzquota import <quotaid> <openvz_quota_file> [-p <mount_path>] "
        "[-c <quota_file>]\n\t[-R,--relative]\n"))
