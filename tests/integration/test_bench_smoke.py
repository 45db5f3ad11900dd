"""Given a broker, when each bench scenario runs on a few hundred messages, then it reports
its figures and its delivery counts add up. Timings are printed, never asserted."""

from __future__ import annotations

import argparse
import importlib.util
import io
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import orjson
import pytest

from kafkatools import Broker
from shunter.bench.context import BenchContext
from shunter.bench.events import delete_topics
from shunter.bench.runner import BY_NAME, run_scenario
from shunter.cli import bench

pytestmark = pytest.mark.kafka

N = 300


@pytest.fixture(scope="module")
def ctx(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BenchContext]:
    context = BenchContext(broker.bootstrap, tmp_path_factory.mktemp("bench"), messages=N)
    yield context
    delete_topics(broker.bootstrap, context.created)


def run(name: str, ctx: BenchContext) -> dict[str, Any]:
    result = run_scenario(BY_NAME[name], ctx)
    print(orjson.dumps(result).decode())
    assert "error" not in result, result.get("traceback", result)
    assert result["scenario"] == name
    assert result["messages"] == N
    return result


def test_fanout_3_compares_raw_and_shunter_over_every_message(ctx: BenchContext) -> None:
    result = run("fanout-3", ctx)
    assert result["raw_msgs_per_s"] > 0 and result["shunter_msgs_per_s"] > 0
    assert result["ratio"] == pytest.approx(
        result["shunter_msgs_per_s"] / result["raw_msgs_per_s"], rel=0.01, abs=0.002
    )
    # every side is measured twice (in both orders): the counts are of both passes
    assert result["passes_per_side"] == 2
    assert result["deliveries"] == {"ok": 2 * 3 * N}
    # timed to every offset settled, as the baselines are; committed comes after that
    assert 0 < result["shunter_seconds"] <= result["shunter_committed_seconds"]
    # the handlers' own counts, on both sides of the comparison
    assert result["handler_calls"] == result["floor_handler_calls"] == 2 * 3 * N
    # where the time went, per thread group (no broker of its own here: not measured)
    assert 0 < result["shunter_main_cpu"] <= 1.05
    assert result["shunter_consumer_cpu"] >= 0  # alive at both ends of the span
    assert "shunter_broker_cpu" not in result


def test_journal_compares_the_crash_guard_on_and_off(ctx: BenchContext) -> None:
    result = run("journal", ctx)
    assert result["journal_msgs_per_s"] > 0 and result["no_journal_msgs_per_s"] > 0
    assert result["cost"] == pytest.approx(1 - result["ratio"], abs=0.002)


def test_fanout_3_failing_sends_one_percent_of_one_subscriber_to_the_fast_tier(
    ctx: BenchContext,
) -> None:
    result = run("fanout-3-failing", ctx)
    assert result["passes_per_side"] == 2
    assert result["expected_failures"] >= 2 * (N // 100)
    assert result["deliveries"] == {
        "ok": 2 * 3 * N - result["expected_failures"],
        "fast": result["expected_failures"],
    }
    assert result["shunter_msgs_per_s"] > 0 and result["all_success_msgs_per_s"] > 0
    assert result["handler_calls"] == result["all_success_handler_calls"] == 2 * 3 * N
    # what a failure cost on the main thread, from both sides' thread CPU
    assert isinstance(result["main_cpu_us_per_failure"], float)
    assert result["failing_main_cpu"] > 0 and result["all_success_main_cpu"] > 0


def test_io_bound_reports_efficiency_against_the_concurrency_bound(ctx: BenchContext) -> None:
    result = run("io-bound", ctx)
    assert result["max_in_flight"] == 3 * 64
    assert result["ideal_deliveries_per_s"] == round(3 * 64 / 0.02)
    assert result["deliveries_per_s"] == pytest.approx(3 * result["shunter_msgs_per_s"], abs=3)
    assert result["efficiency"] > 0
    assert result["shunter_cpu"] > 0
    assert result["deliveries"] == {"ok": 3 * N}


def test_http_fanout_runs_or_says_its_module_is_missing(ctx: BenchContext) -> None:
    result = run_scenario(BY_NAME["http-fanout"], ctx)
    if importlib.util.find_spec("shunter.bench.http_fanout") is None:
        assert "shunter.bench.http_fanout" in result["error"]
    else:
        assert "error" not in result, result


def test_cli_prints_one_line_per_run_and_a_median_line(broker: Broker, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = io.StringIO()
    with redirect_stdout(out):
        code = bench.run(
            parser.parse_args(
                [
                    "--scenario",
                    "fanout-3",
                    "--messages",
                    "200",
                    "--runs",
                    "2",
                    "--bootstrap",
                    broker.bootstrap,
                    "--log",
                    str(tmp_path / "bench.log"),
                ]
            )
        )
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert code == 0
    assert [line.get("run") for line in lines] == [1, 2, None]
    summary = lines[-1]["scenarios"]["fanout-3"]
    assert summary["runs"] == 2
    assert set(summary) >= {"raw_msgs_per_s", "shunter_msgs_per_s", "ratio"}
    assert lines[-1]["failed"] == []


def test_without_bootstrap_every_run_gets_an_embedded_broker_of_its_own(tmp_path: Path) -> None:
    """Given no --bootstrap, when one scenario runs twice, then each run starts a broker
    of its own (its dataset produced again) and both report their figures."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    args = ["--scenario", "fanout-3", "--messages", "200", "--runs", "2",
            "--log", str(tmp_path / "bench.log")]
    with redirect_stdout(out), redirect_stderr(err):
        code = bench.run(parser.parse_args(args))
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert code == 0, lines
    assert [line.get("run") for line in lines] == [1, 2, None]
    notes = err.getvalue().splitlines()
    assert sum("embedded broker 127.0.0.1:" in n for n in notes) == 2, notes
    assert sum("producing gift" in n for n in notes) == 2, notes


def test_workers_runs_shunter_with_one_and_with_several_worker_processes(
    ctx: BenchContext,
) -> None:
    result = run("workers", ctx)
    assert result["workers"] >= 2
    assert result["one_msgs_per_s"] > 0 and result["n_msgs_per_s"] > 0
    assert result["speedup_committed"] > 0
    # the handlers' own counts: every message reached all 3 subscribers (at least once)
    assert result["one_calls_per_message"] >= 1.0 and result["n_calls_per_message"] >= 1.0


def test_memory_samples_the_process_tree_until_the_backlog_is_committed(
    ctx: BenchContext,
) -> None:
    result = run("memory", ctx)
    assert result["committed_when_sampling_ended"] == N
    assert 10 < result["rss_mb_at_5s"] <= result["rss_mb_peak"]


def test_latency_runs_beside_a_plain_consumer_on_kafka_only(
    broker: Broker, ctx: BenchContext
) -> None:
    if broker.kind == "embedded":
        ctx.embedded = True
        try:
            result = run_scenario(BY_NAME["latency"], ctx)
        finally:
            ctx.embedded = False
        assert "Apache Kafka" in result["error"]
        return
    result = run("latency", ctx)
    assert result["plain_messages"] == N
    assert result["shunter_deliveries"] == 3 * N
    assert 0 < result["plain_p50_ms"] <= result["plain_p99_ms"]
    assert 0 < result["shunter_p50_ms"] <= result["shunter_p99_ms"]
