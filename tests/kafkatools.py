"""Small helpers the Kafka tests share: topics, producing, reading back, configs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from shunter.broker.admin import ensure_topics


@dataclass(frozen=True)
class Broker:
    kind: str  # embedded | kafka
    bootstrap: str

    @property
    def client(self) -> dict[str, Any]:
        """Client settings for shunter's YAML ``kafka.client``."""
        if self.kind == "embedded":  # Tansu joins groups in ~3 s with these
            return {"session.timeout.ms": 6000, "max.poll.interval.ms": 10000}
        return {"session.timeout.ms": 6000}

    def create(self, topics: dict[str, int]) -> None:
        ensure_topics({"bootstrap.servers": self.bootstrap}, topics)

    def produce(self, topic: str, values: list[Any], key: Any = None, raw: bool = False) -> None:
        """Produce values (JSON-encoded unless raw); ``key(i, value)`` gives each key."""
        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
        for i, value in enumerate(values):
            k = key(i, value) if callable(key) else key
            if isinstance(k, str):
                k = k.encode()
            producer.produce(topic, value=value if raw else orjson.dumps(value), key=k)
            if i % 1000 == 0:
                producer.poll(0)
        assert producer.flush(30) == 0

    def read_all(self, topic: str, expect: int | None = None, timeout: float = 30.0) -> list[Any]:
        """Every record of ``topic`` from the beginning (confluent Message objects)."""
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"reader-{time.time_ns()}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": True,
                **self.client,
            }
        )
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        out: list[Any] = []
        eof: set[int] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.2):
                if msg.error() is None:
                    out.append(msg)
                elif msg.error().code() == -191:  # partition EOF
                    eof.add(msg.partition())
            if expect is None and len(eof) == len(meta.partitions):
                break
            if expect is not None and len(out) >= expect:
                break
        consumer.close()
        return out

    def committed(self, group: str, topic: str, partitions: int) -> list[int]:
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group, **self.client})
        got = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        consumer.close()
        return [tp.offset for tp in got]


def config(
    broker: Broker,
    group: str,
    topics: dict[str, Any],
    categories: dict[str, Any],
    subscribers: list[dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """A shunter configuration dict for tests (admin API off unless given)."""
    data: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": broker.bootstrap,
            "group_id": group,
            "consumer": broker.client,
            "commit_interval": "100ms",
        },
        "topics": topics,
        "categories": categories,
        "subscribers": subscribers,
        "admin": {"listen": None},
        "retry": {
            "fast": {"attempts": 2, "delay": "200ms"},
            "slow": {"attempts": 1, "delay": "500ms"},
            "partitions": 2,
        },
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


# -- added for the core and at-least-once suites ----------------------------------------------


def end_offsets(broker: Broker, topic: str, partitions: int) -> list[int]:
    """One past each partition's last offset, read from the records themselves (Tansu's
    ListOffsets answers "latest" with the last batch's position, not the log end)."""
    ends = [0] * partitions
    for msg in broker.read_all(topic):
        ends[msg.partition()] = max(ends[msg.partition()], msg.offset() + 1)
    return ends


def headers_of(msg: Any) -> dict[str, str]:
    """A confluent Message's headers as text (the last value of each name)."""
    return {k: (v or b"").decode("utf-8", "replace") for k, v in msg.headers() or []}


LEDGER_HANDLERS = '''
"""Handlers that append a receipt per delivery: caller,topic,partition,offset."""
import asyncio
import os

_fd = os.open(os.environ["SHUNTER_TEST_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
_pause = float(os.environ.get("SHUNTER_TEST_PAUSE", "0.001"))


def _receipt(caller):
    async def handle(msg):
        await asyncio.sleep(_pause)
        # one write(2) per line on an O_APPEND descriptor: lines never interleave, and a
        # receipt is in the file before the delivery can be settled
        os.write(_fd, f"{caller},{msg.topic},{msg.partition},{msg.offset}\\n".encode())
    handle.__name__ = caller.replace("-", "_")
    return handle


def __getattr__(name):
    return _receipt(name.replace("_", "-"))
'''


def write_ledger_handlers(directory: Path, module: str) -> None:
    """Write a handler module: ``module:<caller>`` (``-`` spelled ``_``) appends receipts
    ``caller,topic,partition,offset`` to $SHUNTER_TEST_LEDGER after $SHUNTER_TEST_PAUSE s."""
    (directory / f"{module}.py").write_text(LEDGER_HANDLERS)


def read_ledger(path: Path) -> Counter[tuple[str, str, int, int]]:
    """Receipts of a ledger file: (caller, topic, partition, offset) -> times delivered."""
    out: Counter[tuple[str, str, int, int]] = Counter()
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        caller, topic, partition, offset = line.split(",")
        out[(caller, topic, int(partition), int(offset))] += 1
    return out


class ShunterProcess:
    """``shunter run -c FILE`` as a child process in its own session, output to a log.

    ``kill()`` SIGKILLs the whole session (a supervisor and its worker alike), as a node
    or container dying would; ``terminate()`` sends SIGTERM to the ``shunter`` process.
    """

    def __init__(
        self,
        config_file: Path,
        log_file: Path,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.config_file = config_file
        self.log_file = log_file
        self.env = {**os.environ, **(env or {})}
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ShunterProcess:
        assert not self.alive(), "started twice: the first process would be left running"
        with open(self.log_file, "ab") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "shunter.cli.main",
                    "run",
                    "-c",
                    str(self.config_file),
                    *self.args,
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_file.read_text(errors="replace")[-chars:] if self.log_file.exists() else ""

    def __enter__(self) -> ShunterProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.alive():
            self.kill()


def pythonpath(*dirs: object) -> str:
    """``PYTHONPATH`` for a child process: ``dirs`` first, then whatever this process was
    given (a tree under test that is not the installed one stays the one imported)."""
    inherited = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join([*(str(d) for d in dirs), *([inherited] if inherited else [])])
