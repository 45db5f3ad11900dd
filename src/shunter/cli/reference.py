"""The configuration reference, generated from the configuration model itself.

Every key of ``config.Config`` (walked generically: a key added to the model appears here
without any change to this module) with its type, default, meaning (the field's
docstring) and an example. ``docs/configuration.md`` is this text; a test fails when the
two differ, and ``shunter check --reference`` prints it.
"""

from __future__ import annotations

import textwrap
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types as at
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from ..config import Config, parse_duration

WIDTH = 80
HIDDEN = {"base_dir"}  # set by the loader, never written in a file

HEADER = """\
# Configuration reference

<!-- Generated from src/shunter/config.py by `shunter check --reference`.
     Do not edit: after changing the model, run
     shunter check --reference > docs/configuration.md -->

A shunter deployment is one YAML file. Every key is validated when shunter
starts (and by `shunter check -c FILE`); a refused file lists every problem
with its key path. Durations are written `250ms`, `5s`, `5m`, `1h` or as a
number of seconds. Any string may use `${VAR}` to take a value from the
environment (secrets belong there, never in the file); substituted values are
redacted from logs and errors. Relative paths are resolved next to the
configuration file. The words are defined in the [glossary](glossary.md).

`topics.<name>` is a mapping keyed by a name of your choice; `subscribers[]`
is a list. A complete, runnable example is in `examples/live-revenue/`.
"""


@dataclass(frozen=True)
class Key:
    path: str
    kind: str
    default: str  # "" when the key is required
    meaning: str
    example: str
    note: str = ""


def entries(
    model: type[BaseModel] = Config, prefix: str = "", defaults: Any = None
) -> Iterator[Key]:
    """Every leaf key of ``model``, depth first, in declaration order."""
    for name, field in model.model_fields.items():
        if name in HIDDEN:
            continue
        key = field.alias or name
        path = f"{prefix}.{key}" if prefix else key
        nested, shape = _nested(field.annotation)
        default = _default(field, defaults, name)
        if nested is not None:
            child = path + {"dict": ".<name>", "list": "[]", "model": ""}[shape]
            yield Key(path, _section_kind(shape, nested), "", _text(field), "")
            yield from entries(nested, child, default if shape == "model" else None)
            continue
        shown = _show_default(field, default)
        # A key its section's default fills in is still required once the section is written.
        note = f"required when `{prefix}` is written" if shown and field.is_required() else ""
        yield Key(path, _kind(field), shown, _text(field), _example(field), note)


def render() -> str:
    """The whole reference as Markdown, at most 80 columns wide (code spans aside)."""
    out = [HEADER]
    for key in entries():
        if key.kind.startswith("section"):
            out.append(f"## `{key.path}`\n")
            if key.meaning:
                out.append(_wrap(key.meaning) + "\n")
            if key.kind != "section":
                out.append(_wrap(key.kind.removeprefix("section: ")) + "\n")
            continue
        facts = [key.kind, f"default `{key.default}`" if key.default else "required"]
        if key.note:
            facts.append(key.note)
        if key.example:
            facts.append(f"example `{key.example}`")
        out.append(f"### `{key.path}`\n")
        out.append(_wrap(" · ".join(facts)) + "\n")
        out.append(_wrap(key.meaning or "(not documented yet)") + "\n")
    return "\n".join(out).rstrip() + "\n"


def _wrap(text: str, indent: str = "") -> str:
    flat = " ".join(text.split())
    return textwrap.fill(
        flat,
        WIDTH,
        initial_indent=indent,
        subsequent_indent=indent,
        break_on_hyphens=False,
        break_long_words=False,
    )


def _text(field: FieldInfo) -> str:
    return " ".join((field.description or "").split()).replace("``", "`")


def _nested(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The model behind a section key and how it nests: ``model``, ``dict`` or ``list``."""
    origin = get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, "model"
    if origin in (Union, types.UnionType):
        for arg in get_args(annotation):
            if arg is not type(None):
                return _nested(arg)
    if origin is dict:
        inner = get_args(annotation)[1]
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner, "dict"
    if origin is list:
        inner = get_args(annotation)[0]
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner, "list"
    return None, ""


def _section_kind(shape: str, model: type[BaseModel]) -> str:
    if shape == "dict":
        return "section: A mapping from a name of your choice to the keys below."
    if shape == "list":
        return "section: A list; each item takes the keys below."
    return "section"


def _is_duration(field: FieldInfo) -> bool:
    return any(getattr(m, "func", None) is parse_duration for m in field.metadata)


def _kind(field: FieldInfo) -> str:
    base = "duration" if _is_duration(field) else _type_name(field.annotation)
    bounds = []
    for meta in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if isinstance(meta, getattr(at, attr.capitalize())):
                bounds.append(f"{sign} {getattr(meta, attr):,}".replace(",", "_"))
        if isinstance(meta, at.MinLen) and meta.min_length:
            bounds.append("not empty")
        pattern = getattr(meta, "pattern", None)
        if isinstance(pattern, str):
            bounds.append(f"matching `{pattern}`")
    return base + (f" ({', '.join(bounds)})" if bounds else "")


_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if annotation in _NAMES:
        return _NAMES[annotation]
    if origin is Literal:
        return "one of " + " | ".join(f"`{a}`" for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if set(args) == set(_NAMES):
            return "scalar (string, number or boolean)"
        names = " or ".join(_type_name(a) for a in args)
        return names + (", or null" if len(args) < len(get_args(annotation)) else "")
    if origin is list:
        return f"list of {_type_name(get_args(annotation)[0])}s"
    if origin is dict:
        return "mapping of string to " + _type_name(get_args(annotation)[1])
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo, parent: Any, name: str) -> Any:
    if parent is not None and hasattr(parent, name):
        return getattr(parent, name)
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return field.default


def _show_default(field: FieldInfo, value: Any) -> str:
    if value is PydanticUndefined:
        return ""
    if _is_duration(field) and isinstance(value, int | float):
        return _duration(float(value))
    return _yaml(value)


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def _example(field: FieldInfo) -> str:
    if not field.examples:
        return ""
    return _yaml(field.examples[0])


def _yaml(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(by_alias=True)
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False)
    return text.strip().removesuffix("...").strip()
