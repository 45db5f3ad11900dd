"""The admin HTTP API: health, readiness, metrics, topology, stats, pause/resume.

Binds to 127.0.0.1 by default. Reads are open; calls that change anything need
``Authorization: Bearer <token>`` with the token from the environment variable named
by ``admin.token_env`` (no token configured: mutating calls are refused).
"""

from __future__ import annotations

import hmac
import logging
import os
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from ..settle.skip import SkipRequest
from .stats import StatsCollector

if TYPE_CHECKING:
    from ..service import Service

log = logging.getLogger("shunter.admin")


def topology(service: Service) -> list[dict[str, Any]]:
    """topic → category → caller rows, as ``shunter check`` prints them."""
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
                        "isolation": sub.isolation,
                        "ordering": sub.ordering,
                    }
                )
    return rows


def _gauges(service: Service) -> Any:
    def collect() -> Any:
        pipeline = service.pipeline
        pending = GaugeMetricFamily(
            "shunter_caller_pending", "Deliveries queued or running per caller.", labels=["caller"]
        )
        paused = GaugeMetricFamily(
            "shunter_caller_paused", "1 when the caller is paused.", labels=["caller"]
        )
        lag = GaugeMetricFamily(
            "shunter_consumer_lag",
            "Messages between the committable offset and the partition end.",
            labels=["topic", "partition"],
        )
        held = GaugeMetricFamily(
            "shunter_partition_in_flight",
            "Offsets held (not yet settled) per partition.",
            labels=["topic", "partition"],
        )
        if pipeline is not None:
            for caller, runtime in pipeline.runtimes.items():
                pending.add_metric([caller], runtime.queued + runtime.active)
                paused.add_metric([caller], 1.0 if runtime.paused else 0.0)
            for (topic, part), tracker in list(pipeline.tracker.partitions.items()):
                held.add_metric([topic, str(part)], tracker.in_flight)
                marks = pipeline.source.watermarks((topic, part)) if pipeline.source else None
                position = tracker.committable()
                if marks is not None and position >= 0:
                    lag.add_metric([topic, str(part)], max(0, marks[1] - position))
        stalled = GaugeMetricFamily(
            "shunter_partition_stalled",
            "1 while the partition has not moved for kafka.stall_after with offsets waiting.",
            labels=["topic", "partition"],
        )
        stuck = GaugeMetricFamily(
            "shunter_partition_stuck_seconds",
            "Seconds the partition's position has not moved while offsets wait.",
            labels=["topic", "partition"],
        )
        if pipeline is not None:
            for row in pipeline.status()[0]:
                labels = [row.topic, str(row.partition)]
                stalled.add_metric(labels, 1.0 if row.stalled else 0.0)
                stuck.add_metric(labels, row.stuck_seconds)
        yield pending
        yield paused
        yield lag
        yield held
        yield stalled
        yield stuck

    return collect


async def start_admin(service: Service) -> web.AppRunner:
    listen = service.config.admin.listen
    assert listen is not None
    host, _, port = listen.rpartition(":")
    registry = CollectorRegistry()
    registry.register(StatsCollector(service.stats))
    service.stats.gauges.append(_gauges(service))
    token = os.environ.get(service.config.admin.token_env, "")

    def authorized(request: web.Request) -> bool:
        given = request.headers.get("Authorization", "")
        return bool(token) and hmac.compare_digest(given, f"Bearer {token}")

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(_: web.Request) -> web.Response:
        ok, reasons = service.readiness()
        pipeline = service.pipeline
        stalled = [p.as_dict() for p in pipeline.status()[0] if p.stalled] if pipeline else []
        body = {"ready": ok, "reasons": reasons, "stalled": stalled}
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    async def topo(_: web.Request) -> web.Response:
        return web.json_response(topology(service))

    async def stats(_: web.Request) -> web.Response:
        pipeline = service.pipeline
        stalled = [p.as_dict() for p in pipeline.status()[0] if p.stalled] if pipeline else []
        return web.json_response({"callers": service.stats.by_caller(), "stalled": stalled})

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
            body = await request.json()
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

    app = web.Application()
    app.add_routes(
        [
            web.get("/health", health),
            web.get("/ready", ready),
            web.get("/metrics", metrics),
            web.get("/topology", topo),
            web.get("/stats", stats),
            web.post(r"/callers/{caller}/{action:pause|resume}", pause_resume),
            web.post("/skip", skip_record),
        ]
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host or "127.0.0.1", int(port))
    await site.start()
    log.info("admin API on http://%s", listen)
    return runner
