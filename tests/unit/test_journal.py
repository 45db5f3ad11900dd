"""The crash guard's journal: what it names for sure while records are on their way, and
what the next owner makes of the last record."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
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


async def _recover(producer: Producer) -> asyncio.Task[Any]:
    """Start an assignment of TP (resuming at 100) over the journal the test patched in;
    return once its read is done (the task then waits for any write it sent)."""
    guard = CrashGuard(producer, "journal", {}, 3)  # type: ignore[arg-type]
    task = asyncio.ensure_future(guard.recover([TP], {TP: 100}))
    for _ in range(500):  # the read runs on a thread
        await asyncio.sleep(0.01)
        if task.done() or producer.sent:
            break
    return task


def test_a_death_is_counted_once_even_when_the_next_owner_dies_before_rerunning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given an owner that died with 100..150 in flight, when the next owner recovers the
    partition, then the assignment completes only once the counts it gave are journaled
    (``recovered``), and an owner after it that reads that record gives no second count
    and still re-runs the window."""
    dead = Entry("batch", 100, 150, -1, -1, [], {}, owner="elsewhere:1:00")
    monkeypatch.setattr(guard_module, "read_latest", lambda *args, **kw: {b"gifts:0": dead})

    async def scenario() -> tuple[int, Entry]:
        producer = Producer()
        task = await _recover(producer)
        assert producer.sent and not task.done(), "the counts are journaled before it goes on"
        producer.answer(0)
        return (await task)[TP].crashes(120), Entry.decode(producer.sent[0][0])

    first, written = asyncio.run(scenario())
    assert (first, written.mode) == (1, "recovered")
    died_too = recover(dataclasses.replace(written, owner="died-too:2:00"), committed=100)
    assert (died_too.crashes(120), died_too.suspects_hi) == (1, 150)
    # What the next owner would have counted without it: the dead owner's record again.
    assert recover(dead, committed=100).crashes(120) + first == 2


