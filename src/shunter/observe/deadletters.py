"""Dead-letter browse and replay in the admin API, with the filters of ``shunter dlq``.

``GET /deadletters?caller=&error=&stage=&topic=&since=&limit=`` lists (newest ``limit``,
default 50; ``group=1`` groups them by failure fingerprint instead), ``GET
/deadletters/{partition}:{offset}`` shows one record with its traceback and payload, and
``POST /deadletters/replay`` (token) replays matching records to ONE caller through the
fast retry tier: body ``{"to": "<caller>", "ids": [...], "caller": ..., "error": ...,
"stage": ..., "topic": ..., "since": ..., "limit": ..., "rate": ...}``.

Reading and replaying use ``settle/dlqread.py`` and ``settle/redrive.py`` as the command
line does, on a worker thread: the reader never joins the group, commits nothing, and
the event loop keeps dispatching meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from ..settle import headers as h
from ..settle.dlqread import (
    DeadLetterRecord,
    DlqFilter,
    KafkaRecord,
    ReadError,
    RecordId,
    TopicReader,
    client_settings,
    parse_since,
    select,
    summary,
)
from ..settle.redrive import Plan, Planner, replay
from .fingerprints import group_dead_letters

STAGES = ("decode", "validate", "classify", "deliver", "crash")
MAX_LIMIT = 1000
MAX_RATE = 1000.0
_MAX_PAYLOAD = 16_384


class BadRequest(ValueError):
    """A query or body the endpoint cannot use; the message says which part."""


def parse_filter(query: Mapping[str, Any], ids: list[str] | None = None) -> DlqFilter:
    """The CLI's filters from a query string or a JSON body."""
    stage = query.get("stage") or None
    if stage is not None and stage not in STAGES:
        raise BadRequest(f"stage: expected one of {', '.join(STAGES)}, got {stage!r}")
    since = query.get("since") or None
    try:
        since_ms = parse_since(str(since)) if since is not None else None
        records = frozenset(RecordId.parse(str(i)) for i in ids or [])
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    caller = query.get("caller")
    return DlqFilter(
        caller=None if caller is None else str(caller),
        error_type=query.get("error") or None,
        stage=stage,
        origin_topic=query.get("topic") or None,
        since_ms=since_ms,
        ids=records,
    )


def parse_limit(value: Any, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        limit = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"limit: expected a whole number, got {value!r}") from None
    if not 0 < limit <= MAX_LIMIT:
        raise BadRequest(f"limit: expected 1..{MAX_LIMIT}, got {limit}")
    return limit


def detail(record: KafkaRecord) -> dict[str, Any]:
    """One record in full: summary, every header, the traceback, the key and payload."""
    dead = DeadLetterRecord.of(record)
    headers = {}
    for name, value in record.headers:
        if name != h.TRACEBACK:
            headers[name] = _text(value)
    return {
        **summary(dead),
        "traceback": dead.info.traceback if dead.info else "",
        "headers": headers,
        "key": _text(record.key),
        "payload": _payload(record.value),
        "payload_bytes": len(record.value or b""),
    }


def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return repr(value)


