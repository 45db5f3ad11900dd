"""The demo's deployment: topics, categories and subscribers, written out as a YAML file.

The YAML is a real shunter configuration, so ``shunter check -c`` and ``shunter replay
-c`` work on it while the demo's broker is up.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from rich.tree import Tree

from ..broker.embedded import CONSUMER_SETTINGS
from ..config import Config
from .stream import GIFT, GUARD, LOTTERY, Plan

GROUP = "shunter-demo"
FILE_NAME = "shunter-demo.yaml"
BUGGY = "guard-effect"
FAST_ATTEMPTS, FAST_DELAY = 3, "200ms"
SLOW_ATTEMPTS, SLOW_DELAY = 2, "1s"
RETRY_PARTITIONS = 3

_HANDLERS = "shunter.demo.handlers"
SUBSCRIBERS: list[dict[str, Any]] = [
    {"caller": "fan-medal", "category": "revenue", "handler": f"{_HANDLERS}:on_fan_medal"},
    {
        "caller": "rank-board",
        "category": "revenue",
        "handler": f"{_HANDLERS}:on_rank_board",
        "isolation": "thread",
        "concurrency": 4,
    },
    {"caller": "anchor-task", "category": "guard", "handler": f"{_HANDLERS}:on_anchor_task"},
    {"caller": BUGGY, "category": "guard", "handler": f"{_HANDLERS}:on_guard_effect"},
]
RUNS_AS = {"fan-medal": "async", "rank-board": "thread", "anchor-task": "async", BUGGY: "sync"}


def config_data(bootstrap: str) -> dict[str, Any]:
    return {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": GROUP,
            "consumer": dict(CONSUMER_SETTINGS),
            "commit_interval": "200ms",
        },
        "topics": {
            GIFT: {"format": "json", "schema": "schemas/gift.json"},
            LOTTERY: {"format": "json"},
            GUARD: {"format": "json"},
        },
        "categories": {
            "revenue": {"topics": [GIFT, LOTTERY]},
            "guard": {"topics": [GUARD], "where": "value.type == 'buy'"},
        },
        "subscribers": SUBSCRIBERS,
        "retry": {
            "fast": {"attempts": FAST_ATTEMPTS, "delay": FAST_DELAY},
            "slow": {"attempts": SLOW_ATTEMPTS, "delay": SLOW_DELAY},
            "partitions": RETRY_PARTITIONS,
        },
        "admin": {"listen": None},
    }


def write(workdir: Path, bootstrap: str) -> Path:
    """Write the YAML and the gift topic's JSON Schema under ``workdir``; return the YAML."""
    schemas = workdir / "schemas"
    schemas.mkdir(parents=True, exist_ok=True)
    schema = resources.files("shunter.demo").joinpath("schemas/gift.json").read_bytes()
    (schemas / "gift.json").write_bytes(schema)
    path = workdir / FILE_NAME
    header = (
        "# Written by `shunter demo`. The broker below is the demo's embedded one: it\n"
        "# lives (memory only) as long as the demo does.\n"
    )
    path.write_text(header + yaml.safe_dump(config_data(bootstrap), sort_keys=False))
    return path


def tree(config: Config) -> Tree:
    """The topology as ``shunter check`` knows it, narrow enough for an 80-column screen."""
    root = Tree(f"[bold]topology[/bold] (consumer group {config.kafka.group_id})")
    for name, category in config.categories.items():
        where = f" where {category.where}" if category.where else ""
        branch = root.add(f"[bold]{name}[/bold] ← {', '.join(category.topics)}{where}")
        for sub in config.subscribers:
            if sub.category == name:
                mode = RUNS_AS.get(sub.caller, sub.isolation)
                branch.add(f"{sub.caller:<13} {mode:<7} {sub.handler or sub.http}")
    retry = config.retry
    root.add(
        f"retries: fast {retry.fast.attempts}x{retry.fast.delay:g}s → slow "
        f"{retry.slow.attempts}x{retry.slow.delay:g}s → {config.dlq_topic}"
    )
    return root


@dataclass(frozen=True, slots=True)
class Expected:
    """One caller's numbers as the stream's plan predicts them."""

    delivered: int
    failed: int
    retried: int
    dead_lettered: int


def expected(plan: Plan) -> dict[str, Expected]:
    """Every caller's numbers, derived from what the stream holds and the retry tiers."""
    tries = 1 + FAST_ATTEMPTS + SLOW_ATTEMPTS  # a message that always fails runs this often
    bad = plan.no_effect_buys
    return {
        "fan-medal": Expected(plan.revenue, 0, 0, 0),
        "rank-board": Expected(plan.revenue, plan.hiccups, plan.hiccups, 0),
        "anchor-task": Expected(plan.guard_buys, 0, 0, 0),
        BUGGY: Expected(plan.guard_buys - bad, bad * tries, bad * (tries - 1), bad),
    }
