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

What was replayed is marked twice: each replayed record carries ``shunter-replay-of:
<dead-letter topic>:<partition>:<offset>``, and once every record of a dead-letter record
is acknowledged, a marker keyed ``<partition>:<offset>`` is written to the compacted topic
``<dead-letter topic>.replayed`` (``replayed_topic``). ``dlq replay`` skips the records
marked there unless told ``--again``. A replay interrupted between the acknowledgement and
the marker leaves that one record unmarked: replaying again delivers it again
(at-least-once, never lost).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Producer

from ..broker.admin import ensure_topics
from ..broker.compacted import read_table
from ..classify import Router
from ..classify.router import FilterError, Route
from ..commit.tracker import PartitionTracker
from ..config import Config
from ..decode import build_decoders
from ..errors import RejectedMessage
from ..message import Record
from . import headers as h
from .dlqread import DeadLetterRecord, RecordId

REPLAY_OF = h.PREFIX + "replay-of"  # on a replayed record: <dlq topic>:<partition>:<offset>


def replayed_topic(config: Config) -> str:
    """The compacted topic of replay markers, one per replayed dead-letter record."""
    return f"{config.dlq_topic}.replayed"


@dataclass(frozen=True, slots=True)
class Mark:
    """A dead-letter record already replayed: when, and to whom."""

    replayed_ms: int
    callers: tuple[str, ...]


@dataclass(frozen=True)
class Marking:
    """Where replays are marked, and the marks already there (their callers are kept)."""

    dlq_topic: str
    topic: str
    previous: dict[RecordId, Mark] = field(default_factory=dict)


def unreplayed(plan: Plan, mark: Mark | None) -> Plan | None:
    """The plan without the routes to callers ``mark`` says it was replayed to already;
    None when nothing is left. A refused plan stays as it is."""
    if mark is None or plan.refused:
        return plan
    routes = tuple(r for r in plan.routes if r.caller not in mark.callers)
    return replace(plan, routes=routes) if routes else None


def read_marks(settings: dict[str, Any], topic: str) -> dict[RecordId, Mark]:
    """Every replay marker of ``topic`` (none when the topic does not exist yet)."""
    marks = {}
    for key, value in read_table(settings, topic).items():
        try:
            rid = RecordId.parse(key.decode())
            data = orjson.loads(value)
            marks[rid] = Mark(int(data["replayed_ms"]), tuple(data.get("callers", ())))
        except (ValueError, KeyError, TypeError):
            continue  # not a marker of ours: it marks nothing
    return marks


def ensure_marks_topic(settings: dict[str, Any], topic: str) -> None:
    ensure_topics(settings, {topic: 1}, configs={topic: {"cleanup.policy": "compact"}})


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
        dead.record.value,  # None: a tombstone, which decode rejects
        info.origin_timestamp_ms,
        own or None,
        PartitionTracker(tp),
        info.origin_offset,
    )


def replay_headers(
    info: h.FailureInfo, route: Route, now_ms: int, origin: str = ""
) -> list[tuple[str, bytes]]:
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
    headers = h.encode(fresh)
    if origin:
        headers.append((REPLAY_OF, origin.encode()))
    return headers


@dataclass
class ReplayResult:
    written: int = 0
    marked: int = 0  # dead-letter records whose replay marker was written
    failed: list[tuple[str, str]] = field(default_factory=list)  # (dead-letter ID, error)
    interrupted: bool = False


def replay(
    settings: dict[str, Any],
    topic: str,
    plans: Iterable[Plan],
    rate: float,
    acked: Callable[[], None] = lambda: None,
    marks: Marking | None = None,
) -> ReplayResult:
    """Write one record per route of every plan to ``topic`` (the fast tier), at most
    ``rate`` per second, and wait until the broker acknowledged each; ``acked`` is called
    on each acknowledgement. Idempotent producer, ``acks=all``.

    With ``marks``, each record carries the ``shunter-replay-of`` header, and a plan whose
    records were all acknowledged gets its marker (the callers it was ever replayed to)
    written to the marker topic."""
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

    def marker(plan: Plan) -> None:
        if marks is None:
            return
        before = marks.previous.get(plan.dead.id)
        callers = dict.fromkeys(
            [*(before.callers if before else ()), *(r.caller for r in plan.routes)]
        )
        value = {"replayed_ms": int(time.time() * 1000), "callers": list(callers), "to": topic}

        def report(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                result.failed.append((str(plan.dead.id), f"marker not written: {err}"))
            else:
                result.marked += 1

        producer.produce(
            marks.topic, orjson.dumps(value), str(plan.dead.id).encode(), on_delivery=report
        )

    def delivered(plan: Plan, left: list[int]) -> Callable[[KafkaError | None, Any], None]:
        def report(err: KafkaError | None, _msg: Any) -> None:
            if err is None:
                result.written += 1
                left[0] -= 1
                if left[0] == 0:  # every route of this record acknowledged: mark it
                    marker(plan)
            else:
                left[0] = -1  # never marked: a replay again writes it again
                result.failed.append((str(plan.dead.id), str(err)))
            acked()

        return report

    started = time.monotonic()
    sent = 0
    try:
        for plan in plans:
            assert plan.dead.info is not None
            left = [len(plan.routes)]
            origin = f"{marks.dlq_topic}:{plan.dead.id}" if marks else ""
            for route in plan.routes:
                while (ahead := started + sent / rate - time.monotonic()) > 0:
                    producer.poll(min(ahead, 0.05))
                now = int(time.time() * 1000)
                headers = replay_headers(plan.dead.info, route, now, origin)
                try:
                    _produce(producer, topic, plan.dead, headers, delivered(plan, left))
                except KafkaException as exc:  # e.g. larger than the producer allows
                    left[0] = -1
                    result.failed.append((str(plan.dead.id), str(exc)))
                    acked()
                sent += 1
                producer.poll(0)
    except KeyboardInterrupt:  # stop writing, but wait for what was written
        result.interrupted = True
    left_over = producer.flush(60)
    if left_over:
        result.failed.append(("?", f"{left_over} records not acknowledged within 60s"))
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
