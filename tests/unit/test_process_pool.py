"""``isolation: process`` without Kafka: what a handler raises in a worker keeps its
meaning in the dispatcher, a timeout kills the worker and the pool replaces it, and a
handler workers could not import is refused at start.

The handlers are module-level: worker processes import them from here."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest

import shunter
from shunter.config import SubscriberConfig
from shunter.deliver import SubscriberRuntime
from shunter.deliver.process import WorkerPool, process_invoke
from shunter.errors import ConfigError
from shunter.outcome import SUCCEEDED, DeadLettered, Failed, Outcome
from shunter.testing import make_message


def behaves_as_told(msg: shunter.Message) -> None:
    what = msg.value["do"]
    if what == "retry":
        raise shunter.RetryLater(delay=7, reason="the ledger is locked")
    if what == "dead":
        raise shunter.DeadLetter("unknown gift id")
    if what == "raise":
        raise KeyError("anchor_level")
    if what == "hang":
        time.sleep(60)


def hangs_in_place(msg: shunter.Message) -> None:
    if msg.value["do"] == "ignore SIGABRT":  # a handler that took the signal for itself
        signal.signal(signal.SIGABRT, signal.SIG_IGN)
    if msg.value["do"] != "ok":
        time.sleep(3600)


async def behaves_as_told_async(msg: shunter.Message) -> None:
    await asyncio.sleep(0.001)
    behaves_as_told(msg)


def run(handler: Any, values: list[str], timeout: float = 10.0) -> list[Outcome]:
    """Deliver one message per value through a 2-worker pool; outcomes in value order."""
    sub = SubscriberConfig(caller="medal", category="revenue", isolation="process", workers=2,
                           timeout=timeout)
    settled: dict[int, Outcome] = {}

    async def scenario() -> None:
        invoke, close = process_invoke(handler, sub, "subscribers[0]")
        done = asyncio.Event()

        def settle(msg: shunter.Message, outcome: Outcome, elapsed: float) -> None:
            settled[msg.offset] = outcome
            if len(settled) == len(values):
                done.set()

        rt = SubscriberRuntime("medal", invoke, settle, ordering="none", concurrency=2,
                               timeout=timeout)
        for i, value in enumerate(values):
            rt.submit(make_message({"do": value}, offset=i, caller="medal"))
        rt.kick()
        try:
            await asyncio.wait_for(done.wait(), 60)
        finally:
            await close()

    asyncio.run(scenario())
    return [settled[i] for i in range(len(values))]


@pytest.mark.parametrize("handler", [behaves_as_told, behaves_as_told_async])
def test_what_a_worker_raises_keeps_its_meaning(handler: Any) -> None:
    """Given sync and async handlers in worker processes, when they return, raise
    RetryLater, DeadLetter or a KeyError, then the outcomes are those of an in-process
    handler: success, a failure with the handler's delay, a dead letter with its reason,
    and a KeyError whose traceback shows the worker's failing line."""
    ok, retry, dead, error = run(handler, ["ok", "retry", "dead", "raise"])
    assert ok is SUCCEEDED
    assert isinstance(retry, Failed) and retry.delay == 7
    assert (retry.error_type, retry.error) == ("shunter.errors.RetryLater", "the ledger is locked")
    assert isinstance(dead, DeadLettered) and dead.reason == "unknown gift id"
    assert isinstance(error, Failed) and error.error_type == "KeyError"
    assert error.error == "'anchor_level'"
    assert 'raise KeyError("anchor_level")' in error.traceback


def test_a_delivery_past_its_timeout_kills_its_worker_and_the_pool_goes_on() -> None:
    """Given a 3 s timeout (worker start-up included, on a loaded machine), when one
    delivery hangs, then it fails as a DeliveryTimeout and its worker is killed, and the
    deliveries after it still run and succeed."""
    outcomes = run(behaves_as_told, ["hang", "ok", "ok", "ok", "ok"], timeout=3.0)
    hung, *rest = outcomes
    assert isinstance(hung, Failed) and hung.error_type == "shunter.errors.DeliveryTimeout"
    assert rest == [SUCCEEDED] * 4


def test_abort_returns_where_a_hanging_worker_is_stuck_and_the_pool_goes_on() -> None:
    """Given a delivery hanging in a worker, when the pool aborts it (what the crash
    guard's sandbox does to see where a suspect hangs), then the worker's faulthandler
    dump names the hanging line; a worker whose handler ignores SIGABRT is killed after
    the grace, with no dump; either way the delivery is cancelled and the pool's next
    delivery succeeds on a fresh worker."""

    async def scenario() -> list[str]:
        pool = WorkerPool("medal", "test_process_pool:hangs_in_place", 1).start()
        dumps = []
        try:
            for do in ("hang", "ignore SIGABRT"):
                running = pool.run(make_message({"do": do}, caller="medal"))
                await asyncio.sleep(2.0)  # started (a worker's start-up), and hanging
                assert not running.done()
                dumps.append(await asyncio.wait_for(pool.abort(running), 30))
                assert running.cancelled()
            ok = await asyncio.wait_for(pool.run(make_message({"do": "ok"}, caller="medal")), 30)
            assert ok is None, "the next delivery succeeds"
        finally:
            await pool.close()
        return dumps

    hang, ignored = asyncio.run(scenario())
    assert "Fatal Python error: Aborted" in hang and "in hangs_in_place" in hang, hang
    assert ignored == ""


def test_a_handler_workers_cannot_import_is_refused_at_start() -> None:
    """Given a handler defined inside a function (no import path, not picklable by
    reference), when its process pool is built, then a ConfigError names the key path."""

    def local(msg: shunter.Message) -> None:
        pass

    sub = SubscriberConfig(caller="medal", category="revenue", isolation="process")

    async def build() -> None:
        process_invoke(local, sub, "subscribers[3]")

    with pytest.raises(ConfigError, match=r"subscribers\[3\]\.isolation: 'process' needs"):
        asyncio.run(build())
