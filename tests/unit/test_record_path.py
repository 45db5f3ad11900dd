"""The record path is poison-proof: every consumed record ends delivered, in a retry tier
or in the dead-letter topic, or its partition is visibly stalled; and an operator can
move one stuck record on. A real event loop, a fake consumer and a fake broker."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pytest
from confluent_kafka import KafkaError

import shunter
from shunter import message
from shunter.classify import Router
from shunter.config import parse_config
from shunter.decode import build_decoders
from shunter.deliver import SubscriberRuntime
from shunter.errors import DeadLetter, RetryLater
from shunter.message import Message
from shunter.observe.stalls import StallWatch
from shunter.observe.stats import Stats
from shunter.pipeline import Pipeline
from shunter.settle import Settler
from shunter.settle import headers as h

TOPIC = "gifts"
TP = (TOPIC, 0)

# Patches a method of a class that setup.py compiles (a compiled class's methods cannot be
# replaced): runs in scripts/test's pass over the unit tests with SHUNTER_PURE_PYTHON=1.
patches_compiled = pytest.mark.skipif(
    shunter.BUILD == "compiled", reason="patches a compiled method; see the pure-Python pass"
)


@pytest.fixture(autouse=True)
def _fresh_records() -> None:
    """Each test's records are new ones, even where their coordinates repeat."""
    message._UNREADABLE.clear()


class KMsg:
    """A consumed record; ``broken`` names accessors that raise like a hostile record's."""

    def __init__(
        self,
        offset: int,
        value: Any = None,
        *,
        key: bytes | None = b"k",
        headers: list[tuple[str, bytes | None]] | None = None,
        broken: tuple[str, ...] = (),
        topic: str = TOPIC,
    ) -> None:
        self._offset = offset
        if value is None:
            value = {"n": offset}
        self._value = value if isinstance(value, bytes) else orjson.dumps(value)
        self._key = key
        self._headers = headers
        self._broken = broken
        self._topic = topic
        self.reads: dict[str, int] = {}

    def _check(self, name: str) -> None:
        self.reads[name] = self.reads.get(name, 0) + 1
        if name in self._broken:
            raise SystemError(f"<built-in method {name}> returned a result with an exception set")

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        self._check("key")
        return self._key

    def value(self) -> bytes:
        self._check("value")
        return self._value

    def timestamp(self) -> tuple[int, int]:
        return (1, int(time.time() * 1000))

    def headers(self) -> list[tuple[str, bytes | None]] | None:
        self._check("headers")
        return self._headers


class Broker:
    """The retry tiers' and dead-letter topic's producer. ``refuse(topic, value)`` says
    which error a write gets (None: acknowledged); ``hold`` keeps acknowledgements."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, dict[str, bytes | None]]] = []
        self.refuse: Callable[[str, bytes | None, bytes | None], KafkaError | None] = (
            lambda topic, key, value: None
        )

    def send(self, topic: str, key: Any, value: Any, headers: Any, done: Any,
             partition: Any = None) -> None:
        err = self.refuse(topic, key, value)
        if err is None:
            self.sent.append((topic, key, value, dict(headers)))
        asyncio.get_running_loop().call_soon(done, err)

    def dead_letters(self) -> list[dict[str, bytes | None]]:
        return [hdrs for topic, _, _, hdrs in self.sent if topic == "g.dlq"]


class FakeSource:
    def __init__(self) -> None:
        self.paused: set[tuple[str, int]] = set()

    def pause_partition(self, tp: tuple[str, int]) -> None:
        self.paused.add(tp)

    def resume_partition(self, tp: tuple[str, int]) -> None:
        self.paused.discard(tp)

    def watermarks(self, tp: tuple[str, int]) -> tuple[int, int] | None:
        return None

    def commit(self, offsets: Any) -> None:
        pass


Handler = Callable[[Message], Any]


def build(
    handlers: dict[str, Handler],
    *,
    where: str | None = None,
    timeout: str = "30s",
    stall_after: str = "60s",
    runtime: dict[str, Any] | None = None,
) -> tuple[Pipeline, Broker, list[tuple[str, int]]]:
    """A pipeline over one topic whose category (with ``where``) every caller takes;
    ``runtime``: each caller's ``SubscriberRuntime`` options."""
    category: dict[str, Any] = {"topics": [TOPIC]}
    if where is not None:
        category["where"] = where
    config = parse_config({
        "kafka": {"bootstrap_servers": "127.0.0.1:1", "group_id": "g",
                  "stall_after": stall_after},
        "topics": {TOPIC: {}},
        "categories": {"revenue": category},
        "subscribers": [
            {"caller": c, "category": "revenue", "handler": "m:f", "timeout": timeout}
            for c in handlers
        ],
        "retry": {"fast": {"attempts": 1, "delay": "1s"}, "slow": {"attempts": 1, "delay": "1s"}},
        "crash_guard": {"enabled": False},
        "admin": {"listen": None},
    })
    broker = Broker()
    stats = Stats({c: "revenue" for c in handlers})
    settler = Settler(config, broker, stats)  # type: ignore[arg-type]
    received: list[tuple[str, int]] = []

    def receiving(caller: str, handler: Handler) -> Handler:
        def invoke(msg: Message) -> Any:
            received.append((caller, msg.offset))
            return handler(msg)

        return invoke

    runtimes = {
        c: SubscriberRuntime(c, receiving(c, f), settler, **{"timeout": 30.0, **(runtime or {})})
        for c, f in handlers.items()
    }
    pipeline = Pipeline(config, build_decoders(config), Router(config), runtimes, settler, stats)
    pipeline.source = FakeSource()
    return pipeline, broker, received


