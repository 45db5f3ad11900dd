"""What every scenario is given: the broker, the consumer settings both sides share, the
datasets produced once per broker (see ``shunter bench``), and unique names for groups
and topics."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..broker.admin import ensure_topics
from ..broker.embedded import CONSUMER_SETTINGS
from . import events

# The consumer settings the raw loop and shunter share (shunter gets them as
# ``kafka.consumer``); set explicitly so that neither side runs on different defaults.
CONSUMER: dict[str, Any] = {
    **CONSUMER_SETTINGS,
    "fetch.min.bytes": 1,
    "fetch.wait.max.ms": 100,
    "fetch.max.bytes": 52_428_800,
    "max.partition.fetch.bytes": 1_048_576,
    "queued.min.messages": 100_000,
    "queued.max.messages.kbytes": 65_536,
    # librdkafka stops fetching for this long once its queue holds queued.min.messages;
    # at the default (1 s) a loop that empties the queue faster than that idles.
    "fetch.queue.backoff.ms": 20,
}

# What shunter's KafkaSource sets itself; the raw loop sets the same.
SOURCE_FIXED: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "partition.assignment.strategy": "cooperative-sticky",
}

BATCH_SIZE = 1000  # messages per consume() call: shunter's default kafka.batch_size
BATCH_TIMEOUT = 0.1  # seconds per consume() call, as in shunter's consumer thread


@dataclass(frozen=True)
class Dataset:
    """A pre-produced topic: its name and the end offset of every partition."""

    topic: str
    ends: dict[int, int]

    @property
    def count(self) -> int:
        return sum(self.ends.values())


@dataclass
class BenchContext:
    """Shared by the scenarios of one ``shunter bench`` invocation."""

    bootstrap: str
    workdir: Path
    messages: int | None = None  # --messages: overrides each scenario's default
    run: int = 1  # 1-based index of the current repetition
    embedded: bool = False  # the embedded development broker (no --bootstrap)
    broker_pid: int | None = None  # the embedded broker's process: its CPU is measured too
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    consumer: dict[str, Any] = field(default_factory=lambda: dict(CONSUMER))
    created: list[str] = field(default_factory=list)  # topics to delete afterwards
    say: Callable[[str], None] = lambda text: None  # progress, for a person watching
    _datasets: dict[str, Dataset] = field(default_factory=dict)
    _groups: int = 0

    def count(self, default: int) -> int:
        """How many messages a scenario uses: --messages, else its own default."""
        return self.messages if self.messages is not None else default

    def dataset(
        self, name: str, partitions: int, records: Callable[[], Iterator[tuple[bytes, bytes]]]
    ) -> Dataset:
        """The topic ``name`` filled once per broker by ``records()``, then reused."""
        found = self._datasets.get(name)
        if found is not None:
            return found
        topic = f"bench-{name}-{self.tag}"
        self.say(f"producing {name} to {topic} ({partitions} partitions)")
        ensure_topics({"bootstrap.servers": self.bootstrap}, {topic: partitions})
        self.created.append(topic)
        ends = events.produce(self.bootstrap, topic, records())
        dataset = Dataset(topic, {p: ends.get(p, 0) for p in range(partitions)})
        self._datasets[name] = dataset
        return dataset

    def group(self, name: str, dispatcher: bool = True) -> str:
        """A consumer group never used before, so it reads from the beginning."""
        self._groups += 1
        group = f"bench-{name}-{self.tag}-{self._groups}"
        if dispatcher:  # shunter creates these for its group; they go with the bench's own
            self.created.extend(f"{group}.{tier}" for tier in ("retry.fast", "retry.slow", "dlq"))
        return group

    def schema_file(self) -> Path:
        """The gift events' JSON Schema as a file, for the ``topics.<name>.schema`` key."""
        import orjson

        path = self.workdir / "gift.schema.json"
        if not path.exists():
            path.write_bytes(orjson.dumps(events.GIFT_SCHEMA))
        return path
