"""``vzquota-metrics``: the textfile and the loopback endpoint carry every
figure ``vzquota stat -t --json`` shows, and parse as Prometheus text."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from conftest import BIN, vzquota

METRICS = str(BIN / "vzquota-metrics")
K = 1024


def samples(text: str) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(m: dict, name: str, **labels) -> float:
    return m[(name, tuple(sorted((k, str(v)) for k, v in labels.items())))]


def check_against_json(m: dict, doc: dict) -> None:
    q = doc["quotaid"]
    b, i = doc["level1"]["blocks"], doc["level1"]["inodes"]
    assert val(m, "vzquota_up", quotaid=q) == 1
    assert val(m, "vzquota_space_usage_bytes", quotaid=q) == b["usage_bytes"]
    assert val(m, "vzquota_space_softlimit_bytes", quotaid=q) == b["softlimit"] * K
    assert val(m, "vzquota_space_hardlimit_bytes", quotaid=q) == b["hardlimit"] * K
    assert val(m, "vzquota_space_grace_deadline_seconds", quotaid=q) == b["grace_deadline"]
    assert val(m, "vzquota_space_grace_period_seconds", quotaid=q) == b["grace_period"]
    assert val(m, "vzquota_inodes_usage_inodes", quotaid=q) == i["usage"]
    assert val(m, "vzquota_inodes_softlimit_inodes", quotaid=q) == i["softlimit"]
    assert val(m, "vzquota_inodes_hardlimit_inodes", quotaid=q) == i["hardlimit"]
    assert val(m, "vzquota_inodes_grace_deadline_seconds", quotaid=q) == i["grace_deadline"]
    for flag in ("on", "mounted", "accounting", "dirty", "unclean"):
        assert val(m, f"vzquota_{flag}", quotaid=q) == int(doc["state"][flag]), flag
    l2 = doc["level2"]
    for k in ("on", "active", "limit", "total", "exceeded"):
        assert val(m, f"vzquota_ugid_{k}", quotaid=q) == int(l2[k]), k
    for kind in ("user", "group"):
        assert val(m, "vzquota_ugid_grace_period_seconds", quotaid=q, type=kind,
                   resource="space") == l2["grace_period"][kind]["blocks"]
    assert l2["objects"]
    for o in l2["objects"]:
        lab = dict(quotaid=q, type=o["type"], id=o["id"])
        assert val(m, "vzquota_ugid_space_usage_bytes", **lab) == o["blocks"]["usage_bytes"]
        assert val(m, "vzquota_ugid_space_hardlimit_bytes", **lab) == o["blocks"]["hardlimit"] * K
        assert val(m, "vzquota_ugid_inodes_usage_inodes", **lab) == o["inodes"]["usage"]
        assert val(m, "vzquota_ugid_space_grace_deadline_seconds", **lab) == \
            o["blocks"]["grace_deadline"]


def start_quota(mounter, area):
    private, root = area
    vzquota("init", "101", "-p", str(private), "-b", "100", "-B", "2000", "-i", "1000",
            "-I", "1200", "-e", "1d", "-n", "1d", "-s", "1", "-u", "20")
    vzquota("on", "101")
    mounter(private, root, "quotaid=101")
    (root / "big").write_bytes(b"x" * (300 * K))
    os.chown(root / "big", 1001, 1001)
    vzquota("setlimit2", "101", "-u", "1001", "100", "1000", "0", "0")
    return private, root


def test_textfile_carries_every_figure(mounter, area, tmp_path):
    start_quota(mounter, area)
    out = tmp_path / "textfile" / "vzquota.prom"
    out.parent.mkdir()
    r = subprocess.run([METRICS, "--textfile", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in out.parent.iterdir()] == ["vzquota.prom"]   # no temp left
    m = samples(out.read_text())
    doc = json.loads(vzquota("stat", "101", "-t", "--json").stdout)
    check_against_json(m, doc)
    assert val(m, "vzquota_space_grace_deadline_seconds", quotaid=101) > 0   # over soft


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_endpoint_on_loopback_only(mounter, area, tmp_path):
    start_quota(mounter, area)
    r = subprocess.run([METRICS, "--listen", "0.0.0.0:9571"], capture_output=True, text=True)
    assert r.returncode == 2 and "loopback" in r.stderr
    port = free_port()
    proc = subprocess.Popen([METRICS, "--listen", f"127.0.0.1:{port}"],
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=10) as resp:
                    text = resp.read().decode()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "the endpoint never answered"
                time.sleep(0.05)
        doc = json.loads(vzquota("stat", "101", "-t", "--json").stdout)
        check_against_json(samples(text), doc)
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_broken_quota_is_down_not_fatal(area, tmp_path):
    private, _ = area
    vzquota("init", "5", "-p", str(private), "-b", "1", "-B", "2", "-i", "1", "-I", "2",
            "-e", "1", "-n", "1")
    qdir = Path(os.environ["VZQUOTA_DIR"])
    (qdir / "quota.6").write_text("garbage\n")
    os.chmod(qdir / "quota.6", 0o600)
    r = subprocess.run([METRICS], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = samples(r.stdout)
    assert val(m, "vzquota_up", quotaid=5) == 1 and val(m, "vzquota_up", quotaid=6) == 0


# ---- counters, leaving series out, the listener's bounds (issue 18 item 8,
# issue 21 item 5) ------------------------------------------------------------

FILL = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
n = 0
try:
    while True:
        n += os.write(fd, b"z" * 65536)
except OSError as e:
    print("errno", e.errno)
"""


