"""``fanout-3`` and ``fanout-3-failing``: one category, three in-process subscribers.

Every delivery goes the whole path: decode, JSON Schema validation, classification,
delivery to three no-op async handlers, settling and committing. ``fanout-3`` compares it
with the raw loop over the same topic, and with the floor loop: the raw loop plus only the
schema check and the three handler calls, the most any in-process dispatcher could do.
``fanout-3-failing`` makes one subscriber fail on 1% of the messages (they go to the fast
retry tier, whose delay is long enough that no retry runs during the measurement) and
compares it with the all-success run, in which that subscriber runs the same handler and
makes the same test on every message, one that never holds: the two sides differ only in
what shunter does with the failures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..message import Message
from . import events
from .context import BenchContext, Dataset
from .dispatch import DispatchTiming, Handler, Probe, Subscriber, run_dispatcher
from .raw import both_orders, floor_work, raw_loop

MESSAGES = 200_000
PARTITIONS = 6
USERS = 20_000
FAIL_EVERY = 100  # the failing subscriber raises on offsets divisible by this: 1%
# A fast tier this slow keeps retries out of the measured span (a not-yet-due retry
# partition is paused, never slept on, so this costs nothing while waiting).
RETRY = {"fast": {"attempts": 3, "delay": "1h"}}


def gift_dataset(ctx: BenchContext) -> Dataset:
    """The gift topic both fan-out scenarios read (produced once per broker)."""
    count = ctx.count(MESSAGES)
    return ctx.dataset(f"gift-{count}", PARTITIONS, lambda: events.gift_events(count, USERS))


class Calls:
    """Handler calls, counted by the handlers themselves (not by shunter's statistics)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


def noop(probe: Probe | None = None, calls: Calls | None = None) -> Handler:
    """An async handler that does nothing but count its calls in ``calls`` (if given) and
    stamp ``probe`` (if given) on its first delivery."""
    if probe is None and calls is None:

        async def nothing(msg: Message) -> None:
            pass

        return nothing

    async def counted(msg: Message) -> None:
        if calls is not None:
            calls.n += 1
        if probe is not None and not probe.wall:
            probe.start()

    return counted


def failing(every: int = FAIL_EVERY, calls: Calls | None = None, fail: bool = True) -> Handler:
    """An async handler that raises on one offset in ``every`` (counting its calls); with
    ``fail`` False it makes the same test on every call, one that never holds."""
    count = calls if calls is not None else Calls()
    hit = 0 if fail else every  # an offset modulo ``every`` is never ``every``

    async def sometimes(msg: Message) -> None:
        count.n += 1
        if msg.offset % every == hit:
            raise RuntimeError(f"bench: planned failure at offset {msg.offset}")

    return sometimes


def three(
    probe: Probe, fail: bool = False, calls: Calls | None = None, test: bool = False
) -> list[Subscriber]:
    """medal, rank and task; task fails on 1 % (``fail``), or makes the failing handler's
    test without failing (``test``), or does nothing but count."""
    third = failing(calls=calls, fail=fail) if fail or test else noop(calls=calls)
    return [
        Subscriber("medal", noop(probe, calls)),
        Subscriber("rank", noop(calls=calls)),
        Subscriber("task", third),
    ]


def served(
    ctx: BenchContext,
    data: Dataset,
    name: str,
    calls: Calls | None = None,
    fail: bool = False,
    config: dict[str, Any] | None = None,
    test: bool = False,
) -> DispatchTiming:
    """One pass of shunter over ``data`` with the three subscribers (see ``three``), a
    fresh probe each."""
    probe = Probe()
    subscribers = three(probe, fail=fail, calls=calls, test=test)
    return run_dispatcher(ctx, data, name, subscribers, probe, RETRY, config=config)


def fanout_3(ctx: BenchContext) -> dict[str, Any]:
    data = gift_dataset(ctx)
    calls, floor_calls = Calls(), Calls()
    # The floor: the ceiling of any in-process Python dispatcher on this machine (see
    # floor_work). Each side is measured twice, in both orders (see both_orders).
    sides: dict[str, Callable[[], Any]] = {
        "raw": lambda: raw_loop(ctx, data),
        "floor": lambda: raw_loop(
            ctx, data, work=floor_work(events.GIFT_SCHEMA, 3, floor_calls), name="floor"
        ),
        "shunter": lambda: served(ctx, data, "fanout3", calls),
    }
    order, done = both_orders(sides, ctx.run)
    raw, floor, shunter = done["raw"], done["floor"], done["shunter"]
    return {
        "order": order,
        "handler_calls": calls.n,
        "floor_handler_calls": floor_calls.n,
        "messages": data.count,
        "passes_per_side": 2,  # handler calls and deliveries count both
        "partitions": len(data.ends),
        "subscribers": 3,
        "raw_msgs_per_s": round(raw.rate),
        "shunter_msgs_per_s": round(shunter.rate),
        "ratio": round(shunter.rate / raw.rate, 3),
        "floor_msgs_per_s": round(floor.rate),
        "floor_ratio": round(floor.rate / raw.rate, 3),
        "shunter_of_floor": round(shunter.rate / floor.rate, 3),
        "raw_seconds": round(raw.seconds, 3),
        "shunter_seconds": round(shunter.seconds, 3),
        # Until every offset was committed too (up to one commit interval later).
        "shunter_committed_seconds": round(shunter.committed_seconds, 3),
        "shunter_of_floor_committed": round(
            shunter.messages / shunter.committed_seconds / floor.rate, 3
        ),
        "raw_cpu": round(raw.cpu, 2),
        "shunter_cpu": round(shunter.cpu, 2),
        # Per thread group, CPU ÷ wall over the measured span (see bench/threads.py).
        **shunter.cpu_shares("shunter_"),
        "deliveries": shunter.outcomes(),
    }


def fanout_3_failing(ctx: BenchContext) -> dict[str, Any]:
    data = gift_dataset(ctx)
    ok_calls, fail_calls = Calls(), Calls()
    sides: dict[str, Callable[[], DispatchTiming]] = {
        "all-success": lambda: served(ctx, data, "fanout3ok", ok_calls, test=True),
        "failing": lambda: served(ctx, data, "fanout3fail", fail_calls, fail=True),
    }
    order, done = both_orders(sides, ctx.run)
    baseline, failed = done["all-success"], done["failing"]
    failures = 2 * sum(-(-end // FAIL_EVERY) for end in data.ends.values())
    return {
        "order": order,
        "handler_calls": fail_calls.n,
        "all_success_handler_calls": ok_calls.n,
        "messages": data.count,
        "passes_per_side": 2,  # handler calls, deliveries and expected failures count both
        "partitions": len(data.ends),
        "subscribers": 3,
        "failing_share": 1 / FAIL_EVERY,
        "expected_failures": failures,
        "shunter_msgs_per_s": round(failed.rate),
        "all_success_msgs_per_s": round(baseline.rate),
        "ratio": round(failed.rate / baseline.rate, 3),
        "shunter_seconds": round(failed.seconds, 3),
        "all_success_seconds": round(baseline.seconds, 3),
        "shunter_cpu": round(failed.cpu, 2),
        **failed.cpu_shares("failing_"),
        **baseline.cpu_shares("all_success_"),
        # What each failure cost on each thread group (and the broker): CPU seconds of the
        # failing side less the all-success side's, over the failures, in µs. The main
        # thread's share is what a failure slows the dispatcher by; the others' share the
        # cores with it.
        **_per_failure(failed, baseline, failures),
        "deliveries": failed.outcomes(),
    }


def _per_failure(
    failed: DispatchTiming, baseline: DispatchTiming, failures: int
) -> dict[str, float]:
    if not failures or not failed.threads or not baseline.threads:
        return {}
    return {
        f"{group}_cpu_us_per_failure": round(
            (seconds - baseline.threads.get(group, 0.0)) / failures * 1e6, 1
        )
        for group, seconds in sorted(failed.threads.items())
    }
