"""Crash suspects re-run in a sandbox process: a pill kills the sandbox, not the dispatcher.

After a death, the deliveries of the dead owner's window to in-process callers (inline
and thread isolation) run in a worker process per caller (the ``isolation: process``
worker, deliver/process.py), one at a time and in order, the worker answering for each.
When the sandbox dies, the death is counted against exactly the offset it was running
(the journal's ``single`` count, written before the delivery runs again), a fresh sandbox
takes over, and at ``crash_guard.quarantine_after`` that caller's delivery is quarantined
with the sandbox's dying stack: the failing line travels with the record. The death in
the dispatcher that made the window suspect counts as the first.

A suspect that outlives its caller's timeout in the sandbox has failed with a timeout,
like any delivery, unless the dispatcher's last death was the watchdog ending a blocked
event loop (``watchdog.py``): then a hang is what killed it, and the delivery the watchdog
found blocking (``hang_of``) hanging again in the sandbox counts as a death, so that the
pill is quarantined with the stack the blocked loop left (``hang_stack``) rather than sent
round the retry tiers, blocking a worker's loop again at each attempt. The other suspects
time out as usual. When the watchdog could not name the delivery (the loop was blocked
holding the GIL, and faulthandler's timer ended the process), where it was stuck names
it: a suspect past its timeout is ended with SIGABRT, and counts a death if its worker's
dump shows it stuck in the same handler frames as the blocked loop's stack
(``watchdog.blocked_frames``), so that an innocent suspect merely slower than its timeout
is not quarantined. A loop's stack with no handler frames to compare: any hang counts.

The sandbox's address space is limited (``crash_guard.sandbox_memory_mb``), so a memory
pill ends the sandbox, not the dispatcher under the OOM killer. Innocent offsets run at
the speed of a round trip to a worker, with no journal round trip each.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..deliver.failure import failure, timed_out
from ..deliver.process import WorkerPool, WorkerTraceback, _rebuild
from ..errors import WorkerDied
from ..message import Message
from ..outcome import SUCCEEDED, Outcome
from .supervisor import describe_exit
from .watchdog import blocked_frames, hangs_where

if TYPE_CHECKING:
    from ..settle import Settler

log = logging.getLogger("shunter.crashguard")

TP = tuple[str, int]


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """How to run one in-process caller's handler in a sandbox."""

    ref: str | bytes  # the handler's import path, or the pickled module-level function
    timeout: float
    memory_limit_mb: int


# Counts a sandbox death against one offset and says whether it is now quarantined:
# (tp, offset) -> the crash count after this death.
CountDeath = Callable[[TP, int], Awaitable[int]]