def test_event_and_refusal_counters(mounter, area):
    """Each EDQUOT a caller got counts once (also those the log folds into one
    line), with the soft crossings; nothing for writes that succeeded."""
    import errno

    from backing import wait_usage_matches
    from conftest import py_as
    private, root = area
    vzquota("init", "101", "-p", str(private), "-b", "1024", "-B", "2048", "-i", "1000",
            "-I", "1200", "-e", "1d", "-n", "1d", "-s", "1", "-u", "20")
    vzquota("on", "101")
    mounter(private, root, "quotaid=101")
    os.chmod(root, 0o1777)
    for _ in range(3):              # the same file: a create would be refused too
        r = py_as(1000, 1000, FILL, str(root / "a"))
        assert f"errno {errno.EDQUOT}" in r.stdout, r.stdout + r.stderr

    def scrape() -> dict:
        r = subprocess.run([METRICS], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return samples(r.stdout)
    deadline = time.monotonic() + 10
    while True:
        m = scrape()
        key = ("vzquota_refusals_total", (("level", "1"), ("quotaid", "101"),
                                          ("resource", "space")))
        if m.get(key) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert val(m, "vzquota_refusals_total", quotaid=101, level=1, resource="space") == 3
    assert val(m, "vzquota_events_total", quotaid=101, event="hardlimit", level=1,
               resource="space") == 3
    assert val(m, "vzquota_events_total", quotaid=101, event="softlimit", level=1,
               resource="space") == 1
    assert not [k for k in m if k[0] == "vzquota_events_total"
                and dict(k[1])["event"] not in ("hardlimit", "softlimit")], m
    assert wait_usage_matches(private, 101) == []


def test_level2_and_ids_can_be_left_out(mounter, area):
    start_quota(mounter, area)

    def names(*args: str) -> set[str]:
        r = subprocess.run([METRICS, *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        # (the counters may appear between two scrapes: the soft crossing)
        return {k[0] for k, _ in samples(r.stdout).items()} - {
            "vzquota_events_total", "vzquota_refusals_total"}
    full = names()
    assert "vzquota_ugid_space_usage_bytes" in full and "vzquota_ugid_on" in full
    assert names("--no-level2-for", "5,102") == full
    for args in (["--no-level2"], ["--no-level2-for", "101"]):
        got = names(*args)
        assert not [n for n in got if n.startswith("vzquota_ugid_")], (args, got)
        assert "vzquota_space_usage_bytes" in got
    assert names("--exclude", "101") == set()
    r = subprocess.run([METRICS, "--exclude", "x"], capture_output=True, text=True)
    assert r.returncode == 2


def _serve(*args: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([METRICS, "--listen", *[a.replace("PORT", str(port))
                                                    for a in args]],
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, port
        except OSError:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the endpoint never listened"
            time.sleep(0.05)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_non_loopback_only_with_an_explicit_flag(area):
    r = subprocess.run([METRICS, "--listen", "0.0.0.0:9571"], capture_output=True, text=True)
    assert r.returncode == 2 and "--allow-remote" in r.stderr
    proc, port = _serve("0.0.0.0:PORT", "--allow-remote")
    try:
        assert "vzquota_up" in _scrape(port) or _scrape(port) == ""
    finally:
        proc.terminate()
        proc.wait(10)


def test_listen_caps_its_connections_and_threads(area):
    """1,000 idle connections used to start 1,000 threads; now at most
    --max-connections (4) are served at once and the rest are closed."""
    proc, port = _serve("127.0.0.1:PORT", "--max-connections", "4")
    idle = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(1.0)

        def threads() -> int:
            with open(f"/proc/{proc.pid}/status") as f:
                return int(next(ln for ln in f if ln.startswith("Threads:")).split()[1])
        assert threads() <= 5, threads()
        for s in idle:
            s.close()
        idle.clear()
        deadline = time.monotonic() + 30
        while True:                 # the slots come back once the idle ones go
            try:
                _scrape(port)
                break
            except OSError:
                assert time.monotonic() < deadline, "no scrape got through"
                time.sleep(0.2)
        assert threads() <= 5
    finally:
        for s in idle:
            s.close()
        proc.terminate()
        proc.wait(10)


def test_the_textfile_timer_units(area, tmp_path):
    """systemd/vzquota-metrics.{service,timer}: a oneshot every 30 s whose
    ExecStart writes the textfile (run here by hand, to a temporary path)."""
    from conftest import BIN
    repo = Path(__file__).resolve().parent.parent
    service = (repo / "systemd" / "vzquota-metrics.service").read_text()
    timer = (repo / "systemd" / "vzquota-metrics.timer").read_text()
    assert "Type=oneshot" in service and "OnUnitActiveSec=30s" in timer
    assert "WantedBy=timers.target" in timer
    line = next(ln for ln in service.splitlines() if ln.startswith("ExecStart="))
    words = line.split("=", 1)[1].split()
    assert words[0] == "/usr/local/sbin/vzquota-metrics" and words[1] == "--textfile"
    out = tmp_path / "vzquota.prom"
    r = subprocess.run([str(BIN / "vzquota-metrics"), "--textfile", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    samples(out.read_text())


def test_the_man_page_documents_every_option():
    import re
    import shutil
    page = (Path(__file__).resolve().parent.parent / "man" / "vzquota-metrics.8")
    text = page.read_text().replace("\\-", "-")
    r = subprocess.run([METRICS, "--help"], capture_output=True, text=True)
    opts = set(re.findall(r"--[a-z][a-z0-9-]+", r.stdout)) - {"--help"}
    assert {"--allow-remote", "--max-connections", "--no-level2", "--exclude"} <= opts
    for opt in opts:
        assert opt in text, opt
    for name in ("vzquota_events_total", "vzquota_refusals_total"):
        assert name in text, name
    groff = shutil.which("groff")
    if groff:
        g = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z", str(page)],
                           capture_output=True, text=True)
        assert g.returncode == 0 and g.stderr == "", g.stderr
