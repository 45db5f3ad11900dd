"""R4 — hostile payloads.

Given a JSON topic with a JSON Schema (an object with a string ``user`` and an integer
``amount``) and three subscribers, when fixed hostile payloads (a value of ``big_mb`` MB,
JSON nested ``depth`` deep, invalid UTF-8, a ``digits``-digit integer, a gzip compression
bomb that inflates to ``bomb_mb`` MB, a tombstone, an empty value) and ``generated``
hypothesis-generated hostile payloads arrive among ``good`` valid messages, then the
dispatcher never crashes, each hostile payload lands in the dead-letter topic with its
stage and a reason and reaches no handler, every valid message reaches every subscriber,
and the dispatcher's resident memory stays under ``rss_budget_mb`` (``budget()``: a
fixed allowance plus four copies of the largest payload; the kernel's high-water mark
VmHWM is compared, so a spike between samples counts).

Sizes: Kafka refuses records over ``max.message.bytes`` (1 MB by default), so the source
and dead-letter topics are created with ``max.message.bytes`` above the big value, and
shunter's producer gets ``message.max.bytes`` to match (``kafka.client``). The compression
bomb is small on the wire (it passes every size limit compressed) and only inflates in
the consumer; dead-lettering it means writing the inflated value.
"""

from __future__ import annotations

import gzip
import random
import time
from typing import Any

import orjson
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from kafkatools import Broker
from shunter.broker.admin import ensure_topics
from shunter.config import parse_config
from shunter.decode import build_decoders
from shunter.errors import RejectedMessage

from .harness import (
    CALLERS,
    Ledger,
    RssSampler,
    Scene,
    broker_label,
    caught_up,
    dead_letter_records,
    expected_pairs,
    log,
    produce,
    running,
    stop,
    tally,
    wait_until,
)

SCHEMA = {
    "type": "object",
    "required": ["user", "amount"],
    "properties": {"user": {"type": "string"}, "amount": {"type": "integer"}},
}

# Byte sequences that are never valid UTF-8 (RFC 3629).
BAD_UTF8 = [
    b"\xff",
    b"\xfe",
    b"\xc0\xaf",
    b"\xe0\x80\xaf",
    b"\xed\xa0\x80",
    b"\xf8\x88\x80\x80",
    b"\x80",
    b"\xe2\x82",
    b"\xf4\x90\x80\x80",
]


def fixed_cases(big_mb: float, depth: int, digits: int) -> list[tuple[str, bytes | None]]:
    big = int(big_mb * 1024 * 1024)
    return [
        ("big value (schema: no amount)", b'{"user": "' + b"x" * big + b'"}'),
        ("nested arrays", b"[" * depth + b"]" * depth),
        ("nested objects", b'{"a":' * depth + b"1" + b"}" * depth),
        ("invalid UTF-8 in a string", b'{"user": "\xff\xfe\xfd", "amount": 1}'),
        ("overlong UTF-8", b'{"user": "\xc0\xaf", "amount": 1}'),
        ("UTF-16 surrogate bytes", b'{"user": "\xed\xa0\x80", "amount": 1}'),
        ("lone surrogate escape", b'{"user": "\\ud800", "amount": 1}'),
        (f"{digits}-digit integer", b'{"user": "u", "amount": ' + b"9" * digits + b"}"),
        ("NaN", b'{"user": "u", "amount": NaN}'),
        ("BOM before JSON", b'\xef\xbb\xbf{"user": "u", "amount": 1}'),
        ("trailing garbage", b'{"user": "u", "amount": 1} trailing'),
        ("tombstone", None),
        ("empty value", b""),
        ("binary garbage", bytes(range(256)) * 64),
    ]


def bomb_case(bomb_mb: float) -> tuple[str, bytes]:
    size = int(bomb_mb * 1024 * 1024)
    # Valid JSON all the way (one huge string), so decoding takes the whole inflated value.
    return (f"gzip bomb inflating to {bomb_mb:g} MB", b'{"user": "' + b"a" * size + b'"}')


# -- hypothesis: payloads that no JSON decoder and schema validator may accept ---------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.text(max_size=12)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_valid = st.fixed_dictionaries(
    {"user": st.text(max_size=16), "amount": st.integers(-(2**53), 2**53)}
)


def _insert(doc: bytes, at: int, bad: bytes) -> bytes:
    """Put ``bad`` inside the value of "user" (always a string in ``doc``)."""
    start = doc.index(b'"user":"') + len(b'"user":"')
    return doc[:start] + bad + doc[start:]


