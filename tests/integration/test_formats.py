"""Avro and Protobuf topics on a real broker, and tracing across retries and HTTP.

Given topics in four formats — Avro and Protobuf in the Confluent wire format (a
``mock://`` registry, the schemas registered by the producing side) and plain Avro and
Protobuf (a local .avsc, a generated message class) — when shunter consumes them, then an
in-process subscriber gets dicts (Avro) and generated messages (Protobuf) with the exact
bytes in ``msg.raw``, a filtered HTTP subscriber gets the matching ones as JSON, a retried
delivery decodes its original bytes again, and every malformed payload goes to the
dead-letter topic once, at stage ``decode``, with its reason and its original bytes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from confluent_kafka import Producer

import shunter
from formatdata import (
    GIFT_AVSC,
    GUARD_MESSAGE,
    free_port,
    gift,
    plain_avro,
    registry_url,
    stub_registry,
    wire_avro,
    wire_protobuf,
)
from formatdata.events_pb2 import GuardPurchase
from kafkatools import Broker, config
from shunter.config import SchemaRegistryConfig
from shunter.decode import decode_now
from shunter.decode.registry import fetcher_for
from shunter.errors import RejectedMessage
from shunter.settle import headers as h
from shunter.testing import DispatcherThread

LOCAL = ["127.0.0.1"]


class Hooks:
    """An HTTP endpoint on 127.0.0.1 that answers 200 and records each POST."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        calls = self.calls

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def bodies(self) -> list[Any]:
        return [json.loads(body) for _, body in list(self.calls)]


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    server = Hooks()
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


def produce(broker: Broker, topic: str, values: list[bytes], headers: Any = None) -> None:
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5})
    for i, value in enumerate(values):
        producer.produce(topic, value=value, key=f"k{i}".encode(), headers=headers)
    assert producer.flush(30) == 0


def dead_letters(broker: Broker, group: str) -> list[Any]:
    return broker.read_all(f"{group}.dlq")


