"""The life of one mount: open the private area, start its quota, mount, serve
FUSE requests and the control channel, checkpoint, and stop cleanly.

Role: wiring.  ``Mount.prepare`` does everything that can fail before the
mount exists (so ``simfs`` can report it and exit non-zero); ``Mount.serve``
runs the tasks: the FUSE request loop (``simfs.binding``: fusewire by
default, pyfuse3 as the fallback), the control server, the checkpoint
timer, the sweep of files closed with delayed blocks and the signal handler
(SIGTERM/SIGINT/SIGHUP end the loop).
Only after the request loop ended normally is the quota file marked as
cleanly stopped; after a crash it still says "mounted", and the next start
recounts.

Concurrency: everything runs on one event loop, written against anyio so that
the same code runs on asyncio (the default, ``runtime=thread``: fusewire's
reader thread answers the requests, each under the loop's lock, so a handler
and the loop's own work never overlap: see ``fusewire.loop``), asyncio +
uvloop, plain asyncio or trio (``RUNTIMES``; ``run`` starts it with the
binding set up for it).  Scans run in a worker thread and only their result
is applied on the loop (``LiveQuota.finish_recalc``).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field

import anyio
# anyio (4.16) loads each of its parts at its first use.  A daemon whose
# first use came while its descriptor table was full (EMFILE: a container
# holding all it may) could not read the module, and the signal task's
# failure ended the daemon; what every daemon uses is loaded here, before
# it serves.
from anyio import open_signal_receiver, to_thread  # noqa: F401
from anyio.abc import SocketAttribute, SocketListener, SocketStream

import fusewire
from vzquota import control, progress
from vzquota.errors import EC_LIVE, VzError
from vzquota.inside import QuotaAdmin
from vzquota.qfile import QuotaFile
from vzquota.scan import ScanResult, scan
from vzquota.engine import Growth
from vzquota.service import LiveQuota, holds, upper_bound

from . import binding, events
from .binding import BINDINGS
from .config import DEFAULT, Config
from .inodes import ROOT, Closer
from .lower import RENAME_EXCHANGE
from .ops import SimOperations

log = logging.getLogger(__name__)

# thread: fusewire's reader thread, asyncio for the rest (fuse=builtin only);
# the default is the binding's (options.default_runtime)
RUNTIMES = ("thread", "uvloop", "asyncio", "trio")


def run(serve, runtime: str = RUNTIMES[0], fuse: str = BINDINGS[0]):
    """Run ``serve()`` on the chosen event loop, with the binding set up for it."""
    return binding.select(fuse).run(serve, runtime)


class MountError(Exception):
    """A mount that cannot start: the message is for the user."""


@dataclass
class Mount:
    private: str
    root: str
    fuse_options: set[str]
    quotaid: int | None = None
    quotafile: str | None = None
    runtime: str = RUNTIMES[0]
    config: Config = DEFAULT        # every tunable (-o maxopen, maxinodes, checkpoint,
                                    # recounthold, recountwait, the rest at their defaults)
    quota_admin: int | None = None      # -o quota_admin[=UID]: the container's root
    fuse: str = BINDINGS[0]
    passthrough: bool = False           # -o passthrough: every file, whatever its size
    nopassthrough: bool = False         # -o nopassthrough: no file (all reads to the daemon)
    ops: SimOperations | None = None
    channel: object = None
    live: LiveQuota | None = None
    _locks: list[tuple[int, str]] = field(default_factory=list)
    _shown: object = None
    hook: str | None = None
    _hooks_running: int = 0
    _sock: socket.socket | None = None
    _recalc_lock: anyio.Lock | None = None
    _stale_gate: "Gate | None" = None     # of a stale recount waiting for the lock

    # ---- before mounting -------------------------------------------------------

    def _lock(self, rundir: int, name: str, what: str) -> None:
        """Hold an flock on ``name`` in the run directory for the mount's life.
        The file is removed at stop (``_unlock``), so a lock taken on a file
        that was unlinked meanwhile is retried on the new one.  Never through
        a symlink (``control.open_lock``)."""
        path = os.path.join(control.run_dir(), name)
        while True:
            try:
                fd = control.open_lock(rundir, name)
            except VzError as e:
                raise MountError(e.message) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise MountError(f"{what} is already mounted by another simfs") from None
                raise
            try:
                same = os.path.samestat(os.fstat(fd),
                                        os.stat(name, dir_fd=rundir, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._locks.append((fd, path))

    def _unlock(self) -> None:
        """Remove and release the lock files (unlink first, while held)."""
        for fd, path in self._locks:
            try:
                os.unlink(path)
            except OSError:
                pass
            os.close(fd)
        self._locks.clear()

    def prepare(self) -> None:
        """Open and lock the private area, load and start the quota."""
        try:
            root_fd = os.open(self.private, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MountError(f"private area {self.private} does not exist") from None
        except NotADirectoryError:
            raise MountError(f"private area {self.private} is not a directory") from None
        st = os.fstat(root_fd)
        try:
            rundir = control.ensure_run_dir()
        except VzError as e:
            raise MountError(e.message) from None
        try:
            self._lock(rundir, f"private-{st.st_dev}-{st.st_ino}.lock",
                       f"private area {self.private}")
            if self.quotaid is not None:
                self._lock(rundir, os.path.basename(control.lock_path(self.quotaid)),
                           f"quota id {self.quotaid}")
        finally:
            os.close(rundir)
        if self.quotaid is not None:
            qf = QuotaFile.for_id(self.quotaid, self.quotafile)
            if not qf.exists():
                raise MountError(f"no quota file for id {self.quotaid} ({qf.path}); "
                                 f"create it first with: vzquota init {self.quotaid} "
                                 f"-p {self.private} -b ... -B ... -i ... -I ... -e ... -n ...")
            try:
                self.live = LiveQuota(qf, os.path.abspath(self.private), self._scan)
                self._shown = progress.counter(f"simfs: recounting {self.private}")
                try:
                    self.live.start()
                finally:
                    self._shown = None
            except VzError as e:
                raise MountError(e.message) from None
        self.ops = SimOperations(root_fd, self.config)
        self.ops.table.closer = Closer(self.config.closer_idle)
        if not self.nopassthrough and self.fuse == "builtin":
            # reads may bypass the daemon (simfs.iomode)
            self.ops.fuse_want |= fusewire.kernel.PASSTHROUGH
            self.ops.iomodes.enabled = True
            self.ops.iomodes.min_size = 0 if self.passthrough else self.config.passthrough_min
        if self.live is not None:
            self.live.orphans = self._orphans
            self.live.gaps = self.ops.ledger.gaps
            self.ops.quota = self.live.engine
            self.ops.admin = QuotaAdmin(self.live, self.quota_admin)
            self._listen()

    def _scan(self, skip: frozenset[int] = frozenset()) -> ScanResult:
        shown = self._shown          # a terminal's progress line, at start-up only

        def progress(inodes: int) -> None:
            log.info("quota %d: recounting %s: %d inodes so far", self.quotaid,
                     self.private, inodes)
            if shown is not None:
                shown(inodes)
        try:
            result = scan(self.private, per_id=True, progress=progress, skip=skip)
        except BaseException:
            if shown is not None:
                shown.close()
            raise
        if shown is not None:
            shown.close(result.inodes)
        return result

    def _orphans(self) -> list[tuple[int, int, int]]:
        """Inodes unlinked but still reachable by the kernel (open, or held by
        a lookup reference): charged although no scan sees them, and their
        space goes when the mount does."""
        return [(i.uid, i.gid, i.space) for i in self.ops.table.inodes.values()
                if i.unlinked and not i.freed]

    def abort(self) -> None:
        """Undo ``prepare`` when the mount itself could not be made."""
        if self.live is not None and self.live.engine is not None:
            self.live.stop()
        if self._sock is not None:
            self._sock.close()
            os.unlink(control.socket_path(self.quotaid))
        self._unlock()

    def fuse_init(self) -> None:
        """Mount: from here on the kernel sends requests (served by ``serve``)."""
        self.channel = binding.select(self.fuse)(self.ops, self.root, self.fuse_options)
        self.channel.mount()

    # ---- serving ---------------------------------------------------------------

    async def serve(self) -> None:
        clean = False
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._signals)
                tg.start_soon(self._prunes)
                if self.live is not None:
                    tg.start_soon(self._control)
                    tg.start_soon(self._checkpoints)
                    tg.start_soon(self._sweeps)
                    tg.start_soon(self._events, tg)
                    tg.start_soon(self._retries)
                await self.channel.main()
                clean = True
                tg.cancel_scope.cancel()
        finally:
            if self.live is not None and clean:
                try:
                    self.ops.ledger.charge_followed()
                except Exception:
                    log.exception("settling files at stop failed")
                try:
                    self.live.stop()
                except Exception:
                    log.exception("saving the quota file at stop failed")
            self.channel.close(unmount=clean)
            if self.live is not None:
                try:
                    os.unlink(control.socket_path(self.quotaid))
                except OSError:
                    pass
            self._unlock()
            self.ops.table.close_all()

    async def _sweeps(self) -> None:
        """Every ``sweep_every`` seconds, charge what files closed with delayed
        blocks hold once they are allocated (Ledger.sweep)."""
        while True:
            await anyio.sleep(self.config.sweep_every)
            if self.ops.ledger.followed and self.ops.gate is None:    # not while held
                try:
                    await self.ops.ledger.sweep()
                except Exception:
                    log.exception("settling closed files failed")

    async def _prunes(self) -> None:
        """Every ``prune_every`` seconds, a prune pass if the inode table is over
        its cap and none is scheduled (simfs.prune.Pruner: normally a lookup
        past the cap schedules one at once; this catches the rest, e.g. under
        trio, or when the kernel kept what a pass asked for)."""
        table = self.ops.table
        while True:
            await anyio.sleep(self.config.prune_every)
            if table.over() > 0 and not table.full:
                try:
                    self.ops.prune()
                except Exception:
                    log.exception("asking the kernel to forget inodes failed")

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for sig in sigs:
                log.info("signal %d: stopping", sig)
                self.channel.terminate()

    async def _events(self, tg) -> None:
        """Report limit events: a log line each, and the hook (see events.py)."""
        cfg = self.config
        watcher = events.Watcher(self.quotaid, refusal_every=cfg.refusal_every)
        self.live.event_totals = watcher.totals      # the "events" control request
        dropped = 0
        while True:
            await anyio.sleep(cfg.events_every)
            live = self.live
            engine = live.engine if live is not None else None
            for ev in watcher.poll(engine):
                log.warning("%s", ev.line())
                self._hook(tg, ev)
            shares = self.ops.shares.events
            while shares:
                # a uid refused at its share of open files (logged when refused)
                uid, held, share = shares.popleft()
                watcher.count(("open_share", 2, "openfiles"))
                self._hook(tg, events.Event("open_share", self.quotaid, 2, "user", uid,
                                            "openfiles", held, share, share))
            if engine is not None and engine.events_dropped != dropped:
                log.warning("quota %d: %d more refusals came too fast to itemize",
                            self.quotaid, engine.events_dropped - dropped)
                dropped = engine.events_dropped

    def _hook(self, tg, ev) -> None:
        if self.hook:
            if self._hooks_running >= self.config.hooks_max:
                log.warning("quota %d: hook %s not run for this event: %d hooks "
                            "still running", self.quotaid, self.hook, self._hooks_running)
            else:
                self._hooks_running += 1
                tg.start_soon(self._run_hook, ev)

    async def _run_hook(self, ev) -> None:
        try:
            r = await anyio.run_process([self.hook], env=events.hook_env(ev, self.private),
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, check=False)
            if r.returncode != 0:
                log.warning("quota %d: hook %s exited with %d", self.quotaid, self.hook,
                            r.returncode)
        except OSError as e:
            log.warning("quota %d: hook %s could not run: %s", self.quotaid, self.hook,
                        e.strerror or e)
        finally:
            self._hooks_running -= 1

    async def _checkpoints(self) -> None:
        while True:
            await anyio.sleep(self.config.checkpoint)
            try:
                if self.live is not None:
                    self.live.checkpoint()
            except Exception:
                log.exception("quota checkpoint failed")

    def _listen(self) -> None:
        """Bind the control socket before the mount appears, so that whoever
        sees the mount can reach its quota at once."""
        path = control.socket_path(self.quotaid)
        try:
            os.unlink(path)      # stale: we hold the id's lock
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        control.bind_private(sock, path)   # 0600 from the start: never wider
        sock.listen(16)
        self._sock = sock

    async def _control(self) -> None:
        listener = await SocketListener.from_socket(self._sock)
        async with anyio.create_task_group() as tg:
            delay = 0.0
            while True:
                try:
                    conn = await listener.accept()
                except (OSError, anyio.BrokenResourceError) as e:
                    # EMFILE/ENFILE/ENOBUFS... (anyio wraps them in
                    # BrokenResourceError; the listener stays usable): the
                    # connection waits in the backlog; the mount must not die
                    # of it.  Logged once per streak, retried with a growing
                    # pause (up to 1 s).
                    if not delay:
                        log.warning("control: accept failed (%s); backing off",
                                    e.__cause__ or e)
                    delay = min(1.0, delay * 2 or 0.05)
                    await anyio.sleep(delay)
                    continue
                delay = 0.0
                tg.start_soon(self._client, conn)

    async def _client(self, conn: SocketStream) -> None:
        """One control connection: one request line in, one answer line out.
        Nothing a client sends or does may end the mount."""
        async with conn:
            try:
                if not control.peer_allowed(conn.extra(SocketAttribute.raw_socket)):
                    log.warning("control: refused a peer that is not the host's root")
                    return
                buf = b""
                with anyio.move_on_after(30):
                    while not buf.endswith(b"\n") and len(buf) <= control.MAX_REQUEST:
                        try:
                            buf += await conn.receive(65536)
                        except anyio.EndOfStream:
                            break
                if len(buf) > control.MAX_REQUEST:
                    reply = {"ok": False, "code": EC_LIVE,
                             "message": f"bad request: longer than {control.MAX_REQUEST} bytes"}
                else:
                    reply = await self._answer_beating(conn, buf)
                await conn.send(control.encode(reply))
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as e:
                log.debug("control connection failed: %s", e)
            except Exception:
                log.exception("control connection failed")

    async def _answer_beating(self, conn: SocketStream, buf: bytes) -> dict:
        """``_answer``, with a space sent to the client every
        ``control.KEEPALIVE`` seconds until it is ready: a request that takes
        long (the recount of a live `on` or `recalc` over a big tree) keeps
        the client waiting as long as the mount works on it, as the original
        `vzquota on` waited for its quota check, where a mount that stops
        answering is still reported after ``VZQUOTA_TIMEOUT`` (the client's
        timeout applies to each read).  A client that goes away does not stop
        the work."""
        async def beat() -> None:
            try:
                while True:
                    await anyio.sleep(control.KEEPALIVE)
                    await conn.send(b" ")
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(beat)
            try:
                return await self._answer(buf)
            finally:
                tg.cancel_scope.cancel()

    async def _answer(self, buf: bytes) -> dict:
        try:
            req = json.loads(buf)
        except (ValueError, RecursionError):
            return {"ok": False, "code": EC_LIVE, "message": "bad request: not valid JSON"}
        live = self.live
        try:
            reply = live.handle(req)
            self.ops.quota = live.engine
            why = live.recalc_wanted
            if why:
                live.recalc_wanted = None
                passes = await self.recalc(why)
                if passes:
                    raise live.inexact_error(passes, why)
                reply = live.reply()
            return reply
        except VzError as e:
            return {"ok": False, "code": e.code, "message": e.message}
        except Exception as e:
            log.exception("control request failed")
            return {"ok": False, "code": EC_LIVE, "message": f"internal error: {e}"}

    async def recalc(self, why: str | None = None) -> int:
        """Recount while serving.  A pass is applied only if it is exact (see
        ``PassWatch``); otherwise it is repeated, up to ``recount_passes``.  Passes
        may hold the requests that change names or allocations while they scan
        (``holds``; at most ``recount_hold`` seconds): then nothing can disturb them.

        While the figures in use are stale (``why`` "stale": the first pass
        of a live `on`; they may be short), a pass holds those requests until
        it ends, however long that takes, so that no allocation is ever
        checked against a figure that may be short; one that would allocate
        fails with EDQUOT once it has waited ``recount_wait`` seconds (the
        others wait: they only free).  Such a pass is exact (nothing it holds
        can disturb it); if it was not, its upper bound is applied (never
        short: ``LiveQuota.finish_recalc``) and later passes are as a
        ``recalc``'s.

        Returns 0 when exact, else the number of passes made
        (``LiveQuota.finish_recalc`` says what was applied then; ``_retries``
        tries again later)."""
        if self._recalc_lock is None:
            self._recalc_lock = anyio.Lock()
        first = None
        if why == "stale":
            # held from now on, also while an earlier recount ends (its gates
            # give way to this one: see _let_go)
            first = self.ops.gate = self._stale_gate = Gate(self.config.recount_wait)
        try:
            return await self._recalc(why, first)
        finally:
            if self._stale_gate is first:
                self._stale_gate = None
            if first is not None and not first.opened:    # never used: end it
                self._let_go(first)

    async def _recalc(self, why: str | None, first: "Gate | None") -> int:
        live = self.live
        async with self._recalc_lock:      # one recount at a time
            last = None
            stale = why == "stale"          # the figures in use may be short
            cfg = self.config
            for n in range(cfg.recount_passes):
                engine = live.engine
                if engine is None:
                    return 0
                whole = stale               # hold the whole pass
                if whole:
                    gate, first = first or Gate(cfg.recount_wait), None
                    if self._stale_gate is gate:
                        self._stale_gate = None
                elif holds(n, why, last, cfg.recount_hold):
                    gate = Gate()
                else:
                    gate = None
                if gate is not None and self._stale_gate is None:
                    self.ops.gate = gate
                watch = PassWatch(self.ops, live.engine)
                self.ops.watch = watch
                began = time.monotonic()
                failed: list[BaseException] = []

                def scan() -> ScanResult | None:
                    try:
                        _test_wait()
                        return self._scan(watch.skip)
                    except BaseException as e:     # raised below, not as a group
                        failed.append(e)
                        return None
                try:
                    async with anyio.create_task_group() as tg:
                        if gate is not None and not whole:
                            tg.start_soon(self._let_go_after, gate, cfg.recount_hold)
                        result = await anyio.to_thread.run_sync(scan)
                        tg.cancel_scope.cancel()
                    if failed:
                        raise failed[0]
                    last = time.monotonic() - began
                    if live.engine is not engine:    # off (and maybe on again) meanwhile
                        return 0
                    # no await from here to the apply (the held requests go on
                    # only once this returns to the loop)
                    quiet = watch.complete(result)
                    self.ops.ledger.refresh()
                    bound = None if quiet else watch.bound(result)
                    done = live.finish_recalc(result, quiet, n == cfg.recount_passes - 1,
                                              "stale" if stale else "recalc", bound)
                    if bound is not None:
                        stale = False       # an upper bound is enforced now
                finally:
                    self.ops.watch = None
                    watch.close()
                    if gate is not None:
                        self._let_go(gate)
                if done:
                    log.info("quota %d: recounted (pass %d%s, %.3f s)", self.quotaid, n + 1,
                             ", allocations held" if gate is not None and not gate.cut
                             else "", last)
                    return 0
        log.warning("quota %d: usage kept changing during %d recount passes",
                    self.quotaid, self.config.recount_passes)
        return self.config.recount_passes

    def _let_go(self, gate: "Gate") -> None:
        """End a hold: the held requests go on, then the FORGETs kept meanwhile
        (a stale recount waiting for this one to end keeps holding them)."""
        if self.ops.gate is gate:
            self.ops.gate = self._stale_gate
        held = gate.open()
        deferred, self.ops.deferred = self.ops.deferred, []
        if deferred:
            self.ops.forget_now(deferred)
        if held:
            log.info("quota %d: %d requests held during a recount pass go on",
                     self.quotaid, held)
        if gate.refused:
            log.warning("quota %d: %d calls that allocate waited %g s for a recount "
                        "pass and were refused (EDQUOT)", self.quotaid, gate.refused,
                        gate.limit)

    async def _let_go_after(self, gate: "Gate", seconds: float) -> None:
        await anyio.sleep(seconds)
        log.info("quota %d: a recount pass holds allocations for more than %g s: "
                 "letting them go", self.quotaid, seconds)
        gate.cut = True
        self._let_go(gate)

    async def _retries(self) -> None:
        """Make a live recount that could not be exact again (``live.inexact``):
        at the first quiet moment (no request that changes names or allocations
        for ``retry_quiet`` s), or else after ``retry_first`` s, then less and
        less often (up to ``retry_max``)."""
        seen = self.ops.mutations
        cfg = self.config
        backoff = cfg.retry_first
        next_try = None
        while True:
            await anyio.sleep(cfg.retry_quiet)
            live = self.live
            now_seen = self.ops.mutations
            quiet, seen = now_seen == seen, now_seen
            if live is None or live.engine is None or live.inexact is None:
                backoff, next_try = cfg.retry_first, None
                continue
            now = time.monotonic()
            if next_try is None:
                next_try = now + backoff
            if not quiet and now < next_try:
                continue
            why = live.inexact
            log.info("quota %d: recounting again (the last recount was not exact)",
                     self.quotaid)
            try:
                passes = await self.recalc(why)
            except Exception:
                log.exception("quota %d: recounting again failed", self.quotaid)
                passes = 1
            if passes:
                backoff = min(cfg.retry_max, backoff * 2)
                next_try = time.monotonic() + backoff
            else:
                log.info("quota %d: the recount is exact now", self.quotaid)
                backoff, next_try = cfg.retry_first, None
            seen = self.ops.mutations


class Gate:
    """Holds requests (``SimOperations.gate``) until ``open``.  Works on every
    runtime: under asyncio (the FUSE layer first runs a handler outside any
    task, where anyio cannot tell the loop) a plain future, under trio an
    anyio Event.  A held request the kernel interrupts is cancelled while it
    waits (its future is then done, and skipped by ``open``).

    ``limit``: a request that would allocate waits at most this many seconds
    (``wait(limit)`` raises TimeoutError then; the request fails with
    EDQUOT, counted in ``refused``); None: every request waits until
    ``open``."""

    def __init__(self, limit: float | None = None):
        self._waiters: list = []
        self._open = False
        self.cut = False          # opened before its pass ended (recount_hold)
        self.limit = limit
        self.refused = 0

    def wait(self, limit: float | None = None):
        if self._open:
            return _nothing()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:          # trio
            ev = anyio.Event()
            self._waiters.append(ev)
            return ev.wait() if limit is None else _timed(ev, limit)
        fut = loop.create_future()
        self._waiters.append(fut)
        if limit is not None:
            loop.call_later(limit, _expire, fut)
        return fut

    @property
    def opened(self) -> bool:
        return self._open

    def open(self) -> int:
        """Let every held request go on; returns how many there were."""
        self._open = True
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if isinstance(w, asyncio.Future):
                if not w.done():
                    w.set_result(None)
            else:
                w.set()
        return len(waiters)


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


async def _timed(ev: anyio.Event, limit: float) -> None:
    with anyio.fail_after(limit):
        await ev.wait()


def _test_wait() -> None:
    """For tests only: with SIMFS_TEST_SCAN_WAIT=PATH in the daemon's
    environment (the host's root sets it, nothing inside a container can), a
    live recount pass waits until PATH exists (at most 60 s) before it scans,
    so that a test can act while a pass runs as long as a big tree's would;
    it makes PATH.waiting first, so the test knows the pass has begun."""
    path = os.environ.get("SIMFS_TEST_SCAN_WAIT")
    if not path:
        return
    with open(path + ".waiting", "w"):
        pass
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


async def _nothing() -> None:
    return None


class PassWatch:
    """Makes one live recount pass exact, or says it cannot be.

    The scan runs in a thread while the mount serves.  Files open at the start
    of the pass (and still linked) are *hot*: the scan leaves them out
    (``skip``) and ``complete`` adds what they hold at the end, read on the
    loop, so writes to them while the scan runs cost nothing in exactness.
    Every request is seen before and after (``SimOperations.watch``); the pass
    is *spoiled* by any request that changes names (the scan may have missed
    or doubled what moved), and by any change of usage not made by a request
    on a hot file (a usage change shows as a step of the engine's
    ``generation``: all steps during the pass must be accounted for by
    requests on hot files).  A spoiled pass is not exact.

    It also keeps what an inexact pass needs to be an upper bound (``bound``):
    what the engine charged meanwhile (``Growth``) and what a rename or a link
    may have hidden from the scan (a file moved or linked into a directory
    already walked: counted as new); a directory moved meanwhile may have
    hidden a whole subtree: then there is no bound.

    Concurrency: ``before``/``after`` run on the event loop; the scan thread
    only reads ``skip``, a frozenset fixed before it starts.
    """

    NAMES = frozenset({"mknod", "mkdir", "symlink", "create", "link", "unlink", "rmdir",
                       "rename", "tmpfile"})
    # Requests on a hot file whose usage changes are accounted for.  Only
    # handlers that never await: nothing else runs between before and after,
    # so the generation steps between them are theirs (fsync awaits: a change
    # it makes spoils the pass).
    BY_HANDLE = frozenset({"write", "release", "fallocate", "flush", "copy_file_range"})
    BY_INODE = frozenset({"open", "setattr", "setxattr", "removexattr"})

    def __init__(self, ops: SimOperations, engine):
        self.ops = ops
        self.engine = engine
        self.start = engine.generation
        self.accounted = 0              # generation steps made by requests on hot files
        self.spoiled = False
        table = ops.table
        self.hot = frozenset(i.ino for i in table.inodes.values()
                             if i.opens > 0 and not i.unlinked and not i.is_dir
                             and i.ino != ROOT)
        self.skip = frozenset(table.fuse_ino(ino) for ino in self.hot)   # backing numbers
        self.growth = engine.growth = Growth()
        self.unbounded = False          # a directory moved: no upper bound
        self.created: set[int] = set()  # backing numbers of inodes made during the pass

    def close(self) -> None:
        if self.engine.growth is self.growth:
            self.engine.growth = None

    def bound(self, result: ScanResult) -> ScanResult | None:
        """After ``complete``: an upper bound of the usage, or None."""
        return None if self.unbounded else upper_bound(result, self.growth)

    def _entry(self, parent: int, name: bytes) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.ops.table.get(parent).fd, follow_symlinks=False)
        except OSError:
            return None

    def _moved(self, parent: int, name: bytes) -> None:
        """``name`` in ``parent`` is about to get a name the scan may have
        passed already: count a file as new; a directory leaves no bound."""
        st = self._entry(parent, name)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            self.unbounded = True
        else:
            self.growth.add(st.st_uid, st.st_gid, st.st_blocks * 512, 1)

    def _going(self, parent: int, name: bytes):
        """What ``name`` in ``parent`` was charged, if it was made during this
        pass (all of that is in ``growth``) and this name is its last."""
        st = self._entry(parent, name)
        if (st is None or st.st_ino not in self.created
                or (not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1)):
            return None
        inode = self.ops.table.find(st.st_ino)
        if inode is None or inode.freed:
            return None
        return (parent, name, st.st_ino, inode.uid, inode.gid, inode.space)

    def before(self, op: str, args: tuple):
        ino = made = going = None
        if op in self.NAMES:
            self.spoiled = True
            if op == "rename":
                self._moved(args[0], args[1])
                if args[4] & RENAME_EXCHANGE:
                    self._moved(args[2], args[3])
                else:
                    going = self._going(args[2], args[3])
            elif op == "link":
                try:
                    st = os.fstat(self.ops.table.get(args[0]).fd)
                    self.growth.add(st.st_uid, st.st_gid, st.st_blocks * 512, 1)
                except OSError:
                    pass
            elif op in ("unlink", "rmdir"):
                going = self._going(args[0], args[1])
            elif op == "tmpfile":
                pass            # nameless: the scan cannot see it; its charge is in growth
            else:                                   # mknod, mkdir, symlink, create
                made = (args[0], args[1])
        elif op in self.BY_HANDLE and args:
            # copy_file_range changes its destination: (fh_in, off_in, fh_out, ...)
            h = self.ops.handles.get(args[2] if op == "copy_file_range" else args[0])
            ino = getattr(h, "inode", None)
            ino = ino.ino if ino is not None else None
        elif op in self.BY_INODE and args:
            ino = args[0]
        if ino is not None and ino in self.hot:
            self.engine.growth = None       # a hot file's end is counted exactly
        return self.engine.generation, ino, made, going

    def after(self, op: str, mark) -> None:
        gen, ino, made, going = mark
        if self.ops.watch is self:          # (an fsync may end after the pass)
            self.engine.growth = self.growth
        step = self.engine.generation - gen
        if step and ino is not None and ino in self.hot:
            self.accounted += step
        if made is not None and step:           # made (it was charged)
            st = self._entry(*made)
            if st is not None:
                self.created.add(st.st_ino)
        if going is not None:
            parent, name, st_ino, uid, gid, space = going
            st = self._entry(parent, name)
            if st is None or st.st_ino != st_ino:   # gone: made and gone in this pass
                self.created.discard(st_ino)
                self.growth.take(uid, gid, space, 1)

    def complete(self, result: ScanResult) -> bool:
        """At the end of the scan, on the loop: add the hot files still linked
        to ``result`` and say whether the pass is exact."""
        exact = not self.spoiled and self.engine.generation - self.start == self.accounted
        table = self.ops.table
        for ino in self.hot:
            inode = table.inodes.get(ino)
            if inode is None or inode.unlinked:
                exact = False         # unlinked: charged as an orphan, if at all
                continue
            try:
                st = os.fstat(inode.fd)
            except OSError:
                exact = False
                continue
            space = st.st_blocks * 512
            result.space += space
            result.inodes += 1
            for ids, key in ((result.users, st.st_uid), (result.groups, st.st_gid)):
                a = ids.setdefault(key, [0, 0])
                a[0] += space
                a[1] += 1
        return exact
