"""``shunter dlq list|show|replay -c FILE``: the dead-letter topic, by caller, error type and
time; replay to the original caller only, rate-limited.

A dead-letter record is named ``<partition>:<offset>`` on the dead-letter topic
(``config.dlq_topic``); ``list`` prints these IDs and ``show``/``replay --id`` take them.
Replaying writes fresh records to the fast retry tier for the running dispatcher to
deliver (see settle/redrive.py for who receives what); the dead-letter records themselves
stay where they are, so replaying the same selection twice delivers it twice.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.prompt import Confirm
from rich.table import Table
from rich.text import Text

from ..config import Config, load_config
from ..loader import make_importable
from ..settle import headers as h
from ..settle.dlqread import (
    DeadLetterRecord,
    DlqFilter,
    ReadError,
    RecordId,
    TopicReader,
    client_settings,
    parse_since,
    select,
)
from ..settle.redrive import Plan, Planner, replay

STAGES = ("decode", "validate", "classify", "deliver", "crash")
_ERROR_WIDTH = 60
_MAX_PAYLOAD = 16_384  # characters of payload ``show`` prints at most


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="a table of dead-letter records, oldest first")
    _common(listing)
    _filters(listing)
    listing.add_argument(
        "--limit", type=_count, default=50, help="show the newest N matches (default 50; 0: all)"
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = actions.add_parser("show", help="one record: headers, traceback, payload")
    _common(show)
    show.add_argument("id", type=_record_id, help="<partition>:<offset>, as `dlq list` prints")
    again = actions.add_parser(
        "replay",
        help="redeliver matching records to their original caller only",
        description="Redeliver matching dead-letter records through the fast retry tier to "
        "the caller that failed, and no one else, with a fresh attempt count. A record "
        "with no caller (rejected at decode/validate, or quarantined after crashes) goes "
        "to every subscriber whose category takes it today. The dispatcher must be "
        "running to deliver them.",
    )
    _common(again)
    _filters(again)
    again.add_argument(
        "--id", dest="ids", action="append", type=_record_id, default=[], metavar="ID",
        help="only this record (repeatable)",
    )  # fmt: skip
    again.add_argument("--limit", type=_count, default=0, help="only the newest N matches")
    again.add_argument(
        "--to", action="append", default=[], metavar="CALLER",
        help="deliver only to this caller (repeatable); narrows records without a caller",
    )  # fmt: skip
    again.add_argument(
        "--rate", type=_rate, default=50.0, help="records written per second (default 50/s)"
    )
    again.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    again.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, help="the YAML configuration")
    parser.add_argument(
        "--bootstrap", metavar="HOST:PORT", help="Kafka address (default: kafka.bootstrap_servers)"
    )


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--caller", help="records of this caller; '' for those of none (rejects, crash quarantines)"
    )
    parser.add_argument(
        "--error", metavar="TYPE", help="error type, e.g. KeyError or shunter.errors.DeadLetter"
    )
    parser.add_argument("--stage", choices=STAGES, help="pipeline stage that failed")
    parser.add_argument("--topic", metavar="TOPIC", help="origin (source) topic")
    parser.add_argument(
        "--since", type=_since, metavar="WHEN",
        help="dead-lettered since: 30m, 1h, 2d ago, or an ISO time such as 2025-05-01T12:00",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    make_importable(args.config)  # topic models are user code
    actions: dict[str, Callable[[Config, dict[str, Any], argparse.Namespace], int]] = {
        "list": _list,
        "show": _show,
        "replay": _replay,
    }
    try:
        settings = client_settings(config, args.bootstrap)
        return actions[args.action](config, settings, args)
    except ReadError as exc:
        Console(stderr=True).print(Text(f"shunter dlq: {exc}", style="red"))
        return 2


# -- list -------------------------------------------------------------------------------


def _list(config: Config, settings: dict[str, Any], args: argparse.Namespace) -> int:
    with TopicReader(settings) as reader:
        found, total = select(reader, config.dlq_topic, _where(args), args.limit or None)
    if args.json:
        for dead in found:
            sys.stdout.write(orjson.dumps(_as_json(dead)).decode() + "\n")
        return 0
    console = Console()
    if not found:
        console.print(Text(f"no matching records on {config.dlq_topic}"))
        return 0
    console.print(_table(config.dlq_topic, found))
    shown = f"{len(found)} of {total} matching records on {config.dlq_topic}"
    if len(found) < total:
        shown += f" (the newest {len(found)}; --limit 0 shows all)"
    console.print(Text(shown + "; `shunter dlq show -c FILE ID` for one", style="dim"))
    return 0


def _table(topic: str, found: list[DeadLetterRecord]) -> Table:
    table = Table(title=f"dead letters on {topic}")
    for name in ("id", "time", "caller", "stage", "error type", "error", "origin", "attempts"):
        table.add_column(name, no_wrap=name != "error", overflow="fold")
    for dead in found:
        info = dead.info
        when = Text(_time(dead.record.timestamp_ms))
        if info is None:
            table.add_row(Text(str(dead.id)), when, "", "", "", Text(dead.problem), "", "")
            continue
        table.add_row(
            Text(str(dead.id)),
            when,
            Text(info.caller) if info.caller else Text("(none)", style="dim"),
            Text(info.stage),
            Text(info.error_type),
            Text(_shorten(info.error, _ERROR_WIDTH)),
            Text(f"{info.origin_topic}[{info.origin_partition}]@{info.origin_offset}"),
            Text(str(info.attempt) if info.caller else "-"),
        )
    return table


def _as_json(dead: DeadLetterRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"id": str(dead.id), "timestamp_ms": dead.record.timestamp_ms}
    if dead.info is None:
        return {**out, "problem": dead.problem}
    info = dead.info
    return {
        **out,
        "caller": info.caller,
        "category": info.category,
        "stage": info.stage,
        "error_type": info.error_type,
        "error": info.error,
        "origin_topic": info.origin_topic,
        "origin_partition": info.origin_partition,
        "origin_offset": info.origin_offset,
        "attempt": info.attempt,
        "first_failure_ms": info.first_failure_ms,
    }


# -- show -------------------------------------------------------------------------------


def _show(config: Config, settings: dict[str, Any], args: argparse.Namespace) -> int:
    rid: RecordId = args.id
    with TopicReader(settings) as reader:
        record = reader.fetch(config.dlq_topic, rid.partition, rid.offset)
    console = Console()
    console.print(
        Text(f"{config.dlq_topic} {rid}, written {_time(record.timestamp_ms)}", style="bold")
    )
    table = Table(show_header=False, box=None)
    table.add_column(style="cyan", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("key", Text(_bytes(record.key)))
    trace = ""
    for name, value in record.headers:
        if name == h.TRACEBACK:
            trace = value.decode("utf-8", "replace")
            continue
        table.add_row(Text(name), Text(_header(name, value)))
    console.print(table)
    console.print(Text("\ntraceback", style="bold"))
    console.print(
        Text(trace.rstrip() or "(none: this failure had no Python exception)"), soft_wrap=True
    )
    size = len(record.value) if record.value is not None else 0
    console.print(Text(f"\npayload ({size} bytes)", style="bold"))
    console.print(Text(_payload(record.value)), soft_wrap=True)
    console.print(
        Text(
            f"\nrun it in the foreground: shunter replay -c {args.config} --topic "
            f"{config.dlq_topic} --partition {rid.partition} --offset {rid.offset}",
            style="dim",
        )
    )
    return 0


def _header(name: str, value: bytes) -> str:
    text = _bytes(value)
    if not text:
        return "(empty)"
    if name in (h.FIRST_FAILURE, h.NOT_BEFORE, h.ORIGIN_TIMESTAMP) and text.isdigit():
        ms = int(text)
        return f"{text}  ({_time(ms)})" if ms else text
    return text


def _payload(value: bytes | None) -> str:
    if value is None:
        return "(none: a tombstone)"
    try:
        text = orjson.dumps(orjson.loads(value), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        text = repr(value[:_MAX_PAYLOAD])
    if len(text) > _MAX_PAYLOAD:
        text = text[:_MAX_PAYLOAD] + f"\n... ({len(text) - _MAX_PAYLOAD} more characters)"
    return text


# -- replay -----------------------------------------------------------------------------


def _replay(config: Config, settings: dict[str, Any], args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    unknown = sorted(set(args.to) - {s.caller for s in config.subscribers})
    if unknown:
        err.print(Text(f"shunter dlq: --to names unknown callers: {', '.join(unknown)}"))
        return 2
    with TopicReader(settings) as reader:
        found, _ = select(reader, config.dlq_topic, _where(args), args.limit or None)
    planner = Planner(config)
    plans = [p for p in (_narrow(planner.plan(d), set(args.to)) for d in found) if p is not None]
    console = Console()
    if not plans:
        console.print(Text(f"no matching records on {config.dlq_topic}"))
        return 0
    ready = [p for p in plans if not p.refused]
    refused = [p for p in plans if p.refused]
    _print_plan(console, config, ready, refused)
    writes = sum(len(p.routes) for p in ready)
    if args.dry_run or not writes:
        return 1 if refused else 0
    if not args.yes and not _confirm(err, f"Write {writes} records to {config.fast_topic}?"):
        return 2
    columns = (
        TextColumn("replaying"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("replay", total=writes)
        result = replay(
            settings, config.fast_topic, ready, args.rate, lambda: progress.advance(task)
        )
    for dead_id, error in result.failed:
        console.print(Text(f"  write failed for {dead_id}: {error}", style="red"))
    summary = (
        f"replayed {result.written} of {writes} deliveries from {len(ready)} dead-letter "
        f"records to {config.fast_topic}"
    )
    if refused:
        summary += f"; {len(refused)} refused"
    if result.failed:
        summary += f"; {len(result.failed)} writes failed"
    if result.interrupted:
        summary += "; interrupted"
    console.print(Text(summary, style="bold" if not (refused or result.failed) else "yellow"))
    console.print(
        Text(
            "The dead-letter records stay on the dead-letter topic: replaying the same "
            "selection again delivers them again.",
            style="dim",
        )
    )
    return 1 if refused or result.failed or result.interrupted else 0


def _narrow(plan: Plan, to: set[str]) -> Plan | None:
    """Keep only the routes to ``--to`` callers; None when nothing of the plan is left."""
    if not to:
        return plan
    if plan.refused:
        caller = plan.dead.info.caller if plan.dead.info else ""
        return plan if not caller or caller in to else None
    routes = tuple(r for r in plan.routes if r.caller in to)
    return Plan(plan.dead, routes) if routes else None


def _print_plan(console: Console, config: Config, ready: list[Plan], refused: list[Plan]) -> None:
    per_caller = Counter((r.caller, r.category) for p in ready for r in p.routes)
    if per_caller:
        table = Table(title=f"replay to {config.fast_topic}")
        for name in ("caller", "category", "records"):
            table.add_column(name)
        for (caller, category), n in sorted(per_caller.items()):
            table.add_row(Text(caller), Text(category), Text(str(n)))
        console.print(table)
        fanned = sum(1 for p in ready if p.dead.info is not None and not p.dead.info.caller)
        if fanned:
            console.print(
                Text(
                    f"{fanned} records name no caller (rejected or quarantined): each goes "
                    "to every subscriber whose category takes it.",
                    style="dim",
                )
            )
    for plan in refused:
        console.print(Text(f"refused {plan.dead.id}: {plan.refused}", style="yellow"))


def _confirm(err: Console, question: str) -> bool:
    if not sys.stdin.isatty():
        err.print(Text("shunter dlq: not a terminal; pass --yes to replay without asking"))
        return False
    return Confirm.ask(question, console=err)


# -- arguments and formatting -----------------------------------------------------------


def _where(args: argparse.Namespace) -> DlqFilter:
    return DlqFilter(
        caller=args.caller,
        error_type=args.error,
        stage=args.stage,
        origin_topic=args.topic,
        since_ms=args.since,
        ids=frozenset(getattr(args, "ids", [])),
    )


def _record_id(text: str) -> RecordId:
    try:
        return RecordId.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _since(text: str) -> int:
    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 0, got {text!r}")
    return int(text)


def _rate(text: str) -> float:
    """``50``, ``50/s``, ``600/m`` → records per second."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|m|min|h))?\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a rate such as 50/s or 600/m, got {text!r}")
    per = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, None: 1.0}[match.group(2)]
    return float(match.group(1)) / per


def _time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _shorten(text: str, width: int) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    if len(line) > width or line != text.strip():
        return line[: width - 1] + "…"
    return line


def _bytes(value: bytes | None) -> str:
    if value is None:
        return "(none)"
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return repr(value)
