"""Failure fingerprints: what is failing, at a glance.

A night of identical crashes is one line here, not ten thousand in the log. Failures are
grouped by (caller, error type, failing line), the failing line being the innermost frame
of the traceback in the caller's own code: not shunter's, not the standard library's, and
a third-party library's only when nothing else is left. Each group keeps a count, when it
was first and last seen, and one example record. A new group is logged once at ERROR;
repeats are only counted.

Cardinality is bounded: each caller keeps at most ``MAX_PER_CALLER`` groups, and the
failures beyond that are counted under ``other`` (what Prometheus sees as the
``fingerprint`` label, too).

``Fingerprints.observe`` is fed by the settler for every failed delivery;
``group_dead_letters`` groups dead-letter records read back from Kafka by the same key.
"""

from __future__ import annotations

import logging
import os
import re
import sysconfig
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from .._native import COMPILED_SOURCE
from ..outcome import DeadLettered, Failed

if TYPE_CHECKING:
    from ..message import Record
    from ..outcome import Outcome
    from ..settle.dlqread import DeadLetterRecord

log = logging.getLogger("shunter.fingerprints")

MAX_PER_CALLER = 20
OTHER = "other"

# a traceback's frame line, or faulthandler's (no comma before "in")
_FRAME = re.compile(r'^\s*File "(?P<path>[^"]+)", line (?P<line>\d+),? in (?P<func>.+?)\s*$')
_SHUNTER = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_STDLIB = tuple(
    {
        os.path.realpath(p) + os.sep
        for p in (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"])
    }
)
_THIRD_PARTY = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)


@dataclass(frozen=True, slots=True)
class Frame:
    path: str
    line: int
    func: str

    def __str__(self) -> str:
        return f"{_short(self.path)}:{self.line} in {self.func}"


def _short(path: str) -> str:
    """The last two parts of a path: enough to recognise a module, short for a label."""
    parts = path.replace("\\", "/").split("/")
    return "/".join(parts[-2:])


def _frames(traceback: str) -> list[Frame]:
    """The frames of a Python traceback, innermost last. A faulthandler dump (a crash
    pill's dying stack) lists the dying thread first, innermost first: its frames only,
    turned around."""
    dying = "most recent call first" in traceback
    if dying:
        traceback = traceback.split("most recent call first", 1)[1].split("\n\n", 1)[0]
    out = []
    for text in traceback.splitlines():
        match = _FRAME.match(text)
        if match:
            out.append(Frame(match["path"], int(match["line"]), match["func"]))
    return out[::-1] if dying else out


def _is_shunter(path: str) -> bool:
    if path.startswith(COMPILED_SOURCE):  # a compiled module's frame
        return True
    return path.startswith(_SHUNTER) and _THIRD_PARTY[0] not in path[len(_SHUNTER) :]


def _is_stdlib(path: str) -> bool:
    return (
        path.startswith("<")  # <frozen ...>, <string>
        or (any(path.startswith(p) for p in _STDLIB) and not any(t in path for t in _THIRD_PARTY))
    )


_HEADER = "Traceback (most recent call last):\n"
_UNINDENTED = re.compile(r"\n(?=[^ \n])")  # the end of a line before one at column 0


def failing_line(traceback: str) -> str:
    """The innermost frame of ``traceback`` in the caller's own code, as ``dir/file.py:N in
    func``; "" when the failure has no Python stack (a timeout, a rejected message).

    Read from the stack only: the exception's own lines after it (its message, which
    names the offset or the value and so differs on every failure) are left out, so the
    thousands of repeats of one failing line are looked up, not parsed each time, and a
    message that happens to look like a frame is not taken for one."""
    start = traceback.rfind(_HEADER)
    if start >= 0:
        # (from the header's own newline on: a pattern led by a literal is a fast scan)
        message = _UNINDENTED.search(traceback, start + len(_HEADER) - 1)
        if message is not None:
            traceback = traceback[: message.start() + 1]
    return _stack_line(traceback)


@lru_cache(maxsize=1024)
def _stack_line(traceback: str) -> str:
    frames = [f for f in _frames(traceback) if not _is_shunter(f.path)]
    if not frames:
        return ""
    own = [f for f in frames if not _is_stdlib(f.path)]
    mine = [f for f in own if not any(t in f.path for t in _THIRD_PARTY)]
    # Code installed as a package lives in site-packages too: fall back to it, then to
    # whatever is innermost.
    return str((mine or own or frames)[-1])


def short_type(error_type: str) -> str:
    return error_type.rsplit(".", 1)[-1] or "error"


