"""Surviving what kills or wedges the process: the in-flight journal and quarantine,
worker supervision, process isolation, the blocked-loop watchdog and crash files."""

from .crashfile import describe_current
from .watchdog import start_watchdog

__all__ = ["describe_current", "start_watchdog"]
