"""Typed, validated configuration.

Everything a deployment needs is read and checked here, once, at start. A refused
configuration lists every problem with its key path (``subscribers[1].timeout``) and what
was expected; nothing downstream ever re-validates or guesses.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
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
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaConfig(_Strict):
    bootstrap_servers: str | None = None
    group_id: str = "shunter"
    client: dict[str, str | int | float | bool] = Field(default_factory=dict)
    consumer: dict[str, str | int | float | bool] = Field(default_factory=dict)
    batch_size: int = Field(default=1000, ge=1, le=100_000)
    max_in_flight: int = Field(default=20_000, ge=1)
    commit_interval: Duration = 0.5
    drain_timeout: Duration = 10.0
    # A partition whose position has not moved for this long while offsets wait is
    # reported as stalled (log, gauge, /ready 503) until it moves or a record is skipped.
    stall_after: Duration = Field(default=120.0, gt=0)
    # ``shunter run``'s worker processes, each a member of the group (see
    # crashguard/supervisor.py); raise it up to the number of cores the process may use.
    workers: int = Field(default=1, ge=1, le=64)


class SchemaRegistryConfig(_Strict):
    """A Confluent Schema Registry: payloads in its wire format (a magic byte and a schema
    ID ahead of the body), decoded by confluent-kafka's own deserializers. Credentials come
    through ``${VAR}``, never the file."""

    url: str  # http(s)://host:port, or mock://name (confluent-kafka's in-memory registry)
    basic_auth: str | None = None  # "user:password", sent as HTTP basic authentication
    timeout: Duration = 5.0  # one request to the registry
    client: dict[str, str | int | float | bool] = Field(default_factory=dict)  # more conf

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
    """A source topic's payload format.

    json: a JSON Schema (``schema``) or a model (``model``) may check it. avro: a local
    ``.avsc`` (``schema``) for plain payloads, or ``schema_registry`` (then ``schema`` is an
    optional reader schema). protobuf: the generated message class (``message``), plain or
    with ``schema_registry``. raw: the bytes as they are.
    """

    format: Literal["json", "raw", "avro", "protobuf"] = "json"
    schema_: str | None = Field(default=None, alias="schema")
    model: str | None = None
    message: str | None = None  # protobuf: 'package.module_pb2:MessageName'
    schema_registry: SchemaRegistryConfig | None = None

    @field_validator("model", "message")
    @classmethod
    def _import_path(cls, value: str | None) -> str | None:
        if value is not None and ":" not in value:
            raise ValueError("expected an import path 'package.module:Name'")
        return value


class CategoryConfig(_Strict):
    topics: list[str] = Field(min_length=1)
    where: str | None = None


class HttpConfig(_Strict):
    """An HTTP subscriber's endpoint (see ``deliver/http.py`` for the request and the
    response contract, ``deliver/http_guard.py`` for the allowlists)."""

    url: str
    timeout: Duration = 5.0  # one request, connection included
    body: Literal["json", "raw"] = "json"
    content_type: str = "application/octet-stream"  # raw bodies whose record has none
    headers: dict[str, str] = Field(default_factory=dict)
    rate_limit: float | None = Field(default=None, gt=0)  # requests per second
    allow_hosts: list[str] | None = None  # host names, IP addresses or *.domain
    allow_ports: list[int] | None = None
    allow_private: list[str] = Field(default_factory=list)  # addresses or CIDR ranges
    breaker_failures: int = Field(default=5, ge=1)
    breaker_cooldown: Duration = 10.0
    max_body: int = Field(default=65_536, ge=0)  # response bytes read at most
    max_retry_after: Duration = 300.0
    ca_file: str | None = None  # extra trusted CAs; verification itself cannot be turned off

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
    caller: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    category: str
    handler: str | None = None
    http: HttpConfig | None = None
    ordering: Literal["key", "partition", "none"] = "key"
    concurrency: int = Field(default=64, ge=1, le=100_000)
    timeout: Duration = 30.0
    isolation: Literal["inline", "thread", "process"] = "inline"
    workers: int = Field(default=2, ge=1, le=256)
    memory_limit_mb: int | None = Field(default=None, ge=16)

    @field_validator("handler")
    @classmethod
    def _import_path(cls, value: str | None) -> str | None:
        if value is not None and ":" not in value:
            raise ValueError("expected an import path 'package.module:function'")
        return value


class TierConfig(_Strict):
    attempts: int = Field(ge=0, le=1000)
    delay: Duration


class FloodGuardConfig(_Strict):
    window: int = Field(default=200, ge=10)
    max_share: float = Field(default=0.5, gt=0, le=1)
    action: Literal["pause", "continue"] = "pause"


class RetryConfig(_Strict):
    fast: TierConfig = TierConfig(attempts=3, delay=1.0)
    slow: TierConfig = TierConfig(attempts=5, delay=300.0)
    fast_topic: str | None = None
    slow_topic: str | None = None
    dlq_topic: str | None = None
    partitions: int = Field(default=6, ge=1)
    flood_guard: FloodGuardConfig = FloodGuardConfig()


class CrashGuardConfig(_Strict):
    quarantine_after: int = Field(default=3, ge=1)
    journal_topic: str | None = None
    enabled: bool = True
    loop_blocked_after: Duration = 5.0  # the loop watchdog's threshold; 0 turns it off
    crash_dir: str | None = None  # fatal-signal dumps; default <tmp>/shunter-<group_id>
    # After a death, re-run the suspects of inline/thread callers in sandbox processes
    # (a pill kills the sandbox, not the dispatcher), each limited to this much memory.
    sandbox: bool = True
    sandbox_memory_mb: int = Field(default=1024, ge=16)


class AdminConfig(_Strict):
    listen: str | None = "127.0.0.1:8080"
    token_env: str = "SHUNTER_ADMIN_TOKEN"


class LogConfig(_Strict):
    format: Literal["text", "json"] = "text"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class TracingConfig(_Strict):
    """OpenTelemetry tracing (the ``otel`` extra): one CONSUMER span per delivery.

    exporter ``otlp``: unless the application installed a tracer provider already, shunter
    installs the SDK's with the OTLP exporter, configured by the standard
    ``OTEL_EXPORTER_OTLP_*`` environment variables. ``none``: spans go to whatever tracer
    provider the application installed (nothing is exported if it installed none)."""

    enabled: bool = False
    exporter: Literal["otlp", "none"] = "otlp"
    service_name: str = "shunter"


class Config(_Strict):
    kafka: KafkaConfig = KafkaConfig()
    topics: dict[str, TopicConfig] = Field(default_factory=dict)
    categories: dict[str, CategoryConfig] = Field(default_factory=dict)
    subscribers: list[SubscriberConfig] = Field(default_factory=list)
    retry: RetryConfig = RetryConfig()
    crash_guard: CrashGuardConfig = CrashGuardConfig()
    admin: AdminConfig = AdminConfig()
    log: LogConfig = LogConfig()
    tracing: TracingConfig = TracingConfig()
    base_dir: str = "."  # where relative paths (schemas) are resolved; set by the loader

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


def _cross_check(config: Config, problems: list[str]) -> None:
    """The checks no single key can make: references between sections."""
    for name, category in config.categories.items():
        for i, topic in enumerate(category.topics):
            if topic not in config.topics:
                problems.append(
                    f"categories.{name}.topics[{i}]: unknown topic {topic!r} "
                    f"(expected one of: {', '.join(sorted(config.topics)) or 'none defined'})"
                )
        if category.where is not None:
            from .classify.filters import compile_filter

            try:
                compile_filter(category.where)
            except ValueError as exc:
                problems.append(f"categories.{name}.where: not a valid CEL expression: {exc}")
    for name, topic_cfg in config.topics.items():
        if topic_cfg.schema_ is not None and not config.resolve(topic_cfg.schema_).is_file():
            problems.append(f"topics.{name}.schema: file not found: {topic_cfg.schema_}")
        _format_problems(name, topic_cfg, problems)
    seen: set[str] = set()
    for i, sub in enumerate(config.subscribers):
        where = f"subscribers[{i}]"
        if sub.caller in seen:
            problems.append(f"{where}.caller: duplicate caller {sub.caller!r}")
        seen.add(sub.caller)
        if sub.category not in config.categories:
            problems.append(
                f"{where}.category: unknown category {sub.category!r} "
                f"(expected one of: {', '.join(sorted(config.categories)) or 'none defined'})"
            )
        if sub.http is not None and sub.handler is not None:
            problems.append(f"{where}: expected either handler or http, not both")
        if sub.http is not None and sub.isolation != "inline":
            problems.append(f"{where}.isolation: HTTP subscribers take no isolation setting")
    internal = {
        config.fast_topic,
        config.slow_topic,
        config.dlq_topic,
        config.journal_topic,
        config.control_topic,
        config.parked_topic,
    }
    for name in config.topics:
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
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            problems.append(f"{_loc(err['loc'])}: {_describe(err)}")
        raise ConfigError(redact(problems, found)) from None
    _cross_check(config, problems)
    if problems:
        raise ConfigError(redact(problems, found))
    return config


def redact(lines: list[str], secrets: set[str]) -> list[str]:
    """The lines with every secret value replaced by ``***``."""
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
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    text = str(err["msg"])
    text = text.removeprefix("Value error, ")
    got = err.get("input")
    if not isinstance(got, dict | list):
        text += f" (got {got!r})"
    return text


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
