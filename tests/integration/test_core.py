"""The core dispatcher against a real broker: per-key order under concurrency, a failing
or hanging subscriber isolated from the others, malformed messages stopped at the border,
and a stop (programmatic or SIGTERM) that leaves exactly what was delivered committed."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

import shunter
from kafkatools import (
    Broker,
    ShunterProcess,
    config,
    end_offsets,
    headers_of,
    pythonpath,
    read_ledger,
    write_ledger_handlers,
)
from shunter.settle import headers as h
from shunter.testing import DispatcherThread

pytestmark = pytest.mark.kafka


def committed(broker: Broker, group: str, topic: str, partitions: int) -> list[int]:
    """Committed offsets, 0 where nothing was committed yet."""
    return [max(o, 0) for o in broker.committed(group, topic, partitions)]


# -- ordering -------------------------------------------------------------------------------

def test_each_key_keeps_its_order_under_concurrency(broker: Broker, unique: str) -> None:
    """Given 24 keys with 40 numbered messages each, interleaved over 4 partitions,
    when two subscribers with concurrency 16 and 3 handle them with random awaits, and a
    third orders by partition,
    then every subscriber sees each key's numbers in order, each exactly once, and the
    partition-ordered one sees each partition's offsets in order."""
    topic = f"orders-{unique}"
    broker.create({topic: 4})
    keys, per_key = 24, 40
    values = [{"key": f"k{i % keys}", "seq": i // keys} for i in range(keys * per_key)]
    app = shunter.Dispatcher(config(broker, f"g-{unique}", topics={topic: {}},
                                    categories={"all": {"topics": [topic]}}, subscribers=[]))
    seen: dict[tuple[str, str], list[int]] = defaultdict(list)
    offsets: dict[int, list[int]] = defaultdict(list)
    partition_of: dict[str, set[int]] = defaultdict(set)
    rng = random.Random(11)

    def recorder(caller: str):  # type: ignore[no-untyped-def]
        async def handler(msg: shunter.Message) -> None:
            await asyncio.sleep(rng.random() * 0.003)
            seen[(caller, msg.value["key"])].append(msg.value["seq"])
            partition_of[msg.value["key"]].add(msg.partition)
        return handler

    async def by_partition(msg: shunter.Message) -> None:
        await asyncio.sleep(rng.random() * 0.001)
        offsets[msg.partition].append(msg.offset)

    app.subscriber("all", caller="wide", concurrency=16)(recorder("wide"))
    app.subscriber("all", caller="narrow", concurrency=3)(recorder("narrow"))
    app.subscriber("all", caller="sequential", ordering="partition")(by_partition)
    broker.produce(topic, values, key=lambda i, v: v["key"])
    total = len(values)

    def done() -> bool:
        return (sum(len(v) for v in seen.values()) >= 2 * total
                and sum(len(v) for v in offsets.values()) >= total)

    with DispatcherThread(app) as running:
        running.wait_for(done, timeout=90)
    assert all(len(ps) == 1 for ps in partition_of.values()), "a key spread over partitions"
    assert len({p for ps in partition_of.values() for p in ps}) > 1, "keys all in one partition"
    for caller in ("wide", "narrow"):
        for k in range(keys):
            assert seen[(caller, f"k{k}")] == list(range(per_key)), (caller, k)
    for partition, got in offsets.items():
        assert got == sorted(got) and len(got) == len(set(got)), partition
    assert sum(len(v) for v in offsets.values()) == total


# -- isolation ------------------------------------------------------------------------------

def test_a_raising_handler_is_isolated_and_its_failures_go_to_the_fast_retry_tier(
    broker: Broker, unique: str
) -> None:
    """Given three subscribers of one category, one of which raises on every 7th message
    (sometimes before its first await, sometimes after) on the first attempt,
    when 300 messages flow,
    then the other two receive every message exactly once, the failing caller's failed
    deliveries land in `<group>.retry.fast` with its caller name, the next attempt number,
    the error and a traceback naming the failing line, those retries reach only it and
    succeed there, and the source offsets are committed to the end."""
    topic, group = f"gifts-{unique}", f"g-{unique}"
    broker.create({topic: 3})
    app = shunter.Dispatcher(config(broker, group, topics={topic: {}},
                                    categories={"revenue": {"topics": [topic]}},
                                    subscribers=[]))
    got: Counter[tuple[str, int, int]] = Counter()  # (caller, n, attempt)
    lock = threading.Lock()

    def recorder(caller: str):  # type: ignore[no-untyped-def]
        async def handler(msg: shunter.Message) -> None:
            await asyncio.sleep(0.0005)
            with lock:
                got[(caller, msg.value["n"], msg.attempt)] += 1
        return handler

    async def medal(msg: shunter.Message) -> None:
        n = msg.value["n"]
        if n % 7 == 0 and msg.attempt == 1:
            if n % 2:
                raise KeyError("anchor_level")  # before the first await
            await asyncio.sleep(0.0005)
            raise ValueError(f"gift {n} has no price")
        with lock:
            got[("medal", n, msg.attempt)] += 1

    app.subscriber("revenue", caller="rank")(recorder("rank"))
    app.subscriber("revenue", caller="task")(recorder("task"))
    app.subscriber("revenue", caller="medal")(medal)
    n_messages = 300
    failing = {n for n in range(n_messages) if n % 7 == 0}
    broker.produce(topic, [{"n": n} for n in range(n_messages)], key=lambda i, v: f"u{i % 13}")

    def caller_done(caller: str) -> int:
        return len({n for (c, n, _) in got if c == caller})

    with DispatcherThread(app) as running:
        running.wait_for(lambda: all(caller_done(c) == n_messages
                                     for c in ("rank", "task", "medal")), timeout=90)
        ends = end_offsets(broker, topic, 3)
        running.wait_for(lambda: committed(broker, group, topic, 3) == ends, timeout=30)
    for caller in ("rank", "task"):
        assert {(n, a) for (c, n, a), k in got.items() if c == caller and k == 1} == \
            {(n, 1) for n in range(n_messages)}, f"{caller} did not get every message exactly once"
    assert {n for (c, n, a) in got if c == "medal" and a == 1} == set(range(n_messages)) - failing
    assert {n for (c, n, a) in got if c == "medal" and a == 2} == failing

    retries = broker.read_all(f"{group}.retry.fast")
    assert len(retries) == len(failing)
    by_n = {orjson.loads(r.value())["n"]: headers_of(r) for r in retries}
    assert set(by_n) == failing
    sources = {orjson.loads(m.value())["n"]: m for m in broker.read_all(topic, expect=n_messages)}
    for n, head in by_n.items():
        assert head[h.CALLER] == "medal" and head[h.CATEGORY] == "revenue"
        assert head[h.ATTEMPT] == "2" and head[h.STAGE] == "deliver" and head[h.TIER] == "fast"
        assert head[h.ORIGIN_TOPIC] == topic
        assert (int(head[h.ORIGIN_PARTITION]), int(head[h.ORIGIN_OFFSET])) == \
            (sources[n].partition(), sources[n].offset())
        if n % 2:
            assert head[h.ERROR_TYPE] == "KeyError" and "anchor_level" in head[h.ERROR]
            assert 'raise KeyError("anchor_level")' in head[h.TRACEBACK]
        else:
            assert head[h.ERROR_TYPE] == "ValueError" and head[h.ERROR] == f"gift {n} has no price"
            assert "raise ValueError" in head[h.TRACEBACK]
        assert int(head[h.NOT_BEFORE]) >= int(head[h.FIRST_FAILURE]) > 0


def test_a_timed_out_async_handler_is_cancelled_and_the_stream_continues(
    broker: Broker, unique: str
) -> None:
    """Given a subscriber with a 2 s timeout whose handler hangs on one message's first
    attempt,
    when 120 messages flow, then every other message reaches it while the hanging one
    is still running, the hanging handler observes its cancellation at the timeout, the
    delivery goes to the fast retry tier as a DeliveryTimeout, the retry succeeds, and a
    second subscriber is untouched."""
    topic, group = f"slow-{unique}", f"g-{unique}"
    broker.create({topic: 2})
    app = shunter.Dispatcher(config(broker, group, topics={topic: {}},
                                    categories={"revenue": {"topics": [topic]}},
                                    subscribers=[]))
    hang_on, n_messages = 17, 120
    delivered: Counter[tuple[str, int, int]] = Counter()
    cancelled: list[int] = []  # others delivered when the hanging handler was cancelled

    async def lottery(msg: shunter.Message) -> None:
        n = msg.value["n"]
        if n == hang_on and msg.attempt == 1:
            try:
                await asyncio.sleep(120)
            except asyncio.CancelledError:
                cancelled.append(len({m for (c, m, _) in delivered if c == "lottery"}))
                raise
        await asyncio.sleep(0.0005)
        delivered[("lottery", n, msg.attempt)] += 1

    async def steady(msg: shunter.Message) -> None:
        delivered[("steady", msg.value["n"], msg.attempt)] += 1

    app.subscriber("revenue", caller="lottery", timeout="2s", concurrency=8)(lottery)
    app.subscriber("revenue", caller="steady")(steady)
    broker.produce(topic, [{"n": n} for n in range(n_messages)], key=lambda i, v: f"u{i}")
    with DispatcherThread(app) as running:
        running.wait_for(lambda: ("lottery", hang_on, 2) in delivered, timeout=60)
        running.wait_for(lambda: sum(delivered.values()) >= 2 * n_messages, timeout=30)
    assert cancelled == [n_messages - 1], "the stream waited for the hanging handler"
    assert {n for (c, n, a) in delivered if c == "lottery"} == set(range(n_messages))
    assert {(n, a) for (c, n, a) in delivered if c == "steady"} == \
        {(n, 1) for n in range(n_messages)}
    assert all(k == 1 for k in delivered.values())
    retries = broker.read_all(f"{group}.retry.fast")
    assert len(retries) == 1
    head = headers_of(retries[0])
    assert orjson.loads(retries[0].value())["n"] == hang_on
    assert head[h.CALLER] == "lottery"
    assert head[h.ERROR_TYPE] == "shunter.errors.DeliveryTimeout"
    assert "2s" in head[h.ERROR]


# -- the border: decode and validate --------------------------------------------------------

MODEL = '''
from pydantic import BaseModel, Field


class Guard(BaseModel):
    n: int
    level: int = Field(ge=1, le=3)
'''

SCHEMA = {
    "type": "object",
    "required": ["n", "price"],
    "properties": {"n": {"type": "integer"}, "price": {"type": "number", "minimum": 0}},
}


def test_invalid_messages_never_reach_handlers_and_are_dead_lettered_with_their_stage(
    broker: Broker, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given a plain JSON topic, a topic checked by a JSON Schema file and one checked by
    a pydantic model, each carrying valid messages and malformed ones (not JSON, a
    tombstone, schema violations, model violations),
    when shunter runs, then handlers receive exactly the valid messages, each malformed one
    is in `<group>.dlq` once with its bytes unchanged, stage decode or validate, a reason
    and its origin coordinates, and every source offset is committed."""
    plain, checked, modelled = f"plain-{unique}", f"checked-{unique}", f"modelled-{unique}"
    group = f"g-{unique}"
    broker.create({plain: 2, checked: 2, modelled: 1})
    (tmp_path / "gift.schema.json").write_text(json.dumps(SCHEMA))
    module = f"guards_{unique}"
    (tmp_path / f"{module}.py").write_text(MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    app = shunter.Dispatcher(config(
        broker, group,
        topics={plain: {}, checked: {"schema": str(tmp_path / "gift.schema.json")},
                modelled: {"model": f"{module}:Guard"}},
        categories={"everything": {"topics": [plain, checked, modelled]}},
        subscribers=[],
    ))
    received: list[tuple[str, int]] = []
    values: list[Any] = []

    async def handler(msg: shunter.Message) -> None:
        values.append(msg.value)
        n = msg.value.n if msg.topic == modelled else msg.value["n"]
        received.append((msg.topic, n))

    app.subscriber("everything", caller="audit")(handler)
    app.subscriber("everything", caller="sync-audit")(lambda msg: None)
    bad: dict[bytes | None, tuple[str, str, str]] = {  # payload -> (topic, stage, reason)
        b'{"n": 1, "price": ': (plain, "decode", "invalid JSON"),
        b"\xff\xfe not text": (plain, "decode", "invalid JSON"),
        None: (plain, "decode", "tombstone"),
        b'{"n": "two", "price": 3}': (checked, "validate", "schema"),
        b'{"n": 3, "price": -1}': (checked, "validate", "schema"),
        b'{"n": 4}': (checked, "validate", "schema"),
        b'{"n": 5, "level": 9}': (modelled, "validate", "ValidationError"),
        b'{"level": 2}': (modelled, "validate", "ValidationError"),
        b"[1, 2, 3]": (modelled, "validate", "ValidationError"),
    }
    good = {plain: [{"n": n} for n in range(10, 30)],
            checked: [{"n": n, "price": n * 1.5} for n in range(30, 50)],
            modelled: [{"n": n, "level": 1 + n % 3} for n in range(50, 70)]}
    for topic in (plain, checked, modelled):  # valid and malformed interleaved
        payloads = [orjson.dumps(v) for v in good[topic]]
        for raw, (where, _, _) in bad.items():
            if where == topic:
                payloads.insert(len(payloads) // 2, raw)  # type: ignore[arg-type]
        broker.produce(topic, payloads, raw=True)
    expected = {(t, v["n"]) for t, vs in good.items() for v in vs}
    partitions = {plain: 2, checked: 2, modelled: 1}

    def all_committed() -> bool:
        return all(committed(broker, group, t, p) == end_offsets(broker, t, p)
                   for t, p in partitions.items())

    with DispatcherThread(app) as running:
        running.wait_for(lambda: len(received) >= len(expected), timeout=60)
        running.wait_for(all_committed, timeout=30)
    assert sorted(received) == sorted(expected)
    dead = broker.read_all(f"{group}.dlq")
    assert len(dead) == len(bad)
    by_payload = {d.value(): d for d in dead}
    assert set(by_payload) == set(bad)
    for raw, (topic, stage, reason) in bad.items():
        head = headers_of(by_payload[raw])
        assert head[h.STAGE] == stage, raw
        assert head[h.ORIGIN_TOPIC] == topic, raw
        assert reason in head[h.ERROR], (raw, head[h.ERROR])
        assert head[h.ERROR_TYPE] == "RejectedMessage"
        assert head[h.TIER] == "dlq"
        source = [m for m in broker.read_all(topic) if m.value() == raw]
        assert [(m.partition(), m.offset()) for m in source] == \
            [(int(head[h.ORIGIN_PARTITION]), int(head[h.ORIGIN_OFFSET]))]


# -- stopping -------------------------------------------------------------------------------

def test_a_graceful_stop_mid_stream_commits_exactly_what_was_delivered(
    broker: Broker, unique: str
) -> None:
    """Given 1,500 messages on 3 partitions, periodic commits switched off (1 h), at most
    100 messages in flight, and handlers that take a few milliseconds,
    when the dispatcher is stopped while the stream is half done,
    then every delivery that started has finished, and each partition's committed offset
    is exactly one past what was delivered: the delivered offsets are 0..committed-1;
    and when a new instance of the group starts, it delivers exactly the rest, so every
    message is delivered once and the offsets end at the end of each partition."""
    topic, group = f"stop-{unique}", f"g-{unique}"
    broker.create({topic: 3})
    settings = config(broker, group, topics={topic: {}}, categories={"all": {"topics": [topic]}},
                      subscribers=[], kafka={"commit_interval": "1h", "batch_size": 50,
                                             "max_in_flight": 100})
    started: Counter[tuple[str, int, int]] = Counter()
    finished: Counter[tuple[str, int, int]] = Counter()

    def recorder(caller: str):  # type: ignore[no-untyped-def]
        async def handler(msg: shunter.Message) -> None:
            started[(caller, msg.partition, msg.offset)] += 1
            await asyncio.sleep(0.004)
            finished[(caller, msg.partition, msg.offset)] += 1
        return handler

    def dispatcher() -> shunter.Dispatcher:
        app = shunter.Dispatcher(settings)
        app.subscriber("all", caller="ledger", concurrency=4)(recorder("ledger"))
        app.subscriber("all", caller="mirror", concurrency=2)(recorder("mirror"))
        return app

    total = 1500
    broker.produce(topic, [{"n": n} for n in range(total)], key=lambda i, v: f"u{i % 40}")
    with DispatcherThread(dispatcher()) as running:
        running.wait_for(lambda: len(finished) >= total // 2, timeout=60)
    first = committed(broker, group, topic, 3)
    assert started == finished, "a delivery was left unfinished by the stop"
    assert sum(first) < total, "the stream was not stopped mid-way"
    for caller in ("ledger", "mirror"):
        for p in range(3):
            got = {o for (c, part, o) in finished if c == caller and part == p}
            assert got == set(range(first[p])), f"{caller} p{p}: delivered != committed"

    with DispatcherThread(dispatcher()) as running:
        running.wait_for(lambda: len(finished) >= 2 * total, timeout=60)
    assert committed(broker, group, topic, 3) == end_offsets(broker, topic, 3)
    assert sum(end_offsets(broker, topic, 3)) == total
    assert len(finished) == 2 * total and set(finished.values()) == {1}, "a message delivered twice"


def test_sigterm_drains_commits_what_was_delivered_and_exits_0(
    broker: Broker, unique: str, tmp_path: Path
) -> None:
    """Given `shunter run -c FILE` in a subprocess with two subscribers appending receipts
    to a ledger, at most 100 messages in flight, and 2,000 messages on 3 partitions,
    when it receives SIGTERM mid-stream, then it exits with status 0, and for each
    subscriber and partition the receipts are exactly the offsets below the committed one:
    nothing delivered is left uncommitted, nothing committed was skipped, nothing twice."""
    topic, group = f"term-{unique}", f"g-{unique}"
    broker.create({topic: 3})
    module = f"ledger_{unique}"
    write_ledger_handlers(tmp_path, module)
    data = config(broker, group, topics={topic: {}}, categories={"all": {"topics": [topic]}},
                  subscribers=[
                      {"caller": "books", "category": "all", "handler": f"{module}:books",
                       "concurrency": 2},
                      {"caller": "stats", "category": "all", "handler": f"{module}:stats",
                       "concurrency": 2},
                  ])
    data["kafka"].update(commit_interval="200ms", batch_size=50, max_in_flight=100)
    (tmp_path / "shunter.yaml").write_text(yaml.safe_dump(data))
    ledger = tmp_path / "ledger.txt"
    total = 2000
    broker.produce(topic, [{"n": n} for n in range(total)], key=lambda i, v: f"u{i % 50}")
    env = {"PYTHONPATH": pythonpath(tmp_path), "SHUNTER_TEST_LEDGER": str(ledger),
           "SHUNTER_TEST_PAUSE": "0.004"}
    with ShunterProcess(tmp_path / "shunter.yaml", tmp_path / "service.log", env) as service:
        deadline = time.monotonic() + 60
        while sum(read_ledger(ledger).values()) < 300:
            assert service.alive(), service.log_tail()
            assert time.monotonic() < deadline, service.log_tail()
            time.sleep(0.05)
        service.terminate()
        assert service.wait(60) == 0, service.log_tail()
    receipts = read_ledger(ledger)
    marks = committed(broker, group, topic, 3)
    assert sum(marks) < total, "SIGTERM did not land mid-stream"
    assert set(receipts.values()) == {1}, "a message was delivered twice"
    for caller in ("books", "stats"):
        for p in range(3):
            got = {o for (c, t, part, o) in receipts if c == caller and part == p}
            assert got == set(range(marks[p])), f"{caller} p{p}: delivered != committed"
