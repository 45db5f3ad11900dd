"""CPU seconds per thread of the bench's own process (and of the embedded broker), for a
measured span: where a side's time goes, beside how long it took.

A dispatcher in one process is as fast as its main thread, and on a 2-core machine it
shares the cores with its consumer thread, librdkafka's threads and the broker: the
process's CPU total cannot tell a slower main thread from busier neighbours. Python
threads are read from their own CPU clocks (``pthread_getcpuclockid``: to the
microsecond); librdkafka's threads and the broker process from ``/proc`` (clock ticks,
10 ms). Linux only: elsewhere every reading is empty.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# Python thread name → the group it is counted in; any other Python thread is "other".
_GROUPS = {"MainThread": "main", "shunter-consumer": "consumer", "shunter-producer": "producers"}


def snapshot(broker_pid: int | None = None) -> dict[str, float]:
    """CPU seconds so far per group: ``main`` (the event loop), ``consumer`` (shunter's
    consumer thread), ``producers`` (the producers' poll threads), ``librdkafka`` (its
    native threads), ``other`` (any other thread), ``broker`` (``broker_pid``, if given)."""
    out: dict[str, float] = {}
    python: set[int] = set()
    for thread in threading.enumerate():
        if thread.ident is None or thread.native_id is None:
            continue
        try:
            seconds = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        except (AttributeError, OSError):  # not Linux, or it ended meanwhile
            continue
        python.add(thread.native_id)
        group = _GROUPS.get(thread.name, "other")
        out[group] = out.get(group, 0.0) + seconds
    for tid, name, seconds in _tasks(os.getpid()):
        if tid not in python:
            group = "librdkafka" if name.startswith("rdk:") else "other"
            out[group] = out.get(group, 0.0) + seconds
    if broker_pid is not None:
        found = _stat(Path(f"/proc/{broker_pid}/stat"))
        if found is not None:
            out["broker"] = found[1]
    return out


def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds per group between two snapshots. A thread that ended meanwhile takes
    its time with it: its group may read less than it spent (never below 0)."""
    return {k: round(max(0.0, v - before.get(k, 0.0)), 4) for k, v in after.items()}


def _tasks(pid: int) -> list[tuple[int, str, float]]:
    """(thread id, name, CPU seconds) of every thread of ``pid``, from /proc."""
    base = Path(f"/proc/{pid}/task")
    try:
        tids = os.listdir(base)
    except OSError:
        return []
    out = []
    for tid in tids:
        found = _stat(base / tid / "stat")
        if found is not None:
            out.append((int(tid), *found))
    return out


def _stat(path: Path) -> tuple[str, float] | None:
    """(name, user + system CPU seconds) from a ``stat`` file of /proc."""
    try:
        text = path.read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return name, (int(fields[11]) + int(fields[12])) / _TICK
