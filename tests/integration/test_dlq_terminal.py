"""Given dead letters with long names and hostile bytes, when an operator reads them on an
80-column terminal, then no record ID, origin or command is cut, and no byte of a message
reaches the terminal as a control character."""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from confluent_kafka import Producer

from kafkatools import Broker, config
from shunter.cli.main import main
from shunter.cli.output import command_lines, safe
from shunter.settle import headers as h

pytestmark = pytest.mark.kafka

ESC = "\x1b"
HOSTILE_KEY = b"\x1b]0;pwned\x07\x1b[2Jkey"
HOSTILE_PAYLOAD = b'{"n": 1, "note": "\\u001b[31mred\\u202eevil"}'


@pytest.fixture(autouse=True)
def _root_logger_put_back() -> Iterator[None]:
    """`shunter replay` and `dlq` set up logging for the command; the next test gets the
    root logger as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def dead(broker: Broker, unique: str, tmp_path: Path) -> tuple[str, str, str]:
    """A dead-letter topic of 12 records at offsets 0..11 of partition 3, from a long
    origin topic, the last with a hostile key, header and payload."""
    origin, group = f"guard_purchase_with_a_long_name-{unique}", f"g-{unique}"
    dlq = f"{group}.dlq"
    broker.create({dlq: 4})
    data = config(broker, group, topics={origin: {}},
                  categories={"guard": {"topics": [origin]}},
                  subscribers=[{"caller": "guard-effect-renderer", "category": "guard",
                                "handler": "nowhere:handler"}])
    path = tmp_path / "shunter.yaml"
    path.write_text(yaml.safe_dump(data))
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for i in range(12):
        info = h.FailureInfo(
            caller="guard-effect-renderer", category="guard", attempt=9, stage="deliver",
            error_type="revenue.handlers.EffectMissingError",
            error=f"guard purchase {i} has no effect object\x1b[2J", traceback="Trace\x1b[2J",
            first_failure_ms=1, not_before_ms=2, origin_topic=origin, origin_partition=11,
            origin_offset=1_234_567 + i, origin_timestamp_ms=3, tier="dlq")
        headers: list[tuple[str, Any]] = h.encode(info)
        if i == 11:
            headers.append(("x-user\x1b[1m", b"\x1b[41mheader\x9b"))
        producer.produce(dlq, HOSTILE_PAYLOAD if i == 11 else orjson.dumps({"n": i}),
                         HOSTILE_KEY if i == 11 else b"k", headers=headers, partition=3,
                         timestamp=int(time.time() * 1000))
    assert producer.flush(10) == 0
    return str(path), dlq, origin


def test_dlq_list_at_80_columns_keeps_ids_and_origins_whole(
    dead: tuple[str, str, str], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg, _, origin = dead
    monkeypatch.setenv("COLUMNS", "80")
    code, out = run(capsys, "dlq", "list", "-c", cfg)
    assert code == 0, out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, out
    for i in range(12):
        assert any(f"│ 3:{i} " in line for line in lines), (i, out)
    joined = "".join(line.replace("│", "").replace(" ", "") for line in lines)
    for i in range(12):  # an origin may fold inside its cell, never be cut
        assert f"{origin}[11]@{1_234_567 + i}" in joined, out
    assert ESC not in out
    code, wide = run(capsys, "dlq", "list", "-c", cfg, "--wide")
    assert code == 0 and "has no effect object\\x1b[2J" in wide and ESC not in wide
    assert any(f"{origin}[11]@1234578" in line for line in wide.splitlines())


def test_dlq_show_escapes_control_characters_and_prints_a_copyable_command(
    dead: tuple[str, str, str], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg, dlq, _ = dead
    monkeypatch.setenv("COLUMNS", "80")
    code, out = run(capsys, "dlq", "show", "-c", cfg, "3:11")
    assert code == 0, out
    assert ESC not in out and "\x07" not in out and "\x9b" not in out and "\u202e" not in out
    assert "\\x1b]0;pwned\\x07\\x1b[2Jkey" in out
    assert "x-user\\x1b[1m" in out and "Trace\\x1b[2J" in out
    assert "\\u202eevil" in out
    command = out[out.index("run it in the foreground:"):].splitlines()[1:]
    assert all(len(line) <= 80 for line in command)
    words = shlex.split(" ".join(line.removesuffix("\\") for line in command))
    assert words == ["shunter", "replay", "-c", cfg, "--topic", dlq, "--partition", "3",
                     "--offset", "11"]
    code, out = run(capsys, "dlq", "show", "-c", cfg, "3:11", "--json")
    record = orjson.loads(out)
    assert record["id"] == "3:11" and record["key"].endswith("key")
    assert ESC not in out  # JSON escapes control characters itself


def test_safe_and_command_lines() -> None:
    assert safe("a\x1b[31mb\tc\nd") == "a\\x1b[31mb\\x09c\\x0ad"
    assert safe("a\tb\nc\x00", keep_lines=True) == "a\tb\nc\\x00"
    text = command_lines(["shunter", "replay", "-c", "/a path/with spaces.yaml", "--x", "1"], 30)
    assert all(len(line) <= 30 for line in text.splitlines())
    assert shlex.split(text.replace("\\\n", " ")) == [
        "shunter", "replay", "-c", "/a path/with spaces.yaml", "--x", "1"]


def test_the_foreground_replay_escapes_what_the_message_put_in_the_traceback(
    broker: Broker, unique: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given a handler whose exception quotes the payload (escape sequences included),
    when `shunter replay` runs it, then the traceback reaches the terminal escaped."""
    topic, module = f"gift-{unique}", f"quoting_{unique}"
    (tmp_path / f"{module}.py").write_text(
        "def handler(msg):\n    raise ValueError(msg.value['note'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    broker.create({topic: 1})
    broker.produce(topic, [{"note": "\x1b[2Jcleared"}])
    path = tmp_path / "shunter.yaml"
    path.write_text(yaml.safe_dump(config(
        broker, f"g-{unique}", topics={topic: {}}, categories={"c": {"topics": [topic]}},
        subscribers=[{"caller": "quoter", "category": "c", "handler": f"{module}:handler"}])))
    code, out = run(capsys, "replay", "-c", str(path), "--topic", topic, "--partition", "0",
                    "--offset", "0", "--caller", "quoter")
    assert code == 1, out
    assert "ValueError: \\x1b[2Jcleared" in out and ESC not in out
