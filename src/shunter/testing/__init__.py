"""Helpers for testing code that uses shunter: messages for handler unit tests, and a
dispatcher running in a background thread for integration tests against a broker."""

from .harness import DispatcherThread
from .messages import make_message

__all__ = ["DispatcherThread", "make_message"]
