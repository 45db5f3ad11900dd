"""Poison anything (issue 10): hypothesis plays a hostile producer and a careless handler
author at once, and the dispatcher must account for every record.

Each generated example is a batch of records produced through librdkafka (``rawkafka``)
to a JSON topic and a raw topic: keys null, empty, binary or near the 1 MB limit; header
names not UTF-8, empty, duplicated, spoofing shunter's own, hundreds of them; header
values null, empty, binary; values valid JSON, hostile (R4's generator), huge, binary,
empty, tombstones; timestamps 0, -1, negative, far future. A header ``poison-case``
(when present) tells the handlers how to misbehave: raise any exception type (BaseException
subclasses included), return odd values (a generator, a coroutine, an awaitable whose
``__await__`` is broken), hang past the timeout, raise ``RetryLater`` with huge, negative,
NaN or non-number delays, or ``DeadLetter`` with non-text or 10 MB reasons, on the first
attempt or on every attempt.

A dispatcher (admin API on a free loopback port, retries fast 0.2 s x1 and slow 0.5 s x1,
``kafka.stall_after`` 5 s) runs each batch; the audit reads only receipts, the retry
tiers, the dead-letter topic and the group's committed offsets:

- every (record, subscriber of its categories) pair ends delivered, in the dead-letter
  topic (for that caller or for none), or waiting in a retry tier for a far not-before
  time; a record no category takes reaches nobody; a record rejected or dead-lettered as
  internal reaches no handler;
- the group commits every source partition to its end;
- sampled while running, the committed offset never passes a record whose settlement had
  not yet happened (a receipt, a retry-tier or a dead-letter record, each stamped);
- `/ready` was not 200 while a source partition was visibly stuck past ``stall_after``,
  and is 200 at the end.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from poisontools import ReadyProbe, committed, ends_of, free_port, origin, read_topic
from rawkafka import RawRecord, ReadRecord, produce_raw
from reliability.r4_hostile import BAD_UTF8, HOSTILE

import shunter
from kafkatools import Broker, config
from shunter.broker.admin import ensure_topics
from shunter.settle import headers as h
from shunter.testing import DispatcherThread

pytestmark = pytest.mark.kafka

EXAMPLES = int(os.environ.get("SHUNTER_POISON_EXAMPLES", "5"))  # plus one explicit
STALL_AFTER = 5.0
CASE = "poison-case"
FAR_FUTURE = 4_102_444_800_000
TOPIC_LIMITS = {"message.timestamp.after.max.ms": str(2**63 - 1)}
CALLERS = ("s", "x", "h", "m")  # all: s (sync), x (async); hdr: h; amt: m (sync)


# -- what a handler does ------------------------------------------------------------------


class BrokenStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ of this exception is broken")


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("this reason cannot be printed")

    __repr__ = __str__


class CustomBase(BaseException):
    """Not an Exception: a careless author's own 'stop everything' signal."""


class AwaitRaises:
    def __await__(self) -> Any:
        raise RuntimeError("__await__ is broken")


class AwaitNotIterator:
    def __await__(self) -> Any:
        return 5


class AwaitBadYield:
    def __await__(self) -> Any:
        yield 42


BROKEN_AWAITABLES = (AwaitRaises, AwaitNotIterator, AwaitBadYield)


def _gen() -> Any:
    yield 1


BIG = "x" * 10_000_000

EXCEPTIONS: dict[str, Callable[[], BaseException]] = {
    "ValueError": lambda: ValueError("bad value"),
    "KeyError": lambda: KeyError("anchor_level"),
    "BrokenStr": BrokenStr,
    "10MB-message": lambda: RuntimeError(BIG),
    "bytes-args": lambda: ValueError(b"\xff\xfe", None, object()),
    "SystemExit": lambda: SystemExit(3),
    "KeyboardInterrupt": KeyboardInterrupt,
    "GeneratorExit": GeneratorExit,
    "CustomBase": CustomBase,
    "CancelledError": asyncio.CancelledError,
    "RecursionError": lambda: RecursionError("maximum recursion depth exceeded"),
    "StopIteration": StopIteration,
    "MemoryError": MemoryError,
}
DELAYS: dict[str, Any] = {
    "1e308": 1e308,
    "inf": math.inf,
    "-1": -1,
    "nan": math.nan,
    "0": 0,
    "0.05": 0.05,
    "soon": "soon",
    "10**400": 10**400,
    "None": None,
}
REASONS: dict[str, Any] = {
    "10MB": BIG,
    "int": 123,
    "None": None,
    "bytes": b"\xff",
    "str-broken": Unprintable(),
}


