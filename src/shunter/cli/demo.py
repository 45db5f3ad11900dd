"""``shunter demo``: a zero-configuration tour on the embedded broker."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..demo import Options
from ..demo import run as run_tour

_DEFAULTS = Options()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--events",
        type=int,
        default=_DEFAULTS.events,
        help=f"events in the stream (default {_DEFAULTS.events})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=_DEFAULTS.seed,
        help="seed of the stream: the same seed gives the same events",
    )
    parser.add_argument(
        "--rate",
        type=int,
        default=_DEFAULTS.rate,
        help=f"events per second (default {_DEFAULTS.rate}; 0: as fast as possible)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the demo writes its files (default: a new shunter-demo-* directory "
        "in the temporary directory, removed at the end unless --keep); a directory "
        "given here is never removed",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the demo's files (configurations, log, crash dumps) after it ends",
    )
    parser.add_argument(
        "--keep-broker",
        action="store_true",
        help="keep the embedded broker running after the summary, until Ctrl-C "
        "(so the printed replay command can reach it)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=_DEFAULTS.timeout,
        help="seconds each step waits for everything to settle before giving up",
    )


def run(args: argparse.Namespace) -> int:
    if args.events < 1 or args.rate < 0 or args.timeout <= 0:
        raise SystemExit("shunter demo: --events must be ≥ 1, --rate ≥ 0, --timeout > 0")
    return run_tour(
        Options(
            events=args.events,
            seed=args.seed,
            rate=args.rate,
            workdir=args.workdir,
            keep_broker=args.keep_broker,
            keep=args.keep,
            timeout=args.timeout,
        )
    )