HOSTILE = st.one_of(
    # not UTF-8
    st.tuples(_valid.map(orjson.dumps), st.integers(0, 99), st.sampled_from(BAD_UTF8)).map(
        lambda t: ("invalid UTF-8", _insert(*t))
    ),
    # cut short: a strict prefix of an object is never JSON
    _valid.map(orjson.dumps)
    .flatmap(lambda d: st.integers(0, len(d) - 1).map(lambda k: d[:k]))
    .map(lambda b: ("truncated", b)),
    # JSON, but not the schema's shape
    _json.filter(lambda v: not isinstance(v, dict)).map(
        lambda v: ("not an object", orjson.dumps(v))
    ),
    st.dictionaries(st.text(max_size=8).filter(lambda k: k != "amount"), _json, max_size=5).map(
        lambda v: ("no amount", orjson.dumps(v))
    ),
    st.fixed_dictionaries(
        {
            "user": st.text(max_size=8),
            "amount": st.text(max_size=8)
            | st.none()
            | st.lists(st.integers(-(2**53), 2**53), max_size=3)
            | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
        }
    ).map(lambda v: ("amount not an integer", orjson.dumps(v))),
    # raw control characters inside a string
    st.integers(0, 31).map(
        lambda c: ("control character", b'{"user": "a' + bytes([c]) + b'", "amount": 1}')
    ),
    # deeper than any sane decoder nests
    st.tuples(st.integers(1_025, 200_000), st.booleans()).map(
        lambda t: (
            "deep",
            (b"[" * t[0] + b"]" * t[0]) if t[1] else (b'{"a":' * t[0] + b"0" + b"}" * t[0]),
        )
    ),
    # numbers beyond a double
    st.integers(400, 50_000).map(
        lambda n: ("huge number", b'{"user": "u", "amount": 1' + b"0" * n + b"}")
    ),
    # bytes that cannot start a JSON text
    st.binary(max_size=2_048).map(lambda b: ("NUL-led binary", b"\x00" + b)),
)


