"""Counters kept on the hot path as plain integers, exported to Prometheus on scrape.

A prometheus_client Counter takes a lock on every ``inc``; at several deliveries per
message that alone would cost more than the handlers. Here a delivery costs one dict
update and one bisect, and the collector (``collector.py``) turns the numbers into metric
families when Prometheus asks.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from .fingerprints import Fingerprints

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


_FIRST = BUCKETS[0]


class Latency:
    """One caller's handler latency histogram, and its successes by topic."""

    __slots__ = ("counts", "ok", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.ok: dict[str, int] = {}  # topic -> successful deliveries

    def observe(self, seconds: float) -> None:
        self.counts[0 if seconds <= _FIRST else bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def succeeded_many(self, topic: str | None, n: int, seconds: float, slow: list[float]) -> None:
        """``n`` successes of ``topic`` (None: the caller counts them by topic itself) that
        took ``seconds`` together; ``slow``: the times of those beyond the first bucket."""
        if topic is not None:
            ok = self.ok
            ok[topic] = ok.get(topic, 0) + n
        counts = self.counts
        counts[0] += n - len(slow)
        for s in slow:
            counts[bisect_left(BUCKETS, s)] += 1
        self.total += seconds

    def succeeded(self, topic: str, seconds: float) -> None:
        """The hot path: no tuple is built and no Counter touched for a success."""
        ok = self.ok
        ok[topic] = ok.get(topic, 0) + 1
        self.counts[0 if seconds <= _FIRST else bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds


class Stats:
    def __init__(self, categories: dict[str, str]) -> None:
        self.categories = categories  # caller -> category
        # (topic, caller, outcome) -> count for every outcome but ok (kept in Latency.ok)
        self._outcomes: Counter[tuple[str, str, str]] = Counter()
        self.messages: Counter[tuple[str, str]] = Counter()  # (topic, accepted|<stage>)
        self.writes: Counter[str] = Counter()  # tier -> acknowledged writes
        self.write_failures: Counter[str] = Counter()  # tier -> refused writes (retried)
        self.latency: dict[str, Latency] = {c: Latency() for c in categories}
        self.gauges: list[Callable[[], Iterator[GaugeMetricFamily]]] = []
        self.fingerprints = Fingerprints()  # fed by the settler for every failed delivery
        # What another module keeps for this Stats (``"http"``: the HTTP subscribers that
        # its metrics list), held here since a compiled Stats cannot be a weak key.
        self.extras: dict[str, Any] = {}

    @property
    def deliveries(self) -> Counter[tuple[str, str, str]]:
        """(topic, caller, outcome) -> count; outcome: ok | fast | slow | dlq | parked."""
        out = Counter(self._outcomes)
        for caller, lat in self.latency.items():
            for topic, n in lat.ok.items():
                out[(topic, caller, "ok")] += n
        return out

    def delivered(self, topic: str, caller: str, elapsed: float) -> None:
        self.latency[caller].succeeded(topic, elapsed)

    def failed(self, topic: str, caller: str, elapsed: float, tier: str) -> None:
        self._outcomes[(topic, caller, tier)] += 1
        self.latency[caller].observe(elapsed)

    def parked(self, topic: str, caller: str) -> None:
        self._outcomes[(topic, caller, "parked")] += 1

    def accepted(self, topic: str, count: int = 1) -> None:
        self.messages[(topic, "accepted")] += count

    def rejected(self, topic: str, stage: str) -> None:
        self.messages[(topic, stage)] += 1

    def written(self, tier: str) -> None:
        self.writes[tier] += 1

    def write_failed(self, tier: str) -> None:
        self.write_failures[tier] += 1

    def by_caller(self) -> dict[str, dict[str, int]]:
        """caller -> outcome -> count, over all topics."""
        out: dict[str, dict[str, int]] = {c: {} for c in self.categories}
        for (_topic, caller, outcome), n in self.deliveries.items():
            row = out.setdefault(caller, {})
            row[outcome] = row.get(outcome, 0) + n
        return out
