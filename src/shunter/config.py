"""Typed, validated configuration.

Everything a deployment needs is read and checked here, once, at start. A refused
configuration lists every problem with its key path (``subscribers[1].timeout``) and what
was expected; nothing downstream ever re-validates or guesses.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def parse_duration(value: Any) -> float:
    """``5s``, ``250ms``, ``5m``, ``1h`` or a bare number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 5s, 250ms or 5m")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"expected a duration such as 5s, 250ms or 5m, got {value!r}")
        seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Strict(BaseModel):
    # A field's docstring is its description in the reference (docs/configuration.md).
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


# librdkafka settings shunter sets itself, with why: a configuration that changed one
# would lose messages (offsets committed before delivery, retry records acknowledged by
# one replica) or break the crash guard, so it is refused at start.
_FOR_EVERY_CLIENT = {
    "bootstrap.servers": "set kafka.bootstrap_servers",
    "group.id": "set kafka.group_id",
    "enable.idempotence": "shunter's producers are idempotent, so a retry or dead-letter "
    "record is written once",
    "acks": "a retry or dead-letter record counts as written only once every in-sync "
    "replica has it: acks=all",
}
_FOR_THE_CONSUMER = {
    **_FOR_EVERY_CLIENT,
    "enable.auto.commit": "shunter commits an offset itself, only once every delivery of "
    "its record is settled",
    "enable.auto.offset.store": "shunter commits an offset itself, only once every "
    "delivery of its record is settled",
    "enable.partition.eof": "the crash guard needs the end-of-partition events",
}


class KafkaConfig(_Strict):
    """How shunter reaches Kafka and how much it reads at once."""

    bootstrap_servers: str | None = Field(default=None, examples=["broker-1:9092,broker-2:9092"])
    """Comma-separated Kafka addresses. Absent: shunter starts the embedded development
    broker (memory only) on a free port and logs its address."""
    group_id: str = Field(default="shunter", examples=["live-revenue-dispatcher"])
    """The consumer group of every instance of this deployment; also the prefix of
    shunter's own topics (``<group_id>.retry.fast``, ``.retry.slow``, ``.dlq``,
    ``.journal``, ``.control``)."""
    client: dict[str, str | int | float | bool] = Field(
        default_factory=dict, examples=[{"security.protocol": "SASL_SSL"}]
    )
    """Extra librdkafka settings for every client (consumer, producers, admin):
    ``security.protocol``, ``sasl.*``, ``ssl.*``. Put secrets in ``${VAR}``. The settings
    shunter's guarantees rest on are refused: ``bootstrap.servers``, ``group.id``,
    ``enable.idempotence``, ``acks``."""
    consumer: dict[str, str | int | float | bool] = Field(
        default_factory=dict, examples=[{"session.timeout.ms": 10000}]
    )
    """librdkafka settings for the consumer only, applied over ``client``; besides those
    refused there, ``enable.auto.commit``, ``enable.auto.offset.store`` and
    ``enable.partition.eof`` are shunter's own."""
    batch_size: int = Field(default=1000, ge=1, le=100_000)
    """Records fetched from Kafka and handed to the pipeline at most at once."""
    max_in_flight: int = Field(default=20_000, ge=1)
    """Records consumed but not yet settled at most (the in-flight window); reaching it
    pauses fetching. Bounds memory and the duplicates after a crash."""
    commit_interval: Duration = 0.5
    """How often the settled offsets are committed."""
    drain_timeout: Duration = 10.0
    """On stop or partition revocation: how long in-flight deliveries may take to settle
    before shunter leaves them uncommitted (they are delivered again later)."""
    stall_after: Duration = Field(default=120.0, gt=0)
    """A partition whose position has not moved for this long while offsets wait is
    reported stalled (an ERROR line naming the record and what holds it, the
    ``shunter_partition_stalled`` gauge, ``/ready`` 503) until it moves or an operator
    skips the record (``shunter skip``)."""

    @field_validator("client", "consumer")
    @classmethod
    def _not_shunters_own(
        cls, value: dict[str, str | int | float | bool], info: ValidationInfo
    ) -> dict[str, str | int | float | bool]:
        owned = _FOR_THE_CONSUMER if info.field_name == "consumer" else _FOR_EVERY_CLIENT
        for key in value:
            if key in owned:
                raise ValueError(f"{key!r} is shunter's own setting ({owned[key]}); remove it")
        return value

    workers: int = Field(default=1, ge=1, le=64)
    """``shunter run``'s worker processes, each a member of the group under the one
    supervisor (see crashguard/supervisor.py); raise it up to the cores the process may
    use. Each worker serves its own admin API on the listen port plus its index."""


