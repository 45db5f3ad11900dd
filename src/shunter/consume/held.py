"""Held partitions: paused at the consumer, with the messages already taken from them.

A partition is *held* while its next message must not run yet: a retry record not yet
due, a record whose decoding waits for a schema registry, or (the crash guard's) a record
not yet named by the journal or behind crash suspects. It is paused, never rewound: the
messages of it already taken from the consumer (the one that triggered the hold and any
fetched before the pause landed) wait here in order, and librdkafka resumes fetching
after the last one it handed out. Rewinding with seek was tried and lost messages: on
Apache Kafka a resume can fetch from the application's position before a seek made
around it lands.

One object shared by the pipeline and the crash guard's gate, so that there is one
answer to "is this partition held, and why".
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

TP = tuple[str, int]

UNTIL_RELEASED = math.inf  # held until someone releases it, not until a time
NOT_DUE = "a retry record not yet due"  # the one hold that is a wait by design


class Pausing(Protocol):
    def pause_partition(self, tp: TP) -> None: ...

    def resume_partition(self, tp: TP) -> None: ...


class HeldPartitions:
    def __init__(self, reprocess: Callable[[list[Any]], None], count: Callable[[int], None]):
        self.source: Pausing | None = None  # set once the consumer exists
        self._reprocess = reprocess  # what a release does with the messages, in order
        self._count = count  # messages taken (+) or given back (-) by the pipeline
        self._messages: dict[TP, list[Any]] = {}
        # Read-only for others: topic -> how many of its partitions hold anything. The
        # pipeline looks a record up by its topic, which it has, rather than by its
        # partition, whose tuple it would build for every record: while a retry waits in
        # the fast tier, the source topics' records pass by at the cost of one lookup.
        self._topics: dict[str, int] = {}
        self.topics: Mapping[str, int] = self._topics
        self._why: dict[TP, str] = {}

    def __bool__(self) -> bool:
        return bool(self._messages)

    def __contains__(self, tp: object) -> bool:
        return tp in self._messages

    def messages(self, tp: TP) -> list[Any] | None:
        return self._messages.get(tp)

    def takes(self, tp: TP, kmsg: Any) -> bool:
        """Keep ``kmsg`` behind what ``tp`` holds (fetched before the pause landed)."""
        held = self._messages.get(tp)
        if held is None:
            return False
        held.append(kmsg)
        self._count(-1)
        return True

    def hold(self, tp: TP, kmsg: Any, until: float, why: str) -> None:
        """Hold ``tp`` starting with ``kmsg`` until the time ``until`` (inf: released).

        ``kmsg`` goes before anything ``tp`` holds already (a crash suspect of a retry
        partition, whose successors past the window wait there)."""
        held = self._messages.get(tp)
        self._messages[tp] = [kmsg, *(held or ())]
        if held is None:
            self._topics[tp[0]] = self._topics.get(tp[0], 0) + 1
        self._why[tp] = why
        self._count(-1)  # taken again when released
        if held is None and self.source is not None:
            self.source.pause_partition(tp)
        if until != UNTIL_RELEASED:
            delay = max(0.0, until - time.time())
            asyncio.get_running_loop().call_later(delay, self.release, tp)

    def put_back(self, tp: TP, rest: list[Any]) -> None:
        """Put ``rest`` right behind the message that holds ``tp``, in order."""
        self._messages[tp][1:1] = rest
        self._count(-len(rest))

    def release(self, tp: TP) -> None:
        """Resume ``tp`` and process what it held, in order (it may be held again)."""
        held = self._messages.pop(tp, None)
        self._why.pop(tp, None)
        if held is None:
            return
        self._untopic(tp)
        if self.source is not None:
            self.source.resume_partition(tp)
        self._reprocess(held)

    def forget(self, tps: set[TP]) -> None:
        """Drop what the partitions hold (they left: their next owner reads it)."""
        for tp in tps:
            held = self._messages.pop(tp, None)
            self._why.pop(tp, None)
            if held is not None:
                self._count(len(held))
                self._untopic(tp)

    def _untopic(self, tp: TP) -> None:
        left = self._topics[tp[0]] - 1
        if left:
            self._topics[tp[0]] = left
        else:
            del self._topics[tp[0]]

    def waiting(self) -> dict[TP, str]:
        """Held partitions whose wait must end (all but retries not yet due), and why."""
        return {tp: why for tp, why in self._why.items() if why != NOT_DUE}
