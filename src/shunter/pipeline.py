"""The path of one batch: gate → decode → validate → classify → deliver → settle → commit.

``handle_batch`` runs on the event loop for every batch the consumer thread hands over
and gives it to the crash guard's gate (crashguard/gate.py), which hands it back to
``process``, in order, once the journal names it. ``process`` never awaits and never
raises for a bad message: a record either becomes deliveries in its subscribers' queues,
or goes to the dead-letter topic with its reason.

Record invariant: every consumed record ends delivered, in a retry tier or in the
dead-letter topic, or its partition is visibly stuck (observe/stalls.py). ``process`` is
the one place with a per-record guard: a failure anywhere in shunter's own path of a
record holds it and dead-letters it with stage ``internal``; nothing logs and skips.

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
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError

from .classify import Router
from .classify.router import FilterError
from .commit import OffsetTracker
from .config import Config
from .consume.held import NOT_DUE, HeldPartitions
from .crashguard.gate import JournalGate, OpenGate
from .crashguard.guard import CrashGuard
from .crashguard.sandbox import SandboxSpec
from .decode.decoder import Decode
from .deliver import SubscriberRuntime
from .errors import DecodeUnavailable, RejectedMessage
from .message import (
    KafkaRecord,
    Message,
    Record,
    deliveries,
    error_of,
    key_of,
    offset_of,
    partition_of,
    read_headers,
    timestamp_of,
    topic_of,
    value_of,
)
from .observe.stalls import StallWatch
from .observe.stats import Stats
from .observe.status import CallerStatus, PartitionStatus, snapshot, watch
from .outcome import DeadLettered
from .settle import Settler
from .settle import headers as h
from .settle.skip import SKIPPED, Skipper

log = logging.getLogger("shunter.pipeline")

TP = tuple[str, int]

FOR_DECODE = "waiting for what decoding needs (a schema registry out of reach)"


def _name_origin(record: Record, info: h.FailureInfo) -> None:
    """A record read from a retry tier names its origin, as every later record does."""
    record.topic, record.partition = info.origin_topic, info.origin_partition
    record.offset, record.timestamp = info.origin_offset, info.origin_timestamp_ms


class Pipeline:
    def __init__(
        self,
        config: Config,
        decoders: dict[str, Decode],
        router: Router,
        runtimes: dict[str, SubscriberRuntime],
        settler: Settler,
        stats: Stats,
        guard: CrashGuard | None = None,
        sandbox: dict[str, SandboxSpec] | None = None,
    ) -> None:
        self.config = config
        self.decoders = decoders
        self.router = router
        self.runtimes = runtimes
        self.settler = settler
        self.stats = stats
        self.tracker = OffsetTracker()
        self.started_at: dict[TP, int] = {}  # the group's committed offset at assignment
        self.skipper = Skipper(self.tracker, runtimes, settler, self.started_at)
        self.stalls = StallWatch(config.kafka.stall_after)
        self.retry_topics = {config.fast_topic, config.slow_topic}
        # How far ahead a retry record may be due and still hold its partition: twice
        # its tier's delay, which is how far ahead the tier's own records are due.
        self._horizon_ms = {
            config.fast_topic: 2000 * max(config.retry.fast.delay, 1.0),
            config.slow_topic: 2000 * max(config.retry.slow.delay, 1.0),
        }
        self.processed = 0  # messages taken from batches (written on the loop only)
        self.held = HeldPartitions(self.process, self.count)
        self._source: Any = None
        self.gate: JournalGate | OpenGate = (
            OpenGate(self) if guard is None else JournalGate(guard, self, sandbox)
        )
        # Per source topic without filters: its deliveries' runtimes, and (caller,
        # category) beside them, worked out once rather than per record (a topic with
        # filters: absent).
        self._runtime_list = list(runtimes.values())
        self._targets = {
            topic: ([runtimes[r.caller] for r in routes], [(r.caller, r.category) for r in routes])
            for topic, routes in router.static_routes().items()
        }

    @property
    def source(self) -> Any:
        """The KafkaSource, set once it exists (it pauses and resumes held partitions)."""
        return self._source

    @source.setter
    def source(self, source: Any) -> None:
        self._source = self.held.source = source

    @property
    def guard(self) -> CrashGuard | None:
        return self.gate.guard

    # -- the path of a batch --------------------------------------------------------------

    def handle_batch(self, batch: list[Any]) -> None:
        """Take a batch from the consumer thread: the crash guard's gate journals it, then
        it is processed in order (``process``)."""
        self.gate.handle_batch(batch)

    def count(self, taken: int) -> None:
        """Messages taken from batches (+), or given back to wait somewhere (-)."""
        self.processed += taken

    def process(self, batch: list[Any], named: bool = False) -> None:
        """Deliver ``batch`` in order; ``named``: the journal names all of it already."""
        self.processed += len(batch)
        accepted: dict[str, int] = {}
        held, gate, skipper, decoders = self.held, self.gate, self.skipper, self.decoders
        holding = held.topics  # topics with a held partition (a dict, tested per record)
        busy = gate.busy  # crash suspects start on an assignment, never during a batch
        for kmsg in batch:
            if error_of(kmsg) is not None:
                self._consumer_event(kmsg)
                continue
            topic = topic_of(kmsg)
            # Checked per record: a retry record holds its partition mid-batch, and the
            # rest of that partition in this batch must then wait behind it. A record of
            # a topic none of whose partitions is held passes by (a retry waiting in the
            # fast tier must not slow every source record down).
            if busy or not named or (holding and topic in holding):
                tp = (topic, partition_of(kmsg))
                if held.takes(tp, kmsg) or not gate.admit(tp, kmsg, named):
                    continue
            try:
                if skipper.later or topic not in decoders:
                    self._one(kmsg, topic, accepted)
                elif self._source_record(kmsg, topic, None):  # _one's common case
                    accepted[topic] = accepted.get(topic, 0) + 1
            except Exception as exc:  # the one place no record can fall through
                self._failed_internally(kmsg, exc)
        for topic, n in accepted.items():
            self.stats.accepted(topic, n)
        self._kick()

    def _kick(self) -> None:
        """Start the runners of what was submitted (a runtime with nothing queued, or one
        already running, does nothing: cheaper than noting each runtime submitted to)."""
        for runtime in self._runtime_list:
            runtime.kick()

    def run_alone(self, kmsg: KafkaRecord, divert: Callable[[Message], bool] | None = None) -> None:
        """Process one record now (a crash suspect), its deliveries started at once;
        ``divert(msg)`` may take a delivery instead of its runtime (a sandbox)."""
        try:
            self._one(kmsg, kmsg.topic(), {}, divert)
        except Exception as exc:
            self._failed_internally(kmsg, exc)
        self._kick()

    def committed_past(self, tp: TP, offset: int) -> bool:
        """Whether the group's commit of ``tp``, owned here, has passed ``offset``: as of
        assignment, or handed to the committer since."""
        ptrack = self.tracker.partitions.get(tp)
        if ptrack is None:
            return False
        return max(ptrack.committed, self.started_at.get(tp, -1)) > offset

    def delivering(self) -> bool:
        """Whether a delivery is in a handler or queued to start now (not at a paused
        caller, nor behind threads that hold every slot past their timeout): what could
        be running besides a crash suspect run alone."""
        return any(rt.active or (rt.queued and rt.may_start()) for rt in self._runtime_list)

    def _one(
        self,
        kmsg: KafkaRecord,
        topic: str,
        accepted: dict[str, int],
        divert: Callable[[Message], bool] | None = None,
    ) -> None:
        skip = None
        if self.skipper.later:
            skip = self.skipper.due((topic, kmsg.partition()), kmsg.offset())
            if skip == "":
                self._skipped_unread(kmsg)
                return
        if topic in self.decoders:
            if self._source_record(kmsg, topic, skip, divert):
                accepted[topic] = accepted.get(topic, 0) + 1
        elif topic in self.retry_topics:
            self._retry_record(kmsg, topic, skip, divert)

    def _skipped_unread(self, kmsg: KafkaRecord) -> None:
        """An operator skipped this record before it was read: dead-lettered unrun."""
        ptrack = self.tracker.partitions.get((kmsg.topic(), kmsg.partition()))
        if ptrack is None or kmsg.offset() < ptrack.high:
            return
        ptrack.hold(kmsg.offset(), 1)
        self.settler.unrun(Record.bare(kmsg, ptrack), "skip", "Skipped", SKIPPED)
        self.skipper.report(ptrack.tp, kmsg.offset(), "", "dead-lettered unrun when read")

    def _source_record(
        self,
        kmsg: KafkaRecord,
        topic: str,
        skip: str | None,
        divert: Callable[[Message], bool] | None = None,
    ) -> bool:
        offset = offset_of(kmsg)
        partition = partition_of(kmsg)
        ptrack = self.tracker.partitions.get((topic, partition))
        if ptrack is None:  # revoked while this batch waited: the next owner reads it
            return False
        if offset < ptrack.high:  # never rewound, so never expected: keep the first copy
            log.warning(
                "%s[%d]@%d seen again after %d; skipped", *ptrack.tp, offset, ptrack.high - 1
            )
            return False
        # Record.from_kafka, inlined: every record's path.
        record = Record(
            topic,
            partition,
            offset,
            key_of(kmsg),
            value_of(kmsg),  # None: a tombstone, which decode rejects
            timestamp_of(kmsg)[1],
            read_headers(kmsg),
            ptrack,
            offset,
        )
        decoder = self.decoders[topic]
        try:
            record.value = decoder(record.raw)
        except RejectedMessage as exc:
            ptrack.hold(offset, 1)
            self.settler.reject(record, exc)
            return False
        except DecodeUnavailable as exc:
            self._decode_later(kmsg, exc, skip)
            return False
        static = self._targets.get(topic)
        filter_errors: list[FilterError] = []
        if static is not None:
            runtimes, pairs = static
        else:  # a topic with filters
            routes, filter_errors = self.router.routes(record)
            runtimes = [self.runtimes[r.caller] for r in routes]
            pairs = [(r.caller, r.category) for r in routes]
        # Everything that can fail is done before the offset is held: a failure up to
        # here holds it once, for its dead-letter record (see _failed_internally).
        messages = deliveries(record, pairs)
        left = record.left = len(messages) + (1 if filter_errors else 0)
        if left > 1:  # subscribers are isolated: each of the others decodes its own value
            record.owner = messages[0].caller if messages else None
            record.decode = decoder
        # ptrack.hold(offset, 1 if left else 0), inlined: offset >= ptrack.high (above),
        # so it is held once, released by the last delivery to settle (settle_one).
        ptrack.high = offset + 1
        if left:
            ptrack.pending[offset] = 1
        if skip is None and divert is None:  # the common case
            for runtime, msg in zip(runtimes, messages):  # noqa: B905 - same length
                if runtime.paused:
                    self.settler.park(msg, "caller paused")
                else:
                    runtime.submit(msg)
        else:
            for runtime, msg in zip(runtimes, messages, strict=True):
                if msg.caller == skip:
                    self.skipper.dead_letter(msg)
                    self.skipper.report(ptrack.tp, offset, skip, "dead-lettered unrun when read")
                elif runtime.paused:
                    self.settler.park(msg, "caller paused")
                elif divert is None or not divert(msg):
                    runtime.submit(msg)
        if filter_errors:
            error = "; ".join(f"category {e.category}: {e.error}" for e in filter_errors)
            self.settler.filter_failed(record, [e.category for e in filter_errors], error)
        return True

    def _retry_record(
        self,
        kmsg: KafkaRecord,
        topic: str,
        skip: str | None,
        divert: Callable[[Message], bool] | None = None,
    ) -> None:
        offset = kmsg.offset()
        tp = (topic, kmsg.partition())
        ptrack = self.tracker.partitions.get(tp)
        if ptrack is None or offset < ptrack.high:  # revoked while it waited, or stale
            return
        info = h.decode(read_headers(kmsg))  # unreadable: _failed_internally dead-letters it
        # A paused caller's retry is set aside at once (keeping its not-before time),
        # rather than holding its retry partition until it is due.
        owner = self.runtimes.get(info.caller)
        now_ms = time.time() * 1000
        wait_ms = info.not_before_ms - now_ms
        paused = owner is not None and owner.paused
        horizon = self._horizon_ms[topic]
        # A record due far later than its tier's rhythm goes to the back of the slow tier
        # (below) rather than hold every retry behind it; written back at most once per
        # horizon: a copy read again sooner than that (a partition of such records, read
        # round and round) holds its partition until its horizon is over. So K of them
        # in a row hold the records behind them one horizon in all, not K.
        until_ms = float(info.not_before_ms)
        if wait_ms > horizon:
            written = info.requeued_ms  # a stamp ahead of the clock is no one's: ignored
            recent = topic != self.config.fast_topic and 0 < written <= now_ms
            until_ms = written + horizon if recent else 0.0
        if wait_ms > 0 and not paused and until_ms > now_ms:
            # Due within its tier's rhythm, or written back too recently: the partition
            # waits for it.
            until = min(until_ms, now_ms + horizon) / 1000
            self.held.hold(tp, kmsg, until, NOT_DUE)
            if skip is not None:  # read again when due: the skip waits for it
                self.skipper.later.setdefault(tp, {})[offset] = skip
            return
        record = Record.from_kafka(kmsg, ptrack)
        _name_origin(record, info)
        record.first_failure = info.first_failure_ms
        if wait_ms > 0 and not paused and skip != info.caller and owner is not None:
            # Due far later than this tier's own delay (a long RetryLater): holding the
            # partition on it would hold every retry behind it. It goes to the back of
            # the slow tier instead, keeping its due time (``Settler.requeue``): at most
            # one write per horizon for a record that waits days.
            ptrack.hold(offset, 1)
            self.settler.requeue(record, info)
            return
        msg = Message(record, info.caller, info.category, info.attempt)
        runtime = self.runtimes.get(info.caller)
        decoder = self.decoders.get(info.origin_topic)
        outcome: DeadLettered | None = None
        if runtime is None:
            # Removed from the configuration, or named by anyone who can write the topic:
            # dead-lettered unrun under its name (in the record's headers only: a name
            # from a header never becomes a statistics label, whose number it would grow).
            ptrack.hold(offset, 1)
            log.warning(
                "retry record %s[%d]@%d names caller %r, which is not configured; "
                "dead-lettered unrun",
                *tp,
                offset,
                info.caller,
                extra={"topic": tp[0], "partition": tp[1], "offset": offset},
            )
            self.settler.unrun(
                record,
                "deliver",
                "UnknownCaller",
                f"caller {info.caller!r} is no longer configured",
                caller=info.caller,
                category=info.category,
                attempt=info.attempt,
            )
            if skip == info.caller:
                self.skipper.report(tp, offset, skip, "dead-lettered unrun when read")
            return
        try:
            record.value = decoder(record.raw) if decoder is not None else record.raw
        except RejectedMessage as exc:
            outcome = DeadLettered(exc.reason, "RejectedMessage", stage=exc.stage)
        except DecodeUnavailable as exc:
            self._decode_later(kmsg, exc, skip)
            return
        ptrack.hold(offset, 1)
        if msg.caller == skip:
            self.skipper.dead_letter(msg)
            self.skipper.report(tp, offset, skip, "dead-lettered unrun when read")
        elif outcome is not None:  # no handler ran: not the caller's failure
            self.settler(msg, outcome, 0.0, by_handler=False)
        elif runtime.paused:
            self.settler.park(msg, "caller paused")
        elif divert is not None and divert(msg):
            pass
        else:
            runtime.submit(msg)

    def _decode_later(self, kmsg: KafkaRecord, exc: DecodeUnavailable, skip: str | None) -> None:
        """What decoding needs is out of reach (a schema registry): nothing is wrong with
        the record, so it is never dead-lettered for it. Its partition is held, in order,
        and the record decoded again after ``exc.retry_after``."""
        tp = (kmsg.topic(), kmsg.partition())
        log.debug(  # the decoder logs the outage itself, not every wait
            "%s[%d]@%d cannot be decoded yet (%s); its partition waits %.1fs",
            *tp,
            kmsg.offset(),
            exc.reason,
            exc.retry_after,
            extra={"topic": tp[0], "partition": tp[1], "offset": kmsg.offset()},
        )
        self.held.hold(tp, kmsg, time.time() + exc.retry_after, FOR_DECODE)
        if skip is not None:  # read again later: the skip waits for it
            self.skipper.later.setdefault(tp, {})[kmsg.offset()] = skip

    def _failed_internally(self, kmsg: KafkaRecord, exc: Exception) -> None:
        """A failure in shunter's own path of one record (reading it, decoding, routing):
        the record is held and dead-lettered with stage ``internal`` and the traceback.
        Never logged and skipped: the commit cannot pass it before the broker has it."""
        topic, partition, offset = kmsg.topic(), kmsg.partition(), kmsg.offset()
        ptrack = self.tracker.partitions.get((topic, partition))
        if ptrack is None or offset < ptrack.high - 1:  # gone, or a copy of a settled one
            log.critical("processing %s[%d]@%d failed", topic, partition, offset, exc_info=True)
            return
        log.error(
            "processing %s[%d]@%d failed in shunter's own path (%s); it goes to the "
            "dead-letter topic with stage internal",
            topic,
            partition,
            offset,
            type(exc).__name__,
            exc_info=True,
            extra={"topic": topic, "partition": partition, "offset": offset},
        )
        ptrack.hold(offset, 1)
        record = Record.bare(kmsg, ptrack)
        caller = category = ""
        attempt = 1
        if topic in self.retry_topics:  # name the origin and the caller, if still readable
            try:
                info = h.decode(record.headers)
                _name_origin(record, info)
                caller, category, attempt = info.caller, info.category, info.attempt
            except Exception:
                pass
        self.settler.internal(record, exc, caller, category, attempt)

    def _consumer_event(self, kmsg: KafkaRecord) -> None:
        """An event in the stream: the end of a partition reached, or a consumer error."""
        err = kmsg.error()
        assert err is not None
        if err.code() == KafkaError._PARTITION_EOF:
            # Every record of the partition below this offset was handed over before it:
            # the crash guard's suspects need to know (``JournalGate.reached_end``). In
            # order, so behind what its partition holds.
            tp = (kmsg.topic(), kmsg.partition())
            if not self.held.takes(tp, kmsg):
                self.gate.reached_end(tp, kmsg)
            return
        log.warning("consumer error: %s", err)

    # -- partitions coming and going ------------------------------------------------------

    async def assigned(self, tps: list[TP], committed: dict[TP, int]) -> None:
        for tp in tps:
            self.tracker.get(*tp)
            self.started_at[tp] = committed.get(tp, -1)
            self.skipper.assigned(tp)
        await self.gate.assigned(tps, committed)

    async def revoked(self, tps: list[TP], lost: bool) -> list[tuple[TP, int]]:
        """Drain the revoked partitions (bounded), then say what to commit for them."""
        gone = set(tps)
        self.stalls.forget(tps)
        for tp in tps:
            self.started_at.pop(tp, None)
        # What waits anywhere (its journal record, behind suspects, in a held partition)
        # must not reach a later owner's tracker (this instance may get it back).
        self.held.forget(gone)
        self.gate.leaving(gone)
        trackers = [self.tracker.partitions[tp] for tp in tps if tp in self.tracker.partitions]
        if not lost:
            timeout = self.config.kafka.drain_timeout
            results = await asyncio.gather(*(t.drained(timeout) for t in trackers))
            for tracker, ok in zip(trackers, results, strict=True):
                if not ok:
                    log.warning(
                        "%s[%d]: %d offsets still unsettled after %.0fs; the next "
                        "owner redelivers them",
                        *tracker.tp,
                        tracker.in_flight,
                        timeout,
                    )
        # Commit what is settled whatever the periodic commits claimed: an asynchronous
        # commit may have failed (ILLEGAL_GENERATION during a rebalance).
        offsets = [(t.tp, o) for t in trackers if (o := t.committable()) >= 0]
        self.tracker.drop([t.tp for t in trackers])
        await self.gate.released(tps, trackers, lost)
        return offsets

    def waiting(self) -> dict[TP, str]:
        """Partitions with messages held back (not in the tracker), and why: for the
        stall alarm. A retry partition whose head is not due yet is not waiting."""
        out = {**self.held.waiting(), **self.gate.waiting()}
        return {tp: why for tp, why in out.items() if tp in self.tracker.partitions}

    def status(self) -> tuple[list[PartitionStatus], list[CallerStatus]]:
        """Frozen rows of every assigned partition and every caller (observe/status)."""
        return snapshot(self, time.monotonic())

    def watch(self) -> None:
        """The stall alarm's sample (called a few times a second, off the hot path)."""
        watch(self, time.monotonic())

    def in_flight(self) -> int:
        """Messages held (called from the consumer thread: a snapshot is enough)."""
        return sum(len(t.pending) for t in list(self.tracker.partitions.values()))

    # -- committing -----------------------------------------------------------------------

    def commit_failed(self, tps: list[TP]) -> None:
        """An asynchronous commit failed: offer these partitions' offsets again."""
        for tp in tps:
            tracker = self.tracker.partitions.get(tp)
            if tracker is not None:
                tracker.committed = -1

    def commit_due(self) -> bool:
        """Commit what is settled and new; True when something was."""
        offsets = self.tracker.due()
        if offsets and self.source is not None:
            self.source.commit(offsets)
            self.tracker.mark_committed(offsets)
            return True
        return False

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait (bounded) until every held offset is settled."""
        trackers = list(self.tracker.partitions.values())
        results = await asyncio.gather(*(t.drained(timeout) for t in trackers))
        return all(results)
