"""The long tier's markdown report: a summary table, then each scenario's checks, figures
and event log. Also the notes that name the bug behind a known failing check."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from .harness import ROOT

# A failing check → the bug this suite found behind it (README.md, "Bugs found").
KNOWN_BUGS = {
    "lost == 0": "BUG-6 if the dispatcher logged 'seen again after …; skipped' (records held "
    "back behind crash suspects are overtaken by a later batch, then dropped)",
    "every revoked partition committed before release (spec)": "BUG-3 (a commit during a "
    "rebalance fails with ILLEGAL_GENERATION and is never retried)",
    "duplicates <= sum of measured windows": "BUG-3 (a failed revocation commit: the next "
    "owner redelivers what the departed instance had delivered)",
    "every hostile payload dead-lettered": "BUG-4 (a record too large for the dead-letter "
    "topic is retried forever and holds its partition's commits)",
    "no crash counted against the live dispatcher": "BUG-2 (a partition lost while the "
    "broker was away is taken for a crash of this very process)",
    "no innocent message quarantined": "BUG-7 (the journal does not name every record that is "
    "in a handler, so a crash is blamed on others)",
    "each pill caused <= 3 deaths": "BUG-7 (a batch's journal record starts at its own first "
    "offset while earlier batches of the partition still wait for theirs: a death in those is "
    "not counted)",
    "each pill caused <= 2 deaths": "BUG-7 (a batch's journal record starts at its own first "
    "offset while earlier batches of the partition still wait for theirs: a death in those is "
    "not counted)",
    "restarts <= pills x 3": "BUG-7",
    "restarts <= pills x 2": "BUG-7",
    "no message quarantined (nothing crashed)": "BUG-2 (a partition lost while the broker "
    "was away is taken for a crash of this very process)",
}

_EVENT_LOGS = ("kill_log", "departure_log", "cycle_log", "pill_log")


def verdict(result: dict[str, Any]) -> str:
    if "error" in result:
        return "ERROR"
    return "PASS" if all(result["checks"].values()) else "FAIL"


def _cell(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(none)"]
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_cell(r.get(c, ""), 60) for c in columns) + " |" for r in rows]
    return out


def _summary(result: dict[str, Any]) -> str:
    keys = (
        "messages",
        "kills",
        "departures",
        "broker_kills",
        "pills",
        "lost",
        "duplicates",
        "window_sum_pairs",
        "revocation_commits_failed",
        "resume_max_s",
        "windows_blamed_on_a_crash_of_itself",
        "hostile_payloads",
        "not_dead_lettered",
        "rss_high_water_mb",
        "quarantined",
        "innocent_quarantined",
        "restarts",
    )
    return ", ".join(f"{k} {_cell(result[k], 80)}" for k in keys if k in result)


def git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return out.stdout.strip()


def commit() -> str:
    dirty = " with uncommitted changes" if git("status", "--porcelain", "src") else ""
    return f"{git('rev-parse', '--short', 'HEAD')}{dirty}"


def environment(broker: str) -> list[str]:
    import confluent_kafka

    dirty = " (with uncommitted changes)" if git("status", "--porcelain") else ""
    return [
        f"- generated: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- commit: `{git('rev-parse', '--short', 'HEAD')}`{dirty}",
        f"- machine: {platform.machine()}, {_cpus()} CPUs, Python {platform.python_version()}, "
        f"confluent-kafka {confluent_kafka.__version__} / librdkafka "
        f"{confluent_kafka.libversion()[0]}",
        f"- broker: {broker}",
    ]


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def render(results: list[dict[str, Any]], env: list[str], command: str) -> str:
    lines = [
        "# shunter reliability report — long tier",
        "",
        *env,
        f"- command: `{command}`",
        "",
        "How each figure is measured: tests/reliability/README.md. Bugs behind failing "
        'checks: tests/reliability/README.md, "Bugs found".',
        "",
        "## Summary",
        "",
        "| scenario | verdict | figures | elapsed | run |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['scenario']} | **{verdict(r)}** | {_cell(_summary(r), 300)} | "
            f"{r.get('wall_s', '')} s | {_cell(r.get('run', ''), 200)} |"
        )
    for r in results:
        lines += ["", f"## {r['scenario']}", "", f"Verdict: **{verdict(r)}**", ""]
        if r.get("run"):
            lines += [f"Run: {r['run']}", ""]
        if "error" in r:
            lines += ["```", r["error"], "```"]
            continue
        lines += ["### Checks", ""]
        for name, ok in r["checks"].items():
            note = f" — {KNOWN_BUGS[name]}" if not ok and name in KNOWN_BUGS else ""
            lines.append(f"- {'✅' if ok else '❌'} {name}{note}")
        lines += ["", "### Figures", "", "| figure | value |", "|---|---|"]
        for key, value in r.items():
            if key in ("checks", "scenario", *_EVENT_LOGS):
                continue
            lines.append(f"| {key} | {_cell(value, 400)} |")
        for key in _EVENT_LOGS:
            if key in r:
                lines += ["", f"### {key.replace('_', ' ')}", "", *_table(r[key])]
    return "\n".join(lines) + "\n"


def write(path: Path, results: list[dict[str, Any]], env: list[str], command: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(results, env, command))
    path.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
