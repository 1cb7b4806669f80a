"""Values as Hydra command-line overrides (the experiments' transfer steps rebuild an encoder on the command line)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def hydra_value(value: Any) -> str:
    """A YAML value as a Hydra override value (strings quoted, dicts/lists in Hydra's grammar)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("'", "\\'") + "'"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def node_overrides(key: str, node: Mapping[str, Any]) -> list[str]:
    """``++<key>.<k>=<v>`` for every entry of ``node`` (adds or replaces each key of the composed node)."""
    return [f"++{key}.{k}={hydra_value(v)}" for k, v in node.items()]