@dataclass(frozen=True)
class Behaviour:
    """What the handlers do with a record: on the first attempt only, or on every one.

    ``final``: what the audit expects of a pair that ran it: "ok" (delivered), "dlq"
    (dead-lettered for that caller), "pending" (in a retry tier for days), "any"."""

    name: str
    act: Callable[[shunter.Message, bool], Any]  # (msg, is_async) -> return value
    every_attempt: bool = False
    final: str = "ok"


def _raise(make: Callable[[], BaseException]) -> Callable[[shunter.Message, bool], Any]:
    def act(msg: shunter.Message, is_async: bool) -> Any:
        raise make()

    return act


def _retry_later(delay: Any) -> Callable[[shunter.Message, bool], Any]:
    def act(msg: shunter.Message, is_async: bool) -> Any:
        raise shunter.RetryLater(delay=delay)

    return act


def _dead_letter(reason: Any) -> Callable[[shunter.Message, bool], Any]:
    def act(msg: shunter.Message, is_async: bool) -> Any:
        raise shunter.DeadLetter(reason)

    return act


def _returns(value: Callable[[bool], Any]) -> Callable[[shunter.Message, bool], Any]:
    return lambda msg, is_async: value(is_async)


BEHAVIOURS: list[Behaviour] = [
    Behaviour("ok", _returns(lambda a: None)),
    Behaviour("returns a generator", _returns(lambda a: _gen())),
    Behaviour("returns 42", _returns(lambda a: 42)),
    # a sync handler returning a coroutine: shunter awaits it (an async one's own
    # return value is never awaited by anybody, so it returns a plain value)
    Behaviour("returns a coroutine", _returns(lambda a: 7 if a else asyncio.sleep(0))),
    Behaviour("__await__ raises", _returns(lambda a: None if a else AwaitRaises())),
    Behaviour("__await__ not an iterator", _returns(lambda a: None if a else AwaitNotIterator())),
    Behaviour("__await__ yields 42", _returns(lambda a: None if a else AwaitBadYield())),
    Behaviour("hangs past the timeout", _returns(lambda a: "hang")),
    *(Behaviour(f"raises {n} once", _raise(e)) for n, e in EXCEPTIONS.items()),
    *(Behaviour(f"raises {n} always", _raise(e), True, "dlq") for n, e in EXCEPTIONS.items()),
    *(
        Behaviour(
            f"RetryLater({n})",
            _retry_later(d),
            final="pending" if n in ("1e308", "inf", "10**400") else "ok",
        )
        for n, d in DELAYS.items()
    ),
    *(Behaviour(f"DeadLetter({n})", _dead_letter(r), True, "dlq") for n, r in REASONS.items()),
]
BY_NAME = {b.name: i for i, b in enumerate(BEHAVIOURS)}
# To look past a known hole: SHUNTER_POISON_EXCLUDE names behaviours never drawn
# ("raises BrokenStr always,..."), SHUNTER_POISON_TAME producer hostilities left out
# (bad-names: header names not UTF-8; null-values: null header values; huge-keys).
EXCLUDED = {n for n in os.environ.get("SHUNTER_POISON_EXCLUDE", "").split(",") if n}
TAME = {n for n in os.environ.get("SHUNTER_POISON_TAME", "").split(",") if n}


def behaviour_of(msg: shunter.Message) -> Behaviour:
    for name, value in msg.headers:
        if name in (CASE, CASE.encode()) and value is not None:
            try:
                return BEHAVIOURS[int(value)]
            except (ValueError, IndexError):
                break
    return BEHAVIOURS[0]


@dataclass(frozen=True)
class Receipt:
    caller: str
    topic: str
    partition: int
    offset: int
    attempt: int
    clean: bool  # returned normally with a value shunter must take as success
    at: float  # time.time() just before returning


