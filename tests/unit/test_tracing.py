"""Tracing: one CONSUMER span per delivery, after the messaging conventions.

Given a record whose producer put a W3C ``traceparent`` on it, when a subscriber handles
it, then the delivery's span is a child of the producer's and links to it; the handler
(inline, async or on a thread) sees that span as the current one; a failure is recorded
with its exception and its outcome, and the retry record it settles to carries the span's
context, so that the next attempt is its child in the same trace.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shunter.commit.tracker import PartitionTracker
from shunter.config import parse_config
from shunter.deliver.runtime import SubscriberRuntime
from shunter.message import Message, Record
from shunter.observe.tracing import RETRY_TRACEPARENT, Tracing
from shunter.outcome import SUCCEEDED, Outcome

CONFIG = parse_config(
    {
        "kafka": {"group_id": "traced"},
        "retry": {"fast": {"attempts": 1, "delay": "1s"}, "slow": {"attempts": 0, "delay": "1s"}},
    }
)


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def produced(provider: TracerProvider) -> tuple[Any, list[tuple[str, bytes]]]:
    """A producer span and the headers its record would carry."""
    with provider.get_tracer("producer").start_as_current_span(
        "publish gifts", kind=SpanKind.PRODUCER
    ) as span:
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
    return span.get_span_context(), [(k, v.encode()) for k, v in carrier.items()]


def message(headers: list[tuple[str, bytes]], attempt: int = 1) -> Message:
    record = Record(
        "gifts", 2, 41, b"k", b'{"n": 1}', 0, headers, PartitionTracker(("gifts", 2)), 41
    )
    record.value = {"n": 1}
    return Message(record, "medal", "revenue", attempt)


def run(
    tracing: Tracing, handler: Any, msg: Message, threaded: bool = False
) -> list[tuple[Outcome, list[tuple[str, bytes]]]]:
    """Deliver ``msg`` through a real runtime; each settle with the retry headers the
    settler would add at that moment."""
    settled: list[tuple[Outcome, list[tuple[str, bytes]]]] = []
    done = asyncio.Event()

    def settle(m: Message, outcome: Outcome, elapsed: float) -> None:
        settled.append((outcome, tracing.retry_headers()))
        done.set()

    def settle_many(batch: list[Message], seconds: float, slow: list[float]) -> None:
        settled.extend((SUCCEEDED, []) for _ in batch)
        done.set()

    async def scenario() -> None:
        invoke: Any = handler
        if threaded:
            from shunter.config import SubscriberConfig
            from shunter.deliver.invoke import threaded as on_threads

            sub = SubscriberConfig(caller="medal", category="revenue", concurrency=2)
            invoke, pool = on_threads(tracing.handler(handler), sub, "subscribers[0]")
        runtime = SubscriberRuntime(
            "medal",
            tracing.invoke(invoke, threaded=threaded),
            tracing.settle(settle),
            timeout=0.5,
            settle_many=settle_many,
        )
        runtime.submit(msg)
        runtime.kick()
        await asyncio.wait_for(done.wait(), 5)
        if threaded:
            pool.shutdown(wait=True)

    asyncio.run(scenario())
    return settled


def only(exporter: InMemorySpanExporter) -> ReadableSpan:
    (span,) = exporter.get_finished_spans()
    return span


def test_a_delivery_is_a_consumer_span_child_of_the_producer_and_linked_to_it(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    producer, headers = produced(provider)
    exporter.clear()
    seen: list[Any] = []
    tracing = Tracing(CONFIG, provider)
    settled = run(tracing, lambda m: seen.append(trace.get_current_span()), message(headers))
    assert settled == [(SUCCEEDED, [])]
    span = only(exporter)
    assert span.name == "process gifts"
    assert span.kind is SpanKind.CONSUMER
    assert span.parent is not None and span.parent.span_id == producer.span_id
    assert span.context.trace_id == producer.trace_id
    assert [link.context.span_id for link in span.links] == [producer.span_id]
    assert dict(span.attributes or {}) == {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "gifts",
        "messaging.destination.partition.id": "2",
        "messaging.kafka.offset": 41,
        "messaging.consumer.group.name": "traced",
        "messaging.message.body.size": 8,
        "shunter.caller": "medal",
        "shunter.category": "revenue",
        "shunter.attempt": 1,
        "shunter.outcome": "succeeded",
    }
    assert seen[0].get_span_context().span_id == span.context.span_id  # the handler's span


def test_a_record_without_trace_context_starts_a_trace(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    run(Tracing(CONFIG, provider), lambda m: None, message([]))
    span = only(exporter)
    assert span.parent is None and not span.links


def test_a_failure_is_recorded_and_its_retry_record_carries_the_span(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    producer, headers = produced(provider)
    exporter.clear()
    tracing = Tracing(CONFIG, provider)
    inner: list[Any] = []

    async def failing(msg: Message) -> None:
        with provider.get_tracer("app").start_as_current_span("lookup") as own:
            inner.append(own)
        await asyncio.sleep(0)
        raise KeyError("anchor")

    ((_outcome, retry_headers),) = run(tracing, failing, message(headers))
    spans_by_name = {s.name: s for s in exporter.get_finished_spans()}
    first = spans_by_name["process gifts"]
    assert spans_by_name["lookup"].parent.span_id == first.context.span_id  # nested
    assert first.status.status_code is StatusCode.ERROR
    assert first.attributes["shunter.outcome"] == "retry-fast"
    assert first.attributes["error.type"] == "KeyError"
    assert [e.name for e in first.events] == ["exception"]
    assert first.events[0].attributes["exception.type"] == "KeyError"
    (name, value), *_ = retry_headers
    assert name == RETRY_TRACEPARENT
    assert value.decode().split("-")[2] == format(first.context.span_id, "016x")

    # the retry record: its own headers (the producer's) and shunter's
    exporter.clear()
    retried = message([*headers, *retry_headers], attempt=2)
    ((_outcome, _),) = run(tracing, failing, retried)
    second = next(s for s in exporter.get_finished_spans() if s.name == "process gifts")
    assert second.context.trace_id == producer.trace_id  # one trace
    assert second.parent.span_id == first.context.span_id  # continues the failed attempt
    assert [link.context.span_id for link in second.links] == [producer.span_id]
    assert second.attributes["shunter.attempt"] == 2
    assert second.attributes["shunter.outcome"] == "dead-letter"


def test_a_timeout_ends_the_span_with_its_outcome(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans

    async def slow(msg: Message) -> None:
        await asyncio.sleep(5)

    ((_outcome, headers),) = run(Tracing(CONFIG, provider), slow, message([]))
    span = only(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert "DeliveryTimeout" in (span.status.description or "")
    assert span.attributes["shunter.outcome"] == "retry-fast"
    assert headers and headers[0][0] == RETRY_TRACEPARENT


def test_a_thread_isolated_handler_sees_its_span(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    seen: list[tuple[str, int]] = []

    def on_thread(msg: Message) -> None:
        seen.append(
            (threading.current_thread().name, trace.get_current_span().get_span_context().span_id)
        )

    run(Tracing(CONFIG, provider), on_thread, message([]), threaded=True)
    span = only(exporter)
    assert seen[0][0].startswith("shunter-medal")
    assert seen[0][1] == span.context.span_id
    assert span.attributes["shunter.outcome"] == "succeeded"


def test_http_requests_carry_the_current_span() -> None:
    provider = TracerProvider()
    with provider.get_tracer("t").start_as_current_span("process gifts") as span:
        headers: dict[str, str] = {}
        Tracing.inject_http(headers)
    assert headers["traceparent"].split("-")[2] == format(span.get_span_context().span_id, "016x")


def test_the_settler_hook_adds_the_failed_span_to_the_retry_record(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """Through the real Settler: the retry record keeps the producer's ``traceparent`` and
    gains the failed delivery's ``shunter-traceparent``."""
    from shunter.observe.stats import Stats
    from shunter.settle import Settler

    provider, exporter = spans
    producer_ctx, headers = produced(provider)
    config = parse_config(
        {
            "topics": {"gifts": {}},
            "categories": {"revenue": {"topics": ["gifts"]}},
            "subscribers": [{"caller": "medal", "category": "revenue", "handler": "x:y"}],
        }
    )
    sent: list[list[tuple[str, bytes]]] = []

    class Producer:
        def send(self, topic: str, key: Any, value: Any, hdrs: Any, done: Any) -> None:
            sent.append(hdrs)
            asyncio.get_running_loop().call_soon(done, None)

    tracing = Tracing(config, provider)

    def failing(msg: Message) -> None:
        raise ValueError("no anchor")

    async def scenario() -> None:
        settler = Settler(
            config,
            Producer(),  # type: ignore[arg-type]
            Stats({"medal": "revenue"}),
            extra_headers=tracing.retry_headers,
        )
        msg = message(headers)
        msg._record.ptrack.hold(41, 1)
        runtime = SubscriberRuntime("medal", tracing.invoke(failing), tracing.settle(settler))
        runtime.submit(msg)
        runtime.kick()
        for _ in range(100):
            if sent:
                break
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    span = next(s for s in exporter.get_finished_spans() if s.name == "process gifts")
    written = dict(sent[0])
    assert written["traceparent"] == dict(headers)["traceparent"]  # the producer's, kept
    assert written[RETRY_TRACEPARENT].decode().split("-")[1:3] == [
        format(producer_ctx.trace_id, "032x"),
        format(span.context.span_id, "016x"),
    ]


