"""The crash guard as the pipeline uses it: journal writes and partition recovery."""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError

from ..settle.producer import ReliableProducer
from .journal import TP, PartitionState, key_of, read_latest, recover

log = logging.getLogger("shunter.crashguard")

# Set by the supervisor for the worker it restarts after an unclean death.
LAST_EXIT_ENV = "SHUNTER_LAST_EXIT"


@dataclass
class SuspectRun:
    """A partition re-running the window its previous owner died in, one offset at a time."""

    hi: int
    queue: deque[Any] = field(default_factory=deque)
    running: bool = False
    complete: bool = False  # every offset up to ``hi`` has been taken from the stream


class CrashGuard:
    def __init__(
        self,
        producer: ReliableProducer,
        topic: str,
        settings: dict[str, Any],
        quarantine_after: int,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.settings = settings
        self.quarantine_after = quarantine_after
        self.last_exit = os.environ.get(LAST_EXIT_ENV, "")
        self.states: dict[TP, PartitionState] = {}

    def write(self, tp: TP, value: bytes, done: Any) -> None:
        """Journal one record; ``done(err)`` on the loop. A failed write is written again."""

        def answer(err: KafkaError | None) -> None:
            if err is None:
                done(None)
                return
            log.error("journal write for %s[%d] failed (%s); retrying", tp[0], tp[1], err)
            asyncio.get_running_loop().call_later(0.5, self.write, tp, value, done)

        self.producer.send(self.topic, key_of(tp), value, [], answer)

    async def write_and_wait(self, tp: TP, value: bytes) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done(_: Any) -> None:
            if not future.done():
                future.set_result(None)

        self.write(tp, value, done)
        await future

    async def recover(self, tps: list[TP], committed: dict[TP, int]) -> dict[TP, PartitionState]:
        """Read the journal for newly assigned partitions; return each one's state."""
        keys = {key_of(tp): tp for tp in tps}
        entries = await asyncio.to_thread(read_latest, self.settings, self.topic, set(keys))
        out = {}
        for key, tp in keys.items():
            state = recover(entries.get(key), committed.get(tp, -1))
            self.states[tp] = state
            out[tp] = state
            if state.suspects_hi >= 0:
                log.warning(
                    "%s[%d]: its previous owner (%s) died with deliveries in flight; re-running "
                    "offsets %d..%d one at a time (quarantine after %d crashes)",
                    tp[0],
                    tp[1],
                    entries[key].owner,
                    committed.get(tp, -1),
                    state.suspects_hi,
                    self.quarantine_after,
                )
        return out

    def forget(self, tps: list[TP]) -> None:
        for tp in tps:
            self.states.pop(tp, None)
