"""One subscriber's runtime on a real event loop, without Kafka: per-key order under
concurrency, the concurrency limit, sync and async handlers, every exception turned into
an outcome, timeouts that cancel, and pause handing back what has not started."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shunter
from shunter.deliver import SubscriberRuntime
from shunter.observe.fingerprints import failing_line
from shunter.outcome import SUCCEEDED, DeadLettered, Failed, Outcome
from shunter.testing import make_message


class Settled:
    """The settle callback: records every outcome, and can wait for a number of them."""

    def __init__(self) -> None:
        self.outcomes: list[tuple[shunter.Message, Outcome]] = []
        self._changed = asyncio.Event()

    def __call__(self, msg: shunter.Message, outcome: Outcome, elapsed: float) -> None:
        assert elapsed >= 0
        self.outcomes.append((msg, outcome))
        self._changed.set()

    async def wait(self, count: int, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        async def until() -> None:
            while len(self.outcomes) < count:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(until(), timeout)

    def of(self, value: Any) -> Outcome:
        found = [o for m, o in self.outcomes if m.value == value]
        assert len(found) == 1, f"{value!r} settled {len(found)} times"
        return found[0]


def runtime(handler: Callable[[shunter.Message], Any], settled: Settled, **options: Any
            ) -> SubscriberRuntime:
    return SubscriberRuntime("caller", handler, settled, **options)


def submit_all(rt: SubscriberRuntime, messages: list[shunter.Message]) -> None:
    for msg in messages:
        rt.submit(msg)
    rt.kick()


def keyed(keys: list[int]) -> list[shunter.Message]:
    """One message per entry, with its key and its sequence number within that key."""
    seq: dict[int, int] = defaultdict(int)
    out = []
    for offset, k in enumerate(keys):
        out.append(make_message({"key": k, "seq": seq[k]}, key=f"k{k}".encode(), offset=offset))
        seq[k] += 1
    return out


# -- ordering and the concurrency limit -----------------------------------------------------

@pytest.mark.parametrize("eager", [True, False], ids=["eager", "awaited"])
@settings(max_examples=150, deadline=None)
@given(
    keys=st.lists(st.integers(0, 5), min_size=1, max_size=60),
    steps=st.lists(st.integers(0, 4), min_size=1, max_size=60),
    concurrency=st.integers(1, 8),
    sync_every=st.integers(2, 7),
)
def test_each_key_is_delivered_in_order_and_concurrency_never_exceeds_its_limit(
    keys: list[int], steps: list[int], concurrency: int, sync_every: int, eager: bool
) -> None:
    """Given messages of a few keys interleaved at random, and a handler that suspends a
    random number of times per message (sometimes not at all),
    when they are delivered with a concurrency limit, then each key's messages start and
    finish in their sequence order, every message is settled once, and no more deliveries
    are ever suspended at once than the limit allows. The same whether the runtime steps
    a coroutine's first step at once (``eager``) or awaits it whole (HTTP, processes)."""

    async def scenario() -> None:
        settled = Settled()
        started: dict[int, list[int]] = defaultdict(list)
        finished: dict[int, list[int]] = defaultdict(list)
        inside = 0
        most = 0

        async def handler(msg: shunter.Message) -> None:
            nonlocal inside, most
            k, seq = msg.value["key"], msg.value["seq"]
            started[k].append(seq)
            yields = steps[msg.offset % len(steps)]
            if yields:
                inside += 1
                most = max(most, inside)
                for _ in range(yields):
                    await asyncio.sleep(0)
                inside -= 1
            finished[k].append(seq)

        def mixed(msg: shunter.Message) -> Any:
            if msg.offset % sync_every == 0:  # a sync handler's delivery: done in one call
                started[msg.value["key"]].append(msg.value["seq"])
                finished[msg.value["key"]].append(msg.value["seq"])
                return None
            return handler(msg)

        rt = runtime(mixed, settled, concurrency=concurrency, eager=eager)
        messages = keyed(keys)
        half = len(messages) // 2
        submit_all(rt, messages[:half])
        await asyncio.sleep(0)
        submit_all(rt, messages[half:])  # a second batch arrives while the first runs
        await settled.wait(len(messages))
        for k in set(keys):
            assert started[k] == list(range(keys.count(k)))
            assert finished[k] == list(range(keys.count(k)))
        assert most <= concurrency
        assert all(o is SUCCEEDED for _, o in settled.outcomes)
        assert sorted(m.offset for m, _ in settled.outcomes) == list(range(len(messages)))
        assert rt.active == 0 and rt.queued == 0

    asyncio.run(scenario())


