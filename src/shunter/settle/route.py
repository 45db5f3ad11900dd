"""The one function that turns an outcome into where the message goes next."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import RetryConfig
from ..outcome import DeadLettered, Failed, Outcome, Succeeded


@dataclass(slots=True)  # built for every failure: as outcome.Failed
class Destination:
    tier: str  # done | fast | slow | dlq
    next_attempt: int
    delay: float

    def __init__(self, tier: str, next_attempt: int, delay: float) -> None:
        self.tier = tier
        self.next_attempt = next_attempt
        self.delay = delay


DONE = Destination("done", 0, 0.0)


def route(retry: RetryConfig, attempt: int, outcome: Outcome) -> Destination:
    """Attempt 1 is the first delivery; ``fast.attempts`` more run in the fast tier, then
    ``slow.attempts`` in the slow tier; a failure after that is dead-lettered."""
    if isinstance(outcome, Succeeded):
        return DONE
    if isinstance(outcome, DeadLettered):
        return Destination("dlq", attempt, 0.0)
    assert isinstance(outcome, Failed)
    if not outcome.counts:  # a deferral: the same attempt again, from its own tier
        tier = "slow" if attempt > 1 + retry.fast.attempts else "fast"
        tier_delay = retry.slow.delay if tier == "slow" else retry.fast.delay
        delay = outcome.delay if outcome.delay is not None else tier_delay
        return Destination(tier, attempt, delay)
    if attempt <= retry.fast.attempts:
        tier, delay = "fast", retry.fast.delay
    elif attempt <= retry.fast.attempts + retry.slow.attempts:
        tier, delay = "slow", retry.slow.delay
    else:
        return Destination("dlq", attempt, 0.0)
    if outcome.delay is not None:
        delay = outcome.delay
    return Destination(tier, attempt + 1, delay)
