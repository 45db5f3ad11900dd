"""``shunter dlq list|show|replay -c FILE``: the dead-letter topic, by caller, error type and
time; replay to the original caller only, rate-limited.

A dead-letter record is named ``<partition>:<offset>`` on the dead-letter topic
(``config.dlq_topic``); ``list`` prints these IDs and ``show``/``replay --id`` take them.
Replaying writes fresh records to the fast retry tier for the running dispatcher to
deliver (see settle/redrive.py for who receives what). The dead-letter records stay where
they are; each one replayed is marked on ``<dead-letter topic>.replayed``, and ``replay``
skips marked records unless ``--again``.

Every byte of a message (key, headers, payload, error text) is printed with its control
characters escaped: a record cannot put escape sequences on the operator's terminal.
"""

from __future__ import annotations

import argparse
import logging
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

from ..config import Config, did_you_mean, load_config
from ..decode import display
from ..loader import make_importable
from ..observe.fingerprints import group_dead_letters
from ..observe.logs import setup_logging
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
    summary,
)
from ..settle.redrive import (
    Mark,
    Marking,
    Plan,
    Planner,
    ensure_marks_topic,
    read_marks,
    replay,
    replayed_topic,
    unreplayed,
)
from . import output

STAGES = ("decode", "validate", "classify", "deliver", "crash", "internal", "skip")
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
    listing.add_argument(
        "--group",
        action="store_true",
        help="group the matches by failure fingerprint (caller, error type, failing line)",
    )
    output.add_output_arguments(listing)
    show = actions.add_parser("show", help="one record: headers, traceback, payload")
    _common(show)
    output.add_output_arguments(show)
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
    again.add_argument(
        "--again",
        action="store_true",
        help="also replay records already replayed (marked on <dlq topic>.replayed)",
    )
    again.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    again.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    output.add_output_arguments(again)


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
    secrets: set[str] = set()
    config = load_config(args.config, secrets=secrets)
    if not logging.getLogger().handlers:  # librdkafka's lines, when Kafka is unreachable
        setup_logging(config.log.format, "WARNING", secrets)
    make_importable(args.config)  # topic models are user code
    actions: dict[str, Callable[[Config, dict[str, Any], argparse.Namespace], int]] = {
        "list": _list,
        "show": _show,
        "replay": _replay,
    }
    caller = getattr(args, "caller", None)
    callers = [s.caller for s in config.subscribers]
    if caller and caller not in callers:  # still searched: a caller since removed has letters
        hint = did_you_mean(caller, callers)
        Console(stderr=True).print(
            Text(f"note: {caller!r} is not a caller of this configuration{hint}", style="yellow")
        )
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
    if args.group:
        return _groups(config, found, args)
    marks = read_marks(settings, replayed_topic(config)) if found else {}
    if args.json:
        for dead in found:
            sys.stdout.write(orjson.dumps(_as_json(dead, marks.get(dead.id))).decode() + "\n")
        return 0
    console = output.console(args)
    if not found:
        console.print(Text(f"no matching records on {config.dlq_topic}"))
        return 0
    console.print(_table(config.dlq_topic, found, marks, output.is_wide(console)))
    shown = f"{len(found)} of {total} matching records on {config.dlq_topic}"
    if len(found) < total:
        shown += f" (the newest {len(found)}; --limit 0 shows all)"
    replayed = sum(1 for d in found if d.id in marks)
    if replayed:
        shown += f"; {replayed} replayed already"
    console.print(Text(shown, style="dim"))
    console.print(Text("one record: shunter dlq show -c FILE ID", style="dim"))
    return 0


def _groups(config: Config, found: list[DeadLetterRecord], args: argparse.Namespace) -> int:
    """What is failing, at a glance: one row per fingerprint, most frequent first."""
    groups = sorted(group_dead_letters(found), key=lambda g: -g.count)
    if args.json:
        for group in groups:
            sys.stdout.write(orjson.dumps(group.as_dict()).decode() + "\n")
        return 0
    console = output.console(args)
    if not groups:
        console.print(Text(f"no matching records on {config.dlq_topic}"))
        return 0
    table = Table(title=f"failures on {config.dlq_topic}, by fingerprint")
    table.add_column("count", justify="right", no_wrap=True)
    table.add_column("caller", no_wrap=True)
    table.add_column("failure", overflow="fold")
    table.add_column("example", no_wrap=True)
    for group in groups:
        where = f"{group.error_type or '(no type)'}"
        if group.line:
            where += f" at {group.line}"
        table.add_row(
            str(group.count),
            group.caller or "(none)",
            Text(output.safe(where)),
            str(group.example.get("id", "")),
        )
    console.print(table)
    console.print(Text("one record: shunter dlq show -c FILE ID", style="dim"))
    return 0


