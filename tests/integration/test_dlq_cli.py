"""Given dead letters, when an operator uses ``shunter dlq list/show/replay`` and
``shunter replay``, then the records are found by caller, error type and time, replay
redelivers to the failed caller only with a fresh attempt count, and the foreground
replay names the handler's failing line."""

from __future__ import annotations

import importlib
import logging
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from confluent_kafka import Producer

import shunter
from kafkatools import Broker, config
from shunter.cli.main import main
from shunter.settle import headers as h
from shunter.settle.dlqread import DlqFilter, RecordId, TopicReader, parse_since, select
from shunter.testing import DispatcherThread

pytestmark = pytest.mark.kafka

HANDLERS = """
import shunter

FIXED = False
MEDAL = []  # (n, attempt, topic, offset) of each delivery that got through
RANK = []

def on_medal(msg: shunter.Message) -> None:
    if not FIXED:
        user_id = msg.value["user"]["id"]  # fails when the gift has no user
    MEDAL.append((msg.value["n"], msg.attempt, msg.topic, msg.offset))

async def on_rank(msg: shunter.Message) -> None:
    RANK.append(msg.value["n"])
"""


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Wide tables, the test's own cwd and sys.path, and the root logger put back
    (``shunter replay`` sets up logging for the handler's logs)."""
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def write_config(tmp: Path, data: dict[str, Any]) -> str:
    path = tmp / "shunter.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def dead_letters(broker: Broker, topic: str, **where: Any) -> list[Any]:
    with TopicReader({"bootstrap.servers": broker.bootstrap}) as reader:
        return select(reader, topic, DlqFilter(**where))[0]


# -- the whole story against a running dispatcher ----------------------------------------


def test_failed_caller_is_listed_reproduced_and_replayed_to_itself_only(
    broker: Broker, unique: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gift, module = f"gift-{unique}", f"medals_{unique}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(HANDLERS))
    sys.path.insert(0, str(tmp_path))
    broker.create({gift: 2})
    cfg = write_config(tmp_path, config(
        broker, f"g-{unique}", topics={gift: {}}, categories={"revenue": {"topics": [gift]}},
        subscribers=[{"caller": "medal", "category": "revenue", "handler": f"{module}:on_medal"},
                     {"caller": "rank", "category": "revenue", "handler": f"{module}:on_rank"}]))
    app = shunter.Dispatcher(cfg)
    dlq, handlers = app.config.dlq_topic, importlib.import_module(module)
    broker.produce(gift, [{"n": 1, "user": {"id": 7}}, {"n": 2}, {"n": 3, "user": {"id": 8}}],
                   key=lambda i, v: f"u{i}")

    with DispatcherThread(app) as running:
        # given: medal fails on gift 2 through every tier, rank takes all three
        running.wait_for(lambda: sorted(handlers.RANK) == [1, 2, 3])
        running.wait_for(lambda: len(dead_letters(broker, dlq)) == 1, timeout=30)
        assert sorted(n for n, *_ in handlers.MEDAL) == [1, 3]

        # when the operator lists by caller, then medal's dead letter is there, rank has none
        code, out = cli(capsys, "dlq", "list", "-c", cfg, "--caller", "medal")
        assert code == 0
        assert "medal" in out and "KeyError" in out and f"{gift}[" in out
        assert "1 of 1 matching" in out
        code, out = cli(capsys, "dlq", "list", "-c", cfg, "--caller", "rank")
        assert code == 0 and "no matching records" in out
        code, out = cli(capsys, "dlq", "list", "-c", cfg, "--error", "KeyError", "--json")
        row = orjson.loads(out.splitlines()[0])
        assert (row["caller"], row["stage"], row["attempt"]) == ("medal", "deliver", 4)  # 1+2+1
        origin = (row["origin_partition"], row["origin_offset"])

        code, out = cli(capsys, "dlq", "show", "-c", cfg, row["id"])
        assert code == 0
        assert h.CALLER in out and 'user_id = msg.value["user"]["id"]' in out
        assert '"n": 2' in out

        # when the failure is reproduced in the foreground, then the traceback names the line
        partition, offset = RecordId.parse(row["id"]).partition, RecordId.parse(row["id"]).offset
        code, out = cli(capsys, "replay", "-c", cfg, "--topic", dlq, "--partition",
                        str(partition), "--offset", str(offset))
        assert code == 1
        assert f"{module}.py" in out and 'user_id = msg.value["user"]["id"]' in out
        assert "KeyError: 'user'" in out and "dead-letter topic" in out
        post_mortems: list[Any] = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("pdb.post_mortem", post_mortems.append)
            code, out = cli(capsys, "replay", "-c", cfg, "--topic", gift, "--caller", "medal",
                            "--partition", str(origin[0]), "--offset", str(origin[1]), "--pdb")
        assert code == 1 and "KeyError: 'user'" in out and "fast retry tier as attempt 2" in out
        assert len(post_mortems) == 1 and post_mortems[0].tb_frame is not None

        # when the handler is fixed and medal's dead letters are replayed
        handlers.FIXED = True
        code, out = cli(capsys, "dlq", "replay", "-c", cfg, "--caller", "medal", "--yes",
                        "--rate", "20/s")
        assert code == 0, out
        assert "replayed 1 of 1" in out

        # then medal gets gift 2 afresh, as the same source message, and rank never again
        running.wait_for(lambda: any(n == 2 for n, *_ in handlers.MEDAL), timeout=30)
        time.sleep(1.0)
    assert [m for m in handlers.MEDAL if m[0] == 2] == [(2, 1, gift, origin[1])]
    assert sorted(handlers.RANK) == [1, 2, 3]
    assert len(dead_letters(broker, dlq)) == 1


# -- selection and replay rules, on dead letters written by hand -------------------------

SCHEMA = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}


def dead_letter(topic: str, caller: str, stage: str, error_type: str,
                offset: int) -> list[tuple[str, bytes]]:
    return h.encode(h.FailureInfo(
        caller=caller, category="revenue" if caller else "", attempt=4 if caller else 1,
        stage=stage, error_type=error_type, error=f"{error_type} at {offset}",
        traceback="Traceback (most recent call last):\n  ...\n", first_failure_ms=1000,
        not_before_ms=2000, origin_topic=topic, origin_partition=0,
        origin_offset=offset, origin_timestamp_ms=500, tier="dlq", origin_key=b"k"))


def test_dlq_filters_refusals_and_fan_out(
    broker: Broker, unique: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gift, group = f"gift-{unique}", f"g-{unique}"
    (tmp_path / "gift.json").write_text(orjson.dumps(SCHEMA).decode())
    data = config(
        broker, group, topics={gift: {"schema": "gift.json"}},
        categories={"revenue": {"topics": [gift]}, "big": {"topics": [gift],
                                                          "where": "value.price >= 100"}},
        subscribers=[{"caller": c, "category": k, "handler": "nowhere:handler"}
                     for c, k in [("medal", "revenue"), ("rank", "revenue"), ("vip", "big")]])
    cfg = write_config(tmp_path, data)
    dlq, fast = f"{group}.dlq", f"{group}.retry.fast"
    broker.create({dlq: 1, fast: 2})
    records = [  # (caller, stage, error type, origin offset, payload, dead-lettered seconds ago)
        ("medal", "deliver", "KeyError", 5, {"n": 5, "price": 10}, 3 * 3600),
        ("ghost", "deliver", "ValueError", 6, {"n": 6, "price": 10}, 60),
        ("", "validate", "RejectedMessage", 7, {"n": 7, "price": 500}, 50),
        ("", "crash", "crash", 8, {"n": 8, "price": 1}, 40),
        ("", "decode", "RejectedMessage", 9, b"not json", 30),
        ("rank", "deliver", "myapp.errors.Boom", 10, {"n": 10, "price": 1}, 0),
    ]
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for caller, stage, error_type, offset, payload, ago in records:
        value = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        headers = dead_letter(gift, caller, stage, error_type, offset)
        producer.produce(dlq, value, b"k", headers=headers, partition=0,
                         timestamp=int((time.time() - ago) * 1000))
    assert producer.flush(10) == 0

    def listed(*argv: str) -> list[int]:
        code, out = cli(capsys, "dlq", "list", "-c", cfg, "--json", *argv)
        assert code == 0, out
        return [orjson.loads(line)["origin_offset"] for line in out.splitlines()]

    assert listed() == [5, 6, 7, 8, 9, 10]
    assert listed("--error", "keyerror") == [5]
    assert listed("--error", "Boom") == [10]
    assert listed("--since", "1h") == [6, 7, 8, 9, 10]
    assert listed("--limit", "2") == [9, 10]
    assert listed("--caller", "") == [7, 8, 9]
    assert listed("--stage", "crash", "--topic", gift) == [8]

    code, out = cli(capsys, "dlq", "list", "-c", cfg, "--group", "--json")
    assert code == 0, out
    rows = [orjson.loads(line) for line in out.splitlines()]
    groups = {(g["caller"], g["error_type"]): g["count"] for g in rows}
    assert groups[("", "RejectedMessage")] == 2, groups  # validate and decode: one fingerprint
    assert groups[("medal", "KeyError")] == 1 and groups[("", "crash")] == 1
    code, out = cli(capsys, "dlq", "list", "-c", cfg, "--group")
    assert code == 0 and "by fingerprint" in out and "RejectedMessage" in out

    code, out = cli(capsys, "dlq", "show", "-c", cfg, "0:4")
    assert code == 0 and "(not JSON) not json" in out and "RejectedMessage at 9" in out
    code, out = cli(capsys, "dlq", "show", "-c", cfg, "0:99")
    assert code == 2 and "no record at offset 99" in out

    code, out = cli(capsys, "dlq", "replay", "-c", cfg, "--dry-run")
    assert code == 1
    assert "refused 0:1: unknown caller 'ghost'" in out
    assert "refused 0:4: still rejected at decode" in out
    code, out = cli(capsys, "dlq", "replay", "-c", cfg, "--caller", "medal")  # stdin: no tty
    assert code == 2 and "pass --yes" in out

    # a record of no caller goes to the subscribers that take it today; --to narrows it
    code, out = cli(capsys, "dlq", "replay", "-c", cfg, "--caller", "", "--to", "vip", "--yes")
    assert code == 1 and "replayed 1 of 1" in out and "1 refused" in out  # 0:4, still bad
    code, out = cli(capsys, "dlq", "replay", "-c", cfg, "--yes", "--rate", "100/s")
    assert code == 1 and "replayed 6 of 6" in out and "2 refused" in out, out
    assert "skipped 1 deliveries replayed already" in out  # 0:2 to vip, by the first replay
    # what was replayed is marked: a second replay writes nothing unless --again
    code, out = cli(capsys, "dlq", "replay", "-c", cfg, "--yes", "--caller", "medal")
    assert code == 0 and "skipped 1 deliveries replayed already" in out, out
    assert "nothing left to replay" in out
    code, out = cli(capsys, "dlq", "replay", "-c", cfg, "--caller", "", "--to", "vip", "--yes",
                    "--again", "--id", "0:2")
    assert code == 0 and "replayed 1 of 1" in out, out
    code, out = cli(capsys, "dlq", "list", "-c", cfg, "--json")
    marked = {orjson.loads(x)["id"]: orjson.loads(x)["replayed_ms"] for x in out.splitlines()}
    assert {i for i, ms in marked.items() if ms} == {"0:0", "0:2", "0:3", "0:5"}

    written = broker.read_all(fast, expect=8)
    got = sorted((h.decode(m.headers()).origin_offset, h.decode(m.headers()).caller)
                 for m in written)
    replay_of = {dict(m.headers())["shunter-replay-of"] for m in written}
    assert replay_of == {f"{dlq}:0:{i}".encode() for i in (0, 2, 3, 5)}
    assert got == [(5, "medal"), (7, "medal"), (7, "rank"), (7, "vip"), (7, "vip"),
                   (8, "medal"), (8, "rank"), (10, "rank")]
    for m in written:
        info = h.decode(m.headers())
        assert (info.attempt, info.first_failure_ms, info.tier) == (1, 0, "fast")
        assert abs(info.not_before_ms - time.time() * 1000) < 60_000
        assert (info.origin_topic, info.origin_partition) == (gift, 0)
        assert info.origin_timestamp_ms == 500
        assert m.key() == b"k" and orjson.loads(m.value())["n"] == info.origin_offset
        assert info.category == ("big" if info.caller == "vip" else "revenue")

    # the foreground replay: a record of no caller needs --caller; a bad payload says why
    code, out = cli(capsys, "replay", "-c", cfg, "--topic", dlq, "--partition", "0",
                    "--offset", "2")
    assert code == 2 and "pass --caller" in out and "medal, rank, vip" in out
    code, out = cli(capsys, "replay", "-c", cfg, "--topic", dlq, "--partition", "0",
                    "--offset", "4", "--caller", "medal")
    assert code == 3 and "rejected at decode: invalid JSON" in out

    # without kafka.bootstrap_servers (embedded broker), --bootstrap is required
    del data["kafka"]["bootstrap_servers"]
    bare = write_config(tmp_path, data)
    code, out = cli(capsys, "dlq", "list", "-c", bare)
    assert code == 2 and "--bootstrap HOST:PORT" in out
    code, out = cli(capsys, "dlq", "list", "-c", bare, "--bootstrap", broker.bootstrap, "--json")
    assert code == 0 and len(out.splitlines()) == 6


class Hook(BaseHTTPRequestHandler):
    """Answers each POST with the next status of ``statuses``, keeping the bodies."""

    statuses: list[int] = []
    bodies: list[bytes] = []

    def do_POST(self) -> None:
        self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(self.statuses.pop(0))
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"no")

    def log_message(self, *args: Any) -> None:
        pass


def test_foreground_replay_to_an_http_subscriber_makes_one_post(
    broker: Broker, unique: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gift = f"gift-{unique}"
    broker.create({gift: 1})
    broker.produce(gift, [{"n": 1}])
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Hook.statuses, Hook.bodies = [200, 422], []
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    cfg = write_config(tmp_path, config(
        broker, f"g-{unique}", topics={gift: {}}, categories={"revenue": {"topics": [gift]}},
        subscribers=[{"caller": "hook", "category": "revenue",
                      "http": {"url": url, "allow_private": ["127.0.0.1"]}}]))
    try:
        argv = ("replay", "-c", cfg, "--topic", gift, "--partition", "0", "--offset", "0",
                "--caller", "hook")
        code, out = cli(capsys, *argv)
        assert code == 0 and f"POST {url}" in out and "OK: hook" in out
        code, out = cli(capsys, *argv)
        assert code == 1 and "422" in out and "dead-letter topic" in out, out
    finally:
        server.shutdown()
        server.server_close()
    assert [orjson.loads(b) for b in Hook.bodies] == [{"n": 1}, {"n": 1}]


def test_record_ids_and_times_parse() -> None:
    assert RecordId.parse("3:42") == RecordId(3, 42) and str(RecordId(3, 42)) == "3:42"
    with pytest.raises(ValueError, match="<partition>:<offset>"):
        RecordId.parse("3@42")
    assert parse_since("30m", now=10_000.0) == (10_000 - 1800) * 1000
    assert parse_since("2d", now=200_000.0) == (200_000 - 172_800) * 1000
    assert parse_since("2025-05-01T12:00:00+00:00") == 1746100800000
    with pytest.raises(ValueError, match="ISO timestamp"):
        parse_since("yesterday")
