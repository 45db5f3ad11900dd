"""``shunter`` entry point: parses the command line and hands over to one command module."""

from __future__ import annotations

import argparse
import importlib
import sys

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
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shunter", description="Kafka message dispatcher.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
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
    args = parser.parse_args(argv)
    if args.command in broken:
        print(f"shunter {args.command}: cannot load: {broken[args.command]}", file=sys.stderr)
        return 1
    try:
        return int(modules[args.command].run(args) or 0)
    except ConfigError as exc:
        print(f"shunter: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
