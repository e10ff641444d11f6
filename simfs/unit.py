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
  refuse a live one, create the mount point, and run ``vzquota on ID`` (which
  recounts after an incorrect shutdown; "already running" is fine);
- ``start``: mount ``simfs PRIVATE ROOT -o OPTIONS,quotaid=ID``.  When the
  mount service runs (``simfs-mountd.service``), through it: the daemon is a
  fork of the service, and this process stays as the unit's main process, a
  watcher that tells systemd READY=1 once mounted and then becomes a shell
  and a ``tail --pid`` (about 0.5 MB): it forwards SIGTERM to the daemon and
  exits within a second of the daemon: 0 when the mount is gone (a clean
  unmount), 1 when the daemon died and left a dead mount, so that
  ``Restart=on-failure`` mounts again.  Without the service (or with
  ``SIMFS_SERVICE=0``), ``exec simfs ... -f``: the daemon in the foreground is
  the main process and tells READY=1 itself.  As any simfs mount, it is
  refused when the quota is off (say, ``start`` without ``prestart``) unless
  OPTIONS has ``quota_off_ok``; ``QUOTA=no`` mounts without the quota id, and
  ``prestart`` says so when the id has a quota file;
- ``stop [PID]``: ``umount ROOT`` and wait for the main process (the daemon or
  the watcher, which ends with it) to exit, the quota saved; when the mount is
  busy it says so and leaves it to systemd's SIGTERM, which simfs turns into a
  clean stop with a lazy unmount.

Exit status: 0 done, 1 failed (the reason on stderr), 2 usage or config error.

Concurrency: one short-lived process per step (the watcher lives as long as
the mount); systemd runs them in order.
"""

from __future__ import annotations

import os
import sys

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


def tool(name: str) -> str:
    """The project's command ``name``: next to this one, else from PATH."""
    path = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), name)
    return path if os.access(path, os.X_OK) else name


def prestart(qid: int, conf: dict[str, str]) -> int:
    import subprocess

    from .mountpoint import dead_mount, is_mountpoint
    root = conf["ROOT"]
    if dead_mount(root):
        print(f"simfs-service: {root} is a dead mount (its daemon died): "
              f"umount -l {root}", file=sys.stderr)
        subprocess.run(["umount", "-l", root], check=False)
    elif is_mountpoint(root):
        print(f"simfs-service: {root} is already mounted; stop that mount first",
              file=sys.stderr)
        return 1
    os.makedirs(root, mode=0o755, exist_ok=True)
    if conf["QUOTA"] == "no" and conf.get("_QUOTAFILE"):
        print(f"simfs-service: QUOTA=no: {root} is mounted without quota id {qid} "
              "(its quota file exists, but nothing is enforced)", file=sys.stderr)
    if conf["QUOTA"] == "yes":
        from vzquota.errors import EC_RUN
        sys.stdout.flush()
        sys.stderr.flush()
        code = subprocess.run([tool("vzquota"), "on", str(qid)]).returncode
        if code not in (0, EC_RUN):
            return 1
    return 0


def start(qid: int, conf: dict[str, str]) -> int:
    opts = conf["OPTIONS"]
    if conf["QUOTA"] == "yes":
        opts = f"{opts},quotaid={qid}" if opts else f"quotaid={qid}"
    argv = [conf["PRIVATE"], conf["ROOT"]] + (["-o", opts] if opts else [])
    if os.environ.get("SIMFS_SERVICE") != "0":
        from .client import delegate
        # the daemon takes this environment: systemd's socket is the watcher's
        notify_env = {"NOTIFY_SOCKET": os.environ.pop("NOTIFY_SOCKET", "")}
        pids: list[int] = []
        code = delegate(argv, pids)
        if code is not None:
            if code:
                return code
            return watch(conf["ROOT"], pids[0] if pids else None, notify_env)
        if notify_env["NOTIFY_SOCKET"]:
            os.environ.update(notify_env)
    cmd = [tool("simfs"), *argv[:2], "-f", *argv[2:]]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        print(f"simfs-service: cannot run {cmd[0]}: {e.strerror}", file=sys.stderr)
    return 1


