"""What an instance says about itself: frozen rows, read by the admin API and the tools.

The pipeline produces the rows (``Pipeline.status()``); ``status(app)`` gathers them with
the counters into one ``Status`` for a tool beside a dispatcher (the demo). Readers never
reach into trackers, runtimes or the consumer, so they keep working when those move.
Every field is a plain value, safe to serialise as it is.

    from shunter.observe.status import status
    now = status(app)          # app: a shunter.Dispatcher being served
    now.partitions             # PartitionStatus rows, one per assigned partition
    now.callers["fan-medal"]   # {"ok": 120, "fast": 2, ...}
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..pipeline import Pipeline

log = logging.getLogger("shunter.stall")

TP = tuple[str, int]


@dataclass(frozen=True, slots=True)
class PartitionStatus:
    """One assigned partition (source or retry tier)."""

    topic: str
    partition: int
    kind: str  # "source" | "retry"
    position: int  # the offset a new owner would start from (-1: nothing consumed yet)
    committed: int  # the last offset handed to the committer (-1: none)
    end: int | None  # the high watermark last seen (None: not known yet)
    lag: int | None  # end - position (None while either is unknown)
    in_flight: int  # offsets consumed and not yet settled
    lag_seconds: float  # age of the oldest unsettled record by its Kafka timestamp (0: none)
    stuck_seconds: float  # how long the position has not moved while offsets were unsettled
    held: str  # "" or why the oldest unsettled offset waits (see Pipeline.status)
    stalled: bool  # stuck_seconds >= kafka.stall_after
    consumed: int = 0  # one past the highest offset consumed so far; 0 before any

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class CallerStatus:
    """One subscriber on this instance."""

    caller: str
    category: str
    paused: bool
    queued: int  # deliveries waiting for a slot or their lane
    running: int  # deliveries suspended in the handler
    oldest_pending_seconds: float  # age (Kafka timestamp) of its oldest queued/running record
    stuck: int = 0  # slots held by handlers running on after their delivery was settled

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        return sum(p.in_flight for p in self.partitions)

    @property
    def rejected(self) -> int:
        return sum(n for (_, outcome), n in self.messages.items() if outcome != "accepted")


def status(app: Any) -> Status:
    """The status of ``app`` (a ``shunter.Dispatcher``) now; ``serving`` is False before
    its service has started. Call it on the dispatcher's loop for one consistent moment."""
    service = getattr(app, "service", None)
    if service is None:
        return Status(serving=False)
    stats = service.stats
    pipeline = getattr(service, "pipeline", None)
    rows = (
        ()
        if pipeline is None
        else tuple(sorted(pipeline.status()[0], key=lambda p: (p.topic, p.partition)))
    )
    return Status(
        serving=service.ready.is_set(),
        partitions=rows,
        callers=stats.by_caller(),
        categories=dict(stats.categories),
        messages=dict(stats.messages),
        written=dict(stats.writes),
    )


# -- building the rows, and the stall alarm ------------------------------------------------


def snapshot(pipeline: Pipeline, now: float) -> tuple[list[PartitionStatus], list[CallerStatus]]:
    """The rows of every assigned partition and every caller, at monotonic time ``now``."""
    oldest = _oldest_pending(pipeline)
    wall_ms = time.time() * 1000
    stall_after = pipeline.stalls.stall_after
    partitions = []
    for tp, tracker in list(pipeline.tracker.partitions.items()):
        marks = pipeline.source.watermarks(tp) if pipeline.source is not None else None
        position = tracker.committable()
        if position < 0:  # nothing read yet: where the group would start
            start = pipeline.started_at.get(tp, -1)
            position = start if start >= 0 else (marks[0] if marks else -1)
        end = marks[1] if marks else None
        stuck = pipeline.stalls.stuck_for(tp, now)
        found = oldest.get(tp)
        partitions.append(
            PartitionStatus(
                topic=tp[0],
                partition=tp[1],
                kind="retry" if tp[0] in pipeline.retry_topics else "source",
                position=position,
                consumed=max(tracker.high, 0),
                committed=tracker.committed,
                end=end,
                lag=max(0, end - position) if end is not None and position >= 0 else None,
                in_flight=tracker.in_flight,
                lag_seconds=max(0.0, (wall_ms - found.timestamp) / 1000) if found else 0.0,
                stuck_seconds=stuck,
                held=why_held(pipeline, tp, oldest) if stuck > 0 else "",
                stalled=stuck >= stall_after,
            )
        )
    callers = []
    for caller, runtime in pipeline.runtimes.items():
        stamps = [m.timestamp for m, _ in runtime.pending()]
        callers.append(
            CallerStatus(
                caller=caller,
                category=pipeline.config.subscriber(caller).category,
                paused=runtime.paused,
                queued=runtime.queued,
                running=runtime.active,
                oldest_pending_seconds=max(0.0, (wall_ms - min(stamps)) / 1000) if stamps else 0.0,
                stuck=runtime.stuck,
            )
        )
    return partitions, callers