def _table(
    topic: str, found: list[DeadLetterRecord], marks: dict[RecordId, Mark], wide: bool
) -> Table:
    """Wide: every column. At a terminal's width: the ID, time, caller, failure (stage
    and error type) and origin, never cut (a cell folds instead), without the error text
    (``dlq show`` prints it)."""
    table = Table(title=f"dead letters on {topic}")
    if wide:
        names = ["id", "time", "caller", "stage", "error type", "error", "origin", "attempts"]
        names.append("replayed")
    else:
        names = ["id", "time", "caller", "failure", "origin"]
    for name in names:
        whole = name in ("id", "origin")
        table.add_column(name, no_wrap=whole or (wide and name != "error"), overflow="fold")
    for dead in found:
        cells = _cells(dead, marks.get(dead.id), wide)
        table.add_row(*(cells.get(name, Text("")) for name in names))
    return table


def _cells(dead: DeadLetterRecord, mark: Mark | None, wide: bool) -> dict[str, Text]:
    info = dead.info
    when = _time(dead.record.timestamp_ms) if wide else _short_time(dead.record.timestamp_ms)
    cells = {"id": Text(str(dead.id)), "time": Text(when)}
    replayed = f"replayed {_short_time(mark.replayed_ms)}" if mark else ""
    cells["replayed"] = Text(replayed.removeprefix("replayed "))
    if info is None:
        cells["failure" if not wide else "error"] = Text(output.safe(dead.problem))
        return cells
    cells["caller"] = Text(info.caller) if info.caller else Text("(none)", style="dim")
    cells["stage"] = Text(info.stage)
    cells["error type"] = Text(output.safe(info.error_type))
    cells["failure"] = Text(f"{info.stage}: {output.safe(info.error_type)}")
    if replayed:
        cells["failure"].append(f" ({replayed})", style="dim")
    cells["error"] = Text(output.safe(_shorten(info.error, _ERROR_WIDTH)))
    cells["origin"] = Text(f"{info.origin_topic}[{info.origin_partition}]@{info.origin_offset}")
    cells["attempts"] = Text(str(info.attempt) if info.caller else "-")
    return cells


def _as_json(dead: DeadLetterRecord, mark: Mark | None = None) -> dict[str, Any]:
    return {**summary(dead), "replayed_ms": mark.replayed_ms if mark else None}


# -- show -------------------------------------------------------------------------------


