"""The in-process subscribers of the live-revenue example.

Each keeps its results in memory and appends one line per delivery to the file named by
``REVENUE_LEDGER`` (if set), so a test or an operator can see who received what.
"""

from __future__ import annotations

import os
import threading
from collections import Counter

import shunter

medals: Counter[tuple[str, str]] = Counter()  # (user, anchor) -> intimacy points
ranks: Counter[tuple[str, str]] = Counter()  # (room, user) -> coins
effects: Counter[str] = Counter()  # entrance effect -> times played
_lock = threading.Lock()


def _record(msg: shunter.Message) -> None:
    ledger = os.environ.get("REVENUE_LEDGER")
    if ledger:
        with _lock, open(ledger, "a") as out:
            out.write(f"{msg.caller} {msg.topic} {msg.partition} {msg.offset}\n")


def coins(value: dict[str, int]) -> int:
    """What a revenue event is worth: a gift's count x price, or a lottery's tickets."""
    if "gift_id" in value:
        return value["count"] * value["price"]
    return value["tickets"] * value["ticket_price"]


async def on_fan_medal(msg: shunter.Message) -> None:
    """fan-medal (revenue, async): one intimacy point per coin spent on an anchor."""
    value = msg.value
    medals[(value["user_id"], value["anchor_id"])] += coins(value)
    _record(msg)


def on_rank_board(msg: shunter.Message) -> None:
    """rank-board (revenue, sync on a thread): each room's leaderboard of spenders."""
    value = msg.value
    with _lock:
        ranks[(value["room_id"], value["user_id"])] += coins(value)
    _record(msg)


def on_guard_effect(msg: shunter.Message) -> None:
    """guard-effect (guard, in a worker process): the new guard's entrance effect.

    A purchase without an effect object is a dead letter with a reason, not a crash.
    """
    purchase = msg.value  # a revenue.models.GuardPurchase
    if purchase.effect is None:
        raise shunter.DeadLetter(f"guard purchase {purchase.event_id} has no effect object")
    effects[f"{purchase.room_id}:{purchase.effect.entrance}:{purchase.effect.level}"] += 1
    _record(msg)
