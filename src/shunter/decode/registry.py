"""Confluent wire format: a magic byte and a schema ID ahead of the body, the schema
fetched from a Schema Registry and decoded by confluent-kafka's own deserializers.

The record path never waits for the registry. The deserializers are given a *look-up
table* instead of the registry client: it answers from what was fetched already and
otherwise raises, and the decoder then fetches on a thread of its own and says
``DecodeUnavailable`` (transient: hold the record, decode it again later). A schema the
registry does not have (404) is a malformed message (``RejectedMessage``); a registry that
cannot be reached or answers an error is transient, with a backoff, never a dead letter.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..config import SchemaRegistryConfig
from ..errors import ConfigError, DecodeUnavailable, RejectedMessage
from .decoder import Decoder, Validator

log = logging.getLogger("shunter.decode")

FIRST_RETRY = 0.05  # a first fetch is under way: look again soon
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
UNKNOWN_KEPT = 30.0  # seconds a "no such schema" answer is believed before asking again
_MAGIC_ID, _MAGIC_GUID = 0, 1


class _NotFetched(Exception):
    """The look-up table has no answer yet; only the fetch thread may ask the registry."""


class _Unknown(Exception):
    """The registry answered that it has no such schema."""


class _Unreachable(Exception):
    """Asking the registry failed (transport error, 5xx, authentication...)."""


def describe(raw: bytes) -> str:
    """The schema a wire-format payload names, for reasons: ``schema id 7``."""
    if raw[0] == _MAGIC_GUID:
        return f"schema guid {raw[1:17].hex()}"
    return f"schema id {int.from_bytes(raw[1:5], 'big')}"


def framing_problem(raw: bytes) -> str | None:
    """Why ``raw`` is not in the Confluent wire format, or None."""
    if not raw:
        return "empty payload"
    magic = raw[0]
    if magic not in (_MAGIC_ID, _MAGIC_GUID):
        return (
            f"wrong magic byte 0x{magic:02x}: not in the Confluent wire format "
            "(expected 0x00, then a 4-byte schema ID)"
        )
    header = 5 if magic == _MAGIC_ID else 17
    if len(raw) <= header:  # protobuf's message indexes or avro's body: at least a byte
        return (
            f"truncated payload: {len(raw)} bytes, a Confluent wire-format payload has at "
            f"least {header + 1} (magic byte, schema ID, body)"
        )
    return None


class LookupTable:
    """Stands in for the registry client in confluent-kafka's deserializers.

    Answers the look-ups they make (``get_schema``, ``get_schema_by_guid``,
    ``get_version``) from what was fetched. On the fetch thread, or in ``blocking()``,
    it asks the real client; everywhere else a miss raises ``_NotFetched``.
    """

    def __init__(self, client: Any, redact: Callable[[str], str]) -> None:
        self.client = client
        self._redact = redact
        self._found: dict[tuple[Any, ...], Any] = {}
        self._unknown: dict[tuple[Any, ...], tuple[float, str]] = {}
        self._local = threading.local()

    def get_schema(self, *args: Any, **kwargs: Any) -> Any:
        return self._look_up("get_schema", args, kwargs)

    def get_schema_by_guid(self, *args: Any, **kwargs: Any) -> Any:
        return self._look_up("get_schema_by_guid", args, kwargs)

    def get_version(self, *args: Any, **kwargs: Any) -> Any:
        return self._look_up("get_version", args, kwargs)

    def __getattr__(self, name: str) -> Any:  # config() and the like: no network
        return getattr(self.client, name)

    @contextlib.contextmanager
    def blocking(self) -> Iterator[None]:
        """Let this thread ask the registry (the fetch thread; command-line tools)."""
        before = getattr(self._local, "fetching", False)
        self._local.fetching = True
        try:
            yield
        finally:
            self._local.fetching = before

    def _look_up(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        key = (method, args, tuple(sorted(kwargs.items())))
        found = self._found.get(key)
        if found is not None:
            return found
        unknown = self._unknown.get(key)
        if unknown is not None and unknown[0] > time.monotonic():
            raise _Unknown(unknown[1])
        if not getattr(self._local, "fetching", False):
            raise _NotFetched()
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            found = getattr(self.client, method)(*args, **kwargs)
        except SchemaRegistryError as exc:
            reason = self._redact(f"the registry has no such schema ({exc.error_message})")
            if exc.http_status_code == 404:
                self._unknown[key] = (time.monotonic() + UNKNOWN_KEPT, reason)
                raise _Unknown(reason) from None
            raise _Unreachable(self._redact(f"the registry answered an error: {exc}")) from None
        except Exception as exc:  # transport errors: httpx's, whichever its version
            detail = str(exc) or type(exc).__name__
            raise _Unreachable(
                self._redact(f"cannot reach the schema registry: {type(exc).__name__}: {detail}")
            ) from None
        self._found[key] = found
        return found


class _Pending:
    __slots__ = ("failures", "fetching", "not_before", "reason")

    def __init__(self) -> None:
        self.fetching = False
        self.failures = 0
        self.not_before = 0.0
        self.reason = ""


class Fetcher:
    """One registry: its look-up table and the thread that fills it, one fetch per
    schema at a time, with a backoff per schema after failures."""

    def __init__(self, client: Any, redact: Callable[[str], str]) -> None:
        self.table = LookupTable(client, redact)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[bytes, _Pending] = {}
        self._lock = threading.Lock()

    def unavailable(self, raw: bytes, decode: Callable[[bytes], Any]) -> DecodeUnavailable:
        """Start (or wait for) the fetch of what decoding ``raw`` needs; the exception to
        raise meanwhile."""
        prefix = raw[:17] if raw[0] == _MAGIC_GUID else raw[:5]
        now = time.monotonic()
        with self._lock:
            state = self._pending.setdefault(prefix, _Pending())
            if not state.fetching and now >= state.not_before:
                state.fetching = True
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="shunter-registry")
                self._pool.submit(self._fetch, prefix, raw, decode)
            if state.fetching and not state.failures:
                wait = FIRST_RETRY
            else:
                wait = max(FIRST_RETRY, state.not_before - now)
            reason = state.reason or f"fetching {describe(raw)} from the schema registry"
        return DecodeUnavailable(reason, wait)

    def _fetch(self, prefix: bytes, raw: bytes, decode: Callable[[bytes], Any]) -> None:
        failure = ""
        with self.table.blocking():
            try:
                decode(raw)  # fetches all it needs (the writer schema and its references)
            except _Unreachable as exc:
                failure = str(exc)
            except Exception:  # the schema is known now; the record path judges the payload
                pass
        with self._lock:
            state = self._pending[prefix]
            state.fetching = False
            if not failure:
                del self._pending[prefix]
                return
            state.failures += 1
            state.reason = failure
            delay = min(BACKOFF_MIN * 2 ** (state.failures - 1), BACKOFF_MAX)
            state.not_before = time.monotonic() + delay
        if state.failures == 1 or state.failures % 10 == 0:
            log.warning("%s: %s (attempt %d; records wait)", describe(raw), failure, state.failures)


class RegistryDecoder(Decoder):
    """A topic in the Confluent wire format, with confluent-kafka's deserializer."""

    __slots__ = ("_deserialize", "_fetcher")

    def __init__(
        self,
        topic: str,
        deserialize: Callable[[bytes], Any],
        fetcher: Fetcher,
        validate: Validator | None,
    ) -> None:
        super().__init__(topic, False, validate)
        self._deserialize = deserialize
        self._fetcher = fetcher

    def __call__(self, raw: bytes | None) -> Any:
        if raw is None:
            raise RejectedMessage("decode", "empty payload (tombstone)")
        problem = framing_problem(raw)
        if problem is not None:
            raise RejectedMessage("decode", problem)
        try:
            value = self._deserialize(raw)
        except _NotFetched:
            raise self._fetcher.unavailable(raw, self._deserialize) from None
        except _Unreachable as exc:  # in blocking mode only
            raise DecodeUnavailable(str(exc), BACKOFF_MIN) from None
        except _Unknown as exc:
            raise RejectedMessage("decode", f"unknown {describe(raw)}: {exc}") from None
        except Exception as exc:  # SerializationError, EOFError, IndexError...: the payload
            detail = str(exc).replace("\n", " ")[:500] or "malformed body"
            reason = f"{describe(raw)}: cannot decode the body: {type(exc).__name__}: {detail}"
            raise RejectedMessage("decode", reason) from None
        return self._checked(value)

    def blocking(self) -> contextlib.AbstractContextManager[None]:
        """Decode with this thread allowed to ask the registry (command-line tools)."""
        return self._fetcher.table.blocking()


