"""The crash guard step's evidence: what the service's log says as it happens (``Seen``),
what the handlers receipted (``Ledger``), and the closing checks (``show``)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from rich.console import Console
from rich.text import Text

from .clients import DeadLetterRecord
from .progress import hanging
from .stream import NIGHT, Night
from .supervised import LogLine

CALLERS = ("anchor-task", "guard-effect")
CRASHING = "guard-effect"  # the caller whose handler kills the interpreter
HANDLERS_FILE = "shunter/demo/crash_handlers.py"
DUMP_FRAMES = 6  # of the crashing thread, innermost first

_DIED = re.compile(r"^worker (?P<exit>.+); restarting in (?P<delay>[\d.]+)s \(restart (?P<n>\d+)\)")
_DUMP = re.compile(
    r"^(?:the|a) worker's fatal-signal dump \((?P<path>[^)]*)\):\n(?P<dump>.*)", re.S
)
_RERUN = re.compile(
    r"^(?P<tp>\S+): its previous owner \((?P<owner>[^)]*)\) died with deliveries in flight; "
    r"re-running offsets (?P<lo>-?\d+)\.\.(?P<hi>\d+) as crash suspects"
)
_ASSIGNED = re.compile(rf"^assigned .*?(?P<tps>{re.escape(NIGHT)}\[\d+\])")
_QUARANTINED = re.compile(r"^quarantined (?P<where>\S+): (?P<reason>.*)", re.S)
_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')


@dataclass
class Dump:
    path: str
    text: str

    def crashing_thread(self) -> list[str]:
        """The fatal error line and the innermost frames of the thread that died."""
        lines = self.text.splitlines()
        head = [line for line in lines if line.startswith("Fatal Python error")][:1]
        start = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), -1)
        if start < 0:
            return head
        frames = []
        for line in lines[start + 1 :]:
            if not _FRAME.match(line):
                break
            frames.append(line.rstrip())
        return [*head, lines[start], *frames[:DUMP_FRAMES]]

    def handler_lines(self) -> list[str]:
        """The frames in the demo's crashing handlers: the line that killed the process."""
        return [line for line in self.crashing_thread() if HANDLERS_FILE in line]


@dataclass
class Seen:
    """What the service's log has said so far; ``take`` keeps one line and says how to
    show it, when it is one of the crash guard's moments."""

    joined: int = 0  # times a worker was assigned the stream's partition
    deaths: list[str] = field(default_factory=list)  # each death's exit ("killed by SIGSEGV")
    reruns: list[str] = field(default_factory=list)  # partitions whose suspects were re-run
    quarantined: list[str] = field(default_factory=list)  # topic[partition]@offset
    dumps: list[Dump] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # other ERROR lines, by logger
    _undumped_death: bool = field(default=False, repr=False)  # next dump: a later death

    def take(self, line: LogLine) -> tuple[str, str] | None:
        text = line.message
        if m := _DUMP.match(text):  # logged just before the death it belongs to
            self.dumps.append(Dump(m["path"], m["dump"]))
            self._undumped_death = False
            return None
        if m := _DIED.match(text):
            self.deaths.append(m["exit"])
            dumped = self.dumps and not self._undumped_death
            dump = f" (dump: {Path(self.dumps[-1].path).name})" if dumped else ""
            self._undumped_death = True  # until the next dump: it belongs to the next death
            return "bold red", (
                f"✗ worker {m['exit']}{dump}; the supervisor restarts it in {m['delay']}s "
                f"(restart {m['n']})"
            )
        if m := _ASSIGNED.match(text):
            self.joined += 1
            again = " again" if self.joined > 1 else ""
            return "", f"worker up{again}, in the group: {m['tps']} assigned"
        if m := _RERUN.match(text):
            self.reruns.append(m["tp"])
            window = f"{m['lo']}..{m['hi']}" if int(m["lo"]) >= 0 else f"up to {m['hi']}"
            return "yellow", (
                f"↻ {m['tp']}: its previous owner ({m['owner']}) died with deliveries in "
                f"flight; re-running offsets {window} in sandbox processes"
            )
        if m := _QUARANTINED.match(text):
            self.quarantined.append(m["where"])
            return "bold", f"⛔ quarantined {m['where']}: {m['reason']}"
        if "crash suspects done" in text:
            return "green", f"✓ {text}"
        if line.level in ("ERROR", "CRITICAL"):
            self.errors[line.logger] += 1
        return None


@dataclass(frozen=True, slots=True)
class Receipts:
    lines: list[tuple[str, int, int]]  # (caller, event id, offset), in the order written

    def pairs(self) -> set[tuple[str, int]]:
        return {(caller, event_id) for caller, event_id, _ in self.lines}

    def repeated(self) -> int:
        """Deliveries that ran more than once (re-run after a crash: at least once)."""
        return len(self.lines) - len(self.pairs())


@dataclass(frozen=True, slots=True)
class Ledger:
    """The file the handlers append ``caller,event_id,offset`` to, one line a delivery."""

    path: Path

    def read(self) -> Receipts:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return Receipts([])
        out = []
        for line in text.splitlines():
            caller, event_id, offset = line.split(",")
            out.append((caller, int(event_id), int(offset)))
        return Receipts(out)