class SchemaRegistryConfig(_Strict):
    """A Confluent Schema Registry: payloads in its wire format (a magic byte and a schema
    ID ahead of the body), decoded by confluent-kafka's own deserializers. Credentials come
    through ``${VAR}``, never the file."""

    url: str = Field(examples=["https://registry.internal:8081"])
    """``http(s)://host:port``, or ``mock://name`` (confluent-kafka's in-memory registry)."""
    basic_auth: str | None = Field(default=None, examples=["${REGISTRY_USER}:${REGISTRY_PASS}"])
    """``user:password`` sent as HTTP basic authentication (from ``${VAR}``s)."""
    timeout: Duration = 5.0
    """One request to the registry; an unreachable registry holds the record (transient)."""
    client: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """More settings for confluent-kafka's registry client."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://", "mock://")):
            raise ValueError("expected an http://, https:// or mock:// URL")
        return value

    @field_validator("basic_auth")
    @classmethod
    def _basic_auth(cls, value: str | None) -> str | None:
        if value is not None and ":" not in value:
            raise ValueError("expected 'user:password' (from ${VAR}s)")
        return value


class TopicConfig(_Strict):
    """A source topic: how its payloads are decoded and validated."""

    format: Literal["json", "raw", "avro", "protobuf"] = "json"
    """How the payload bytes become ``msg.value``: ``json`` decodes them, ``raw`` leaves
    them as bytes, ``avro`` gives a dict, ``protobuf`` the generated message; avro and
    protobuf plain, or in the Confluent wire format with ``schema_registry``."""
    schema_: str | None = Field(default=None, alias="schema", examples=["schemas/gift.json"])
    """A JSON Schema file every JSON payload must satisfy (else dead-lettered with stage
    ``validate``), or the ``.avsc`` of a plain Avro topic (a reader schema with a
    registry); relative to the configuration file."""
    model: str | None = Field(default=None, examples=["myapp.models:GuardPurchase"])
    """A pydantic model (``package.module:Name``) the decoded payload is validated into;
    ``msg.value`` is then the model instance."""
    message: str | None = Field(default=None, examples=["myapp.events_pb2:GuardPurchase"])
    """A protobuf topic's generated message class (``package.module_pb2:MessageName``)."""
    schema_registry: SchemaRegistryConfig | None = None
    """The registry of a topic in the Confluent wire format."""

    @field_validator("model", "message")
    @classmethod
    def _import_path(cls, value: str | None) -> str | None:
        if value is not None and ":" not in value:
            raise ValueError("expected an import path 'package.module:Name'")
        return value


class CategoryConfig(_Strict):
    """A business category: the messages of some source topics, optionally filtered."""

    topics: list[str] = Field(min_length=1, examples=[["gift", "lottery"]])
    """The source topics (names under ``topics``) whose messages belong to the category."""
    where: str | None = Field(default=None, examples=["value.type == 'buy'"])
    """A CEL expression over ``value``, ``key``, ``headers`` and ``topic``; only the
    messages for which it is true belong to the category."""


