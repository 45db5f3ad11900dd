"""Given nothing but an installed shunter, when `shunter demo` runs, then it exits 0 after
every message settled, its per-caller table adds up to what the stream holds, the buggy
handler's traceback is shown once, and a replay command names one dead letter; and in its
crash guard step, a handler that kills the interpreter on the malformed guard purchase
costs at most ``quarantine_after`` restarts, that message is quarantined with stage crash,
the fatal-signal dump names the handler's line, and every other pair is delivered."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from shunter.config import load_config
from shunter.decode import build_decoders
from shunter.demo import crash, crashreport, stream, topology
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
    then_the_crash_guard_step_survived_the_night(out, tmp_path)


DEATH = re.compile(r"worker killed by SIGSEGV; restarting in [\d.]+s \(restart \d+\)")
QUARANTINED = re.compile(
    r"✓ quarantined: guard_purchase_night\[0\]@(\d+) \(event (\d+), the buy without"
)
DUMPED_LINE = re.compile(
    r'File "[^"]*shunter/demo/crash_handlers\.py", line \d+ in (render_entrance|on_guard_effect)'
)


def then_the_crash_guard_step_survived_the_night(out: str, workdir: Path) -> None:
    night = stream.night(crash.EVENTS, seed=7)  # the demo's default seed
    log = (workdir / "shunter-night.log").read_text()
    deaths = DEATH.findall(log)
    assert 1 <= len(deaths) <= crash.QUARANTINE_AFTER, log[-4000:]
    quarantined = QUARANTINED.findall(out)
    assert len(quarantined) == 1, out[-4000:]
    assert int(quarantined[0][1]) == night.culprit
    assert re.search(r"^\s+stage\s+crash$", out, re.MULTILINE), "the record's stage"
    assert re.search(r"^\s+signal\s+killed by SIGSEGV$", out, re.MULTILINE)
    assert DUMPED_LINE.search(out), "the fatal-signal dump names the handler's line"
    # Counted here from the handlers' own receipts, not from what the demo says of them.
    receipts = crashreport.Ledger(workdir / "night-ledger.csv").read().pairs()
    missing = crashreport.expected_pairs(night) - receipts
    assert not missing, f"{len(missing)} pairs never delivered, e.g. {sorted(missing)[:5]}"
    assert ("guard-effect", night.culprit) not in receipts, "the culprit never completed"
    assert "`shunter run` exit status 0" in out, "SIGTERM: drained, committed, exit 0"


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


def test_the_night_stream_holds_exactly_one_malformed_buy() -> None:
    """The crash guard step's stream: one buy without its effect object, and it is the
    culprit the step checks the quarantine against."""
    night = stream.night(crash.EVENTS, seed=7)
    values = [orjson.loads(event.value) for event in night.events]
    assert {v["event_id"] for v in values if v["type"] == "buy"} == night.buys
    assert [v["event_id"] for v in values if not v.get("effect")] == [night.culprit]
    assert {event.topic for event in night.events} == {stream.NIGHT}