def test_per_key_order_holds_with_real_random_delays() -> None:
    """Given 600 messages over 12 keys and a handler sleeping a random 0-3 ms,
    when delivered with concurrency 16, then every key's messages are handled strictly
    in order, and the concurrency is used (several deliveries overlap)."""
    rng = random.Random(7)
    keys = [rng.randrange(12) for _ in range(600)]

    async def scenario() -> None:
        settled = Settled()
        order: dict[int, list[int]] = defaultdict(list)
        busy_keys: set[int] = set()
        inside = most = 0

        async def handler(msg: shunter.Message) -> None:
            nonlocal inside, most
            k = msg.value["key"]
            assert k not in busy_keys, f"two deliveries of key {k} at once"
            busy_keys.add(k)
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(rng.random() * 0.003)
            order[k].append(msg.value["seq"])
            inside -= 1
            busy_keys.discard(k)

        rt = runtime(handler, settled, concurrency=16)
        submit_all(rt, keyed(keys))
        await settled.wait(len(keys), timeout=30)
        for k in set(keys):
            assert order[k] == list(range(keys.count(k)))
        assert 1 < most <= 12  # overlapping, and never two of one key: at most 12 keys

    asyncio.run(scenario())


def test_partition_ordering_serialises_a_partition_and_none_does_not() -> None:
    """Given messages of one partition with different keys, when the subscriber orders by
    partition, then they run one at a time in offset order; with ordering none, they
    overlap."""

    async def run_with(ordering: str) -> tuple[list[int], int]:
        settled = Settled()
        order: list[int] = []
        inside = most = 0

        async def handler(msg: shunter.Message) -> None:
            nonlocal inside, most
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.001 * (10 - msg.offset))  # later offsets are quicker
            order.append(msg.offset)
            inside -= 1

        rt = runtime(handler, settled, ordering=ordering, concurrency=10)
        submit_all(rt, [make_message(i, key=f"k{i}".encode(), offset=i) for i in range(10)])
        await settled.wait(10)
        return order, most

    by_partition = asyncio.run(run_with("partition"))
    assert by_partition == (list(range(10)), 1)
    unordered, most = asyncio.run(run_with("none"))
    assert sorted(unordered) == list(range(10))
    assert most > 1 and unordered != list(range(10))


# -- outcomes -------------------------------------------------------------------------------