class Handlers:
    """The four subscribers' handlers; every delivery leaves a receipt."""

    def __init__(self) -> None:
        self.receipts: list[Receipt] = []
        self.invoked: Counter[tuple[str, str, int, int]] = Counter()
        self._lock = threading.Lock()

    def _run(self, caller: str, msg: shunter.Message, is_async: bool) -> Any:
        with self._lock:
            self.invoked[(caller, msg.topic, msg.partition, msg.offset)] += 1
        behaviour = behaviour_of(msg)
        if msg.attempt == 1 or behaviour.every_attempt:
            return behaviour.act(msg, is_async)
        return None

    def _receipt(self, caller: str, msg: shunter.Message, clean: bool) -> None:
        with self._lock:
            self.receipts.append(
                Receipt(
                    caller, msg.topic, msg.partition, msg.offset, msg.attempt, clean, time.time()
                )
            )

    def sync(self, caller: str) -> Callable[[shunter.Message], Any]:
        def handle(msg: shunter.Message) -> Any:
            result = self._run(caller, msg, False)
            if isinstance(result, str) and result == "hang":
                result = None  # a sync handler cannot hang without blocking the loop
            self._receipt(caller, msg, not isinstance(result, BROKEN_AWAITABLES))
            return result

        return handle

    def asynchronous(self, caller: str) -> Callable[[shunter.Message], Any]:
        async def handle(msg: shunter.Message) -> Any:
            result = self._run(caller, msg, True)
            hang = isinstance(result, str) and result == "hang"
            self._receipt(caller, msg, not hang)
            if hang:
                await asyncio.sleep(30)  # cancelled at the 1 s timeout
            return result

        return handle


# -- what a hostile producer writes ---------------------------------------------------------


class Spec:
    """One generated record, small to print: big byte strings are (size, seed) specs.
    (A plain class: hypothesis prints a dataclass field by field, hostile bytes in full.)"""

    __slots__ = ("case", "headers", "key", "many_headers", "timestamp", "topic", "value")

    def __init__(
        self,
        topic: str,  # "json" | "raw"
        key: tuple[str, int, int] | None,  # None, or (kind, size, seed)
        headers: tuple[tuple[bytes, bytes | None], ...],
        many_headers: int,  # extra small headers appended
        value: tuple[str, Any],  # (kind, data)
        timestamp: int,
        case: int | None,  # index into BEHAVIOURS, carried in the poison-case header
    ) -> None:
        self.topic = topic
        self.key = key
        self.headers = headers
        self.many_headers = many_headers
        self.value = value
        self.timestamp = timestamp
        self.case = case

    def __repr__(self) -> str:
        case = BEHAVIOURS[self.case].name if self.case is not None else "-"
        return (
            f"Spec({self.topic}, key={self.key}, headers={self.headers!r:.120}, "
            f"+{self.many_headers}, value={str(self.value)[:80]}, ts={self.timestamp}, "
            f"case={case!r})"
        )


def _bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def materialize(spec: Spec) -> RawRecord:
    key = None if spec.key is None else _bytes(spec.key[1], spec.key[2])
    headers: list[tuple[bytes, bytes | None]] = list(spec.headers)
    headers += [(f"n{i % 7}".encode(), str(i).encode()) for i in range(spec.many_headers)]
    if spec.case is not None:
        at = len(spec.headers) // 2
        headers.insert(at, (CASE.encode(), str(spec.case).encode()))
    kind, data = spec.value
    value: bytes | None
    if kind == "tombstone":
        value = None
    elif kind == "json":
        try:
            value = orjson.dumps(data)
        except TypeError:  # an integer past 64 bits: the standard library writes it
            value = json.dumps(data).encode()
    elif kind == "big":
        value = orjson.dumps({"amount": 11, "blob": "y" * data})
    elif kind == "binary":
        value = _bytes(*data)
    else:  # "hostile", "empty"
        value = data
    return RawRecord(value, key, headers, spec.timestamp)


_header_name = st.one_of(
    st.text(st.characters(codec="ascii", exclude_characters="\x00"), max_size=12).map(str.encode),
    st.just(b""),
    st.sampled_from(BAD_UTF8),
    st.sampled_from(
        [
            b"n0",
            b"dup",
            b"dup",
            h.CALLER.encode(),
            h.ORIGIN_OFFSET.encode(),
            b"trace\x00tail",
            b"poison-cas\x00e",
        ]
    ),
    st.binary(min_size=1, max_size=8),
)
_header_value = st.one_of(
    st.none(), st.just(b""), st.binary(max_size=32), st.text(max_size=16).map(str.encode)
)
_amount = st.one_of(
    st.integers(-100, 100),
    st.floats(-1e6, 1e6, allow_nan=False),
    st.text(max_size=4),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)