async def start(pipeline: Pipeline) -> None:
    await pipeline.assigned([TP], {TP: -1})


async def settle(rounds: int = 30) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0.005)


def ok(msg: Message) -> None:
    return None


def test_a_record_whose_headers_cannot_be_read_is_dead_lettered_and_held_until_written() -> None:
    """Given offsets 0..4 where 2's header names are not UTF-8 (reading them raises),
    when the batch is processed and the dead-letter write is refused twice first,
    then 0, 1, 3, 4 are delivered, 2 reaches the dead-letter topic with stage internal
    and its traceback, and the commit never passes 2 before the broker has its record."""

    async def scenario() -> None:
        pipeline, broker, received = build({"medal": ok})
        refusals = [KafkaError(KafkaError._MSG_TIMED_OUT)] * 2
        broker.refuse = lambda topic, key, value: refusals.pop() if refusals else None
        await start(pipeline)
        batch = [KMsg(o, broken=("headers",) if o == 2 else ()) for o in range(5)]
        pipeline.handle_batch(batch)
        await settle()
        # confluent-kafka hands out a half-built list after a failed read, and iterating
        # it crashes the interpreter: a failed read is never repeated.
        assert batch[2].reads["headers"] == 1
        tracker = pipeline.tracker.partitions[TP]
        assert sorted(o for _, o in received) == [0, 1, 3, 4]
        assert tracker.committable() == 2, "held while its dead-letter write is refused"
        await asyncio.sleep(1.7)  # two backoffs: 0.5 s, then 1 s
        [dead] = broker.dead_letters()
        assert dead[h.STAGE] == b"internal"
        assert dead[h.ERROR_TYPE] == b"shunter.errors.UnreadableHeadersError"
        assert b"SystemError" in (dead[h.ERROR] or b"")
        assert dead[h.ORIGIN_OFFSET] == b"2"
        assert b"headers" in (dead[h.TRACEBACK] or b"")
        assert tracker.committable() == 5
        assert pipeline.stats.write_failures["dlq"] == 2

    asyncio.run(scenario())


def test_a_failure_anywhere_in_the_path_is_dead_lettered_once_never_skipped() -> None:
    """A decoder that raises something no one foresaw (not a rejection) is shunter's own
    failure: the record is dead-lettered once with stage internal, nothing is delivered."""

    async def scenario() -> None:
        pipeline, broker, received = build({"a": ok, "b": ok})

        def broken_decoder(raw: bytes) -> Any:
            raise MemoryError("no room")

        pipeline.decoders[TOPIC] = broken_decoder
        await start(pipeline)
        pipeline.handle_batch([KMsg(0), KMsg(1)])
        await settle()
        assert received == []
        assert [d[h.ORIGIN_OFFSET] for d in broker.dead_letters()] == [b"0", b"1"]
        assert {d[h.STAGE] for d in broker.dead_letters()} == {b"internal"}
        assert pipeline.tracker.partitions[TP].committable() == 2

    asyncio.run(scenario())


