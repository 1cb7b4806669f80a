"""EMA teachers: the shared mechanism (:class:`EMATeacher`, momentum schedules) and the iTPN MFM target.

``EMATeacher`` keeps a copy of the student backbone that follows it by exponential moving average after every
optimiser step (``t ← m(p)·t + (1 − m(p))·s``, p = training progress in [0, 1]), never receives gradients, stays in
eval mode and is hard-synced to the student once before training (``sync_``). It is the base of every EMA-teacher
target: iTPN MFM (below), data2vec 2.0 (``targets/data2vec.py``), I-JEPA (``targets/ijepa.py``).

iTPN masked feature modeling (MFM):

What the paper says (Tian et al. CVPR'23 §3): MFM complements pixel MIM by
giving the feature pyramid **multi-stage supervision**; the targets are intermediate features computed on the
**original (unmasked) image** by a **moving-averaged backbone**, and **each pyramid level** reconstructs them; the total
loss is the pixel reconstruction loss **plus** the MFM losses (three of them in the paper's figure).

What is **our choice** (no public code exists; docs/methods.md §4.3 marks all of it UNVERIFIED):
* the teacher is an EMA copy of the student *backbone only* (not the pyramid), built from the same config;
  it is hard-synced to the student before training (``mimlab.callbacks.ema_teacher_sync.EMATeacherSync``, or the
  first ``update`` call otherwise) and never receives gradients;
* momentum follows a cosine schedule from ``momentum`` (0.996) to ``final_momentum`` (1.0) over training progress
  (BYOL/DINO/data2vec convention): ``m(p) = final - (final - base) · (cos(π p) + 1) / 2``;
* which teacher stage each pyramid level predicts is ``stages`` (indices into (f4, f8, x16)); the default
  ``(2, 2, 2)`` takes every target from the teacher's **final stage**; ``(0, 1, 2)`` pairs each level with the
  teacher stage of the same stride (the paper's "intermediate features", read literally);
* targets are LayerNorm'd without affine per sub-token (as iTPN-CLIP does for its teacher) and flattened per unit;
* the loss type and weights live in the loss config (``WeightedLossSum``), not here.

``forward(images, mask) -> {"pixels": pixel_target(images, mask), "s4": (N, L, d4), "s8": (N, L, d8), "s16": (N, L, d16)}``
with ``d = r²·C`` of the chosen teacher stage (r = 4, 2, 1 sub-tokens per unit side). Mask: (N, L), 1 = masked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimlab.models.parts import Parts
from mimlab.targets.base import Target

LEVELS = ("s4", "s8", "s16")


def cosine_momentum(base: float, final: float, progress: float) -> float:
    """Cosine ramp from ``base`` at progress 0 to ``final`` at progress 1."""
    progress = min(max(progress, 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class CosineMomentum:
    """``m(p)`` = :func:`cosine_momentum` from ``start`` to ``end`` over training (BYOL / DINO; iTPN MFM here)."""

    def __init__(self, start: float = 0.996, end: float = 1.0) -> None:
        _check_momentum(start, end)
        self.start, self.end = start, end

    def __call__(self, progress: float) -> float:
        return cosine_momentum(self.start, self.end, progress)


class LinearMomentum:
    """``m(p) = start + (end − start) · min(p / anneal_end, 1)``: a linear ramp that reaches ``end`` at progress
    ``anneal_end`` and stays there. I-JEPA: 0.996 → 1.0 over all of training (``anneal_end=1``); data2vec 2.0:
    0.9998 → 0.99999 over its first 100k of 375.3k updates (fairseq ``get_annealed_rate``, ``anneal_end=0.2665``)."""

    def __init__(self, start: float, end: float, anneal_end: float = 1.0) -> None:
        _check_momentum(start, end)
        if not 0.0 < anneal_end <= 1.0:
            raise ValueError(f"target.momentum.anneal_end must be in (0, 1], got {anneal_end}")
        self.start, self.end, self.anneal_end = start, end, anneal_end

    def __call__(self, progress: float) -> float:
        return self.start + (self.end - self.start) * min(max(progress, 0.0) / self.anneal_end, 1.0)


def _check_momentum(start: float, end: float) -> None:
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"need 0 <= target.momentum.start ({start}) <= target.momentum.end ({end}) <= 1")


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: ``t ← m·t + (1 − m)·s`` for every parameter; buffers are copied."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError(
            "EMA teacher and student have different parameter lists; build target.teacher from the "
            "same config as model.backbone"
        )
    torch._foreach_lerp_(t_params, [s.to(t.dtype) for s, t in zip(s_params, t_params)], 1.0 - momentum)  # type: ignore[arg-type]
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)


class EMATeacher(Target):
    """Base of EMA-teacher targets. Args: teacher (built from the same config as the student backbone), momentum
    (a schedule ``progress -> m``, e.g. :class:`LinearMomentum`). Subclasses implement ``forward(images, mask)``."""

    from_teacher = True

    def __init__(self, teacher: nn.Module, momentum: Callable[[float], float]) -> None:
        super().__init__()
        self.teacher = teacher.requires_grad_(False).eval()
        self.momentum_schedule = momentum
        self.register_buffer("synced", torch.zeros((), dtype=torch.bool))
        self.current_momentum = momentum(0.0)

    @classmethod
    def attach(cls, parts: Parts, **settings: Any) -> EMATeacher:
        """The teacher is a copy of the student backbone (the same architecture; synced again before the first
        step, :meth:`sync_`)."""
        return cls(teacher=parts.backbone_copy(), **settings)

    def train(self, mode: bool = True) -> EMATeacher:
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def sync_(self, student: nn.Module) -> bool:
        """Copy the student into the teacher once (no-op when already synced, e.g. after a resume); True if copied."""
        if bool(self.synced):
            return False
        ema_update_(self.teacher, student, 0.0)
        self.synced.fill_(True)  # type: ignore[operator]
        return True

    @torch.no_grad()
    def update(self, student: nn.Module, progress: float) -> None:
        """Hard copy if never synced (see ``sync_``), else ``t ← m(p)·t + (1 − m(p))·s`` (``m`` = the momentum schedule)."""
        if self.sync_(student):
            return
        self.current_momentum = self.momentum_schedule(progress)
        ema_update_(self.teacher, student, self.current_momentum)


class EMATeacherTarget(EMATeacher):
    """iTPN MFM target. Args: teacher (a copy of the hierarchical student: its encoding's ``pyramid`` gives the
    levels), pixel_target (e.g. ``NormPixTarget``; None = no pixel term), momentum/final_momentum (cosine schedule),
    stages (teacher stage per pyramid level s4/s8/s16), normalize (LayerNorm targets without affine)."""

    def __init__(
        self,
        teacher: nn.Module,
        pixel_target: nn.Module | None = None,
        momentum: float = 0.996,
        final_momentum: float = 1.0,
        stages: tuple[int, int, int] | list[int] = (2, 2, 2),
        normalize: bool = True,
    ) -> None:
        if len(stages) != 3 or any(s not in (0, 1, 2) for s in stages):
            raise ValueError(f"target.stages must be three indices into (f4, f8, x16), got {stages}")
        if not 0.0 <= momentum <= final_momentum <= 1.0:
            raise ValueError(f"need 0 <= target.momentum ({momentum}) <= target.final_momentum ({final_momentum}) <= 1")
        super().__init__(teacher, CosineMomentum(momentum, final_momentum))
        self.pixel_target = pixel_target
        self.momentum, self.final_momentum = momentum, final_momentum
        self.stages, self.normalize = tuple(stages), normalize

    def _flat(self, f: Tensor) -> Tensor:
        if self.normalize:
            f = F.layer_norm(f.float(), f.shape[-1:])
        return f.flatten(2)  # (N, L, r, r, C) -> (N, L, r*r*C); (N, L, C) unchanged

    @torch.no_grad()
    def forward(self, images: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        feats = self.teacher(images).pyramid  # full, unmasked image
        out = {name: self._flat(feats[s]) for name, s in zip(LEVELS, self.stages)}
        if self.pixel_target is not None:
            out["pixels"] = self.pixel_target(images, mask)
        return out

    @property
    def pixel_view(self) -> bool:
        return self.pixel_target is not None

    def to_image(self, pred: dict[str, Tensor], images: Tensor) -> Tensor:
        """Pixel view of the pixel head's prediction (for reconstruction panels)."""
        if self.pixel_target is None:
            raise ValueError("EMATeacherTarget has no pixel_target, so there is no pixel prediction to show")
        return self.pixel_target.to_image(pred["pixels"], images)  # type: ignore[operator]
