"""Given a dispatcher with its admin API on a real broker, when an operator browses and
replays dead letters, reads stats and metrics, then the answers come from Kafka and the
instance's status rows, secrets never show, and fingerprints group what failed.

``test_stats_and_metrics_show_lag_backlog_and_fingerprints`` reads ``Pipeline.status()``
(the lead's half of issue #12): it passes once that is merged."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

import shunter
from admintools import TOKEN, Api, admin_config, free_port, handlers_module
from kafkatools import Broker
from shunter.testing import DispatcherThread

pytestmark = pytest.mark.kafka


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHUNTER_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("HOOK_SECRET", "hook-secret-value")


GIFTS = [{"n": 1, "user": {"id": 7}}, {"n": 2}, {"n": 3, "user": {"id": 8}}, {"n": 4}]


def test_dead_letters_are_browsed_and_replayed_to_one_caller(
    broker: Broker, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, handlers = handlers_module(tmp_path, unique)
    port = free_port()
    data = admin_config(broker, unique, module, port)
    data["subscribers"].append(
        {"caller": "hook", "category": "revenue",
         "http": {"url": "http://127.0.0.1:9/in?token=${HOOK_SECRET}",
                  "allow_private": ["127.0.0.1"], "timeout": "1s"}}
    )  # fmt: skip
    app = shunter.Dispatcher(data)
    gift, api = f"gift-{unique}", Api(port)
    broker.produce(gift, GIFTS, key=lambda i, v: f"u{i}")

    with DispatcherThread(app) as running:
        # given: medal fails on gifts 2 and 4 through every tier
        def medal_dead() -> list[dict[str, Any]]:
            status, answer = api.get("/deadletters?caller=medal")
            assert status == 200, answer
            return list(answer["records"])

        running.wait_for(lambda: len(medal_dead()) == 2, timeout=60)

        # then the topology names the HTTP subscriber without its secret
        status, topo = api.get("/topology")
        assert status == 200
        assert {r["caller"] for r in topo} == {"medal", "rank", "hook"}
        assert "hook-secret-value" not in str(topo) and "token=***" in str(topo)

        # when listing with the CLI's filters
        status, answer = api.get("/deadletters?caller=medal&error=KeyError&since=1h")
        assert status == 200 and answer["total"] == 2
        row = answer["records"][0]
        assert (row["caller"], row["stage"], row["error_type"]) == ("medal", "deliver", "KeyError")
        assert api.get("/deadletters?caller=rank")[1]["total"] == 0
        assert api.get("/deadletters?stage=nonsense")[0] == 400
        assert api.get("/deadletters?since=yesterday-ish")[0] == 400

        # grouped by fingerprint: both failures are one line of the handler
        status, grouped = api.get("/deadletters?caller=medal&group=1")
        assert status == 200
        [group] = grouped["groups"]
        assert group["count"] == 2
        assert group["fingerprint"].startswith(f"KeyError at {tmp_path.name}/{module}.py:")
        assert group["fingerprint"].endswith(" in on_medal")

        # one record in full, with its traceback
        status, record = api.get(f"/deadletters/{row['id']}")
        assert status == 200
        assert 'user_id = msg.value["user"]["id"]' in record["traceback"]
        assert '"n"' in record["payload"]
        assert api.get("/deadletters/0:999999")[0] == 404
        assert api.get("/deadletters/nonsense")[0] == 400

        # the settler counted the same fingerprint while it happened (1 + 2 retries + 1)
        prints = app.service.stats.fingerprints.rows()
        medal = [p for p in prints if p.caller == "medal"]
        assert len(medal) == 1 and medal[0].count == 2 * 4

        # when replaying: a token is needed, and only to one configured caller
        assert api.post("/deadletters/replay", {"to": "medal"}, token=None)[0] == 401
        assert api.post("/deadletters/replay", {"to": "medal"}, token="nope")[0] == 401
        assert api.post("/deadletters/replay", {"to": "ghost"})[0] == 400
        rank_before = len(handlers.RANK)
        status, result = api.post(
            "/deadletters/replay", {"to": "medal", "caller": "medal", "ids": [row["id"]]}
        )
        assert status == 200, result
        assert result["written"] == 1 and result["replayed"] == [row["id"]]

        # then medal gets that gift again (and fails again: it is still broken), rank does not
        running.wait_for(lambda: medal[0].count > 2 * 4, timeout=30)
        time.sleep(0.5)
        assert len(handlers.RANK) == rank_before


def test_stats_and_metrics_show_lag_backlog_and_fingerprints(
    broker: Broker, unique: str, tmp_path: Path
) -> None:
    """Depends on Pipeline.status() (lead, issue #12)."""
    module, handlers = handlers_module(tmp_path, unique)
    port = free_port()
    app = shunter.Dispatcher(admin_config(broker, unique, module, port, partitions=3))
    gift, api, group = f"gift-{unique}", Api(port), f"g-{unique}"

    def stats() -> dict[str, Any]:
        status, answer = api.get("/stats")
        assert status == 200, answer
        return dict(answer)

    def lag_of(partition: int) -> Any:
        for p in stats()["partitions"]:
            if p["topic"] == gift and p["partition"] == partition:
                return p["lag"]
        return "unassigned"

    handlers.GATE["open"] = False
    with DispatcherThread(app) as running:
        try:
            # partition 0: five gifts, rank holds on the third; partition 1: two; 2: none
            _produce(
                broker, gift, 0, [{"n": i, "user": {"id": i}, "hold": i == 2} for i in range(5)]
            )
            _produce(broker, gift, 1, [{"n": 10 + i, "user": {"id": i}} for i in range(2)])
            running.wait_for(lambda: len(handlers.RANK) == 6, timeout=60)

            # then rank's held delivery is its backlog, and partition 0 lags behind it
            running.wait_for(lambda: stats()["callers"]["rank"]["backlog"] == 1, timeout=30)
            if broker.kind == "kafka":  # Tansu under-reports end offsets (SPEC: real parts)
                running.wait_for(lambda: lag_of(0) == 3, timeout=30)
                running.wait_for(lambda: lag_of(1) == 0, timeout=30)
            text = api.text("/metrics")
            for partition in range(3):  # every assigned partition, the idle one too
                labels = f'group="{group}",kind="source",partition="{partition}",topic="{gift}"'
                assert (
                    f'shunter_partition_in_flight{{partition="{partition}",topic="{gift}"}}' in text
                )
                assert f"kafka_consumergroup_group_lag_seconds{{{labels}}}" in text
                if broker.kind == "kafka" and partition < 2:
                    assert f"kafka_consumergroup_group_lag{{{labels}}}" in text
            rank = 'caller="rank",category="revenue"'
            assert f'shunter_caller_backlog{{{rank},state="running"}} 1.0' in text
        finally:
            handlers.GATE["open"] = True
        running.wait_for(lambda: stats()["callers"]["rank"]["backlog"] == 0, timeout=30)

        broker.produce(gift, [{"n": 99}], key="x")  # medal fails on it: a fingerprint
        running.wait_for(lambda: stats()["fingerprints"], timeout=30)
        [printed] = stats()["fingerprints"]
        assert printed["caller"] == "medal" and printed["error_type"] == "KeyError"
        assert printed["example"]["topic"] == gift
        metric = 'shunter_failure_fingerprint_total{caller="medal",fingerprint="KeyError at '
        assert metric in api.text("/metrics")


def _produce(broker: Broker, topic: str, partition: int, values: list[Any]) -> None:
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for i, value in enumerate(values):
        producer.produce(topic, orjson.dumps(value), key=f"k{partition}-{i}", partition=partition)
    assert producer.flush(30) == 0
