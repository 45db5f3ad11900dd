"""Which record path runs: compiled only when the compiled modules match their source."""

from __future__ import annotations

import ast
import json
import sys
from collections.abc import Iterator
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

from shunter._native import choose, digest

SOURCE = b"def f() -> int:\n    return 1\n"


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A package ``pkg`` with one module ``pkg.mod`` and its extension beside it."""
    here = tmp_path / "pkg"
    here.mkdir()
    (here / "mod.py").write_bytes(SOURCE)
    (here / f"mod{EXTENSION_SUFFIXES[0]}").write_bytes(b"not loaded by these tests")
    return here


@pytest.fixture(autouse=True)
def _meta_path() -> Iterator[None]:
    before = list(sys.meta_path)
    yield
    sys.meta_path[:] = before


def manifest(here: Path, source: bytes = SOURCE) -> None:
    (here / "compiled.json").write_text(json.dumps({"modules": {"pkg.mod": digest(source)}}))


def source_finder(here: Path) -> object | None:
    """The finder ``choose`` put first for ``here``, if it put one (not the one a run with
    SHUNTER_PURE_PYTHON=1 put there for shunter itself)."""
    first = sys.meta_path[0]
    return first if getattr(first, "here", None) == here else None


def test_compiled_modules_built_from_this_source_run(
    package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SHUNTER_PURE_PYTHON", raising=False)
    manifest(package)
    assert choose(package) == "compiled"
    assert source_finder(package) is None


def test_a_module_edited_since_its_build_runs_from_source_with_a_warning(
    package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SHUNTER_PURE_PYTHON", raising=False)
    manifest(package, source=b"def f() -> int:\n    return 0\n")
    with pytest.warns(RuntimeWarning, match=r"built from other source than .*mod\.py"):
        assert choose(package) == "python"
    finder = source_finder(package)
    assert finder is not None
    spec = finder.find_spec("pkg.mod", None)  # type: ignore[attr-defined]
    assert spec.origin == str(package / "mod.py")
    assert finder.find_spec("pkg.other", None) is None  # type: ignore[attr-defined]


def test_pure_python_on_request(package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHUNTER_PURE_PYTHON", "1")
    manifest(package)
    assert choose(package) == "python"
    assert source_finder(package) is not None


@pytest.mark.parametrize("what", ["no manifest", "no extension", "broken manifest"])
def test_a_build_that_compiled_nothing_is_python(
    package: Path, what: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SHUNTER_PURE_PYTHON", raising=False)
    if what == "no extension":
        manifest(package)
        (package / f"mod{EXTENSION_SUFFIXES[0]}").unlink()
    elif what == "broken manifest":
        (package / "compiled.json").write_text('{"modules": [')
    assert choose(package) == "python"
    assert source_finder(package) is None


def test_no_compiled_class_derives_from_a_dependency() -> None:
    """The build compiles without shunter's dependencies installed (pip's isolated build
    environment), so their types are Any to mypyc; a compiled class on such a base builds
    but breaks at run time (a SystemError on a missing attribute, a crash in the garbage
    collector). Such a class belongs in a module that is not compiled."""
    root = Path(__file__).resolve().parents[2]
    setup = ast.parse((root / "setup.py").read_text())
    [compiled] = [
        ast.literal_eval(node.value) for node in setup.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "COMPILED"
    ]
    assert compiled, "setup.py compiles nothing?"
    offenders = []
    for path in compiled:
        tree = ast.parse((root / path).read_text())
        foreign = {
            alias.asname or alias.name
            for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
            and not node.level and node.module.split(".")[0] not in sys.stdlib_module_names
            for alias in node.names
        } | {
            alias.asname or alias.name.split(".")[0]
            for node in ast.walk(tree) if isinstance(node, ast.Import)
            for alias in node.names if alias.name.split(".")[0] not in sys.stdlib_module_names
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for base in node.bases:
                    name = base.id if isinstance(base, ast.Name) else getattr(
                        base.value if isinstance(base, ast.Attribute) else None, "id", None
                    )
                    if name in foreign:
                        offenders.append(f"{path}: class {node.name}({ast.unparse(base)})")
    assert not offenders, offenders
