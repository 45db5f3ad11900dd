"""The worker process behind ``isolation: process``.

A worker imports the handler itself (by import path, or by unpickling a module-level
function), says it is ready, then runs one delivery at a time as the parent sends them.
Whatever the handler does — raise, segfault, ``os._exit``, run out of memory — stays in
this process: the parent sees an outcome or a dead worker, never a dead dispatcher.

The parent starts a fresh interpreter running ``BOOTSTRAP`` (never ``fork``, which would
copy librdkafka's threads' locks mid-use; never multiprocessing's spawn, which imports
the parent's ``__main__`` script again). Wire format, one pickled value per message:
  parent → worker: ``Init`` first, then per delivery a ``Job`` (the message's fields),
  or ``b""`` to stop.
  worker → parent: ``("ready", pid)``, then per job ``(outcome, retiring)``: the outcome
  is ``None`` (the handler returned) or ``Raised``; ``retiring`` says the worker exits
  next (it ran out of memory, or was asked to stop while busy).
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import inspect
import os
import pickle
import resource
import signal
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypedDict

from ..commit.tracker import PartitionTracker
from ..loader import import_object
from ..message import Headers, Message, Record
from .failure import error_type, format_traceback

# Runs in the new interpreter before shunter is importable through the parent's sys.path.
BOOTSTRAP = """\
import sys
from multiprocessing.connection import Connection
conn = Connection(int(sys.argv[1]))
init = conn.recv()
sys.path[:] = init["sys_path"]
from shunter.deliver.worker import main
main(conn, init)
"""


class Init(TypedDict):
    sys_path: list[str]
    handler: str | bytes  # an import path, or the pickled callable
    memory_limit_mb: int | None
    crash_path: str  # where faulthandler writes if the worker dies of a fatal signal


# topic, partition, offset, key, headers, timestamp, raw, value, caller, category, attempt
Job = tuple[str, int, int, bytes | None, Headers | None, int, bytes | None, Any,
            str, str, int]
Raised = tuple[str, bytes | None, str, str, str]

STOP = b""
_PR_SET_PDEATHSIG = 1


class _State:
    busy = False
    stopping = False


def main(conn: Connection, init: Init) -> None:
    """The worker's whole life: set up, import the handler, serve jobs until told to stop."""
    _detach_from_terminal_signals()
    crash_file = open(init["crash_path"], "w")  # noqa: SIM115 - faulthandler's, until we die
    faulthandler.enable(crash_file, all_threads=True)
    handler = _load(init["handler"])
    if init["memory_limit_mb"] is not None:
        _limit_memory(init["memory_limit_mb"])
    conn.send(("ready", os.getpid()))
    runner = _Runner(handler, init["memory_limit_mb"])
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:  # the parent is gone
            return
        if data == STOP:
            return
        _State.busy = True
        outcome, retiring = runner.run(pickle.loads(data))
        retiring = retiring or _State.stopping
        conn.send((outcome, retiring))
        _State.busy = False
        if retiring or _State.stopping:
            return


class _Runner:
    def __init__(self, handler: Callable[[Message], Any], memory_limit_mb: int | None) -> None:
        self._handler = handler
        self._memory_limit_mb = memory_limit_mb
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tracker = PartitionTracker(("", 0))

    def run(self, job: Job) -> tuple[Raised | None, bool]:
        """Run one delivery; the reply, and whether this worker must retire after it."""
        try:
            result = self._handler(self._message(job))
            if inspect.isawaitable(result):
                if self._loop is None:
                    self._loop = asyncio.new_event_loop()
                self._loop.run_until_complete(result)
        except MemoryError as exc:
            # Over the memory limit: the heap may be fragmented or half-built. Report
            # the failure where it happened, then make way for a fresh worker.
            limit = self._memory_limit_mb
            exc.args = (f"worker out of memory (memory_limit_mb: {limit})", *exc.args)
            return _raised(exc), True
        except BaseException as exc:  # every exception is an outcome
            return _raised(exc), False
        return None, False

    def _message(self, job: Job) -> Message:
        topic, partition, offset, key, headers, timestamp, raw, value, caller, category, \
            attempt = job
        record = Record(topic, partition, offset, key, raw, timestamp, headers,
                        self._tracker, offset)
        record.value = value
        return Message(record, caller, category, attempt)


def _raised(exc: BaseException) -> Raised:
    # Class, args and attributes, not the exception itself: unpickling an exception calls
    # its __init__ with its args, which goes wrong whenever the two differ (RetryLater).
    try:
        blob: bytes | None = pickle.dumps((type(exc), exc.args, getattr(exc, "__dict__", {})))
    except Exception:  # something unpicklable in it: the parent gets the text only
        blob = None
    try:
        text = str(exc)
    except Exception:
        text = repr(exc)
    return ("raised", blob, error_type(exc), text, format_traceback(exc))


def _load(handler_ref: str | bytes) -> Callable[[Message], Any]:
    if isinstance(handler_ref, bytes):
        handler: Callable[[Message], Any] = pickle.loads(handler_ref)
        return handler
    return import_object(handler_ref, "handler")  # type: ignore[no-any-return]


def _detach_from_terminal_signals() -> None:
    # Ctrl-C reaches the whole process group: the parent drains, then stops its workers
    # itself. SIGTERM (a service manager stopping the group) lets the delivery in hand
    # finish first. Should the parent die without stopping them, Linux kills the worker
    # (the parent-death signal), and EOF on the pipe ends it anyway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _terminate)
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _terminate(signum: int, frame: object) -> None:
    if not _State.busy:
        raise SystemExit(0)
    _State.stopping = True


def _limit_memory(megabytes: int) -> None:
    """Cap the address space at what the worker maps now plus ``megabytes``.

    The baseline (interpreter, imported libraries, reserved arenas) is mostly virtual
    and varies by platform and by handler; counting from it makes the limit mean "how
    much a delivery may allocate", which is what a user can reason about.
    """
    limit = _address_space() + megabytes * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _address_space() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0
