"""OmegaConf resolvers used by conf/ (registered when ``mimlab.train`` is imported).

``${mimlab.dirname:<text>}``: ``text`` made safe as one folder name: ``/`` becomes ``_``, and text longer than
``MAX_DIRNAME`` characters is cut and suffixed with a short hash of the whole, so folders stay unique and below the
file-system's 255-byte name limit.

``${mimlab.job_dirname:<sweep dir>,<override_dirname>}``: the sweep job folder name from only the *swept* overrides
(``masking.ratio=0.6,model.decoder.depth=8``), not the fixed ones repeated in every job. The swept keys are those with
a sweep value (``a,b``, ``range(...)``, ``choice(...)``, ...) on the command line or in ``hydra.sweeper.params``, read
from ``<sweep dir>/multirun.yaml`` (which Hydra's sweeper writes before launching). Falls back to every override.

``${mimlab.scale:<size>,<factor>}``: ``round(size * factor)`` as an int, for sizes that follow a recipe's one size
knob (``data.img_size``): e.g. the 1333 longer-side cap of an 800-px multi-scale recipe, or the 2/3 sliding stride.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path

from omegaconf import OmegaConf

MAX_DIRNAME = 120
_ITEM = re.compile(r",(?=[\w.+~/@-]+=)")  # an item separator: a comma followed by the next "key="


def dirname(text: object) -> str:
    text = str(text).replace("/", "_")
    if len(text) <= MAX_DIRNAME:
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    return f"{text[: MAX_DIRNAME - 9]}-{digest}"


@lru_cache(maxsize=16)
def swept_keys(sweep_dir: str) -> frozenset[str]:
    """Keys with a sweep value in ``<sweep_dir>/multirun.yaml`` (empty if it cannot be read)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = Path(sweep_dir) / "multirun.yaml"
    if not path.exists():
        return frozenset()
    hydra_cfg = OmegaConf.load(path).hydra
    overrides = list(hydra_cfg.overrides.task)
    params = hydra_cfg.sweeper.get("params") or {}
    overrides += [f"{k}={v}" for k, v in params.items()]
    parsed = OverridesParser.create().parse_overrides(overrides)
    return frozenset(o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override())


def job_dirname(sweep_dir: object, override_dirname: object) -> str:
    items = [i for i in _ITEM.split(str(override_dirname)) if i]
    keys = swept_keys(str(sweep_dir))
    kept = [i for i in items if i.split("=", 1)[0].lstrip("+~") in keys] if keys else items
    return dirname(",".join(kept or items))


def scale(size: object, factor: object) -> int:
    return int(round(float(size) * float(factor)))  # type: ignore[arg-type]


def register() -> None:
    if not OmegaConf.has_resolver("mimlab.dirname"):
        OmegaConf.register_new_resolver("mimlab.dirname", dirname)
    if not OmegaConf.has_resolver("mimlab.job_dirname"):
        OmegaConf.register_new_resolver("mimlab.job_dirname", job_dirname)
    if not OmegaConf.has_resolver("mimlab.scale"):
        OmegaConf.register_new_resolver("mimlab.scale", scale)


register()
