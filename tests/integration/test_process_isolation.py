"""Crash guard, against a real broker: a process-isolated handler that segfaults, exits or
runs out of memory on one message fails only that delivery — which goes through the retry
tiers to the dead-letter topic with the cause in its headers — while the dispatcher runs
on and every other delivery arrives; hung handlers time out without stopping the stream.

The process-isolated handlers are module-level: worker processes import them from here.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import threading
from collections import Counter
from pathlib import Path

import orjson
import pytest

import shunter
from kafkatools import Broker, config, end_offsets, headers_of
from shunter.settle import headers as h
from shunter.testing import DispatcherThread

pytestmark = pytest.mark.kafka

LEDGER_ENV = "SHUNTER_ISOLATION_LEDGER"
CRASH_ENV = "SHUNTER_ISOLATION_CRASH"
DEADLY = 137  # the message that kills its worker, on every attempt
N_MESSAGES = 300


def dies_on_one_message(msg: shunter.Message) -> None:
    """Runs in a worker process: dies on message DEADLY as $SHUNTER_ISOLATION_CRASH says,
    and appends a receipt for every other message to $SHUNTER_ISOLATION_LEDGER."""
    if msg.value["n"] == DEADLY:
        how = os.environ[CRASH_ENV]
        if how == "segfault":
            ctypes.string_at(0)  # a C extension dereferencing NULL
        elif how == "exit":
            os._exit(1)
        elif how == "memory":
            bytearray(1 << 30)  # 1 GiB, against a 64 MB limit
    fd = os.open(os.environ[LEDGER_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{msg.value['n']},{msg.attempt},{os.getpid()}\n".encode())
    finally:
        os.close(fd)


def ledger(path: Path) -> Counter[int]:
    if not path.exists():
        return Counter()
    return Counter(int(line.split(",")[0]) for line in path.read_text().splitlines())


@pytest.mark.parametrize(
    ("how", "error_type", "error", "signal"),
    [
        ("segfault", "shunter.errors.WorkerDied", "worker killed by SIGSEGV", "SIGSEGV"),
        ("exit", "shunter.errors.WorkerDied", "worker exited with status 1", None),
        ("memory", "MemoryError", "worker out of memory (memory_limit_mb: 64)", None),
    ],
)
def test_a_dying_worker_fails_only_its_delivery_which_goes_through_the_tiers(
    broker: Broker, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    how: str, error_type: str, error: str, signal: str | None,
) -> None:
    """Given a process-isolated subscriber whose handler dies on one message of 300 (on
    every attempt), beside an in-process subscriber,
    when the stream flows,
    then the dispatcher never stops, the deadly delivery is retried twice in the fast tier
    and once in the slow tier and then dead-lettered, each record saying how the worker
    died (error type, error, signal header; for a segfault the faulthandler dump naming
    the handler's line), every other message reaches both subscribers exactly once, and
    the source offsets are committed to the end."""
    topic, group = f"gifts-{unique}", f"g-{unique}"
    broker.create({topic: 3})
    receipts = tmp_path / "ledger"
    monkeypatch.setenv(LEDGER_ENV, str(receipts))
    monkeypatch.setenv(CRASH_ENV, how)
    app = shunter.Dispatcher(config(broker, group, topics={topic: {}},
                                    categories={"revenue": {"topics": [topic]}},
                                    subscribers=[]))
    steady: Counter[int] = Counter()

    async def count(msg: shunter.Message) -> None:
        steady[msg.value["n"]] += 1

    app.subscriber("revenue", caller="isolated", isolation="process", workers=2,
                   memory_limit_mb=64, timeout="20s")(dies_on_one_message)
    app.subscriber("revenue", caller="steady")(count)
    broker.produce(topic, [{"n": n} for n in range(N_MESSAGES)], key=lambda i, v: f"u{i % 11}")
    others = set(range(N_MESSAGES)) - {DEADLY}

    def dead_lettered() -> bool:
        return len(broker.read_all(f"{group}.dlq", timeout=2)) >= 1

    with DispatcherThread(app) as running:
        running.wait_for(lambda: set(ledger(receipts)) == others and len(steady) == N_MESSAGES,
                         timeout=60)
        running.wait_for(dead_lettered, timeout=30, interval=0.5)
        running.wait_for(lambda: _committed(broker, group, topic) == end_offsets(broker, topic, 3),
                         timeout=30, interval=0.5)
        assert running.error is None
    assert all(k == 1 for k in ledger(receipts).values()), "a delivery ran twice"
    assert all(steady[n] == 1 for n in range(N_MESSAGES))

    fast = broker.read_all(f"{group}.retry.fast")
    slow = broker.read_all(f"{group}.retry.slow")
    dlq = broker.read_all(f"{group}.dlq")
    assert [_attempt(r) for r in fast] == [2, 3] and [_attempt(r) for r in slow] == [4]
    assert len(dlq) == 1
    for record in [*fast, *slow, *dlq]:
        head = headers_of(record)
        assert orjson.loads(record.value())["n"] == DEADLY
        assert head[h.CALLER] == "isolated" and head[h.STAGE] == "deliver"
        assert head[h.ERROR_TYPE] == error_type
        assert head[h.ERROR].startswith(error), head[h.ERROR]
        assert head.get(h.SIGNAL) == signal
        if how == "segfault":
            assert "Fatal Python error: Segmentation fault" in head[h.TRACEBACK]
            assert "in dies_on_one_message" in head[h.TRACEBACK]
        if how == "memory":
            assert "bytearray(1 << 30)" in head[h.TRACEBACK]
    assert headers_of(dlq[0])[h.TIER] == "dlq"


def _attempt(record: object) -> int:
    return int(headers_of(record)[h.ATTEMPT])


def _committed(broker: Broker, group: str, topic: str) -> list[int]:
    return [max(o, 0) for o in broker.committed(group, topic, 3)]


# -- hung code ------------------------------------------------------------------------------

def test_hung_handlers_time_out_and_the_stream_continues(
    broker: Broker, unique: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """Given a thread-isolated sync handler that blocks its thread on message 40 and an
    async handler that hangs on message 60 (first attempts only), both with a 1 s timeout,
    when 150 messages flow,
    then both hung deliveries go to the fast tier as DeliveryTimeouts and succeed on their
    retry, every other message reaches both while they hang, the async handler sees its
    cancellation, the blocked thread is counted as a lost slot with a log line naming the
    caller and the coordinates, and the slot comes back when the thread returns."""
    topic, group = f"hung-{unique}", f"g-{unique}"
    broker.create({topic: 2})
    app = shunter.Dispatcher(config(broker, group, topics={topic: {}},
                                    categories={"revenue": {"topics": [topic]}},
                                    subscribers=[]))
    n_messages, stuck_on, hangs_on = 150, 40, 60
    release = threading.Event()
    got: Counter[tuple[str, int, int]] = Counter()
    cancelled: list[int] = []
    lock = threading.Lock()

    def blocks_its_thread(msg: shunter.Message) -> None:
        n = msg.value["n"]
        if n == stuck_on and msg.attempt == 1:
            release.wait(60)  # a call without a timeout, to a service that never answers
        with lock:
            got[("stuck", n, msg.attempt)] += 1

    async def hangs(msg: shunter.Message) -> None:
        n = msg.value["n"]
        if n == hangs_on and msg.attempt == 1:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.append(n)
                raise
        with lock:
            got[("hanging", n, msg.attempt)] += 1

    app.subscriber("revenue", caller="stuck", isolation="thread", concurrency=4,
                   timeout="1s")(blocks_its_thread)
    app.subscriber("revenue", caller="hanging", concurrency=4, timeout="1s")(hangs)
    broker.produce(topic, [{"n": n} for n in range(n_messages)], key=lambda i, v: f"u{i}")

    def received(caller: str) -> set[int]:
        return {n for (c, n, _) in got if c == caller}

    caplog.set_level(logging.WARNING, logger="shunter.deliver")
    try:
        with DispatcherThread(app) as running:
            running.wait_for(lambda: received("stuck") == received("hanging")
                             == set(range(n_messages)), timeout=60)
            stuck = app.service.pipeline.runtimes["stuck"]
            assert ("stuck", stuck_on, 1) not in got and ("stuck", stuck_on, 2) in got
            assert stuck.lost_slots == 1, "the blocked thread is not counted as lost"
            release.set()
            running.wait_for(lambda: stuck.lost_slots == 0 and ("stuck", stuck_on, 1) in got,
                             timeout=10)
    finally:
        release.set()
    assert cancelled == [hangs_on]
    assert all(k == 1 for k in got.values())
    retries = {orjson.loads(r.value())["n"]: headers_of(r)
               for r in broker.read_all(f"{group}.retry.fast")}
    assert set(retries) == {stuck_on, hangs_on}
    assert {retries[stuck_on][h.CALLER], retries[hangs_on][h.CALLER]} == {"stuck", "hanging"}
    for head in retries.values():
        assert head[h.ERROR_TYPE] == "shunter.errors.DeliveryTimeout"
    source = next(m for m in broker.read_all(topic) if orjson.loads(m.value())["n"] == stuck_on)
    lost = [r.getMessage() for r in caplog.records if "slots lost" in r.getMessage()]
    assert lost == [f"caller stuck: handler still running on {topic}[{source.partition()}]"
                    f"@{source.offset()} (attempt 1) past its 1s timeout; its thread keeps the "
                    "slot until it returns (1 of 4 slots lost)"]
