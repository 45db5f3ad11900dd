"""Configuration: a refused configuration names every bad key path and says what was
expected; secrets substituted from the environment never show in the refusal; and
``shunter check`` prints the topology or exits 2."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from shunter.cli.main import main
from shunter.config import load_config, parse_config
from shunter.errors import ConfigError

SECRET = "s3cr3t-hunter2-value"


def valid() -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": "127.0.0.1:9092", "group_id": "revenue"},
        "topics": {"gift": {}, "lottery": {"format": "json"}, "guard_purchase": {}},
        "categories": {
            "revenue": {"topics": ["gift", "lottery"]},
            "guard": {"topics": ["guard_purchase"], "where": "value.type == 'buy'"},
        },
        "subscribers": [
            {"caller": "fan-medal", "category": "revenue", "handler": "myapp.medal:on_revenue",
             "timeout": "5s", "concurrency": 8},
            {"caller": "anchor-task", "category": "guard",
             "http": {"url": "https://task.internal/hooks/guard", "timeout": "2s"}},
        ],
        "admin": {"listen": None},
    }


def refusal(data: dict[str, Any], **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, **kwargs)
    return str(caught.value)


def test_a_valid_configuration_is_accepted_with_durations_in_seconds() -> None:
    """Given the configuration of the spec's example, then it is accepted, durations are
    seconds, and the internal topics are named after the group."""
    config = parse_config(valid())
    assert config.subscriber("fan-medal").timeout == 5.0
    assert config.subscriber("anchor-task").http is not None
    assert config.subscriber("anchor-task").http.timeout == 2.0  # type: ignore[union-attr]
    assert config.fast_topic == "revenue.retry.fast"
    assert config.dlq_topic == "revenue.dlq"


@pytest.mark.parametrize(
    ("change", "path", "expected"),
    [
        pytest.param(lambda d: d["kafka"].update(bootstrap="x:1"),
                     "kafka.bootstrap", "unknown key", id="unknown-key"),
        pytest.param(lambda d: d["subscribers"][0].update(concurency=3),
                     "subscribers[0].concurency", "unknown key", id="unknown-key-in-list"),
        pytest.param(lambda d: d["subscribers"][0].update(concurrency="many"),
                     "subscribers[0].concurrency", "valid integer", id="wrong-type"),
        pytest.param(lambda d: d["subscribers"][0].update(ordering="random"),
                     "subscribers[0].ordering", "'key', 'partition' or 'none'", id="wrong-choice"),
        pytest.param(lambda d: d["subscribers"][0].update(timeout="5 parsecs"),
                     "subscribers[0].timeout", "expected a duration", id="bad-duration"),
        pytest.param(lambda d: d["subscribers"][1]["http"].update(timeout="-2s"),
                     "subscribers[1].http.timeout", "expected a duration",
                     id="bad-nested-duration"),
        pytest.param(lambda d: d["categories"]["revenue"]["topics"].append("gfit"),
                     "categories.revenue.topics[2]", "unknown topic 'gfit' (expected one of: gift, "
                     "guard_purchase, lottery)", id="unknown-topic-in-category"),
        pytest.param(lambda d: d["subscribers"][0].update(category="revenu"),
                     "subscribers[0].category", "unknown category 'revenu' (expected one of: "
                     "guard, revenue)", id="unknown-category-in-subscriber"),
        pytest.param(lambda d: d["subscribers"].append(dict(d["subscribers"][0])),
                     "subscribers[2].caller", "duplicate caller 'fan-medal'",
                     id="duplicate-caller"),
        pytest.param(lambda d: d["categories"]["guard"].update(where="value.type == "),
                     "categories.guard.where", "not a valid CEL expression", id="invalid-cel"),
        pytest.param(lambda d: d["topics"]["gift"].update(schema="schemas/gift.json"),
                     "topics.gift.schema", "file not found: schemas/gift.json",
                     id="missing-schema-file"),
        pytest.param(lambda d: d["subscribers"][0].update(handler="myapp.medal.on_revenue"),
                     "subscribers[0].handler", "'package.module:function'", id="bad-import-path"),
        pytest.param(lambda d: d["kafka"]["client"].update(
                         {"sasl.password": "${SHUNTER_TEST_NOPE}"}),
                     "kafka.client.sasl.password",
                     "environment variable SHUNTER_TEST_NOPE is not set",
                     id="missing-env-var"),
        pytest.param(lambda d: d["topics"].update({"revenue.dlq": {}}),
                     "topics.revenue.dlq", "one of shunter's own topics", id="internal-topic-name"),
        pytest.param(lambda d: d["kafka"].update(consumer={"enable.auto.commit": True}),
                     "kafka.consumer", "'enable.auto.commit' is shunter's own setting "
                     "(shunter commits an offset itself, only once every delivery",
                     id="auto-commit-would-commit-before-delivery"),
        pytest.param(lambda d: d["kafka"]["client"].update({"acks": 1}),
                     "kafka.client", "'acks' is shunter's own setting", id="weaker-acks"),
    ],
)
def test_a_bad_key_is_refused_with_its_path_and_what_was_expected(
    change: Any, path: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given a valid configuration with one key made wrong,
    when it is parsed, then it is refused with one line naming that key's path and what
    was expected there."""
    monkeypatch.delenv("SHUNTER_TEST_NOPE", raising=False)
    data = valid()
    data["kafka"].setdefault("client", {})
    change(data)
    text = refusal(data)
    lines = [line for line in text.splitlines() if line.startswith("  - ")]
    assert len(lines) == 1, text
    assert lines[0].startswith(f"  - {path}: "), text
    assert expected in lines[0], text


