"""Creating the topics shunter needs."""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

log = logging.getLogger("shunter.broker")


def ensure_topics(
    settings: dict[str, Any],
    wanted: dict[str, int],
    configs: dict[str, dict[str, str]] | None = None,
    timeout: float = 30.0,
) -> list[str]:
    """Create each missing topic of ``wanted`` (name -> partitions); return those created."""
    admin = AdminClient(settings)
    existing = set(admin.list_topics(timeout=timeout).topics)
    missing = [
        NewTopic(name, partitions, 1, config=(configs or {}).get(name, {}))
        for name, partitions in wanted.items()
        if name not in existing
    ]
    if not missing:
        return []
    created = []
    for name, future in admin.create_topics(missing, operation_timeout=timeout).items():
        try:
            future.result(timeout)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    if created:
        log.info("created topics %s", ", ".join(sorted(created)))
    return created


def existing_topics(settings: dict[str, Any], timeout: float = 10.0) -> set[str]:
    return set(AdminClient(settings).list_topics(timeout=timeout).topics)
