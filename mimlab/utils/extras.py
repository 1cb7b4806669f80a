"""Optional dependencies (the package extras ``slurm``, ``shards``, ``coco``; ``all`` installs every one) imported when
a feature needs them, with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

# import name -> (distribution on the package index, extra of pyproject.toml that installs it)
OPTIONAL_MODULES = {
    "hydra_plugins.hydra_submitit_launcher": ("hydra-submitit-launcher", "slurm"),
    "webdataset": ("webdataset", "shards"),
    "pycocotools": ("pycocotools", "coco"),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the feature and ``pip install 'mimlab[<extra>]'``."""


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (one of :data:`OPTIONAL_MODULES` or a submodule of one) for ``feature``, or raise
    :class:`MissingExtraError` naming the extra that installs it."""
    top = next(name for name in OPTIONAL_MODULES if module == name or module.startswith(name + "."))
    try:
        return importlib.import_module(module)
    except ImportError as err:
        distribution, extra = OPTIONAL_MODULES[top]
        raise MissingExtraError(
            f"{feature} needs the optional package {distribution}, which is not installed ({err}). Install it with "
            f"pip install 'mimlab[{extra}]' (from a clone: pip install -e '.[{extra}]'; every extra: '.[all]')."
        ) from err
