"""R2 — three instances joining and leaving.

Given a live stream on ``partitions`` partitions and three subscribers that append a
receipt per delivery, when three instance slots of one consumer group each run an
instance for a random 10-30 s, let it leave (SIGTERM: drain, commit, leave the group) and
start a replacement after a short random gap, for ``duration`` seconds, then once the
last instances have caught up and committed everything, every (message, subscriber) pair
has a receipt (lost = 0) and the duplicates are no more than the sum of the in-flight
windows at the departures.

``spacing`` keeps that many seconds between any two membership events (a join or a
departure); 0 on Apache Kafka. The embedded Tansu broker needs it: with events every few
seconds its group coordinator stops assigning partitions at all, to plain confluent-kafka
consumers too (README.md, "Broker limitations").

Departures are graceful here (membership churn: scaling, deploys); abrupt deaths are
R1's subject. The window at a departure is measured like R1's: once the instance has
exited, the pairs *it* receipted (each receipt names its process) at or past the
committed offset of their partition. The spec promises that a revoked partition
is drained and committed before it is released, so this should be 0; a join revokes
partitions from running instances the same way, so joins add no window.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from kafkatools import Broker, ShunterProcess

from .harness import (
    CALLERS,
    Ledger,
    LiveProducer,
    Scene,
    broker_label,
    caught_up,
    committed,
    dead_letters,
    expected_pairs,
    log,
    stop,
    tally,
    wait_until,
    window,
)


@dataclass
class Slot:
    index: int
    proc: ShunterProcess | None = None
    leave_at: float = 0.0
    join_at: float = 0.0
    leaving_since: float = 0.0
    lives: list[dict[str, Any]] = field(default_factory=list)


def run(
    scene: Scene,
    *,
    duration: float = 300.0,
    rate: float = 200.0,
    partitions: int = 6,
    instances: int = 3,
    life: tuple[float, float] = (10.0, 30.0),
    gap: tuple[float, float] = (0.0, 3.0),
    spacing: float = 0.0,
    seed: int = 6002,
    pause: float = 0.001,
    kafka: dict[str, Any] | None = None,
    catch_up_stall: float = 180.0,
) -> dict[str, Any]:
    broker: Broker = scene.broker
    rng = random.Random(seed)
    messages = int(duration * rate)
    broker.create({scene.topic: partitions})
    config = scene.write_config(partitions=partitions, kafka=kafka)
    ledger = Ledger(scene.ledger_path)
    env = scene.env(pause=pause)
    stream = LiveProducer(
        broker,
        scene.topic,
        messages,
        rate,
        lambda i: (f"user-{i % 997}".encode(), b'{"n": %d}' % i),
    )
    slots = [Slot(i, join_at=time.monotonic() + 2.0 * i) for i in range(instances)]
    counter = [0]
    last_event = [0.0]  # when an instance last joined or left (for ``spacing``)
    departures: list[dict[str, Any]] = []
    failure = ""
    final_status: list[int | None] = []
    coords: list[tuple[int, int]] = []

    def join(slot: Slot, now: float) -> None:
        counter[0] += 1
        last_event[0] = now
        slot.proc = scene.dispatcher(config, env=env, log_name=f"instance-{counter[0]}.log").start()
        slot.leave_at = now + rng.uniform(*life)
        slot.leaving_since = 0.0
        slot.lives.append({"instance": counter[0], "joined_s": round(now - stream.began, 1)})

    def depart(slot: Slot, now: float) -> None:
        assert slot.proc is not None
        proc = slot.proc
        assert proc.process is not None
        text = proc.log_tail(10_000_000)
        offsets = committed(broker, scene.group, scene.topic, partitions)
        win = window(ledger, offsets, pid=proc.process.pid)
        status = proc.process.returncode
        departures.append(
            {
                "instance": slot.lives[-1]["instance"],
                "left_s": round(now - stream.began, 1),
                "exit_status": status,
                "window_pairs": win,
                "stop_s": round(now - slot.leaving_since, 1),
                "revocation_commits_failed": text.count("commit on revocation failed"),
                "drain_timeouts": text.count("still unsettled after"),
            }
        )
        log(
            f"R2: instance {slot.lives[-1]['instance']} left at {now - stream.began:.0f}s "
            f"(exit {status}, window {win})"
        )
        slot.proc = None
        slot.join_at = now + rng.uniform(*gap)

    stream.start()
    try:
        end = stream.began + duration
        while time.monotonic() < end:
            now = time.monotonic()
            for slot in slots:
                if slot.proc is None:
                    if now >= slot.join_at and now - last_event[0] >= spacing:
                        join(slot, now)
                elif slot.leaving_since:
                    if not slot.proc.alive():
                        depart(slot, now)
                    elif now - slot.leaving_since > 120:
                        raise AssertionError("R2: an instance did not stop within 120s")
                elif not slot.proc.alive():
                    raise AssertionError(
                        f"R2: instance {slot.lives[-1]['instance']} exited on its own "
                        f"(status {slot.proc.process.returncode if slot.proc.process else '?'})"
                    )
                elif (
                    now >= slot.leave_at and now - last_event[0] >= spacing and _serving(slot.proc)
                ):
                    slot.proc.terminate()
                    slot.leaving_since = last_event[0] = now
            time.sleep(0.1)
        # Churn over: let every slot settle into a running instance, then catch up.
        for slot in slots:
            if slot.proc is not None and slot.leaving_since:
                wait_until(lambda s=slot: not s.proc.alive(), timeout=120, what="R2 leave")
                depart(slot, time.monotonic())
            if slot.proc is None:
                time.sleep(max(0.0, last_event[0] + spacing - time.monotonic()))
                join(slot, time.monotonic())
        coords = stream.join(600)
        wait_until(
            caught_up(broker, scene, partitions, coords),
            timeout=1800,
            what="R2 catching up",
            alive=lambda: any(s.proc is not None and s.proc.alive() for s in slots),
            progress=ledger.refresh,
            stall=catch_up_stall,
        )
    except Exception as exc:
        failure = f"{type(exc).__name__}: {exc}"
        log(f"R2: {failure}")
    finally:
        for slot in slots:
            if slot.proc is not None:
                final_status.append(stop(slot.proc))
    if not coords:
        coords = stream.join(600)
    expected = expected_pairs(scene.topic, coords, CALLERS)
    figures = tally(ledger, expected)
    dlq = dead_letters(broker, scene.dlq)
    windows = [d["window_pairs"] for d in departures]
    logs = [p.read_text(errors="replace") for p in sorted(scene.workdir.glob("instance-*.log"))]
    revocation_failures = sum(t.count("commit on revocation failed") for t in logs)
    commit_failures = sum(t.count("commit failed:") for t in logs)
    result: dict[str, Any] = {
        "scenario": "R2 instances joining and leaving",
        "broker": broker_label(broker),
        "messages": messages,
        "rate_per_s": rate,
        "duration_s": duration,
        "partitions": partitions,
        "subscribers": len(CALLERS),
        "instances": instances,
        "joins": counter[0],
        "departures": len(departures),
        "spacing_s": spacing,
        "seed": seed,
        **figures,
        "dead_letters": len(dlq),
        "window_sum_pairs": sum(windows),
        "drain_timeouts": sum(t.count("still unsettled after") for t in logs),
        "revocation_commits_failed": revocation_failures,
        "periodic_commits_failed": commit_failures,
        "departure_exit_statuses": sorted({str(d["exit_status"]) for d in departures}),
        "final_exit_statuses": final_status,
        "failure": failure,
        "departure_log": departures,
    }
    result["checks"] = {
        "lost == 0": figures["lost"] == 0 and not failure,
        "duplicates <= sum of measured windows": figures["duplicates"] <= sum(windows),
        "every revoked partition committed before release (spec)": revocation_failures == 0,
        "every departure exited 0": all(d["exit_status"] == 0 for d in departures),
        "no dead letters": not dlq,
        "no receipt of an unexpected pair": figures["unexpected"] == 0,
        "final SIGTERMs exit 0": all(s == 0 for s in final_status),
    }
    return result


def _serving(proc: ShunterProcess) -> bool:
    return "shunter is running" in proc.log_tail(200_000)
