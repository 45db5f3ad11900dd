"""What the demo prints at the end: per-caller numbers checked against the stream's plan,
the messages rejected at the border, the buggy handler's traceback once, and the command
that replays one of its dead letters."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..observe.status import Status
from ..settle.headers import FailureInfo
from . import topology
from .logdigest import LogDigest
from .progress import Snapshot, command_lines
from .stream import GIFT, GUARD, LOTTERY, Plan

COLUMNS = ("caller", "category", "runs as", "delivered", "failed", "retried", "dead-lettered")


@dataclass
class Report:
    plan: Plan
    stats: Status  # the dispatcher's at the end
    dead: list[FailureInfo]  # the dead-letter topic's records, oldest failure first
    digest: LogDigest
    last: Snapshot
    config_path: Path
    bootstrap: str
    keep_broker: bool = False
    complete: bool = True  # False: stopped before everything settled; not checked


def describe_stream(plan: Plan, rate: int) -> str:
    pace = f"{rate:,} per second" if rate else "as fast as possible"
    p, bad_json, bad_schema = plan.produced, plan.invalid_json, plan.schema_violations
    rows = [
        (p[GIFT], f"{GIFT}: {bad_json[GIFT]} invalid JSON, {bad_schema[GIFT]} breaking its schema"),
        (p[LOTTERY], f"{LOTTERY}: {bad_json[LOTTERY]} invalid JSON"),
        (
            p[GUARD],
            f"{GUARD}: {plan.guard_buys:,} buys; {plan.no_effect} lack their effect "
            f"object ({plan.no_effect_buys} buys)",
        ),
    ]
    head = f"The stream: {plan.total:,} events keyed by user id, produced {pace}."
    return "\n".join([head, *(f"  {n:>7,}  {text}" for n, text in rows)])


def show(console: Console, report: Report) -> bool:
    """Print the summary; False when a number differs from the stream's plan."""
    console.rule("[bold]summary")
    consumed = report.last.consumed
    console.print(
        f"consumed {sum(consumed.values()):,} of the {report.plan.total:,} messages "
        f"produced ({', '.join(f'{t} {n:,}' for t, n in consumed.items())})",
        highlight=False,
    )
    ok = _callers(console, report)
    _rejected(console, report)
    _traceback(console, report)
    _replay(console, report)
    _notices(console, report)
    return ok


def _callers(console: Console, report: Report) -> bool:
    table = Table(
        title="deliveries per caller",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
        show_edge=False,
    )
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in COLUMNS[3:] else "left", no_wrap=True)
    expected = topology.expected(report.plan)
    stats = report.stats
    mismatches = []
    for caller, row in stats.callers.items():
        got = topology.Expected(
            delivered=row.get("ok", 0),
            failed=row.get("fast", 0) + row.get("slow", 0) + row.get("dlq", 0),
            retried=row.get("fast", 0) + row.get("slow", 0),
            dead_lettered=row.get("dlq", 0),
        )
        table.add_row(
            caller,
            stats.categories.get(caller, ""),
            topology.RUNS_AS.get(caller, ""),
            str(got.delivered),
            str(got.failed),
            str(got.retried),
            Text(str(got.dead_lettered), "bold red" if got.dead_lettered else ""),
        )
        want = expected.get(caller)
        if want is None:
            mismatches.append(f"{caller}: not in the plan")
        elif got != want:
            diffs = [
                f"{name} {getattr(got, name)} (plan: {getattr(want, name)})"
                for name in ("delivered", "failed", "retried", "dead_lettered")
                if getattr(got, name) != getattr(want, name)
            ]
            mismatches.append(f"{caller}: {', '.join(diffs)}")
        if row.get("parked"):
            mismatches.append(f"{caller}: {row['parked']} deliveries parked (caller paused)")
    console.print(table)
    console.print(
        "failed = failed attempts; retried = of those, sent to the fast or slow "
        f"retry tier (fast {topology.FAST_ATTEMPTS}x{topology.FAST_DELAY}, slow "
        f"{topology.SLOW_ATTEMPTS}x{topology.SLOW_DELAY}); the rest were dead-lettered.",
        style="dim",
        highlight=False,
    )
    if not report.complete:
        console.print(
            "[yellow]stopped before everything settled: these numbers are partial "
            "and not checked against the stream's plan[/yellow]"
        )
        return False
    if mismatches:
        console.print("[bold red]numbers that differ from the stream's plan:[/bold red]")
        for line in mismatches:
            console.print(f"  {line}", highlight=False)
    else:
        console.print("[green]✓ every caller's numbers match the stream's plan[/green]")
    return not mismatches


