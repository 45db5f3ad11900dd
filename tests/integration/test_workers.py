"""Given ``shunter run --workers 2`` on a real broker, then the two worker processes share
the source partitions as two members of one group, killing one worker restarts that one
only, and a SIGTERM to the supervisor drains and commits both before it exits 0."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import yaml

from kafkatools import Broker, ShunterProcess, config
from shunter.settle import headers as h

pytestmark = pytest.mark.kafka

# The cooperative-sticky assignor balances the count of all a member's partitions, retry
# tiers included: with as many retry-tier as source partitions, a second member may get
# only retry-tier ones. With many more source partitions, each worker gets its share.
PARTITIONS = 8

HANDLERS = """
import os

_fd = os.open(os.environ["LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


async def receipt(msg):
    os.write(_fd, f"{os.getpid()},{msg.partition},{msg.offset}\\n".encode())
"""


def receipts(path: Path) -> list[tuple[int, int, int]]:
    """(worker pid, partition, offset) per delivery."""
    if not path.exists():
        return []
    return [tuple(map(int, line.split(","))) for line in path.read_text().splitlines()]  # type: ignore[misc]


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry.name))
    return found


def assignments(proc: ShunterProcess, topic: str) -> int:
    """How many times some worker was assigned partitions of ``topic``."""
    lines = proc.log_tail(1_000_000).splitlines()
    return sum(1 for line in lines if "shunter.consume: assigned" in line and f"{topic}[" in line)


def two_workers(
    broker: Broker,
    tmp_path: Path,
    topic: str,
    group: str,
    retry_partitions: int,
    consumer: dict[str, str] | None = None,
) -> tuple[Path, Path, dict[str, str]]:
    """A 2-worker configuration whose one caller writes a receipt per delivery: the
    configuration's path, the receipts' ledger and the environment to run it with."""
    (tmp_path / "workerhandlers.py").write_text(HANDLERS)
    data = config(
        broker,
        group,
        {topic: {}},
        {"all": {"topics": [topic]}},
        [{"caller": "receipt", "category": "all", "handler": "workerhandlers:receipt"}],
        kafka={"workers": 2, **({"consumer": consumer} if consumer else {})},
        retry={"partitions": retry_partitions},
    )
    path = tmp_path / "shunter.yaml"
    path.write_text(yaml.safe_dump(data))
    ledger = tmp_path / "ledger.txt"
    env = {
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "LEDGER": str(ledger),
    }
    return path, ledger, env


def wait_for(what: Callable[[], bool], timeout: float, proc: ShunterProcess, why: str) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert proc.alive(), f"shunter exited: {why}\n{proc.log_tail()}"
        assert time.monotonic() < deadline, f"timed out: {why}\n{proc.log_tail()}"
        time.sleep(0.2)


@pytest.mark.timeout(240)
def test_two_workers_share_the_partitions_restart_alone_and_drain_on_sigterm(
    broker: Broker, unique: str, tmp_path: Path
) -> None:
    topic, group = f"workers-{unique}", f"g-{unique}"
    broker.create({topic: PARTITIONS})
    path, ledger, env = two_workers(broker, tmp_path, topic, group, retry_partitions=1)
    with ShunterProcess(path, tmp_path / "service.log", env) as proc:
        assert proc.process is not None
        wait_for(lambda: len(children(proc.process.pid)) == 2, 60, proc, "two workers")
        first = children(proc.process.pid)
        # Both members must own source partitions before the traffic, or one takes it all.
        wait_for(lambda: assignments(proc, topic) >= 2, 90, proc, "both workers assigned")
        broker.produce(topic, [{"n": i} for i in range(400)], key=lambda i, v: f"k{i}")
        wait_for(
            lambda: len({(p, o) for _, p, o in receipts(ledger)}) == 400,
            90,
            proc,
            "400 messages delivered",
        )
        by_pid: dict[int, set[int]] = {}
        for pid, partition, _ in receipts(ledger):
            by_pid.setdefault(pid, set()).add(partition)
        # Both members took part (a partition may have moved once while the group formed).
        assert set(by_pid) == first, f"deliveries came from {set(by_pid)}, workers {first}"
        assert set.union(*by_pid.values()) == set(range(PARTITIONS))

        victim, survivor = sorted(first)
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: len(children(proc.process.pid) - first) == 1,
            60,
            proc,
            "the killed worker restarted",
        )
        now = children(proc.process.pid)
        assert survivor in now and victim not in now, (first, now)
        assert "worker 0 killed by SIGKILL" in proc.log_tail() or (
            "worker 1 killed by SIGKILL" in proc.log_tail()
        ), proc.log_tail()

        broker.produce(topic, [{"n": i} for i in range(400, 800)], key=lambda i, v: f"k{i}")
        wait_for(
            lambda: len({(p, o) for _, p, o in receipts(ledger)}) == 800,
            120,
            proc,
            "800 messages delivered",
        )
        proc.terminate()
        assert proc.wait(90) == 0, proc.log_tail()
    log = (tmp_path / "service.log").read_text()
    assert log.count("stopping: draining in-flight deliveries") >= 2, log[-4000:]
    ends = [0] * PARTITIONS
    for msg in broker.read_all(topic, expect=800):
        ends[msg.partition()] = max(ends[msg.partition()], msg.offset() + 1)
    assert broker.committed(group, topic, PARTITIONS) == ends, log[-4000:]


@pytest.mark.timeout(240)
def test_with_the_roundrobin_assignor_each_worker_gets_source_partitions_beside_retry_ones(
    broker: Broker, unique: str, tmp_path: Path
) -> None:
    """Given as many retry-tier partitions as source partitions (4 and 4 per tier) and
    ``partition.assignment.strategy: roundrobin`` (the README's way out of the default
    assignor counting retry partitions), when two workers share the group, then each one
    owns and delivers two source partitions: roundrobin spreads every topic over the
    members, where the default may leave one with retry-tier partitions only."""
    topic, group = f"rr-{unique}", f"g-{unique}"
    broker.create({topic: 4})
    roundrobin = {"partition.assignment.strategy": "roundrobin"}
    path, ledger, env = two_workers(
        broker, tmp_path, topic, group, retry_partitions=4, consumer=roundrobin
    )
    with ShunterProcess(path, tmp_path / "service.log", env) as proc:
        assert proc.process is not None
        wait_for(lambda: len(children(proc.process.pid)) == 2, 60, proc, "two workers")
        workers = children(proc.process.pid)
        # Settled when the group's last assignment gives each worker two source partitions.
        wait_for(lambda: source_owners(proc, topic) == 2, 120, proc, "both own source ones")
        broker.produce(topic, [{"n": i} for i in range(200)], key=lambda i, v: f"k{i}")
        wait_for(
            lambda: len({(p, o) for _, p, o in receipts(ledger)}) == 200,
            90,
            proc,
            "200 messages delivered",
        )
        by_pid: dict[int, set[int]] = {}
        for pid, partition, _ in receipts(ledger):
            by_pid.setdefault(pid, set()).add(partition)
        assert set(by_pid) == workers, f"deliveries came from {set(by_pid)}, workers {workers}"
        assert all(len(parts) == 2 for parts in by_pid.values()), by_pid
        proc.terminate()
        assert proc.wait(90) == 0, proc.log_tail()


def source_owners(proc: ShunterProcess, topic: str) -> int:
    """How many of the last two assignments hold two of ``topic``'s 4 partitions.

    With an eager assignor (roundrobin) each rebalance revokes everything and gives every
    member its whole assignment anew, so once the group has formed, the last two
    "assigned" lines are the two workers' (a member given nothing logs one too)."""
    lines = proc.log_tail(1_000_000).splitlines()
    assigned = [line for line in lines if "shunter.consume: assigned" in line]
    return sum(1 for line in assigned[-2:] if line.count(f"{topic}[") == 2)


POISON = """
import os, signal

_fd = os.open(os.environ["LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


async def steady(msg):
    os.write(_fd, f"steady,{os.getpid()},{msg.partition},{msg.offset}\\n".encode())


def fragile(msg):
    if msg.value["n"] == int(os.environ["KILLER"]):
        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
    os.write(_fd, f"fragile,{os.getpid()},{msg.partition},{msg.offset}\\n".encode())
"""


@pytest.mark.timeout(300)
def test_a_message_that_kills_a_worker_is_quarantined_and_the_other_worker_serves_on(
    broker: Broker, unique: str, tmp_path: Path
) -> None:
    """Given two workers and a message whose handler SIGKILLs the worker that runs it,
    then that worker alone dies, once: the partition's next owner (the restarted worker or
    the other one: the journal is the group's, not a worker's) re-runs the window in a
    sandbox process, the message lands in the dead-letter topic with stage ``crash`` after
    ``quarantine_after`` deaths and never completes, every other (message, subscriber)
    pair is delivered, and a SIGTERM still drains to exit 0 with every offset committed."""
    topic, group = f"wpoison-{unique}", f"g-{unique}"
    broker.create({topic: PARTITIONS})
    (tmp_path / "poison.py").write_text(POISON)
    killer = 333
    data = config(
        broker,
        group,
        {topic: {}},
        {"all": {"topics": [topic]}},
        [
            {"caller": "steady", "category": "all", "handler": "poison:steady"},
            {"caller": "fragile", "category": "all", "handler": "poison:fragile"},
        ],
        kafka={"workers": 2},
        crash_guard={"quarantine_after": 3},
        retry={"partitions": 1},
    )
    path = tmp_path / "shunter.yaml"
    path.write_text(yaml.safe_dump(data))
    ledger = tmp_path / "ledger.txt"
    env = {
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "LEDGER": str(ledger),
        "KILLER": str(killer),
    }

    def delivered() -> set[tuple[str, int, int]]:
        if not ledger.exists():
            return set()
        rows = (line.split(",") for line in ledger.read_text().splitlines())
        return {(caller, int(part), int(off)) for caller, _, part, off in rows}

    messages = 800
    with ShunterProcess(path, tmp_path / "service.log", env) as proc:
        assert proc.process is not None
        wait_for(lambda: len(children(proc.process.pid)) == 2, 60, proc, "two workers")
        wait_for(lambda: assignments(proc, topic) >= 2, 90, proc, "both workers assigned")
        broker.produce(topic, [{"n": i} for i in range(messages)], key=lambda i, v: f"k{i}")
        records = broker.read_all(topic, expect=messages)
        [(k_part, k_off)] = [
            (m.partition(), m.offset()) for m in records if orjson.loads(m.value())["n"] == killer
        ]
        want = {
            (caller, m.partition(), m.offset()) for m in records for caller in ("steady", "fragile")
        } - {("fragile", k_part, k_off)}
        wait_for(lambda: want <= delivered(), 180, proc, "all but the killer delivered")
        wait_for(
            lambda: any(
                h.decode(m.headers()).stage == "crash"
                for m in broker.read_all(f"{group}.dlq")
                if m.headers()
            ),
            60,
            proc,
            "the killer dead-lettered",
        )
        proc.terminate()
        assert proc.wait(90) == 0, proc.log_tail()
    log = (tmp_path / "service.log").read_text()
    infos = [h.decode(m.headers()) for m in broker.read_all(f"{group}.dlq") if m.headers()]
    crash = [i for i in infos if i.stage == "crash"]
    assert [(i.origin_topic, i.origin_partition, i.origin_offset) for i in crash] == [
        (topic, k_part, k_off)
    ], f"exactly the killer is quarantined: {infos}\n{log[-4000:]}"
    assert ("fragile", k_part, k_off) not in delivered(), "the killer never completed"
    # One worker dies, once: whoever owns the partition next re-runs the suspect in a
    # sandbox process, whose deaths count towards the quarantine instead.
    deaths = re.findall(r"shunter\.supervisor: worker \d killed by SIGKILL; restarting", log)
    assert len(deaths) == 1, log[-4000:]
    assert "in a sandbox" in crash[0].error, crash[0].error
    ends = [0] * PARTITIONS
    for msg in records:
        ends[msg.partition()] = max(ends[msg.partition()], msg.offset() + 1)
    assert broker.committed(group, topic, PARTITIONS) == ends, log[-4000:]