def _show(config: Config, settings: dict[str, Any], args: argparse.Namespace) -> int:
    rid: RecordId = args.id
    with TopicReader(settings) as reader:
        record = reader.fetch(config.dlq_topic, rid.partition, rid.offset)
    mark = read_marks(settings, replayed_topic(config)).get(rid)
    command = [
        "shunter", "replay", "-c", args.config, "--topic", config.dlq_topic,
        "--partition", str(rid.partition), "--offset", str(rid.offset),
    ]  # fmt: skip
    if args.json:
        sys.stdout.write(orjson.dumps(_record_json(record, rid, mark, command)).decode() + "\n")
        return 0
    console = output.console(args)
    console.print(
        Text(f"{config.dlq_topic} {rid}, written {_time(record.timestamp_ms)}", style="bold")
    )
    table = Table(show_header=False, box=None)
    table.add_column(style="cyan", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("key", Text(output.safe_bytes(record.key)))
    trace = ""
    for name, value in record.headers:
        if name == h.TRACEBACK:
            trace = value.decode("utf-8", "replace")
            continue
        table.add_row(Text(output.safe(name)), Text(_header(name, value)))
    if mark is not None:
        table.add_row("replayed", Text(f"{_time(mark.replayed_ms)} to {', '.join(mark.callers)}"))
    console.print(table)
    console.print(Text("\ntraceback", style="bold"))
    console.print(
        Text(
            output.safe(trace.rstrip(), keep_lines=True)
            or "(none: this failure had no Python exception)"
        ),
        soft_wrap=True,
    )
    size = len(record.value) if record.value is not None else 0
    console.print(Text(f"\npayload ({size} bytes)", style="bold"))
    origin = next((v for k, v in record.headers if k == h.ORIGIN_TOPIC), b"").decode(
        "utf-8", "replace"
    )
    console.print(Text(_payload(config, origin, record.value)), soft_wrap=True)
    console.print(Text("\nrun it in the foreground:", style="dim"))
    console.print(
        Text(output.command_lines(command, min(console.width, 80)), style="dim"), soft_wrap=True
    )
    return 0


def _record_json(
    record: Any, rid: RecordId, mark: Mark | None, command: list[str]
) -> dict[str, Any]:
    def text(value: bytes | None) -> str | None:
        return None if value is None else value.decode("utf-8", "backslashreplace")

    return {
        "id": str(rid),
        "timestamp_ms": record.timestamp_ms,
        "key": text(record.key),
        "headers": [[name, text(value)] for name, value in record.headers],
        "value": text(record.value),
        "replayed_ms": mark.replayed_ms if mark else None,
        "replay_command": command,
    }


def _header(name: str, value: bytes) -> str:
    text = output.safe_bytes(value)
    if not text:
        return "(empty)"
    if name in (h.FIRST_FAILURE, h.NOT_BEFORE, h.ORIGIN_TIMESTAMP) and text.isdigit():
        ms = int(text)
        return f"{text}  ({_time(ms)})" if ms else text
    return text


def _payload(config: Config, origin: str, value: bytes | None) -> str:
    """The payload decoded as its origin topic's format says (Avro, Protobuf, JSON),
    else as JSON if it is, else its bytes; control characters escaped either way."""
    if value is None:
        return "(none: a tombstone, or a payload too large to keep)"
    if origin in config.topics and config.topics[origin].format != "json":
        text = display(config, origin, value)
    else:
        try:
            text = orjson.dumps(orjson.loads(value), option=orjson.OPT_INDENT_2).decode()
        except orjson.JSONDecodeError:
            text = "(not JSON) " + output.safe_bytes(value[:_MAX_PAYLOAD])
    if len(text) > _MAX_PAYLOAD:
        text = text[:_MAX_PAYLOAD] + f"\n... ({len(text) - _MAX_PAYLOAD} more characters)"
    return output.safe(text, keep_lines=True)


# -- replay -----------------------------------------------------------------------------


def _replay(config: Config, settings: dict[str, Any], args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    callers = {s.caller for s in config.subscribers}
    unknown = sorted(set(args.to) - callers)
    if unknown:
        hints = "".join(did_you_mean(u, callers) for u in unknown)
        err.print(Text(f"shunter dlq: --to names unknown callers: {', '.join(unknown)}{hints}"))
        return 2
    with TopicReader(settings) as reader:
        found, _ = select(reader, config.dlq_topic, _where(args), args.limit or None)
    marks_topic = replayed_topic(config)
    marks = read_marks(settings, marks_topic) if found else {}
    planner = Planner(config)
    plans = [p for p in (_narrow(planner.plan(d), set(args.to)) for d in found) if p is not None]
    skipped = 0
    if not args.again:
        fresh = [unreplayed(p, marks.get(p.dead.id)) for p in plans]
        skipped = sum(
            len(p.routes) - (len(f.routes) if f else 0) for p, f in zip(plans, fresh, strict=True)
        )
        plans = [p for p in fresh if p is not None]
    console = output.console(args, stderr=args.json)  # --json: only JSON on stdout
    if skipped:
        console.print(
            Text(
                f"skipped {skipped} deliveries replayed already (marked on {marks_topic}); "
                "--again replays them again",
                style="yellow",
            )
        )
    if not plans:
        nothing = "nothing left to replay" if skipped else "no matching records"
        console.print(Text(f"{nothing} on {config.dlq_topic}"))
        return 0
    ready = [p for p in plans if not p.refused]
    refused = [p for p in plans if p.refused]
    if args.json:
        for plan in plans:
            sys.stdout.write(orjson.dumps(_plan_json(plan)).decode() + "\n")
    else:
        _print_plan(console, config, ready, refused)
    writes = sum(len(p.routes) for p in ready)
    if args.dry_run or not writes:
        return 1 if refused else 0
    if not args.yes and not _confirm(err, f"Write {writes} records to {config.fast_topic}?"):
        return 2
    ensure_marks_topic(settings, marks_topic)
    columns = (
        TextColumn("replaying"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=args.json) as progress:
        task = progress.add_task("replay", total=writes)
        result = replay(
            settings,
            config.fast_topic,
            ready,
            args.rate,
            lambda: progress.advance(task),
            marks=Marking(config.dlq_topic, marks_topic, marks),
        )
    for dead_id, error in result.failed:
        console.print(Text(f"  write failed for {dead_id}: {output.safe(error)}", style="red"))
    summary = (
        f"replayed {result.written} of {writes} deliveries from {len(ready)} dead-letter "
        f"records to {config.fast_topic}; {result.marked} marked replayed"
    )
    if refused:
        summary += f"; {len(refused)} refused"
    if result.failed:
        summary += f"; {len(result.failed)} writes failed"
    if result.interrupted:
        summary += "; interrupted"
    if args.json:
        outcome = {"written": result.written, "marked": result.marked, "refused": len(refused)}
        outcome |= {"failed": len(result.failed), "interrupted": result.interrupted}
        sys.stdout.write(orjson.dumps({"result": outcome}).decode() + "\n")
    console.print(Text(summary, style="bold" if not (refused or result.failed) else "yellow"))
    return 1 if refused or result.failed or result.interrupted else 0


def _plan_json(plan: Plan) -> dict[str, Any]:
    return {
        "id": str(plan.dead.id),
        "callers": [r.caller for r in plan.routes],
        "refused": plan.refused or None,
    }


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
            table.add_column(name, overflow="fold")
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
        console.print(Text(f"refused {plan.dead.id}: {output.safe(plan.refused)}", style="yellow"))


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


def _short_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%m-%d %H:%M:%S")


def _shorten(text: str, width: int) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    if len(line) > width or line != text.strip():
        return line[: width - 1] + "…"
    return line
