"""Helpers for crash-guard tests that need a real process: a stand-in for the worker the
supervisor starts, and a process whose event loop a handler blocks holding the GIL."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shunter.crashguard import crashfile


def stand_in_worker(tmp: Path, monkeypatch: pytest.MonkeyPatch, name: str, code: str) -> None:
    """Make ``python -m shunter.cli.main`` (what the supervisor starts) run ``code``'s
    ``main()`` instead: ``code`` becomes module ``name`` in ``tmp``, and a fake
    ``shunter.cli.main`` there, first on PYTHONPATH, calls it."""
    (tmp / f"{name}.py").write_text(code)
    cli = tmp / "shunter" / "cli"
    cli.mkdir(parents=True)
    (tmp / "shunter" / "__init__.py").write_text("")
    (cli / "__init__.py").write_text("")
    (cli / "main.py").write_text(f"import {name}\n{name}.main()\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def gil_blocked_dump(crash_dir: Path, define_handler: str, offset: int = 41) -> str:
    """Run ``handler`` (which ``define_handler``, Python source, defines) inline on one
    delivery of gift[2]@``offset`` in a fresh process under the watchdog (report after
    0.2 s, end after 0.5 s, faulthandler's timer 1 s later), with its crash file in
    ``crash_dir``. The handler must block the loop holding the GIL, so that the timer ends
    the process (status 1); returns what its crash file holds."""
    script = "\n".join(
        [
            "import asyncio, re, sys",
            "from shunter.crashguard import crashfile, start_watchdog, watchdog",
            "from shunter.deliver import SubscriberRuntime",
            "from shunter.testing import make_message",
            textwrap.dedent(define_handler),
            textwrap.dedent(f"""
            crashfile.enable({str(crash_dir)!r})
            watchdog._BACKSTOP_GRACE = 1.0

            async def main():
                start_watchdog(asyncio.get_running_loop(), 0.2, interval=0.02, end_after=0.5)
                await asyncio.sleep(0.3)  # the loop has answered, and armed the timer
                msg = make_message(
                    {{"n": {offset}}}, topic="gift", partition=2, offset={offset}, caller="medal"
                )
                rt = SubscriberRuntime(msg.caller, handler, lambda m, o, e: None)
                rt.submit(msg)
                rt.kick()
                await asyncio.sleep(3600)

            asyncio.run(main())
            """),
        ]
    )
    dead = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert dead.returncode == 1, dead.stderr.decode()[-2000:]
    [(_, dump)] = crashfile.leftovers(crash_dir)
    return dump
