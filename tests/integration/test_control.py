"""Group-wide control on a real broker: a pause through one instance's admin API stops the
caller on every instance within 2 s and survives restarts; a paused caller's backlog is
written once to the parked topic, never rewritten, and re-driven on resume; a source topic
created after start is delivered within 10 s; readiness needs a source partition."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import urllib.request
from collections import Counter
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

import shunter
from kafkatools import Broker, config
from shunter.broker.admin import ensure_topics
from shunter.broker.embedded import free_port
from shunter.observe.control import ControlTopic
from shunter.settle.producer import ReliableProducer
from shunter.testing import DispatcherThread

pytestmark = pytest.mark.kafka

TOKEN = "control-test-token"


def post(port: int, caller: str, action: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/callers/{caller}/{action}",
        data=b"",
        method="POST",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())  # type: ignore[no-any-return]


class Receipts:
    """What each caller received on one instance: (n, attempt, monotonic time)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_caller: dict[str, list[tuple[int, int, float]]] = {"medal": [], "audit": []}

    def add(self, caller: str, msg: shunter.Message) -> None:
        with self.lock:
            self.by_caller[caller].append((msg.value["n"], msg.attempt, time.monotonic()))

    def numbers(self, caller: str) -> list[int]:
        with self.lock:
            return [n for n, _, _ in self.by_caller[caller]]

    def times(self, caller: str) -> list[float]:
        with self.lock:
            return [t for _, _, t in self.by_caller[caller]]


def build(
    settings: dict[str, Any], port: int, receipts: Receipts, fail_first: int = -1
) -> shunter.Dispatcher:
    """medal and audit on category ``all``; medal defers attempt 1 of n < fail_first."""
    app = shunter.Dispatcher(
        {**settings, "admin": {"listen": f"127.0.0.1:{port}", "token_env": "SHUNTER_TEST_TOKEN"}}
    )

    @app.subscriber("all", caller="medal")
    def medal(msg: shunter.Message) -> None:
        if msg.value["n"] < fail_first and msg.attempt == 1:
            raise shunter.RetryLater(delay=1.5, reason="not yet")
        receipts.add("medal", msg)

    @app.subscriber("all", caller="audit")
    def audit(msg: shunter.Message) -> None:
        receipts.add("audit", msg)

    return app


class Trickle:
    """Produce {"n": i} every ``interval`` seconds on a thread until stopped."""

    def __init__(self, broker: Broker, topic: str, start: int, interval: float = 0.02) -> None:
        self.sent = start
        self._first = start
        self._producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0})
        self._topic = topic
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._producer.produce(self._topic, orjson.dumps({"n": self.sent}), key=b"k")
            self._producer.poll(0)
            self.sent += 1
            time.sleep(self._interval)

    def __enter__(self) -> Trickle:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        assert self._producer.flush(30) == 0

    @property
    def numbers(self) -> set[int]:
        return set(range(self._first, self.sent))


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SHUNTER_TEST_TOKEN", TOKEN)
    return TOKEN


def test_a_pause_through_one_instance_stops_the_caller_on_the_other_within_2s(
    broker: Broker, unique: str, token: str
) -> None:
    """Given two instances of one group and a one-partition source topic (so one instance
    owns it and the other is a spare), when the caller is paused through the spare's
    admin API while messages flow, then the owner stops delivering to it within 2 s while
    the other caller goes on; when it is resumed through the owner's API, every message
    produced meanwhile reaches it (its parked backlog is re-driven)."""
    topic, group = f"gift-{unique}", f"g-{unique}"
    broker.create({topic: 1})
    settings = config(
        broker, group, topics={topic: {}}, categories={"all": {"topics": [topic]}}, subscribers=[]
    )
    ports = {"A": free_port(), "B": free_port()}
    receipts = {"A": Receipts(), "B": Receipts()}
    apps = {name: build(settings, ports[name], receipts[name]) for name in ports}
    with DispatcherThread(apps["A"]) as a, DispatcherThread(apps["B"]) as b:
        running = {"A": a, "B": b}

        def owner() -> str | None:
            owners = [
                n for n, app in apps.items() if app.service.source.membership().source_partitions
            ]
            members = [n for n, app in apps.items() if app.service.source.membership().member]
            return owners[0] if len(owners) == 1 and len(members) == 2 else None

        a.wait_for(lambda: owner() is not None, timeout=60)
        own = owner()
        assert own is not None
        spare = "B" if own == "A" else "A"
        ready, reasons = apps[spare].service.readiness()
        assert not ready and "no source partition assigned" in reasons[0], reasons
        assert apps[own].service.readiness() == (True, [])

        with Trickle(broker, topic, 0) as trickle:
            running[own].wait_for(lambda: len(receipts[own].numbers("medal")) >= 20)
            called = time.monotonic()
            answer = post(ports[spare], "medal", "pause")
            answered = time.monotonic() - called
            assert answer == {"caller": "medal", "paused": True}
            owner_pauses = apps[own].service.pauses
            running[own].wait_for(
                lambda: owner_pauses.is_paused("medal"), timeout=5, interval=0.005
            )
            stopped = time.monotonic() - called
            audit_before = len(receipts[own].numbers("audit"))
            time.sleep(3.0)
            late = [t - called for t in receipts[own].times("medal") if t > called + 2.0]
            assert not late, f"medal still delivered {late} s after the pause call"
            assert len(receipts[own].numbers("audit")) > audit_before + 50, "audit flows on"
            parked = owner_pauses.backlog()["medal"]
            assert parked > 50, parked
            print(
                f"pause call answered in {answered * 1000:.0f} ms; the other instance "
                f"paused {stopped * 1000:.0f} ms after the call; last delivery there "
                f"{(max(receipts[own].times('medal')) - called) * 1000:.0f} ms after it; "
                f"{parked} deliveries parked in 3 s"
            )
            assert post(ports[own], "medal", "resume") == {"caller": "medal", "paused": False}
        produced = trickle.numbers

        def medal_seen() -> set[int]:
            return set(receipts["A"].numbers("medal")) | set(receipts["B"].numbers("medal"))

        a.wait_for(lambda: medal_seen() >= produced, timeout=60)
        assert not apps[spare].service.pauses.is_paused("medal")
        assert owner_pauses.backlog()["medal"] == 0
    counts = Counter(receipts["A"].numbers("medal") + receipts["B"].numbers("medal"))
    dups = sum(c - 1 for c in counts.values())
    print(f"{len(produced)} produced; medal got each, {dups} twice or more")
    assert dups == 0, "a quiet pause and resume delivers each message once"


