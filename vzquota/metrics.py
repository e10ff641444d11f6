"""``vzquota-metrics``: every quota in the Prometheus exposition format, as a
node-exporter textfile (written atomically) or on a loopback HTTP port.

Role: read every known quota id the way ``vzquota list`` does (live figures
from a mount, the file otherwise; ``report.gather``) and expose each figure
``vzquota stat -t`` shows: 1st-level usage, limits, grace deadlines and
periods per resource, the 2nd-level state and each uid/gid's figures, and the
flags.  Space is in bytes, times in epoch seconds (deadline 0: no timer).
Counters from each live mount (its ``events`` control request): every limit
event of the mount's life, ``vzquota_events_total{event,level,resource}``, and
the refusals among them (EDQUOT that went back to a caller),
``vzquota_refusals_total{level,resource}``; they start at 0 with each mount.
Built on ``prometheus_client`` (its collector, text encoder, atomic textfile
writer and WSGI app), so the output follows the format's rules exactly.

Usage::

    vzquota-metrics --textfile /var/lib/prometheus/node-exporter/vzquota.prom
    vzquota-metrics --listen 127.0.0.1:9571 [--max-connections 8]
    vzquota-metrics --no-level2 | --no-level2-for 101,102 | --exclude 7

(``systemd/vzquota-metrics.timer`` runs the textfile mode every 30 s.)

Exit status: 0 written (or the server stopped), 1 system error, 2 usage error.

Concurrency: one process; the HTTP server (``BoundedServer``) answers each
scrape in its own thread, at most ``--max-connections`` at once (a connection
past that is closed at once, one idle for ``CONN_TIMEOUT`` seconds is dropped),
and each scrape reads the quotas afresh (no shared mutable state).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import control, report
from .errors import VzError

RESOURCES = (("blocks", "space", "bytes"), ("inodes", "inodes", "inodes"))
REFUSALS = ("hardlimit", "grace", "ugid_limit")     # events that are an EDQUOT
MAX_CONNECTIONS = 8          # scrapes served at once (--max-connections)
CONN_TIMEOUT = 10.0          # seconds a connection may stay silent


def _value(key: str, c: dict, blocks: bool) -> int:
    """A figure of ``report.counter`` in the metric's unit (bytes for space)."""
    if key == "usage":
        return c["usage_bytes"] if blocks else c["usage"]
    if blocks and key in ("softlimit", "hardlimit"):
        return c[key] * 1024
    return c[key]


def live_events(qid: int) -> list[dict] | None:
    """The limit events a live mount counted (None: no live mount, or one
    that does not answer the request)."""
    try:
        reply = control.request(qid, "events", timeout=30)
    except VzError:
        return None
    return None if reply is None else reply.get("events")


class QuotaCollector:
    """A prometheus_client collector: one read of every quota per scrape.
    ``exclude``: quota ids left out; ``no_level2``: True (every quota) or a
    set of quota ids whose 2nd level (per uid/gid) is left out."""

    def __init__(self, ids=None, exclude=frozenset(), no_level2=frozenset()):
        self.ids = ids
        self.exclude = exclude
        self.no_level2 = no_level2

    def _level2(self, qid: int) -> bool:
        return not (self.no_level2 is True or qid in self.no_level2)

    def collect(self):
        ids = [q for q in (self.ids or report.known_ids()) if q not in self.exclude]
        quotas = [report.gather(q, ugid=self._level2(q)) for q in ids]
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
        events = CounterMetricFamily(
            "vzquota_events", "Limit events of the live mount (since it started)",
            labels=L1 + ["event", "level", "resource"])
        refusals = CounterMetricFamily(
            "vzquota_refusals", "Allocations refused with EDQUOT by the live mount "
            "(since it started)", labels=L1 + ["level", "resource"])
        for q in quotas:
            qid = str(q["quotaid"])
            up.add_metric([qid], 0 if "error" in q else 1)
            if "error" in q:
                continue
            if q["source"] == "mount":
                refused: dict[tuple[str, str], int] = {}
                for e in live_events(q["quotaid"]) or ():
                    lv = str(e["level"])
                    events.add_metric([qid, e["event"], lv, e["resource"]], e["count"])
                    if e["event"] in REFUSALS:
                        k = (lv, e["resource"])
                        refused[k] = refused.get(k, 0) + e["count"]
                for (lv, res), n in sorted(refused.items()):
                    refusals.add_metric([qid, lv, res], n)
            info.add_metric([qid, q["path"] or "", q["source"]], 1)
            for f, fam in flags.items():
                fam.add_metric([qid], int(bool(q["state"][f])))
            for key, res, _ in RESOURCES:
                c = q["level1"][key]
                for k, fam in l1[res].items():
                    fam.add_metric([qid], _value(k, c, key == "blocks"))
            lv2 = q.get("level2")
            if lv2 is None:             # left out (--no-level2)
                continue
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
        yield events
        yield refusals