def test_sync_and_async_handlers_succeed() -> None:
    """Given a sync handler and an async one that awaits, then both deliveries settle as
    succeeded and each handler saw its message."""

    async def scenario() -> None:
        seen: list[str] = []

        def sync_handler(msg: shunter.Message) -> None:
            seen.append(f"sync:{msg.value}")

        async def async_handler(msg: shunter.Message) -> None:
            await asyncio.sleep(0.001)
            seen.append(f"async:{msg.value}")

        for handler in (sync_handler, async_handler):
            settled = Settled()
            rt = runtime(handler, settled)
            submit_all(rt, [make_message("a", offset=0), make_message("b", offset=1)])
            await settled.wait(2)
            assert [o for _, o in settled.outcomes] == [SUCCEEDED, SUCCEEDED]
        assert sorted(seen) == ["async:a", "async:b", "sync:a", "sync:b"]

    asyncio.run(scenario())


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "awaited"])
def test_every_kind_of_exception_becomes_an_outcome_and_the_runtime_carries_on(
    eager: bool,
) -> None:
    """Given handlers that raise before and after suspending, raise RetryLater and
    DeadLetter, or call sys.exit, when each is delivered, then each becomes an outcome
    value handed to settle, with the error type, message and a traceback naming the
    failing function, and a healthy message after them still succeeds."""

    async def scenario() -> Settled:
        settled = Settled()

        async def handler(msg: shunter.Message) -> None:
            kind = msg.value
            if kind == "raise-at-once":
                raise KeyError("gift_id")
            await asyncio.sleep(0)
            if kind == "raise-later":
                raise ValueError("price missing")
            if kind == "retry":
                raise shunter.RetryLater(delay=7, reason="downstream busy")
            if kind == "dead":
                raise shunter.DeadLetter("unknown anchor")
            if kind == "exit":
                raise SystemExit(3)

        def sync_handler(msg: shunter.Message) -> None:
            if msg.value == "sync-raise":
                raise ZeroDivisionError("division by zero in medal level")
            if msg.value == "sync-dead":
                raise shunter.DeadLetter("bad user")
            asyncio.get_running_loop()  # runs on the loop thread

        rt = runtime(handler, settled, eager=eager)
        kinds = ["raise-at-once", "raise-later", "retry", "dead", "exit", "ok"]
        submit_all(rt, [make_message(k, offset=i) for i, k in enumerate(kinds)])
        rt_sync = runtime(sync_handler, settled)
        submit_all(rt_sync, [make_message(k, offset=i)
                             for i, k in enumerate(["sync-raise", "sync-dead", "sync-ok"])])
        await settled.wait(len(kinds) + 3)
        return settled

    settled = asyncio.run(scenario())
    at_once = settled.of("raise-at-once")
    assert isinstance(at_once, Failed) and at_once.error_type == "KeyError"
    assert "gift_id" in at_once.error and "in handler" in at_once.traceback
    later = settled.of("raise-later")
    assert isinstance(later, Failed) and later.error_type == "ValueError"
    assert later.error == "price missing" and "raise ValueError" in later.traceback
    assert later.delay is None and later.stage == "deliver"
    retry = settled.of("retry")
    assert isinstance(retry, Failed)
    assert (retry.error_type, retry.delay) == ("shunter.errors.RetryLater", 7)
    dead = settled.of("dead")
    assert isinstance(dead, DeadLettered)
    assert (dead.reason, dead.error_type) == ("unknown anchor", "DeadLetter")
    exited = settled.of("exit")
    assert isinstance(exited, Failed) and exited.error_type == "SystemExit"
    assert settled.of("ok") is SUCCEEDED
    sync_raise = settled.of("sync-raise")
    assert isinstance(sync_raise, Failed) and sync_raise.error_type == "ZeroDivisionError"
    assert "in sync_handler" in sync_raise.traceback
    assert isinstance(settled.of("sync-dead"), DeadLettered)
    assert settled.of("sync-ok") is SUCCEEDED


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "awaited"])
def test_a_failures_traceback_and_failing_line_leave_shunters_own_frames_out(
    eager: bool,
) -> None:
    """Given a handler that raises, and one that is a C function raising (no Python frame
    of its own), when each fails, then the traceback begins at the handler's own frame and
    no frame of shunter's delivery code is named as the failing line: in the compiled
    build too, whose frames carry the path the module was compiled from (``src/shunter/``),
    not the installed one."""

    async def handler(msg: shunter.Message) -> None:
        raise KeyError("gift_id")

    async def scenario() -> tuple[Outcome, Outcome]:
        settled, c_settled = Settled(), Settled()
        submit_all(runtime(handler, settled, eager=eager), [make_message("x")])
        # int(msg) raises TypeError inside C: the traceback has shunter's frames only
        submit_all(runtime(int, c_settled), [make_message("y")])
        await settled.wait(1)
        await c_settled.wait(1)
        return settled.outcomes[0][1], c_settled.outcomes[0][1]

    raised, in_c = asyncio.run(scenario())
    assert isinstance(raised, Failed) and isinstance(in_c, Failed)
    frames = [line for line in raised.traceback.splitlines() if line.startswith("  File ")]
    assert "test_runtime.py" in frames[0] and "in handler" in frames[0], raised.traceback
    assert not any("deliver" in f and "runtime.py" in f for f in frames), raised.traceback
    assert failing_line(raised.traceback).startswith("unit/test_runtime.py:")
    assert in_c.error_type == "TypeError"
    assert failing_line(in_c.traceback) == "", in_c.traceback


def test_a_handler_cancelled_from_inside_fails_instead_of_vanishing() -> None:
    """Given a handler whose own awaited work is cancelled by someone else (a shared
    future cancelled elsewhere) and one that raises CancelledError in its first step,
    when they are delivered, then both become failed outcomes, and the next message of
    the same key, and of another key, are still delivered: the delivery is settled, its
    lane not left busy, and the subscriber's queue not stalled."""

    async def scenario() -> Settled:
        settled = Settled()
        loop = asyncio.get_running_loop()
        shared: asyncio.Future[None] = loop.create_future()

        async def handler(msg: shunter.Message) -> None:
            if msg.value == "awaits-cancelled":
                loop.call_later(0.01, shared.cancel)
                await shared
            elif msg.value == "raises-at-once":
                raise asyncio.CancelledError
            await asyncio.sleep(0)

        rt = runtime(handler, settled, timeout=5)
        submit_all(rt, [
            make_message("awaits-cancelled", key=b"a", offset=0),
            make_message("raises-at-once", key=b"b", offset=1),
            make_message("after-a", key=b"a", offset=2),
            make_message("after-b", key=b"b", offset=3),
            make_message("other-key", key=b"c", offset=4),
        ])
        await settled.wait(5, timeout=3)
        return settled

    settled = asyncio.run(scenario())
    assert isinstance(settled.of("awaits-cancelled"), Failed)
    assert isinstance(settled.of("raises-at-once"), Failed)
    assert settled.of("after-a") is SUCCEEDED
    assert settled.of("after-b") is SUCCEEDED
    assert settled.of("other-key") is SUCCEEDED


