"""Given an 80-column terminal, when `shunter demo` runs, then its lines fit (stack frames
of a fatal-signal dump aside, which are never cut), its files stay under the directory it
names, and that directory is gone at the end; and the demo reads the dispatcher only
through the public API and the documented status interface."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from rich.cells import cell_len

import shunter.demo

FRAME = re.compile(r'^\s+File "')


def shunter_command() -> list[str]:
    return [sys.executable, "-m", "shunter.cli.main"]


@pytest.mark.kafka
@pytest.mark.timeout(240)
def test_the_demo_fits_80_columns_and_cleans_up() -> None:
    """(Its temporary directory is given a short path, as /tmp's: a path longer than the
    terminal is printed whole on a line of its own, never folded.)"""
    with tempfile.TemporaryDirectory(prefix="sd-", dir="/tmp") as tmp:
        then_it_fits_and_cleans_up(Path(tmp))


def then_it_fits_and_cleans_up(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "80", "NO_COLOR": "1", "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [*shunter_command(), "demo", "--events", "2000"],
        capture_output=True, text=True, timeout=200, env=env, check=False,
    )
    out = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{out[-6000:]}\n{done.stderr[-3000:]}"
    named = re.search(r"its files, removed at the end \(--keep keeps them\):\n  (\S+)\n", out)
    assert named is not None, out[:2000]
    workdir = Path(named.group(1))
    assert workdir.parent == tmp_path
    assert f"removed {workdir}" in out
    assert not workdir.exists(), "the demo left its directory behind"
    assert list(tmp_path.iterdir()) == [], "the demo wrote outside its directory"
    long = [line for line in out.splitlines() if cell_len(line) > 80 and not FRAME.match(line)]
    assert long == [], "\n".join(long)
    assert "%" + "6|" not in out + done.stderr, "a raw librdkafka line reached the terminal"
    command = out[out.index("Replay it in the foreground"):].splitlines()[1:3]
    assert command[0].rstrip().endswith("\\") and "--caller guard-effect" in command[1]


INTERNALS = {"pipeline", "service", "tracker", "commit", "consume", "deliver", "settle"}


def test_the_revenue_step_uses_only_the_public_api_and_the_status_interface() -> None:
    """The live-revenue step imports no pipeline, service or tracker and reads no
    ``.pipeline``/``.tracker`` attribute: progress comes from observe.status."""
    source = Path(shunter.demo.__file__).with_name("revenue.py").read_text()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = set(node.module.split("."))
            assert not parts & INTERNALS, node.module
        if isinstance(node, ast.Attribute):
            assert node.attr not in {"pipeline", "tracker", "service"}, node.attr
