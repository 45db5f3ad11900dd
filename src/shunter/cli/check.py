"""``shunter check -c FILE``: validate the configuration, print topic → category → caller.

Every problem of the file is reported in one pass: bad values and unknown keys (with the
closest valid key suggested), references between sections, handlers and models that do
not import, and a deployment with no subscriber at all. ``--reference`` prints the
configuration reference (docs/configuration.md) instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson
import yaml
from rich.table import Table
from rich.text import Text

from ..app import Dispatcher
from ..config import Config, SubscriberConfig, parse_config, redact
from ..errors import ConfigError
from ..loader import import_object, make_importable
from . import output, reference


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="the YAML configuration")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="print the reference of every configuration key (Markdown) and exit",
    )
    output.add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.reference:
        sys.stdout.write(reference.render())
        return 0
    if not args.config:
        raise SystemExit("shunter check: -c/--config FILE is required (or --reference)")
    make_importable(args.config)
    secrets: set[str] = set()
    config, app = _validate(args.config, secrets)
    if args.json:
        for row in _rows(config, secrets):
            sys.stdout.write(orjson.dumps(row).decode() + "\n")
        return 0
    console = output.console(args)
    console.print(_table(config, secrets, output.is_wide(console)))
    filters = {n: c.where for n, c in config.categories.items() if c.where}
    if filters and not output.is_wide(console):
        for name, where in filters.items():
            console.print(Text(f"* {name}: where {output.safe(where)}"))
    console.print(Text(_retry_line(config)))
    if app is not None:
        console.print("[green]configuration OK[/green]")
    return 0


def _validate(path: str, secrets: set[str]) -> tuple[Config, Dispatcher | None]:
    """The configuration, or a ConfigError naming every problem the file has."""
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{file}: not valid YAML: {exc}"]) from None
    problems: list[str] = []
    config: Config | None = None
    try:
        config = parse_config(data, str(file.parent.resolve()), secrets)
    except ConfigError as exc:
        problems.extend(exc.problems)
    problems.extend(_import_problems(data))
    if data is None or (isinstance(data, dict) and not data.get("subscribers")):
        problems.append(
            "subscribers: no subscriber is configured, so nothing would receive any "
            "message (add at least one under subscribers:)"
        )
    app = None
    if config is not None:
        app = Dispatcher(config)
        for check in (app.handlers, lambda: _decoders(config)):
            try:
                check()
            except ConfigError as exc:
                problems.extend(exc.problems)
    if problems:
        raise ConfigError(redact(list(dict.fromkeys(problems)), secrets))
    assert config is not None
    return config, app


def _decoders(config: Config) -> None:
    from ..decode import build_decoders

    build_decoders(config)  # schema files parse, models import


def _import_problems(data: Any) -> list[str]:
    """Handlers and models that do not import, found even when other keys are bad."""
    if not isinstance(data, dict):
        return []
    problems: list[str] = []
    named: list[tuple[str, Any]] = []
    topics = data.get("topics")
    if isinstance(topics, dict):
        named += [(f"topics.{n}.model", t.get("model")) for n, t in topics.items() if t]
    subscribers = data.get("subscribers")
    if isinstance(subscribers, list):
        named += [
            (f"subscribers[{i}].handler", s.get("handler"))
            for i, s in enumerate(subscribers)
            if isinstance(s, dict)
        ]
    for key, path in named:
        if isinstance(path, str) and ":" in path:
            try:
                import_object(path, key)
            except ConfigError as exc:
                problems.extend(exc.problems)
    return problems


def _targets(config: Config, secrets: set[str]) -> dict[str, tuple[str, str]]:
    """caller → (handler or URL, kind); a URL may carry a ${TOKEN}, so it is redacted."""
    out: dict[str, tuple[str, str]] = {}
    for sub in config.subscribers:
        target = sub.http.url if sub.http else sub.handler or "(code)"
        out[sub.caller] = (redact([target], secrets)[0], "http" if sub.http else sub.isolation)
    return out


def _rows(config: Config, secrets: set[str]) -> list[dict[str, Any]]:
    targets = _targets(config, secrets)
    rows = []
    for name, category in config.categories.items():
        subs: list[SubscriberConfig | None] = [s for s in config.subscribers if s.category == name]
        for topic in category.topics:
            for sub in subs or [None]:  # a category nobody subscribes to is a row too
                target, kind = targets[sub.caller] if sub else ("", "")
                rows.append(
                    {
                        "topic": topic,
                        "category": name,
                        "where": category.where,
                        "caller": sub.caller if sub else None,
                        "target": target,
                        "isolation": kind,
                        "ordering": sub.ordering if sub else None,
                    }
                )
    return rows


def _table(config: Config, secrets: set[str], wide: bool) -> Table:
    """Every column when wide; at a terminal's width the filter, isolation and ordering
    columns are dropped (filters are listed under the table) and nothing is cut."""
    table = Table(title=f"shunter topology (group {config.kafka.group_id})")
    columns = ["topic", "category", "caller", "handler / URL"]
    if wide:
        columns = [
            "topic",
            "category",
            "filter",
            "caller",
            "handler / URL",
            "isolation",
            "ordering",
        ]
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in _rows(config, secrets):
        cells = {
            "topic": row["topic"],
            "category": row["category"] + ("*" if row["where"] and not wide else ""),
            "filter": row["where"] or "",
            "caller": row["caller"] or "(no subscriber)",
            "handler / URL": row["target"],
            "isolation": row["isolation"],
            "ordering": row["ordering"] or "",
        }
        table.add_row(*(Text(output.safe(cells[c])) for c in columns))  # CEL `[x]` is no markup
    return table


def _retry_line(config: Config) -> str:
    return (
        f"retry: fast {config.retry.fast.attempts}x{config.retry.fast.delay:g}s → "
        f"slow {config.retry.slow.attempts}x{config.retry.slow.delay:g}s → {config.dlq_topic}\n"
        f"crash guard: quarantine after {config.crash_guard.quarantine_after} crashes"
    )
