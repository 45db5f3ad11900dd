"""Pausing a caller: what CallerPauses does with control records and deliveries, without a
broker. The record path hands a paused caller's delivery to ``set_aside``, which writes it
once to the parked topic and releases its offset share only on the broker's answer."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from confluent_kafka import KafkaError

from shunter.commit.tracker import PartitionTracker
from shunter.config import parse_config
from shunter.message import Message, Record
from shunter.observe.control import namespace
from shunter.observe.pause import CallerPauses
from shunter.observe.stats import Stats
from shunter.settle import Settler
from shunter.settle import headers as h

CONFIG = parse_config(
    {
        "kafka": {"group_id": "g"},
        "topics": {"gift": {}},
        "categories": {"revenue": {"topics": ["gift"]}},
        "subscribers": [{"caller": "medal", "category": "revenue", "handler": "x:y"}],
    }
)


class FakeControl:
    """The control topic without a broker: ``put`` records the write; ``read`` plays a
    record back to the subscribers as the follower would."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Any]] = {}
        self.written: list[tuple[str, bytes | None]] = []

    def subscribe(self, prefix: str, callback: Any) -> None:
        self.callbacks.setdefault(prefix, []).append(callback)

    async def put(self, key: str, value: bytes | None, seen: bool = False) -> None:
        self.written.append((key, value))

    def read(self, key: str, value: bytes | None) -> None:
        for callback in self.callbacks.get(namespace(key), ()):
            callback(key, value)


class FakeRuntime:
    def __init__(self, waiting: list[Message] | None = None) -> None:
        self.paused = False
        self.waiting = waiting or []

    def pause(self) -> list[Message]:
        self.paused = True
        out, self.waiting = self.waiting, []
        return out

    def resume(self) -> None:
        self.paused = False


