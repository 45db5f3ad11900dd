"""OpenTelemetry tracing (``tracing.enabled``, the ``otel`` extra): one CONSUMER span per
delivery, named and described after the messaging conventions (``process <topic>``).

Built only when enabled: with tracing off nothing here is imported and the record path
is untouched. When on, ``service.py`` wraps each subscriber's ``invoke`` and ``settle``:

- the span starts before the handler runs; its parent is the trace context of the last
  failed attempt (``shunter-traceparent``, on retry records) or else the record's own
  W3C ``traceparent`` (the producer's creation context), which it also links to, as the
  conventions ask of a process span;
- the handler runs with the span current (inline and async handlers, thread-isolated
  ones too; a worker process does not see it), so its own spans nest under it, and HTTP
  subscriber requests carry it (``traceparent``);
- a success ends the span at once; a failure is recorded with its exception and the span
  ends when the delivery is settled, with the outcome (``fast``, ``slow``, ``dlq``) and
  with its context current, so the retry or dead-letter record carries it in
  ``shunter-traceparent`` (``Settler``'s ``extra_headers``) and the next attempt
  continues the same trace as its child.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .. import __version__
from ..config import Config, TracingConfig
from ..deliver.invoke import is_async
from ..deliver.runtime import Invoke, Settle
from ..message import Message
from ..outcome import DeadLettered, Failed, Outcome, Succeeded
from ..settle.route import route

RETRY_TRACEPARENT = "shunter-traceparent"  # the failed attempt's context, on retry/DLQ records
RETRY_TRACESTATE = "shunter-tracestate"
_W3C = TraceContextTextMapPropagator()
_TIER_OUTCOME = {"fast": "retry-fast", "slow": "retry-slow", "dlq": "dead-letter"}

Handler = Callable[[Message], Any]


def tracer_provider(cfg: TracingConfig) -> tuple[Any, Callable[[], None] | None]:
    """The provider spans go to, and its shutdown if shunter installed it.

    An application that installed a provider keeps it; otherwise, with ``exporter:
    otlp``, the SDK's is installed with the OTLP exporter (``OTEL_EXPORTER_OTLP_*``)."""
    current = trace.get_tracer_provider()
    if cfg.exporter == "none" or not isinstance(current, trace.ProxyTracerProvider):
        return current, None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": cfg.service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider, provider.shutdown


