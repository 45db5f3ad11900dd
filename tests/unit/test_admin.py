"""The admin API against a stand-in service: its status rows come from a fake ``status()``,
so these tests need no broker and pin what the API does with the rows it is given.

Given an admin API on a free loopback port, when a client asks, then: secrets never
appear, foreign Host headers are refused, malformed tokens are 401, half-sent requests
are cut off, bodies are bounded, and the lag gauges cover every partition row."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from shunter.config import parse_config
from shunter.observe.admin import start_admin
from shunter.observe.stats import Stats
from shunter.observe.status import CallerStatus, PartitionStatus
from shunter.testing import make_message

SECRET = "s3cr3t-hook-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def partition(topic: str, p: int, **kw: Any) -> PartitionStatus:
    row: dict[str, Any] = {
        "topic": topic,
        "partition": p,
        "kind": "source",
        "position": 10,
        "committed": 10,
        "end": 10,
        "lag": 0,
        "in_flight": 0,
        "lag_seconds": 0.0,
        "stuck_seconds": 0.0,
        "held": "",
        "stalled": False,
    }
    row.update(kw)
    return PartitionStatus(**row)


class FakePipeline:
    def __init__(self) -> None:
        self.partitions = [
            partition("gift", 0, end=25, lag=15, in_flight=3, lag_seconds=4.5),
            partition("gift", 1),  # idle: lag 0, nothing in flight
            partition("g.retry.fast", 0, kind="retry", position=-1, end=None, lag=None),
            partition("gift", 2, stalled=True, stuck_seconds=200.0, held="handler running"),
        ]
        self.callers = [CallerStatus("medal", "revenue", False, 4, 2, 7.25, stuck=1)]

    def status(self) -> tuple[list[PartitionStatus], list[CallerStatus]]:
        return self.partitions, self.callers


class FakeFlood:
    tripped: set[str] = set()


class FakeService:
    def __init__(self, port: int, monkeypatch: pytest.MonkeyPatch, **admin: Any) -> None:
        monkeypatch.setenv("HOOK_TOKEN", SECRET)
        monkeypatch.setenv("SHUNTER_ADMIN_TOKEN", "the-admin-token")
        self.config = parse_config(
            {
                "kafka": {"bootstrap_servers": "127.0.0.1:1", "group_id": "g"},
                "topics": {"gift": {}},
                "categories": {"revenue": {"topics": ["gift"]}},
                "subscribers": [
                    {"caller": "medal", "category": "revenue", "handler": "m:f"},
                    {
                        "caller": "hook",
                        "category": "revenue",
                        "http": {"url": "https://hooks.example.com/in?token=${HOOK_TOKEN}"},
                    },
                ],
                "admin": {"listen": f"127.0.0.1:{port}", **admin},
            }
        )
        self.stats = Stats({s.caller: s.category for s in self.config.subscribers})
        self.pipeline = FakePipeline()
        self.ready = asyncio.Event()
        self.bootstrap = "127.0.0.1:1"
        self.flood = FakeFlood()


def run_admin(
    monkeypatch: pytest.MonkeyPatch,
    scenario: Callable[[FakeService, str], Awaitable[None]],
    **admin: Any,
) -> None:
    async def main() -> None:
        port = free_port()
        service = FakeService(port, monkeypatch, **admin)
        runner = await start_admin(service)  # type: ignore[arg-type]
        try:
            await scenario(service, f"http://127.0.0.1:{port}")
        finally:
            await runner.cleanup()

    asyncio.run(main())


async def get(url: str, **kw: Any) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url, **kw) as resp:
        return resp.status, await resp.text()


def test_topology_and_stats_never_show_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(service: FakeService, base: str) -> None:
        # a failure whose message quotes the secret (an HTTP error echoing the URL)
        from shunter.outcome import Failed

        msg = make_message({"x": 1}, topic="gift", caller="hook", category="revenue")
        service.stats.fingerprints.observe(
            "hook", Failed("ClientError", f"POST ...?token={SECRET} -> 500", ""), msg._record
        )
        for path in ("/topology", "/stats"):
            status, text = await get(base + path)
            assert status == 200, text
            assert SECRET not in text
        status, text = await get(base + "/topology")
        assert "token=***" in text

    run_admin(monkeypatch, scenario)


def test_stats_rows_come_from_status(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(service: FakeService, base: str) -> None:
        service.stats.delivered("gift", "medal", 0.01)
        service.stats.failed("gift", "medal", 0.01, "dlq")
        async with aiohttp.ClientSession() as session, session.get(base + "/stats") as resp:
            stats = await resp.json()
        medal = stats["callers"]["medal"]
        assert (medal["ok"], medal["dlq"], medal["fast"]) == (1, 1, 0)
        assert (medal["queued"], medal["running"], medal["backlog"]) == (4, 2, 6)
        assert medal["oldest_pending_seconds"] == 7.25
        assert medal["stuck"] == 1
        assert medal["lag"] == 15  # the source partitions of its category, here gift 0..2
        assert len(stats["partitions"]) == 4

    run_admin(monkeypatch, scenario)


def test_metrics_cover_every_partition_and_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(service: FakeService, base: str) -> None:
        status, text = await get(base + "/metrics")
        assert status == 200
        lines = set(text.splitlines())
        labels = 'group="g",kind="source",partition="{p}",topic="gift"'
        assert f"kafka_consumergroup_group_lag{{{labels.format(p=0)}}} 15.0" in lines
        assert f"kafka_consumergroup_group_lag{{{labels.format(p=1)}}} 0.0" in lines  # idle
        assert f"kafka_consumergroup_group_lag_seconds{{{labels.format(p=0)}}} 4.5" in lines
        assert 'shunter_partition_stalled{partition="2",topic="gift"} 1.0' in lines
        assert 'shunter_partition_stuck_seconds{partition="2",topic="gift"} 200.0' in lines
        assert 'shunter_partition_in_flight{partition="0",topic="gift"} 3.0' in lines
        # a partition whose end is not known yet has no lag series rather than a wrong one
        assert 'kafka_consumergroup_group_lag{group="g",kind="retry"' not in text
        caller = 'caller="medal",category="revenue"'
        assert f'shunter_caller_backlog{{{caller},state="queued"}} 4.0' in lines
        assert f'shunter_caller_backlog{{{caller},state="running"}} 2.0' in lines
        assert f"shunter_caller_pending{{{caller}}} 6.0" in lines
        assert f"shunter_caller_oldest_pending_seconds{{{caller}}} 7.25" in lines
        assert f"shunter_caller_paused{{{caller}}} 0.0" in lines
        assert f"shunter_caller_stuck_slots{{{caller}}} 1.0" in lines
        assert "shunter_consumer_lag" not in text  # replaced by kafka_consumergroup_group_lag

    run_admin(monkeypatch, scenario)


@pytest.mark.parametrize(
    ("host", "served"),
    [
        ("127.0.0.1:{port}", True),
        ("localhost:{port}", True),
        ("[::1]:{port}", True),
        ("LOCALHOST", True),
        ("admin.internal:{port}", True),  # configured
        ("evil.example:{port}", False),  # DNS rebinding
        ("127.0.0.1.evil.example", False),
        ("10.1.2.3:{port}", False),  # another address: only on a wildcard listen
    ],
)
def test_host_header_is_checked(monkeypatch: pytest.MonkeyPatch, host: str, served: bool) -> None:
    async def scenario(service: FakeService, base: str) -> None:
        port = base.rsplit(":", 1)[1]
        for path in ("/health", "/topology", "/"):
            status, _ = await get(base + path, headers={"Host": host.format(port=port)})
            assert (status == 200) is served, (path, status)
            if not served:
                assert status == 421

    run_admin(monkeypatch, scenario, allowed_hosts=["admin.internal"])


@pytest.mark.parametrize(
    "header",
    [
        "Bearer wrong",
        "Bearer",
        "Basic dGhlLWFkbWluLXRva2Vu",
        "Bearer the-admin-tokén",  # non-ASCII: a 500 with a traceback before
        "Bearer \udcff",
        "bearer the-admin-token",
        "",
    ],
)
def test_malformed_tokens_are_401(monkeypatch: pytest.MonkeyPatch, header: str) -> None:
    """Raw bytes on the wire, so that a header aiohttp's client would refuse is sent too."""

    async def scenario(service: FakeService, base: str) -> None:
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        raw = header.encode("utf-8", "surrogateescape")
        writer.write(
            b"POST /deadletters/replay HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n"
            b"Authorization: " + raw + b"\r\nConnection: close\r\n\r\n{}"
        )
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        assert b"Traceback" not in answer

    run_admin(monkeypatch, scenario)


