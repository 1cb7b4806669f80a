"""How the parts of a method are built from the parts they attach to, so no config reads another group's keys.

A mask generator, neck, target or decoder config names its class's ``attach`` classmethod with Hydra
``_partial_: true`` and states only its own settings; the task calls that factory with the :class:`Parts` built before
it, in this order::

    masking = masking(Parts(backbone))
    neck    = neck(Parts(backbone, masking))
    target  = target(Parts(backbone, masking, neck))
    decoder = decoder(Parts(backbone, masking, neck, target))

``attach`` reads widths, strides and the input size from the backbone contract (``out_channels``, ``out_strides``,
``num_features``, ``img_size``, ``in_chans``; :mod:`mimlab.models.backbones.contract`), the mask unit from the mask
generator, the pyramid width from the neck, the target width from the target; an EMA teacher is a copy of the
backbone, and a mask unit left unset is one token of the backbone's final map. A part that needs more than the
contract (a head that mirrors HiViT's blocks) says so with :meth:`Parts.require`, which fails at build time with a
:class:`CompositionError` naming the part. A part given built (tests; configs of checkpoints written before this
convention) is used as it is.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from torch import nn

if TYPE_CHECKING:
    from mimlab.masking.base import MaskGenerator
    from mimlab.models.backbones.contract import Backbone
    from mimlab.targets.base import Target

T = TypeVar("T")


class CompositionError(ValueError):
    """The parts chosen in the config do not fit together; raised before any training step."""


@dataclass(frozen=True)
class Parts:
    """The parts built so far: ``backbone`` (checked against the contract: :func:`check_backbone`'s result) always;
    ``masking``, ``neck`` and ``target`` once built (else None)."""

    backbone: Backbone
    masking: MaskGenerator | None = None
    neck: nn.Module | None = None
    target: Target | None = None

    def require(self, slot: str, kind: type[T], part: str) -> T:
        """The part in ``slot`` ("backbone", "masking", "neck", "target") as a ``kind``, or a CompositionError saying
        that ``part`` attaches only to one."""
        value = getattr(self, slot)
        if not isinstance(value, kind):
            raise CompositionError(
                f"{part} attaches to a {kind.__name__} {slot}, but this composition's {slot} is "
                f"{type(value).__name__}: choose a {slot} config that fits it, or another part"
            )
        return value

    @property
    def img_size(self) -> int:
        """The input size the backbone is built for (a part with a fixed position grid needs one)."""
        if self.backbone.img_size is None:
            raise CompositionError(
                f"this part has a fixed position grid, but the backbone ({type(self.backbone).__name__}) takes any "
                "input size (img_size None): choose a part without one"
            )
        return self.backbone.img_size

    def backbone_copy(self) -> nn.Module:
        """A copy of the backbone (an EMA teacher of the same architecture)."""
        return cast(nn.Module, copy.deepcopy(self.backbone))

    @property
    def unit_size(self) -> int:
        """Pixels per side of a mask unit (the mask generator's ``unit_size``)."""
        if self.masking is None:
            raise CompositionError("this part needs the mask generator, which is built only for pre-training")
        return int(self.masking.unit_size)

    @property
    def neck_width(self) -> int:
        """Channels of the neck's outputs (its ``out_channels``, one width for every level)."""
        widths = set(getattr(self.neck, "out_channels", ()) or ())
        if len(widths) != 1:
            raise CompositionError(
                f"this part reads one width from the neck, but the neck ({type(self.neck).__name__}) declares "
                f"out_channels={sorted(widths)}: add a neck with one out_channels width (e.g. model/neck=itpn_pyramid)"
            )
        return int(widths.pop())

    @property
    def target_dim(self) -> int:
        """Width of one target token (the target's declared ``dim``)."""
        dim = None if self.target is None else self.target.dim
        if dim is None:
            raise CompositionError(
                f"this part predicts the target's width, but the target ({type(self.target).__name__}) declares no dim"
            )
        return int(dim)


PartFactory = Callable[[Parts], Any]


def build(part: Any, parts: Parts) -> Any:
    """The factory ``part`` (a ``functools.partial``: Hydra's ``_partial_``) called with ``parts``, the factories among
    its settings built first for the same parts (an EMA target's pixel target, a mask generator's base); anything else
    (a built part, None) as it is."""
    if not isinstance(part, functools.partial):
        return part
    settings = {key: build(value, parts) for key, value in part.keywords.items()}
    return part.func(*part.args, parts, **settings)
