"""Importing user code named by ``package.module:attribute`` in the configuration."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError


def import_object(path: str, key: str) -> Any:
    """Import ``module:attr``; a failure is a ConfigError naming the key path."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            [f"{key}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}"]
        ) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError([f"{key}: module {module_name!r} has no {attr!r}"]) from None
    return obj


def make_importable(config_path: str) -> None:
    """Put the current directory and the configuration's directory on ``sys.path``, as
    ``python -m`` would the former: handler and model paths name modules found there."""
    for path in (str(Path(config_path).resolve().parent), os.getcwd()):
        if path not in sys.path:
            sys.path.insert(0, path)
