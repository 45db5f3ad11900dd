"""A running dispatcher's status as one frozen value: the small interface the demo (and
any tool beside a dispatcher, the admin API included) reads instead of the pipeline's
internals, so that they keep working when those internals move.

    from shunter.observe.status import status
    now = status(app)          # app: a shunter.Dispatcher being served
    now.partitions             # (topic, partition, consumed, pending) per assigned partition
    now.callers["fan-medal"]   # {"ok": 120, "fast": 2, ...}

Every field is a copy taken at one moment on the caller's thread; call it from the
dispatcher's event loop (or accept a moment's skew from another thread).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class PartitionStatus:
    """One assigned partition (source or retry topic)."""

    topic: str
    partition: int
    consumed: int  # one past the highest offset consumed so far; 0 before any
    pending: int  # offsets consumed and not yet settled (holding the commit back)


@dataclass(frozen=True)
class Status:
    """What a dispatcher has done so far."""

    serving: bool  # the consumer is started
    partitions: tuple[PartitionStatus, ...] = ()
    callers: dict[str, dict[str, int]] = field(default_factory=dict)  # caller → outcome → n
    categories: dict[str, str] = field(default_factory=dict)  # caller → category
    messages: dict[tuple[str, str], int] = field(default_factory=dict)  # (topic, outcome) → n
    written: dict[str, int] = field(default_factory=dict)  # tier → acknowledged records

    def consumed(self, topic: str) -> int:
        """Records consumed from ``topic`` so far, over its assigned partitions."""
        return sum(p.consumed for p in self.partitions if p.topic == topic)

    @property
    def pending(self) -> int:
        return sum(p.pending for p in self.partitions)

    @property
    def rejected(self) -> int:
        return sum(n for (_, outcome), n in self.messages.items() if outcome != "accepted")


def status(app: Any) -> Status:
    """The status of ``app`` (a ``shunter.Dispatcher``) now; ``serving`` is False before
    its service has started."""
    service = getattr(app, "service", None)
    if service is None:
        return Status(serving=False)
    stats = service.stats
    pipeline = getattr(service, "pipeline", None)
    rows: tuple[PartitionStatus, ...] = ()
    if pipeline is not None:
        rows = tuple(
            PartitionStatus(topic, partition, max(t.high, 0), len(t.pending))
            for (topic, partition), t in sorted(pipeline.tracker.partitions.items())
        )
    return Status(
        serving=service.ready.is_set(),
        partitions=rows,
        callers=stats.by_caller(),
        categories=dict(stats.categories),
        messages=dict(stats.messages),
        written=dict(stats.writes),
    )
