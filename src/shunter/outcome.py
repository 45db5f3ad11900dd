"""How a delivery ends, as a value.

A handler's return or exception becomes one of these; ``settle.route`` is the one
function that turns an outcome into where the message goes next.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Succeeded:
    pass


SUCCEEDED = Succeeded()


# Failed and DeadLettered are built for every failed delivery. Not frozen: a frozen
# dataclass's __init__ sets each field through object.__setattr__ (~0.3 µs apiece);
# nothing changes an outcome once built all the same. Their __init__ is written out so
# that the compiled build runs a compiled one (see settle.headers.FailureInfo).
@dataclass(slots=True)
class Failed:
    """The handler raised, timed out or its worker died: retry through the tiers."""

    error_type: str
    error: str
    traceback: str
    delay: float | None = None  # a RetryLater's own delay overrides the tier's
    stage: str = "deliver"
    signal: str = ""  # the signal that killed the worker process, e.g. SIGSEGV
    counts: bool = True  # False: a deferral that does not use up an attempt

    def __init__(
        self,
        error_type: str,
        error: str,
        traceback: str,
        delay: float | None = None,
        stage: str = "deliver",
        signal: str = "",
        counts: bool = True,
    ) -> None:
        self.error_type = error_type
        self.error = error
        self.traceback = traceback
        self.delay = delay
        self.stage = stage
        self.signal = signal
        self.counts = counts


@dataclass(slots=True)
class DeadLettered:
    """Straight to the dead-letter topic: DeadLetter raised, message rejected, crash."""

    reason: str
    error_type: str
    traceback: str = ""
    stage: str = "deliver"

    def __init__(
        self, reason: str, error_type: str, traceback: str = "", stage: str = "deliver"
    ) -> None:
        self.reason = reason
        self.error_type = error_type
        self.traceback = traceback
        self.stage = stage


Outcome = Succeeded | Failed | DeadLettered
