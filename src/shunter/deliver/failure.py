"""Exceptions raised by handlers → outcome values."""

from __future__ import annotations

import os
import traceback
from types import TracebackType

from ..errors import DeadLetter, DeliveryTimeout, RetryLater, WorkerDied
from ..outcome import DeadLettered, Failed

_MAX_TRACEBACK = 16_384
_DELIVER = os.path.dirname(os.path.abspath(__file__)) + os.sep


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


def format_traceback(exc: BaseException) -> str:
    exc.__traceback__ = _own_frames(exc.__traceback__)
    text = "".join(traceback.format_exception(exc))
    if len(text) > _MAX_TRACEBACK:  # keep the end: the failing line is there
        text = "...\n" + text[-_MAX_TRACEBACK:]
    return text


def failure(exc: BaseException) -> Failed | DeadLettered:
    """The outcome of a handler that raised ``exc``."""
    if isinstance(exc, DeadLetter):
        return DeadLettered(exc.reason, "DeadLetter", format_traceback(exc))
    if isinstance(exc, RetryLater):
        tb = format_traceback(exc) if exc.count_attempt else ""
        return Failed(error_type(exc), str(exc), tb, delay=exc.delay, counts=exc.count_attempt)
    signal = exc.signal if isinstance(exc, WorkerDied) else ""
    return Failed(error_type(exc), str(exc), format_traceback(exc), signal=signal)


def timed_out(seconds: float) -> Failed:
    return Failed(
        error_type(DeliveryTimeout()),
        f"handler did not finish within {seconds:g}s and was cancelled",
        "",
    )
