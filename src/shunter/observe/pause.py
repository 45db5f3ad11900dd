"""Pausing a caller, group-wide: the one object that owns it.

A pause is a record under the caller's name in the control topic (``observe/control.py``):
``{"paused": true, "reason": ..., "ts": ..., "id": ...}``. Every instance follows that
topic, so a pause or resume written by any instance (admin API, flood guard) reaches
all of them within a second or two, and survives restarts: at start the whole table is
read before anything is consumed.

While a caller is paused, its deliveries are *set aside* (``set_aside``): written once to
``<group>.parked``, a topic the group never consumes, and settled when the broker
acknowledged them — never read back and rewritten while the caller stays paused. On
resume, the instance that executes it re-drives the caller's parked records into the fast
tier (``settle/unpark.py``), reading from the caller's cursor (``parked/<caller>`` in the
control topic: how far earlier resumes re-drove), and records the new cursor.

Per-key order does not hold across a pause: once resumed, new messages run at once, and
the parked ones come back through the fast tier beside them. A parked write still being
retried more than ``grace`` (3 s) after the resume, or one made by an instance that read
the resume later than that, waits for the caller's next resume.

The instance that writes a record applies it at once; records of the same caller that
it reads back before its own (older in the log) are not applied in between, so a quick
pause-then-resume does not flap. ``backlog()``: deliveries this instance set aside per
caller since its pause; the group's parked backlog is the sum over instances.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import orjson
from prometheus_client.core import GaugeMetricFamily

from ..config import Config
from ..deliver import SubscriberRuntime
from ..message import Message
from ..settle import headers as h
from ..settle.unpark import unpark
from .control import ControlTopic

log = logging.getLogger("shunter.pause")

CURSOR = "parked/"  # the control namespace of the re-drive cursors
_PENDING_FOR = 30.0  # seconds our own write may take to be read back


@dataclass(frozen=True, slots=True)
class PauseState:
    paused: bool
    reason: str = ""
    id: str = ""


def _state(value: bytes | None) -> PauseState:
    if value is None:
        return PauseState(False)
    state = orjson.loads(value)
    return PauseState(
        bool(state.get("paused")), str(state.get("reason", "")), str(state.get("id", ""))
    )


class CallerPauses:
    """Pause and resume callers on every instance; hold a paused caller's backlog once.

    ``write_parked(msg, info)`` writes the parked record and settles the delivery on the
    broker's acknowledgement (``Settler.write_parked``); ``reset_flood(caller)`` forgets
    the flood guard's count of a resumed caller.
    """

    def __init__(
        self,
        config: Config,
        control: ControlTopic,
        runtimes: dict[str, SubscriberRuntime],
        write_parked: Callable[[Message, h.FailureInfo], None],
        settings: dict[str, Any],
        reset_flood: Callable[[str], None] = lambda _caller: None,
        grace: float = 3.0,
    ) -> None:
        self._config = config
        self._control = control
        self._runtimes = runtimes
        self._write_parked = write_parked
        self._settings = settings
        self._reset_flood = reset_flood
        self._grace = grace  # how long a re-drive keeps reading after the resume
        self._states: dict[str, PauseState] = {}
        # caller -> (id, until when) of our write not yet read back; records of that caller
        # read before it are older and not applied (for a while: a write that compaction
        # removed before we read it must not silence the caller for ever)
        self._pending: dict[str, tuple[str, float]] = {}
        self._cursors: dict[str, dict[int, int]] = {}
        self._backlog: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = threading.Event()
        control.subscribe("", self._on_state)
        control.subscribe(CURSOR, self._on_cursor)

    # -- what the record path calls -------------------------------------------------------

    def is_paused(self, caller: str) -> bool:
        runtime = self._runtimes.get(caller)
        return runtime is not None and runtime.paused

    def set_aside(self, msg: Message) -> None:
        """A paused caller's delivery: written once to the parked topic, unrun; its share
        of the offset is released when the broker acknowledged the record."""
        record = msg._record
        info = _retry_info(msg)
        if info is None:
            info = h.FailureInfo(
                caller=msg.caller,
                category=msg.category,
                attempt=msg.attempt,
                stage="deliver",
                error_type="CallerPaused",
                error="caller paused",
                traceback="",
                first_failure_ms=record.first_failure,
                not_before_ms=int(time.time() * 1000),
                origin_topic=record.topic,
                origin_partition=record.partition,
                origin_offset=record.offset,
                origin_timestamp_ms=record.timestamp,
                tier="parked",
                origin_key=record.key,
            )
        self._backlog[msg.caller] = self._backlog.get(msg.caller, 0) + 1
        self._write_parked(msg, info)

    # -- pause and resume -----------------------------------------------------------------

    def knows(self, caller: str) -> bool:
        return caller in self._runtimes

    async def pause(self, caller: str, reason: str) -> None:
        """Pause ``caller`` here now and on every instance; wait for the broker."""
        self._apply(caller, PauseState(True, reason))
        await self._record(caller, True, reason)

    def pause_soon(self, caller: str, reason: str) -> None:
        """``pause`` from synchronous code (the flood guard): here now, the record later."""
        self._apply(caller, PauseState(True, reason))
        self._background(self._record_logged(caller, True, reason))

    async def resume(self, caller: str, reason: str) -> None:
        """Resume ``caller`` everywhere; its parked backlog is re-driven in the background.

        Also for a caller that is not paused: its parked records past the cursor (left
        by an interrupted re-drive, say) are re-driven."""
        self._apply(caller, PauseState(False, reason))
        try:
            await self._record(caller, False, reason)
        except BaseException:  # not resumed anywhere else: not here either
            self._apply(caller, self._states.get(caller, PauseState(False)))
            raise
        self._background(self._redrive(caller))

    def paused(self) -> dict[str, str]:
        """caller -> why, for every paused caller of this instance."""
        return {
            c: self._states.get(c, PauseState(True)).reason
            for c, r in self._runtimes.items()
            if r.paused
        }

    def backlog(self) -> dict[str, int]:
        """caller -> deliveries this instance set aside since the caller was paused."""
        return {c: self._backlog.get(c, 0) for c in self._runtimes}

    def gauges(self) -> Any:
        parked = GaugeMetricFamily(
            "shunter_caller_parked",
            "Deliveries of a paused caller set aside by this instance since its pause "
            "(sum over instances: the group's parked backlog).",
            labels=["caller"],
        )
        for caller, n in self.backlog().items():
            parked.add_metric([caller], n)
        yield parked

    async def close(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Stop re-drives in progress (their cursor is not advanced: redone next resume)."""
        self._stop.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)

    # -- internals ------------------------------------------------------------------------

    def _on_state(self, caller: str, value: bytes | None) -> None:
        try:
            state = _state(value)
        except (orjson.JSONDecodeError, AttributeError):
            log.error("unreadable control record for %r; ignored", caller)
            return
        self._states[caller] = state
        pending = self._pending.get(caller)
        if pending is not None:
            if state.id != pending[0] and time.monotonic() < pending[1]:
                return  # older than our own write, which is applied already
            del self._pending[caller]
        self._apply(caller, state)

    def _on_cursor(self, key: str, value: bytes | None) -> None:
        caller = key[len(CURSOR) :]
        if value is None:
            self._cursors.pop(caller, None)
            return
        try:
            self._cursors[caller] = {
                int(p): int(o) for p, o in orjson.loads(value)["cursor"].items()
            }
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            log.error("unreadable re-drive cursor for %r; ignored", caller)

    def _apply(self, caller: str, state: PauseState) -> None:
        runtime = self._runtimes.get(caller)
        if runtime is None or runtime.paused == state.paused:
            return
        if state.paused:
            for msg in runtime.pause():
                self.set_aside(msg)
            log.warning(
                "caller %s is paused (%s); its deliveries are set aside in %s until it is resumed",
                caller,
                state.reason or "no reason recorded",
                self._config.parked_topic,
                extra={"caller": caller},
            )
        else:
            self._reset_flood(caller)
            runtime.resume()
            self._backlog[caller] = 0
            log.warning("caller %s is resumed (%s)", caller, state.reason, extra={"caller": caller})

    async def _record(self, caller: str, paused: bool, reason: str) -> None:
        rid = uuid.uuid4().hex[:12]
        value = orjson.dumps(
            {"paused": paused, "reason": reason, "ts": int(time.time() * 1000), "id": rid}
        )
        self._pending[caller] = (rid, time.monotonic() + _PENDING_FOR)
        try:
            await self._control.put(caller, value)
        except BaseException:
            if self._pending.get(caller, ("",))[0] == rid:
                del self._pending[caller]
            raise

    async def _record_logged(self, caller: str, paused: bool, reason: str) -> None:
        try:
            await self._record(caller, paused, reason)
        except Exception as exc:
            log.error(
                "recording caller %s's pause failed (%s); it holds on this instance only",
                caller,
                exc,
            )

    async def _redrive(self, caller: str) -> None:
        cursor = self._cursors.get(caller)
        cfg = self._config
        try:
            result = await asyncio.to_thread(
                unpark,
                self._settings,
                cfg.parked_topic,
                cfg.fast_topic,
                caller,
                cursor,
                self._grace,
                self._stop,
            )
        except Exception:
            log.exception(
                "re-driving caller %s's parked deliveries failed; resume it again to retry", caller
            )
            return
        if result.failed or result.stopped:
            log.error(
                "re-driving caller %s: %d written, %s; its cursor stays, so the next "
                "resume re-drives them again",
                caller,
                result.written,
                "; ".join(result.failed[:3]) or "interrupted",
            )
            return
        value = {
            "cursor": {str(p): o for p, o in result.cursor.items()},
            "ts": int(time.time() * 1000),
        }
        try:
            await self._control.put(CURSOR + caller, orjson.dumps(value))
        except Exception as exc:
            log.error(
                "recording caller %s's re-drive cursor failed (%s); the next resume "
                "re-drives these %d deliveries again",
                caller,
                exc,
                result.written,
            )
            return
        log.warning(
            "caller %s: %d parked deliveries re-driven to %s%s",
            caller,
            result.written,
            cfg.fast_topic,
            f" ({result.skipped} unreadable left in {cfg.parked_topic})" if result.skipped else "",
            extra={"caller": caller},
        )

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _retry_info(msg: Message) -> h.FailureInfo | None:
    """The headers of a delivery read back from a retry tier, as tier ``parked``."""
    record = msg._record
    if not record.headers or record.ptrack.tp[0] == record.topic:
        return None  # consumed from its source topic
    try:
        info = h.decode(record.headers)
    except (KeyError, ValueError):
        return None
    if info.caller != msg.caller:
        return None
    return replace(info, tier="parked")