# -- clients, one per registry configuration ------------------------------------------------

_FETCHERS: dict[str, Fetcher] = {}
_FETCHERS_LOCK = threading.Lock()


def fetcher_for(cfg: SchemaRegistryConfig, where: str) -> Fetcher:
    """The fetcher (and registry client) of ``cfg``, shared by every topic using it.

    Tests reach the client as ``fetcher_for(cfg, ...).table.client`` to register schemas in
    a ``mock://`` registry."""
    key = cfg.model_dump_json()
    with _FETCHERS_LOCK:
        fetcher = _FETCHERS.get(key)
        if fetcher is None:
            fetcher = _FETCHERS[key] = Fetcher(_client(cfg, where), _redactor(cfg))
        return fetcher


def _client(cfg: SchemaRegistryConfig, where: str) -> Any:
    try:
        from confluent_kafka.schema_registry import SchemaRegistryClient
    except ImportError as exc:
        raise ConfigError(
            [
                f"{where}: needs confluent-kafka's registry support: pip install 'shunter[avro]' "
                f"or 'shunter[protobuf]' ({exc})"
            ]
        ) from None
    conf: dict[str, Any] = {"url": cfg.url, "timeout": cfg.timeout, "max.retries": 0}
    if cfg.basic_auth is not None:
        conf["basic.auth.user.info"] = cfg.basic_auth
    conf.update(cfg.client)
    try:
        return SchemaRegistryClient.new_client(conf)
    except (ValueError, TypeError) as exc:
        raise ConfigError([f"{where}: {_redactor(cfg)(str(exc))}"]) from None


def _redactor(cfg: SchemaRegistryConfig) -> Callable[[str], str]:
    from yarl import URL

    secrets = [s for s in (URL(cfg.url).password, cfg.basic_auth) if s]
    if cfg.basic_auth:
        secrets += [s for s in cfg.basic_auth.split(":", 1) if s]

    def redact(text: str) -> str:
        for secret in sorted(secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    return redact
