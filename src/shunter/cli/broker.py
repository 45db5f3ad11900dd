"""``shunter broker``: the embedded development broker alone, until Ctrl-C, SIGTERM or
SIGHUP; each stops the broker before exiting, and the broker dies with this process even
when it is killed outright (see broker/embedded.py)."""

from __future__ import annotations

import argparse
import signal
import socket
from types import FrameType

from ..broker.embedded import EmbeddedBroker

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=9092, help="port on 127.0.0.1 (default 9092)")


def run(args: argparse.Namespace) -> int:
    # The handlers do nothing: the C-level handler writes each signal's number to the
    # wakeup socket, which the main thread blocks on. Setting a threading.Event from a
    # handler instead can deadlock: the handler runs in the main thread, which may hold
    # the Event's lock at that instant (entering or leaving its wait).
    wakeup, wakeup_writer = socket.socketpair()
    wakeup_writer.setblocking(False)
    previous_fd = signal.set_wakeup_fd(wakeup_writer.fileno(), warn_on_full_buffer=False)
    previous = {sig: signal.signal(sig, _record) for sig in STOP_SIGNALS}
    try:
        with EmbeddedBroker(port=args.port) as broker:
            print(
                f"embedded broker listening on {broker.bootstrap} (memory only); Ctrl-C stops it",
                flush=True,
            )
            signum = _first_stop_signal(wakeup)
        print(f"{signal.Signals(signum).name}: broker on {broker.bootstrap} stopped", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(previous_fd)
        wakeup.close()
        wakeup_writer.close()
    return 0


def _record(_signum: int, _frame: FrameType | None) -> None:
    """The Python half of a stop signal: nothing; the wakeup socket carries it."""


def _first_stop_signal(wakeup: socket.socket) -> int:
    """Block until a stop signal arrives (one received during start-up counts) and
    return its number; other signals that reach the wakeup socket are skipped."""
    while True:
        received = wakeup.recv(64)
        if not received:  # closed: nothing can signal a stop any more
            raise RuntimeError("the signal wakeup socket was closed")
        for signum in received:
            if signum in STOP_SIGNALS:
                return signum
