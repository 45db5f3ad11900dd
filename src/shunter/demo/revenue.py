"""The tour's first step: a live-revenue stream through four subscribers, one of them
carrying the bug of the night in shunter's story.

Produce the stream → run the dispatcher from the YAML it would run from in production →
show progress until every message is consumed and every delivery settled (retries and
dead letters included) → stop cleanly → per-caller summary.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rich.console import Console

from ..app import Dispatcher
from ..broker.admin import ensure_topics
from ..config import load_config
from ..pipeline import Pipeline
from ..service import Service
from . import stream, summary, topology
from .clients import StreamProducer, read_dead_letters
from .logdigest import LogDigest, captured
from .progress import Display, Snapshot
from .tour import StepResult, Tour

TICK = 0.25  # seconds between progress updates and settledness checks
INTRO = (
    "Four business teams subscribe to two categories of the live-revenue topics. One of "
    f"them, {topology.BUGGY}, has the bug of the night in shunter's story: it reads "
    "value['effect']['level'], and a few guard purchases carry no effect object."
)


Ending = Literal["settled", "timeout", "interrupted"]
ENDINGS: dict[str, str] = {
    "settled": "everything settled; the dispatcher drained, committed and stopped",
    "timeout": "gave up waiting for everything to settle (see --timeout)",
    "interrupted": "interrupted",
}


@dataclass
class Served:
    ending: Ending
    last: Snapshot  # the numbers of the last moment before stopping


async def run(tour: Tour) -> StepResult:
    console, options = tour.console, tour.options
    bootstrap = tour.broker.bootstrap
    events, plan = stream.generate(
        options.events, options.seed, int(time.time() * 1000), options.rate or 5_000
    )
    await asyncio.to_thread(ensure_topics, {"bootstrap.servers": bootstrap}, stream.TOPICS)
    path = topology.write(tour.workdir, bootstrap)
    app = Dispatcher(load_config(path))
    app.handlers()  # imports every handler, as `shunter check` does
    _introduce(console, app, path, plan, options.rate)
    producer = StreamProducer(bootstrap, events, options.rate)
    with captured() as digest:
        served = await _serve(app, producer, digest, tour)
    service: Service = app.service
    dead = await asyncio.to_thread(
        read_dead_letters, bootstrap, service.config.dlq_topic, service.stats.writes["dlq"]
    )
    complete = served.ending == "settled"
    report = summary.Report(
        plan,
        service.stats,
        dead,
        digest,
        served.last,
        path,
        bootstrap,
        keep_broker=options.keep_broker,
        complete=complete,
    )
    ok = summary.show(console, report)
    if producer.failed:
        console.print(
            f"[red]{producer.failed} events could not be produced: {producer.last_error}[/red]",
            highlight=False,
        )
    console.print(
        f"{time.monotonic() - tour.started:.1f}s: {ENDINGS[served.ending]}", highlight=False
    )
    if served.ending == "interrupted":
        return StepResult.INTERRUPTED
    planned = ok and complete and not producer.failed
    return StepResult.AS_PLANNED if planned else StepResult.OFF_PLAN


def _introduce(console: Console, app: Dispatcher, path: Path, plan: stream.Plan, rate: int) -> None:
    console.rule("[bold]1. a live-revenue stream")
    console.print(INTRO, highlight=False)
    console.print(topology.tree(app.config), highlight=False)
    console.print(
        f"The configuration: {path} (try `shunter check -c` on it).\n",
        highlight=False,
        soft_wrap=True,
    )
    console.print(summary.describe_stream(plan, rate), highlight=False)


async def _serve(
    app: Dispatcher, producer: StreamProducer, digest: LogDigest, tour: Tour
) -> Served:
    """Serve until everything is settled (or time is up, or Ctrl-C), then stop cleanly."""
    stop = asyncio.Event()
    serving = asyncio.create_task(app.serve(stop))
    producing = asyncio.create_task(asyncio.to_thread(producer.run))
    deadline = time.monotonic() + tour.options.timeout
    ending: Ending = "timeout"
    snap = _snapshot(None, producer, digest, tour.started)
    try:
        with Display(tour.console) as display:
            while time.monotonic() < deadline:
                if serving.done():  # Ctrl-C or SIGTERM: the dispatcher drained and stopped
                    ending = "interrupted"
                    break
                snap = _snapshot(app.service, producer, digest, tour.started)
                display.show(snap)
                if app.service is not None and _settled(app.service, producer):
                    ending = "settled"
                    snap = _snapshot(app.service, producer, digest, tour.started, "settled")
                    break
                await asyncio.sleep(TICK)
            display.show(snap, final=True)
    finally:
        producer.stop()
        stop.set()
        with tour.console.status("stopping the dispatcher: drain, commit, leave the group"):
            await producing
            await serving
    return Served(ending, snap)


def _settled(service: Service, producer: StreamProducer) -> bool:
    """Every record produced and consumed, every retry record consumed, nothing held.

    Counted on the loop in one go, so it is one consistent moment: a retry record is
    counted as written when the broker acknowledged it, and its source delivery stays
    held until then. (The embedded broker's answers to watermark queries lag behind the
    last batch written, so they cannot tell when a topic is consumed to its end.)
    """
    pipeline = service.pipeline
    if pipeline is None or not producer.finished.is_set():
        return False
    partitions = pipeline.tracker.partitions
    if any(t.pending for t in partitions.values()):
        return False
    config, writes = service.config, service.stats.writes
    consumed = Counter[str]()
    for (topic, _), tracker in partitions.items():
        consumed[topic] += max(tracker.high, 0)
    return (
        sum(consumed[t] for t in config.topics) == producer.acked
        and consumed[config.fast_topic] == writes["fast"]
        and consumed[config.slow_topic] == writes["slow"]
    )


def _snapshot(
    service: Service | None,
    producer: StreamProducer,
    digest: LogDigest,
    started: float,
    phase: str | None = None,
) -> Snapshot:
    consumed = dict.fromkeys(stream.TOPICS, 0)
    pipeline = service.pipeline if service is not None else None
    if pipeline is not None:
        for (topic, _), tracker in pipeline.tracker.partitions.items():
            if topic in consumed:
                consumed[topic] += max(tracker.high, 0)
    if phase is None:
        phase = _phase(service, pipeline, producer)
    stats = service.stats if service is not None else None
    rejected = 0
    if stats is not None:
        rejected = sum(n for (_, outcome), n in stats.messages.items() if outcome != "accepted")
    return Snapshot(
        elapsed=time.monotonic() - started,
        phase=phase,
        produced=producer.acked,
        total=producer.total,
        consumed=consumed,
        rejected=rejected,
        by_caller=stats.by_caller() if stats is not None else {},
        categories=stats.categories if stats is not None else {},
        writes=dict(stats.writes) if stats is not None else {},
        notices=digest.notices,
        latest=digest.latest,
    )


def _phase(service: Service | None, pipeline: Pipeline | None, producer: StreamProducer) -> str:
    if service is None or pipeline is None:
        return "starting the dispatcher"
    if not pipeline.tracker.partitions:
        return "joining the consumer group"
    if not producer.finished.is_set():
        return "streaming"
    return "settling (retries due, dead letters)"
