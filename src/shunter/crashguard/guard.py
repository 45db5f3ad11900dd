"""The crash guard as the pipeline uses it: journal writes and partition recovery."""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError

from ..settle.producer import ReliableProducer
from .journal import TP, PartitionState, counts_a_death, key_of, read_latest, recover

log = logging.getLogger("shunter.crashguard")

# Set by the supervisor for the worker it restarts after an unclean death: how the last
# worker ended, and the stack its fatal-signal dump holds (bounded), if it left one.
LAST_EXIT_ENV = "SHUNTER_LAST_EXIT"
LAST_STACK_ENV = "SHUNTER_LAST_STACK"
RECOVERED_WAIT = 10.0  # seconds an assignment waits for the recovered counts to land


class JournalUnreadable(Exception):
    """The journal could not be read for newly assigned partitions: whether a previous
    owner died with deliveries in flight is unknown."""


@dataclass
class SuspectRun:
    """A partition re-running the window its previous owner died in, one offset at a time."""

    hi: int
    queue: deque[Any] = field(default_factory=deque)
    running: bool = False
    complete: bool = False  # every offset up to ``hi`` has been taken from the stream
    # Until when a suspect waits for other deliveries to leave their handlers before it
    # runs alone (0: not yet waited); past it, once, the run goes on without (see
    # ``Suspects._alone``).
    alone_by: float = 0.0
    waited_out: bool = False


@dataclass
class _Coverage:
    """Which offsets of one partition the journal names, whatever record ends up last."""

    hi: int = -1  # every offset up to here is named (with the window's lo, see the pipeline)
    pending: dict[int, int] = field(default_factory=dict)  # unacknowledged: seq -> hi
    latest: tuple[bytes, int] | None = None  # the newest record (value, hi): what a retry writes
    backoff: float = 0.5  # before the next rewrite after a refused write; doubles to 30 s


