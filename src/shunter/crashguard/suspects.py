"""Crash suspects: the window a dead owner left, re-run one offset at a time.

On assignment, a partition whose last journal record is not ``clean`` had an owner that
died with deliveries in flight (``journal.recover`` gives each offset of that window one
crash count). Its suspects are re-run strictly one at a time, across partitions too, with
every other delivery held back (``_deferred``), each offset journaled alone (``single``)
before it runs: if the process dies now, the journal names exactly one offset. An offset
whose count reaches ``crash_guard.quarantine_after`` is quarantined unrun.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from ..consume.held import NOT_DUE, UNTIL_RELEASED
from ..message import read_headers
from ..settle import headers as h
from .guard import CrashGuard, SuspectRun
from .journal import PartitionState
from .sandbox import Sandbox, SandboxSpec
from .watchdog import BLOCKED_MARK, blocked_on

if TYPE_CHECKING:
    from ..commit import PartitionTracker
    from .gate import Gated, JournalGate

log = logging.getLogger("shunter.crashguard")

TP = tuple[str, int]

FOR_SUSPECTS = "waiting for its crash suspects to be re-run"
_RUN, _NEXT, _STOP = object(), object(), object()  # what _unrun says of a suspect


def _due(kmsg: Any) -> bool:
    """A retry record whose delay is over (or whose headers say nothing usable: it is
    then dead-lettered when it is processed)."""
    try:
        return h.decode(read_headers(kmsg)).not_before_ms <= time.time() * 1000
    except Exception:
        return True


class Suspects:
    def __init__(
        self,
        gate: JournalGate,
        guard: CrashGuard,
        pipeline: Gated,
        sandbox: dict[str, SandboxSpec] | None = None,
    ) -> None:
        self._gate = gate
        self._guard = guard
        self._pipeline = pipeline
        self._tracker = pipeline.tracker
        self._held = pipeline.held
        self._runs: dict[TP, SuspectRun] = {}
        self._task: asyncio.Task[None] | None = None
        self._deferred: list[Any] = []  # messages held back while crash suspects run
        # Every in-process caller can be sandboxed: suspects run in sandboxes, and the
        # rest of the stream goes on meanwhile (a pill can no longer kill this process).
        self.sandbox = (
            None
            if sandbox is None
            else Sandbox(
                sandbox,
                pipeline.settler,
                guard.quarantine_after,
                self._count_death,
                # The last worker hung rather than crashed: hanging again is the pill.
                hang_stack=guard.last_stack if BLOCKED_MARK in guard.last_exit else None,
                hang_of=blocked_on(guard.last_exit),
            )
        )

    def __bool__(self) -> bool:
        return bool(self._runs)

    def __contains__(self, tp: object) -> bool:
        return tp in self._runs

    def recovered(self, states: dict[TP, PartitionState]) -> None:
        for tp, state in states.items():
            if state.suspects_hi >= 0:
                self._runs[tp] = SuspectRun(hi=state.suspects_hi)

    def admit(self, tp: TP, kmsg: Any) -> bool:
        """While suspects run: theirs are taken here, everything else waits."""
        if tp in self._runs:
            self._take(tp, kmsg)
            return False
        if self.sandbox is not None:
            return True
        self._deferred.append(kmsg)  # nothing else runs while a suspect runs alone
        self._pipeline.count(-1)
        return False

    def waiting(self) -> dict[TP, str]:
        how = "one at a time" if self.sandbox is None else "in a sandbox"
        out = {tp: f"re-running crash suspects {how}" for tp in self._runs}
        for kmsg in self._deferred:
            tp = (kmsg.topic(), kmsg.partition())
            out.setdefault(tp, "held back while another partition's crash suspects re-run")
        return out

    def leaving(self, tps: set[TP]) -> None:
        for tp in tps:
            run = self._runs.pop(tp, None)
            if run is not None:
                run.queue.clear()
        kept = [m for m in self._deferred if (m.topic(), m.partition()) not in tps]
        self._pipeline.count(len(self._deferred) - len(kept))
        self._deferred = kept

    def flush_deferred(self) -> None:
        if not self._runs and self._deferred:
            deferred, self._deferred = self._deferred, []
            self._pipeline.process(deferred)

    def reached_end(self, tp: TP, end: int) -> None:
        """The consumer reached the end of ``tp`` at ``end``: every suspect there is has
        been taken. A dead owner's window may name offsets past the end (its lease):
        they never ran, carry no count, and the run waits for none of them. Without
        this, a quiet partition would keep its run open until records arrived, and with
        sandboxes off every other partition would wait behind it."""
        run = self._runs.get(tp)
        if run is None:
            return
        if end <= run.hi:
            state = self._guard.states.get(tp)
            if state is not None:
                state.ends_at(end)
            run.hi = end - 1
        # Complete either way: the window's last offset may be no record a consumer is
        # given (a transaction marker, a record compacted away), so none would end it.
        run.complete = True
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    # -- re-running -----------------------------------------------------------------------

    def _take(self, tp: TP, kmsg: Any) -> None:
        run = self._runs[tp]
        offset = kmsg.offset()
        if offset > run.hi:  # past the window: hold the rest until the suspects are done
            run.complete = True
            self._held.hold(tp, kmsg, UNTIL_RELEASED, FOR_SUSPECTS)
        else:
            run.queue.append(kmsg)
            run.complete = run.complete or offset == run.hi
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """Re-run every suspect of every partition strictly one at a time."""
        try:
            while True:
                ready = [(tp, run) for tp, run in self._runs.items() if run.queue]
                for tp, run in ready:
                    if self.sandbox is None:
                        await self._run_partition(tp, run)
                    else:
                        await self._sandbox_partition(tp, run)
                done = [(tp, r) for tp, r in self._runs.items() if r.complete and not r.queue]
                for tp, run in done:
                    await self._done(tp, run)
                if not ready and not done:
                    break
        finally:
            self._task = None
        self.flush_deferred()

    async def _run_partition(self, tp: TP, run: SuspectRun) -> None:
        guard = self._guard
        ptrack = self._tracker.partitions.get(tp)
        state = guard.states.get(tp)
        while (
            run.queue
            and self._runs.get(tp) is run
            and ptrack is not None
            and state is not None
            and not ptrack.revoked
        ):
            kmsg = run.queue.popleft()
            offset = kmsg.offset()
            step = self._unrun(tp, run, kmsg, ptrack, state)
            if step is _STOP:
                return
            if step is _NEXT:
                continue
            await self._alone(tp, run)
            if self._runs.get(tp) is not run or ptrack.revoked:
                return  # revoked meanwhile: the next owner runs it
            lo = ptrack.committable() if ptrack.high >= 0 else offset
            await guard.write_and_wait(tp, state.encode("single", lo, offset, offset), offset)
            if self._runs.get(tp) is not run or ptrack.revoked:
                return  # revoked while the record was written: the next owner runs it
            self._pipeline.run_alone(kmsg)
            while offset in ptrack.pending and not ptrack.revoked:  # noqa: ASYNC110 - rare path
                await asyncio.sleep(0.005)
            # It ran alone and the process lived: it and everything before it in this
            # partition are cleared, so later deaths cannot pile counts on innocents.
            state.prune(offset + 1)

    async def _alone(self, tp: TP, run: SuspectRun) -> None:
        """Wait until no other delivery is in a handler or queued to start. A ``single``
        record says its offset is the one thing running: a delivery that was already
        running when it was written (started before these suspects were known, or queued
        then) and kills the process would be blamed on that offset, an innocent, and go
        uncounted itself. Bounded, once per run, by the longest handler timeout and a
        second: a handler that ignores its cancellation, or a thread running on past its
        timeout, may never return, and every other partition waits behind these suspects."""
        if not self._pipeline.delivering():
            return
        now = time.monotonic()
        if run.alone_by == 0.0:
            runtimes = self._pipeline.runtimes.values()
            run.alone_by = now + max((rt.timeout for rt in runtimes), default=0.0) + 1.0
            log.warning(
                "%s[%d]: crash suspects wait for deliveries already in handlers to finish "
                "before running alone (at most %.0fs)",
                *tp,
                run.alone_by - now,
            )
        while now < run.alone_by and self._pipeline.delivering():
            await asyncio.sleep(0.005)
            now = time.monotonic()
        if now >= run.alone_by and not run.waited_out:
            run.waited_out = True
            log.error(
                "%s[%d]: deliveries still in handlers past their timeouts; running crash "
                "suspects alone regardless (a crash now is blamed on the suspect it names)",
                *tp,
            )

    async def _sandbox_partition(self, tp: TP, run: SuspectRun) -> None:
        """Hand the window's records to the sandboxes, in order, without waiting for
        them: a sandbox death is counted against the one offset it ran (_count_death)."""
        assert self.sandbox is not None
        guard = self._guard
        ptrack = self._tracker.partitions.get(tp)
        state = guard.states.get(tp)
        if ptrack is None or state is None or ptrack.revoked:
            return
        if not run.running:  # the journal says: suspects in a sandbox, no death of ours
            run.running = True
            lo = ptrack.committable() if ptrack.high >= 0 else run.queue[0].offset()
            await guard.write_and_wait(tp, state.encode("sandbox", lo, run.hi), run.hi)
        while run.queue and self._runs.get(tp) is run and not ptrack.revoked:
            kmsg = run.queue.popleft()
            step = self._unrun(tp, run, kmsg, ptrack, state)
            if step is _STOP:
                return
            if step is _RUN:
                self._pipeline.run_alone(kmsg, self.sandbox.take)

    def _unrun(
        self,
        tp: TP,
        run: SuspectRun,
        kmsg: Any,
        ptrack: PartitionTracker,
        state: PartitionState,
    ) -> object:
        """What becomes of a suspect before it runs: _RUN it, _NEXT (quarantined, unrun),
        or _STOP (a retry not yet due: it and the rest of the window wait, unrun)."""
        if tp[0] in self._pipeline.retry_topics and not _due(kmsg):
            # Not due: its previous owner held it, never ran it, nor anything after it
            # in this partition (held behind it, in order). None of them can have
            # crashed anything: they wait, unrun, until due (released when the
            # suspects are done, held again by the pipeline with its timer).
            rest = list(run.queue)
            run.queue.clear()
            run.complete = True
            self._held.hold(tp, kmsg, UNTIL_RELEASED, NOT_DUE)  # before what is held
            self._held.put_back(tp, rest)
            return _STOP
        offset = kmsg.offset()
        crashes = state.crashes(offset)
        if crashes >= self._guard.quarantine_after:
            self._gate.quarantine(kmsg, ptrack, crashes)
            state.quarantine(offset, crashes)
            return _NEXT
        return _RUN

    async def _count_death(self, tp: TP, offset: int) -> int:
        """A sandbox died running ``offset``: one more crash for it, journaled before it
        runs again (the journal keeps the count if this process dies too)."""
        state = self._guard.states.get(tp)
        ptrack = self._tracker.partitions.get(tp)
        if state is None or ptrack is None or ptrack.revoked:
            return self._guard.quarantine_after  # gone: nothing runs it again here
        state.single[offset] = state.single.get(offset, 0) + 1
        crashes = state.crashes(offset)
        if crashes >= self._guard.quarantine_after:
            state.quarantine(offset, crashes)
        lo = ptrack.committable()
        await self._guard.write_and_wait(tp, state.encode("sandbox", lo, offset), offset)
        return crashes

    async def _done(self, tp: TP, run: SuspectRun) -> None:
        if self._runs.get(tp) is not run:
            return  # revoked meanwhile, perhaps assigned again with suspects of its own
        state = self._guard.states.get(tp)
        ptrack = self._tracker.partitions.get(tp)
        # The sandboxes finish the window before anything after it runs (rare: a death).
        while (  # noqa: ASYNC110
            self.sandbox is not None
            and ptrack is not None
            and not ptrack.revoked
            and self._runs.get(tp) is run
            and any(o <= run.hi for o in ptrack.pending)
        ):
            await asyncio.sleep(0.01)
        if state is not None and ptrack is not None and not ptrack.revoked:
            # First the journal says the suspects are done: until now its last word named
            # the last suspect, which a crash of what runs next must not be blamed on.
            # Nothing of this partition is in a handler; it stays a suspect partition
            # while this is written, so what arrives is held and nothing overtakes.
            state.suspects_hi = -1
            clean = state.encode("clean", ptrack.committable(), -1)
            await self._guard.write_and_wait(tp, clean, -1)
        if self._runs.get(tp) is not run or (ptrack is not None and ptrack.revoked):
            return
        del self._runs[tp]
        # Synchronously, with nothing awaited: what this partition held, then what waited
        # behind the suspects, goes first, so no later batch can overtake it. What it held
        # is past every record written so far: the gate holds it again until journaled.
        self._held.release(tp)
        self.flush_deferred()
        log.info("%s[%d]: crash suspects done; back to normal", *tp)
