"""The demo's logging: per-failure error logs counted instead of printed, warnings kept
short enough to read next to the progress display."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Notice:
    level: str
    text: str  # the first line of the first record of its kind


class LogDigest(logging.Handler):
    """Collects WARNING and above: delivery failures by caller, everything else by kind.

    A delivery failure is the settler's error record carrying a ``caller`` (its traceback
    reaches the dead-letter topic anyway); a *kind* is a record's message template, so
    a thousand rejections make one line with a count.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._mutex = threading.Lock()
        self.failures: Counter[str] = Counter()  # caller -> failure records
        self.first_failure: dict[str, str] = {}  # caller -> its first failure record, whole
        self.kinds: Counter[tuple[str, str]] = Counter()  # (logger, template) -> records
        self.first: dict[tuple[str, str], Notice] = {}
        self.latest: Notice | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a malformed log call must not break the demo
            text = str(record.msg)
        caller = getattr(record, "caller", None)
        with self._mutex:
            # a first failure is an ERROR with its traceback, a repeat a WARNING line
            if record.name == "shunter.settle" and record.levelno >= logging.WARNING and caller:
                # a logged repeat stands for those not logged since the last one
                self.failures[caller] += getattr(record, "failures", 1)
                self.first_failure.setdefault(caller, text)
                return
            kind = (record.name, str(record.msg))
            notice = Notice(record.levelname, text.splitlines()[0] if text else "")
            self.kinds[kind] += 1
            self.first.setdefault(kind, notice)
            self.latest = notice

    @property
    def notices(self) -> int:
        return sum(self.kinds.values())

    def digest(self) -> list[tuple[int, Notice]]:
        """(count, first notice) per kind, most frequent first."""
        with self._mutex:
            return [(n, self.first[kind]) for kind, n in self.kinds.most_common()]


@contextmanager
def captured() -> Iterator[LogDigest]:
    """Route every log record to a LogDigest (and nowhere else) for the duration."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    digest = LogDigest()
    root.handlers[:] = [digest]
    root.setLevel(logging.WARNING)
    try:
        yield digest
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