class HttpConfig(_Strict):
    """An HTTP subscriber's endpoint (see ``deliver/http.py`` for the request and the
    response contract, ``deliver/http_guard.py`` for the allowlists)."""

    url: str = Field(examples=["https://task.internal/hooks/guard"])
    """The endpoint each delivery is POSTed to (``http`` or ``https``)."""
    timeout: Duration = 5.0
    """One request, connection included; past it the delivery failed (and is retried)."""
    body: Literal["json", "raw"] = "json"
    """``json``: the decoded value as JSON; ``raw``: the payload bytes as they were on the
    topic. Either way the message's coordinates travel in ``Shunter-Caller``,
    ``Shunter-Topic``, ``Shunter-Partition``, ``Shunter-Offset``, ``Shunter-Attempt``
    (and more) request headers."""
    content_type: str = "application/octet-stream"
    """The Content-Type of raw bodies whose record has none of its own."""
    headers: dict[str, str] = Field(
        default_factory=dict, examples=[{"Authorization": "Bearer ${TASK_TOKEN}"}]
    )
    """Extra request headers; put secrets in ``${VAR}``."""
    rate_limit: float | None = Field(default=None, gt=0, examples=[200])
    """Requests per second at most to this subscriber; absent: no limit."""
    allow_hosts: list[str] | None = Field(default=None, examples=[["task.internal"]])
    """If set, the only host names, IP addresses or ``*.domain`` patterns the URL may
    name."""
    allow_ports: list[int] | None = Field(default=None, examples=[[443]])
    """If set, the only TCP ports the URL may name."""
    allow_private: list[str] = Field(default_factory=list, examples=[["10.0.0.0/8"]])
    """Private, loopback or link-local addresses or CIDR ranges the endpoint may resolve
    to; any other private address is refused."""
    breaker_failures: int = Field(default=5, ge=1)
    """Consecutive failed requests that open the circuit breaker: deliveries then go
    straight to the retry tier without a request until the cooldown has passed."""
    breaker_cooldown: Duration = 10.0
    """How long an open breaker waits before it lets one trial request through."""
    max_body: int = Field(default=65_536, ge=0)
    """Response bytes read at most (the rest is discarded)."""
    max_retry_after: Duration = 300.0
    """The longest ``Retry-After`` a response may ask for; longer ones are capped."""
    ca_file: str | None = Field(default=None, examples=["/etc/ssl/internal-ca.pem"])
    """Extra trusted certificate authorities (PEM); verification itself cannot be
    turned off."""

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        from .deliver.http_guard import check_headers

        check_headers(value)  # ValueError names the bad header
        return value

    @field_validator("content_type")
    @classmethod
    def _content_type(cls, value: str) -> str:
        if not value or any(c in value for c in "\r\n\0"):
            raise ValueError("expected a media type such as application/octet-stream")
        return value

    @field_validator("allow_private")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        from .deliver.http_guard import parse_allowed

        parse_allowed(value)  # ValueError names the bad entry
        return value

    @field_validator("allow_ports")
    @classmethod
    def _ports(cls, value: list[int] | None) -> list[int] | None:
        for port in value or []:
            if not 0 < port < 65536:
                raise ValueError(f"{port} is not a TCP port")
        return value

    @model_validator(mode="after")
    def _url(self) -> HttpConfig:
        from .deliver.http_guard import url_problems

        problems = url_problems(self.url, self.allow_hosts, self.allow_ports, self.allow_private)
        if problems:
            raise ValueError("; ".join(problems))
        return self


class SubscriberConfig(_Strict):
    """One subscriber of a category: an in-process handler or an HTTP endpoint."""

    caller: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$", examples=["fan-medal"])
    """The subscriber's unique name: in every log line, metric, retry and dead-letter
    record of its deliveries. Letters, digits, ``_``, ``.`` and ``-``."""
    category: str = Field(examples=["revenue"])
    """The category (a name under ``categories``) whose messages it receives."""
    handler: str | None = Field(default=None, examples=["myapp.medal:on_revenue"])
    """A sync or async callable taking a ``shunter.Message`` (``package.module:function``).
    Give either ``handler`` or ``http`` (or register the handler in code)."""
    http: HttpConfig | None = None
    """An HTTP endpoint that receives each delivery instead of a Python handler."""
    ordering: Literal["key", "partition", "none"] = "key"
    """Which of its deliveries wait for each other: ``key`` (messages with the same key,
    in offset order), ``partition`` (all of a partition) or ``none``."""
    concurrency: int = Field(default=64, ge=1, le=100_000)
    """Deliveries to this subscriber running at once at most."""
    timeout: Duration = 30.0
    """How long one delivery may run; past it the delivery failed (and is retried)."""
    isolation: Literal["inline", "thread", "process"] = "inline"
    """Where the handler runs: ``inline`` on the event loop (async handlers, or quick sync
    ones), ``thread`` in a thread pool, ``process`` in worker processes (a crash kills a
    worker, not shunter)."""
    workers: int = Field(default=2, ge=1, le=256)
    """With ``isolation: process``: the worker processes of this subscriber."""
    memory_limit_mb: int | None = Field(default=None, ge=16, examples=[512])
    """With ``isolation: process``: a worker's address-space limit; a worker past it is
    replaced and the delivery fails."""

    @field_validator("handler")
    @classmethod
    def _import_path(cls, value: str | None) -> str | None:
        if value is not None and ":" not in value:
            raise ValueError("expected an import path 'package.module:function'")
        return value


