"""Frozen feature teacher: turns an image into a grid of deep-feature tokens (the Img2Vec target).

The teacher is any timm model (CNN or ViT) built by name with random weights, or any ``nn.Module``
given directly (e.g. through Hydra ``_target_``). Pretrained weights come only from a local file
(``checkpoint``); nothing is downloaded. DINO ResNet-50 checkpoints use the torchvision key layout,
which timm's ``resnet50`` shares, so they load as they are.

The teacher is frozen three ways: ``requires_grad_(False)``, ``torch.no_grad()`` in ``forward``, and
eval mode that survives ``.train()`` (BatchNorm running statistics never move). By default its weights
are left out of ``state_dict()`` (they are fixed and reloaded from ``checkpoint``), so Lightning
checkpoints do not carry 25-300 M frozen parameters; loading a state dict without teacher keys keeps
the current teacher weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimlab.checkpoints.files import read_state_dict
from mimlab.models.parts import Parts
from mimlab.targets.base import Target

log = logging.getLogger(__name__)

# Prefixes of teacher files beyond DDP's: DINO's ``backbone.``, ``torch.compile``'s ``_orig_mod.``, ``encoder.``
TEACHER_PREFIXES = ("module.", "backbone.", "_orig_mod.", "encoder.")


def load_teacher_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Loads a local checkpoint into ``model``; every parameter/buffer of ``model`` must be found.

    Keys the model does not have (a classifier ``fc.*``, DINO's projection ``head.*``) are ignored.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"target.checkpoint: teacher checkpoint '{path}' does not exist. Give a local file "
            "(e.g. DINO ResNet-50 weights) or set target.checkpoint=null for a random teacher."
        )
    state = read_state_dict(path, TEACHER_PREFIXES)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise KeyError(
            f"target.checkpoint: '{path}' lacks {len(missing)} teacher keys, e.g. {missing[:5]}; "
            f"it has e.g. {list(state)[:5]}. Is target.teacher the architecture of this checkpoint?"
        )
    ignored = [k for k in state if k not in expected]
    model.load_state_dict({k: state[k] for k in expected}, strict=True)
    log.info("teacher: loaded %d tensors from %s (ignored %d: %s)", len(expected), path, len(ignored), ignored[:5])


def teacher_feature_map(model: nn.Module, images: Tensor) -> Tensor:
    """Last-stage feature map of ``model``: ``(N, 3, H, W) -> (N, C, h, w)``.

    timm models (CNNs and ViTs alike) use ``forward_intermediates`` (ViT prefix tokens dropped, final
    norm applied); other modules must return an ``(N, C, h, w)`` map from ``forward_features`` or ``forward``.
    """
    if hasattr(model, "forward_intermediates"):
        return model.forward_intermediates(images, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)[-1]  # type: ignore[operator]
    out = model.forward_features(images) if hasattr(model, "forward_features") else model(images)  # type: ignore[operator]
    if not isinstance(out, Tensor) or out.ndim != 4:
        raise ValueError(
            f"teacher {type(model).__name__} must return an (N, C, h, w) feature map, got "
            f"{getattr(out, 'shape', type(out))}; use a timm model name for target.teacher"
        )
    return out


class FrozenTeacher(Target):
    """Frozen teacher target: ``forward(images (N,3,H,W), mask) -> (N, C, H/stride, W/stride)``.

    Token ``(r, c)`` of the returned map covers pixels ``[r*stride, (r+1)*stride) x [c*stride, ...)``;
    flattened row-major it lines up with mask units of size ``stride`` (``mask[n, r*w + c]``, 1 = masked).
    The teacher always sees the full, unmasked image, so ``mask`` is accepted for the target contract
    and ignored.

    Args:
        teacher: a timm model name (built with random weights, ``num_classes=0``) or an ``nn.Module``.
        checkpoint: local weights file, or ``None`` for a random teacher (tests, token-diversity baselines).
        stride: expected output stride; checked on every call (clear error instead of a silent misfit).
        dim: expected channel count ``C``; checked at construction time when given.
        norm_tokens: layer-normalise each token over ``C`` (no affine) before returning. Off in the
            Img2Vec recipe: the review does not mention any target normalisation.
        keep_in_checkpoint: include teacher weights in ``state_dict()`` (off: they are reloaded from
            ``checkpoint`` when the run is rebuilt from its config).
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``img_size`` for ViT teachers).
        init_seed: seed of the random initialisation of a teacher built by name (``None``: global RNG). Because
            teacher weights are not checkpointed, this keeps a random teacher identical across resumes and ranks.
    """

    from_teacher = True

    @classmethod
    def attach(cls, parts: Parts, match_img_size: bool = False, **settings: Any) -> FrozenTeacher:
        """``match_img_size``: build the timm teacher for the backbone's input size (``model_kwargs.img_size``; ViT
        teachers with a fixed position embedding)."""
        if match_img_size:
            settings["model_kwargs"] = {**(settings.get("model_kwargs") or {}), "img_size": parts.img_size}
        return cls(**settings)

    def __init__(
        self,
        teacher: str | nn.Module,
        checkpoint: str | None = None,
        stride: int | None = None,
        dim: int | None = None,
        norm_tokens: bool = False,
        keep_in_checkpoint: bool = False,
        model_kwargs: dict | None = None,
        init_seed: int | None = 0,
    ) -> None:
        super().__init__()
        if isinstance(teacher, str):
            with torch.random.fork_rng(devices=[]):  # a random teacher is the same in every run / resume / rank
                if init_seed is not None:
                    torch.manual_seed(init_seed)
                teacher = timm.create_model(teacher, pretrained=False, num_classes=0, **dict(model_kwargs or {}))
        elif model_kwargs:
            raise ValueError("target.model_kwargs only applies when target.teacher is a timm model name")
        if checkpoint:
            load_teacher_checkpoint(teacher, checkpoint)
        else:
            log.warning(
                "target.checkpoint is null: the %s teacher has random weights (fine for tests and "
                "token-diversity baselines, not for reproducing Img2Vec)",
                type(teacher).__name__,
            )
        self.teacher = teacher.requires_grad_(False).eval()
        self.stride, self.norm_tokens, self.keep_in_checkpoint = stride, norm_tokens, keep_in_checkpoint
        self.dim = dim if dim is not None else self._infer_dim()
        if dim is not None and self._infer_dim() not in (None, dim):
            raise ValueError(f"target.dim={dim} but teacher {self._name()} outputs {self._infer_dim()} channels")
        self.register_state_dict_post_hook(FrozenTeacher._drop_teacher_keys)
        self.register_load_state_dict_pre_hook(FrozenTeacher._fill_teacher_keys)

    def _name(self) -> str:
        return type(self.teacher).__name__

    def _infer_dim(self) -> int | None:
        return getattr(self.teacher, "num_features", None)

    def train(self, mode: bool = True) -> FrozenTeacher:
        super().train(mode)
        self.teacher.eval()  # BatchNorm statistics and dropout stay frozen whatever the task does
        return self

    @torch.no_grad()
    def forward(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        fmap = teacher_feature_map(self.teacher, images).float()
        if self.stride is not None:
            expected = (images.shape[-2] // self.stride, images.shape[-1] // self.stride)
            if tuple(fmap.shape[-2:]) != expected:
                raise ValueError(
                    f"target.stride={self.stride}: teacher {self._name()} gave a {tuple(fmap.shape[-2:])} grid "
                    f"for {tuple(images.shape[-2:])} images, expected {expected}"
                )
        if self.norm_tokens:
            fmap = F.layer_norm(fmap.movedim(1, -1), fmap.shape[1:2]).movedim(-1, 1)
        return fmap

    # -- checkpoint hygiene: teacher weights are config-derived, not training state --------------
    @staticmethod
    def _drop_teacher_keys(module: FrozenTeacher, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        if not module.keep_in_checkpoint:
            for key in [k for k in state_dict if k.startswith(prefix + "teacher.")]:
                del state_dict[key]

    @staticmethod
    def _fill_teacher_keys(module: FrozenTeacher, state_dict: dict, prefix: str, *args: Any) -> None:
        if not any(k.startswith(prefix + "teacher.") for k in state_dict):
            for key, value in module.teacher.state_dict().items():
                state_dict[prefix + "teacher." + key] = value
