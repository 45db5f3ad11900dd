"""Replaying dead-letter records into the fast retry tier, each addressed to one caller.

A replayed record is an ordinary fast-tier record, exactly what ``Pipeline._retry_record``
reads: the dead-letter record's key and payload (the source record's own bytes), and the
failure headers with the caller and category of one subscriber, ``attempt`` 1, no first
failure, ``not-before`` now, and the origin coordinates unchanged. The running dispatcher
decodes it with its origin topic's decoder and delivers it to that caller and no one else;
if it fails again it climbs the retry tiers from the bottom.

Who receives a replayed record:

- a record naming a caller (one subscriber's delivery failed): that caller only, if the
  configuration still has it and its category still takes the message;
- a record naming no caller but a category (its filter failed, stage ``classify``): every
  subscriber of that category whose filter takes it *today*;
- a record naming no caller (rejected at decode or validate, or quarantined after crashes):
  no subscriber ever completed it, so every subscriber whose category takes it *today* gets
  a record of its own, as if the dispatcher had accepted it now. A quarantined message may
  have run partway in some handlers before the crashes; delivery is at-least-once.

A record that could only come back is refused, with the reason: unreadable headers, an
origin topic or caller no longer configured, a payload the topic's decoder still rejects,
a message no category takes any more.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from ..classify import Router
from ..classify.router import FilterError, Route
from ..commit.tracker import PartitionTracker
from ..config import Config
from ..decode import build_decoders
from ..errors import RejectedMessage
from ..message import Record
from . import headers as h
from .dlqread import DeadLetterRecord


@dataclass(frozen=True, slots=True)
class Plan:
    """What replaying one dead-letter record means: its routes, or why it is refused."""

    dead: DeadLetterRecord
    routes: tuple[Route, ...] = ()
    refused: str = ""


class Planner:
    """Decides the routes of dead-letter records against the current configuration."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._decoders = build_decoders(config)
        self._router = Router(config)
        self._callers = {s.caller: s for s in config.subscribers}

    def plan(self, dead: DeadLetterRecord) -> Plan:
        info = dead.info
        if info is None:
            return Plan(dead, refused=dead.problem)
        if info.caller and info.caller not in self._callers:
            known = ", ".join(sorted(self._callers)) or "none"
            return Plan(
                dead,
                refused=f"unknown caller {info.caller!r}: not in this configuration "
                f"(callers: {known})",
            )
        decoder = self._decoders.get(info.origin_topic)
        if decoder is None:
            return Plan(dead, refused=f"origin topic {info.origin_topic!r} is not configured")
        record = _origin_record(dead, info)
        try:
            record.value = decoder(record.raw)
        except RejectedMessage as exc:
            return Plan(dead, refused=f"still rejected at {exc.stage}: {exc.reason}")
        routes, errors = self._router.routes(record)
        if info.caller:
            return self._to_caller(dead, info.caller, routes, errors)
        if info.stage == "classify" and info.category:
            # A filter failed on it: only that category's subscribers missed it.
            failed = set(info.category.split(","))
            routes = [r for r in routes if r.category in failed]
            errors = [e for e in errors if e.category in failed]
        if not routes:
            why = f"; filter errors: {errors[0].error}" if errors else ""
            return Plan(dead, refused=f"no category takes this message of {info.origin_topic}{why}")
        return Plan(dead, tuple(routes))

    def _to_caller(
        self,
        dead: DeadLetterRecord,
        caller: str,
        routes: Iterable[Route],
        errors: list[FilterError],
    ) -> Plan:
        for route in routes:
            if route.caller == caller:
                return Plan(dead, (route,))
        for failed in errors:
            if any(r.caller == caller for r in failed.routes):
                return Plan(dead, refused=f"category {failed.category}: {failed.error}")
        category = self._callers[caller].category
        return Plan(
            dead, refused=f"caller {caller!r}'s category {category!r} no longer takes this message"
        )


def _origin_record(dead: DeadLetterRecord, info: h.FailureInfo) -> Record:
    """The source record as the router sees it: with whatever headers of its own the
    dead-letter record carries besides shunter's."""
    tp = (info.origin_topic, info.origin_partition)
    own = [(k, v) for k, v in dead.record.headers if not k.startswith(h.PREFIX)]
    return Record(
        info.origin_topic,
        info.origin_partition,
        info.origin_offset,
        dead.record.key,
        dead.record.value,  # type: ignore[arg-type]  # None: a tombstone, which decode rejects
        info.origin_timestamp_ms,
        own or None,
        PartitionTracker(tp),
        info.origin_offset,
    )


def replay_headers(info: h.FailureInfo, route: Route, now_ms: int) -> list[tuple[str, bytes]]:
    """The headers of a fast-tier record delivering the message to ``route.caller`` afresh.

    The last failure's stage, error and traceback stay as they were: they say why the
    message was in the dead-letter topic until the next failure replaces them."""
    fresh = replace(
        info,
        caller=route.caller,
        category=route.category,
        attempt=1,
        first_failure_ms=0,  # none yet: the next failure starts the clock again
        not_before_ms=now_ms,
        tier="fast",
        signal="",
    )
    return h.encode(fresh)


@dataclass
class ReplayResult:
    written: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (dead-letter ID, error)
    interrupted: bool = False


def replay(
    settings: dict[str, Any],
    topic: str,
    plans: Iterable[Plan],
    rate: float,
    acked: Callable[[], None] = lambda: None,
) -> ReplayResult:
    """Write one record per route of every plan to ``topic`` (the fast tier), at most
    ``rate`` per second, and wait until the broker acknowledged each; ``acked`` is called
    on each acknowledgement. Idempotent producer, ``acks=all``."""
    producer = Producer(
        {
            **settings,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.timeout.ms": 30_000,
        }
    )
    result = ReplayResult()

    def delivered(dead_id: str) -> Callable[[KafkaError | None, Any], None]:
        def report(err: KafkaError | None, _msg: Any) -> None:
            if err is None:
                result.written += 1
            else:
                result.failed.append((dead_id, str(err)))
            acked()

        return report

    started = time.monotonic()
    sent = 0
    try:
        for plan in plans:
            assert plan.dead.info is not None
            for route in plan.routes:
                while (ahead := started + sent / rate - time.monotonic()) > 0:
                    producer.poll(min(ahead, 0.05))
                headers = replay_headers(plan.dead.info, route, int(time.time() * 1000))
                try:
                    _produce(producer, topic, plan.dead, headers, delivered(str(plan.dead.id)))
                except KafkaException as exc:  # e.g. larger than the producer allows
                    result.failed.append((str(plan.dead.id), str(exc)))
                    acked()
                sent += 1
                producer.poll(0)
    except KeyboardInterrupt:  # stop writing, but wait for what was written
        result.interrupted = True
    left = producer.flush(60)
    if left:
        result.failed.append(("?", f"{left} records not acknowledged within 60s"))
    return result


def _produce(
    producer: Any,
    topic: str,
    dead: DeadLetterRecord,
    headers: list[tuple[str, bytes]],
    report: Callable[[KafkaError | None, Any], None],
) -> None:
    while True:
        try:
            producer.produce(
                topic, dead.record.value, dead.record.key, headers=headers, on_delivery=report
            )
            return
        except BufferError:  # the local queue is full: let acknowledgements drain it
            producer.poll(0.1)