class TierConfig(_Strict):
    """One retry tier."""

    attempts: int = Field(ge=0, le=1000)
    """Attempts of a failed delivery in this tier before it moves on (fast tier → slow
    tier → dead-letter topic); 0 skips the tier."""
    delay: Duration
    """How long a failed delivery waits in this tier before it is tried again."""


class FloodGuardConfig(_Strict):
    """What happens when most of a caller's deliveries fail at once (an outage, not a bad
    message): pause that caller instead of pushing everything through the retry tiers."""

    window: int = Field(default=200, ge=10)
    """The caller's last deliveries the failure share is measured over."""
    max_share: float = Field(default=0.5, gt=0, le=1)
    """The share of failures in the window that trips the guard."""
    action: Literal["pause", "continue"] = "pause"
    """``pause``: pause the caller (group-wide, until resumed through the admin API);
    ``continue``: only log and count."""


class RetryConfig(_Strict):
    """The retry tiers and the dead-letter topic."""

    fast: TierConfig = TierConfig(attempts=3, delay=1.0)
    """The first tier, for a first failure."""
    slow: TierConfig = TierConfig(attempts=5, delay=300.0)
    """The second tier, after the fast tier's attempts."""
    fast_topic: str | None = Field(default=None, examples=["revenue.retry.fast"])
    """The fast tier's topic; absent: ``<group_id>.retry.fast``."""
    slow_topic: str | None = Field(default=None, examples=["revenue.retry.slow"])
    """The slow tier's topic; absent: ``<group_id>.retry.slow``."""
    dlq_topic: str | None = Field(default=None, examples=["revenue.dlq"])
    """The dead-letter topic; absent: ``<group_id>.dlq``."""
    partitions: int = Field(default=6, ge=1)
    """Partitions of the retry and dead-letter topics when shunter creates them."""
    flood_guard: FloodGuardConfig = FloodGuardConfig()
    """Pausing a caller whose deliveries mostly fail."""


class CrashGuardConfig(_Strict):
    """Recognising and quarantining a message that kills the whole process."""

    quarantine_after: int = Field(default=3, ge=1)
    """Process deaths with a message in flight after which that message is quarantined
    to the dead-letter topic (reason ``crash``) without being run again."""
    journal_topic: str | None = Field(default=None, examples=["revenue.journal"])
    """The compacted topic recording what is in flight; absent: ``<group_id>.journal``."""
    enabled: bool = True
    """Turn the crash guard (and its journal writes) off."""
    loop_blocked_after: Duration = 5.0
    """The event-loop watchdog: a loop blocked this long is logged with its stack;
    0 turns the report off. A call that holds the GIL stops the watchdog's thread too:
    under ``shunter run``'s supervisor, a watchdog silent this long has every thread's
    stack logged by the supervisor instead (SIGUSR2 to the worker; ``kill -USR1`` on a
    worker writes the same to its stderr at any time)."""
    loop_blocked_restart_after: Duration = 60.0
    """A loop blocked this long ends the process (SIGABRT, the blocking line in its
    crash file; a handler that holds the GIL, by faulthandler's timer 10 s later) for its
    supervisor to restart: Kafka's ``max.poll.interval.ms`` cannot take the partitions
    of a blocked worker, whose consumer polls on a thread of its own.
    The delivery that blocked re-runs in a sandbox, where hanging again counts as a death
    towards ``quarantine_after``. Keep it above the longest a sync inline handler may
    legitimately run (or give such a handler ``isolation: thread``); 0: never."""
    crash_dir: str | None = Field(default=None, examples=["/var/lib/shunter/crashes"])
    """Where fatal-signal dumps (every thread's stack) are written; absent:
    ``<tmp>/shunter-<group_id>``."""
    sandbox: bool = True
    """After a death, re-run the crash suspects of inline and thread callers in sandbox
    processes, so that a pill kills a sandbox, not the dispatcher (off: one at a time in
    the dispatcher, as when a handler cannot run in another process)."""
    sandbox_memory_mb: int = Field(default=1024, ge=16)
    """A sandbox's memory limit (a caller's own ``memory_limit_mb`` wins): a memory pill
    ends the sandbox instead of taking the dispatcher to the OOM killer."""

    @model_validator(mode="after")
    def _restart_after_the_report(self) -> CrashGuardConfig:
        after, restart = self.loop_blocked_after, self.loop_blocked_restart_after
        if after > 0 and restart > 0 and restart <= after:
            raise ValueError(
                f"loop_blocked_restart_after ({restart:g}s) must be longer than "
                f"loop_blocked_after ({after:g}s), or 0"
            )
        return self


