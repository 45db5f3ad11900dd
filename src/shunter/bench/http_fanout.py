"""``http-fanout``: three ``http:`` subscribers on a local server that answers 200 at once.

The server is an aiohttp.web application in its own process; it counts the requests it
receives and times them from the first to the last, so both sides are measured the same
way, by the receiver, from the first delivery to the last. Both sides start from Kafka:
the baseline is a raw loop in this process, a confluent-kafka consumer in a fresh group
(batches consumed in a thread, as shunter's source does) feeding each record's bytes to
one aiohttp session per subscriber (as shunter has one pool per subscriber), each with the
subscribers' concurrency; no decode, no tracking, no commit. Then shunter consumes the
topic in another fresh group and delivers every message to the three subscribers through
the whole path (decode, classify, circuit breaker, POST, response contract, settle,
commit). Same library, same concurrency, same server, one run after the other; the order
alternates between runs (``shunter bench --runs``), so neither side always reads cold.

``run(messages)`` is self-contained (it starts the embedded broker unless ``bootstrap``
is given); ``shunter bench`` calls ``run(ctx)`` with its ``BenchContext``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import random
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from confluent_kafka import Consumer

from ..app import Dispatcher
from ..broker.admin import ensure_topics
from ..broker.embedded import CONSUMER_SETTINGS, EmbeddedBroker, free_port
from ..testing import DispatcherThread
from . import events
from .context import BATCH_SIZE, BATCH_TIMEOUT, SOURCE_FIXED

MESSAGES = 20_000
SUBSCRIBERS = 3
CONCURRENCY = 32  # per subscriber, on both sides
PARTITIONS = 6
CALLERS = [f"hook-{i}" for i in range(SUBSCRIBERS)]


def run(
    messages: Any = None, *, concurrency: int = CONCURRENCY, bootstrap: str | None = None
) -> dict[str, Any]:
    """Measure the raw loop and shunter (raw first, but in even runs of ``shunter bench``);
    ``messages`` is a count or a BenchContext."""
    ctx = None if messages is None or isinstance(messages, int) else messages
    count = ctx.count(MESSAGES) if ctx is not None else messages or MESSAGES
    bootstrap = ctx.bootstrap if ctx is not None else bootstrap
    tag = getattr(ctx, "tag", None) or uuid.uuid4().hex[:8]
    with contextlib.ExitStack() as stack:
        if bootstrap is None:
            broker = EmbeddedBroker().start()
            stack.callback(broker.stop)
            bootstrap = broker.bootstrap
        server = stack.enter_context(HookServerProcess())
        if ctx is not None:  # produced once per broker, read by every run on it
            topic = ctx.dataset(f"http-{count}", PARTITIONS, lambda: _gifts(count)).topic
            raw_group = ctx.group("httpraw", dispatcher=False)
            group = ctx.group("httpfanout")
        else:
            topic = f"bench-http-{count}-{tag}"
            ensure_topics({"bootstrap.servers": bootstrap}, {topic: PARTITIONS})
            events.produce(bootstrap, topic, _gifts(count))
            raw_group, group = f"bench-httpraw-{tag}", f"bench-http-{tag}"

        def raw_side() -> dict[str, float]:
            server.reset()
            asyncio.run(_raw_loop(bootstrap, topic, raw_group, server, count, concurrency))
            return server.stats()

        def shunter_side() -> dict[str, float]:
            server.reset()
            outcomes.update(_shunter(bootstrap, topic, group, server, count, concurrency))
            return server.stats()

        outcomes: dict[str, int] = {}
        sides = {"raw": raw_side, "shunter": shunter_side}
        order = list(sides) if ctx is None or ctx.run % 2 else list(reversed(sides))
        done = {name: sides[name]() for name in order}
        raw, mine = done["raw"], done["shunter"]
    raw_rate, shunter_rate = raw["n"] / raw["span"], mine["n"] / mine["span"]
    return {
        "order": "/".join(order),
        "messages": count,
        "subscribers": SUBSCRIBERS,
        "concurrency": concurrency,
        "deliveries": mine["n"],
        "raw_deliveries_per_s": round(raw_rate),
        "shunter_deliveries_per_s": round(shunter_rate),
        "ratio": round(shunter_rate / raw_rate, 3),
        "raw_seconds": round(raw["span"], 3),
        "shunter_seconds": round(mine["span"], 3),
        "outcomes": outcomes,
    }


# -- the server, in its own process -----------------------------------------------------------


class HookServerProcess:
    """An aiohttp.web server on 127.0.0.1 in a child process, answering every POST 200."""

    def __init__(self) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> HookServerProcess:
        self._process = subprocess.Popen(
            [sys.executable, "-m", __name__, "serve", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self._process.poll() is None:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return self
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError("the bench HTTP server did not start")

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)

    def url(self, name: str) -> str:
        return f"{self.base}/hook/{name}"

    def reset(self) -> None:
        self._control("POST", "/_reset")

    def stats(self) -> dict[str, float]:
        """Requests received, and seconds from the first to the last."""
        counts = json.loads(self._control("GET", "/_stats"))
        return {"n": counts["n"], "span": counts["last"] - counts["first"]}

    def _control(self, method: str, path: str) -> bytes:
        request = urllib.request.Request(self.base + path, method=method)
        with urllib.request.urlopen(request, timeout=10) as answer:
            return bytes(answer.read())


async def _serve_forever(port: int) -> None:
    counts = {"n": 0, "first": 0.0, "last": 0.0}
    clock = time.perf_counter

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        now = clock()
        if not counts["n"]:
            counts["first"] = now
        counts["n"] += 1
        counts["last"] = now
        return web.Response()

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(counts)

    async def reset(request: web.Request) -> web.Response:
        counts.update(n=0, first=0.0, last=0.0)
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook/{name}", hook)
    app.router.add_get("/_stats", stats)
    app.router.add_post("/_reset", reset)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()  # until the parent terminates us


# -- the two sides --------------------------------------------------------------------------


async def _raw_loop(
    bootstrap: str,
    topic: str,
    group: str,
    server: HookServerProcess,
    count: int,
    concurrency: int,
) -> None:
    """Consume ``count`` records of ``topic`` and post each one's bytes to every
    subscriber's URL: one session per subscriber, ``concurrency`` requests in flight in
    each, fed through a bounded queue per subscriber (the consumer waits when one is full)."""
    consumer = Consumer(
        {
            **SOURCE_FIXED,
            **CONSUMER_SETTINGS,
            "bootstrap.servers": bootstrap,
            "group.id": group,
        }
    )
    consumer.subscribe([topic])
    loop = asyncio.get_running_loop()
    # One thread for the consumer: its close (below) waits for a consume still running
    # there when a failed request ends the loop, rather than racing it.
    reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bench-raw-consumer")

    async def worker(
        session: aiohttp.ClientSession, url: str, work: asyncio.Queue[bytes | None]
    ) -> None:
        while (body := await work.get()) is not None:
            async with session.post(url, data=body, headers=_JSON) as resp:
                await resp.read()
                resp.raise_for_status()

    async def feed(queues: list[asyncio.Queue[bytes | None]]) -> None:
        seen = 0
        deadline = time.monotonic() + 300
        while seen < count:
            batch = await loop.run_in_executor(reader, consumer.consume, BATCH_SIZE, BATCH_TIMEOUT)
            if not batch and time.monotonic() > deadline:
                raise TimeoutError(f"raw loop read {seen} of {count} records in 300s")
            for msg in batch:
                if msg.error() is not None:
                    continue
                body = msg.value()
                for work in queues:
                    if work.full():
                        await work.put(body)
                    else:
                        work.put_nowait(body)
                seen += 1
        for work in queues:
            for _ in range(concurrency):
                await work.put(None)

    try:
        # A task group: a failed request ends the feeder too, rather than leaving it
        # waiting on a full queue no worker drains.
        async with contextlib.AsyncExitStack() as stack, asyncio.TaskGroup() as tasks:
            queues: list[asyncio.Queue[bytes | None]] = []
            for caller in CALLERS:
                connector = aiohttp.TCPConnector(limit=concurrency)
                session = await stack.enter_async_context(
                    aiohttp.ClientSession(connector=connector)
                )
                work: asyncio.Queue[bytes | None] = asyncio.Queue(BATCH_SIZE)
                queues.append(work)
                for _ in range(concurrency):
                    tasks.create_task(worker(session, server.url(caller), work))
            tasks.create_task(feed(queues))
    finally:
        await loop.run_in_executor(reader, consumer.close)
        reader.shutdown()


_JSON = {"Content-Type": "application/json"}


def _shunter(
    bootstrap: str, topic: str, group: str, server: HookServerProcess, count: int, concurrency: int
) -> dict[str, int]:
    app = Dispatcher(
        {
            "kafka": {
                "bootstrap_servers": bootstrap,
                "group_id": group,
                "consumer": CONSUMER_SETTINGS,
                "commit_interval": "100ms",
            },
            "topics": {topic: {"format": "json"}},
            "categories": {"gifts": {"topics": [topic]}},
            "subscribers": [
                {
                    "caller": caller,
                    "category": "gifts",
                    "concurrency": concurrency,
                    "http": {"url": server.url(caller), "allow_private": ["127.0.0.1"]},
                }
                for caller in CALLERS
            ],
            "retry": {"fast": {"attempts": 3, "delay": "1h"}, "partitions": PARTITIONS},
            "admin": {"listen": None},
        }
    )
    total = count * SUBSCRIBERS
    with DispatcherThread(app) as running:
        stats = running.app.service.stats

        def settled() -> int:
            return sum(n for row in stats.by_caller().values() for n in row.values())

        running.wait_for(lambda: settled() >= total, timeout=600, interval=0.05)
        outcomes: dict[str, int] = {}
        for row in stats.by_caller().values():
            for outcome, n in row.items():
                outcomes[outcome] = outcomes.get(outcome, 0) + n
    return outcomes


def _gifts(count: int) -> Iterator[tuple[bytes, bytes]]:
    """``count`` gift events (~200 bytes of JSON), keyed by user."""
    rng = random.Random(7)
    for n in range(count):
        user = 100_000 + rng.randrange(20_000)
        body = orjson.dumps(
            {
                "event_id": f"g-{n:012d}",
                "user_id": user,
                "room_id": 5_000_000 + rng.randrange(2_000),
                "gift_id": rng.randrange(1, 64),
                "gift_name": "rose",
                "count": rng.choice((1, 5, 10)),
                "price": rng.randrange(1, 5000),
                "currency": "coin",
                "platform": rng.choice(("ios", "android", "web")),
                "ts": 1_735_689_600_000 + n,
            }
        )
        yield str(user).encode(), body


if __name__ == "__main__":  # the server process: python -m shunter.bench.http_fanout serve PORT
    if sys.argv[1:2] == ["serve"]:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve_forever(int(sys.argv[2])))
