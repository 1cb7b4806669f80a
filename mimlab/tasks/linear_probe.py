"""Linear probing (MAE ``main_linprobe.py``): a frozen backbone, BatchNorm(affine=False) + Linear head, LARS.

``images (N, C, H, W) -> frozen features (N, D) (ViT: final-normed cls token; others: pooled last map)
-> BatchNorm1d(D, affine=False, eps=1e-6) -> Linear -> logits (N, K)``; plain cross-entropy. The backbone stays in
eval mode (no drop path, frozen statistics) and its features are computed without autograd.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mimlab.tasks.finetune import ImageClassification


class LinearProbe(ImageClassification):
    """See module docstring; arguments as :class:`~mimlab.tasks.finetune.ImageClassification`."""

    def on_head_built(self) -> None:
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.backbone.eval()  # frozen: always in eval mode
        return self

    def forward(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            features = self.features(self.backbone, images)
        return self.head(features.detach())  # type: ignore[misc]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = batch[0], batch[1]
        logits = self(images)
        loss = nn.functional.cross_entropy(logits, labels)
        acc = (logits.argmax(-1) == labels).float().mean() * 100
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=images.shape[0])
        self.log("train/acc1", acc, on_step=False, on_epoch=True, batch_size=images.shape[0], sync_dist=True)
        return loss
