"""Frozen CLIP image-tower target for iTPN-CLIP (docs/methods.md §4.4).

``T = LayerNorm_no_affine(head(norm(tokens))[:, prefix:])`` — every patch token of the teacher after ``ln_post`` and the
visual projection (timm's CLIP ViTs hold OpenAI's ``visual.proj`` as ``head``), normalised without affine.
The teacher sees the same image as the student: the student's normalisation (``input_mean/std``) is undone and
CLIP's mean/std is applied; with ``teacher_size`` the view is resized first (e.g. 196 for ViT-L/14).

Output (N, L, T) with L the number of student mask units (the teacher token grid must equal the unit grid).
The teacher is never trained: ``requires_grad=False``, always in eval mode, run under ``torch.no_grad``.
Weights come from a **local** file (``checkpoint_path``): an OpenAI/open-clip ``visual.*`` state dict or a timm state
dict (both go through timm's ``checkpoint_filter_fn``). No downloads; ``checkpoint_path=None`` keeps random weights
(tests only).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimlab.targets.base import Target

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_teacher_weights(teacher: nn.Module, path: str | Path) -> None:
    """Load a local CLIP checkpoint into a timm VisionTransformer (strict), with a clear error if it is absent."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"target.checkpoint_path={path} does not exist. mimlab never downloads teachers: save the CLIP image tower "
            "(OpenAI 'visual.*' or timm layout) to a local file and point target.checkpoint_path at it."
        )
    from mimlab.checkpoints.files import read_state_dict

    state = read_state_dict(path)
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if isinstance(teacher, VisionTransformer):
        state = checkpoint_filter_fn(state, teacher)
    missing, unexpected = teacher.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"{path}: does not match target.teacher; missing {missing[:8]}, unexpected {unexpected[:8]}")


class ClipTeacherTarget(Target):
    """Args: teacher (a timm VisionTransformer with ``head`` = visual projection; instantiated by Hydra),
    checkpoint_path (local file or None), teacher_size (resize the teacher view; None = same as the student),
    input_mean/std (normalisation of the images the student sees), clip_mean/std."""

    from_teacher = True

    def __init__(
        self,
        teacher: nn.Module,
        checkpoint_path: str | None = None,
        teacher_size: int | None = None,
        input_mean: tuple[float, ...] = IMAGENET_MEAN,
        input_std: tuple[float, ...] = IMAGENET_STD,
        clip_mean: tuple[float, ...] = CLIP_MEAN,
        clip_std: tuple[float, ...] = CLIP_STD,
    ) -> None:
        super().__init__()
        if checkpoint_path:
            load_teacher_weights(teacher, checkpoint_path)
        else:
            warnings.warn(
                "target.checkpoint_path is not set: the CLIP teacher keeps RANDOM weights (fine for tests, "
                "meaningless for pre-training)",
                stacklevel=2,
            )
        self.teacher = teacher.requires_grad_(False).eval()
        self.teacher_size = teacher_size
        self.num_prefix = int(getattr(teacher, "num_prefix_tokens", 1))
        scale = torch.tensor(input_std) / torch.tensor(clip_std)
        shift = (torch.tensor(input_mean) - torch.tensor(clip_mean)) / torch.tensor(clip_std)
        self.register_buffer("scale", scale.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> ClipTeacherTarget:
        super().train(mode)
        self.teacher.eval()  # frozen: dropout / drop-path off at all times
        return self

    @torch.no_grad()
    def forward(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        """(N, 3, H, W) student-normalised images -> (N, L, T) LayerNorm'd teacher patch features."""
        x = images * self.scale + self.shift  # type: ignore[operator]  # = (images * std_in + mean_in - mean_clip) / std_clip
        if self.teacher_size is not None and x.shape[-1] != self.teacher_size:
            x = F.interpolate(x, size=(self.teacher_size, self.teacher_size), mode="bicubic", align_corners=False)
        tokens = self.teacher.forward_features(x)[:, self.num_prefix :]  # type: ignore[operator]
        feats = self.teacher.head(tokens) if hasattr(self.teacher, "head") else tokens  # type: ignore[operator]
        if mask is not None and feats.shape[1] != mask.shape[1]:
            raise ValueError(
                f"CLIP teacher gives {feats.shape[1]} tokens but the mask has {mask.shape[1]} units; "
                "set target.teacher_size so that the teacher's token grid equals the unit grid"
            )
        return F.layer_norm(feats.float(), feats.shape[-1:])
