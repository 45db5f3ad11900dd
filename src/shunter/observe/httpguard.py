"""What stands between the admin API and the network: Host check, token check, redaction,
errors without tracebacks, and headers that keep the dashboard page to itself.

- **Host header.** A browser on a hostile page can make its own domain resolve to
  127.0.0.1 (DNS rebinding) and read the API as same-origin; its requests still say
  ``Host: evil.example``. Only the listen address, ``localhost``, ``127.0.0.1``, ``[::1]``
  and ``admin.allowed_hosts`` are served (any IP literal too when listening on a wildcard
  address: an address cannot be rebound); anything else gets 421.
- **Token.** ``Authorization: Bearer <token>`` compared in constant time as bytes; any
  header that is not exactly that (missing, another scheme, non-ASCII, empty token) is 401.
- **Time.** A connection must complete its first request within ``admin.header_timeout``
  (``FirstRequestDeadline``); after a response, aiohttp's keep-alive timer (set to the same
  value) closes a connection that does not complete its next request in time. Both are
  deadlines, not idle timers: a client dripping one byte at a time is cut off too.
- **Redaction.** Every JSON answer passes through ``config.redact`` (the one redaction,
  also used by ``shunter check`` and the logs) with the values ``${VAR}`` put into the
  configuration.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..config import redact

log = logging.getLogger("shunter.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_LOOPBACK = {"localhost", "127.0.0.1", "::1"}
_WILDCARD = {"", "0.0.0.0", "::"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _bare(host: str) -> str:
    """A Host header or listen host without port or brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HostCheck:
    """Which Host header values the admin API serves."""

    def __init__(self, listen_host: str, configured: Iterable[str]) -> None:
        listen = _bare(listen_host)
        self.any_address = listen in _WILDCARD
        self.names = _LOOPBACK | {_bare(h) for h in configured} | ({listen} - _WILDCARD)

    def allows(self, header: str | None) -> bool:
        if not header:
            return False
        host = _bare(header)
        return host in self.names or (self.any_address and _is_ip(host))


def bearer_ok(header: str | None, token: str) -> bool:
    """True only for ``Bearer <token>`` exactly, with a token configured."""
    if not token or not header:
        return False
    given = header.encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given, f"Bearer {token}".encode())


def redacted(data: Any, secrets: Iterable[str]) -> Any:
    """``data`` (JSON-like) with every secret in its strings and keys replaced by ``***``."""
    secrets = [s for s in secrets if s]
    if not secrets:
        return data

    def walk(node: Any) -> Any:
        if isinstance(node, str):
            return redact([node], secrets)[0] if any(s in node for s in secrets) else node
        if isinstance(node, dict):
            return {walk(k): walk(v) for k, v in node.items()}
        if isinstance(node, list | tuple):
            return [walk(v) for v in node]
        return node

    return walk(data)


def json_answer(data: Any, secrets: Iterable[str], status: int = 200) -> web.Response:
    return web.json_response(redacted(data, secrets), status=status)


def guard(hosts: HostCheck, served: set[Any]) -> Middleware:
    """The admin API's middleware: Host check, no tracebacks out, security headers; marks
    the connection as having sent a complete request (``served``)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        served.add(request.transport)
        if not hosts.allows(request.headers.get("Host")):
            response: web.StreamResponse = web.json_response(
                {"error": "this Host is not served here (admin.allowed_hosts)"}, status=421
            )
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                response = web.json_response({"error": exc.reason}, status=exc.status)
            except Exception:
                log.exception("admin API: %s %s failed", request.method, request.path)
                response = web.json_response({"error": "internal error (see the log)"}, status=500)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    return middleware


class FirstRequestDeadline(asyncio.Protocol):
    """aiohttp's connection protocol, closed when its first complete request has not
    arrived ``seconds`` after the connection opened (aiohttp before 3.14 waits forever
    for a first request; after one, its keep-alive timer takes over)."""

    def __init__(self, inner: asyncio.Protocol, seconds: float, served: set[Any]) -> None:
        self._inner = inner
        self._seconds = seconds
        self._served = served
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(self._seconds, self._expire)
        self._inner.connection_made(transport)

    def _expire(self) -> None:
        transport = self._transport
        if transport is not None and transport not in self._served and not transport.is_closing():
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._served.discard(self._transport)
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class AdminSite(web.BaseSite):
    """A TCP site whose connections must complete their first request in time."""

    __slots__ = ("_host", "_port", "_seconds", "_served")

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, seconds: float, served: set[Any]
    ) -> None:
        super().__init__(runner)
        self._host, self._port, self._seconds, self._served = host, port, seconds, served

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: FirstRequestDeadline(server(), self._seconds, self._served),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )
