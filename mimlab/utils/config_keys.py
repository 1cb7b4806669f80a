"""Name unknown config keys on the command line and suggest the closest existing ones (before Hydra runs)."""
from __future__ import annotations

import difflib

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf


def _leaf_keys(cfg: DictConfig) -> list[str]:
    out: list[str] = []

    def walk(node, prefix: str) -> None:
        if OmegaConf.is_dict(node):
            for key in node.keys():
                walk(node._get_node(key), f"{prefix}{key}.")
        else:
            out.append(prefix[:-1])

    walk(cfg, "")
    return [k for k in out if k]


def unknown_key_messages(config_dir: str, config_name: str, args: list[str]) -> list[str]:
    """For each ``key=value`` override whose key does not exist, a message with the closest existing keys.

    Group selections (``experiment=...``, ``model/backbone=...``), appends (``+k=v``), deletions (``~k``) and
    ``hydra.*`` keys are left to Hydra. Returns [] when every key exists (or the overrides cannot be parsed).
    """
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except Exception:  # noqa: BLE001 - let Hydra report syntax errors itself
        return []
    with initialize_config_dir(config_dir, version_base="1.3"):
        groups = set(_group_names(config_dir))
        selections = [o.input_line for o in overrides if o.key_or_group in groups and o.is_force_add() is False]
        try:
            cfg = compose(config_name, overrides=selections)
        except Exception:  # noqa: BLE001 - a wrong group option: Hydra lists the choices itself
            return []
    keys = _leaf_keys(cfg)
    messages = []
    for o in overrides:
        key = o.key_or_group
        if o.is_add() or o.is_delete() or o.is_force_add() or key in groups or key.startswith("hydra"):
            continue
        if OmegaConf.select(cfg, key, default="__missing__", throw_on_missing=False) == "__missing__":
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            messages.append(f"unknown config key '{key}'.{hint} (Use +{key}=... to add a new key on purpose.)")
    return messages


def _group_names(config_dir: str) -> list[str]:
    from pathlib import Path

    root = Path(config_dir)
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir()]
