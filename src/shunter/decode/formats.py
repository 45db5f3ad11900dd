"""Avro and Protobuf topics: plain payloads with a local schema or message class, or the
Confluent wire format with a Schema Registry (``registry.py``).

Avro (and registry JSON) values reach handlers as dicts; Protobuf values as instances of
the generated message class.
"""

from __future__ import annotations

import io
from typing import Any

import orjson

from ..config import Config, TopicConfig
from ..errors import ConfigError, RejectedMessage
from ..loader import import_object
from .decoder import Decoder, Validator
from .registry import RegistryDecoder, fetcher_for

_EXTRA = {"avro": "avro", "protobuf": "protobuf", "json": "avro"}  # json: any registry extra


class AvroDecoder(Decoder):
    """Plain Avro: the body alone, written with the topic's ``.avsc``."""

    __slots__ = ("_name", "_read", "_schema")

    def __init__(self, topic: str, schema: Any, validate: Validator | None) -> None:
        from fastavro import schemaless_reader

        super().__init__(topic, False, validate)
        self._schema = schema
        self._read = schemaless_reader
        self._name = schema.get("name", "Avro") if isinstance(schema, dict) else "Avro"

    def __call__(self, raw: bytes | None) -> Any:
        if raw is None:
            raise RejectedMessage("decode", "empty payload (tombstone)")
        body = io.BytesIO(raw)
        try:
            value = self._read(body, self._schema, None)
        except Exception as exc:  # EOFError, IndexError, UnicodeDecodeError...: the payload
            detail = str(exc).replace("\n", " ")[:500] or "truncated or malformed"
            raise RejectedMessage(
                "decode", f"not an Avro {self._name} record: {type(exc).__name__}: {detail}"
            ) from None
        left = len(raw) - body.tell()
        if left:
            hint = " (a Confluent wire-format payload?)" if raw[:1] == b"\0" else ""
            raise RejectedMessage(
                "decode", f"{left} bytes left over after the Avro {self._name} record{hint}"
            )
        return self._checked(value)


class ProtobufDecoder(Decoder):
    """Plain Protobuf: the serialized message alone, parsed by the generated class."""

    __slots__ = ("_cls",)

    def __init__(self, topic: str, cls: Any) -> None:
        super().__init__(topic, False, None)
        self._cls = cls

    def __call__(self, raw: bytes | None) -> Any:
        if raw is None:
            raise RejectedMessage("decode", "empty payload (tombstone)")
        try:
            return self._cls.FromString(raw)
        except Exception as exc:  # google.protobuf.message.DecodeError, mostly
            detail = str(exc).replace("\n", " ")[:500] or "truncated or malformed"
            name = self._cls.DESCRIPTOR.full_name
            raise RejectedMessage(
                "decode", f"not a Protobuf {name}: {type(exc).__name__}: {detail}"
            ) from None


def build_format_decoder(
    config: Config, name: str, topic: TopicConfig, validate: Validator | None
) -> Decoder:
    where = f"topics.{name}"
    _require(topic.format, where)
    if topic.format == "protobuf":
        assert topic.message is not None  # config refuses a protobuf topic without one
        cls = _message_class(topic.message, f"{where}.message")
        if topic.schema_registry is None:
            return ProtobufDecoder(name, cls)
    reader = _avro_schema(config, topic.schema_, f"{where}.schema") if topic.schema_ else None
    if topic.schema_registry is None:
        return AvroDecoder(name, reader, validate)
    fetcher = fetcher_for(topic.schema_registry, f"{where}.schema_registry")
    deserializer: Any
    if topic.format == "avro":
        from confluent_kafka.schema_registry.avro import AvroDeserializer

        text = config.resolve(topic.schema_).read_text() if topic.schema_ else None
        deserializer = AvroDeserializer(fetcher.table, text)
    elif topic.format == "protobuf":
        from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer

        deserializer = ProtobufDeserializer(cls, {}, fetcher.table)
    else:
        from confluent_kafka.schema_registry.json_schema import JSONDeserializer

        # No subject: the writer's schema comes by ID alone (as for avro and protobuf,
        # which are called without a SerializationContext and so name no subject).
        deserializer = JSONDeserializer(
            None,
            schema_registry_client=fetcher.table,
            conf={"subject.name.strategy": _no_subject},
        )

    def deserialize(raw: bytes) -> Any:
        return deserializer(raw, None)

    return RegistryDecoder(name, deserialize, fetcher, validate)


def _no_subject(ctx: Any, record_name: Any) -> None:
    return None


def _require(fmt: str, where: str) -> None:
    modules = {"avro": ["fastavro"], "protobuf": ["google.protobuf"]}.get(fmt, [])
    try:
        for module in modules:
            __import__(module)
    except ImportError:
        extra = _EXTRA.get(fmt, fmt)
        raise ConfigError(
            [f"{where}.format: {fmt} needs the {extra} extra: pip install 'shunter[{extra}]'"]
        ) from None


def _message_class(path: str, where: str) -> Any:
    from google.protobuf.message import Message

    cls = import_object(path, where)
    if not (isinstance(cls, type) and issubclass(cls, Message)):
        raise ConfigError([f"{where}: {path} is not a generated Protobuf message class"])
    return cls


def _avro_schema(config: Config, path: str, where: str) -> Any:
    from fastavro import parse_schema

    try:
        return parse_schema(orjson.loads(config.resolve(path).read_bytes()))
    except Exception as exc:  # OSError, JSONDecodeError, fastavro's SchemaParseException
        reason = str(exc).replace("\n", " ")[:500]
        raise ConfigError([f"{where}: cannot load Avro schema {path}: {reason}"]) from None
