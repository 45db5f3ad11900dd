"""Which record path runs: the modules compiled by mypyc, or their Python source.

``setup.py`` compiles the modules every record passes through and writes ``compiled.json``
beside them: each module's name and a digest of the source it was compiled from. Before
any of them is imported, ``choose`` checks those digests against the source on disk. A
compiled module built from other source (an editable install whose files were edited or
checked out since) would run code that is no longer there, silently: then every compiled
module loads from its source instead, with a warning saying how to rebuild. So does
``SHUNTER_PURE_PYTHON=1`` at run time, to compare or to debug without a rebuild. It is all
of them or none, because compiled modules call each other directly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from importlib.machinery import EXTENSION_SUFFIXES, ModuleSpec
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
# What a compiled module's frames give as their file in a traceback: the path it was
# compiled from, relative to setup.py (its COMPILED list), wherever the package was
# installed since. Code that tells shunter's frames from a handler's checks this prefix
# beside the package's own directory.
COMPILED_SOURCE = "src/shunter/"


def digest(source: bytes) -> str:
    return hashlib.sha256(source).hexdigest()[:16]


class _FromSource:
    """A meta path finder that loads the named modules from their ``.py`` files, ahead of
    the extension modules beside them."""

    def __init__(self, here: Path, names: set[str]) -> None:
        self.here = here
        self.names = names

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in self.names:
            return None
        return importlib.util.spec_from_file_location(fullname, _source(self.here, fullname))


def _source(here: Path, module: str) -> Path:
    """``shunter.a.b`` → ``<here>/a/b.py``."""
    return here.joinpath(*module.split(".")[1:]).with_suffix(".py")


def _has_extension(here: Path, module: str) -> bool:
    base = here.joinpath(*module.split(".")[1:])
    return any(base.with_name(base.name + suffix).exists() for suffix in EXTENSION_SUFFIXES)


def choose(here: Path = HERE) -> str:
    """Load the record path compiled if it is there and current, else from source; say
    which: ``"compiled"`` or ``"python"``. ``here`` is the package's directory."""
    try:
        modules: dict[str, str] = json.loads((here / "compiled.json").read_text())["modules"]
    except (OSError, ValueError, KeyError, TypeError):
        modules = {}
    present = {m for m in modules if _has_extension(here, m)}
    if not present:
        return "python"
    if os.environ.get("SHUNTER_PURE_PYTHON", "") in ("", "0"):
        stale = sorted(
            m for m in present
            if _source(here, m).exists() and digest(_source(here, m).read_bytes()) != modules[m]
        )
        if not stale:
            return "compiled"
        warnings.warn(
            f"shunter: the compiled record path was built from other source than "
            f"{_source(here, stale[0])}{' and others' if len(stale) > 1 else ''}; running it "
            f"from source, slower, until `pip install -e .` compiles it again",
            RuntimeWarning,
            stacklevel=2,
        )
    sys.meta_path.insert(0, _FromSource(here, set(modules)))
    return "python"
