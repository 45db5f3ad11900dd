"""A handler's exception becomes an outcome whose traceback is exactly what Python would
print: the formatted stack of a repeated failure is reused, never another one's."""

from __future__ import annotations

import traceback

from shunter.deliver.failure import failure, format_traceback
from shunter.errors import DeadLetter, RetryLater
from shunter.outcome import DeadLettered, Failed


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


class Hostile(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no description for you")


class Empty(Exception):
    def __str__(self) -> str:
        return ""


def with_notes() -> BaseException:
    exc = ValueError("noted")
    exc.add_note("first note")
    exc.add_note("second\nnote")
    return exc


def odd_notes() -> BaseException:
    exc = ValueError("odd")
    exc.__notes__ = "not a list"  # type: ignore[attr-defined]
    return exc


def syntax_error() -> BaseException:
    try:
        compile("def broken(:\n", "handler.py", "exec")
    except SyntaxError as exc:
        return exc
    raise AssertionError("unreachable")


KINDS: list[BaseException] = [
    KeyError("effect"),
    KeyError(),
    ValueError(""),
    RuntimeError("two\nlines"),
    Hostile(),
    Empty("ignored"),
    __import__("json").JSONDecodeError("bad", "{", 0),
    TimeoutError(),
    KeyboardInterrupt(),
    SystemExit(3),
    with_notes(),
    odd_notes(),
    syntax_error(),
    type("Local", (Exception,), {"__module__": "__main__"})("main's own"),
]


def test_the_exception_line_is_what_python_prints_for_every_kind_of_exception() -> None:
    for kind in KINDS:
        try:
            raise kind
        except BaseException as exc:
            exc.__context__ = None
            expected = "".join(traceback.format_exception(exc))
            assert format_traceback(exc) == expected, repr(kind)


def test_a_dead_letter_whose_reason_was_replaced_is_still_dead_lettered() -> None:
    """A handler may change the exception after building it: whatever its reason is then,
    it is dead-lettered with that reason as text, never retried instead (the compiled
    build checks an attribute's declared type when it reads it)."""
    exc = DeadLetter("built with text")
    exc.reason = b"then bytes"  # type: ignore[assignment]
    outcome = failure(exc)
    assert isinstance(outcome, DeadLettered)
    assert outcome.reason == "b'then bytes'"


def test_a_retry_whose_attributes_were_replaced_keeps_its_message_and_deferral() -> None:
    """As above for RetryLater: a delay that is no longer a number falls back to the
    tier's own; the message and whether the attempt counts stay as raised."""
    exc = RetryLater(30, "circuit open", count_attempt=False)
    exc.delay = "soon"  # type: ignore[assignment]
    outcome = failure(exc)
    assert isinstance(outcome, Failed)
    assert (outcome.error, outcome.delay, outcome.counts) == ("circuit open", None, False)
    exc.delay, exc.count_attempt = 7, 1  # type: ignore[assignment]
    outcome = failure(exc)
    assert isinstance(outcome, Failed)
    assert (outcome.delay, outcome.counts, outcome.traceback != "") == (7.0, True, True)
