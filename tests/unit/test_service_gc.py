"""While serving, start-up's objects are frozen out of the collector and generation 0 is
collected less often; a process that embeds a Dispatcher gets its settings back after."""

from __future__ import annotations

import gc

from shunter.service import GC_GEN0_THRESHOLD, _collector_tuned_for_serving


def test_the_collector_is_tuned_while_serving_and_restored_afterwards() -> None:
    before = gc.get_threshold()
    kept = [object() for _ in range(10)]  # noqa: F841 - alive at start-up: frozen
    with _collector_tuned_for_serving():
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, *before[1:])
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
