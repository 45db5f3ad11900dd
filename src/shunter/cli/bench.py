"""``shunter bench``: scenarios side by side with a raw confluent-kafka loop, as JSON lines.

Each run of each scenario prints one JSON object on stdout; with ``--runs K`` (K > 1) a
last line gives the median of every figure. Progress goes to stderr, shunter's own log to
``--log`` (or a temporary file). The embedded broker is started unless ``--bootstrap`` is
given; on a broker given with ``--bootstrap`` the bench deletes the topics it created.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from ..bench.runner import BY_NAME, SCENARIOS, run_scenario, summarize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = ", ".join(f"{s.name}{'' if s.default else ' (not by default)'}" for s in SCENARIOS)
    parser.add_argument(
        "--scenario",
        action="append",
        choices=list(BY_NAME),
        metavar="NAME",
        help=f"run this scenario (repeatable; default: all): {names}",
    )
    parser.add_argument(
        "--messages",
        type=_positive,
        metavar="N",
        help="messages per scenario (default: each scenario's own, 200,000 for fanout-3)",
    )
    parser.add_argument(
        "--runs",
        type=_positive,
        default=1,
        metavar="K",
        help="repeat every scenario K times and end with a median line",
    )
    parser.add_argument(
        "--bootstrap",
        metavar="HOST:PORT",
        help="use this broker instead of starting the embedded one",
    )
    parser.add_argument(
        "--log",
        metavar="FILE",
        help="append shunter's log (INFO) to FILE (default: a temporary file)",
    )


def run(args: argparse.Namespace) -> int:
    from ..bench.context import BenchContext
    from ..bench.events import delete_topics
    from ..broker.embedded import EmbeddedBroker

    chosen = (
        [BY_NAME[n] for n in args.scenario]
        if args.scenario
        else [s for s in SCENARIOS if s.default]
    )
    results: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="shunter-bench-") as workdir,
        _logging_to(args.log or str(Path(workdir, "shunter.log"))),
    ):
        broker = None if args.bootstrap else EmbeddedBroker().start()
        try:
            bootstrap = args.bootstrap or broker.bootstrap  # type: ignore[union-attr]
            _note(f"broker {bootstrap}{' (embedded)' if broker else ''}")
            ctx = BenchContext(
                bootstrap,
                Path(workdir),
                messages=args.messages,
                embedded=broker is not None,
                say=_note,
            )
            try:
                for ctx.run in range(1, args.runs + 1):
                    for scenario in chosen:
                        _note(f"run {ctx.run}/{args.runs}: {scenario.name}")
                        result = run_scenario(scenario, ctx)
                        results.append(result)
                        _emit(result)
                if args.runs > 1:
                    _emit(summarize(results))
            finally:
                if broker is None:  # a broker that outlives the bench: leave it clean
                    delete_topics(bootstrap, ctx.created)
        finally:
            if broker is not None:
                gc.collect()  # clients of finished runs go first, not noisily after the broker
                broker.stop()
    return 1 if any("error" in r for r in results) else 0


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


def _note(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _logging_to(path: str) -> Iterator[None]:
    """shunter's log goes to a file (writing it is part of what is measured); only the
    bench's own errors reach stderr, and nothing but JSON reaches stdout."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(logging.ERROR)
    root, bench = logging.getLogger(), logging.getLogger("shunter.bench")
    saved = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    bench.addHandler(stderr)
    try:
        yield
    finally:
        bench.removeHandler(stderr)
        root.handlers[:], level = saved
        root.setLevel(level)
        handler.close()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("expected a positive integer")
    return value
