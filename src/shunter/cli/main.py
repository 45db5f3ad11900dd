"""``shunter`` entry point: parses the command line and hands over to one command module."""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import textwrap

from .. import BUILD, __version__
from ..errors import ConfigError

COMMANDS = {
    "demo": "zero-config tour on the embedded broker",
    "run": "run the dispatcher service",
    "check": "validate a configuration and print its topology",
    "dlq": "inspect and replay the dead-letter topic",
    "replay": "run one message through one caller's handler in the foreground",
    "skip": "dead-letter one stuck record (or one caller's delivery) and move on",
    "bench": "benchmark scenarios against a raw confluent-kafka loop (JSON lines)",
    "broker": "run the embedded development broker alone",
    "completion": 'print a bash completion script (eval "$(shunter completion)")',
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object], dict[str, str]]:
    """The whole command line: the parser, each command's module, and the commands whose
    module failed to import (name → why)."""
    parser = argparse.ArgumentParser(prog="shunter", description="Kafka message dispatcher.")
    parser.add_argument("--version", action="version", version=f"shunter {__version__} ({BUILD})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules: dict[str, object] = {}
    broken: dict[str, str] = {}
    for name, summary in COMMANDS.items():
        command = sub.add_parser(name, help=summary, description=summary)
        try:  # one broken command module must not take the others (``run``!) down
            module = importlib.import_module(f"shunter.cli.{name}")
        except Exception as exc:
            broken[name] = f"{type(exc).__name__}: {exc}"
            command.add_argument("rest", nargs=argparse.REMAINDER)
            continue
        module.add_arguments(command)
        modules[name] = module
    return parser, modules, broken


def main(argv: list[str] | None = None) -> int:
    parser, modules, broken = build_parser()
    args = parser.parse_args(argv)
    if args.command in broken:
        print(f"shunter {args.command}: cannot load: {broken[args.command]}", file=sys.stderr)
        return 1
    try:
        return int(modules[args.command].run(args) or 0)  # type: ignore[attr-defined]
    except ConfigError as exc:
        print(refusal(exc.problems, sys.stderr.isatty()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `shunter dlq list --json | head -1`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141


def refusal(problems: list[str], fold: bool) -> str:
    """A refused configuration, one problem per item; on a terminal (``fold``) folded at
    its width between words (a key path, a name or a value is never cut), else one line
    per problem for grep and the journal."""
    width = max(shutil.get_terminal_size().columns, 40) if fold else 1_000_000
    lines = ["shunter: invalid configuration:"]
    for problem in problems:
        lines.append(
            textwrap.fill(
                problem,
                width,
                initial_indent="  - ",
                subsequent_indent="      ",
                break_long_words=False,
                break_on_hyphens=False,
            )
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
