"""The blocked-loop watchdog.

Everything inline shares one event loop: a sync handler that sleeps, spins or waits on a
lock stops every subscriber, and a timeout cannot interrupt it. A daemon thread pings the
loop (``call_soon_threadsafe``) every ``interval``; when a ping has gone unanswered for
``threshold`` seconds it logs every thread's stack and the delivery running on the loop,
once per stall, and says how long the stall lasted when the loop answers again.

A loop still blocked after ``end_after`` seconds ends the process. Nothing else would:
shunter's consumer polls on a thread of its own, so Kafka's ``max.poll.interval.ms``,
which takes the partitions of a consumer that stops polling, never fires, and the worker
would keep its partitions, uncommitted, for as long as the handler holds the loop. The
watchdog notes why in the crash file (``BLOCKED_MARK``), then sends SIGABRT to the loop's
thread, so that faulthandler's dump names that thread as the dying one, its stack down to
the blocking line. The supervisor restarts the worker, and the crash guard re-runs what
was in flight: the delivery that blocked runs in a sandbox, where hanging again counts as
a death (``crash_guard.quarantine_after``; see ``sandbox.py``).

A handler that blocks while holding the GIL (a regular expression backtracking on a
hostile payload, a C extension that never releases it) stops this thread as well. For
that, the loop also keeps re-arming faulthandler's timer (``dump_traceback_later``, a C
thread that needs no GIL) to ``end_after`` plus a grace: if the loop stops re-arming it,
the timer writes every thread's stack into the crash file and exits the process
(status 1). The crash file names the loop's thread beforehand (``crashfile.LOOP_THREAD``),
so that the supervisor can tell its stack from the others'. A process stopped (SIGSTOP)
for longer than that is ended as it resumes. Such a call is not left unreported until
then: this thread's heartbeat (``crashfile.beat``) stops with it, and the supervisor,
seeing it silent for ``threshold``, has faulthandler write every thread's stack and logs
it, the loop's first (supervisor.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from . import crashfile
from .crashfile import describe, running_deliveries

log = logging.getLogger("shunter.watchdog")

_STACK_LIMIT = 40  # innermost frames per thread
# What the crash file says before the dump of a process the watchdog ended; the supervisor
# passes it on to the next worker in its last exit (``supervisor.noted``).
BLOCKED_MARK = "the event loop was blocked"
_SIGNAL_GRACE = 5.0  # seconds SIGABRT is given to end the process before SIGKILL
# faulthandler's timer fires this long after ``end_after``: only when this thread could
# not end the process itself. The loop re-arms it at most once per ``_REARM_EVERY``.
_BACKSTOP_GRACE = 10.0
_REARM_EVERY = 1.0
_BEAT_EVERY = 1.0  # seconds between this thread's heartbeats (see ``run``)


# "running caller C on T[P]@O": neither a caller's name nor a Kafka topic's has spaces,
# brackets or "@" (config.py; Kafka's legal characters).
_RUNNING = re.compile(r"running caller ([A-Za-z0-9_.\-]+) on ([A-Za-z0-9_.\-]+)\[(\d+)\]@(\d+)")


def blocked_on(last_exit: str) -> tuple[str, str, int, int] | None:
    """The delivery the watchdog found blocking the loop, from a last exit that carries its
    note: (caller, topic, partition, offset) as the ``Message`` gave them; None if the
    note names none (faulthandler's timer cannot tell)."""
    found = _RUNNING.search(last_exit) if BLOCKED_MARK in last_exit else None
    if found is None:
        return None
    caller, topic, partition, offset = found.groups()
    return caller, topic, int(partition), int(offset)


# A frame of a faulthandler dump, and where the frames that run a delivery begin: shunter's
# own (the dispatcher's runtime, a sandbox worker's loop) and asyncio's.
_FRAME = re.compile(r'^  File "(.*)", line \d+ in ')
_RUNNERS = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,  # shunter/
    os.path.dirname(os.path.abspath(asyncio.__file__)) + os.sep,
)


def blocked_frames(stack: str) -> tuple[str, ...]:
    """Where the delivery that blocked the loop was stuck, from the stack its death left
    (``supervisor.dying_stack``): the handler's frames (``hang_frames``) of the loop's
    thread, which is the dying "Current thread" after the watchdog's SIGABRT and comes
    first after faulthandler's timer. Empty if that stack shows no handler running."""
    sections = _threads(stack)
    current = [s for s in sections if s.startswith("Current thread")]
    return hang_frames((current or sections or [""])[0])


def hangs_where(dump: str, frames: tuple[str, ...]) -> bool:
    """Whether a thread of ``dump`` (faulthandler's, from a sandbox worker ended while it
    hung: ``WorkerPool.abort``) is stuck where ``frames`` (``blocked_frames``) say."""
    return any(hang_frames(section) == frames for section in _threads(dump))


def hang_frames(section: str) -> tuple[str, ...]:
    """The frame lines of one thread's section of a faulthandler dump, innermost first,
    down to (without) the first that runs deliveries (``_RUNNERS``): the handler's part,
    the same whether the dispatcher's loop or a sandbox's worker ran it. Empty when no
    runner is below them (a thread of the handler's own, or a stack cut at 100 frames)."""
    frames: list[str] = []
    for line in section.splitlines()[1:]:
        found = _FRAME.match(line)
        if found is None:
            continue
        if os.path.abspath(found.group(1)).startswith(_RUNNERS):
            return tuple(frames)
        frames.append(line.strip())
    return ()


def _threads(dump: str) -> list[str]:
    return [
        s.strip("\n")
        for s in dump.split("\n\n")
        if s.strip("\n").startswith(("Thread 0x", "Current thread 0x"))
    ]


