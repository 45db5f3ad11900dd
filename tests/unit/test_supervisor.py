"""The supervisor hands the dying stack to the next worker and restarts a worker that
made progress at once."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from crashtools import stand_in_worker

from shunter.crashguard import supervisor
from shunter.crashguard.crashfile import HEADER_END

DUMP = (
    "shunter pid 12 started 2026-11-28T06:00:00+0000: shunter run\n"
    + HEADER_END
    + "Fatal Python error: Segmentation fault\n\n"
    + 'Thread 0x00007f (most recent call first):\n  File "/x/threading.py", line 320 in wait\n\n'
    + 'Current thread 0x00007e (most recent call first):\n'
    + '  File "/app/myapp/guard.py", line 14 in on_guard\n'
    + '  File "/x/shunter/deliver/runtime.py", line 170 in _run\n'
)


def test_the_dying_threads_stack_comes_first_and_is_bounded() -> None:
    stack = supervisor.dying_stack(DUMP)
    assert stack.startswith("Fatal Python error: Segmentation fault")
    assert stack.index("Current thread") < stack.index("Thread 0x00007f")
    assert 'File "/app/myapp/guard.py", line 14 in on_guard' in stack
    assert "shunter pid" not in stack, "the file's own header is not part of the stack"
    huge = supervisor.dying_stack(DUMP + "  File \"/x.py\", line 1 in f\n" * 10_000)
    assert len(huge) <= 8_192 + 4 and "on_guard" in huge


def fake_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deaths: int,
                touch: bool) -> Path:
    """A stand-in for ``python -m shunter.cli.main``: dies ``deaths`` times, touching its
    progress file first if ``touch``, then exits 0. Returns the file counting its runs."""
    runs = tmp_path / "runs"
    stand_in_worker(tmp_path, monkeypatch, "fakeworker", textwrap.dedent(f"""
        import os
        def main():
            runs = {str(runs)!r}
            n = len(open(runs).read()) if os.path.exists(runs) else 0
            open(runs, "a").write("x")
            if {touch!r}:
                os.utime(os.environ["SHUNTER_PROGRESS_FILE"])
            os._exit(0 if n >= {deaths} else 1)
    """))
    return runs


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("touch", "expected"), [(True, [0.0] * 3), (False, [0.5, 1.0, 2.0])])
def test_a_worker_that_made_progress_is_restarted_at_once_one_that_did_not_backs_off(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    touch: bool,
    expected: list[float],
) -> None:
    runs = fake_worker(tmp_path, monkeypatch, 3, touch)
    status = supervisor.supervise(["run"], max_restarts=10, crash_dir=str(tmp_path / "crash"))
    assert status == 0
    assert runs.read_text() == "xxxx"
    delays = [r.args[1] for r in caplog.records if r.getMessage().startswith("worker exited")]
    assert delays == expected


def watched_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> Path:
    """A stand-in worker that runs ``body`` (in ``async def run()``, the real shunter's
    ``crashfile`` and ``watchdog`` imported) on its first start and exits 0 on the next.
    Returns the crash directory."""
    crash = tmp_path / "crash"
    runs = tmp_path / "runs"
    stand_in_worker(
        tmp_path,
        monkeypatch,
        "watchedworker",
        textwrap.dedent(f"""
        import asyncio, os, re, sys

        def main():
            first = not os.path.exists({str(runs)!r})
            open({str(runs)!r}, "a").write("x")
            if not first:
                os._exit(0)
            # This stand-in came in as the fake shunter.cli.main: the real shunter now.
            sys.path[:] = [p for p in sys.path if p != {str(tmp_path)!r}]
            for name in [n for n in sys.modules if n.split(".")[0] == "shunter"]:
                del sys.modules[name]
            from shunter.crashguard import crashfile, watchdog
            crashfile.enable({str(crash)!r})
            watchdog._BACKSTOP_GRACE = 1.0

            def backtracks():
                re.match(r"(a+)+$", "a" * 64 + "b")  # never ends, never releases the GIL

            async def run():
        """)
        + textwrap.indent(textwrap.dedent(body), " " * 12)
        + "\n    asyncio.run(run())\n    crashfile.disable()\n",
    )
    return crash


@pytest.mark.timeout(60)
def test_a_worker_blocked_holding_the_gil_has_its_stacks_logged_before_it_is_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Given a worker whose event loop blocks holding the GIL (a backtracking regular
    expression), so that its watchdog's thread stops too and nothing in it can report,
    when its watchdog's heartbeat has been silent for ``silent_after``, then the supervisor
    logs every thread's stack, the event loop's first, down to the blocking line, once,
    seconds before faulthandler's timer ends the worker."""
    crash = watched_worker(
        tmp_path,
        monkeypatch,
        """
        watchdog.start_watchdog(asyncio.get_running_loop(), 0.5, interval=0.02, end_after=4)
        await asyncio.sleep(1.5)  # it beats, and the loop armed faulthandler's timer
        backtracks()
        """,
    )
    status = supervisor.supervise(["run"], 10, str(crash), silent_after=0.5)
    assert status == 0
    said = [r.getMessage() for r in caplog.records]
    silent = [i for i, m in enumerate(said) if "nor its watchdog has run for" in m]
    died = [i for i, m in enumerate(said) if m.startswith("worker exited with status 1")]
    assert len(silent) == 1 and len(died) == 1 and silent[0] < died[0], said
    stacks = said[silent[0]].split("the event loop's first:\n", 1)[1]
    loop = stacks.split("\n\n")[0]
    assert loop.startswith(("Thread 0x", "Current thread 0x")), stacks
    assert "in backtracks" in loop, stacks
    assert "re/__init__.py" in loop and "in run" in loop, stacks
    assert "(most recent call first)" in stacks.split("\n\n")[1], "the other threads follow"


@pytest.mark.timeout(60)
def test_a_worker_whose_watchdog_has_not_started_or_has_stopped_is_not_reported_silent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Given a worker that takes longer than ``silent_after`` to start its watchdog (its
    start-up), then has it beat, then stops it (its shutdown) and takes longer than
    ``silent_after`` to exit, then nothing is reported: no heartbeat is missing before
    the watchdog starts, nor after it says it stopped."""
    crash = watched_worker(
        tmp_path,
        monkeypatch,
        """
        await asyncio.sleep(1.5)  # a slow start-up: importing the handlers, say
        stop = watchdog.start_watchdog(asyncio.get_running_loop(), 0.5, interval=0.02)
        await asyncio.sleep(1.5)
        stop()
        await asyncio.sleep(2)  # a slow shutdown, the loop free
        """,
    )
    # Four beats to a silence (beats every 0.25 s) while it runs: a busy machine's late
    # beat is not what this test is about.
    status = supervisor.supervise(["run"], 10, str(crash), silent_after=1.0)
    assert status == 0
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "nor its watchdog" in m], said
    left = [p.name for p in crash.iterdir() if not p.name.startswith("progress-")]
    assert left == [], "a clean exit leaves neither its crash file nor its stacks file"
