"""Resolving "package.module:attr" strings (the model entry point of a run config)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from zray.errors import ConfigError


def load_entry(spec: str, key: str = "zray.model") -> Callable[..., Any]:
    """'package.module:attr.attr' -> the object; errors name `key` and the spec."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ConfigError(key, spec, "'package.module:callable'")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ConfigError(key, spec, "an importable 'package.module:callable'", str(e)) from e
    if not callable(obj):
        raise ConfigError(key, spec, "a callable")
    return obj