def test_a_settle_callback_that_raises_does_not_stop_the_runtime() -> None:
    """Given a settle callback that fails for one message, then later messages are still
    delivered and settled (the failure is logged, the runner survives)."""

    async def scenario() -> list[Any]:
        done: list[Any] = []

        def settle(msg: shunter.Message, outcome: Outcome, elapsed: float) -> None:
            if msg.value == 1:
                raise RuntimeError("producer gone")
            done.append(msg.value)

        rt = SubscriberRuntime("caller", lambda msg: None, settle)
        submit_all(rt, [make_message(i, offset=i) for i in range(4)])
        for _ in range(20):
            await asyncio.sleep(0)
        return done

    assert asyncio.run(scenario()) == [0, 2, 3]


# -- timeouts and the task a handler runs in ------------------------------------------------

@pytest.mark.parametrize("eager", [True, False], ids=["eager", "awaited"])
def test_a_timed_out_handler_is_cancelled_and_reported_as_a_timeout(eager: bool) -> None:
    """Given an async handler that would take 30 s and a timeout of 50 ms,
    when it is delivered, then the handler observes its cancellation, the delivery
    settles as a DeliveryTimeout failure, and messages behind it keep flowing."""

    async def scenario() -> tuple[Settled, list[str]]:
        settled = Settled()
        observed: list[str] = []

        async def handler(msg: shunter.Message) -> None:
            if msg.value == "hang":
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    observed.append("cancelled")
                    raise
            await asyncio.sleep(0.001)

        rt = runtime(handler, settled, timeout=0.05, concurrency=2, eager=eager)
        submit_all(rt, [make_message("hang", key=b"a", offset=0)]
                   + [make_message(i, key=f"k{i}".encode(), offset=i + 1) for i in range(20)])
        await settled.wait(21, timeout=5)
        return settled, observed

    settled, observed = asyncio.run(scenario())
    assert observed == ["cancelled"]
    hung = settled.of("hang")
    assert isinstance(hung, Failed)
    assert hung.error_type == "shunter.errors.DeliveryTimeout"
    assert "0.05s" in hung.error
    assert all(settled.of(i) is SUCCEEDED for i in range(20))


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "awaited"])
def test_a_handler_that_swallows_its_timeout_does_not_hold_its_key_for_ever(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, eager: bool
) -> None:
    """Given an async handler that catches the cancellation of its 50 ms timeout and
    goes on waiting (a bare ``except:`` in a loop), when it is delivered with two more
    messages of its key behind it, then after the grace period its delivery settles as
    a timeout (to the retry tier, not lost), the two behind it run in order, the log
    names the line the handler waits on, and when the handler at last returns its
    outcome is ignored: the delivery settled once."""
    from shunter.deliver import runtime as runtime_module

    monkeypatch.setattr(runtime_module, "CANCEL_GRACE", 0.1)
    stop = asyncio.Event()

    async def handler(msg: shunter.Message) -> None:
        if msg.value == "stubborn":
            while not stop.is_set():
                try:
                    await asyncio.sleep(0.01)  # the line it waits on
                except BaseException:  # the careless pattern under test
                    continue

    async def scenario() -> Settled:
        settled = Settled()
        rt = runtime(handler, settled, timeout=0.05, concurrency=4, eager=eager)
        submit_all(rt, [make_message("stubborn", key=b"a", offset=0),
                        make_message("next", key=b"a", offset=1),
                        make_message("last", key=b"a", offset=2)])
        await settled.wait(3, timeout=5)
        stop.set()
        await asyncio.sleep(0.1)  # the handler returns: its outcome must be ignored
        return settled

    settled = asyncio.run(scenario())
    stubborn = settled.of("stubborn")
    assert isinstance(stubborn, Failed)
    assert stubborn.error_type == "shunter.errors.DeliveryTimeout"
    assert [m.value for m, _ in settled.outcomes] == ["stubborn", "next", "last"]
    assert settled.of("next") is SUCCEEDED and settled.of("last") is SUCCEEDED
    assert "ignored its cancellation" in caplog.text
    assert "test_runtime.py" in caplog.text and "in handler" in caplog.text