def test_an_oversized_record_becomes_a_stub_that_stays_a_stub() -> None:
    """Given a rejected payload with a 600 kB key, when every write carrying the key or
    the payload is refused as too large and the first stub write fails once too,
    then the stub (no key, no payload, no key copy) is written again as a stub, with an
    error text that does not grow, and the offset is released."""

    async def scenario() -> None:
        pipeline, broker, _ = build({"medal": ok})
        timeouts = [KafkaError(KafkaError._MSG_TIMED_OUT)]

        def refuse(topic: str, key: bytes | None, value: bytes | None) -> KafkaError | None:
            if key is not None or value is not None:
                return KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
            return timeouts.pop() if timeouts else None

        broker.refuse = refuse
        await start(pipeline)
        pipeline.handle_batch([KMsg(0, value=b"not json", key=b"k" * 600_000)])
        await asyncio.sleep(0.8)
        [(topic, key, value, headers)] = broker.sent
        assert (topic, key, value) == ("g.dlq", None, None)
        assert h.ORIGIN_KEY not in headers
        assert headers[h.PAYLOAD_OMITTED] is not None
        assert headers[h.STAGE] == b"decode"
        assert (headers[h.ERROR] or b"").count(b"too large to keep") == 1
        assert sum(len(k) + len(v or b"") for k, v in headers.items()) < 16_384
        assert pipeline.tracker.partitions[TP].committable() == 1

    asyncio.run(scenario())


@pytest.mark.parametrize("delay", [1e308, math.inf, 10**400], ids=["1e308", "inf", "10**400"])
def test_a_huge_retry_delay_is_cut_to_seven_days_and_settles(delay: float) -> None:
    async def scenario() -> None:
        def later(msg: Message) -> None:
            raise RetryLater(delay=delay)

        pipeline, broker, _ = build({"medal": later})
        await start(pipeline)
        before = int(time.time() * 1000)
        pipeline.handle_batch([KMsg(0)])
        await settle()
        [(topic, _, _, headers)] = broker.sent
        assert topic == "g.retry.fast"
        not_before = int(headers[h.NOT_BEFORE] or b"0")
        assert before + 7 * 86_400_000 <= not_before <= time.time() * 1000 + 7 * 86_400_000
        assert pipeline.tracker.partitions[TP].committable() == 1

    asyncio.run(scenario())


def test_a_handler_that_changes_its_retry_delay_after_raising_still_settles() -> None:
    async def scenario() -> None:
        def sneaky(msg: Message) -> None:
            exc = RetryLater(delay=1)
            exc.delay = float("nan")
            raise exc

        pipeline, broker, _ = build({"medal": sneaky})
        await start(pipeline)
        pipeline.handle_batch([KMsg(0)])
        await settle()
        assert [t for t, *_ in broker.sent] == ["g.retry.fast"]
        assert pipeline.tracker.partitions[TP].committable() == 1

    asyncio.run(scenario())


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no")


@pytest.mark.parametrize(
    "raised",
    [KeyboardInterrupt(), SystemExit(3), Unprintable(), DeadLetter(b"\xff" * 10)],  # type: ignore[arg-type]
    ids=["KeyboardInterrupt", "SystemExit", "unprintable", "bytes-reason"],
)
def test_whatever_a_handler_raises_is_its_outcome(raised: BaseException) -> None:
    async def scenario() -> None:
        def careless(msg: Message) -> None:
            raise raised

        async def careless_async(msg: Message) -> None:
            await asyncio.sleep(0)
            raise raised

        pipeline, broker, _ = build({"sync": careless, "async": careless_async})
        await start(pipeline)
        pipeline.handle_batch([KMsg(0)])
        await settle()
        assert len(broker.sent) == 2
        assert {hdrs[h.CALLER] for *_, hdrs in broker.sent} == {b"sync", b"async"}
        assert pipeline.tracker.partitions[TP].committable() == 1

    asyncio.run(scenario())


