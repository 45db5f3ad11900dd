"""How a subscriber's handler is called: inline, on a thread, in a worker process, or
over HTTP. Each builder returns an ``Invoke`` for the runtime."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..config import SubscriberConfig
from ..errors import ConfigError
from ..message import Message
from .runtime import Invoke

Handler = Callable[[Message], Any]


def is_async(handler: Handler) -> bool:
    call = getattr(handler, "__call__", None)  # noqa: B004 - callable objects too
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)


def inline(handler: Handler) -> Invoke:
    """Run the handler on the event loop (an async handler's awaits do not block it)."""
    return handler


def threaded(
    handler: Handler, sub: SubscriberConfig, where: str
) -> tuple[Invoke, ThreadPoolExecutor]:
    """Run a sync handler on a bounded pool of ``concurrency`` threads."""
    if is_async(handler):
        raise ConfigError(
            [f"{where}.isolation: 'thread' is for sync handlers; {sub.caller}'s handler is async"]
        )
    pool = ThreadPoolExecutor(
        max_workers=sub.concurrency, thread_name_prefix=f"shunter-{sub.caller}"
    )

    def invoke(msg: Message) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().run_in_executor(pool, handler, msg)

    return invoke, pool
