"""shunter: a Kafka message dispatcher.

Consumes many topics in one consumer group, sorts each message into business categories
and delivers it to every subscriber of those categories, each isolated from the others,
with tiered retries, a dead-letter topic and a crash guard.
"""

from .app import Dispatcher
from .config import Config, load_config
from .errors import ConfigError, DeadLetter, RetryLater, ShunterError
from .message import Message

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
