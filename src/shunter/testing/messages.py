"""Build a ``shunter.Message`` for a handler's unit test, without Kafka."""

from __future__ import annotations

from typing import Any

import orjson

from ..commit.tracker import PartitionTracker
from ..message import Message, Record


def make_message(
    value: Any,
    *,
    topic: str = "topic",
    partition: int = 0,
    offset: int = 0,
    key: bytes | None = None,
    caller: str = "caller",
    category: str = "category",
    attempt: int = 1,
    headers: list[tuple[str, bytes]] | None = None,
    timestamp: int = 0,
    raw: bytes | None = None,
) -> Message:
    """A message as a handler would receive it; ``raw`` defaults to ``value`` as JSON."""
    if raw is None:
        raw = value if isinstance(value, bytes) else orjson.dumps(value)
    record = Record(
        topic,
        partition,
        offset,
        key,
        raw,
        timestamp,
        headers,
        PartitionTracker((topic, partition)),
        offset,
    )
    record.value = value
    return Message(record, caller, category, attempt)
