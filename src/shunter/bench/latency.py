"""``latency``: produce → handler delay at 5,000 messages a second, shunter beside a plain
confluent-kafka consumer reading the same stream at the same time.

Three processes besides the bench: a producer paced at ``RATE`` that puts its wall clock
in every message (``sent``), ``shunter run`` with three subscribers that each take
``time.time() - sent`` (crash guard on), and a plain consumer (orjson, the same consumer
settings, and the same way of taking batches as shunter's consumer thread: what is
fetched already, else the first record to arrive) that does the same per message. Both
consumers join their groups before the producer starts; the first ``WARMUP`` seconds of
the stream are left out of the percentiles. On the embedded development broker even a
plain consumer sees p50 ≈ 0.2 s and p99 ≈ 1.2 s at this rate, so this scenario runs
only on a broker given with ``--bootstrap`` (Apache Kafka).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from ..broker.admin import ensure_topics
from . import procs
from .context import BATCH_SIZE, BATCH_TIMEOUT, SOURCE_FIXED, BenchContext, Dataset
from .dispatch import COMMIT_INTERVAL

RATE = 5_000  # messages per second
DURATION = 20.0  # seconds of production
WARMUP = 2.0  # seconds at the start of the stream left out of the percentiles
PARTITIONS = 6
CALLERS = ("medal", "rank", "task")

PRODUCER = """
import sys, time, orjson
from confluent_kafka import Producer
bootstrap, topic, rate, duration, out = sys.argv[1:6]
rate, duration = float(rate), float(duration)
producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1, "acks": "all"})
ends = {}
def report(err, msg):
    if err is None and msg.offset() >= ends.get(msg.partition(), 0):
        ends[msg.partition()] = msg.offset() + 1
pad = "x" * 150
total = int(rate * duration)
start = time.time()
for n in range(total):
    due = start + n / rate
    while (now := time.time()) < due:
        time.sleep(min(0.001, due - now))
    producer.produce(topic, orjson.dumps({"sent": time.time(), "n": n, "pad": pad}),
                     str(n % 1000).encode(), on_delivery=report)
    producer.poll(0)
producer.flush(60)
report = {"ends": {str(p): e for p, e in ends.items()}, "seconds": time.time() - start}
open(out, "wb").write(orjson.dumps(report))
"""

PLAIN = """
import sys, time, orjson
from confluent_kafka import Consumer
settings, topic, expect, ready, out, batch, timeout = sys.argv[1:8]
consumer = Consumer(orjson.loads(settings))
consumer.subscribe([topic], on_assign=lambda c, ps: open(ready, "w").close())
expect, batch, timeout = int(expect), int(batch), float(timeout)
delays, seen, calls = [], 0, 0
deadline = time.monotonic() + 600
def next_batch():  # as shunter's consumer thread: what is fetched, else the first to come
    got = consumer.consume(batch, 0)
    if got:
        return got
    first = consumer.poll(timeout)
    return [] if first is None else [first, *consumer.consume(batch - 1, 0)]
while seen < expect and time.monotonic() < deadline:
    for msg in next_batch():
        if msg.error() is None:
            value = orjson.loads(msg.value())
            delays.append(time.time() - value["sent"])
            seen += 1
