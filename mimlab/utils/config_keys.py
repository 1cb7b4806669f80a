"""Name unknown config keys on the command line, and overrides of slots the chosen task does not have (before Hydra runs)."""

from __future__ import annotations

import difflib
from pathlib import Path

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


def task_slots(config_dir: str) -> dict[str, list[str]]:
    """``{slot group: [tasks whose defaults list adds it]}`` read from ``conf/task/*.yaml`` (e.g. masking -> [pretrain])."""
    slots: dict[str, list[str]] = {}
    for path in sorted((Path(config_dir) / "task").glob("*.yaml")):
        for entry in OmegaConf.load(path).get("defaults", []):  # type: ignore[arg-type]
            if OmegaConf.is_dict(entry):
                group = str(next(iter(entry))).removeprefix("override ").split("@")[0].strip("/")
                slots.setdefault(group, []).append(path.stem)
    return slots


def _slot_of(key: str, slots: dict[str, list[str]]) -> str | None:
    """The task slot a dotted key or a group name belongs to (``model.decoder.depth`` -> ``model/decoder``)."""
    for group in slots:
        package = group.replace("/", ".")
        if key == group or key == package or key.startswith(package + "."):
            return group
    return None


def unknown_key_messages(config_dir: str, config_name: str, args: list[str]) -> list[str]:
    """For each override of a slot the chosen task does not use, or of a key that does not exist, a message.

    Group selections (``experiment=...``, ``model/backbone=...``), appends (``+k=v``), deletions (``~k``) and
    ``hydra.*`` keys are otherwise left to Hydra. Returns [] when every key exists (or the overrides cannot be parsed).
    """
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except Exception:  # let Hydra report syntax errors itself
        return []
    groups = set(_group_names(config_dir))
    slots = task_slots(config_dir)
    with initialize_config_dir(config_dir, version_base="1.3"):
        selections = [o for o in overrides if o.key_or_group in groups and not o.is_force_add()]
        try:
            base = compose(
                config_name,
                overrides=[o.input_line for o in selections if o.key_or_group not in slots],  # type: ignore[misc]
                return_hydra_config=True,
            )
        except Exception:  # a wrong group option: Hydra lists the choices itself
            return []
        task = base.hydra.runtime.choices.get("task")
        present = {g for g in slots if OmegaConf.select(base, g.replace("/", "."), default=None) is not None}
        messages = [
            _unused_slot_message(o.input_line, slot, task, slots[slot])  # type: ignore[arg-type]
            for o in overrides
            if not o.is_add() and (slot := _slot_of(o.key_or_group, slots)) is not None and slot not in present
        ]
        if messages:
            return messages
        try:
            cfg = compose(config_name, overrides=[o.input_line for o in selections])  # type: ignore[misc]
        except Exception:
            return []
    keys = _leaf_keys(cfg)
    for o in overrides:
        key = o.key_or_group
        if o.is_add() or o.is_delete() or o.is_force_add() or key in groups or key.startswith("hydra"):
            continue
        if OmegaConf.select(cfg, key, default="__missing__", throw_on_missing=False) == "__missing__":
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            messages.append(f"unknown config key '{key}'.{hint} (Use +{key}=... to add a new key on purpose.)")
    return messages


def _unused_slot_message(override: str, slot: str, task: str, owners: list[str]) -> str:
    return (
        f"'{override}': task={task} has no '{slot}' slot; only task={' | '.join(owners)} use it (their "
        "conf/task/<task>.yaml defaults list adds it). Drop the override, or choose a task that uses the slot."
    )


def _group_names(config_dir: str) -> list[str]:
    root = Path(config_dir)
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir()]