def label(error_type: str, line: str) -> str:
    """The fingerprint as one readable string (the Prometheus label value)."""
    return f"{short_type(error_type)} at {line}" if line else short_type(error_type)


@dataclass(slots=True)
class Fingerprint:
    """One group of failures."""

    caller: str
    error_type: str
    line: str  # the failing line, "" when there was no Python stack
    count: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0
    example: dict[str, Any] = field(default_factory=dict)  # one record's coordinates

    @property
    def label(self) -> str:
        return OTHER if self.error_type == OTHER else label(self.error_type, self.line)

    def as_dict(self) -> dict[str, Any]:
        return {
            "caller": self.caller,
            "fingerprint": self.label,
            "error_type": self.error_type,
            "line": self.line,
            "count": self.count,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "example": self.example,
        }


Key = tuple[str, str, str]  # (caller, error type, failing line)


class Fingerprints:
    """Failures grouped by fingerprint, bounded per caller."""

    def __init__(self, max_per_caller: int = MAX_PER_CALLER, announce: bool = True) -> None:
        self._max = max_per_caller
        self._announce_new = announce
        self._groups: dict[Key, Fingerprint] = {}
        self._per_caller: dict[str, int] = {}

    def observe(self, caller: str, outcome: Outcome, record: Record) -> Fingerprint | None:
        """One failed delivery (the settler's call): its fingerprint, counted (a count of
        1: new), so that a caller logging every failure can log repeats more quietly.
        Deferrals that use up no attempt are not failures: ignored (None)."""
        if isinstance(outcome, Failed):
            if not outcome.counts:
                return None
            error = outcome.error
        elif isinstance(outcome, DeadLettered):
            error = outcome.reason
        else:
            return None
        example = {
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "error": error[:500],
        }
        return self.add(caller, outcome.error_type, outcome.traceback, example)

    def add(
        self,
        caller: str,
        error_type: str,
        traceback: str,
        example: dict[str, Any],
        when: float | None = None,
    ) -> Fingerprint:
        """Count one failure; a fingerprint not seen before is logged once at ERROR."""
        now = time.time() if when is None else when
        key = (caller, error_type, failing_line(traceback))
        group = self._groups.get(key)
        if group is None:
            if self._per_caller.get(caller, 0) >= self._max:
                key = (caller, OTHER, "")
                group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = Fingerprint(*key, first_seen=now, example=example)
                self._per_caller[caller] = self._per_caller.get(caller, 0) + 1
                if self._announce_new:
                    self._announce(group, traceback)
        group.count += 1
        group.last_seen = max(group.last_seen, now)
        return group

    def _announce(self, group: Fingerprint, traceback: str) -> None:
        ex = group.example
        where = f"{ex['topic']}[{ex['partition']}]@{ex['offset']}" if "topic" in ex else "unknown"
        if group.error_type == OTHER:
            log.error(
                "caller %s has more than %d failure fingerprints; further new ones are "
                "counted under %r",
                group.caller,
                self._max,
                OTHER,
                extra={"caller": group.caller},
            )
            return
        log.error(
            "new failure fingerprint for caller %s: %s (first on %s); repeats are counted "
            "in /stats and shunter_failure_fingerprint_total\n%s",
            group.caller or "(none)",
            group.label,
            where,
            traceback.rstrip(),
            extra={"caller": group.caller},
        )

    def rows(self) -> list[Fingerprint]:
        """Every group, the most frequent first."""
        return sorted(self._groups.values(), key=lambda g: (-g.count, g.caller, g.label))


def group_dead_letters(
    found: Iterable[DeadLetterRecord], max_per_caller: int = MAX_PER_CALLER
) -> list[Fingerprint]:
    """Dead-letter records grouped by fingerprint, from their failure headers (for
    ``shunter dlq list --group``): each group's example is its first record (with its
    dead-letter ``id``), first and last seen are dead-letter times in seconds. A record
    with no error type (a crash quarantine) is grouped by its stage; unreadable records
    are left out."""
    groups = Fingerprints(max_per_caller, announce=False)
    for dead in found:
        info = dead.info
        if info is None:
            continue
        example = {
            "id": str(dead.id),
            "topic": info.origin_topic,
            "partition": info.origin_partition,
            "offset": info.origin_offset,
            "error": info.error[:500],
        }
        when = dead.record.timestamp_ms / 1000
        group = groups.add(
            info.caller, info.error_type or info.stage, info.traceback, example, when
        )
        group.first_seen = min(group.first_seen, when)
    return groups.rows()
