"""Where a delivery goes after its outcome: done, a retry tier, or the dead-letter topic."""

from .route import Destination, route
from .settler import Settler

__all__ = ["Destination", "Settler", "route"]