_value = st.one_of(
    st.fixed_dictionaries({"amount": _amount}).map(lambda v: ("json", v)),
    st.fixed_dictionaries({"n": st.integers()}).map(lambda v: ("json", v)),
    st.one_of(st.lists(st.integers(), max_size=3), st.text(max_size=5), st.integers()).map(
        lambda v: ("json", v)
    ),
    HOSTILE.map(lambda named: ("hostile", named[1])),
    st.just(("tombstone", None)),
    st.just(("empty", b"")),
    st.tuples(st.integers(1, 4096), st.integers(0, 2**32)).map(lambda t: ("binary", t)),
    st.integers(100_000, 400_000).map(lambda n: ("big", n)),
)
_key = st.one_of(
    st.none(),
    st.just(("empty", 0, 0)),
    st.tuples(st.just("binary"), st.integers(1, 64), st.integers(0, 2**32)),
    st.tuples(st.just("huge"), st.integers(500_000, 900_000), st.integers(0, 2**32)),
)
_timestamp = st.one_of(
    st.just(0), st.just(-1), st.just(1), st.just(FAR_FUTURE), st.integers(-(2**40), 2**45)
)
_case = st.one_of(
    st.none(), st.sampled_from([i for i, b in enumerate(BEHAVIOURS) if b.name not in EXCLUDED])
)


# Bytes of key and value a record may carry: librdkafka refuses, before sending, a record
# whose key + value + headers exceed ``message.max.bytes`` (1,000,000 here); headers take
# at most 600 * 10 + 6 * 50 bytes of the rest.
RECORD_BUDGET = 1_000_000 - 16_384


def _size(part: tuple[object, ...] | None) -> int:
    """Bytes a drawn key or value materializes to (an upper bound for JSON documents)."""
    if part is None:
        return 0
    kind, data = part[0], part[1]
    if kind in ("huge", "binary") and isinstance(data, int):
        return data  # a key: (kind, size, seed)
    if kind == "binary" and isinstance(data, tuple):
        return int(data[0])
    if kind == "big" and isinstance(data, int):
        return data + 64
    if kind in ("hostile", "empty") and isinstance(data, bytes):
        return len(data)
    return 4_096 if kind == "json" else 0


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    key = draw(_key)
    if "huge-keys" in TAME and key is not None and key[0] == "huge":
        key = None
    value = draw(_value)
    headers = draw(st.lists(st.tuples(_header_name, _header_value), max_size=6))
    if "bad-names" in TAME:
        headers = [(n, v) for n, v in headers if utf8(n.split(b"\x00")[0])]
    if "null-values" in TAME:
        headers = [(n, b"" if v is None else v) for n, v in headers]
    if _size(key) + _size(value) > RECORD_BUDGET:
        value = ("json", {"amount": 12})  # keep the record under the 1 MB default
    return Spec(
        topic=draw(st.sampled_from(["json", "raw"])),
        key=key,
        headers=tuple(headers),
        many_headers=draw(st.one_of(st.just(0), st.just(0), st.integers(100, 600))),
        value=value,
        timestamp=draw(_timestamp),
        case=draw(_case),
    )


# Every behaviour once, and each producer hostility once, in every run (hypothesis's
# explicit example), whatever the random draws cover.
EVERY_CASE = [
    Spec("raw", ("binary", 8, i), (), 0, ("json", {"amount": 20}), 0, i)
    for i in range(len(BEHAVIOURS))
    if BEHAVIOURS[i].name not in EXCLUDED
] + [
    spec
    for tame, spec in [
        (
            "bad-names",
            Spec("json", None, ((b"\xff\xfe", b"1"),), 0, ("json", {"amount": 20}), 0, None),
        ),
        (
            "null-values",
            Spec("json", None, ((b"trace", None),), 0, ("json", {"amount": 20}), 0, None),
        ),
        ("huge-keys", Spec("json", ("huge", 600_000, 1), (), 0, ("json", {"user": "u"}), 0, None)),
        ("", Spec("raw", None, (), 1000, ("tombstone", None), -1, None)),
        ("", Spec("json", ("empty", 0, 0), (), 0, ("hostile", b'{"amount": 1'), FAR_FUTURE, None)),
    ]
    if tame not in TAME
]

BATCH = st.lists(specs(), min_size=15, max_size=45).filter(
    lambda b: sum(1 for s in b if s.key and s.key[0] == "huge") <= 2
)


# -- the oracle: where each record must go ------------------------------------------------


def visible_names(record: RawRecord) -> list[bytes]:
    """Header names as a librdkafka consumer hands them over (cut at a NUL byte)."""
    return [(n.encode() if isinstance(n, str) else n).split(b"\x00")[0] for n, _ in record.headers]


def utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclass
class Expect:
    """What must become of one produced record (see module docstring)."""

    topic: str
    partition: int
    offset: int
    callers: set[str]  # subscribers it must reach (or be dead-lettered for)
    maybe: set[str]  # subscribers whose filter outcome the oracle leaves open
    never: set[str]  # subscribers it must not reach
    rejected: str  # "" | "decode" | "internal": dead-lettered for no caller, run by nobody
    amt_errors: bool  # the `amt` filter must fail on it (a classify dead letter)
    behaviour: Behaviour
    may_reject: bool = False  # JSON to orjson, but shunter may refuse it (depth, numbers)
    spec: Spec | None = None