def start_watchdog(
    loop: asyncio.AbstractEventLoop,
    threshold: float = 5.0,
    *,
    interval: float = 0.1,
    end_after: float = 0.0,
) -> Callable[[], None]:
    """Watch ``loop`` from a daemon thread; return the function that stops watching.

    ``threshold``: report a loop blocked this long (0: never); ``end_after``: end the
    process when it is blocked this long (0: never)."""
    dog = _Watchdog(loop, threshold, interval, end_after)
    dog.start()
    return dog.stop


class _Watchdog(threading.Thread):
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        threshold: float,
        interval: float,
        end_after: float = 0.0,
    ) -> None:
        super().__init__(name="shunter-watchdog", daemon=True)
        self._loop = loop
        self._threshold = threshold if threshold > 0 else math.inf
        self._end_after = end_after if end_after > 0 else math.inf
        self._interval = min(interval, min(self._threshold, self._end_after) / 2)
        self._stopped = threading.Event()
        self._backstop = 0.0 if math.isinf(self._end_after) else self._end_after + _BACKSTOP_GRACE
        self._armed_at = -math.inf  # when the loop last re-armed the backstop
        self._answered = True
        self._sent = 0.0
        self._answered_at = 0.0
        self._reported = False
        self._loop_thread = _thread_of(loop)

    def stop(self) -> None:
        self._stopped.set()
        if self._armed_at > -math.inf:
            faulthandler.cancel_dump_traceback_later()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(1.0)
        crashfile.beat(stopped=True)  # no heartbeat from here on: none is missing

    def run(self) -> None:
        # Its heartbeat, for the supervisor to see when a call holding the GIL stops this
        # thread too (``crashfile.beat``): often enough to be seen within ``threshold``.
        beat_every = min(_BEAT_EVERY, self._threshold / 2)
        beaten = -math.inf
        while not self._stopped.wait(self._interval):
            now = time.monotonic()
            if now - beaten >= beat_every:
                crashfile.beat()
                beaten = now
            if self._answered:
                if self._reported:
                    log.warning(
                        "event loop answered again after %.1fs", self._answered_at - self._sent
                    )
                    self._reported = False
                self._answered = False
                self._sent = now
                try:
                    self._loop.call_soon_threadsafe(self._pong)
                except RuntimeError:  # the loop is closed: nothing left to watch
                    return
            elif now - self._sent >= self._end_after:
                self._end(now - self._sent)
                return
            elif not self._reported and now - self._sent >= self._threshold:
                self._reported = True
                self._report(now - self._sent)

    def _pong(self) -> None:
        self._loop_thread = threading.get_ident()
        self._answered_at = now = time.monotonic()
        self._answered = True
        if self._backstop and now - self._armed_at >= _REARM_EVERY and not self._stopped.is_set():
            self._arm(now)

    def _arm(self, now: float) -> None:
        """(Re-)arm faulthandler's timer, on the loop (see the module's docstring)."""
        file = crashfile.current()
        if file is None:  # no crash file: nowhere for the dump, and no one to read it
            return
        if self._armed_at == -math.inf:
            crashfile.note_loop_thread()
        faulthandler.dump_traceback_later(self._backstop, exit=True, file=file)
        self._armed_at = now

    def _report(self, blocked: float) -> None:
        running = running_deliveries()
        msg = running.get(self._loop_thread) if self._loop_thread is not None else None
        where = describe(msg) if msg is not None else "no delivery found on its stack"
        extra: dict[str, Any] = {}
        if msg is not None:
            extra = {
                "caller": msg.caller,
                "topic": msg.topic,
                "partition": msg.partition,
                "offset": msg.offset,
                "attempt": msg.attempt,
            }
        log.error(
            "event loop blocked for %.1fs (threshold %gs); running on it: %s\n%s",
            blocked,
            self._threshold,
            where,
            self._stacks(running),
            extra=extra,
        )

    def _end(self, blocked: float) -> None:
        """End the process with SIGABRT on the loop's thread (see the module's docstring)."""
        running = running_deliveries()
        msg = running.get(self._loop_thread) if self._loop_thread is not None else None
        where = describe(msg) if msg is not None else "no delivery found on its stack"
        why = f"{BLOCKED_MARK} for {blocked:.0f}s, running {where}"
        crashfile.note(why)  # first: logging may be what blocks (a full pipe, a held lock)
        log.critical(
            "event loop blocked for %.1fs (crash_guard.loop_blocked_restart_after %gs): "
            "ending this process so that it is restarted and its deliveries re-run under "
            "the crash guard; running on it: %s",
            blocked,
            self._end_after,
            where,
        )
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        if self._loop_thread is not None:
            signal.pthread_kill(self._loop_thread, signal.SIGABRT)
        else:
            os.abort()
        # SIGABRT ends the process unless someone handles it in Python, which the blocked
        # loop's thread never gets to run.
        time.sleep(_SIGNAL_GRACE)
        os.kill(os.getpid(), signal.SIGKILL)

    def _stacks(self, running: dict[int, Any]) -> str:
        names = {t.ident: t.name for t in threading.enumerate()}
        parts = []
        frames = sys._current_frames()
        order = sorted(frames, key=lambda ident: ident != self._loop_thread)  # the loop first
        for ident in order:
            frame = frames[ident]
            if ident == threading.get_ident():
                continue  # the watchdog itself
            title = f"Thread {names.get(ident, '?')} ({ident})"
            if ident == self._loop_thread:
                title += " — the event loop"
            if ident in running:
                title += f" — {describe(running[ident])}"
            stack = traceback.format_stack(frame, _STACK_LIMIT)
            parts.append(title + ":\n" + "".join(stack))
        return "\n".join(parts)


def _thread_of(loop: asyncio.AbstractEventLoop) -> int | None:
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return threading.get_ident() if running is loop else None
