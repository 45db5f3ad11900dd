"""Lag and backlog gauges, read from the instance's status rows at scrape time.

Partition metrics carry the names of kafka-lag-exporter (``kafka_consumergroup_group_*``,
labels ``group``, ``topic``, ``partition``), so the dashboards and alerts operators already
run for it work on shunter as they are; ``kind`` (source | retry) is added so that an alert
can leave the retry tiers out. shunter's own partition gauges are labelled ``topic`` and
``partition`` only. Only this instance's assigned partitions are reported: a
group's figure is the sum (or max) over its instances. Where kafka-lag-exporter also
scrapes the same group, filter by ``job``.

| metric | meaning |
| --- | --- |
| kafka_consumergroup_group_lag | end offset minus position (messages), every assigned partition |
| kafka_consumergroup_group_lag_seconds | age of the oldest unsettled record (Kafka time) |
| kafka_consumergroup_group_offset | position: where a new owner would start |
| kafka_partition_latest_offset | the partition's end offset (high watermark) last seen |
| shunter_partition_in_flight | offsets consumed and not yet settled |
| shunter_partition_stuck_seconds | how long the position has not moved while offsets wait |
| shunter_partition_stalled | 1 while stuck longer than ``kafka.stall_after`` |
| shunter_caller_backlog | per caller and state (queued, running, parked) |
| shunter_caller_pending | per caller: queued + running (the name of earlier versions) |
| shunter_caller_oldest_pending_seconds | age of the caller's oldest queued/running record |
| shunter_caller_paused | 1 while the caller is paused |
| shunter_caller_stuck_slots | slots held by handlers running on after their delivery was settled |
| shunter_caller_flood_paused | 1 while the dead-letter flood guard holds the caller paused |
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from .status import CallerStatus, PartitionStatus
from .statusread import read_status

_PART = ["group", "topic", "partition", "kind"]  # kafka-lag-exporter's, and the tier
_OWN = ["topic", "partition"]  # shunter's own partition gauges (one group per instance)
_CALLER = ["caller", "category"]


def backlog_parts(row: CallerStatus) -> dict[str, int]:
    """A caller's backlog by state. ``parked`` (deliveries set aside while the caller is
    paused) is reported once the status rows carry it (group-wide pause, issue #12)."""
    parts = {"queued": row.queued, "running": row.running}
    parked = getattr(row, "parked", None)
    if isinstance(parked, int):
        parts["parked"] = parked
    return parts


def partition_families(group: str, rows: list[PartitionStatus]) -> Iterator[GaugeMetricFamily]:
    lag = GaugeMetricFamily(
        "kafka_consumergroup_group_lag",
        "Messages between the group's position and the end of the partition (every "
        "partition assigned to this instance, idle ones included).",
        labels=_PART,
    )
    seconds = GaugeMetricFamily(
        "kafka_consumergroup_group_lag_seconds",
        "Age of the oldest unsettled record of the partition by its Kafka timestamp (0: none).",
        labels=_PART,
    )
    offset = GaugeMetricFamily(
        "kafka_consumergroup_group_offset",
        "The offset a new owner of the partition would start from.",
        labels=_PART,
    )
    latest = GaugeMetricFamily(
        "kafka_partition_latest_offset", "The partition's end offset last seen.", labels=_PART
    )
    in_flight = GaugeMetricFamily(
        "shunter_partition_in_flight", "Offsets consumed and not yet settled.", labels=_OWN
    )
    stuck = GaugeMetricFamily(
        "shunter_partition_stuck_seconds",
        "How long the position has not moved while offsets were unsettled.",
        labels=_OWN,
    )
    stalled = GaugeMetricFamily(
        "shunter_partition_stalled",
        "1 while the partition has been stuck longer than kafka.stall_after.",
        labels=_OWN,
    )
    for row in rows:
        labels = [group, row.topic, str(row.partition), row.kind]
        own = labels[1:3]
        if row.lag is not None:
            lag.add_metric(labels, row.lag)
        if row.position >= 0:
            offset.add_metric(labels, row.position)
        if row.end is not None:
            latest.add_metric(labels, row.end)
        seconds.add_metric(labels, row.lag_seconds)
        in_flight.add_metric(own, row.in_flight)
        stuck.add_metric(own, row.stuck_seconds)
        stalled.add_metric(own, 1.0 if row.stalled else 0.0)
    yield from (lag, seconds, offset, latest, in_flight, stuck, stalled)


def caller_families(
    rows: list[CallerStatus], flood_paused: set[str]
) -> Iterator[GaugeMetricFamily]:
    backlog = GaugeMetricFamily(
        "shunter_caller_backlog",
        "Deliveries of the caller not yet settled, by state: queued (waiting for a slot "
        "or its lane), running (in the handler), parked (set aside while paused).",
        labels=[*_CALLER, "state"],
    )
    pending = GaugeMetricFamily(
        "shunter_caller_pending", "Deliveries queued or running per caller.", labels=_CALLER
    )
    oldest = GaugeMetricFamily(
        "shunter_caller_oldest_pending_seconds",
        "Age (Kafka timestamp) of the caller's oldest queued or running record (0: none).",
        labels=_CALLER,
    )
    paused = GaugeMetricFamily(
        "shunter_caller_paused", "1 while the caller is paused.", labels=_CALLER
    )
    flood = GaugeMetricFamily(
        "shunter_caller_flood_paused",
        "1 while the dead-letter flood guard holds the caller paused.",
        labels=_CALLER,
    )
    stuck = GaugeMetricFamily(
        "shunter_caller_stuck_slots",
        "Slots of the caller held by handlers that run on after their delivery was settled "
        "without them (a thread past its timeout, a coroutine that ignored its "
        "cancellation, a skipped delivery); at the caller's concurrency nothing of it runs.",
        labels=_CALLER,
    )
    for row in rows:
        labels = [row.caller, row.category]
        stuck.add_metric(labels, row.stuck)
        for state, n in backlog_parts(row).items():
            backlog.add_metric([*labels, state], n)
        pending.add_metric(labels, row.queued + row.running)
        oldest.add_metric(labels, row.oldest_pending_seconds)
        paused.add_metric(labels, 1.0 if row.paused else 0.0)
        flood.add_metric(labels, 1.0 if row.paused and row.caller in flood_paused else 0.0)
    yield from (backlog, pending, oldest, paused, flood, stuck)


def lag_gauges(service: Any) -> Callable[[], Iterator[GaugeMetricFamily]]:
    """The gauges of one instance, for ``Stats.gauges`` (called at each scrape)."""

    def collect() -> Iterator[GaugeMetricFamily]:
        partitions, callers = read_status(service)
        yield from partition_families(service.config.kafka.group_id, partitions)
        flood = getattr(service, "flood", None)
        tripped = set(getattr(flood, "tripped", ()) or ())
        yield from caller_families(callers, tripped)

    return collect
