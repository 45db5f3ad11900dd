"""``shunter bench``: scenarios side by side with a raw confluent-kafka loop, as JSON lines.

Each run of each scenario prints one JSON object on stdout; with ``--runs K`` (K > 1) a
last line gives the median of every figure. Progress goes to stderr, shunter's own log to
``--log`` (or a temporary file).

Unless ``--bootstrap`` is given, every run of every scenario gets an embedded broker of its
own, started for it and stopped after it (its datasets are produced again): what one run
leaves in the broker (millions of records, dozens of groups and their retry topics) must
not slow the next, or a scenario's figure would depend on its place in the order. On a
broker given with ``--bootstrap`` all runs share it, and the bench deletes the topics it
created.
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
from typing import TYPE_CHECKING, Any

import orjson

from ..bench.runner import BY_NAME, SCENARIOS, run_scenario, summarize

if TYPE_CHECKING:
    from ..bench.context import BenchContext


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
        shared = None  # the context of a --bootstrap broker: its datasets serve every run
        if args.bootstrap:
            _note(f"broker {args.bootstrap}")
            shared = BenchContext(args.bootstrap, Path(workdir), args.messages, say=_note)
        try:
            for run in range(1, args.runs + 1):
                for scenario in chosen:
                    _note(f"run {run}/{args.runs}: {scenario.name}")
                    with _context(shared, Path(workdir), args.messages) as ctx:
                        ctx.run = run
                        result = run_scenario(scenario, ctx)
                    results.append(result)
                    _emit(result)
        finally:
            if shared is not None:  # a broker that outlives the bench: leave it clean
                delete_topics(shared.bootstrap, shared.created)
        if args.runs > 1:
            _emit(summarize(results))
    return 1 if any("error" in r for r in results) else 0


@contextlib.contextmanager
def _context(
    shared: BenchContext | None, workdir: Path, messages: int | None
) -> Iterator[BenchContext]:
    """The context of one scenario run: ``shared`` if given, else one on a fresh embedded
    broker, stopped after the run."""
    from ..bench.context import BenchContext
    from ..broker.embedded import EmbeddedBroker

    if shared is not None:
        yield shared
        return
    broker = EmbeddedBroker().start()
    _note(f"embedded broker {broker.bootstrap}, for this run")
    try:
        yield BenchContext(
            broker.bootstrap, workdir, messages, embedded=True, broker_pid=broker.pid, say=_note
        )
    finally:
        gc.collect()  # clients of finished runs go first, not noisily after the broker
        broker.stop()


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
