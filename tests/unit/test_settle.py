"""Settling: the route an outcome takes, and a failed write that keeps its offset held."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from confluent_kafka import KafkaError

from shunter.commit.tracker import PartitionTracker
from shunter.config import parse_config
from shunter.deliver.failure import failure
from shunter.message import Message, Record
from shunter.observe.stats import Stats
from shunter.outcome import DeadLettered, Failed
from shunter.settle import Settler, route
from shunter.settle import headers as h

CONFIG = parse_config(
    {
        "topics": {"gift": {}},
        "categories": {"revenue": {"topics": ["gift"]}},
        "subscribers": [{"caller": "medal", "category": "revenue", "handler": "x:y"}],
        "retry": {"fast": {"attempts": 3, "delay": "1s"}, "slow": {"attempts": 5, "delay": "5m"}},
    }
)


def test_attempts_go_fast_three_times_then_slow_five_times_then_dead_letter() -> None:
    failed = Failed("KeyError", "'effect'", "tb")
    tiers = [route(CONFIG.retry, attempt, failed).tier for attempt in range(1, 11)]
    assert tiers == ["fast"] * 3 + ["slow"] * 5 + ["dlq", "dlq"]
    assert route(CONFIG.retry, 1, failed).next_attempt == 2
    assert route(CONFIG.retry, 4, failed).delay == 300.0


def test_retry_later_delay_and_dead_letter_and_deferral() -> None:
    assert route(CONFIG.retry, 1, Failed("RetryLater", "", "", delay=7.0)).delay == 7.0
    assert route(CONFIG.retry, 1, DeadLettered("bad", "DeadLetter")).tier == "dlq"
    deferred = Failed("CircuitOpen", "open", "", delay=2.0, counts=False)
    assert (
        route(CONFIG.retry, 1, deferred).tier,
        route(CONFIG.retry, 1, deferred).next_attempt,
    ) == ("fast", 1)
    assert route(CONFIG.retry, 6, deferred).tier == "slow"
    assert route(CONFIG.retry, 6, deferred).next_attempt == 6


class FlakyProducer:
    """Fails the first ``failures`` writes the way a broker would, then acknowledges."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.sent: list[tuple[str, list[tuple[str, bytes]]]] = []

    def send(
        self, topic: str, key: Any, value: Any, headers: Any, done: Any, partition: Any = None
    ) -> None:
        self.sent.append((topic, headers))
        err = None
        if self.failures:
            self.failures -= 1
            err = KafkaError(KafkaError._MSG_TIMED_OUT)
        asyncio.get_running_loop().call_soon(done, err)


def test_a_failed_write_keeps_the_offset_held_until_a_write_succeeds() -> None:
    async def scenario() -> None:
        producer = FlakyProducer(failures=2)
        settler = Settler(CONFIG, producer, Stats({"medal": "revenue"}))  # type: ignore[arg-type]
        tracker = PartitionTracker(("gift", 0))
        record = Record("gift", 0, 41, b"k", b'{"a":1}', 123, [("trace", b"t1")], tracker, 41)
        tracker.hold(41, 1)
        tracker.hold(42, 0)
        settler(Message(record, "medal", "revenue"), Failed("KeyError", "'x'", "tb"), 0.01)
        await asyncio.sleep(0.1)
        assert tracker.committable() == 41, "nothing is committed past a failed write"
        await asyncio.sleep(2.0)  # backoff 0.5 s, then 1 s
        assert len(producer.sent) == 3
        assert tracker.committable() == 43
        topic, headers = producer.sent[-1]
        info = h.decode(headers)
        assert topic == CONFIG.fast_topic
        assert (info.caller, info.attempt, info.origin_offset, info.tier) == (
            "medal",
            2,
            41,
            "fast",
        )
        assert ("trace", b"t1") in headers, "the record's own headers travel with it"

    asyncio.run(scenario())


