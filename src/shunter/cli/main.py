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
    "bench": "benchmark scenarios against a raw confluent-kafka loop (JSON lines)",
    "broker": "run the embedded development broker alone",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shunter", description="Kafka message dispatcher.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, summary in COMMANDS.items():
        module = importlib.import_module(f"shunter.cli.{name}")
        module.add_arguments(sub.add_parser(name, help=summary, description=summary))
        modules[name] = module
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except ConfigError as exc:
        print(f"shunter: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
