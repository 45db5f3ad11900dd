"""The crash guard's gate on the record path: nothing runs before the journal names it.

The pipeline hands every batch to its gate and gets it back, in order, once it may run
(``Pipeline.process``); per record it asks ``admit`` while the gate is ``busy`` or a
batch was not named as a whole. Two gates:

- ``OpenGate`` (crash guard off): every batch runs at once, nothing is held.
- ``JournalGate``: before any delivery of a batch starts, a journal record per
  partition names the offsets that may be in a handler, and the batch waits for the
  broker's acknowledgement (batches never overtake each other). Each record names a
  lease past its batch (``LEASE``, or as many offsets as the batch brought of the
  partition, if more): the batches that follow within it run at once, and the lease is
  renewed ahead, so in a steady stream of small batches none waits for the journal.
  Reading a backlog, librdkafka hands a partition's records out in runs of a full batch,
  several back to back (one fetch response): each lies past the lease of the one before,
  whose record is not yet acknowledged, so it waits for its own (fanout-3 on the embedded
  broker: ~160 of ~220 partition batches, ~5 ms each). The waits overlap: every record is
  written on arrival, and the loop runs the batches before. A lease four times as long
  halved them (~170 to ~85) and moved throughput by 1.7 % (within the noise), while a
  death would leave a window that much longer to re-run one offset at a time: not taken.
  After a death, the window the dead owner left — lease included — is re-run: see
  ``suspects.py``; what of it lies past the end of the partition never ran, and the
  consumer's end-of-partition event says where that is (``reached_end``).

Coverage invariant (``CrashGuard.covered``, kept here): no offset runs unless every
possible last journal record of its partition names it. A record that arrives while its
partition is held is past what was journaled: its partition is held again until a record
names it (``_cover``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from ..consume.held import UNTIL_RELEASED, HeldPartitions
from ..message import KafkaRecord, Message, Record, error_of, offset_of, partition_of, topic_of
from ..settle import headers as h
from .guard import CrashGuard, JournalUnreadable
from .sandbox import SandboxSpec

if TYPE_CHECKING:
    from ..commit import OffsetTracker, PartitionTracker
    from ..deliver import SubscriberRuntime
    from ..settle import Settler

log = logging.getLogger("shunter.crashguard")

TP = tuple[str, int]

FOR_JOURNAL = "waiting for its crash-guard journal record"
# Offsets a batch record names past its batch's last one (at least; as many as the batch
# brought of the partition, if more): the batches that follow run under this lease at
# once, without waiting for a record of their own, which is renewed ahead of time.
LEASE = 64
FOR_JOURNAL_READ = "its crash-guard journal could not be read at assignment; reading again"
REREAD_FIRST = 1.0  # seconds before reading an unreadable journal again; doubles to 30 s


class Gated(Protocol):
    """What a gate asks of the pipeline it guards."""

    tracker: OffsetTracker
    held: HeldPartitions
    settler: Settler
    retry_topics: set[str]
    runtimes: dict[str, SubscriberRuntime]

    def process(self, batch: list[Any], named: bool = False) -> None: ...

    def run_alone(
        self, kmsg: KafkaRecord, divert: Callable[[Message], bool] | None = None
    ) -> None: ...

    def count(self, taken: int) -> None: ...

    def delivering(self) -> bool: ...


class OpenGate:
    """No crash guard: batches run as they come."""

    guard: CrashGuard | None = None
    busy = False

    def __init__(self, pipeline: Gated) -> None:
        self._pipeline = pipeline

    def handle_batch(self, batch: list[Any]) -> None:
        self._pipeline.process(batch, True)

    def admit(self, tp: TP, kmsg: Any, named: bool) -> bool:
        return True

    def reached_end(self, tp: TP, kmsg: Any) -> None:
        return None

    async def assigned(self, tps: list[TP], committed: dict[TP, int]) -> None:
        return None

    def leaving(self, tps: set[TP]) -> None:
        return None

    async def released(
        self, tps: list[TP], trackers: list[PartitionTracker], lost: bool
    ) -> None:
        return None

    def waiting(self) -> dict[TP, str]:
        return {}

    async def close(self) -> None:
        return None


def _renewed(_err: object) -> None:
    """A lease renewal was acknowledged: nothing waits for it (see ``handle_batch``)."""


class _Waiting:
    """A batch waiting for its journal records to be acknowledged."""

    __slots__ = ("batch", "last", "left")

    def __init__(self, batch: list[Any], last: dict[TP, int]) -> None:
        self.batch = batch
        self.last = last  # per partition, its last offset in the batch
        self.left = 0


class JournalGate:
    """The crash guard on: journal first, then run; suspects re-run as ``suspects.py`` says."""

    def __init__(
        self, guard: CrashGuard, pipeline: Gated, sandbox: dict[str, SandboxSpec] | None = None
    ) -> None:
        from .suspects import Suspects  # the suspects' half of the gate

        self.guard = guard
        self._pipeline = pipeline
        self._tracker = pipeline.tracker
        self._held = pipeline.held
        self._waiting: deque[_Waiting] = deque()  # batches waiting for their journal record
        # Per partition with nothing processed yet since its assignment: the first offset
        # journaled (see handle_batch). Dropped when the partition is revoked.
        self._unprocessed_lo: dict[TP, int] = {}
        self._covering: set[asyncio.Task[None]] = set()  # _cover tasks (kept referenced)
        # Assigned partitions whose journal could not be read, with their committed
        # offset: nothing of them runs or is journaled until it is (``_reread``).
        self._unread: dict[TP, int] = {}
        self._rereading: asyncio.Task[None] | None = None
        self.suspects = Suspects(self, guard, pipeline, sandbox)

    @property
    def busy(self) -> bool:
        """Crash suspects are re-run: every record must be looked at (``admit``)."""
        return bool(self.suspects)

    # -- the path of a batch --------------------------------------------------------------

    def handle_batch(self, batch: list[Any]) -> None:
        """Journal the batch, then hand it on to be processed in order.

        A batch whose offsets an acknowledged record names already (its lease) is handed
        on without waiting; its partition's lease is renewed once fewer than
        ``LEASE // 2`` offsets of it are left and no record of the partition is being
        written. A batch past the lease waits for a record naming it, and a lease beyond
        it."""
        # Each partition's first and last record (its offsets rise through the batch);
        # their offsets are read once per partition, not per record.
        firsts: dict[TP, Any] = {}
        lasts: dict[TP, Any] = {}
        for kmsg in batch:
            if error_of(kmsg) is None:
                tp = (topic_of(kmsg), partition_of(kmsg))
                lasts[tp] = kmsg
                if tp not in firsts:
                    firsts[tp] = kmsg
        first = {tp: offset_of(kmsg) for tp, kmsg in firsts.items()}
        last = {tp: offset_of(kmsg) for tp, kmsg in lasts.items()}
        waiting = _Waiting(batch, last)
        guard = self.guard
        for tp, hi in last.items():
            ptrack = self._tracker.partitions.get(tp)
            if ptrack is None or tp in self.suspects or tp in self._held or tp in self._unread:
                continue
            leased = guard.covered(tp)
            if hi <= leased:  # named already, whatever record ends up last: runs at once
                if hi > leased - LEASE // 2 and not guard.writing(tp):
                    self._journal(tp, ptrack, first[tp], hi, _renewed)
                continue
            waiting.left += 1
            self._journal(tp, ptrack, first[tp], hi, partial(self._journaled, waiting))
        self._waiting.append(waiting)
        self._flush_waiting()

    def _journal(
        self, tp: TP, ptrack: PartitionTracker, first: int, hi: int, done: Callable[[Any], None]
    ) -> None:
        """Write a ``batch`` record naming ``tp``'s window up to ``hi`` and a lease past it."""
        state = self.guard.state(tp)
        # The window starts at the first offset not yet settled. Before this partition
        # has processed anything since its assignment, that is the first offset of the
        # first batch journaled, not this batch's: the journal keeps only its last record
        # per partition, and an earlier batch may still be waiting.
        lo = self.window_start(tp, ptrack, first)
        state.prune(ptrack.committed if ptrack.committed >= 0 else lo)
        end = hi + max(LEASE, hi - first + 1)
        self.guard.write(tp, state.encode("batch", lo, hi, lease=end), end, done)

    def window_start(self, tp: TP, ptrack: PartitionTracker, first: int) -> int:
        """The first offset a record of ``tp`` must name (``first``: of what it runs)."""
        if ptrack.high >= 0:
            return ptrack.committable()
        return min(self._unprocessed_lo.setdefault(tp, first), first)

    def _journaled(self, waiting: _Waiting, _err: object) -> None:
        waiting.left -= 1
        self._flush_waiting()

    def _flush_waiting(self) -> None:
        """Process journaled batches, oldest first: batches never overtake each other."""
        covered = self.guard.covered
        while self._waiting and self._waiting[0].left == 0:
            waiting = self._waiting.popleft()
            # The common case: the journal names every offset of the batch, so no record
            # of it needs the per-message check (a partition held meanwhile, say, does).
            named = all(hi <= covered(tp) for tp, hi in waiting.last.items())
            self._pipeline.process(waiting.batch, named)

    def reached_end(self, tp: TP, kmsg: Any) -> None:
        """The consumer reached the end of ``tp`` (``kmsg``: the event, its offset the
        end): every record of it below has been handed over, in order, before this."""
        if self._unread and tp in self._unread:
            self._held.hold(tp, kmsg, UNTIL_RELEASED, FOR_JOURNAL_READ)  # in order, too
        elif self.suspects:
            self.suspects.reached_end(tp, kmsg.offset())

    def admit(self, tp: TP, kmsg: Any, named: bool) -> bool:
        """May ``kmsg`` run now? If not, the gate keeps it (suspect, deferred, held)."""
        if self._unread and tp in self._unread:
            self._held.hold(tp, kmsg, UNTIL_RELEASED, FOR_JOURNAL_READ)
            return False
        if self.suspects and not self.suspects.admit(tp, kmsg):
            return False
        # The journal must name an offset before it runs. Batches are journaled on
        # arrival, so this holds but for what arrived while its partition was held: that
        # partition is held again until a record names it.
        if (
            not named
            and kmsg.offset() > self.guard.covered(tp)
            and tp in self._tracker.partitions
        ):
            self._held.hold(tp, kmsg, UNTIL_RELEASED, FOR_JOURNAL)
            self._start_cover(tp)
            return False
        return True

    def _start_cover(self, tp: TP) -> None:
        task = asyncio.get_running_loop().create_task(self._cover(tp))
        self._covering.add(task)
        task.add_done_callback(self._covering.discard)

    async def _cover(self, tp: TP) -> None:
        """Journal what ``tp`` holds, then release it (held meanwhile, so in order)."""
        ptrack = self._tracker.partitions.get(tp)
        if ptrack is None:
            return
        state = self.guard.state(tp)
        while not ptrack.revoked:
            held = self._held.messages(tp)
            if not held:
                return  # forgotten: the partition left
            hi = max(m.offset() for m in held)
            if hi <= self.guard.covered(tp):
                self._held.release(tp)  # synchronously after the check: nothing slips in
                return
            lo = self.window_start(tp, ptrack, min(m.offset() for m in held))
            await self.guard.write_and_wait(tp, state.encode("batch", lo, hi), hi)

    # -- partitions coming and going ------------------------------------------------------

    async def assigned(self, tps: list[TP], committed: dict[TP, int]) -> None:
        for tp in tps:
            self._unprocessed_lo.pop(tp, None)
        try:
            states = await self.guard.recover(tps, committed)
        except JournalUnreadable as exc:
            self._read_later(tps, committed, exc)
            return
        self.suspects.recovered(states)

    def _read_later(self, tps: list[TP], committed: dict[TP, int], exc: Exception) -> None:
        """Fail closed: a partition whose journal cannot be read runs nothing until it
        can. Run as if no one had died, a pill that killed its last owner would kill this
        process too, and its first journal record would bury the dead owner's, and with
        it the crash count: every unreadable read would be one more death uncounted, a
        crash loop for as long as the journal stays unreadable."""
        log.error(
            "reading the crash-guard journal for %s failed (%s); they are held until it "
            "can be read (a previous owner's crash window is unknown)",
            ", ".join(f"{t}[{p}]" for t, p in tps),
            exc,
        )
        for tp in tps:
            self._unread[tp] = committed.get(tp, -1)
        if self._rereading is None or self._rereading.done():
            self._rereading = asyncio.get_running_loop().create_task(self._reread())

    async def _reread(self) -> None:
        """Read the journal of the unread partitions again (backing off) until it can be
        read; then they run, crash suspects first, with what they held meanwhile."""
        delay = REREAD_FIRST
        while self._unread:
            await asyncio.sleep(delay)
            unread = dict(self._unread)
            try:
                states = await self.guard.recover(list(unread), unread, self._unread.__contains__)
            except Exception as exc:  # JournalUnreadable, or a bug: never give up on them
                delay = min(delay * 2, 30.0)
                log.error(
                    "the crash-guard journal still cannot be read (%s); %s held, reading "
                    "again in %.0fs",
                    exc,
                    ", ".join(f"{t}[{p}]" for t, p in unread),
                    delay,
                    exc_info=not isinstance(exc, JournalUnreadable),
                )
                continue
            delay = REREAD_FIRST
            left = [tp for tp in states if tp not in self._unread]  # dropped by ``leaving``
            self.guard.forget(left)
            states = {tp: state for tp, state in states.items() if tp in self._unread}
            for tp in states:
                del self._unread[tp]
            self.suspects.recovered(states)
            log.warning(
                "read the crash-guard journal for %s; they run again",
                ", ".join(f"{t}[{p}]" for t, p in states),
            )
            for tp in states:
                self._held.release(tp)

    def leaving(self, tps: set[TP]) -> None:
        """Before the drain: what of ``tps`` waits for its journal record or behind crash
        suspects must not reach a later owner's tracker (this instance may be assigned the
        partition again)."""
        self.suspects.leaving(tps)
        for tp in tps:
            self._unprocessed_lo.pop(tp, None)
            self._unread.pop(tp, None)
        for waiting in self._waiting:
            kept = [m for m in waiting.batch if (m.topic(), m.partition()) not in tps]
            self._pipeline.count(len(waiting.batch) - len(kept))
            waiting.batch = kept
        self.suspects.flush_deferred()

    async def released(
        self, tps: list[TP], trackers: list[PartitionTracker], lost: bool
    ) -> None:
        """After the drain: the last word about each partition this process lets go."""
        guard = self.guard
        if lost:
            guard.forget(tps)
            return
        # This process lets them go alive: whatever still runs in a handler (a drain that
        # timed out) did not kill it, so the next owner suspects nothing. Were it blamed,
        # one slow record would stop every partition behind suspects.
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

    def waiting(self) -> dict[TP, str]:
        return {**dict.fromkeys(self._unread, FOR_JOURNAL_READ), **self.suspects.waiting()}

    async def close(self) -> None:
        if self._rereading is not None:
            self._rereading.cancel()
        if self.suspects.sandbox is not None:
            await self.suspects.sandbox.close()

    # -- quarantine -----------------------------------------------------------------------

    def quarantine(self, kmsg: KafkaRecord, ptrack: PartitionTracker, crashes: int) -> None:
        """To the dead-letter topic unrun, with the dying stack if this machine has it."""
        record = Record.bare(kmsg, ptrack)
        if kmsg.topic() in self._pipeline.retry_topics:  # name the origin, like every DLQ
            with contextlib.suppress(Exception):
                info = h.decode(record.headers)
                record.topic, record.partition = info.origin_topic, info.origin_partition
                record.offset, record.timestamp = info.origin_offset, info.origin_timestamp_ms
        last = self.guard.last_exit
        reason = f"crash: the process died {crashes} times while this message was in flight" + (
            f" (last exit: {last})" if last else ""
        )
        log.error(
            "quarantined %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason
        )
        ptrack.hold(kmsg.offset(), 1)
        self._pipeline.settler.quarantine(record, reason, signal=last, stack=self.guard.last_stack)
