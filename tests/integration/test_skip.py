"""The stall alarm and the operator's one-record exit, on the real broker.

Given a caller whose handler never returns on one record (a thread, a one-hour
timeout, partition ordering), when the partition stops moving, then the alarm says so
in /ready, /metrics and the log, naming the record and the caller; and `shunter skip`
dead-letters exactly that delivery, the partition moves on, and /ready is 200 again."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

import shunter
from kafkatools import Broker, config
from shunter.broker.embedded import free_port
from shunter.settle import headers as h
from shunter.testing import DispatcherThread

pytestmark = pytest.mark.kafka

TOKEN = "skip-test-token"


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        body, status = err.read(), err.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode()


def test_skip_moves_a_partition_wedged_by_a_handler_that_never_returns(
    broker: Broker,
    unique: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("SHUNTER_ADMIN_TOKEN", TOKEN)
    topic, group = f"gift-{unique}", f"g-{unique}"
    broker.create({topic: 1})
    port = free_port()
    data = config(
        broker,
        group,
        topics={topic: {}},
        categories={"revenue": {"topics": [topic]}},
        subscribers=[],
        kafka={"stall_after": "2s"},
        admin={"listen": f"127.0.0.1:{port}"},
    )
    app = shunter.Dispatcher(data)
    never = threading.Event()
    stuck_seen: list[int] = []
    ok_seen: list[int] = []
    lock = threading.Lock()

    @app.subscriber(
        "revenue", caller="stuck", isolation="thread", timeout="1h", ordering="partition"
    )
    def stuck(msg: shunter.Message) -> None:
        with lock:
            stuck_seen.append(msg.offset)
        if msg.offset == 3:
            never.wait(120)  # "never": released at the end of the test

    @app.subscriber("revenue", caller="fine")
    def fine(msg: shunter.Message) -> None:
        with lock:
            ok_seen.append(msg.offset)

    # The CLI reads the same group and brokers from a file; its subscribers only name
    # the callers (the CLI never imports handlers).
    cli_config = dict(data)
    cli_config["subscribers"] = [
        {"caller": c, "category": "revenue", "handler": "builtins:print"}
        for c in ("stuck", "fine")
    ]
    path = tmp_path / "shunter.yaml"
    path.write_text(yaml.safe_dump(cli_config))

    broker.produce(topic, [{"n": i} for i in range(10)])
    base = f"http://127.0.0.1:{port}"
    caplog.set_level(logging.INFO)
    try:
        with DispatcherThread(app) as running:
            running.wait_for(lambda: len(ok_seen) == 10 and 3 in stuck_seen, timeout=60)
            running.wait_for(lambda: get(base + "/ready")[0] == 503, timeout=30)
            _, ready = get(base + "/ready")
            [row] = ready["stalled"]
            assert (row["topic"], row["partition"], row["position"]) == (topic, 0, 3)
            assert "in the handler of caller stuck" in row["held"], row
            assert any("stalled" in reason for reason in ready["reasons"])
            metrics = get(base + "/metrics")[1]
            assert f'shunter_partition_stalled{{partition="0",topic="{topic}"}} 1.0' in metrics

            def alarms() -> list[str]:
                return [r.getMessage() for r in caplog.records if "not moved" in r.getMessage()]

            running.wait_for(alarms, timeout=10)
            alarm = alarms()
            assert alarm and "--offset 3" in alarm[0] and "caller stuck" in alarm[0]
            assert broker.committed(group, topic, 1) == [3]

            done = subprocess.run(
                [sys.executable, "-m", "shunter.cli.main", "skip", "-c", str(path),
                 "--topic", topic, "--partition", "0", "--offset", "3", "--caller", "stuck"],
                capture_output=True, text=True, timeout=60, env={**os.environ},
            )
            assert done.returncode == 0, done.stdout + done.stderr
            assert "skipped (1 deliveries dead-lettered)" in done.stdout, done.stdout

            running.wait_for(lambda: sorted(stuck_seen) == list(range(10)), timeout=30)
            running.wait_for(lambda: get(base + "/ready")[0] == 200, timeout=30)
            running.wait_for(lambda: broker.committed(group, topic, 1) == [10], timeout=30)

            # Committed past, the request is withdrawn (a tombstone), so no later start
            # applies it again and no instance waits for it; the answer stays.
            request, answer = f"skip/{topic}/0/3/stuck", f"skipped/{topic}/0/3/stuck"

            def control() -> dict[str, bytes | None]:
                return {r.key().decode(): r.value() for r in broker.read_all(f"{group}.control")}

            running.wait_for(lambda: control().get(request, b"") is None, timeout=30, interval=1.0)
            assert b"skipped (1 deliveries dead-lettered)" in (control()[answer] or b"")
    finally:
        never.set()
    [dead] = broker.read_all(f"{group}.dlq", expect=1)
    info = h.decode(dead.headers())
    assert (info.caller, info.origin_offset, info.error) == ("stuck", 3, "skipped by operator")
    assert dead.value() == json.dumps({"n": 3}, separators=(",", ":")).encode()
    assert sorted(ok_seen) == list(range(10)), "the other caller got every record once"
