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
from collections.abc import Callable

from confluent_kafka import KafkaError

from ..config import Config
from ..deliver.failure import error_type, format_traceback
from ..errors import RejectedMessage
from ..message import Message, Record
from ..observe.fingerprints import Fingerprint, label
from ..observe.flood import FloodGuard
from ..observe.stats import Stats
from ..outcome import SUCCEEDED, DeadLettered, Failed, Outcome
from . import headers as h
from .producer import ReliableProducer
from .route import Destination, route

log = logging.getLogger("shunter.settle")

_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 30.0
_STUB_ERROR = 512  # characters of the error kept in a dead-letter stub
_STUB_TRACEBACK = 2_048
_FAILED = "caller %s failed on %s[%d]@%d (category %s, attempt %d) -> %s: %s: %s"
# Seconds between two log lines of one failure fingerprint's repeats: a handler failing
# on 1 % of 100,000 messages a second would otherwise log a thousand lines a second. The
# first failure of a fingerprint is logged whole, with its traceback; then one repeat at
# most per interval, and at the end of an interval with repeats not logged, their count.
# Each repeat is counted in /stats and its record carries its own traceback.
REPEAT_LOG_EVERY = 10.0
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
        extra_headers: Callable[[], list[tuple[str, bytes]]] | None = None,
    ) -> None:
        self._config = config
        # Hook (tracing, observe/tracing.py): headers added to every retry/DLQ record.
        self._extra_headers = extra_headers
        self._retry = config.retry
        self._producer = producer
        self._stats = stats
        self._topics = {
            "fast": config.fast_topic,
            "slow": config.slow_topic,
            "dlq": config.dlq_topic,
            "parked": config.parked_topic,
        }
        self._flood = flood
        # Writes the broker refused, being retried: (consumed tp, offset) -> last error.
        self.failing: dict[tuple[tuple[str, int], int], str] = {}
        # Deliveries an operator skipped: (consumed tp, offset, caller or "" for all).
        # A write of theirs being retried is given up: the skip's record stands for it.
        self._abandoned: set[tuple[tuple[str, int], int, str]] = set()
        self.set_aside: Callable[[Message], None] | None = None  # set by the service
        # Per fingerprint (caller, error type, failing line): when its repeats were last
        # logged (monotonic seconds), and how many were not logged since.
        self._repeats: dict[tuple[str, str, str], list[float]] = {}

    def succeeded(self, done: list[Message], seconds: float, slow: list[float]) -> None:
        """Settle successful deliveries of one caller that took ``seconds`` together,
        ``slow`` the times of those beyond the latency histogram's first bucket (the
        runtime's ``SettleMany``)."""
        if not done:
            return
        caller = done[0].caller
        topic = done[0]._record.topic
        one_topic = True
        for msg in done:
            record = msg._record
            left = record.left - 1  # Record.settle_one, inlined: every delivery's path
            record.left = left
            if not left:
                try:
                    record.ptrack.release(record.seq)
                except Exception:  # a bug; the others must still be released
                    log.critical("settling %r failed", msg, exc_info=True)
            if record.topic != topic:
                one_topic = False
        latency = self._stats.latency[caller]
        if not one_topic:  # a caller's run of several topics: each counted by its own
            ok = latency.ok
            for msg in done:
                topic = msg._record.topic
                ok[topic] = ok.get(topic, 0) + 1
        latency.succeeded_many(topic if one_topic else None, len(done), seconds, slow)
        if self._flood is not None:
            self._flood.succeeded(caller, len(done))

    def __call__(
        self, msg: Message, outcome: Outcome, elapsed: float, *, by_handler: bool = True
    ) -> None:
        """Settle one delivery (the runtime's ``Settle`` callback).

        Never raises and never drops: if describing the failure fails (a bug, or a value
        no one foresaw), the delivery is dead-lettered with stage ``internal`` instead,
        and what only counts or logs it (statistics, fingerprints, the flood guard) can
        never keep it from its write. ``by_handler`` False: no handler ran (a retry record
        that cannot be delivered), so the flood guard, which watches what a caller's
        handler dead-letters, does not count it."""
        record = msg._record
        if outcome is SUCCEEDED:
            caller = msg.caller
            self._stats.latency[caller].succeeded(record.topic, elapsed)
            if self._flood is not None:
                self._flood.succeeded(caller, 1)
            record.settle_one()
            return
        try:
            assert isinstance(outcome, Failed | DeadLettered)
            dest = route(self._retry, msg.attempt, outcome)
            info = self._info(msg, outcome, dest)
        except Exception as exc:
            dest = Destination("dlq", msg.attempt, 0.0)
            info = self._internal_info(msg, exc)
            outcome = DeadLettered(info.error, info.error_type, info.traceback, "internal")
        try:
            self._stats.failed(record.topic, msg.caller, elapsed, dest.tier)
            # A failure seen before (same caller, error type and failing line: a
            # fingerprint, observe/fingerprints.py) is counted and logged in one line, its
            # traceback not repeated: the night's log was thousands of identical crashes.
            group = self._stats.fingerprints.observe(msg.caller, outcome, record)
            if group is None or group.count == 1:  # a deferral, or a new fingerprint
                self._log_failure(msg, outcome, dest)
            elif (unlogged := self._repeat_unlogged(group)) is not None:
                self._log_failure(msg, outcome, dest, new=False, unlogged=unlogged)
            if self._flood is not None and by_handler:
                self._flood.observe(msg.caller, dest.tier == "dlq")
        except Exception:  # a bug: the delivery is written all the same
            log.critical("counting the failure of %r failed; it is written", msg, exc_info=True)
        try:
            self._write(record, info, dest.tier)
        except Exception as exc:  # a bug, or headers no one foresaw: dead-lettered instead
            self._internal_write(msg, exc)

    def _internal_write(self, msg: Message, exc: Exception) -> None:
        """The write of a failure raised (a bug, or headers no one foresaw): a dead-letter
        stub instead, which carries none of what the record brought (its key, payload and
        own headers), only shunter's headers naming it, so cannot fail the same way."""
        info = self._internal_info(msg, exc)
        self._write(msg._record, info, "dlq", stub=True)

    def park(self, msg: Message, reason: str = "") -> None:
        """A paused caller's delivery: handed to ``set_aside`` (``CallerPauses.set_aside``,
        which writes it once to the parked topic). ``reason`` is unused (kept for callers
        written before the parked topic)."""
        assert self.set_aside is not None, "the service sets Settler.set_aside"
        self.set_aside(msg)

    def requeue(self, record: Record, info: h.FailureInfo) -> None:
        """A retry due far later than its tier's delay: written again at the back of the
        slow tier with its headers as they were (same due time, same attempt), stamped
        with the time of this write (``shunter-requeued-ms``)."""
        self._write(
            record, dataclasses.replace(info, tier="slow", requeued_ms=_now_ms()), "slow"
        )

    def write_parked(self, msg: Message, info: h.FailureInfo) -> None:
        """Write a paused caller's delivery to the parked topic, unrun; its share of the
        offset is released when the broker acknowledged the record."""
        self._stats.parked(msg._record.topic, msg.caller)
        self._write(msg._record, info, "parked")

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
        self.unrun(record, exc.stage, "RejectedMessage", exc.reason)

    def quarantine(self, record: Record, reason: str, signal: str = "", stack: str = "") -> None:
        """A record suspected of killing the process: to the dead-letter topic, unrun,
        with the dying thread's stack when it is known (the failing line travels)."""
        self._stats.rejected(record.topic, "crash")
        self.unrun(record, "crash", "crash", reason, traceback=stack, signal=signal)

    def filter_failed(self, record: Record, categories: list[str], error: str) -> None:
        """A category filter failed on the record: once to the dead-letter topic, naming
        the categories whose subscribers did not get it (a replay classifies it again)."""
        self._stats.rejected(record.topic, "classify")
        self.unrun(record, "classify", "FilterError", error, category=",".join(categories))

    def internal(self, record: Record, exc: BaseException, caller: str = "", category: str = "",
                 attempt: int = 1) -> None:
        """shunter's own path failed on this record: to the dead-letter topic with the
        traceback (stage ``internal``), so nothing is dropped for a bug of ours."""
        self._stats.rejected(record.topic, "internal")
        self.unrun(
            record,
            "internal",
            error_type(exc),
            _describe(exc),
            traceback=format_traceback(exc),
            caller=caller,
            category=category,
            attempt=attempt,
        )

    def unrun(
        self,
        record: Record,
        stage: str,
        error_type: str,
        error: str,
        *,
        traceback: str = "",
        signal: str = "",
        caller: str = "",
        category: str = "",
        attempt: int = 1,
    ) -> None:
        """A record (or one caller's delivery of it) that no handler completed: once to
        the dead-letter topic. Its offset share is released when the broker has it."""
        info = _dead_info(
            record, stage, error_type, error, traceback, signal, caller, category, attempt
        )
        self._write(record, info, "dlq")

    # -- internals ------------------------------------------------------------------------

    def _internal_info(self, msg: Message, exc: Exception) -> h.FailureInfo:
        log.critical("settling %r failed (a bug in shunter); dead-lettered", msg, exc_info=True)
        return _dead_info(
            msg._record,
            "internal",
            error_type(exc),
            _describe(exc),
            format_traceback(exc),
            "",
            msg.caller,
            msg.category,
            msg.attempt,
        )

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
        backoff: float = _BACKOFF_FIRST,
        stub: bool = False,
    ) -> None:
        """Write until the broker acknowledges, then release the delivery's share.

        A refusal is written again after a doubling backoff (counted, logged). A record
        too large for its topic becomes a dead-letter *stub*: no payload, no key, none of
        the record's own headers, the error cut short: a few kilobytes that fit any topic,
        naming the origin, where the full record still is."""
        topic = self._topics[tier]
        encoded: list[tuple[str, bytes | None]]
        if stub:
            encoded = [*h.encode(info), (h.PAYLOAD_OMITTED, str(len(record.raw or b"")).encode())]
            key, value = None, None
        else:
            # shunter's headers, then the record's own (a handler sees them on every attempt)
            encoded = [*h.encode(info)]
            encoded += [(k, v) for k, v in record.headers or [] if not k.startswith(h.PREFIX)]
            key, value = record.key, record.raw
        if self._extra_headers is not None:  # hook: the failed delivery's trace context
            try:
                encoded += self._extra_headers()
            except Exception:  # a bug in the hook: the record goes without them
                log.critical("adding headers to a record for %s failed", topic, exc_info=True)

        def done(err: KafkaError | None) -> None:
            if err is None:
                self._stats.written(tier)
                if self.failing:
                    self.failing.pop((record.ptrack.tp, record.seq), None)
                record.settle_one()
                return
            self._stats.write_failed(tier)
            self.failing[(record.ptrack.tp, record.seq)] = f"write to {topic}: {err}"
            if err.code() in _TOO_LARGE and not stub:
                log.error(
                    "%s[%d]@%d is too large for %s (%s); dead-lettered without its payload",
                    record.topic,
                    record.partition,
                    record.offset,
                    topic,
                    err,
                )
                cut = dataclasses.replace(
                    info,
                    tier="dlq",
                    error=f"{info.error[:_STUB_ERROR]} (record too large to keep: {err})",
                    traceback=info.traceback[-_STUB_TRACEBACK:],
                )
                self._write(record, cut, "dlq", stub=True)
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
                backoff, self._rewrite, record, info, tier, min(backoff * 2, _BACKOFF_MAX), stub
            )

        self._producer.send(topic, key, value, encoded, done)

    def _rewrite(
        self, record: Record, info: h.FailureInfo, tier: str, backoff: float, stub: bool
    ) -> None:
        tp, seq = record.ptrack.tp, record.seq
        if self._abandoned and (
            (tp, seq, "") in self._abandoned or (tp, seq, info.caller) in self._abandoned
        ):
            log.warning(
                "%s[%d]@%d was skipped by an operator: its write to %s is given up",
                *tp,
                seq,
                self._topics[tier],
            )
            self.failing.pop((tp, seq), None)
            record.settle_one()
            return
        self._write(record, info, tier, backoff, stub)

    def abandon(self, tp: tuple[str, int], offset: int, caller: str = "") -> bool:
        """Give up the retried writes of a skipped record (of one caller, or ""); True
        when one of the record's writes is failing now."""
        self._abandoned.add((tp, offset, caller))
        return (tp, offset) in self.failing

    def _repeat_unlogged(self, group: Fingerprint) -> int | None:
        """None when this repeat of ``group`` is only counted; else it is logged, and this
        is how many were not since the last line: a repeat is logged at most once per
        REPEAT_LOG_EVERY seconds."""
        key = (group.caller, group.error_type, group.line)
        now = time.monotonic()
        seen = self._repeats.get(key)
        if seen is not None and now - seen[0] < REPEAT_LOG_EVERY:
            seen[1] += 1
            if seen[1] == 1:  # said when the interval is over, even if no repeat follows
                asyncio.get_running_loop().call_later(
                    seen[0] + REPEAT_LOG_EVERY - now, self._say_repeats, key
                )
            return None
        self._repeats[key] = [now, 0.0]
        return 0 if seen is None else int(seen[1])

    def _say_repeats(self, key: tuple[str, str, str]) -> None:
        seen = self._repeats.get(key)
        if seen is not None and seen[1]:
            self._say_unlogged(key, int(seen[1]))
            self._repeats[key] = [time.monotonic(), 0.0]

    def _say_unlogged(self, key: tuple[str, str, str], unlogged: int) -> None:
        caller, kind, line = key
        log.warning(
            "caller %s failed %d more times with %s since its last line (counted in /stats)",
            caller,
            unlogged,
            label(kind, line),
            extra={"caller": caller, "failures": unlogged},
        )

    def flush_repeats(self) -> None:
        """Log the repeats counted but not logged yet (at shutdown)."""
        for key, (_, unlogged) in self._repeats.items():
            if unlogged:
                self._say_unlogged(key, int(unlogged))
        self._repeats.clear()

    def _log_failure(
        self,
        msg: Message,
        outcome: Failed | DeadLettered,
        dest: Destination,
        new: bool = True,
        unlogged: int = 0,
    ) -> None:
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
        if len(what) > h.MAX_ERROR:  # a 10 MB message is a log line, not a log file
            what = what[: h.MAX_ERROR] + f"... ({len(what) - h.MAX_ERROR} more characters)"
        args = (
            msg.caller,
            record.topic,
            record.partition,
            record.offset,
            msg.category,
            msg.attempt,
            dest.tier,
            outcome.error_type,
            what,
        )
        extra = {
            "caller": msg.caller,
            "category": msg.category,
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "attempt": msg.attempt,
            "next": dest.tier,
        }
        if not new:
            more = f", {unlogged} more like it since its last line" if unlogged else ""
            log.warning(
                _FAILED + " (a repeat of a known failure%s: its traceback is in the first "
                "report and its count in /stats)",
                *args,
                more,
                extra={**extra, "failures": 1 + unlogged},
            )
            return
        log.error(_FAILED + "\n%s", *args, outcome.traceback.rstrip(), extra=extra)


def _dead_info(
    record: Record,
    stage: str,
    error_type: str,
    error: str,
    traceback: str,
    signal: str,
    caller: str,
    category: str,
    attempt: int,
) -> h.FailureInfo:
    """The headers of a dead-letter record written for ``record`` now."""
    now = _now_ms()
    return h.FailureInfo(
        caller=caller,
        category=category,
        attempt=attempt,
        stage=stage,
        error_type=error_type,
        error=error,
        traceback=traceback,
        first_failure_ms=record.first_failure or now,
        not_before_ms=now,
        origin_topic=record.topic,
        origin_partition=record.partition,
        origin_offset=record.offset,
        origin_timestamp_ms=record.timestamp,
        tier="dlq",
        origin_key=record.key,
        signal=signal,
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


def _describe(exc: BaseException) -> str:
    try:
        return f"{exc}" or type(exc).__name__
    except Exception:  # an exception that cannot be printed still names its type
        return type(exc).__name__
