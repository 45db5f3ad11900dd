"""The path of one batch: decode → validate → classify → deliver → settle → commit.

``handle_batch`` runs on the event loop for every batch the consumer thread hands over.
It never awaits and never raises for a bad message: a record either becomes deliveries
in its subscribers' queues, or goes to the dead-letter topic with its reason.

Commit invariant: every consumed offset is *held* in its partition's tracker, with one
share per delivery, before any delivery of it starts; a share is released only when that
delivery is settled (succeeded, or acknowledged in a retry tier or the dead-letter
topic). The committer offers only the smallest still-held offset, so nothing is
committed past an unsettled delivery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from confluent_kafka import KafkaError

from .classify import Router
from .commit import OffsetTracker
from .config import Config
from .decode import Decoder
from .deliver import SubscriberRuntime
from .errors import RejectedMessage
from .message import Message, Record
from .observe.stats import Stats
from .outcome import DeadLettered
from .settle import Settler
from .settle import headers as h

log = logging.getLogger("shunter.pipeline")

TP = tuple[str, int]


class Pipeline:
    def __init__(
        self,
        config: Config,
        decoders: dict[str, Decoder],
        router: Router,
        runtimes: dict[str, SubscriberRuntime],
        settler: Settler,
        stats: Stats,
    ) -> None:
        self.config = config
        self.decoders = decoders
        self.router = router
        self.runtimes = runtimes
        self.settler = settler
        self.stats = stats
        self.tracker = OffsetTracker()
        self.retry_topics = {config.fast_topic, config.slow_topic}
        self.processed = 0  # messages taken from batches (written on the loop only)
        self.source: Any = None  # the KafkaSource, set once it exists
        # Retry partitions whose head is not yet due: tp -> (offset, due time, confirmed)
        self._parking: dict[TP, tuple[int, float, bool]] = {}

    # -- the path of a batch --------------------------------------------------------------

    def handle_batch(self, batch: list[Any]) -> None:
        self.processed += len(batch)
        touched: set[SubscriberRuntime] = set()
        accepted: dict[str, int] = {}
        for kmsg in batch:
            if kmsg.error() is not None:
                self._consumer_error(kmsg.error())
                continue
            topic = kmsg.topic()
            if topic in self.decoders:
                self._source_record(kmsg, topic, touched)
                accepted[topic] = accepted.get(topic, 0) + 1
            elif topic in self.retry_topics:
                self._retry_record(kmsg, topic, touched)
        for topic, n in accepted.items():
            self.stats.accepted(topic, n)
        for runtime in touched:
            runtime.kick()

    def _source_record(self, kmsg: Any, topic: str, touched: set[SubscriberRuntime]) -> None:
        partition = kmsg.partition()
        offset = kmsg.offset()
        ptrack = self.tracker.get(topic, partition)
        record = Record(
            topic, partition, offset, kmsg.key(), kmsg.value(), kmsg.timestamp()[1],
            kmsg.headers(), ptrack, offset,
        )
        try:
            record.value = self.decoders[topic](record.raw)
        except RejectedMessage as exc:
            ptrack.hold(offset, 1)
            self.settler.reject(record, exc)
            return
        routes, filter_errors = self.router.routes(record)
        ptrack.hold(offset, len(routes) + len(filter_errors))
        runtimes = self.runtimes
        for route in routes:
            runtime = runtimes[route.caller]
            msg = Message(record, route.caller, route.category)
            if runtime.paused:
                self.settler.park(msg, "caller paused")
                continue
            runtime.submit(msg)
            touched.add(runtime)
        for failed in filter_errors:
            msg = Message(record, failed.route.caller, failed.route.category)
            outcome = DeadLettered(failed.error, "FilterError", stage="classify")
            self.settler(msg, outcome, 0.0)

    def _retry_record(self, kmsg: Any, topic: str, touched: set[SubscriberRuntime]) -> None:
        partition = kmsg.partition()
        offset = kmsg.offset()
        tp = (topic, partition)
        if tp in self._parking:  # fetched before the pause took effect: read again later
            return
        try:
            info = h.decode(kmsg.headers())
        except (KeyError, ValueError) as exc:
            log.error("retry record %s[%d]@%d has no usable headers (%s); skipped",
                      topic, partition, offset, exc)
            self.tracker.get(topic, partition).hold(offset, 0)
            return
        now = time.time()
        if info.not_before_ms > now * 1000:
            self._park(tp, offset, info.not_before_ms / 1000)
            return
        ptrack = self.tracker.get(topic, partition)
        record = Record(
            info.origin_topic, info.origin_partition, info.origin_offset, kmsg.key(),
            kmsg.value(), info.origin_timestamp_ms, kmsg.headers(), ptrack, offset,
            first_failure=info.first_failure_ms,
        )
        ptrack.hold(offset, 1)
        runtime = self.runtimes.get(info.caller)
        msg = Message(record, info.caller, info.category, info.attempt)
        if runtime is None:
            reason = f"caller {info.caller!r} is no longer configured"
            self.settler(msg, DeadLettered(reason, "UnknownCaller"), 0.0)
            return
        decoder = self.decoders.get(info.origin_topic)
        try:
            record.value = decoder(record.raw) if decoder is not None else record.raw
        except RejectedMessage as exc:
            self.settler(msg, DeadLettered(exc.reason, "RejectedMessage", stage=exc.stage), 0.0)
            return
        if runtime.paused:
            self.settler.park(msg, "caller paused")
            return
        runtime.submit(msg)
        touched.add(runtime)

    def _consumer_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        log.warning("consumer error: %s", err)

    # -- retry partitions that are not yet due: paused, never slept on --------------------

    def _park(self, tp: TP, offset: int, due: float) -> None:
        self._parking[tp] = (offset, due, False)
        self.source.park(tp, offset)

    def parked(self, tp: TP) -> None:
        """The consumer thread paused ``tp``: no message of it fetched earlier is left."""
        state = self._parking.get(tp)
        if state is None:
            return
        offset, due, _ = state
        self._parking[tp] = (offset, due, True)
        delay = max(0.0, due - time.time())
        asyncio.get_running_loop().call_later(delay, self._unpark, tp)

    def _unpark(self, tp: TP) -> None:
        if self._parking.pop(tp, None) is not None:
            self.source.unpark(tp)

    # -- partitions coming and going ------------------------------------------------------

    async def assigned(self, tps: list[TP]) -> None:
        for tp in tps:
            self.tracker.get(*tp)

    async def revoked(self, tps: list[TP], lost: bool) -> list[tuple[TP, int]]:
        """Drain the revoked partitions (bounded), then say what to commit for them."""
        for tp in tps:
            self._parking.pop(tp, None)
        trackers = [self.tracker.partitions[tp] for tp in tps if tp in self.tracker.partitions]
        if not lost:
            timeout = self.config.kafka.drain_timeout
            results = await asyncio.gather(*(t.drained(timeout) for t in trackers))
            for tracker, ok in zip(trackers, results, strict=True):
                if not ok:
                    log.warning("%s[%d]: %d offsets still unsettled after %.0fs; the next "
                                "owner redelivers them", *tracker.tp, tracker.in_flight, timeout)
        offsets = [(t.tp, o) for t in trackers if (o := t.due()) is not None]
        self.tracker.drop([t.tp for t in trackers])
        return offsets

    def in_flight(self) -> int:
        """Messages held (called from the consumer thread: a snapshot is enough)."""
        return sum(len(t.pending) for t in list(self.tracker.partitions.values()))

    # -- committing -----------------------------------------------------------------------

    def commit_due(self) -> None:
        offsets = self.tracker.due()
        if offsets and self.source is not None:
            self.source.commit(offsets)
            self.tracker.mark_committed(offsets)

    async def drain(self, timeout: float) -> bool:
        """Wait (bounded) until every held offset is settled."""
        trackers = list(self.tracker.partitions.values())
        results = await asyncio.gather(*(t.drained(timeout) for t in trackers))
        return all(results)
