"""Decoding for people: the value of a record's bytes as text, whatever the topic's
format (``shunter dlq show``, ``shunter replay``). Unlike the record path, these may
wait for the schema registry."""

from __future__ import annotations

import contextlib
from typing import Any

import orjson

from ..config import Config
from ..errors import DecodeUnavailable, RejectedMessage
from .decoder import Decoder, build_decoder

_DECODERS: dict[tuple[int, str], tuple[Config, Decoder]] = {}
_MAX_BYTES_SHOWN = 4096


def decoder_for(config: Config, topic: str) -> Decoder:
    """The topic's decoder, built once per configuration; KeyError for an unknown topic."""
    key = (id(config), topic)
    cached = _DECODERS.get(key)
    if cached is None or cached[0] is not config:
        cached = _DECODERS[key] = (config, build_decoder(config, topic, config.topics[topic]))
    return cached[1]


def decode_now(config: Config, topic: str, raw: bytes | None) -> Any:
    """The decoded value, asking the schema registry if needed (blocking).

    Raises ``RejectedMessage`` as the dispatcher would, or ``DecodeUnavailable`` if the
    registry cannot be reached."""
    decoder = decoder_for(config, topic)
    blocking = getattr(decoder, "blocking", None)
    with blocking() if blocking is not None else contextlib.nullcontext():
        return decoder(raw)


def display(config: Config, topic: str, raw: bytes | None) -> str:
    """The payload as indented JSON text (Protobuf in its JSON mapping), or, when it cannot
    be decoded, why, followed by its bytes."""
    if topic not in config.topics:
        return _bytes(raw)
    try:
        value = decode_now(config, topic, raw)
    except (RejectedMessage, DecodeUnavailable) as exc:
        stage = getattr(exc, "stage", "decode")
        return f"(not decodable as {config.topics[topic].format}: {stage}: {exc.reason})\n" + (
            _bytes(raw)
        )
    return as_text(value)


def as_text(value: Any) -> str:
    """A decoded value as indented JSON text."""
    if isinstance(value, bytes | bytearray):
        return _bytes(bytes(value))
    try:
        return orjson.dumps(value, default=plain, option=orjson.OPT_INDENT_2).decode()
    except TypeError:
        return repr(value)


def plain(obj: Any) -> Any:
    """JSON for what decoders return beyond JSON's types: Protobuf messages (their JSON
    mapping), pydantic models, bytes (Avro bytes/fixed, as text where they are text),
    decimals."""
    if hasattr(obj, "DESCRIPTOR") and hasattr(obj, "ListFields"):
        from google.protobuf.json_format import MessageToDict

        return MessageToDict(obj, preserving_proto_field_name=True)
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    if isinstance(obj, bytes | bytearray):
        return bytes(obj).decode("utf-8", "backslashreplace")
    from decimal import Decimal

    if isinstance(obj, Decimal):
        return str(obj)
    raise TypeError(f"type {type(obj).__name__} is not JSON serializable")


def _bytes(raw: bytes | None) -> str:
    if raw is None:
        return "(no payload)"
    shown = raw[:_MAX_BYTES_SHOWN]
    more = f" ... ({len(raw)} bytes)" if len(raw) > _MAX_BYTES_SHOWN else ""
    return repr(shown) + more
