"""Given a configuration whose broker nobody listens on, when `shunter run` starts, then
it says so in one line naming the address and what to check (no traceback, none of
librdkafka's own lines) and exits 1, for its supervisor to try again after a backoff."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shunter.broker.embedded import free_port


@pytest.mark.timeout(120)
def test_run_against_an_unreachable_broker_says_one_clear_line(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "shunter.yaml"
    path.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": f"127.0.0.1:{port}"},
        "topics": {"gift": {}},
        "categories": {"revenue": {"topics": ["gift"]}},
        "subscribers": [{"caller": "medal", "category": "revenue", "handler": "os:getcwd"}],
        "admin": {"listen": None},
        "crash_guard": {"crash_dir": str(tmp_path / "crashes")},
    }))
    done = subprocess.run(
        [sys.executable, "-m", "shunter.cli.main", "run", "-c", str(path), "--no-supervise"],
        capture_output=True, text=True, timeout=100, check=False,
    )
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 1, lines
    assert len(lines) == 1, lines
    assert f"cannot reach Kafka at 127.0.0.1:{port}" in lines[0]
    assert "check that a broker is running there" in lines[0]