class Tracing:
    """The span of each delivery: wrappers for ``invoke`` and ``settle``, and the header
    hooks for HTTP requests and retry/dead-letter records."""

    def __init__(self, config: Config, provider: Any = None) -> None:
        provider = provider if provider is not None else trace.get_tracer_provider()
        self._tracer = provider.get_tracer("shunter", __version__)
        self._group = config.kafka.group_id
        self._retry = config.retry
        # Failed deliveries not yet settled, and thread-isolated ones running: by id(msg),
        # the message kept with its span so that its id cannot be reused meanwhile.
        self._failed: dict[int, tuple[Message, Span]] = {}
        self._running: dict[int, tuple[Message, Span]] = {}

    # -- invoke -------------------------------------------------------------------------

    def invoke(self, invoke: Invoke, threaded: bool = False) -> Invoke:
        """``invoke`` with a span around each delivery (``threaded``: the handler runs on
        a thread, wrapped by ``handler``)."""
        failed, running = self._failed, self._running
        if is_async(invoke):  # the span is attached where the coroutine runs: in _finish

            def traced_async(msg: Message) -> Any:
                return self._finish(msg, self._start(msg), None, invoke)

            return traced_async

        def traced(msg: Message) -> Any:
            span = self._start(msg)
            if threaded:
                running[id(msg)] = (msg, span)
            try:
                with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                    result = invoke(msg)
            except BaseException as exc:
                running.pop(id(msg), None)
                self._failure(msg, span, exc)
                raise
            if result is None:
                _succeeded(span)
                return None
            if isinstance(result, asyncio.Future):  # a thread's: the runtime must see it
                result.add_done_callback(lambda f: self._thread_done(msg, span, f))
                failed[id(msg)] = (msg, span)  # a timeout settles before the thread ends
                return result
            if hasattr(result, "__await__"):
                return self._finish(msg, span, result, None)
            _succeeded(span)
            return result

        return traced

    async def _finish(
        self, msg: Message, span: Span, pending: Awaitable[Any] | None, call: Invoke | None
    ) -> None:
        """Await the delivery with its span current; ``call``: start it here first."""
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            result = call(msg) if call is not None else pending
            if result is not None:
                await result
        except BaseException as exc:
            self._failure(msg, span, exc)
            raise
        finally:
            otel_context.detach(token)
        _succeeded(span)

    def _thread_done(self, msg: Message, span: Span, future: asyncio.Future[Any]) -> None:
        """Runs before the runtime learns the thread's result (registered first)."""
        self._running.pop(id(msg), None)
        if id(msg) not in self._failed:
            return  # settled already (timed out while the thread ran): the span has ended
        exc = None if future.cancelled() else future.exception()
        if future.cancelled() or exc is not None:
            if exc is not None:
                span.record_exception(exc)
            return  # the runtime settles it as a failure, which ends the span
        del self._failed[id(msg)]
        _succeeded(span)

    def _failure(self, msg: Message, span: Span, exc: BaseException) -> None:
        if not isinstance(exc, asyncio.CancelledError):  # a timeout: its outcome says so
            span.record_exception(exc)
        self._failed[id(msg)] = (msg, span)

    def handler(self, handler: Handler) -> Handler:
        """A thread-isolated handler, run with its delivery's span current."""
        running = self._running

        def in_span(msg: Message) -> Any:
            entry = running.get(id(msg))
            if entry is None:
                return handler(msg)
            with trace.use_span(
                entry[1], end_on_exit=False, record_exception=False, set_status_on_exception=False
            ):
                return handler(msg)

        return in_span

    # -- settle ---------------------------------------------------------------------------

    def settle(self, settle: Settle) -> Settle:
        """``settle`` that ends a failed delivery's span with its outcome, settling with
        the span current (so the retry or dead-letter record carries its context)."""
        failed = self._failed

        def traced(msg: Message, outcome: Outcome, elapsed: float) -> None:
            entry = failed.pop(id(msg), None)
            if entry is None:
                settle(msg, outcome, elapsed)
                return
            span = entry[1]
            if isinstance(outcome, Failed | DeadLettered):
                tier = route(self._retry, msg.attempt, outcome).tier
                span.set_attribute("shunter.outcome", _TIER_OUTCOME.get(tier, tier))
                span.set_attribute("error.type", outcome.error_type)
                what = outcome.error if isinstance(outcome, Failed) else outcome.reason
                span.set_status(Status(StatusCode.ERROR, f"{outcome.error_type}: {what}"[:500]))
            elif isinstance(outcome, Succeeded):
                span.set_attribute("shunter.outcome", "succeeded")
            token = otel_context.attach(trace.set_span_in_context(span))
            try:
                settle(msg, outcome, elapsed)
            finally:
                otel_context.detach(token)
                span.end()

        return traced

    # -- headers --------------------------------------------------------------------------

    @staticmethod
    def inject_http(headers: dict[str, str]) -> None:
        """Add the current trace context to an HTTP subscriber request."""
        propagate.inject(headers)

    @staticmethod
    def retry_headers() -> list[tuple[str, bytes]]:
        """The current delivery's trace context for a retry or dead-letter record (its own
        ``traceparent``, the producer's, is kept as it was)."""
        if not trace.get_current_span().get_span_context().is_valid:
            return []
        carrier: dict[str, str] = {}
        _W3C.inject(carrier)
        out = [(RETRY_TRACEPARENT, carrier["traceparent"].encode())]
        if carrier.get("tracestate"):
            out.append((RETRY_TRACESTATE, carrier["tracestate"].encode()))
        return out

    # -- the span -------------------------------------------------------------------------

    def _start(self, msg: Message) -> Span:
        creation: dict[str, str] = {}
        retried: dict[str, str] = {}
        for name, value in msg.headers:
            if value is None:
                continue
            if name == RETRY_TRACEPARENT:
                retried["traceparent"] = value.decode("latin-1")
            elif name == RETRY_TRACESTATE:
                retried["tracestate"] = value.decode("latin-1")
            elif not name.startswith("shunter-"):
                creation[name.lower()] = value.decode("latin-1")
        created = propagate.extract(creation) if creation else None
        created_span = trace.get_current_span(created).get_span_context() if created else None
        links = [Link(created_span)] if created_span is not None and created_span.is_valid else None
        parent = _W3C.extract(retried) if retried else created
        record = msg._record
        span: Span = self._tracer.start_span(
            f"process {msg.topic}",
            context=parent if parent is not None else otel_context.Context(),
            kind=SpanKind.CONSUMER,
            links=links,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": msg.topic,
                "messaging.destination.partition.id": str(msg.partition),
                "messaging.kafka.offset": msg.offset,
                "messaging.consumer.group.name": self._group,
                "messaging.message.body.size": len(record.raw or b""),
                "shunter.caller": msg.caller,
                "shunter.category": msg.category,
                "shunter.attempt": msg.attempt,
            },
        )
        return span


def _succeeded(span: Span) -> None:
    span.set_attribute("shunter.outcome", "succeeded")
    span.end()
