"""Produce a small live-revenue stream to the example's topics.

    python produce.py [BOOTSTRAP] [N]     # default 127.0.0.1:9092, 100 events per topic

Among the guard purchases a few carry no effect object (dead letters with a reason), and
one gift breaks the gift schema (rejected at validate): `shunter dlq list` shows them.
"""

from __future__ import annotations

import json
import sys
import time

from confluent_kafka import Producer


def events(n: int) -> list[tuple[str, str, dict[str, object]]]:
    now = int(time.time() * 1000)
    out: list[tuple[str, str, dict[str, object]]] = []
    for i in range(n):
        user, room, anchor = f"u{i % 37}", f"r{i % 11}", f"a{i % 5}"
        common = {"event_id": i, "user_id": user, "room_id": room, "anchor_id": anchor, "ts": now}
        out.append(("gift", user, {**common, "gift_id": 1 + i % 7, "count": 1, "price": 10}))
        out.append(("lottery", user, {**common, "tickets": 2, "ticket_price": 5}))
        guard = {**common, "type": "buy" if i % 4 else "renew", "level": 1, "price": 198}
        if i % 25 != 3:
            guard["effect"] = {"entrance": "dragon", "level": 1}
        out.append(("guard_purchase", anchor, guard))
    out.append(("gift", "u0", {"event_id": n, "user_id": "nobody", "count": 0}))  # invalid
    return out


def main() -> None:
    bootstrap = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9092"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for topic, key, value in events(n):
        producer.produce(topic, json.dumps(value).encode(), key.encode())
        producer.poll(0)
    left = producer.flush(30)
    print(f"produced {len(events(n)) - left} events to {bootstrap}")


if __name__ == "__main__":
    main()
