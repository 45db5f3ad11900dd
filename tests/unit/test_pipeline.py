"""The pipeline's commit invariant, on a real event loop with a fake consumer and a fake
journal: whatever arrives — a crashed owner's suspects followed by the rest of the
stream, batches still waiting for their journal record when their partition is lost and
assigned again — no consumed offset is ever committed past without having been
delivered to every subscriber."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

import shunter
from shunter.classify import Router
from shunter.commit.tracker import PartitionTracker
from shunter.config import parse_config
from shunter.crashguard.guard import CrashGuard
from shunter.crashguard.journal import Entry, PartitionState
from shunter.decode import build_decoders
from shunter.deliver import SubscriberRuntime
from shunter.message import Message, Record, deliveries
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


class KMsg:
    """What the pipeline reads of a confluent-kafka Message."""

    def __init__(self, offset: int, partition: int = 0) -> None:
        self._offset = offset
        self._partition = partition

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return f"u{self._offset % 5}".encode()

    def value(self) -> bytes:
        return orjson.dumps({"n": self._offset})

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000)

    def headers(self) -> None:
        return None


class EndKMsg(KMsg):
    """The consumer's end-of-partition event (``enable.partition.eof``) at ``offset``."""

    def error(self) -> Any:
        from confluent_kafka import KafkaError

        return KafkaError(KafkaError._PARTITION_EOF)


def batch(offsets: range, partition: int = 0) -> list[Any]:
    return [KMsg(o, partition) for o in offsets]


class FakeSource:
    """The consumer thread's controls, recorded; it keeps each partition's fetch position
    as librdkafka does: a pause never rewinds, a resume goes on after the last message
    handed out."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.paused: set[tuple[str, int]] = set()
        self.position: dict[int, int] = {}

    def fetch(self, partition: int, count: int) -> list[Any]:
        start = self.position.get(partition, 0)
        self.position[partition] = start + count
        return batch(range(start, start + count), partition)

    def pause_partition(self, tp: tuple[str, int]) -> None:
        self.paused.add(tp)

    def resume_partition(self, tp: tuple[str, int]) -> None:
        self.paused.discard(tp)

    def commit(self, offsets: list[Any]) -> None:
        pass


class FakeProducer:
    """The journal's producer: acknowledgements at once, or when released. It keeps
    every record with whether the broker has acknowledged it."""

    def __init__(self) -> None:
        self.hold_acks = False
        self.unacked: list[Callable[[], None]] = []
        self.records: list[list[Any]] = []  # [tp, Entry, acknowledged]

    def send(self, topic: str, key: bytes, value: bytes, headers: Any,
             done: Callable[[Any], None]) -> None:
        t, _, p = key.decode().rpartition(":")
        entry = [(t, int(p)), Entry.decode(value), False]
        self.records.append(entry)

        def ack() -> None:
            entry[2] = True
            done(None)

        if self.hold_acks:
            self.unacked.append(ack)
        else:
            asyncio.get_running_loop().call_soon(ack)


class TierProducer:
    """The retry tiers' and dead-letter topic's producer: every write acknowledged."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[tuple[str, bytes]]]] = []

    def send(self, topic: str, key: Any, value: Any, headers: list[tuple[str, bytes]],
             done: Callable[[Any], None], partition: int | None = None) -> None:
        self.sent.append((topic, headers))
        asyncio.get_running_loop().call_soon(done, None)


class FakeJournal(CrashGuard):
    """The real crash guard over a fake producer; assignments recover what a test says."""

    def __init__(self) -> None:
        self.producer_ = FakeProducer()
        super().__init__(self.producer_, "journal", {}, 1000)  # type: ignore[arg-type]
        self.recovered: dict[tuple[str, int], PartitionState] = {}
        self.uncovered: list[str] = []  # deliveries the journal did not name

    @property
    def hold_acks(self) -> bool:
        return self.producer_.hold_acks

    @hold_acks.setter
    def hold_acks(self, value: bool) -> None:
        self.producer_.hold_acks = value

    def release_acks(self) -> None:
        acks, self.producer_.unacked = self.producer_.unacked, []
        for ack in acks:
            ack()

    @property
    def records(self) -> list[tuple[tuple[str, int], Entry]]:
        return [(tp, entry) for tp, entry, _ in self.producer_.records]

    def last(self, tp: tuple[str, int]) -> Entry:
        """What a compacted journal keeps of ``tp``: its last record."""
        return [entry for key, entry in self.records if key == tp][-1]

    def check(self, tp: tuple[str, int], offset: int) -> None:
        """At a delivery: whichever record ends up last — the last acknowledged one or any
        written after it — must name ``offset``, or a crash now would blame nobody."""
        mine = [(entry, acked) for key, entry, acked in self.producer_.records if key == tp]
        acked_at = max((i for i, (_, acked) in enumerate(mine) if acked), default=None)
        if acked_at is None:
            self.uncovered.append(f"{tp}@{offset}: no record acknowledged")
            return
        for entry, _ in mine[acked_at:]:
            names = (entry.offset == offset if entry.mode == "single"
                     else entry.mode == "batch" and entry.lo <= offset <= entry.lease)
            if not names:
                self.uncovered.append(f"{tp}@{offset}: last word could be {entry}")

    async def recover(self, tps: list[Any], committed: dict[Any, int],
                      owned: Any = None) -> dict[Any, Any]:
        self.forget(tps)
        out = {tp: self.recovered.pop(tp, PartitionState()) for tp in tps}
        self.states.update(out)
        return out


def build(
    journal: FakeJournal | None, hook: Callable[[Message], Any] | None = None
) -> tuple[Pipeline, list[tuple[int, int]], list[BaseException]]:
    """The pipeline with one subscriber that records each delivery; ``hook(msg)``, if
    given, is what the handler returns after (a coroutine: it suspends there)."""
    config = parse_config({
        "kafka": {"bootstrap_servers": "127.0.0.1:1", "group_id": "g"},
        "topics": {TOPIC: {}},
        "categories": {"revenue": {"topics": [TOPIC]}},
        "subscribers": [{"caller": "medal", "category": "revenue", "handler": "m:f"}],
        "admin": {"listen": None},
    })
    stats = Stats({"medal": "revenue"})
    settler = Settler(config, TierProducer(), stats)  # type: ignore[arg-type]
    delivered: list[tuple[int, int]] = []

    def medal(msg: Message) -> Any:
        if journal is not None:
            journal.check((msg.topic, msg.partition), msg.offset)
        delivered.append((msg.partition, msg.offset))
        return None if hook is None else hook(msg)

    runtimes = {"medal": SubscriberRuntime("medal", medal, settler)}
    pipeline = Pipeline(config, build_decoders(config), Router(config), runtimes, settler, stats,
                        journal)  # type: ignore[arg-type]
    pipeline.source = FakeSource(pipeline)
    errors: list[BaseException] = []
    asyncio.get_running_loop().set_exception_handler(
        lambda loop, context: errors.append(context.get("exception") or RuntimeError(context)))
    return pipeline, delivered, errors


async def settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0.01)


def assert_nothing_skipped(pipeline: Pipeline, delivered: list[tuple[int, int]],
                           consumed: range, partition: int = 0) -> None:
    tp = (TOPIC, partition)
    tracker = pipeline.tracker.partitions[tp]
    missing = sorted(set(consumed) - {o for p, o in delivered if p == partition})
    assert not missing or tracker.committable() <= missing[0], (
        f"{tp}: commit offered at {tracker.committable()} past undelivered offsets "
        f"{missing[:10]}"
    )


def test_the_stream_after_a_crashed_owners_window_is_not_skipped() -> None:
    """Given a partition whose previous owner died with offsets 64..66 in flight (the
    journal says so), and the group resuming at 64,
    when one batch brings 64..70 (the window and what follows it) and the next 71..74,
    then the window is re-run, and 67..70 are either delivered or read again: the commit
    is never offered past an offset that was not delivered."""

    async def scenario() -> None:
        journal = FakeJournal()
        pipeline, delivered, errors = build(journal)
        journal.recovered[TP] = PartitionState(suspects_hi=66)
        await pipeline.assigned([TP], {TP: 64})
        pipeline.handle_batch(batch(range(64, 71)))
        await settle()
        pipeline.handle_batch(batch(range(71, 75)))
        await settle()
        assert not errors
        assert {(0, 64), (0, 65), (0, 66)} <= set(delivered)
        assert_nothing_skipped(pipeline, delivered, range(64, 75))
        assert {o for p, o in delivered if p == 0} == set(range(64, 75)), "none left behind"
        assert not pipeline.source.paused, "the partition is fetched again"
        assert not journal.uncovered, journal.uncovered

    asyncio.run(scenario())


def test_batches_waiting_for_the_journal_when_their_partition_is_lost_are_not_replayed() -> None:
    """Given batches 0..49 and 50..75 waiting for their journal record,
    when the partition is lost and assigned again to this instance (nothing committed,
    so the consumer reads it again from 0), and only then the old journal records are
    acknowledged,
    then no batch is refused half-way (no "held after" error), and the commit is never
    offered past an offset that was not delivered."""

    async def scenario() -> None:
        journal = FakeJournal()
        pipeline, delivered, errors = build(journal)
        await pipeline.assigned([TP], {})
        journal.hold_acks = True
        pipeline.handle_batch(batch(range(0, 50)))
        pipeline.handle_batch(batch(range(50, 76)))
        await pipeline.revoked([TP], lost=True)
        await pipeline.assigned([TP], {TP: -1})
        journal.hold_acks = False
        journal.release_acks()  # the stale batches' records are acknowledged late
        await settle()
        for offsets in (range(0, 50), range(50, 100), range(100, 150)):  # read again from 0
            pipeline.handle_batch(batch(offsets))
            await settle()
        assert_nothing_skipped(pipeline, delivered, range(0, 150))
        assert not errors, errors
        assert not journal.uncovered, journal.uncovered

    asyncio.run(scenario())


def test_a_batch_that_waited_for_the_journal_across_a_park_does_not_break_the_partition(
) -> None:
    """Given partition 0 resuming with crash suspects 64..66 and partition 1 healthy,
    when one batch brings 64..70 of partition 0, the next (fetched before partition 0's
    pause took effect) brings 71..84 of partition 0 with 0..9 of partition 1 and waits
    for partition 1's journal record until the suspects are done, and the consumer then
    carries on from wherever partition 0 was left,
    then no batch is refused half-way, and on neither partition is the commit offered
    past an offset that was not delivered."""

    async def scenario() -> None:
        journal = FakeJournal()
        pipeline, delivered, errors = build(journal)
        source = pipeline.source
        journal.recovered[TP] = PartitionState(suspects_hi=66)
        await pipeline.assigned([TP, (TOPIC, 1)], {TP: 64, (TOPIC, 1): 0})
        source.position[0] = 64
        first = source.fetch(0, 7)
        second = source.fetch(0, 14) + source.fetch(1, 10)  # fetched before the pause
        pipeline.handle_batch(first)  # holds partition 0 from 67 until the suspects are done
        journal.hold_acks = True
        pipeline.handle_batch(second)
        await settle()  # the suspects run and finish meanwhile
        journal.hold_acks = False
        journal.release_acks()
        await settle()
        for _ in range(3):  # the consumer goes on from its position
            pipeline.handle_batch(source.fetch(0, 10) + source.fetch(1, 10))
            await settle()
        assert_nothing_skipped(pipeline, delivered, range(64, source.position[0]), 0)
        assert_nothing_skipped(pipeline, delivered, range(0, source.position[1]), 1)
        assert {o for p, o in delivered if p == 0} == set(range(64, source.position[0]))
        assert not errors, errors
        assert not journal.uncovered, journal.uncovered

    asyncio.run(scenario())


