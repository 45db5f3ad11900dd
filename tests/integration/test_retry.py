"""Tiered retries, per caller: given a caller that fails, when shunter runs, then only
that caller runs again, through the fast tier, the slow tier and into the dead-letter
topic with complete headers; source topics keep flowing while retries wait; and a
caller that dead-letters everything is paused, durably."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest

import shunter
from kafkatools import Broker, config
from shunter.settle import headers as h
from shunter.testing import DispatcherThread

pytestmark = pytest.mark.kafka


def test_only_the_failing_caller_retries_fast_then_slow_then_dead_letter(
    broker: Broker, unique: str
) -> None:
    topic, group = f"gift-{unique}", f"g-{unique}"
    broker.create({topic: 2})
    app = shunter.Dispatcher(
        config(
            broker,
            group,
            topics={topic: {}},
            categories={"revenue": {"topics": [topic]}},
            subscribers=[],
        )
    )  # fast 2 x 200ms, slow 1 x 500ms
    attempts: dict[int, list[int]] = defaultdict(list)
    steady: list[int] = []
    lock = threading.Lock()

    @app.subscriber("revenue", caller="medal")
    def medal(msg: shunter.Message) -> None:
        with lock:
            attempts[msg.value["n"]].append(msg.attempt)
        if msg.value["n"] % 10 == 0:
            raise KeyError("effect")

    @app.subscriber("revenue", caller="rank")
    async def rank(msg: shunter.Message) -> None:
        with lock:
            steady.append(msg.value["n"])

    broker.produce(topic, [{"n": i} for i in range(50)], key=lambda i, v: f"u{i}")
    with DispatcherThread(app) as running:
        running.wait_for(lambda: len(broker.read_all(f"{group}.dlq")) >= 5, timeout=60)
        time.sleep(1.0)  # nothing more may arrive
    assert sorted(steady) == list(range(50)), "the healthy caller ran each message once"
    for n, seen in attempts.items():
        assert seen == ([1, 2, 3, 4] if n % 10 == 0 else [1]), (n, seen)
    dead = [h.decode(m.headers()) for m in broker.read_all(f"{group}.dlq")]
    assert sorted(i.origin_offset for i in dead) == sorted(
        m.offset() for m in broker.read_all(topic) if int(m.value().split(b":")[1][:-1]) % 10 == 0
    )
    info = dead[0]
    assert (info.caller, info.category, info.stage, info.tier) == (
        "medal",
        "revenue",
        "deliver",
        "dlq",
    )
    assert info.attempt == 4 and info.error_type == "KeyError" and "'effect'" in info.error
    assert 'raise KeyError("effect")' in info.traceback
    assert info.origin_topic == topic and info.origin_timestamp_ms > 0
    assert info.origin_key is not None and info.origin_key.startswith(b"u")
    assert 0 < info.first_failure_ms <= info.not_before_ms
    committed = broker.committed(group, topic, 2)
    ends = [sum(1 for m in broker.read_all(topic) if m.partition() == p) for p in range(2)]
    assert committed == ends


def test_a_retry_not_yet_due_does_not_hold_back_source_messages(
    broker: Broker, unique: str
) -> None:
    topic, group = f"gift-{unique}", f"g-{unique}"
    broker.create({topic: 2})
    app = shunter.Dispatcher(
        config(
            broker,
            group,
            topics={topic: {}},
            categories={"revenue": {"topics": [topic]}},
            subscribers=[],
            retry={"fast": {"attempts": 1, "delay": "60s"}},
        )
    )
    arrived: dict[str, list[float]] = defaultdict(list)
    lock = threading.Lock()

    @app.subscriber("revenue", caller="medal")
    def medal(msg: shunter.Message) -> None:
        with lock:
            arrived["attempt2" if msg.attempt > 1 else msg.value["batch"]].append(time.monotonic())
        if msg.value["batch"] == "first" and msg.attempt == 1:
            raise shunter.RetryLater(reason="not yet")

    broker.produce(topic, [{"batch": "first", "n": i} for i in range(20)])
    with DispatcherThread(app) as running:
        running.wait_for(lambda: len(broker.read_all(f"{group}.retry.fast")) >= 20)
        produced = time.monotonic()
        broker.produce(topic, [{"batch": "second", "n": i} for i in range(200)])
        running.wait_for(lambda: len(arrived["second"]) == 200, timeout=30)
        flowing = max(arrived["second"]) - produced
    print(f"source messages delivered {flowing:.2f}s after produce while 20 retries wait 60s")
    assert not arrived["attempt2"], "the retries are not due yet"
    assert flowing < 30


def test_flood_guard_pauses_a_caller_durably(broker: Broker, unique: str) -> None:
    topic, group = f"gift-{unique}", f"g-{unique}"
    broker.create({topic: 1})
    settings = config(
        broker,
        group,
        topics={topic: {}},
        categories={"revenue": {"topics": [topic]}},
        subscribers=[],
        retry={"flood_guard": {"window": 10, "max_share": 0.5}},
    )

    def build() -> tuple[shunter.Dispatcher, list[int]]:
        app = shunter.Dispatcher(settings)
        healthy: list[int] = []

        @app.subscriber("revenue", caller="deploy")
        def broken(msg: shunter.Message) -> None:
            raise shunter.DeadLetter("bad deploy")

        @app.subscriber("revenue", caller="audit")
        def audit(msg: shunter.Message) -> None:
            healthy.append(msg.value["n"])

        return app, healthy

    broker.produce(topic, [{"n": i} for i in range(300)])
    app, healthy = build()
    with DispatcherThread(app) as running:
        running.wait_for(lambda: len(healthy) == 300)
        runtime = app.service.pipeline.runtimes["deploy"]
        running.wait_for(lambda: runtime.paused)
        running.wait_for(lambda: app.service.stats.by_caller()["deploy"].get("parked", 0) > 0)
    dead = len(broker.read_all(f"{group}.dlq"))
    assert 5 < dead < 300, f"the guard stopped the flood ({dead} dead-lettered of 300)"
    app, healthy = build()
    with DispatcherThread(app):
        assert app.service.pipeline.runtimes["deploy"].paused, "the pause survives a restart"
