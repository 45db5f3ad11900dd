"""HTTP subscribers: every delivery is one POST to the subscriber's endpoint.

The path of one delivery (``HttpSubscriber.deliver``), in this fixed order:

1. circuit breaker (``http_breaker``): while open, straight to the retry tier, no request;
2. rate limit (``http_breaker.RateLimiter``): wait for this subscriber's next slot;
3. POST over a pooled keep-alive connection whose address passed the policy
   (``http_guard``), with the request timeout and redirects not followed;
4. the response contract (``http_contract``): 2xx succeeds, transient failures raise
   ``RetryLater``, permanent ones ``DeadLetter``; the breaker is told which.

Request: the decoded value as JSON (``body: json``) or the record's bytes with its own
``content-type`` header, else ``http.content_type`` (``body: raw``), with the headers
below plus the configured ones. Concurrency and the delivery timeout are the runtime's
(``subscribers[].concurrency``/``timeout``); each subscriber has its own connection pool,
breaker and limiter, so one endpoint's outage costs the others nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver
from yarl import URL

from .. import __version__
from ..config import SubscriberConfig
from ..errors import ConfigError, DeadLetter
from ..message import Message
from ..observe.stats import Stats
from .http_breaker import CLOSED, STATE_VALUE, CircuitBreaker, RateLimiter, Refused
from .http_contract import CircuitOpen, HttpFailure, Redactor, read_bounded, status_error
from .http_guard import AddressPolicy, AddressRefused, GuardedResolver, guarded_socket, safe_url

log = logging.getLogger("shunter.deliver.http")

# Request headers; the idempotency key is the same on every attempt of a delivery.
CALLER = "Shunter-Caller"
CATEGORY = "Shunter-Category"
TOPIC = "Shunter-Topic"
PARTITION = "Shunter-Partition"
OFFSET = "Shunter-Offset"
TIMESTAMP = "Shunter-Timestamp"  # the record's, ms since the epoch
ATTEMPT = "Shunter-Attempt"  # 1 on the first delivery
IDEMPOTENCY_KEY = "Idempotency-Key"
JSON = "application/json"

Closer = Callable[[], Awaitable[None]]


def http_invoke(
    sub: SubscriberConfig,
    where: str,
    stats: Stats,
    resolver: AbstractResolver | None = None,
    inject: Callable[[dict[str, str]], None] | None = None,
) -> tuple[Callable[[Message], Coroutine[Any, Any, None]], Closer]:
    """The runtime's ``Invoke`` for an HTTP subscriber, and the closer of its connection pool.

    Call it with the event loop running. ``resolver`` replaces the system DNS under the
    address policy (tests); the policy applies to whatever it answers. ``inject`` adds
    headers to each request (tracing: the delivery's trace context).
    """
    subscriber = HttpSubscriber(sub, where, resolver)
    subscriber.inject = inject
    _register(stats, subscriber)
    return subscriber.deliver, subscriber.close


def idempotency_key(msg: Message) -> str:
    """Stable across retries and replays of one delivery: caller + origin coordinates."""
    origin = f"{msg.caller}\0{msg.topic}\0{msg.partition}\0{msg.offset}\0{msg.timestamp}"
    return hashlib.blake2b(origin.encode(), digest_size=16).hexdigest()


class HttpSubscriber:
    def __init__(
        self, sub: SubscriberConfig, where: str, resolver: AbstractResolver | None = None
    ) -> None:
        cfg = sub.http
        assert cfg is not None
        self.caller = sub.caller
        self.url = URL(cfg.url)
        self.endpoint = safe_url(self.url)
        self.raw = cfg.body == "raw"
        self.content_type = cfg.content_type
        self.max_body = cfg.max_body
        self.max_retry_after = cfg.max_retry_after
        self.timeout = min(cfg.timeout, sub.timeout)
        self.redact = Redactor([*cfg.headers.values(), *_url_secrets(self.url)])
        self.breaker = CircuitBreaker(
            sub.caller, self.endpoint, cfg.breaker_failures, cfg.breaker_cooldown
        )
        self.limiter = RateLimiter(cfg.rate_limit) if cfg.rate_limit else None
        self.answers: Counter[str] = Counter()  # status code, or what went wrong instead
        self.inject: Callable[[dict[str, str]], None] | None = None  # see http_invoke
        _check_budget(sub, where, self.timeout)
        policy = AddressPolicy(cfg.allow_private)
        connector = aiohttp.TCPConnector(
            limit=sub.concurrency,
            resolver=GuardedResolver(policy, resolver),
            socket_factory=guarded_socket(policy),
            ssl=_tls(cfg.ca_file, where),
            ttl_dns_cache=10,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,
            headers={
                "User-Agent": f"shunter/{__version__}",
                "Accept-Encoding": "identity",
                **cfg.headers,
            },
        )

    async def deliver(self, msg: Message) -> None:
        """One delivery: returns on success, raises ``RetryLater`` or ``DeadLetter``."""
        breaker = self.breaker
        try:  # closed, the common case: no coroutine of admit's to run
            generation = breaker.generation if breaker.state == CLOSED else await breaker.admit()
        except Refused as refused:
            self.answers["circuit-open"] += 1
            raise CircuitOpen(
                delay=refused.delay,
                count_attempt=False,  # an outage must not use up the message's attempts
                reason=(
                    f"circuit open for {self.endpoint} after repeated failures; "
                    f"no request made, next probe in {refused.delay:.3g}s"
                ),
            ) from None
        try:
            await self._post(msg)
        except HttpFailure as exc:
            breaker.failed(generation, str(exc))
            raise
        except DeadLetter:
            breaker.succeeded(generation)  # the endpoint answered: the message is at fault
            raise
        except BaseException:  # cancelled by the delivery timeout or at shutdown
            breaker.failed(generation, "delivery cancelled")
            raise
        breaker.succeeded(generation)

    async def _post(self, msg: Message) -> None:
        if self.limiter is not None and (wait := self.limiter.reserve()) > 0:
            await asyncio.sleep(wait)
        body, content_type = self._body(msg)
        headers = {
            "Content-Type": content_type,
            CALLER: msg.caller,
            CATEGORY: msg.category,
            TOPIC: msg.topic,
            PARTITION: str(msg.partition),
            OFFSET: str(msg.offset),
            TIMESTAMP: str(msg.timestamp),
            ATTEMPT: str(msg.attempt),
            IDEMPOTENCY_KEY: idempotency_key(msg),
        }
        if self.inject is not None:
            self.inject(headers)
        try:
            async with self.session.post(
                self.url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                status = resp.status
                self.answers[str(status)] += 1
                answer = await read_bounded(resp, self.max_body)
                if 200 <= status <= 299:
                    return
                error = status_error(
                    status,
                    resp.reason,
                    self.endpoint,
                    answer,
                    resp.headers.get("Retry-After"),
                    self.max_retry_after,
                    self.redact,
                )
        except TimeoutError:
            self.answers["timeout"] += 1
            raise HttpFailure(
                reason=f"no answer from {self.endpoint} within {self.timeout:g}s"
            ) from None
        except aiohttp.ClientError as exc:
            raise self._client_error(exc) from None
        raise error

    def _client_error(self, exc: aiohttp.ClientError) -> Exception:
        cause = (
            getattr(exc, "os_error", None)
            if isinstance(exc, aiohttp.ClientConnectorError)
            else None
        )
        if isinstance(cause, AddressRefused):
            self.answers["address-refused"] += 1
            return DeadLetter(f"refused to connect to {self.endpoint}: {cause}")
        if isinstance(exc, aiohttp.ClientSSLError):
            self.answers["tls-error"] += 1
            what = "TLS handshake with"
        elif isinstance(exc, aiohttp.ClientConnectorError):
            self.answers["connect-error"] += 1
            what = "cannot connect to"
        else:
            self.answers["connection-error"] += 1
            what = "connection failed with"
        detail = self.redact(str(cause or exc) or type(exc).__name__)
        return HttpFailure(reason=f"{what} {self.endpoint}: {type(exc).__name__}: {detail}")

    def _body(self, msg: Message) -> tuple[bytes, str]:
        value = msg.value
        if self.raw or isinstance(value, bytes | bytearray):
            declared = msg.header("content-type")
            if declared:
                text = declared.decode("latin-1")
                if not any(c in text for c in "\r\n\0"):
                    return msg.raw, text
            return msg.raw, self.content_type
        try:
            return orjson.dumps(value, default=_plain), JSON
        except TypeError as orjson_refused:
            # orjson refuses what the decoder keeps: integers wider than 64 bits, nesting
            # deeper than 254. The standard library writes both (to its recursion limit).
            try:
                text = json.dumps(value, default=_plain, separators=(",", ":"),
                                  ensure_ascii=False, allow_nan=False)
                return text.encode(), JSON  # a lone surrogate raises here: no UTF-8
            except (TypeError, ValueError, RecursionError):  # UnicodeEncodeError included
                raise DeadLetter(
                    f"the value cannot be sent as JSON: {orjson_refused}"
                ) from None

    async def close(self) -> None:
        await self.session.close()


def _plain(obj: Any) -> Any:
    """JSON for values orjson does not know: pydantic models (``topics.<t>.model``),
    Protobuf messages (their JSON mapping), Avro bytes and decimals."""
    from ..decode.display import plain

    return plain(obj)


def _url_secrets(url: URL) -> list[str]:
    return [s for s in (url.password, url.user, *url.query.values()) if s]


def _tls(ca_file: str | None, where: str) -> ssl.SSLContext | bool:
    """Certificate and host name verification, always; ``ca_file`` adds trusted CAs."""
    if ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"{where}.http.ca_file: cannot load {ca_file}: {exc}"]) from None


def _check_budget(sub: SubscriberConfig, where: str, request_timeout: float) -> None:
    """Deliveries waiting for a rate-limit slot hold a concurrency slot and count against
    the delivery timeout: with ``concurrency`` of them queued, the last must still fit."""
    cfg = sub.http
    assert cfg is not None
    if cfg.rate_limit is None:
        return
    wait = sub.concurrency / cfg.rate_limit
    if wait + request_timeout <= sub.timeout:
        return
    fits = max(1, int((sub.timeout - request_timeout) * cfg.rate_limit))
    raise ConfigError(
        [
            f"{where}.concurrency: at rate_limit {cfg.rate_limit:g}/s, {sub.concurrency} "
            f"deliveries wait up to {wait:g}s for their turn, plus {request_timeout:g}s for the "
            f"request: beyond the subscriber timeout of {sub.timeout:g}s; set concurrency to at "
            f"most {fits}, or timeout to at least {wait + request_timeout:g}s"
        ]
    )


# -- metrics -------------------------------------------------------------------------------

def _register(stats: Stats, subscriber: HttpSubscriber) -> None:
    """One metrics source per Stats object, listing all of its HTTP subscribers."""
    subscribers: list[HttpSubscriber] | None = stats.extras.get("http")
    if subscribers is None:
        subscribers = stats.extras["http"] = []
        stats.gauges.append(lambda: _families(subscribers))
    subscribers.append(subscriber)


def _families(subscribers: list[HttpSubscriber]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    state = GaugeMetricFamily(
        "shunter_http_circuit_state",
        "Circuit of an HTTP subscriber: 0 closed, 1 half-open, 2 open.",
        labels=["caller"],
    )
    opened = CounterMetricFamily(
        "shunter_http_circuit_opened",
        "Times the circuit of an HTTP subscriber opened.",
        labels=["caller"],
    )
    answers = CounterMetricFamily(
        "shunter_http_answers",
        "HTTP subscriber requests by status code, or timeout, "
        "connect-error, tls-error, connection-error, address-refused, circuit-open.",
        labels=["caller", "answer"],
    )
    for sub in subscribers:
        state.add_metric([sub.caller], STATE_VALUE[sub.breaker.state])
        opened.add_metric([sub.caller], sub.breaker.opened)
        for answer, n in sorted(sub.answers.items()):
            answers.add_metric([sub.caller, answer], n)
    yield from (state, opened, answers)