def test_without_the_crash_guard_every_consumed_offset_is_delivered_before_it_is_passed() -> None:
    """Given no crash guard, when batches arrive and their deliveries settle, then the
    commit reaches one past the last offset exactly when every offset was delivered."""

    async def scenario() -> None:
        pipeline, delivered, errors = build(None)
        await pipeline.assigned([TP], {})
        for offsets in (range(0, 40), range(40, 90)):
            pipeline.handle_batch(batch(offsets))
        await settle()
        assert not errors
        assert sorted(delivered) == [(0, o) for o in range(90)]
        assert pipeline.tracker.partitions[TP].committable() == 90

    asyncio.run(scenario())


def test_the_journal_covers_every_batch_waiting_since_the_assignment() -> None:
    """Given a partition just assigned (nothing processed yet),
    when batches 0..49 and 50..99 both arrive before the first journal record is
    acknowledged,
    then the journal's last record of the partition (all a compacted topic keeps) covers
    both batches: a crash while 0..49 runs must make those offsets suspects too."""

    async def scenario() -> None:
        journal = FakeJournal()
        pipeline, _, errors = build(journal)
        await pipeline.assigned([TP], {})
        journal.hold_acks = True
        pipeline.handle_batch(batch(range(0, 50)))
        pipeline.handle_batch(batch(range(50, 100)))
        last = journal.last(TP)
        assert (last.mode, last.lo, last.hi) == ("batch", 0, 99) and last.lease > 99, last
        journal.hold_acks = False
        journal.release_acks()
        await settle()
        assert not errors, errors
        assert not journal.uncovered, journal.uncovered

    asyncio.run(scenario())


def test_what_waited_behind_crash_suspects_is_journaled_before_it_runs() -> None:
    """Given a partition resuming with crash suspects 64..66 and the stream behind them
    held while they run alone,
    when the suspects are done and the held messages 67..84 are released,
    then before the first of them is delivered the journal's last record covers them all
    (a crash among them makes them suspects), and once they are through nothing is
    left undelivered."""

    async def scenario() -> None:
        journal = FakeJournal()
        pipeline, delivered, errors = build(journal)
        source = pipeline.source
        journal.recovered[TP] = PartitionState(suspects_hi=66)
        await pipeline.assigned([TP], {TP: 64})
        source.position[0] = 64
        pipeline.handle_batch(source.fetch(0, 7))
        pipeline.handle_batch(source.fetch(0, 14))  # fetched before the pause landed
        await settle()
        assert {o for _, o in delivered} == set(range(64, 85))
        assert not journal.uncovered, journal.uncovered
        assert not errors, errors
        assert not journal.uncovered, journal.uncovered

    asyncio.run(scenario())


def test_crash_suspects_run_alone_only_after_the_deliveries_already_running() -> None:
    """Given sandboxes off and a delivery of partition 1 suspended in its handler, when
    partition 0 is assigned with crash suspects 64..65 (its last owner died), then no
    ``single`` record is written while that delivery is in its handler: were it a pill,
    its death would be blamed on the suspect the record names, an innocent. Once it is
    done, the suspects run alone, and then everything else."""

    async def scenario() -> None:
        journal = FakeJournal()
        release = asyncio.Event()
        singles_meanwhile: list[Entry] = []

        async def in_handler() -> None:
            await release.wait()
            singles_meanwhile.extend(e for _, e in journal.records if e.mode == "single")

        pipeline, delivered, errors = build(
            journal, lambda msg: in_handler() if msg.partition == 1 else None
        )
        p1 = (TOPIC, 1)
        await pipeline.assigned([p1], {})
        pipeline.handle_batch(batch(range(0, 1), partition=1))
        await settle()
        assert delivered == [(1, 0)], "partition 1's delivery is in its handler"
        journal.recovered[TP] = PartitionState(runs=[[64, 65, 1]], suspects_hi=65)
        await pipeline.assigned([TP], {TP: 64})
        pipeline.handle_batch(batch(range(64, 70)))
        await settle()
        assert not [e for _, e in journal.records if e.mode == "single"], (
            "a suspect was named the one in a handler while another delivery was"
        )
        assert {o for p, o in delivered if p == 0} == set(), "no suspect ran meanwhile"
        release.set()
        await settle()
        assert not singles_meanwhile
        assert [e.offset for _, e in journal.records if e.mode == "single"] == [64, 65]
        assert {o for p, o in delivered if p == 0} == set(range(64, 70))
        assert_nothing_skipped(pipeline, delivered, range(64, 70))
        assert not errors, errors
        assert not journal.uncovered, journal.uncovered

    asyncio.run(scenario())


