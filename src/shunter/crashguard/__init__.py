"""Surviving what kills or wedges the process: the in-flight journal and quarantine,
worker supervision, process isolation, the blocked-loop watchdog and crash files."""
