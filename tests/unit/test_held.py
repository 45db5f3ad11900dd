"""Held partitions are counted by topic, so the pipeline can let a record of a topic with
nothing held pass at the cost of one lookup: the count must follow every hold, release
and departure, or a record would skip the queue of its held partition."""

from __future__ import annotations

import asyncio
from typing import Any

from shunter.consume.held import NOT_DUE, UNTIL_RELEASED, HeldPartitions


def test_topics_count_the_held_partitions_through_holds_releases_and_departures() -> None:
    async def scenario() -> None:
        reprocessed: list[list[Any]] = []
        held = HeldPartitions(reprocessed.append, lambda n: None)
        held.hold(("fast", 0), "r0", UNTIL_RELEASED, NOT_DUE)
        held.hold(("fast", 0), "r0-again", UNTIL_RELEASED, NOT_DUE)  # one partition still
        held.hold(("fast", 1), "r1", UNTIL_RELEASED, NOT_DUE)
        held.hold(("gifts", 2), "g2", UNTIL_RELEASED, "waiting for the journal")
        assert dict(held.topics) == {"fast": 2, "gifts": 1}
        assert held.takes(("fast", 1), "behind-r1")
        assert not held.takes(("fast", 2), "not held")

        held.release(("fast", 0))
        assert dict(held.topics) == {"fast": 1, "gifts": 1}
        held.release(("fast", 0))  # released twice: counted once
        assert dict(held.topics) == {"fast": 1, "gifts": 1}
        held.forget({("fast", 1), ("gifts", 9)})  # one held, one never was
        assert dict(held.topics) == {"gifts": 1}
        held.release(("gifts", 2))
        assert dict(held.topics) == {} and not held
        assert reprocessed == [["r0-again", "r0"], ["g2"]]

    asyncio.run(scenario())