def test_crash_suspects_do_not_wait_for_ever_for_a_handler_that_ignores_its_timeout() -> None:
    """Given sandboxes off and a delivery of partition 1 whose handler swallows the
    cancellation of its 0.2 s timeout and never returns, when partition 0 is assigned
    with crash suspects, then they run alone all the same once the timeout and a second
    have passed: every partition waits behind them, so no handler may hold them for
    ever."""

    async def scenario() -> None:
        journal = FakeJournal()
        stop = False

        async def stubborn() -> None:
            while not stop:
                try:
                    await asyncio.sleep(0.05)
                except asyncio.CancelledError:
                    continue

        pipeline, delivered, errors = build(
            journal, lambda msg: stubborn() if msg.partition == 1 else None
        )
        pipeline.runtimes["medal"].timeout = 0.2
        p1 = (TOPIC, 1)
        try:
            await pipeline.assigned([p1], {})
            # Offset 3's key is none of 64..67's: a handler stuck on a key holds that
            # key's later deliveries in order, suspects too (not this test's subject).
            pipeline.handle_batch(batch(range(3, 4), partition=1))
            await settle()
            assert delivered == [(1, 3)], "partition 1's delivery is in its handler"
            journal.recovered[TP] = PartitionState(runs=[[64, 65, 1]], suspects_hi=65)
            await pipeline.assigned([TP], {TP: 64})
            pipeline.handle_batch(batch(range(64, 68)))
            await asyncio.sleep(0.3)  # past the handler's timeout, within the bound
            assert {o for p, o in delivered if p == 0} == set(), "waiting, within the bound"
            await asyncio.sleep(1.5)
            assert {o for p, o in delivered if p == 0} == set(range(64, 68))
        finally:
            stop = True
        await settle()
        assert not errors, errors

    asyncio.run(scenario())


def test_batches_within_the_lease_run_without_waiting_and_every_delivery_stays_named() -> None:
    """Given a partition whose first record (0..9 and a lease past it) is acknowledged,
    when the broker then stops acknowledging and batches 10..49 and 50..129 arrive, then
    10..49 (within the lease, past its half) are delivered at once and a renewal is
    written ahead, and 50..129 (past the lease) wait for their record; at every
    delivery whichever record ends up last names it, and nothing is skipped once the
    acknowledgements come."""

    async def scenario() -> None:
        journal = FakeJournal()
        pipeline, delivered, errors = build(journal)
        await pipeline.assigned([TP], {})
        pipeline.handle_batch(batch(range(0, 10)))
        await settle()
        assert {o for _, o in delivered} == set(range(10))
        first = journal.last(TP)
        assert first.hi == 9 and 49 <= first.lease < 129, first
        journal.hold_acks = True
        writes = len(journal.records)
        pipeline.handle_batch(batch(range(10, 50)))
        await settle()
        assert {o for _, o in delivered} == set(range(50)), "within the lease: at once"
        assert len(journal.records) == writes + 1, "the lease renewed ahead, once"
        pipeline.handle_batch(batch(range(50, 130)))
        await settle()
        assert max(o for _, o in delivered) == 49, "past the lease: waits for its record"
        journal.hold_acks = False
        journal.release_acks()
        await settle()
        assert {o for _, o in delivered} == set(range(130))
        assert_nothing_skipped(pipeline, delivered, range(130))
        assert not errors, errors
        assert not journal.uncovered, journal.uncovered

    asyncio.run(scenario())


def test_a_dead_owners_lease_past_the_end_of_a_quiet_partition_holds_nothing_up() -> None:
    """Given sandboxes off and a partition whose dead owner's last record named 64..163
    (64..70 run, the rest a lease past the end of the log), when 64..70 arrive followed
    by the end of the partition at 71, then 64..70 are re-run one at a time, the run ends
    there (no offset past the end is waited for or keeps a count), and partition 1's
    records, held back behind the suspects, are delivered; so are 71..75 when they come,
    in one batch, not as suspects."""

    async def scenario() -> None:
        journal = FakeJournal()
        pipeline, delivered, errors = build(journal)
        p1 = (TOPIC, 1)
        journal.recovered[TP] = PartitionState(runs=[[64, 163, 1]], suspects_hi=163)
        await pipeline.assigned([TP, p1], {TP: 64})
        pipeline.handle_batch(batch(range(64, 71)) + batch(range(0, 5), partition=1))
        await settle()
        assert {o for p, o in delivered if p == 1} == set(), "behind the suspects"
        pipeline.handle_batch([EndKMsg(71)])
        await settle()
        singles = [e.offset for _, e in journal.records if e.mode == "single"]
        assert singles == list(range(64, 71))
        assert {o for p, o in delivered if p == 0} == set(range(64, 71))
        assert {o for p, o in delivered if p == 1} == set(range(5))
        assert journal.states[TP].crashes(100) == 0, "past the end: never ran, no count"
        pipeline.handle_batch(batch(range(71, 76)))
        await settle()
        assert {o for p, o in delivered if p == 0} == set(range(64, 76))
        assert [e.offset for _, e in journal.records if e.mode == "single"] == singles
        assert not errors, errors
        assert not journal.uncovered, journal.uncovered

    asyncio.run(scenario())


