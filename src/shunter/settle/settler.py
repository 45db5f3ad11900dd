"""Settling deliveries.

A delivery is *settled* when it succeeded, or when its record is acknowledged by the
broker in the caller's retry tier or in the dead-letter topic. Only then is its share of
the source offset released (``Record.settle_one``); a write that fails is written again
after a backoff, so nothing is ever committed past without being somewhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from confluent_kafka import KafkaError

from ..config import Config
from ..errors import RejectedMessage
from ..message import Message, Record
from ..observe.flood import FloodGuard
from ..observe.stats import Stats
from ..outcome import SUCCEEDED, DeadLettered, Failed, Outcome
from . import headers as h
from .producer import ReliableProducer
from .route import Destination, route

log = logging.getLogger("shunter.settle")

_BACKOFF_MAX = 30.0
_TOO_LARGE = {
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError._INVALID_ARG,  # what ReliableProducer reports when produce() refuses
}


class Settler:
    def __init__(
        self,
        config: Config,
        producer: ReliableProducer,
        stats: Stats,
        flood: FloodGuard | None = None,
    ) -> None:
        self._config = config
        self._retry = config.retry
        self._producer = producer
        self._stats = stats
        self._topics = {
            "fast": config.fast_topic,
            "slow": config.slow_topic,
            "dlq": config.dlq_topic,
        }
        self._flood = flood

    def succeeded(self, done: list[tuple[Message, float]]) -> None:
        """Settle successful deliveries of one caller (the runtime's ``SettleMany``)."""
        if not done:
            return
        caller = done[0][0].caller
        latency = self._stats.latency[caller]
        for msg, elapsed in done:
            record = msg._record
            try:
                record.ptrack.release(record.seq)
                latency.succeeded(record.topic, elapsed)
            except Exception:  # a bug; the others must still be released
                log.critical("settling %r failed", msg, exc_info=True)
        if self._flood is not None:
            self._flood.succeeded(caller, len(done))

    def __call__(self, msg: Message, outcome: Outcome, elapsed: float) -> None:
        """Settle one delivery (the runtime's ``Settle`` callback)."""
        record = msg._record
        if outcome is SUCCEEDED:
            caller = msg.caller
            self._stats.latency[caller].succeeded(record.topic, elapsed)
            if self._flood is not None:
                self._flood.succeeded(caller, 1)
            record.ptrack.release(record.seq)
            return
        assert isinstance(outcome, Failed | DeadLettered)
        dest = route(self._retry, msg.attempt, outcome)
        self._stats.failed(record.topic, msg.caller, elapsed, dest.tier)
        self._log_failure(msg, outcome, dest)
        self._stats.fingerprints.observe(msg.caller, outcome, record)  # observe/fingerprints.py
        if self._flood is not None:
            self._flood.observe(msg.caller, dest.tier == "dlq")
        self._write(record, self._info(msg, outcome, dest), dest.tier)

    def park(self, msg: Message, reason: str) -> None:
        """Set a delivery aside in the slow tier without counting an attempt (caller paused)."""
        info = self._info(
            msg,
            Failed("CallerPaused", reason, ""),
            Destination("slow", msg.attempt, self._retry.slow.delay),
        )
        self._stats.parked(msg._record.topic, msg.caller)
        self._write(msg._record, info, "slow")

    def reject(self, record: Record, exc: RejectedMessage) -> None:
        """A message that failed decoding or validation: once to the dead-letter topic."""
        log.warning(
            "rejected %s[%d]@%d at %s: %s",
            record.topic,
            record.partition,
            record.offset,
            exc.stage,
            exc.reason,
            extra={
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "stage": exc.stage,
            },
        )
        self._stats.rejected(record.topic, exc.stage)
        self._dead_letter_unrun(record, exc.stage, "RejectedMessage", exc.reason)

    def quarantine(self, record: Record, reason: str, signal: str = "") -> None:
        """A record suspected of killing the process: to the dead-letter topic, unrun."""
        self._stats.rejected(record.topic, "crash")
        self._dead_letter_unrun(record, "crash", "crash", reason, signal)

    def _dead_letter_unrun(
        self, record: Record, stage: str, error_type: str, error: str, signal: str = ""
    ) -> None:
        """A record no handler ran: once to the dead-letter topic, for no caller in particular."""
        now = _now_ms()
        info = h.FailureInfo(
            caller="",
            category="",
            attempt=1,
            stage=stage,
            error_type=error_type,
            error=error,
            traceback="",
            first_failure_ms=now,
            not_before_ms=now,
            origin_topic=record.topic,
            origin_partition=record.partition,
            origin_offset=record.offset,
            origin_timestamp_ms=record.timestamp,
            tier="dlq",
            origin_key=record.key,
            signal=signal,
        )
        self._write(record, info, "dlq")

    # -- internals ------------------------------------------------------------------------

    def _info(
        self, msg: Message, outcome: Failed | DeadLettered, dest: Destination
    ) -> h.FailureInfo:
        record = msg._record
        now = _now_ms()
        signal = ""
        if isinstance(outcome, Failed):
            error_type, error, signal = outcome.error_type, outcome.error, outcome.signal
        else:
            error_type, error = outcome.error_type, outcome.reason
        return h.FailureInfo(
            caller=msg.caller,
            category=msg.category,
            attempt=dest.next_attempt,
            stage=outcome.stage,
            error_type=error_type,
            error=error,
            traceback=outcome.traceback,
            first_failure_ms=record.first_failure or now,
            not_before_ms=now + int(dest.delay * 1000),
            origin_topic=record.topic,
            origin_partition=record.partition,
            origin_offset=record.offset,
            origin_timestamp_ms=record.timestamp,
            tier=dest.tier,
            origin_key=record.key,
            signal=signal,
        )

    def _write(
        self,
        record: Record,
        info: h.FailureInfo,
        tier: str,
        backoff: float = 0.5,
        omit: bool = False,
    ) -> None:
        topic = self._topics[tier]
        # shunter's headers, then the record's own (a handler sees them on every attempt)
        encoded = h.encode(info) + [
            (k, v) for k, v in record.headers or [] if not k.startswith(h.PREFIX)
        ]
        if omit:
            encoded.append((h.PAYLOAD_OMITTED, str(len(record.raw or b"")).encode()))

        def done(err: KafkaError | None) -> None:
            if err is None:
                self._stats.written(tier)
                record.settle_one()
                return
            if err.code() in _TOO_LARGE and not omit:
                # Retrying cannot help: dead-letter a stub naming the origin, without the
                # payload (it stays on the source topic while that retains it).
                log.error(
                    "%s[%d]@%d is too large for %s (%s); dead-lettered without its payload",
                    record.topic,
                    record.partition,
                    record.offset,
                    topic,
                    err,
                )
                stub = dataclasses.replace(
                    info, tier="dlq", error=f"{info.error} (payload too large to keep: {err})"
                )
                self._write(record, stub, "dlq", omit=True)
                return
            log.error(
                "write to %s failed (%s); offset %s[%d]@%d stays held, retrying in %.1fs",
                topic,
                err,
                record.topic,
                record.partition,
                record.offset,
                backoff,
            )
            asyncio.get_running_loop().call_later(
                backoff, self._write, record, info, tier, min(backoff * 2, _BACKOFF_MAX)
            )

        self._producer.send(topic, record.key, None if omit else record.raw, encoded, done)

    def _log_failure(self, msg: Message, outcome: Failed | DeadLettered, dest: Destination) -> None:
        record = msg._record
        if isinstance(outcome, Failed) and not outcome.counts:
            log.info(
                "caller %s deferred %s[%d]@%d to %s: %s",
                msg.caller,
                record.topic,
                record.partition,
                record.offset,
                dest.tier,
                outcome.error,
                extra={"caller": msg.caller, "topic": record.topic},
            )
            return
        what = outcome.error if isinstance(outcome, Failed) else outcome.reason
        log.error(
            "caller %s failed on %s[%d]@%d (category %s, attempt %d) -> %s: %s: %s\n%s",
            msg.caller,
            record.topic,
            record.partition,
            record.offset,
            msg.category,
            msg.attempt,
            dest.tier,
            outcome.error_type,
            what,
            outcome.traceback.rstrip(),
            extra={
                "caller": msg.caller,
                "category": msg.category,
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "attempt": msg.attempt,
                "next": dest.tier,
            },
        )


def _now_ms() -> int:
    return int(time.time() * 1000)
