"""The dataclasses built for every failure write their ``__init__`` out (so that the
compiled build runs a compiled one): it must stay the one ``@dataclass`` would generate,
every field in order, by position and by keyword, with the same defaults."""

from __future__ import annotations

import ast
import dataclasses
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from shunter.outcome import DeadLettered, Failed
from shunter.settle.headers import FailureInfo
from shunter.settle.route import Destination

CLASSES = [FailureInfo, Failed, DeadLettered, Destination]


def _annotations(cls: type) -> dict[str, str]:
    """The fields' annotations as written: a compiled class keeps only erased types
    (``bytes | None`` becomes ``type``)."""
    module = sys.modules[cls.__module__]
    source = Path(str(module.__file__)).with_name(cls.__module__.rsplit(".", 1)[-1] + ".py")
    [node] = [
        n for n in ast.parse(source.read_text()).body
        if isinstance(n, ast.ClassDef) and n.name == cls.__name__
    ]
    return {
        n.target.id: ast.unparse(n.annotation)
        for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }


def _values(cls: type, fields: Iterable[dataclasses.Field[Any]]) -> dict[str, Any]:
    """A value of each field's type, different for every field."""
    kinds = _annotations(cls)
    values: dict[str, Any] = {}
    for n, field in enumerate(fields):
        kind = kinds[field.name]
        if kind.startswith("bytes"):
            values[field.name] = f"key-{n}".encode()
        elif kind.startswith("str"):
            values[field.name] = f"{field.name}-{n}"
        elif kind == "bool":
            values[field.name] = n % 2 == 0
        elif kind.startswith("float"):
            values[field.name] = n + 0.5
        elif kind == "int":
            values[field.name] = n + 100
        else:
            raise AssertionError(f"no test value for {field.name}: {kind}")
    return values


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_field_is_set_by_keyword_and_by_position(cls: type) -> None:
    fields = dataclasses.fields(cls)
    values = _values(cls, fields)
    for built in (cls(**values), cls(*values.values())):
        assert {f.name: getattr(built, f.name) for f in fields} == values
        assert dataclasses.replace(built) == built  # replace goes through __init__ too


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_the_defaults_are_the_fields_defaults(cls: type) -> None:
    fields = dataclasses.fields(cls)
    required = [f for f in fields if f.default is dataclasses.MISSING]
    built = cls(**_values(cls, required))
    for field in fields:
        if field.default is not dataclasses.MISSING:
            assert getattr(built, field.name) == field.default, field.name


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_no_argument_beyond_the_fields(cls: type) -> None:
    fields = dataclasses.fields(cls)
    values = _values(cls, fields)
    with pytest.raises(TypeError):
        cls(**values, unknown="x")
    with pytest.raises(TypeError):
        cls(*values.values(), "one too many")
