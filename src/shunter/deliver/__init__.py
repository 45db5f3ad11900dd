"""Deliveries to subscribers: isolation, timeouts, ordering lanes and concurrency limits."""

from .runtime import SubscriberRuntime

__all__ = ["SubscriberRuntime"]
