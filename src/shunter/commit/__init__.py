"""Which offsets may be committed: per-partition trackers and the committer."""

from .tracker import OffsetTracker, PartitionTracker

__all__ = ["OffsetTracker", "PartitionTracker"]
