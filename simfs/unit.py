"""``simfs-service prestart|start|stop ID``: the command lines of the systemd
template ``simfs@.service`` (one instance per quota id), testable without
systemd.

Role: read the instance's small config (``$SIMFS_CONFDIR/ID.conf``, default
``/etc/simfs/ID.conf``; ``KEY=VALUE`` lines)::

    ROOT=/vz/root/101          # the mount point (required)
    PRIVATE=/vz/private/101    # default: the path stored in the quota file
    OPTIONS=dev,suid           # simfs -o options (default dev,suid)
    QUOTA=yes                  # yes, no, or auto (default: yes if a quota file exists)

- ``prestart``: clear a dead mount left by a daemon that died (``umount -l``),
  refuse a live one, create the mount point, and ``vzquota on ID`` (which
  recounts after an incorrect shutdown; "already running" is fine);
- ``start``: ``exec simfs PRIVATE ROOT -f -o OPTIONS,quotaid=ID`` (the daemon in
  the foreground is the service's main process; it tells systemd READY=1 once
  mounted).  As any simfs mount, it is refused when the quota is off (say,
  ``start`` without ``prestart``) unless OPTIONS has ``quota_off_ok``;
  ``QUOTA=no`` mounts without the quota id, and ``prestart`` says so when the
  id has a quota file;
- ``stop [PID]``: ``umount ROOT`` and wait for the daemon to save and exit; when
  the mount is busy it says so and leaves the daemon to systemd's SIGTERM,
  which simfs turns into a clean stop with a lazy unmount.

Exit status: 0 done, 1 failed (the reason on stderr), 2 usage or config error.

Concurrency: one short-lived process per step; systemd runs them in order.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

DEFAULT_CONFDIR = "/etc/simfs"
KEYS = ("ROOT", "PRIVATE", "OPTIONS", "QUOTA")


class ConfigError(Exception):
    pass


def conf_dir() -> str:
    return os.environ.get("SIMFS_CONFDIR") or DEFAULT_CONFDIR


def load_config(qid: int) -> dict[str, str]:
    path = os.path.join(conf_dir(), f"{qid}.conf")
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    conf = {"OPTIONS": "dev,suid", "QUOTA": "auto"}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, val = line.partition("=")
        key, val = key.strip(), val.strip().strip('"').strip("'")
        if not eq or key not in KEYS:
            raise ConfigError(f"{path}:{n}: expected one of {', '.join(KEYS)}=VALUE")
        conf[key] = val
    if not conf.get("ROOT"):
        raise ConfigError(f"{path}: ROOT= (the mount point) is required")
    if conf["QUOTA"] not in ("yes", "no", "auto"):
        raise ConfigError(f"{path}: QUOTA= must be yes, no or auto")
    from vzquota.qfile import QuotaFile
    qf = QuotaFile.for_id(qid)
    conf["_QUOTAFILE"] = "1" if qf.exists() else ""
    if conf["QUOTA"] == "auto":
        conf["QUOTA"] = "yes" if qf.exists() else "no"
    if not conf.get("PRIVATE"):
        stored = qf.load().path if qf.exists() else None
        if not stored:
            raise ConfigError(f"{path}: PRIVATE= is required (no quota file stores it)")
        conf["PRIVATE"] = stored
    return conf


def _mounted(root: str) -> bool:
    real = os.path.realpath(root)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4].encode().decode("unicode_escape") == real for line in f)


def prestart(qid: int, conf: dict[str, str]) -> int:
    from .cli import dead_mount
    root = conf["ROOT"]
    if dead_mount(root):
        print(f"simfs-service: {root} is a dead mount (its daemon died): "
              f"umount -l {root}", file=sys.stderr)
        subprocess.run(["umount", "-l", root], check=False)
    elif _mounted(root):
        print(f"simfs-service: {root} is already mounted; stop that mount first",
              file=sys.stderr)
        return 1
    os.makedirs(root, mode=0o755, exist_ok=True)
    if conf["QUOTA"] == "no" and conf.get("_QUOTAFILE"):
        print(f"simfs-service: QUOTA=no: {root} is mounted without quota id {qid} "
              "(its quota file exists, but nothing is enforced)", file=sys.stderr)
    if conf["QUOTA"] == "yes":
        from vzquota import cli as vzcli
        from vzquota.errors import EC_RUN
        code = vzcli.main(["on", str(qid)])
        if code not in (0, EC_RUN):
            return 1
    return 0


def start(qid: int, conf: dict[str, str]) -> int:
    opts = conf["OPTIONS"]
    if conf["QUOTA"] == "yes":
        opts = f"{opts},quotaid={qid}" if opts else f"quotaid={qid}"
    simfs = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), "simfs")
    if not os.access(simfs, os.X_OK):
        simfs = "simfs"
    cmd = [simfs, conf["PRIVATE"], conf["ROOT"], "-f"] + (["-o", opts] if opts else [])
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        print(f"simfs-service: cannot run {cmd[0]}: {e.strerror}", file=sys.stderr)
    return 1


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def stop(qid: int, conf: dict[str, str], pid: int | None, timeout: float = 90.0) -> int:
    root = conf["ROOT"]
    if _mounted(root):
        r = subprocess.run(["umount", root], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"simfs-service: umount {root} failed ({r.stderr.strip()}); the "
                  "daemon's SIGTERM will detach it lazily", file=sys.stderr)
            return 0
    if pid:
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    return 0


USAGE = "usage: simfs-service prestart|start|stop QUOTA_ID [MAINPID]\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] not in ("prestart", "start", "stop") \
            or not argv[1].isdigit() or int(argv[1]) <= 0:
        sys.stderr.write(USAGE)
        return 2
    step, qid = argv[0], int(argv[1])
    pid = int(argv[2]) if len(argv) > 2 and argv[2].isdigit() else None
    try:
        conf = load_config(qid)
    except ConfigError as e:
        print(f"simfs-service: {e}", file=sys.stderr)
        return 2
    except Exception as e:      # a corrupt quota file, say
        print(f"simfs-service: {getattr(e, 'message', e)}", file=sys.stderr)
        return 1
    if step == "prestart":
        return prestart(qid, conf)
    if step == "start":
        return start(qid, conf)
    return stop(qid, conf, pid)


if __name__ == "__main__":
    sys.exit(main())
