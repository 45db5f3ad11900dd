"""The supervisor hands the dying stack to the next worker and restarts a worker that
made progress at once."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

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
    (tmp_path / "fakeworker.py").write_text(textwrap.dedent(f"""
        import os
        def main():
            runs = {str(runs)!r}
            n = len(open(runs).read()) if os.path.exists(runs) else 0
            open(runs, "a").write("x")
            if {touch!r}:
                os.utime(os.environ["SHUNTER_PROGRESS_FILE"])
            os._exit(0 if n >= {deaths} else 1)
    """))
    cli = tmp_path / "shunter" / "cli"
    cli.mkdir(parents=True)
    (tmp_path / "shunter" / "__init__.py").write_text("")
    (cli / "__init__.py").write_text("")
    (cli / "main.py").write_text("import fakeworker\nfakeworker.main()\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
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
