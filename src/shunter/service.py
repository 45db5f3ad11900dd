"""Assembling and running one shunter instance.

Start-up order: broker → topics → decoders, router, subscribers, settler → control topic
(followed live; paused callers are paused before anything is consumed) → pipeline →
admin API → consumer. Shutdown reverses it: stop fetching → drain (bounded) → final
synchronous commit on leaving the group → close subscribers → stop following the control
topic → flush the producer.

Readiness (``readiness()``): this instance follows the control topic, is a member of its
group and owns at least one source-topic partition. A member that owns none — retry-tier
partitions only, or nothing because the group has more members than source partitions —
is *not ready*, by choice: ready means "consuming its share of the source topics", and a
spare instance is not (it is alive: ``/health``). Run at most as many instances as the
source topics have partitions where a rollout waits for readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson

from .broker.admin import ensure_topics, existing_topics
from .broker.embedded import CONSUMER_SETTINGS, EmbeddedBroker
from .classify import Router
from .config import Config
from .crashguard.guard import CrashGuard
from .crashguard.sandbox import SandboxSpec
from .crashguard.supervisor import touch_progress
from .crashguard.watchdog import start_watchdog
from .decode import build_decoders
from .deliver import SubscriberRuntime
from .deliver.invoke import Handler, inline, threaded
from .errors import ConfigError
from .observe.control import ControlTopic
from .observe.flood import FloodGuard
from .observe.logs import kafka_logger
from .observe.pause import CallerPauses
from .observe.stats import Stats
from .pipeline import Pipeline
from .settle import Settler, skip
from .settle.producer import ReliableProducer

log = logging.getLogger("shunter")
KAFKA_LOG = kafka_logger()  # librdkafka's lines, rate-limited (observe/logs.py)
PARKED_RETENTION = str(30 * 24 * 3600 * 1000)

# The collector's generation-0 threshold while serving (CPython's default is 700). Every
# delivery allocates a few short-lived objects and nearly none are cyclic, so at the
# default the collector runs every ~200 messages and costs ~2 µs per message; at this
# threshold it runs ~70 times less often, for a few MB more of garbage waiting at most.
GC_GEN0_THRESHOLD = 50_000
# linger.ms of the producer of retry-tier, dead-letter and control records. A handler
# failing on 1 % of 200,000 messages a second writes 2,000 records a second; each batch
# of a partition is compressed on its own (see ReliableProducer), so they are gathered for
# 20 ms: ~50 requests a second instead of one per record. No delivery waits on these
# writes; only the offsets they settle are committed up to 20 ms later.
TIER_LINGER_MS = 20


@contextlib.contextmanager
def _collector_tuned_for_serving() -> Iterator[None]:
    """While serving: everything built at start-up (modules, configuration, clients) is
    frozen out of the collector's scans, and generation 0 is collected less often. Both
    are undone on the way out, so a process that embeds a Dispatcher gets its own
    settings back."""
    saved = gc.get_threshold()
    gc.collect()  # what start-up left as garbage is not frozen with the rest
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *saved[1:])
    try:
        yield
    finally:
        gc.set_threshold(*saved)
        gc.unfreeze()


class Service:
    def __init__(self, config: Config, handlers: dict[str, Handler | None]) -> None:
        self.config = config
        self.handlers = handlers
        self.broker: EmbeddedBroker | None = None
        self.bootstrap = config.kafka.bootstrap_servers
        self.pipeline: Pipeline | None = None
        self.stats = Stats({s.caller: s.category for s in config.subscribers})
        self.ready = asyncio.Event()
        self._pools: list[ThreadPoolExecutor] = []
        self._closers: list[Any] = []
        self._producers: list[ReliableProducer] = []  # besides the settler's: the journal's
        self.stuck_threads = 0  # handler threads still running past their timeout at exit
        self.control: ControlTopic | None = None
        self.pauses: CallerPauses | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._skip_asked_ms: dict[skip.SkipRequest, int] = {}  # when each was requested
        self.source: Any = None  # the KafkaSource, once it exists
        self.tracing: Any = None  # observe.tracing.Tracing when tracing.enabled, else None

    def client_settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = dict(self.config.kafka.client)
        settings["bootstrap.servers"] = self.bootstrap
        settings["logger"] = KAFKA_LOG  # librdkafka's own lines go through logging too
        return settings

    def _start_broker(self) -> None:
        if self.bootstrap is not None:
            return
        self.broker = EmbeddedBroker().start()
        self.bootstrap = self.broker.bootstrap
        log.warning(
            "kafka.bootstrap_servers is not set: started the embedded development "
            "broker on %s (memory only: everything on it is lost when it stops)",
            self.bootstrap,
        )

    def _ensure_topics(self) -> None:
        settings = self.client_settings()
        cfg = self.config
        internal = {
            t: cfg.retry.partitions
            for t in (cfg.fast_topic, cfg.slow_topic, cfg.dlq_topic, cfg.parked_topic)
        }
        # A paused caller's backlog lives in the parked topic for as long as the pause
        # lasts: kept 30 days, not the broker's default (7 on Apache Kafka).
        ensure_topics(
            settings, internal, configs={cfg.parked_topic: {"retention.ms": PARKED_RETENTION}}
        )
        ensure_topics(
            settings,
            {cfg.control_topic: 1},
            configs={cfg.control_topic: {"cleanup.policy": "compact"}},
        )
        if cfg.crash_guard.enabled:
            ensure_topics(
                settings,
                {cfg.journal_topic: 1},
                configs={cfg.journal_topic: {"cleanup.policy": "compact"}},
            )
        missing = sorted(set(cfg.topics) - existing_topics(settings))
        if missing:
            log.warning("source topics not found (yet): %s", ", ".join(missing))

    def _runtimes(
        self, loop: asyncio.AbstractEventLoop, settler: Settler
    ) -> dict[str, SubscriberRuntime]:
        runtimes = {}
        for i, sub in enumerate(self.config.subscribers):
            handler = self.handlers.get(sub.caller)
            tracing = self.tracing
            if sub.http is not None:
                from .deliver.http import http_invoke

                inject = tracing.inject_http if tracing is not None else None
                invoke, closer = http_invoke(sub, f"subscribers[{i}]", self.stats, inject=inject)
                self._closers.append(closer)
            elif handler is None:
                raise ConfigError([f"subscribers[{i}]: no handler for caller {sub.caller!r}"])
            elif sub.isolation == "thread":
                if tracing is not None:
                    handler = tracing.handler(handler)
                invoke, pool = threaded(handler, sub, f"subscribers[{i}]")
                self._pools.append(pool)
            elif sub.isolation == "process":
                from .deliver.process import process_invoke

                invoke, closer = process_invoke(handler, sub, f"subscribers[{i}]")
                self._closers.append(closer)
            else:
                invoke = inline(handler)
            settle: Any = settler
            if tracing is not None:  # a span per delivery (observe/tracing.py)
                invoke = tracing.invoke(invoke, threaded=sub.isolation == "thread")
                settle = tracing.settle(settler)
            runtimes[sub.caller] = SubscriberRuntime(
                sub.caller,
                invoke,
                settle,
                ordering=sub.ordering,
                # A delivery waiting for a worker process must not spend its timeout there.
                concurrency=(
                    min(sub.concurrency, sub.workers)
                    if sub.isolation == "process"
                    else sub.concurrency
                ),
                timeout=sub.timeout,
                settle_many=settler.succeeded,
                # An HTTP request or a worker process's answer is always waited for.
                eager=sub.http is None and sub.isolation != "process",
                threaded=sub.isolation == "thread",
            )
        return runtimes

    def _sandbox_specs(self) -> dict[str, SandboxSpec] | None:
        """How to re-run each in-process caller in a sandbox after a death; None when the
        sandbox is off or some in-process handler cannot be run in another process (its
        suspects then run one at a time in this process, as without a sandbox)."""
        guard = self.config.crash_guard
        if not guard.sandbox:
            return None
        from .deliver.process import sandbox_reference

        specs = {}
        for sub in self.config.subscribers:
            handler = self.handlers.get(sub.caller)
            if sub.http is not None or sub.isolation == "process" or handler is None:
                continue
            ref = sandbox_reference(handler, sub)
            if ref is None:
                log.warning(
                    "caller %s's handler cannot run in another process (defined in the "
                    "__main__ script, or not importable): after a crash, suspects are "
                    "re-run one at a time in this process instead of a sandbox",
                    sub.caller,
                )
                return None
            memory = sub.memory_limit_mb or guard.sandbox_memory_mb
            specs[sub.caller] = SandboxSpec(ref, sub.timeout, memory)
        return specs

    async def run(self, stop: asyncio.Event) -> None:
        from .consume import KafkaSource

        loop = asyncio.get_running_loop()
        watch = self.config.crash_guard
        stop_watchdog = (
            start_watchdog(
                loop, watch.loop_blocked_after, end_after=watch.loop_blocked_restart_after
            )
            if watch.loop_blocked_after > 0 or watch.loop_blocked_restart_after > 0
            else None
        )
        await asyncio.to_thread(self._start_broker)
        try:
            await asyncio.to_thread(self._ensure_topics)
            # Retry tiers, dead letters and the control topic: no write of theirs is
            # waited on by a delivery, so they linger to share requests (a failing
            # handler's records, one acknowledgement each, would otherwise cost a request,
            # a compression and a wake-up of the loop apiece). The journal, which
            # deliveries do wait for, has its own producer that does not linger.
            # (kafka.client's own settings come last: an operator's linger.ms wins.)
            producer = ReliableProducer(
                {"linger.ms": TIER_LINGER_MS, **self.client_settings()}, loop
            )
            flood = self.flood = FloodGuard(self.config.retry.flood_guard)
            self._start_tracing()
            settler = Settler(
                self.config,
                producer,
                self.stats,
                flood=flood,
                extra_headers=self.tracing.retry_headers if self.tracing is not None else None,
            )
            runtimes = self._runtimes(loop, settler)
            control, pauses = await self._start_control(loop, producer, settler, runtimes, flood)
            guard = None
            if self.config.crash_guard.enabled:
                # Journal records are small: not compressed (see ReliableProducer).
                journal_producer = ReliableProducer(
                    {"compression.type": "none", **self.client_settings()}, loop
                )
                self._producers.append(journal_producer)
                guard = CrashGuard(
                    journal_producer,
                    self.config.journal_topic,
                    self.client_settings(),
                    self.config.crash_guard.quarantine_after,
                )
            pipeline = self.pipeline = Pipeline(
                self.config,
                build_decoders(self.config),
                Router(self.config),
                runtimes,
                settler,
                self.stats,
                guard,
                self._sandbox_specs() if guard is not None else None,
            )
            consumer_settings = {
                **self.client_settings(),
                **self.config.kafka.consumer,
                "group.id": self.config.kafka.group_id,
            }
            if self.broker is not None:
                consumer_settings = {**CONSUMER_SETTINGS, **consumer_settings}
            topics = [*self.config.topics, self.config.fast_topic, self.config.slow_topic]
            source = KafkaSource(
                consumer_settings,
                topics,
                pipeline,
                loop,
                batch_size=self.config.kafka.batch_size,
                max_in_flight=self.config.kafka.max_in_flight,
                revoke_timeout=self.config.kafka.drain_timeout + 30.0,
                source_topics=list(self.config.topics),
            )
            pipeline.source = self.source = source
            pipeline.skipper.applied = self._skip_applied
            control.subscribe(skip.REQUEST, self._skip_requested)
            admin = await self._start_admin()
            source.start()
            self.ready.set()
            log.info(
                "shunter is running: %d topics, %d subscribers, group %s",
                len(self.config.topics),
                len(runtimes),
                self.config.kafka.group_id,
            )
            with _collector_tuned_for_serving():
                await self._serve(stop, pipeline)
            await self._shutdown(source, pipeline, runtimes, producer, control, pauses)
            if admin is not None:
                await admin.cleanup()
        finally:
            if self.control is not None:
                await self.control.stop()  # also when start-up failed half-way
            if stop_watchdog is not None:
                stop_watchdog()
            if self.broker is not None:
                self.broker.stop()

    async def _serve(self, stop: asyncio.Event, pipeline: Pipeline) -> None:
        interval = self.config.kafka.commit_interval
        touched = 0.0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if pipeline.commit_due() and time.monotonic() - touched >= 1.0:
                touch_progress()  # the supervisor restarts a worker that moved on at once
                touched = time.monotonic()
            pipeline.watch()

    async def _shutdown(
        self,
        source: Any,
        pipeline: Pipeline,
        runtimes: dict[str, SubscriberRuntime],
        producer: ReliableProducer,
        control: ControlTopic,
        pauses: CallerPauses,
    ) -> None:
        log.info("stopping: draining in-flight deliveries")
        source.stop_fetching()
        timeout = self.config.kafka.drain_timeout
        if not await pipeline.drain(timeout):
            log.warning(
                "some deliveries did not settle within %.0fs; they stay uncommitted "
                "and will be redelivered",
                timeout,
            )
        pipeline.settler.flush_repeats()  # failures counted but not logged yet
        # Commit synchronously on the way out of the group: forget what the periodic
        # (asynchronous) commits claimed, since they may not have reached the broker.
        for tracker in pipeline.tracker.partitions.values():
            tracker.committed = -1
        source.stop()
        # Bounded: the consumer's own revocation (drain already done), commit and close.
        leave = self.config.kafka.drain_timeout + 60.0
        await asyncio.to_thread(source.join, leave)
        if source.alive():
            log.error("the consumer did not leave the group in %.0fs; exiting without it", leave)
        for runtime in runtimes.values():
            await runtime.close()
        await pipeline.gate.close()
        for closer in self._closers:
            await closer()
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)
        self.stuck_threads = sum(r.lost_slots for r in runtimes.values())
        if self.stuck_threads:
            log.warning(
                "%d handler threads are still stuck past their timeout; their "
                "deliveries are settled, and the process exits without them",
                self.stuck_threads,
            )
        await pauses.close()
        await control.stop()
        await asyncio.to_thread(producer.close)
        for other in self._producers:
            await asyncio.to_thread(other.close)
        log.info("stopped")

    def _start_tracing(self) -> None:
        if not self.config.tracing.enabled:
            return
        try:
            from .observe.tracing import Tracing, tracer_provider

            provider, shutdown = tracer_provider(self.config.tracing)
        except ImportError as exc:
            raise ConfigError(
                [f"tracing.enabled: needs the otel extra: pip install 'shunter[otel]' ({exc})"]
            ) from None
        self.tracing = Tracing(self.config, provider)
        if shutdown is not None:  # flush the spans still batched on the way out
            self._closers.append(lambda: asyncio.to_thread(shutdown))

    async def _start_control(
        self,
        loop: asyncio.AbstractEventLoop,
        producer: ReliableProducer,
        settler: Settler,
        runtimes: dict[str, SubscriberRuntime],
        flood: FloodGuard,
    ) -> tuple[ControlTopic, CallerPauses]:
        """Follow the control topic; returns once the table is read and applied."""
        control = self.control = ControlTopic(
            self.client_settings(), self.config.control_topic, producer, loop
        )
        pauses = self.pauses = CallerPauses(
            self.config,
            control,
            runtimes,
            settler.write_parked,
            self.client_settings(),
            reset_flood=flood.reset,
        )
        settler.set_aside = pauses.set_aside
        flood.pause = pauses.pause_soon
        self.stats.gauges.append(pauses.gauges)
        await control.start()
        return control, pauses

    # -- the operator's skip, through the control topic (settle/skip.py) ----------------

    def _skip_requested(self, key: str, value: bytes | None) -> None:
        request = skip.SkipRequest.parse(key)
        if request is None or self.pipeline is None:
            return
        if value is None:  # applied by its partition's owner, and withdrawn
            self._skip_asked_ms.pop(request, None)
            self.pipeline.skipper.forget(
                (request.topic, request.partition), request.offset, request.caller
            )
            return
        try:
            self._skip_asked_ms[request] = int(orjson.loads(value).get("requested_ms", 0))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            self._skip_asked_ms[request] = 0
        tp = (request.topic, request.partition)
        said = self.pipeline.skipper.skip(tp, request.offset, request.caller)
        log.info("skip requested for %s: %s", key, said)

    def _skip_applied(self, request: skip.SkipRequest, said: str) -> None:
        asked = self._skip_asked_ms.pop(request, 0)
        if self.control is None:
            return
        task = asyncio.get_running_loop().create_task(self._answer_skip(request, said, asked))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _answer_skip(self, request: skip.SkipRequest, said: str, asked_ms: int) -> None:
        """Write what a skip did (unless this request has its answer already), then, once
        the group's commit has passed the record, withdraw the request (settle/skip.py).
        Not before: until then a crash would have the next owner read the record again,
        and the request must still be there to skip it again."""
        assert self.control is not None and self.pipeline is not None
        tp = (request.topic, request.partition)
        try:
            if self._answer(request, asked_ms) is None:  # else the first answer stands
                await self.control.put(request.result_key, skip.result_value(said, asked_ms))
            while not self.pipeline.committed_past(tp, request.offset):
                if tp not in self.pipeline.started_at:  # revoked: its next owner withdraws it
                    return
                await asyncio.sleep(1.0)
            await self.control.put(request.key, None)
        except Exception:  # the request stays: it is applied again at the next assignment
            log.exception("answering the skip request %s failed", request.key)

    def _answer(self, request: skip.SkipRequest, asked_ms: int) -> str | None:
        """What the control topic answers to this request (asked at ``asked_ms``), or None
        while it holds no answer as recent (or none that can be read)."""
        assert self.control is not None
        answer = self.control.table.get(request.result_key)
        if answer is None or asked_ms <= 0:
            return None
        try:
            result = orjson.loads(answer)
            if int(result.get("requested_ms", 0)) >= asked_ms:
                return str(result.get("result", ""))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            pass
        return None

    async def request_skip(self, request: skip.SkipRequest, by: str, wait: float) -> str | None:
        """Ask the group to skip a record; what its owner did, or None if no owner said
        within ``wait`` seconds (the request stays, and is applied when it is read)."""
        assert self.control is not None
        asked = skip.request_value(by)
        await self.control.put(request.key, asked)
        asked_ms = int(orjson.loads(asked)["requested_ms"])
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            answer = self._answer(request, asked_ms)
            if answer is not None:
                return answer
            await asyncio.sleep(0.1)
        return None

    def readiness(self) -> tuple[bool, list[str]]:
        """Whether this instance is ready, and why not (see the module's docstring)."""
        reasons = []
        if not self.ready.is_set() or self.source is None:
            return False, ["starting"]
        if self.control is None or not self.control.following:
            reasons.append(f"not following {self.config.control_topic}")
        membership = self.source.membership()
        if not membership.member:
            reasons.append("not a member of the group (yet)")
        elif not membership.source_partitions:
            held = len(membership.retry_partitions)
            reasons.append(
                "no source partition assigned"
                + (f" (only {held} retry-tier partitions)" if held else "")
                + (
                    f"; source topics not found: {', '.join(membership.missing_topics)}"
                    if membership.missing_topics
                    else "; the group may have more members than source partitions"
                )
            )
        if self.pipeline is not None:
            reasons += [
                f"partition {p.topic}[{p.partition}] stalled for {p.stuck_seconds:.0f}s: {p.held}"
                for p in self.pipeline.status()[0]
                if p.stalled
            ]
        return not reasons, reasons

    async def _start_admin(self) -> Any:
        if not self.config.admin.listen:
            return None
        from .observe.admin import start_admin

        return await start_admin(self)
