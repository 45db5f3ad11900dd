"""Given a handler that kills the interpreter on one message among many, when shunter
runs under its supervisor, then the process restarts at most ``quarantine_after`` times,
that message lands in the dead-letter topic with reason ``crash`` without running
again, and every other (message, subscriber) pair is delivered."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from kafkatools import Broker, pythonpath
from shunter.settle import headers as h

pytestmark = pytest.mark.kafka

MESSAGES = 1200
KILLER = 737

HANDLERS = """
import asyncio, ctypes, os, re, signal, time

LEDGER = os.environ["LEDGER"]
KILL = os.environ["KILL"]

def record(caller, msg):
    with open(LEDGER, "a") as f:
        f.write(f"{caller},{msg.partition},{msg.offset}\\n")

async def steady(msg):
    await asyncio.sleep(0.0005)
    record("steady", msg)

def fragile(msg):
    if msg.value["n"] == KILLER:
        if KILL == "segfault":
            ctypes.string_at(0)          # SIGSEGV inside a C call
        elif KILL == "exit":
            os._exit(1)                  # no cleanup, no exception
        elif KILL == "hang":
            time.sleep(3600)             # blocks the event loop: a sync handler, inline
        elif KILL == "backtrack":        # blocks it holding the GIL: a hostile payload
            re.match(r"(a+)+$", "a" * 64 + "b")
        else:
            os.kill(os.getpid(), signal.SIGKILL)   # what the OOM killer does
    record("fragile", msg)
