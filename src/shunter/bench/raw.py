"""The baseline: a bare confluent-kafka loop (batch consume + orjson decode, nothing else)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self, TypeVar

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

    def plus(self, other: Self) -> Self:
        """Both passes as one: their messages over their seconds together."""
        seconds = self.seconds + other.seconds
        cpu = (self.cpu * self.seconds + other.cpu * other.seconds) / seconds if seconds else 0.0
        return dataclasses.replace(
            self, messages=self.messages + other.messages, seconds=seconds, cpu=cpu
        )


T = TypeVar("T", bound=Timing)


def both_orders(sides: dict[str, Callable[[], T]], run: int) -> tuple[str, dict[str, T]]:
    """Every side measured twice, in one order and then in the reverse one (A B C C B A),
    the first order alternating between runs; each side's two passes taken together.

    The order of the sides within a run moved the ratios by more than the noise on this
    2-core machine (fanout-3-failing over 12 runs: 0.81-0.85 with the failing side first,
    0.87-0.95 with it second; the journal's cost 17 and 13 % with it second, 5 % first),
    and a plain alternation over an odd number of runs (two runs one way, one the other)
    leaves that in the median. Measured both ways in every run, no side is favoured by its
    place. Returns the order (as "A/B/C+reversed") and each side's combined timing."""
    order = list(sides) if run % 2 else list(reversed(sides))
    done: dict[str, T] = {}
    for name in [*order, *reversed(order)]:
        timing = sides[name]()
        done[name] = timing if name not in done else done[name].plus(timing)
    return "/".join(order) + "+reversed", done


def raw_loop(
    ctx: BenchContext,
    data: Dataset,
    timeout: float = 300.0,
    work: Callable[[Any], None] | None = None,
    name: str = "raw",
) -> Timing:
    """Consume ``data`` once in a fresh group; time from the first message to the last.

    ``work``, when given, is called with every decoded value (see ``floor_work``).
    """
    consumer = Consumer(
        {
            **SOURCE_FIXED,
            **ctx.consumer,
            "bootstrap.servers": ctx.bootstrap,
            "group.id": ctx.group(name, dispatcher=False),
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
            if work is None:
                for msg in batch:
                    if msg.error() is None:
                        loads(msg.value())  # type: ignore[arg-type]  # never None here
                        seen += 1
            else:
                for msg in batch:
                    if msg.error() is None:
                        work(loads(msg.value()))  # type: ignore[arg-type]
                        seen += 1
        wall = time.perf_counter() - first
        return Timing(seen, wall, (time.process_time() - cpu_first) / wall)
    finally:
        consumer.close()


def floor_work(schema: dict[str, Any], handlers: int, count: Any = None) -> Callable[[Any], None]:
    """What no in-process Python dispatcher can skip, per decoded value: the schema check
    and one call of each of ``handlers`` no-op async handlers, run to completion. No
    tracking, no ordering, no settling, no commit: the ceiling of any such dispatcher.
    ``count`` (an object with an ``n``), when given, counts the handler calls as
    shunter's bench handlers count theirs."""
    import jsonschema_rs

    is_valid = jsonschema_rs.validator_for(schema).is_valid

    async def nothing(value: Any) -> None:
        pass

    async def counted(value: Any) -> None:
        count.n += 1

    calls = [nothing if count is None else counted] * handlers

    def work(value: Any) -> None:
        if is_valid(value):
            for handler in calls:
                try:  # noqa: SIM105 - suppress() would cost a call per delivery here
                    handler(value).send(None)
                except StopIteration:
                    pass

    return work
