"""A handler's exception becomes an outcome whose traceback is exactly what Python would
print: the formatted stack of a repeated failure is reused, never another one's."""

from __future__ import annotations

import traceback

from shunter.deliver.failure import format_traceback


def fails(offset: int) -> BaseException:
    try:
        raise KeyError(f"effect missing at offset {offset}")
    except KeyError as exc:
        exc.__context__ = None  # as a handler's own raise has none
        return exc


def fails_elsewhere(offset: int) -> BaseException:
    try:
        {}[offset]
    except KeyError as exc:
        return exc


def fails_with_a_cause() -> BaseException:
    try:
        try:
            {}["effect"]
        except KeyError as cause:
            raise ValueError("guard purchase without its effect") from cause
    except ValueError as exc:
        return exc


def test_a_repeated_failure_is_formatted_as_python_would_every_time() -> None:
    for offset in range(3):
        exc = fails(offset)
        expected = "".join(traceback.format_exception(exc))
        assert format_traceback(exc) == expected
        assert f"effect missing at offset {offset}" in expected


def test_failures_at_different_lines_keep_their_own_stacks() -> None:
    here, there = format_traceback(fails(1)), format_traceback(fails_elsewhere(1))
    assert "in fails\n" in here and "in fails_elsewhere" not in here
    assert "in fails_elsewhere\n" in there and "in fails\n" not in there


def test_a_chained_failure_keeps_its_cause() -> None:
    text = format_traceback(fails_with_a_cause())
    assert "KeyError: 'effect'" in text
    assert "direct cause of the following exception" in text
    assert text.rstrip().endswith("ValueError: guard purchase without its effect")


def test_an_exception_group_keeps_every_failure_in_it() -> None:
    try:
        raise ExceptionGroup("two subscribers' calls", [KeyError("effect"), ValueError("x")])
    except ExceptionGroup as exc:
        text = format_traceback(exc)
    assert "KeyError: 'effect'" in text and "ValueError: x" in text
