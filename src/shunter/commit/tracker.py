"""Per-partition record of unsettled offsets.

Invariant (the one shunter's at-least-once guarantee rests on): the offset offered for
commit is never past an offset that still has an unsettled delivery. ``committable`` is
the smallest offset still held, or one past the highest offset seen when none is held.

Offsets are held in the order they are consumed, which is increasing within a partition,
so the dict's insertion order keeps the smallest held offset first: finding it is O(1)
and so is every hold and release.
"""

from __future__ import annotations

import asyncio

TopicPartition = tuple[str, int]


class PartitionTracker:
    __slots__ = ("_drained", "committed", "high", "pending", "revoked", "tp")

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self.pending: dict[int, int] = {}
        self.high = -1  # one past the highest offset seen; -1 before any
        self.committed = -1  # the last offset handed to the committer
        self.revoked = False
        self._drained: asyncio.Event | None = None

    def hold(self, offset: int, deliveries: int) -> None:
        """Register a consumed offset with the number of deliveries it waits for."""
        if offset < self.high - 1:
            raise ValueError(f"{self.tp}: offset {offset} held after {self.high - 1}")
        self.high = offset + 1
        if deliveries > 0:
            self.pending[offset] = self.pending.get(offset, 0) + deliveries

    def release(self, offset: int) -> None:
        """One delivery of ``offset`` is settled."""
        left = self.pending[offset] - 1
        if left:
            self.pending[offset] = left
        else:
            del self.pending[offset]
            if not self.pending and self._drained is not None:
                self._drained.set()

    def committable(self) -> int:
        """The offset to commit: the next one a new owner must start from."""
        if self.pending:
            return next(iter(self.pending))
        return self.high

    def due(self) -> int | None:
        """The offset to commit now, or None when there is nothing new to commit."""
        offset = self.committable()
        if offset > self.committed:
            return offset
        return None

    async def drained(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until nothing is held; False when ``timeout`` passed first."""
        if not self.pending:
            return True
        if self._drained is None or self._drained.is_set():
            self._drained = asyncio.Event()  # shared by every waiter until it is set
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @property
    def in_flight(self) -> int:
        return len(self.pending)


class OffsetTracker:
    """The trackers of the partitions this instance owns."""

    def __init__(self) -> None:
        self.partitions: dict[TopicPartition, PartitionTracker] = {}

    def get(self, topic: str, partition: int) -> PartitionTracker:
        tp = (topic, partition)
        tracker = self.partitions.get(tp)
        if tracker is None:
            tracker = self.partitions[tp] = PartitionTracker(tp)
        return tracker

    def due(self) -> list[tuple[TopicPartition, int]]:
        """(partition, offset) pairs with progress to commit."""
        out = []
        for tp, tracker in self.partitions.items():
            offset = tracker.due()
            if offset is not None:
                out.append((tp, offset))
        return out

    def mark_committed(self, offsets: list[tuple[TopicPartition, int]]) -> None:
        for tp, offset in offsets:
            tracker = self.partitions.get(tp)
            if tracker is not None and offset > tracker.committed:
                tracker.committed = offset

    def drop(self, tps: list[TopicPartition]) -> None:
        """Forget partitions that are no longer ours; later releases are ignored."""
        for tp in tps:
            tracker = self.partitions.pop(tp, None)
            if tracker is not None:
                tracker.revoked = True

    def in_flight(self) -> int:
        return sum(len(t.pending) for t in self.partitions.values())