@patches_compiled
def test_settling_that_fails_dead_letters_the_delivery_as_internal() -> None:
    async def scenario() -> None:
        def failing(msg: Message) -> None:
            raise ValueError("boom")

        pipeline, broker, _ = build({"medal": failing})

        def broken_info(*args: Any) -> Any:
            raise RuntimeError("a bug in describing the failure")

        pipeline.settler._info = broken_info  # type: ignore[method-assign]
        await start(pipeline)
        pipeline.handle_batch([KMsg(0)])
        await settle()
        [dead] = broker.dead_letters()
        assert dead[h.STAGE] == b"internal"
        assert dead[h.CALLER] == b"medal"
        assert b"describing the failure" in (dead[h.TRACEBACK] or b"")
        assert pipeline.tracker.partitions[TP].committable() == 1

    asyncio.run(scenario())


def test_null_header_values_reach_filters_and_handlers() -> None:
    async def scenario() -> None:
        seen: list[Any] = []

        def keep(msg: Message) -> None:
            seen.append(list(msg.headers))

        pipeline, broker, _ = build({"medal": keep}, where="'h' in headers && headers.h == null")
        await start(pipeline)
        pipeline.handle_batch([KMsg(0, headers=[("h", None), ("bin", b"\xff\x00")])])
        await settle()
        assert seen == [[("h", None), ("bin", b"\xff\x00")]]
        assert broker.sent == []

    asyncio.run(scenario())


@pytest.mark.parametrize("order", [("vandal", "reader"), ("reader", "vandal")])
def test_what_one_handler_does_to_its_message_no_other_subscriber_sees(
    order: tuple[str, str]
) -> None:
    """Given a record delivered to two subscribers, one of which changes its value in
    place (a key popped, a nested list emptied, an amount scaled) and clears its headers
    before failing, when both run (in either order), then the other subscriber sees the
    value and headers as consumed, and so does the retry record written for the one that
    failed: subscribers are isolated from each other's handlers."""

    async def scenario() -> None:
        seen: list[tuple[Any, list[Any]]] = []

        def vandal(msg: Message) -> None:
            value = msg.value
            value.pop("user")
            value["items"].clear()
            value["amount"] *= 100
            headers = msg.headers
            assert isinstance(headers, list)
            headers.clear()
            raise RuntimeError("after changing its message")

        def reader(msg: Message) -> None:
            seen.append((msg.value, list(msg.headers)))

        handlers: dict[str, Handler] = {"vandal": vandal, "reader": reader}
        pipeline, broker, _ = build({name: handlers[name] for name in order})
        await start(pipeline)
        value = {"user": "u1", "items": [1, 2], "amount": 3}
        pipeline.handle_batch([KMsg(0, value, headers=[("trace", b"t1")])])
        await settle()
        assert seen == [(value, [("trace", b"t1")])]
        retries = [(topic, hdrs) for topic, _, _, hdrs in broker.sent if topic == "g.retry.fast"]
        assert len(retries) == 1 and retries[0][1].get("trace") == b"t1", broker.sent

    asyncio.run(scenario())


def test_a_record_delivered_to_several_subscribers_is_freed_once_settled() -> None:
    """Given the cyclic garbage collector off, when 200 records are each delivered to
    three subscribers (one reading its value, so it holds a copy) and settled, then no
    record is left alive: a record and its deliveries form no reference cycle, so
    memory is given back as they settle, not at the collector's next pass."""
    import gc

    async def scenario() -> int:
        def reads(msg: Message) -> None:
            assert msg.value["n"] == msg.offset

        pipeline, _, _ = build({"a": ok, "b": reads, "c": ok})
        await start(pipeline)
        pipeline.handle_batch([KMsg(o) for o in range(200)])
        await settle()
        ptrack = pipeline.tracker.partitions[TP]
        assert ptrack.committable() == 200
        return sum(
            isinstance(o, message.Record) and o.ptrack is ptrack for o in gc.get_objects()
        )

    gc.collect()
    gc.disable()
    try:
        alive = asyncio.run(scenario())
    finally:
        gc.enable()
    assert alive == 0, f"{alive} records wait for the garbage collector"


