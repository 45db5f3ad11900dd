"""The bench's CPU per thread group: a busy thread's time lands in its own group and not
in the others, a process given as the broker is read whole, and a side's passes add up."""

from __future__ import annotations

import os
import threading
import time

import pytest
from confluent_kafka import Producer

from shunter.bench import threads
from shunter.bench.dispatch import DispatchTiming


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_busy_thread_is_counted_in_its_group_and_nowhere_else() -> None:
    spun, leave = threading.Event(), threading.Event()

    def spin_then_wait() -> None:
        _spin(0.2)
        spun.set()
        leave.wait()  # alive at the second snapshot: an ended thread's time goes with it

    worker = threading.Thread(target=spin_then_wait, name="shunter-consumer")
    before = threads.snapshot()
    worker.start()
    try:
        assert spun.wait(10)
        spent = threads.spent(before, threads.snapshot())
    finally:
        leave.set()
        worker.join()
    assert 0.19 <= spent["consumer"] < 0.5
    assert spent["main"] < 0.1  # it only waited
    assert spent.get("producers", 0.0) == 0.0
    assert "broker" not in spent  # none was given


def test_a_process_given_as_the_broker_is_read_whole() -> None:
    before = threads.snapshot(broker_pid=os.getpid())
    _spin(0.2)
    spent = threads.spent(before, threads.snapshot(broker_pid=os.getpid()))
    assert spent["main"] >= 0.19
    assert spent["broker"] >= 0.15  # from /proc: clock ticks of 10 ms


def test_librdkafka_threads_are_a_group_of_their_own() -> None:
    producer = Producer({"bootstrap.servers": "127.0.0.1:1", "log_level": 0})
    try:
        snapshot = threads.snapshot()
    finally:
        producer.flush(0)
    assert "librdkafka" in snapshot  # its rdk: threads, read from /proc by their names
    assert "main" in snapshot


def test_two_passes_add_up_and_shares_are_of_the_wall_time() -> None:
    one = DispatchTiming(100, 1.0, 0.9, threads={"main": 0.8, "broker": 0.1})
    two = DispatchTiming(100, 3.0, 0.9, threads={"main": 2.4, "consumer": 0.3})
    both = one.plus(two)
    assert both.threads == pytest.approx({"main": 3.2, "broker": 0.1, "consumer": 0.3})
    assert both.cpu_shares("x_") == {
        "x_broker_cpu": 0.025,
        "x_consumer_cpu": 0.075,
        "x_main_cpu": 0.8,
    }
