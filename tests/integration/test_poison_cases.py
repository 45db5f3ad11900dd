"""Issue 10's five cases, each as a hostile producer or a careless handler author would
cause it: no record may vanish or wedge a partition.

Records the Python producer cannot write (a header name that is not UTF-8, a null header
value) are produced through librdkafka itself (``rawkafka``); retry and dead-letter topics
are read back with every header as bytes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from poisontools import (
    LogCapture,
    by_origin,
    ends_of,
    reached,
    read_topic,
    wait_until,
)
from rawkafka import RawRecord, produce_raw

import shunter
from kafkatools import Broker, config
from shunter.settle import headers as h
from shunter.testing import DispatcherThread

pytestmark = pytest.mark.kafka

WEEK_MS = 7 * 24 * 3600 * 1000


class Receipts:
    """What handlers received: (caller, topic, partition, offset) -> times, and messages."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str, int, int]] = Counter()
        self.messages: dict[tuple[str, str, int, int], shunter.Message] = {}
        self._lock = threading.Lock()

    def add(self, caller: str, msg: shunter.Message) -> None:
        pair = (caller, msg.topic, msg.partition, msg.offset)
        with self._lock:
            self.counts[pair] += 1
            self.messages[pair] = msg

    def handler(self, caller: str) -> Any:
        async def handle(msg: shunter.Message) -> None:
            self.add(caller, msg)

        handle.__name__ = caller.replace("-", "_")
        return handle

    def got(self, caller: str, topic: str, coords: list[tuple[int, int]]) -> bool:
        with self._lock:
            return all((caller, topic, p, o) in self.counts for p, o in coords)

    def offsets(self, caller: str, topic: str) -> set[tuple[int, int]]:
        with self._lock:
            return {(p, o) for (c, t, p, o) in self.counts if c == caller and t == topic}


def json_records(values: list[Any], partition: int = -1, **fields: Any) -> list[RawRecord]:
    return [
        RawRecord(orjson.dumps(v), key=f"k{i}".encode(), partition=partition, **fields)
        for i, v in enumerate(values)
    ]


# -- case 1 ---------------------------------------------------------------------------------


def test_a_header_name_that_is_not_utf8_is_dead_lettered_as_internal_not_lost(
    broker: Broker, unique: str
) -> None:
    """Given one partition of valid records with, among them, a record whose header
    *name* is not UTF-8 (Kafka allows any bytes; confluent-kafka's ``headers()`` raises
    on it),
    when shunter runs with two subscribers,
    then that record is in `<group>.dlq` exactly once with stage `internal`, the
    exception's type, its traceback and its origin coordinates, no handler got it, every
    other record reached both subscribers, and the group committed to the end.
    (Issue 10, case 1: it was logged as "a bug in shunter" and skipped: gone.)"""
    topic, group = f"p1-{unique}", f"g1-{unique}"
    broker.create({topic: 1})
    records = json_records([{"n": i} for i in range(12)], partition=0, headers=[("ok", b"1")])
    records.insert(5, RawRecord(b'{"n": "bad"}', b"bad", [(b"\xff\xfe-trace", b"v"), ("ok", b"1")]))
    coords = produce_raw(broker.bootstrap, topic, records)
    bad = coords[5]
    good = [c for i, c in enumerate(coords) if i != 5]
    receipts = Receipts()
    app = shunter.Dispatcher(
        config(broker, group, {topic: {}}, {"all": {"topics": [topic]}}, subscribers=[])
    )
    for caller in ("medal", "rank"):
        app.subscriber("all", caller=caller)(receipts.handler(caller))
    dlq = app.config.dlq_topic
    with DispatcherThread(app) as running:
        running.wait_for(lambda: all(receipts.got(c, topic, good) for c in ("medal", "rank")))
        landed = wait_until(lambda: (topic, *bad) in by_origin(read_topic(broker, dlq)), 30)
        at_end = wait_until(lambda: reached(broker, group, topic, ends_of(coords)), 30)
    for caller in ("medal", "rank"):
        assert bad not in receipts.offsets(caller, topic), f"{caller} received the bad record"
    found = by_origin(read_topic(broker, dlq)).get((topic, *bad), [])
    assert landed and len(found) == 1, (
        f"the record with a non-UTF-8 header name is in {dlq} {len(found)} times, not once"
    )
    dead = found[0]
    assert dead.text(h.STAGE) == "internal"
    error_type = dead.text(h.ERROR_TYPE) or ""
    assert error_type.rsplit(".", 1)[-1].endswith(("Error", "Exception")), error_type
    traceback = dead.text(h.TRACEBACK) or ""
    assert traceback.strip() and error_type.rsplit(".", 1)[-1] in traceback
    assert at_end, "the group did not commit the partition to its end"


