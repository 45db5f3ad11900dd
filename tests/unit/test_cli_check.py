"""`shunter check`, the configuration reference, `--version` and completion: a first
day's mistakes are all reported at once, with the fix suggested, and every key of the
model is documented in docs/configuration.md."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field

from shunter import BUILD, __version__
from shunter.cli import reference
from shunter.cli.main import main
from shunter.config import Config, KafkaConfig, parse_config
from shunter.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "live-revenue" / "shunter.yaml"


def check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "shunter.yaml"
    path.write_text(text)
    code = main(["check", "-c", str(path)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


THREE_ROUNDS = """\
kafka: {bootstrap_server: 127.0.0.1:9092}
topics:
  gift: {formt: json}
categories:
  revenue: {topics: [gfit]}
subscribers:
  - caller: fan-medal
    category: revenu
    handler: no_such_module_abc:on_revenue
    timeout: soon
"""


def test_check_reports_every_problem_of_a_file_in_one_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Given a file with a bad value, unknown keys, bad references and a handler that does
    not import, when `shunter check` runs once, then it names all of them."""
    code, out = check(tmp_path, THREE_ROUNDS, capsys)
    assert code == 2
    for fragment in [
        "kafka.bootstrap_server: unknown key; did you mean 'bootstrap_servers'?",
        "topics.gift.formt: unknown key; did you mean 'format'?",
        "subscribers[0].timeout: expected a duration",
        "categories.revenue.topics[0]: unknown topic 'gfit'",
        "did you mean 'gift'?",
        "subscribers[0].category: unknown category 'revenu'",
        "did you mean 'revenue'?",
        "subscribers[0].handler: cannot import module 'no_such_module_abc'",
    ]:
        assert fragment in out, out
    assert "configuration OK" not in out


def test_a_bad_value_is_quoted_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Given a duration the parser rejects, then the refusal quotes the value once."""
    _, out = check(tmp_path, THREE_ROUNDS, capsys)
    line = next(x for x in out.splitlines() if "subscribers[0].timeout" in x)
    assert line.count("'soon'") == 1, line


@pytest.mark.parametrize("text", ["", "kafka: {group_id: g}\n", "subscribers: []\n"])
def test_a_configuration_without_subscribers_is_refused(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Given an empty file, or one with no subscriber, then check refuses it (exit 2)."""
    code, out = check(tmp_path, text, capsys)
    assert code == 2
    assert "subscribers: no subscriber is configured" in out
    assert "configuration OK" not in out


