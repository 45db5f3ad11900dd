"""The demo keeps every file under one directory it names: its own temporary directory
is removed at the end unless --keep (or --keep-broker, whose printed commands need the
files); a directory the user named with --workdir is never removed."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from shunter.demo import tour
from shunter.demo.tour import Options, StepResult, Tour


class FakeBroker:
    bootstrap = "127.0.0.1:1"

    def start(self) -> FakeBroker:
        return self

    def stop(self) -> None:
        pass


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """A tour whose one step writes a file in the demo's directory; the directories seen."""
    seen: list[Path] = []

    async def step(t: Tour) -> StepResult:
        (t.workdir / "shunter-demo.yaml").write_text("{}")
        seen.append(t.workdir)
        return StepResult.AS_PLANNED

    monkeypatch.setattr(tour, "steps", lambda: [step])
    monkeypatch.setattr(tour, "EmbeddedBroker", FakeBroker)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tour.tempfile, "tempdir", None)  # TMPDIR is read again
    return seen


def run(options: Options) -> str:
    out = io.StringIO()
    assert tour.run(options, Console(file=out, width=80)) == 0
    return out.getvalue()


def test_the_demos_own_directory_is_named_and_removed(written: list[Path], tmp_path: Path) -> None:
    out = run(Options())
    (workdir,) = written
    assert workdir.parent == tmp_path and workdir.name.startswith("shunter-demo-")
    assert re.search(rf"removed at the end \(--keep keeps them\):\n  {re.escape(str(workdir))}\n",
                     out), out
    assert not workdir.exists()
    assert f"removed {workdir}" in out


def test_keep_keeps_it(written: list[Path]) -> None:
    out = run(Options(keep=True))
    (workdir,) = written
    assert (workdir / "shunter-demo.yaml").is_file()
    assert f"the demo's files stay in {workdir}" in out


def test_a_directory_named_by_the_user_is_never_removed(
    written: list[Path], tmp_path: Path
) -> None:
    mine = tmp_path / "mine"
    run(Options(workdir=mine))
    assert written == [mine] and (mine / "shunter-demo.yaml").is_file()


