"""Categories and their CEL filters → the subscribers of a message."""

from .router import Route, Router

__all__ = ["Route", "Router"]
