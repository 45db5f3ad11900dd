"""The in-flight journal: what each partition had in handlers, recorded in Kafka.

Before a batch's deliveries start, one record per partition says which offsets may be
in a handler (``lo``..``hi``, a lease past the batch included: ``gate.LEASE``); the batch
waits for the broker's acknowledgement unless a record names it already. A clean
release (drained, committed) writes ``clean``. The journal is a compacted topic keyed by
``topic:partition``, so whichever instance is assigned the partition next — on this
machine or another — reads the last word about it.

On assignment, a partition whose last record is ``batch`` or ``single`` (``COUNTED``), by
another process, had an owner that died with deliveries in flight. Each offset of that
window gets one crash count, and the window is re-run *one offset at a time*, the
single offset recorded first (or in sandbox processes, ``suspects.py``): if the process
dies again, only that offset is blamed, and its innocent neighbours go through. An offset
whose count reaches ``crash_guard.quarantine_after`` is dead-lettered with reason
``crash`` and never run again. The counts travel in the records themselves: the new
owner journals them (``recovered``) before the partition's assignment completes, so one
death is counted once even if the new owner dies too before re-running the window.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..broker.compacted import read_table

log = logging.getLogger("shunter.crashguard")

TP = tuple[str, int]

# This process, as the journal names it. Host and pid alone are not enough: a container
# restarted in place has the same host name and runs shunter as pid 1 again, and a dead
# owner mistaken for this one would have its window counted no death (a crash loop).
OWNER = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass
class PartitionState:
    """What the journal knows of one partition's crash suspects."""

    runs: list[list[int]] = field(default_factory=list)  # [lo, hi, crashes] over a range
    single: dict[int, int] = field(default_factory=dict)  # offset -> crashes while run alone
    suspects_hi: int = -1  # the last suspect offset; -1 when there are none
    # Offsets quarantined during this assignment: their counts survive every prune until
    # the partition is assigned anew from a confirmed commit (recover prunes then). Were
    # one pruned before its commit landed, a death would make the next owner run it again.
    quarantined: set[int] = field(default_factory=set)

    def crashes(self, offset: int) -> int:
        n = self.single.get(offset, 0)
        for lo, hi, count in self.runs:
            if lo <= offset <= hi:
                n += count
        return n

    def prune(self, below: int) -> None:
        """Forget counts of offsets that are committed: they can never run again."""
        self.runs = [[max(lo, below), hi, n] for lo, hi, n in self.runs if hi >= below]
        self.single = {o: n for o, n in self.single.items() if o >= below or o in self.quarantined}

    def ends_at(self, end: int) -> None:
        """The partition ends at ``end``: no offset from there on existed when any owner
        died (a log only grows), so none of them ran, and none carries a count. (A batch
        record names offsets past its batch, a lease: see ``gate.LEASE``.)"""
        self.runs = [[lo, min(hi, end - 1), n] for lo, hi, n in self.runs if lo < end]
        self.single = {o: n for o, n in self.single.items() if o < end}
        self.suspects_hi = min(self.suspects_hi, end - 1)

    def quarantine(self, offset: int, crashes: int) -> None:
        """``offset`` goes to the dead-letter topic unrun: its count stays in every record."""
        self.prune(offset + 1)
        self.quarantined.add(offset)
        self.single[offset] = crashes

    def encode(self, mode: str, lo: int, hi: int, offset: int = -1, lease: int = -1) -> bytes:
        return orjson.dumps(
            {
                "v": 1,
                "mode": mode,
                "lo": lo,
                "hi": hi,
                "lease": max(lease, hi),
                "offset": offset,
                "suspects_hi": self.suspects_hi,
                "runs": self.runs,
                "single": {str(o): n for o, n in self.single.items()},
                "owner": OWNER,
                "ts": int(time.time() * 1000),
            }
        )