@pytest.mark.kafka
def test_avro_and_protobuf_topics_reach_in_process_and_http_subscribers(
    broker: Broker, unique: str, hooks: Hooks
) -> None:
    topics = {
        "avro-reg": f"fmt-avro-reg-{unique}",
        "proto-reg": f"fmt-proto-reg-{unique}",
        "avro": f"fmt-avro-{unique}",
        "proto": f"fmt-proto-{unique}",
    }
    broker.create({t: 2 for t in topics.values()})
    registry = {"url": registry_url()}
    client = fetcher_for(SchemaRegistryConfig(**registry), "test").table.client
    group = f"g-{unique}"
    formats = {
        topics["avro-reg"]: {"format": "avro", "schema_registry": registry},
        topics["proto-reg"]: {
            "format": "protobuf",
            "message": GUARD_MESSAGE,
            "schema_registry": registry,
        },
        topics["avro"]: {"format": "avro", "schema": str(GIFT_AVSC)},
        topics["proto"]: {"format": "protobuf", "message": GUARD_MESSAGE},
    }
    app = shunter.Dispatcher(
        config(
            broker,
            group,
            topics=formats,
            categories={
                "all": {"topics": list(topics.values())},
                "big": {"topics": list(topics.values()), "where": "value.amount >= 15"},
            },
            subscribers=[
                {"caller": "collector", "category": "all", "ordering": "none"},
                {
                    "caller": "hook",
                    "category": "big",
                    "ordering": "none",
                    "http": {"url": hooks.url, "allow_private": LOCAL},
                },
            ],
        )
    )
    seen: list[tuple[str, int, Any, bytes]] = []
    failed_once: set[int] = set()

    @app.subscriber("all", caller="collector")
    def collect(msg: shunter.Message) -> None:
        if msg.topic == topics["avro-reg"] and msg.value["amount"] == 3 and msg.attempt == 1:
            failed_once.add(msg.offset)
            raise RuntimeError("first attempt fails: the retry decodes the bytes again")
        seen.append((msg.topic, msg.attempt, msg.value, msg.raw))

    sent: dict[str, list[bytes]] = {
        topics["avro-reg"]: [wire_avro(client, topics["avro-reg"], gift(n)) for n in range(20)],
        topics["proto-reg"]: [
            wire_protobuf(client, topics["proto-reg"], GuardPurchase(user_id=f"u{n}", amount=n))
            for n in range(20)
        ],
        topics["avro"]: [plain_avro(gift(n)) for n in range(20)],
        topics["proto"]: [
            GuardPurchase(user_id=f"u{n}", amount=n, kind=GuardPurchase.BUY).SerializeToString()
            for n in range(20)
        ],
    }
    # What the pipeline must do with a schema not fetched yet (hold the record, decode it
    # again: DecodeUnavailable) is the pipeline's; here the look-up table is filled first.
    warm = app.config
    decode_now(warm, topics["avro-reg"], sent[topics["avro-reg"]][0])
    decode_now(warm, topics["proto-reg"], sent[topics["proto-reg"]][0])
    malformed = {
        topics["avro-reg"]: [
            b"{" + sent[topics["avro-reg"]][0][1:],  # wrong magic byte
            sent[topics["avro-reg"]][0][:4],  # truncated
            b"\x00\x00\x00\x30\x39" + plain_avro(gift(1)),  # unknown schema id 12345
        ],
        topics["proto-reg"]: [b"\x07" + sent[topics["proto-reg"]][0][1:]],
        topics["avro"]: [plain_avro(gift(1))[:5]],
        topics["proto"]: [b"\x0a\xff\xff"],
    }
    with pytest.raises(RejectedMessage):  # the registry's "no such schema", looked up
        decode_now(warm, topics["avro-reg"], malformed[topics["avro-reg"]][2])
    for topic, values in sent.items():
        produce(broker, topic, values + malformed[topic])

    with DispatcherThread(app) as running:
        running.wait_for(lambda: len(seen) >= 80 and len(hooks.calls) >= 20, timeout=90)
        running.wait_for(lambda: len(dead_letters(broker, group)) >= 6, timeout=60)

    by_topic: dict[str, list[tuple[int, Any, bytes]]] = {}
    for topic, attempt, value, raw in seen:
        by_topic.setdefault(topic, []).append((attempt, value, raw))
    for topic, got in by_topic.items():
        assert sorted(raw for _, _, raw in got) == sorted(sent[topic]), "msg.raw is not exact"
    assert {type(v) for _, v, _ in by_topic[topics["avro-reg"]]} == {dict}
    assert {type(v) for _, v, _ in by_topic[topics["avro"]]} == {dict}
    assert {type(v) for _, v, _ in by_topic[topics["proto-reg"]]} == {GuardPurchase}
    assert {type(v) for _, v, _ in by_topic[topics["proto"]]} == {GuardPurchase}
    assert sorted(v["amount"] for _, v, _ in by_topic[topics["avro-reg"]]) == list(range(20))
    retried = [(a, v) for a, v, _ in by_topic[topics["avro-reg"]] if v["amount"] == 3]
    assert retried == [(2, gift(3))] and failed_once, "the retry did not decode the same value"

    bodies = hooks.bodies()
    assert len(bodies) == 20  # 5 of each topic pass the filter (amount 15..19)
    assert sorted(int(b["amount"]) for b in bodies) == sorted(list(range(15, 20)) * 4)
    assert all(b["user_id"] == f"u{int(b['amount'])}" for b in bodies)

    dlq = dead_letters(broker, group)
    assert len(dlq) == 6, "a malformed payload was dead-lettered twice or not at all"
    reasons = {}
    for record in dlq:
        info = h.decode(record.headers())
        assert info.stage == "decode" and info.error_type == "RejectedMessage"
        assert record.value() in malformed[info.origin_topic], "the DLQ copy is not exact"
        reasons[record.value()] = info.error
    assert reasons[malformed[topics["avro-reg"]][0]].startswith("wrong magic byte 0x7b")
    assert reasons[malformed[topics["avro-reg"]][1]].startswith("truncated payload: 4 bytes")
    assert reasons[malformed[topics["avro-reg"]][2]].startswith("unknown schema id 12345")
    assert reasons[malformed[topics["proto-reg"]][0]].startswith("wrong magic byte 0x07")
    assert reasons[malformed[topics["avro"]][0]].startswith("not an Avro shunter.test.Gift")
    assert reasons[malformed[topics["proto"]][0]].startswith(
        "not a Protobuf shunter.test.GuardPurchase"
    )


@pytest.mark.kafka
def test_an_unreachable_registry_holds_records_and_loses_none_when_it_returns(
    broker: Broker, unique: str
) -> None:
    topic = f"fmt-held-{unique}"
    group = f"g-{unique}"
    broker.create({topic: 2})
    port = free_port()
    producer_client = fetcher_for(SchemaRegistryConfig(url=registry_url()), "test").table.client
    values = [wire_avro(producer_client, topic, gift(n)) for n in range(20)]  # schema id 1
    app = shunter.Dispatcher(
        config(
            broker,
            group,
            topics={
                topic: {
                    "format": "avro",
                    "schema_registry": {"url": f"http://127.0.0.1:{port}", "timeout": "1s"},
                }
            },
            categories={"c": {"topics": [topic]}},
            subscribers=[{"caller": "collector", "category": "c", "ordering": "none"}],
        )
    )
    seen: list[int] = []

    @app.subscriber("c", caller="collector")
    def collect(msg: shunter.Message) -> None:
        seen.append(msg.value["amount"])

    produce(broker, topic, values)
    with DispatcherThread(app) as running:
        running.wait_for(lambda: running.assigned)
        with pytest.raises(AssertionError):  # nothing gets through while it is down
            running.wait_for(lambda: bool(seen), timeout=4)
        with stub_registry(port, {1: GIFT_AVSC.read_text()}):
            running.wait_for(lambda: sorted(set(seen)) == list(range(20)), timeout=20)
    assert dead_letters(broker, group) == [], "an unreachable registry dead-lettered records"


