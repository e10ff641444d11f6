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
