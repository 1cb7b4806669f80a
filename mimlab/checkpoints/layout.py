"""What a converter of an official checkpoint layout declares; :func:`mimlab.checkpoints.load.pretrained_parts` tries
each :class:`Layout` on a file's keys and takes the first that matches.

A file may hold several models (I-JEPA: ``encoder``, ``predictor``, ``target_encoder``; data2vec 2.0: the student and
its EMA teacher ``_ema``). A layout that does names them in ``submodels``, the first being the default; the user picks
another with a ``::name`` suffix on the path (``task.pretrained=IN1K-vit.h.14-300e.pth.tar::encoder``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not fit the model; the message lists them."""


@dataclass(frozen=True)
class Converted:
    """A converter's result: the encoder's tensors in mimlab names (keys it does not know keep their file names, so
    the loader reports them); ``left_out``: the file keys that are not the encoder (decoder, predictor, teacher,
    buffers); ``notes``: renamings worth a log line."""

    backbone: dict[str, Tensor]
    left_out: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Layout:
    """``matches(checkpoint)`` and ``convert(checkpoint, submodel)`` of one official layout. Both take the flat state
    dict (unwrapped, ``module.`` removed) unless ``raw``: then the file's top-level mapping (I-JEPA keeps its models
    side by side). ``submodels``: the models the file holds, default first (``convert`` gets one of them, or None)."""

    name: str
    matches: Callable[[Mapping[str, Any]], bool]
    convert: Callable[[Mapping[str, Any], str | None], Converted]
    submodels: tuple[str, ...] = ()
    raw: bool = False


def strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``state`` with ``prefix`` removed from every key that has it."""
    return {k.removeprefix(prefix): v for k, v in state.items()}