def expect(spec: Spec, record: RawRecord, topic: str, where: tuple[int, int]) -> Expect:
    behaviour = BEHAVIOURS[spec.case] if spec.case is not None else BEHAVIOURS[0]
    base = Expect(topic, *where, set(), set(), set(CALLERS), "", False, behaviour, spec=spec)
    if not all(utf8(n) for n in visible_names(record)):
        base.rejected = "internal"
        return base
    if record.value is None:
        base.rejected = "decode"
        return base
    value: Any = record.value
    if spec.topic == "json":
        try:
            value = orjson.loads(record.value)
        except orjson.JSONDecodeError:
            base.rejected = "decode"
            return base
    base.callers = {"s", "x"}
    if spec.topic == "raw":
        if CASE.encode() in visible_names(record):
            base.callers.add("h")
    else:
        outcome = _amount_filter(value)
        if outcome is True:
            base.callers.add("m")
        elif outcome is None:
            base.maybe.add("m")
        elif outcome == "error":
            base.amt_errors = True
    base.never = set(CALLERS) - base.callers - base.maybe
    base.may_reject = spec.topic == "json" and spec.value[0] == "hostile"
    return base


def _amount_filter(value: Any) -> bool | str | None:
    """``value.amount > 10`` as CEL judges it: True/False, "error", or None (not sure)."""
    if not isinstance(value, dict):
        return "error"
    if "amount" not in value:
        return "error"
    amount = value["amount"]
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        return "error"
    if isinstance(amount, int) and abs(amount) > 2**53:
        return None
    return amount > 10


# -- the audit ----------------------------------------------------------------------------


@dataclass
class Evidence:
    """Everything read back after a run, by origin (topic, partition, offset)."""

    dead: dict[tuple[str, int, int], list[ReadRecord]] = field(default_factory=dict)
    retried: dict[tuple[str, int, int], list[ReadRecord]] = field(default_factory=dict)
    receipts: list[Receipt] = field(default_factory=list)
    # the group's committed offsets on the retry tiers: a record waiting there must not
    # have been committed past
    retry_committed: dict[tuple[str, int], int] = field(default_factory=dict)


def gather(broker: Broker, app: shunter.Dispatcher, handlers: Handlers) -> Evidence:
    cfg = app.config
    ev = Evidence(receipts=list(handlers.receipts))
    for record in read_topic(broker, cfg.dlq_topic):
        where = origin(record)
        if where is not None:
            ev.dead.setdefault(where, []).append(record)
    for topic in (cfg.fast_topic, cfg.slow_topic):
        for record in read_topic(broker, topic):
            where = origin(record)
            if where is not None:
                ev.retried.setdefault(where, []).append(record)
        n = cfg.retry.partitions
        for p, offset in committed(broker, cfg.kafka.group_id, topic, n).items():
            ev.retry_committed[(topic, p)] = offset
    return ev