def test_nothing_is_journaled_at_assignment_when_no_death_was_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given a last record that counts no death (clean with suspects left, this very
    process's own batch record, or no record: the journal could not be read), when the
    partition is assigned, then nothing is written and the assignment goes on at once."""
    left = PartitionState(runs=[[100, 150, 1]], suspects_hi=150).encode("clean", 100, -1)
    own = PartitionState(suspects_hi=150).encode("batch", 100, 150)
    entries = [
        Entry.decode(left),
        Entry.decode(own),  # written by this process: the partition was lost, nothing died
        None,
    ]
    for entry in entries:
        table = {} if entry is None else {b"gifts:0": entry}
        monkeypatch.setattr(guard_module, "read_latest", lambda *a, t=table, **kw: t)

        async def scenario() -> tuple[bool, int]:
            producer = Producer()
            task = await _recover(producer)
            return task.done(), len(producer.sent)

        assert asyncio.run(scenario()) == (True, 0), entry


def test_an_assignment_goes_on_when_the_counts_cannot_be_journaled_in_time(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Given a broker that does not acknowledge the recovered record, when the wait runs
    out, then the assignment completes (with its counts) and says what it risks."""
    dead = Entry("batch", 100, 150, -1, -1, [], {}, owner="elsewhere:1:00")
    monkeypatch.setattr(guard_module, "read_latest", lambda *args, **kw: {b"gifts:0": dead})
    monkeypatch.setattr(guard_module, "RECOVERED_WAIT", 0.2)

    async def scenario() -> int:
        task = await _recover(Producer())  # never answered
        return (await asyncio.wait_for(task, 5))[TP].crashes(120)

    assert asyncio.run(scenario()) == 1
    assert "counted twice" in caplog.text


def test_a_dead_owner_with_this_process_host_and_pid_is_not_taken_for_it() -> None:
    """Given a container restarted in place (same host name, shunter pid 1 again), when
    the new process reads the dead one's batch record, then its window is counted: host
    and pid alone do not make the dead owner this process (that would be a crash loop).
    Two starts of the journal module in one process stand for the two processes."""
    script = (
        "import importlib, shunter.crashguard.journal as j\n"
        "dead = j.Entry('batch', 100, 150, -1, -1, [], {}, owner=j.OWNER)\n"
        "importlib.reload(j)\n"
        "print(j.recover(dead, committed=100).crashes(120))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "1", out.stderr
    own = Entry.decode(PartitionState().encode("batch", 100, 150))
    assert recover(own, committed=100).crashes(120) == 0


def test_a_reread_writes_no_counts_for_a_partition_that_left_during_the_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given a journal read outside an assignment (the gate reading an unreadable journal
    again) that finds a dead owner's window, when the partition left during the read
    (``owned`` says so), then no ``recovered`` record is written: it is another owner's
    partition now, and the record could follow that owner's own."""
    dead = Entry("batch", 100, 150, -1, -1, [], {}, owner="elsewhere:1:00")
    monkeypatch.setattr(guard_module, "read_latest", lambda *args, **kw: {b"gifts:0": dead})

    async def scenario() -> tuple[int, int]:
        producer = Producer()
        guard = CrashGuard(producer, "journal", {}, 3)  # type: ignore[arg-type]
        states = await asyncio.wait_for(
            guard.recover([TP], {TP: 100}, owned=lambda tp: False), 5
        )
        return states[TP].crashes(120), len(producer.sent)

    assert asyncio.run(scenario()) == (1, 0)


def test_a_lease_past_the_batch_is_re_run_but_gives_no_crash_count() -> None:
    """Given an owner that died with 100..110 fetched and a lease to 174 named, when the
    next owner recovers, then 100..174 are all re-run as suspects (one under the lease may
    have killed it) but only 100..110 get a count: most of the lease was never fetched, and
    a count per death would quarantine innocents of a busy partition killed again and
    again (a pill there is counted when it dies re-run alone)."""
    written = PartitionState().encode("batch", 100, 110, lease=174)
    dead = dataclasses.replace(Entry.decode(written), owner="elsewhere:1:00")
    assert (dead.hi, dead.lease) == (110, 174)
    state = recover(dead, committed=100)
    assert state.suspects_hi == 174
    assert [state.crashes(o) for o in (100, 110, 111, 174)] == [1, 1, 0, 0]


@pytest.mark.parametrize(
    "hostile",
    [
        b'{"mode":"clean","lo":0,"hi":0,"single":[]}',  # .items() of a list
        b'{"mode":"batch","lo":0,"hi":5,"runs":[[1,2]]}',  # a run of two numbers
        b'{"mode":"batch","lo":0,"hi":5,"runs":7}',
        b'{"mode":"batch","lo":0,"hi":5,"single":{"x":1}}',
        b'{"mode":"batch","lo":[],"hi":5}',
        b'{"mode":"batch","lo":0,"hi":1e400}',
        b"[1,2,3]",
        b'"batch"',
        b"\xff\xfe",
        b"",
    ],
)
def test_a_record_on_the_journal_topic_that_is_no_journal_entry_is_ignored(
    monkeypatch: pytest.MonkeyPatch, hostile: bytes
) -> None:
    """Given whatever a hostile producer writes under a partition's journal key, when the
    journal is read at assignment, then that key reads as having no entry and the other
    keys read as written: nothing raises (an exception there held every partition of the
    assignment for as long as the record stayed the last of its key)."""
    import shunter.crashguard.journal as journal_module

    good = record(9)
    monkeypatch.setattr(
        journal_module, "read_table", lambda *a, **kw: {b"gifts:0": hostile, b"gifts:1": good}
    )
    found = journal_module.read_latest({}, "journal", {b"gifts:0", b"gifts:1"})
    assert set(found) == {b"gifts:1"}
    assert found[b"gifts:1"].hi == 9
