"""One error tree for shunter.

Whether an error is worth retrying is an attribute (``transient``), never a guess made
from the exception's type name at the place that catches it.
"""

from __future__ import annotations

import math


class ShunterError(Exception):
    """Root of every error shunter raises on purpose."""

    transient: bool = False


class ConfigError(ShunterError):
    """The configuration is refused; the message names each bad key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class RejectedMessage(ShunterError):
    """A message failed decoding or validation: it goes to the dead-letter topic."""

    def __init__(self, stage: str, reason: str) -> None:
        self.stage = stage
        self.reason = reason
        super().__init__(f"{stage}: {reason}")


class UnreadableHeadersError(ShunterError):
    """A consumed record's headers cannot be read (a header name that is not UTF-8)."""


class RetryLater(ShunterError):
    """Raised by a handler: retry this delivery later, after ``delay`` seconds if given.

    ``delay`` is checked here, where the handler's own line raises it: not a number
    (or NaN) is a TypeError/ValueError of that line; a negative delay means now, and
    one beyond ``MAX_DELAY`` (7 days) is cut to it, so a delay taken from a payload
    can never push a retry out of reach or overflow the clock."""

    transient = True
    MAX_DELAY = 7 * 24 * 3600.0

    def __init__(
        self,
        delay: float | None = None,
        reason: str = "retry requested",
        count_attempt: bool = True,
    ) -> None:
        self.delay = None if delay is None else checked_delay(delay)
        # False: a deferral (e.g. an open circuit), not a failure of this attempt; the
        # delivery comes back with the same attempt number, so an outage cannot use up
        # the tiers and dead-letter healthy messages.
        self.count_attempt = count_attempt
        super().__init__(reason)


def checked_delay(delay: object) -> float:
    """A retry delay in seconds, within 0..RetryLater.MAX_DELAY; refuses non-numbers."""
    if isinstance(delay, bool) or not isinstance(delay, int | float):
        raise TypeError(f"a retry delay is a number of seconds, got {type(delay).__name__}")
    try:
        seconds = float(delay)
    except OverflowError:  # an int too large for a float
        seconds = math.inf if delay > 0 else 0.0
    if math.isnan(seconds):
        raise ValueError("a retry delay is a number of seconds, got NaN")
    return min(max(seconds, 0.0), RetryLater.MAX_DELAY)


class DeadLetter(ShunterError):
    """Raised by a handler: send this message straight to the dead-letter topic."""

    def __init__(self, reason: str) -> None:
        self.reason = reason if isinstance(reason, str) else repr(reason)
        super().__init__(self.reason)


class DeliveryTimeout(ShunterError):
    """A delivery ran past its subscriber's timeout."""

    transient = True


class WorkerDied(ShunterError):
    """The worker process running a delivery (``isolation: process``) died."""

    transient = True

    def __init__(self, message: str, signal: str = "", status: int | None = None) -> None:
        self.signal = signal  # "SIGSEGV", ...; empty when the worker exited with a status
        self.status = status  # the exit status, negative for a signal; None if unknown
        super().__init__(message)


class BrokerUnavailable(ShunterError):
    """The Kafka cluster could not be reached."""

    transient = True


class DecodeUnavailable(ShunterError):
    """A payload cannot be decoded *yet*: what it needs (a schema from the registry) is out
    of reach. Nothing is wrong with the message: hold it and decode it again after
    ``retry_after`` seconds; never dead-letter it for this."""

    transient = True

    def __init__(self, reason: str, retry_after: float) -> None:
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(reason)
