"""One writer that races at the quota limit (run as a container uid).

Role: the load of invariant (a) (``tests/backing.py``, ``tools/torture``):
random writes, appends, creates, truncates, renames, hard links (long names),
xattrs, unlinks, mkdir/rmdir, symlinks and fsyncs in its own directory and a
shared one, until a deadline.  When a call is refused for space (EDQUOT,
ENOSPC) it deletes one of its files, so usage keeps churning at the limit.
Prints one JSON line at the end: {op: {result: count}}.

Usage: python3 racer.py OWN_DIR SHARED_DIR SECONDS SEED OPS [UNTIL_REFUSED]
(OPS: ``all`` or a comma list; ``reopen`` - writes through /proc/self/fd to a
file unlinked while held by an O_PATH descriptor - is only run when named.)
With UNTIL_REFUSED=1 the writer goes on past SECONDS until a call of its own
was refused with EDQUOT (at most MORE_MAX seconds more): how far it gets in
SECONDS depends on the machine's load, reaching the limit must not.

Stdlib only (it runs under the system Python as an unprivileged uid); the
bounded sizes (files <= 1 MiB, xattrs <= 3.5 KB) keep each op short.
Concurrency: one process, one thread; several run at once on purpose.
"""

import errno
import json
import os
import random
import sys
import time

OPS = ("write", "append", "create", "truncate", "rename", "link", "xattr",
       "unlink", "mkdir", "symlink", "fsync")
# growth outweighs deletion, so usage climbs to the limit and churns there
WEIGHT = {"write": 4, "append": 4, "create": 4, "link": 2, "symlink": 2, "mkdir": 2,
          "truncate": 1, "rename": 2, "xattr": 2, "fsync": 1, "unlink": 1, "reopen": 1}
SPACE = (errno.EDQUOT, errno.ENOSPC)
MORE_MAX = 120.0        # UNTIL_REFUSED: seconds past SECONDS at most


def main() -> int:
    own, shared, seconds, seed, which = sys.argv[1:6]
    until_refused = sys.argv[6:7] == ["1"]
    rnd = random.Random(int(seed))
    ops = list(OPS) if which == "all" else which.split(",")
    deadline = time.monotonic() + float(seconds)
    cutoff = deadline + MORE_MAX
    refused = False
    stats = {}
    tag = f"{os.getuid()}-{seed}"
    counter = [0]

    def newname(d, long=False):
        counter[0] += 1
        base = f"{tag}-{counter[0]}"
        if long:
            base = base + "-" + "L" * rnd.randrange(50, 200)
        return os.path.join(d, base)

    def files():
        out = []
        for d in (own,):
            try:
                with os.scandir(d) as it:
                    for e in it:
                        if e.is_file(follow_symlinks=False):
                            out.append(e.path)
            except OSError:
                pass
        return out

    def pick():
        f = files()
        return rnd.choice(f) if f else newname(own)

    def data(n):
        return bytes([rnd.randrange(256)]) * n

    def op_write():
        fd = os.open(pick(), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, data(rnd.randrange(1, 128 << 10)), rnd.randrange(0, 1 << 20))
        finally:
            os.close(fd)

    def op_append():
        fd = os.open(pick(), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            if os.fstat(fd).st_size < (1 << 20):
                os.write(fd, data(rnd.randrange(1, 64 << 10)))
        finally:
            os.close(fd)

    def op_create():
        d = own if rnd.random() < 0.7 else shared
        fd = os.open(newname(d), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            n = rnd.choice((0, 100, 4096, 8192))
            if n:
                os.write(fd, data(n))
        finally:
            os.close(fd)

    def op_truncate():
        os.truncate(pick(), rnd.randrange(0, 1 << 20))

    def op_rename():
        src = pick()
        if rnd.random() < 0.5:
            f = files()
            dst = rnd.choice(f) if f else newname(own)      # over an existing file
        else:
            dst = newname(own, long=rnd.random() < 0.3)
        os.rename(src, dst)

    def op_link():
        os.link(pick(), newname(own, long=True))

    def op_xattr():
        p = pick()
        if rnd.random() < 0.7:
            os.setxattr(p, f"user.t{rnd.randrange(3)}", data(rnd.randrange(1, 3500)))
        else:
            os.removexattr(p, f"user.t{rnd.randrange(3)}")

    def op_unlink():
        f = files()
        if f:
            os.unlink(rnd.choice(f))
        else:
            for e in os.listdir(own):
                p = os.path.join(own, e)
                if os.path.isdir(p) and not os.path.islink(p):
                    os.rmdir(p)
                    break

    def op_mkdir():
        if rnd.random() < 0.5:
            os.mkdir(newname(own))
        else:
            dirs = [e.path for e in os.scandir(own) if e.is_dir(follow_symlinks=False)]
            if dirs:
                os.rmdir(rnd.choice(dirs))

    def op_symlink():
        os.symlink("x" * rnd.randrange(1, 300), newname(own))

    def op_fsync():
        fd = os.open(pick(), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, data(4096))
            os.fsync(fd)
        finally:
            os.close(fd)

    def op_reopen():
        p = newname(own)
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT, 0o644))
        o = os.open(p, os.O_PATH)
        try:
            os.unlink(p)
            w = os.open(f"/proc/self/fd/{o}", os.O_RDWR)
            try:
                for _ in range(8):
                    os.write(w, data(256 << 10))
            finally:
                os.close(w)
        finally:
            os.close(o)

    weights = [WEIGHT.get(name, 1) for name in ops]
    defined = locals()
    table = {name: defined[f"op_{name}"] for name in ops}
    while True:
        now = time.monotonic()
        if now >= deadline and (refused or not until_refused or now >= cutoff):
            break
        name = rnd.choices(ops, weights)[0]
        res = stats.setdefault(name, {})
        try:
            table[name]()
            key = "ok"
        except OSError as e:
            key = errno.errorcode.get(e.errno, str(e.errno))
            refused = refused or e.errno == errno.EDQUOT
            if e.errno in SPACE:
                try:
                    op_unlink()
                except OSError:
                    pass
        res[key] = res.get(key, 0) + 1
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
