"""The demo as a sequence of steps sharing one embedded broker and one console.

Each step is an async function ``step(tour) -> StepResult`` run on an event loop of its
own: the live-revenue stream (``revenue``), then the crash guard's night (``crash``).

Every file the demo writes (configurations, schemas, the night's log, crash dumps) goes
under one directory it names on its first line: a new ``shunter-demo-*`` directory in
the system's temporary directory, removed at the end unless ``--keep`` (or
``--keep-broker``, whose printed commands need the files). A directory given with
``--workdir`` is the user's and is never removed.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import shutil
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from ..broker.embedded import EmbeddedBroker


@dataclass(frozen=True, slots=True)
class Options:
    """The command line's choices (``shunter demo --help``)."""

    events: int = 30_000
    seed: int = 7
    rate: int = 5_000  # events per second; 0: as fast as the producer can
    workdir: Path | None = None  # where the files go; None: a new temporary directory
    keep_broker: bool = False  # keep the broker up after the tour, until Ctrl-C
    keep: bool = False  # keep the demo's own temporary directory
    timeout: float = 120.0  # per step: give up waiting for everything to settle


@dataclass(frozen=True, slots=True)
class Tour:
    """What every step shares."""

    options: Options
    console: Console
    broker: EmbeddedBroker
    workdir: Path
    started: float  # time.monotonic() at the start of the tour


class StepResult(enum.Enum):
    AS_PLANNED = "as planned"  # every number matched what the step set out to show
    OFF_PLAN = "off plan"  # a number differed, or it gave up waiting
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM: the remaining steps are skipped


Step = Callable[[Tour], Coroutine[Any, Any, StepResult]]


def steps() -> list[Step]:
    from . import crash, revenue

    return [revenue.run, crash.run]


def run(options: Options, console: Console | None = None) -> int:
    """Run every step on a fresh embedded broker; the exit status: 0 when each came out
    as planned, 130 when interrupted, else 1."""
    console = console or Console()
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="shunter-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    owned = options.workdir is None and not (options.keep or options.keep_broker)
    started = time.monotonic()
    try:
        with console.status("starting the embedded broker (Tansu, memory only)"):
            broker = EmbeddedBroker().start()
    except BaseException:
        _clean(console, workdir, owned, quiet=True)
        raise
    results: list[StepResult] = []
    try:
        console.print(
            f"[bold]shunter demo[/bold]: embedded broker on {broker.bootstrap}\nits files"
            + (", removed at the end (--keep keeps them):" if owned else ":"),
            highlight=False,
        )
        console.print(f"  {workdir}", highlight=False, soft_wrap=True)  # never folded
        tour = Tour(options, console, broker, workdir, started)
        for step in steps():
            results.append(asyncio.run(step(tour)))
            if results[-1] is StepResult.INTERRUPTED:
                return 130
        if options.keep_broker:
            _wait_for_ctrl_c(console, broker)
    finally:
        gc.collect()  # a Kafka client not yet collected keeps a connection the broker waits for
        broker.stop()
        _clean(console, workdir, owned)
    return 0 if all(r is StepResult.AS_PLANNED for r in results) else 1


def _clean(console: Console, workdir: Path, owned: bool, quiet: bool = False) -> None:
    """Remove the demo's own directory; say where the files are when they stay."""
    if owned:
        shutil.rmtree(workdir, ignore_errors=True)
        if not quiet:
            console.print(f"removed {workdir}", style="dim", highlight=False, soft_wrap=True)
    elif not quiet:
        console.print(
            f"the demo's files stay in {workdir}", style="dim", highlight=False, soft_wrap=True
        )


def _wait_for_ctrl_c(console: Console, broker: EmbeddedBroker) -> None:
    console.print(f"the embedded broker stays up on {broker.bootstrap}; press Ctrl-C to stop it")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("broker stopped")