# -- tracing -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exporter() -> Any:
    """The SDK with an in-memory exporter as the process's tracer provider (set once)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return memory


@pytest.mark.kafka
def test_one_trace_across_a_fast_tier_retry_and_an_http_subscriber(
    broker: Broker, unique: str, hooks: Hooks, exporter: Any
) -> None:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    topic = f"traced-{unique}"
    group = f"g-{unique}"
    broker.create({topic: 1})
    app = shunter.Dispatcher(
        config(
            broker,
            group,
            topics={topic: {}},
            categories={"c": {"topics": [topic]}},
            subscribers=[
                {"caller": "flaky", "category": "c"},
                {
                    "caller": "hook",
                    "category": "c",
                    "http": {"url": hooks.url, "allow_private": LOCAL},
                },
            ],
            tracing={"enabled": True, "exporter": "none"},
        )
    )
    tracer = trace.get_tracer("test-producer")
    inner: list[int] = []

    @app.subscriber("c", caller="flaky")
    def flaky(msg: shunter.Message) -> None:
        with tracer.start_as_current_span("handler work") as work:
            inner.append(work.get_span_context().span_id)
        if msg.attempt == 1:
            raise RuntimeError("first attempt fails")

    with tracer.start_as_current_span(f"publish {topic}", kind=SpanKind.PRODUCER) as publish:
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
    headers = [(k, v.encode()) for k, v in carrier.items()]
    produce(broker, topic, [b'{"n": 1}'], headers=headers)
    producer = publish.get_span_context()

    def delivery_spans() -> list[Any]:
        return [s for s in exporter.get_finished_spans() if s.name == f"process {topic}"]

    with DispatcherThread(app) as running:
        running.wait_for(lambda: len(delivery_spans()) >= 3 and len(hooks.calls) >= 1)

    spans = delivery_spans()
    flaky_spans = sorted(
        (s for s in spans if s.attributes["shunter.caller"] == "flaky"),
        key=lambda s: s.attributes["shunter.attempt"],
    )
    (hook_span,) = [s for s in spans if s.attributes["shunter.caller"] == "hook"]
    first, second = flaky_spans
    assert {s.context.trace_id for s in spans} == {producer.trace_id}, "not one trace"
    assert first.kind is SpanKind.CONSUMER
    assert first.parent.span_id == producer.span_id
    assert first.status.status_code is StatusCode.ERROR
    assert first.attributes["shunter.outcome"] == "retry-fast"
    assert [e.attributes["exception.type"] for e in first.events] == ["RuntimeError"]
    assert second.attributes["shunter.attempt"] == 2
    assert second.parent.span_id == first.context.span_id  # the retry continues the trace
    assert [link.context.span_id for link in second.links] == [producer.span_id]
    assert second.attributes["shunter.outcome"] == "succeeded"
    assert second.attributes["messaging.destination.name"] == topic
    assert second.attributes["messaging.consumer.group.name"] == group
    handler_spans = [s for s in exporter.get_finished_spans() if s.name == "handler work"]
    assert {s.parent.span_id for s in handler_spans} == {
        first.context.span_id,
        second.context.span_id,
    }
    assert hook_span.parent.span_id == producer.span_id
    request_headers, _ = hooks.calls[0]
    assert request_headers["traceparent"].split("-")[2] == format(hook_span.context.span_id, "016x")


@pytest.mark.kafka
def test_foreground_replay_decodes_a_registry_avro_record(
    broker: Broker,
    unique: str,
    tmp_path: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``shunter replay`` hands the handler the decoded value (waiting for the registry)."""
    import logging
    import sys

    import yaml

    from shunter.cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    topic = f"fmt-replay-{unique}"
    broker.create({topic: 1})
    registry = {"url": registry_url()}
    client = fetcher_for(SchemaRegistryConfig(**registry), "test").table.client
    produce(broker, topic, [wire_avro(client, topic, gift(42))])
    (tmp_path / "replay_handlers.py").write_text(
        "def on_gift(msg):\n    print('GOT', type(msg.value).__name__, msg.value['amount'])\n"
    )
    data = config(
        broker,
        f"g-{unique}",
        topics={topic: {"format": "avro", "schema_registry": registry}},
        categories={"c": {"topics": [topic]}},
        subscribers=[{"caller": "medal", "category": "c", "handler": "replay_handlers:on_gift"}],
    )
    (tmp_path / "shunter.yaml").write_text(yaml.safe_dump(data))
    argv = ["replay", "-c", str(tmp_path / "shunter.yaml"), "--topic", topic]
    code = main([*argv, "--partition", "0", "--offset", "0", "--caller", "medal"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "GOT dict 42" in out