# The watcher once the daemon's pid is known: a shell and a tail (about
# 0.5 MB of their own, where a Python would keep 3-9 MB per container):
# SIGTERM/SIGINT go on to the daemon; when it has exited, exit 1 if its mount
# is still in the mount table (it died: the mount is dead), else 0.  A signal
# in the instant between the exec and the trap ends the shell alone; systemd
# sends its SIGTERM only after ExecStop (``stop``), which has unmounted or
# signalled the daemon itself.
WATCH_SH = r"""
trap 'kill -TERM "$1" 2>/dev/null' TERM INT
tail --pid="$1" -f /dev/null &
t=$!
while kill -0 "$t" 2>/dev/null; do wait "$t"; done
if P="$2" awk '$5 == ENVIRON["P"] { found = 1 } END { exit !found }' /proc/self/mountinfo
then
    echo "simfs-service: the daemon of $3 (pid $1) died and left a dead mount" >&2
    exit 1
fi
exit 0
"""


def mountinfo_escape(path: str) -> str:
    """``path`` as /proc/self/mountinfo writes it."""
    return (path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")
            .replace("\n", "\\012"))


def watch(root: str, pid: int | None, notify_env: dict[str, str],
          poll: float = 1.0) -> int:
    """The unit's main process while a daemon of the mount service serves
    ``root``: READY=1, then wait for the daemon (``pid``) to exit; SIGTERM or
    SIGINT is passed on to it.  Exit 0 when the mount went away with it, 1
    when it left a dead mount (or another mount) behind.  With the pid known
    this process becomes ``WATCH_SH`` (same pid, so still the main process)."""
    import signal

    from .mountpoint import dead_mount, is_mountpoint
    from .sdnotify import notify

    def forward(sig, _frame):    # until the shell's trap takes over
        try:
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    why = notify(f"READY=1\nSTATUS=serving {root} (daemon pid {pid})", notify_env)
    if why:
        print(f"simfs-service: {why}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    real = os.path.realpath(root)
    if pid is not None:
        try:
            os.execv("/bin/sh", ["/bin/sh", "-c", WATCH_SH, "simfs-watch", str(pid),
                                 mountinfo_escape(real), root])
        except OSError as e:
            print(f"simfs-service: cannot run /bin/sh: {e.strerror}; watching the "
                  "mount instead", file=sys.stderr)
    import time                  # a service that does not say its daemon's pid
    while is_mountpoint(real) and not dead_mount(real):
        time.sleep(poll)
    if dead_mount(real):
        print(f"simfs-service: the daemon of {root} died and left a dead mount",
              file=sys.stderr)
        return 1
    return 0


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def daemon_of(mainpid: int) -> int | None:
    """The daemon behind the unit's main process: the one a watcher watches
    (its command line says ``simfs-watch PID``), else the main process itself
    (``simfs -f``)."""
    try:
        with open(f"/proc/{mainpid}/cmdline", "rb") as f:
            words = f.read().split(b"\0")
    except OSError:
        return None
    if b"simfs-watch" in words:
        after = words[words.index(b"simfs-watch") + 1]
        return int(after) if after.isdigit() else None
    return mainpid


def stop(qid: int, conf: dict[str, str], pid: int | None, timeout: float = 90.0) -> int:
    import subprocess
    import time

    from .mountpoint import is_mountpoint
    root = conf["ROOT"]
    if is_mountpoint(root):
        r = subprocess.run(["umount", root], capture_output=True, text=True)
        if r.returncode != 0:
            daemon = daemon_of(pid) if pid else None
            print(f"simfs-service: umount {root} failed ({r.stderr.strip()}); "
                  + (f"SIGTERM to its daemon (pid {daemon}), which detaches it lazily"
                     if daemon else "the daemon's SIGTERM will detach it lazily"),
                  file=sys.stderr)
            if daemon:
                try:
                    os.kill(daemon, 15)
                except OSError:
                    pass
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