def audit(expects: list[Expect], ev: Evidence, now_ms: float) -> list[str]:
    """Every broken promise, one line each (empty: all accounted for)."""
    problems: list[str] = []
    receipts: dict[tuple[str, str, int, int], list[Receipt]] = {}
    for r in ev.receipts:
        receipts.setdefault((r.caller, r.topic, r.partition, r.offset), []).append(r)
    for e in expects:
        where = (e.topic, e.partition, e.offset)
        name = f"{e.topic}[{e.partition}]@{e.offset} ({e.behaviour.name}; {e.spec!r:.160})"
        dead = ev.dead.get(where, [])
        dead_callers = Counter(d.text(h.CALLER) or "" for d in dead)
        reached = {c for c in CALLERS if (c, *where) in receipts}
        if e.rejected:
            if dead_callers[""] != 1:
                problems.append(
                    f"{name}: rejected ({e.rejected}) but dead-lettered "
                    f"{dict(dead_callers)} times, not once for no caller"
                )
            elif e.rejected == "internal" and dead[0].text(h.STAGE) != "internal":
                problems.append(
                    f"{name}: header name not UTF-8, stage "
                    f"{dead[0].text(h.STAGE)!r}, not 'internal'"
                )
            if reached:
                problems.append(f"{name}: rejected ({e.rejected}) yet reached {sorted(reached)}")
            continue
        refused = any((d.text(h.STAGE) in ("decode", "validate")) for d in dead)
        if refused and reached:
            problems.append(f"{name}: rejected at decode yet reached {sorted(reached)}")
        if refused:
            if not e.may_reject:
                problems.append(f"{name}: valid, yet rejected at decode")
            continue
        if e.behaviour.name == "ok" and not refused:
            for d in dead:
                if d.text(h.STAGE) == "classify" and (e.amt_errors or "m" in e.maybe):
                    continue
                problems.append(
                    f"{name}: a well-behaved delivery was dead-lettered "
                    f"({d.text(h.STAGE)}: {d.text(h.ERROR_TYPE)}: {d.text(h.ERROR)})"
                )
        if e.amt_errors:
            classify = [d for d in dead if d.text(h.STAGE) == "classify"]
            if not classify:
                problems.append(f"{name}: the amt filter fails on it, yet no classify dead letter")
            if "m" in reached:
                problems.append(f"{name}: the amt filter fails on it, yet m received it")
        for caller in sorted(set(CALLERS) - e.callers - e.maybe):
            if caller in reached:
                problems.append(f"{name}: reached {caller}, which its categories exclude")
        for caller in sorted(e.callers | (e.maybe & reached)):
            got = receipts.get((caller, *where), [])
            delivered = any(r.clean for r in got)
            dead_for = dead_callers[caller] + dead_callers[""]
            waiting = [
                r
                for r in ev.retried.get(where, [])
                if r.text(h.CALLER) == caller and int(r.text(h.NOT_BEFORE) or 0) > now_ms + 60_000
            ]
            pending = [
                r for r in waiting if ev.retry_committed.get((r.topic, r.partition), -1) <= r.offset
            ]
            # A retry due in days is written again at the back of the slow tier now and
            # then (its older copies committed past): lost only if no copy still waits.
            if waiting and not pending:
                r = waiting[-1]
                problems.append(
                    f"{name}: {caller}: its retry record {r.topic}[{r.partition}]@{r.offset}"
                    f" (not due for days) and every copy of it were committed past: lost "
                    "from the retry tiers"
                )
            if not (delivered or dead_for or pending):
                problems.append(
                    f"{name}: {caller} unaccounted for: {len(got)} runs, none clean; not in "
                    f"the dead-letter topic; not waiting in a retry tier"
                )
                continue
            final = e.behaviour.final
            if final == "dlq" and not dead_for:
                problems.append(f"{name}: {caller} fails on every attempt, yet not dead-lettered")
            if final == "ok" and dead_for and not delivered:
                problems.append(
                    f"{name}: {caller} should have succeeded on a retry, but was "
                    f"dead-lettered: {[d.text(h.ERROR) for d in dead][:1]}"
                )
            if final == "pending" and not (pending or delivered or dead_for):
                problems.append(f"{name}: {caller}: RetryLater with a huge delay is nowhere")
        if len(dead) > len(CALLERS):
            problems.append(f"{name}: {len(dead)} dead letters")
    return problems


def _written(record: ReadRecord) -> float:
    """When shunter wrote a retry or dead-letter record (its Kafka timestamp); 0 (no
    claim) if that timestamp is not a time of this run (shunter may keep the origin's)."""
    at = record.timestamp / 1000
    return at if abs(at - time.time()) < 3600 else 0.0


def settled_at(e: Expect, ev: Evidence) -> float:
    """When the record was first settled for every pair (seconds; inf: never seen)."""
    where = (e.topic, e.partition, e.offset)
    stamps: dict[str, float] = {}
    for d in [*ev.dead.get(where, []), *ev.retried.get(where, [])]:
        caller = d.text(h.CALLER) or ""
        stamps[caller] = min(stamps.get(caller, math.inf), _written(d))
    for rc in ev.receipts:
        if (rc.topic, rc.partition, rc.offset) == where and rc.clean:
            stamps[rc.caller] = min(stamps.get(rc.caller, math.inf), rc.at)
    if "" in stamps:  # dead-lettered for no caller: settled for all at once
        return stamps[""]
    wanted = e.callers | (e.maybe & set(stamps))
    if not wanted:
        return min(stamps.values(), default=0.0)
    return max(stamps.get(c, math.inf) for c in wanted)


def committed_past_unsettled(
    expects: list[Expect], ev: Evidence, samples: list[tuple[float, str, int, int]]
) -> list[str]:
    """Samples (time, topic, partition, committed) at which the group had committed past
    a record not yet settled (a 50 ms allowance for clocks and stamps)."""
    problems = []
    settled = {(e.topic, e.partition, e.offset): settled_at(e, ev) for e in expects}
    for at, topic, partition, offset in samples:
        for (t, p, o), when in settled.items():
            if t == topic and p == partition and o < offset and when > at + 0.05:
                problems.append(
                    f"{t}[{p}]: committed {offset} at {at:.3f} past @{o}, settled "
                    f"{'never' if when == math.inf else f'at {when:.3f}'}"
                )
                break
    return problems