def generate(count: int, seed_value: int) -> list[tuple[str, bytes]]:
    """``count`` hostile payloads drawn by hypothesis (reproducible from ``seed_value``)."""
    drawn: list[tuple[str, bytes]] = []

    @seed(seed_value)
    @settings(
        max_examples=count,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(HOSTILE)
    def collect(case: tuple[str, bytes]) -> None:
        drawn.append(case)

    collect()
    return drawn[:count]


# -- the scenario ------------------------------------------------------------------------------


def run(
    scene: Scene,
    *,
    big_mb: float = 10.0,
    bomb_mb: float = 64.0,
    depth: int = 100_000,
    digits: int = 1_000_000,
    generated: int = 300,
    good: int = 1_000,
    partitions: int = 2,
    rss_budget_mb: float | None = None,
    seed_value: int = 6004,
    pause: float = 0.001,
    settle_timeout: float = 300.0,
) -> dict[str, Any]:
    broker: Broker = scene.broker
    rng = random.Random(seed_value)
    if rss_budget_mb is None:
        rss_budget_mb = budget(big_mb, bomb_mb)
    limit = int((big_mb + 2) * 1024 * 1024)
    (scene.workdir / "payment.json").write_bytes(orjson.dumps(SCHEMA))
    topic_configs = {"max.message.bytes": str(limit)}
    ensure_topics(
        {"bootstrap.servers": broker.bootstrap},
        {scene.topic: partitions, scene.dlq: 2},
        configs={scene.topic: topic_configs, scene.dlq: topic_configs},
    )
    config = scene.write_config(
        partitions=partitions,
        topic_config={"format": "json", "schema": "payment.json"},
        kafka={"client": {"message.max.bytes": limit}},
    )
    hostile = [(f"fixed: {n}", v) for n, v in fixed_cases(big_mb, depth, digits)]
    began = time.monotonic()
    hostile += [(f"generated: {n}", v) for n, v in generate(generated, seed_value)]
    generating_s = time.monotonic() - began
    goods = [orjson.dumps({"user": f"u{i}", "amount": i}) for i in range(good)]
    # Interleave: each hostile payload lands among valid messages of the same partitions.
    stream: list[tuple[bytes, bytes | None]] = [
        (f"good-{i}".encode(), v) for i, v in enumerate(goods)
    ]
    for i, (_name, value) in enumerate(hostile):
        stream.insert(rng.randrange(len(stream) + 1), (f"hostile-{i}".encode(), value))
    coords = produce(broker, scene.topic, stream, settings={"message.max.bytes": limit})
    bomb_name, bomb = bomb_case(bomb_mb)
    bomb_coords = produce(
        broker,
        scene.topic,
        [(b"hostile-bomb", bomb)],
        settings={
            "compression.type": "gzip",
            "linger.ms": 0,
            # librdkafka checks the inflated size; the broker
            # sees (and limits) the compressed batch
            "message.max.bytes": len(bomb) + 1024 * 1024,
        },
    )
    bomb_wire = len(gzip.compress(bomb))
    coords += bomb_coords
    stream.append((b"hostile-bomb", None))
    hostile.append((f"fixed: {bomb_name}", bomb))
    names = {f"hostile-{i}".encode(): n for i, (n, _v) in enumerate(hostile[:-1])}
    names[b"hostile-bomb"] = hostile[-1][0]
    good_coords = [c for c, (k, _v) in zip(coords, stream, strict=True) if k.startswith(b"good-")]
    hostile_coords = {
        c: k for c, (k, _v) in zip(coords, stream, strict=True) if k.startswith(b"hostile-")
    }
    log(
        f"R4: produced {len(goods)} valid and {len(hostile)} hostile payloads "
        f"(bomb: {bomb_mb:g} MB in {bomb_wire / 1024:.0f} KB gzip)"
    )

    ledger = Ledger(scene.ledger_path)
    proc = scene.dispatcher(config, env=scene.env(pause=pause)).start()
    assert proc.process is not None
    rss = RssSampler(proc.process.pid).start()
    failure = ""
    baseline = 0.0
    try:
        wait_until(lambda: running(proc), timeout=120, what="R4 start", alive=proc.alive)
        baseline = rss.now_mb()
        wait_until(
            caught_up(broker, scene, partitions, coords),
            timeout=settle_timeout,
            what="R4 settling every payload",
            alive=proc.alive,
            progress=ledger.refresh,
            stall=settle_timeout / 2,
        )
    except Exception as exc:
        failure = f"{type(exc).__name__}: {exc}"
        log(f"R4: {failure}")
    crashed = not proc.alive()
    settled_mb = rss.now_mb()
    status = stop(proc)
    rss.stop()
    expected = expected_pairs(scene.topic, good_coords, CALLERS)
    figures = tally(ledger, expected)
    reached_handlers = sorted(
        {
            names[k]
            for c, k in hostile_coords.items()
            for caller in CALLERS
            if (caller, scene.topic, *c) in ledger.counts
        }
    )
    dead = dead_letter_records(broker, scene.dlq, timeout=120)
    landed: dict[bytes, Any] = {}
    for info, _key, _size in dead:
        origin = (info.origin_partition, info.origin_offset)
        if info.origin_topic == scene.topic and origin in hostile_coords:
            landed[hostile_coords[origin]] = info
    missing = sorted(names[k] for k in names if k not in landed)
    no_reason = sorted(
        names[k] for k, i in landed.items() if not i.error or i.stage not in ("decode", "validate")
    )
    stages: dict[str, int] = {}
    for info in landed.values():
        stages[info.stage] = stages.get(info.stage, 0) + 1
    text = proc.log_tail(50_000_000)
    result: dict[str, Any] = {
        "scenario": "R4 hostile payloads",
        "broker": broker_label(broker),
        "messages": len(stream),
        "valid_messages": len(goods),
        "hostile_payloads": len(hostile),
        "hostile_generated": generated,
        "hypothesis_seed": seed_value,
        "generating_s": round(generating_s, 1),
        "big_value_mb": big_mb,
        "bomb_inflated_mb": bomb_mb,
        "bomb_on_the_wire_kb": round(bomb_wire / 1024, 1),
        "max_message_bytes": limit,
        **figures,
        "dead_lettered": len(landed),
        "dead_letter_stages": stages,
        "not_dead_lettered": missing,
        "without_stage_or_reason": no_reason,
        "reached_a_handler": reached_handlers,
        "dispatcher_crashed": crashed,
        "final_exit_status": status,
        "rss_baseline_mb": round(baseline, 1),
        "rss_peak_sampled_mb": round(rss.peak_mb, 1),
        "rss_high_water_mb": round(rss.vm_hwm_mb, 1),
        "rss_after_mb": round(settled_mb, 1),
        "rss_budget_mb": rss_budget_mb,
        "dlq_write_retries_logged": text.count("stays held, retrying"),
        "failure": failure,
    }
    result["checks"] = {
        "0 dispatcher crashes": not crashed and status == 0,
        "every hostile payload dead-lettered": not missing and not failure,
        "each with its stage and a reason": not no_reason,
        "no hostile payload reached a handler": not reached_handlers,
        "every valid message delivered (lost == 0)": figures["lost"] == 0,
        f"peak RSS <= {rss_budget_mb:.0f} MB": rss.vm_hwm_mb <= rss_budget_mb,
    }
    return result


def budget(big_mb: float, bomb_mb: float) -> float:
    """The resident memory R4 allows: 256 MB for the interpreter, librdkafka's queues and
    the 1,000s of small payloads, plus four copies of the largest payload (librdkafka's
    inflated buffer, the Python bytes, the decoded value, the dead-letter write)."""
    return 256.0 + 4 * max(big_mb, bomb_mb)


def big_integers() -> dict[str, Any]:
    """What shunter's JSON decoder hands a handler for integers beyond 64 bits that a
    schema declares ``integer``: exact, or rejected — never silently rounded."""
    config = parse_config(
        {"topics": {"t": {"format": "json"}}, "categories": {}, "subscribers": []}
    )
    decode = build_decoders(config)["t"]
    out: dict[str, Any] = {}
    for digits in (19, 20, 25, 40, 308):
        number = int("1" + "1" * (digits - 1))
        raw = b'{"user": "u", "amount": ' + str(number).encode() + b"}"
        try:
            got = decode(raw)["amount"]
        except RejectedMessage as exc:
            out[f"{digits} digits"] = f"rejected ({exc.reason[:60]})"
            continue
        out[f"{digits} digits"] = (
            "exact"
            if got == number and isinstance(got, int)
            else (f"became {got!r} ({type(got).__name__})")
        )
    return out
