"""Which subscribers a record goes to.

Topics without filtered categories get a route computed once at start; only categories
with a ``where`` filter cost anything per message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config import Config
from ..message import Record
from .filters import Filter, compile_filter


@dataclass(frozen=True, slots=True)
class Route:
    """One subscriber that a record belongs to, by way of one category."""

    caller: str
    category: str


@dataclass(frozen=True, slots=True)
class FilterError:
    """A category's filter failed on this record: the record is dead-lettered once, for
    the category (no caller), and a replay classifies it again for that category."""

    category: str
    routes: tuple[Route, ...]  # the category's subscribers, which did not get it
    error: str


@dataclass(frozen=True, slots=True)
class _Filtered:
    category: str
    where: Filter
    routes: tuple[Route, ...]


class Router:
    def __init__(self, config: Config) -> None:
        by_category: dict[str, list[Route]] = {name: [] for name in config.categories}
        for sub in config.subscribers:
            by_category[sub.category].append(Route(sub.caller, sub.category))
        self._static: dict[str, tuple[Route, ...]] = {}
        self._filtered: dict[str, tuple[_Filtered, ...]] = {}
        for topic in config.topics:
            static: list[Route] = []
            filtered: list[_Filtered] = []
            for name, category in config.categories.items():
                if topic not in category.topics:
                    continue
                routes = tuple(by_category[name])
                if category.where is None:
                    static.extend(routes)
                else:
                    filtered.append(_Filtered(name, compile_filter(category.where), routes))
            self._static[topic] = tuple(static)
            self._filtered[topic] = tuple(filtered)

    def topics(self) -> list[str]:
        return list(self._static)

    def static_routes(self) -> dict[str, tuple[Route, ...]]:
        """The routes of every topic that has no filters: the same for each of its records."""
        return {
            topic: routes for topic, routes in self._static.items() if not self._filtered[topic]
        }

    def routes(self, record: Record) -> tuple[Sequence[Route], list[FilterError]]:
        """The record's routes, and the filter failures (empty in the common case)."""
        static = self._static[record.topic]
        filtered = self._filtered[record.topic]
        if not filtered:
            return static, []
        routes = list(static)
        errors: list[FilterError] = []
        for group in filtered:
            try:
                matched = group.where(record)
            except Exception as exc:
                errors.append(FilterError(group.category, group.routes, _describe(exc)))
                continue
            if matched:
                routes.extend(group.routes)
        return routes, errors


def _describe(exc: Exception) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:  # an error that cannot be printed still names its type
        return type(exc).__name__
