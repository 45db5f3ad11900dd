"""The blocked-loop watchdog and the crash file, without Kafka: a sync handler that blocks
the event loop is reported with every thread's stack and the delivery it is running; a
loop that only pauses briefly is not; a fatal signal leaves its stack in the crash file."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from crashtools import gil_blocked_dump

import shunter
from shunter.crashguard import crashfile, describe_current, start_watchdog, supervisor
from shunter.deliver import SubscriberRuntime
from shunter.outcome import Outcome
from shunter.testing import make_message


def sleeps_on_the_loop(msg: shunter.Message) -> None:
    time.sleep(0.8)  # the mistake the watchdog exists for: a blocking call inline


def run_one_inline(handler: object, msg: shunter.Message, threshold: float) -> list[Outcome]:
    settled: list[Outcome] = []

    async def scenario() -> None:
        stop = start_watchdog(asyncio.get_running_loop(), threshold, interval=0.02)
        try:
            rt = SubscriberRuntime(msg.caller, handler, lambda m, o, e: settled.append(o))
            await asyncio.sleep(0.1)  # the watchdog has seen the loop answer
            rt.submit(msg)
            rt.kick()  # the runner starts on the next step: the handler blocks the loop there
            await asyncio.sleep(0)
            assert len(settled) == 1
            await asyncio.sleep(0.2)  # long enough for the watchdog to see the loop answer
        finally:
            stop()

    asyncio.run(scenario())
    return settled


def test_a_blocked_loop_is_reported_with_the_running_delivery_and_every_stack(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Given a watchdog with a 0.3 s threshold, when an inline sync handler of caller
    "medal" sleeps 0.8 s on gift[2]@41, then one error names the caller and the message
    coordinates and carries the loop thread's stack down to the sleeping line, and a
    warning says when the loop answered again."""
    caplog.set_level(logging.WARNING, logger="shunter.watchdog")
    msg = make_message({"n": 1}, topic="gift", partition=2, offset=41, caller="medal")
    run_one_inline(sleeps_on_the_loop, msg, threshold=0.3)
    reports = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(reports) == 1, [r.getMessage()[:200] for r in reports]
    text = reports[0].getMessage()
    assert "event loop blocked for" in text
    assert "running on it: caller medal on gift[2]@41 (attempt 1)" in text
    assert "— the event loop — caller medal on gift[2]@41" in text
    assert "in sleeps_on_the_loop" in text and "time.sleep(0.8)" in text
    assert "Thread MainThread" in text
    assert reports[0].__dict__["caller"] == "medal"
    assert (reports[0].__dict__["topic"], reports[0].__dict__["offset"]) == ("gift", 41)
    answered = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(answered) == 1 and answered[0].startswith("event loop answered again after")


