"""``journal``: what the crash guard's in-flight journal costs.

The same fan-out-3 run twice over the same topic, in fresh groups: once with the crash
guard on (the default: one acknowledged journal record per partition per batch before
its deliveries start) and once with it off. The cost is per batch, not per message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .context import BenchContext
from .dispatch import DispatchTiming, Probe, run_dispatcher
from .fanout import RETRY, gift_dataset, three


def run(ctx: BenchContext) -> dict[str, Any]:
    data = gift_dataset(ctx)
    off_probe, on_probe = Probe(), Probe()
    sides: dict[str, Callable[[], DispatchTiming]] = {
        "off": lambda: run_dispatcher(
            ctx,
            data,
            "journaloff",
            three(off_probe),
            off_probe,
            RETRY,
            config={"crash_guard": {"enabled": False}},
        ),
        "on": lambda: run_dispatcher(ctx, data, "journalon", three(on_probe), on_probe, RETRY),
    }
    order = list(sides) if ctx.run % 2 else list(reversed(sides))  # alternate: no cold side
    done = {name: sides[name]() for name in order}
    without, with_journal = done["off"], done["on"]
    return {
        "order": "/".join(order),
        "messages": data.count,
        "partitions": len(data.ends),
        "subscribers": 3,
        "journal_msgs_per_s": round(with_journal.rate),
        "no_journal_msgs_per_s": round(without.rate),
        "ratio": round(with_journal.rate / without.rate, 3),
        "cost": round(1 - with_journal.rate / without.rate, 3),
    }
