"""The Kafka source: one consumer group over all topics, batches, pause/resume, rebalance."""

from .source import KafkaSource, SourceHandler

__all__ = ["KafkaSource", "SourceHandler"]
