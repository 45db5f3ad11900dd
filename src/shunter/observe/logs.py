"""Logging set-up: readable text or one JSON object per line, secrets redacted; and
librdkafka's own log lines, routed through ``shunter.kafka`` and rate-limited."""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable

import orjson

from ..config import redact

_FIELDS = ("caller", "category", "topic", "partition", "offset", "attempt", "stage", "next")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class Redact(logging.Filter):
    """Replace every configured secret value in a log line with ``***``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        text = record.getMessage()
        if any(s in text for s in self._secrets):
            record.msg, record.args = redact([text], self._secrets)[0], None
        return True


def setup_logging(fmt: str = "text", level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(Redact(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


KAFKA_LOGGER = "shunter.kafka"
CALM = 30.0  # seconds between two lines saying the same thing about Kafka

# librdkafka's words for "no broker answers at this address".
_UNREACHABLE = re.compile(
    r"Connection refused|Connect to .* failed|Failed to resolve|Name or service not known|"
    r"Connection timed out|Host is unreachable|Network is unreachable|brokers are down",
    re.IGNORECASE,
)
_ADDRESS = re.compile(r"\]: (?:[a-z]+://)?([^\s/]+)/")  # "[thrd:...]: 127.0.0.1:1/bootstrap: ..."
_REASON = re.compile(r"failed: (.*?)(?: \(after \d+ms.*)?$")
_NUMBERS = re.compile(r"\d+")


class KafkaLogLimiter(logging.Filter):
    """One clear line instead of librdkafka's stream of connection failures, and no line
    repeated more often than every ``interval`` seconds.

    A connection failure becomes "cannot reach Kafka at ADDRESS (REASON): check ...",
    once per address and interval, with the count of lines it stands for. Any other
    librdkafka line passes once per interval for its text (numbers aside).
    """

    def __init__(self, interval: float = CALM, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self._interval = interval
        self._clock = clock
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()  # librdkafka logs from its clients' poll threads

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        unreachable = _UNREACHABLE.search(text) is not None
        if unreachable:
            found = _ADDRESS.search(text)
            address = found.group(1) if found else "the configured bootstrap servers"
            key = ("unreachable", address)
        else:
            key = ("line", _NUMBERS.sub("#", text))
        with self._lock:
            now = self._clock()
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            self._last[key] = now
            held = self._held.pop(key, 0)
        if unreachable:
            reason = _REASON.search(text)
            record.msg = (
                "cannot reach Kafka at %s (%s): check that a broker is running there and "
                "that kafka.bootstrap_servers (or --bootstrap) names it; still trying%s"
            )
            record.args = (
                address,
                reason.group(1) if reason else text.rsplit(": ", 1)[-1],
                _held(held, self._interval),
            )
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        elif held:
            record.msg, record.args = "%s%s", (text, _held(held, self._interval))
        return True


def _held(count: int, interval: float) -> str:
    if not count:
        return ""
    return f" ({count} more such lines in the last {interval:.0f}s not shown)"


_limiter_lock = threading.Lock()


def kafka_logger() -> logging.Logger:
    """The logger every Kafka client of shunter gives librdkafka (its ``logger``
    setting), rate-limited by one ``KafkaLogLimiter``."""
    logger = logging.getLogger(KAFKA_LOGGER)
    with _limiter_lock:
        if not any(isinstance(f, KafkaLogLimiter) for f in logger.filters):
            logger.addFilter(KafkaLogLimiter())
    return logger
