"""Per-topic decoding and validation.

A decoder either returns the value or raises ``RejectedMessage`` naming the stage
(``decode`` or ``validate``) and a reason a person can act on. It never lets a
malformed message through to a handler, and never raises anything else.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from typing import Any, Final

import jsonschema_rs
import orjson
from mypy_extensions import mypyc_attr

from ..config import Config, TopicConfig
from ..errors import ConfigError, RejectedMessage
from ..loader import import_object

Validator = Callable[[Any], Any]
Decode = Callable[[bytes | None], Any]  # a Decoder, or (in tests) any function like one


# orjson turns an integer beyond 64 bits (above 2**64 - 1 or below -2**63) into a float,
# silently rounded, and such a float is never smaller in magnitude than 2**63. A decoded
# value holding one (or a genuine float that large, which is rare) is decoded again by the
# standard library, which keeps integers exact up to CPython's 4,300-digit limit.
#
# Compiled (setup.py), the value is walked: a flat event has a dozen values and two
# hundred bytes. In pure Python that walk costs five times a scan of the bytes, which maps
# every digit to "0" and everything else to " " and searches for a run of 19 zeros (the
# shortest integer beyond 64 bits, -9223372036854775809): two C-speed passes, where a
# regex takes seven times as long. Digits inside strings match the scan too; a needless
# decode is only slower.
_HUGE: Final = 9223372036854775808.0  # 2**63
_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_RUN = b"0" * 19


def _holds_huge_float(value: Any) -> bool:
    """Whether ``value`` (as orjson decodes JSON: dicts, lists, scalars) holds a float of
    2**63 or more in magnitude, at any depth (walked with a list, not recursion).

    Compiled, a dict's values are copied to a list first, which iterates at a fraction of
    the cost of a dict view, and orjson's exact types are told apart by ``type(x) is``
    rather than ``isinstance``: a flat event in 120 ns rather than 200."""
    todo: list[Any] = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            children: list[Any] = list(item.values())
        elif isinstance(item, list):
            children = item
        elif isinstance(item, float):
            return not -_HUGE < item < _HUGE
        else:
            continue
        for child in children:
            kind = type(child)
            if kind is float:
                if not -_HUGE < child < _HUGE:
                    return True
            elif kind is dict or kind is list:
                todo.append(child)
    return False


_WALK = not isinstance(_holds_huge_float, types.FunctionType)  # compiled: a C function


def _exact(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise RejectedMessage("decode", f"invalid JSON: {str(exc)[:200]}") from None


@mypyc_attr(allow_interpreted_subclasses=True)  # the other formats' decoders
class Decoder:
    """Decodes one topic's payloads: JSON (orjson) or raw bytes, then validates.

    The other formats (``avro``, ``protobuf``, a schema registry) are subclasses with their
    own ``__call__``; every decoder is called with the record's bytes on the event loop
    and returns the value, or raises ``RejectedMessage`` (a dead letter) or
    ``DecodeUnavailable`` (transient: hold the record and decode it again later)."""

    __slots__ = ("_json", "_validate", "topic")

    def __init__(self, topic: str, is_json: bool, validate: Validator | None) -> None:
        self.topic = topic
        self._json = is_json
        self._validate = validate

    def __call__(self, raw: bytes | None) -> Any:
        if raw is None:
            raise RejectedMessage("decode", "empty payload (tombstone)")
        if not self._json:
            value: Any = raw
        else:
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise RejectedMessage("decode", f"invalid JSON: {exc}") from None
            if (
                _holds_huge_float(value)
                if _WALK
                else raw.translate(_DIGITS_AS_ZEROS).find(_LONG_RUN) != -1  # faster than `in`
            ):
                value = _exact(raw)
        validate = self._validate
        if validate is None:
            return value
        try:  # _checked, inlined: this is every record's path
            return validate(value)
        except RejectedMessage:
            raise
        except Exception as exc:
            raise _invalid(exc) from None

    def _checked(self, value: Any) -> Any:
        """The value after the topic's schema or model, if any."""
        if self._validate is None:
            return value
        try:
            return self._validate(value)
        except RejectedMessage:
            raise
        except Exception as exc:
            raise _invalid(exc) from None


def _invalid(exc: Exception) -> RejectedMessage:
    """A model's own validation error, whatever its library, as a dead letter's reason."""
    reason = str(exc).replace("\n", "; ")[:1000]
    return RejectedMessage("validate", f"{type(exc).__name__}: {reason}")


def _schema_validator(config: Config, name: str, path: str) -> Validator:
    try:
        schema = orjson.loads(config.resolve(path).read_bytes())
        # Draft 7 unless the schema names its own draft; formats are checked whatever the
        # draft says (2020-12 would only annotate them), as a dispatcher's users expect.
        validator: jsonschema_rs.Validator
        if isinstance(schema, dict) and "$schema" not in schema:
            validator = jsonschema_rs.Draft7Validator(schema, validate_formats=True)
        else:
            validator = jsonschema_rs.validator_for(schema, validate_formats=True)
    except (OSError, orjson.JSONDecodeError, ValueError) as exc:  # ValidationError is one
        reason = str(exc).replace("\n", " ")[:500]
        raise ConfigError(
            [f"topics.{name}.schema: cannot load JSON Schema {path}: {reason}"]
        ) from None
    is_valid = validator.is_valid

    def check(value: Any) -> Any:
        if is_valid(value):  # the common case: a yes or no, without building errors
            return value
        error = next(iter(validator.iter_errors(value)), None)
        if error is None:  # is_valid and iter_errors disagree: refuse, never let it pass
            raise RejectedMessage("validate", "schema: not valid")
        where = "/".join(str(part) for part in error.instance_path)
        raise RejectedMessage("validate", f"schema: {error.message} (at /{where})")

    return check


def _model_validator(name: str, path: str) -> Validator:
    model = import_object(path, f"topics.{name}.model")
    validate = getattr(model, "model_validate", None)  # pydantic v2
    if callable(validate):
        return validate  # type: ignore[no-any-return]
    if callable(model):
        return model  # type: ignore[no-any-return]
    raise ConfigError([f"topics.{name}.model: {path} is neither a pydantic model nor callable"])


def build_decoder(config: Config, name: str, topic: TopicConfig) -> Decoder:
    """The decoder of one source topic; ConfigError naming the key path if it cannot be built."""
    if topic.format in ("avro", "protobuf") or topic.schema_registry is not None:
        from .formats import build_format_decoder

        validate = _model_validator(name, topic.model) if topic.model is not None else None
        return build_format_decoder(config, name, topic, validate)
    validate = None
    if topic.schema_ is not None:
        validate = _schema_validator(config, name, topic.schema_)
    elif topic.model is not None:
        validate = _model_validator(name, topic.model)
    return Decoder(name, topic.format == "json", validate)


def build_decoders(config: Config) -> dict[str, Decode]:
    """One decoder per source topic, built once at start."""
    return {name: build_decoder(config, name, topic) for name, topic in config.topics.items()}