def test_a_failing_filter_gives_one_dead_letter_record_per_message() -> None:
    async def scenario() -> None:
        handlers: dict[str, Handler] = {"a": ok, "b": ok, "c": ok}
        pipeline, broker, received = build(handlers, where="value.n > 1")
        await start(pipeline)
        pipeline.handle_batch([KMsg(0, value={"n": "text"}), KMsg(1, value={"n": 5})])
        await settle()
        [dead] = broker.dead_letters()
        assert (dead[h.STAGE], dead[h.CALLER], dead[h.CATEGORY]) == (b"classify", b"", b"revenue")
        assert dead[h.ORIGIN_OFFSET] == b"0"
        assert sorted(received) == [("a", 1), ("b", 1), ("c", 1)]
        assert pipeline.tracker.partitions[TP].committable() == 2

    asyncio.run(scenario())


# -- the operator's skip -------------------------------------------------------------------


def test_skip_moves_a_partition_stuck_behind_a_handler_that_never_returns() -> None:
    """Given partition-ordered caller 'stuck' whose handler never returns on offset 1,
    when an operator skips offset 1,
    then 1 is dead-lettered for that caller ('skipped by operator'), the offsets behind it
    run, the partition's commit moves past it, and the handler returning later changes
    nothing."""

    async def scenario() -> None:
        release = asyncio.Event()

        async def stuck(msg: Message) -> None:
            if msg.offset == 1:
                await release.wait()

        pipeline, broker, received = build({"stuck": stuck, "other": ok})
        pipeline.runtimes["stuck"]._lane = lambda msg: "one lane"  # partition ordering
        pipeline.runtimes["stuck"]._by_key = False
        await start(pipeline)
        pipeline.handle_batch([KMsg(o) for o in range(4)])
        await settle()
        tracker = pipeline.tracker.partitions[TP]
        assert tracker.committable() == 1
        assert ("stuck", 2) not in received

        said = pipeline.skipper.skip(TP, 1, "stuck")
        assert "skipped" in said
        await settle()
        [dead] = broker.dead_letters()
        assert (dead[h.CALLER], dead[h.ERROR]) == (b"stuck", b"skipped by operator")
        assert {("stuck", 2), ("stuck", 3)} <= set(received)
        assert tracker.committable() == 4
        release.set()
        await settle()
        assert len(broker.sent) == 1, "the late outcome is ignored"
        assert tracker.committable() == 4

    asyncio.run(scenario())


def test_skip_of_a_record_not_read_yet_dead_letters_it_unrun_when_it_arrives() -> None:
    async def scenario() -> None:
        pipeline, broker, received = build({"medal": ok})
        await start(pipeline)
        assert "not read here yet" in pipeline.skipper.skip(TP, 3)
        pipeline.handle_batch([KMsg(o) for o in range(5)])
        await settle()
        assert sorted(o for _, o in received) == [0, 1, 2, 4]
        [dead] = broker.dead_letters()
        assert (dead[h.STAGE], dead[h.ERROR], dead[h.ORIGIN_OFFSET]) == (
            b"skip", b"skipped by operator", b"3")
        assert pipeline.tracker.partitions[TP].committable() == 5

    asyncio.run(scenario())


