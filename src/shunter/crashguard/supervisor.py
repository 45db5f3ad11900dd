"""``shunter run`` supervises its worker: an unclean death is followed by a restart.

A worker that made progress since it started (it committed offsets: it touches a
progress file, see ``PROGRESS_ENV``) is restarted at once: its death says nothing of a
crash loop. One that made none backs off (0.5 s doubling to 30 s). A crash loop
ends because the crash guard quarantines the message that causes it; as a last resort,
more than ``max_restarts`` deaths within ten minutes stop the supervisor with status 1
so an outer supervisor (systemd, Kubernetes) sees the failure. SIGTERM/SIGINT are
passed to the worker, which drains, commits and exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from types import FrameType

from . import crashfile
from .guard import LAST_EXIT_ENV, LAST_STACK_ENV

# The file a worker touches when it commits progress (at most once a second).
PROGRESS_ENV = "SHUNTER_PROGRESS_FILE"
_MAX_STACK = 8_192  # characters of the dying stack handed to the next worker

log = logging.getLogger("shunter.supervisor")

_WINDOW = 600.0
_HEALTHY = 60.0


def describe_exit(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exited with status {status}"


def _die_with_parent(supervisor: int) -> Callable[[], None] | None:
    """What the worker runs before exec: ask for SIGTERM when the supervisor dies (Linux).

    A supervisor killed by SIGKILL (or the OOM killer) cannot pass anything on; without
    this its worker would run on orphaned, and the next supervisor would start a second
    one beside it. SIGTERM makes the orphan drain, commit and exit like any stop. prctl
    is looked up here, before the fork: the child only calls it (no import, no lock).
    """
    if sys.platform != "linux":
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def in_child() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != supervisor:  # it died before prctl: nothing will signal us
            os._exit(1)

    return in_child


def supervise(worker_args: list[str], max_restarts: int = 10, crash_dir: str | None = None) -> int:
    """Run ``shunter <worker_args>`` in a child process until it exits cleanly."""
    before_exec = _die_with_parent(os.getpid())
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    deaths: deque[float] = deque()
    backoff = 0.5
    last_exit = last_stack = ""
    progress = _progress_file(crash_dir)
    while True:
        env = {**os.environ, LAST_EXIT_ENV: last_exit, LAST_STACK_ENV: last_stack}
        if progress is not None:
            env[PROGRESS_ENV] = progress
        child = subprocess.Popen(
            [sys.executable, "-m", "shunter.cli.main", *worker_args],
            env=env,
            preexec_fn=before_exec,
        )
        started, started_at = time.monotonic(), time.time()
        status = child.wait()
        if status == 0 or stopping:
            return 0 if status in (0, -signal.SIGTERM, -signal.SIGINT) else status
        last_exit = describe_exit(status)
        last_stack = ""
        for path, dump in crashfile.leftovers(crash_dir) if crash_dir else []:
            log.error("the worker's fatal-signal dump (%s):\n%s", path, dump)
            last_stack = dying_stack(dump)
        now = time.monotonic()
        if now - started > _HEALTHY:
            backoff = 0.5
        if _touched_since(progress, started_at):
            backoff = 0.0  # it moved on before it died: start again at once
        deaths.append(now)
        while deaths and now - deaths[0] > _WINDOW:
            deaths.popleft()
        if len(deaths) > max_restarts:
            log.critical(
                "worker %s; %d deaths within %.0f minutes: giving up",
                last_exit,
                len(deaths),
                _WINDOW / 60,
            )
            return 1
        log.error("worker %s; restarting in %.1fs (restart %d)", last_exit, backoff, len(deaths))
        deadline = time.monotonic() + backoff
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.05)
        if stopping:
            return 0
        backoff = min(max(backoff * 2, 0.5), 30.0)


def dying_stack(dump: str) -> str:
    """The dying thread's stack from a faulthandler dump (its "Current thread" section
    first, then the others), bounded: what the quarantined record carries."""
    body = dump.split(crashfile.HEADER_END, 1)[-1].strip()
    sections = body.split("\n\n")
    current = [s for s in sections if "Current thread" in s or s.startswith("Fatal Python")]
    others = [s for s in sections if s not in current]
    text = "\n\n".join(current + others)
    return text if len(text) <= _MAX_STACK else text[:_MAX_STACK] + "\n..."


def _progress_file(crash_dir: str | None) -> str | None:
    if crash_dir is None:
        return None
    with contextlib.suppress(OSError):
        os.makedirs(crash_dir, exist_ok=True)
        path = os.path.join(crash_dir, f"progress-{os.getpid()}")
        open(path, "a").close()
        return path
    return None


def _touched_since(path: str | None, since: float) -> bool:
    if path is None:
        return False
    try:
        return os.stat(path).st_mtime > since
    except OSError:
        return False


def touch_progress() -> None:
    """The worker moved on (it committed offsets): tell the supervisor, if any."""
    path = os.environ.get(PROGRESS_ENV)
    if path:
        with contextlib.suppress(OSError):
            os.utime(path)