class AdminConfig(_Strict):
    """The admin HTTP API and dashboard."""

    listen: str | None = "127.0.0.1:8080"
    """``host:port`` of the admin API (health, readiness, metrics, topology, stats,
    pause/resume, dead letters); ``null`` turns it off."""
    token_env: str = "SHUNTER_ADMIN_TOKEN"
    """The environment variable holding the bearer token that mutating calls need."""
    allowed_hosts: list[str] = Field(default_factory=list, examples=[["shunter-1.internal"]])
    """Host header values served besides the listen address, localhost, 127.0.0.1 and
    [::1] (and any IP address when listening on 0.0.0.0 or ::): the names operators and
    Prometheus use to reach this instance. Anything else is refused (421), so a page on
    another site cannot read the API by DNS rebinding."""
    header_timeout: Duration = Field(default=10.0, gt=0)
    """A connection must have sent its request line and headers within this time."""
    body_timeout: Duration = Field(default=10.0, gt=0)
    """Reading a request body (dead-letter replay, skip) must finish within this time."""
    max_body: int = Field(default=65_536, ge=1024, le=16 * 1024 * 1024)
    """A request body may be at most this many bytes (413 beyond)."""

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            if not host or any(c in host for c in "/ \t\r\n@?#"):
                raise ValueError(f"expected a host name or address, got {host!r}")
        return [host.lower() for host in value]


class LogConfig(_Strict):
    """shunter's log lines (on standard error)."""

    format: Literal["text", "json"] = "text"
    """``text`` for people, ``json`` for one object per line carrying caller and message
    coordinates as fields."""
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """The lowest level logged."""


class TracingConfig(_Strict):
    """OpenTelemetry tracing (the ``otel`` extra): one CONSUMER span per delivery.

    exporter ``otlp``: unless the application installed a tracer provider already, shunter
    installs the SDK's with the OTLP exporter, configured by the standard
    ``OTEL_EXPORTER_OTLP_*`` environment variables. ``none``: spans go to whatever tracer
    provider the application installed (nothing is exported if it installed none)."""

    enabled: bool = False
    """One span per delivery; off, tracing costs nothing."""
    exporter: Literal["otlp", "none"] = "otlp"
    """``otlp``: the SDK's OTLP exporter (``OTEL_*`` variables); ``none``: the
    application's own tracer provider."""
    service_name: str = "shunter"
    """The ``service.name`` of the spans shunter's own provider exports."""


class Config(_Strict):
    """A shunter deployment."""

    kafka: KafkaConfig = KafkaConfig()
    """How shunter reaches Kafka."""
    topics: dict[str, TopicConfig] = Field(default_factory=dict)
    """The source topics, by name."""
    categories: dict[str, CategoryConfig] = Field(default_factory=dict)
    """The business categories, by name."""
    subscribers: list[SubscriberConfig] = Field(default_factory=list)
    """Every subscriber of the deployment."""
    retry: RetryConfig = RetryConfig()
    """Retry tiers and dead-letter topic."""
    crash_guard: CrashGuardConfig = CrashGuardConfig()
    """The crash guard."""
    admin: AdminConfig = AdminConfig()
    """The admin API."""
    log: LogConfig = LogConfig()
    """Logging."""
    tracing: TracingConfig = TracingConfig()
    """OpenTelemetry tracing (the ``otel`` extra), off by default."""
    base_dir: str = "."
    """Where relative paths (schemas) are resolved; set by the loader, not in the file."""
    # The values ``${VAR}`` put into this configuration (set by parse_config): every
    # reader that shows configuration or failures passes its text through ``redact``.
    _secrets: frozenset[str] = PrivateAttr(default_factory=frozenset)

    @property
    def secrets(self) -> frozenset[str]:
        return self._secrets

    @property
    def fast_topic(self) -> str:
        return self.retry.fast_topic or f"{self.kafka.group_id}.retry.fast"

    @property
    def slow_topic(self) -> str:
        return self.retry.slow_topic or f"{self.kafka.group_id}.retry.slow"

    @property
    def dlq_topic(self) -> str:
        return self.retry.dlq_topic or f"{self.kafka.group_id}.dlq"

    @property
    def control_topic(self) -> str:
        return f"{self.kafka.group_id}.control"

    @property
    def parked_topic(self) -> str:
        """Where a paused caller's deliveries wait (never consumed by the group)."""
        return f"{self.kafka.group_id}.parked"

    @property
    def journal_topic(self) -> str:
        return self.crash_guard.journal_topic or f"{self.kafka.group_id}.journal"

    def resolve(self, path: str) -> Path:
        return Path(self.base_dir, path)

    def subscriber(self, caller: str) -> SubscriberConfig:
        for sub in self.subscribers:
            if sub.caller == caller:
                return sub
        raise KeyError(caller)