def test_a_skip_the_group_committed_past_waits_for_nothing() -> None:
    """Given skips read from the control topic before their partition was assigned here
    (as every start reads them), one below the group's committed offset and one above,
    when the partition is assigned with its commit at 5,
    then the one below is answered as committed past and forgotten, the other still
    waits for its record; and once that one is withdrawn, nothing waits: every record
    takes the common path again."""

    async def scenario() -> None:
        pipeline, broker, received = build({"medal": ok})
        answers: list[tuple[int, str]] = []
        pipeline.skipper.applied = lambda request, said: answers.append((request.offset, said))
        assert "not read here yet" in pipeline.skipper.skip(TP, 2)
        assert "not read here yet" in pipeline.skipper.skip(TP, 7)
        await pipeline.assigned([TP], {TP: 5})
        [(offset, said)] = answers
        assert offset == 2 and "committed past it" in said, said
        assert pipeline.skipper.later == {TP: {7: ""}}
        assert pipeline.committed_past(TP, 4) and not pipeline.committed_past(TP, 5)
        # A request arriving now for a record below the commit is answered at once.
        assert "committed past it" in pipeline.skipper.skip(TP, 3)
        assert pipeline.skipper.later == {TP: {7: ""}}

        pipeline.skipper.forget(TP, 7, "medal")  # not this request: another caller's
        assert pipeline.skipper.later == {TP: {7: ""}}
        pipeline.skipper.forget(TP, 7, "")
        assert pipeline.skipper.later == {}
        pipeline.handle_batch([KMsg(o) for o in range(5, 9)])
        await settle()
        assert sorted(o for _, o in received) == [5, 6, 7, 8]
        assert broker.dead_letters() == []

    asyncio.run(scenario())


def test_skip_gives_up_a_write_the_broker_keeps_refusing() -> None:
    async def scenario() -> None:
        def failing(msg: Message) -> None:
            raise ValueError("boom")

        pipeline, broker, _ = build({"medal": failing}, stall_after="0.1s")
        broker.refuse = lambda topic, key, value: (
            KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED) if topic == "g.retry.fast" else None
        )
        await start(pipeline)
        pipeline.handle_batch([KMsg(0)])
        await settle()
        tracker = pipeline.tracker.partitions[TP]
        assert tracker.committable() == 0
        pipeline.watch()
        await asyncio.sleep(0.15)
        pipeline.watch()
        [row] = pipeline.status()[0]
        assert row.stalled and "write keeps failing" in row.held, row
        said = pipeline.skipper.skip(TP, 0)
        assert "failing write given up" in said
        await asyncio.sleep(1.2)
        assert tracker.committable() == 1

    asyncio.run(scenario())


def test_a_stuck_partition_is_reported_stalled_with_its_reason_until_it_moves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        release = asyncio.Event()

        async def slow(msg: Message) -> None:
            if msg.offset == 0:
                await release.wait()

        pipeline, _, _ = build({"slow": slow}, stall_after="0.2s")
        await start(pipeline)
        pipeline.handle_batch([KMsg(0), KMsg(1)])
        await settle()
        for _ in range(6):
            pipeline.watch()
            await asyncio.sleep(0.05)
        [row] = pipeline.status()[0]
        assert row.stalled and row.in_flight == 2 and row.position == 0
        assert "in the handler of caller slow" in row.held
        assert any("has not moved" in r.message and "skip" in r.message for r in caplog.records)
        release.set()
        await settle()
        pipeline.watch()
        [row] = pipeline.status()[0]
        assert not row.stalled and row.position == 2
        assert any("moves again" in r.message for r in caplog.records)

    asyncio.run(scenario())


