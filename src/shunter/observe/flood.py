"""The dead-letter flood guard.

A bad deploy makes one caller fail everything; without a guard its whole stream would
pour into the dead-letter topic. Over the last ``window`` settled deliveries of a caller,
when more than ``max_share`` went to the dead-letter topic, the caller is paused (its
deliveries are set aside in the slow tier, unrun) and a loud error is logged.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from ..config import FloodGuardConfig

log = logging.getLogger("shunter.flood")


class FloodGuard:
    def __init__(self, config: FloodGuardConfig) -> None:
        self._config = config
        self._settled: dict[str, int] = {}  # caller -> deliveries settled so far
        self._dead: dict[str, deque[int]] = {}  # caller -> their numbers, dead-lettered ones
        self.runtimes: dict[str, Any] = {}
        self.park: Any = None  # Settler.park: where a paused caller's deliveries wait
        self.on_pause: Any = None  # (caller, reason): records the pause so it survives restarts
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
            "dead-lettered; caller %s is PAUSED (its messages wait in the slow tier). "
            "Fix the handler, then resume it through the admin API.",
            share * 100,
            caller,
            self._config.window,
            caller,
        )
        runtime = self.runtimes.get(caller)
        if runtime is not None:
            for msg in runtime.pause():
                self.park(msg, "caller paused by the dead-letter flood guard")
        if self.on_pause is not None:
            self.on_pause(caller, f"dead-letter flood: {share:.0%} of the last deliveries")

    def reset(self, caller: str) -> None:
        self.tripped.discard(caller)
        self._settled.pop(caller, None)
        self._dead.pop(caller, None)