def test_a_thread_past_its_timeout_keeps_its_slot_so_the_next_delivery_is_not_timed_out_unrun(
) -> None:
    """Given a sync handler isolated on threads with concurrency 1, and a first delivery
    that blocks its thread past the 0.2 s timeout,
    when a second delivery follows, then the first settles as a timeout, and the second
    is not charged for the time it waited for a free thread: it runs once and succeeds
    (rather than being reported as a timeout without ever having run)."""
    import threading

    from shunter.config import SubscriberConfig
    from shunter.deliver.invoke import threaded

    ran: list[str] = []
    lock = threading.Lock()

    def blocking(msg: shunter.Message) -> None:
        if msg.value == "blocks":
            threading.Event().wait(0.6)
        with lock:
            ran.append(msg.value)

    sub = SubscriberConfig(caller="caller", category="c", handler="m:f", isolation="thread",
                           concurrency=1, timeout=0.2)
    invoke, pool = threaded(blocking, sub, "subscribers[0]")

    async def scenario() -> Settled:
        settled = Settled()
        rt = runtime(invoke, settled, concurrency=1, timeout=0.2, ordering="none",
                     threaded=True)
        submit_all(rt, [make_message("blocks", offset=0), make_message("quick", offset=1)])
        await settled.wait(2, timeout=5)
        await asyncio.sleep(0.8)  # whatever still runs on the thread has finished
        return settled

    try:
        settled = asyncio.run(scenario())
    finally:
        pool.shutdown(wait=True)
    blocked = settled.of("blocks")
    assert isinstance(blocked, Failed) and blocked.error_type == "shunter.errors.DeliveryTimeout"
    assert settled.of("quick") is SUCCEEDED, settled.of("quick")
    assert ran.count("quick") == 1


@pytest.mark.parametrize("returns", ["task", "future"])
def test_a_task_or_future_a_handler_returns_is_cancelled_at_its_timeout_not_taken_for_a_thread(
    returns: str,
) -> None:
    """Given a sync handler that hands its work to a Task of its own (or returns a bare
    future) that never finishes, with concurrency 2 and a 0.1 s timeout, when four
    deliveries arrive, then each is cancelled at its timeout and settled as one, and no
    slot is lost: only a threaded invoke's futures are threads that keep their slot past
    a timeout (before, two such deliveries took both slots for good)."""

    async def scenario() -> tuple[Settled, SubscriberRuntime, list[str]]:
        settled = Settled()
        cancelled: list[str] = []
        never = asyncio.Event()

        async def work(msg: shunter.Message) -> None:
            try:
                await never.wait()
            except asyncio.CancelledError:
                cancelled.append(msg.value)
                raise

        def handler(msg: shunter.Message) -> Any:
            if returns == "task":
                return asyncio.ensure_future(work(msg))
            return asyncio.get_running_loop().create_future()

        rt = runtime(handler, settled, concurrency=2, timeout=0.1, ordering="none")
        submit_all(rt, [make_message(f"m{i}", offset=i) for i in range(4)])
        await settled.wait(4, timeout=5)
        return settled, rt, cancelled

    settled, rt, cancelled = asyncio.run(scenario())
    for i in range(4):
        outcome = settled.of(f"m{i}")
        assert isinstance(outcome, Failed)
        assert outcome.error_type == "shunter.errors.DeliveryTimeout"
    assert rt.lost_slots == 0 and rt.may_start()
    if returns == "task":
        assert sorted(cancelled) == ["m0", "m1", "m2", "m3"]


def test_a_handler_using_asyncio_timeout_in_its_first_step_runs_in_its_own_task() -> None:
    """Given handlers that enter ``asyncio.timeout()`` and capture ``current_task()``
    before their first await, when delivered concurrently, then the task they captured is
    the one that resumes them to the end, a timeout that does not expire changes nothing,
    and one that expires becomes the handler's own TimeoutError failure (not a delivery
    timeout, and the runtime is not cancelled)."""

    async def scenario() -> tuple[Settled, list[bool]]:
        settled = Settled()
        same_task: list[bool] = []

        async def handler(msg: shunter.Message) -> None:
            first = asyncio.current_task()
            budget = 0.01 if msg.value == "too-slow" else 2.0
            async with asyncio.timeout(budget):
                await asyncio.sleep(0.05 if msg.value == "too-slow" else 0.001)
                await asyncio.sleep(0)
            same_task.append(asyncio.current_task() is first and first is not None)

        rt = runtime(handler, settled, concurrency=4, timeout=5)
        submit_all(rt, [make_message(i, key=f"k{i % 3}".encode(), offset=i) for i in range(12)]
                   + [make_message("too-slow", key=b"z", offset=12)])
        await settled.wait(13)
        return settled, same_task

    settled, same_task = asyncio.run(scenario())
    assert same_task == [True] * 12
    assert all(settled.of(i) is SUCCEEDED for i in range(12))
    slow = settled.of("too-slow")
    assert isinstance(slow, Failed) and slow.error_type == "TimeoutError"