def test_repeats_of_a_known_failure_are_logged_once_per_interval_with_how_many_were_not(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Given one handler failing the same way on 12 deliveries, when they are settled,
    then the first is logged with its traceback, the first repeat in a line, and the
    others within the interval only counted, their number said when the interval is over;
    a repeat after that is logged again, and at shutdown the ones not said yet are said.
    Every failure is still counted (/stats) and written (its record carries its
    traceback): only the log is quieter. The demo's digest, counting failures from the
    log, adds up to 12."""
    from shunter.demo.logdigest import LogDigest
    from shunter.settle import settler as settler_module

    monkeypatch.setattr(settler_module, "REPEAT_LOG_EVERY", 0.2)
    digest = LogDigest()
    logging.getLogger().addHandler(digest)

    async def scenario() -> tuple[Stats, FlakyProducer]:
        producer = FlakyProducer(failures=0)
        stats = Stats({"medal": "revenue"})
        settler = Settler(CONFIG, producer, stats)  # type: ignore[arg-type]
        tracker = PartitionTracker(("gift", 0))

        def fail(offset: int) -> None:
            record = Record("gift", 0, offset, b"k", b"{}", 1, None, tracker, offset)
            tracker.hold(offset, 1)
            try:
                raise KeyError("effect")
            except KeyError as exc:
                outcome = failure(exc)
            settler(Message(record, "medal", "revenue"), outcome, 0.001)

        for offset in range(10):
            fail(offset)
        await asyncio.sleep(0.3)  # the interval is over: the 8 not logged are said
        await asyncio.sleep(0.25)  # and the next one is over, with nothing in it
        fail(10)
        fail(11)
        settler.flush_repeats()  # shutdown
        await asyncio.sleep(0.05)
        return stats, producer

    with caplog.at_level(logging.INFO, logger="shunter.settle"):
        try:
            stats, producer = asyncio.run(scenario())
        finally:
            logging.getLogger().removeHandler(digest)
    lines = [r.getMessage() for r in caplog.records if r.name == "shunter.settle"]
    assert len(lines) == 5, lines
    assert "Traceback" in lines[0] and "gift[0]@0 " in lines[0]
    assert "gift[0]@1 " in lines[1] and "more" not in lines[1]
    assert "failed 8 more times with KeyError at" in lines[2]
    assert "gift[0]@10 " in lines[3]
    assert "failed 1 more times with KeyError at" in lines[4]
    assert len(producer.sent) == 12
    assert stats.deliveries[("gift", "medal", "fast")] == 12
    assert digest.failures["medal"] == 12


def test_a_failure_whose_write_breaks_every_time_is_dead_lettered_as_a_stub(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given a record whose own headers make every full write raise (a bug, or headers
    no one foresaw) and a trace-context hook that always raises, when its delivery fails,
    then a dead-letter stub naming it is written (no payload, no record headers) and its
    offset released once the broker has it: settling never raises, nothing stays held."""

    def hook() -> list[tuple[str, bytes]]:
        raise RuntimeError("a bug in the tracing hook")

    async def scenario() -> tuple[PartitionTracker, FlakyProducer]:
        producer = FlakyProducer(failures=0)
        settler = Settler(CONFIG, producer, Stats({"medal": "revenue"}),  # type: ignore[arg-type]
                          extra_headers=hook)
        tracker = PartitionTracker(("gift", 0))
        bad_headers: Any = [(b"not-a-str", b"v")]  # startswith(str) raises on bytes
        record = Record("gift", 0, 5, b"k", b"{}", 1, bad_headers, tracker, 5)
        tracker.hold(5, 1)
        settler(Message(record, "medal", "revenue"), Failed("KeyError", "'x'", "tb"), 0.01)
        await asyncio.sleep(0.05)
        return tracker, producer

    tracker, producer = asyncio.run(scenario())
    [(topic, headers)] = producer.sent
    found = dict(headers)
    assert topic == CONFIG.dlq_topic
    assert found[h.STAGE] == b"internal" and h.PAYLOAD_OMITTED in found
    assert tracker.committable() == 6


def test_an_attempt_header_below_one_reads_as_the_first_attempt() -> None:
    """A retry record claiming attempt -5 (a hostile producer's) counts as attempt 1, so
    its retries still end in the dead-letter topic after the configured attempts."""
    info = h.FailureInfo(
        caller="medal", category="revenue", attempt=1, stage="deliver", error_type="",
        error="", traceback="", first_failure_ms=0, not_before_ms=0, origin_topic="gift",
        origin_partition=0, origin_offset=1, origin_timestamp_ms=0, tier="fast",
    )
    headers = [(k, b"-5" if k == h.ATTEMPT else v) for k, v in h.encode(info)]
    assert h.decode(headers).attempt == 1
