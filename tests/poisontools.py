"""What the poison tests (issue 10) share: reading retry and dead-letter topics with every
header as bytes, committed offsets asked of the admin API, a log capture, a /ready probe,
and a wait that reports instead of raising (so one scenario can name all it saw)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka.admin import AdminClient
from rawkafka import ReadRecord, read_raw
from reliability.harness import committed as _committed

from kafkatools import Broker
from shunter.settle import headers as h

Origin = tuple[str, int, int]  # topic, partition, offset


def committed(broker: Broker, group: str, topic: str, partitions: int) -> dict[int, int]:
    """partition -> the group's committed offset (-1: none), without joining the group."""
    return {p: o for (_t, p), o in _committed(broker, group, topic, partitions).items()}


def reached(broker: Broker, group: str, topic: str, ends: dict[int, int]) -> bool:
    """The group has committed at least ``ends[p]`` on every partition ``p`` of ``topic``."""
    if not ends:
        return True
    got = committed(broker, group, topic, max(ends) + 1)
    return all(got.get(p, -1) >= end for p, end in ends.items())


def ends_of(coords: Iterable[tuple[int, int]]) -> dict[int, int]:
    """partition -> one past its last offset among ``coords``."""
    ends: dict[int, int] = {}
    for p, o in coords:
        ends[p] = max(ends.get(p, 0), o + 1)
    return ends


_admins: dict[str, AdminClient] = {}


def partitions_of(broker: Broker, topic: str) -> int:
    """How many partitions ``topic`` has (0 if it does not exist)."""
    admin = _admins.get(broker.bootstrap)
    if admin is None:
        admin = _admins[broker.bootstrap] = AdminClient(
            {"bootstrap.servers": broker.bootstrap, "log_level": 3}
        )
    meta = admin.list_topics(topic, timeout=10).topics.get(topic)
    if meta is None or meta.error is not None:
        return 0
    return len(meta.partitions)


def read_topic(broker: Broker, topic: str, timeout: float = 60.0) -> list[ReadRecord]:
    """Every record of ``topic`` (none if it does not exist), headers as bytes."""
    n = partitions_of(broker, topic)
    return read_raw(broker.bootstrap, topic, n, timeout=timeout) if n else []


def origin(record: ReadRecord) -> Origin | None:
    """The origin coordinates a retry or dead-letter record names (None if it names none)."""
    try:
        return (
            record.text(h.ORIGIN_TOPIC) or "",
            int(record.text(h.ORIGIN_PARTITION) or ""),
            int(record.text(h.ORIGIN_OFFSET) or ""),
        )
    except ValueError:
        return None


def by_origin(records: Iterable[ReadRecord]) -> dict[Origin, list[ReadRecord]]:
    out: dict[Origin, list[ReadRecord]] = {}
    for record in records:
        where = origin(record)
        if where is not None:
            out.setdefault(where, []).append(record)
    return out


def wait_until(done: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``done`` until true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if done():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


class LogCapture(logging.Handler):
    """Keeps the records of the ``shunter`` loggers at ``level`` and above."""

    def __init__(self, level: int = logging.ERROR, logger: str = "shunter") -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []
        self._logger = logging.getLogger(logger)
        self._lock_records = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_records:
            self.records.append(record)

    def mentioning(self, text: str, level: int = logging.ERROR) -> list[logging.LogRecord]:
        """Records at ``level`` or above whose message, or ``topic`` extra, names ``text``."""
        with self._lock_records:
            records = list(self.records)
        out = []
        for record in records:
            if record.levelno < level:
                continue
            try:
                message = record.getMessage()
            except Exception:
                message = str(record.msg)
            if text in message or getattr(record, "topic", None) == text:
                out.append(record)
        return out

    def __enter__(self) -> LogCapture:
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ReadyProbe:
    """Polls ``GET /ready`` on a thread; ``answers`` are (monotonic time, status, body)."""

    port: int
    interval: float = 0.25
    answers: list[tuple[float, int, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ready-probe", daemon=True)

    def ask(self) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{self.port}/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return answer.status, _body(answer.read())
        except urllib.error.HTTPError as err:
            with err:
                return err.code, _body(err.read())
        except OSError as err:  # not listening (yet, or any more)
            return 0, str(err)

    def _run(self) -> None:
        while not self._stop.is_set():
            status, body = self.ask()
            self.answers.append((time.monotonic(), status, body))
            self._stop.wait(self.interval)

    def start(self) -> ReadyProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def status_at(self, when: float) -> int | None:
        """The last status answered at or before ``when`` (None before the first)."""
        found = None
        for at, status, _ in self.answers:
            if at > when:
                break
            found = status
        return found


def _body(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace")
