"""``shunter run`` supervises its workers: an unclean death is followed by a restart.

There is one worker process by default; ``--workers N`` (``kafka.workers``) runs N, each
a member of the consumer group with its own crash guard, each restarted on its own by the
rules below. A worker that made progress since it started (it committed offsets: it touches a
progress file, see ``PROGRESS_ENV``) is restarted at once: its death says nothing of a
crash loop. One that made none backs off (0.5 s doubling to 30 s). A crash loop
ends because the crash guard quarantines the message that causes it; as a last resort,
more than ``max_restarts`` deaths within ten minutes stop the supervisor with status 1
so an outer supervisor (systemd, Kubernetes) sees the failure. SIGTERM/SIGINT are
passed to every worker, which drains, commits and exits 0.

A worker's blocked event loop is reported by its own watchdog thread, unless the call
blocking it holds the GIL (a regular expression backtracking on a hostile payload, a C
extension that never releases it): that stops the watchdog too, and the worker would say
nothing until faulthandler's timer ends it (watchdog.py), a minute or more later. So the
supervisor watches each worker's watchdog heartbeat (``crashfile.beat``); silent for
``silent_after`` seconds (``crash_guard.loop_blocked_after``), the worker is asked for
every thread's stack (SIGUSR2: faulthandler writes them from C, with no GIL), and the
supervisor logs them, the event loop's first: the blocking line within seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

from . import crashfile
from .guard import LAST_EXIT_ENV, LAST_STACK_ENV
from .watchdog import BLOCKED_MARK

# The file a worker touches when it commits progress (at most once a second).
PROGRESS_ENV = "SHUNTER_PROGRESS_FILE"
_MAX_STACK = 8_192  # characters of the dying stack handed to the next worker

log = logging.getLogger("shunter.supervisor")

_WINDOW = 600.0
# The first line of a dump faulthandler's timer wrote (``dump_traceback_later``).
_TIMEOUT = re.compile(r"^Timeout \((\d+):(\d\d):(\d\d)(?:\.\d+)?\)!$", re.MULTILINE)
_HEALTHY = 60.0
_STACKS_WAIT = 1.0  # seconds a worker's stacks are waited for (see ``_stacks_of``)


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


@dataclass
class _Worker:
    """One worker process and its own restart state: deaths, backoff, what it left."""

    index: int
    args: list[str]
    progress: str | None
    child: subprocess.Popen[bytes] | None = None
    started: float = 0.0  # monotonic
    started_at: float = 0.0  # wall clock, for the progress file's mtime
    restart_at: float = 0.0  # monotonic; when a dead worker starts again
    backoff: float = 0.5
    deaths: deque[float] = field(default_factory=deque)
    last_exit: str = ""
    last_stack: str = ""
    status: int | None = None  # set once it exited for good
    beat: float = 0.0  # its watchdog's heartbeat, as last seen (wall clock)
    silent: bool = False  # its silence was reported

    def name(self, count: int) -> str:
        return "worker" if count == 1 else f"worker {self.index}"


def supervise(
    worker_args: list[str],
    max_restarts: int = 10,
    crash_dir: str | None = None,
    workers: int = 1,
    silent_after: float = 0.0,
) -> int:
    """Run ``workers`` processes ``shunter <worker_args> [--worker-index i]`` until they
    exit cleanly; each is restarted on its own after an unclean death.

    With one worker its arguments are ``worker_args`` as given; with more, worker ``i``
    (0-based) gets ``--worker-index i`` (its admin API listens on the port plus ``i``).
    A worker that exits cleanly by itself (SIGTERM sent to it alone) is not restarted; the
    supervisor returns once every worker has exited, or, when one of them died more than
    ``max_restarts`` times within ten minutes, stops the others and returns 1. A worker
    whose watchdog is silent for ``silent_after`` seconds has its stacks logged (0: never;
    see the module's docstring).
    """
    before_exec = _die_with_parent(os.getpid())
    stopping = False
    pool = [
        _Worker(
            i,
            worker_args if workers == 1 else [*worker_args, "--worker-index", str(i)],
            _progress_file(crash_dir, "" if workers == 1 else f"-{i}"),
        )
        for i in range(workers)
    ]

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for worker in pool:
            if worker.child is not None and worker.child.poll() is None:
                worker.child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    watch_every = min(1.0, silent_after / 2)
    watched = 0.0
    while True:
        now = time.monotonic()
        if silent_after > 0 and crash_dir is not None and now - watched >= watch_every:
            watched = now
            for worker in pool:
                if worker.child is not None:
                    _watch(worker, crash_dir, silent_after, workers)
        for worker in pool:
            if worker.status is not None:
                continue
            if worker.child is None:
                if stopping:
                    worker.status = 0
                elif now >= worker.restart_at:
                    _start(worker, before_exec)
                continue
            status = worker.child.poll()
            if status is None:
                continue
            pid, worker.child = worker.child.pid, None
            if status == 0 or stopping:
                worker.status = 0 if status in (0, -signal.SIGTERM, -signal.SIGINT) else status
                continue
            if not _died(worker, status, pid, max_restarts, crash_dir, workers):
                _stop_all(pool, forward)
                return 1
        if all(w.status is not None for w in pool):
            return next((w.status for w in pool if w.status), 0)
        time.sleep(0.05)


def _start(worker: _Worker, before_exec: Callable[[], None] | None) -> None:
    env = {**os.environ, LAST_EXIT_ENV: worker.last_exit, LAST_STACK_ENV: worker.last_stack}
    if worker.progress is not None:
        env[PROGRESS_ENV] = worker.progress
    worker.child = subprocess.Popen(
        [sys.executable, "-m", "shunter.cli.main", *worker.args],
        env=env,
        preexec_fn=before_exec,
    )
    worker.started, worker.started_at = time.monotonic(), time.time()
    worker.beat, worker.silent = 0.0, False


def _watch(worker: _Worker, crash_dir: str, silent_after: float, count: int) -> None:
    """Log a worker's stacks once when its watchdog has been silent for ``silent_after``
    (see the module's docstring), and say so when it beats again."""
    assert worker.child is not None
    pid = worker.child.pid
    beat = crashfile.heartbeat(crash_dir, pid)
    if beat is None:  # no watchdog yet, or no longer
        return
    if beat != worker.beat:
        if worker.silent:
            log.warning(
                "%s (pid %d): its watchdog runs again, after %.1fs",
                worker.name(count),
                pid,
                beat - worker.beat,
            )
        worker.beat, worker.silent = beat, False
    silence = time.time() - beat
    if worker.silent or silence < silent_after:
        return
    worker.silent = True
    log.error(
        "%s (pid %d): neither its event loop nor its watchdog has run for %.1fs: a call "
        "holds the GIL (a regular expression backtracking on a hostile payload, a C "
        "extension that never releases it?); every thread's stack, the event loop's "
        "first:\n%s",
        worker.name(count),
        pid,
        silence,
        _stacks_of(crash_dir, pid),
        extra={"worker_pid": pid},
    )


def _stacks_of(crash_dir: str, pid: int) -> str:
    """Every thread's stack in process ``pid``, written by its faulthandler on SIGUSR2
    (``crashfile.enable``), the event loop's first."""
    path = crashfile.stacks_path(crash_dir, pid)
    try:
        os.kill(pid, signal.SIGUSR2)
    except OSError as exc:
        return f"(none: {exc})"
    size, deadline = -1, time.monotonic() + _STACKS_WAIT
    while time.monotonic() < deadline:  # faulthandler writes a thread at a time
        time.sleep(0.05)
        with contextlib.suppress(OSError):
            written = path.stat().st_size
            if written and written == size:
                break
            size = written
    try:
        text = path.read_text(errors="replace")
        os.truncate(path, 0)  # the worker appends: its next dump starts at the top
        crash = crashfile.crash_path(crash_dir, pid).read_text(errors="replace")
        loop = crashfile.loop_thread(crash)
    except OSError as exc:
        return f"(none: {exc})"
    sections = text.strip().split("\n\n")
    if loop is not None:  # its section first, however faulthandler ordered them
        titles = (f"Thread {loop} ", f"Current thread {loop} ")
        sections.sort(key=lambda section: not section.startswith(titles))
    return "\n\n".join(sections) or "(none written)"


def _died(
    worker: _Worker, status: int, pid: int, max_restarts: int, crash_dir: str | None, count: int
) -> bool:
    """Record an unclean death and schedule the restart; False: too many, give up."""
    name = worker.name(count)
    worker.last_exit = describe_exit(status)
    worker.last_stack = ""
    for path, dump in crashfile.leftovers(crash_dir) if crash_dir else []:
        log.error("a worker's fatal-signal dump (%s):\n%s", path, dump)
        if path.stem == f"crash-{pid}":  # another worker's dump is not this one's stack
            worker.last_stack = dying_stack(dump)
            why = noted(dump)  # the watchdog ended it: say why beside the signal
            if why:
                worker.last_exit = f"{worker.last_exit} ({why})"
    now = time.monotonic()
    if now - worker.started > _HEALTHY:
        worker.backoff = 0.5
    if _touched_since(worker.progress, worker.started_at):
        worker.backoff = 0.0  # it moved on before it died: start again at once
    worker.deaths.append(now)
    while worker.deaths and now - worker.deaths[0] > _WINDOW:
        worker.deaths.popleft()
    if len(worker.deaths) > max_restarts:
        log.critical(
            "%s; %d deaths within %.0f minutes: giving up",
            f"{name} {worker.last_exit}",
            len(worker.deaths),
            _WINDOW / 60,
        )
        return False
    log.error(
        "%s; restarting in %.1fs (restart %d)",
        f"{name} {worker.last_exit}",
        worker.backoff,
        len(worker.deaths),
    )
    worker.restart_at = now + worker.backoff
    worker.backoff = min(max(worker.backoff * 2, 0.5), 30.0)
    return True


def _stop_all(pool: list[_Worker], forward: Callable[[int, FrameType | None], None]) -> None:
    """Giving up: the other workers drain, commit and exit like on SIGTERM."""
    forward(signal.SIGTERM, None)
    for worker in pool:
        if worker.child is not None:
            worker.child.wait()


def noted(dump: str) -> str:
    """Why the process died, from its crash file: what it wrote there (``crashfile.note``),
    or, when faulthandler's timer ended it, that its event loop was blocked holding the GIL
    (see ``watchdog.py``)."""
    body = dump.split(crashfile.HEADER_END, 1)[-1]
    notes = [
        line.removeprefix("shunter: ") for line in body.splitlines() if line.startswith("shunter: ")
    ]
    timeout = _TIMEOUT.search(body)
    if timeout and not notes:
        hours, minutes, seconds = map(int, timeout.groups())
        blocked = hours * 3600 + minutes * 60 + seconds
        notes.append(f"{BLOCKED_MARK} for {blocked}s holding the GIL (faulthandler's timer)")
    return "; ".join(notes)


def dying_stack(dump: str) -> str:
    """The dying thread's stack from a faulthandler dump (its "Current thread" section
    first, or the event loop's when faulthandler's timer wrote the dump, then the others),
    bounded: what the quarantined record carries."""
    body = dump.split(crashfile.HEADER_END, 1)[-1]
    loop = crashfile.loop_thread(body)
    body = "\n".join(
        line
        for line in body.splitlines()
        if not line.startswith(("shunter: ", crashfile.LOOP_THREAD))
    )
    body = _TIMEOUT.sub(lambda m: m.group(0) + "\n", body)  # a section of its own
    sections = body.strip().split("\n\n")
    current = [
        s for s in sections if "Current thread" in s or s.startswith(("Fatal Python", "Timeout ("))
    ]
    if loop is not None:
        current += [s for s in sections if s.startswith(f"Thread {loop} ")]
    others = [s for s in sections if s not in current]
    text = "\n\n".join(current + others)
    return text if len(text) <= _MAX_STACK else text[:_MAX_STACK] + "\n..."


def _progress_file(crash_dir: str | None, suffix: str = "") -> str | None:
    if crash_dir is None:
        return None
    with contextlib.suppress(OSError):
        os.makedirs(crash_dir, exist_ok=True)
        path = os.path.join(crash_dir, f"progress-{os.getpid()}{suffix}")
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