""".replace("KILLER", str(KILLER))


def write_service(
    tmp: Path,
    broker: Broker,
    group: str,
    topic: str,
    sandbox: bool = True,
    guard: dict[str, object] | None = None,
    fragile: dict[str, object] | None = None,
) -> Path:
    (tmp / "crashy.py").write_text(textwrap.dedent(HANDLERS))
    config = {
        "kafka": {
            "bootstrap_servers": broker.bootstrap,
            "group_id": group,
            "consumer": broker.client,
            "commit_interval": "100ms",
        },
        "topics": {topic: {}},
        "categories": {"revenue": {"topics": [topic]}},
        "subscribers": [
            {"caller": "steady", "category": "revenue", "handler": "crashy:steady"},
            {
                "caller": "fragile",
                "category": "revenue",
                "handler": "crashy:fragile",
                **(fragile or {}),
            },
        ],
        "crash_guard": {"quarantine_after": 3, "sandbox": sandbox, **(guard or {})},
        "admin": {"listen": None},
        "retry": {"partitions": 2},
    }
    path = tmp / "shunter.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(config: Path, tmp: Path, kill: str, *extra: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": pythonpath(tmp),
        "LEDGER": str(tmp / "ledger.txt"),
        "KILL": kill,
    }
    with open(tmp / "service.log", "ab") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, "-m", "shunter.cli.main", "run", "-c", str(config), *extra],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def ledger(tmp: Path) -> set[tuple[str, int, int]]:
    path = tmp / "ledger.txt"
    if not path.exists():
        return set()
    out = set()
    for line in path.read_text().splitlines():
        caller, part, off = line.split(",")
        out.add((caller, int(part), int(off)))
    return out


def killer_coordinates(broker: Broker, topic: str) -> tuple[int, int]:
    import orjson

    for msg in broker.read_all(topic, expect=MESSAGES):
        if orjson.loads(msg.value())["n"] == KILLER:
            return msg.partition(), msg.offset()
    raise AssertionError("killer message not found")


@pytest.mark.parametrize("kill", ["segfault", "exit", "sigkill"])
def test_a_message_that_kills_the_process_is_quarantined(
    broker: Broker, unique: str, tmp_path: Path, kill: str
) -> None:
    topic, group = f"crash-{unique}", f"g-{unique}"
    broker.create({topic: 3})
    broker.produce(topic, [{"n": i} for i in range(MESSAGES)], key=lambda i, v: f"u{i % 17}")
    k_part, k_off = killer_coordinates(broker, topic)
    config = write_service(tmp_path, broker, group, topic)
    proc = start(config, tmp_path, kill)
    try:
        # everything but the killer, for both callers
        want = {
            (c, m.partition(), m.offset())
            for m in broker.read_all(topic, expect=MESSAGES)
            for c in ("steady", "fragile")
        } - {("fragile", k_part, k_off), ("steady", k_part, k_off)}
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not want <= ledger(tmp_path):
            assert proc.poll() is None, (tmp_path / "service.log").read_text()[-3000:]
            time.sleep(0.5)
        dlq = [m for m in broker.read_all(f"{group}.dlq") if m.headers()]
    finally:
        proc.terminate()
        status = proc.wait(60)
    log = (tmp_path / "service.log").read_text()
    missing = want - ledger(tmp_path)
    assert not missing, f"{len(missing)} pairs never delivered, e.g. {sorted(missing)[:5]}"
    restarts = log.count("restarting in")
    assert 1 <= restarts <= 3, log[-3000:]
    crash = [h.decode(m.headers()) for m in dlq]
    crash = [i for i in crash if i.stage == "crash"]
    assert [(i.origin_topic, i.origin_partition, i.origin_offset) for i in crash] == [
        (topic, k_part, k_off)
    ], "exactly the killer is quarantined"
    assert "died 3 times" in crash[0].error
    assert ("fragile", k_part, k_off) not in ledger(tmp_path), "the killer never completed"
    assert status == 0, "SIGTERM drains and exits 0"


@pytest.mark.parametrize(
    ("kill", "death"),
    [
        ("hang", "killed by SIGABRT (the event loop was blocked for 3s, running caller fragile"),
        ("backtrack", "exited with status 1 (the event loop was blocked for 13s holding the GIL"),
    ],
)
def test_a_message_that_blocks_the_event_loop_ends_the_worker_and_is_quarantined(
    broker: Broker, unique: str, tmp_path: Path, kill: str, death: str
) -> None:
    """Given an inline sync handler that blocks the event loop for good on one message
    (its consumer keeps polling on its own thread, so Kafka never takes the partitions
    away), sleeping or backtracking in a regular expression without releasing the GIL,
    when shunter runs under its supervisor, then the worker is ended once after
    ``loop_blocked_restart_after`` (by the watchdog with SIGABRT, or, when the GIL is
    held, by faulthandler's timer 10 s later, the supervisor having logged the stacks
    as soon as the watchdog fell silent; the supervisor saying why), the
    restarted worker re-runs the window in sandboxes, where the message hangs past its
    timeout twice more, and it is quarantined with stage ``crash`` and the stack of the
    blocked loop down to the handler; every other pair is delivered, and SIGTERM drains
    to exit 0."""
    topic, group = f"crashb-{unique}", f"g-{unique}"
    broker.create({topic: 3})
    broker.produce(topic, [{"n": i} for i in range(MESSAGES)], key=lambda i, v: f"u{i % 17}")
    k_part, k_off = killer_coordinates(broker, topic)
    config = write_service(
        tmp_path,
        broker,
        group,
        topic,
        guard={"loop_blocked_after": "500ms", "loop_blocked_restart_after": "3s"},
        fragile={"timeout": "1s"},
    )
    proc = start(config, tmp_path, kill)
    try:
        want = {
            (c, m.partition(), m.offset())
            for m in broker.read_all(topic, expect=MESSAGES)
            for c in ("steady", "fragile")
        } - {("fragile", k_part, k_off)}
        deadline = time.monotonic() + 150
        dlq: list[h.FailureInfo] = []
        while time.monotonic() < deadline and not (want <= ledger(tmp_path) and dlq):
            assert proc.poll() is None, (tmp_path / "service.log").read_text()[-3000:]
            time.sleep(0.5)
            dlq = [h.decode(m.headers()) for m in broker.read_all(f"{group}.dlq") if m.headers()]
    finally:
        proc.terminate()
        status = proc.wait(60)
    log = (tmp_path / "service.log").read_text()
    missing = want - ledger(tmp_path)
    assert not missing, f"{len(missing)} pairs never delivered, e.g. {sorted(missing)[:5]}"
    assert log.count("restarting in") == 1, log[-4000:]
    assert death in log, log[-4000:]
    if kill == "backtrack":  # its watchdog could not say it: the supervisor did, at once
        silent = log.find("nor its watchdog has run for")
        assert -1 < silent < log.find("restarting in"), log[-4000:]
        assert "in fragile" in log[silent : log.find("restarting in")], log[-4000:]
    [crash] = dlq
    assert (crash.stage, crash.caller, crash.origin_offset) == ("crash", "fragile", k_off)
    assert "died 3 times" in crash.error and "hung past its 1s timeout" in crash.error
    assert "crashy.py" in crash.traceback and "in fragile" in crash.traceback, crash.traceback
    assert ("fragile", k_part, k_off) not in ledger(tmp_path)
    assert status == 0, "SIGTERM drains and exits 0"


def test_journal_is_read_by_the_next_instance(broker: Broker, unique: str, tmp_path: Path) -> None:
    """Given instance A dies with the killer in flight and no sandbox, when separate
    instances (no shared supervisor, as on other machines) take the partition over one
    after another, then each applies the count that the journal in Kafka carries, and
    the third quarantines."""
    topic, group = f"crashj-{unique}", f"g-{unique}"
    broker.create({topic: 1})
    broker.produce(topic, [{"n": i} for i in range(MESSAGES)])
    config = write_service(tmp_path, broker, group, topic, sandbox=False)
    owners = []
    for _ in range(3):
        proc = start(config, tmp_path, "exit", "--no-supervise")
        owners.append(proc.pid)
        assert proc.wait(120) == 1, "the instance dies on the killer message"
    log = (tmp_path / "service.log").read_text()
    for pid in owners[:2]:  # an owner is named host:pid:<random part>
        assert re.search(rf":{pid}:[0-9a-f]+\) died with deliveries in flight", log), pid
    proc = start(config, tmp_path, "exit", "--no-supervise")
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(ledger(tmp_path)) < 2 * MESSAGES - 2:
            assert proc.poll() is None, (tmp_path / "service.log").read_text()[-3000:]
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(60)
    log = (tmp_path / "service.log").read_text()
    assert "quarantined" in log and "died 3 times" in log
    assert len({(p, o) for c, p, o in ledger(tmp_path) if c == "fragile"}) == MESSAGES - 1


def test_the_next_instance_reruns_suspects_in_a_sandbox_and_does_not_die(
    broker: Broker, unique: str, tmp_path: Path
) -> None:
    """Given instance A died with the killer in flight (the first death), when another
    instance takes the partition over (another machine: no shared supervisor), then it
    re-runs the window in sandboxes: the killer kills two sandboxes, not the instance,
    and is quarantined with the dying stack naming the handler's line; every other pair
    is delivered, and the journal in Kafka carried the first count."""
    topic, group = f"crashs-{unique}", f"g-{unique}"
    broker.create({topic: 1})
    broker.produce(topic, [{"n": i} for i in range(MESSAGES)])
    k_part, k_off = killer_coordinates(broker, topic)
    config = write_service(tmp_path, broker, group, topic)
    first = start(config, tmp_path, "segfault", "--no-supervise")
    assert first.wait(120) == -11, "the first instance dies on the killer (SIGSEGV)"
    second = start(config, tmp_path, "segfault", "--no-supervise")
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(ledger(tmp_path)) < 2 * MESSAGES - 1:
            assert second.poll() is None, (tmp_path / "service.log").read_text()[-3000:]
            time.sleep(0.5)
        dlq = [h.decode(m.headers()) for m in broker.read_all(f"{group}.dlq", expect=1)]
    finally:
        second.terminate()
        status = second.wait(60)
    log = (tmp_path / "service.log").read_text()
    assert status == 0, log[-3000:]
    assert "running it again in a fresh one" in log
    [crash] = dlq
    assert (crash.stage, crash.caller, crash.origin_offset) == ("crash", "fragile", k_off)
    assert "died 3 times" in crash.error and "sandbox" in crash.error
    assert crash.signal == "killed by SIGSEGV"
    assert "crashy.py" in crash.traceback and "in fragile" in crash.traceback, crash.traceback
    assert ("steady", k_part, k_off) in ledger(tmp_path), "the innocent caller got it"
    assert len({(p, o) for c, p, o in ledger(tmp_path) if c == "fragile"}) == MESSAGES - 1


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_stops_when_its_supervisor_is_killed(
    broker: Broker, unique: str, tmp_path: Path
) -> None:
    """Given ``shunter run`` delivering under its supervisor, when the supervisor is
    SIGKILLed (nothing can be passed on), then its worker is not left running orphaned:
    it gets SIGTERM, drains and stops."""
    topic, group = f"orphan-{unique}", f"g-{unique}"
    broker.create({topic: 1})
    broker.produce(topic, [{"n": i} for i in range(50)])
    proc = start(write_service(tmp_path, broker, group, topic), tmp_path, "none")
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(ledger(tmp_path)) < 100:
            assert proc.poll() is None, (tmp_path / "service.log").read_text()[-3000:]
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) == 1, workers
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _running(workers[0]):
            time.sleep(0.2)
        log = (tmp_path / "service.log").read_text()
        assert not _running(workers[0]), "the orphaned worker still runs\n" + log[-3000:]
        assert log.rstrip().endswith("stopped"), log[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in workers:
            if _running(pid):
                os.kill(pid, 9)
