"""The tour's second step: the night of shunter's story, replayed and survived.

A guard purchase without its nested ``effect`` object reaches a handler that passes it
to a C extension, which dereferences it: the interpreter dies, with no exception to
catch. The demo runs the real ``shunter run -c`` (supervisor and worker in processes of
their own, so the deaths are real) on a small stream of guard purchases holding one such
message, and shows from its log the deaths, the restarts and the quarantine. Then it
checks from outside: the dead-letter record, the fatal-signal dump naming the handler's
line, every other (message, subscriber) pair delivered, and a clean stop on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import yaml
from rich.console import Console
from rich.status import Status

from ..broker.admin import ensure_topics
from ..broker.embedded import CONSUMER_SETTINGS
from . import crashreport, stream
from .clients import StreamProducer, admin_settings, read_dead_letter_records
from .crash_handlers import LEDGER_ENV
from .crashreport import Ledger, Outcome, Seen
from .progress import command_lines, hanging
from .supervised import Supervised
from .tour import StepResult, Tour

GROUP = "shunter-demo-night"
FILE_NAME = "shunter-night.yaml"
EVENTS, RATE = 300, 100  # a short stream: the crash loop, not the volume, is the point
QUARANTINE_AFTER = 3
# Every restart joins the group again, and the embedded broker first lets the dead
# member's session expire: a short session makes that ~1 s instead of ~11 s.
QUICK_REJOIN = {"session.timeout.ms": 1000, "heartbeat.interval.ms": 250}
TICK = 0.25
INTRO = (
    "The night shunter comes from: a guard purchase arrives without its nested effect "
    "object, and guard-effect hands it to a C extension that dereferences it. The "
    "interpreter dies with no exception and no traceback. Here the real `shunter run` "
    "(a supervisor and its worker, each a process) consumes a stream of guard purchases "
    "holding one such message."
)

_HANDLERS = "shunter.demo.crash_handlers"
SUBSCRIBERS = [
    {"caller": "anchor-task", "category": "guard", "handler": f"{_HANDLERS}:on_anchor_task"},
    {"caller": "guard-effect", "category": "guard", "handler": f"{_HANDLERS}:on_guard_effect"},
]

Ending = Literal["done", "timeout", "interrupted", "exited"]


def config_data(bootstrap: str, crash_dir: Path) -> dict[str, object]:
    return {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": GROUP,
            "consumer": {**CONSUMER_SETTINGS, **QUICK_REJOIN},
            "commit_interval": "200ms",
        },
        "topics": {stream.NIGHT: {"format": "json"}},
        "categories": {"guard": {"topics": [stream.NIGHT], "where": "value.type == 'buy'"}},
        "subscribers": SUBSCRIBERS,
        "retry": {"partitions": 1},
        "crash_guard": {"quarantine_after": QUARANTINE_AFTER, "crash_dir": str(crash_dir)},
        "admin": {"listen": None},
        "log": {"format": "json"},
    }


async def run(tour: Tour) -> StepResult:
    console, bootstrap = tour.console, tour.broker.bootstrap
    night = stream.night(EVENTS, tour.options.seed, int(time.time() * 1000), RATE)
    await asyncio.to_thread(ensure_topics, admin_settings(bootstrap), {stream.NIGHT: 1})
    path = tour.workdir / FILE_NAME
    header = "# Written by `shunter demo` for its crash guard step.\n"
    data = config_data(bootstrap, tour.workdir / "crashes")
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))
    ledger = Ledger(tour.workdir / "night-ledger.csv")
    ledger.path.unlink(missing_ok=True)
    _introduce(console, night, path)
    service = Supervised(path, tour.workdir / "shunter-night.log", {LEDGER_ENV: str(ledger.path)})
    producer = StreamProducer(bootstrap, night.events, RATE)
    step_started = time.monotonic()
    seen = Seen()
    ending, status = await _serve(service, producer, ledger, night, seen, tour)
    if ending == "interrupted":
        console.print(f"interrupted; `shunter run` stopped with exit status {status}")
        return StepResult.INTERRUPTED
    dead = await asyncio.to_thread(read_dead_letter_records, bootstrap, f"{GROUP}.dlq", 1)
    outcome = Outcome(night, seen, ledger.read(), dead, status, QUARANTINE_AFTER)
    ok = crashreport.show(console, outcome, ending == "done")
    console.print(
        "Its dead-letter topic (while the demo's broker is up: see --keep-broker):",
        highlight=False,
    )
    console.print(
        "  " + command_lines(["shunter", "dlq", "list", "-c", str(path)], console.width - 2),
        highlight=False,
        soft_wrap=True,
    )
    console.print("The service's log:", highlight=False)
    console.print(f"  {service.log_path}", highlight=False, soft_wrap=True)
    console.print(
        f"{time.monotonic() - tour.started:.1f}s: the crash guard step took "
        f"{time.monotonic() - step_started:.1f}s",
        highlight=False,
    )
    return StepResult.AS_PLANNED if ok and ending == "done" else StepResult.OFF_PLAN


def _introduce(console: Console, night: stream.Night, path: Path) -> None:
    console.rule("[bold]2. the night, replayed: a message that kills the process")
    console.print(INTRO, highlight=False)
    console.print(
        f"The stream: {len(night.events)} guard purchases on {stream.NIGHT} (one partition), "
        f"{len(night.buys)} of them buys, delivered to anchor-task and guard-effect; event "
        f"{night.culprit} is the buy without its effect object. The configuration "
        f"(crash_guard.quarantine_after: {QUARANTINE_AFTER}):",
        highlight=False,
    )
    console.print(f"  {path}\n", highlight=False, soft_wrap=True)  # a path is never folded


async def _serve(
    service: Supervised,
    producer: StreamProducer,
    ledger: Ledger,
    night: stream.Night,
    seen: Seen,
    tour: Tour,
) -> tuple[Ending, int]:
    """Run the service until the quarantine is done and every other pair delivered (or
    time is up, or Ctrl-C), then stop it with SIGTERM; the ending and its exit status."""
    console = tour.console
    expected = crashreport.expected_pairs(night)
    await service.start()
    reading = asyncio.create_task(_follow(service, seen, console, tour.started))
    producing: asyncio.Task[None] | None = None
    deadline = time.monotonic() + tour.options.timeout
    ending: Ending = "timeout"
    try:
        with _interrupts() as interrupted, console.status("starting `shunter run`") as status:
            while time.monotonic() < deadline:
                if interrupted.is_set():
                    ending = "interrupted"
                    break
                if reading.done():
                    ending = "exited"
                    break
                if producing is None and seen.joined:  # a live stream, as on the night
                    producing = asyncio.create_task(asyncio.to_thread(producer.run))
                delivered = ledger.read().pairs()
                if seen.quarantined and producer.finished.is_set() and expected <= delivered:
                    ending = "done"
                    break
                _progress(status, seen, len(expected & delivered), len(expected))
                await asyncio.sleep(TICK)
    finally:
        producer.stop()
        with console.status("stopping `shunter run` with SIGTERM: drain, commit, exit"):
            exit_status = await service.stop()
            if producing is not None:
                await producing
            await reading
    if ending == "exited":
        console.print(f"[red]`shunter run` exited by itself (status {exit_status})[/red]")
    elif ending == "timeout":
        console.print("[yellow]gave up waiting for the quarantine (see --timeout)[/yellow]")
    return ending, exit_status


async def _follow(service: Supervised, seen: Seen, console: Console, started: float) -> None:
    async for line in service.lines():
        shown = seen.take(line)
        if shown is not None:
            style, text = shown
            console.print(hanging(f"{time.monotonic() - started:5.1f}s", text, style))


def _progress(status: Status, seen: Seen, delivered: int, expected: int) -> None:
    status.update(
        f"delivered {delivered}/{expected} (message, subscriber) pairs · "
        f"worker deaths {len(seen.deaths)} · quarantined {len(seen.quarantined)}"
    )


@contextlib.contextmanager
def _interrupts() -> Iterator[asyncio.Event]:
    """Ctrl-C or SIGTERM sets the event (the service is stopped in order, not killed)."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, event.set)
    try:
        yield event
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
