"""The one errno boundary of the request handlers, and the recount gate.

Role: ``errno_boundary`` wraps every handler of ``simfs.ops``: it counts the
request, lets a live recount hold it (``gate``) or watch it (``watch``), and
is the one place where an exception becomes the errno the caller sees:
``FUSEError`` passes, ``OSError`` becomes its errno, a quota refusal
``EDQUOT`` (reported to the engine: the caller saw it) and anything
unexpected ``EIO``, logged with its traceback and never fatal.

Concurrency: a plain handler stays a plain function (answered inline by the
request loop, so no await can be written between a reservation and its
commit); only a request the gate holds becomes a coroutine, which waits for
the gate and then runs the handler whole.  A coroutine handler (read, fsync,
fsyncdir) stays one.  Which requests a recount holds or watches is decided
here (``HELD``, ``MUTATING``, ``FREEING``); how it holds is simfs.mount's.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
from typing import Callable

from fusewire import FUSEError

from vzquota.errors import QuotaExceeded

log = logging.getLogger("simfs.ops")


# Handlers that may change names or allocations: ``SimOperations.mutations``
# sums their counts (a live recount is exact only if none ran meanwhile).
# (open, release and fsync only reconcile: what they change shows in the engine's
# generation, so readers do not count.)
MUTATING = frozenset({"setattr", "mknod", "mkdir", "symlink", "create", "link", "unlink",
                      "rmdir", "rename", "write", "setxattr", "removexattr", "fallocate",
                      "tmpfile", "copy_file_range"})
# Handlers a live recount may hold while it scans (``SimOperations.gate``):
# everything that may change names or allocations (open only with O_TRUNC).
HELD = MUTATING | {"release", "fsync"}


# Held requests that never allocate (they free, or change no usage): they wait
# for the gate however long it holds; the others at most its ``limit``.
FREEING = frozenset({"unlink", "rmdir", "removexattr", "release", "fsync", "open"})


def may_allocate(op: str, args: tuple) -> bool:
    if op in FREEING:
        return False
    if op == "setattr":             # (inode, attr, fields, fh, ctx)
        f = args[2]
        return bool(f.update_size or f.update_uid or f.update_gid)
    return True


async def _held(gate, call: Callable, ops, args: tuple, op: str):
    """A request a live recount holds (``SimOperations.gate``): run once it
    lets it go; the FUSE layer drives the coroutine a plain handler returns.
    One that would allocate and waits longer than the gate's ``limit`` fails
    with EDQUOT (simfs/mount.py Mount.recalc: never checked against a figure
    that may be short, never let through unchecked)."""
    limit = getattr(gate, "limit", None)
    try:
        await gate.wait(limit if limit is not None and may_allocate(op, args) else None)
    except TimeoutError:
        gate.refused += 1
        raise FUSEError(errno.EDQUOT) from None
    r = call(ops, *args)
    while hasattr(r, "__await__"):          # held again by a newer pass
        r = await r
    return r


def errno_boundary(fn: Callable) -> Callable:
    """The one errno boundary: only FUSEError may leave a handler.  A handler
    that never awaits stays a plain function (the request loop answers it
    inline, and no await can be written between a reservation and its
    commit); one that awaits (read, fsync, fsyncdir) stays a coroutine."""
    op = fn.__name__

    def failed(self, args: tuple, e: BaseException) -> FUSEError:
        if isinstance(e, QuotaExceeded):
            if self.quota is not None:
                self.quota.report(e)     # final: the caller gets EDQUOT
            return FUSEError(errno.EDQUOT)
        if isinstance(e, OSError):
            return FUSEError(e.errno or errno.EIO)
        log.exception("unexpected error in %s%r", op, args[:2])
        return FUSEError(errno.EIO)

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapper(self, *args):
            gate = self.gate
            if gate is not None and op in HELD:
                await gate.wait()        # a live recount holds it (simfs/mount.py)
            self.counts[op] += 1
            watch = self.watch
            if watch is not None:        # a live recount is running (simfs/mount.py)
                mark = watch.before(op, args)
            try:
                return await fn(self, *args)
            except FUSEError:
                raise
            except Exception as e:
                raise failed(self, args, e) from None
            finally:
                if watch is not None:
                    watch.after(op, mark)
        return wrapper

    @functools.wraps(fn)
    def plain(self, *args):
        gate = self.gate
        if gate is not None and (op in HELD or op == "open" and args[1] & os.O_TRUNC):
            return _held(gate, plain, self, args, op)    # a live recount holds it
        self.counts[op] += 1
        watch = self.watch
        if watch is None:
            try:
                return fn(self, *args)
            except FUSEError:
                raise
            except Exception as e:
                raise failed(self, args, e) from None
        mark = watch.before(op, args)    # a live recount is running (simfs/mount.py)
        try:
            return fn(self, *args)
        except FUSEError:
            raise
        except Exception as e:
            raise failed(self, args, e) from None
        finally:
            watch.after(op, mark)
    return plain