def test_a_paused_backlog_is_written_once_survives_a_restart_and_comes_back_on_resume(
    broker: Broker, unique: str, token: str
) -> None:
    """Given 10 deliveries waiting in the fast tier (due in 1.5 s) and a caller paused
    through the admin API, when 40 more messages arrive, then its 50 deliveries are
    written to the parked topic once each and stay there (no write to any tier for 3 s,
    six times the slow tier's delay); the pause survives a restart; resumed, the caller
    receives all 50."""
    topic, group = f"gift-{unique}", f"g-{unique}"
    broker.create({topic: 2})
    settings = config(
        broker, group, topics={topic: {}}, categories={"all": {"topics": [topic]}}, subscribers=[]
    )  # fast 2 x 200 ms, slow 1 x 500 ms
    port = free_port()
    receipts = Receipts()
    early = [{"n": i} for i in range(10)]
    late = [{"n": i} for i in range(10, 50)]
    app = build(settings, port, receipts, fail_first=10)
    with DispatcherThread(app) as running:
        broker.produce(topic, early)
        running.wait_for(lambda: len(broker.read_all(f"{group}.retry.fast")) >= 10)
        assert post(port, "medal", "pause")["paused"] is True
        broker.produce(topic, late)
        running.wait_for(lambda: len(receipts.numbers("audit")) == 50)
        running.wait_for(lambda: len(broker.read_all(f"{group}.parked")) >= 50, timeout=30)
        stats = app.service.stats
        writes = dict(stats.writes)
        time.sleep(3.0)
        assert dict(stats.writes) == writes, "nothing was written again while paused"
        assert writes == {"fast": 10, "parked": 50}, writes
        assert len(broker.read_all(f"{group}.parked")) == 50
        assert len(broker.read_all(f"{group}.retry.fast")) == 10
        assert not broker.read_all(f"{group}.retry.slow")
        assert app.service.pauses.backlog()["medal"] == 50
        assert receipts.numbers("medal") == []
    restarted = Receipts()
    app = build(settings, port, restarted, fail_first=10)
    with DispatcherThread(app) as running:
        assert app.service.pauses.is_paused("medal"), "paused before anything is consumed"
        running.wait_for(lambda: app.service.readiness()[0])
        time.sleep(1.0)
        assert restarted.numbers("medal") == []
        post(port, "medal", "resume")
        running.wait_for(lambda: sorted(restarted.numbers("medal")) == list(range(50)))
        attempts = {n: a for n, a, _ in restarted.by_caller["medal"]}
        assert all(attempts[n] == 2 for n in range(10)), "a retry keeps its attempt"
        assert all(attempts[n] == 1 for n in range(10, 50))
        control = app.service.control
        running.wait_for(lambda: "parked/medal" in control.table)
        cursor = orjson.loads(control.table["parked/medal"])["cursor"]
        assert sum(cursor.values()) == 50, cursor
        assert app.service.pauses.backlog()["medal"] == 0