def test_every_problem_is_listed_not_only_the_first() -> None:
    """Given a configuration with three independent mistakes, then all three are listed."""
    data = valid()
    data["categories"]["revenue"]["topics"].append("gfit")
    data["subscribers"][0]["category"] = "nope"
    data["subscribers"].append(dict(data["subscribers"][1]))
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    paths = [p.split(":")[0] for p in caught.value.problems]
    assert paths == ["categories.revenue.topics[2]", "subscribers[0].category",
                     "subscribers[2].caller"]


def test_environment_variables_are_substituted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Given ${VAR} references, when the variables are set, then their values are used."""
    monkeypatch.setenv("SHUNTER_TEST_BOOTSTRAP", "broker-1:9093")
    monkeypatch.setenv("SHUNTER_TEST_PASSWORD", SECRET)
    data = valid()
    data["kafka"]["bootstrap_servers"] = "${SHUNTER_TEST_BOOTSTRAP}"
    data["kafka"]["client"] = {"sasl.password": "${SHUNTER_TEST_PASSWORD}"}
    secrets: set[str] = set()
    config = parse_config(data, secrets=secrets)
    assert config.kafka.bootstrap_servers == "broker-1:9093"
    assert config.kafka.client["sasl.password"] == SECRET
    assert SECRET in secrets


SECRET_PLACES = [
    pytest.param(lambda d: d["kafka"].update(batch_size="${SHUNTER_TEST_SECRET}"),
                 "kafka.batch_size", id="wrong-type"),
    pytest.param(lambda d: d["subscribers"][0].update(timeout="${SHUNTER_TEST_SECRET}"),
                 "subscribers[0].timeout", id="duration"),
    pytest.param(lambda d: d.update(log={"level": "${SHUNTER_TEST_SECRET}"}),
                 "log.level", id="choice"),
    pytest.param(lambda d: d["categories"]["guard"].update(
                     where="value.token == '${SHUNTER_TEST_SECRET}' &&"),
                 "categories.guard.where", id="cel"),
]


@pytest.mark.parametrize("collect", [True, False], ids=["secrets-collected", "plain-parse"])
@pytest.mark.parametrize(("change", "path"), SECRET_PLACES)
def test_a_secret_never_appears_in_a_refusal(
    change: Any, path: str, collect: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given a secret from the environment substituted into a key that is then refused,
    when the configuration is parsed (whether or not the caller collects the secrets),
    then the refusal names the key but never shows the secret's value."""
    monkeypatch.setenv("SHUNTER_TEST_SECRET", SECRET)
    data = valid()
    change(data)
    text = refusal(data, secrets=set()) if collect else refusal(data)
    assert path in text
    assert SECRET not in text