consumer.close()
open(out, "wb").write(orjson.dumps({"delays": delays, "calls": {"plain": seen}}))
"""


def run(ctx: BenchContext) -> dict[str, Any]:
    if ctx.embedded:
        raise RuntimeError(
            "latency is measured on Apache Kafka: give its address with --bootstrap "
            "(on the embedded broker even a plain consumer's p99 is above a second)"
        )
    topic = f"bench-latency-{ctx.tag}-{ctx.run}"
    ensure_topics({"bootstrap.servers": ctx.bootstrap}, {topic: PARTITIONS})
    ctx.created.append(topic)
    work = ctx.workdir / f"latency-{ctx.run}"
    work.mkdir(parents=True, exist_ok=True)
    total = ctx.count(int(RATE * DURATION))  # --messages: a shorter stream

    group = ctx.group("latency")
    config = _config(ctx, topic, group)
    path = procs.write_service(ctx, config, dict.fromkeys(CALLERS, "latency"), group)
    plain_out, ready = work / "plain.json", work / "plain.ready"
    plain_settings = {
        **SOURCE_FIXED,
        **ctx.consumer,
        "bootstrap.servers": ctx.bootstrap,
        "group.id": ctx.group("latency-plain", dispatcher=False),
    }
    plain_args = [orjson.dumps(plain_settings).decode(), topic, str(total), str(ready)]
    plain_args += [str(plain_out), str(BATCH_SIZE), str(BATCH_TIMEOUT)]
    plain = subprocess.Popen([sys.executable, "-c", PLAIN, *plain_args])
    try:
        with procs.running(path) as shunter:
            _wait(lambda: ready.exists() and procs.assigned(path, topic) > 0, 90, shunter, path)
            produced = work / "produced.json"
            producer = [ctx.bootstrap, topic, str(RATE), str(total / RATE), str(produced)]
            subprocess.run(
                [sys.executable, "-c", PRODUCER, *producer],
                check=True,
                timeout=DURATION + 120,
            )
            sent = orjson.loads(produced.read_bytes())
            ends = {int(p): e for p, e in sent["ends"].items()}
            data = Dataset(topic, {p: ends.get(p, 0) for p in range(PARTITIONS)})
            procs.wait_committed(ctx, group, data, shunter, path, 120)
            status = procs.stop(shunter)
        plain.wait(120)
    finally:
        if plain.poll() is None:
            plain.kill()
            plain.wait()
    if status != 0:
        raise RuntimeError(f"shunter exited with {status}: {procs.log_tail(path)}")
    skip = min(int(RATE * WARMUP), total // 2)
    shunter_delays = [d for r in procs.handler_reports(path) for d in r["delays"]][
        skip * len(CALLERS) :
    ]
    plain_report = orjson.loads(plain_out.read_bytes())
    plain_delays = plain_report["delays"][skip:]
    s50, s99 = _percentiles(shunter_delays)
    p50, p99 = _percentiles(plain_delays)
    return {
        "messages": data.count,
        "rate_per_s": RATE,
        "produced_rate_per_s": round(data.count / sent["seconds"]),
        "subscribers": len(CALLERS),
        "shunter_deliveries": len(shunter_delays) + skip * len(CALLERS),
        "plain_messages": plain_report["calls"]["plain"],
        "shunter_p50_ms": round(s50 * 1000, 1),
        "shunter_p99_ms": round(s99 * 1000, 1),
        "plain_p50_ms": round(p50 * 1000, 1),
        "plain_p99_ms": round(p99 * 1000, 1),
        "p50_gap_ms": round((s50 - p50) * 1000, 1),
        "p99_gap_ms": round((s99 - p99) * 1000, 1),
    }


def _config(ctx: BenchContext, topic: str, group: str) -> dict[str, Any]:
    return {
        "kafka": {
            "bootstrap_servers": ctx.bootstrap,
            "group_id": group,
            "consumer": ctx.consumer,
            "batch_size": BATCH_SIZE,
            "commit_interval": COMMIT_INTERVAL,
        },
        "topics": {topic: {"format": "json"}},
        "categories": {"stream": {"topics": [topic]}},
        "subscribers": [{"caller": c, "category": "stream"} for c in CALLERS],
        "retry": {"partitions": 1},
        "admin": {"listen": None},
    }


def _wait(ready: Any, timeout: float, proc: subprocess.Popen[bytes], path: Path) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"shunter and the plain consumer did not both join: {procs.log_tail(path)}"
            )
        time.sleep(0.1)


def _percentiles(delays: list[float]) -> tuple[float, float]:
    if not delays:
        return float("nan"), float("nan")
    ordered = sorted(delays)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
