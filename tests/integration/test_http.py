"""HTTP subscribers against a real local HTTP server and a real broker.

Given endpoints that answer as scripted, when shunter delivers to them, then: the request
carries the value and the delivery's coordinates; 2xx succeeds; 408, 429, 5xx, timeouts and
refused connections are retried (after Retry-After when given) and the idempotency key
stays the same; other 4xx and redirects go to the dead-letter topic once, with the status
and a bounded body; the circuit breaker stops calling a failing endpoint and probes it; the
rate limit holds; addresses outside the policy are never connected to; and one endpoint's
outage loses nothing and leaves the other subscribers' throughput alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDict

import shunter
from kafkatools import Broker, config
from shunter.broker.embedded import free_port
from shunter.config import SubscriberConfig
from shunter.deliver.http import http_invoke
from shunter.observe.collector import StatsCollector
from shunter.observe.stats import Stats
from shunter.settle import headers as h
from shunter.testing import DispatcherThread, make_message

SECRET = "s3cr3t-t0ken-4711"
LOCAL = ["127.0.0.1"]


# -- a scriptable HTTP server on its own thread ---------------------------------------------


@dataclass
class Call:
    path: str
    headers: CIMultiDict[str]
    body: bytes
    arrived: float  # time.monotonic()
    status: int = 0
    answered: float = 0.0

    @property
    def attempt(self) -> int:
        return int(self.headers["Shunter-Attempt"])

    @property
    def key(self) -> str:
        return self.headers["Idempotency-Key"]

    @property
    def n(self) -> int:
        import orjson

        return int(orjson.loads(self.body)["n"])


Answer = tuple[int, bytes | str, dict[str, str]]
Script = Callable[[Call], Answer | Awaitable[Answer]]


class HookServer:
    """Answers POST /<path> with its script (200 by default) and records every call."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None
    ) -> None:
        self.host, self.port, self._tls = host, port, tls
        self._scripts: dict[str, Script] = {}
        self._calls: list[Call] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.release = asyncio.Event()  # set at stop: hanging answers return

    def url(self, path: str) -> str:
        scheme = "https" if self._tls else "http"
        return f"{scheme}://{self.host}:{self.port}/{path}"

    def script(self, path: str, script: Script) -> None:
        self._scripts[path] = script

    def calls(self, path: str | None = None) -> list[Call]:
        with self._lock:
            return [c for c in self._calls if path is None or c.path == path]

    async def _handle(self, request: web.Request) -> web.Response:
        call = Call(
            request.path.lstrip("/"),
            CIMultiDict(request.headers),
            await request.read(),
            time.monotonic(),
        )
        with self._lock:
            self._calls.append(call)
        script = self._scripts.get(call.path, lambda c: (200, "ok", {}))
        answer = script(call)
        status, body, headers = await answer if inspect.isawaitable(answer) else answer
        call.status, call.answered = status, time.monotonic()
        return web.Response(status=status, body=body, headers=headers)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=0.5, access_log=None
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self._tls)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _stop(self) -> None:
        self.release.set()
        assert self._runner is not None
        await self._runner.cleanup()

    def start(self) -> HookServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def hang(self, seconds: float) -> Callable[[Call], Awaitable[Answer]]:
        """A script that answers 200 only after ``seconds`` (or at stop)."""

        async def slow(call: Call) -> Answer:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), seconds)
            return 200, "late", {}

        return slow


@pytest.fixture
def hooks() -> Iterator[HookServer]:
    server = HookServer().start()
    try:
        yield server
    finally:
        server.stop()


def first_attempt(
    status: int, headers: dict[str, str] | None = None, body: str = "try again"
) -> Script:
    """Answer ``status`` to a delivery's first attempt, 200 afterwards."""
    return lambda call: (status, body, headers or {}) if call.attempt == 1 else (200, "ok", {})


def always(status: int, body: str = "no", headers: dict[str, str] | None = None) -> Script:
    return lambda call: (status, body, headers or {})


# -- helpers ----------------------------------------------------------------------------------


