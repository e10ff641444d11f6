"""``vzquota list`` and ``--json`` on list, stat and show: every figure the
text shows, from a live mount or the file; text and -b output unchanged."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import vzquota
from vzquota.units import format_deadline

K = 1024


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "--block-size=1", "-s", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[0])


def init(qid: str, private: Path, *extra: str) -> None:
    vzquota("init", qid, "-p", str(private), "-b", "100", "-B", "2000", "-i", "1000",
            "-I", "1200", "-e", "1d", "-n", "2d", *extra)


def stat_text_figures(text: str) -> dict:
    """The numbers of ``stat``/``show``'s 1st-level table."""
    rows = {}
    for line in text.splitlines()[1:3]:
        f = line.replace("*", " ").split()
        rows[f[0]] = (int(f[1]), int(f[2]), int(f[3]), " ".join(f[4:]))
    return rows


def test_stat_json_carries_every_figure_of_stat_t(mounter, area):
    private, root = area
    init("101", private, "-s", "1", "-u", "50")
    vzquota("on", "101")
    mounter(private, root, "quotaid=101")
    (root / "big").write_bytes(b"x" * (300 * K))     # over the 100K soft limit
    (root / "small").write_bytes(b"y" * 10)
    vzquota("setlimit2", "101", "-u", "0", "50", "1000", "5", "10")
    text = vzquota("stat", "101", "-t").stdout
    r = vzquota("stat", "101", "-t", "--json")
    doc = json.loads(r.stdout)
    assert doc["schema"] == 1 and doc["quotaid"] == 101 and doc["source"] == "mount"
    assert doc["state"] == {"on": True, "mounted": True, "accounting": True,
                            "dirty": False, "unclean": False}
    rows = stat_text_figures(text)
    for name, key in (("1k-blocks", "blocks"), ("inodes", "inodes")):
        c = doc["level1"][key]
        assert (c["usage"], c["softlimit"], c["hardlimit"]) == rows[name][:3]
        assert format_deadline(c["grace_deadline"], doc["now"]).strip() == rows[name][3]
    b = doc["level1"]["blocks"]
    assert b["usage_bytes"] == du_bytes(private)
    assert b["over_softlimit"] and not b["over_hardlimit"] and b["grace_deadline"] > 0
    assert b["grace_period"] == 86400 and doc["level1"]["inodes"]["grace_period"] == 172800
    l2 = doc["level2"]
    assert l2["on"] and l2["active"] and l2["limit"] == 50
    objs = {(o["type"], o["id"]): o for o in l2["objects"]}
    assert objs[("user", 0)]["blocks"]["softlimit"] == 50
    assert objs[("user", 0)]["blocks"]["over_softlimit"]
    assert objs[("user", 0)]["inodes"]["hardlimit"] == 10
    for line in text.splitlines():          # every object row of the text
        f = line.split()
        if len(f) >= 6 and f[0].isdigit() and f[1] in ("user", "group"):
            o = objs[(f[1], int(f[0]))]["blocks" if f[2] == "1k-blocks" else "inodes"]
            assert [int(x) for x in f[3:6]] == [o["usage"], o["softlimit"], o["hardlimit"]]
    assert vzquota("stat", "101", "-t").stdout == text    # text unchanged


def test_show_json_and_exit_codes(area):
    private, _ = area
    init("7", private)
    doc = json.loads(vzquota("show", "7", "--json").stdout)
    assert doc["source"] == "file" and doc["state"]["mounted"] is False
    assert doc["level1"]["blocks"]["usage_bytes"] == du_bytes(private)
    assert "level2" not in doc
    doc = json.loads(vzquota("show", "7", "-t", "--json").stdout)
    assert doc["level2"]["objects"] == [] or all("type" in o for o in doc["level2"]["objects"])
    r = vzquota("stat", "7", "--json", check=False)
    assert r.returncode == 6 and r.stdout == ""             # as the text
    r = vzquota("on", "7", "--json", check=False)
    # --json is for list, stat and show: elsewhere getopt's own word, as for any option
    assert r.returncode == 2 and r.stderr.startswith("7: unrecognized option '--json'\n")


def test_list_text_batch_and_json(mounter, area, world_tmp):
    private, root = area
    init("101", private)
    vzquota("on", "101")
    other = world_tmp / "other"
    other.mkdir()
    (other / "f").write_bytes(b"z" * (5 * K))
    init("202", other)
    m = mounter(private, root, "quotaid=101", "checkpoint=3600")
    (root / "a").write_bytes(b"a" * (20 * K))
    text = vzquota("list").stdout.splitlines()
    assert text[0].split() == ["quotaid", "state", "mounted", "1k-blocks", "softlimit",
                               "hardlimit", "inodes", "softlimit", "hardlimit", "path"]
    rows = {int(line.split()[0]): line for line in text[1:]}
    assert set(rows) == {101, 202}
    assert rows[101].split()[1:3] == ["on", "yes"]
    assert rows[202].split()[1:3] == ["off", "no"]
    batch = {int(line.split()[0]): line.split() for line in
             vzquota("-b", "list").stdout.splitlines()}
    assert batch[101][3] == str(-(-du_bytes(private) // K))    # live figures
    assert batch[202][3] == str(-(-du_bytes(other) // K)) and batch[202][9] == str(other)
    doc = json.loads(vzquota("list", "--json").stdout)
    assert doc["schema"] == 1
    by_id = {q["quotaid"]: q for q in doc["quotas"]}
    assert by_id[101]["source"] == "mount"
    assert by_id[101]["level1"]["blocks"]["usage_bytes"] == du_bytes(private)
    assert by_id[202]["source"] == "file" and by_id[202]["path"] == str(other)
    m.kill()                                  # a crash: the file says "mounted"
    rows = {int(line.split()[0]): line.split() for line in vzquota("list").stdout.splitlines()[1:]}
    assert rows[101][2] == "dead"
    doc = json.loads(vzquota("list", "--json").stdout)
    assert {q["quotaid"]: q for q in doc["quotas"]}[101]["state"]["unclean"] is True


def test_list_reports_a_broken_file_and_goes_on(area):
    import os
    private, _ = area
    init("5", private)
    qdir = Path(os.environ["VZQUOTA_DIR"])
    (qdir / "quota.6").write_text("garbage\n")
    os.chmod(qdir / "quota.6", 0o600)
    r = vzquota("list")
    rows = {int(line.split()[0]): line.split() for line in r.stdout.splitlines()[1:]}
    assert rows[5][1] == "off" and rows[6][1] == "error"
    doc = json.loads(vzquota("list", "--json").stdout)
    # vzquota(8), JSON output: a file that cannot be read is {quotaid, file, error}
    assert {q["quotaid"]: q for q in doc["quotas"]}[6] == {
        "quotaid": 6, "file": str(qdir / "quota.6"),
        "error": "Can't detect quota file version; file is not a VZ quota file"}
    assert rows[6][2] == "no"