# -- one example ----------------------------------------------------------------------------


@dataclass
class Outcome:
    records: int
    problems: list[str]
    ready: Counter[int]
    died: str


def run_batch(broker: Broker, batch: list[Spec], tag: str) -> Outcome:
    """Produce ``batch``, run a dispatcher over it, and audit."""
    topics = {"json": f"pa-json-{tag}", "raw": f"pa-raw-{tag}"}
    group = f"pa-g-{tag}"
    ensure_topics(
        {"bootstrap.servers": broker.bootstrap},
        {topics["json"]: 2, topics["raw"]: 2},
        configs={t: TOPIC_LIMITS for t in topics.values()},
    )
    records = [materialize(s) for s in batch]
    coords: dict[str, list[tuple[int, int]]] = {}
    expects: list[Expect] = []
    for kind, topic in topics.items():
        mine = [(s, r) for s, r in zip(batch, records, strict=True) if s.topic == kind]
        coords[topic] = produce_raw(
            broker.bootstrap, topic, [r for _, r in mine], **{"message.max.bytes": 1_000_000}
        )
        expects += [expect(s, r, topic, c) for (s, r), c in zip(mine, coords[topic], strict=True)]
    port = free_port()
    app = shunter.Dispatcher(
        config(
            broker,
            group,
            topics={topics["json"]: {"format": "json"}, topics["raw"]: {"format": "raw"}},
            categories={
                "all": {"topics": list(topics.values())},
                "hdr": {"topics": [topics["raw"]], "where": f"'{CASE}' in headers"},
                "amt": {"topics": [topics["json"]], "where": "value.amount > 10"},
            },
            subscribers=[],
            kafka={"stall_after": f"{STALL_AFTER}s", "drain_timeout": "5s"},
            retry={
                "fast": {"attempts": 1, "delay": "200ms"},
                "slow": {"attempts": 1, "delay": "500ms"},
                "flood_guard": {"action": "continue"},
            },
            admin={"listen": f"127.0.0.1:{port}"},
        )
    )
    handlers = Handlers()
    app.subscriber("all", caller="s", timeout="1s")(handlers.sync("s"))
    app.subscriber("all", caller="x", timeout="1s")(handlers.asynchronous("x"))
    app.subscriber("hdr", caller="h", timeout="1s")(handlers.asynchronous("h"))
    app.subscriber("amt", caller="m", timeout="1s")(handlers.sync("m"))
    probe = ReadyProbe(port)
    samples: list[tuple[float, str, int, int]] = []
    moved: dict[tuple[str, int], tuple[int, float]] = {}  # last committed, since when
    stuck_while_ready: list[str] = []
    died = ""
    began = time.time()
    running = DispatcherThread(app)
    try:
        running.start()
        probe.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and running.error is None:
            done = True
            for topic, cs in coords.items():
                ends = ends_of(cs)
                got = committed(broker, group, topic, 2)
                at = time.time()
                for p, end in ends.items():
                    offset = got.get(p, -1)
                    samples.append((at, topic, p, offset))
                    last = moved.get((topic, p))
                    if last is None or last[0] != offset:
                        moved[(topic, p)] = (offset, at)
                    elif (
                        offset < end
                        and at - last[1] > STALL_AFTER + 3
                        and at - began > 15
                        and probe.status_at(time.monotonic()) == 200
                    ):
                        stuck_while_ready.append(
                            f"{topic}[{p}] stuck at {offset} for {at - last[1]:.0f}s "
                            f"(end {end}) while /ready said 200"
                        )
                    if offset < end:
                        done = False
            if done and not _retries_pending(broker, app, handlers, expects):
                break
            time.sleep(0.5)
        if running.error is None:
            recovered = _wait_ready(probe, STALL_AFTER + 5)
            if not recovered:
                stuck_while_ready.append(
                    f"/ready is {probe.ask()[0]}, not 200, after the batch settled"
                )
    finally:
        probe.stop()
        try:
            running.stop(timeout=90)
        except (RuntimeError, TimeoutError) as exc:
            cause = exc.__cause__ or exc
            died = f"{type(cause).__name__}: {cause}"
    ev = gather(broker, app, handlers)
    problems = audit(expects, ev, time.time() * 1000)
    problems += committed_past_unsettled(expects, ev, samples)
    for topic, cs in coords.items():
        ends = ends_of(cs)
        got = committed(broker, group, topic, 2)
        for p, end in ends.items():
            if got.get(p, -1) < end:
                problems.append(f"{topic}[{p}]: committed {got.get(p, -1)}, end {end}")
    problems += sorted(set(stuck_while_ready))[:5]
    if died:
        problems.insert(0, f"the dispatcher died: {died}")
    return Outcome(len(batch), problems, Counter(s for _, s, _ in probe.answers), died)