# -- pause, resume, revocation, close -------------------------------------------------------

def test_pause_returns_the_deliveries_not_started_and_starts_nothing_more() -> None:
    """Given a concurrency of 1 with one delivery running and others waiting, some of
    them behind the running one's key,
    when the subscriber is paused, then pause returns exactly the waiting deliveries, the
    running one still completes and is settled, and nothing else starts until resume;
    after resume, a new delivery of the running key's lane runs normally."""

    async def scenario() -> None:
        settled = Settled()
        gate = asyncio.Event()
        ran: list[int] = []

        async def handler(msg: shunter.Message) -> None:
            ran.append(msg.offset)
            await gate.wait()

        rt = runtime(handler, settled, concurrency=1)
        messages = [make_message(i, key=f"k{i % 2}".encode(), offset=i) for i in range(6)]
        submit_all(rt, messages)
        await asyncio.sleep(0.01)
        assert ran == [0]
        waiting = rt.pause()
        assert sorted(m.offset for m in waiting) == [1, 2, 3, 4, 5]
        assert rt.queued == 0
        gate.set()
        await settled.wait(1)
        await asyncio.sleep(0.01)
        assert ran == [0]
        assert [m.offset for m, _ in settled.outcomes] == [0]
        rt.submit(make_message(6, key=b"k0", offset=6))
        rt.kick()
        await asyncio.sleep(0.01)
        assert ran == [0], "a paused subscriber started a delivery"
        rt.resume()
        await settled.wait(2)
        assert ran == [0, 6]

    asyncio.run(scenario())


def test_a_delivery_of_a_revoked_partition_is_not_started() -> None:
    """Given deliveries queued behind a running one, when their partition is revoked,
    then they are not started (the partition's new owner delivers them), while a
    delivery of another partition still runs."""

    async def scenario() -> None:
        settled = Settled()
        gate = asyncio.Event()
        ran: list[Any] = []

        async def handler(msg: shunter.Message) -> None:
            ran.append(msg.value)
            await gate.wait()

        rt = runtime(handler, settled, concurrency=1)
        revoked = [make_message(f"p0-{i}", partition=0, offset=i) for i in range(3)]
        other = make_message("p1-0", partition=1, offset=0)
        for msg in revoked[1:]:  # the same partition's tracker, as the pipeline shares it
            msg._record.ptrack = revoked[0]._record.ptrack
        submit_all(rt, [*revoked, other])
        await asyncio.sleep(0.01)
        revoked[0]._record.ptrack.revoked = True
        gate.set()
        await settled.wait(2)
        await asyncio.sleep(0.01)
        assert ran == ["p0-0", "p1-0"]

    asyncio.run(scenario())


def test_close_cancels_running_deliveries_without_settling_them() -> None:
    """Given a delivery still running at shutdown, when the runtime is closed, then the
    handler is cancelled and the delivery is not settled (its offset stays uncommitted)."""

    async def scenario() -> tuple[Settled, list[str]]:
        settled = Settled()
        observed: list[str] = []

        async def handler(msg: shunter.Message) -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                observed.append("cancelled")
                raise

        rt = runtime(handler, settled)
        submit_all(rt, [make_message("stuck")])
        await asyncio.sleep(0.01)
        await asyncio.wait_for(rt.close(), 2)
        return settled, observed

    settled, observed = asyncio.run(scenario())
    assert observed == ["cancelled"]
    assert settled.outcomes == []


