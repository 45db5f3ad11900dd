"""The demo's subscribers: what four business teams might run on the live-revenue stream.

Each keeps its results in memory. ``on_guard_effect`` carries the bug of the night the
shunter story comes from: it reads a field of a nested object that some messages lack.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, defaultdict
from typing import Any

from ..message import Message
from .stream import rank_store_hiccup

medals: Counter[tuple[str, str]] = Counter()  # (user, anchor) -> intimacy points
ranks: defaultdict[str, Counter[str]] = defaultdict(Counter)  # room -> user -> coins
tasks: Counter[str] = Counter()  # anchor -> guard revenue towards this month's task
effects: Counter[str] = Counter()  # entrance effect -> times played
_ranks_lock = threading.Lock()


def coins(value: dict[str, Any]) -> int:
    """What a revenue event is worth: a gift's count x price, or a lottery's tickets."""
    if "gift_id" in value:
        return int(value["count"] * value["price"])
    return int(value["tickets"] * value["ticket_price"])


async def on_fan_medal(msg: Message) -> None:
    """fan-medal (revenue, async): one intimacy point per coin spent on an anchor."""
    value = msg.value
    medals[(value["user_id"], value["anchor_id"])] += coins(value)


def on_rank_board(msg: Message) -> None:
    """rank-board (revenue, sync on a thread): each room's leaderboard of spenders.

    Its store times out now and then on a first write; the fast retry tier recovers it.
    """
    value = msg.value
    if msg.attempt == 1 and rank_store_hiccup(value["event_id"]):
        raise TimeoutError("rank store did not answer within 50ms")
    with _ranks_lock:
        ranks[value["room_id"]][value["user_id"]] += coins(value)


async def on_anchor_task(msg: Message) -> None:
    """anchor-task (guard, async): guard revenue counts towards the anchor's monthly task."""
    value = msg.value
    await asyncio.sleep(0)  # where the task service would be called
    tasks[value["anchor_id"]] += value["price"]


def on_guard_effect(msg: Message) -> None:
    """guard-effect (guard, sync): plays the new guard's entrance effect in the room.

    The bug: it trusts every guard purchase to carry its nested ``effect`` object.
    """
    value = msg.value
    level = value["effect"]["level"]
    effects[f"{value['room_id']}:{value['effect']['entrance']}:{level}"] += 1
