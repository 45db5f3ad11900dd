"""``journal``: what the crash guard's in-flight journal costs.

The same fan-out-3 run twice over the same topic, in fresh groups: once with the crash
guard on (the default: one acknowledged journal record per partition per batch before
its deliveries start) and once with it off. The cost is per batch, not per message.
"""

from __future__ import annotations

from typing import Any

from .context import BenchContext
from .dispatch import Probe, run_dispatcher
from .fanout import RETRY, gift_dataset, three


def run(ctx: BenchContext) -> dict[str, Any]:
    data = gift_dataset(ctx)
    probe = Probe()
    without = run_dispatcher(
        ctx,
        data,
        "journaloff",
        three(probe),
        probe,
        RETRY,
        config={"crash_guard": {"enabled": False}},
    )
    probe = Probe()
    with_journal = run_dispatcher(ctx, data, "journalon", three(probe), probe, RETRY)
    return {
        "messages": data.count,
        "partitions": len(data.ends),
        "subscribers": 3,
        "journal_msgs_per_s": round(with_journal.rate),
        "no_journal_msgs_per_s": round(without.rate),
        "ratio": round(with_journal.rate / without.rate, 3),
        "cost": round(1 - with_journal.rate / without.rate, 3),
    }