def _rejected(console: Console, report: Report) -> None:
    rejected = Counter({key: n for key, n in report.stats.messages.items() if key[1] != "accepted"})
    total = sum(rejected.values())
    planned = report.plan.rejected
    mark = "[green]✓[/green]" if total == planned else f"[red]✗ the plan says {planned}[/red]"
    if not report.complete:
        mark = "(so far)"
    console.print(
        f"\nrejected at the border: {total} messages {mark} (decoded or validated "
        "before any handler saw them; each went once to the dead-letter topic)",
        highlight=False,
    )
    examples: dict[tuple[str, str], str] = {}
    for info in report.dead:
        examples.setdefault((info.origin_topic, info.stage), info.error)
    for (topic, stage), n in sorted(rejected.items()):
        console.print(
            f"  {n:>5} {topic} at {stage}, e.g. {examples.get((topic, stage), '')}",
            no_wrap=True,
            overflow="ellipsis",
            highlight=False,
        )


def _traceback(console: Console, report: Report) -> None:
    buggy = [info for info in report.dead if info.caller == topology.BUGGY]
    failures = report.digest.failures.get(topology.BUGGY, 0)
    if not buggy:
        console.print(f"\n{topology.BUGGY} dead-lettered nothing", style="yellow")
        return
    kinds = Counter(info.error_type for info in buggy)
    tally = ", ".join(f"{kind} x{n}" for kind, n in kinds.most_common())
    first = buggy[0]
    console.rule(f"[bold]{topology.BUGGY}: the bug, once")
    console.print(
        f"{len(buggy)} messages dead-lettered ({tally}) after {failures} failed attempts. "
        f"The first one, {first.origin_topic}[{first.origin_partition}]@{first.origin_offset}, "
        f"as its dead-letter record's shunter-traceback header tells it:",
        highlight=False,
    )
    text = Text(first.traceback.rstrip())
    text.highlight_regex(r'File "[^"]*shunter/demo/handlers\.py".*', "bold yellow")
    console.print(text, soft_wrap=True, highlight=False)


def _replay(console: Console, report: Report) -> None:
    buggy = [info for info in report.dead if info.caller == topology.BUGGY]
    if not buggy:
        return
    first = buggy[0]
    console.print("\nReplay it in the foreground with its full traceback (add --pdb to debug):")
    words = ["shunter", "replay", "-c", str(report.config_path), "--topic", first.origin_topic]
    words += ["--partition", str(first.origin_partition), "--offset", str(first.origin_offset)]
    words += ["--caller", first.caller]
    console.print(
        "  " + command_lines(words, console.width - 2),
        style="bold",
        highlight=False,
        soft_wrap=True,
    )
    if report.keep_broker:
        note = "the demo keeps it running until you press Ctrl-C."
    else:
        note = (
            "it stops when the demo exits: run `shunter demo --keep-broker` to keep it up "
            "for the replay."
        )
    console.print(
        f"That file names the demo's embedded broker ({report.bootstrap}), memory only; {note}",
        highlight=False,
    )


def _notices(console: Console, report: Report) -> None:
    digest = report.digest
    if digest.failures:
        counted = ", ".join(f"{caller} {n}" for caller, n in digest.failures.most_common())
        console.print(
            f"\nper-failure error logs, counted instead of printed: {counted} "
            "(each failure's traceback travels in its retry or dead-letter record)",
            style="dim",
            highlight=False,
        )
    kinds = digest.digest()
    if not kinds:
        return
    plural = "s" if len(kinds) > 1 else ""
    console.print(f"\nwarnings: {digest.notices} of {len(kinds)} kind{plural} (the first of each)")
    for n, notice in kinds:
        style = "red" if notice.level in ("ERROR", "CRITICAL") else "yellow"
        console.print(
            f"  {n:>5}x {notice.level} {notice.text}",
            style=style,
            no_wrap=True,
            overflow="ellipsis",
            highlight=False,
            markup=False,
        )
