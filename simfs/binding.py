"""The FUSE binding a mount runs on: the project's own protocol layer
(``fusewire``, the default, ``-o fuse=builtin``) or pyfuse3 (``-o fuse=pyfuse3``,
the optional fallback: ``pip install simfs-vzquota[pyfuse3]``).

Role: one small interface (``mount``, ``main``, ``terminate``, ``close``,
``run``) over both, so ``simfs.mount`` does not care which serves.  The
handlers (``simfs.ops``) are written against fusewire's types; for pyfuse3 a
thin adapter converts its calls and their answers.  What pyfuse3 cannot do
(fallocate, lseek, copy_file_range, O_TMPFILE, passthrough, KILLPRIV_V2, POSIX
ACLs: handlers it has no slot for) is answered by libfuse as before
(ENOSYS/EOPNOTSUPP; an O_TMPFILE open fails with EOPNOTSUPP).

Concurrency: ``run`` starts the loop (anyio).  fusewire by default
(``runtime=thread``) answers requests on a reader thread that holds the loop's
lock around each one, so handlers and the loop's own work never run at the
same time (``fusewire.loop``); under uvloop, plain asyncio or trio it serves
from the loop itself.  pyfuse3 runs on the loop (uvloop by default).
"""

from __future__ import annotations

import logging

import anyio

import fusewire

log = logging.getLogger(__name__)

BINDINGS = ("builtin", "pyfuse3")          # the first is the default


def _anyio_run(serve, runtime: str):
    if runtime == "trio":
        return anyio.run(serve, backend="trio")
    return anyio.run(serve, backend="asyncio",
                     backend_options={"use_uvloop": runtime == "uvloop"})


class Builtin:
    """fusewire: the FUSE protocol over /dev/fuse, no C library."""

    name = "builtin"

    def __init__(self, ops, root: str, options: set[str]):
        # what the handlers can serve beyond the defaults (ops.fuse_want: INIT
        # flags), and the session itself for them (ops.channel: passthrough
        # backing ids, notifications, what was negotiated)
        self.session = fusewire.Session(ops, root, sorted(options),
                                        want=getattr(ops, "fuse_want", 0),
                                        readahead_kb=ops.config.readahead_kb)
        if hasattr(ops, "channel"):
            ops.channel = self.session

    def mount(self) -> None:
        self.session.mount()

    async def main(self) -> None:
        await self.session.serve()

    def terminate(self) -> None:
        self.session.terminate()

    def close(self, unmount: bool) -> None:
        self.session.close(unmount=unmount)

    @staticmethod
    def run(serve, runtime: str):
        log.info("request loop: %s, fusewire's %s", runtime,
                 {"trio": "reader tasks", "thread": "reader thread (asyncio for the rest)"}
                 .get(runtime, "reader callback"))
        if runtime == "thread":
            # a thread blocked in read(2) on the device answers requests;
            # the rest (control socket, timers, signals, suspended handlers)
            # runs on fusewire's asyncio loop, never at the same time
            import fusewire.loop
            return anyio.run(serve, backend="asyncio",
                             backend_options={"loop_factory": fusewire.loop.new_event_loop})
        return _anyio_run(serve, runtime)


class Pyfuse3:
    """pyfuse3 on libfuse 3 (the fallback)."""

    name = "pyfuse3"

    def __init__(self, ops, root: str, options: set[str]):
        try:
            import pyfuse3
        except ImportError:
            raise RuntimeError("-o fuse=pyfuse3 needs pyfuse3: pip install "
                               "'simfs-vzquota[pyfuse3]' (it builds against libfuse3-dev)"
                               ) from None
        self.pyfuse3 = pyfuse3
        self.adapter = adapter(ops)
        if hasattr(ops, "notify_attrs"):
            # the daemon changed a mode behind the kernel's back (ops._attrs_changed)
            ops.notify_attrs = lambda ino: pyfuse3.invalidate_inode(ino, attr_only=True)
        self.root = root
        self.options = set(options)

    def mount(self) -> None:
        self.pyfuse3.init(self.adapter, self.root, self.options)

    async def main(self) -> None:
        await self.pyfuse3.main()

    def terminate(self) -> None:
        self.pyfuse3.terminate()

    def close(self, unmount: bool) -> None:
        self.pyfuse3.close(unmount=unmount)

    @staticmethod
    def run(serve, runtime: str):
        import pyfuse3.asyncio
        if runtime == "trio":
            log.info("request loop: trio, pyfuse3's worker tasks")
            pyfuse3.asyncio.disable()
            return _anyio_run(serve, runtime)
        # patches/: a patched pyfuse3 serves requests from a reader callback
        patched = hasattr(pyfuse3.asyncio, "callback_loop")
        log.info("request loop: %s, %s", runtime,
                 "pyfuse3's callback loop (patched)" if patched else "pyfuse3's worker tasks")
        pyfuse3.asyncio.enable()
        pyfuse3.asyncio.notify_closing = _notify_closing
        return _anyio_run(serve, runtime)


def _notify_closing(fd) -> None:
    """pyfuse3.terminate() under asyncio: wake the request loop's readers of
    ``fd``.  pyfuse3's own version fails (InvalidStateError) when a reader's
    wake-up already fired, as it can when a signal arrives with a request."""
    import pyfuse3.asyncio
    for fut in list(pyfuse3.asyncio._read_futures.get(fd, ())):
        if not fut.done():
            fut.set_exception(pyfuse3.asyncio.ClosedResourceError())


