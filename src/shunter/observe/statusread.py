"""The one way the admin API, the metrics and the dashboard read an instance's state:
``Pipeline.status()``'s frozen rows, never the trackers, runtimes or consumer behind them."""

from __future__ import annotations

from typing import Any, Protocol, cast

from .status import CallerStatus, PartitionStatus

Status = tuple[list[PartitionStatus], list[CallerStatus]]


class StatusSource(Protocol):
    def status(self) -> Status: ...


def read_status(service: Any) -> Status:
    """The instance's partitions and callers; nothing before the pipeline is built."""
    pipeline = cast(StatusSource | None, service.pipeline)
    if pipeline is None:
        return [], []
    return pipeline.status()
