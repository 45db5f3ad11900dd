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
import contextlib
import logging
import math
import time
from collections import deque
from functools import partial
from typing import Any

from confluent_kafka import KafkaError

from .classify import Router
from .commit import OffsetTracker, PartitionTracker
from .config import Config
from .crashguard.guard import CrashGuard, SuspectRun
from .decode import Decoder
from .deliver import SubscriberRuntime
from .errors import DecodeUnavailable, RejectedMessage
from .message import KafkaRecord, Message, Record
from .observe.stalls import StallWatch
from .observe.stats import Stats
from .observe.status import CallerStatus, PartitionStatus, snapshot, watch
from .outcome import DeadLettered
from .settle import Settler
from .settle import headers as h
from .settle.skip import SKIPPED, Skipper

log = logging.getLogger("shunter.pipeline")

TP = tuple[str, int]


class _Waiting:
    """A batch waiting for its journal records to be acknowledged."""

    __slots__ = ("batch", "last", "left")

    def __init__(self, batch: list[Any], last: dict[TP, int]) -> None:
        self.batch = batch
        self.last = last  # per partition, its last offset in the batch
        self.left = 0


_UNTIL_RELEASED = math.inf  # held until the crash suspects are done, not until a time
# Why a partition is held (what the stall alarm says). Only a retry not yet due is a
# wait by design; the others are waits that must end.
_NOT_DUE = "a retry record not yet due"
_FOR_JOURNAL = "waiting for its crash-guard journal record"
_FOR_SUSPECTS = "waiting for its crash suspects to be re-run"
_FOR_DECODE = "waiting for what decoding needs (a schema registry out of reach)"


def _due(kmsg: KafkaRecord) -> bool:
    """A retry record whose delay is over (or whose headers say nothing usable: it is
    then dead-lettered when it is processed)."""
    try:
        return h.decode(kmsg.headers()).not_before_ms <= time.time() * 1000
    except Exception:
        return True


def _name_origin(record: Record, info: h.FailureInfo) -> None:
    """A record read from a retry tier names its origin, as every later record does."""
    record.topic, record.partition = info.origin_topic, info.origin_partition
    record.offset, record.timestamp = info.origin_offset, info.origin_timestamp_ms