def test_tracing_off_leaves_the_record_path_untouched() -> None:
    """Off (the default): the runtime calls the handler itself and settles straight into
    the settler; on: both are wrapped."""
    from shunter.service import Service

    def handler(msg: Message) -> None:
        pass

    class FakeSettler:
        def __call__(self, msg: Message, outcome: Outcome, elapsed: float) -> None:
            pass

        def succeeded(self, done: list[tuple[Message, float]]) -> None:
            pass

    base = {
        "topics": {"gifts": {}},
        "categories": {"revenue": {"topics": ["gifts"]}},
        "subscribers": [{"caller": "medal", "category": "revenue"}],
    }
    settler = FakeSettler()
    off = Service(parse_config(base), {"medal": handler})
    runtime = off._runtimes(None, settler)["medal"]  # type: ignore[arg-type]
    assert off.tracing is None
    assert runtime._invoke is handler and runtime._settle is settler

    on = Service(parse_config({**base, "tracing": {"enabled": True, "exporter": "none"}}), {})
    on.handlers = {"medal": handler}
    on._start_tracing()
    runtime = on._runtimes(None, settler)["medal"]  # type: ignore[arg-type]
    assert runtime._invoke is not handler and runtime._settle is not settler


def test_a_failing_thread_isolated_handler_records_its_exception(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans

    def on_thread(msg: Message) -> None:
        raise LookupError("no such anchor")

    ((_outcome, headers),) = run(Tracing(CONFIG, provider), on_thread, message([]), threaded=True)
    span = only(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert [e.attributes["exception.type"] for e in span.events] == ["LookupError"]
    assert span.attributes["shunter.outcome"] == "retry-fast"
    assert headers and headers[0][0] == RETRY_TRACEPARENT
