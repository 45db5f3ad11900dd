"""The Prometheus view of a ``Stats`` object: metric families built on each scrape.

Apart from ``stats.py`` because that module is compiled (setup.py) and this class derives
from prometheus_client's ``Collector``: the build sees dependencies as Any, and a compiled
class on a base it cannot see is broken at run time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from .fingerprints import MAX_PER_CALLER
from .stats import BUCKETS, Stats


class StatsCollector(Collector):
    """Prometheus view of a Stats object."""

    def __init__(self, stats: Stats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        stats = self._stats
        deliveries = CounterMetricFamily(
            "shunter_deliveries",
            "Deliveries by topic, category, caller and outcome "
            "(ok, fast, slow, dlq = where the delivery went; parked = caller paused).",
            labels=["topic", "category", "caller", "outcome"],
        )
        for (topic, caller, outcome), n in sorted(stats.deliveries.items()):
            deliveries.add_metric([topic, stats.categories.get(caller, ""), caller, outcome], n)
        yield deliveries
        messages = CounterMetricFamily(
            "shunter_messages",
            "Consumed source messages by topic and outcome (accepted, or the stage that "
            "rejected them).",
            labels=["topic", "outcome"],
        )
        for (topic, outcome), n in sorted(stats.messages.items()):
            messages.add_metric([topic, outcome], n)
        yield messages
        writes = CounterMetricFamily(
            "shunter_tier_writes",
            "Records acknowledged in a retry tier or the dead-letter topic.",
            labels=["tier"],
        )
        for tier, n in sorted(stats.writes.items()):
            writes.add_metric([tier], n)
        yield writes
        failures = CounterMetricFamily(
            "shunter_tier_write_failures",
            "Writes to a retry tier or the dead-letter topic the broker refused (each is "
            "written again after a backoff; its offset stays held meanwhile).",
            labels=["tier"],
        )
        for tier, n in sorted(stats.write_failures.items()):
            failures.add_metric([tier], n)
        yield failures
        latency = HistogramMetricFamily(
            "shunter_handler_seconds", "Handler latency per caller.", labels=["category", "caller"]
        )
        for caller, lat in sorted(stats.latency.items()):
            cumulative, buckets = 0, []
            for bound, n in zip((*BUCKETS, float("inf")), lat.counts, strict=True):
                cumulative += n
                buckets.append((_bound(bound), cumulative))
            latency.add_metric([stats.categories.get(caller, ""), caller], buckets, lat.total)
        yield latency
        failures = CounterMetricFamily(
            "shunter_failure_fingerprint",
            "Failed deliveries by caller and fingerprint (error type at the failing line of "
            f"the caller's code); at most {MAX_PER_CALLER} fingerprints per caller, the rest "
            "under 'other'.",
            labels=["caller", "fingerprint"],
        )
        for group in stats.fingerprints.rows():
            failures.add_metric([group.caller, group.label], group.count)
        yield failures
        for gauges in stats.gauges:
            yield from gauges()


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)
