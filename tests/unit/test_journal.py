"""The crash guard's journal: what it names for sure while records are on their way, and
what the next owner makes of the last record."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import KafkaError

import shunter.crashguard.guard as guard_module
from shunter.crashguard.guard import CrashGuard
from shunter.crashguard.journal import Entry, PartitionState, recover

TP = ("gifts", 0)


class Producer:
    """Answers when told: ``answer(i, err)`` for the i-th record sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Callable[[Any], None]]] = []

    def send(self, topic: str, key: bytes, value: bytes, headers: Any,
             done: Callable[[Any], None]) -> None:
        self.sent.append((value, done))

    def answer(self, i: int, err: KafkaError | None = None) -> None:
        self.sent[i][1](err)


def record(hi: int) -> bytes:
    return PartitionState().encode("batch", 0, hi)


def test_only_what_every_possible_last_record_names_is_covered() -> None:
    async def scenario() -> list[int]:
        producer = Producer()
        guard = CrashGuard(producer, "journal", {}, 3)  # type: ignore[arg-type]
        guard.states[TP] = PartitionState()  # assigned
        seen = [guard.covered(TP)]
        guard.write(TP, record(99), 99, lambda err: None)
        seen.append(guard.covered(TP))  # nothing acknowledged yet
        guard.write(TP, record(199), 199, lambda err: None)
        producer.answer(0)
        seen.append(guard.covered(TP))  # 0..99 landed; 0..199 may or may not
        producer.answer(1)
        seen.append(guard.covered(TP))
        guard.write(TP, PartitionState().encode("clean", 200, -1), -1, lambda err: None)
        seen.append(guard.covered(TP))  # if the clean record lands, it names nothing
        return seen

    assert asyncio.run(scenario()) == [-1, -1, 99, 199, -1]


def test_a_failed_write_is_retried_with_the_newest_record() -> None:
    """Given records naming ..99 then ..199, when the first fails and the second lands,
    then the retry writes the newest record (the old one would become the last word and
    name less), and the first write's waiter is answered only once that is acknowledged."""

    async def scenario() -> tuple[list[int], int, bool]:
        producer = Producer()
        guard = CrashGuard(producer, "journal", {}, 3)  # type: ignore[arg-type]
        guard.states[TP] = PartitionState()  # assigned
        answered: list[int] = []
        guard.write(TP, record(99), 99, lambda err: answered.append(99))
        guard.write(TP, record(199), 199, lambda err: answered.append(199))
        producer.answer(0, KafkaError(KafkaError._MSG_TIMED_OUT))
        producer.answer(1)
        await asyncio.sleep(0.6)  # the retry is sent after 0.5 s
        retried = Entry.decode(producer.sent[2][0]).hi
        before = list(answered)
        producer.answer(2)
        return before + answered[len(before):], retried, guard.covered(TP) == 199

    answered, retried, covered = asyncio.run(scenario())
    assert retried == 199
    assert answered == [199, 99]
    assert covered


def test_suspects_left_unfinished_by_a_graceful_owner_stay_suspects_without_a_count() -> None:
    """Given an owner that let a partition go (a clean record) before re-running all of
    its crash suspects, when the next owner reads it, then the rest of the window is
    still re-run one at a time, and nothing gets a new crash count."""
    state = PartitionState(runs=[[100, 150, 1]], suspects_hi=150)
    entry = Entry.decode(state.encode("clean", 120, -1))
    recovered = recover(entry, committed=120)
    assert recovered.suspects_hi == 150
    assert recovered.crashes(130) == 1
    assert recover(entry, committed=151).suspects_hi == -1


def test_a_partition_that_left_stops_its_retried_writes() -> None:
    """Given a failed write of a partition that is then forgotten (revoked), its retry
    writes nothing: an old record landing later could follow the next owner's."""

    async def scenario() -> tuple[int, list[int]]:
        producer = Producer()
        guard = CrashGuard(producer, "journal", {}, 3)  # type: ignore[arg-type]
        guard.states[TP] = PartitionState()
        answered: list[int] = []
        guard.write(TP, record(99), 99, lambda err: answered.append(99))
        producer.answer(0, KafkaError(KafkaError._MSG_TIMED_OUT))
        guard.forget([TP])
        await asyncio.sleep(0.6)
        return len(producer.sent), answered

    assert asyncio.run(scenario()) == (1, [99])


def test_a_death_is_counted_once_even_when_the_next_owner_dies_before_rerunning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given an owner that died with 100..150 in flight, when the next owner recovers the
    partition and dies before re-running any of it (a pill of another partition), then
    the owner after it gives the window no second count: the first recovery journaled
    the counts it took before anything ran."""
    dead = Entry("batch", 100, 150, -1, -1, [], {}, owner="elsewhere:1")
    monkeypatch.setattr(guard_module, "read_latest", lambda *args, **kw: {b"gifts:0": dead})

    async def scenario() -> tuple[int, Entry]:
        producer = Producer()
        guard = CrashGuard(producer, "journal", {}, 3)  # type: ignore[arg-type]
        task = asyncio.ensure_future(guard.recover([TP], {TP: 100}))
        await asyncio.sleep(0.05)
        assert not task.done(), "nothing may run before the counts are journaled"
        producer.answer(0)
        return (await task)[TP].crashes(120), Entry.decode(producer.sent[0][0])

    first, written = asyncio.run(scenario())
    assert (first, written.mode) == (1, "recovered")
    died_too = dataclasses.replace(written, owner="died-too:2")
    assert recover(died_too, committed=100).crashes(120) == 1
    assert recover(died_too, committed=100).suspects_hi == 150
