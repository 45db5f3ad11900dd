"""What the reliability scenarios share: a scene (broker, names, working directory), the
dispatcher configuration and processes, the receipt ledger, committed offsets and the
in-flight window at a kill, the dead-letter topic, and the dispatcher's memory.

Every scenario runs ``shunter run`` as a child process (``python -m shunter.cli.main``),
exactly as an operator would, and judges it only from the outside: the receipts its
handlers append to a ledger file, the group's committed offsets, the dead-letter topic,
its exit status and its resident memory.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from kafkatools import Broker, ShunterProcess, pythonpath
from shunter.settle import headers as h

ROOT = Path(__file__).resolve().parents[2]
KAFKA_SCRIPT = ROOT / "scripts" / "kafka" / "kafka"

TP = tuple[str, int]
Pair = tuple[str, str, int, int]  # caller, topic, partition, offset

CALLERS = ("medal", "rank", "task")  # three subscribers of one category
HANDLERS = "rel_receipts"  # the ledger handler module written into each scene

RECEIPT_HANDLERS = '''
"""Handlers that append a receipt per delivery: caller,topic,partition,offset,pid."""
import asyncio
import os

_fd = os.open(os.environ["SHUNTER_TEST_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
_pause = float(os.environ.get("SHUNTER_TEST_PAUSE", "0.001"))
_pid = os.getpid()


def _receipt(caller):
    async def handle(msg):
        await asyncio.sleep(_pause)
        # one write(2) per line on an O_APPEND descriptor: lines never interleave, and the
        # receipt is in the file before the delivery can be settled
        os.write(_fd, f"{caller},{msg.topic},{msg.partition},{msg.offset},{_pid}\\n".encode())
    handle.__name__ = caller.replace("-", "_")
    return handle


def __getattr__(name):
    return _receipt(name.replace("_", "-"))
'''


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the scene ------------------------------------------------------------------------------


@dataclass
class Scene:
    """One scenario run: its broker, unique topic/group names and a working directory."""

    broker: Broker
    workdir: Path
    name: str
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / f"{HANDLERS}.py").write_text(RECEIPT_HANDLERS)

    @property
    def topic(self) -> str:
        return f"rel-{self.name}-{self.tag}"

    @property
    def group(self) -> str:
        return f"rel-{self.name}-g-{self.tag}"

    @property
    def dlq(self) -> str:
        return f"{self.group}.dlq"

    @property
    def ledger_path(self) -> Path:
        return self.workdir / "ledger.txt"

    def env(self, pause: float = 0.001, **extra: str) -> dict[str, str]:
        return {
            "PYTHONPATH": pythonpath(self.workdir),
            "SHUNTER_TEST_LEDGER": str(self.ledger_path),
            "SHUNTER_TEST_PAUSE": str(pause),
            **extra,
        }

    def write_config(
        self,
        *,
        partitions: int,
        callers: Iterable[str] = CALLERS,
        handlers: str = HANDLERS,
        topic_config: dict[str, Any] | None = None,
        kafka: dict[str, Any] | None = None,
        subscriber: dict[str, Any] | None = None,
        crash_guard: dict[str, Any] | None = None,
        file: str = "shunter.yaml",
    ) -> Path:
        """The scenario's ``shunter.yaml``: one topic, one category, one subscriber per
        caller (``handlers:<caller>``). Kafka settings not given are shunter's defaults."""
        del partitions  # the topic is created by the scenario; kept for the reader
        data: dict[str, Any] = {
            "kafka": {
                "bootstrap_servers": self.broker.bootstrap,
                "group_id": self.group,
                "consumer": self.broker.client,
                **(kafka or {}),
            },
            "topics": {self.topic: topic_config or {}},
            "categories": {"revenue": {"topics": [self.topic]}},
            "subscribers": [
                {
                    "caller": c,
                    "category": "revenue",
                    "handler": f"{handlers}:{c.replace('-', '_')}",
                    **(subscriber or {}),
                }
                for c in callers
            ],
            "retry": {"partitions": 2},
            "crash_guard": crash_guard or {},
            "admin": {"listen": None},  # other suites run on this machine: no fixed port
        }
        path = self.workdir / file
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def dispatcher(
        self,
        config: Path,
        *,
        supervise: bool = False,
        env: dict[str, str] | None = None,
        log_name: str = "service.log",
        args: tuple[str, ...] = (),
    ) -> ShunterProcess:
        """``shunter run -c config`` (``--no-supervise`` unless ``supervise``)."""
        extra = () if supervise else ("--no-supervise",)
        return ShunterProcess(
            config, self.workdir / log_name, env or self.env(), args=(*extra, *args)
        )


# -- producing with coordinates -------------------------------------------------------------