def interpolate(node: Any, path: str, problems: list[str], secrets: set[str]) -> Any:
    """Replace ``${VAR}`` in every string with the environment's value.

    The values substituted are collected in ``secrets`` so logs can redact them.
    """
    if isinstance(node, dict):
        return {k: interpolate(v, _join(path, str(k)), problems, secrets) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, f"{path}[{i}]", problems, secrets) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        value = os.environ.get(name)
        if value is None:
            problems.append(f"{path}: environment variable {name} is not set")
            return ""
        if value:
            secrets.add(value)
        return value

    return _ENV_REF.sub(substitute, node)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = _join(out, "schema" if part == "schema_" else part)
    return out or "(root)"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'gift'?"`` when one of ``choices`` is close to ``word``, else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _expected(word: str, names: Iterable[str]) -> str:
    ordered = sorted(names)
    return f"(expected one of: {', '.join(ordered) or 'none defined'}){did_you_mean(word, ordered)}"


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name)
    return value if isinstance(value, dict) else {}


def _cross_check(data: dict[str, Any], base_dir: str, problems: list[str]) -> None:
    """The checks no single key can make: references between sections.

    They read the document itself, not the validated model, so that a file with a bad
    value in one place still has its references checked everywhere else in the same pass.
    """
    topics = _section(data, "topics")
    categories = _section(data, "categories")
    subscribers = data.get("subscribers")
    subscribers = subscribers if isinstance(subscribers, list) else []
    for name, category in categories.items():
        if not isinstance(category, dict):
            continue
        listed = category.get("topics")
        for i, topic in enumerate(listed if isinstance(listed, list) else []):
            if isinstance(topic, str) and topic not in topics:
                problems.append(
                    f"categories.{name}.topics[{i}]: unknown topic {topic!r} "
                    + _expected(topic, topics)
                )
        where = category.get("where")
        if isinstance(where, str):
            from .classify.filters import compile_filter

            try:
                compile_filter(where)
            except ValueError as exc:
                problems.append(f"categories.{name}.where: not a valid CEL expression: {exc}")
    for name, topic_cfg in topics.items():
        if not isinstance(topic_cfg, dict):
            continue
        schema = topic_cfg.get("schema")
        if isinstance(schema, str) and not Path(base_dir, schema).is_file():
            problems.append(f"topics.{name}.schema: file not found: {schema}")
        try:
            checked = TopicConfig.model_validate(topic_cfg)
        except ValidationError:
            continue  # its own errors are reported with their key paths already
        _format_problems(name, checked, problems)
    seen: set[str] = set()
    for i, sub in enumerate(subscribers):
        if not isinstance(sub, dict):
            continue
        where = f"subscribers[{i}]"
        caller = sub.get("caller")
        if isinstance(caller, str) and caller in seen:
            problems.append(f"{where}.caller: duplicate caller {caller!r}")
        if isinstance(caller, str):
            seen.add(caller)
        category = sub.get("category")
        if isinstance(category, str) and category not in categories:
            problems.append(
                f"{where}.category: unknown category {category!r} "
                + _expected(category, categories)
            )
        if sub.get("http") is not None and sub.get("handler") is not None:
            problems.append(f"{where}: expected either handler or http, not both")
        if sub.get("http") is not None and sub.get("isolation", "inline") != "inline":
            problems.append(f"{where}.isolation: HTTP subscribers take no isolation setting")
    kafka, retry = _section(data, "kafka"), _section(data, "retry")
    group = kafka.get("group_id") if isinstance(kafka.get("group_id"), str) else "shunter"
    internal = {
        retry.get("fast_topic") or f"{group}.retry.fast",
        retry.get("slow_topic") or f"{group}.retry.slow",
        retry.get("dlq_topic") or f"{group}.dlq",
        (retry.get("dlq_topic") or f"{group}.dlq") + ".replayed",  # dlq replay's markers
        _section(data, "crash_guard").get("journal_topic") or f"{group}.journal",
        f"{group}.control",
        f"{group}.parked",
    }
    for name in topics:
        if name in internal:
            problems.append(f"topics.{name}: this name is one of shunter's own topics")