def test_a_dead_owners_window_on_a_partition_with_nothing_left_ends_at_once() -> None:
    """Given sandboxes off and a dead owner's record naming 64..163 while the group
    committed 64 and the log ends there, when the consumer reports the end at 64 (no
    record comes), then the suspects' run ends with nothing re-run, and partition 1
    goes on."""

    async def scenario() -> None:
        journal = FakeJournal()
        pipeline, delivered, errors = build(journal)
        p1 = (TOPIC, 1)
        journal.recovered[TP] = PartitionState(runs=[[64, 163, 1]], suspects_hi=163)
        await pipeline.assigned([TP, p1], {TP: 64})
        pipeline.handle_batch(batch(range(0, 5), partition=1))
        await settle()
        assert delivered == []
        pipeline.handle_batch([EndKMsg(64)])
        await settle()
        assert {o for p, o in delivered if p == 1} == set(range(5))
        assert not [e for _, e in journal.records if e.mode == "single"]
        assert journal.last(TP).mode != "single"
        assert not errors, errors

    asyncio.run(scenario())


def test_a_window_ending_on_an_offset_no_consumer_is_given_ends_at_the_partitions_end() -> None:
    """Given sandboxes off and a dead owner's window 64..66 whose last offset is a
    transaction marker (records 64 and 65 only, then the end at 67), when they arrive,
    then the run ends at the end of the partition, and partition 1 goes on."""

    async def scenario() -> None:
        journal = FakeJournal()
        pipeline, delivered, errors = build(journal)
        p1 = (TOPIC, 1)
        journal.recovered[TP] = PartitionState(runs=[[64, 66, 1]], suspects_hi=66)
        await pipeline.assigned([TP, p1], {TP: 64})
        pipeline.handle_batch(batch(range(64, 66)) + batch(range(0, 5), partition=1))
        pipeline.handle_batch([EndKMsg(67)])
        await settle()
        assert {o for p, o in delivered if p == 0} == {64, 65}
        assert {o for p, o in delivered if p == 1} == set(range(5))
        assert not errors, errors

    asyncio.run(scenario())


class RetryKMsg(KMsg):
    """A record of the slow retry tier for the ``medal`` caller, due at ``not_before``."""

    def __init__(self, offset: int, topic: str, not_before_ms: int) -> None:
        super().__init__(offset, 0)
        self._topic = topic
        self._headers = h.encode(h.FailureInfo(
            caller="medal", category="revenue", attempt=2, stage="deliver",
            error_type="RuntimeError", error="boom", traceback="", first_failure_ms=1,
            not_before_ms=not_before_ms, origin_topic=TOPIC, origin_partition=0,
            origin_offset=1000 + offset, origin_timestamp_ms=1, tier="slow"))

    def topic(self) -> str:
        return self._topic

    def headers(self) -> Any:
        return self._headers


def test_suspects_whose_window_the_stream_has_passed_do_not_stall_the_instance() -> None:
    """Given suspects 10..12 on partition 0 but a fetch position already past them (the
    committed offset was unknown), when 20..29 arrive, then partition 0 goes on, and so
    does partition 1, whose messages waited behind the suspects."""

    async def scenario() -> None:
        journal = FakeJournal()
        pipeline, delivered, errors = build(journal)
        journal.recovered[TP] = PartitionState(suspects_hi=12)
        await pipeline.assigned([TP, (TOPIC, 1)], {})
        pipeline.handle_batch(batch(range(20, 30)) + batch(range(0, 5), partition=1))
        await settle()
        assert {o for p, o in delivered if p == 0} == set(range(20, 30))
        assert {o for p, o in delivered if p == 1} == set(range(5))
        assert not errors, errors
        assert not journal.uncovered, journal.uncovered

    asyncio.run(scenario())


async def slow_suspects(
    later: int,
) -> tuple[Pipeline, list[tuple[int, int]], list[BaseException], FakeJournal]:
    """The slow tier's partition with crash suspects 10..12 (a blamed one would be
    quarantined at once) and 13 behind them, all due at ``later`` (ms), read with five
    records of the source partition; settled."""
    journal = FakeJournal()
    journal.quarantine_after = 1
    pipeline, delivered, errors = build(journal)
    slow = pipeline.config.slow_topic
    tp = (slow, 0)
    journal.recovered[tp] = PartitionState(runs=[[10, 12, 1]], suspects_hi=12)
    await pipeline.assigned([tp, TP], {tp: 10})
    pipeline.handle_batch([RetryKMsg(o, slow, later) for o in range(10, 14)] + batch(range(0, 5)))
    await settle()
    return pipeline, delivered, errors, journal


def test_retry_suspects_not_yet_due_wait_unrun_and_lose_nothing() -> None:
    """Given the slow tier's partition with suspects 10..12 not due for five minutes (its
    dead owner held them, never ran them) and 13 behind them, when they arrive, then none of
    them runs or is quarantined, every other partition goes on, and all four still wait
    in order, none skipped past by the commit."""

    async def scenario() -> None:
        later = int(time.time() * 1000) + 300_000  # within the tier's rhythm: held
        pipeline, delivered, errors, journal = await slow_suspects(later)
        tp = (pipeline.config.slow_topic, 0)
        assert {o for p, o in delivered} == set(range(5)), "the source partition goes on"
        assert [m.offset() for m in pipeline.held.messages(tp) or []] == [10, 11, 12, 13]
        assert pipeline.tracker.partitions[tp].committable() <= 10
        assert not errors, errors
        assert not journal.uncovered, journal.uncovered

    asyncio.run(scenario())