def _retries_pending(
    broker: Broker, app: shunter.Dispatcher, handlers: Handlers, expects: list[Expect]
) -> bool:
    """Some pair is neither delivered, dead-lettered, nor waiting days in a retry tier."""
    problems = audit(expects, gather(broker, app, handlers), time.time() * 1000)
    return any("unaccounted" in p or "nowhere" in p or "not dead-lettered" in p for p in problems)


def _wait_ready(probe: ReadyProbe, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe.ask()[0] == 200:
            return True
        time.sleep(0.25)
    return False


def _report(label: str, outcomes: Iterable[Outcome]) -> str:
    done = list(outcomes)
    ready: Counter[int] = Counter()
    for o in done:
        ready.update(o.ready)
    return (
        f"{label}: {len(done)} examples, {sum(o.records for o in done)} records, "
        f"/ready answers {dict(ready)}, {sum(1 for o in done if o.problems)} with problems"
    )


# -- the tests ------------------------------------------------------------------------------


def test_poison_anything(broker: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    """Given batches of hostile records and misbehaving handlers drawn by hypothesis,
    when a dispatcher runs each batch, then every record is accounted for, the group
    commits to the end and never past an unsettled record, and /ready tells the truth."""
    outcomes: list[Outcome] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: each example costs seconds
        suppress_health_check=list(HealthCheck),
    )
    @given(batch=BATCH)
    @example(batch=EVERY_CASE)
    def poison(batch: list[Spec]) -> None:
        outcome = run_batch(broker, batch, os.urandom(4).hex())
        outcomes.append(outcome)
        assert not outcome.problems, (
            f"{len(outcome.problems)} problems in a batch of {len(batch)}:\n  "
            + "\n  ".join(outcome.problems[:25])
        )

    try:
        poison()
    finally:
        with capsys.disabled():
            print("\n" + _report("poison-anything", outcomes))


def test_the_audit_passes_a_well_behaved_run_and_catches_a_lost_record(broker: Broker) -> None:
    """Given valid records with well-behaved handlers, the audit above finds nothing;
    given the same evidence with one receipt removed, one dead letter forged away, or a
    commit sampled before a settlement, it names each: its failures are the
    dispatcher's."""
    batch = [
        Spec("json", ("binary", 8, i), (), 0, ("json", {"amount": 20 if i % 2 else 3}), 0, None)
        for i in range(12)
    ] + [
        Spec("raw", None, ((b"a", b"1"),), 0, ("binary", (64, i)), 0, i % 2 or None)
        for i in range(8)
    ]
    # run_batch audits itself; its problems must be none
    outcome = run_batch(broker, batch, os.urandom(4).hex())
    assert not outcome.problems, "\n".join(outcome.problems)
    assert outcome.ready[200] > 0

    # the same audit against doctored evidence
    record = materialize(batch[1])
    e = expect(batch[1], record, "t", (0, 5))
    assert e.callers == {"s", "x", "m"} and not e.rejected
    now = time.time()
    clean = [Receipt(c, "t", 0, 5, 1, True, now) for c in sorted(e.callers)]
    assert audit([e], Evidence(receipts=clean), now * 1000) == []
    lost = audit([e], Evidence(receipts=clean[1:]), now * 1000)
    assert len(lost) == 1 and "unaccounted" in lost[0]
    stray = audit([e], Evidence(receipts=[*clean, Receipt("h", "t", 0, 5, 1, True, now)]), 0)
    assert any("categories exclude" in p for p in stray)
    early = committed_past_unsettled([e], Evidence(receipts=clean), [(now - 1, "t", 0, 6)])
    assert early and "past @5" in early[0]
    assert committed_past_unsettled([e], Evidence(receipts=clean), [(now + 1, "t", 0, 6)]) == []
    bad_name = RawRecord(b"{}", None, [(b"\xff", b"1")])
    rejected = expect(
        Spec("json", None, ((b"\xff", b"1"),), 0, ("json", {}), 0, None), bad_name, "t", (0, 7)
    )
    assert rejected.rejected == "internal"
    assert "not once" in audit([rejected], Evidence(), 0)[0]