def select(name: str):
    return {"builtin": Builtin, "pyfuse3": Pyfuse3}[name]


# ---- the pyfuse3 adapter ------------------------------------------------------

_ENTRY_FIELDS = [f for f in fusewire.EntryAttributes.__slots__ if f != "_st"]
_STATVFS_FIELDS = fusewire.StatvfsData.__slots__


def adapter(ops):
    """A pyfuse3.Operations that forwards every call to ``ops`` (written
    against fusewire's types) and converts the answers."""
    import pyfuse3

    def entry(a):
        out = pyfuse3.EntryAttributes()
        for f in _ENTRY_FIELDS:
            setattr(out, f, getattr(a, f))
        return out

    def fileinfo(fi):
        return pyfuse3.FileInfo(fh=fi.fh, direct_io=fi.direct_io, keep_cache=fi.keep_cache,
                                nonseekable=fi.nonseekable)

    def statvfs(s):
        out = pyfuse3.StatvfsData()
        for f in _STATVFS_FIELDS:
            setattr(out, f, getattr(s, f))
        return out

    class Token:
        """fusewire's readdir token over pyfuse3's."""
        __slots__ = ("token",)
        plus = True

        def __init__(self, token):
            self.token = token

        def add(self, name, attr, next_off):
            return pyfuse3.readdir_reply(self.token, name, entry(attr), next_off)

    async def call(fn, *args):
        try:
            r = fn(*args)
            if hasattr(r, "__await__"):
                r = await r
            return r
        except fusewire.FUSEError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    class Adapter(pyfuse3.Operations):
        enable_writeback_cache = False

        async def lookup(self, parent, name, ctx):
            return entry(await call(ops.lookup, parent, name, ctx))

        async def forget(self, inode_list):
            await call(ops.forget, inode_list)

        async def getattr(self, inode, ctx):
            return entry(await call(ops.getattr, inode, ctx))

        async def setattr(self, inode, attr, fields, fh, ctx):
            return entry(await call(ops.setattr, inode, attr, fields, fh, ctx))

        async def readlink(self, inode, ctx):
            return await call(ops.readlink, inode, ctx)

        async def mknod(self, parent, name, mode, rdev, ctx):
            return entry(await call(ops.mknod, parent, name, mode, rdev, ctx))

        async def mkdir(self, parent, name, mode, ctx):
            return entry(await call(ops.mkdir, parent, name, mode, ctx))

        async def symlink(self, parent, name, target, ctx):
            return entry(await call(ops.symlink, parent, name, target, ctx))

        async def link(self, inode, new_parent, new_name, ctx):
            return entry(await call(ops.link, inode, new_parent, new_name, ctx))

        async def unlink(self, parent, name, ctx):
            await call(ops.unlink, parent, name, ctx)

        async def rmdir(self, parent, name, ctx):
            await call(ops.rmdir, parent, name, ctx)

        async def rename(self, p_old, n_old, p_new, n_new, flags, ctx):
            await call(ops.rename, p_old, n_old, p_new, n_new, flags, ctx)

        async def open(self, inode, flags, ctx):
            return fileinfo(await call(ops.open, inode, flags, ctx))

        async def create(self, parent, name, mode, flags, ctx):
            fi, attr = await call(ops.create, parent, name, mode, flags, ctx)
            return fileinfo(fi), entry(attr)

        async def read(self, fh, off, size):
            return await call(ops.read, fh, off, size)

        async def write(self, fh, off, buf):
            # no HANDLE_KILLPRIV_V2 here: the kernel clears set-user-ID and a
            # group-executable set-group-ID itself (a SETATTR before the
            # write), not one that is not group-executable when the writer is
            # outside the file's group, as Linux does locally: the handler
            # checks that for a file opened by anyone but root
            return await call(ops.write, fh, off, buf, ops.opened_by_user(fh))

        async def flush(self, fh):
            await call(ops.flush, fh)

        async def release(self, fh):
            await call(ops.release, fh)

        async def fsync(self, fh, datasync):
            await call(ops.fsync, fh, datasync)

        async def opendir(self, inode, ctx):
            return await call(ops.opendir, inode, ctx)

        async def readdir(self, fh, start_id, token):
            await call(ops.readdir, fh, start_id, Token(token))

        async def releasedir(self, fh):
            await call(ops.releasedir, fh)

        async def fsyncdir(self, fh, datasync):
            await call(ops.fsyncdir, fh, datasync)

        async def statfs(self, ctx):
            return statvfs(await call(ops.statfs, ctx))

        async def access(self, inode, mode, ctx):
            return await call(ops.access, inode, mode, ctx)

        async def setxattr(self, inode, name, value, ctx):
            await call(ops.setxattr, inode, name, value, ctx)

        async def getxattr(self, inode, name, ctx):
            return await call(ops.getxattr, inode, name, ctx)

        async def listxattr(self, inode, ctx):
            return await call(ops.listxattr, inode, ctx)

        async def removexattr(self, inode, name, ctx):
            await call(ops.removexattr, inode, name, ctx)

    return Adapter()
