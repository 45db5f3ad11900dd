"""``shunter broker``: the embedded development broker alone, until Ctrl-C, SIGTERM or
SIGHUP; each stops the broker before exiting, and the broker dies with this process even
when it is killed outright (see broker/embedded.py)."""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType

from ..broker.embedded import EmbeddedBroker

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=9092, help="port on 127.0.0.1 (default 9092)")


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        with EmbeddedBroker(port=args.port) as broker:
            print(
                f"embedded broker listening on {broker.bootstrap} (memory only); Ctrl-C stops it",
                flush=True,
            )
            while not stop.wait(3600):
                pass
        name = signal.Signals(received[0]).name if received else "a signal"
        print(f"{name}: broker on {broker.bootstrap} stopped", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