def test_a_half_sent_request_is_closed_within_the_header_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario(service: FakeService, base: str) -> None:
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        for _ in range(10):  # a slowloris keeps dripping: the deadline does not move
            await asyncio.sleep(0.1)
            writer.write(b"a")
        rest = await asyncio.wait_for(reader.read(), 5.0)  # b"" once the server closes
        elapsed = time.monotonic() - started
        writer.close()
        assert b"200 OK" not in rest
        assert elapsed < 1.0 + 1.5, elapsed

    run_admin(monkeypatch, scenario, header_timeout="1s")


def test_a_body_over_the_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(service: FakeService, base: str) -> None:
        headers = {"Authorization": "Bearer the-admin-token"}
        async with (
            aiohttp.ClientSession() as session,
            session.post(base + "/deadletters/replay", data=b"x" * 5000, headers=headers) as resp,
        ):
            assert resp.status == 413
        async with (
            aiohttp.ClientSession() as session,
            session.post(base + "/deadletters/replay", data=b"[1]", headers=headers) as resp,
        ):
            assert resp.status == 400  # not an object
            assert "expected a JSON object" in (await resp.json())["error"]

    run_admin(monkeypatch, scenario, max_body=4096)


def test_dashboard_is_served_from_the_package_without_external_urls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario(service: FakeService, base: str) -> None:
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/") as resp:
                assert resp.status == 200
                assert resp.content_type == "text/html"
                assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
                page = await resp.text()
            for asset in ("dashboard.js", "dashboard.css"):
                assert f"/dashboard/{asset}" in page
                async with session.get(f"{base}/dashboard/{asset}") as resp:
                    assert resp.status == 200
                    text = await resp.text()
                    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
                    assert "https://" not in text
            async with session.get(base + "/dashboard/..%2Fadmin.py") as resp:
                assert resp.status == 404

    run_admin(monkeypatch, scenario)


