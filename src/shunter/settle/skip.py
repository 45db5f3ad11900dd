"""The operator's one-record exit: ``shunter skip``.

On the night shunter was born from, the only way out of a stuck partition was to commit
before processing, which threw everything away. A skip moves exactly one record (or one
caller's delivery of it) to the dead-letter topic with reason ``skipped by operator``, and
its partition moves on. Whatever of the record waits on this instance is taken away:

- a queued delivery leaves its queue; a running one is detached (its handler runs on,
  its outcome is ignored, its lane moves on);
- a write of it to a retry tier that the broker keeps refusing is given up;
- a record not read yet (or on a partition not assigned here yet) is remembered, and
  dead-lettered unrun when it is read; one the group has committed past (settled before
  it could be read here) is reported as such and forgotten.

Each taken delivery is settled by its dead-letter record: the offset is released only
when the broker has that record, like any other settlement.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import orjson

from ..commit import OffsetTracker, PartitionTracker
from ..crashguard.journal import OWNER
from ..deliver import SubscriberRuntime
from ..message import Message
from .settler import Settler

log = logging.getLogger("shunter.skip")

SKIPPED = "skipped by operator"
COMMITTED_PAST = "the group committed past it before it was read here; nothing to skip"
TP = tuple[str, int]


def _where(tp: TP, offset: int, caller: str) -> str:
    return f"{tp[0]}[{tp[1]}]@{offset}" + (f" for caller {caller}" if caller else "")


class Skipper:
    def __init__(
        self,
        tracker: OffsetTracker,
        runtimes: Mapping[str, SubscriberRuntime],
        settler: Settler,
        committed: Mapping[TP, int],
    ) -> None:
        self._tracker = tracker
        # The group's committed offset of each partition assigned here, as of assignment
        # (the pipeline's ``started_at``): no record below it is read here again.
        self._committed = committed
        self._runtimes = runtimes
        self._settler = settler
        # Skips of records not read yet: tp -> offset -> caller ("" for every caller).
        self.later: dict[TP, dict[int, str]] = {}
        # Told what a skip did on an owned partition: (request, what was done).
        self.applied: Callable[[SkipRequest, str], None] | None = None

    def skip(self, tp: TP, offset: int, caller: str = "") -> str:
        """Skip ``tp@offset`` (for ``caller`` only, if given); say what was done."""
        where = _where(tp, offset, caller)
        if caller and caller not in self._runtimes:
            return f"{where}: unknown caller {caller!r}"
        ptrack = self._tracker.partitions.get(tp)
        if ptrack is not None and offset < self._committed.get(tp, -1):
            said = f"{where}: {COMMITTED_PAST}"
            self.report(tp, offset, caller, said)
            return said
        if ptrack is None or offset >= ptrack.high:
            self.later.setdefault(tp, {})[offset] = caller
            return f"{where}: not read here yet; it is dead-lettered unrun when it is"
        said = self._take(ptrack, where, offset, caller)
        self.report(tp, offset, caller, said)
        return said

    def _take(self, ptrack: PartitionTracker, where: str, offset: int, caller: str) -> str:
        if offset not in ptrack.pending:
            return f"{where}: already settled; nothing to skip"

        def of_it(msg: Message) -> bool:
            return msg._record.ptrack is ptrack and msg._record.seq == offset

        taken = [
            msg
            for runtime in self._runtimes.values()
            if not caller or runtime.caller == caller
            for msg in runtime.withdraw(of_it)
        ]
        failing = self._settler.abandon(ptrack.tp, offset, caller)
        for msg in taken:
            self.dead_letter(msg)
        if not taken and not failing:
            return (
                f"{where}: nothing of it waits in a queue, a handler or a failing write "
                "here; a write of it is in flight and settles by itself"
            )
        log.warning(
            "%s skipped by an operator: %d deliveries dead-lettered%s",
            where,
            len(taken),
            ", a failing write given up" if failing else "",
            extra={"topic": ptrack.tp[0], "partition": ptrack.tp[1], "offset": offset},
        )
        return f"{where}: skipped ({len(taken)} deliveries dead-lettered)" + (
            ", its failing write given up" if failing else ""
        )

    def report(self, tp: TP, offset: int, caller: str, said: str) -> None:
        """Tell whoever asked (through the control topic) what a skip did."""
        if self.applied is not None:
            self.applied(SkipRequest(tp[0], tp[1], offset, caller), said)

    def assigned(self, tp: TP) -> None:
        """``tp`` is assigned here: a skip waiting for one of its records below the
        group's committed offset waits for nothing (no one reads that record again): it
        is reported as such and forgotten, so that it holds nothing and every record of
        the group takes the common path again (``Pipeline.process``)."""
        waiting = self.later.get(tp)
        committed = self._committed.get(tp, -1)
        if not waiting or committed < 0:
            return
        for offset in [o for o in waiting if o < committed]:
            caller = waiting.pop(offset)
            self.report(tp, offset, caller, f"{_where(tp, offset, caller)}: {COMMITTED_PAST}")
        if not waiting:
            del self.later[tp]

    def forget(self, tp: TP, offset: int, caller: str) -> None:
        """A skip request withdrawn (its partition's owner applied it and removed it from
        the control topic): no longer waited for here."""
        waiting = self.later.get(tp)
        if waiting is None or waiting.get(offset) != caller:
            return
        del waiting[offset]
        if not waiting:
            del self.later[tp]

    def due(self, tp: TP, offset: int) -> str | None:
        """A skip waiting for this record: the caller ("" for all), or None."""
        waiting = self.later.get(tp)
        if not waiting:
            return None
        caller = waiting.pop(offset, None)
        if not waiting:
            del self.later[tp]
        return caller

    def dead_letter(self, msg: Message) -> None:
        """Settle one delivery as skipped: to the dead-letter topic for its caller."""
        self._settler.unrun(
            msg._record,
            "deliver",
            "Skipped",
            SKIPPED,
            caller=msg.caller,
            category=msg.category,
            attempt=msg.attempt,
        )


# -- the skip as a control record --------------------------------------------------------
#
# ``shunter skip`` and the admin API write ``skip/<topic>/<partition>/<offset>[/<caller>]``
# to the group's control topic; every instance follows it live (observe/control.py) and
# the one that owns the partition applies it, now or when it reads the record, and writes
# what it did under ``skipped/...`` (same rest of the key); once the group's commit has
# passed the record, it withdraws the request with a tombstone (service.py): a request
# stays only while a record may still need it, so no start re-applies an old one and
# every instance stops waiting for it (a waiting skip sends every record down
# ``Pipeline._one``, the slower path). One found committed past at assignment is
# withdrawn the same way. Topic and caller names never contain "/", so the
# key parses back unambiguously.

REQUEST = "skip/"
RESULT = "skipped/"


@dataclass(frozen=True, slots=True)
class SkipRequest:
    topic: str
    partition: int
    offset: int
    caller: str = ""  # "" for every caller

    def __post_init__(self) -> None:
        for name in ("topic", "caller"):
            value = getattr(self, name)
            if "/" in value or (name == "topic" and not value):
                raise ValueError(f"not a {name} name: {value!r}")
        if self.partition < 0 or self.offset < 0:
            raise ValueError("partition and offset are numbers from 0")

    @property
    def key(self) -> str:
        return REQUEST + self._rest

    @property
    def result_key(self) -> str:
        return RESULT + self._rest

    @property
    def _rest(self) -> str:
        rest = f"{self.topic}/{self.partition}/{self.offset}"
        return f"{rest}/{self.caller}" if self.caller else rest

    @classmethod
    def parse(cls, key: str) -> SkipRequest | None:
        """The request a ``skip/`` or ``skipped/`` key names; None for anything else."""
        _, _, rest = key.partition("/")
        parts = rest.split("/")
        if len(parts) not in (3, 4) or not parts[1].isdigit() or not parts[2].isdigit():
            return None
        try:
            return cls(parts[0], int(parts[1]), int(parts[2]), parts[3] if len(parts) > 3 else "")
        except ValueError:
            return None


def request_value(by: str) -> bytes:
    return orjson.dumps({"requested_ms": int(time.time() * 1000), "by": by})


def result_value(said: str, requested_ms: int) -> bytes:
    return orjson.dumps(
        {
            "result": said,
            "instance": OWNER,
            "requested_ms": requested_ms,
            "ms": int(time.time() * 1000),
        }
    )
