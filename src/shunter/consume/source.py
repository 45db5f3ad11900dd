"""The consumer thread.

confluent-kafka's ``consume`` blocks and its rebalance callbacks run inside it, in the
calling thread. So the consumer lives on a thread of its own and hands batches to the
event loop in order; a revocation blocks this thread while the loop drains the revoked
partitions, and then their offsets are committed here, inside the callback, before
librdkafka releases them.

Membership and discovery: ``membership()`` says whether this consumer is a group member
and which source partitions it owns (retry-tier partitions are not source partitions).
Metadata is refreshed every few seconds, so a source topic created after start is
subscribed to within ``DISCOVERY_INTERVAL`` (librdkafka's default would take five
minutes); its first appearance is logged.

Ordering invariant: batches and revocations both reach the loop through
``call_soon_threadsafe`` from this one thread, so the loop sees them in the order they
happened here. Nothing is ever rewound with seek: a paused partition resumes after the
last message it handed out, and the loop holds whatever it was handed meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

log = logging.getLogger("shunter.consume")

TP = tuple[str, int]

# How often librdkafka refreshes metadata, and so finds a source topic created after start;
# while a source topic is missing, this thread also asks every MISSING_INTERVAL (a metadata
# answer listing every topic lets librdkafka see the new one at once).
DISCOVERY_INTERVAL = 3.0
MISSING_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class Membership:
    """What this consumer holds in its group (a snapshot; see ``KafkaSource.membership``)."""

    member: bool  # joined the group (an assignment was received, even an empty one)
    source_partitions: list[TP]
    retry_partitions: list[TP]  # every other subscribed topic's partitions
    missing_topics: list[str]  # source topics not seen on the broker yet


class SourceHandler(Protocol):
    """What the pipeline offers the consumer thread (all called on the loop)."""

    def handle_batch(self, batch: list[Any]) -> None: ...

    def assigned(self, tps: list[TP], committed: dict[TP, int]) -> Coroutine[Any, Any, None]: ...

    def revoked(self, tps: list[TP], lost: bool) -> Coroutine[Any, Any, list[tuple[TP, int]]]: ...

    def in_flight(self) -> int: ...

    def commit_failed(self, tps: list[TP]) -> None: ...


class KafkaSource:
    def __init__(
        self,
        settings: dict[str, Any],
        topics: list[str],
        handler: SourceHandler,
        loop: asyncio.AbstractEventLoop,
        *,
        batch_size: int = 1000,
        max_in_flight: int = 20_000,
        leave_timeout: float = 10.0,
        revoke_timeout: float = 60.0,
        source_topics: list[str] | None = None,
    ) -> None:
        conf = {
            "topic.metadata.refresh.interval.ms": int(DISCOVERY_INTERVAL * 1000),
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": 6000,
            "max.poll.interval.ms": 300_000,
            **settings,
            # The end of a partition, as an event in order with its records: the crash
            # guard's suspect runs end there (``JournalGate.reached_end``).
            "enable.partition.eof": True,
            "on_commit": self._on_commit,
        }
        self._consumer = Consumer(conf)
        self._reset = _RESET.get(str(conf["auto.offset.reset"]))
        # librdkafka refuses to mix eager and cooperative assignors: one cooperative one
        # means incremental assignment, any other means the whole assignment at once.
        self._cooperative = "cooperative" in str(conf["partition.assignment.strategy"])
        self._topics = topics
        self._handler = handler
        self._loop = loop
        self._batch_size = batch_size
        self._high_water = max_in_flight
        self._low_water = max(1, max_in_flight // 2)
        self._leave_timeout = leave_timeout
        self._revoke_timeout = revoke_timeout  # the loop's drain and journal on revocation
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._fetching = True
        self.handed = 0  # messages handed to the loop (written by this thread only)
        self.first_handed = 0.0  # perf_counter() when the first batch was (the bench's start)
        self.assignment: set[TP] = set()
        self._parked: set[TP] = set()  # held by the loop until released
        self._throttled = False  # paused for back-pressure
        self._thread = threading.Thread(target=self._run, name="shunter-consumer", daemon=True)
        self._watermarks: dict[TP, tuple[int, int]] = {}
        # Source topics: the subscribed topics that count for readiness (all, if not said).
        self._source_topics = set(topics if source_topics is None else source_topics)
        self._missing: set[str] = set(self._source_topics)  # until seen on the broker
        self._member = False
        self._first_look = True

    # -- called from the loop -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def commit(self, offsets: list[tuple[TP, int]]) -> None:
        """Commit asynchronously, from the consumer thread.

        confluent-kafka serialises calls on one consumer and ``consume`` holds that
        lock while it waits, so a call from another thread would starve: every call on
        the consumer is made on its own thread, through the command queue.
        """
        if offsets:
            tps = [TopicPartition(t, p, o) for (t, p), o in offsets]
            self._commands.put(lambda: self._consumer.commit(offsets=tps, asynchronous=True))

    def pause_partition(self, tp: TP) -> None:
        """Stop fetching ``tp``; what was already handed out stays the loop's to hold."""
        self._commands.put(lambda: self._do_pause(tp))

    def resume_partition(self, tp: TP) -> None:
        """Fetch ``tp`` again, after the last message of it handed out."""
        self._commands.put(lambda: self._do_resume(tp))

    def stop_fetching(self) -> None:
        """Stop handing out new messages; rebalances are still served."""
        self._commands.put(self._do_stop_fetching)

    def stop(self) -> None:
        """Leave the group (revocation drains and commits) and end the thread."""
        self._stopping.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def membership(self) -> Membership:
        """Whether this consumer is a group member, and the partitions it owns."""
        owned = sorted(self.assignment)
        return Membership(
            self._member and self._thread.is_alive(),
            [tp for tp in owned if tp[0] in self._source_topics],
            [tp for tp in owned if tp[0] not in self._source_topics],
            sorted(self._missing),
        )

    def watermarks(self, tp: TP) -> tuple[int, int] | None:
        """The partition's (low, high) watermarks as last seen by the consumer thread."""
        return self._watermarks.get(tp)

    def _refresh_watermarks(self) -> None:
        marks = {}
        for tp in self.assignment:
            try:
                low, high = self._consumer.get_watermark_offsets(TopicPartition(*tp), cached=True)
            except KafkaException:
                continue
            if high >= 0:
                marks[tp] = (int(low), int(high))
        self._watermarks = marks

    def _discover(self) -> None:
        """Log source topics that appeared on the broker since the last look."""
        try:
            topics = self._consumer.list_topics(timeout=2).topics
        except KafkaException as exc:
            log.debug("listing topics failed: %s", exc)
            return
        appeared = sorted(t for t in self._missing if t in topics and topics[t].error is None)
        self._missing.difference_update(appeared)
        if self._first_look:  # what existed at start is not news (the service said what not)
            self._first_look = False
            return
        for topic in appeared:
            log.info(
                "source topic %s appeared (%d partitions); the group consumes it from "
                "its beginning",
                topic,
                len(topics[topic].partitions),
            )

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        consumer = self._consumer
        consumer.subscribe(
            self._topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        next_marks = 0.0
        next_discovery = 0.0
        try:
            while not self._stopping.is_set():
                self._apply_commands()
                self._apply_backpressure()
                if time.monotonic() >= next_marks:
                    self._refresh_watermarks()
                    next_marks = time.monotonic() + 5.0
                if self._missing and time.monotonic() >= next_discovery:
                    self._discover()
                    next_discovery = time.monotonic() + MISSING_INTERVAL
                batch = self._next_batch(consumer)
                if not batch:
                    continue
                if not self._fetching:  # paused since; the next owner re-reads these
                    continue
                if not self.handed:
                    self.first_handed = time.perf_counter()
                self.handed += len(batch)
                self._loop.call_soon_threadsafe(self._handler.handle_batch, batch)
        except Exception:
            log.critical("consumer thread failed", exc_info=True)
        finally:
            self._member = False
            self._apply_commands()  # commits queued before the stop
            try:
                self._leave()
            except Exception:
                log.exception("committing on the way out failed")
            try:
                consumer.close()  # leaves the group; what is left to revoke is empty
            except Exception:
                log.exception("closing the consumer failed")

    def _next_batch(self, consumer: Consumer) -> list[Any]:
        """What is fetched already, up to ``batch_size``, at once; when nothing is, the
        first record to arrive (within 0.1 s) with whatever came in beside it.

        ``consume(n, timeout)`` alone would wait for n records or the timeout: at a few
        thousand records a second that is the whole timeout, every batch, added to
        every record's latency."""
        batch = consumer.consume(self._batch_size, 0)
        if batch:
            return batch
        first = consumer.poll(0.1)
        if first is None:
            return []
        return (
            [first, *consumer.consume(self._batch_size - 1, 0)] if self._batch_size > 1 else [first]
        )

    def _leave(self) -> None:
        """Revoke every partition ourselves, then commit them while still a member.

        ``close()`` would revoke them too, but its one synchronous commit fails with
        ILLEGAL_GENERATION or REBALANCE_IN_PROGRESS when another member's join is under
        way, and inside ``close()`` nothing can serve that rebalance. Here the commit is
        retried while ``consume`` serves it (fetching is stopped, so nothing new is handed
        out), for at most ``leave_timeout`` seconds.
        """
        tps = sorted(self.assignment)
        if not tps:
            return
        offsets = self._revoke(tps, lost=False)
        if not offsets:
            return
        self._fetching = False
        deadline = time.monotonic() + self._leave_timeout
        while True:
            error = self._commit_sync(offsets)
            if error is None:
                return
            if time.monotonic() >= deadline:
                log.warning(
                    "commit on revocation failed: %s (gave up after %.0fs; the next owner "
                    "may redeliver)",
                    error,
                    self._leave_timeout,
                )
                return
            log.info("commit on the way out refused (%s); serving the rebalance, then again", error)
            self._apply_commands()
            self._consumer.consume(self._batch_size, 0.2)  # discarded: fetching is stopped
            # A partition the rebalance took away is its new owner's to commit now: an
            # older offset from here would only move its commit back.
            try:
                owned = {(p.topic, p.partition) for p in self._consumer.assignment()}
            except KafkaException:
                continue
            offsets = [(tp, offset) for tp, offset in offsets if tp in owned]
            if not offsets:
                return

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                command()
            except KafkaException as exc:
                log.warning("consumer control command failed: %s", exc)

    def _apply_backpressure(self) -> None:
        # Batches handed but not yet taken by the loop: wait (ms) rather than pause, since
        # a pause drops librdkafka's prefetched data and resuming idles up to ~1 s.
        deadline = time.monotonic() + 1.0
        while (
            self.handed - self._handler_processed() > 2 * self._batch_size
            and time.monotonic() < deadline
            and not self._stopping.is_set()
        ):
            time.sleep(0.0005)
        in_flight = self.handed - self._handler_processed() + self._handler.in_flight()
        if not self._throttled and in_flight >= self._high_water:
            self._throttled = True
            self._pause(self.assignment)
            log.info("back-pressure: %d messages in flight, partitions paused", in_flight)
        elif self._throttled and in_flight <= self._low_water:
            self._throttled = False
            if self._fetching:
                self._resume(self.assignment - self._parked)

    def _handler_processed(self) -> int:
        return int(getattr(self._handler, "processed", 0))

    def _pause(self, tps: set[TP]) -> None:
        if tps:
            self._consumer.pause([TopicPartition(t, p) for t, p in tps])

    def _resume(self, tps: set[TP]) -> None:
        if tps:
            self._consumer.resume([TopicPartition(t, p) for t, p in tps])

    def _do_pause(self, tp: TP) -> None:
        if tp in self.assignment:
            self._parked.add(tp)
            self._pause({tp})

    def _do_resume(self, tp: TP) -> None:
        self._parked.discard(tp)
        if tp in self.assignment and not self._throttled and self._fetching:
            self._resume({tp})

    def _do_stop_fetching(self) -> None:
        self._fetching = False
        self._pause(self.assignment)

    # -- rebalance callbacks (run inside consume, on this thread) -------------------------

    def _call_loop(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        self._member = True
        log.info("assigned %s", _show(tps))
        committed: dict[TP, int] = {}
        try:
            positions = consumer.committed(partitions, timeout=30)
        except KafkaException as exc:
            log.warning("reading committed offsets failed: %s", exc)
        else:
            for tp in positions:
                committed[(tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 else -1
            self._start_at(consumer, partitions, positions)
        try:
            self._call_loop(self._handler.assigned(tps, committed))
        except Exception:
            log.exception("handling the assignment failed")
        self.assignment.update(tps)
        if self._throttled or not self._fetching:
            # librdkafka applies the assignment after this returns; pause then.
            self._commands.put(lambda: self._pause(set(tps)))

    def _start_at(
        self,
        consumer: Consumer,
        partitions: list[TopicPartition],
        positions: list[TopicPartition],
    ) -> None:
        """Assign from the committed offsets just read (the ones the loop is told of), and
        where there are none, from ``auto.offset.reset`` named as a logical offset.

        Left to itself, librdkafka reads the same offsets again after this callback and,
        for a partition with none, queries its reset offset after a fixed 100 ms backoff
        (librdkafka treats "no committed offset" as an error to retry): every partition of
        a new group, or a retry tier never committed, would start 100 ms late. Assigning
        here also starts the fetches while the loop reads the crash-guard journal."""
        if self._reset is None:  # auto.offset.reset=error: librdkafka's own path raises
            return
        if any(tp.error is not None for tp in positions):
            # An offset not read is not "none": reset, it would skip (latest) or replay
            # (earliest) a partition. librdkafka's own path reads it again until it can.
            return
        for tp in positions:
            if tp.offset < 0:
                tp.offset = self._reset
        if not self._cooperative:  # eager: the whole assignment in one call
            self._assign(consumer.assign, positions, partitions)
            return
        # Source partitions first: librdkafka's first fetch after an assignment holds the
        # partitions started by then, and one of only empty retry-tier partitions waits
        # out fetch.wait.max.ms (500 ms by default) before the next fetch can ask for the
        # source's records.
        for source in (True, False):
            part = [tp for tp in positions if (tp.topic in self._source_topics) == source]
            if part:
                fallback = [p for p in partitions if (p.topic in self._source_topics) == source]
                self._assign(consumer.incremental_assign, part, fallback)

    @staticmethod
    def _assign(
        assign: Callable[[list[TopicPartition]], None],
        positions: list[TopicPartition],
        fallback: list[TopicPartition],
    ) -> None:
        try:
            assign(positions)
        except KafkaException as exc:
            # After a refused call confluent-kafka no longer assigns by itself.
            log.warning("assigning from the committed offsets failed: %s", exc)
            assign(fallback)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(consumer, partitions, lost=False)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._member = False  # until the next assignment: it has to join again
        self._release(consumer, partitions, lost=True)

    def _release(self, consumer: Consumer, partitions: list[TopicPartition], lost: bool) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        offsets = self._revoke(tps, lost)
        if lost or not offsets:
            return
        error = self._commit_sync(offsets)
        if error is not None:
            log.warning("commit on revocation failed: %s (the next owner may redeliver)", error)

    def _revoke(self, tps: list[TP], lost: bool) -> list[tuple[TP, int]]:
        """Drain ``tps`` on the loop and forget them; the offsets to commit for them."""
        log.info("%s %s", "lost" if lost else "revoked", _show(tps))
        self.assignment.difference_update(tps)
        self._parked.difference_update(tps)
        try:
            offsets: list[tuple[TP, int]] = self._call_loop(
                self._handler.revoked(tps, lost), self._revoke_timeout
            )
        except TimeoutError:
            log.error(
                "revoking %s took longer than %.0fs (journal unreachable?); their offsets "
                "stay uncommitted and the next owner redelivers them",
                _show(tps),
                self._revoke_timeout,
            )
            return []
        except Exception:
            log.exception("draining revoked partitions failed; their offsets stay uncommitted")
            return []
        return offsets

    def _commit_sync(self, offsets: list[tuple[TP, int]]) -> KafkaException | KafkaError | None:
        """Commit and wait; the error (of the request or of any partition), or None."""
        try:
            done = self._consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets], asynchronous=False
            )
        except KafkaException as exc:
            return exc
        for tp in done or ():
            if tp.error is not None:
                return tp.error
        return None

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        failed = [(p.topic, p.partition) for p in partitions if p.error is not None]
        if err is not None and err.code() != KafkaError._NO_OFFSET:
            log.warning("commit failed: %s; offered again on the next tick", err)
            failed = [(p.topic, p.partition) for p in partitions]
        if failed:  # offer those offsets again rather than trust the failed commit
            self._loop.call_soon_threadsafe(self._handler.commit_failed, failed)


# auto.offset.reset (librdkafka's names) → the logical offset a partition starts from when
# it has no committed offset; "error" is left to librdkafka.
_RESET = {
    **dict.fromkeys(("smallest", "earliest", "beginning"), OFFSET_BEGINNING),
    **dict.fromkeys(("largest", "latest", "end"), OFFSET_END),
}


def _show(tps: list[TP]) -> str:
    return ", ".join(f"{t}[{p}]" for t, p in sorted(tps)) or "nothing"