class Sandbox:
    def __init__(
        self,
        specs: dict[str, SandboxSpec],
        settler: Settler,
        quarantine_after: int,
        count_death: CountDeath,
        hang_stack: str | None = None,
        hang_of: tuple[str, str, int, int] | None = None,
    ) -> None:
        self.specs = specs
        self._hang_stack = hang_stack  # None: the last death was not a blocked loop
        self._hang_of = hang_of  # (caller, topic, partition, offset); None: not named
        # Where the loop was stuck, for when no delivery was named; empty: any suspect.
        self._hang_frames = blocked_frames(hang_stack) if hang_stack and not hang_of else ()
        self._settler = settler
        self._quarantine_after = quarantine_after
        self._count_death = count_death
        self._pools: dict[str, WorkerPool] = {}
        # A caller's suspects run one at a time, each timed from its own start: a pool's
        # queue would time the ones behind a hanging suspect from when they were queued.
        self._turns: dict[str, asyncio.Lock] = {}
        self._running: set[asyncio.Task[None]] = set()
        self.deaths = 0  # sandboxes that died running a suspect

    def __bool__(self) -> bool:
        return bool(self._running)

    def take(self, msg: Message) -> bool:
        """Run ``msg`` in its caller's sandbox if the caller runs in-process; True if so."""
        spec = self.specs.get(msg.caller)
        if spec is None:
            return False
        task = asyncio.get_running_loop().create_task(self._deliver(msg, spec))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return True

    async def _deliver(self, msg: Message, spec: SandboxSpec) -> None:
        tp, offset = msg._record.ptrack.tp, msg._record.seq
        while not msg._record.ptrack.revoked:
            started = time.perf_counter()
            try:
                outcome = await self._run(msg, spec)
            except WorkerDied as died:
                self.deaths += 1
                crashes = await self._count_death(tp, offset)
                stack = str(died.__cause__ or "").strip()
                if crashes < self._quarantine_after:
                    log.warning(
                        "caller %s: the sandbox %s on crash suspect %s[%d]@%d (%d of %d); "
                        "running it again in a fresh one",
                        msg.caller,
                        died,
                        *tp,
                        offset,
                        crashes,
                        self._quarantine_after,
                    )
                    continue
                self._quarantine(msg, crashes, died, stack)
                return
            self._settler(msg, outcome, time.perf_counter() - started)
            return

    async def _run(self, msg: Message, spec: SandboxSpec) -> Outcome:
        pool = self._pools.get(msg.caller)
        if pool is None:
            pool = self._pools[msg.caller] = WorkerPool(
                msg.caller, spec.ref, 1, spec.memory_limit_mb
            ).start()
        turn = self._turns.get(msg.caller)
        if turn is None:
            turn = self._turns[msg.caller] = asyncio.Lock()
        async with turn:  # first come, first served: in the order they were taken
            running = pool.run(msg)
            try:
                await asyncio.wait((running,), timeout=spec.timeout)
            except asyncio.CancelledError:
                running.cancel()  # the pool kills its worker
                raise
            if not running.done():
                return await self._hung(msg, spec, pool, running)
        reply = running.result()
        if reply is None:
            return SUCCEEDED
        if reply[2] == "MemoryError":  # its limit stopped what the OOM killer would have
            died = WorkerDied(f"sandbox out of memory (limit {spec.memory_limit_mb} MB)")
            died.__cause__ = WorkerTraceback(reply[4])
            raise died
        return failure(_rebuild(reply))

    async def _hung(
        self, msg: Message, spec: SandboxSpec, pool: WorkerPool, running: asyncio.Future[Any]
    ) -> Outcome:
        """A suspect ran past its timeout: a timeout, as for any delivery, unless a hang is
        what the dispatcher died of and this is that hang (see the module's docstring)."""
        named = self._hang_of
        if self._hang_stack is None or (
            named is not None and named != (msg.caller, msg.topic, msg.partition, msg.offset)
        ):
            running.cancel()  # the pool kills its worker
            return timed_out(spec.timeout)
        if named is None and self._hang_frames:
            # No delivery named: stuck where the loop was is what names it.
            if not hangs_where(await pool.abort(running), self._hang_frames):
                return timed_out(spec.timeout)
        else:
            running.cancel()
        hung = WorkerDied(
            f"hung past its {spec.timeout:g}s timeout (a hang ended the dispatcher "
            "before: its watchdog found the event loop blocked)"
        )
        hung.__cause__ = WorkerTraceback(self._hang_stack)
        raise hung from hung.__cause__

    def _quarantine(self, msg: Message, crashes: int, died: WorkerDied, stack: str) -> None:
        reason = (
            f"crash: the process died {crashes} times while this message was in flight "
            f"(the last {crashes - 1} in a sandbox: {died})"
        )
        log.error(
            "quarantined %s[%d]@%d: %s (caller %s's delivery)",
            msg.topic,
            msg.partition,
            msg.offset,
            reason,
            msg.caller,
            extra={"caller": msg.caller, "topic": msg.topic, "offset": msg.offset},
        )
        # As a dispatcher death's quarantine says it: "killed by SIGSEGV", "exited with …"
        exit_ = describe_exit(died.status) if died.status is not None else str(died)
        self._settler.unrun(
            msg._record,
            "crash",
            "crash",
            reason,
            traceback=stack,
            signal=exit_,
            caller=msg.caller,
            category=msg.category,
            attempt=msg.attempt,
        )

    async def close(self) -> None:
        """Stop the sandboxes (what runs in them stays unsettled: its offsets are held)."""
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            await pool.close()
