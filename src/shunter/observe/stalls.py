"""Which partitions have stopped moving: the stall alarm's bookkeeping.

A partition is *stuck* while something of it waits (offsets consumed and not settled, or
messages held back) and its position has not moved; it is *stalled* once stuck for
``stall_after`` seconds. The watch is sampled a few times a second off the hot path: it
costs nothing per message. A stalled partition is reported when it stalls and again every
``stall_after`` while it stays stalled, and once more when it moves.
"""

from __future__ import annotations

TP = tuple[str, int]


class StallWatch:
    def __init__(self, stall_after: float) -> None:
        self.stall_after = stall_after
        self._since: dict[TP, tuple[int, float]] = {}  # waiting tp -> (position, stuck since)
        self._reported: dict[TP, float] = {}  # stalled tp -> when it was last reported

    def sample(self, waiting: dict[TP, int], now: float) -> tuple[list[TP], list[TP]]:
        """Take the positions of the partitions that wait now; return the partitions to
        report as stalled, and those that were reported and have moved since."""
        moved = [tp for tp in self._since if tp not in waiting]
        for tp in moved:
            del self._since[tp]
        to_report = []
        for tp, position in waiting.items():
            seen = self._since.get(tp)
            if seen is None or seen[0] != position:
                self._since[tp] = (position, now)
                if tp in self._reported:
                    moved.append(tp)
                continue
            if now - seen[1] < self.stall_after:
                continue
            last = self._reported.get(tp)
            if last is None or now - last >= self.stall_after:
                self._reported[tp] = now
                to_report.append(tp)
        recovered = [tp for tp in moved if self._reported.pop(tp, None) is not None]
        return to_report, recovered

    def stuck_for(self, tp: TP, now: float) -> float:
        """Seconds ``tp`` has waited without moving (0 when it is not waiting)."""
        seen = self._since.get(tp)
        return 0.0 if seen is None else now - seen[1]

    def stalled(self, tp: TP, now: float) -> bool:
        return self.stuck_for(tp, now) >= self.stall_after

    def forget(self, tps: list[TP]) -> None:
        for tp in tps:
            self._since.pop(tp, None)
            self._reported.pop(tp, None)
