"""One subscriber's deliveries: ordering lanes, a concurrency limit and a timeout.

Ordering: a delivery waits in its *lane* (its key, its partition, or none) while an
earlier delivery of the same lane is unsettled, so per-key order holds under any
concurrency. Lanes are consulted only while some delivery is suspended: deliveries are
started in the order they were submitted, one at a time, so one that completes in its
first step (the common case) leaves nothing behind it to order. A lane is opened when a
delivery suspends; what is taken from the queue while its lane is open waits in the lane,
and the lane hands its deliveries on one at a time, in order, as each is settled.

Concurrency counts deliveries that are suspended (awaiting I/O or running
in a thread or worker process); a delivery that completes in its first step never holds a
slot. A thread cannot be stopped: one of a caller with ``isolation: thread`` still running
past its timeout keeps its slot (``lost_slots``) until it returns, so no later delivery
waits for a thread while its own timeout runs. Anything else a handler returns to wait
on (a Task, a future) is cancelled at the timeout.
Isolation: every exception a handler raises becomes an outcome value here; nothing
a handler does reaches the dispatcher's own control flow.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterator
from types import CoroutineType
from typing import Any

from ..message import Message
from ..observe.stats import BUCKETS
from ..outcome import SUCCEEDED, Outcome
from .eager import Resumed
from .failure import failure, timed_out

# Invoke runs the handler: it returns None (done), a coroutine, or another awaitable.
Invoke = Callable[[Message], Any]
Settle = Callable[[Message, Outcome, float], None]
# Settles a runner's successful deliveries in one call: the hot path of a handler that
# completes in its first step. Called before the runner yields, with their handler seconds
# together and, one by one, those of the deliveries slower than the latency histogram's
# first bucket (``_FIRST_BUCKET``): the rest were all faster.
SettleMany = Callable[[list[Message], float, list[float]], None]

log = logging.getLogger("shunter.deliver")

_FIRST_BUCKET = BUCKETS[0]  # seconds: the latency histogram's first bucket

_BUSY = None  # a lane with a delivery in flight and nothing queued behind it
_NOT_STEPPED = object()  # a coroutine a runtime without eager steps did not start
_FINISHED = object()  # a coroutine that returned in its first step


def _key_lane(msg: Message) -> Hashable:
    return msg._record.key


def _partition_lane(msg: Message) -> Hashable:
    return (msg._record.ptrack.tp, None)


def _no_lane(msg: Message) -> Hashable:
    return None


_LANES: dict[str, Callable[[Message], Hashable]] = {
    "key": _key_lane,
    "partition": _partition_lane,
    "none": _no_lane,
}


# Seconds a handler cancelled at its timeout is given to finish before its delivery is
# settled without it (``SubscriberRuntime._abandon``).
CANCEL_GRACE = 5.0


class _Expiry:
    __slots__ = ("abandon", "fired")

    def __init__(self) -> None:
        self.fired = False
        self.abandon: asyncio.TimerHandle | None = None


def _where(pending: Any) -> str:
    """Where a suspended handler waits: its coroutine chain, outermost first."""
    coro = getattr(pending, "_coro", pending)  # a Resumed wraps the handler's coroutine
    frames = []
    for _ in range(20):
        frame = getattr(coro, "cr_frame", None)
        if frame is None:
            break
        frames.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None)
    return " -> ".join(frames)


def _coordinates(msg: Message) -> dict[str, Any]:
    return {
        "caller": msg.caller,
        "topic": msg.topic,
        "partition": msg.partition,
        "offset": msg.offset,
        "attempt": msg.attempt,
    }


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class SubscriberRuntime:
    def __init__(
        self,
        caller: str,
        invoke: Invoke,
        settle: Settle,
        *,
        ordering: str = "key",
        concurrency: int = 64,
        timeout: float = 30.0,
        settle_many: SettleMany | None = None,
        eager: bool = True,
        threaded: bool = False,
    ) -> None:
        self.caller = caller
        self._invoke = invoke
        self._settle = settle
        self._settle_many = settle_many or self._settle_each
        self._ordering = ordering
        self.concurrency = concurrency
        self.timeout = timeout
        self.active = 0  # suspended deliveries
        self.paused = False
        self.lost_slots = 0  # threads still running past their timeout: slots not free
        self._runners = 0
        # Submitted, in order, not yet looked at: each is checked against the open lanes
        # when it is taken, so nothing newer of an open lane can overtake what waits there.
        self._runnable: deque[Message] = deque()
        # Queue one delivery; call ``kick`` once after a batch of submits. (The deque's own
        # append: no Python frame per delivery.)
        self.submit: Callable[[Message], None] = self._runnable.append
        # Handed on by their lane (each owns its open lane): started before _runnable's.
        self._released: deque[Message] = deque()
        # Open lanes: a delivery of the lane is suspended or handed on and not settled;
        # the deque holds what waits behind it (None: nothing yet).
        self._lanes: dict[Hashable, deque[Message] | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: dict[Message, None] = {}  # suspended deliveries
        # Running deliveries taken away by an operator (skip): their handler runs on,
        # but its outcome is not theirs to settle and their lane has moved on already.
        self._detached: set[Message] = set()
        # Chosen once: the lane function runs twice per delivery (inlined for keys).
        self._lane: Callable[[Message], Hashable] = _LANES[ordering]
        self._by_key = ordering == "key"
        # Step a coroutine's first step at once (``eager.py``): for handlers that mostly
        # complete in it. A caller whose deliveries always wait (HTTP, a worker process)
        # is awaited directly instead: no first step to save, and its every resumption
        # would pass through ``Resumed``'s Python-level forwarding.
        self._eager = eager
        # The invoke runs handlers on threads: a bare future it returns is a thread's,
        # which a timeout cannot stop (``_finish``). Any other awaitable a handler returns
        # (a Task of its own, a future) is cancelled at the timeout like a coroutine.
        self._threaded = threaded

    # -- intake ---------------------------------------------------------------------------

    def lane_of(self, msg: Message) -> Hashable:
        return self._lane(msg)

    def _wait_in_lane(self, msg: Message, lane: Hashable) -> None:
        queued = self._lanes[lane]
        if queued is None:
            self._lanes[lane] = deque((msg,))
        else:
            queued.append(msg)

    def kick(self) -> None:
        """Make sure a runner is draining the runnable queue, if it may."""
        if (self._runnable or self._released) and not self._runners and self._room():
            self._runners += 1
            task = asyncio.get_running_loop().create_task(self._run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @property
    def queued(self) -> int:
        waiting = len(self._runnable) + len(self._released)
        return waiting + sum(len(q) for q in self._lanes.values() if q)

    # -- running --------------------------------------------------------------------------

    async def _run(self) -> None:
        """Drain runnable deliveries; stay with the first one that suspends."""
        runnable = self._runnable
        released = self._released
        lanes = self._lanes
        invoke = self._invoke
        lane_of = self._lane
        by_key = self._by_key
        clock = time.perf_counter
        first = _FIRST_BUCKET
        succeeded: list[Message] = []  # settled together, before any await
        # Their handler seconds, without a clock read of its own per delivery: each
        # delivery's time runs from the previous one's end (``last``) to its own, so a
        # batch of successes took ``last - batch_start``, and only the few slower than
        # the histogram's first bucket are kept one by one (``slow``).
        slow: list[float] = []
        last = batch_start = clock()
        runner = True
        # Whether a delivery may start: changed only by a settle (the flood guard pauses)
        # or an await, so it is looked at again only after one.
        room = self._room()
        eager = self._eager
        try:
            while (runnable or released) and room:
                if released:  # owns its open lane
                    msg = released.popleft()
                    owner = True
                else:
                    msg = runnable.popleft()
                    owner = False
                    if lanes:  # some lane is open: this one may have to wait in it
                        lane = msg._record.key if by_key else lane_of(msg)
                        if lane in lanes:
                            self._wait_in_lane(msg, lane)
                            continue
                if msg._record.ptrack.revoked:  # the partition left: its new owner redelivers
                    if owner:
                        self._next_in_lane(msg)
                    continue
                try:
                    result = invoke(msg)
                    if type(result) is CoroutineType:
                        if not eager:  # awaited whole by _finish below
                            step = _NOT_STEPPED
                        else:
                            # Its first step. A coroutine iterator's ``next`` with a
                            # default says "finished" without raising StopIteration, whose
                            # traceback a compiled caller would build each time.
                            step = next(result.__await__(), _FINISHED)
                            if step is _FINISHED:
                                result = None
                    if result is None:  # done in its first step: the common case, inlined
                        if owner:  # _next_in_lane, inlined (no lane was opened otherwise)
                            lane = msg._record.key if by_key else lane_of(msg)
                            queued = lanes.get(lane)
                            if queued:
                                released.append(queued.popleft())
                            else:
                                lanes.pop(lane, None)
                        succeeded.append(msg)
                        now = clock()
                        if now - last > first:
                            slow.append(now - last)
                        last = now
                        if len(succeeded) >= 256:
                            self._settle_succeeded(succeeded, last - batch_start, slow)
                            batch_start = last
                            room = self._room()
                        continue
                    if type(result) is CoroutineType and step is not _NOT_STEPPED:
                        result = Resumed(result, step)
                    elif not hasattr(result, "__await__"):
                        self._settle_succeeded(succeeded, last - batch_start, slow)
                        self._done(msg, SUCCEEDED, last, owner)
                        last = batch_start = clock()
                        room = self._room()
                        continue
                except asyncio.CancelledError as exc:
                    if _being_cancelled():  # shutdown: the runner itself is cancelled
                        raise
                    self._settle_succeeded(succeeded, last - batch_start, slow)
                    self._done(msg, failure(exc), last, owner)  # the handler's own doing
                    last = batch_start = clock()
                    room = self._room()
                    continue
                except BaseException as exc:  # SystemExit, KeyboardInterrupt: the handler's
                    # In order: the flood guard counts settles as they come.
                    self._settle_succeeded(succeeded, last - batch_start, slow)
                    self._done(msg, failure(exc), last, owner)
                    last = batch_start = clock()
                    room = self._room()
                    continue
                # Suspended: this task belongs to ``msg`` from here on; another runner
                # takes over the queue.
                self._settle_succeeded(succeeded, last - batch_start, slow)
                started = last
                if not owner:  # open its lane: what is taken next of it waits there
                    lane = msg._record.key if by_key else lane_of(msg)
                    if lane is not None:
                        lanes.setdefault(lane, _BUSY)
                runner = False
                self._runners -= 1
                self.active += 1
                self._running[msg] = None
                try:
                    self.kick()
                    outcome = await self._finish(msg, result)
                finally:
                    self.active -= 1
                    del self._running[msg]
                self._done(msg, outcome, started)
                # Carry on as a runner, whether or not another task drains the queue too:
                # a task per slot, not per delivery. (A delivery that suspends kicks a new
                # runner only while none is draining and a slot is free, so there are at
                # most ``concurrency`` tasks in deliveries and one runner besides, reused
                # delivery after delivery; runners take from the queue only between
                # awaits, in order.)
                self._runners += 1
                runner = True
                last = batch_start = clock()
                room = self._room()
        finally:
            self._settle_succeeded(succeeded, last - batch_start, slow)
            if runner:
                self._runners -= 1

    @property
    def stuck(self) -> int:
        """Slots held by handlers that run on after their delivery was settled without
        them (a thread past its timeout, a coroutine that ignored its cancellation, a
        delivery an operator skipped): each frees its slot only when it returns."""
        return self.lost_slots + len(self._detached)

    def may_start(self) -> bool:
        """Whether a queued delivery may start now (not paused, a slot free)."""
        return self._room()

    def _room(self) -> bool:
        return self.active + self.lost_slots < self.concurrency and not self.paused

    def _settle_succeeded(
        self, succeeded: list[Message], seconds: float, slow: list[float]
    ) -> None:
        if not succeeded:
            return
        try:
            self._settle_many(succeeded, seconds, slow)
        except Exception:  # settling must never stop the runner; the offsets stay held
            log.critical(
                "settling %d deliveries of %s failed; their offsets stay uncommitted",
                len(succeeded),
                self.caller,
                exc_info=True,
            )
        succeeded.clear()
        slow.clear()

    def _settle_each(self, succeeded: list[Message], seconds: float, slow: list[float]) -> None:
        elapsed = seconds / len(succeeded)  # each one's share: no times of their own
        for msg in succeeded:
            try:
                self._settle(msg, SUCCEEDED, elapsed)
            except Exception:  # this one's offset stays held; the others settle
                log.critical("settling %r failed; its offset stays uncommitted", msg, exc_info=True)

    async def _finish(self, msg: Message, pending: Awaitable[Any]) -> Outcome:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        expiry = _Expiry()
        # A bare future of a threaded invoke is a thread's: shielded, so that cancelling
        # the wait leaves it telling whether the thread still runs.
        thread = (
            pending
            if self._threaded
            and isinstance(pending, asyncio.Future)
            and not isinstance(pending, asyncio.Task)
            else None
        )
        timer = loop.call_later(
            self.timeout, self._expire, task, expiry, msg, pending, thread is not None
        )
        try:
            await (pending if thread is None else asyncio.shield(thread))
        except asyncio.CancelledError as exc:
            if not expiry.fired:
                if task.cancelling():  # shutdown
                    raise
                return failure(exc)  # something the handler awaited was cancelled
            task.uncancel()
            if thread is not None and not thread.done():
                self._lose_slot(msg, thread)
            return timed_out(self.timeout)
        except BaseException as exc:  # whatever the handler raised is its outcome
            return failure(exc)
        finally:
            timer.cancel()
            if expiry.abandon is not None:
                expiry.abandon.cancel()
        return SUCCEEDED

    def _expire(
        self, task: asyncio.Task[None], expiry: _Expiry, msg: Message, pending: Any, thread: bool
    ) -> None:
        expiry.fired = True
        task.cancel()
        if not thread:  # (a thread's future: _finish returns now, keeping it in lost_slots)
            expiry.abandon = asyncio.get_running_loop().call_later(
                CANCEL_GRACE, self._abandon, msg, pending
            )

    def _abandon(self, msg: Message, pending: Any) -> None:
        """The handler swallowed its timeout's cancellation and runs on (a bare
        ``except:`` around an await, say). Its delivery is settled as a timeout without
        it (to the retry tier: nothing lost) and its lane moves on: otherwise its key's
        later deliveries and its partition's commits would wait for a handler that may
        never return. The coroutine keeps its slot until it does; its outcome is then
        ignored, as a skipped delivery's is."""
        if msg not in self._running or msg in self._detached:
            return
        self._detached.add(msg)
        self._next_in_lane(msg)
        where = _where(pending)
        log.error(
            "caller %s: handler on %s[%d]@%d (attempt %d) ignored its cancellation at the "
            "%gs timeout and still runs%s; its delivery is settled as a timeout without it",
            self.caller,
            msg.topic,
            msg.partition,
            msg.offset,
            msg.attempt,
            self.timeout,
            f" (at {where})" if where else "",
            extra=_coordinates(msg),
        )
        try:
            self._settle(msg, timed_out(self.timeout), self.timeout + CANCEL_GRACE)
        except Exception:  # settling must never stop the runtime; the offset stays held
            log.critical("settling %r failed; its offset stays uncommitted", msg, exc_info=True)
        self.kick()

    def _lose_slot(self, msg: Message, thread: asyncio.Future[Any]) -> None:
        self.lost_slots += 1
        log.error(
            "caller %s: handler still running on %s[%d]@%d (attempt %d) past its %gs "
            "timeout; its thread keeps the slot until it returns (%d of %d slots lost)",
            self.caller,
            msg.topic,
            msg.partition,
            msg.offset,
            msg.attempt,
            self.timeout,
            self.lost_slots,
            self.concurrency,
            extra=_coordinates(msg),
        )
        thread.add_done_callback(lambda _: self._slot_back(msg))

    def _slot_back(self, msg: Message) -> None:
        self.lost_slots -= 1
        log.warning(
            "caller %s: the handler stuck on %s[%d]@%d returned; its slot is free again (%d lost)",
            self.caller,
            msg.topic,
            msg.partition,
            msg.offset,
            self.lost_slots,
            extra=_coordinates(msg),
        )
        self.kick()

    def _done(self, msg: Message, outcome: Outcome, started: float, owner: bool = True) -> None:
        """Settle ``msg``; hand its lane on if it holds one (``owner``: it was handed on by
        its lane, or it suspended and opened it)."""
        if self._detached and msg in self._detached:
            self._detached.discard(msg)
            log.warning(
                "caller %s: the handler of %s[%d]@%d returned after its delivery was skipped "
                "or settled without it; its outcome is ignored",
                self.caller,
                msg.topic,
                msg.partition,
                msg.offset,
                extra=_coordinates(msg),
            )
            return
        if owner:
            self._next_in_lane(msg)
        try:
            self._settle(msg, outcome, time.perf_counter() - started)
        except Exception:  # settling must never stop the runner; the offset stays held
            log.critical("settling %r failed; its offset stays uncommitted", msg, exc_info=True)

    def _next_in_lane(self, msg: Message) -> None:
        lane = self.lane_of(msg)
        if lane is None:
            return
        queued = self._lanes.get(lane)
        if queued:
            self._released.append(queued.popleft())
        else:
            self._lanes.pop(lane, None)

    # -- what is pending, and taking deliveries away -------------------------------------

    def pending(self) -> Iterator[tuple[Message, bool]]:
        """Every delivery here not yet settled, as (message, running in its handler)."""
        for msg in self._running:
            if msg not in self._detached:
                yield msg, True
        yield from ((msg, False) for msg in self._released)
        yield from ((msg, False) for msg in self._runnable)
        for queued in self._lanes.values():
            if queued:
                yield from ((msg, False) for msg in queued)

    def withdraw(self, match: Callable[[Message], bool]) -> list[Message]:
        """Take the matching deliveries away, unsettled, for the caller to settle.

        A queued one leaves its queue; a running one is detached: its handler runs on
        (a thread cannot be stopped), its outcome will be ignored, and its lane moves
        on now, so what waited behind it in order runs."""
        taken = [msg for msg, _ in self.pending() if match(msg)]
        for msg in taken:
            if msg in self._running:
                self._detached.add(msg)
                self._next_in_lane(msg)
            elif msg in self._released:  # it owns its lane: hand the lane on
                self._released.remove(msg)
                self._next_in_lane(msg)
            elif msg in self._runnable:  # not looked at yet: it holds no lane
                self._runnable.remove(msg)
            else:
                lane = self._lanes.get(self.lane_of(msg))
                if lane:
                    lane.remove(msg)
        self.kick()
        return taken

    # -- control --------------------------------------------------------------------------

    def pause(self) -> list[Message]:
        """Stop starting deliveries; return those not started, for the caller to set aside."""
        self.paused = True
        waiting = [*self._released, *self._runnable]
        for queued in self._lanes.values():
            if queued:
                waiting.extend(queued)
        self._released.clear()
        self._runnable.clear()
        busy = {
            lane: _BUSY
            for m, running in self.pending()
            if running and (lane := self.lane_of(m)) is not None
        }
        self._lanes.clear()  # in place: a runner holds this very dict
        self._lanes.update(busy)
        return waiting

    def resume(self) -> None:
        self.paused = False
        self.kick()

    async def close(self) -> None:
        """Cancel deliveries still running (their offsets stay uncommitted)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
