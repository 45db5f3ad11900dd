"""The admin HTTP API: health, readiness, metrics, topology, stats, pause/resume,
dead letters, and the live dashboard at ``/``.

Binds to 127.0.0.1 by default. Reads are open; calls that change anything need
``Authorization: Bearer <token>`` with the token from the environment variable named
by ``admin.token_env`` (no token configured: mutating calls are refused). Every answer is
redacted, Host headers are checked, and requests are bounded in time and size
(``observe/httpguard.py``; ``admin.header_timeout``, ``body_timeout``, ``max_body``).

| route | what |
| --- | --- |
| GET / | the live dashboard (``observe/dashboard/``) |
| GET /health, /ready | liveness; readiness (503 when not ready) |
| GET /metrics | Prometheus (``observe/stats.py``, ``observe/lag.py``) |
| GET /topology | topic → category → caller rows, as ``shunter check`` prints them |
| GET /stats | callers, partitions, messages and failure fingerprints of this instance |
| GET /deadletters, /deadletters/{id} | the dead-letter topic, filtered; one record |
| POST /deadletters/replay | replay dead letters to one caller (token) |
| POST /callers/{caller}/pause, /resume | pause or resume a caller (token) |
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterator
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from ..crashguard.guard import LAST_EXIT_ENV
from ..settle.skip import SkipRequest
from .collector import StatsCollector
from .deadletters import DLQ_READERS, BadRequest, DeadLetters, read_body, run_blocking
from .httpguard import AdminSite, HostCheck, bearer_ok, guard, json_answer
from .lag import backlog_parts, lag_gauges
from .statusread import read_status

if TYPE_CHECKING:
    from ..service import Service

log = logging.getLogger("shunter.admin")

DASHBOARD_FILES = {
    "index.html": "text/html",
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}


def topology(service: Service) -> list[dict[str, Any]]:
    """topic → category → caller rows, as ``shunter check`` prints them (unredacted: the
    API redacts every answer)."""
    cfg = service.config
    rows = []
    for name, category in cfg.categories.items():
        for sub in cfg.subscribers:
            if sub.category != name:
                continue
            target = sub.http.url if sub.http else (sub.handler or "(registered in code)")
            for topic in category.topics:
                rows.append(
                    {
                        "topic": topic,
                        "category": name,
                        "where": category.where,
                        "caller": sub.caller,
                        "target": target,
                        "kind": "http" if sub.http else sub.isolation,
                        "isolation": sub.isolation,
                        "ordering": sub.ordering,
                    }
                )
    return rows


def stats_view(service: Service) -> dict[str, Any]:
    """What ``/stats`` and the dashboard show: per caller its outcomes (ok, fast, slow,
    dlq, parked), state and backlog, and the lag of its category's source partitions; the
    partitions (and the stalled ones again); consumed messages by topic and outcome; the
    failure fingerprints."""
    partitions, callers = read_status(service)
    stats = service.stats
    outcomes = stats.by_caller()
    lag: dict[str, int] = {}  # source topic -> messages behind, over its partitions here
    lag_seconds: dict[str, float] = {}
    for p in partitions:
        if p.kind == "source":
            lag[p.topic] = lag.get(p.topic, 0) + (p.lag or 0)
            lag_seconds[p.topic] = max(lag_seconds.get(p.topic, 0.0), p.lag_seconds)
    categories = service.config.categories
    out: dict[str, dict[str, Any]] = {}
    for row in callers:
        topics = categories[row.category].topics if row.category in categories else []
        backlog = backlog_parts(row)
        out[row.caller] = {
            **{k: 0 for k in ("ok", "fast", "slow", "dlq", "parked")},
            **outcomes.get(row.caller, {}),
            **row.as_dict(),
            "backlog": sum(backlog.values()),
            "backlog_by_state": backlog,
            "lag": sum(lag.get(t, 0) for t in topics),
            "lag_seconds": max((lag_seconds.get(t, 0.0) for t in topics), default=0.0),
        }
    for caller, counts in outcomes.items():  # a caller without a status row yet
        out.setdefault(caller, {"caller": caller, **counts})
    messages: dict[str, dict[str, int]] = {}
    for (topic, outcome), n in stats.messages.items():
        messages.setdefault(topic, {})[outcome] = n
    return {
        "group": service.config.kafka.group_id,
        "time": time.time(),
        "callers": out,
        "partitions": [p.as_dict() for p in partitions],
        "stalled": [p.as_dict() for p in partitions if p.stalled],
        "messages": messages,
        "writes": dict(stats.writes),
        "fingerprints": [g.as_dict() for g in stats.fingerprints.rows()],
    }


def instance_gauges(started: float, last_exit: str) -> Callable[[], Iterator[GaugeMetricFamily]]:
    """When this worker started (``changes(shunter_worker_start_time_seconds[15m])``
    counts restarts), and how its predecessor under the same supervisor ended."""

    def collect() -> Iterator[GaugeMetricFamily]:
        start = GaugeMetricFamily(
            "shunter_worker_start_time_seconds", "When this worker process started (Unix time)."
        )
        start.add_metric([], started)
        yield start
        exit_info = GaugeMetricFamily(
            "shunter_worker_last_exit",
            "1, labelled with how the previous worker under the same supervisor ended "
            "('' for a first start).",
            labels=["last_exit"],
        )
        exit_info.add_metric([last_exit], 1.0)
        yield exit_info

    return collect


class _Collected:
    """Metric families already collected, for ``generate_latest``."""

    def __init__(self, families: list[Any]) -> None:
        self._families = families

    def collect(self) -> list[Any]:
        return self._families


def _dashboard_file(name: str) -> bytes:
    return resources.files("shunter.observe").joinpath("dashboard", name).read_bytes()


async def start_admin(service: Service) -> web.AppRunner:
    listen = service.config.admin.listen
    assert listen is not None
    host, _, port = listen.rpartition(":")
    admin = service.config.admin
    secrets = service.config.secrets
    registry = CollectorRegistry()
    registry.register(StatsCollector(service.stats))
    service.stats.gauges.append(lag_gauges(service))
    service.stats.gauges.append(instance_gauges(time.time(), os.environ.get(LAST_EXIT_ENV, "")))
    token = os.environ.get(admin.token_env, "")
    dead_letters = DeadLetters(service)
    readers = asyncio.Semaphore(DLQ_READERS)

    def authorized(request: web.Request) -> bool:
        return bearer_ok(request.headers.get("Authorization"), token)

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(_: web.Request) -> web.Response:
        ok, reasons = service.readiness()
        pipeline = service.pipeline
        stalled = [p.as_dict() for p in pipeline.status()[0] if p.stalled] if pipeline else []
        body = {"ready": ok, "reasons": reasons, "stalled": stalled}
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        # Collected on the loop (status rows are read there), formatted on a thread: at
        # 1000 partitions formatting takes ~100 ms that the deliveries should not wait for.
        families = list(registry.collect())
        body = await asyncio.to_thread(generate_latest, _Collected(families))
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})

    async def topo(_: web.Request) -> web.Response:
        return json_answer(topology(service), secrets)

    async def stats(_: web.Request) -> web.Response:
        return json_answer(stats_view(service), secrets)

    async def dashboard(request: web.Request) -> web.Response:
        name = request.match_info.get("name", "index.html")
        if name not in DASHBOARD_FILES:
            raise web.HTTPNotFound()
        return web.Response(body=_dashboard_file(name), content_type=DASHBOARD_FILES[name])

    async def dlq_list(request: web.Request) -> web.Response:
        status, answer = await run_blocking(
            dead_letters.listing, dict(request.query), limit=readers
        )
        return json_answer(answer, secrets, status)

    async def dlq_show(request: web.Request) -> web.Response:
        status, answer = await run_blocking(
            dead_letters.show, request.match_info["id"], limit=readers
        )
        return json_answer(answer, secrets, status)

    async def dlq_replay(request: web.Request) -> web.Response:
        if not authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        try:
            body = await read_body(request, admin.body_timeout)
        except BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)
        status, answer = await run_blocking(dead_letters.replay, body)
        if status == 200:
            log.warning(
                "replayed %d dead letters to caller %s through the admin API",
                answer["written"],
                answer["to"],
            )
        return json_answer(answer, secrets, status)

    async def pause_resume(request: web.Request) -> web.Response:
        if not authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        caller = request.match_info["caller"]
        pauses = service.pauses
        if pauses is None or not pauses.knows(caller):
            return web.json_response({"error": f"unknown caller {caller}"}, status=404)
        action = request.match_info["action"]
        if action == "pause":
            await pauses.pause(caller, "paused through the admin API")
        else:
            await pauses.resume(caller, "resumed through the admin API")
        log.warning("caller %s %sd through the admin API", caller, action)
        return web.json_response({"caller": caller, "paused": pauses.is_paused(caller)})

    async def skip_record(request: web.Request) -> web.Response:
        """POST {"topic", "partition", "offset", "caller"?}: the operator's skip."""
        if not authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        try:
            body = await read_body(request, admin.body_timeout)
        except BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)
        try:
            wanted = SkipRequest(
                str(body["topic"]),
                int(body["partition"]),
                int(body["offset"]),
                str(body.get("caller") or ""),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return web.json_response(
                {"error": 'expected JSON {"topic": T, "partition": P, "offset": O, "caller": C}'},
                status=400,
            )
        said = await service.request_skip(wanted, "admin API", wait=10.0)
        if said is None:
            pending = "no owner of the partition answered in 10 s; applied when it is read"
            return web.json_response({"pending": pending}, status=202)
        return web.json_response({"result": said})

    served: set[Any] = set()  # connections that sent a complete request
    app = web.Application(
        middlewares=[guard(HostCheck(host or "127.0.0.1", admin.allowed_hosts), served)],
        client_max_size=admin.max_body,
    )
    app.add_routes(
        [
            web.get("/", dashboard),
            web.get("/dashboard/{name}", dashboard),
            web.get("/deadletters", dlq_list),
            web.post("/deadletters/replay", dlq_replay),
            web.get("/deadletters/{id}", dlq_show),
            web.get("/health", health),
            web.get("/ready", ready),
            web.get("/metrics", metrics),
            web.get("/topology", topo),
            web.get("/stats", stats),
            web.post(r"/callers/{caller}/{action:pause|resume}", pause_resume),
            web.post("/skip", skip_record),
        ]
    )
    # aiohttp has no header timeout: the site closes a connection whose first request is
    # not complete in time, aiohttp's keep-alive timer one whose next request is not.
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=admin.header_timeout)
    await runner.setup()
    site = AdminSite(runner, host or "127.0.0.1", int(port), admin.header_timeout, served)
    await site.start()
    log.info("admin API on http://%s", listen)
    return runner
