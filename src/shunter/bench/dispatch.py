"""shunter under measurement: a Dispatcher served on this process's event loop, timed as the
baselines are, from its first consumed batch until every offset of the dataset is settled
(the baselines: from their first batch to their last message's work). Until every offset is
also committed is reported beside it: that adds up to one commit interval of waiting."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

from ..app import Dispatcher
from ..message import Message
from ..pipeline import Pipeline
from . import threads
from .context import BATCH_SIZE, BenchContext, Dataset
from .raw import Timing

# How often shunter hands settled offsets to the committer during the bench (the default
# is 0.5 s). The end of a measurement waits for the next commit after the last settle.
COMMIT_INTERVAL = 0.1
_POLL = 0.002  # how often the watcher looks at the trackers (a few µs each time)


class Probe:
    """Stamped by the first delivery: the start of the CPU measurement (and of the measured
    span when no consumed batch was stamped, see ``_measure``)."""

    __slots__ = ("cpu", "wall")

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()


Handler = Callable[[Message], Any]


@dataclass(frozen=True)
class Subscriber:
    caller: str
    handler: Handler
    ordering: str = "key"
    concurrency: int = 64


@dataclass(frozen=True)
class DispatchTiming(Timing):
    committed_seconds: float = 0.0  # first batch → every offset committed (``seconds``: settled)
    deliveries: dict[str, dict[str, int]] = field(default_factory=dict)  # caller → outcome → n
    # CPU seconds per thread group (``threads.snapshot``) from the first consumed batch
    # (as the watcher saw it, within its poll) to every offset settled.
    threads: dict[str, float] = field(default_factory=dict)

    def plus(self, other: Self) -> Self:
        deliveries = {caller: dict(row) for caller, row in self.deliveries.items()}
        for caller, row in other.deliveries.items():
            mine = deliveries.setdefault(caller, {})
            for outcome, n in row.items():
                mine[outcome] = mine.get(outcome, 0) + n
        spent = dict(self.threads)
        for group, seconds in other.threads.items():
            spent[group] = spent.get(group, 0.0) + seconds
        return dataclasses.replace(
            super().plus(other),
            committed_seconds=self.committed_seconds + other.committed_seconds,
            deliveries=deliveries,
            threads=spent,
        )

    def cpu_shares(self, prefix: str = "") -> dict[str, float]:
        """Each thread group's CPU over the measured span ÷ its wall time (1.0: a core),
        as flat fields ``<prefix><group>_cpu`` (the bench's medians are of flat numbers)."""
        if self.seconds <= 0:
            return {}
        return {
            f"{prefix}{group}_cpu": round(seconds / self.seconds, 3)
            for group, seconds in sorted(self.threads.items())
        }

    def outcomes(self) -> dict[str, int]:
        """outcome → deliveries, over all callers."""
        out: dict[str, int] = {}
        for row in self.deliveries.values():
            for outcome, n in row.items():
                out[outcome] = out.get(outcome, 0) + n
        return out


def bench_config(
    ctx: BenchContext,
    data: Dataset,
    group: str,
    subscribers: list[Subscriber],
    retry: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One category over the dataset's topic (JSON + schema), every subscriber in it.

    ``config`` sections are merged over the generated ones (one level deep), e.g.
    ``{"crash_guard": {"enabled": False}}``.
    """
    generated: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": ctx.bootstrap,
            "group_id": group,
            "consumer": ctx.consumer,
            "batch_size": BATCH_SIZE,
            "commit_interval": COMMIT_INTERVAL,
        },
        "topics": {data.topic: {"format": "json", "schema": str(ctx.schema_file())}},
        "categories": {"revenue": {"topics": [data.topic]}},
        "subscribers": [
            {
                "caller": s.caller,
                "category": "revenue",
                "ordering": s.ordering,
                "concurrency": s.concurrency,
            }
            for s in subscribers
        ],
        "retry": {"partitions": 6, **(retry or {})},
        "admin": {"listen": None},
    }
    for section, value in (config or {}).items():
        base = generated.get(section)
        if isinstance(base, dict) and isinstance(value, dict):
            value = {**base, **value}
        generated[section] = value
    return generated


def run_dispatcher(
    ctx: BenchContext,
    data: Dataset,
    name: str,
    subscribers: list[Subscriber],
    probe: Probe,
    retry: dict[str, Any] | None = None,
    timeout: float = 600.0,
    config: dict[str, Any] | None = None,
) -> DispatchTiming:
    """Serve shunter over ``data`` in a fresh group until everything is committed.

    One of the handlers must call ``probe.start()`` on its first delivery; ``config``
    is merged over the generated configuration (see ``bench_config``).
    """
    app = Dispatcher(bench_config(ctx, data, ctx.group(name), subscribers, retry, config))
    for sub in subscribers:
        app.subscriber("revenue", caller=sub.caller)(sub.handler)
    return asyncio.run(_measure(app, data, probe, timeout, ctx.broker_pid))


async def _measure(
    app: Dispatcher, data: Dataset, probe: Probe, limit: float, broker_pid: int | None = None
) -> DispatchTiming:
    stop = asyncio.Event()
    serving = asyncio.create_task(app.serve(stop))
    spans = _Spans(broker_pid)
    try:
        async with asyncio.timeout(limit):
            settled, committed = await _watch(app, serving, data, spans)
        cpu = time.process_time()
    except TimeoutError:
        raise TimeoutError(
            f"shunter did not commit {data.topic} to its end within {limit:.0f}s"
        ) from None
    finally:
        stop.set()
        await serving
    # From the first batch the consumer handed over (as the baselines start when their
    # first batch is returned); the first delivery's own stamp if there was no source.
    service = app.service
    pipeline = service.pipeline if service is not None else None
    start = getattr(pipeline.source, "first_handed", 0.0) if pipeline is not None else 0.0
    start = start or probe.wall
    return DispatchTiming(
        messages=data.count,
        seconds=settled - start,
        cpu=(cpu - probe.cpu) / (committed - probe.wall),  # CPU seconds ÷ wall, same span
        committed_seconds=committed - start,
        deliveries=service.stats.by_caller() if service is not None else {},
        threads=threads.spent(spans.first, spans.settled) if spans.first else {},
    )


class _Spans:
    """Thread CPU snapshots at the measured span's ends, as the watcher sees them."""

    def __init__(self, broker_pid: int | None) -> None:
        self.broker_pid = broker_pid
        self.first: dict[str, float] = {}
        self.settled: dict[str, float] = {}

    def take(self) -> dict[str, float]:
        return threads.snapshot(self.broker_pid)


async def _watch(
    app: Dispatcher, serving: asyncio.Task[None], data: Dataset, spans: _Spans | None = None
) -> tuple[float, float]:
    """(when every offset was settled, when every offset was committed), perf_counter;
    ``spans``, if given, gets the thread CPU snapshots of the first batch and the settle."""
    settled = 0.0
    while True:
        if serving.done():
            serving.result()  # raises what stopped the dispatcher
            # It stopped cleanly on its own: only SIGINT/SIGTERM (which it handles) does that.
            raise KeyboardInterrupt
        pipeline = app.service.pipeline if app.service is not None else None
        if pipeline is not None:
            handed = getattr(pipeline.source, "first_handed", 0.0)
            if spans is not None and handed and not spans.first:
                spans.first = spans.take()
            all_settled, all_committed = _reached(pipeline, data)
            if all_settled and not settled:
                settled = time.perf_counter()
                if spans is not None:
                    spans.settled = spans.take()
            if all_committed:
                return settled or time.perf_counter(), time.perf_counter()
        await asyncio.sleep(_POLL)


def _reached(pipeline: Pipeline, data: Dataset) -> tuple[bool, bool]:
    """Whether every partition's offsets are (settled, committed) up to the dataset's end."""
    settled = committed = True
    for partition, end in data.ends.items():
        if end == 0:
            continue
        tracker = pipeline.tracker.partitions.get((data.topic, partition))
        if tracker is None:  # not assigned yet
            return False, False
        settled = settled and tracker.committable() >= end
        committed = committed and tracker.committed >= end
    return settled, committed