class CrashGuard:
    """Journal writes, and what they cover.

    Coverage invariant (kept by ``covered``): an offset at or below ``covered(tp)`` is in
    the window of the record that is the journal's last word about ``tp`` — both if the
    newest record written lands and if it does not. The pipeline runs nothing of a
    partition above that: it holds it and writes a record first.
    """

    def __init__(
        self,
        producer: ReliableProducer,
        topic: str,
        settings: dict[str, Any],
        quarantine_after: int,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.settings = settings
        self.quarantine_after = quarantine_after
        self.last_exit = os.environ.get(LAST_EXIT_ENV, "")
        self.last_stack = os.environ.get(LAST_STACK_ENV, "")
        self.states: dict[TP, PartitionState] = {}
        self._coverage: dict[TP, _Coverage] = {}
        self._seq = 0
        self.write_failures = 0  # journal writes the broker refused (each one rewritten)

    def state(self, tp: TP) -> PartitionState:
        """The partition's journal state; a fresh one if its recovery failed (fail
        closed: its records are written all the same)."""
        state = self.states.get(tp)
        if state is None:
            state = self.states[tp] = PartitionState()
        return state

    def covered(self, tp: TP) -> int:
        """The highest offset of ``tp`` the journal names for sure (-1: none).

        After a ``single`` record only its one offset is named, not those below it: that
        is enough because offsets below the highest seen are never run again (the
        pipeline skips them as "seen again")."""
        coverage = self._coverage.get(tp)
        return -1 if coverage is None else coverage.hi

    def writing(self, tp: TP) -> bool:
        """Whether a record of ``tp`` is written and not yet acknowledged."""
        coverage = self._coverage.get(tp)
        return coverage is not None and bool(coverage.pending)

    def write(self, tp: TP, value: bytes, hi: int, done: Any) -> None:
        """Journal one record naming offsets up to ``hi`` (-1: none); ``done(None)`` on
        the loop once the broker has it. A failed write is retried with the newest record
        of ``tp``, which supersedes it."""
        coverage = self._coverage.setdefault(tp, _Coverage())
        coverage.latest = (value, hi)
        self._send(tp, coverage, value, hi, done)

    def _send(self, tp: TP, coverage: _Coverage, value: bytes, hi: int, done: Any) -> None:
        self._seq += 1
        seq = self._seq
        coverage.pending[seq] = hi
        # Until this record is acknowledged, the last word may be it or the one before.
        coverage.hi = min(coverage.hi, hi)

        def answer(err: KafkaError | None) -> None:
            if self._coverage.get(tp) is not coverage or tp not in self.states:  # it left
                done(None)
                return
            if err is None:
                # Acknowledged in order: every earlier record is superseded by this one.
                for earlier in [s for s in coverage.pending if s <= seq]:
                    del coverage.pending[earlier]
                coverage.hi = min([hi, *coverage.pending.values()])
                coverage.backoff = 0.5
                done(None)
                return
            coverage.pending.pop(seq, None)
            self.write_failures += 1
            delay, coverage.backoff = coverage.backoff, min(coverage.backoff * 2, 30.0)
            log.error("journal write for %s[%d] failed (%s); retrying in %.1fs", *tp, err, delay)
            asyncio.get_running_loop().call_later(delay, self._rewrite, tp, coverage, done)

        self.producer.send(self.topic, key_of(tp), value, [], answer)

    def _rewrite(self, tp: TP, coverage: _Coverage, done: Any) -> None:
        if (
            self._coverage.get(tp) is not coverage
            or coverage.latest is None
            or (tp not in self.states)
        ):
            done(None)  # the partition left: nothing of it runs here any more
            return
        value, hi = coverage.latest
        self._send(tp, coverage, value, hi, done)

    async def write_and_wait(self, tp: TP, value: bytes, hi: int) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done(_: Any) -> None:
            if not future.done():
                future.set_result(None)

        self.write(tp, value, hi, done)
        await future

    async def recover(
        self,
        tps: list[TP],
        committed: dict[TP, int],
        owned: Callable[[TP], bool] | None = None,
    ) -> dict[TP, PartitionState]:
        """Read the journal for newly assigned partitions; return each one's state.
        ``JournalUnreadable`` if it cannot be read (nothing of them is known then).
        ``owned(tp)``, if given, says whether ``tp`` is still this process's after the
        read (a read outside an assignment: nothing is written for one that left)."""
        self.forget(tps)  # a fresh start: nothing of them is named by this process yet
        keys = {key_of(tp): tp for tp in tps}
        try:
            entries = await asyncio.to_thread(read_latest, self.settings, self.topic, set(keys))
        except Exception as exc:
            raise JournalUnreadable(f"{type(exc).__name__}: {exc}"[:500]) from exc
        out = {}
        counted = []  # partitions whose window was just given a crash count
        for key, tp in keys.items():
            entry = entries.get(key)
            state = recover(entry, committed.get(tp, -1))
            self.states[tp] = state
            out[tp] = state
            if entry is not None and state.suspects_hi >= 0:
                died = counts_a_death(entry)
                if died:
                    counted.append(tp)
                log.warning(
                    "%s[%d]: its previous owner (%s) %s; re-running offsets %d..%d as crash "
                    "suspects (quarantine after %d crashes)",
                    tp[0],
                    tp[1],
                    entry.owner,
                    "died with deliveries in flight" if died else "left crash suspects not re-run",
                    committed.get(tp, -1),
                    state.suspects_hi,
                    self.quarantine_after,
                )
        # Invariant: a death is counted once. The counts just given to a dead owner's
        # window are journaled before the assignment completes, so before anything of
        # these partitions runs: were this process to die first (a pill of another
        # partition), the next owner would read the dead owner's record again and blame
        # the same window a second time. Partitions this process owned already go on
        # meanwhile: a death of theirs within this write's round trip still counts twice.
        if owned is not None:
            counted = [tp for tp in counted if owned(tp)]
        writes = [
            self.write_and_wait(tp, out[tp].encode("recovered", -1, -1), -1) for tp in counted
        ]
        try:
            await asyncio.wait_for(asyncio.gather(*writes), RECOVERED_WAIT)
        except TimeoutError:  # the broker refuses them: go on (they are still retried)
            log.error(
                "journaling the crash counts of %s took over %.0fs; going on (were this "
                "process to die before they land, that window would be counted twice; "
                "the write is retried)",
                ", ".join(f"{t}[{p}]" for t, p in counted),
                RECOVERED_WAIT,
            )
        return out

    def forget(self, tps: list[TP]) -> None:
        for tp in tps:
            self.states.pop(tp, None)
            self._coverage.pop(tp, None)