# -- case 2 ---------------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "required": ["user", "amount"],
    "properties": {"user": {"type": "string"}, "amount": {"type": "integer"}},
}


def test_a_dead_letter_too_large_for_its_topic_becomes_a_stub_and_nothing_wedges(
    broker: Broker, unique: str, tmp_path: Path
) -> None:
    """Given a schema-checked topic (default 1 MB limits everywhere) whose partition 0
    carries, among valid records, a schema-invalid payload of ~400 KB with a 600 KB key,
    and a second topic,
    when shunter runs, then within 30 s the dead-letter topic has a stub for it (header
    `shunter-payload-omitted`, no value), the group committed past it, and fewer than 10
    ERROR lines name it;
    and when that dispatcher stops cleanly and a new one starts in the same group, then
    every partition of both topics goes on delivering (records produced after the restart
    arrive within 30 s) and nothing about that record comes back.
    (Issue 10, case 2: the key travelled twice, the stub did not fit, the retry dropped
    `omit`: written for ever, and after a restart the crash guard wedged everything.)"""
    checked, plain, group = f"p2-{unique}", f"p2b-{unique}", f"g2-{unique}"
    (tmp_path / "payment.json").write_bytes(orjson.dumps(SCHEMA))
    broker.create({checked: 2, plain: 2})
    big_key = os.urandom(600_000)
    poison = RawRecord(b'{"user": "' + b"x" * 400_000 + b'"}', big_key, partition=0)
    valid = [{"user": f"u{i}", "amount": i} for i in range(10)]
    first = json_records(valid, partition=0) + json_records(valid, partition=1)
    first.insert(4, poison)
    checked_coords = produce_raw(
        broker.bootstrap, checked, first, **{"message.max.bytes": 1_040_000}
    )
    bad = checked_coords[4]
    plain_coords = produce_raw(broker.bootstrap, plain, json_records(valid))
    data = config(
        broker,
        group,
        topics={checked: {"schema": str(tmp_path / "payment.json")}, plain: {}},
        categories={"all": {"topics": [checked, plain]}},
        subscribers=[],
    )
    receipts = Receipts()

    def dispatcher() -> shunter.Dispatcher:
        app = shunter.Dispatcher(data)
        app.subscriber("all", caller="ledger")(receipts.handler("ledger"))
        return app

    dlq = dispatcher().config.dlq_topic
    problems: list[str] = []
    wanted = [c for c in checked_coords if c != bad]
    with LogCapture() as logs:
        began = time.monotonic()
        with DispatcherThread(dispatcher()) as running:
            running.wait_for(lambda: receipts.got("ledger", plain, plain_coords))
            if not wait_until(lambda: reached(broker, group, checked, ends_of(checked_coords)), 30):
                problems.append("the group did not commit past the oversized record in 30 s")
            stubs = by_origin(read_topic(broker, dlq)).get((checked, *bad), [])
            if not stubs:
                problems.append(f"no record for {checked}[{bad[0]}]@{bad[1]} in {dlq}")
            elif not (stubs[0].has(h.PAYLOAD_OMITTED) and stubs[0].value is None):
                problems.append(
                    f"the dead letter is not a payload-less stub: value "
                    f"{None if stubs[0].value is None else len(stubs[0].value)} bytes, "
                    f"headers {[n for n, _ in stubs[0].headers]}"
                )
            errors = len(logs.mentioning(checked))
            if errors >= 10:
                problems.append(
                    f"{errors} ERROR lines about {checked} in "
                    f"{time.monotonic() - began:.0f} s (fewer than 10 expected)"
                )
        if not receipts.got("ledger", checked, wanted):
            problems.append("valid records of the checked topic were not all delivered")

        # A clean restart in the same group: nothing about that offset may come back.
        more = [{"user": f"v{i}", "amount": i} for i in range(10)]
        with DispatcherThread(dispatcher()) as running:
            late_checked = produce_raw(
                broker.bootstrap,
                checked,
                json_records(more, partition=0) + json_records(more, partition=1),
            )
            late_plain = produce_raw(broker.bootstrap, plain, json_records(more))
            delivered = wait_until(
                lambda: (
                    receipts.got("ledger", checked, late_checked)
                    and receipts.got("ledger", plain, late_plain)
                ),
                30,
            )
            if not delivered:
                stuck = sorted(
                    {
                        p
                        for p, o in late_checked
                        if (p, o) not in receipts.offsets("ledger", checked)
                    }
                )
                problems.append(
                    f"after a clean restart, records produced then were not delivered within "
                    f"30 s (checked topic partitions missing some: {stuck}; plain topic "
                    f"complete: {receipts.got('ledger', plain, late_plain)})"
                )
    again = by_origin(read_topic(broker, dlq)).get((checked, *bad), [])
    if len(again) > 1:
        problems.append(f"the oversized record was dead-lettered {len(again)} times")
    if bad in receipts.offsets("ledger", checked):
        problems.append("a handler received the schema-invalid record")
    assert not problems, "\n".join(problems)


