"""The bench measures every side of a comparison in both orders within each run, and takes
a side's two passes together."""

from __future__ import annotations

import pytest

from shunter.bench.dispatch import DispatchTiming
from shunter.bench.raw import Timing, both_orders


@pytest.mark.parametrize(
    ("run", "expected"), [(1, ["a", "b", "c", "c", "b", "a"]), (2, ["c", "b", "a", "a", "b", "c"])]
)
def test_each_side_runs_twice_in_one_order_then_the_reverse_alternating_by_run(
    run: int, expected: list[str]
) -> None:
    ran: list[str] = []

    def side(name: str) -> Timing:
        ran.append(name)
        return Timing(messages=100, seconds=1.0 + len(ran), cpu=1.0)  # pass k took 1 + k s

    order, done = both_orders({n: (lambda n=n: side(n)) for n in "abc"}, run)
    assert ran == expected
    assert order == "/".join(expected[:3]) + "+reversed"
    assert set(done) == {"a", "b", "c"}
    # each side's passes together: 200 messages over the seconds of both
    first, second = (k for k, name in enumerate(expected, 1) if name == "a")
    assert done["a"].messages == 200
    assert done["a"].seconds == pytest.approx((1.0 + first) + (1.0 + second))


def test_two_passes_add_up_as_one_measurement() -> None:
    a = DispatchTiming(100, 2.0, 1.0, committed_seconds=2.5, deliveries={"x": {"ok": 3}})
    b = DispatchTiming(
        100, 1.0, 2.0, committed_seconds=1.5, deliveries={"x": {"ok": 2, "fast": 1}, "y": {"ok": 1}}
    )
    both = a.plus(b)
    assert both.messages == 200 and both.seconds == 3.0
    assert both.rate == pytest.approx(200 / 3.0)
    assert both.cpu == pytest.approx((1.0 * 2.0 + 2.0 * 1.0) / 3.0)  # weighted by time
    assert both.committed_seconds == 4.0
    assert both.deliveries == {"x": {"ok": 5, "fast": 1}, "y": {"ok": 1}}
    assert a.deliveries == {"x": {"ok": 3}}  # the passes themselves are left as they were
