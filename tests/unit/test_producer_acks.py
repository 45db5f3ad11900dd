"""The producer's acknowledgements reach the loop: each once, in order, whatever one does.

No broker: the records go to a closed loopback port and time out, which librdkafka reports
through the same delivery callback as a broker's answer."""

from __future__ import annotations

import asyncio

import pytest
from confluent_kafka import KafkaError

from shunter.settle.producer import ReliableProducer


def test_every_write_is_answered_once_in_order_even_past_a_failing_callback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    answered = asyncio.run(_write(20))
    assert [i for i, _ in answered] == list(range(20))
    assert {code for _, code in answered} == {KafkaError._MSG_TIMED_OUT}
    assert "handling a write's acknowledgement failed" in caplog.text


async def _write(count: int) -> list[tuple[int, int | None]]:
    loop = asyncio.get_running_loop()
    producer = ReliableProducer(
        {"bootstrap.servers": "127.0.0.1:1", "message.timeout.ms": 300, "log_level": 0}, loop
    )
    answered: list[tuple[int, int | None]] = []
    all_in = asyncio.Event()

    def done_for(i: int) -> object:
        def done(err: KafkaError | None) -> None:
            assert asyncio.get_running_loop() is loop  # on the loop, not the poller's thread
            answered.append((i, None if err is None else err.code()))
            if len(answered) == count:
                all_in.set()
            if i == 3:
                raise RuntimeError("a callback's own bug")

        return done

    try:
        for i in range(count):
            producer.send("acks", None, b"x", [], done_for(i))  # type: ignore[arg-type]
        await asyncio.wait_for(all_in.wait(), 10)
        await asyncio.sleep(0.2)  # nothing answered twice
    finally:
        await asyncio.to_thread(producer.close, 1.0)
    return answered
