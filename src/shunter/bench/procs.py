"""``shunter run`` as a child process for the scenarios that need real processes
(``workers``, ``memory``, ``latency``): its configuration and handler module written to
the bench's work directory, the committed offsets it reached, the RSS of its process tree,
and what its handlers counted themselves (each process writes a file when it exits)."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import yaml
from confluent_kafka import Consumer, TopicPartition

from .context import BenchContext, Dataset

# Imported by every worker process: its handlers count their own calls and stamp the wall
# clock of the first and the last (and every 3,000 calls: ``marks``, (time, calls) pairs);
# at exit each process writes them to ``<dir>/calls-<pid>.json``. ``SLOW_S`` makes
# ``slow`` wait that long per delivery; ``latency`` keeps the produce→handler delay of
# every delivery whose value carries ``ts``.
HANDLERS = """
import asyncio, atexit, os, time
import orjson

_DIR = os.environ["SHUNTER_BENCH_DIR"]
_SLOW = float(os.environ.get("SHUNTER_BENCH_SLOW_S", "0"))
_calls = {}
_first = _last = 0.0
_delays = []
_marks = []
_n = 0


def _report():
    data = {"calls": _calls, "first": _first, "last": _last, "delays": _delays,
            "marks": _marks}
    with open(os.path.join(_DIR, f"calls-{os.getpid()}.json"), "wb") as f:
        f.write(orjson.dumps(data))


atexit.register(_report)


def _counting(name, wait=0.0, timed=False):
    async def handle(msg):
        global _first, _last, _n
        now = time.time()
        if not _first:
            _first = now
        _last = now
        _calls[name] = _calls.get(name, 0) + 1
        _n += 1
        if _n % 3000 == 0:
            _marks.append((now, _n))
        if timed:
            _delays.append(now - msg.value["sent"])
        if wait:
            await asyncio.sleep(wait)
    handle.__name__ = name
    return handle


medal = _counting("medal")
rank = _counting("rank")
task = _counting("task")
slow = _counting("slow", _SLOW)
latency = _counting("latency", timed=True)
"""

MODULE = "shunter_bench_handlers"


def write_service(
    ctx: BenchContext, config: dict[str, Any], handlers: dict[str, str], name: str
) -> Path:
    """Write the handler module and ``config`` (subscribers get ``handler`` keys from
    ``handlers``: caller → function of the module) to a directory of their own."""
    directory = ctx.workdir / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{MODULE}.py").write_text(HANDLERS)
    for sub in config["subscribers"]:
        sub["handler"] = f"{MODULE}:{handlers[sub['caller']]}"
    path = directory / "shunter.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(
    config_file: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``shunter run -c config_file *args`` in its own session, logging to shunter.log."""
    directory = config_file.parent
    with open(directory / "shunter.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "shunter.cli.main", "run", "-c", str(config_file), *args],
            env={**os.environ, "SHUNTER_BENCH_DIR": str(directory), **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes], timeout: float = 120.0) -> int:
    """SIGTERM (drain, commit, exit); SIGKILL the session if it does not end in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        raise


@contextlib.contextmanager
def running(
    config_file: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    proc = start(config_file, *args, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            stop(proc)


def log_tail(config_file: Path, chars: int = 3000) -> str:
    path = config_file.parent / "shunter.log"
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


class Committed:
    """Reads a group's committed offsets of a dataset (a consumer that never joins)."""

    def __init__(self, ctx: BenchContext, group: str, data: Dataset) -> None:
        self._consumer = Consumer({"bootstrap.servers": ctx.bootstrap, "group.id": group})
        self._tps = [TopicPartition(data.topic, p) for p, end in data.ends.items() if end]
        self._ends = data.ends

    def reached(self) -> bool:
        got = self._consumer.committed(self._tps, timeout=10)
        return all(tp.offset >= self._ends[tp.partition] for tp in got)

    def total(self) -> int:
        """Messages committed past, over all partitions."""
        got = self._consumer.committed(self._tps, timeout=10)
        return sum(max(tp.offset, 0) for tp in got)

    def close(self) -> None:
        self._consumer.close()


def wait_committed(
    ctx: BenchContext,
    group: str,
    data: Dataset,
    proc: subprocess.Popen[bytes],
    config_file: Path,
    timeout: float,
) -> float:
    """Poll until ``group`` committed ``data`` to its end; the wall clock (time.time())."""
    committed = Committed(ctx, group, data)
    deadline = time.monotonic() + timeout
    try:
        while not committed.reached():
            if proc.poll() is not None:
                tail = log_tail(config_file)
                raise RuntimeError(f"shunter exited with {proc.returncode}: {tail}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{group} did not commit {data.topic} within {timeout:.0f}s")
            time.sleep(0.05)
        return time.time()
    finally:
        committed.close()


def handler_reports(config_file: Path) -> list[dict[str, Any]]:
    """What every process's handlers counted (files written at their exit)."""
    return [orjson.loads(p.read_bytes()) for p in sorted(config_file.parent.glob("calls-*.json"))]


def steady_rate(reports: list[dict[str, Any]]) -> float | None:
    """Handler calls per second over the span in which every process was delivering
    (from the last first call to the first last call), from each one's ``marks``; None
    when that span is too short to say (under half a second)."""
    start: float = max(r["first"] for r in reports)
    end: float = min(r["last"] for r in reports)
    if end - start < 0.5:
        return None

    def calls_at(report: dict[str, Any], when: float) -> float:
        total = sum(report["calls"].values())
        points = [(report["first"], 1), *report["marks"], (report["last"], total)]
        for (t0, n0), (t1, n1) in itertools.pairwise(points):
            if t0 <= when <= t1:
                return float(n0 + (n1 - n0) * ((when - t0) / (t1 - t0) if t1 > t0 else 1.0))
        return float(total if when > report["last"] else 0)

    calls = sum(calls_at(r, end) - calls_at(r, start) for r in reports)
    return calls / (end - start)


def tree_rss(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants, in bytes (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, ()))
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def assigned(config_file: Path, topic: str) -> int:
    """How many assignments of ``topic``'s partitions shunter logged (one per worker that
    got some, plus one per later rebalance)."""
    text = log_tail(config_file, 10_000_000)
    return sum(1 for line in text.splitlines() if "assigned" in line and f"{topic}[" in line)
