"""Exceptions raised by handlers → outcome values."""

from __future__ import annotations

import builtins
import os
import traceback
from collections.abc import Callable
from types import TracebackType

from .._native import COMPILED_SOURCE
from ..errors import DeadLetter, DeliveryTimeout, RetryLater, WorkerDied, checked_delay
from ..outcome import DeadLettered, Failed

_MAX_TRACEBACK = 16_384
# getattr itself, an attribute read as an object: compiled, ``getattr(x, name, default)``
# of a missing attribute raises and clears an AttributeError (its message formatted),
# ~0.25 µs, where the builtin looks it up without one; and ``x.attr`` of a non-compiled
# class is checked to be its declared type.
_lookup: Callable[[object, str, object], object] = builtins.getattr
# This package's frames: run from source, or compiled (runtime.py; see COMPILED_SOURCE).
_DELIVER = (os.path.dirname(os.path.abspath(__file__)) + os.sep, COMPILED_SOURCE + "deliver/")


def error_type(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    if module in {"builtins", "__main__"}:
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


def _own_frames(tb: TracebackType | None) -> TracebackType | None:
    """Skip shunter's own frames at the top: the operator wants the handler's lines."""
    while (
        tb is not None
        and tb.tb_next is not None
        and tb.tb_frame.f_code.co_filename.startswith(_DELIVER)
    ):
        tb = tb.tb_next
    return tb


# A failing handler usually fails the same way many times over (a bad deploy, a missing
# field): the formatted stack of a traceback is kept by its frames' code objects and
# instruction offsets, which name the same lines every time. Formatting a stack costs
# ~12 µs on Python 3.11 (it parses each line for the caret marks); the lookup ~1 µs.
_STACKS: dict[tuple[object, ...], str] = {}
_STACKS_MAX = 512


def _stack_key(tb: TracebackType) -> tuple[object, ...]:
    key: list[object] = []
    frame: TracebackType | None = tb
    while frame is not None:
        key.append(frame.tb_frame.f_code)
        key.append(frame.tb_lasti)
        frame = frame.tb_next
    return tuple(key)


def format_traceback(exc: BaseException) -> str:
    tb = exc.__traceback__ = _own_frames(exc.__traceback__)
    if (
        tb is None
        or exc.__cause__ is not None
        or exc.__context__ is not None
        or isinstance(exc, BaseExceptionGroup)
    ):  # chained or grouped: the whole story each time
        text = "".join(traceback.format_exception(exc))
    else:
        key = _stack_key(tb)
        stack = _STACKS.get(key)
        if stack is None:
            te = traceback.TracebackException(type(exc), exc, tb, compact=True)
            stack = "Traceback (most recent call last):\n" + "".join(te.stack.format())
            if len(_STACKS) >= _STACKS_MAX:
                _STACKS.clear()
            _STACKS[key] = stack
        text = stack + _exception_line(exc)
    if len(text) > _MAX_TRACEBACK:  # keep the end: the failing line is there
        text = "...\n" + text[-_MAX_TRACEBACK:]
    return text


def _exception_line(exc: BaseException) -> str:
    """``traceback.format_exception_only(exc)`` joined, without the ~3 µs of building a
    ``TracebackException`` for the common case: no notes, not a ``SyntaxError`` (whose
    line, caret and notes Python's own code formats)."""
    if isinstance(exc, SyntaxError) or _lookup(exc, "__notes__", None) is not None:
        return "".join(traceback.format_exception_only(exc))
    try:
        value = str(exc)
    except Exception:
        value = "<exception str() failed>"
    name = error_type(exc)
    return f"{name}: {value}\n" if value else f"{name}\n"


def failure(exc: BaseException) -> Failed | DeadLettered:
    """The outcome of a handler that raised ``exc``: never raises itself, whatever the
    handler's exception does when it is printed or its attributes are read."""
    try:
        return _outcome(exc)
    except Exception as broken:  # a hostile __str__, a traceback that cannot be formatted
        try:
            name = error_type(exc)
        except Exception:
            name = "unknown"
        return Failed(
            name,
            f"the handler raised {name}, which could not be described "
            f"({type(broken).__name__} while reading it)",
            "",
        )


def _outcome(exc: BaseException) -> Failed | DeadLettered:
    # The attributes of shunter's own exceptions are read as objects: a handler may have
    # replaced one after building it, and compiled, ``exc.reason`` would be checked to be
    # the str it was built as (a DeadLetter with a reason of bytes would be retried
    # instead of dead-lettered, a RetryLater lose its message).
    if isinstance(exc, DeadLetter):
        reason = _lookup(exc, "reason", "")
        return DeadLettered(_text(reason), "DeadLetter", format_traceback(exc))
    if isinstance(exc, RetryLater):
        counts = bool(_lookup(exc, "count_attempt", True))
        tb = format_traceback(exc) if counts else ""
        delay: float | None = None
        wanted = _lookup(exc, "delay", None)
        if wanted is not None:  # checked at construction; the attribute may have changed
            try:
                delay = checked_delay(wanted)
            except (TypeError, ValueError):
                delay = None
        return Failed(error_type(exc), _text(exc), tb, delay=delay, counts=counts)
    signal = exc.signal if isinstance(exc, WorkerDied) else ""
    return Failed(error_type(exc), _text(exc), format_traceback(exc), signal=signal)


def _text(value: object) -> str:
    return value if isinstance(value, str) else str(value)


def timed_out(seconds: float) -> Failed:
    return Failed(
        error_type(DeliveryTimeout()),
        f"handler did not finish within {seconds:g}s and was cancelled",
        "",
    )
