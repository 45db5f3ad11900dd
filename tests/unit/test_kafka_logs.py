"""librdkafka's own log lines go through shunter's logger, rate-limited: an unreachable
broker gives one clear line naming the address and what to check, repeated at a calm
interval instead of librdkafka's stream of connection failures."""

from __future__ import annotations

import logging
import time

import pytest
from confluent_kafka import Consumer

from shunter.broker.embedded import free_port
from shunter.observe.logs import KAFKA_LOGGER, KafkaLogLimiter, kafka_logger

FAIL = (
    "[thrd:127.0.0.1:1/bootstrap]: 127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 "
    "failed: Connection refused (after 0ms in state CONNECT)"
)


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(text: str, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(KAFKA_LOGGER, level, __file__, 1, "%s [%s] %s",
                             ("FAIL", "rdkafka#consumer-1", text), None)


def test_connection_failures_become_one_clear_line_per_interval() -> None:
    """Given librdkafka's FAIL lines for one address, many per second, then one line per
    30 s passes: a warning naming the address, the reason and what to check, and the
    next one counts the lines it stands for."""
    clock = Clock()
    limiter = KafkaLogLimiter(30.0, clock)
    passed = []
    for i in range(600):  # 60 s of a line every 100 ms
        clock.now = 1000.0 + i * 0.1
        r = record(FAIL)
        if limiter.filter(r):
            passed.append(r)
    assert len(passed) == 2
    first = passed[0].getMessage()
    assert first.startswith("cannot reach Kafka at 127.0.0.1:1 (Connection refused): check")
    assert "kafka.bootstrap_servers" in first
    assert passed[0].levelname == "WARNING"
    assert "(299 more such lines in the last 30s not shown)" in passed[1].getMessage()


def test_other_lines_pass_once_per_interval_numbers_aside() -> None:
    clock = Clock()
    limiter = KafkaLogLimiter(30.0, clock)
    assert limiter.filter(record("Metadata request failed: 5 brokers", logging.WARNING))
    assert not limiter.filter(record("Metadata request failed: 6 brokers", logging.WARNING))
    assert limiter.filter(record("something else entirely", logging.WARNING))
    clock.now += 31
    again = record("Metadata request failed: 7 brokers", logging.WARNING)
    assert limiter.filter(again)
    assert "(1 more such lines" in again.getMessage()


def test_a_real_client_of_an_unreachable_broker_logs_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Given a consumer given shunter's Kafka logger and an address nobody listens on,
    when it tries for 3 seconds, then exactly one line about it is logged."""
    port = free_port()
    consumer = Consumer({"bootstrap.servers": f"127.0.0.1:{port}", "group.id": "x",
                         "logger": kafka_logger(), "reconnect.backoff.ms": 10,
                         "reconnect.backoff.max.ms": 50})
    try:
        with caplog.at_level(logging.DEBUG, logger=KAFKA_LOGGER):
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                consumer.poll(0.1)
    finally:
        consumer.close()
    lines = [r.getMessage() for r in caplog.records if r.name == KAFKA_LOGGER]
    assert len(lines) == 1, lines
    assert f"cannot reach Kafka at 127.0.0.1:{port}" in lines[0]
