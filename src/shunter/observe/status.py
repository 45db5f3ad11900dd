"""What an instance says about itself: frozen rows, read by the admin API and the tools.

The pipeline produces these (``Pipeline.status()``); readers never reach into trackers,
runtimes or the consumer. Every field is a plain value, safe to serialise as it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class PartitionStatus:
    """One assigned partition (source or retry tier)."""

    topic: str
    partition: int
    kind: str  # "source" | "retry"
    position: int  # the offset a new owner would start from (-1: nothing consumed yet)
    committed: int  # the last offset handed to the committer (-1: none)
    end: int | None  # the high watermark last seen (None: not known yet)
    lag: int | None  # end - position (None while either is unknown)
    in_flight: int  # offsets consumed and not yet settled
    lag_seconds: float  # age of the oldest unsettled record by its Kafka timestamp (0: none)
    stuck_seconds: float  # how long the position has not moved while offsets were unsettled
    held: str  # "" or why the oldest unsettled offset waits (see Pipeline.status)
    stalled: bool  # stuck_seconds > kafka.stall_after

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class CallerStatus:
    """One subscriber on this instance."""

    caller: str
    category: str
    paused: bool
    queued: int  # deliveries waiting for a slot or their lane
    running: int  # deliveries suspended in the handler
    oldest_pending_seconds: float  # age (Kafka timestamp) of its oldest queued/running record

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
