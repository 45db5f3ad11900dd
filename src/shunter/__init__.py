"""shunter: a Kafka message dispatcher.

Consumes many topics in one consumer group, sorts each message into business categories
and delivers it to every subscriber of those categories, each isolated from the others,
with tiered retries, a dead-letter topic and a crash guard.
"""

from ._native import choose

# Before anything imports the record path: compiled (mypyc, see setup.py) or from source.
BUILD = choose()

from .app import Dispatcher  # noqa: E402
from .config import Config, load_config  # noqa: E402
from .errors import ConfigError, DeadLetter, RetryLater, ShunterError  # noqa: E402
from .message import Message  # noqa: E402

__all__ = [
    "Config",
    "ConfigError",
    "DeadLetter",
    "Dispatcher",
    "Message",
    "RetryLater",
    "ShunterError",
    "load_config",
]
__version__ = "0.1.0"
