"""``journal``: what the crash guard's in-flight journal costs.

The same fan-out-3 run twice over the same topic, in fresh groups: once with the crash
guard on (the default: one acknowledged journal record per partition per batch before
its deliveries start) and once with it off. The cost is per batch, not per message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .context import BenchContext
from .dispatch import DispatchTiming
from .fanout import gift_dataset, served
from .raw import both_orders


def run(ctx: BenchContext) -> dict[str, Any]:
    data = gift_dataset(ctx)
    sides: dict[str, Callable[[], DispatchTiming]] = {
        "off": lambda: served(ctx, data, "journaloff", config={"crash_guard": {"enabled": False}}),
        "on": lambda: served(ctx, data, "journalon"),
    }
    order, done = both_orders(sides, ctx.run)  # each side twice, in both orders
    without, with_journal = done["off"], done["on"]
    return {
        "order": order,
        "messages": data.count,
        "partitions": len(data.ends),
        "subscribers": 3,
        "journal_msgs_per_s": round(with_journal.rate),
        "no_journal_msgs_per_s": round(without.rate),
        "ratio": round(with_journal.rate / without.rate, 3),
        "cost": round(1 - with_journal.rate / without.rate, 3),
    }