# -- case 3 ---------------------------------------------------------------------------------


def test_retry_later_with_an_absurd_delay_goes_to_the_retry_tier_capped_at_a_week(
    broker: Broker, unique: str
) -> None:
    """Given a handler that raises ``RetryLater(delay=...)`` with a delay taken from the
    payload (1e308, and infinity) on the first attempt,
    when those messages arrive among others in one partition,
    then the partition is committed past them within 30 s, every other message is
    delivered, and each is in `<group>.retry.fast` for that caller with a not-before time
    at most a week (and a minute) away.
    (Issue 10, case 3: OverflowError in the settler, swallowed; the partition never moved.)"""
    topic, group = f"p3-{unique}", f"g3-{unique}"
    broker.create({topic: 1})
    values: list[dict[str, Any]] = [{"n": i} for i in range(10)]
    values[3]["delay"] = "1e308"
    values[6]["delay"] = "inf"
    coords = produce_raw(broker.bootstrap, topic, json_records(values, partition=0))
    delayed = {coords[3], coords[6]}
    receipts = Receipts()

    async def payer(msg: shunter.Message) -> None:
        if msg.attempt == 1 and "delay" in msg.value:
            raise shunter.RetryLater(delay=float(msg.value["delay"]))
        receipts.add("payer", msg)

    app = shunter.Dispatcher(
        config(broker, group, {topic: {}}, {"pay": {"topics": [topic]}}, subscribers=[])
    )
    app.subscriber("pay", caller="payer")(payer)
    fast = app.config.fast_topic
    others = [c for c in coords if c not in delayed]
    with DispatcherThread(app) as running:
        running.wait_for(lambda: receipts.got("payer", topic, others))
        at_end = wait_until(lambda: reached(broker, group, topic, ends_of(coords)), 30)
        now_ms = time.time() * 1000
        retries = by_origin(read_topic(broker, fast))
    assert at_end, "the partition was not committed past the RetryLater(1e308/inf) records"
    for p, o in sorted(delayed):
        found = retries.get((topic, p, o), [])
        assert len(found) == 1, f"{topic}[{p}]@{o} is in {fast} {len(found)} times"
        assert found[0].text(h.CALLER) == "payer"
        not_before = int(found[0].text(h.NOT_BEFORE) or "0")
        assert not_before <= now_ms + WEEK_MS + 60_000, (
            f"not-before {not_before} is more than a week away"
        )


# -- case 4 ---------------------------------------------------------------------------------


