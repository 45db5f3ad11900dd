"""``memory``: the RSS of ``shunter run`` (supervisor, worker and anything they start) over
a large backlog that one subscriber cannot keep up with.

Two no-op subscribers and one that waits 1 ms per delivery with 4 in flight (at most
4,000 deliveries a second, far below the rate the stream could be read at), crash guard
on, default ``kafka.max_in_flight``. What must hold is that memory is bounded by the
in-flight window, not by the backlog: the RSS of the whole process tree is sampled once a
second for ``DURATION`` seconds (or until the backlog is committed) and reported at points
in time, with its peak and its slope over the last minute.
"""

from __future__ import annotations

import time
from typing import Any

from . import events, procs
from .context import BenchContext
from .dispatch import Subscriber, bench_config
from .fanout import RETRY, USERS, noop

MESSAGES = 1_000_000
PARTITIONS = 6
DURATION = 120.0  # seconds of sampling
SLOW_S = 0.001
SLOW_CONCURRENCY = 4
_MB = 1024 * 1024


def run(ctx: BenchContext) -> dict[str, Any]:
    count = ctx.count(MESSAGES)
    data = ctx.dataset(f"gift-{count}", PARTITIONS, lambda: events.gift_events(count, USERS))
    group = ctx.group("memory")
    subscribers = [
        Subscriber("medal", noop()),
        Subscriber("rank", noop()),
        Subscriber("slow", noop(), concurrency=SLOW_CONCURRENCY),
    ]
    config = bench_config(ctx, data, group, subscribers, RETRY)
    callers = {"medal": "medal", "rank": "rank", "slow": "slow"}
    path = procs.write_service(ctx, config, callers, group)
    samples: list[tuple[float, int]] = []
    committed = procs.Committed(ctx, group, data)
    try:
        with procs.running(path, env={"SHUNTER_BENCH_SLOW_S": str(SLOW_S)}) as proc:
            started = time.monotonic()
            # Until DURATION, or the whole backlog committed (a small --messages)
            while (elapsed := time.monotonic() - started) < DURATION:
                if proc.poll() is not None:
                    tail = procs.log_tail(path)
                    raise RuntimeError(f"shunter exited with {proc.returncode}: {tail}")
                samples.append((elapsed, procs.tree_rss(proc.pid)))
                if committed.reached():
                    break
                time.sleep(1.0 - (time.monotonic() - started) % 1.0)
            progress = committed.total()
            status = procs.stop(proc)
    finally:
        committed.close()
    if status != 0:
        raise RuntimeError(f"shunter exited with {status}: {procs.log_tail(path)}")
    last_minute = [(t, rss) for t, rss in samples if t >= DURATION - 60.0]
    return {
        "messages": data.count,
        "partitions": PARTITIONS,
        "subscribers": 3,
        "seconds_sampled": round(samples[-1][0], 1),
        "committed_when_sampling_ended": progress,
        "rss_mb_at_5s": _at(samples, 5.0),
        "rss_mb_at_30s": _at(samples, 30.0),
        "rss_mb_at_60s": _at(samples, 60.0),
        "rss_mb_at_end": round(samples[-1][1] / _MB, 1),
        "rss_mb_peak": round(max(rss for _, rss in samples) / _MB, 1),
        "rss_mb_per_min_last_minute": round(_slope(last_minute) * 60 / _MB, 2),
    }


def _at(samples: list[tuple[float, int]], when: float) -> float:
    rss = next((rss for t, rss in samples if t >= when), samples[-1][1])
    return round(rss / _MB, 1)


def _slope(points: list[tuple[float, int]]) -> float:
    """Least-squares slope, bytes per second."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_r = sum(r for _, r in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (r - mean_r) for t, r in points) / var if var else 0.0