@pytest.mark.parametrize("concurrency", [1, 3])
def test_a_handler_that_never_suspends_does_not_hold_a_slot(concurrency: int) -> None:
    """Given a handler that completes in its first step, when many deliveries run, then
    none is ever counted as active and all settle in submission order."""

    async def scenario() -> list[int]:
        settled = Settled()
        actives: list[int] = []
        rt: SubscriberRuntime

        async def handler(msg: shunter.Message) -> None:
            actives.append(rt.active)

        rt = runtime(handler, settled, concurrency=concurrency, ordering="none")
        submit_all(rt, [make_message(i, offset=i) for i in range(50)])
        await settled.wait(50)
        assert set(actives) == {0}
        return [m.offset for m, _ in settled.outcomes]

    assert asyncio.run(scenario()) == list(range(50))


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "awaited"])
def test_suspending_deliveries_reuse_a_task_per_slot_not_one_per_delivery(eager: bool) -> None:
    """Given a handler that always awaits (an HTTP subscriber's), when 400 deliveries run
    at concurrency 8, then the runtime starts a handful of tasks, not one per delivery: a
    task that finished its delivery takes the next one (a task per delivery held the
    http-fanout bench at 0.59 of its raw loop), and the limit still holds."""

    async def scenario() -> tuple[int, int, list[int]]:
        settled = Settled()
        created = 0
        loop = asyncio.get_running_loop()

        def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> Any:
            nonlocal created
            created += getattr(coro, "__qualname__", "") == "SubscriberRuntime._run"
            return asyncio.Task(coro, loop=loop, **kw)

        loop.set_task_factory(counting)
        peak = 0
        rt: SubscriberRuntime

        async def handler(msg: shunter.Message) -> None:
            nonlocal peak
            await asyncio.sleep(0)  # answers arrive together, as from one poll of sockets
            peak = max(peak, rt.active)

        rt = runtime(handler, settled, concurrency=8, ordering="none", eager=eager)
        submit_all(rt, [make_message(i, offset=i) for i in range(400)])
        await settled.wait(400)
        return created, peak, sorted(m.offset for m, _ in settled.outcomes)

    created, peak, offsets = asyncio.run(scenario())
    assert offsets == list(range(400))
    assert 1 < peak <= 8
    assert created <= 2 * 8, f"{created} runner tasks for 400 deliveries"


def test_first_step_successes_are_settled_together_before_the_runner_yields() -> None:
    """Given a runtime with a batch settle callback, when ten deliveries run and one of
    them suspends while another raises, then every delivery is settled exactly once: the
    ones done in their first step through the batch callback, already settled by the time
    the suspended one resumes (the runner settles before it yields), the others one by
    one with their outcome."""

    async def scenario() -> tuple[list[int], Settled, set[int]]:
        batched: list[int] = []
        seen_on_resume: set[int] = set()
        settled = Settled()

        async def handler(msg: shunter.Message) -> None:
            if msg.value == 5:
                await asyncio.sleep(0.01)
                seen_on_resume.update(batched)
            if msg.value == 7:
                raise ValueError("boom")

        def settle_many(done: list[shunter.Message], seconds: float, slow: list[float]) -> None:
            assert seconds >= 0 and len(slow) <= len(done) and all(t > 0 for t in slow)
            batched.extend(msg.value for msg in done)

        rt = SubscriberRuntime("caller", handler, settled, ordering="none",
                               settle_many=settle_many)
        submit_all(rt, [make_message(i, offset=i) for i in range(10)])
        await settled.wait(2)
        return batched, settled, seen_on_resume

    batched, settled, seen_on_resume = asyncio.run(scenario())
    assert sorted(batched) == [0, 1, 2, 3, 4, 6, 8, 9]
    assert {0, 1, 2, 3, 4} <= seen_on_resume
    assert settled.of(5) is SUCCEEDED
    assert isinstance(settled.of(7), Failed)
    assert len(settled.outcomes) == 2


def test_a_caller_paused_and_resumed_while_a_delivery_is_suspended_loses_no_lane() -> None:
    """Given one slot and key A's delivery suspended in it, when the caller is paused and
    resumed meanwhile and key B's messages (done in their first step) wait for the slot,
    then the runner that carries on after A delivers every message of B: no lane is
    left marked busy for ever."""

    async def scenario() -> list[Any]:
        settled = Settled()
        ran: list[Any] = []
        release = asyncio.Event()

        async def handler(msg: shunter.Message) -> None:
            ran.append(msg.value)
            if msg.value == "a1":
                await release.wait()

        rt = runtime(handler, settled, concurrency=1)
        submit_all(rt, [make_message("a1", offset=0, key=b"A")])
        await asyncio.sleep(0.01)
        rt.pause()
        rt.resume()
        # No slot is free: these wait for the suspended runner, which carries on with them.
        submit_all(rt, [make_message(f"b{i}", offset=1 + i, key=b"B") for i in range(3)])
        release.set()
        await settled.wait(4)
        return ran

    assert asyncio.run(scenario()) == ["a1", "b0", "b1", "b2"]


