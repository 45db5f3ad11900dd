"""The baseline: a bare confluent-kafka loop (batch consume + orjson decode, nothing else)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import orjson
from confluent_kafka import Consumer

from .context import BATCH_SIZE, BATCH_TIMEOUT, SOURCE_FIXED, BenchContext, Dataset


@dataclass(frozen=True)
class Timing:
    """One measured pass over a dataset."""

    messages: int
    seconds: float  # wall time from the first message to the end
    cpu: float  # process CPU seconds over the same span ÷ wall seconds (2.0 = two cores)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


def raw_loop(ctx: BenchContext, data: Dataset, timeout: float = 300.0) -> Timing:
    """Consume ``data`` once in a fresh group; time from the first message to the last."""
    consumer = Consumer(
        {
            **SOURCE_FIXED,
            **ctx.consumer,
            "bootstrap.servers": ctx.bootstrap,
            "group.id": ctx.group("raw", dispatcher=False),
        }
    )
    consumer.subscribe([data.topic])
    loads = orjson.loads
    want = data.count
    seen = 0
    first = cpu_first = 0.0
    deadline = time.monotonic() + timeout
    try:
        while seen < want:
            batch = consumer.consume(BATCH_SIZE, BATCH_TIMEOUT)
            if not batch:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"raw loop read {seen} of {want} messages in {timeout:.0f}s")
                continue
            if not seen:
                first, cpu_first = time.perf_counter(), time.process_time()
            for msg in batch:
                if msg.error() is None:
                    loads(msg.value())  # type: ignore[arg-type]  # never None here
                    seen += 1
        wall = time.perf_counter() - first
        return Timing(seen, wall, (time.process_time() - cpu_first) / wall)
    finally:
        consumer.close()
