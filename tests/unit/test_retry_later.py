"""``RetryLater.delay`` is checked where a handler raises it (issue 10, case 3): a delay
taken from a payload can be anything, and an unchecked one once wedged a partition
(``OverflowError`` in the settler for ``1e308``)."""

from __future__ import annotations

import math
import time

import pytest

import shunter
from shunter.config import parse_config
from shunter.deliver.failure import failure
from shunter.settle import route

WEEK = 7 * 24 * 3600

RETRY = parse_config(
    {
        "topics": {"gift": {}},
        "categories": {"revenue": {"topics": ["gift"]}},
        "subscribers": [{"caller": "medal", "category": "revenue", "handler": "x:y"}],
        "retry": {"fast": {"attempts": 3, "delay": "1s"}, "slow": {"attempts": 5, "delay": "5m"}},
    }
).retry


def test_the_maximum_delay_is_seven_days() -> None:
    assert shunter.RetryLater.MAX_DELAY == WEEK


@pytest.mark.parametrize("delay", [1e308, math.inf, WEEK + 1, 10**400, 2**63])
def test_a_delay_beyond_the_maximum_is_clamped_to_it(delay: float) -> None:
    assert shunter.RetryLater(delay=delay).delay == WEEK


@pytest.mark.parametrize("delay", [-1, -0.5, -1e308])
def test_a_negative_delay_becomes_zero(delay: float) -> None:
    assert shunter.RetryLater(delay=delay).delay == 0


@pytest.mark.parametrize("delay", [0, 0.25, 30, WEEK])
def test_an_ordinary_delay_is_kept(delay: float) -> None:
    got = shunter.RetryLater(delay=delay).delay
    assert got == delay and isinstance(got, float | int)


def test_no_delay_means_the_tier_decides() -> None:
    assert shunter.RetryLater().delay is None
    assert route(RETRY, 1, failure(shunter.RetryLater())).delay == 1.0


def test_nan_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match=r"(?i)nan|finite|delay"):
        shunter.RetryLater(delay=math.nan)


@pytest.mark.parametrize("delay", ["soon", b"30", [1], object()])
def test_a_delay_that_is_not_a_number_is_refused_at_construction(delay: object) -> None:
    with pytest.raises(TypeError):
        shunter.RetryLater(delay=delay)  # type: ignore[arg-type]


@pytest.mark.parametrize("delay", [1e308, math.inf, -5.0])
def test_the_route_of_an_odd_delay_is_within_a_week_and_its_not_before_time_computes(
    delay: float,
) -> None:
    """What the settler does with the delay (``now + int(delay * 1000)``) is finite and
    within a week for every delay a RetryLater can carry."""
    for attempt in (1, 4):  # the fast and the slow tier
        dest = route(RETRY, attempt, failure(shunter.RetryLater(delay=delay)))
        assert dest.tier in ("fast", "slow")
        assert 0 <= dest.delay <= WEEK
        not_before = int(time.time() * 1000) + int(dest.delay * 1000)
        assert not_before <= int(time.time() * 1000) + WEEK * 1000
