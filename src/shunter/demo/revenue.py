"""The tour's first step: a live-revenue stream through four subscribers, one of them
carrying the bug of the night in shunter's story.

Produce the stream → run the dispatcher from the YAML it would run from in production →
show progress until every message is consumed and every delivery settled (retries and
dead letters included) → stop cleanly → per-caller summary.

It uses the public API (``shunter.Dispatcher``) and reads progress only through
``observe.status``, the dispatcher's small documented status interface.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rich.console import Console

from ..app import Dispatcher
from ..broker.admin import ensure_topics
from ..observe.status import Status, status
from . import stream, summary, topology
from .clients import StreamProducer, admin_settings, read_dead_letters
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
    await asyncio.to_thread(ensure_topics, admin_settings(bootstrap), stream.TOPICS)
    path = topology.write(tour.workdir, bootstrap)
    app = Dispatcher(path)
    app.handlers()  # imports every handler, as `shunter check` does
    _introduce(console, app, path, plan, options.rate)
    producer = StreamProducer(bootstrap, events, options.rate)
    with captured() as digest:
        served = await _serve(app, producer, digest, tour)
    final = status(app)
    dead = await asyncio.to_thread(
        read_dead_letters, bootstrap, app.config.dlq_topic, final.written.get("dlq", 0)
    )
    complete = served.ending == "settled"
    report = summary.Report(
        plan,
        final,
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
        "The configuration (try `shunter check -c` on it):",
        highlight=False,
    )
    console.print(f"  {path}\n", highlight=False, soft_wrap=True)  # a path is never folded
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
    snap = _snapshot(status(app), producer, digest, tour.started)
    try:
        with Display(tour.console) as display:
            while time.monotonic() < deadline:
                if serving.done():  # Ctrl-C or SIGTERM: the dispatcher drained and stopped
                    ending = "interrupted"
                    break
                now = status(app)  # taken on the dispatcher's loop: one consistent moment
                snap = _snapshot(now, producer, digest, tour.started)
                display.show(snap)
                if _settled(app, now, producer):
                    ending = "settled"
                    snap = _snapshot(now, producer, digest, tour.started, "settled")
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


def _settled(app: Dispatcher, now: Status, producer: StreamProducer) -> bool:
    """Every record produced and consumed, every retry record consumed, nothing held.

    ``now`` is one consistent moment: a retry record is counted as written when the
    broker acknowledged it, and its source delivery stays pending until then. (The
    embedded broker's answers to watermark queries lag behind the last batch written, so
    they cannot tell when a topic is consumed to its end.)
    """
    if not now.serving or not now.partitions or not producer.finished.is_set():
        return False
    if now.pending:
        return False
    config = app.config
    return (
        sum(now.consumed(t) for t in config.topics) == producer.acked
        and now.consumed(config.fast_topic) == now.written.get("fast", 0)
        and now.consumed(config.slow_topic) == now.written.get("slow", 0)
    )


def _snapshot(
    now: Status,
    producer: StreamProducer,
    digest: LogDigest,
    started: float,
    phase: str | None = None,
) -> Snapshot:
    return Snapshot(
        elapsed=time.monotonic() - started,
        phase=phase or _phase(now, producer),
        produced=producer.acked,
        total=producer.total,
        consumed={topic: now.consumed(topic) for topic in stream.TOPICS},
        rejected=now.rejected,
        by_caller=now.callers,
        categories=now.categories,
        writes=now.written,
        notices=digest.notices,
        latest=digest.latest,
    )


def _phase(now: Status, producer: StreamProducer) -> str:
    if not now.serving:
        return "starting the dispatcher"
    if not now.partitions:
        return "joining the consumer group"
    if not producer.finished.is_set():
        return "streaming"
    return "settling (retries due, dead letters)"
