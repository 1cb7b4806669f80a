"""Validate a data root and a config without training: ``python -m mimlab.check experiment=... data.root=...``.

Composes the config (unknown keys are named), dry-runs the model composition, checks the folder layout, then
decodes every image with a progress bar and reports per-class counts and *all* unreadable files at once.
Exit status 0 when everything is usable, 1 otherwise.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import track
from rich.table import Table

from mimlab.data.image_folder import CorruptImageError, load_rgb
from mimlab.train import CONFIG_DIR, instantiate_part
from mimlab.utils.options import validate_options


def scan_split(dataset, console: Console, name: str) -> tuple[Counter, list[str]]:
    """Decode every file of an ImageFolder-style dataset; return (images per class, error messages)."""
    counts: Counter = Counter()
    bad: list[str] = []
    for path, label in track(dataset.samples, description=f"decoding {name}", console=console):
        try:
            load_rgb(path)
            counts[dataset.classes[label]] += 1
        except CorruptImageError as err:
            bad.append(str(err))
    return counts, bad


def check(cfg: DictConfig, console: Console | None = None) -> bool:
    """Print what is wrong with the config and the data (no tracebacks for bad input); True when all is usable."""
    console = console or Console()
    try:
        validate_options(cfg)
        module = instantiate_part(cfg.task)
        if hasattr(module, "check_composition"):
            module.check_composition((cfg.data.img_size, cfg.data.img_size))
        console.print(f"[green]config ok[/]: {type(module).__name__} composes and runs at {cfg.data.img_size}px")
        datamodule = instantiate_part(cfg.data)
        datamodule.prepare_data()  # generates the embedded synthetic set if it is the data and missing
        datamodule.setup("fit")
    except (ValueError, KeyError, OSError) as err:  # layout, generated-data, composition and file errors name the cause
        console.print(f"[red]error[/]: {err}", highlight=False)
        return False
    splits = {"train": datamodule.train_set, "val": datamodule.val_set}
    results = {name: scan_split(ds, console, name) for name, ds in splits.items()}
    table = Table(title=f"images per class under {Path(cfg.data.root)}")
    table.add_column("class")
    for name in splits:
        table.add_column(name, justify="right")
    classes = sorted(set().union(*(ds.classes for ds in splits.values())))
    for cls in classes[:50]:
        table.add_row(cls, *(str(results[name][0][cls]) for name in splits))
    if len(classes) > 50:
        table.add_row(f"... {len(classes) - 50} more classes", *("" for _ in splits))
    table.add_row("[bold]total", *(f"[bold]{sum(results[name][0].values())}" for name in splits))
    console.print(table)
    bad = [msg for name in splits for msg in results[name][1]]
    for msg in bad:
        console.print(f"[red]unreadable[/]: {msg}", highlight=False)
    if bad:
        console.print(
            f"[red]{len(bad)} unreadable file(s)[/]: replace or delete them, or train with data.on_corrupt=skip"
        )
    return not bad


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    sys.exit(0 if check(cfg) else 1)


if __name__ == "__main__":
    main()
