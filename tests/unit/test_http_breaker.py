"""The HTTP subscriber's circuit breaker, rate limiter and response contract (no network)."""

from __future__ import annotations

import asyncio
import email.utils

import pytest

from shunter.config import SubscriberConfig
from shunter.deliver.http import _check_budget, idempotency_key
from shunter.deliver.http_breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    CircuitBreaker,
    RateLimiter,
    Refused,
)
from shunter.deliver.http_contract import HttpFailure, Redactor, retry_after, status_error
from shunter.errors import ConfigError, DeadLetter
from shunter.testing import make_message


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock) -> CircuitBreaker:
    return CircuitBreaker("c", "http://hooks", failures=3, cooldown=10.0, clock=clock)


def test_consecutive_failures_open_the_circuit_and_a_success_resets_the_count() -> None:
    async def story() -> None:
        clock = Clock()
        b = breaker(clock)
        for _ in range(2):
            b.failed(await b.admit(), "HTTP 503")
        b.succeeded(await b.admit())
        for _ in range(2):
            b.failed(await b.admit(), "HTTP 503")
        assert b.state == CLOSED
        b.failed(await b.admit(), "HTTP 503")
        assert b.state == OPEN
        clock.now += 4
        with pytest.raises(Refused) as refused:
            await b.admit()
        assert refused.value.delay == pytest.approx(6.0)

    asyncio.run(story())


def test_half_open_sends_one_probe_while_the_others_wait_for_its_result() -> None:
    async def story(probe_ok: bool) -> tuple[str, list[str]]:
        clock = Clock()
        b = breaker(clock)
        stale = await b.admit()
        for _ in range(3):
            b.failed(await b.admit(), "timeout")
        clock.now += 10
        probe = await b.admit()
        assert b.state == HALF_OPEN
        outcomes: list[str] = []

        async def other() -> None:
            try:
                await b.admit()
                outcomes.append("admitted")
            except Refused:
                outcomes.append("refused")

        waiting = [asyncio.create_task(other()) for _ in range(3)]
        await asyncio.sleep(0)
        assert outcomes == []  # nobody went out beside the probe
        b.succeeded(stale)  # a request from before the circuit opened does not count
        assert b.state == HALF_OPEN
        if probe_ok:
            b.succeeded(probe)
        else:
            b.failed(probe, "HTTP 502")
        await asyncio.gather(*waiting)
        return b.state, outcomes

    assert asyncio.run(story(True)) == (CLOSED, ["admitted"] * 3)
    assert asyncio.run(story(False)) == (OPEN, ["refused"] * 3)


def test_rate_limiter_spaces_requests_evenly() -> None:
    clock = Clock()
    limiter = RateLimiter(4, clock)
    assert [limiter.reserve() for _ in range(4)] == [0.0, 0.25, 0.5, 0.75]
    clock.now += 10  # idle: no burst is saved up
    assert [limiter.reserve(), limiter.reserve()] == [0.0, 0.25]


def test_retry_after() -> None:
    now = 1_700_000_000.0
    assert retry_after("7", 300, now) == 7.0
    assert retry_after("7000", 300, now) == 300.0
    assert retry_after(email.utils.formatdate(now + 30, usegmt=True), 300, now) == 30.0
    assert retry_after(email.utils.formatdate(now - 30, usegmt=True), 300, now) == 0.0
    assert retry_after("soon", 300, now) is None
    assert retry_after(None, 300, now) is None
    # Anyone's text: digits float() refuses, dates beyond any calendar, never an exception.
    for hostile in ("²", "٣", "-1", "1e309", "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"):
        assert retry_after(hostile, 300, now) is None, hostile


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 599])
def test_transient_statuses(status: int) -> None:
    error = status_error(status, None, "http://h/x", b"", "3", 300, Redactor([]))
    assert isinstance(error, HttpFailure)
    assert error.delay == (3.0 if status in (429, 503) else None)  # Retry-After: 429/503 only


@pytest.mark.parametrize("status", [301, 302, 400, 401, 403, 404, 409, 410, 422, 451])
def test_permanent_statuses_carry_a_bounded_masked_body(status: int) -> None:
    body = b"token s3cret rejected " + b"x" * 10_000
    error = status_error(status, None, "http://h/x", body, None, 300, Redactor(["s3cret"]))
    assert isinstance(error, DeadLetter)
    assert error.reason.startswith(f"HTTP {status} ")
    assert "s3cret" not in error.reason and "token *** rejected" in error.reason
    assert len(error.reason) < 1200


def test_idempotency_key_is_stable_across_attempts_and_distinct_per_delivery() -> None:
    first = make_message({"n": 1}, offset=5, caller="a")
    assert idempotency_key(first) == idempotency_key(
        make_message({"n": 1}, offset=5, caller="a", attempt=4)
    )
    assert idempotency_key(first) != idempotency_key(make_message({"n": 1}, offset=5, caller="b"))
    assert idempotency_key(first) != idempotency_key(make_message({"n": 1}, offset=6, caller="a"))


def test_rate_limit_must_fit_the_delivery_timeout() -> None:
    def sub(**extra: object) -> SubscriberConfig:
        return SubscriberConfig.model_validate(
            {
                "caller": "a",
                "category": "c",
                **extra,
                "http": {"url": "https://h.example/x", "rate_limit": 2, "timeout": "5s"},
            }
        )

    _check_budget(sub(concurrency=40, timeout="30s"), "subscribers[0]", 5.0)
    with pytest.raises(ConfigError) as refused:
        _check_budget(sub(concurrency=64, timeout="30s"), "subscribers[0]", 5.0)
    assert "subscribers[0].concurrency" in str(refused.value)
    assert "set concurrency to at most 50, or timeout to at least 37s" in str(refused.value)


def test_a_json_body_carries_what_the_decoder_keeps_and_orjson_refuses() -> None:
    """Integers wider than 64 bits and nesting deeper than orjson's 254 levels are valid
    JSON the decoder keeps: they are sent as JSON (not dead-lettered), and read back the
    same; a value no JSON can carry is still a DeadLetter."""
    import json
    from types import SimpleNamespace

    import pytest

    from shunter.deliver.http import HttpSubscriber
    from shunter.errors import DeadLetter
    from shunter.testing import make_message

    deep: object = 1
    for _ in range(300):
        deep = [deep]
    sub = SimpleNamespace(raw=False, content_type="application/octet-stream")
    for value in ({"amount": 2**70, "id": -(2**65)}, {"deep": deep}):
        msg = make_message(value, raw=b"{}")  # the payload is not what is sent
        body, content_type = HttpSubscriber._body(sub, msg)  # type: ignore[arg-type]
        assert content_type == "application/json" and json.loads(body) == value
    unsendable = make_message({"x": 1})
    unsendable._record.value = {"x": {1, 2}}  # a set: a decoder of the user's own made it
    with pytest.raises(DeadLetter, match="cannot be sent as JSON"):
        HttpSubscriber._body(sub, unsendable)  # type: ignore[arg-type]
