"""``shunter broker``: the embedded development broker alone, until Ctrl-C."""

from __future__ import annotations

import argparse
import time

from ..broker.embedded import EmbeddedBroker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=9092, help="port on 127.0.0.1 (default 9092)")


def run(args: argparse.Namespace) -> int:
    with EmbeddedBroker(port=args.port) as broker:
        print(
            f"embedded broker listening on {broker.bootstrap} (memory only); Ctrl-C stops it",
            flush=True,
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0
