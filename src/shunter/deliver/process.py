"""``isolation: process``: run a subscriber's handler in a small pool of worker processes.

A worker that dies — segfault, ``os._exit``, a kill — fails only the delivery it was
running, with ``WorkerDied`` naming the signal or exit status; the pool replaces it. A
delivery cancelled by its timeout kills its worker (a process, unlike a thread, can be
stopped). ``concurrent.futures.ProcessPoolExecutor`` is not used because one dead worker
breaks that whole pool, nor multiprocessing's start methods: ``fork`` copies librdkafka's
threads' locks mid-use, and ``spawn``/``forkserver`` import the parent's ``__main__``
again in every worker (an application script without a main guard would start a second
dispatcher there). A worker is a fresh interpreter (``worker.BOOTSTRAP``) talking over a
socket pair, which the event loop watches with ``add_reader``, as it watches the worker's
exit (a pidfd). The pool queue is bounded by the runtime's concurrency limit.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

from ..config import SubscriberConfig
from ..errors import ConfigError, ShunterError, WorkerDied
from ..loader import import_object
from ..message import Message
from . import worker
from .runtime import Invoke

log = logging.getLogger("shunter.deliver.process")

_MAX_DUMP = 65_536
_RESPAWN_MAX = 5.0
_STOP_GRACE = 5.0
_ABORT_GRACE = 2.0  # seconds a worker sent SIGABRT by ``abort`` has before SIGKILL


class WorkerTraceback(Exception):
    """The traceback as the worker saw it, chained as the cause of what the parent raises."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0]).rstrip()


class HandlerRaised(ShunterError):
    """A worker's exception that could not be rebuilt in the parent (not picklable)."""


class _Call:
    __slots__ = ("fut", "msg", "payload", "worker")

    def __init__(self, msg: Message, payload: bytes, fut: asyncio.Future[Any]) -> None:
        self.msg = msg
        self.payload = payload
        self.fut = fut
        self.worker: _Worker | None = None


class _Worker:
    __slots__ = ("call", "conn", "crash_path", "dead", "dumped", "exit_fd", "killed", "process",
                 "ready")

    def __init__(self, process: subprocess.Popen[bytes], conn: Connection,
                 crash_path: str) -> None:
        self.process = process
        self.conn = conn
        self.crash_path = crash_path
        self.exit_fd = _pidfd(process.pid)  # readable once the process has ended
        self.ready = False
        self.dead = False
        self.killed = False  # by the pool: a timeout, or shutdown
        self.call: _Call | None = None
        self.dumped: asyncio.Future[str] | None = None  # its crash file, once it has ended

    def kill(self) -> None:
        self.killed = True
        with contextlib.suppress(OSError):
            self.process.kill()


