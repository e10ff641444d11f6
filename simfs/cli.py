"""``simfs PRIVATE ROOT [-o OPTS] [-f] [-d]``: mount a private area at a root;
``simfs --service``: run the mount service.

Role: the command.  A plain mount (two paths and ``-o`` words, not in the
foreground, as root, ``SIMFS_SERVICE`` not ``0``) goes straight to the mount
service when one runs (``client.delegate``): on that path this module imports
nothing but ``os`` and ``sys``, and the service's child checks the command line
and the options itself, with the same messages and exit statuses.  Otherwise
the whole command line is parsed here (``options``), what can be checked before
mounting is checked (``daemon.checks``), then it serves in the foreground
(``-f``) or forks its own daemon; either way the command returns 0 once the
mount is usable, or prints why it failed and returns 1 (2 on a usage error).

Concurrency: runs before any event loop exists; the fork happens before the
loop starts, and the child alone runs it.
"""

from __future__ import annotations

import os
import sys


def plain_mount(argv: list[str]) -> bool:
    """``PRIVATE ROOT`` with ``-o OPTS`` only, no remount: what the mount
    service may be asked for without parsing anything here (the service's
    child parses it with the same parser)."""
    paths = 0
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-o" and i + 1 < len(argv):
            if argv[i + 1].startswith("-") or "remount" in argv[i + 1].split(","):
                return False
            i += 2
            continue
        if not a or a.startswith("-"):
            return False
        paths += 1
        i += 1
    return paths == 2


# Words mount(8) passes along on a remount (from the mount table) that stay as
# they are: FUSE's own kernel options, and ours.
REMOUNT_KEEPS = {"remount", "defaults", "allow_other", "default_permissions", "fsname",
                 "subtype", "user_id", "group_id", "rootmode", "blksize", "max_read",
                 "fd", "debug"}


def remount(root: str, words: list[str]) -> int:
    """``mount -o remount,...`` of a simfs mount: mount.fuse.simfs (or fuse3's
    helper) hands it to us, and the kernel does it (the daemon keeps serving,
    unaware).  The per-mount flags start from the mount's current ones,
    because a remount sets all of them."""
    import ctypes

    # the mount(2) flags a remount may change: the words a mount takes
    from fusewire.device import MOUNT_FLAGS as REMOUNT_FLAGS
    from fusewire.device import MS_REMOUNT

    from .mountpoint import mountinfo_path
    from .options import IGNORED, SIMFS_FLAGS, SIMFS_OPTIONAL, SIMFS_VALUED, changed_options
    from .options import REMOUNT_COMPARED
    real = os.path.realpath(root)
    current = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if mountinfo_path(fields[4]) == real:
                current = fields        # the last one is the top mount
    if current is None or current[current.index("-") + 1] != "fuse.simfs":
        print(f"simfs: remount: {root} is not a simfs mount", file=sys.stderr)
        return 1
    flags = 0
    for word in current[5].split(","):
        if word in ("ro", "nosuid", "nodev", "noexec"):
            flags |= REMOUNT_FLAGS[word][0]
    asked: dict[str, str | None] = {}
    for word in words:
        key, eq, val = word.partition("=")
        if key in REMOUNT_FLAGS:
            bit, on = REMOUNT_FLAGS[key]
            flags = flags | bit if on else flags & ~bit
        elif key in SIMFS_VALUED:
            asked[key] = val            # the last one counts, as for a mount
        elif key in SIMFS_OPTIONAL:
            asked[key] = val if eq else SIMFS_OPTIONAL[key]
        elif key in REMOUNT_COMPARED and not eq:
            asked[key] = None           # compared: passthrough is fixed at the mount
        elif key not in REMOUNT_KEEPS and key not in IGNORED and key not in SIMFS_FLAGS \
                and not key.startswith("x-"):
            print(f"simfs: remount cannot change {word} (only the mount flags: ro, rw, "
                  "nosuid, nodev, noexec, atime flags, sync)", file=sys.stderr)
            return 2
    if asked:
        # mount(8) passes fstab's options along: the same values are fine, a
        # changed one cannot take effect on a running daemon
        why = changed_options(real, asked)
        if why:
            print(f"simfs: remount cannot change {why}: the running mount keeps its "
                  "options; unmount and mount again to change them", file=sys.stderr)
            return 2
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                           ctypes.c_ulong, ctypes.c_void_p]
    if libc.mount(None, real.encode(), None, flags | MS_REMOUNT, None) != 0:
        err = ctypes.get_errno()
        print(f"simfs: remount of {root} failed: {os.strerror(err)}", file=sys.stderr)
        return 1
    return 0


# mount(8)'s options that take a value as the next argument (util-linux 2.38)
_MOUNT_ARG_SHORT = set("oOtLUTN")
_MOUNT_ARG_LONG = {"--options", "--test-opts", "--types", "--label", "--uuid", "--fstab",
                   "--namespace", "--source", "--target", "--target-prefix",
                   "--options-mode", "--options-source", "--map-users", "--map-groups"}
# The words libmount leaves out of a helper's -o (the mount(2) flags they would
# clear are not set, which is all it keeps of them).
_DROPPED = ("dev", "suid", "exec")


def _fstab_words(path: str, target: str) -> list[str]:
    """The options of ``path``'s last line for mount point ``target``."""
    words: list[str] = []
    try:
        with open(path) as f:
            for line in f:
                fields = line.split()
                if len(fields) < 4 or fields[0].startswith("#"):
                    continue
                where = fields[1].replace("\\040", " ").replace("\\011", "\t")
                if os.path.realpath(where) == target:
                    words = fields[3].split(",")
    except OSError:
        pass
    return words


