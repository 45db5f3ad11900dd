"""Given nothing but an installed shunter, when `shunter demo` runs, then it exits 0 after
every message settled, its per-caller table adds up to what the stream holds, the buggy
handler's traceback is shown once, and a replay command names one dead letter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shunter.config import load_config
from shunter.decode import build_decoders
from shunter.demo import stream, topology
from shunter.demo.topology import FAST_ATTEMPTS, SLOW_ATTEMPTS
from shunter.errors import RejectedMessage

ROW = re.compile(
    r"^(fan-medal|rank-board|anchor-task|guard-effect)\s+(\w+)\s+(\w+)"
    r"\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$",
    re.MULTILINE,
)
TRACEBACK_LINE = re.compile(r'File "[^"]*shunter/demo/handlers\.py", line \d+, in on_guard_effect')
REPLAY = re.compile(
    r"shunter replay -c (\S+) --topic guard_purchase --partition \d+ "
    r"--offset \d+ --caller guard-effect"
)


def shunter_command() -> list[str]:
    script = Path(sys.executable).with_name("shunter")
    return [str(script)] if script.exists() else [sys.executable, "-m", "shunter.cli.main"]


@pytest.mark.kafka
@pytest.mark.timeout(240)
def test_demo_settles_everything_and_its_numbers_add_up(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    done = subprocess.run(
        [*shunter_command(), "demo", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=200,
        env=env,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{out[-6000:]}\n{done.stderr[-4000:]}"

    _, plan = stream.generate()  # the demo's defaults: 30,000 events, seed 7
    rows = {m[0]: [int(n) for n in m[3:]] for m in ROW.findall(out)}
    assert set(rows) == {"fan-medal", "rank-board", "anchor-task", "guard-effect"}, out
    tries = 1 + FAST_ATTEMPTS + SLOW_ATTEMPTS
    bad = plan.no_effect_buys  # malformed guard purchases that pass the guard filter
    assert bad > 0
    # columns: delivered, failed, retried, dead-lettered
    assert rows["fan-medal"] == [plan.revenue, 0, 0, 0]
    assert rows["rank-board"] == [plan.revenue, plan.hiccups, plan.hiccups, 0]
    assert rows["anchor-task"] == [plan.guard_buys, 0, 0, 0]
    assert rows["guard-effect"] == [plan.guard_buys - bad, bad * tries, bad * (tries - 1), bad]
    assert f"rejected at the border: {plan.rejected} messages" in out

    assert len(TRACEBACK_LINE.findall(out)) == 1, "the buggy handler's traceback, exactly once"
    replay = REPLAY.search(out)
    assert replay is not None, out[-3000:]
    assert Path(replay.group(1)).is_file()
    assert (tmp_path / "schemas" / "gift.json").is_file()
    assert "caller guard-effect failed" not in out + done.stderr, "per-failure logs leaked"


def test_the_plan_says_what_the_stream_holds(tmp_path: Path) -> None:
    """The demo checks shunter's numbers against its plan: the plan must be honest."""
    events, plan = stream.generate(total=8_000, seed=3)
    assert events == stream.generate(total=8_000, seed=3)[0], "same seed, same stream"
    decoders = build_decoders(load_config(topology.write(tmp_path, "127.0.0.1:9")))
    rejected, buys, no_effect_buys = 0, 0, 0
    for event in events:
        try:
            value = decoders[event.topic](event.value)
        except RejectedMessage:
            rejected += 1
            continue
        if event.topic == stream.GUARD and value["type"] == "buy":
            buys += 1
            no_effect_buys += not value.get("effect")
    assert plan.rejected > 0 and plan.no_effect_buys > 0
    assert (rejected, buys, no_effect_buys) == (plan.rejected, plan.guard_buys, plan.no_effect_buys)
    assert len(events) == plan.total == 8_000
