"""``workers``: ``shunter run`` with one worker process vs N (the machine's cores), same run.

Both sides are the real service under its supervisor: fan-out to 3 no-op subscribers over
a backlog of gift events with the crash guard on, in fresh groups. Each is timed from its
first handler call to its last (the handlers stamp both and count their own calls): the
work done, as the other scenarios time it to every offset settled. ``speedup_committed``
times both sides until the group's committed offsets reach the end of the topic instead,
which adds to each the same fixed wait (a commit interval, and the bench's polling). The
order alternates between runs. N workers pay for forming the group while the backlog is
read (one member starts alone, the others join and take their share): that is part of the
figure.
``steady_speedup`` compares the handler-call rates over the span in which every worker of
a side was delivering (the group formed, the tail not reached), from marks the handlers
take every 3,000 calls.

The topic has 12 partitions and each retry tier 1: the cooperative-sticky assignor
balances the number of partitions per member, retry tiers included, so retry partitions as
many as the source's could leave a member with retry partitions only.
"""

from __future__ import annotations

import os
from typing import Any

from . import events, procs
from .context import BenchContext
from .dispatch import Subscriber, bench_config
from .fanout import RETRY, USERS, noop

MESSAGES = 300_000
PARTITIONS = 12
TIMEOUT = 600.0


def workers_count() -> int:
    return max(2, os.cpu_count() or 1)


def run(ctx: BenchContext) -> dict[str, Any]:
    count = ctx.count(MESSAGES)
    data = ctx.dataset(f"gift12-{count}", PARTITIONS, lambda: events.gift_events(count, USERS))
    n = workers_count()
    order = [1, n] if ctx.run % 2 else [n, 1]
    measured = {w: _one(ctx, data, w) for w in order}
    one, many = measured[1], measured[n]
    return {
        "messages": data.count,
        "partitions": PARTITIONS,
        "subscribers": 3,
        "workers": n,
        "order": "/".join(str(w) for w in order),
        "one_msgs_per_s": round(one["rate"]),
        "n_msgs_per_s": round(many["rate"]),
        "speedup": round(many["rate"] / one["rate"], 3),
        "speedup_committed": round(one["committed"] / many["committed"], 3),
        "one_seconds": round(one["seconds"], 3),
        "n_seconds": round(many["seconds"], 3),
        # While every worker delivers: the group formed, the tail not yet reached (None
        # when a side had no such span of half a second).
        "steady_speedup": (
            round(many["steady"] / one["steady"], 3) if many["steady"] and one["steady"] else None
        ),
        "one_calls_per_message": round(one["calls"] / (3 * data.count), 4),
        "n_calls_per_message": round(many["calls"] / (3 * data.count), 4),
        "n_processes_that_delivered": many["processes"],
        # How long after the first worker's first handler call the last one made its
        # first: the group forming while the backlog is read.
        "n_last_worker_lag_s": round(many["lag"], 3),
    }


def _one(ctx: BenchContext, data: Any, workers: int) -> dict[str, Any]:
    group = ctx.group(f"workers{workers}")
    subscribers = [Subscriber(c, noop()) for c in ("medal", "rank", "task")]
    config = bench_config(ctx, data, group, subscribers, RETRY, {"retry": {"partitions": 1}})
    path = procs.write_service(ctx, config, {c: c for c in ("medal", "rank", "task")}, f"{group}")
    with procs.running(path, "--workers", str(workers)) as proc:
        end = procs.wait_committed(ctx, group, data, proc, path, TIMEOUT)
        status = procs.stop(proc)
    if status != 0:
        raise RuntimeError(f"shunter exited with {status}: {procs.log_tail(path)}")
    reports = [r for r in procs.handler_reports(path) if r["first"]]
    first = min(r["first"] for r in reports)
    calls = sum(sum(r["calls"].values()) for r in reports)
    seconds = max(r["last"] for r in reports) - first
    return {
        "rate": data.count / seconds,
        "seconds": seconds,
        "committed": end - first,
        "calls": calls,
        "processes": len(reports),
        "lag": max(r["first"] for r in reports) - first,
        "steady": procs.steady_rate(reports),
    }