class Pipeline:
    def __init__(
        self,
        config: Config,
        decoders: dict[str, Decoder],
        router: Router,
        runtimes: dict[str, SubscriberRuntime],
        settler: Settler,
        stats: Stats,
        guard: CrashGuard | None = None,
    ) -> None:
        self.config = config
        self.decoders = decoders
        self.router = router
        self.runtimes = runtimes
        self.settler = settler
        self.stats = stats
        self.tracker = OffsetTracker()
        self.skipper = Skipper(self.tracker, runtimes, settler)
        self.stalls = StallWatch(config.kafka.stall_after)
        self.started_at: dict[TP, int] = {}  # the group's committed offset at assignment
        self.retry_topics = {config.fast_topic, config.slow_topic}
        self.processed = 0  # messages taken from batches (written on the loop only)
        self.source: Any = None  # the KafkaSource, set once it exists
        self.guard = guard
        # Held partitions (paused) and the messages taken from them, in order: a retry
        # partition whose head is not yet due, or one waiting for its crash suspects.
        self._held: dict[TP, list[Any]] = {}
        self._held_why: dict[TP, str] = {}  # why each held partition is held (status)
        self._suspects: dict[TP, SuspectRun] = {}
        self._waiting: deque[_Waiting] = deque()  # batches waiting for their journal record
        self._suspect_task: asyncio.Task[None] | None = None
        self._deferred: list[Any] = []  # messages held back while crash suspects run
        # Per partition with nothing processed yet since its assignment: the first offset
        # journaled (see handle_batch). Dropped when the partition is revoked.
        self._unprocessed_lo: dict[TP, int] = {}
        self._covering: set[asyncio.Task[None]] = set()  # _cover tasks (kept referenced)

    # -- the path of a batch --------------------------------------------------------------

    def handle_batch(self, batch: list[Any]) -> None:
        """Take a batch from the consumer thread: journal it, then process it in order."""
        if self.guard is None:
            self._process(batch)
            return
        # The crash guard's journal: before any delivery of this batch starts, record
        # per partition the offsets that may be in a handler, and wait for the broker.
        first: dict[TP, int] = {}
        last: dict[TP, int] = {}
        for kmsg in batch:
            if kmsg.error() is None:
                tp = (kmsg.topic(), kmsg.partition())
                last[tp] = kmsg.offset()
                first.setdefault(tp, last[tp])
        waiting = _Waiting(batch, last)
        for tp, hi in last.items():
            ptrack = self.tracker.partitions.get(tp)
            if ptrack is None or tp in self._suspects or tp in self._held:
                continue
            state = self.guard.state(tp)
            # The window starts at the first offset not yet settled. Before this partition
            # has processed anything since its assignment, that is the first offset of
            # the first batch journaled, not this batch's: the journal keeps only its
            # last record per partition, and an earlier batch may still be waiting.
            if ptrack.high >= 0:
                lo = ptrack.committable()
            else:
                lo = self._unprocessed_lo.setdefault(tp, first[tp])
            state.prune(ptrack.committed if ptrack.committed >= 0 else lo)
            waiting.left += 1
            record = state.encode("batch", lo, hi)
            self.guard.write(tp, record, hi, partial(self._journaled, waiting))
        self._waiting.append(waiting)
        self._flush_waiting()

    def _journaled(self, waiting: _Waiting, _err: object) -> None:
        waiting.left -= 1
        self._flush_waiting()

    def _flush_waiting(self) -> None:
        """Process journaled batches, oldest first: batches never overtake each other."""
        while self._waiting and self._waiting[0].left == 0:
            waiting = self._waiting.popleft()
            # The common case: the journal names every offset of the batch, so no record
            # of it needs the per-message check (a partition held meanwhile, say, does).
            assert self.guard is not None
            covered = self.guard.covered
            named = all(hi <= covered(tp) for tp, hi in waiting.last.items())
            self._process(waiting.batch, named)

    def _process(self, batch: list[Any], named: bool = False) -> None:
        """Deliver ``batch`` in order; ``named``: the journal names all of it already."""
        self.processed += len(batch)
        touched: set[SubscriberRuntime] = set()
        accepted: dict[str, int] = {}
        guard = None if named else self.guard
        for kmsg in batch:
            if kmsg.error() is not None:
                self._consumer_error(kmsg.error())
                continue
            topic = kmsg.topic()
            # Checked per record: a retry record parks its partition mid-batch, and the
            # rest of that partition in this batch must then be read again later.
            if self._held or self._suspects:
                tp = (topic, kmsg.partition())
                held = self._held.get(tp)
                if held is not None:  # fetched before the pause landed: waits its turn
                    held.append(kmsg)
                    self.processed -= 1
                    continue
                if tp in self._suspects:
                    self._take_suspect(tp, kmsg)
                    continue
                if self._suspects:  # nothing else runs while a suspect runs alone
                    self._deferred.append(kmsg)
                    self.processed -= 1
                    continue
            # The journal must name an offset before it runs (see CrashGuard). Batches
            # are journaled on arrival, so this holds but for what arrived while its
            # partition was held: that partition is held again until a record names it.
            if (
                guard is not None
                and kmsg.offset() > guard.covered(tp := (topic, kmsg.partition()))
                and tp in self.tracker.partitions
            ):
                self._hold(tp, kmsg, _UNTIL_RELEASED, _FOR_JOURNAL)
                self._start_cover(tp)
                continue
            try:
                self._one(kmsg, topic, touched, accepted)
            except Exception as exc:  # the one place no record can fall through
                self._failed_internally(kmsg, exc)
        for topic, n in accepted.items():
            self.stats.accepted(topic, n)
        for runtime in touched:
            runtime.kick()

    def _one(
        self,
        kmsg: KafkaRecord,
        topic: str,
        touched: set[SubscriberRuntime],
        accepted: dict[str, int],
    ) -> None:
        skip = None
        if self.skipper.later:
            skip = self.skipper.due((topic, kmsg.partition()), kmsg.offset())
            if skip == "":
                self._skipped_unread(kmsg)
                return
        if topic in self.decoders:
            if self._source_record(kmsg, topic, touched, skip):
                accepted[topic] = accepted.get(topic, 0) + 1
        elif topic in self.retry_topics:
            self._retry_record(kmsg, topic, touched, skip)

    def _skipped_unread(self, kmsg: KafkaRecord) -> None:
        """An operator skipped this record before it was read: dead-lettered unrun."""
        ptrack = self.tracker.partitions.get((kmsg.topic(), kmsg.partition()))
        if ptrack is None or kmsg.offset() < ptrack.high:
            return
        ptrack.hold(kmsg.offset(), 1)
        self.settler.unrun(Record.bare(kmsg, ptrack), "skip", "Skipped", SKIPPED)
        self.skipper.report(ptrack.tp, kmsg.offset(), "", "dead-lettered unrun when read")

    def _source_record(
        self, kmsg: KafkaRecord, topic: str, touched: set[SubscriberRuntime], skip: str | None
    ) -> bool:
        offset = kmsg.offset()
        ptrack = self.tracker.partitions.get((topic, kmsg.partition()))
        if ptrack is None:  # revoked while this batch waited: the next owner reads it
            return False
        if offset < ptrack.high:  # never rewound, so never expected: keep the first copy
            log.warning(
                "%s[%d]@%d seen again after %d; skipped", *ptrack.tp, offset, ptrack.high - 1
            )
            return False
        record = Record.from_kafka(kmsg, ptrack)
        try:
            record.value = self.decoders[topic](record.raw)
        except RejectedMessage as exc:
            ptrack.hold(offset, 1)
            self.settler.reject(record, exc)
            return False
        except DecodeUnavailable as exc:
            self._decode_later(kmsg, exc, skip)
            return False
        routes, filter_errors = self.router.routes(record)
        runtimes = self.runtimes
        # Everything that can fail is done before the offset is held: a failure up to
        # here holds it once, for its dead-letter record (see _failed_internally).
        messages = [(runtimes[r.caller], Message(record, r.caller, r.category)) for r in routes]
        ptrack.hold(offset, len(messages) + (1 if filter_errors else 0))
        for runtime, msg in messages:
            if msg.caller == skip:
                self.skipper.dead_letter(msg)
                self.skipper.report(ptrack.tp, offset, skip, "dead-lettered unrun when read")
                continue
            if runtime.paused:
                self.settler.park(msg, "caller paused")
                continue
            runtime.submit(msg)
            touched.add(runtime)
        if filter_errors:
            error = "; ".join(f"category {e.category}: {e.error}" for e in filter_errors)
            self.settler.filter_failed(record, [e.category for e in filter_errors], error)
        return True

    def _retry_record(
        self, kmsg: KafkaRecord, topic: str, touched: set[SubscriberRuntime], skip: str | None
    ) -> None:
        offset = kmsg.offset()
        tp = (topic, kmsg.partition())
        ptrack = self.tracker.partitions.get(tp)
        if ptrack is None or offset < ptrack.high:  # revoked while it waited, or stale
            return
        info = h.decode(kmsg.headers())  # unreadable: _failed_internally dead-letters it
        if info.not_before_ms > time.time() * 1000:
            self._hold(tp, kmsg, info.not_before_ms / 1000, _NOT_DUE)
            if skip is not None:  # read again when due: the skip waits for it
                self.skipper.later.setdefault(tp, {})[offset] = skip
            return
        record = Record.from_kafka(kmsg, ptrack)
        _name_origin(record, info)
        record.first_failure = info.first_failure_ms
        msg = Message(record, info.caller, info.category, info.attempt)
        runtime = self.runtimes.get(info.caller)
        decoder = self.decoders.get(info.origin_topic)
        outcome: DeadLettered | None = None
        if runtime is None:
            reason = f"caller {info.caller!r} is no longer configured"
            outcome = DeadLettered(reason, "UnknownCaller")
        else:
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
        elif outcome is not None:
            self.settler(msg, outcome, 0.0)
        elif runtime is not None and runtime.paused:
            self.settler.park(msg, "caller paused")
        elif runtime is not None:
            runtime.submit(msg)
            touched.add(runtime)

    def _decode_later(self, kmsg: KafkaRecord, exc: DecodeUnavailable, skip: str | None) -> None:
        """What decoding needs is out of reach (a schema registry): nothing is wrong with
        the record, so it is never dead-lettered for it. Its partition is held, in order,
        and the record decoded again after ``exc.retry_after``."""
        tp = (kmsg.topic(), kmsg.partition())
        log.warning(
            "%s[%d]@%d cannot be decoded yet (%s); its partition waits %.1fs",
            *tp,
            kmsg.offset(),
            exc.reason,
            exc.retry_after,
            extra={"topic": tp[0], "partition": tp[1], "offset": kmsg.offset()},
        )
        self._hold(tp, kmsg, time.time() + exc.retry_after, _FOR_DECODE)
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

    def _consumer_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        log.warning("consumer error: %s", err)

    # -- holding a partition: a retry not yet due, or the stream behind crash suspects ----
    #
    # A held partition is paused, never rewound: the messages of it already taken from the
    # consumer (the one that triggered the hold and any fetched before the pause landed)
    # wait here in order, and librdkafka resumes fetching after the last one it handed
    # out. Rewinding with seek was tried and lost messages: on Apache Kafka a resume can
    # fetch from the application's position before a seek made around it lands.

    def _hold(self, tp: TP, kmsg: Any, until: float, why: str) -> None:
        """Hold ``tp`` starting with ``kmsg`` until the time ``until`` (inf: released).

        ``kmsg`` goes before anything ``tp`` holds already (a crash suspect of a retry
        partition, whose successors past the window wait there)."""
        held = self._held.get(tp)
        self._held[tp] = [kmsg, *(held or ())]
        self._held_why[tp] = why
        self.processed -= 1  # taken again when released
        if held is None:
            self.source.pause_partition(tp)
        if until != _UNTIL_RELEASED:
            delay = max(0.0, until - time.time())
            asyncio.get_running_loop().call_later(delay, self._release, tp)

    def _release(self, tp: TP) -> None:
        """Resume ``tp`` and process what it held, in order (it may be held again)."""
        held = self._held.pop(tp, None)
        self._held_why.pop(tp, None)
        if held is None:
            return
        self.source.resume_partition(tp)
        self._process(held)

    def _start_cover(self, tp: TP) -> None:
        task = asyncio.get_running_loop().create_task(self._cover(tp))
        self._covering.add(task)
        task.add_done_callback(self._covering.discard)

    async def _cover(self, tp: TP) -> None:
        """Journal what ``tp`` holds, then release it (held meanwhile, so in order)."""
        guard = self.guard
        ptrack = self.tracker.partitions.get(tp)
        if guard is None or ptrack is None:
            return
        state = guard.state(tp)
        while not ptrack.revoked:
            held = self._held.get(tp)
            if not held:
                return  # forgotten: the partition left
            hi = max(m.offset() for m in held)
            if hi <= guard.covered(tp):
                self._release(tp)  # synchronously after the check: nothing slips in
                return
            if ptrack.high >= 0:
                lo = ptrack.committable()
            else:
                first = min(m.offset() for m in held)
                lo = min(self._unprocessed_lo.setdefault(tp, first), first)
            await guard.write_and_wait(tp, state.encode("batch", lo, hi), hi)

    def _forget(self, tps: set[TP]) -> None:
        """Drop the messages of ``tps`` wherever they wait: batches waiting for their
        journal record, messages held back behind suspects, held partitions."""
        for waiting in self._waiting:
            kept = [m for m in waiting.batch if (m.topic(), m.partition()) not in tps]
            self.processed += len(waiting.batch) - len(kept)
            waiting.batch = kept
        kept = [m for m in self._deferred if (m.topic(), m.partition()) not in tps]
        self.processed += len(self._deferred) - len(kept)
        self._deferred = kept
        for tp in tps:
            self.processed += len(self._held.pop(tp, ()))
            self._held_why.pop(tp, None)

    # -- crash suspects: the window a dead owner left, re-run one offset at a time -------

    def _take_suspect(self, tp: TP, kmsg: Any) -> None:
        run = self._suspects[tp]
        offset = kmsg.offset()
        if offset > run.hi:  # past the window: hold the rest until the suspects are done
            run.complete = True
            self._hold(tp, kmsg, _UNTIL_RELEASED, _FOR_SUSPECTS)
        else:
            run.queue.append(kmsg)
            run.complete = run.complete or offset == run.hi
        if self._suspect_task is None:
            self._suspect_task = asyncio.get_running_loop().create_task(self._run_suspects())

    async def _run_suspects(self) -> None:
        """Re-run every suspect of every partition strictly one at a time.

        One at a time across partitions too, and with all other deliveries held back
        (``_deferred``): if the process dies now, the journal names exactly one offset.
        """
        guard = self.guard
        assert guard is not None
        try:
            while True:
                ready = [(tp, run) for tp, run in self._suspects.items() if run.queue]
                for tp, run in ready:
                    await self._run_suspects_of(guard, tp, run)
                done = [(tp, r) for tp, r in self._suspects.items() if r.complete and not r.queue]
                for tp, run in done:
                    await self._suspects_done(guard, tp, run)
                if not ready and not done:
                    break
        finally:
            self._suspect_task = None
        self._flush_deferred()

    async def _run_suspects_of(self, guard: CrashGuard, tp: TP, run: SuspectRun) -> None:
        ptrack = self.tracker.partitions.get(tp)
        state = guard.states.get(tp)
        while (
            run.queue
            and self._suspects.get(tp) is run
            and ptrack is not None
            and state is not None
            and not ptrack.revoked
        ):
            kmsg = run.queue.popleft()
            offset = kmsg.offset()
            if tp[0] in self.retry_topics and not _due(kmsg):
                # Not due: its previous owner held it, never ran it, nor anything after it
                # in this partition (held behind it, in order). None of them can have
                # crashed anything: they wait, unrun, until due (released when the
                # suspects are done, held again by _retry_record with its timer).
                rest = list(run.queue)
                run.queue.clear()
                run.complete = True
                self._hold(tp, kmsg, _UNTIL_RELEASED, _NOT_DUE)  # before what is held already
                self._held[tp][1:1] = rest
                self.processed -= len(rest)
                return
            crashes = state.crashes(offset)
            if crashes >= guard.quarantine_after:
                self._quarantine(kmsg, ptrack, crashes)
                state.quarantine(offset, crashes)
                continue
            lo = ptrack.committable() if ptrack.high >= 0 else offset
            await guard.write_and_wait(tp, state.encode("single", lo, offset, offset), offset)
            if self._suspects.get(tp) is not run or ptrack.revoked:
                return  # revoked while the record was written: the next owner runs it
            touched: set[SubscriberRuntime] = set()
            self._one(kmsg, tp[0], touched, {})
            for runtime in touched:
                runtime.kick()
            while offset in ptrack.pending and not ptrack.revoked:  # noqa: ASYNC110 - rare path
                await asyncio.sleep(0.005)
            # It ran alone and the process lived: it and everything before it in this
            # partition are cleared, so later deaths cannot pile counts on innocents.
            state.prune(offset + 1)

    async def _suspects_done(self, guard: CrashGuard, tp: TP, run: SuspectRun) -> None:
        if self._suspects.get(tp) is not run:
            return  # revoked meanwhile, perhaps assigned again with suspects of its own
        state = guard.states.get(tp)
        ptrack = self.tracker.partitions.get(tp)
        if state is not None and ptrack is not None and not ptrack.revoked:
            # First the journal says the suspects are done: until now its last word named
            # the last suspect, which a crash of what runs next must not be blamed on.
            # Nothing of this partition is in a handler; it stays a suspect partition
            # while this is written, so what arrives is held and nothing overtakes.
            state.suspects_hi = -1
            await guard.write_and_wait(tp, state.encode("clean", ptrack.committable(), -1), -1)
        if self._suspects.get(tp) is not run or (ptrack is not None and ptrack.revoked):
            return
        del self._suspects[tp]
        # Synchronously, with nothing awaited: what this partition held, then what waited
        # behind the suspects, goes first, so no later batch can overtake it. What it held
        # is past every record written so far: _process holds it again until journaled.
        self._release(tp)
        self._flush_deferred()
        log.info("%s[%d]: crash suspects done; back to normal", *tp)

    def _flush_deferred(self) -> None:
        if not self._suspects and self._deferred:
            deferred, self._deferred = self._deferred, []
            self._process(deferred)

    def _quarantine(self, kmsg: KafkaRecord, ptrack: PartitionTracker, crashes: int) -> None:
        assert self.guard is not None
        record = Record.bare(kmsg, ptrack)
        if kmsg.topic() in self.retry_topics:  # name the origin, like every DLQ record
            with contextlib.suppress(Exception):
                _name_origin(record, h.decode(record.headers))
        last = self.guard.last_exit
        reason = f"crash: the process died {crashes} times while this message was in flight" + (
            f" (last exit: {last})" if last else ""
        )
        log.error(
            "quarantined %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason
        )
        ptrack.hold(kmsg.offset(), 1)
        self.settler.quarantine(record, reason, signal=last)

    # -- partitions coming and going ------------------------------------------------------

    async def assigned(self, tps: list[TP], committed: dict[TP, int]) -> None:
        for tp in tps:
            self.tracker.get(*tp)
            self._unprocessed_lo.pop(tp, None)
            self.started_at[tp] = committed.get(tp, -1)
        if self.guard is None:
            return
        states = await self.guard.recover(tps, committed)
        for tp, state in states.items():
            if state.suspects_hi >= 0:
                self._suspects[tp] = SuspectRun(hi=state.suspects_hi)

    async def revoked(self, tps: list[TP], lost: bool) -> list[tuple[TP, int]]:
        """Drain the revoked partitions (bounded), then say what to commit for them."""
        gone = set(tps)
        self.stalls.forget(tps)
        for tp in tps:
            self.started_at.pop(tp, None)
        for tp in tps:
            run = self._suspects.pop(tp, None)
            if run is not None:
                run.queue.clear()
            self._unprocessed_lo.pop(tp, None)
        # What still waits for its journal record or behind crash suspects must not reach
        # a later owner's tracker (this instance may be assigned the partition again).
        self._forget(gone)
        self._flush_deferred()
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
        if self.guard is not None and not lost:
            # This process lets them go alive: whatever still runs in a handler (a drain
            # that timed out) did not kill it, so the next owner suspects nothing. Were
            # it blamed, one slow record would stop every partition behind suspects.
            guard = self.guard
            try:
                await asyncio.gather(
                    *(
                        # suspects not yet re-run stay in the record (see journal.recover)
                        guard.write_and_wait(
                            t.tp, guard.states[t.tp].encode("clean", t.committable(), -1), -1
                        )
                        for t in trackers
                        if t.tp in guard.states
                    )
                )
            finally:  # also when cancelled: no retry of these records may outlive us
                guard.forget(tps)
        elif self.guard is not None:
            self.guard.forget(tps)
        return offsets

    def waiting(self) -> dict[TP, str]:
        """Partitions with messages held back (not in the tracker), and why: for the
        stall alarm. A retry partition whose head is not due yet is not waiting."""
        out = {tp: why for tp, why in self._held_why.items() if why != _NOT_DUE}
        for tp in self._suspects:
            out[tp] = "re-running crash suspects one at a time"
        for kmsg in self._deferred:
            tp = (kmsg.topic(), kmsg.partition())
            out.setdefault(tp, "held back while another partition's crash suspects re-run")
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

    def commit_due(self) -> None:
        offsets = self.tracker.due()
        if offsets and self.source is not None:
            self.source.commit(offsets)
            self.tracker.mark_committed(offsets)

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait (bounded) until every held offset is settled."""
        trackers = list(self.tracker.partitions.values())
        results = await asyncio.gather(*(t.drained(timeout) for t in trackers))
        return all(results)