def _payload(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        text = orjson.dumps(orjson.loads(value), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        text = _text(value[:_MAX_PAYLOAD]) or ""
    if len(text) > _MAX_PAYLOAD:
        text = text[:_MAX_PAYLOAD] + f"\n... ({len(text) - _MAX_PAYLOAD} more characters)"
    return text


def narrow(plan: Plan, to: str) -> Plan | None:
    """Only the route to ``to``; None when the plan has nothing for that caller (a refused
    record of another caller is none of this replay's business)."""
    if plan.refused:
        caller = plan.dead.info.caller if plan.dead.info else ""
        return plan if caller in ("", to) else None
    routes = tuple(r for r in plan.routes if r.caller == to)
    return Plan(plan.dead, routes) if routes else None


class DeadLetters:
    """The endpoints, over one service's configuration and broker."""

    def __init__(self, service: Any) -> None:
        self._service = service

    @property
    def _config(self) -> Any:
        return self._service.config

    def _settings(self) -> dict[str, Any]:
        return client_settings(self._config, self._service.bootstrap)

    def listing(self, query: Mapping[str, str]) -> dict[str, Any]:
        where = parse_filter(query)
        limit = parse_limit(query.get("limit"), 50)
        grouped = query.get("group") in ("1", "true", "yes")
        topic = self._config.dlq_topic
        with TopicReader(self._settings()) as reader:
            found, total = select(reader, topic, where, None if grouped else limit)
        if grouped:
            groups = [g.as_dict() for g in group_dead_letters(found)]
            return {"topic": topic, "total": total, "groups": groups[:limit]}
        return {"topic": topic, "total": total, "records": [summary(d) for d in found]}

    def show(self, record_id: str) -> dict[str, Any]:
        try:
            rid = RecordId.parse(record_id)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        with TopicReader(self._settings()) as reader:
            record = reader.fetch(self._config.dlq_topic, rid.partition, rid.offset)
        return {"topic": self._config.dlq_topic, **detail(record)}

    def replay(self, body: Mapping[str, Any]) -> dict[str, Any]:
        to = body.get("to")
        callers = {s.caller for s in self._config.subscribers}
        if not isinstance(to, str) or to not in callers:
            raise BadRequest(f"to: expected one of the callers {sorted(callers)}, got {to!r}")
        ids = body.get("ids") or []
        if not isinstance(ids, list):
            raise BadRequest("ids: expected a list of <partition>:<offset>")
        where = parse_filter(body, ids)
        limit = parse_limit(body.get("limit"), 100)
        try:
            rate = float(body.get("rate", 50.0))
        except (TypeError, ValueError):
            raise BadRequest(
                f"rate: expected records per second, got {body.get('rate')!r}"
            ) from None
        if not 0 < rate <= MAX_RATE:
            raise BadRequest(f"rate: expected more than 0 and at most {MAX_RATE:g}")
        settings = self._settings()
        with TopicReader(settings) as reader:
            found, _ = select(reader, self._config.dlq_topic, where, limit)
        planner = Planner(self._config)
        plans = [p for p in (narrow(planner.plan(d), to) for d in found) if p is not None]
        ready = [p for p in plans if not p.refused]
        result = replay(settings, self._config.fast_topic, ready, rate)
        return {
            "to": to,
            "topic": self._config.fast_topic,
            "written": result.written,
            "replayed": [str(p.dead.id) for p in ready],
            "refused": [{"id": str(p.dead.id), "reason": p.refused} for p in plans if p.refused],
            "failed": [{"id": i, "error": e} for i, e in result.failed],
        }


DLQ_READERS = 2  # topic scans at once per instance: several open dashboards must not pile up


async def run_blocking(
    work: Any, *args: Any, limit: asyncio.Semaphore | None = None
) -> tuple[int, dict[str, Any]]:
    """Run a reader or replay on a thread (at most ``limit`` at once); the status and
    JSON of its answer."""
    try:
        if limit is None:
            return 200, await asyncio.to_thread(work, *args)
        async with limit:
            return 200, await asyncio.to_thread(work, *args)
    except BadRequest as exc:
        return 400, {"error": str(exc)}
    except ReadError as exc:
        return 404 if "no record" in str(exc) else 502, {"error": str(exc)}


async def read_body(request: web.Request, seconds: float) -> dict[str, Any]:
    """The JSON object of a request body, read within ``seconds``; BadRequest otherwise
    (a body over ``client_max_size`` is refused by aiohttp with 413)."""
    timeout = seconds
    try:
        async with asyncio.timeout(seconds):
            raw = await request.read()
    except TimeoutError:
        raise BadRequest(f"the request body was not received within {timeout:g}s") from None
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object")
    return body
