"""``io-bound``: three subscribers that each wait 20 ms per delivery, 1,000 keys, key order.

With the handlers doing nothing but wait, throughput is bound by how many deliveries may
be in flight at once: per subscriber its concurrency limit, or the number of keys when
there are fewer keys (one delivery per key at a time). ``efficiency`` is the measured
delivery rate over that bound's ideal, ``max_in_flight ÷ 20 ms``; ``shunter_cpu`` shows
that the process is not CPU-bound while it gets there.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..message import Message
from . import events
from .context import BenchContext
from .dispatch import Handler, Probe, Subscriber, run_dispatcher

SLEEP = 0.02
KEYS = 1_000
CONCURRENCY = 64
SUBSCRIBERS = 3
PARTITIONS = 6
# The ideal rate is CONCURRENCY / SLEEP = 3,200 messages/s: this takes ~15 s.
MESSAGES = 48_000


def waiting(probe: Probe | None = None) -> Handler:
    async def wait(msg: Message) -> None:
        if probe is not None and not probe.wall:
            probe.start()
        await asyncio.sleep(SLEEP)

    return wait


def io_bound(ctx: BenchContext) -> dict[str, Any]:
    count = ctx.count(MESSAGES)
    data = ctx.dataset(
        f"keys{KEYS}-{count}", PARTITIONS, lambda: events.round_robin_keys(count, KEYS)
    )
    probe = Probe()
    subscribers = [
        Subscriber(f"waiter-{i}", waiting(probe if i == 0 else None), concurrency=CONCURRENCY)
        for i in range(SUBSCRIBERS)
    ]
    shunter = run_dispatcher(ctx, data, "iobound", subscribers, probe)
    keys = min(KEYS, count)
    max_in_flight = SUBSCRIBERS * min(CONCURRENCY, keys)
    ideal = max_in_flight / SLEEP  # deliveries per second
    deliveries_per_s = shunter.rate * SUBSCRIBERS
    return {
        "messages": data.count,
        "partitions": len(data.ends),
        "subscribers": SUBSCRIBERS,
        "keys": keys,
        "concurrency": CONCURRENCY,
        "handler_sleep_s": SLEEP,
        "shunter_msgs_per_s": round(shunter.rate),
        "deliveries_per_s": round(deliveries_per_s),
        "max_in_flight": max_in_flight,
        "ideal_deliveries_per_s": round(ideal),
        "efficiency": round(deliveries_per_s / ideal, 3),
        "shunter_seconds": round(shunter.seconds, 3),
        "shunter_cpu": round(shunter.cpu, 2),
        "deliveries": shunter.outcomes(),
    }
