"""The commit tracker: whatever order deliveries settle in, and whatever partitions come
and go, the offset offered for commit never passes an unsettled delivery.

The model is the plain definition: a set of offsets with unsettled deliveries, and the
highest offset seen. The tracker must offer ``min(unsettled)``, or one past the highest
offset seen when nothing is unsettled, and must never offer a commit twice or backwards.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from shunter.commit import OffsetTracker, PartitionTracker

TP = ("orders", 0)


# -- one partition, random completion order ------------------------------------------------

@st.composite
def consumption(draw: st.DrawFn) -> tuple[list[tuple[int, int]], list[int]]:
    """Offsets consumed in increasing order (with gaps, as after compaction or transaction
    markers), each with 0..3 deliveries, and the deliveries settled in a random order."""
    gaps = draw(st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=40))
    start = draw(st.integers(min_value=0, max_value=1000))
    offsets = [start + sum(gaps[: i + 1]) - 1 for i in range(len(gaps))]
    holds = [(o, draw(st.integers(min_value=0, max_value=3))) for o in offsets]
    releases = [o for o, n in holds for _ in range(n)]
    return holds, draw(st.permutations(releases))


@given(consumption(), st.data())
def test_committable_is_the_smallest_unsettled_offset_under_any_completion_order(
    plan: tuple[list[tuple[int, int]], list[int]], data: st.DataObject
) -> None:
    """Given offsets consumed in order with several deliveries each,
    when their deliveries settle in any order, interleaved with further consumption,
    then committable is min(unsettled) while something is unsettled, else one past the
    highest offset seen, and the commits the committer makes only ever move forward."""
    holds, releases = plan
    tracker = PartitionTracker(TP)
    unsettled: Counter[int] = Counter()
    high = -1
    commits: list[int] = []
    pending_holds = list(holds)
    pending_releases = list(releases)
    while pending_holds or pending_releases:
        releasable = [o for o in pending_releases if unsettled[o] > 0]
        hold_next = pending_holds and (not releasable or data.draw(st.booleans()))
        if hold_next:
            offset, deliveries = pending_holds.pop(0)
            tracker.hold(offset, deliveries)
            high = offset + 1
            if deliveries:
                unsettled[offset] += deliveries
        else:
            offset = releasable[0]
            pending_releases.remove(offset)
            tracker.release(offset)
            unsettled[offset] -= 1
            if not unsettled[offset]:
                del unsettled[offset]

        expected = min(unsettled) if unsettled else high
        assert tracker.committable() == expected
        assert tracker.in_flight == len(unsettled)
        due = tracker.due()
        if due is not None:
            assert not unsettled or due <= min(unsettled), "commit offered past an unsettled offset"
            assert not commits or due > commits[-1], "commit offered twice or backwards"
            commits.append(due)
            tracker.committed = due
    assert tracker.committable() == high
    assert not tracker.pending


def test_a_held_offset_with_several_deliveries_waits_for_the_last_of_them() -> None:
    """Given offset 7 held for three deliveries,
    when two of them settle, then 7 is still what a new owner must start from;
    when the third settles, then the commit moves past it."""
    tracker = PartitionTracker(TP)
    tracker.hold(7, 3)
    tracker.release(7)
    tracker.release(7)
    assert tracker.committable() == 7
    tracker.release(7)
    assert tracker.committable() == 8


def test_an_offset_with_no_deliveries_is_committable_at_once() -> None:
    """Given a message no category wants (zero deliveries),
    then the commit moves past it without waiting for anything."""
    tracker = PartitionTracker(TP)
    tracker.hold(0, 0)
    assert tracker.committable() == 1
    assert tracker.due() == 1


def test_consuming_backwards_is_refused() -> None:
    """Given offset 10 consumed, when offset 5 is held after it, then the tracker refuses:
    an out-of-order hold would break the smallest-first order commits rely on."""
    tracker = PartitionTracker(TP)
    tracker.hold(10, 1)
    with pytest.raises(ValueError, match="held after"):
        tracker.hold(5, 1)


def test_nothing_is_due_before_anything_is_consumed_or_after_it_is_committed() -> None:
    """Given a fresh tracker, nothing is due; given everything committed, nothing is due
    again until a new offset settles."""
    tracker = PartitionTracker(TP)
    assert tracker.due() is None
    tracker.hold(0, 1)
    assert tracker.due() == 0  # the position a new owner starts from: nothing passed yet
    tracker.committed = 0
    assert tracker.due() is None
    tracker.release(0)
    assert tracker.due() == 1
    tracker.committed = 1
    assert tracker.due() is None


# -- draining -------------------------------------------------------------------------------

def test_drained_waits_for_the_last_settlement_and_times_out_otherwise() -> None:
    """Given two offsets unsettled, when both settle during the wait, then drained is
    True; given one that never settles, then drained is False after its timeout."""

    async def scenario() -> tuple[bool, bool, bool]:
        tracker = PartitionTracker(TP)
        empty = await tracker.drained(0.01)
        tracker.hold(0, 1)
        tracker.hold(1, 1)
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, tracker.release, 1)
        loop.call_later(0.02, tracker.release, 0)
        settled = await tracker.drained(5)
        tracker.hold(2, 1)
        stuck = await tracker.drained(0.05)
        return empty, settled, stuck

    assert asyncio.run(scenario()) == (True, True, False)


def test_two_waiters_on_one_partition_are_both_woken_when_it_drains() -> None:
    """Given a service shutdown waiting for a partition to drain, and a revocation of the
    same partition waiting too, when its last delivery settles, then both waits end
    (neither sits out its timeout believing the partition is still busy)."""

    async def scenario() -> list[bool]:
        tracker = PartitionTracker(TP)
        tracker.hold(0, 1)
        first = asyncio.ensure_future(tracker.drained(2))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(tracker.drained(2))
        await asyncio.sleep(0)
        tracker.release(0)
        return list(await asyncio.wait_for(asyncio.gather(first, second), 1.0))

    assert asyncio.run(scenario()) == [True, True]


# -- several partitions, assignment and revocation -----------------------------------------

class Assignments(RuleBasedStateMachine):
    """Partitions are assigned, consumed, settled in random order, committed, revoked and
    assigned again, while deliveries of revoked partitions still settle late."""

    deliveries = Bundle("deliveries")

    @initialize()
    def start(self) -> None:
        self.tracker = OffsetTracker()
        self.unsettled: dict[tuple[str, int], Counter[int]] = {}
        self.high: dict[tuple[str, int], int] = {}
        self.committed: dict[tuple[str, int], int] = {}
        self.next_offset: dict[tuple[str, int], int] = {}  # survives revocation: the log does
        self.current: dict[tuple[str, int], PartitionTracker] = {}

    @rule(partition=st.integers(0, 2), deliveries=st.integers(0, 3), skip=st.integers(0, 2),
          target=deliveries)
    def consume(self, partition: int, deliveries: int, skip: int) -> list[tuple[object, ...]]:
        tp = ("t", partition)
        offset = self.next_offset.get(tp, 0) + skip
        self.next_offset[tp] = offset + 1
        ptrack = self.tracker.get(*tp)
        if tp not in self.current:  # a new assignment starts with a new tracker
            self.current[tp] = ptrack
            self.unsettled[tp] = Counter()
            self.high[tp] = -1
            self.committed[tp] = -1
        assert ptrack is self.current[tp]
        ptrack.hold(offset, deliveries)
        self.high[tp] = offset + 1
        if deliveries:
            self.unsettled[tp][offset] += deliveries
        return [(ptrack, tp, offset)] * deliveries

    @rule(share=consumes(deliveries))
    def settle(self, share: list[tuple[object, ...]]) -> None:
        for ptrack, tp, offset in share:
            assert isinstance(ptrack, PartitionTracker)
            ptrack.release(offset)  # type: ignore[arg-type]
            if self.current.get(tp) is ptrack:  # type: ignore[arg-type]
                counts = self.unsettled[tp]  # type: ignore[index]
                counts[offset] -= 1  # type: ignore[index]
                if not counts[offset]:  # type: ignore[index]
                    del counts[offset]  # type: ignore[arg-type]

    @rule()
    def commit(self) -> None:
        offsets = self.tracker.due()
        for tp, offset in offsets:
            unsettled = self.unsettled[tp]
            assert not unsettled or offset <= min(unsettled), f"{tp}: commit past unsettled"
            assert offset > self.committed[tp], f"{tp}: commit not moving forward"
            self.committed[tp] = offset
        self.tracker.mark_committed(offsets)
        assert self.tracker.due() == []

    @precondition(lambda self: bool(self.current))
    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        tp = data.draw(st.sampled_from(sorted(self.current)))
        old = self.current.pop(tp)
        self.tracker.drop([tp])
        assert old.revoked
        assert tp not in self.tracker.partitions
        assert all(t != tp for t, _ in self.tracker.due())
        self.tracker.mark_committed([(tp, 10**9)])  # a late answer for a partition gone
        assert tp not in self.tracker.partitions

    @invariant()
    def committable_is_min_unsettled(self) -> None:
        if not hasattr(self, "tracker"):
            return
        for tp, ptrack in self.current.items():
            unsettled = self.unsettled[tp]
            expected = min(unsettled) if unsettled else self.high[tp]
            assert ptrack.committable() == expected
        assert self.tracker.in_flight() == sum(len(u) for tp, u in self.unsettled.items()
                                               if tp in self.current)


Assignments.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
TestAssignments = Assignments.TestCase