def _format_problems(name: str, topic: TopicConfig, problems: list[str]) -> None:
    """What a topic's format needs, and what it cannot take."""
    where = f"topics.{name}"
    fmt = topic.format
    registry = topic.schema_registry is not None
    if fmt == "raw" and (topic.schema_ or topic.model or registry):
        problems.append(f"{where}: a raw topic takes no schema, model or schema_registry")
    if topic.message is not None and fmt != "protobuf":
        problems.append(f"{where}.message: only a protobuf topic takes a message class")
    if fmt == "avro" and topic.schema_ is None and not registry:
        problems.append(f"{where}: an avro topic needs schema (a local .avsc) or schema_registry")
    if fmt == "protobuf":
        if topic.message is None:
            problems.append(
                f"{where}.message: a protobuf topic needs its generated message class "
                "('package.module_pb2:MessageName')"
            )
        if topic.schema_ is not None or topic.model is not None:
            problems.append(f"{where}: a protobuf topic takes message, not schema or model")
    if fmt == "json" and registry and topic.schema_ is not None:
        problems.append(f"{where}.schema: a registry JSON topic's schema comes from the registry")


def parse_config(data: Any, base_dir: str = ".", secrets: set[str] | None = None) -> Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem.

    Every problem of the document is found in one pass: bad values, unknown keys (with the
    closest valid key suggested) and references between sections.
    Values substituted from the environment are added to ``secrets`` and never appear in
    a refusal, whatever the key or the validator that quotes them.
    """
    problems: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["(root): expected a mapping of sections (kafka, topics, ...)"])
    found: set[str] = set()
    data = interpolate(data, "", problems, found)
    if secrets is not None:
        secrets.update(found)
    data["base_dir"] = base_dir
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            problems.append(f"{_loc(err['loc'])}: {_describe(err)}")
    _cross_check(data, base_dir, problems)
    if problems or config is None:
        raise ConfigError(redact(_once(problems), found))
    config._secrets = frozenset(found)
    return config


def _once(problems: list[str]) -> list[str]:
    return list(dict.fromkeys(problems))


def redact(lines: list[str], secrets: Iterable[str]) -> list[str]:
    """The lines with every secret value replaced by ``***``: the one redaction used by
    ``shunter check``, the logs and the admin API."""
    ordered = sorted((s for s in secrets if s), key=len, reverse=True)
    out = []
    for line in lines:
        for secret in ordered:
            line = line.replace(secret, "***")
        out.append(line)
    return out


def _describe(err: Any) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        key = str(err["loc"][-1])
        return "unknown key" + did_you_mean(key, _keys_at(err["loc"][:-1]))
    if kind == "missing":
        return "required key is missing"
    text = str(err["msg"])
    text = text.removeprefix("Value error, ")
    got = err.get("input")
    if not isinstance(got, dict | list) and repr(got) not in text:  # say the value once
        text += f" (got {got!r})"
    return text


def _keys_at(loc: tuple[int | str, ...]) -> list[str]:
    """The valid keys of the section at ``loc`` (e.g. ``subscribers, 0, http``)."""
    model: Any = Config
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        if field is None:  # a name under topics/categories: stay on the mapping's values
            continue
        model = _model_of(field.annotation)
    if model is None:
        return []
    return [f.alias or name for name, f in model.model_fields.items() if name != "base_dir"]


def _model_of(annotation: Any) -> Any:
    """The model class inside ``X``, ``X | None``, ``list[X]`` or ``dict[str, X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def load_config(path: str | Path, secrets: set[str] | None = None) -> Config:
    """Read and validate a YAML configuration file."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{file}: not valid YAML: {exc}"]) from None
    return parse_config(data, base_dir=str(file.parent.resolve()), secrets=secrets)