@dataclass(frozen=True)
class Entry:
    mode: str  # batch | single | sandbox | recovered | clean
    lo: int
    hi: int  # the last offset fetched when written: lo..hi may be in handlers
    offset: int
    suspects_hi: int
    runs: list[list[int]]
    single: dict[int, int]
    owner: str
    # Past ``hi``: offsets that may have run under this record without another (see
    # ``gate.LEASE``); equal to ``hi`` when there is no lease.
    lease: int = -1

    @classmethod
    def decode(cls, raw: bytes) -> Entry:
        data = orjson.loads(raw)
        return cls(
            mode=data["mode"],
            lo=int(data["lo"]),
            hi=int(data["hi"]),
            offset=int(data.get("offset", -1)),
            suspects_hi=int(data.get("suspects_hi", -1)),
            runs=[[int(a), int(b), int(n)] for a, b, n in data.get("runs", [])],
            single={int(o): int(n) for o, n in data.get("single", {}).items()},
            owner=str(data.get("owner", "")),
            lease=max(int(data.get("lease", -1)), int(data["hi"])),
        )


# The modes whose window gets one crash count when its owner died: it was in handlers.
# (clean: nothing was; sandbox: suspects ran elsewhere; recovered: counts already taken.)
COUNTED = frozenset({"batch", "single"})


def counts_a_death(entry: Entry) -> bool:
    """Whether the process that wrote ``entry`` died with its window in handlers: a
    ``batch`` or ``single`` record of another process."""
    return entry.mode in COUNTED and entry.owner != OWNER


def key_of(tp: TP) -> bytes:
    return f"{tp[0]}:{tp[1]}".encode()


def recover(entry: Entry | None, committed: int) -> PartitionState:
    """The suspects of a partition, given its last journal entry and committed offset.

    ``committed`` is the offset the group will resume from (-1 when none: then nothing
    before the entry's window can have been settled, so the window is taken as is).
    """
    state = PartitionState()
    if entry is None:
        return state
    state.runs = [list(r) for r in entry.runs]
    state.single = dict(entry.single)
    start = committed if committed >= 0 else entry.lo
    # This very process wrote it: the partition was lost (a broker outage longer than the
    # session) and came back, and nothing died. Its deliveries are not crash suspects.
    # Either way, suspects an owner had not finished re-running when it let the partition
    # go stay suspects, without a new count: nothing died since.
    # A "sandbox" record: its owner re-ran suspects in sandboxes, which a pill kills
    # instead of it (their deaths are in the counts already); its own death is not theirs.
    # A "recovered" record: its owner took the counts of the window before it (and wrote
    # them here) before running anything; its death is not that window's either.
    if not counts_a_death(entry):
        state.prune(start)
        state.suspects_hi = entry.suspects_hi if entry.suspects_hi >= start else -1
        return state
    if entry.mode == "single":
        # The previous owner died while this one offset ran alone: only it is blamed.
        state.single[entry.offset] = state.single.get(entry.offset, 0) + 1
        state.suspects_hi = max(entry.suspects_hi, entry.offset)
    else:
        lo = max(start, entry.lo)
        if lo <= entry.hi:
            state.runs.append([lo, entry.hi, 1])
        # The lease past ``hi`` is re-run as suspects too (a record there may have run
        # and killed the owner) but given no count: the owner had not even fetched most
        # of it, and a count for each, death after death, would quarantine innocents. A
        # pill there is counted once it dies re-run alone (in a sandbox, or ``single``).
        state.suspects_hi = max(entry.hi, entry.lease, entry.suspects_hi)
    state.prune(start)
    if state.suspects_hi < start:
        state.suspects_hi = -1
    return state


def read_latest(
    settings: dict[str, Any], topic: str, keys: set[bytes], timeout: float = 30.0
) -> dict[bytes, Entry]:
    """The last journal entry of each key.

    A record that is not a journal entry (anyone who may write to the topic could have
    written it) is ignored with an error, whatever its decoding raises: an exception
    from here would make the whole assignment's journal unreadable, and the partitions
    would be held for as long as the record stays the last of its key."""
    found: dict[bytes, Entry] = {}
    for key, value in read_table(settings, topic, keys, timeout).items():
        try:
            found[key] = Entry.decode(value)
        except Exception as exc:
            log.error(
                "the journal record of %s is unreadable (%s: %s); ignored, as if the "
                "partition had none",
                key.decode(errors="replace"),
                type(exc).__name__,
                exc,
            )
    return found
