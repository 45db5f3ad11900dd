"""``shunter check -c FILE``: validate the configuration, print topic → category → caller."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..app import Dispatcher
from ..config import load_config, redact
from ..loader import make_importable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, help="the YAML configuration")


def run(args: argparse.Namespace) -> int:
    make_importable(args.config)
    secrets: set[str] = set()
    config = load_config(args.config, secrets=secrets)
    app = Dispatcher(config)
    app.handlers()  # imports every handler: a typo fails here, not at 3 a.m.
    table = Table(title=f"shunter topology (group {config.kafka.group_id})")
    for column in (
        "topic",
        "category",
        "filter",
        "caller",
        "handler / URL",
        "isolation",
        "ordering",
    ):
        table.add_column(column)
    for name, category in config.categories.items():
        subs = [s for s in config.subscribers if s.category == name]
        for topic in category.topics:
            where = Text(category.where or "")  # a CEL ``[x]`` is not rich markup
            if not subs:
                table.add_row(topic, name, where, "(no subscriber)", "", "", "")
            for sub in subs:
                target = sub.http.url if sub.http else sub.handler or "(code)"
                target = redact([target], secrets)[0]  # a URL may carry a ${TOKEN}
                kind = "http" if sub.http else sub.isolation
                table.add_row(topic, name, where, sub.caller, Text(target), kind, sub.ordering)
    console = Console()
    console.print(table)
    console.print(
        f"retry: fast {config.retry.fast.attempts}x{config.retry.fast.delay:g}s → "
        f"slow {config.retry.slow.attempts}x{config.retry.slow.delay:g}s → {config.dlq_topic}; "
        f"crash guard: quarantine after {config.crash_guard.quarantine_after} crashes"
    )
    console.print("[green]configuration OK[/green]")
    return 0