def produce(
    broker: Broker,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes | None]],
    settings: dict[str, Any] | None = None,
    headers: list[tuple[str, bytes]] | None = None,
) -> list[tuple[int, int]]:
    """Produce (key, value) records in order; return each one's (partition, offset)."""
    producer = Producer(
        {
            "bootstrap.servers": broker.bootstrap,
            "linger.ms": 20,
            "enable.idempotence": True,
            **(settings or {}),
        }
    )
    where: dict[int, tuple[int, int]] = {}
    errors: list[str] = []

    def delivered(i: int) -> Callable[[KafkaError | None, Any], None]:
        def report(err: KafkaError | None, msg: Any) -> None:
            if err is not None:
                errors.append(str(err))
            else:
                where[i] = (msg.partition(), msg.offset())

        return report

    n = 0
    for n, (key, value) in enumerate(records, 1):
        while True:
            try:
                producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=delivered(n - 1)
                )
                break
            except BufferError:
                producer.poll(0.1)
        if n % 1000 == 0:
            producer.poll(0)
    left = producer.flush(120)
    assert left == 0 and not errors, f"producing to {topic}: {left} unsent, errors {errors[:3]}"
    return [where[i] for i in range(n)]


# -- the ledger -----------------------------------------------------------------------------


class Ledger:
    """The receipts file, read incrementally: (caller, topic, partition, offset) -> count,
    and which process (pid) delivered each pair."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.counts: Counter[Pair] = Counter()
        self.by_pid: dict[int, set[Pair]] = {}
        self.total = 0
        self._pos = 0
        self._partial = b""

    def refresh(self) -> int:
        """Read what was appended since the last call; return the total receipts."""
        if not self.path.exists():
            return self.total
        with open(self.path, "rb") as f:
            f.seek(self._pos)
            chunk = f.read()
        self._pos += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            fields = line.decode().split(",")
            pair = (fields[0], fields[1], int(fields[2]), int(fields[3]))
            self.counts[pair] += 1
            if len(fields) > 4:
                self.by_pid.setdefault(int(fields[4]), set()).add(pair)
        self.total += len(lines)
        return self.total

    def pairs(self) -> set[Pair]:
        return set(self.counts)


def expected_pairs(
    topic: str, coords: Iterable[tuple[int, int]], callers: Iterable[str]
) -> set[Pair]:
    callers = tuple(callers)
    return {(c, topic, p, o) for p, o in coords for c in callers}


def tally(ledger: Ledger, expected: set[Pair]) -> dict[str, int]:
    """Lost (expected, never receipted), duplicates (receipts beyond the first) and
    receipts of pairs that were never expected."""
    ledger.refresh()
    counts = ledger.counts
    return {
        "expected_pairs": len(expected),
        "receipts": ledger.total,
        "lost": len(expected - counts.keys()),
        "duplicates": sum(n - 1 for k, n in counts.items() if k in expected and n > 1),
        "unexpected": sum(n for k, n in counts.items() if k not in expected),
    }


# -- committed offsets and the in-flight window ---------------------------------------------


_admins: dict[str, AdminClient] = {}


def committed(broker: Broker, group: str, topic: str, partitions: int) -> dict[TP, int]:
    """The group's committed offsets (-1 where none), asked of the admin API so that the
    question never touches the group itself."""
    admin = _admins.get(broker.bootstrap)
    if admin is None:
        admin = _admins[broker.bootstrap] = AdminClient(
            {"bootstrap.servers": broker.bootstrap, "log_level": 4}
        )
    request = ConsumerGroupTopicPartitions(
        group, [TopicPartition(topic, p) for p in range(partitions)]
    )
    answer = admin.list_consumer_group_offsets([request])[group].result(30)
    return {(tp.topic, tp.partition): max(tp.offset, -1) for tp in answer.topic_partitions}


def window(ledger: Ledger, offsets: dict[TP, int], pid: int | None = None) -> int:
    """Pairs already receipted at or past the committed offset of their partition (by
    process ``pid`` only, if given): what a new owner, resuming from the committed
    offsets, may deliver again."""
    ledger.refresh()
    pairs = ledger.counts.keys() if pid is None else ledger.by_pid.get(pid, set())
    n = 0
    for _caller, topic, partition, offset in pairs:
        tp = (topic, partition)
        if tp in offsets and offset >= offsets[tp]:
            n += 1
    return n


# -- the dead-letter topic ------------------------------------------------------------------


def dead_letters(broker: Broker, topic: str, timeout: float = 60.0) -> list[h.FailureInfo]:
    """The failure headers of every record in the dead-letter topic (none if absent)."""
    return [info for info, _key, _size in dead_letter_records(broker, topic, timeout)]


def dead_letter_records(
    broker: Broker, topic: str, timeout: float = 60.0
) -> list[tuple[h.FailureInfo, bytes | None, int]]:
    """(headers, key, payload size) of every dead-letter record."""
    consumer = Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": f"rel-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            **broker.client,
        }
    )
    out: list[tuple[h.FailureInfo, bytes | None, int]] = []
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            return out
        consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        eof: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(eof) < len(meta.partitions) and time.monotonic() < deadline:
            for msg in consumer.consume(200, 0.2):
                err = msg.error()
                if err is None:
                    eof.discard(msg.partition())
                    info = h.decode(msg.headers())
                    out.append((info, msg.key(), len(msg.value() or b"")))
                elif err.code() == KafkaError._PARTITION_EOF:
                    eof.add(msg.partition())
    finally:
        consumer.close()
    return out


# -- waiting, memory, ports -----------------------------------------------------------------


class Stalled(AssertionError):
    pass


def wait_until(
    done: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    alive: Callable[[], bool] | None = None,
    progress: Callable[[], int] | None = None,
    stall: float | None = None,
    interval: float = 0.05,
) -> float:
    """Poll ``done`` until true; return the seconds it took. Fails on ``timeout``, on a
    dead process (``alive``), or when ``progress`` has not moved for ``stall`` seconds."""
    began = last_move = time.monotonic()
    last = progress() if progress else 0
    while not done():
        now = time.monotonic()
        if alive is not None and not alive():
            raise Stalled(f"{what}: the dispatcher exited")
        if now - began > timeout:
            raise Stalled(f"{what}: not done after {timeout:.0f}s")
        if progress is not None and stall is not None:
            current = progress()
            if current != last:
                last, last_move = current, now
            elif now - last_move > stall:
                raise Stalled(f"{what}: no progress for {stall:.0f}s")
        time.sleep(interval)
    return time.monotonic() - began


class RssSampler:
    """Samples a process's resident memory (VmRSS) on a thread; ``peak_mb`` is the most
    seen, ``vm_hwm_mb`` the kernel's own high-water mark (catches spikes between samples)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self.vm_hwm_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._began = time.monotonic()

    def _read(self) -> tuple[float, float] | None:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if "VmRSS" not in fields:  # exited: a zombie has no memory left
            return None
        rss = int(fields["VmRSS"].split()[0]) / 1024
        hwm = int(fields["VmHWM"].split()[0]) / 1024
        return rss, hwm

    def _run(self) -> None:
        while not self._stop.is_set():
            got = self._read()
            if got is not None:
                self.samples.append((time.monotonic() - self._began, got[0]))
                self.vm_hwm_mb = max(self.vm_hwm_mb, got[1])
            self._stop.wait(self.interval)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        got = self._read()
        if got is not None:
            self.vm_hwm_mb = max(self.vm_hwm_mb, got[1])
        self._stop.set()
        self._thread.join(5)

    def now_mb(self) -> float:
        got = self._read()
        return got[0] if got else 0.0

    @property
    def peak_mb(self) -> float:
        return max((mb for _, mb in self.samples), default=0.0)


