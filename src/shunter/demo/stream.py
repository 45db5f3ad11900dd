"""A seeded live-revenue stream: gifts, lotteries and guard purchases, a few malformed.

The same seed and size always give the same events, and the ``Plan`` says exactly what
the stream holds, so the demo (and its test) can check every number shunter reports.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson

GIFT, LOTTERY, GUARD = "gift", "lottery", "guard_purchase"
TOPICS = {GIFT: 6, LOTTERY: 3, GUARD: 3}  # topic -> partitions
NIGHT = "guard_purchase_night"  # the crash guard's step: one partition of guard purchases

# (gift_id, name, price in coins): cheap gifts are sent far more often than rockets.
GIFTS = [
    (1, "glow stick", 1),
    (2, "heart", 5),
    (3, "rose", 10),
    (4, "ice cream", 50),
    (5, "sports car", 500),
    (6, "yacht", 2_000),
    (7, "rocket", 10_000),
]
GIFT_WEIGHTS = [40, 25, 18, 10, 4, 2, 1]
GUARD_LEVELS = {1: ("captain", 198), 2: ("admiral", 1_998), 3: ("governor", 19_998)}

USERS, ROOMS = 5_000, 300
INVALID_JSON_RATE = 0.002  # of gifts and lotteries
SCHEMA_VIOLATION_RATE = 0.0025  # of gifts
NO_EFFECT_RATE = 0.01  # of guard purchases: the nested ``effect`` object is missing


def rank_store_hiccup(event_id: int) -> bool:
    """The simulated rank store times out on these events' first write (then recovers)."""
    return event_id % 397 == 0


@dataclass(frozen=True, slots=True)
class Event:
    topic: str
    key: bytes
    value: bytes
    timestamp_ms: int


@dataclass
class Plan:
    """What the stream holds, counted while it was made."""

    produced: Counter[str] = field(default_factory=Counter)  # topic -> events
    invalid_json: Counter[str] = field(default_factory=Counter)  # topic -> events
    schema_violations: Counter[str] = field(default_factory=Counter)  # topic -> events
    guard_buys: int = 0  # well-formed JSON guard purchases of type 'buy'
    no_effect: int = 0  # guard purchases without their nested effect object
    no_effect_buys: int = 0  # ... of which are buys (the guard category's filter keeps them)
    hiccups: int = 0  # valid revenue events whose first rank-board write times out

    @property
    def total(self) -> int:
        return sum(self.produced.values())

    @property
    def rejected(self) -> int:
        return sum(self.invalid_json.values()) + sum(self.schema_violations.values())

    @property
    def revenue(self) -> int:
        """Gifts and lotteries that pass decoding and validation."""
        bad = sum(self.invalid_json[t] + self.schema_violations[t] for t in (GIFT, LOTTERY))
        return self.produced[GIFT] + self.produced[LOTTERY] - bad


def generate(
    total: int = 30_000, seed: int = 7, start_ms: int = 0, events_per_second: int = 5_000
) -> tuple[list[Event], Plan]:
    """``total`` events keyed by user, stamped ``events_per_second`` apart from ``start_ms``."""
    rng = random.Random(seed)
    plan = Plan()
    events = []
    for event_id in range(total):
        ts = start_ms + event_id * 1000 // max(1, events_per_second)
        base = _base(rng, event_id, ts)
        user = base["user_id"]
        pick = rng.random()
        if pick < 0.70:
            topic, value = GIFT, _gift(rng, base, plan)
        elif pick < 0.90:
            topic, value = LOTTERY, _lottery(rng, base, plan)
        else:
            topic, value = GUARD, _guard(rng, base, plan)
        plan.produced[topic] += 1
        events.append(Event(topic, user.encode(), value, ts))
    return events, plan


@dataclass(frozen=True, slots=True)
class Night:
    """The crash guard's stream: guard purchases, exactly one buy of them malformed."""

    events: list[Event]
    buys: frozenset[int]  # event ids of the buys: the guard category's filter keeps them
    culprit: int  # the event id of the buy whose nested ``effect`` object is missing


