"""Validate a data root and a config without training: ``python -m mimlab.check experiment=... data.root=...``.

Composes the config (unknown keys are named), dry-runs the model composition, checks the folder layout, then
decodes every image with a progress bar and reports per-class counts, the stored colour modes (16-bit, integer and
float images are scaled to 8 bit), entries the walk left out (folder links, non-regular files, second paths to a
file), images that decode to one flat colour, and *all* unreadable files at once.
Exit status 0 when everything is usable (left-out entries and flat images are warnings), 1 otherwise.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import track
from rich.table import Table

from mimlab.data.image_folder import CorruptImageError, open_image, to_rgb
from mimlab.tasks.pretrain import MaskedPretraining
from mimlab.train import CONFIG_DIR, instantiate_part
from mimlab.utils.options import validate_options

HIGH_RANGE_MODES = {"I": "32-bit integer", "F": "32-bit float", "I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit"}


def scan_split(dataset, console: Console, name: str) -> dict[str, Any]:
    """Decode every file of an ImageFolder-style dataset: ``{"counts": images per class, "bad": unreadable files,
    "modes": files per PIL mode, "flat": images that decode to one flat colour}``."""
    counts: Counter = Counter()
    modes: Counter = Counter()
    bad: list[str] = []
    flat: list[str] = []
    for path, label in track(dataset.samples, description=f"decoding {name}", console=console):
        try:
            img = open_image(path)
        except CorruptImageError as err:
            bad.append(str(err))
            continue
        modes[img.mode] += 1
        counts[dataset.classes[label]] += 1
        extrema: Any = to_rgb(img).getextrema()  # ((low, high) per channel)
        if all(low == high for low, high in extrema):
            flat.append(f"{path}: every pixel is {extrema[0][0]} (stored as mode {img.mode})")
    return {"counts": counts, "bad": bad, "modes": modes, "flat": flat}


def check(cfg: DictConfig, console: Console | None = None) -> bool:
    """Print what is wrong with the config and the data (no tracebacks for bad input); True when all is usable."""
    console = console or Console()
    try:
        validate_options(cfg)
        module = instantiate_part(cfg.task)
        if isinstance(module, MaskedPretraining):  # its parts are composed from the config: try them together
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
        table.add_row(cls, *(str(results[name]["counts"][cls]) for name in splits))
    if len(classes) > 50:
        table.add_row(f"... {len(classes) - 50} more classes", *("" for _ in splits))
    table.add_row("[bold]total", *(f"[bold]{sum(results[name]['counts'].values())}" for name in splits))
    console.print(table)
    modes: Counter = sum((results[name]["modes"] for name in splits), Counter())
    console.print(
        "stored as: "
        + ", ".join(
            f"{mode} {n}" + (f" ({HIGH_RANGE_MODES[mode]}: scaled to 8 bit)" if mode in HIGH_RANGE_MODES else "")
            for mode, n in modes.most_common()
        ),
        highlight=False,
    )
    for name, dataset in splits.items():
        for line in getattr(dataset, "skipped", []):
            console.print(f"[yellow]left out[/] ({name}): {line}", highlight=False)
        for line in results[name]["flat"]:
            console.print(f"[yellow]flat image[/] ({name}): {line}; check that it is meant to be", highlight=False)
    bad = [msg for name in splits for msg in results[name]["bad"]]
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