def http_sub(caller: str, url: str, **http: Any) -> dict[str, Any]:
    sub: dict[str, Any] = {"caller": caller, "category": "c", "ordering": "none"}
    for key in ("concurrency", "timeout", "ordering"):
        if key in http:
            sub[key] = http.pop(key)
    sub["http"] = {"url": url, "allow_private": LOCAL, **http}
    return sub


def app_for(
    broker: Broker, unique: str, subscribers: list[dict[str, Any]], **extra: Any
) -> shunter.Dispatcher:
    topic = f"hooks-{unique}"
    broker.create({topic: 2})
    return shunter.Dispatcher(
        config(
            broker,
            f"g-{unique}",
            topics={topic: {}},
            categories={"c": {"topics": [topic]}},
            subscribers=subscribers,
            **extra,
        )
    )


def produce(broker: Broker, unique: str, count: int, start: int = 0) -> set[int]:
    broker.produce(
        f"hooks-{unique}",
        [{"n": i} for i in range(start, start + count)],
        key=lambda i, v: f"k{v['n']}",
    )
    return set(range(start, start + count))


def tier(broker: Broker, unique: str, name: str) -> list[h.FailureInfo]:
    """The failure headers of every record in a retry tier or the dead-letter topic."""
    topic = f"g-{unique}." + ("dlq" if name == "dlq" else f"retry.{name}")
    return [h.decode(m.headers()) for m in broker.read_all(topic)]


def delivered(server: HookServer, path: str) -> set[int]:
    return {c.n for c in server.calls(path) if 200 <= c.status <= 299}


def metric(running: DispatcherThread, name: str, **labels: str) -> float:
    for family in StatsCollector(running.app.service.stats).collect():
        for sample in family.samples:
            if sample.name in (name, f"{name}_total") and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                return float(sample.value)
    return 0.0


# -- the request ------------------------------------------------------------------------------