class WorkerPool:
    """``size`` worker processes running one caller's handler, one delivery each at a time."""

    def __init__(self, caller: str, handler_ref: str | bytes, size: int,
                 memory_limit_mb: int | None = None) -> None:
        self.caller = caller
        self.deaths = 0  # workers that died running a delivery
        self._ref = handler_ref
        self._size = size
        self._memory_limit_mb = memory_limit_mb
        self._loop = asyncio.get_running_loop()
        self._workers: set[_Worker] = set()
        self._idle: deque[_Worker] = deque()
        self._queue: deque[_Call] = deque()
        self._closing = False
        self._gone = asyncio.Event()
        self._respawn_delay = 0.0
        self._dir = tempfile.mkdtemp(prefix=f"shunter-{caller}-")

    def start(self) -> WorkerPool:
        atexit.register(self._kill_all)
        for _ in range(self._size):
            self._spawn()
        return self

    # -- running deliveries ---------------------------------------------------------------

    def run(self, msg: Message) -> asyncio.Future[Any]:
        """Send ``msg`` to a worker; the future's result is the worker's reply."""
        record = msg._record
        job: worker.Job = (record.topic, record.partition, record.offset, record.key,
                           record.headers, record.timestamp, record.raw, record.value,
                           msg.caller, msg.category, msg.attempt)
        try:
            payload = pickle.dumps(job, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # fails this delivery, here rather than in a worker
            raise TypeError(f"the message cannot be sent to a worker process: {exc}") from exc
        call = _Call(msg, payload, self._loop.create_future())
        call.fut.add_done_callback(lambda fut: self._cancelled(call) if fut.cancelled() else None)
        self._queue.append(call)
        self._dispatch()
        return call.fut

    def _dispatch(self) -> None:
        while self._queue and self._idle:
            call = self._queue.popleft()
            if call.fut.done():  # cancelled while it waited
                continue
            w = self._idle.popleft()
            try:
                w.conn.send_bytes(call.payload)
            except OSError:  # it has just died; its exit says how
                self._queue.appendleft(call)
                continue
            w.call = call
            call.worker = w

    def _cancelled(self, call: _Call) -> None:
        w = call.worker
        if w is None or w.call is not call:  # still queued: _dispatch drops it
            return
        w.call = None
        log.warning("caller %s: %s ran past its timeout; killing its worker (pid %s)",
                    self.caller, _coords(call.msg), w.process.pid,
                    extra=_extra(self.caller, call.msg))
        w.kill()

    async def abort(self, fut: asyncio.Future[Any]) -> str:
        """End the worker running ``fut``'s delivery with SIGABRT rather than SIGKILL, so that
        faulthandler writes where it is stuck; that dump ("" if it left none). ``fut`` is
        cancelled, as a timeout would."""
        w = next((w for w in self._workers if w.call is not None and w.call.fut is fut), None)
        fut.cancel()
        if w is None:  # still queued, or answered meanwhile
            return ""
        w.call = None
        w.killed = True
        w.dumped = self._loop.create_future()
        with contextlib.suppress(OSError):
            w.process.send_signal(signal.SIGABRT)
        # Unless the handler took SIGABRT from faulthandler, which a stuck worker never runs.
        self._loop.call_later(_ABORT_GRACE, w.kill)
        return await w.dumped

    def _readable(self, w: _Worker) -> None:
        try:
            reply = w.conn.recv()
        except (EOFError, OSError):  # the worker is gone
            self._loop.remove_reader(w.conn.fileno())
            if w.exit_fd is None:
                self._exited(w)
            return
        self._reply(w, reply)

    def _reply(self, w: _Worker, reply: Any) -> None:
        if not w.ready:  # ("ready", pid)
            w.ready = True
            self._respawn_delay = 0.0
        else:
            outcome, retiring = reply
            call, w.call = w.call, None
            if call is not None and not call.fut.done():
                call.fut.set_result(outcome)
            if retiring:  # it exits now; its exit brings the replacement
                w.dead = True
        if not w.dead and not self._closing:
            self._idle.append(w)
            self._dispatch()

    # -- workers coming and going ---------------------------------------------------------

    def _spawn(self) -> None:
        if self._closing:
            return
        fd, crash_path = tempfile.mkstemp(dir=self._dir, suffix=".crash")
        os.close(fd)
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", worker.BOOTSTRAP, str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            )
        except OSError:
            log.exception("caller %s: could not start a worker process", self.caller)
            ours.close()
            self._respawn_later()
            return
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        init: worker.Init = {"sys_path": sys.path, "handler": self._ref,
                             "memory_limit_mb": self._memory_limit_mb, "crash_path": crash_path}
        w = _Worker(process, conn, crash_path)
        self._workers.add(w)
        self._gone.clear()  # set when the one before it was forgotten: close() waits for this one
        with contextlib.suppress(OSError):  # a worker dead already: its exit says why
            conn.send(init)
        self._loop.add_reader(conn.fileno(), self._readable, w)
        if w.exit_fd is not None:
            self._loop.add_reader(w.exit_fd, self._exited, w)

    def _exited(self, w: _Worker) -> None:
        if w.exit_fd is not None:
            self._loop.remove_reader(w.exit_fd)
        with contextlib.suppress(EOFError, OSError):
            while w.conn.poll():  # a reply written just before the end comes first
                self._reply(w, w.conn.recv())
        w.dead = True
        self._loop.remove_reader(w.conn.fileno())
        try:
            code: int | None = w.process.wait(1.0)
        except subprocess.TimeoutExpired:  # EOF without an exit: a child holds the socket
            w.kill()
            code = w.process.wait()
        dump = _read_and_remove(w.crash_path)
        if w.dumped is not None and not w.dumped.done():
            w.dumped.set_result(dump)
        self._forget(w)
        call, w.call = w.call, None
        if call is not None and not call.fut.done():
            self.deaths += 1
            exc = _death(code, w.process.pid)
            exc.__cause__ = WorkerTraceback(dump or _NO_DUMP)
            log.warning("caller %s: %s while running %s; replacing it", self.caller, exc,
                        _coords(call.msg), extra=_extra(self.caller, call.msg))
            call.fut.set_exception(exc)
        elif not w.ready and not self._closing:
            log.error("caller %s: a worker process ended before it was ready (%s)%s",
                      self.caller, _death(code, w.process.pid),
                      f":\n{dump}" if dump else "")
            self._respawn_later()
            return
        elif not self._closing and not w.killed:
            log.info("caller %s: %s between deliveries; replacing it",
                     self.caller, _death(code, w.process.pid))
        if not self._closing:
            self._spawn()

    def _forget(self, w: _Worker) -> None:
        self._workers.discard(w)
        with contextlib.suppress(ValueError):
            self._idle.remove(w)
        w.conn.close()
        if w.exit_fd is not None:
            os.close(w.exit_fd)
        if not self._workers:
            self._gone.set()

    def _respawn_later(self) -> None:
        # Workers that cannot even start must not be restarted in a tight loop.
        self._respawn_delay = min(max(self._respawn_delay * 2, 0.1), _RESPAWN_MAX)
        self._loop.call_later(self._respawn_delay, self._spawn)

    # -- shutdown -------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop every worker: idle ones are asked to, busy or stuck ones are killed."""
        self._closing = True
        for call in self._queue:
            call.fut.cancel()
        self._queue.clear()
        for w in list(self._workers):
            if w.ready and w.call is None and not w.dead:
                with contextlib.suppress(OSError):
                    w.conn.send_bytes(worker.STOP)
            else:
                w.kill()
        if self._workers:
            try:
                await asyncio.wait_for(self._gone.wait(), _STOP_GRACE)
            except TimeoutError:
                self._kill_all()
                await asyncio.wait_for(self._gone.wait(), _STOP_GRACE)
        atexit.unregister(self._kill_all)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _kill_all(self) -> None:
        for w in list(self._workers):
            w.kill()


def process_invoke(handler: Callable[[Message], Any], sub: SubscriberConfig,
                   where: str) -> tuple[Invoke, Callable[[], Awaitable[None]]]:
    """An ``Invoke`` running ``handler`` in ``sub.workers`` processes, and the pool's closer."""
    pool = WorkerPool(sub.caller, _reference(handler, sub, where), sub.workers,
                      sub.memory_limit_mb).start()

    async def invoke(msg: Message) -> None:
        outcome = await pool.run(msg)
        if outcome is not None:
            raise _rebuild(outcome)

    return invoke, pool.close


# -- helpers --------------------------------------------------------------------------------

_NO_DUMP = ("(no Python traceback: the worker ended without a fatal-signal dump — "
            "os._exit, SIGKILL (the kernel's OOM killer?) or a C extension calling exit)")


def _pidfd(pid: int) -> int | None:
    pidfd_open = getattr(os, "pidfd_open", None)  # Linux 5.3+; elsewhere EOF tells the end
    if pidfd_open is None:
        return None
    try:
        fd: int = pidfd_open(pid)
    except OSError:
        return None
    return fd


def _reference(handler: Callable[[Message], Any], sub: SubscriberConfig, where: str) -> str | bytes:
    """How a worker finds the handler: its import path, else the pickled callable."""
    if getattr(handler, "__module__", None) == "__main__":
        raise ConfigError([
            f"{where}.isolation: 'process' needs a handler that worker processes can import; "
            f"{sub.caller}'s handler is defined in the __main__ script: move it to a module"
        ])
    if sub.handler is not None:
        with contextlib.suppress(ConfigError):
            if import_object(sub.handler, f"{where}.handler") is handler:
                return sub.handler
    try:
        return pickle.dumps(handler)
    except Exception as exc:
        raise ConfigError([
            f"{where}.isolation: 'process' needs a handler that worker processes can import "
            f"(an import path in {where}.handler, or a module-level function); "
            f"{sub.caller}'s handler cannot be pickled: {exc}"
        ]) from None


def sandbox_reference(
    handler: Callable[[Message], Any], sub: SubscriberConfig
) -> str | bytes | None:
    """How a sandbox process finds an in-process caller's handler, or None if it cannot."""
    try:
        return _reference(handler, sub, "")
    except ConfigError:
        return None


def _rebuild(outcome: worker.Raised) -> BaseException:
    """The handler's exception, raised again in the parent with the worker's traceback."""
    _, blob, type_name, text, traceback_text = outcome
    exc: Any = None
    if blob is not None:
        try:
            cls, args, attributes = pickle.loads(blob)
            exc = cls.__new__(cls, *args)  # __init__ already ran, in the worker
            exc.args = args
            exc.__dict__.update(attributes)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = HandlerRaised(f"{type_name}: {text}")
    exc.__cause__ = WorkerTraceback(traceback_text)
    return exc  # type: ignore[no-any-return]


def _death(code: int | None, pid: int | None) -> WorkerDied:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return WorkerDied(f"worker killed by {name} (pid {pid})", signal=name, status=code)
    if code is None:
        return WorkerDied(f"worker vanished (pid {pid})")
    return WorkerDied(f"worker exited with status {code} (pid {pid})", status=code)


def _read_and_remove(path: str) -> str:
    try:
        with open(path, errors="replace") as file:
            text = file.read(_MAX_DUMP)
        os.unlink(path)
    except OSError:
        return ""
    return text.strip()


def _coords(msg: Message) -> str:
    return f"{msg.topic}[{msg.partition}]@{msg.offset} (attempt {msg.attempt})"


def _extra(caller: str, msg: Message) -> dict[str, Any]:
    return {"caller": caller, "topic": msg.topic, "partition": msg.partition,
            "offset": msg.offset, "attempt": msg.attempt}
