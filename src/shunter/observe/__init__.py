"""Metrics, logs, the admin API and the dashboard."""
