"""The group's control topic, followed live by every instance.

``<group>.control`` is a compacted topic: a table of small records, the last value of each
key winning. Every instance follows it on a thread of its own (assigned partitions, no
group membership), reads the whole table at start, and then every new record within a few
hundred milliseconds; callbacks run on the event loop, in log order.

Keys are text, split into namespaces by their first ``/``:

- ``<caller>`` (no ``/``; caller names match ``^[A-Za-z0-9_.\\-]+$``): the caller's pause
  state, JSON, owned by ``observe/pause.py``;
- ``parked/<caller>``: how far that caller's parked backlog has been re-driven (pause.py);
- ``skip/...``: the operator's skip records (JSON), owned by the pipeline.

API::

    control = ControlTopic(settings, topic, producer, loop)
    control.subscribe("skip/", callback)  # callback(key: str, value: bytes | None) on the loop
    await control.start()                 # returns once the whole table has been delivered
    await control.put("skip/...", value)  # write (None: tombstone), wait for the broker
    await control.put(key, value, seen=True)  # ... and until this instance has read it back
    control.table                         # key -> value, as far as read (on the loop)
    await control.stop()

``subscribe(prefix, callback)``: ``prefix`` is a namespace, ``""`` (keys without ``/``) or
``"name/"``; the callback gets every key of that namespace, first the table already read
(synchronously, inside ``subscribe``), then each new record. A failing callback is logged
and swallowed. Writes go through the service's idempotent producer (``acks=all``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ..broker.compacted import TableFollower
from ..settle.producer import ReliableProducer

log = logging.getLogger("shunter.control")

Callback = Callable[[str, bytes | None], None]


def namespace(key: str) -> str:
    """``"skip/"`` for ``"skip/t/0/5"``; ``""`` for a key without ``/`` (a caller)."""
    head, slash, _ = key.partition("/")
    return head + "/" if slash else ""


class ControlTopic:
    def __init__(
        self,
        settings: dict[str, Any],
        topic: str,
        producer: ReliableProducer,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.topic = topic
        self._producer = producer
        self._loop = loop
        self.table: dict[str, bytes] = {}
        self._callbacks: dict[str, list[Callback]] = {}
        self._waiters: list[tuple[str, bytes | None, asyncio.Future[None]]] = []
        self._caught_up = asyncio.Event()
        self._follower = TableFollower(
            settings, topic, self._from_thread, self._caught_up_from_thread, self._failed
        )

    # -- reading --------------------------------------------------------------------------

    def subscribe(self, prefix: str, callback: Callback) -> None:
        """Call ``callback(key, value)`` for every record of namespace ``prefix``."""
        if prefix and (not prefix.endswith("/") or "/" in prefix[:-1]):
            raise ValueError(f"a namespace is '' or 'name/', not {prefix!r}")
        self._callbacks.setdefault(prefix, []).append(callback)
        for key, value in list(self.table.items()):
            if namespace(key) == prefix:
                self._call(callback, key, value)

    async def start(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109
        """Start following; return once the table present at start has been delivered."""
        self._follower.start()
        try:
            await asyncio.wait_for(self._caught_up.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(f"reading {self.topic} took over {timeout:.0f}s") from None

    async def stop(self) -> None:
        await asyncio.to_thread(self._follower.stop)

    @property
    def following(self) -> bool:
        """The whole table has been read and the follower is still reading."""
        return self._caught_up.is_set() and self._follower.alive()

    def _from_thread(self, key: bytes, value: bytes | None) -> None:
        self._loop.call_soon_threadsafe(self._apply, key.decode("utf-8", "replace"), value)

    def _caught_up_from_thread(self) -> None:
        self._loop.call_soon_threadsafe(self._caught_up.set)  # after every record before it

    def _failed(self, exc: BaseException) -> None:
        log.error("following %s failed (%s); following it again from the start", self.topic, exc)

    def _apply(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.table.pop(key, None)
        else:
            self.table[key] = value
        for callback in self._callbacks.get(namespace(key), ()):
            self._call(callback, key, value)
        if self._waiters:
            left = []
            for wanted in self._waiters:
                if wanted[0] == key and wanted[1] == value:
                    if not wanted[2].done():
                        wanted[2].set_result(None)
                else:
                    left.append(wanted)
            self._waiters = left

    @staticmethod
    def _call(callback: Callback, key: str, value: bytes | None) -> None:
        try:
            callback(key, value)
        except Exception:  # a hook cannot kill the follower
            log.exception("control callback for %r failed", key)

    # -- writing --------------------------------------------------------------------------

    async def put(
        self,
        key: str,
        value: bytes | None,
        seen: bool = False,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> None:
        """Write ``key`` (None: a tombstone) and wait for the broker; with ``seen``, also
        until this instance's follower has read it back (so it has been applied here)."""
        future: asyncio.Future[None] = self._loop.create_future()
        if seen:
            self._waiters.append((key, value, future))
        try:
            await self._producer.wait(self.topic, key.encode(), value, [])
            if seen:
                await asyncio.wait_for(asyncio.shield(future), timeout)
        finally:
            self._waiters = [w for w in self._waiters if w[2] is not future]
