"""The scenarios by name, running one into a JSON-ready dict, and the median summary.

A scenario is a function ``run(ctx: BenchContext) -> dict`` in a module of this package,
imported only when it runs: a scenario whose module is missing reports
an error object instead of breaking the others. Adding a scenario is one line in
``SCENARIOS``.
"""

from __future__ import annotations

import importlib
import logging
import statistics
import traceback
from dataclasses import dataclass
from typing import Any

from .context import BenchContext

log = logging.getLogger("shunter.bench")


@dataclass(frozen=True)
class Scenario:
    name: str
    target: str  # "module:function" inside shunter.bench
    summary: str
    default: bool = True  # run when no --scenario is given


SCENARIOS = [
    Scenario(
        "fanout-3",
        "fanout:fanout_3",
        "raw confluent-kafka loop vs shunter with 3 no-op async subscribers",
    ),
    Scenario(
        "fanout-3-failing",
        "fanout:fanout_3_failing",
        "fanout-3 with one subscriber failing 1% (fast retry tier) vs all-success",
    ),
    Scenario(
        "io-bound",
        "io_bound:io_bound",
        "3 subscribers awaiting 20 ms each, 1,000 keys: efficiency vs the concurrency bound",
    ),
    Scenario("http-fanout", "http_fanout:run", "fan-out to HTTP subscribers"),
    Scenario("journal", "journal:run", "cost of the crash-guard journal (on vs off)"),
    Scenario("tracing", "formats:tracing", "fanout-3 with tracing on vs off", default=False),
    Scenario(
        "decode-formats",
        "formats:decode_formats",
        "decode cost per format (avro, protobuf, plain and registry) vs JSON",
        default=False,
    ),
    Scenario(
        "workers",
        "workers:run",
        "shunter run with 1 worker process vs one per core, fan-out to 3, same run",
    ),
    Scenario(
        "memory",
        "memory:run",
        "RSS of shunter run's process tree over a large backlog with a slow subscriber",
        default=False,
    ),
    Scenario(
        "latency",
        "latency:run",
        "produce→handler latency at 5,000 msg/s beside a plain consumer (--bootstrap Kafka)",
        default=False,
    ),
]

BY_NAME = {s.name: s for s in SCENARIOS}


def run_scenario(scenario: Scenario, ctx: BenchContext) -> dict[str, Any]:
    """One run of one scenario as a dict; failures become ``{"error": ...}``, never raise."""
    head: dict[str, Any] = {"scenario": scenario.name, "run": ctx.run}
    module_name, function = scenario.target.split(":")
    path = f"{__package__}.{module_name}"
    try:
        module = importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name != path:
            raise
        return {**head, "error": f"scenario not available: module {path} does not exist yet"}
    try:
        return {**head, **getattr(module, function)(ctx)}
    except Exception as exc:
        log.error("scenario %s failed", scenario.name, exc_info=True)
        return {
            **head,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=-8),
        }


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every numeric field, per scenario, over the runs without errors."""
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        if "error" not in result:
            by_scenario.setdefault(result["scenario"], []).append(result)
    medians: dict[str, dict[str, Any]] = {}
    for name, runs in by_scenario.items():
        # A field may be None in some runs (``steady_speedup`` when a run had no steady
        # span): its median is over the runs that measured it.
        values: dict[str, list[float]] = {}
        for run in runs:
            for k, v in run.items():
                if k != "run" and _numeric(v):
                    values.setdefault(k, []).append(v)
        medians[name] = {"runs": len(runs)} | {
            k: _round(statistics.median(found)) for k, found in values.items()
        }
    failed = sorted({r["scenario"] for r in results if "error" in r})
    return {"summary": "median", "scenarios": medians, "failed": failed}


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _round(value: float) -> float:
    return round(value) if abs(value) >= 100 else round(value, 3)