class AckingProducer:
    """Acknowledges (or fails) each write on the next loop turn."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.sent: list[tuple[str, list[tuple[str, bytes]]]] = []

    def send(self, topic: str, key: Any, value: Any, headers: Any, done: Any) -> None:
        self.sent.append((topic, headers))
        err = None
        if self.fail:
            self.fail -= 1
            err = KafkaError(KafkaError._MSG_TIMED_OUT)
        asyncio.get_running_loop().call_soon(done, err)


def message(offset: int, tracker: PartitionTracker, headers: Any = None) -> Message:
    record = Record("gift", 0, offset, b"k", b'{"n":1}', 123, headers, tracker, offset)
    tracker.hold(offset, 1)
    return Message(record, "medal", "revenue")


def pauses_with(
    runtime: FakeRuntime, producer: AckingProducer
) -> tuple[CallerPauses, FakeControl, Settler]:
    control = FakeControl()
    settler = Settler(CONFIG, producer, Stats({"medal": "revenue"}))  # type: ignore[arg-type]
    pauses = CallerPauses(
        CONFIG,
        control,  # type: ignore[arg-type]
        {"medal": runtime},  # type: ignore[dict-item]
        settler.write_parked,
        {},
    )
    settler.set_aside = pauses.set_aside
    return pauses, control, settler


def state(paused: bool, rid: str) -> bytes:
    return orjson.dumps({"paused": paused, "reason": "r", "id": rid})


def test_a_set_aside_delivery_is_written_once_to_the_parked_topic_and_settled_on_the_ack() -> None:
    """Given a paused caller's delivery, when it is set aside and the first write fails,
    then its offset stays held until a write to the parked topic is acknowledged, and the
    record says tier parked, attempt 1, caller paused."""

    async def scenario() -> None:
        producer = AckingProducer(fail=1)
        pauses, _, settler = pauses_with(FakeRuntime(), producer)
        tracker = PartitionTracker(("gift", 0))
        settler.park(message(7, tracker), "caller paused")  # the pipeline's call today
        await asyncio.sleep(0.05)
        assert tracker.committable() == 7, "held while the write is not acknowledged"
        await asyncio.sleep(0.7)  # the settler's backoff
        assert tracker.committable() == 8
        assert [topic for topic, _ in producer.sent] == ["g.parked", "g.parked"]
        info = h.decode(producer.sent[-1][1])
        assert (info.tier, info.attempt, info.error_type, info.caller) == (
            "parked",
            1,
            "CallerPaused",
            "medal",
        )
        assert (info.origin_topic, info.origin_offset) == ("gift", 7)
        assert pauses.backlog() == {"medal": 1}

    asyncio.run(scenario())


def test_a_retry_delivery_set_aside_keeps_its_attempt_and_not_before_time() -> None:
    """Given a delivery read back from the fast tier (attempt 3, due at t=5000), when it
    is set aside, then the parked record keeps attempt, error and not-before; only the
    tier changes."""

    async def scenario() -> None:
        producer = AckingProducer()
        pauses, _, _ = pauses_with(FakeRuntime(), producer)
        retry = PartitionTracker(("g.retry.fast", 1))
        info = h.FailureInfo(
            "medal", "revenue", 3, "deliver", "KeyError", "'x'", "tb", 1000, 5000,
            "gift", 0, 41, 123, "fast",
        )  # fmt: skip
        record = Record("gift", 0, 41, b"k", b"{}", 123, h.encode(info), retry, 9)
        retry.hold(9, 1)
        pauses.set_aside(Message(record, "medal", "revenue", 3))
        await asyncio.sleep(0.05)
        parked = h.decode(producer.sent[0][1])
        assert parked.tier == "parked"
        assert (parked.attempt, parked.not_before_ms, parked.error_type) == (3, 5000, "KeyError")
        assert retry.committable() == 10

    asyncio.run(scenario())


def test_a_pause_read_from_the_control_topic_pauses_here_and_sets_aside_the_waiting() -> None:
    """Given two deliveries waiting in the caller's queue, when another instance's pause
    record is read, then the caller is paused here and both are set aside; when its
    resume record is read, the caller runs again and its backlog count starts over."""

    async def scenario() -> None:
        tracker = PartitionTracker(("gift", 0))
        runtime = FakeRuntime([message(1, tracker), message(2, tracker)])
        producer = AckingProducer()
        pauses, control, _ = pauses_with(runtime, producer)
        control.read("medal", state(True, "other-1"))
        assert runtime.paused and pauses.paused() == {"medal": "r"}
        await asyncio.sleep(0.05)
        assert len(producer.sent) == 2 and tracker.committable() == 3
        assert pauses.backlog() == {"medal": 2}
        control.read("medal", state(False, "other-2"))
        assert not runtime.paused and pauses.backlog() == {"medal": 0}

    asyncio.run(scenario())


def test_records_older_than_our_own_write_do_not_flap_the_caller() -> None:
    """Given a pause made here (applied at once, its record not read back yet), when an
    older resume record is read, then the caller stays paused; once our own record is
    read back, later records of other instances apply again."""

    async def scenario() -> None:
        runtime = FakeRuntime()
        pauses, control, _ = pauses_with(runtime, AckingProducer())
        await pauses.pause("medal", "operator")
        assert runtime.paused
        key, ours = control.written[-1]
        assert key == "medal" and orjson.loads(ours or b"")["paused"] is True
        control.read("medal", state(False, "older"))
        assert runtime.paused, "an older record is not applied over our own"
        control.read("medal", ours)
        assert runtime.paused
        control.read("medal", state(False, "newer"))
        assert not runtime.paused

    asyncio.run(scenario())


def test_namespaces_split_on_the_first_slash() -> None:
    assert namespace("medal") == ""
    assert namespace("fan.medal-2") == ""
    assert namespace("skip/gift/0/5") == "skip/"
    assert namespace("parked/medal") == "parked/"


def test_unpark_reads_a_records_caller_as_its_re_drive_will() -> None:
    """A parked record with two caller headers (a hostile producer's) is selected for the
    caller its re-drive goes to: the last one, as the retry tier reads it."""
    from shunter.settle.unpark import caller_of

    info = h.FailureInfo(
        caller="medal", category="revenue", attempt=1, stage="deliver", error_type="",
        error="", traceback="", first_failure_ms=0, not_before_ms=0, origin_topic="gift",
        origin_partition=0, origin_offset=1, origin_timestamp_ms=0, tier="parked",
    )
    headers: list[Any] = [(h.CALLER, b"rank"), *h.encode(info), (h.CALLER, None)]
    assert caller_of(headers) == b"medal" == h.decode(headers).caller.encode()
