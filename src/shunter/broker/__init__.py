"""The embedded development broker and topic administration."""