def test_the_first_request_deadline_does_not_rely_on_aiohttps_keepalive() -> None:
    """AdminSite alone (aiohttp's own timer set to an hour) cuts off a first request that
    never completes, and leaves a connection that sent one alone."""
    from aiohttp import web

    from shunter.observe.httpguard import AdminSite

    async def main() -> None:
        served: set[Any] = set()

        @web.middleware
        async def mark(request: web.Request, handler: Any) -> web.StreamResponse:
            served.add(request.transport)
            return await handler(request)

        async def slow(_: web.Request) -> web.Response:
            await asyncio.sleep(1.5)  # longer than the deadline: a served request is kept
            return web.Response(text="done")

        app = web.Application(middlewares=[mark])
        app.add_routes([web.get("/slow", slow)])
        runner = web.AppRunner(app, keepalive_timeout=3600)
        await runner.setup()
        port = free_port()
        await AdminSite(runner, "127.0.0.1", port, 0.5, served).start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.monotonic()
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n")  # no blank line: incomplete
            assert await asyncio.wait_for(reader.read(), 5.0) == b""
            assert time.monotonic() - started < 1.5
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 5.0)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"done")
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_a_second_request_on_a_kept_alive_connection_has_the_same_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario(service: FakeService, base: str) -> None:
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b'"ok"}'), 5.0)
        assert first.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        assert await asyncio.wait_for(reader.read(), 5.0) == b""
        writer.close()
        assert time.monotonic() - started < 2.5

    run_admin(monkeypatch, scenario, header_timeout="1s")


def test_allowed_hosts_are_validated_with_their_key_path() -> None:
    from shunter.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        parse_config({"admin": {"allowed_hosts": ["ok.example", "http://bad/"]}})
    assert "admin.allowed_hosts" in str(refused.value)
    config = parse_config({"admin": {"allowed_hosts": ["Admin.Internal"], "header_timeout": "2s"}})
    assert config.admin.allowed_hosts == ["admin.internal"]
    assert config.admin.header_timeout == 2.0


def test_logs_and_config_answers_share_one_redaction(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from shunter.observe.logs import Redact

    monkeypatch.setenv("HOOK_TOKEN", SECRET)
    config = parse_config(
        {"topics": {"t": {}}, "categories": {"c": {"topics": ["t"]}},
         "subscribers": [{"caller": "hook", "category": "c",
                          "http": {"url": "https://h.example.com/?token=${HOOK_TOKEN}"}}]}
    )  # fmt: skip
    assert config.secrets == frozenset({SECRET})
    record = logging.LogRecord(
        "x", logging.ERROR, __file__, 1, "POST %s failed", ("?token=" + SECRET,), None
    )
    Redact(config.secrets).filter(record)
    assert record.getMessage() == "POST ?token=*** failed"


def test_host_check_rules() -> None:
    from shunter.observe.httpguard import HostCheck

    local = HostCheck("127.0.0.1", ["Admin.Internal"])
    assert local.allows("admin.internal:8080") and local.allows("ADMIN.INTERNAL.")
    assert not local.allows("192.168.1.5:8080")  # another address of the machine: not served
    assert not local.allows(None) and not local.allows("")
    wildcard = HostCheck("0.0.0.0", [])
    assert wildcard.allows("192.168.1.5:8080") and wildcard.allows("[fe80::1]:8080")
    assert not wildcard.allows("rebind.example:8080")  # a name must be configured
    named = HostCheck("dispatcher-1.internal", [])
    assert named.allows("dispatcher-1.internal:8080") and named.allows("localhost")
