"""Answering a skip request when the control topic refuses a write: logged, and the
request stays in the control topic, to be applied again at the next assignment."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from shunter.service import Service
from shunter.settle import skip

REQUEST = skip.SkipRequest("gifts", 2, 41, "medal")


class Control:
    """The control topic's writes, the n-th of which fails."""

    def __init__(self, fail_at: int) -> None:
        self.table: dict[str, bytes] = {}
        self.puts: list[tuple[str, bytes | None]] = []
        self.fail_at = fail_at

    async def put(self, key: str, value: bytes | None) -> None:
        if len(self.puts) + 1 == self.fail_at:
            self.puts.append((key, b"<refused>"))
            raise RuntimeError("write to the control topic failed: broker down")
        self.puts.append((key, value))


def answer(control: Control, committed_past: bool = True) -> None:
    pipeline = SimpleNamespace(
        committed_past=lambda tp, offset: committed_past,
        started_at={(REQUEST.topic, REQUEST.partition): 0},
    )
    service: Any = SimpleNamespace(control=control, pipeline=pipeline)
    service._answer = lambda request, asked_ms: Service._answer(service, request, asked_ms)
    asyncio.run(Service._answer_skip(service, REQUEST, "skipped", 1_700_000_000_000))


def test_a_refused_answer_is_logged_and_the_request_is_not_withdrawn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    control = Control(fail_at=1)
    answer(control)
    assert [key for key, _ in control.puts] == [REQUEST.result_key]  # no tombstone after it
    assert f"answering the skip request {REQUEST.key} failed" in caplog.text


def test_a_refused_withdrawal_is_logged_and_the_request_stays(
    caplog: pytest.LogCaptureFixture,
) -> None:
    control = Control(fail_at=2)
    answer(control)
    assert [key for key, _ in control.puts] == [REQUEST.result_key, REQUEST.key]
    assert control.puts[1][1] == b"<refused>"  # the tombstone's write, refused
    assert f"answering the skip request {REQUEST.key} failed" in caplog.text


def test_both_written_when_the_control_topic_takes_them() -> None:
    control = Control(fail_at=0)
    answer(control)
    assert control.puts[0][0] == REQUEST.result_key and control.puts[0][1] is not None
    assert control.puts[1] == (REQUEST.key, None)  # the tombstone: withdrawn
