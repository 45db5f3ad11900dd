"""The dead-letter flood guard.

A bad deploy makes one caller fail everything; without a guard its whole stream would
pour into the dead-letter topic. Over the last ``window`` settled deliveries of a caller,
when more than ``max_share`` went to the dead-letter topic, the caller is paused on every
instance (``CallerPauses``: its deliveries are set aside in the parked topic, unrun) and a
loud error is logged.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from ..config import FloodGuardConfig

log = logging.getLogger("shunter.flood")


class FloodGuard:
    def __init__(self, config: FloodGuardConfig) -> None:
        self._config = config
        self._settled: dict[str, int] = {}  # caller -> deliveries settled so far
        self._dead: dict[str, deque[int]] = {}  # caller -> their numbers, dead-lettered ones
        # (caller, reason): pauses the caller group-wide (CallerPauses.pause_soon)
        self.pause: Callable[[str, str], None] | None = None
        self.tripped: set[str] = set()

    def succeeded(self, caller: str, count: int) -> None:
        """``count`` deliveries of ``caller`` settled without a dead letter."""
        self._settled[caller] = self._settled.get(caller, 0) + count

    def observe(self, caller: str, dead_lettered: bool) -> None:
        # A success costs one counter: the window is only looked at on a dead letter.
        n = self._settled[caller] = self._settled.get(caller, 0) + 1
        if not dead_lettered:
            return
        window = self._config.window
        dead = self._dead.setdefault(caller, deque())
        dead.append(n)
        while dead[0] <= n - window:
            dead.popleft()
        if n < window:
            return
        share = len(dead) / window
        if share > self._config.max_share and caller not in self.tripped:
            self._trip(caller, share)

    def _trip(self, caller: str, share: float) -> None:
        self.tripped.add(caller)
        if self._config.action == "continue":
            log.error(
                "DEAD-LETTER FLOOD: %.0f%% of caller %s's last %d deliveries were "
                "dead-lettered (continuing as configured)",
                share * 100,
                caller,
                self._config.window,
            )
            return
        log.critical(
            "DEAD-LETTER FLOOD: %.0f%% of caller %s's last %d deliveries were "
            "dead-lettered; caller %s is PAUSED on every instance (its messages wait in "
            "the parked topic). "
            "Fix the handler, then resume it through the admin API.",
            share * 100,
            caller,
            self._config.window,
            caller,
        )
        if self.pause is not None:
            self.pause(caller, f"dead-letter flood: {share:.0%} of the last deliveries")

    def reset(self, caller: str) -> None:
        self.tripped.discard(caller)
        self._settled.pop(caller, None)
        self._dead.pop(caller, None)
