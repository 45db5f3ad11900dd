"""A Dispatcher serving on a background thread, for integration tests."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from ..app import Dispatcher


class DispatcherThread:
    """Run ``app.serve()`` on its own event loop in a thread; ``stop()`` drains and commits.

    >>> with DispatcherThread(app) as running:
    ...     running.wait_for(lambda: len(seen) == 100)
    """

    def __init__(self, app: Dispatcher, ready_timeout: float = 60.0) -> None:
        self.app = app
        self._ready_timeout = ready_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="shunter-test", daemon=True)
        self._started = threading.Event()
        self.error: BaseException | None = None

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._started.set()
            await self.app.serve(self._stop)

        try:
            asyncio.run(main())
        except BaseException as exc:
            self.error = exc
            self._started.set()

    def start(self) -> DispatcherThread:
        self._thread.start()
        self._started.wait()
        deadline = time.monotonic() + self._ready_timeout
        while time.monotonic() < deadline:
            service = self.app.service
            if self.error is not None:
                raise RuntimeError("dispatcher failed to start") from self.error
            if service is not None and service.ready.is_set():
                return self
            time.sleep(0.02)
        raise TimeoutError("dispatcher did not become ready")

    @property
    def assigned(self) -> bool:
        pipeline = self.app.service.pipeline if self.app.service else None
        return bool(pipeline and pipeline.tracker.partitions)

    def wait_for(self, predicate: Any, timeout: float = 60.0, interval: float = 0.05) -> None:
        """Wait until ``predicate()`` is true; AssertionError on timeout or dispatcher death."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.error is not None:
                raise AssertionError("dispatcher died") from self.error
            if predicate():
                return
            time.sleep(interval)
        raise AssertionError(f"condition not met within {timeout}s")

    def stop(self, timeout: float = 60.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("dispatcher did not stop")
        if self.error is not None:
            raise RuntimeError("dispatcher failed") from self.error

    def __enter__(self) -> DispatcherThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
