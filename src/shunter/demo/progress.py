"""What the demo shows while the stream flows: a live panel on a terminal, a line every
few seconds otherwise (CI logs, pipes)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import TracebackType

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ..cli.output import command_lines
from .logdigest import Notice

__all__ = ["Display", "Snapshot", "command_lines", "hanging"]

PLAIN_EVERY = 2.0  # seconds between progress lines when not on a terminal


@dataclass
class Snapshot:
    """The numbers of one moment, gathered on the dispatcher's event loop."""

    elapsed: float
    phase: str
    produced: int
    total: int
    consumed: dict[str, int]  # source topic -> messages consumed
    rejected: int
    by_caller: dict[str, dict[str, int]]  # caller -> outcome -> deliveries
    categories: dict[str, str]  # caller -> category
    writes: dict[str, int] = field(default_factory=dict)  # tier -> records written
    notices: int = 0
    latest: Notice | None = None

    def totals(self) -> tuple[int, int, int]:
        """(delivered, retried, dead-lettered) over all callers."""
        rows = self.by_caller.values()
        return (
            sum(r.get("ok", 0) for r in rows),
            sum(r.get("fast", 0) + r.get("slow", 0) for r in rows),
            sum(r.get("dlq", 0) for r in rows),
        )


class Display:
    def __init__(self, console: Console) -> None:
        self._console = console
        self._live: Live | None = None
        self._next_line = 0.0
        if console.is_terminal:
            self._live = Live(console=console, auto_refresh=False, transient=False)

    def __enter__(self) -> Display:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.stop()

    def show(self, snap: Snapshot, final: bool = False) -> None:
        if self._live is not None:
            self._live.update(_panel(snap), refresh=True)
            return
        now = time.monotonic()
        if final or now >= self._next_line:
            self._next_line = now + PLAIN_EVERY
            self._console.print(_line(snap), highlight=False)


def _line(snap: Snapshot) -> str:
    """Three short lines (an 80-column terminal, or a log file, reads them whole)."""
    delivered, retried, dead = snap.totals()
    return (
        f"{snap.elapsed:5.1f}s {snap.phase}\n"
        f"       produced {snap.produced}/{snap.total} · consumed "
        f"{sum(snap.consumed.values())} · rejected {snap.rejected}\n"
        f"       delivered {delivered} · retried {retried} · dead-lettered {dead} · "
        f"warnings {snap.notices}"
    )


def hanging(head: str, text: str, style: str = "") -> Table:
    """``head`` then ``text`` folded under itself: ``12.3s worker killed ...`` stays
    readable at 80 columns, the time column clear of the wrapped text."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row(Text(head, style=style), Text(text, style=style))
    return grid


def _panel(snap: Snapshot) -> RenderableType:
    head = Text.assemble(
        ("live revenue stream", "bold"), f" · {snap.elapsed:.1f}s · ", (snap.phase, "cyan")
    )
    produced = Table.grid(padding=(0, 1))
    produced.add_row(
        "produced",
        ProgressBar(total=snap.total, completed=snap.produced, width=30),
        f"{snap.produced:,}/{snap.total:,}",
    )
    consumed = " · ".join(f"{t} {n:,}" for t, n in snap.consumed.items())
    callers = Table(box=None, padding=(0, 2), show_edge=False)
    for column in ("caller", "category", "delivered", "retried", "dead-lettered"):
        callers.add_column(column, justify="left" if column in ("caller", "category") else "right")
    for caller, row in snap.by_caller.items():
        retried = row.get("fast", 0) + row.get("slow", 0)
        callers.add_row(
            caller,
            snap.categories.get(caller, ""),
            f"{row.get('ok', 0):,}",
            f"{retried:,}",
            Text(f"{row.get('dlq', 0):,}", "red" if row.get("dlq") else ""),
        )
    writes = snap.writes
    tiers = (
        f"records written: fast tier {writes.get('fast', 0):,} · slow tier "
        f"{writes.get('slow', 0):,} · dead-letter {writes.get('dlq', 0):,}"
    )
    parts: list[RenderableType] = [
        head,
        produced,
        Text(f"consumed {consumed}"),
        Text(f"rejected at the border (decode, validate): {snap.rejected:,}"),
        callers,
        Text(tiers, "dim"),
    ]
    if snap.latest is not None:
        parts.append(
            Text(
                f"⚠ {snap.notices:,} warnings · latest: {snap.latest.text}",
                "yellow",
                no_wrap=True,
                overflow="ellipsis",
            )
        )
    return Group(*parts)
