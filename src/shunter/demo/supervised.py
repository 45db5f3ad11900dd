"""``shunter run -c FILE`` as the demo runs it: the real command, supervisor and worker,
in processes of their own (so a dying interpreter is a real one), its log followed line
by line.

The service logs one JSON object per line (``log.format: json``); every line is also
kept, as written, in a log file next to the configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import orjson


@dataclass(frozen=True, slots=True)
class LogLine:
    level: str  # INFO, WARNING, ERROR… ("" for a line that is not JSON)
    logger: str
    message: str


def parse(raw: bytes) -> LogLine:
    """One line of the service's log: a JSON record, or plain text written around logging."""
    text = raw.decode(errors="replace").rstrip("\n")
    with contextlib.suppress(orjson.JSONDecodeError):
        data = orjson.loads(text)
        if isinstance(data, dict):
            return LogLine(
                str(data.get("level", "")), str(data.get("logger", "")), str(data.get("message"))
            )
    return LogLine("", "", text)


class Supervised:
    """One ``shunter run -c config`` (supervised, the default) and its combined output."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str]) -> None:
        self.config = config
        self.log_path = log_path
        self._env = env
        self._process: asyncio.subprocess.Process | None = None
        self._kept: BinaryIO | None = None

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "shunter.cli.main",
            "run",
            "-c",
            str(self.config),
            env={**os.environ, **self._env},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C reaches the demo, which stops it in order
            limit=1 << 20,  # a line may carry a fatal-signal dump of every thread
        )

    async def lines(self) -> AsyncIterator[LogLine]:
        """Every line the service writes, until it exits; each is also kept in the log file."""
        assert self._process is not None and self._process.stdout is not None
        try:
            while raw := await self._process.stdout.readline():
                self._keep(raw)
                yield parse(raw)
        finally:
            if self._kept is not None:
                self._kept.close()
                self._kept = None

    def _keep(self, raw: bytes) -> None:
        if self._kept is None:
            self._kept = open(self.log_path, "ab")  # noqa: SIM115 - closed when the lines end
        self._kept.write(raw)
        self._kept.flush()

    async def stop(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109
        """SIGTERM (the supervisor passes it on: drain, commit, exit 0); the exit status.

        Killed, with everything under it, if it has not exited within ``timeout``.
        """
        process = self._process
        if process is None:
            return 0
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # its own session: the worker too
            return await process.wait()