@pytest.mark.kafka
def test_success_posts_the_value_with_coordinates_and_configured_headers(
    broker: Broker,
    unique: str,
    hooks: HookServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("HOOK_TOKEN", SECRET)
    app = app_for(
        broker,
        unique,
        [
            http_sub(
                "as-json", hooks.url("json"), headers={"Authorization": "Bearer ${HOOK_TOKEN}"}
            ),
            http_sub("as-raw", hooks.url("raw"), body="raw", content_type="application/x-gift"),
        ],
    )
    sent = produce(broker, unique, 20)
    with DispatcherThread(app) as running:
        running.wait_for(lambda: delivered(hooks, "json") == sent == delivered(hooks, "raw"))
    for call in hooks.calls("json"):
        assert call.headers["Content-Type"] == "application/json"
        assert call.headers["Authorization"] == f"Bearer {SECRET}"
        assert call.headers["Shunter-Caller"] == "as-json"
        assert call.headers["Shunter-Category"] == "c"
        assert call.headers["Shunter-Topic"] == f"hooks-{unique}"
        assert call.headers["Shunter-Attempt"] == "1"
        assert call.headers["User-Agent"].startswith("shunter/")
    for call in hooks.calls("raw"):
        assert call.headers["Content-Type"] == "application/x-gift"
        assert "Authorization" not in call.headers
    coordinates = {
        (c.headers["Shunter-Partition"], c.headers["Shunter-Offset"]) for c in hooks.calls("json")
    }
    assert len(coordinates) == len(sent) == len(hooks.calls("json"))
    keys = {c.key for c in hooks.calls()}
    assert len(keys) == 2 * len(sent), "an idempotency key is shared by two deliveries"
    assert SECRET not in caplog.text


# -- the response contract --------------------------------------------------------------------

TRANSIENT = [408, 429, 500, 502, 503, 504]
PERMANENT = [400, 401, 403, 404, 405, 409, 410, 413, 415, 422]
REDIRECTS = [301, 302, 307, 308]


@pytest.mark.kafka
def test_response_contract(
    broker: Broker,
    unique: str,
    hooks: HookServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Transient answers are retried with the same idempotency key until they succeed;
    permanent ones are dead-lettered after one call, with status and body, secrets masked."""
    monkeypatch.setenv("HOOK_TOKEN", SECRET)
    subs = []
    for status in TRANSIENT:
        hooks.script(f"t{status}", first_attempt(status))
        subs.append(http_sub(f"t{status}", hooks.url(f"t{status}")))
    hooks.script("after-429", first_attempt(429, {"Retry-After": "1"}))
    hooks.script("after-503", first_attempt(503, {"Retry-After": "2"}))
    hooks.script("slow", lambda c: hooks.hang(3)(c) if c.attempt == 1 else (200, "ok", {}))
    subs += [
        http_sub("after-429", hooks.url("after-429")),
        http_sub("after-503", hooks.url("after-503")),
        http_sub("slow", hooks.url("slow"), timeout="300ms"),
    ]
    for status in PERMANENT:  # the body echoes the secret header: it must not get out
        hooks.script(
            f"p{status}",
            lambda c, s=status: (  # type: ignore[misc]
                s,
                f"rejected {c.headers['X-Token']} " + "x" * 5000,
                {},
            ),
        )
        subs.append(
            http_sub(f"p{status}", hooks.url(f"p{status}"), headers={"X-Token": "${HOOK_TOKEN}"})
        )
    for status in REDIRECTS:
        hooks.script(f"r{status}", always(status, "moved", {"Location": hooks.url("target")}))
        subs.append(http_sub(f"r{status}", hooks.url(f"r{status}")))
    closed = free_port()  # nothing listens there until the first failures are seen
    subs.append(http_sub("refused", f"http://127.0.0.1:{closed}/late"))
    for sub in subs:
        sub["http"]["breaker_failures"] = 1000  # the breaker has its own test
    app = app_for(
        broker,
        unique,
        subs,
        retry={"fast": {"attempts": 3, "delay": "200ms"}, "slow": {"attempts": 5, "delay": "1s"}},
    )
    sent = produce(broker, unique, 3)
    late = HookServer(port=closed)
    with DispatcherThread(app) as running:
        running.wait_for(
            lambda: (
                metric(running, "shunter_http_answers", caller="refused", answer="connect-error")
                >= 1
            )
        )
        late.start()
        try:
            done = [f"t{s}" for s in TRANSIENT] + ["after-429", "after-503", "slow"]
            running.wait_for(
                lambda: (
                    all(delivered(hooks, p) == sent for p in done)
                    and delivered(late, "late") == sent
                )
            )
            running.wait_for(
                lambda: len(tier(broker, unique, "dlq")) >= 3 * (len(PERMANENT) + len(REDIRECTS))
            )
        finally:
            late.stop()

    for path in [f"t{s}" for s in TRANSIENT] + ["after-429", "after-503", "slow"]:
        calls = hooks.calls(path)
        by_message: dict[int, list[Call]] = {}
        for call in calls:
            by_message.setdefault(call.n, []).append(call)
        for n, tries in by_message.items():
            assert [c.attempt for c in tries] == [1, 2], (path, n)
            assert len({c.key for c in tries}) == 1, f"{path}: the idempotency key changed"
    fast = tier(broker, unique, "fast")
    assert {i.caller for i in fast} >= {f"t{s}" for s in TRANSIENT} | {"slow", "refused"}
    for info in fast:
        if info.caller.startswith("t"):
            assert info.error.startswith(f"HTTP {info.caller[1:]} "), info.error
            assert info.not_before_ms - info.first_failure_ms == 200  # the tier's own delay
    waits = {i.caller: i.not_before_ms - i.first_failure_ms for i in fast}
    assert waits["after-429"] == 1000 and waits["after-503"] == 2000  # Retry-After honoured
    for path, delay in (("after-429", 1.0), ("after-503", 2.0)):
        for n in sent:
            first, second = (c for c in hooks.calls(path) if c.n == n)
            assert second.arrived - first.arrived >= delay - 0.05
    assert all("within 0.3s" in i.error for i in fast if i.caller == "slow")
    assert all("cannot connect" in i.error for i in fast if i.caller == "refused")

    dlq = tier(broker, unique, "dlq")
    for status in PERMANENT + REDIRECTS:
        prefix = "p" if status in PERMANENT else "r"
        assert len(hooks.calls(f"{prefix}{status}")) == 3, "a permanent failure was retried"
        records = [i for i in dlq if i.caller == f"{prefix}{status}"]
        assert len(records) == 3 and all(i.attempt == 1 for i in records)
        for info in records:
            assert info.error.startswith(f"HTTP {status} "), info.error
            assert len(info.error) < 2000 and SECRET not in info.error
            if status in PERMANENT:  # the body, bounded and masked
                assert "; body: rejected *** xxx" in info.error and info.error.endswith("[cut]")
            else:
                assert info.error.endswith("redirects are not followed")
    assert hooks.calls("target") == [], "a redirect was followed"
    assert {i.caller for i in dlq} == {f"p{s}" for s in PERMANENT} | {f"r{s}" for s in REDIRECTS}
    assert SECRET not in caplog.text


# -- the circuit breaker ----------------------------------------------------------------------


@pytest.mark.kafka
def test_circuit_opens_probes_half_open_and_closes(
    broker: Broker, unique: str, hooks: HookServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shunter.deliver.http")
    up = threading.Event()
    hooks.script("flaky", lambda c: (200, "ok", {}) if up.is_set() else (503, "down", {}))
    cooldown = 1.5
    app = app_for(
        broker,
        unique,
        [
            http_sub(
                "flaky",
                hooks.url("flaky"),
                breaker_failures=3,
                breaker_cooldown=f"{cooldown}s",
                concurrency=4,
            )
        ],
        retry={"fast": {"attempts": 200, "delay": "100ms"}},
    )
    sent = produce(broker, unique, 30)
    with DispatcherThread(app) as running:
        running.wait_for(
            lambda: metric(running, "shunter_http_circuit_opened", caller="flaky") >= 2
        )
        up.set()
        running.wait_for(lambda: delivered(hooks, "flaky") == sent)
        assert metric(running, "shunter_http_circuit_state", caller="flaky") == 0
        refused = metric(running, "shunter_http_answers", caller="flaky", answer="circuit-open")

    calls = sorted(hooks.calls("flaky"), key=lambda c: c.arrived)
    failing = [c for c in calls if c.status == 503]
    # Closed: the third consecutive failure opened it, with at most `concurrency - 1` more
    # requests already out. Open: no request at all (else 30 messages retried every 100 ms
    # would have made hundreds of failures). Half-open: one probe, which failed.
    assert 3 + 1 <= len(failing) <= 3 + (4 - 1) + 1, [c.status for c in calls]
    assert refused > 0, "no delivery was turned away while the circuit was open"
    third_answer = sorted(c.answered for c in failing[:-1])[2]  # the circuit opened after it
    failed_probe = failing[-1]
    assert failed_probe.arrived - third_answer >= cooldown - 0.05
    # Open again for a cool-down; then the probe that succeeded, alone until it answered.
    probe = next(c for c in calls if c.status == 200)
    assert probe.arrived - failed_probe.answered >= cooldown - 0.05
    assert not [c for c in calls if probe.arrived < c.arrived < probe.answered], (
        "a request went out beside the half-open probe"
    )
    assert sorted(c.n for c in calls if c.status == 200) == sorted(sent)
    states = [
        r.getMessage().split(": ")[1].removeprefix("circuit ")
        for r in caplog.records
        if r.name == "shunter.deliver.http" and ": circuit " in r.getMessage()
    ]
    assert states[:3] == ["open", "half-open", "open"], states
    assert states[-2:] == ["half-open", "closed"], states
    assert not tier(broker, unique, "dlq")


# -- the rate limit ---------------------------------------------------------------------------


@pytest.mark.kafka
def test_rate_limit_spaces_requests(broker: Broker, unique: str, hooks: HookServer) -> None:
    rate = 20
    app = app_for(
        broker, unique, [http_sub("limited", hooks.url("limited"), rate_limit=rate, concurrency=8)]
    )
    sent = produce(broker, unique, 60)
    with DispatcherThread(app) as running:
        running.wait_for(lambda: delivered(hooks, "limited") == sent)
    arrivals = sorted(c.arrived for c in hooks.calls("limited"))
    busiest = max(sum(1 for t in arrivals if start <= t < start + 1.0) for start in arrivals)
    assert busiest <= rate + 5, f"{busiest} requests within one second at {rate}/s"
    span = arrivals[-1] - arrivals[0]
    print(
        f"rate limit {rate}/s: {len(arrivals)} requests over {span:.2f}s "
        f"({(len(arrivals) - 1) / span:.1f}/s), busiest second {busiest}"
    )


# -- where a subscriber may connect -----------------------------------------------------------


@pytest.mark.parametrize(
    ("http", "expected"),
    [
        (
            {"url": "http://hooks.example.com/x", "allow_hosts": ["api.example.com"]},
            "host 'hooks.example.com' is not in allow_hosts",
        ),
        (
            {
                "url": "https://hooks.example.com:8443/x",
                "allow_hosts": ["*.example.com"],
                "allow_ports": [443],
            },
            "port 8443 is not in allow_ports",
        ),
        ({"url": "http://127.0.0.1:9/x"}, "127.0.0.1 is a loopback address"),
        ({"url": "http://10.1.2.3/x"}, "10.1.2.3 is a private address"),
        ({"url": "http://[::ffff:192.168.0.1]/x"}, "is a private address"),
        (
            {"url": "http://169.254.169.254/latest/meta-data", "allow_private": ["169.254.0.0/16"]},
            "is a cloud-metadata address",
        ),
        ({"url": "http://2130706433/x"}, "not a canonical IP address"),
        ({"url": "ftp://example.com/x"}, "expected an absolute http:// or https:// URL"),
        ({"url": "http://example.com/x", "headers": {"Host": "other"}}, "is set by shunter"),
        ({"url": "http://example.com/x", "headers": {"X-A": "a\r\nX-B: b"}}, "line break"),
    ],
)
def test_config_refuses_urls_outside_the_allowlists(http: dict[str, Any], expected: str) -> None:
    with pytest.raises(shunter.ConfigError) as refused:
        shunter.Dispatcher(
            {
                "topics": {"t": {}},
                "categories": {"c": {"topics": ["t"]}},
                "subscribers": [{"caller": "x", "category": "c", "http": http}],
            }
        )
    assert "subscribers[0].http" in str(refused.value)
    assert expected in str(refused.value)


@pytest.mark.kafka
def test_hostname_resolving_to_a_private_address_is_refused(
    broker: Broker, unique: str, hooks: HookServer
) -> None:
    """``localhost`` resolves to loopback: refused unless allowed, and never connected to."""
    app = app_for(
        broker,
        unique,
        [
            {
                "caller": "sneaky",
                "category": "c",
                "http": {"url": f"http://localhost:{hooks.port}/sneaky"},
            },
            http_sub("allowed", f"http://localhost:{hooks.port}/allowed"),
        ],
    )
    sent = produce(broker, unique, 5)
    with DispatcherThread(app) as running:
        running.wait_for(
            lambda: (
                delivered(hooks, "allowed") == sent
                and len(tier(broker, unique, "dlq")) >= len(sent)
            )
        )
    assert hooks.calls("sneaky") == []
    dlq = tier(broker, unique, "dlq")
    assert {i.caller for i in dlq} == {"sneaky"} and len(dlq) == len(sent)
    for info in dlq:
        assert "localhost resolves only to forbidden addresses: 127.0.0.1 (loopback)" in info.error


class FakeDns(AbstractResolver):
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=a,
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for a in self.answers[host]
        ]

    async def close(self) -> None:
        pass


def test_only_allowed_addresses_of_a_name_are_connected_to() -> None:
    """A name answering a forbidden and an allowed address: the forbidden one is never
    contacted (a second server listens there to notice), the allowed one serves."""
    allowed = HookServer("127.0.0.1").start()
    forbidden = HookServer("127.0.0.2", port=allowed.port).start()
    try:
        sub = SubscriberConfig.model_validate(
            {
                "caller": "x",
                "category": "c",
                "http": {
                    "url": f"http://hooks.example.test:{allowed.port}/in",
                    "allow_private": LOCAL,
                },
            }
        )
        dns = FakeDns({"hooks.example.test": ["127.0.0.2", "127.0.0.1"]})

        async def deliver() -> None:
            invoke, close = http_invoke(sub, "subscribers[0]", Stats({"x": "c"}), resolver=dns)
            try:
                for n in range(5):
                    await invoke(make_message({"n": n}, caller="x", category="c"))
            finally:
                await close()

        asyncio.run(deliver())
        assert len(allowed.calls("in")) == 5
        assert forbidden.calls() == []
    finally:
        forbidden.stop()
        allowed.stop()


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is needed to make the test certificate", pytrace=False)
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.mark.kafka
def test_tls_is_verified(broker: Broker, unique: str, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = HookServer(tls=context).start()
    try:
        app = app_for(
            broker,
            unique,
            [
                http_sub("untrusted", server.url("untrusted"), breaker_failures=1000),
                http_sub("trusted", server.url("trusted"), ca_file=str(cert)),
            ],
        )
        sent = produce(broker, unique, 3)
        with DispatcherThread(app) as running:
            running.wait_for(
                lambda: (
                    delivered(server, "trusted") == sent
                    and len(tier(broker, unique, "dlq")) >= len(sent)
                )
            )
        assert server.calls("untrusted") == []
        dlq = tier(broker, unique, "dlq")
        assert {i.caller for i in dlq} == {"untrusted"}
        assert all("certificate verify failed" in i.error for i in dlq), dlq[0].error
    finally:
        server.stop()


# -- an outage of one endpoint ----------------------------------------------------------------


@pytest.mark.kafka
def test_outage_of_one_endpoint_loses_nothing_and_spares_the_others(
    broker: Broker, unique: str, hooks: HookServer
) -> None:
    down = threading.Event()
    hang = hooks.hang(30)
    hooks.script("fragile", lambda c: hang(c) if down.is_set() else (200, "ok", {}))
    steady = ["steady-a", "steady-b"]
    app = app_for(
        broker,
        unique,
        [
            http_sub(
                "fragile",
                hooks.url("fragile"),
                timeout="500ms",
                breaker_failures=5,
                breaker_cooldown="1s",
                concurrency=16,
            ),
            *(http_sub(s, hooks.url(s), concurrency=16) for s in steady),
        ],
        retry={
            "fast": {"attempts": 3, "delay": "200ms"},
            "slow": {"attempts": 1000, "delay": "1s"},
        },
    )
    batch = 1500
    first = produce(broker, unique, batch)
    with DispatcherThread(app) as running:
        running.wait_for(lambda: all(delivered(hooks, p) == first for p in [*steady, "fragile"]))
        baseline = _rate(hooks, steady, first)
        down.set()
        second = produce(broker, unique, batch, start=batch)
        running.wait_for(lambda: all(delivered(hooks, s) >= second for s in steady))
        assert down.is_set() and not (delivered(hooks, "fragile") & second)
        during = _rate(hooks, steady, second)
        # the steady ones may finish before the first 500 ms timeout even fires
        running.wait_for(
            lambda: (
                metric(running, "shunter_http_circuit_opened", caller="fragile") >= 1
                and metric(running, "shunter_http_answers", caller="fragile", answer="circuit-open")
                > 0
            ),
            timeout=30,
        )
        down.clear()
        hooks.release.set()
        running.wait_for(lambda: delivered(hooks, "fragile") == first | second, timeout=90)
        for s in steady:
            assert metric(running, "shunter_http_circuit_opened", caller=s) == 0
    for path in [*steady, "fragile"]:
        assert delivered(hooks, path) == first | second, f"{path} lost messages"
    assert not tier(broker, unique, "dlq"), "a delivery was dead-lettered"
    print(
        f"steady subscribers: {baseline:.0f} deliveries/s before the outage, {during:.0f} "
        f"during it (ratio {during / baseline:.2f})"
    )


def _rate(server: HookServer, paths: list[str], messages: set[int]) -> float:
    """Deliveries per second to ``paths`` for ``messages``, first arrival to last answer."""
    calls = [c for p in paths for c in server.calls(p) if c.n in messages]
    span = max(c.answered for c in calls) - min(c.arrived for c in calls)
    return len(calls) / span
