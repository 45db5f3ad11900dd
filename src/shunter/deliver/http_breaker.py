"""Flow control for one HTTP subscriber: a circuit breaker and a rate limiter.

Circuit breaker: ``closed`` → after ``failures`` consecutive transient failures → ``open``:
no request is made, deliveries go to the retry tier until the cool-down ends → ``half-open``:
one delivery is the probe while the others wait for its result; a successful probe closes
the circuit, a failed one opens it again for another cool-down. Results of requests sent
before the last change of state are ignored (``generation``), so a slow straggler cannot
reopen a circuit that a probe has just closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger("shunter.deliver.http")

CLOSED, HALF_OPEN, OPEN = "closed", "half-open", "open"
STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class Refused(Exception):
    """The circuit is open: retry after ``delay`` seconds, without calling the endpoint."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        super().__init__(delay)


class CircuitBreaker:
    def __init__(
        self,
        caller: str,
        where: str,
        failures: int,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.caller = caller
        self.where = where  # the endpoint, as logs may show it
        self.failures = failures
        self.cooldown = cooldown
        self.state = CLOSED
        self.generation = 0
        self.opened = 0  # how many times the circuit opened (for tests and metrics)
        self._clock = clock
        self._consecutive = 0
        self._open_until = 0.0
        self._probe_done: asyncio.Event | None = None
        self._last_failure = ""

    async def admit(self) -> int:
        """Wait until a request may go out; return its generation, or raise ``Refused``."""
        while True:
            if self.state == OPEN:
                left = self._open_until - self._clock()
                if left > 0:
                    raise Refused(left)
                self._change(HALF_OPEN, "cool-down over, sending a probe")
                self._probe_done = asyncio.Event()
                return self.generation
            if self.state == CLOSED:
                return self.generation
            assert self._probe_done is not None
            await self._probe_done.wait()  # cancellable: the event is shared, not consumed

    def succeeded(self, generation: int) -> None:
        if generation != self.generation:
            return
        self._consecutive = 0
        if self.state == HALF_OPEN:
            self._change(CLOSED, "probe succeeded")

    def failed(self, generation: int, what: str) -> None:
        if generation != self.generation:
            return
        self._last_failure = what
        if self.state == HALF_OPEN:
            self._open("probe failed")
            return
        self._consecutive += 1
        if self._consecutive >= self.failures:
            self._open(f"{self._consecutive} consecutive failures")

    def _open(self, why: str) -> None:
        self._open_until = self._clock() + self.cooldown
        self.opened += 1
        self._change(
            OPEN,
            f"{why} (last: {self._last_failure}); deliveries go to the retry "
            f"tier for {self.cooldown:g}s without calling the endpoint",
        )

    def _change(self, state: str, why: str) -> None:
        self.state = state
        self.generation += 1
        self._consecutive = 0
        level = logging.WARNING if state == OPEN else logging.INFO
        log.log(
            level,
            "caller %s: circuit %s: %s (%s)",
            self.caller,
            state,
            why,
            self.where,
            extra={"caller": self.caller},
        )
        if state != HALF_OPEN and self._probe_done is not None:
            self._probe_done.set()
            self._probe_done = None


class RateLimiter:
    """At most ``rate`` requests per second, evenly spaced (no bursts): request *n* starts
    no earlier than ``n / rate`` seconds after the first of a busy period."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 1.0 / rate
        self._clock = clock
        self._next = 0.0

    def reserve(self) -> float:
        """Take the next slot; return how long to wait for it (0 if it is now)."""
        now = self._clock()
        start = max(now, self._next)
        self._next = start + self.interval
        return start - now