def test_unknown_nested_keys_suggest_the_closest_key_of_their_own_section() -> None:
    """Given a misspelt key inside an HTTP subscriber, then the suggestion is a key of the
    http section, and a key nothing resembles gets no suggestion."""
    data: dict[str, Any] = {
        "topics": {"t": {}},
        "categories": {"c": {"topics": ["t"]}},
        "subscribers": [
            {"caller": "a", "category": "c",
             "http": {"url": "https://example.com/x", "rate_limt": 5, "zzzzzz": 1}},
        ],
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    text = str(caught.value)
    assert "subscribers[0].http.rate_limt: unknown key; did you mean 'rate_limit'?" in text
    assert "subscribers[0].http.zzzzzz: unknown key\n" in text + "\n"


def test_the_example_deployment_is_accepted(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given examples/live-revenue, then `shunter check` accepts it as it is."""
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))
    assert main(["check", "-c", str(EXAMPLE)]) == 0
    assert "configuration OK" in capsys.readouterr().out


def test_check_at_80_columns_cuts_no_name(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given an 80-column terminal, then the topology fits and every topic, caller,
    handler and URL is printed whole; --wide adds the secondary columns."""
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))
    assert main(["check", "-c", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80, out
    for name in ["guard_purchase", "guard-effect", "revenue.handlers:on_guard_effect",
                 "http://127.0.0.1:8091/hooks/guard", "* guard: where value.type == 'buy'"]:
        assert name in out, (name, out)
    assert main(["check", "-c", str(EXAMPLE), "--wide"]) == 0
    wide = capsys.readouterr().out
    assert "isolation" in wide and "process" in wide


def test_check_json_lists_the_topology(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))
    assert main(["check", "-c", str(EXAMPLE), "--json"]) == 0
    import json

    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {"topic": "guard_purchase", "caller": "anchor-task"}.items() <= rows[-1].items()
    assert len(rows) == 6


# -- the reference ----------------------------------------------------------------------


def test_the_reference_in_docs_is_the_one_the_model_generates() -> None:
    """Given the configuration model, then docs/configuration.md is exactly what
    `shunter check --reference` prints. If this fails after a change to config.py, run:
        shunter check --reference > docs/configuration.md"""
    written = (ROOT / "docs" / "configuration.md").read_text()
    assert written == reference.render(), (
        "docs/configuration.md is out of date with src/shunter/config.py; regenerate it "
        "with: shunter check --reference > docs/configuration.md"
    )


def test_every_key_of_the_model_is_in_the_reference_with_its_meaning() -> None:
    """Every leaf key of the model appears with a type and a written meaning (the field's
    docstring in config.py)."""
    text = reference.render()
    for key in reference.entries():
        assert f"`{key.path}`" in text
        assert key.meaning, f"{key.path} has no docstring in config.py"
    for path in ["kafka.drain_timeout", "retry.flood_guard.max_share",
                 "subscribers[].http.rate_limit", "subscribers[].http.allow_hosts",
                 "subscribers[].http.breaker_failures", "subscribers[].workers",
                 "subscribers[].memory_limit_mb", "log.format", "log.level"]:
        assert f"### `{path}`" in text, path


def test_a_key_added_to_the_model_appears_without_touching_the_generator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given a model with a new key (as another change would add), then the generator
    lists it with its type, default and docstring."""

    class Wider(KafkaConfig):
        stall_after: float = Field(default=60.0, examples=[120])
        """How long a partition may be held before it is reported."""

    class WiderConfig(Config):
        kafka: Wider = Wider()

    found = {k.path: k for k in reference.entries(WiderConfig)}
    key = found["kafka.stall_after"]
    assert (key.kind, key.default, key.example) == ("number", "60.0", "120")
    assert key.meaning == "How long a partition may be held before it is reported."


def test_the_reference_fits_80_columns_outside_code() -> None:
    long = [line for line in reference.render().splitlines()
            if len(line) > 80 and "`" not in line]
    assert long == []


def test_check_reference_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--reference"]) == 0
    assert capsys.readouterr().out == reference.render()


# -- version and completion -------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"shunter {__version__} ({BUILD})"


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion_completes_commands_and_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Given the generated script loaded in bash, then `shunter dl<TAB>` offers dlq and
    `shunter dlq list --j<TAB>` offers --json."""
    assert main(["completion"]) == 0
    script = tmp_path / "shunter.bash"
    script.write_text(capsys.readouterr().out)

    def complete(*words: str) -> list[str]:
        line = " ".join(["shunter", *words])
        probe = (
            f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words)}; "
            'COMP_LINE="$COMP_WORDS"; _shunter; printf "%s\\n" "${COMPREPLY[@]}"'
        )
        out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True,
                             check=True, timeout=30, env={**os.environ, "PATH": "/usr/bin:/bin"})
        return out.stdout.split()

    assert complete("dl") == ["dlq"]
    assert complete("dlq", "li") == ["list"]
    assert "--json" in complete("dlq", "list", "--j")
    assert "--reference" in complete("check", "--re")


def test_the_console_script_prints_its_version() -> None:
    out = subprocess.run([sys.executable, "-m", "shunter.cli.main", "--version"],
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == f"shunter {__version__} ({BUILD})"





def test_run_refuses_a_configuration_without_subscribers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "shunter.yaml"
    path.write_text("kafka: {bootstrap_servers: 127.0.0.1:1}\n")
    assert main(["run", "-c", str(path), "--no-supervise"]) == 2
    assert "subscribers: no subscriber is configured" in capsys.readouterr().err



def test_a_closed_pipe_ends_a_command_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    """`shunter dlq list --json | head -1`: when the reader is gone, the command ends with
    status 141 (as a shell reports SIGPIPE) and no BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w") as closed:
        monkeypatch.setattr(sys, "stdout", closed)
        assert main(["check", "--reference"]) == 141


def test_a_refusal_folds_at_the_terminals_width_without_cutting_a_word(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from shunter.cli.main import refusal

    monkeypatch.setenv("COLUMNS", "60")
    problem = ("subscribers[0].category: unknown category 'revenu' (expected one of: guard, "
               "revenue); did you mean 'revenue'?")
    folded = refusal([problem], fold=True).splitlines()
    assert all(len(line) <= 60 for line in folded)
    assert " ".join(x.strip().removeprefix("- ") for x in folded[1:]) == problem
    assert refusal([problem], fold=False).splitlines()[1] == "  - " + problem


def test_the_replay_marker_topic_is_one_of_shunters_own() -> None:
    data: dict[str, Any] = {
        "kafka": {"group_id": "g"},
        "topics": {"g.dlq.replayed": {}},
        "categories": {"c": {"topics": ["g.dlq.replayed"]}},
        "subscribers": [{"caller": "a", "category": "c", "handler": "os:getcwd"}],
    }
    with pytest.raises(ConfigError, match=r"topics\.g\.dlq\.replayed: this name is one of"):
        parse_config(data)
