"""``tracing`` and ``decode-formats``: what tracing and the binary formats cost.

``tracing``: the fan-out-3 run twice over the same topic in fresh groups, tracing off
(the default) and on. With tracing on, spans go to the OpenTelemetry SDK with a batch
processor and an exporter that drops them: shunter's span work and the SDK's are
measured, a collector's network is not.

``decode-formats``: the decoder of one topic per format over the same gift events, in
process (no broker): JSON (orjson), JSON + the fan-out's JSON Schema, plain Avro (a local
schema), Avro in the Confluent wire format (registry ``mock://``, schema fetched before
timing), plain Protobuf and Protobuf in the wire format. Formats take turns in rounds
(no format gets only cold or only warm rounds); the figure is the median per round.
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from ..config import parse_config
from ..decode import build_decoders, decode_now
from . import events
from .context import BenchContext
from .dispatch import Probe, run_dispatcher
from .fanout import RETRY, gift_dataset, three

DECODE_EVENTS = 20_000
ROUNDS = 5

GIFT_AVRO: dict[str, Any] = {
    "type": "record",
    "name": "Gift",
    "namespace": "shunter.bench",
    "fields": [
        {"name": "event_id", "type": "string"},
        {"name": "user_id", "type": "long"},
        {"name": "room_id", "type": "long"},
        {"name": "anchor_id", "type": "long"},
        {"name": "gift_id", "type": "long"},
        {"name": "gift_name", "type": "string"},
        {"name": "count", "type": "long"},
        {"name": "price", "type": "long"},
        {
            "name": "currency",
            "type": {"type": "enum", "name": "Currency", "symbols": ["coin", "diamond"]},
        },
        {"name": "combo", "type": "long"},
        {
            "name": "platform",
            "type": {"type": "enum", "name": "Platform", "symbols": ["ios", "android", "web"]},
        },
        {"name": "ts", "type": "long"},
    ],
}
_PROTO_FIELDS = [(f["name"], f["type"]) for f in GIFT_AVRO["fields"]]


# -- tracing --------------------------------------------------------------------------------


def tracing(ctx: BenchContext) -> dict[str, Any]:
    _install_sdk()
    data = gift_dataset(ctx)
    probe = Probe()
    off = run_dispatcher(ctx, data, "traceoff", three(probe), probe, RETRY)
    probe = Probe()
    on = run_dispatcher(
        ctx,
        data,
        "traceon",
        three(probe),
        probe,
        RETRY,
        config={"tracing": {"enabled": True, "exporter": "none"}},
    )
    return {
        "messages": data.count,
        "partitions": len(data.ends),
        "subscribers": 3,
        "spans": 3 * data.count,
        "tracing_msgs_per_s": round(on.rate),
        "no_tracing_msgs_per_s": round(off.rate),
        "ratio": round(on.rate / off.rate, 3),
        "cost": round(1 - on.rate / off.rate, 3),
        "tracing_cpu": round(on.cpu, 2),
        "no_tracing_cpu": round(off.cpu, 2),
    }


def _install_sdk() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Dropped(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Dropped(), max_queue_size=65_536))
        trace.set_tracer_provider(provider)


# -- decode cost per format -----------------------------------------------------------------


def decode_formats(ctx: BenchContext) -> dict[str, Any]:
    count = ctx.count(DECODE_EVENTS)
    values = [orjson.loads(v) for _, v in events.gift_events(count, 20_000)]
    with tempfile.TemporaryDirectory(prefix="shunter-bench-formats-") as tmp:
        cases = _cases(Path(tmp), values)
        timings: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(ROUNDS):
            for name, (decode, payloads) in cases.items():
                started = time.perf_counter()
                for raw in payloads:
                    decode(raw)
                timings[name].append((time.perf_counter() - started) / len(payloads))
    per = {name: statistics.median(t) * 1e6 for name, t in timings.items()}
    json_us = per["json"]
    out: dict[str, Any] = {"events": count, "rounds": ROUNDS}
    for name, us in per.items():
        key = name.replace("-", "_")
        out[f"{key}_us"] = round(us, 3)
        out[f"{key}_vs_json"] = round(us / json_us, 2)
        out[f"{key}_bytes"] = round(statistics.mean(len(p) for p in cases[name][1]), 1)
    return out


Case = tuple[Callable[[bytes], Any], list[bytes]]


def _cases(tmp: Path, values: list[dict[str, Any]]) -> dict[str, Case]:
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext
    from fastavro import parse_schema, schemaless_writer

    (tmp / "gift.json").write_bytes(orjson.dumps(events.GIFT_SCHEMA))
    (tmp / "gift.avsc").write_bytes(orjson.dumps(GIFT_AVRO))
    gift_class = _proto_class(tmp)
    registry = {"url": f"mock://bench-{uuid.uuid4().hex[:8]}"}
    config = parse_config(
        {
            "topics": {
                "json": {"format": "json"},
                "json-schema": {"format": "json", "schema": "gift.json"},
                "avro": {"format": "avro", "schema": "gift.avsc"},
                "avro-registry": {"format": "avro", "schema_registry": registry},
                "protobuf": {"format": "protobuf", "message": "shunter_bench_gift_pb2:Gift"},
                "protobuf-registry": {
                    "format": "protobuf",
                    "message": "shunter_bench_gift_pb2:Gift",
                    "schema_registry": registry,
                },
            }
        },
        base_dir=str(tmp),
    )
    decoders = build_decoders(config)
    from ..decode.registry import fetcher_for

    client = fetcher_for(config.topics["avro-registry"].schema_registry, "bench").table.client  # type: ignore[arg-type]
    parsed = parse_schema(GIFT_AVRO)

    def plain_avro(value: dict[str, Any]) -> bytes:
        out = io.BytesIO()
        schemaless_writer(out, parsed, value)
        return out.getvalue()

    avro_wire = AvroSerializer(client, orjson.dumps(GIFT_AVRO).decode())
    proto_wire = ProtobufSerializer(gift_class, client, {"use.deprecated.format": False})
    messages = [gift_class(**v) for v in values]
    payloads = {
        "json": [orjson.dumps(v) for v in values],
        "avro": [plain_avro(v) for v in values],
        "avro-registry": [
            avro_wire(v, SerializationContext("avro-registry", MessageField.VALUE)) for v in values
        ],
        "protobuf": [m.SerializeToString() for m in messages],
        "protobuf-registry": [
            proto_wire(m, SerializationContext("protobuf-registry", MessageField.VALUE))
            for m in messages
        ],
    }
    payloads["json-schema"] = payloads["json"]
    for name in ("avro-registry", "protobuf-registry"):
        decode_now(config, name, payloads[name][0])  # the schema is fetched before timing
    return {name: (decoders[name], payloads[name]) for name in payloads}


def _proto_class(tmp: Path) -> Any:
    """A generated-like Protobuf ``Gift`` (the Avro record's fields), importable as
    ``shunter_bench_gift_pb2:Gift`` for the configuration."""
    import sys
    import types

    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    name = "shunter_bench_gift_pb2"
    module = sys.modules.get(name)
    if module is None:
        proto = descriptor_pb2.FileDescriptorProto(
            name="shunter_bench_gift.proto", package="shunter.bench", syntax="proto3"
        )
        message = proto.message_type.add(name="Gift")
        kinds = {"string": 9, "long": 3}  # TYPE_STRING, TYPE_INT64; enums sent as strings
        for number, (field, kind) in enumerate(_PROTO_FIELDS, start=1):
            message.field.add(
                name=field,
                number=number,
                type=kinds.get(kind, 9) if isinstance(kind, str) else 9,
                label=1,
            )
        pool = descriptor_pool.DescriptorPool()
        pool.Add(proto)
        module = types.ModuleType(name)
        module.Gift = message_factory.GetMessageClass(  # type: ignore[attr-defined]
            pool.FindMessageTypeByName("shunter.bench.Gift")
        )
        sys.modules[name] = module
    return module.Gift
