"""One FUSE connection: read requests from ``/dev/fuse``, decode them, call
the filesystem's handlers, encode and write the replies.

Role: the protocol, nothing else.  ``Session`` negotiates INIT with whatever
minor version the kernel offers (7.31 and later), dispatches every request to
the method of the same name on the operations object (the names and
signatures of pyfuse3's ``Operations``, plus ``fallocate``, ``lseek`` and
``copy_file_range``), answers ``ENOSYS`` for an opcode it has no handler for,
and keeps the kernel's view right when a reply cannot be delivered (an
interrupted LOOKUP's entry is forgotten, an OPEN's handle released).  It also
sends the notifications (``invalidate_entry``, ``invalidate_inode``,
``prune``) and
registers passthrough backing files.

Concurrency: on fusewire's own asyncio loop (``fusewire.loop``) a reader
thread blocks in read(2) on the device and runs each request's handler
inline while it holds the loop's lock, which the loop holds whenever it runs
anything but its wait in epoll: a handler and the loop's own work (timers,
sockets, signals, task steps) never run at the same time, each sees the
other's changes whole, as on one thread; the reader lets a waiting loop go
first, and the GIL's switch interval is made short, so the loop's timers are
not held up by a stream of requests.  ``close()`` while the reader is still in
read(2) leaves the device to it (it closes it when the read returns).  On any
other asyncio loop (uvloop) the device is read from a reader callback: each
readable event reads one request and runs its handler right there.  Either
way, a handler is a plain function or a coroutine function; a coroutine is
first run with ``send(None)`` and, if it completes without suspending (the
common case), is answered at once: no task, no future.  One that suspends
goes on as a task of the loop (its first step ran on the reader thread, which
sees the loop as its running loop; the rest runs on the loop's);
while ``max_pending`` of them are in flight the device is not read, so the
number of requests held by the daemon is bounded.  Handlers must not need a
current asyncio task before their first suspension.  Under trio a reader task
waits for the device and every coroutine handler runs as a task of its own
(same bound).  INTERRUPT cancels the task of a request still in flight (it is
answered ``EINTR``); a request already answered is left alone.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import struct
import sys
import threading
import time
import types
from typing import Any, Callable

from . import device
from . import kernel as k
from . import loop as fwloop
from .types import (BasicContext, EntryAttributes, FileInfo, FUSEError, ReaddirToken,
                    RequestContext, SetattrFields)

log = logging.getLogger(__name__)

_CORO = types.CoroutineType
_entry_out = EntryAttributes.entry_out
_attr_out = EntryAttributes.attr_out
_OUT_HEADER_PACK = k.OUT_HEADER.pack
_IN_HEADER_UNPACK = k.IN_HEADER.unpack_from
_READ_IN_UNPACK = k.READ_IN.unpack_from
_WRITE_IN_UNPACK = k.WRITE_IN.unpack_from
_CREATE_IN_UNPACK = k.CREATE_IN.unpack_from
_EMPTY = b""
_NS = 1_000_000_000
MAX_WRITE = 1 << 20              # bytes per WRITE (max_pages 256, the kernel's default cap)
MAX_PENDING = 64                 # suspended handlers at once before reading pauses
SWITCH_INTERVAL = 0.0005         # the GIL's switch interval under the reader thread (s)

# What the layer asks of the kernel unless told otherwise: what a pyfuse3
# filesystem got from libfuse 3 (see the INIT flags in kernel.py).  Not
# HANDLE_KILLPRIV: without it the kernel clears set-user-ID/set-group-ID itself
# (a SETATTR) when someone other than root writes; a filesystem that asks for
# it (or for HANDLE_KILLPRIV_V2) must clear them itself.
DEFAULT_WANT = (k.ASYNC_READ | k.PARALLEL_DIROPS | k.AUTO_INVAL_DATA | k.ASYNC_DIO
                | k.ATOMIC_O_TRUNC | k.DO_READDIRPLUS | k.BIG_WRITES | k.MAX_PAGES
                | k.INIT_EXT)


class ProtocolError(Exception):
    """The kernel spoke a protocol this layer does not (INIT refused)."""


@types.coroutine
def _resume(coro, yielded):
    """Go on driving ``coro``, which already yielded ``yielded`` outside any
    task: the task awaiting this sees the same futures the handler awaits."""
    while True:
        try:
            sent = yield yielded
        except BaseException as e:          # cancellation (INTERRUPT), or a failed future
            try:
                yielded = coro.throw(e)
            except StopIteration as s:
                return s.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as s:
                return s.value


def _name(buf, off: int, end: int) -> bytes:
    """The NUL-terminated name at ``off``."""
    z = buf.find(b"\0", off, end)
    return bytes(buf[off:z if z >= 0 else end])


def _two_names(buf, off: int, end: int) -> tuple[bytes, bytes]:
    z = buf.find(b"\0", off, end)
    if z < 0:
        raise FUSEError(errno.EINVAL)
    return bytes(buf[off:z]), _name(buf, z + 1, end)


class Session:
    """A FUSE mount served by ``ops``.

    ``mount()`` opens the device and mounts it; ``serve()`` (async, on anyio's
    running backend) answers requests until the filesystem is unmounted or
    ``terminate()`` is called; ``close()`` unmounts if asked and closes the
    device.  ``want`` adds INIT flags to ask for, ``unwant`` removes some of
    the defaults; ``negotiated`` holds what the kernel agreed to.
    """

    def __init__(self, ops: Any, mountpoint: str, options, *, want: int = 0,
                 unwant: int = 0, max_write: int = MAX_WRITE,
                 max_pending: int = MAX_PENDING, default_flags: int | None = None,
                 readahead_kb: int = 0):
        self.ops = ops
        # the kernel's readahead for this mount, set once INIT is answered
        # (INIT lowers it to the max_readahead answered); 0 leaves its default
        self.readahead_kb = readahead_kb
        self.dev: str | None = None      # MAJOR:MINOR of the mount
        self.mountpoint = mountpoint
        self.options = device.MountOptions(
            options, **({} if default_flags is None else {"default_flags": default_flags}))
        self.want = (DEFAULT_WANT | want) & ~unwant
        self.max_write = max_write
        self.bufsize = max_write + 4096
        self.max_pending = max_pending
        self.fd = -1
        self.minor = 0
        self.negotiated = 0              # INIT flags both sides agreed on
        self.kernel_flags = 0            # what the kernel offered
        self.mounted = False
        self._buf = bytearray(self.bufsize)
        self._pending: dict[int, Any] = {}     # unique -> task of a suspended handler
        self._done = None                # set when serving must end
        self._reading = False
        self._loop = None
        self._spawn: Callable | None = None    # trio: start a task
        self._ended = False
        self._run = self._call           # _call_trio under trio
        self._table = self._dispatch_table()
        # the reader thread (on fusewire.loop's loop): its wake-up when reading
        # was paused, and the hand-over of the device when close() comes first
        self._thread: threading.Thread | None = None
        self._room: threading.Event | None = None
        self._fd_lock = threading.Lock()
        self._reader_done = False
        self._orphan_fd = -1

    # ---- the mount ---------------------------------------------------------

    def mount(self) -> None:
        real = os.path.realpath(self.mountpoint)
        self.fd = device.open_device()
        try:
            device.mount(self.fd, self.mountpoint, self.options)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise
        self.mounted = True
        os.set_blocking(self.fd, False)
        self.dev = device.device_of(real)

    def close(self, unmount: bool = True) -> None:
        """Unmount (when ``unmount`` and still mounted) and close the device;
        without unmounting, a closed device leaves a dead mount, as a killed
        daemon does (``umount -l`` clears it)."""
        if unmount and self.mounted:
            try:
                device.unmount(self.mountpoint)
            except OSError as e:
                log.warning("%s", e)
            self.mounted = False
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with self._fd_lock:
                if self._thread is not None and not self._reader_done:
                    # the reader is blocked in read(2) on it: it closes it when
                    # it returns (the device must not be closed under it, its
                    # number reused); until then the connection lives, unserved
                    self._orphan_fd = fd
                    return
            os.close(fd)

    def backing_open(self, fd: int) -> int:
        return device.backing_open(self.fd, fd)

    def backing_close(self, backing_id: int) -> None:
        device.backing_close(self.fd, backing_id)

    # ---- notifications -------------------------------------------------------

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Make the kernel forget the name ``name`` in directory ``parent``
        (never call it from a handler of a request on that directory)."""
        self._notify(k.NOTIFY_INVAL_ENTRY,
                     k.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0) + name + b"\0")

    def invalidate_inode(self, ino: int, off: int = 0, length: int = 0) -> None:
        """Make the kernel drop its cached attributes (and pages in the
        range; ``length`` 0 means to the end, -1 attributes only)."""
        self._notify(k.NOTIFY_INVAL_INODE, k.NOTIFY_INVAL_INODE_OUT.pack(ino, off, length))

    PRUNE_BATCH = 512        # node ids per PRUNE message (the kernel's own batch)

    @property
    def can_prune(self) -> bool:
        """Whether the kernel takes FUSE_NOTIFY_PRUNE (protocol 7.45 and later)."""
        return self.minor >= k.PRUNE_MINOR and self.fd >= 0

    def prune(self, nodeids) -> int:
        """Ask the kernel to drop the inodes ``nodeids`` (and their dentries)
        that nothing uses: no open file, no working directory, no cached child.
        It forgets each one it drops (FORGET/BATCH_FORGET, the lookup count it
        held), later, like any inode it evicts; the others it keeps, silently.
        Sent in messages of PRUNE_BATCH ids; returns how many ids were sent.
        Before 7.45 the kernel has no such notification: nothing is sent and 0
        is returned (the daemon then holds what the kernel holds, as before).
        Never call it from a handler of a request on one of these inodes."""
        if not self.can_prune:
            return 0
        ids = list(nodeids)
        for i in range(0, len(ids), self.PRUNE_BATCH):
            part = ids[i:i + self.PRUNE_BATCH]
            self._notify(k.NOTIFY_PRUNE, k.NOTIFY_PRUNE_OUT.pack(len(part), 0, 0)
                         + struct.pack(f"<{len(part)}Q", *part))
        return len(ids)

    def _notify(self, code: int, body: bytes) -> None:
        try:
            os.write(self.fd, k.OUT_HEADER.pack(16 + len(body), code, 0) + body)
        except OSError as e:
            if e.errno != errno.ENOENT:        # the inode or name is not cached: nothing to do
                raise

    # ---- serving -----------------------------------------------------------

    async def serve(self) -> None:
        """Answer requests until unmount (ENODEV) or ``terminate()``."""
        import asyncio
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:                 # not asyncio: trio
            await self._serve_trio()
        else:
            if getattr(loop, fwloop.LOCK_ATTR, None) is not None:
                await self._serve_thread(loop)
            else:
                await self._serve_asyncio()

    def terminate(self) -> None:
        """End ``serve()`` (from the loop's thread, e.g. a signal handler task)."""
        self._ended = True
        done = self._done
        if done is not None:
            if self._loop is not None:
                if not done.done():
                    done.set_result(None)
            else:
                done.set()

    async def _serve_asyncio(self) -> None:
        import asyncio
        self._loop = asyncio.get_running_loop()
        self._done = self._loop.create_future()
        if self._ended:
            return
        self._start_reading()
        try:
            await self._done
        finally:
            self._stop_reading()
            for task in list(self._pending.values()):
                task.cancel()
            self._loop = None

    async def _serve_thread(self, loop) -> None:
        """A thread blocked in read(2) on the device runs each request's
        handler inline, holding the loop's lock (fusewire.loop); a handler
        that suspends goes on as a task of the loop."""
        self._loop = loop
        self._done = loop.create_future()
        if self._ended:
            return
        os.set_blocking(self.fd, True)
        # The loop, woken while the reader is busy, waits for the GIL until
        # the reader lets go of it (every system call) or the switch interval
        # forces it (5 ms by default): made short, so that the loop's timers
        # and wake-ups are late by well under a millisecond.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self._room = threading.Event()
        self._room.set()
        self._reading = True
        self._thread = threading.Thread(target=self._reader, args=(loop, self.fd),
                                        name="fusewire-reader", daemon=True)
        self._thread.start()
        try:
            await self._done
        finally:
            self._ended = True
            self._room.set()
            for task in list(self._pending.values()):
                task.cancel()
            self._loop = None

    def _reader(self, loop, fd: int) -> None:
        """The reader thread: read, then answer under the loop's lock."""
        asyncio.events._set_running_loop(loop)     # handlers see the loop they run for
        lock = getattr(loop, fwloop.LOCK_ATTR)
        sel = loop.fusewire_selector               # (its must_yield, inline below)
        monotonic = time.monotonic
        readv = os.readv
        handle = self.handle
        room = self._room
        try:
            while True:
                if not self._reading:
                    room.wait()                      # max_pending suspended handlers
                if self._ended:
                    break
                buf = self._buf
                try:
                    n = readv(fd, (buf,))
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as e:
                    if e.errno == errno.ENOENT:      # interrupted before it was read
                        continue
                    if e.errno in (errno.ENODEV, errno.ECONNABORTED):
                        log.debug("FUSE connection ended (%s)", errno.errorcode[e.errno])
                        self.mounted = False
                    else:
                        log.error("reading the FUSE device failed: %s", e)
                    self._end_from_reader(lock)
                    break
                if self._ended:                      # closed meanwhile: left unanswered
                    break
                if n == 0:                           # not a device (tests): its end
                    self._end_from_reader(lock)
                    break
                if sel.waiting or sel.kicked or monotonic() >= sel.due:
                    sel.yield_to_loop(loop.is_running)       # the loop's turn first
                with lock:
                    if self._ended:
                        break
                    handle(buf, n)
        except BaseException:
            log.exception("the FUSE reader thread failed")
            self._end_from_reader(lock)
        finally:
            asyncio.events._set_running_loop(None)
            with self._fd_lock:
                self._reader_done = True
                if self._orphan_fd >= 0:
                    os.close(self._orphan_fd)
                    self._orphan_fd = -1

    def _end_from_reader(self, lock) -> None:
        """The reader is done: end serving, unless it already ended (then the
        loop may be gone: nothing to tell it)."""
        if not self._ended:
            with lock:
                if not self._ended:
                    self._end()

    def _start_reading(self) -> None:
        if self._room is not None:               # the reader thread
            if not self._reading:
                self._reading = True
                self._room.set()
            return
        if not self._reading and not self._ended:
            self._loop.add_reader(self.fd, self._readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._room is not None:               # the reader thread
            self._reading = False
            if not self._ended:
                self._room.clear()
            return
        if self._reading:
            self._loop.remove_reader(self.fd)
            self._reading = False

    async def _serve_trio(self) -> None:
        import trio
        self._done = trio.Event()
        if self._ended:
            return
        async with trio.open_nursery() as nursery:
            self._spawn = nursery.start_soon
            self._run = self._call_trio
            reader = trio.CancelScope()

            async def read_loop():
                with reader:
                    while not self._ended:
                        while len(self._pending) >= self.max_pending:
                            await trio.sleep(0.001)
                        await trio.lowlevel.wait_readable(self.fd)
                        self._readable()
                self.terminate()
            nursery.start_soon(read_loop)
            await self._done.wait()
            reader.cancel()
            nursery.cancel_scope.cancel()
        self._spawn = None
        self._run = self._call

    def _end(self) -> None:
        """The connection is gone (unmounted or aborted)."""
        self.mounted = False if self._ended else self.mounted
        self._ended = True
        self.terminate()

    def _readable(self) -> None:
        """One request from the device, handled at once."""
        buf = self._buf
        try:
            n = os.readv(self.fd, (buf,))
        except BlockingIOError:
            return
        except InterruptedError:
            return
        except OSError as e:
            if e.errno == errno.ENOENT:        # interrupted before it was read: gone
                return
            if e.errno in (errno.ENODEV, errno.ECONNABORTED):
                log.debug("FUSE connection ended (%s)", errno.errorcode[e.errno])
                self.mounted = False
                self._end()
                return
            raise
        self.handle(buf, n)

    # ---- one request -------------------------------------------------------

    def handle(self, buf, n: int) -> None:
        """Decode and answer the request in ``buf[:n]`` (also what the tests
        feed without a kernel)."""
        if n < 40:
            log.warning("short request from the device (%d bytes)", n)
            return
        (length, opcode, unique, nodeid, uid, gid, pid, extlen,
         _) = _IN_HEADER_UNPACK(buf, 0)
        if length != n:
            log.warning("request %d: header says %d bytes, read %d", unique, length, n)
            self._reply_error(unique, errno.EIO)
            return
        end = n - extlen * 8               # extensions (supplementary groups) at the end
        table = self._table
        entry = table[opcode] if opcode < len(table) else None
        if entry is None:
            if opcode not in (k.FORGET, k.BATCH_FORGET, k.INTERRUPT):
                self._reply_error(unique, errno.ENOSYS)
            return
        try:
            entry(unique, nodeid, uid, gid, pid, buf, 40, end, extlen)
        except FUSEError as e:
            self._reply_error(unique, e.errno)
        except Exception:
            log.exception("request %s failed to decode", k.OPCODE_NAMES.get(opcode, opcode))
            self._reply_error(unique, errno.EIO)

    def _call(self, unique: int, fn: Callable, args: tuple, encode: Callable | None,
              undo: Callable | None = None, owns_buffer: bool = False) -> None:
        """Run handler ``fn(*args)`` and answer with ``encode(result)``.
        ``undo(result)`` runs when the answer cannot be delivered."""
        try:
            r = fn(*args)
            if type(r) is _CORO:
                try:
                    y = r.send(None)
                except StopIteration as s:
                    r = s.value
                else:
                    self._suspend(unique, r, y, encode, undo, owns_buffer)
                    return
        except FUSEError as e:
            self._reply_error(unique, e.errno)
            return
        except Exception:
            log.exception("handler %s raised", getattr(fn, "__name__", fn))
            self._reply_error(unique, errno.EIO)
            return
        try:
            body = encode(r) if encode is not None else _EMPTY
        except Exception as e:
            self._unencodable(unique, fn, r, undo, e)
            return
        try:                                   # _reply, inline: every request passes here
            n = len(body)
            if n <= 4096:
                os.write(self.fd, _OUT_HEADER_PACK(16 + n, 0, unique) + body)
            else:
                os.writev(self.fd, (_OUT_HEADER_PACK(16 + n, 0, unique), body))
        except OSError as e:
            if not self._send_failed(unique, e) and undo is not None:
                self._undo(undo, r)

    def _suspend(self, unique, coro, yielded, encode, undo, owns_buffer) -> None:
        if owns_buffer:
            self._buf = bytearray(self.bufsize)     # the handler still reads the old one
        if self._loop is None:                      # trio never runs a handler outside a task
            coro.close()
            raise RuntimeError("a handler suspended outside a task")
        task = self._loop.create_task(_resume(coro, yielded))
        task.add_done_callback(lambda t: self._finished(unique, coro, t, encode, undo))
        self._pending[unique] = task
        if len(self._pending) >= self.max_pending:
            self._stop_reading()

    def _finished(self, unique, coro, task, encode, undo) -> None:
        """A suspended handler ended: answer it (EINTR if it was cancelled)."""
        self._pending.pop(unique, None)
        if self._loop is not None and len(self._pending) < self.max_pending:
            self._start_reading()
        if task.cancelled():
            coro.close()                      # cancelled before it ran again: end it
            self._reply_error(unique, errno.EINTR)
            return
        try:
            r = task.result()
        except FUSEError as e:
            self._reply_error(unique, e.errno)
            return
        except Exception:
            log.exception("handler of request %d raised", unique)
            self._reply_error(unique, errno.EIO)
            return
        try:
            body = encode(r) if encode is not None else _EMPTY
        except Exception as e:
            self._unencodable(unique, coro, r, undo, e)
            return
        if not self._reply(unique, body) and undo is not None:
            self._undo(undo, r)

    async def _finish_trio(self, unique, coro, encode, undo) -> None:
        try:
            try:
                r = await coro
            except FUSEError as e:
                self._reply_error(unique, e.errno)
                return
            except Exception:
                log.exception("handler of request %d raised", unique)
                self._reply_error(unique, errno.EIO)
                return
            except BaseException:
                self._reply_error(unique, errno.EINTR)     # cancelled (INTERRUPT, stop)
                raise
            try:
                body = encode(r) if encode is not None else _EMPTY
            except Exception as e:
                self._unencodable(unique, coro, r, undo, e)
                return
            if not self._reply(unique, body) and undo is not None:
                self._undo(undo, r)
        finally:
            self._pending.pop(unique, None)

    def _call_trio(self, unique, fn, args, encode, undo=None, owns_buffer=False) -> None:
        """Under trio: coroutine handlers run as tasks from the start."""
        try:
            r = fn(*args)
        except FUSEError as e:
            self._reply_error(unique, e.errno)
            return
        except Exception:
            log.exception("handler %s raised", getattr(fn, "__name__", fn))
            self._reply_error(unique, errno.EIO)
            return
        if type(r) is not _CORO:
            try:
                body = encode(r) if encode is not None else _EMPTY
            except Exception as e:
                self._unencodable(unique, fn, r, undo, e)
                return
            if not self._reply(unique, body) and undo is not None:
                self._undo(undo, r)
            return
        import trio
        if owns_buffer:
            self._buf = bytearray(self.bufsize)     # the handler still reads the old one
        scope = trio.CancelScope()

        async def run():
            with scope:
                await self._finish_trio(unique, r, encode, undo)
        self._pending[unique] = scope
        self._spawn(run)

    def _unencodable(self, unique: int, fn, result, undo: Callable | None,
                     e: Exception) -> None:
        """Encoding the handler's answer raised ``e`` (in an ``except``): an
        encoder's own answer (FUSEError: ERANGE for a small buffer) is sent
        as it is; anything else (a bug, or a value the protocol cannot carry)
        is EIO, and what the answer handed out (a lookup, an open handle) is
        taken back, as for an answer the kernel no longer waits for."""
        if isinstance(e, FUSEError):
            self._reply_error(unique, e.errno)
            return
        log.exception("the answer of %s cannot be encoded",
                      getattr(fn, "__qualname__", None) or getattr(fn, "__name__", fn))
        self._reply_error(unique, errno.EIO)
        if undo is not None:
            self._undo(undo, result)

    def _undo(self, undo: Callable, result) -> None:
        try:
            r = undo(result)
            if type(r) is _CORO:
                try:
                    r.send(None)
                except StopIteration:
                    pass
                else:
                    r.close()
                    log.warning("an undo handler suspended; it was not completed")
        except Exception:
            log.exception("undoing an undelivered reply failed")

    def _reply(self, unique: int, body) -> bool:
        """Send a successful reply; False if the kernel no longer waits for it."""
        try:
            if len(body) <= 4096:
                os.write(self.fd, k.OUT_HEADER.pack(16 + len(body), 0, unique) + body)
            else:
                os.writev(self.fd, (k.OUT_HEADER.pack(16 + len(body), 0, unique), body))
        except OSError as e:
            return self._send_failed(unique, e)
        return True

    def _reply_error(self, unique: int, err: int) -> None:
        try:
            os.write(self.fd, k.OUT_HEADER.pack(16, -err, unique))
        except OSError as e:
            self._send_failed(unique, e)

    def _send_failed(self, unique: int, e: OSError) -> bool:
        if e.errno == errno.ENOENT:          # interrupted and answered meanwhile
            return False
        if e.errno in (errno.ENODEV, errno.ECONNABORTED, errno.EBADF):
            self._end()
            return False
        log.error("reply to request %d failed: %s", unique, e)
        return False

    # ---- decoding each opcode ---------------------------------------------

    def _dispatch_table(self) -> list[Callable | None]:
        """The decoder of each opcode, by index (None: ENOSYS)."""
        table: list[Callable | None] = [None] * (max(k.OPCODE_NAMES) + 1)
        for opcode, name in k.OPCODE_NAMES.items():
            method = getattr(self, "_op_" + name, None)
            if method is None:
                continue
            handler = _HANDLER.get(name, name)
            if handler and not hasattr(self.ops, handler):
                continue
            table[opcode] = method
        return table

    def _ctx(self, uid, gid, pid, umask=0) -> RequestContext:
        return RequestContext(uid, gid, pid, umask)

    def _forget_entry(self, attr: EntryAttributes):
        if attr.st_ino:
            return self.ops.forget([(attr.st_ino, 1)])

    def _op_init(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        major, minor, max_readahead, flags = k.INIT_IN.unpack_from(buf, off)
        if major != k.KERNEL_MAJOR:
            # a newer major: answer ours and expect a new INIT (none exists today)
            log.error("kernel FUSE protocol %d.%d: only %d.x is spoken", major, minor,
                      k.KERNEL_MAJOR)
            self._reply(unique, k.INIT_OUT.pack(k.KERNEL_MAJOR, k.KERNEL_MINOR, 0, 0, 0, 0,
                                                0, 0, 0, 0, 0, 0, 0)[:8])
            return
        if minor < k.MIN_MINOR:
            log.error("kernel FUSE protocol 7.%d is older than 7.%d", minor, k.MIN_MINOR)
            self._reply_error(unique, errno.EPROTO)
            self._end()
            return
        if flags & k.INIT_EXT and end - off >= 20:
            flags |= k.INIT_IN_FLAGS2.unpack_from(buf, off + 16)[0] << 32
        self.kernel_flags = flags
        self.minor = min(minor, k.KERNEL_MINOR)
        want = self.want & flags
        if not flags & k.INIT_EXT:
            want &= 0xFFFFFFFF
        self.negotiated = want
        max_pages = min(256, (self.max_write + 4095) // 4096)
        out = k.INIT_OUT.pack(k.KERNEL_MAJOR, self.minor, max_readahead, want & 0xFFFFFFFF,
                              0, 0, self.max_write, 1, max_pages, 0, want >> 32,
                              1 if want & k.PASSTHROUGH else 0, 0)
        log.info("FUSE %d.%d, negotiated %s", major, self.minor, k.flag_names(want))
        self._reply(unique, out)
        # (the kernel applied the answer while it was written)
        if self.readahead_kb and self.dev:
            try:
                device.set_readahead(self.dev, self.readahead_kb)
            except OSError as e:          # e.g. a read-only /sys in a container
                log.info("readahead of %s left at the kernel's default: %s",
                         self.mountpoint, e)

    def _op_destroy(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        self._reply(unique, _EMPTY)
        self._end()

    def _op_interrupt(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        target = k.INTERRUPT_IN.unpack_from(buf, off)[0]
        task = self._pending.get(target)
        if task is not None:
            task.cancel()

    def _op_lookup(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        z = buf.find(b"\0", off, end)                   # _name, inlined (hot)
        self._run(unique, self.ops.lookup,
                  (nodeid, bytes(buf[off:z if z >= 0 else end]), BasicContext(uid, gid, pid)),
                  _entry_out, self._forget_entry)

    def _op_forget(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        n = k.FORGET_IN.unpack_from(buf, off)[0]
        self._forget([(nodeid, n)])

    def _op_batch_forget(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        count = k.BATCH_FORGET_IN.unpack_from(buf, off)[0]
        off += k.BATCH_FORGET_IN.size
        count = min(count, (end - off) // k.FORGET_ONE.size)
        self._forget([k.FORGET_ONE.unpack_from(buf, off + i * 16) for i in range(count)])

    def _forget(self, items) -> None:
        try:
            r = self.ops.forget(items)
            if type(r) is _CORO:
                try:
                    r.send(None)
                except StopIteration:
                    pass
                else:
                    r.close()
                    log.error("forget suspended; it must not")
        except Exception:
            log.exception("forget failed")

    def _op_getattr(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        self._run(unique, self.ops.getattr, (nodeid, BasicContext(uid, gid, pid)),
                  _attr_out)

    def _op_setattr(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        (valid, _, fh, size, _, atime, mtime, ctime, atimens, mtimens, ctimens, mode,
         _, auid, agid, _) = k.SETATTR_IN.unpack_from(buf, off)
        attr = EntryAttributes()
        fields = SetattrFields(valid)
        attr.st_mode, attr.st_uid, attr.st_gid, attr.st_size = mode, auid, agid, size
        now = None
        if valid & k.FATTR_ATIME_NOW:
            fields.update_atime = True
            attr.st_atime_ns = now = time.time_ns()
        else:
            attr.st_atime_ns = atime * _NS + atimens
        if valid & k.FATTR_MTIME_NOW:
            fields.update_mtime = True
            attr.st_mtime_ns = now if now is not None else time.time_ns()
        else:
            attr.st_mtime_ns = mtime * _NS + mtimens
        attr.st_ctime_ns = ctime * _NS + ctimens
        self._run(unique, self.ops.setattr,
                  (nodeid, attr, fields, fh if valid & k.FATTR_FH else None,
                   BasicContext(uid, gid, pid)), EntryAttributes.attr_out)

    def _op_readlink(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        self._run(unique, self.ops.readlink, (nodeid, BasicContext(uid, gid, pid)), bytes)

    def _groups(self, buf, end: int, extlen: int):
        """The supplementary groups extension, if the kernel sent it."""
        p, stop = end, end + extlen * 8
        while p + 8 <= stop:
            size, typ = k.EXT_HEADER.unpack_from(buf, p)
            if size < 8:
                break
            if typ == k.EXT_GROUPS:
                n = k.SUPP_GROUPS.unpack_from(buf, p + 8)[0]
                return tuple(int.from_bytes(buf[p + 12 + 4 * i:p + 16 + 4 * i], "little")
                             for i in range(min(n, (size - 12) // 4)))
            p += size
        return None

    def _op_mknod(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        mode, rdev, umask, _ = k.MKNOD_IN.unpack_from(buf, off)
        ctx = RequestContext(uid, gid, pid, umask, self._groups(buf, end, extlen))
        self._run(unique, self.ops.mknod,
                  (nodeid, _name(buf, off + 16, end), mode, rdev, ctx),
                  EntryAttributes.entry_out, self._forget_entry)

    def _op_mkdir(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        mode, umask = k.MKDIR_IN.unpack_from(buf, off)
        ctx = RequestContext(uid, gid, pid, umask, self._groups(buf, end, extlen))
        self._run(unique, self.ops.mkdir, (nodeid, _name(buf, off + 8, end), mode, ctx),
                  EntryAttributes.entry_out, self._forget_entry)

    def _op_symlink(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        name, target = _two_names(buf, off, end)
        ctx = RequestContext(uid, gid, pid, 0, self._groups(buf, end, extlen))
        self._run(unique, self.ops.symlink, (nodeid, name, target, ctx),
                  EntryAttributes.entry_out, self._forget_entry)

    def _op_link(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        old = k.LINK_IN.unpack_from(buf, off)[0]
        self._run(unique, self.ops.link,
                  (old, nodeid, _name(buf, off + 8, end), BasicContext(uid, gid, pid)),
                  EntryAttributes.entry_out, self._forget_entry)

    def _op_unlink(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        z = buf.find(b"\0", off, end)                   # _name, inlined (hot)
        self._run(unique, self.ops.unlink,
                  (nodeid, bytes(buf[off:z if z >= 0 else end]), BasicContext(uid, gid, pid)),
                  None)

    def _op_rmdir(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        self._run(unique, self.ops.rmdir,
                  (nodeid, _name(buf, off, end), BasicContext(uid, gid, pid)), None)

    def _op_rename(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        newdir = k.RENAME_IN.unpack_from(buf, off)[0]
        old, new = _two_names(buf, off + 8, end)
        self._run(unique, self.ops.rename,
                  (nodeid, old, newdir, new, 0, BasicContext(uid, gid, pid)), None)

    def _op_rename2(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        newdir, flags, _ = k.RENAME2_IN.unpack_from(buf, off)
        old, new = _two_names(buf, off + 16, end)
        self._run(unique, self.ops.rename,
                  (nodeid, old, newdir, new, flags, BasicContext(uid, gid, pid)), None)

    def _release_fi(self, fi: FileInfo):
        return self.ops.release(fi.fh)

    def _op_open(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        flags, open_flags = k.OPEN_IN.unpack_from(buf, off)
        ctx = RequestContext(uid, gid, pid, 0, None, 0,
                             bool(open_flags & k.OPEN_KILL_SUIDGID))
        self._run(unique, self.ops.open, (nodeid, flags, ctx), FileInfo.open_out,
                  self._release_fi)

    def _create_in(self, uid, gid, pid, buf, off, end, extlen):
        """CREATE and TMPFILE's struct: (flags, mode, the caller's context)."""
        flags, mode, umask, open_flags = k.CREATE_IN.unpack_from(buf, off)
        return flags, mode, RequestContext(uid, gid, pid, umask,
                                           self._groups(buf, end, extlen), 0,
                                           bool(open_flags & k.OPEN_KILL_SUIDGID))

    def _created_undo(self, r):
        """An undelivered create: release its handle and forget its entry."""
        fi, attr = r
        self._undo(self._release_fi, fi)
        return self._forget_entry(attr)

    def _op_create(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        # _create_in and _name, inlined (an exclusive create is hot)
        flags, mode, umask, open_flags = _CREATE_IN_UNPACK(buf, off)
        ctx = RequestContext(uid, gid, pid, umask,
                             self._groups(buf, end, extlen) if extlen else None, 0,
                             bool(open_flags & k.OPEN_KILL_SUIDGID))
        off += 16
        z = buf.find(b"\0", off, end)
        self._run(unique, self.ops.create,
                  (nodeid, bytes(buf[off:z if z >= 0 else end]), mode, flags, ctx),
                  _create_out, self._created_undo)

    def _op_tmpfile(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        # O_TMPFILE in directory ``nodeid``: a create with no name (the kernel
        # sends its placeholder "/" after the struct; ignored)
        flags, mode, ctx = self._create_in(uid, gid, pid, buf, off, end, extlen)
        self._run(unique, self.ops.tmpfile, (nodeid, mode, flags, ctx), _create_out,
                  self._created_undo)

    def _op_read(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        fh, offset, size, _, _, _, _ = _READ_IN_UNPACK(buf, off)
        self._run(unique, self.ops.read, (fh, offset, size), _data)

    def _op_write(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        fh, offset, size, wflags, _, _, _ = _WRITE_IN_UNPACK(buf, off)
        start = off + (k.WRITE_IN.size if self.minor >= 9 else k.WRITE_IN_COMPAT_SIZE)
        data = memoryview(buf)[start:start + size]
        # HANDLE_KILLPRIV_V2: the kernel says when this write must clear
        # set-user-ID/set-group-ID (a fourth argument, True, only then)
        args = (fh, offset, data, True) if wflags & k.WRITE_KILL_SUIDGID else \
            (fh, offset, data)
        self._run(unique, self.ops.write, args, _write_out, owns_buffer=True)

    def _op_statfs(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        self._run(unique, self.ops.statfs, (BasicContext(uid, gid, pid),),
                  _statfs_out)

    def _op_release(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        fh = k.RELEASE_IN.unpack_from(buf, off)[0]
        self._run(unique, self.ops.release, (fh,), None)

    def _op_flush(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        fh = k.FLUSH_IN.unpack_from(buf, off)[0]
        self._run(unique, self.ops.flush, (fh,), None)

    def _op_fsync(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        fh, flags, _ = k.FSYNC_IN.unpack_from(buf, off)
        self._run(unique, self.ops.fsync, (fh, bool(flags & k.FSYNC_FDATASYNC)), None)

    def _op_opendir(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        self._run(unique, self.ops.opendir, (nodeid, BasicContext(uid, gid, pid)),
                  _opendir_out, self.ops.releasedir)

    def _readdir(self, unique, buf, off, plus: bool):
        fh, offset, size, _, _, _, _ = _READ_IN_UNPACK(buf, off)
        token = ReaddirToken(size, plus)

        def undo(_):
            if plus:
                items = [(ino, 1) for ino, name in _listed(token) if ino and
                         name not in (b".", b"..")]
                if items:
                    return self.ops.forget(items)
        self._run(unique, self.ops.readdir, (fh, offset, token),
                  lambda _: token.data(), undo)

    def _op_readdir(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        # Only READDIRPLUS is negotiated without READDIRPLUS_AUTO: the handler
        # lookup-counts what it lists, which a plain READDIR would not take.
        self._reply_error(unique, errno.ENOSYS)

    def _op_readdirplus(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        self._readdir(unique, buf, off, True)

    def _op_releasedir(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        fh = k.RELEASE_IN.unpack_from(buf, off)[0]
        self._run(unique, self.ops.releasedir, (fh,), None)

    def _op_fsyncdir(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        fh, flags, _ = k.FSYNC_IN.unpack_from(buf, off)
        self._run(unique, self.ops.fsyncdir, (fh, bool(flags & k.FSYNC_FDATASYNC)), None)

    def _op_setxattr(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        sx_flags = 0
        if self.negotiated & k.SETXATTR_EXT:
            size, flags, sx_flags, _ = k.SETXATTR_IN.unpack_from(buf, off)
            off += k.SETXATTR_IN.size
        else:
            size, flags = k.SETXATTR_IN_COMPAT.unpack_from(buf, off)
            off += k.SETXATTR_IN_COMPAT.size
        z = buf.find(b"\0", off, end)
        if z < 0 or z + 1 + size > end:
            raise FUSEError(errno.EINVAL)
        name = bytes(buf[off:z])
        value = bytes(buf[z + 1:z + 1 + size])
        ctx = RequestContext(uid, gid, pid, 0, None, flags,
                             bool(sx_flags & k.SETXATTR_ACL_KILL_SGID))
        self._run(unique, self.ops.setxattr, (nodeid, name, value, ctx), None)

    def _op_getxattr(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        size, _ = k.GETXATTR_IN.unpack_from(buf, off)
        self._run(unique, self.ops.getxattr,
                  (nodeid, _name(buf, off + 8, end), BasicContext(uid, gid, pid)),
                  _sized(size))

    def _op_listxattr(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        size, _ = k.GETXATTR_IN.unpack_from(buf, off)
        enc = _sized(size)
        self._run(unique, self.ops.listxattr, (nodeid, BasicContext(uid, gid, pid)),
                  lambda names: enc(b"".join(n + b"\0" for n in names)))

    def _op_removexattr(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        self._run(unique, self.ops.removexattr,
                  (nodeid, _name(buf, off, end), BasicContext(uid, gid, pid)), None)

    def _op_access(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        mask, _ = k.ACCESS_IN.unpack_from(buf, off)
        self._run(unique, self.ops.access, (nodeid, mask, BasicContext(uid, gid, pid)),
                  _access_out)

    def _op_fallocate(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        fh, offset, length, mode, _ = k.FALLOCATE_IN.unpack_from(buf, off)
        self._run(unique, self.ops.fallocate,
                  (fh, mode, offset, length, BasicContext(uid, gid, pid)), None)

    def _op_lseek(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        fh, offset, whence, _ = k.LSEEK_IN.unpack_from(buf, off)
        self._run(unique, self.ops.lseek, (fh, offset, whence), k.LSEEK_OUT.pack)

    def _op_copy_file_range(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        fh_in, off_in, _, fh_out, off_out, length, flags = \
            k.COPY_FILE_RANGE_IN.unpack_from(buf, off)
        self._run(unique, self.ops.copy_file_range,
                  (fh_in, off_in, fh_out, off_out, length, flags), _write_out)

    def _op_copy_file_range_64(self, unique, nodeid, uid, gid, pid, buf, off, end, extlen):
        fh_in, off_in, _, fh_out, off_out, length, flags = \
            k.COPY_FILE_RANGE_IN.unpack_from(buf, off)
        self._run(unique, self.ops.copy_file_range,
                  (fh_in, off_in, fh_out, off_out, length, flags), k.LSEEK_OUT.pack)


# The handler an opcode needs ("" = none: the layer answers it itself).
_HANDLER = {"init": "", "destroy": "", "interrupt": "", "batch_forget": "forget",
            "readdirplus": "readdir", "rename2": "rename", "readdir": "",
            "copy_file_range_64": "copy_file_range"}


def _data(r) -> bytes:
    return r


def _write_out(n: int) -> bytes:
    return k.WRITE_OUT.pack(n, 0)


def _statfs_out(s) -> bytes:
    return s.statfs_out()


def _opendir_out(fh: int) -> bytes:
    return k.OPEN_OUT.pack(fh, 0, 0)


def _create_out(r) -> bytes:
    fi, attr = r
    return attr.entry_out() + fi.open_out()


def _access_out(ok) -> bytes:
    if ok is False:
        raise FUSEError(errno.EACCES)
    return _EMPTY


def _sized(size: int) -> Callable:
    """getxattr/listxattr's answer: the length when asked with size 0, ERANGE
    when it does not fit."""
    def enc(value: bytes) -> bytes:
        if size == 0:
            return k.GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise FUSEError(errno.ERANGE)
        return value
    return enc


def _listed(token: ReaddirToken):
    """(ino, name) of each entry in a READDIRPLUS answer."""
    for part in token.parts:
        nodeid = k.ENTRY_OUT.unpack_from(part, 0)[0]
        namelen = k.DIRENT.unpack_from(part, k.ENTRY_OUT.size)[2]
        start = k.ENTRY_OUT.size + k.DIRENT.size
        yield nodeid, part[start:start + namelen]