# -- shunter check --------------------------------------------------------------------------

@pytest.fixture
def handler_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"checkhandlers_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text("def on_revenue(msg):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "shunter.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_check_prints_the_topology(tmp_path: Path, handler_module: str,
                                   capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Given a valid configuration file whose handlers import,
    when `shunter check -c FILE` runs, then it exits 0 and prints each topic with its
    category, filter, caller and handler or URL."""
    monkeypatch.setenv("COLUMNS", "250")
    data = valid()
    data["subscribers"][0]["handler"] = f"{handler_module}:on_revenue"
    (tmp_path / "gift.json").write_text(json.dumps({"type": "object"}))
    data["topics"]["gift"]["schema"] = "gift.json"  # relative to the file
    assert main(["check", "-c", str(write(tmp_path, data))]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "│" in line]
    expect = [
        ("gift", "revenue", "fan-medal", f"{handler_module}:on_revenue"),
        ("lottery", "revenue", "fan-medal", f"{handler_module}:on_revenue"),
        ("guard_purchase", "guard", "anchor-task", "https://task.internal/hooks/guard"),
    ]
    for cells in expect:
        assert any(all(c in row for c in cells) for row in rows), (cells, out)
    assert "value.type == 'buy'" in out
    assert "configuration OK" in out


@pytest.mark.parametrize(("change", "fragment"), [
    pytest.param(lambda d: d["subscribers"][0].update(category="nope"),
                 "subscribers[0].category: unknown category 'nope'", id="bad-key"),
    pytest.param(lambda d: d["subscribers"][0].update(handler="no_such_module_xyz:f"),
                 "subscribers[0].handler: cannot import module 'no_such_module_xyz'",
                 id="handler-does-not-import"),
])
def test_check_exits_2_on_a_bad_configuration(
    change: Any, fragment: str, tmp_path: Path, handler_module: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Given a configuration file with a mistake (a bad key, or a handler that does not
    import), when `shunter check -c FILE` runs, then it exits 2 and says what is wrong."""
    data = valid()
    data["subscribers"][0]["handler"] = f"{handler_module}:on_revenue"
    change(data)
    assert main(["check", "-c", str(write(tmp_path, data))]) == 2
    captured = capsys.readouterr()
    assert fragment in captured.err
    assert "configuration OK" not in captured.out


def test_check_never_prints_a_secret(tmp_path: Path, handler_module: str,
                                     capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Given a configuration file whose refused key holds a secret from the environment,
    when `shunter check -c FILE` runs, then it exits 2 and the secret is not printed."""
    monkeypatch.setenv("SHUNTER_TEST_SECRET", SECRET)
    data = valid()
    data["subscribers"][0]["handler"] = f"{handler_module}:on_revenue"
    data["kafka"]["batch_size"] = "${SHUNTER_TEST_SECRET}"
    assert main(["check", "-c", str(write(tmp_path, data))]) == 2
    captured = capsys.readouterr()
    assert "kafka.batch_size" in captured.err
    assert SECRET not in captured.err + captured.out


def test_an_unreadable_or_malformed_file_is_refused_by_name(tmp_path: Path) -> None:
    """Given a path that does not exist, or a file that is not YAML, then the refusal
    names the file."""
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match=r"absent\.yaml: cannot read"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("kafka: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(broken)


def test_relative_schema_paths_resolve_next_to_the_file(tmp_path: Path) -> None:
    """Given a schema path relative to the configuration file, when the file is loaded
    from another working directory, then the schema is found next to the file."""
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "gift.json").write_text("{}")
    data = copy.deepcopy(valid())
    data["topics"]["gift"]["schema"] = "schemas/gift.json"
    config = load_config(write(tmp_path, data))
    assert config.resolve("schemas/gift.json").is_file()
