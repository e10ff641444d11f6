"""``vzquota-metrics``: every quota in the Prometheus exposition format, as a
node-exporter textfile (written atomically) or on a loopback HTTP port.

Role: read every known quota id the way ``vzquota list`` does (live figures
from a mount, the file otherwise; ``report.gather``) and expose each figure
``vzquota stat -t`` shows: 1st-level usage, limits, grace deadlines and
periods per resource, the 2nd-level state and each uid/gid's figures, and the
flags.  Space is in bytes, times in epoch seconds (deadline 0: no timer).
Built on ``prometheus_client`` (its collector, text encoder, atomic textfile
writer and HTTP server), so the output follows the format's rules exactly.

Usage::

    vzquota-metrics --textfile /var/lib/prometheus/node-exporter/vzquota.prom
    vzquota-metrics --listen 127.0.0.1:9571

Exit status: 0 written (or the server stopped), 1 system error, 2 usage error.

Concurrency: one process; the HTTP server answers each scrape in its own
thread, and each scrape reads the quotas afresh (no shared mutable state).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import threading

from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile
from prometheus_client.core import GaugeMetricFamily

from . import report

RESOURCES = (("blocks", "space", "bytes"), ("inodes", "inodes", "inodes"))


def _value(key: str, c: dict, blocks: bool) -> int:
    """A figure of ``report.counter`` in the metric's unit (bytes for space)."""
    if key == "usage":
        return c["usage_bytes"] if blocks else c["usage"]
    if blocks and key in ("softlimit", "hardlimit"):
        return c[key] * 1024
    return c[key]


class QuotaCollector:
    """A prometheus_client collector: one read of every quota per scrape."""

    def __init__(self, ids=None):
        self.ids = ids

    def collect(self):
        quotas = [report.gather(q) for q in (self.ids or report.known_ids())]
        L1 = ["quotaid"]
        L2 = ["quotaid", "type", "id"]

        def g(name, doc, labels):
            return GaugeMetricFamily(f"vzquota_{name}", doc, labels=labels)
        up = g("up", "1 when the quota's figures could be read, 0 when not", L1)
        info = g("info", "Where each quota's figures come from", L1 + ["path", "source"])
        flags = {f: g(f, d, L1) for f, d in (
            ("on", "1 when accounting is wanted (vzquota on)"),
            ("mounted", "1 when a simfs mount carries the quota id"),
            ("accounting", "1 when that mount accounts and enforces the quota"),
            ("dirty", "1 when the usage may be wrong until a recount"),
            ("unclean", "1 when the last mount died without a clean stop"))}
        l1 = {}
        for _, res, unit in RESOURCES:
            l1[res] = {
                "usage": g(f"{res}_usage_{unit}", f"{res} in use (1st level)", L1),
                "softlimit": g(f"{res}_softlimit_{unit}", f"{res} soft limit", L1),
                "hardlimit": g(f"{res}_hardlimit_{unit}", f"{res} hard limit", L1),
                "grace_deadline": g(f"{res}_grace_deadline_seconds",
                                    f"end of the {res} grace time, epoch (0: none)", L1),
                "grace_period": g(f"{res}_grace_period_seconds",
                                  f"{res} grace time given when the soft limit is passed",
                                  L1)}
        ug = {
            "on": g("ugid_on", "1 when the 2nd level (per uid/gid) is on in the file", L1),
            "active": g("ugid_active", "1 when the 2nd level is accounted now", L1),
            "limit": g("ugid_limit", "most distinct uids+gids tracked", L1),
            "total": g("ugid_total", "distinct uids+gids known", L1),
            "exceeded": g("ugid_exceeded", "1 when a new uid/gid was refused", L1)}
        ug_grace = g("ugid_grace_period_seconds", "2nd-level grace time per type",
                     ["quotaid", "type", "resource"])
        l2 = {}
        for _, res, unit in RESOURCES:
            l2[res] = {
                "usage": g(f"ugid_{res}_usage_{unit}", f"{res} of one uid/gid", L2),
                "softlimit": g(f"ugid_{res}_softlimit_{unit}",
                               f"{res} soft limit of one uid/gid (0: none)", L2),
                "hardlimit": g(f"ugid_{res}_hardlimit_{unit}",
                               f"{res} hard limit of one uid/gid (0: none)", L2),
                "grace_deadline": g(f"ugid_{res}_grace_deadline_seconds",
                                    f"end of the uid/gid's {res} grace time (0: none)", L2)}
        for q in quotas:
            qid = str(q["quotaid"])
            up.add_metric([qid], 0 if "error" in q else 1)
            if "error" in q:
                continue
            info.add_metric([qid, q["path"] or "", q["source"]], 1)
            for f, fam in flags.items():
                fam.add_metric([qid], int(bool(q["state"][f])))
            for key, res, _ in RESOURCES:
                c = q["level1"][key]
                for k, fam in l1[res].items():
                    fam.add_metric([qid], _value(k, c, key == "blocks"))
            lv2 = q["level2"]
            for k, fam in ug.items():
                fam.add_metric([qid], int(lv2[k]))
            for kind, gp in lv2["grace_period"].items():
                for key, res, _ in RESOURCES:
                    ug_grace.add_metric([qid, kind, res], gp[key])
            for o in lv2["objects"]:
                labels = [qid, o["type"], str(o["id"])]
                for key, res, _ in RESOURCES:
                    for k, fam in l2[res].items():
                        fam.add_metric(labels, _value(k, o[key], key == "blocks"))
        yield up
        yield info
        yield from flags.values()
        for fams in l1.values():
            yield from fams.values()
        yield from ug.values()
        yield ug_grace
        for fams in l2.values():
            yield from fams.values()


def registry() -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(QuotaCollector())
    return reg


def loopback(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen wants HOST:PORT, not {addr!r}")
    try:
        ip = ipaddress.ip_address(host or "127.0.0.1")
    except ValueError:
        raise ValueError(f"--listen wants a loopback address, not {host!r}") from None
    if not ip.is_loopback:
        raise ValueError(f"--listen serves only on a loopback address (127.0.0.0/8 or "
                         f"::1), not {host}: the figures name every container's path")
    return str(ip), int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="vzquota-metrics",
        description="Every vzquota quota in the Prometheus text format.",
        epilog="Exit status: 0 ok, 1 system error, 2 usage error.")
    p.add_argument("--textfile", metavar="FILE",
                   help="write FILE atomically (for node-exporter's textfile collector)")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="serve /metrics over HTTP on a loopback address")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("vzquota-metrics: must be run as root", file=sys.stderr)
        return 1
    if not args.textfile and not args.listen:
        sys.stdout.buffer.write(__import__("prometheus_client").generate_latest(registry()))
        return 0
    if args.textfile:
        try:
            write_to_textfile(args.textfile, registry())
        except OSError as e:
            print(f"vzquota-metrics: cannot write {args.textfile}: {e.strerror}",
                  file=sys.stderr)
            return 1
    if args.listen:
        try:
            host, port = loopback(args.listen)
        except ValueError as e:
            print(f"vzquota-metrics: {e}", file=sys.stderr)
            return 2
        try:
            start_http_server(port, addr=host, registry=registry())
        except OSError as e:
            print(f"vzquota-metrics: cannot listen on {host}:{port}: {e.strerror}",
                  file=sys.stderr)
            return 1
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
