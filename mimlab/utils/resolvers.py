"""OmegaConf resolvers used by conf/ (registered when ``mimlab.train`` is imported).

``${mimlab.dirname:<text>}``: ``text`` made safe as one folder name: ``/`` becomes ``_``, and text longer than
``MAX_DIRNAME`` characters is cut and suffixed with a short hash of the whole, so sweep job folders built from
``hydra.job.override_dirname`` stay unique and below the file-system's 255-byte name limit.
"""
from __future__ import annotations

import hashlib

from omegaconf import OmegaConf

MAX_DIRNAME = 120


def dirname(text: object) -> str:
    text = str(text).replace("/", "_")
    if len(text) <= MAX_DIRNAME:
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    return f"{text[:MAX_DIRNAME - 9]}-{digest}"


def register() -> None:
    if not OmegaConf.has_resolver("mimlab.dirname"):
        OmegaConf.register_new_resolver("mimlab.dirname", dirname)


register()
