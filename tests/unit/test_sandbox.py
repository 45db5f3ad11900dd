"""The crash guard's sandbox, with real worker processes and no Kafka: suspects of one
caller run one at a time, each timed from its own start, and after a blocked-loop death
the delivery that blocked the loop, hanging again, is counted as a death and quarantined
with the loop's stack, while other suspects that hang only time out."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import pytest
from crashtools import gil_blocked_dump

from shunter.crashguard import supervisor
from shunter.crashguard.sandbox import Sandbox, SandboxSpec
from shunter.crashguard.watchdog import blocked_frames, blocked_on
from shunter.message import Message, Record
from shunter.outcome import SUCCEEDED, Failed, Outcome
from shunter.testing import make_message

HANDLERS = """
import re
import time

def backtracks_on_zero(msg):
    if msg.offset == 0:
        re.match(r"(a+)+$", "a" * 64 + "b")  # never ends, never releases the GIL
    time.sleep(3600 if msg.offset == 1 else 0.05)

def hangs_on_zero(msg):
    time.sleep(3600 if msg.offset == 0 else 0.05)

def hangs_on_zero_and_one(msg):
    time.sleep(3600 if msg.offset in (0, 1) else 0.05)
"""


class Settled:
    """What the sandbox settles (as the settler would) and quarantines."""

    def __init__(self, expected: int) -> None:
        self.outcomes: dict[int, Outcome] = {}
        self.quarantined: dict[int, dict[str, Any]] = {}
        self.expected = expected
        self.all_in = asyncio.Event()

    def __call__(self, msg: Message, outcome: Outcome, elapsed: float) -> None:
        self.outcomes[msg.offset] = outcome
        self._count()

    def unrun(self, record: Record, reason: str, stage: str, error: str, **info: Any) -> None:
        self.quarantined[record.offset] = {"error": error, **info}
        self._count()

    def _count(self) -> None:
        if len(self.outcomes) + len(self.quarantined) >= self.expected:
            self.all_in.set()


@pytest.fixture
def handlers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "sandboxed.py").write_text(textwrap.dedent(HANDLERS))
    monkeypatch.syspath_prepend(str(tmp_path))  # the sandbox's worker takes our sys.path
    return "sandboxed:hangs_on_zero"  # sandboxed:hangs_on_zero_and_one is there too


def run_suspects(
    ref: str,
    hang_stack: str | None,
    offsets: range,
    hang_of: tuple[str, str, int, int] | None = None,
) -> Settled:
    settled = Settled(len(offsets))
    deaths: dict[int, int] = {}

    async def count_death(tp: tuple[str, int], offset: int) -> int:
        deaths[offset] = deaths.get(offset, 1) + 1  # the dispatcher's death was the first
        return deaths[offset]

    async def scenario() -> None:
        spec = SandboxSpec(ref, timeout=1.0, memory_limit_mb=512)
        sandbox = Sandbox(
            {"medal": spec},
            settled,  # type: ignore[arg-type]
            3,
            count_death,
            hang_stack=hang_stack,
            hang_of=hang_of,
        )
        try:
            for offset in offsets:  # handed over at once, as a window's suspects are
                assert sandbox.take(make_message({"n": offset}, offset=offset, caller="medal"))
            await settled.all_in.wait()
        finally:
            await sandbox.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
    return settled


def test_suspects_behind_a_hanging_one_are_timed_from_their_own_start(handlers: str) -> None:
    """Given a 1 s timeout and four suspects handed over at once, the first hanging, then
    the first fails with a timeout and the three behind it succeed: each one's timeout ran
    while it ran, not while it waited behind the hanging one."""
    settled = run_suspects(handlers, None, range(4))
    assert set(settled.outcomes) == {0, 1, 2, 3}
    first = settled.outcomes[0]
    assert isinstance(first, Failed) and "did not finish within 1s" in first.error
    assert [settled.outcomes[o] for o in (1, 2, 3)] == [SUCCEEDED] * 3
    assert settled.quarantined == {}


def test_after_a_blocked_loop_death_a_suspect_that_hangs_again_is_quarantined(
    handlers: str,
) -> None:
    """Given the dispatcher's last death was its watchdog ending a blocked loop (the
    stack it left given as ``hang_stack``), naming no delivery and showing no handler
    frames to compare, when a suspect hangs past its timeout in the sandbox, then each
    hang counts as a death, and at the third it is quarantined with the blocked loop's
    stack; the suspects behind it succeed."""
    stack = 'Current thread 0x1 (most recent call first):\n  File "app.py", line 9 in medal'
    settled = run_suspects(handlers, stack, range(3))
    assert settled.outcomes == {1: SUCCEEDED, 2: SUCCEEDED}
    [(offset, info)] = settled.quarantined.items()
    assert offset == 0
    assert info["traceback"] == stack
    assert "hung past its 1s timeout" in info["signal"]


def test_after_a_blocked_loop_death_only_the_delivery_that_blocked_it_counts_its_hangs(
    handlers: str,
) -> None:
    """Given the watchdog named medal's delivery of topic[0]@0 as the one that blocked the
    loop, when offsets 0 and 1 both hang in the sandbox, then 0 is quarantined as the pill
    and 1, innocent of the death, fails with a timeout as any delivery would (to the retry
    tiers); 2 succeeds."""
    named = ("medal", "topic", 0, 0)
    settled = run_suspects("sandboxed:hangs_on_zero_and_one", "stack", range(3), named)
    assert list(settled.quarantined) == [0]
    one = settled.outcomes[1]
    assert isinstance(one, Failed) and "did not finish within 1s" in one.error
    assert settled.outcomes[2] == SUCCEEDED


def test_the_delivery_that_blocked_the_loop_is_read_back_from_the_last_exit() -> None:
    """The supervisor's last exit carries the watchdog's note; ``blocked_on`` reads the
    delivery back, and says None when the note names none or there is no note."""
    exit_ = (
        "killed by SIGABRT (the event loop was blocked for 60s, running caller fan-medal "
        "on gift.v2_live-1[11]@4096 (attempt 2))"
    )
    assert blocked_on(exit_) == ("fan-medal", "gift.v2_live-1", 11, 4096)
    assert (
        blocked_on(
            "exited with status 1 (the event loop was blocked for 70s holding "
            "the GIL (faulthandler's timer))"
        )
        is None
    )
    assert blocked_on("killed by SIGSEGV") is None


def blocked_loop_stack(tmp_path: Path, ref: str, offset: int) -> str:
    """The stack a dispatcher leaves when faulthandler's timer ends it, its loop blocked
    holding the GIL by ``ref``'s delivery of ``offset``: what the supervisor hands on."""
    module, handler = ref.split(":")
    define = f"sys.path.insert(0, {str(tmp_path)!r})\nfrom {module} import {handler} as handler"
    return supervisor.dying_stack(gil_blocked_dump(tmp_path / "crash", define, offset))


def test_after_a_gil_holding_hang_only_a_suspect_stuck_where_the_loop_was_counts(
    handlers: str, tmp_path: Path
) -> None:
    """Given faulthandler's timer ended the dispatcher while medal's handler backtracked
    in a regular expression on offset 0 (no delivery named: the watchdog's thread could
    not run), when offset 0 backtracks again in the sandbox and offset 1 only sleeps past
    its timeout, then 0, stuck in the same frames as the loop was, is quarantined, and 1,
    innocent, fails with a timeout as any delivery would; 2 succeeds."""
    ref = "sandboxed:backtracks_on_zero"
    stack = blocked_loop_stack(tmp_path, ref, 0)
    frames = blocked_frames(stack)
    assert "in backtracks_on_zero" in frames[-1] and "re/__init__.py" in frames[0], stack
    settled = run_suspects(ref, stack, range(3))
    assert list(settled.quarantined) == [0]
    assert settled.quarantined[0]["traceback"] == stack
    one = settled.outcomes[1]
    assert isinstance(one, Failed) and "did not finish within 1s" in one.error
    assert settled.outcomes[2] == SUCCEEDED