def test_a_loop_that_answers_within_the_threshold_is_not_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Given a 1 s threshold, when a handler blocks the loop for 0.2 s, nothing is logged."""
    caplog.set_level(logging.DEBUG, logger="shunter.watchdog")

    def brief(msg: shunter.Message) -> None:
        time.sleep(0.2)

    run_one_inline(brief, make_message({"n": 1}), threshold=1.0)
    assert [r.getMessage() for r in caplog.records if r.name == "shunter.watchdog"] == []


def test_describe_current_finds_the_delivery_a_thread_is_inside() -> None:
    """Given a handler running on this thread, describe_current names its delivery;
    outside any handler it says None."""
    seen: list[str | None] = []

    def handler(msg: shunter.Message) -> None:
        seen.append(describe_current(threading.get_ident()))

    handler(
        make_message({"n": 1}, topic="lottery", partition=0, offset=7, caller="rank", attempt=3)
    )
    assert seen == ["caller rank on lottery[0]@7 (attempt 3)"]
    assert describe_current(threading.get_ident()) is None


def test_a_fatal_signal_leaves_every_stack_in_the_crash_file(tmp_path: Path) -> None:
    """Given a process that enabled the crash file, when it segfaults inside a function,
    then crash-<pid>.log holds the dump naming that function, leftovers() returns it once
    (renamed .seen) and removes its stacks file, and a process that exits cleanly after
    disable() leaves no file."""
    crash = textwrap.dedent(f"""
        import ctypes
        from shunter.crashguard import crashfile
        crashfile.enable({str(tmp_path)!r})
        def parse_gift():
            ctypes.string_at(0)
        parse_gift()
    """)
    clean = textwrap.dedent(f"""
        from shunter.crashguard import crashfile
        crashfile.enable({str(tmp_path)!r})
        crashfile.disable()
    """)
    dead = subprocess.run([sys.executable, "-c", crash], capture_output=True, timeout=60)
    assert dead.returncode == -11
    subprocess.run([sys.executable, "-c", clean], check=True, timeout=60)
    pid = _pid_of(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"crash-{pid}.log", f"stacks-{pid}.log"]
    found = crashfile.leftovers(tmp_path)
    assert not (tmp_path / f"stacks-{pid}.log").exists(), "a dead process's stacks file goes"
    assert len(found) == 1
    path, text = found[0]
    assert path.suffix == ".seen"
    assert "Fatal Python error: Segmentation fault" in text
    assert "in parse_gift" in text
    assert crashfile.leftovers(tmp_path) == []


def _pid_of(directory: Path) -> str:
    (only,) = directory.glob("crash-*.log")
    return only.stem.removeprefix("crash-")


def test_a_loop_blocked_past_end_after_ends_the_process_with_the_blocking_line(
    tmp_path: Path,
) -> None:
    """Given a watchdog that ends the process after 0.6 s, when an inline sync handler of
    caller "medal" blocks the loop for good on gift[2]@41, then the process dies of
    SIGABRT within seconds, and its crash file says why (the supervisor's ``noted``) and
    holds the loop thread's stack as the dying one, down to the blocking line."""
    script = textwrap.dedent(f"""
        import asyncio, time
        from shunter.crashguard import crashfile, start_watchdog
        from shunter.deliver import SubscriberRuntime
        from shunter.testing import make_message

        crashfile.enable({str(tmp_path)!r})

        def hangs_forever(msg):
            time.sleep(3600)

        async def main():
            start_watchdog(asyncio.get_running_loop(), 0.2, interval=0.02, end_after=0.6)
            await asyncio.sleep(0.1)
            msg = make_message({{"n": 1}}, topic="gift", partition=2, offset=41, caller="medal")
            rt = SubscriberRuntime(msg.caller, hangs_forever, lambda m, o, e: None)
            rt.submit(msg)
            rt.kick()
            await asyncio.sleep(3600)

        asyncio.run(main())
    """)
    started = time.monotonic()
    dead = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert dead.returncode == -6, dead.stderr.decode()[-2000:]
    assert time.monotonic() - started < 30
    assert "ending this process" in dead.stderr.decode()
    [(_, dump)] = crashfile.leftovers(tmp_path)
    assert supervisor.noted(dump).startswith(
        "the event loop was blocked for 1s, running caller medal on gift[2]@41 (attempt 1)"
    ), dump
    stack = supervisor.dying_stack(dump)
    assert stack.startswith("Fatal Python error: Aborted"), stack
    dying = stack.split("\n\n")[1]
    assert "Current thread" in dying and "in hangs_forever" in dying, stack
    assert "shunter:" not in stack


def test_the_restart_threshold_must_be_longer_than_the_report_threshold() -> None:
    """A restart threshold at or below the report's is refused with its key path."""
    from shunter.config import CrashGuardConfig

    assert CrashGuardConfig(loop_blocked_after=5, loop_blocked_restart_after=0)
    assert CrashGuardConfig(loop_blocked_after=0, loop_blocked_restart_after=1)
    with pytest.raises(ValueError, match="must be longer than loop_blocked_after"):
        CrashGuardConfig(loop_blocked_after=5, loop_blocked_restart_after=5)


def test_a_loop_blocked_holding_the_gil_is_ended_by_faulthandler_s_timer(tmp_path: Path) -> None:
    """Given a handler that blocks the loop without ever releasing the GIL (a regular
    expression backtracking on a hostile payload), so that the watchdog's own thread
    cannot run, when the loop has not re-armed faulthandler's timer for ``end_after``
    plus the grace, then the process exits with status 1, and its crash file says the
    loop was blocked holding the GIL and gives the loop thread's stack first, down to
    the handler."""
    dump = gil_blocked_dump(
        tmp_path,
        """
        def handler(msg):
            re.match(r"(a+)+$", "a" * 64 + "b")  # never ends, never releases the GIL
        """,
    )
    assert supervisor.noted(dump) == (
        "the event loop was blocked for 1s holding the GIL (faulthandler's timer)"
    ), dump
    stack = supervisor.dying_stack(dump)
    sections = stack.split("\n\n")
    assert sections[0] == "Timeout (0:00:01.500000)!", stack
    assert "in handler" in sections[1] and "re/__init__.py" in sections[1], stack
    assert "shunter:" not in stack


def test_a_clean_exit_with_the_watchdog_armed_leaves_no_crash_file(tmp_path: Path) -> None:
    """Given the watchdog armed faulthandler's timer (naming the loop's thread in the crash
    file), when the process stops it and exits cleanly, then no crash file is left for the
    next start to report as a death."""
    script = textwrap.dedent(f"""
        import asyncio
        from shunter.crashguard import crashfile, start_watchdog

        crashfile.enable({str(tmp_path)!r})

        async def main():
            stop = start_watchdog(asyncio.get_running_loop(), 0.2, interval=0.02, end_after=5)
            await asyncio.sleep(0.3)  # the loop has answered, and armed the timer
            stop()

        asyncio.run(main())
        crashfile.disable()
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert list(tmp_path.iterdir()) == []
