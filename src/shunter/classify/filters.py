"""CEL filters on categories, compiled once with the ``common-expression-language`` package.

A filter sees ``value`` (the decoded value; a topic's pydantic model as its fields),
``topic``, ``key`` (text, or null) and ``headers``
(a map of text values; a header sent with a null value is ``null``; of repeated names,
the last). Whatever the topic's format, ``value`` is a map: JSON and Avro
values are dicts already; a Protobuf message is turned into one (fields by their proto
names, proto3 defaults included, integers as integers, enums by name, unset message
fields absent so that ``has(value.buyer)`` means what it says) — only for topics with a
filter, and once per record whatever the number of its filters.
"""

from __future__ import annotations

from typing import Any

import cel
from pydantic import BaseModel

from ..message import Record


class Filter:
    __slots__ = ("_program", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self._program = cel.compile(source)

    def __call__(self, record: Record) -> bool:
        """True when the record belongs; any evaluation error propagates to the caller."""
        value = record.value
        if isinstance(value, BaseModel):  # a topic's ``model:``: CEL sees its fields
            value = value.model_dump(mode="json")
        elif type(value) is not dict and hasattr(value, "DESCRIPTOR"):
            value = _as_map(value)
        key = record.key
        context: dict[str, Any] = {
            "value": value,
            "topic": record.topic,
            # Always defined, so that a filter reading them never fails for their absence.
            "key": None if key is None else key.decode("utf-8", "replace"),
            "headers": {
                k: None if v is None else v.decode("utf-8", "replace")
                for k, v in record.headers or ()
            },
        }
        result = self._program.execute(context)
        if not isinstance(result, bool):
            raise TypeError(f"filter returned {type(result).__name__}, expected a bool")
        return result


def compile_filter(source: str) -> Filter:
    """Compile a CEL expression; ValueError with the parser's message when it is invalid."""
    try:
        return Filter(source)
    except Exception as exc:
        raise ValueError(str(exc).splitlines()[0]) from None


# The last message converted and its map: a record's filters (one per filtered category)
# share one conversion. Holding the message keeps its identity from being reused.
_last: tuple[Any, dict[str, Any]] | None = None


def _as_map(message: Any) -> dict[str, Any]:
    global _last
    if _last is not None and _last[0] is message:
        return _last[1]
    converted = message_to_map(message)
    _last = (message, converted)
    return converted


def message_to_map(message: Any) -> dict[str, Any]:
    """A Protobuf message as a dict for CEL (see the module's docstring)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            inner = entry.fields_by_name["value"]
            out[field.name] = {k: _field_value(inner, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_field_value(field, v) for v in value]
        elif entry is not None:
            if message.HasField(field.name):
                out[field.name] = message_to_map(value)
        else:
            out[field.name] = _field_value(field, value)
    return out


def _field_value(field: Any, value: Any) -> Any:
    if field.message_type is not None:
        return message_to_map(value)
    if field.enum_type is not None:
        known = field.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    return value
