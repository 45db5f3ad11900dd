"""The median line of ``shunter bench --runs K``."""

from __future__ import annotations

from shunter.bench.runner import summarize


def test_a_field_some_runs_could_not_measure_takes_the_median_of_the_others() -> None:
    runs = [
        {"scenario": "workers", "run": 1, "speedup": 1.5, "steady_speedup": 1.6, "order": "1/2"},
        {"scenario": "workers", "run": 2, "speedup": 0.6, "steady_speedup": None},
        {"scenario": "workers", "run": 3, "speedup": 1.7, "steady_speedup": 1.8},
        {"scenario": "workers", "run": 4, "error": "TimeoutError: ..."},
    ]
    summary = summarize(runs)
    assert summary["scenarios"]["workers"] == {
        "runs": 3,
        "speedup": 1.5,
        "steady_speedup": 1.7,  # of 1.6 and 1.8: the run without one left out
    }
    assert summary["failed"] == ["workers"]


def test_a_field_the_first_run_lacks_is_still_summarized() -> None:
    runs = [
        {"scenario": "latency", "run": 1, "gap_p50_ms": None, "ok": True},
        {"scenario": "latency", "run": 2, "gap_p50_ms": 4.0, "ok": True},
    ]
    assert summarize(runs)["scenarios"]["latency"] == {"runs": 2, "gap_p50_ms": 4.0}
