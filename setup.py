"""Build: the record path compiled to C with mypyc, else pure Python.

shunter's own work per message is Python bytecode and the C work it starts (objects,
frames, dict lookups); mypyc compiles the modules every record passes through, from the
type annotations ``mypy --strict`` already checks, into C extensions: a quarter less work
per message (``scripts/pipeline-cost --instructions``: 50k instructions instead of 69k).
Everything else stays Python. Compiled code checks those annotations at run time, so one
that lies (a ``type: ignore`` over a None) fails there where Python let it pass.

The compiled modules are the same source: a machine without a C compiler, or a build with
``SHUNTER_PURE_PYTHON=1`` in its environment, installs the pure-Python package instead and
behaves the same, only slower (``shunter --version`` says which is running). A compile
that fails falls back the same way, with a warning, rather than failing the install.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

# The record path: what runs for every record and every delivery. Kept short on purpose:
# a compiled module cannot be monkeypatched from outside, and each one costs build time.
# None of them may define a class on a dependency's class: the build sees dependencies as
# Any, and such a class builds but breaks at run time (tests/unit/test_native.py checks).
COMPILED = [
    "src/shunter/message.py",
    "src/shunter/decode/decoder.py",
    "src/shunter/pipeline.py",
    "src/shunter/commit/tracker.py",
    "src/shunter/crashguard/gate.py",
    "src/shunter/deliver/runtime.py",
    "src/shunter/observe/stats.py",
    "src/shunter/settle/settler.py",
    # A failed delivery's path: one in hundreds of deliveries, so it runs with cold caches
    # (failure() took ~10.6 µs in a run, 2.7 µs in a loop of its own). Compiled, a
    # failure cost the main thread 55 µs of CPU instead of 74 (fanout-3-failing).
    "src/shunter/deliver/failure.py",
    "src/shunter/observe/fingerprints.py",
    "src/shunter/observe/flood.py",
    "src/shunter/settle/headers.py",
    "src/shunter/settle/route.py",
    "src/shunter/outcome.py",
]


class OptionalBuildExt(build_ext):
    """Builds the compiled modules if it can. All or none: each module's extension loads
    the group's shared library, so after a failure none of them is left installed."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure: pure Python
            for ext in self.extensions:
                path = self.get_ext_fullpath(ext.name)
                if os.path.exists(path):
                    os.remove(path)
            print(
                f"shunter: compiling the record path failed ({exc}); installing pure Python",
                file=sys.stderr,
            )


def extensions() -> list[Any]:
    forget_last_build()
    if os.environ.get("SHUNTER_PURE_PYTHON", "") not in ("", "0"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return []
    try:
        # The build's own environment has none of shunter's dependencies: their types are
        # Any here (they are not compiled anyway), so without the project's strict
        # settings (pyproject.toml's [tool.mypy], which CI's `mypy src` keeps).
        options = ["--config-file=", "--ignore-missing-imports", "--follow-imports=silent",
                   "--cache-dir=build/mypyc-cache"]  # not the one `mypy src` fills, with them
        built = list(mypycify([*options, *COMPILED], opt_level="3", group_name="shunter"))
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - mypyc exits on a type error
        print(f"shunter: not compiled ({exc}); installing pure Python", file=sys.stderr)
        return []
    write_manifest()
    return built


def forget_last_build() -> None:
    """An editable install builds in place, beside the source: a module compiled by an
    earlier build (since dropped from COMPILED, or this build being pure) must not stay
    there, loaded ahead of its source."""
    for path in [*Path("src/shunter").rglob("*.so"), *Path("src").glob("shunter__mypyc*")]:
        path.unlink()
    Path("src/shunter/compiled.json").unlink(missing_ok=True)


def write_manifest() -> None:
    """What each compiled module was compiled from, for ``shunter._native`` to check at
    import (an editable install's source can change after its build)."""
    modules = {
        ".".join(Path(path).with_suffix("").parts[1:]): hashlib.sha256(
            Path(path).read_bytes()
        ).hexdigest()[:16]
        for path in COMPILED
    }
    Path("src/shunter/compiled.json").write_text(json.dumps({"modules": modules}, indent=1))


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