def free_port_pair() -> int:
    """A port P with P and P+1 both free (a Kafka client port and its controller port)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(30_000, 45_000)
        if all(_free(p) for p in (port, port + 1)):
            return port
    raise RuntimeError("no free pair of ports")


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class KafkaNode:
    """An Apache Kafka broker of the scenario's own (``scripts/kafka/kafka`` with its own
    port and data dir), so killing it never touches a broker other tests use."""

    def __init__(self, data: Path, port: int | None = None) -> None:
        self.port = port or free_port_pair()
        self.data = data
        self.env = {k: v for k, v in os.environ.items() if k not in ("PORT", "CONTROLLER_PORT")}
        self.env.update(
            SHUNTER_KAFKA_PORT=str(self.port),
            CONTROLLER_PORT=str(self.port + 1),
            SHUNTER_KAFKA_DATA=str(data),
            SHUNTER_KAFKA_PYTHON=sys.executable,
        )
        self.bootstrap = f"127.0.0.1:{self.port}"

    def _script(self, *args: str, timeout: float = 300) -> str:
        out = subprocess.run(
            [str(KAFKA_SCRIPT), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"kafka {' '.join(args)} failed:\n{out.stderr[-3000:]}")
        return out.stdout.strip()

    def start(self, fresh: bool = False) -> str:
        lines = self._script("start", *(["--fresh"] if fresh else [])).splitlines()
        return lines[-1]

    def kill(self) -> None:
        self._script("kill")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._script("stop")

    def version(self) -> str:
        return kafka_version()


def kafka_version() -> str:
    pom = (ROOT / "scripts" / "kafka" / "pom.xml").read_text()
    found = re.search(r"<kafka.version>(.*?)</kafka.version>", pom)
    return os.environ.get("SHUNTER_KAFKA_VERSION") or (found.group(1) if found else "?")


def broker_label(broker: Broker) -> str:
    if broker.kind == "kafka":
        return f"Apache Kafka {kafka_version()} (KRaft, 1 node) at {broker.bootstrap}"
    return f"embedded Tansu at {broker.bootstrap}"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ends_of(coords: Iterable[tuple[int, int]]) -> dict[int, int]:
    """One past the last produced offset of each partition."""
    ends: dict[int, int] = {}
    for p, o in coords:
        ends[p] = max(ends.get(p, 0), o + 1)
    return ends


def caught_up(
    broker: Broker,
    scene: Scene,
    partitions: int,
    coords: Iterable[tuple[int, int]],
    every: float = 1.0,
) -> Callable[[], bool]:
    """A poll that is true once the group has committed every produced offset (asks the
    broker at most once per ``every`` seconds)."""
    ends = ends_of(coords)
    last = [0.0]

    def done() -> bool:
        now = time.monotonic()
        if now - last[0] < every:
            return False
        last[0] = now
        offsets = committed(broker, scene.group, scene.topic, partitions)
        return all(offsets.get((scene.topic, p), -1) >= end for p, end in ends.items())

    return done


class LiveProducer:
    """Produces ``count`` records at ``rate`` per second on a thread, the way a live
    stream arrives; ``coords`` are their (partition, offset) once ``join`` returned."""

    def __init__(
        self,
        broker: Broker,
        topic: str,
        count: int,
        rate: float,
        record: Callable[[int], tuple[bytes | None, bytes | None]],
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.broker = broker
        self.topic = topic
        self.count = count
        self.rate = rate
        self.record = record
        self.settings = settings or {}
        self.produced = 0
        self.errors: list[str] = []
        self._where: dict[int, tuple[int, int]] = {}
        self._thread = threading.Thread(target=self._run, name="rel-producer", daemon=True)
        self.began = 0.0
        self.ended = 0.0
        self._halt = threading.Event()

    @property
    def duration(self) -> float:
        return self.count / self.rate

    def start(self) -> LiveProducer:
        self.began = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        producer = Producer(
            {
                "bootstrap.servers": self.broker.bootstrap,
                "linger.ms": 5,
                "enable.idempotence": True,
                "message.timeout.ms": 600_000,  # a broker restart is waited out
                "log_level": 2,  # connection errors while a broker restarts are expected
                **self.settings,
            }
        )

        def delivered(i: int) -> Callable[[KafkaError | None, Any], None]:
            def report(err: KafkaError | None, msg: Any) -> None:
                if err is not None:
                    self.errors.append(str(err))
                else:
                    self._where[i] = (msg.partition(), msg.offset())

            return report

        for i in range(self.count):
            if self._halt.is_set():
                break
            due = self.began + i / self.rate
            while (delay := due - time.monotonic()) > 0:  # poll returns early on events
                producer.poll(min(delay, 0.05))
            key, value = self.record(i)
            while True:
                try:
                    producer.produce(self.topic, value=value, key=key, on_delivery=delivered(i))
                    break
                except BufferError:
                    producer.poll(0.1)
            self.produced = i + 1
            producer.poll(0)
        left = producer.flush(600)
        if left:
            self.errors.append(f"{left} records unsent after 600s")
        self.ended = time.monotonic()

    def halt(self) -> None:
        """End the stream early (``produced`` says how many were sent)."""
        self._halt.set()

    def join(self, timeout: float | None = None) -> list[tuple[int, int]]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the producer did not finish"
        assert not self.errors, f"producing to {self.topic}: {self.errors[:3]}"
        return [self._where[i] for i in range(self.produced)]

    def alive(self) -> bool:
        return self._thread.is_alive()


def running(proc: ShunterProcess) -> bool:
    """The instance logged that it is serving (its signal handlers are installed)."""
    return "shunter is running" in proc.log_tail(200_000)


def stop(proc: ShunterProcess, timeout: float = 90.0) -> int | None:
    """SIGTERM an instance once it is serving (a SIGTERM before its handlers exist would
    kill it like a crash) and return its exit status; None if it had to be killed."""
    if not proc.alive():
        return proc.process.returncode if proc.process else None
    with contextlib.suppress(Stalled):
        wait_until(lambda: running(proc), timeout=60, what="instance start", alive=proc.alive)
    if not proc.alive():
        return proc.process.returncode if proc.process else None
    proc.terminate()
    try:
        return int(proc.wait(timeout))
    except subprocess.TimeoutExpired:
        proc.kill()
        return None
