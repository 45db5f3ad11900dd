"""The Dispatcher: configuration plus code-registered handlers → a running service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, SubscriberConfig, load_config, parse_config
from .errors import ConfigError
from .loader import import_object
from .message import Message

log = logging.getLogger("shunter")

Handler = Callable[[Message], Any]


@dataclass
class Registration:
    caller: str
    category: str
    handler: Handler
    options: dict[str, Any] = field(default_factory=dict)


class Dispatcher:
    """A shunter deployment.

    The YAML lists every subscriber; code may supply the handler of a listed caller, or
    add a subscriber with ``@app.subscriber(category, caller=...)``.
    """

    def __init__(self, config: Config | str | Path | dict[str, Any] | None = None) -> None:
        if isinstance(config, Config):
            self._config = config
        elif isinstance(config, dict):
            self._config = parse_config(config)
        elif config is None:
            self._config = parse_config({})
        else:
            self._config = load_config(config)
        self._registrations: dict[str, Registration] = {}
        self.service: Any = None

    def subscriber(
        self, category: str, *, caller: str, **options: Any
    ) -> Callable[[Handler], Handler]:
        """Register the decorated function as the handler of ``caller``.

        ``options`` are the subscriber keys of the YAML (ordering, concurrency, timeout,
        isolation); a caller the YAML lists keeps the YAML's settings.
        """

        def register(handler: Handler) -> Handler:
            if caller in self._registrations:
                raise ConfigError([f"caller {caller!r} is registered twice"])
            self._registrations[caller] = Registration(caller, category, handler, options)
            return handler

        return register

    @property
    def config(self) -> Config:
        """The configuration with the code-registered subscribers merged in."""
        listed = {s.caller for s in self._config.subscribers}
        extra = [
            {"caller": r.caller, "category": r.category, **r.options}
            for r in self._registrations.values()
            if r.caller not in listed
        ]
        if not extra:
            return self._config
        data = self._config.model_dump(by_alias=True, exclude={"base_dir"})
        data["subscribers"] = [*data["subscribers"], *extra]
        return parse_config(data, base_dir=self._config.base_dir)

    def handlers(self) -> dict[str, Handler | None]:
        """caller -> handler (None for HTTP subscribers); import errors are ConfigErrors."""
        out: dict[str, Handler | None] = {}
        problems: list[str] = []
        for i, sub in enumerate(self.config.subscribers):
            registered = self._registrations.get(sub.caller)
            if sub.http is not None:
                out[sub.caller] = None
            elif registered is not None:
                out[sub.caller] = registered.handler
            elif sub.handler is not None:
                try:
                    out[sub.caller] = _callable(
                        import_object(sub.handler, f"subscribers[{i}].handler"), sub, i
                    )
                except ConfigError as exc:
                    problems.extend(exc.problems)
            else:
                problems.append(
                    f"subscribers[{i}]: caller {sub.caller!r} has neither handler "
                    "nor http, and no handler was registered in code"
                )
        if problems:
            raise ConfigError(problems)
        return out

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT; drain, commit and return."""
        asyncio.run(self.serve())

    async def serve(self, stop: asyncio.Event | None = None) -> None:
        from .service import Service

        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
                loop.add_signal_handler(sig, stop.set)
        self.service = Service(self.config, self.handlers())
        await self.service.run(stop)


def _callable(obj: Any, sub: SubscriberConfig, index: int) -> Handler:
    if not callable(obj):
        raise ConfigError([f"subscribers[{index}].handler: {sub.handler} is not callable"])
    return obj  # type: ignore[no-any-return]
