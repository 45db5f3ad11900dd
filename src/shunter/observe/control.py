"""Paused callers, kept in a compacted topic so that a pause survives restarts.

Whoever pauses a caller — an operator through the admin API, or the dead-letter flood
guard — writes ``{"paused": true}`` under the caller's name; every instance of the group
reads the table at start and pauses those callers before consuming anything.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

from ..broker.compacted import read_table
from ..settle.producer import ReliableProducer

log = logging.getLogger("shunter.control")


class CallerControl:
    def __init__(self, producer: ReliableProducer, topic: str, settings: dict[str, Any]) -> None:
        self._producer = producer
        self._topic = topic
        self._settings = settings

    def paused(self) -> dict[str, str]:
        """caller -> the reason it is paused."""
        out = {}
        for key, value in read_table(self._settings, self._topic).items():
            try:
                state = orjson.loads(value)
            except orjson.JSONDecodeError:
                log.error("unreadable control record for %r; ignored", key)
                continue
            if state.get("paused"):
                out[key.decode()] = str(state.get("reason", ""))
        return out

    async def record(self, caller: str, paused: bool, reason: str) -> None:
        """Write the caller's state and wait for the broker."""
        value = orjson.dumps({"paused": paused, "reason": reason, "ts": int(time.time() * 1000)})
        await self._producer.wait(self._topic, caller.encode(), value, [])