def _asked_words(target: str) -> list[str]:
    """The option words mount(8), our parent, was asked for: its ``-o``
    words, and its fstab line's when fstab gave the options (fewer than two
    paths on its command line).  Empty when the parent is not mount(8)."""
    ppid = os.getppid()
    try:
        if os.path.basename(os.readlink(f"/proc/{ppid}/exe")) != "mount":
            return []
        with open(f"/proc/{ppid}/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return []
    words: list[str] = []
    fstab = os.environ.get("LIBMOUNT_FSTAB", "/etc/fstab")
    paths = 0
    i = 1
    while i < len(args):
        a = args[i]
        val = None
        if a == "--":
            paths += len(args) - i - 1
            break
        if a.startswith("--"):
            name, eq, v = a.partition("=")
            if eq:
                val = v
            elif name in _MOUNT_ARG_LONG and i + 1 < len(args):
                val = args[i + 1]
                i += 1
            if name in ("--source", "--target"):
                paths += 1
            elif name == "--options":
                words += (val or "").split(",")
            elif name == "--fstab" and val:
                fstab = val
        elif a.startswith("-") and len(a) > 1:
            for j, c in enumerate(a[1:], 1):
                if c in _MOUNT_ARG_SHORT:
                    val = a[j + 1:]
                    if not val and i + 1 < len(args):
                        val = args[i + 1]
                        i += 1
                    if c == "o":
                        words += val.split(",")
                    elif c == "T":
                        fstab = val
                    break
        else:
            paths += 1
        i += 1
    if paths < 2:
        words = _fstab_words(fstab, target) + words
    return words


def mount_helper(argv: list[str] | None = None) -> int:
    """``mount.fuse.simfs SOURCE DIR [-sfnv] [-N NS] [-t TYPE] [-o OPTS]``: the
    calling convention mount(8) uses for helpers, turned into ``simfs``'s.

    mount(8) (libmount) hands a helper the mount(2) flags it set (``nodev``,
    ``nosuid``, ``noexec``) but never ``dev``, ``suid`` or ``exec``: for it
    their absence means them.  simfs's default is ``nodev,nosuid``, so when
    mount(8) runs us, the ``dev``, ``suid`` and ``exec`` it was asked for (its
    command line's ``-o``, or its fstab line) are put back, unless the
    options we got say ``nodev``, ``nosuid``, ``noexec`` (which one of the
    asked words won is libmount's say)."""
    argv = sys.argv[1:] if argv is None else argv
    keep: list[str] = []
    if len(argv) >= 2 and os.getuid() == 0:
        got = {w for i, a in enumerate(argv[:-1]) if a == "-o" for w in argv[i + 1].split(",")}
        asked = set(_asked_words(os.path.realpath(argv[1])))
        back = [w for w in _DROPPED if w in asked and "no" + w not in got]
        if back:
            keep += ["-o", ",".join(back)]
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-t", "-N"):
            i += 2
            continue
        if a == "-o" and i + 1 < len(argv):
            keep += ["-o", argv[i + 1]]
            i += 2
            continue
        if a.startswith("-") and len(a) > 1 and set(a[1:]) <= set("sfnvi"):
            if "f" in a[1:]:
                return 0            # "fake": do everything but the mount
            i += 1
            continue
        keep.append(a)
        i += 1
    return main(keep)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if os.environ.get("SIMFS_SERVICE") != "0" and plain_mount(argv) and os.geteuid() == 0:
        from .client import delegate
        code = delegate(argv)
        if code is not None:
            return code
        return full(argv, asked=True)
    return full(argv)


def full(argv: list[str], asked: bool = False) -> int:
    """The command line parsed and checked here; the daemon forked here
    unless the service takes it."""
    from .options import UsageError, check_mount, parse_options, parser
    p = parser()
    args = p.parse_args(argv)
    if args.service:
        if args.private or args.root or args.options:
            p.error("--service takes no other arguments")
        if os.geteuid() != 0:
            print("simfs: the mount service must run as root", file=sys.stderr)
            return 1
        from .forkserver import serve
        return serve()
    if args.root is None:
        p.error("the following arguments are required: private, root")
    words = [w for o in args.options for w in o.split(",")]
    if "remount" in words:
        if os.geteuid() != 0:
            print("simfs: must be run as root", file=sys.stderr)
            return 1
        return remount(args.root, words)
    try:
        fuse_opts, own = parse_options(words, os.path.abspath(args.private))
        check_mount(own)
    except UsageError as e:
        print(f"simfs: {e}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("simfs: must be run as root (it mounts, and serves every uid of the "
              "container)", file=sys.stderr)
        return 1
    debug = args.debug or "debug" in own
    foreground = args.foreground or args.debug
    if not foreground and not asked and os.environ.get("SIMFS_SERVICE") != "0":
        from .client import delegate
        code = delegate(argv)
        if code is not None:
            return code
    from .client import finish
    from .daemon import build, checks, daemon, raise_fd_limit, run, setup_logging
    from .mount import MountError
    try:
        logfile = checks(args, own, foreground)
    except MountError as e:
        print(f"simfs: {e}", file=sys.stderr)
        return 1
    raise_fd_limit()
    m = build(args, fuse_opts, own)
    if foreground:
        setup_logging(debug, logfile, daemon=False)
        import faulthandler
        faulthandler.enable()
        return run(m, None)
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as pipe:
            return finish(pipe.read().decode(errors="replace"))
    os.close(r)
    code = daemon(m, debug, logfile, w)
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