def test_successes_are_settled_before_a_failure_that_follows_them() -> None:
    """Given a batch settle callback, when a delivery fails after others succeeded in the
    same pass, then the successes are settled first (the flood guard counts in order)."""

    async def scenario() -> list[Any]:
        order: list[Any] = []

        async def handler(msg: shunter.Message) -> None:
            if msg.value == 3:
                raise ValueError("boom")

        def settle(msg: shunter.Message, outcome: Outcome, elapsed: float) -> None:
            order.append(("one", msg.value))

        def settle_many(done: list[shunter.Message], seconds: float, slow: list[float]) -> None:
            order.extend(("many", msg.value) for msg in done)

        rt = SubscriberRuntime("caller", handler, settle, ordering="none",
                               settle_many=settle_many)
        submit_all(rt, [make_message(i, offset=i) for i in range(5)])
        for _ in range(10):
            await asyncio.sleep(0)
        return order

    assert asyncio.run(scenario()) == [
        ("many", 0), ("many", 1), ("many", 2), ("one", 3), ("many", 4)
    ]


# -- lanes opened only while a delivery is suspended ----------------------------------------

def test_lanes_are_opened_only_by_a_suspended_delivery_and_a_withdrawn_one_hands_on_nothing(
) -> None:
    """Given deliveries that complete in their first step, then no lane is ever opened
    (nothing to order behind them). Given one delivery of key k suspended and two more of
    k submitted behind it, when the last is withdrawn (an operator's skip) before the
    runner looked at it, then the middle one still waits for the first: a delivery that
    never held its lane hands nothing on; it runs once the first is settled."""

    async def scenario() -> None:
        settled = Settled()
        gate = asyncio.Event()
        ran: list[int] = []
        opened: list[int] = []

        async def handler(msg: shunter.Message) -> None:
            ran.append(msg.offset)
            opened.append(len(rt._lanes))
            if msg.value == "wait":
                await gate.wait()

        rt = runtime(handler, settled, concurrency=4)
        submit_all(rt, [make_message(i, key=b"k", offset=i) for i in range(3)])
        await settled.wait(3)
        assert ran == [0, 1, 2] and opened == [0, 0, 0] and not rt._lanes
        first, middle, last = (make_message(v, key=b"k", offset=3 + i)
                               for i, v in enumerate(("wait", "m", "l")))
        submit_all(rt, [first])
        await asyncio.sleep(0.01)
        assert ran[-1] == 3 and rt.active == 1
        rt.submit(middle)
        rt.submit(last)
        assert rt.withdraw(lambda m: m is last) == [last]
        rt.kick()
        await asyncio.sleep(0.01)
        assert ran == [0, 1, 2, 3], "the middle one overtook the suspended first one"
        gate.set()
        await settled.wait(5)
        assert ran == [0, 1, 2, 3, 4]
        assert rt.queued == 0 and not rt._lanes

    asyncio.run(scenario())


def test_handler_seconds_of_batched_successes_land_in_the_latency_histogram() -> None:
    """Given handlers that complete in their first step, one of them slow (4 ms of work),
    when they are settled together, then the histogram counts each delivery once, the
    slow one beyond the first bucket, and the total covers at least the slow one's time
    (the batch is timed without a clock read per delivery of its own)."""
    import time

    from shunter.observe.stats import BUCKETS, Latency

    latency = Latency()

    async def handler(msg: shunter.Message) -> None:
        if msg.value == "slow":
            time.sleep(0.004)  # noqa: ASYNC251 - CPU-bound work in the first step

    def settle_many(done: list[shunter.Message], seconds: float, slow: list[float]) -> None:
        latency.succeeded_many("t", len(done), seconds, slow)

    async def scenario() -> None:
        rt = SubscriberRuntime("caller", handler, Settled(), ordering="none",
                               settle_many=settle_many)
        values = ["a", "b", "slow", "c", "d"]
        submit_all(rt, [make_message(v, offset=i) for i, v in enumerate(values)])
        for _ in range(5):
            await asyncio.sleep(0)

    asyncio.run(scenario())
    assert sum(latency.counts) == 5 and latency.ok == {"t": 5}
    beyond = sum(latency.counts[i] for i, bound in enumerate(BUCKETS) if bound >= 0.004)
    assert beyond + latency.counts[-1] >= 1
    assert latency.total >= 0.004