@dataclass(frozen=True, slots=True)
class _Oldest:
    """A partition's oldest delivery still pending in a caller's queue or handler."""

    offset: int
    timestamp: int
    caller: str
    running: bool
    paused: bool
    stuck: int  # the caller's slots held by handlers running on past their delivery
    concurrency: int


def why_held(pipeline: Pipeline, tp: TP, oldest: dict[TP, _Oldest] | None = None) -> str:
    """Why the oldest unsettled offset of ``tp`` (or its held-back messages) waits."""
    tracker = pipeline.tracker.partitions.get(tp)
    if tracker is None:
        return ""
    if not tracker.pending:
        return pipeline.waiting().get(tp, "")
    offset = tracker.committable()
    where = f"offset {offset}"
    found = (_oldest_pending(pipeline) if oldest is None else oldest).get(tp)
    if found is not None and found.offset == offset:
        if found.running:
            return f"{where}: in the handler of caller {found.caller}"
        paused = " (caller paused)" if found.paused else ""
        return f"{where}: queued for caller {found.caller}{paused}{_stuck(found)}"
    failing = pipeline.settler.failing.get((tp, offset))
    if failing:
        return f"{where}: its write keeps failing ({failing})"
    return f"{where}: waiting for the broker to acknowledge its retry or dead-letter record"


def _stuck(found: _Oldest) -> str:
    """What holds a caller's slots when its handlers run on past their deliveries: the
    reason a queued delivery may never start (a thread cannot be stopped)."""
    if not found.stuck:
        return ""
    held = (
        f"all {found.concurrency} of its slots are"
        if found.stuck >= found.concurrency
        else f"{found.stuck} of its {found.concurrency} slots are"
    )
    return (
        f"; {held} held by handlers still running after their deliveries were settled "
        "without them (threads past their timeout, or coroutines that ignored it): each "
        "frees its slot when it returns, and a restart frees them all"
    )


def watch(pipeline: Pipeline, now: float) -> None:
    """Sample which partitions wait, and report those stalled (and those moving again)."""
    waiting = {tp: t.committable() for tp, t in pipeline.tracker.partitions.items() if t.pending}
    for tp in pipeline.waiting():
        waiting.setdefault(tp, pipeline.tracker.partitions[tp].committable())
    stalled, moving = pipeline.stalls.sample(waiting, now)
    oldest = _oldest_pending(pipeline) if stalled else {}
    for tp in stalled:
        offset = waiting[tp]
        log.error(
            "partition %s[%d] has not moved for %.0fs: %s. It holds every commit of the "
            "partition; `shunter skip --topic %s --partition %d --offset %d` dead-letters "
            "that record and moves the partition on",
            *tp,
            pipeline.stalls.stuck_for(tp, now),
            why_held(pipeline, tp, oldest),
            *tp,
            offset,
            extra={"topic": tp[0], "partition": tp[1], "offset": offset, "stalled": True},
        )
    for tp in moving:
        log.warning("partition %s[%d] moves again", *tp, extra={"topic": tp[0], "partition": tp[1]})


def _oldest_pending(pipeline: Pipeline) -> dict[TP, _Oldest]:
    """Per partition, its oldest delivery still pending in a queue or a handler."""
    oldest: dict[TP, _Oldest] = {}
    for caller, runtime in pipeline.runtimes.items():
        for msg, running in runtime.pending():
            record = msg._record
            tp = record.ptrack.tp
            found = oldest.get(tp)
            if found is None or record.seq < found.offset:
                oldest[tp] = _Oldest(
                    record.seq,
                    record.timestamp,
                    caller,
                    running,
                    runtime.paused,
                    runtime.stuck,
                    runtime.concurrency,
                )
    return oldest