def expected_pairs(night: Night) -> set[tuple[str, int]]:
    """Every (caller, event id) pair of the stream but the culprit's."""
    return {(caller, e) for e in night.buys if e != night.culprit for caller in CALLERS}


@dataclass
class Outcome:
    night: Night
    seen: Seen
    receipts: Receipts
    dead: list[DeadLetterRecord]
    exit_status: int
    quarantine_after: int


def show(console: Console, outcome: Outcome, complete: bool) -> bool:
    """Print the step's checks; False when one fails."""
    console.rule("[bold]the crash guard, checked")
    checks = [
        _restarts(console, outcome),
        _quarantined(console, outcome),
        _dump(console, outcome),
        _deliveries(console, outcome),
        _stopped(console, outcome),
    ]
    if not complete:
        console.print("[yellow]stopped before the end: these checks are partial[/yellow]")
    return all(checks)


def _mark(ok: bool) -> str:
    return "[green]✓[/green]" if ok else "[red]✗[/red]"


def _restarts(console: Console, outcome: Outcome) -> bool:
    deaths, limit = outcome.seen.deaths, outcome.quarantine_after
    kinds = ", ".join(f"{exit} x{n}" for exit, n in Counter(deaths).most_common())
    ok = 1 <= len(deaths) <= limit
    console.print(
        f"{_mark(ok)} {len(deaths)} restarts ({kinds or 'no death'}), no more than "
        f"crash_guard.quarantine_after ({limit}): the crash loop of that night ends here",
        highlight=False,
    )
    return ok


def _quarantined(console: Console, outcome: Outcome) -> bool:
    crash = [r for r in outcome.dead if r.info.stage == "crash"]
    if len(crash) != 1:
        console.print(
            f"{_mark(False)} {len(crash)} records with stage crash in the dead-letter "
            "topic (expected exactly one)"
        )
        return False
    record = crash[0]
    info = record.info
    event_id = _event_id(record.value)
    ok = event_id == outcome.night.culprit
    where = f"{info.origin_topic}[{info.origin_partition}]@{info.origin_offset}"
    what = (
        f"event {event_id}, the buy without its effect object"
        if ok
        else f"event {event_id}, not the culprit {outcome.night.culprit}"
    )
    console.print(
        f"{_mark(ok)} quarantined: {where} ({what}). Its dead-letter record says:",
        highlight=False,
    )
    for name, value in (
        ("stage", info.stage),
        ("signal", info.signal or "(none)"),
        ("error", info.error),
        ("origin", f"{where}, key {(info.origin_key or b'').decode(errors='replace')}"),
    ):
        console.print(hanging(f"    {name:<6}", value))
    return ok


def _dump(console: Console, outcome: Outcome) -> bool:
    dumps = outcome.seen.dumps
    if not dumps:
        console.print(f"{_mark(False)} no fatal-signal dump was logged")
        return False
    first = dumps[0]
    named = first.handler_lines()
    console.print(
        f"{_mark(bool(named))} no traceback, but faulthandler wrote the dying thread's stack "
        f"from C ({len(dumps)} dumps; the supervisor logged each). The first one:",
        highlight=False,
    )
    console.print(f"  {first.path}", highlight=False, soft_wrap=True)
    for line in first.crashing_thread():
        text = Text(f"  {line}")
        if HANDLERS_FILE in line:
            text.stylize("bold yellow")
        console.print(text, highlight=False, soft_wrap=True)
    return bool(named)


def _deliveries(console: Console, outcome: Outcome) -> bool:
    night, receipts = outcome.night, outcome.receipts
    expected = expected_pairs(night)
    delivered = receipts.pairs()
    got = len(expected & delivered)
    ok = got == len(expected) and (CRASHING, night.culprit) not in delivered
    per_caller = ", ".join(
        f"{caller} {sum(1 for c, _ in expected & delivered if c == caller)}" for caller in CALLERS
    )
    console.print(
        f"{_mark(got == len(expected))} every other (message, subscriber) pair delivered: "
        f"{got} of {len(expected)} ({per_caller}); {receipts.repeated()} extra runs: "
        "deliveries in flight at a death run again (at least once)",
        highlight=False,
    )
    before = (CALLERS[0], night.culprit) in delivered
    console.print(
        f"{_mark((CRASHING, night.culprit) not in delivered)} {CRASHING} never completed "
        f"event {night.culprit}; {CALLERS[0]} "
        + ("had handled it before the first crash" if before else "never ran it")
        + ": the message waits in the dead-letter topic, for `shunter dlq replay` once the "
        "handler is fixed",
        highlight=False,
    )
    return ok


def _stopped(console: Console, outcome: Outcome) -> bool:
    ok = outcome.exit_status == 0
    errors = sum(outcome.seen.errors.values())
    console.print(
        f"{_mark(ok)} SIGTERM: the worker drained, committed and exited; "
        f"`shunter run` exit status {outcome.exit_status}"
        + (f" ({errors} other error lines in its log)" if errors else ""),
        highlight=False,
    )
    return ok


def _event_id(value: bytes | None) -> int | None:
    try:
        return int(orjson.loads(value or b"null")["event_id"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
