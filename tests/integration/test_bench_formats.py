"""Given a broker, when the tracing and decode-formats bench scenarios run on a few hundred
messages, then they report their figures. Timings are printed, never asserted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from kafkatools import Broker
from shunter.bench.context import BenchContext
from shunter.bench.events import delete_topics
from shunter.bench.runner import BY_NAME, run_scenario

N = 300


@pytest.fixture(scope="module")
def ctx(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BenchContext]:
    context = BenchContext(broker.bootstrap, tmp_path_factory.mktemp("bench"), messages=N)
    yield context
    delete_topics(broker.bootstrap, context.created)


@pytest.mark.kafka
def test_tracing_compares_fanout_3_with_tracing_on_and_off(ctx: BenchContext) -> None:
    result = run_scenario(BY_NAME["tracing"], ctx)
    print(orjson.dumps(result).decode())
    assert "error" not in result, result.get("traceback", result)
    assert result["messages"] == N and result["spans"] == 3 * N
    assert result["tracing_msgs_per_s"] > 0 and result["no_tracing_msgs_per_s"] > 0
    assert result["cost"] == pytest.approx(1 - result["ratio"], abs=0.002)


def test_decode_formats_times_every_format_against_json(tmp_path: Path) -> None:
    ctx = BenchContext("127.0.0.1:1", tmp_path, messages=N)  # decoding only: no broker
    result = run_scenario(BY_NAME["decode-formats"], ctx)
    print(orjson.dumps(result).decode())
    assert "error" not in result, result.get("traceback", result)
    assert result["events"] == N and result["json_vs_json"] == 1.0
    for name in ("json_schema", "avro", "avro_registry", "protobuf", "protobuf_registry"):
        assert result[f"{name}_us"] > 0
    assert result["avro_bytes"] < result["json_bytes"]  # the same events, smaller
