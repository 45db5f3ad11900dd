"""The at-least-once proof: a dispatcher SIGKILLed again and again over a live stream
still delivers every (message, subscriber) pair at least once.

The stream keeps flowing through every kill and restart (a restart after SIGKILL waits
for the dead member's session to expire, ~11 s on Tansu), so each kill lands while
messages are arriving and deliveries are in flight. Duplicates are what at-least-once
costs after a crash: they are counted and printed, not failed.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
import yaml
from confluent_kafka import Producer

from kafkatools import (
    Broker,
    ShunterProcess,
    config,
    end_offsets,
    pythonpath,
    read_ledger,
    write_ledger_handlers,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

PARTITIONS = 4
KILLS = 5
SEED = 20240607
RATE = 40  # messages per second: ~3,000 over the ~75 s the kills and restarts take on Tansu
MESSAGES = 3000  # at least this many before the stream ends


def test_every_message_reaches_every_subscriber_despite_sigkills(
    broker: Broker, unique: str, tmp_path: Path
) -> None:
    """Given `shunter run` in a subprocess over a live stream of at least 3,000 messages
    on 4 partitions, three subscribers (one behind a CEL filter) writing a receipt per
    delivery, and crash-guard quarantine set out of reach,
    when the process (supervisor and worker alike) is SIGKILLed 5 times, each 1-4 s after
    the restarted instance began delivering, and finally left to catch up and stopped
    with SIGTERM,
    then every (message, subscriber) pair has a receipt, no receipt is for a pair no
    category asked for, the commits reach the end of the stream, the last stop exits 0,
    and nothing was dead-lettered."""
    topic, group = f"live-{unique}", f"g-{unique}"
    broker.create({topic: PARTITIONS})
    module = f"receipts_{unique}"
    write_ledger_handlers(tmp_path, module)
    data = config(
        broker, group,
        topics={topic: {}},
        categories={"revenue": {"topics": [topic]},
                    "big": {"topics": [topic], "where": "value.price >= 50"}},
        subscribers=[
            {"caller": "medal", "category": "revenue", "handler": f"{module}:medal",
             "concurrency": 16},
            {"caller": "rank", "category": "revenue", "handler": f"{module}:rank",
             "concurrency": 4},
            {"caller": "vip", "category": "big", "handler": f"{module}:vip"},
        ],
        # crash suspects are re-run, never quarantined here: every pair must be delivered
        crash_guard={"quarantine_after": 1000},
    )
    data["kafka"].update(batch_size=200, drain_timeout="5s")
    (tmp_path / "shunter.yaml").write_text(yaml.safe_dump(data))
    ledger = tmp_path / "ledger.txt"
    service = ShunterProcess(
        tmp_path / "shunter.yaml", tmp_path / "service.log",
        {"PYTHONPATH": pythonpath(tmp_path), "SHUNTER_TEST_LEDGER": str(ledger),
         "SHUNTER_TEST_PAUSE": "0.001"},
    )

    stream = LiveStream(broker, topic)
    stream.start()
    try:
        run = kill_and_restart(service, stream, ledger, random.Random(SEED))
        assert until(lambda: stream.produced >= MESSAGES, service, 120)
        stream.stop()  # the last instance catches up with a stream that has ended
        run.ends = end_offsets(broker, topic, PARTITIONS)
        assert sum(run.ends) == stream.produced
        run.caught_up = until(lambda: committed(broker, group, topic) == run.ends, service, 60)
        service.terminate()
        run.status = service.wait(60)
    finally:
        stream.stop()
        if service.alive():
            service.kill()

    expected = set()
    for msg in broker.read_all(topic, expect=stream.produced):
        callers = ["medal", "rank"]
        if orjson.loads(msg.value())["price"] >= 50:
            callers.append("vip")
        expected.update((c, topic, msg.partition(), msg.offset()) for c in callers)
    receipts = read_ledger(ledger)
    missing = expected - set(receipts)
    unexpected = set(receipts) - expected
    duplicates = sum(n - 1 for n in receipts.values())
    print(f"\nat-least-once: {stream.produced} messages, {len(expected)} (message, subscriber) "
          f"pairs, {sum(receipts.values())} receipts, {duplicates} duplicates, "
          f"{len(missing)} missing; " + "; ".join(run.kills))
    assert not missing, f"{len(missing)} pairs never delivered, e.g. {sorted(missing)[:5]}"
    assert not unexpected, f"deliveries no category asked for: {sorted(unexpected)[:5]}"
    assert run.caught_up, f"commits never reached the end {run.ends}:\n{service.log_tail()}"
    assert run.status == 0, service.log_tail()
    assert len(run.kills) == KILLS
    assert not broker.read_all(f"{group}.dlq"), "a message was dead-lettered"


@dataclass
class Run:
    kills: list[str] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    caught_up: bool = False
    status: int | None = None


def kill_and_restart(service: ShunterProcess, stream: LiveStream, ledger: Path,
                     rng: random.Random) -> Run:
    """Start the service, and KILLS times: wait for it to deliver, let it run 1-4 s,
    SIGKILL it and start it again. Returns with the last instance running."""
    run = Run()
    began = time.monotonic()
    for round_ in range(KILLS + 1):
        before = receipts(ledger)
        service.start()
        started = until(lambda: receipts(ledger) > before, service, 90)  # noqa: B023
        assert started, f"no delivery after a restart:\n{service.log_tail()}"
        if round_ == KILLS:
            return run
        time.sleep(rng.uniform(1.0, 4.0))
        at = receipts(ledger)
        service.kill()
        run.kills.append(f"kill {round_ + 1} at {time.monotonic() - began:.1f}s "
                         f"({stream.produced} produced, {at} receipts)")
    raise AssertionError("unreachable")


class LiveStream:
    """A producer thread writing RATE messages a second until stopped."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self._producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5,
                                   "enable.idempotence": True})
        self._topic = topic
        self._rng = random.Random(SEED + 1)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-stream", daemon=True)
        self.produced = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._thread.join(30)
        assert self._producer.flush(30) == 0

    def _run(self) -> None:
        tick = 0.1
        while not self._stopping.wait(tick):
            for _ in range(int(RATE * tick)):
                n = self.produced
                value = {"n": n, "price": self._rng.randrange(100)}
                self._producer.produce(self._topic, orjson.dumps(value), key=f"u{n % 97}")
                self.produced += 1
            self._producer.poll(0)


def receipts(ledger: Path) -> int:
    return sum(read_ledger(ledger).values())


def committed(broker: Broker, group: str, topic: str) -> list[int]:
    return [max(o, 0) for o in broker.committed(group, topic, PARTITIONS)]


def until(predicate: Callable[[], bool], service: ShunterProcess, timeout: float) -> bool:
    """Wait until ``predicate()`` holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert service.alive(), f"shunter died:\n{service.log_tail()}"
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