def test_retry_suspects_due_in_an_hour_go_to_the_back_unrun_and_lose_nothing() -> None:
    """Given the slow tier's partition with suspects 10..12 due in an hour, far beyond the
    tier's rhythm, and 13 behind them, when they arrive, then none of them runs or is
    quarantined: each is written once to the back of the slow tier with its due time and
    origin, and the partition's commit passes them only after those writes."""

    async def scenario() -> None:
        later = int(time.time() * 1000) + 3_600_000
        pipeline, delivered, errors, journal = await slow_suspects(later)
        slow = pipeline.config.slow_topic
        tp = (slow, 0)
        assert {o for p, o in delivered} == set(range(5)), "only the source ran"
        producer = pipeline.settler._producer
        written = [dict(hs) for topic, hs in producer.sent if topic == slow]
        assert [d[h.ORIGIN_OFFSET] for d in written] == [b"1010", b"1011", b"1012", b"1013"]
        assert {d[h.NOT_BEFORE] for d in written} == {str(later).encode()}
        assert not [t for t, _ in producer.sent if t == pipeline.config.dlq_topic]
        assert pipeline.tracker.partitions[tp].committable() == 14
        assert not errors, errors
        assert not journal.uncovered, journal.uncovered

    asyncio.run(scenario())


def test_a_quarantined_offset_keeps_its_count_until_the_partition_is_committed_past_it() -> None:
    """Given suspects 10..12 where 10 has died twice (quarantine_after 2), when 10 is
    quarantined and 11 and 12 then run alone and live, then every record written since
    still counts 10's deaths: if the process dies before the commit passes 10, the next
    owner quarantines 10 again, unrun, instead of running the pill once more."""

    async def scenario() -> None:
        journal = FakeJournal()
        journal.quarantine_after = 2
        pipeline, delivered, errors = build(journal)
        journal.recovered[TP] = PartitionState(runs=[[10, 12, 1]], single={10: 1},
                                               suspects_hi=12)
        await pipeline.assigned([TP], {TP: 10})
        pipeline.handle_batch(batch(range(10, 16)))
        await settle()
        assert {o for _, o in delivered} == set(range(11, 16)), "10 never ran"
        after = [e for _, e in journal.records if e.mode != "batch" or e.lo <= 11]
        assert after and all(e.single.get(10, 0) >= 2 for e in after[1:]), after
        assert journal.last(TP).single.get(10, 0) >= 2
        assert not errors, errors
        assert not journal.uncovered, journal.uncovered

    asyncio.run(scenario())


