"""R5 — crash pills.

Given ``messages`` messages among which a few are pills (one per kind: a segfault in C
code, ``os._exit``, SIGKILL as the OOM killer sends it, and a memory pill that allocates
2 GiB, then is killed as the OOM killer would on a smaller machine) and three
subscribers, one of which (``task``) dies on a pill, when supervised ``shunter run``
consumes them, then each pill is quarantined to the dead-letter topic with stage
``crash`` after at most ``quarantine_after`` deaths it caused (the handler notes each
fatal run in a crash ledger just before dying), of which at most one is the
dispatcher's (the re-runs die in sandboxes; a sandbox's memory limit stops the memory
pill there), no other message is quarantined, and every other (message, subscriber)
pair is delivered.
"""

from __future__ import annotations

import random
import time
from typing import Any

from kafkatools import Broker

from .harness import (
    CALLERS,
    Ledger,
    Scene,
    broker_label,
    caught_up,
    dead_letters,
    expected_pairs,
    log,
    produce,
    stop,
    tally,
    wait_until,
)

KINDS = ("segfault", "exit", "sigkill", "memory")

PILL_HANDLERS = '''
"""Receipt handlers; ``task`` dies on a pill, noting it in the crash ledger first."""
import asyncio
import ctypes
import os
import signal

_fd = os.open(os.environ["SHUNTER_TEST_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
_crash = os.open(os.environ["SHUNTER_TEST_CRASHES"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
_pause = float(os.environ.get("SHUNTER_TEST_PAUSE", "0.001"))
_pid = os.getpid()


def _receipt(caller, msg):
    os.write(_fd, f"{caller},{msg.topic},{msg.partition},{msg.offset},{_pid}\\n".encode())


async def medal(msg):
    await asyncio.sleep(_pause)
    _receipt("medal", msg)


async def rank(msg):
    await asyncio.sleep(_pause)
    _receipt("rank", msg)


def task(msg):
    pill = msg.value.get("pill")
    if pill:
        os.write(_crash, f"{pill},{msg.topic},{msg.partition},{msg.offset},{_pid}\\n".encode())
        if pill == "segfault":
            ctypes.string_at(0)                    # SIGSEGV inside a C call
        elif pill == "exit":
            os._exit(3)                            # no cleanup, no exception
        elif pill == "memory":
            hog = bytearray(2 << 30)               # past a sandbox's limit: MemoryError
            os.kill(os.getpid(), signal.SIGKILL)   # here, what the OOM killer does next
        else:
            os.kill(os.getpid(), signal.SIGKILL)   # what the OOM killer does
    _receipt("task", msg)
'''


def run(
    scene: Scene,
    *,
    messages: int = 10_000,
    partitions: int = 4,
    kinds: tuple[str, ...] = KINDS,
    quarantine_after: int = 3,
    seed: int = 6005,
    pause: float = 0.001,
    timeout: float = 900.0,
) -> dict[str, Any]:
    broker: Broker = scene.broker
    rng = random.Random(seed)
    (scene.workdir / "rel_pills.py").write_text(PILL_HANDLERS)
    crash_ledger = scene.workdir / "crashes.txt"
    broker.create({scene.topic: partitions})
    # One pill per kind, spread over the stream (never in the first or last 5%).
    slots = sorted(rng.sample(range(messages // 20, messages - messages // 20), len(kinds)))
    pills = dict(zip(slots, kinds, strict=True))
    values = [
        b'{"n": %d, "pill": "%s"}' % (i, pills[i].encode()) if i in pills else b'{"n": %d}' % i
        for i in range(messages)
    ]
    coords = produce(
        broker, scene.topic, ((f"user-{i % 997}".encode(), v) for i, v in enumerate(values))
    )
    pill_at = {coords[i]: kind for i, kind in pills.items()}
    config = scene.write_config(
        partitions=partitions,
        handlers="rel_pills",
        crash_guard={"quarantine_after": quarantine_after},
    )
    env = scene.env(pause=pause, SHUNTER_TEST_CRASHES=str(crash_ledger))
    ledger = Ledger(scene.ledger_path)
    # Enough restarts that the supervisor outlasts every pill: the check below is on
    # the restarts each pill caused, not on the supervisor's own give-up limit.
    restarts_allowed = len(kinds) * quarantine_after * 2 + 5
    proc = scene.dispatcher(
        config, supervise=True, env=env, args=("--max-restarts", str(restarts_allowed))
    )
    began = time.monotonic()
    failure = ""
    proc.start()
    try:
        wait_until(
            caught_up(broker, scene, partitions, coords),
            timeout=timeout,
            what="R5 settling every message",
            alive=proc.alive,
            progress=ledger.refresh,
            stall=timeout / 2,
        )
    except Exception as exc:
        failure = f"{type(exc).__name__}: {exc}"
        log(f"R5: {failure}")
    elapsed = time.monotonic() - began
    status = stop(proc)
    others = [c for c in coords if c not in pill_at]
    expected = expected_pairs(scene.topic, others, CALLERS)
    figures = tally(ledger, expected)
    runs: dict[tuple[int, int], int] = {}
    if crash_ledger.exists():
        for line in crash_ledger.read_text().splitlines():
            _kind, _topic, partition, offset, _pid = line.split(",")
            runs[(int(partition), int(offset))] = runs.get((int(partition), int(offset)), 0) + 1
    dlq = dead_letters(broker, scene.dlq)
    crash = {
        (i.origin_partition, i.origin_offset): i
        for i in dlq
        if i.stage == "crash" and i.origin_topic == scene.topic
    }
    text = proc.log_tail(50_000_000)
    restarts = text.count("restarting in")
    per_pill = [
        {
            "kind": kind,
            "partition": c[0],
            "offset": c[1],
            "deaths_caused": runs.get(c, 0),
            "quarantined": c in crash,
            "reason": crash[c].error if c in crash else "",
            "signal_header": crash[c].signal if c in crash else "",
            "completed_for_task": ("task", scene.topic, *c) in ledger.counts,
        }
        for c, kind in sorted(pill_at.items(), key=lambda kv: kv[1])
    ]
    innocent = sorted(c for c in crash if c not in pill_at)
    log(
        f"R5: {len(pill_at)} pills, {restarts} restarts, {len(crash)} quarantined in {elapsed:.0f}s"
    )
    result: dict[str, Any] = {
        "scenario": "R5 crash pills",
        "broker": broker_label(broker),
        "messages": messages,
        "partitions": partitions,
        "subscribers": len(CALLERS),
        "pills": len(pill_at),
        "quarantine_after": quarantine_after,
        "seed": seed,
        "elapsed_s": round(elapsed, 1),
        **figures,
        "restarts": restarts,
        "quarantined": len(crash),
        "innocent_quarantined": len(innocent),
        "supervisor_gave_up": "giving up" in text,
        "final_exit_status": status,
        "failure": failure,
        "pill_log": per_pill,
    }
    result["checks"] = {
        "every pill quarantined with stage crash": all(p["quarantined"] for p in per_pill),
        f"each pill caused <= {quarantine_after} deaths": all(
            p["deaths_caused"] <= quarantine_after for p in per_pill
        ),
        "no pill ever completed": not any(p["completed_for_task"] for p in per_pill),
        "no innocent message quarantined": not innocent,
        "0 other pairs lost": figures["lost"] == 0 and not failure,
        "at most one dispatcher death per pill": restarts <= len(pill_at),
        "final SIGTERM exits 0": status == 0,
    }
    return result
