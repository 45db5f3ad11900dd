"""CEL filters on categories, compiled once with the ``common-expression-language`` package.

A filter sees ``value`` (the decoded value; a topic's pydantic model as its fields),
``topic``, ``key`` (text) and ``headers`` (a map of text values).
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
        context: dict[str, Any] = {"value": value, "topic": record.topic}
        if record.key is not None:
            context["key"] = record.key.decode("utf-8", "replace")
        if record.headers:
            context["headers"] = {k: v.decode("utf-8", "replace") for k, v in record.headers}
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
