"""Given `shunter broker` running, when it is stopped by SIGTERM, SIGHUP or SIGINT, or
killed outright, then its broker process is gone and the port is free again."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from shunter.broker.embedded import free_port


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait(predicate: object, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def start(port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "shunter.cli.main", "broker", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert f"listening on 127.0.0.1:{port}" in line, line
    assert not port_free(port)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT],
                         ids=["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_stop_signal_stops_the_broker_and_frees_the_port(sig: signal.Signals) -> None:
    port = free_port()
    proc = start(port)
    with proc:  # a hang fails this test alone: leaving, the process is killed and reaped
        try:
            proc.send_signal(sig)
            out, _ = proc.communicate(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode == 0, out
    assert f"{sig.name}: broker on 127.0.0.1:{port} stopped" in out
    assert wait(lambda: port_free(port)), "the broker still holds its port"


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux only")
def test_a_killed_wrapper_takes_its_broker_with_it() -> None:
    port = free_port()
    proc = start(port)
    with proc:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
    assert wait(lambda: port_free(port)), "the broker outlived shunter broker"
