"""Crash reports: what a dying process leaves for whoever looks next.

``enable(dir)`` points faulthandler at ``<dir>/crash-<pid>.log``: a fatal signal
(SIGSEGV, SIGFPE, SIGABRT, SIGBUS, SIGILL) writes every thread's Python stack there
from C, with no Python code running. ``leftovers(dir)`` finds the dumps of processes
that are gone, once, for the next start to log.

Beside it, ``<dir>/stacks-<pid>.log`` takes every thread's stack on SIGUSR2, also from C:
what the supervisor asks for when a worker's watchdog has gone silent (``beat``), as a
call that holds the GIL stops it and the event loop both (see supervisor.py).

A dump names functions and lines, not data: *which* delivery was running comes from the
in-flight journal, or, while the process is alive (the loop watchdog, a debugger),
from ``describe_current()``, which finds the ``Message`` each thread is handling on its
own stack — no bookkeeping on the delivery path.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TextIO

from ..message import Message

HEADER_END = "--\n"
# The line naming the event loop's thread as faulthandler's dumps name threads, so that a
# dump written by its timer (no "Current thread") can be read with the loop's stack first.
# Not a dump, nor a note: a file holding nothing else is a clean exit's.
LOOP_THREAD = "shunter loop thread: "
_LOOP_THREAD_LINE = re.compile(rf"^{LOOP_THREAD}(0x[0-9a-f]+)$", re.MULTILINE)

_file: TextIO | None = None
_path: Path | None = None
_stacks: TextIO | None = None


def enable(path_dir: str | Path) -> Path:
    """Send faulthandler's fatal-signal dump of every thread to ``<dir>/crash-<pid>.log``,
    and its dump on SIGUSR2 to ``<dir>/stacks-<pid>.log``."""
    global _file, _path, _stacks
    directory = Path(path_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = crash_path(directory, os.getpid())
    file = open(path, "w")  # noqa: SIM115 - faulthandler writes to it for the life of the process
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    file.write(f"shunter pid {os.getpid()} started {started}: {' '.join(sys.argv)}\n{HEADER_END}")
    file.flush()
    os.utime(path, (0, 0))  # no heartbeat yet: no watchdog runs (see ``beat``)
    faulthandler.enable(file, all_threads=True)
    # Appended to: whoever reads it may empty it, and the next dump starts at the top.
    stacks = open(stacks_path(directory, os.getpid()), "a")  # noqa: SIM115 - as above
    faulthandler.register(signal.SIGUSR2, stacks, all_threads=True, chain=False)
    if _file is not None:
        _file.close()
    if _stacks is not None:
        _stacks.close()
    _file, _path, _stacks = file, path, stacks
    return path


def crash_path(path_dir: str | Path, pid: int) -> Path:
    return Path(path_dir) / f"crash-{pid}.log"


def stacks_path(path_dir: str | Path, pid: int) -> Path:
    return Path(path_dir) / f"stacks-{pid}.log"


def beat(stopped: bool = False) -> None:
    """Say that this process's watchdog runs: the crash file's modification time is its
    heartbeat, which the supervisor watches; ``stopped``: it no longer runs, and none is
    to be expected (the time is set to 0, as ``enable`` leaves it, which ``heartbeat``
    reads as None)."""
    if _path is not None:
        with contextlib.suppress(OSError):
            os.utime(_path, (0, 0) if stopped else None)


def heartbeat(path_dir: str | Path, pid: int) -> float | None:
    """When process ``pid``'s watchdog last beat (wall clock), if it runs (see ``beat``)."""
    try:
        beaten = crash_path(path_dir, pid).stat().st_mtime
    except OSError:
        return None
    return beaten or None


def current() -> TextIO | None:
    """The crash file faulthandler writes to, if ``enable`` was called."""
    return _file


def note_loop_thread() -> None:
    """Name the calling thread as the event loop's (see ``LOOP_THREAD``)."""
    _write(f"{LOOP_THREAD}0x{threading.get_ident():016x}\n")


def loop_thread(text: str) -> str | None:
    """The event loop's thread id ("0x…", as faulthandler names threads) that a crash
    file's text names (``note_loop_thread``), if any."""
    found = _LOOP_THREAD_LINE.search(text)
    return None if found is None else found.group(1)


def note(line: str) -> None:
    """Write ``line`` into the crash file, ahead of the dump a fatal signal may add (what
    the supervisor reads when the process has ended). Nothing when no crash file is on."""
    _write(f"shunter: {line}\n")


def _write(text: str) -> None:
    if _file is None:
        return
    with contextlib.suppress(Exception):
        _file.write(text)
        _file.flush()


def disable() -> None:
    """A clean exit: stop writing dumps, and remove the crash file if none was written."""
    global _file, _path, _stacks
    if _file is None or _path is None:
        return
    faulthandler.disable()
    _file.close()
    if not _dumped(_path.read_text(errors="replace")):
        _path.unlink(missing_ok=True)
    if _stacks is not None:
        faulthandler.unregister(signal.SIGUSR2)
        _stacks.close()
        stacks_path(_path.parent, os.getpid()).unlink(missing_ok=True)
    _file = _path = _stacks = None


def leftovers(path_dir: str | Path) -> list[tuple[Path, str]]:
    """Crash files that hold a dump and whose process is gone: ``(path, text)`` each.

    Each is returned once: it is renamed ``*.seen``. Files of processes that ended
    without a fatal signal (SIGKILL, ``os._exit``, power loss) hold no dump and are removed.
    """
    found = []
    for path in sorted(Path(path_dir).glob("crash-*.log")):
        pid = path.stem.removeprefix("crash-")
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        text = path.read_text(errors="replace")
        if _dumped(text):
            path.rename(path.with_suffix(".seen"))
            found.append((path.with_suffix(".seen"), text))
        else:
            path.unlink(missing_ok=True)
    for path in Path(path_dir).glob("stacks-*.log"):  # a dead process's: nobody reads it
        pid = path.stem.removeprefix("stacks-")
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            path.unlink(missing_ok=True)
    return found


def running_deliveries() -> dict[int, Message]:
    """Thread id → the delivery that thread is inside, found on its stack.

    Cheap enough for a report, not for a hot path: it reads the locals of frames of
    other threads (under the GIL, as a debugger does), innermost first.
    """
    out = {}
    for ident, frame in sys._current_frames().items():
        msg = _innermost_message(frame)
        if msg is not None:
            out[ident] = msg
    return out


def describe(msg: Message) -> str:
    """``caller X on topic[partition]@offset (attempt n)``."""
    where = f"{msg.topic}[{msg.partition}]@{msg.offset}"
    return f"caller {msg.caller} on {where} (attempt {msg.attempt})"


def describe_current(thread_id: int | None = None) -> str | None:
    """The delivery running on ``thread_id`` (every thread when None), or None."""
    running = running_deliveries()
    if thread_id is not None:
        msg = running.get(thread_id)
        return None if msg is None else describe(msg)
    if not running:
        return None
    names = {t.ident: t.name for t in threading.enumerate()}
    return "; ".join(f"{describe(m)} [thread {names.get(i, i)}]" for i, m in running.items())


def _innermost_message(frame: FrameType | None) -> Message | None:
    while frame is not None:
        with contextlib.suppress(Exception):
            for value in frame.f_locals.values():
                if isinstance(value, Message):
                    return value
        frame = frame.f_back
    return None


def _dumped(text: str) -> bool:
    _, _, after = text.partition(HEADER_END)
    return any(line.strip() and not line.startswith(LOOP_THREAD) for line in after.splitlines())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
