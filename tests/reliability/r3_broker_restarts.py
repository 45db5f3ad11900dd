"""R3 — the Apache Kafka broker killed and restarted mid-stream.

Given an Apache Kafka broker of this scenario's own (its own port and data directory, so
no other test's broker is touched), a live stream and three subscribers that append a
receipt per delivery, when the broker is SIGKILLed ``cycles`` times mid-stream and
started again on the same data each time, then the dispatcher never exits, it delivers
again within ``resume_limit`` seconds of the broker's return (measured from the moment
``scripts/kafka/kafka start`` reports the broker ready to the first receipt appended
after it), and once it has caught up every (message, subscriber) pair has a receipt.

Duplicates are reported, not bounded: a broker crash may lose the group's session and
every partition's unacknowledged commit at once.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Any

from kafkatools import Broker

from .harness import (
    CALLERS,
    KafkaNode,
    Ledger,
    LiveProducer,
    Scene,
    broker_label,
    caught_up,
    dead_letters,
    expected_pairs,
    log,
    stop,
    tally,
    wait_until,
)


def run(
    workdir: Path,
    *,
    cycles: int = 5,
    rate: float = 200.0,
    partitions: int = 4,
    up: tuple[float, float] = (10.0, 20.0),
    down: tuple[float, float] = (2.0, 8.0),
    resume_limit: float = 60.0,
    seed: int = 6003,
    pause: float = 0.001,
    catch_up_stall: float = 180.0,
) -> dict[str, Any]:
    rng = random.Random(seed)
    node = KafkaNode(workdir / "kafka-data")
    log(f"R3: starting a broker of its own on port {node.port} (data {node.data})")
    node.start(fresh=True)
    broker = Broker("kafka", node.bootstrap)
    scene = Scene(broker, workdir / "scene", "r3")
    cycles_log: list[dict[str, Any]] = []
    failure = ""
    status: int | None = None
    coords: list[tuple[int, int]] = []
    longest = cycles * (up[1] + down[1] + 30) + 60
    stream = LiveProducer(
        broker,
        scene.topic,
        int(rate * longest),
        rate,
        lambda i: (f"user-{i % 997}".encode(), b'{"n": %d}' % i),
    )
    ledger = Ledger(scene.ledger_path)
    proc = None
    try:
        broker.create({scene.topic: partitions})
        config = scene.write_config(partitions=partitions)
        proc = scene.dispatcher(config, env=scene.env(pause=pause)).start()
        stream.start()
        wait_until(
            lambda: ledger.refresh() > 0, timeout=120, what="R3 first delivery", alive=proc.alive
        )
        for c in range(1, cycles + 1):
            _sleep_alive(rng.uniform(*up), proc)
            before_kill = ledger.refresh()
            node.kill()
            killed = time.monotonic()
            downtime = rng.uniform(*down)
            _sleep_alive(downtime, proc)
            at_start = ledger.refresh()
            node.start()
            back = time.monotonic()
            at_back = ledger.refresh()
            try:
                resumed = wait_until(
                    lambda at_back=at_back: ledger.refresh() > at_back,
                    timeout=max(resume_limit * 3, 120),
                    what=f"R3 delivering after broker restart {c}",
                    alive=proc.alive,
                    interval=0.02,
                )
            except AssertionError as exc:
                resumed = None
                failure = str(exc)
            cycles_log.append(
                {
                    "cycle": c,
                    "broker_down_s": round(back - killed, 1),
                    "receipts_at_kill": before_kill,
                    "receipts_while_down": at_back - before_kill,
                    "receipts_during_restart": at_back - at_start,
                    "resume_after_broker_back_s": None if resumed is None else round(resumed, 2),
                }
            )
            log(
                f"R3: broker cycle {c}/{cycles}: down {back - killed:.1f}s, delivering again "
                f"{'never' if resumed is None else f'{resumed:.1f}s'} after its return"
            )
            if resumed is None:
                break
        stream.halt()
        coords = stream.join(600)
        wait_until(
            caught_up(broker, scene, partitions, coords),
            timeout=1200,
            what="R3 catching up",
            alive=proc.alive,
            progress=ledger.refresh,
            stall=catch_up_stall,
        )
    except Exception as exc:
        failure = failure or f"{type(exc).__name__}: {exc}"
        log(f"R3: {failure}")
    finally:
        alive_to_the_end = proc is not None and proc.alive()
        if proc is not None:
            status = stop(proc)
        stream.halt()
    try:
        if not coords:
            coords = stream.join(600)
        expected = expected_pairs(scene.topic, coords, CALLERS)
        figures = tally(ledger, expected)
        quarantined = [i for i in dead_letters(broker, scene.dlq) if i.stage == "crash"]
    finally:
        node.stop()
    resumes = [c["resume_after_broker_back_s"] for c in cycles_log]
    text = proc.log_tail(50_000_000) if proc is not None else ""
    pid = proc.process.pid if proc is not None and proc.process is not None else -1
    # The dispatcher never died, so a crash-guard warning naming its own pid as the
    # "previous owner" that "died with deliveries in flight" is a misattribution.
    self_blamed = len(re.findall(rf":{pid}:[0-9a-f]+\) died with deliveries in flight", text))
    result: dict[str, Any] = {
        "scenario": "R3 Apache Kafka broker killed and restarted",
        "broker": broker_label(broker) + f" (own data dir {node.data})",
        "messages": len(coords),
        "rate_per_s": rate,
        "partitions": partitions,
        "subscribers": len(CALLERS),
        "broker_kills": len(cycles_log),
        "seed": seed,
        **figures,
        "resume_after_broker_back_s": resumes,
        "resume_max_s": max((r for r in resumes if r is not None), default=None),
        "dispatcher_alive_throughout": alive_to_the_end,
        "final_exit_status": status,
        "partitions_lost_logged": text.count("shunter.consume: lost "),
        "windows_blamed_on_a_crash_of_itself": self_blamed,
        "quarantined": len(quarantined),
        "consumer_errors_logged": text.count("consumer error:"),
        "journal_write_retries_logged": text.count("journal write for"),
        "failure": failure,
        "cycle_log": cycles_log,
    }
    result["checks"] = {
        "lost == 0": figures["lost"] == 0 and not failure,
        "the dispatcher never exited": alive_to_the_end,
        f"resumed within {resume_limit:.0f}s of every broker return": (
            len(resumes) == cycles and all(r is not None and r <= resume_limit for r in resumes)
        ),
        "no crash counted against the live dispatcher": self_blamed == 0,
        "no message quarantined (nothing crashed)": not quarantined,
        "no receipt of an unexpected pair": figures["unexpected"] == 0,
        "final SIGTERM exits 0": status == 0,
    }
    return result


def _sleep_alive(seconds: float, proc: Any) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not proc.alive():
            raise AssertionError("R3: the dispatcher exited")
        time.sleep(0.1)