def registry(exclude=frozenset(), no_level2=frozenset()) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(QuotaCollector(exclude=exclude, no_level2=no_level2))
    return reg


def listen_address(addr: str, allow_remote: bool = False) -> tuple[str, int]:
    """HOST:PORT of ``--listen``: an IP address (IPv6 in brackets or not) and
    a port; a non-loopback address only with ``allow_remote``."""
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen wants HOST:PORT, not {addr!r}")
    try:
        ip = ipaddress.ip_address(host or "127.0.0.1")
    except ValueError:
        raise ValueError(f"--listen wants an IP address, not {host!r}") from None
    if not ip.is_loopback and not allow_remote:
        raise ValueError(f"--listen serves only on a loopback address (127.0.0.0/8 or "
                         f"::1), not {host}: the figures name every container's path; "
                         "add --allow-remote to serve on it anyway")
    return str(ip), int(port)




class _Handler(WSGIRequestHandler):
    timeout = CONN_TIMEOUT         # socketserver: a silent connection is dropped

    def log_message(self, format, *args) -> None:    # noqa: A002 (the base's name)
        pass


class BoundedServer(WSGIServer):
    """The WSGI server of ``--listen``: one thread per connection, at most
    ``max_conns`` at once; a connection past that is closed at once (counted
    in ``refused``) rather than given a thread."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, addr: tuple[str, int], max_conns: int):
        self.address_family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self.slots = threading.BoundedSemaphore(max_conns)
        self.refused = 0
        super().__init__(addr, _Handler)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            threading.Thread(target=self._serve_one, args=(request, client_address),
                             daemon=True).start()
        except RuntimeError:           # no thread could be started
            self.slots.release()
            self.shutdown_request(request)

    def _serve_one(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self.slots.release()


def id_list(text: str) -> frozenset[int]:
    """``101,102``: quota ids (argparse type)."""
    try:
        ids = frozenset(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"quota ids separated by commas, not {text!r}")
    if not ids or min(ids) <= 0:
        raise argparse.ArgumentTypeError(f"quota ids separated by commas, not {text!r}")
    return ids


def positive(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 4096:
        raise argparse.ArgumentTypeError(f"a number from 1 to 4096, not {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="vzquota-metrics",
        description="Every vzquota quota in the Prometheus text format.",
        epilog="Exit status: 0 ok, 1 system error, 2 usage error.")
    p.add_argument("--textfile", metavar="FILE",
                   help="write FILE atomically (for node-exporter's textfile collector)")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="serve /metrics over HTTP on a loopback address")
    p.add_argument("--allow-remote", action="store_true",
                   help="let --listen use an address that is not loopback (the figures "
                        "name every container's path: firewall it)")
    p.add_argument("--max-connections", type=positive, default=MAX_CONNECTIONS,
                   metavar="N", help=f"--listen serves at most N connections at once "
                   f"(default {MAX_CONNECTIONS}; more are closed at once, and one silent "
                   f"for {CONN_TIMEOUT:g} s is dropped)")
    p.add_argument("--no-level2", action="store_true",
                   help="leave out the 2nd level (per uid/gid series) of every quota")
    p.add_argument("--no-level2-for", type=id_list, default=frozenset(), metavar="IDS",
                   help="leave out the 2nd level of these quota ids (comma-separated)")
    p.add_argument("--exclude", type=id_list, default=frozenset(), metavar="IDS",
                   help="leave these quota ids out (comma-separated)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("vzquota-metrics: must be run as root", file=sys.stderr)
        return 1
    reg = registry(args.exclude, True if args.no_level2 else args.no_level2_for)
    if args.listen:
        try:
            host, port = listen_address(args.listen, args.allow_remote)
        except ValueError as e:
            print(f"vzquota-metrics: {e}", file=sys.stderr)
            return 2
    if not args.textfile and not args.listen:
        sys.stdout.buffer.write(__import__("prometheus_client").generate_latest(reg))
        return 0
    if args.textfile:
        try:
            write_to_textfile(args.textfile, reg)
        except OSError as e:
            print(f"vzquota-metrics: cannot write {args.textfile}: {e.strerror}",
                  file=sys.stderr)
            return 1
    if args.listen:
        try:
            httpd = BoundedServer((host, port), args.max_connections)
        except OSError as e:
            print(f"vzquota-metrics: cannot listen on {host}:{port}: {e.strerror}",
                  file=sys.stderr)
            return 1
        httpd.set_app(make_wsgi_app(reg))
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