def night(
    total: int = 300, seed: int = 7, start_ms: int = 0, events_per_second: int = 100
) -> Night:
    """``total`` guard purchases on one topic; the first buy past 60% lacks its effect."""
    rng = random.Random(seed)
    events, buys, culprit = [], set(), -1
    for event_id in range(total):
        ts = start_ms + event_id * 1000 // max(1, events_per_second)
        value = _guard_value(rng, _base(rng, event_id, ts))
        if value["type"] == "buy":
            buys.add(event_id)
            if culprit < 0 and event_id >= total * 3 // 5:
                culprit = event_id
                del value["effect"]
        key = str(value["user_id"]).encode()
        events.append(Event(NIGHT, key, orjson.dumps(value), ts))
    if culprit < 0:
        raise ValueError(f"no guard purchase of type 'buy' in the last 40% of {total} events")
    return Night(events, frozenset(buys), culprit)


def _base(rng: random.Random, event_id: int, ts: int) -> dict[str, Any]:
    user = f"u{int(USERS * rng.random() ** 3)}"  # a few whales send most
    room = int(ROOMS * rng.random() ** 2)
    return {
        "event_id": event_id,
        "user_id": user,
        "room_id": f"r{room}",
        "anchor_id": f"a{room}",
        "ts": ts,
    }


def _gift(rng: random.Random, base: dict[str, Any], plan: Plan) -> bytes:
    gift_id, name, price = rng.choices(GIFTS, GIFT_WEIGHTS)[0]
    value = {
        **base,
        "gift_id": gift_id,
        "gift_name": name,
        "count": rng.choice([1, 1, 1, 1, 5, 10, 66, 99]),
        "price": price,
    }
    if rng.random() < SCHEMA_VIOLATION_RATE:
        plan.schema_violations[GIFT] += 1
        return orjson.dumps(_violate(rng, value))
    return _maybe_broken(rng, value, GIFT, plan)


def _lottery(rng: random.Random, base: dict[str, Any], plan: Plan) -> bytes:
    value = {
        **base,
        "lottery_id": rng.randrange(1, 40),
        "tickets": rng.choice([1, 1, 10, 100]),
        "ticket_price": 20,
    }
    return _maybe_broken(rng, value, LOTTERY, plan)


def _guard_value(rng: random.Random, base: dict[str, Any]) -> dict[str, Any]:
    level = rng.choices([1, 2, 3], [85, 13, 2])[0]
    name, monthly = GUARD_LEVELS[level]
    months = rng.choice([1, 1, 1, 3, 12])
    kind = rng.choices(["buy", "renew", "upgrade"], [55, 40, 5])[0]
    return {
        **base,
        "type": kind,
        "level": level,
        "level_name": name,
        "months": months,
        "price": monthly * months,
        "effect": {"level": level, "badge": f"{name}-badge", "entrance": f"{name}-entrance"},
    }


def _guard(rng: random.Random, base: dict[str, Any], plan: Plan) -> bytes:
    value = _guard_value(rng, base)
    kind = value["type"]
    plan.guard_buys += kind == "buy"
    if rng.random() < NO_EFFECT_RATE:  # the night's message: the nested object is absent
        if rng.random() < 0.5:
            del value["effect"]
        else:
            value["effect"] = None
        plan.no_effect += 1
        plan.no_effect_buys += kind == "buy"
    return orjson.dumps(value)


def _maybe_broken(rng: random.Random, value: dict[str, Any], topic: str, plan: Plan) -> bytes:
    if rng.random() < INVALID_JSON_RATE:
        plan.invalid_json[topic] += 1
        if rng.random() < 0.5:
            data = orjson.dumps(value)
            return data[: len(data) // 2]  # cut off mid-write
        return repr(value).encode()  # a Python dict's repr: single quotes
    if topic in (GIFT, LOTTERY) and rank_store_hiccup(value["event_id"]):
        plan.hiccups += 1
    return orjson.dumps(value)


def _violate(rng: random.Random, value: dict[str, Any]) -> dict[str, Any]:
    flaw = rng.randrange(4)
    if flaw == 0:
        return {**value, "price": -value["price"]}  # a refund sent down the wrong topic
    if flaw == 1:
        return {**value, "count": 0}
    if flaw == 2:
        return {k: v for k, v in value.items() if k != "user_id"}
    return {**value, "gift_id": f"g{value['gift_id']}"}