def test_a_null_header_value_reaches_filters_and_handlers_as_none(
    broker: Broker, unique: str
) -> None:
    """Given a topic with a category filtered on the value (not looking at headers) and
    one filtered on a header's presence, and records whose headers have null values (and
    a binary one),
    when shunter runs, then each record reaches exactly the subscribers its filters
    select, a handler sees a null header as ``(name, None)``, and nothing is
    dead-lettered.
    (Issue 10, case 4: `'NoneType' object has no attribute 'decode'` in the filter
    dead-lettered valid messages.)"""
    topic, group = f"p4-{unique}", f"g4-{unique}"
    broker.create({topic: 1})
    records = [
        RawRecord(b'{"amount": 20}', b"a", [("trace", None)], partition=0),
        RawRecord(b'{"amount": 25}', b"b", [("h", None), ("trace", b"t")], partition=0),
        RawRecord(b'{"amount": 5}', b"c", [("h", b"\xff\xfe\x00")], partition=0),
        RawRecord(b'{"amount": 30}', b"d", [("trace", b"t")], partition=0),
    ]
    coords = produce_raw(broker.bootstrap, topic, records)
    receipts = Receipts()
    app = shunter.Dispatcher(
        config(
            broker,
            group,
            {topic: {}},
            {
                "big": {"topics": [topic], "where": "value.amount > 10"},
                "tagged": {"topics": [topic], "where": "'h' in headers"},
            },
            subscribers=[],
            # a dead letter would be a failure here: never pause a caller for it
            retry={"flood_guard": {"action": "continue"}},
        )
    )
    app.subscriber("big", caller="big")(receipts.handler("big"))
    app.subscriber("tagged", caller="tag")(receipts.handler("tag"))
    dlq = app.config.dlq_topic
    expect_big = [coords[0], coords[1], coords[3]]
    expect_tag = [coords[1], coords[2]]
    with DispatcherThread(app):
        delivered = wait_until(
            lambda: (
                receipts.got("big", topic, expect_big) and receipts.got("tag", topic, expect_tag)
            ),
            30,
        )
        at_end = wait_until(lambda: reached(broker, group, topic, ends_of(coords)), 30)
    dead = read_topic(broker, dlq)
    assert not dead, "dead-lettered: " + "; ".join(
        f"{d.text(h.ERROR_TYPE)}: {d.text(h.ERROR)}" for d in dead
    )
    assert delivered, (
        f"big got {sorted(receipts.offsets('big', topic))}, expected {expect_big}; "
        f"tag got {sorted(receipts.offsets('tag', topic))}, expected {expect_tag}"
    )
    assert receipts.offsets("big", topic) == set(expect_big)
    assert receipts.offsets("tag", topic) == set(expect_tag)
    first = receipts.messages[("big", topic, *coords[0])]
    assert ("trace", None) in first.headers
    assert ("h", b"\xff\xfe\x00") in receipts.messages[("tag", topic, *coords[2])].headers
    assert at_end


def test_a_filter_reading_headers_takes_a_record_without_any(broker: Broker, unique: str) -> None:
    """Given a category filtered on ``'h' in headers``, when a record with no headers at
    all arrives, then the filter says no (it is not an error) and nothing is
    dead-lettered; a record with the header is delivered.
    (Found beside issue 10, case 4: the filter's context has no `headers` variable when
    a record has none, and CEL fails with "Undefined variable".)"""
    topic, group = f"p4b-{unique}", f"g4b-{unique}"
    broker.create({topic: 1})
    coords = produce_raw(
        broker.bootstrap,
        topic,
        [
            RawRecord(b"{}", b"a", [], partition=0),
            RawRecord(b"{}", b"b", [("h", b"1")], partition=0),
        ],
    )
    receipts = Receipts()
    app = shunter.Dispatcher(
        config(
            broker,
            group,
            {topic: {}},
            {"tagged": {"topics": [topic], "where": "'h' in headers"}},
            subscribers=[],
        )
    )
    app.subscriber("tagged", caller="tag")(receipts.handler("tag"))
    with DispatcherThread(app) as running:
        running.wait_for(lambda: receipts.got("tag", topic, [coords[1]]))
        at_end = wait_until(lambda: reached(broker, group, topic, ends_of(coords)), 30)
    dead = read_topic(broker, app.config.dlq_topic)
    assert not dead, "dead-lettered: " + "; ".join(
        f"{d.text(h.ERROR_TYPE)}: {d.text(h.ERROR)}" for d in dead
    )
    assert receipts.offsets("tag", topic) == {coords[1]}
    assert at_end


# -- case 5 ---------------------------------------------------------------------------------


