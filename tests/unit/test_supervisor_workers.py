"""Several workers under one supervisor: each is restarted on its own, with its own
backoff; one that dies too often stops the others (they drain on SIGTERM) and the
supervisor with status 1."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from crashtools import stand_in_worker

from shunter.crashguard import supervisor

FAKE = """
import os, signal, sys, time

def main():
    index = int(sys.argv[sys.argv.index("--worker-index") + 1])
    runs = os.path.join({tmp!r}, f"runs-{{index}}")
    n = len(open(runs).read()) if os.path.exists(runs) else 0
    open(runs, "a").write("x")
    if index == 1:
        os._exit(0 if n >= {deaths} else 1)
    def drain(signum, frame):
        open(os.path.join({tmp!r}, "drained-0"), "w").write(str(signum))
        sys.exit(0)
    signal.signal(signal.SIGTERM, drain)
    deadline = time.monotonic() + {lives}
    while time.monotonic() < deadline:
        time.sleep(0.02)
"""


def fake_workers(tmp: Path, monkeypatch: pytest.MonkeyPatch, deaths: int, lives: float) -> None:
    """Worker 1 dies ``deaths`` times, then exits 0; worker 0 lives ``lives`` seconds
    (or until SIGTERM, which it records) and exits 0."""
    code = textwrap.dedent(FAKE.format(tmp=str(tmp), deaths=deaths, lives=lives))
    stand_in_worker(tmp, monkeypatch, "fakeworkers", code)


@pytest.mark.timeout(60)
def test_each_worker_is_restarted_on_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_workers(tmp_path, monkeypatch, deaths=3, lives=3.0)
    status = supervisor.supervise(["run"], 10, str(tmp_path / "crash"), workers=2)
    assert status == 0
    assert (tmp_path / "runs-0").read_text() == "x", "the healthy worker was never restarted"
    assert (tmp_path / "runs-1").read_text() == "xxxx"
    restarts = [r for r in caplog.records if "restarting in" in r.getMessage()]
    assert [r.args[0] for r in restarts] == ["worker 1 exited with status 1"] * 3  # type: ignore[index]
    assert [r.args[1] for r in restarts] == [0.5, 1.0, 2.0]  # type: ignore[index]
    assert not (tmp_path / "drained-0").exists()


@pytest.mark.timeout(60)
def test_a_worker_dying_too_often_stops_the_others_and_the_supervisor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_workers(tmp_path, monkeypatch, deaths=100, lives=50.0)
    status = supervisor.supervise(["run"], 2, str(tmp_path / "crash"), workers=2)
    assert status == 1
    assert (tmp_path / "runs-1").read_text() == "xxx"
    assert (tmp_path / "drained-0").read_text() == "15", "worker 0 was not asked to drain"