def test_a_source_topic_created_after_start_is_delivered_within_10s(
    broker: Broker, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Given a dispatcher started before its source topic exists, it is not ready (a
    member with only retry-tier partitions); when the topic is created and a message
    produced, the message is delivered within 10 s, the new topic is logged and the
    instance becomes ready."""
    topic, group = f"late-{unique}", f"g-{unique}"
    settings = config(
        broker, group, topics={topic: {}}, categories={"all": {"topics": [topic]}}, subscribers=[]
    )
    receipts = Receipts()
    app = build(settings, free_port(), receipts)
    caplog.set_level(logging.INFO, logger="shunter.consume")
    with DispatcherThread(app) as running:
        service = app.service
        ready, reasons = service.readiness()
        # Whichever step of joining it is at (Apache Kafka may have assigned the retry
        # tiers already), it says why it is not ready.
        assert not ready and reasons, "not ready before its source topic exists"
        assert reasons[0] in ("starting", "not a member of the group (yet)") or (
            reasons[0].startswith("no source partition assigned") and topic in reasons[0]
        ), reasons
        running.wait_for(lambda: service.source.membership().retry_partitions)
        ready, reasons = service.readiness()
        assert not ready
        assert "only" in reasons[0] and "retry-tier partitions" in reasons[0], reasons
        assert topic in reasons[0], reasons
        created = time.monotonic()
        broker.create({topic: 2})
        broker.produce(topic, [{"n": 1}])
        running.wait_for(lambda: receipts.numbers("medal") == [1], timeout=30)
        first = receipts.times("medal")[0] - created
        print(f"topic created -> first delivery: {first:.2f} s")
        assert first < 10.0
        running.wait_for(lambda: service.readiness()[0], timeout=10)
    assert any(f"source topic {topic} appeared" in r.getMessage() for r in caplog.records), (
        "the new topic is logged"
    )


def test_the_flood_guard_pauses_the_caller_on_every_instance(
    broker: Broker, unique: str, token: str
) -> None:
    """Given two instances of one group and a caller that dead-letters everything, when
    the flood guard of the instance that owns the source partition trips, then the caller
    is paused on the other instance too, within 2 s of the trip."""
    topic, group = f"gift-{unique}", f"g-{unique}"
    broker.create({topic: 1})
    settings = config(
        broker,
        group,
        topics={topic: {}},
        categories={"all": {"topics": [topic]}},
        subscribers=[],
        retry={"flood_guard": {"window": 10, "max_share": 0.5}},
    )
    apps = []
    for _ in range(2):
        app = shunter.Dispatcher({**settings, "admin": {"listen": None}})

        @app.subscriber("all", caller="deploy")
        def broken(msg: shunter.Message) -> None:
            raise shunter.DeadLetter("bad deploy")

        apps.append(app)
    with DispatcherThread(apps[0]) as first, DispatcherThread(apps[1]):
        first.wait_for(
            lambda: (
                sum(bool(a.service.source.membership().source_partitions) for a in apps) == 1
                and all(a.service.source.membership().member for a in apps)
            )
        )
        broker.produce(topic, [{"n": i} for i in range(100)])
        paused_at: dict[int, float] = {}

        def both_paused() -> bool:
            for i, a in enumerate(apps):
                if a.service.pauses.is_paused("deploy"):
                    paused_at.setdefault(i, time.monotonic())
            return len(paused_at) == 2

        first.wait_for(both_paused, timeout=60, interval=0.005)
        spread = max(paused_at.values()) - min(paused_at.values())
        print(f"flood guard pause reached the other instance {spread * 1000:.0f} ms later")
        assert spread < 2.0


def test_the_control_topic_hands_each_namespace_its_records_live(
    broker: Broker, unique: str
) -> None:
    """Given two followers of one control topic, one with a ``skip/`` subscriber, when the
    other writes a skip record, a caller record and then a tombstone, then the subscriber
    gets the skip record and the tombstone (not the caller's), the table read at start
    included, each within 2 s of the write."""
    topic = f"g-{unique}.control"
    settings = {"bootstrap.servers": broker.bootstrap}
    ensure_topics(settings, {topic: 1}, configs={topic: {"cleanup.policy": "compact"}})

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        producer = ReliableProducer(settings, loop)
        writer = ControlTopic(settings, topic, producer, loop)
        await writer.start()
        await writer.put("skip/gift/0/1", b'{"n": 1}', seen=True)  # before the reader starts
        reader = ControlTopic(settings, topic, producer, loop)
        got: list[tuple[str, bytes | None, float]] = []
        reader.subscribe("skip/", lambda k, v: got.append((k, v, time.monotonic())))
        await reader.start()
        assert [(k, v) for k, v, _ in got] == [("skip/gift/0/1", b'{"n": 1}')]
        for key, value in [("medal", b"{}"), ("skip/gift/0/2", b"{}"), ("skip/gift/0/1", None)]:
            written = time.monotonic()
            await writer.put(key, value)
            if key.startswith("skip/"):
                while not got or got[-1][:2] != (key, value):
                    assert time.monotonic() - written < 2.0, f"{key} not read within 2 s"
                    await asyncio.sleep(0.01)
        assert [k for k, _, _ in got] == ["skip/gift/0/1", "skip/gift/0/2", "skip/gift/0/1"]
        assert "skip/gift/0/1" not in reader.table and reader.table["medal"] == b"{}"
        await reader.stop()
        await writer.stop()
        await asyncio.to_thread(producer.close)

    asyncio.run(scenario())