def test_a_stall_behind_handler_threads_past_their_timeout_says_they_hold_the_slots(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Given caller 'blocking' on threads with 2 slots and a 0.1 s timeout, whose handler
    never returns on offsets 0 and 1, when offset 2 queues behind them, then 0 and 1 are
    settled as timeouts, and the partition stalls on 2 with a reason saying that all 2
    slots are held by handlers still running (a thread cannot be stopped); the caller's
    status counts them; when the threads return, 2 runs and the partition moves."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        gate = threading.Event()
        threads = ThreadPoolExecutor(4)

        def blocking(msg: Message) -> None:
            if msg.offset < 2:
                gate.wait()

        pipeline, _, received = build(
            {"blocking": lambda msg: loop.run_in_executor(threads, blocking, msg)},
            stall_after="0.2s",
            runtime={"timeout": 0.1, "concurrency": 2, "threaded": True},
        )
        await start(pipeline)
        try:
            pipeline.handle_batch([KMsg(0), KMsg(1), KMsg(2)])
            await asyncio.sleep(0.4)  # one key: 1 starts when 0 times out
            tracker = pipeline.tracker.partitions[TP]
            assert tracker.committable() == 2, "0 and 1 settled as timeouts (to the tier)"
            assert ("blocking", 2) not in received
            for _ in range(6):
                pipeline.watch()
                await asyncio.sleep(0.05)
            [row], [caller] = pipeline.status()
            assert row.stalled and "offset 2: queued for caller blocking" in row.held, row
            assert "all 2 of its slots are held by handlers still running" in row.held, row
            assert caller.stuck == 2 and caller.queued == 1
            assert any("all 2 of its slots" in r.message for r in caplog.records)
        finally:
            gate.set()
            threads.shutdown(wait=True)
        await settle()
        assert ("blocking", 2) in received
        assert pipeline.tracker.partitions[TP].committable() == 3
        assert pipeline.status()[1][0].stuck == 0

    asyncio.run(scenario())


def test_stall_watch_reports_once_per_interval_and_forgets_what_moves() -> None:
    watch = StallWatch(10.0)
    tp = ("t", 0)
    assert watch.sample({tp: 5}, 0.0) == ([], [])
    assert watch.sample({tp: 5}, 9.0) == ([], [])
    assert watch.sample({tp: 5}, 10.0) == ([tp], [])
    assert watch.sample({tp: 5}, 15.0) == ([], [])
    assert watch.sample({tp: 5}, 20.0) == ([tp], [])
    assert watch.stalled(tp, 20.0)
    assert watch.sample({tp: 6}, 21.0) == ([], [tp])
    assert not watch.stalled(tp, 21.0)
    assert watch.sample({}, 40.0) == ([], [])
    assert watch.stuck_for(tp, 40.0) == 0.0


def test_a_record_that_cannot_be_decoded_yet_waits_in_order_and_is_never_dead_lettered() -> None:
    """Given a decoder whose registry is out of reach for the first two tries of offset 1,
    then offsets 1..3 wait (in order, the partition paused) and are delivered once it
    answers; nothing goes to the dead-letter topic."""

    async def scenario() -> None:
        from shunter.errors import DecodeUnavailable

        pipeline, broker, received = build({"medal": ok})
        tries = {"left": 2}
        decode = pipeline.decoders[TOPIC]

        def flaky(raw: bytes) -> Any:
            if b'"n":1' in raw and tries["left"]:
                tries["left"] -= 1
                raise DecodeUnavailable("registry unreachable", 0.05)
            return decode(raw)

        pipeline.decoders[TOPIC] = flaky
        await start(pipeline)
        pipeline.handle_batch([KMsg(o) for o in range(4)])
        await settle(2)
        assert received == [("medal", 0)]
        assert TP in pipeline.source.paused
        await asyncio.sleep(0.3)
        assert received == [("medal", o) for o in range(4)]
        assert broker.sent == [] and TP not in pipeline.source.paused
        assert pipeline.tracker.partitions[TP].committable() == 4

    asyncio.run(scenario())


def retry_record(offset: int, topic: str, origin: int, due: int, attempt: int = 2,
                 requeued: int = 0) -> KMsg:
    """A record of a retry tier for medal (a RetryLater due at ``due``), read at ``offset``
    of ``topic``; ``requeued``: when it was last written to the back (0: never)."""
    now = int(time.time() * 1000)
    info = h.FailureInfo(
        caller="medal", category="revenue", attempt=attempt, stage="deliver",
        error_type="RetryLater", error="later", traceback="", first_failure_ms=now,
        not_before_ms=due, origin_topic=TOPIC, origin_partition=0, origin_offset=origin,
        origin_timestamp_ms=now, tier=topic.rsplit(".", 1)[-1], requeued_ms=requeued,
    )
    return KMsg(offset, headers=list(h.encode(info)), topic=topic)


def test_a_retry_due_in_days_goes_to_the_back_of_the_slow_tier_instead_of_holding_its_own() -> None:
    """Given a fast-tier record due in 7 days (a RetryLater from a payload) ahead of one
    due now, the first is written again to the slow tier with the same due time and
    attempt, and the second runs at once: one long wait holds no other retry."""

    async def scenario() -> None:
        seen: list[int] = []

        def keep(msg: Message) -> None:
            seen.append(msg.offset)

        pipeline, broker, _ = build({"medal": keep})
        fast = pipeline.config.fast_topic
        await pipeline.assigned([(fast, 0)], {(fast, 0): -1})
        now = int(time.time() * 1000)
        week = now + 7 * 86_400_000
        pipeline.handle_batch([retry_record(0, fast, 40, week), retry_record(1, fast, 41, now)])
        await settle()
        assert seen == [41]
        [(topic, _, _, headers)] = broker.sent
        assert topic == "g.retry.slow"
        assert (headers[h.NOT_BEFORE], headers[h.ATTEMPT]) == (str(week).encode(), b"2")
        assert pipeline.tracker.partitions[(fast, 0)].committable() == 2
        assert (fast, 0) not in pipeline.source.paused

    asyncio.run(scenario())


def test_slow_tier_records_due_in_days_go_to_the_back_once_per_horizon_holding_one_horizon(
) -> None:
    """In the slow tier itself, records due in days go to the back at once, stamped; when
    their copies come round again sooner than a horizon (twice slow.delay) after that,
    the partition waits until that horizon is over, then writes them back again: one
    write per horizon each, no rewrite loop, and the retries behind two such copies wait
    one horizon in all (each copy, a new offset, used to hold it a whole horizon anew)."""

    async def scenario() -> None:
        seen: list[int] = []

        def keep(msg: Message) -> None:
            seen.append(msg.offset)

        pipeline, broker, _ = build({"medal": keep})
        slow = pipeline.config.slow_topic
        pipeline._horizon_ms[slow] = 500.0  # a 0.5 s horizon for the test
        await pipeline.assigned([(slow, 0)], {(slow, 0): -1})
        now = int(time.time() * 1000)

        def retry(offset: int, origin: int, due: int, requeued: int = 0) -> KMsg:
            return retry_record(offset, slow, origin, due, attempt=3, requeued=requeued)

        days = now + 86_400_000
        pipeline.handle_batch([retry(0, 7, days), retry(1, 8, days), retry(2, 9, now)])
        await settle(2)
        assert seen == [9], "the due retry behind them ran at once"
        stamps = [int(headers[h.REQUEUED]) for _, _, _, headers in broker.sent]
        assert [hs[h.ORIGIN_OFFSET] for _, _, _, hs in broker.sent] == [b"7", b"8"]
        assert all(now <= s <= now + 1000 for s in stamps)
        # Their copies come round again at once, with another due retry behind them.
        started = time.monotonic()
        pipeline.handle_batch([retry(3, 7, days, stamps[0]), retry(4, 8, days, stamps[1]),
                               retry(5, 10, now)])
        await settle(2)
        assert len(broker.sent) == 2 and (slow, 0) in pipeline.source.paused
        while 10 not in seen and time.monotonic() - started < 5:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        waited = time.monotonic() - started
        assert seen == [9, 10]
        assert 0.35 <= waited < 0.95, f"waited {waited:.2f}s: one horizon in all, not two"
        assert [hs[h.ORIGIN_OFFSET] for _, _, _, hs in broker.sent[2:]] == [b"7", b"8"]
        await settle()
        assert pipeline.tracker.partitions[(slow, 0)].committable() == 6

    asyncio.run(scenario())


def test_a_requeue_stamp_ahead_of_the_clock_holds_nothing() -> None:
    """A slow-tier record due in days whose requeue stamp is in the future (no shunter
    wrote it) is written to the back at once with a true stamp, rather than holding its
    partition one horizon after another."""

    async def scenario() -> None:
        pipeline, broker, _ = build({"medal": ok})
        slow = pipeline.config.slow_topic
        await pipeline.assigned([(slow, 0)], {(slow, 0): -1})
        now = int(time.time() * 1000)
        ahead = now + 10 * 86_400_000
        pipeline.handle_batch([retry_record(0, slow, 7, now + 86_400_000, 3, requeued=ahead)])
        await settle(2)
        [(topic, _, _, headers)] = broker.sent
        assert topic == "g.retry.slow" and int(headers[h.REQUEUED]) <= now + 1000
        assert (slow, 0) not in pipeline.source.paused
        assert pipeline.tracker.partitions[(slow, 0)].committable() == 1

    asyncio.run(scenario())
