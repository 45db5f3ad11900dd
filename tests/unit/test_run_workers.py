"""``shunter run``'s worker count: the ``kafka.workers`` key, when several workers are
refused, and each worker's admin port (the listen port plus its index)."""

from __future__ import annotations

from typing import Any

import pytest

from shunter.cli.run import _as_worker, _workers_problem
from shunter.config import parse_config
from shunter.errors import ConfigError


def config(**kafka: Any) -> Any:
    return parse_config(
        {
            "kafka": {"group_id": "g", **kafka},
            "topics": {"gift": {}},
            "categories": {"revenue": {"topics": ["gift"]}},
            "subscribers": [{"caller": "a", "category": "revenue", "handler": "m:f"}],
            "admin": {"listen": "127.0.0.1:8080"},
        }
    )


def test_workers_defaults_to_one_and_a_bad_count_is_refused_with_its_key_path() -> None:
    assert config().kafka.workers == 1
    assert config(workers=4).kafka.workers == 4
    with pytest.raises(ConfigError) as caught:
        config(workers=0)
    assert "kafka.workers:" in str(caught.value)


def test_several_workers_need_the_supervisor_and_a_broker_of_their_own() -> None:
    kafka = config(bootstrap_servers="127.0.0.1:9092")
    assert _workers_problem(2, False, kafka) is None
    assert _workers_problem(1, True, kafka) is None
    assert "--no-supervise" in (_workers_problem(2, True, kafka) or "")
    assert "kafka.bootstrap_servers" in (_workers_problem(2, False, config()) or "")


def test_each_worker_serves_its_admin_api_on_the_listen_port_plus_its_index() -> None:
    base = config(bootstrap_servers="127.0.0.1:9092")
    assert _as_worker(base, 0).admin.listen == "127.0.0.1:8080"
    assert _as_worker(base, 1).admin.listen == "127.0.0.1:8081"
    assert _as_worker(base, 3).admin.listen == "127.0.0.1:8083"
    assert _as_worker(base, 3).kafka == base.kafka, "nothing else changes"