def test_a_failing_filter_is_one_dead_letter_and_replays_to_its_category_once_fixed(
    broker: Broker, unique: str, tmp_path: Path
) -> None:
    """Given a category `gifts` filtered on ``value.amount > 10`` with three subscribers,
    a category `audit` of the same topic with one, and a message whose amount is a string
    (the filter fails on it),
    when shunter runs, then that message is ONE dead-letter record (stage `classify`, no
    caller, category `gifts`), the other messages are delivered where their filters say;
    and when the filter is fixed (``int(value.amount) > 10``), the dispatcher restarted,
    and `shunter dlq replay --yes` run, then each `gifts` subscriber receives it exactly
    once and `audit`'s subscriber is not given it again.
    (Issue 10, case 5: one dead letter per caller of the category, not replayable.)"""
    topic, group = f"p5-{unique}", f"g5-{unique}"
    broker.create({topic: 1})
    coords = produce_raw(
        broker.bootstrap,
        topic,
        json_records([{"amount": 20}, {"amount": 5}, {"amount": "50"}, {"amount": 30}], 0),
    )
    bad = coords[2]
    gifts = ("g-medal", "g-rank", "g-task")

    def write(where: str) -> Path:
        data = config(
            broker,
            group,
            {topic: {}},
            {"gifts": {"topics": [topic], "where": where}, "audit": {"topics": [topic]}},
            subscribers=[
                *({"caller": c, "category": "gifts", "handler": "unused:handler"} for c in gifts),
                {"caller": "auditor", "category": "audit", "handler": "unused:handler"},
            ],
        )
        path = tmp_path / "shunter.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    receipts = Receipts()

    def dispatcher(path: Path) -> shunter.Dispatcher:
        app = shunter.Dispatcher(path)
        for caller in gifts:
            app.subscriber("gifts", caller=caller)(receipts.handler(caller))
        app.subscriber("audit", caller="auditor")(receipts.handler("auditor"))
        return app

    broken = write("value.amount > 10")
    dlq = dispatcher(broken).config.dlq_topic
    with DispatcherThread(dispatcher(broken)) as running:
        running.wait_for(
            lambda: (
                receipts.got("auditor", topic, coords)
                and all(receipts.got(c, topic, [coords[0], coords[3]]) for c in gifts)
            )
        )
        wait_until(lambda: (topic, *bad) in by_origin(read_topic(broker, dlq)), 30)
        at_end = wait_until(lambda: reached(broker, group, topic, ends_of(coords)), 30)
    found = by_origin(read_topic(broker, dlq)).get((topic, *bad), [])
    assert len(found) == 1, (
        f"the message the filter failed on is in {dlq} {len(found)} times "
        f"(callers {[d.text(h.CALLER) for d in found]}), not once"
    )
    dead = found[0]
    assert (dead.text(h.STAGE), dead.text(h.CALLER), dead.text(h.CATEGORY)) == (
        "classify",
        "",
        "gifts",
    )
    for caller in gifts:
        assert receipts.offsets(caller, topic) == {coords[0], coords[3]}, caller
    assert at_end

    fixed = write("int(value.amount) > 10")
    with DispatcherThread(dispatcher(fixed)) as running:
        replay = subprocess.run(
            [sys.executable, "-m", "shunter.cli.main", "dlq", "replay", "-c", str(fixed),
             "--yes", "--topic", topic],
            capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip
        assert replay.returncode == 0, replay.stdout + replay.stderr
        replayed = wait_until(lambda: all(receipts.got(c, topic, [bad]) for c in gifts), 30)
        time.sleep(1.0)  # room for a duplicate or a stray delivery to show up
    assert replayed, f"not replayed to every gifts subscriber:\n{replay.stdout}"
    for caller in gifts:
        assert receipts.counts[(caller, topic, *bad)] == 1, caller
    assert receipts.counts[("auditor", topic, *bad)] == 1, "audit's subscriber got it again"
    assert (bad[0], coords[1][1]) not in receipts.offsets("g-medal", topic)


# -- helpers kept honest ------------------------------------------------------------------


def test_the_receipts_and_offsets_these_tests_rely_on_see_a_plain_run(
    broker: Broker, unique: str
) -> None:
    """Given only valid records produced through rawkafka, when shunter runs, then the
    tools above see every record delivered, the group at the end, and an empty
    dead-letter topic: a failure of the cases above is the dispatcher's, not theirs."""
    topic, group = f"p0-{unique}", f"g0-{unique}"
    broker.create({topic: 2})
    coords = produce_raw(
        broker.bootstrap, topic, json_records([{"n": i} for i in range(20)], headers=[("a", b"1")])
    )
    receipts = Receipts()
    app = shunter.Dispatcher(
        config(broker, group, {topic: {}}, {"all": {"topics": [topic]}}, subscribers=[])
    )
    app.subscriber("all", caller="one")(receipts.handler("one"))
    with DispatcherThread(app) as running:
        running.wait_for(lambda: receipts.got("one", topic, coords))
        assert wait_until(lambda: reached(broker, group, topic, ends_of(coords)), 30)
    assert receipts.offsets("one", topic) == set(coords)
    assert read_topic(broker, app.config.dlq_topic) == []