def test_a_partition_whose_journal_cannot_be_read_runs_nothing_until_it_can(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given a journal that cannot be read at assignment (twice), whose record says the
    previous owner died with 64..66 in flight, when batches arrive meanwhile, then nothing
    of the partition runs and nothing of it is journaled (a record would bury the dead
    owner's, and with it the death); once the journal is read the window is re-run as
    crash suspects, then the rest, none skipped."""
    from shunter.crashguard import gate as gate_module
    from shunter.crashguard.guard import JournalUnreadable

    monkeypatch.setattr(gate_module, "REREAD_FIRST", 0.05)

    class Unreadable(FakeJournal):
        failures = 2

        async def recover(self, tps: list[Any], committed: dict[Any, int],
                          owned: Any = None) -> dict[Any, Any]:
            if self.failures:
                self.failures -= 1
                self.forget(tps)
                raise JournalUnreadable("KafkaException: topic authorization failed")
            return await super().recover(tps, committed, owned)

    async def scenario() -> None:
        journal = Unreadable()
        pipeline, delivered, errors = build(journal)
        journal.recovered[TP] = PartitionState(suspects_hi=66)
        journal.hold_acks = False
        await pipeline.assigned([TP], {TP: 64})
        pipeline.handle_batch(batch(range(64, 71)))
        await asyncio.sleep(0.02)  # before the second read (0.05 s): still unread
        assert delivered == [] and journal.records == []
        assert pipeline.source.paused == {TP}
        assert pipeline.gate.waiting() == {TP: gate_module.FOR_JOURNAL_READ}
        assert journal.failures == 1
        for _ in range(100):  # the second read fails too; the third (0.1 s later) works
            await asyncio.sleep(0.01)
            if len(delivered) >= 7:
                break
        pipeline.handle_batch(batch(range(71, 75)))
        await settle()
        assert not errors, errors
        assert journal.failures == 0
        assert [o for _, o in delivered][:3] == [64, 65, 66], "the window first"
        assert sorted(o for _, o in delivered) == list(range(64, 75))
        assert not pipeline.source.paused
        assert not journal.uncovered, journal.uncovered

    asyncio.run(scenario())


def test_the_end_of_a_partition_reached_while_its_journal_was_unreadable_still_ends_its_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given sandboxes off, a journal unreadable at assignment whose record names 64..163
    (a lease past the end), and the consumer reaching the end of the partition at 64
    (nothing left to read) while it is unread, when the journal is read, then the run
    ends at once (the end event waited for the read), so partition 1's records held
    back behind the suspects are delivered."""
    from shunter.crashguard import gate as gate_module
    from shunter.crashguard.guard import JournalUnreadable

    monkeypatch.setattr(gate_module, "REREAD_FIRST", 0.05)

    class Unreadable(FakeJournal):
        failures = 1

        async def recover(self, tps: list[Any], committed: dict[Any, int],
                          owned: Any = None) -> dict[Any, Any]:
            if self.failures and TP in tps:
                self.failures -= 1
                self.forget(tps)
                raise JournalUnreadable("KafkaException: broker transport failure")
            return await super().recover(tps, committed, owned)

    async def scenario() -> None:
        journal = Unreadable()
        pipeline, delivered, errors = build(journal)
        p1 = (TOPIC, 1)
        await pipeline.assigned([p1], {})
        journal.recovered[TP] = PartitionState(runs=[[64, 163, 1]], suspects_hi=163)
        await pipeline.assigned([TP], {TP: 64})
        pipeline.handle_batch([EndKMsg(64)])
        await asyncio.sleep(0.02)
        assert journal.failures == 0 and TP in pipeline.gate.waiting(), "unread"
        await asyncio.sleep(0.1)  # read again after 0.05 s
        pipeline.handle_batch(batch(range(0, 5), partition=1))
        await settle()
        assert not [e for _, e in journal.records if e.mode == "single"]
        assert {o for p, o in delivered if p == 1} == set(range(5)), "the run ended"
        assert not pipeline.source.paused
        assert not errors, errors

    asyncio.run(scenario())


def test_a_partition_revoked_while_its_journal_is_unreadable_is_dropped_unrun(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given a partition held because its journal cannot be read, with a batch waiting,
    when it is revoked and the journal then becomes readable, then nothing of it runs
    here, no state of it is kept, and the re-read ends: the next owner reads it."""
    from shunter.crashguard import gate as gate_module
    from shunter.crashguard.guard import JournalUnreadable

    monkeypatch.setattr(gate_module, "REREAD_FIRST", 0.05)

    class Unreadable(FakeJournal):
        failures = 1

        async def recover(self, tps: list[Any], committed: dict[Any, int],
                          owned: Any = None) -> dict[Any, Any]:
            if self.failures:
                self.failures -= 1
                self.forget(tps)
                raise JournalUnreadable("KafkaException: broker transport failure")
            return await super().recover(tps, committed, owned)

    async def scenario() -> None:
        journal = Unreadable()
        pipeline, delivered, errors = build(journal)
        await pipeline.assigned([TP], {TP: 0})
        pipeline.handle_batch(batch(range(0, 10)))
        await asyncio.sleep(0.01)
        assert pipeline.gate.waiting() == {TP: gate_module.FOR_JOURNAL_READ}
        await pipeline.revoked([TP], lost=False)
        await settle()  # the re-read is due meanwhile: the journal is readable by then
        assert not errors, errors
        assert delivered == [] and journal.records == []
        assert pipeline.gate.waiting() == {} and TP not in journal.states
        gate = pipeline.gate
        assert isinstance(gate, gate_module.JournalGate)
        assert gate._rereading is not None and gate._rereading.done()

    asyncio.run(scenario())


# -- retry records no handler can take, and handlers that meddle ---------------------------


class FastKMsg(RetryKMsg):
    """A record of the fast retry tier, due now, for ``caller``, with ``value`` as payload."""

    def __init__(self, offset: int, topic: str, caller: str, value: bytes = b'{"n":1}') -> None:
        super().__init__(offset, topic, 0)
        self._value = value
        self._headers = [
            (k, caller.encode() if k == h.CALLER else v) for k, v in self._headers
        ]

    def value(self) -> bytes:
        return self._value


def test_a_retry_record_of_a_caller_no_longer_configured_is_dead_lettered_once() -> None:
    """Given retry records of a caller since removed from the configuration (or named by a
    hostile producer) among retries of a configured one, when they are read, then each is
    written once to the dead-letter topic as UnknownCaller, and the retry partition's
    commit passes them all: nothing holds it (their offset was held twice, released once)."""

    async def scenario() -> None:
        pipeline, delivered, errors = build(None)
        fast = pipeline.config.fast_topic
        tp = (fast, 0)
        await pipeline.assigned([tp], {tp: 0})
        pipeline.handle_batch([FastKMsg(0, fast, "removed"), FastKMsg(1, fast, "medal"),
                               FastKMsg(2, fast, "removed")])
        await settle()
        producer = pipeline.settler._producer
        dead = [dict(hs) for topic, hs in producer.sent if topic == pipeline.config.dlq_topic]
        assert [d[h.ERROR_TYPE] for d in dead] == [b"UnknownCaller", b"UnknownCaller"]
        assert [d[h.CALLER] for d in dead] == [b"removed", b"removed"]
        # A name from a header is no statistics label: their number would be anyone's.
        assert "removed" not in {caller for _, caller, _ in pipeline.stats.deliveries}
        assert [o for _, o in delivered] == [1001]  # medal's retry: origin offset 1000 + 1
        tracker = pipeline.tracker.partitions[tp]
        assert not tracker.pending and tracker.committable() == 3
        assert not errors, errors

    asyncio.run(scenario())


def test_a_retry_due_in_days_of_a_caller_no_longer_configured_is_dead_lettered_not_cycled(
) -> None:
    """A slow-tier retry due in days for a removed caller is dead-lettered when read, not
    written to the back of the slow tier horizon after horizon until it is due."""

    async def scenario() -> None:
        pipeline, delivered, errors = build(None)
        slow = pipeline.config.slow_topic
        tp = (slow, 0)
        await pipeline.assigned([tp], {tp: 0})
        record = RetryKMsg(0, slow, int(time.time() * 1000) + 3 * 86_400_000)
        record._headers = [(k, b"removed" if k == h.CALLER else v) for k, v in record._headers]
        pipeline.handle_batch([record])
        await settle()
        sent = pipeline.settler._producer.sent
        assert [t for t, _ in sent] == [pipeline.config.dlq_topic]
        assert dict(sent[0][1])[h.ERROR_TYPE] == b"UnknownCaller"
        assert pipeline.tracker.partitions[tp].committable() == 1
        assert not delivered and not errors, errors

    asyncio.run(scenario())


def test_retry_records_no_handler_ran_do_not_trip_the_callers_flood_guard() -> None:
    """Given the flood guard on (window 10, more than half dead-lettered trips it) and 30
    fast-tier records naming ``medal`` whose payload is no JSON (a hostile producer), when
    they are read, then all 30 are dead-lettered unrun and medal is not paused: no
    handler of medal's ran, so none of it is medal's failure."""
    from shunter.config import FloodGuardConfig
    from shunter.observe.flood import FloodGuard

    async def scenario() -> None:
        pipeline, _, errors = build(None)
        flood = FloodGuard(FloodGuardConfig(window=10, max_share=0.5))
        paused: list[str] = []
        flood.pause = lambda caller, reason: paused.append(caller)
        pipeline.settler._flood = flood
        fast = pipeline.config.fast_topic
        tp = (fast, 0)
        await pipeline.assigned([tp], {tp: 0})
        pipeline.handle_batch([FastKMsg(o, fast, "medal", b"\xff not json") for o in range(30)])
        await settle()
        producer = pipeline.settler._producer
        assert len([t for t, _ in producer.sent if t == pipeline.config.dlq_topic]) == 30
        assert paused == [] and not flood.tripped
        assert pipeline.tracker.partitions[tp].committable() == 30
        assert not errors, errors

    asyncio.run(scenario())


def test_a_handler_cannot_reroute_its_delivery_by_assigning_to_its_message() -> None:
    """Given a handler that assigns ``msg.category = None`` (or caller, or attempt) and
    then fails, when it is delivered, then the assignment itself raises AttributeError in
    the handler, its delivery goes to the fast tier under its own caller and category,
    and the offset is released: before, the settler's write raised on the changed
    category, nothing was written and the partition's commit stopped there for good."""

    async def scenario() -> None:
        def meddle(msg: Message) -> None:
            name = ("category", "caller", "attempt")[msg.offset % 3]
            setattr(msg, name, None)
            raise RuntimeError("not reached")

        pipeline, _, errors = build(None, hook=meddle)
        await pipeline.assigned([TP], {TP: 0})
        pipeline.handle_batch(batch(range(3)))
        await settle()
        producer = pipeline.settler._producer
        fast = [dict(hs) for t, hs in producer.sent if t == pipeline.config.fast_topic]
        assert len(fast) == 3
        assert {(d[h.CALLER], d[h.CATEGORY], d[h.ATTEMPT]) for d in fast} == {
            (b"medal", b"revenue", b"2")
        }
        assert {d[h.ERROR_TYPE] for d in fast} == {b"AttributeError"}
        assert pipeline.tracker.partitions[TP].committable() == 3
        assert not errors, errors

    asyncio.run(scenario())


def test_a_records_deliveries_are_the_messages_its_constructor_would_build() -> None:
    """The pipeline builds a record's deliveries without ``Message.__init__`` (its hot
    path): each must read, print and refuse assignment as a constructed one does."""
    tracker = PartitionTracker(("gifts", 4))
    record = Record("gifts", 4, 17, b"u1", b'{"n":1}', 1_700, [("h", b"v")], tracker, 17)
    record.value = {"n": 1}
    pairs = [("medal", "revenue"), ("rank", "revenue"), ("task", "chores")]
    built = deliveries(record, pairs)
    assert [(m.caller, m.category) for m in built] == pairs
    for msg, (caller, category) in zip(built, pairs, strict=True):
        ref = Message(record, caller, category)
        for name in ("caller", "category", "attempt", "topic", "partition", "offset", "key",
                     "headers", "timestamp", "raw", "value"):
            assert getattr(msg, name) == getattr(ref, name), name
        assert repr(msg) == repr(ref) and msg.header("h") == b"v"
        with pytest.raises(AttributeError):
            msg.attempt = 2  # type: ignore[misc]


@patches_compiled
def test_a_failure_whose_counting_or_writing_breaks_is_still_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given the failure statistics raising (a bug) for one failed delivery and the
    retry record's header encoding raising for another, when both are settled, then the
    first is written to the fast tier all the same and the second to the dead-letter
    topic with stage internal; both offsets are released."""
    from shunter.settle import settler as settler_module

    async def scenario() -> None:
        def fail(msg: Message) -> None:
            raise RuntimeError(f"boom {msg.offset}")

        pipeline, _, errors = build(None, hook=fail)
        stats = pipeline.settler._stats
        real_failed, real_encode = stats.failed, h.encode
        calls = {"failed": 0, "encode": 0}

        def failed_once(*args: Any) -> None:
            calls["failed"] += 1
            if calls["failed"] == 1:
                raise KeyError("a bug in the statistics")
            real_failed(*args)

        def encode_second(info: h.FailureInfo) -> list[tuple[str, bytes]]:
            calls["encode"] += 1
            if calls["encode"] == 2:
                raise TypeError("a header no one foresaw")
            return real_encode(info)

        monkeypatch.setattr(stats, "failed", failed_once)
        monkeypatch.setattr(settler_module.h, "encode", encode_second)
        await pipeline.assigned([TP], {TP: 0})
        pipeline.handle_batch(batch(range(2)))
        await settle()
        producer = pipeline.settler._producer
        written = [(t, dict(hs)) for t, hs in producer.sent]
        assert [t for t, _ in written] == [pipeline.config.fast_topic, pipeline.config.dlq_topic]
        assert written[1][1][h.STAGE] == b"internal"
        assert pipeline.tracker.partitions[TP].committable() == 2
        assert not errors, errors

    asyncio.run(scenario())
