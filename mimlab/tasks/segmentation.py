"""ADE20K semantic segmentation: UperNet (+ auxiliary FCN) on the multi-scale features of any mimlab backbone.

The backbone goes through :class:`~mimlab.models.necks.dense_adapter.DenseFeatureAdapter` (strides 4/8/16/32).
Training: batches ``(N, 3, crop, crop)`` images and ``(N, crop, crop)`` int64 labels (ignore 255); loss =
CE(UperNet) + ``aux_weight`` · CE(FCN on stride 16), logits upsampled bilinearly to the crop.
Validation: each full image (shorter side = crop) is predicted by sliding ``crop`` windows with ``stride``
(mmseg ``slide`` mode: 512 / 341), logits are resized to the original label size, and mIoU (classes present in
prediction or label) and pixel accuracy are accumulated with torchmetrics (``ignore_index=255``) and logged as
``val/mIoU`` and ``val/aAcc`` once per validation epoch.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from mimlab.data.ade20k import IGNORE_INDEX
from mimlab.models.necks.dense_adapter import DenseFeatureAdapter
from mimlab.optim import OptimizerFactory
from mimlab.utils.distributed import log_global


@torch.no_grad()
def slide_inference(
    predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, num_classes: int, crop: int, stride: int
) -> torch.Tensor:
    """Average ``predict`` logits over overlapping ``crop`` windows (mmseg ``slide_inference``).

    ``predict((N, 3, h, w)) -> (N, C, h, w)``; ``image`` (N, 3, H, W) → logits (N, C, H, W). Windows that would cross
    the border are shifted back inside; images smaller than ``crop`` are predicted whole.
    """
    n, _, h, w = image.shape
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    logits = image.new_zeros((n, num_classes, h, w))
    count = image.new_zeros((1, 1, h, w))
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            logits[:, :, y1:y2, x1:x2] += predict(image[:, :, y1:y2, x1:x2])
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


class UperNetSegmentation(L.LightningModule):
    """UperNet fine-tuning of a pre-trained backbone.

    Args:
        adapter: backbone + neck adapter giving strides 4/8/16/32.
        optim: the optimiser factory of the ``optim`` config group (``adamw_layer_decay_poly``: AdamW, layer-wise lr
            decay over the backbone's declared layer ids, warm-up + poly).
        decode_head: factory ``(in_channels) -> nn.Module`` (Hydra partial of ``UperNetHead``).
        aux_head: factory for the auxiliary head (``FCNHead`` on level 2) or ``None``; weighted by ``aux_weight``.
        num_classes: 150 for ADE20K.
        pretrained / load_neck: pre-training checkpoint (mimlab ``.ckpt`` or official file) filling the backbone (and
            the neck).
        crop_size, stride: training crop and sliding-window evaluation (512 / 341); the recipes set both from
            ``data.img_size`` (the one size knob). ``crop_size`` must be a multiple of the backbone's largest stride.
        monitor: the metric the best checkpoint follows (read by ``callbacks/dense``).
    """

    def __init__(
        self,
        adapter: DenseFeatureAdapter,
        decode_head: Callable[..., nn.Module],
        optim: OptimizerFactory,
        aux_head: Callable[..., nn.Module] | None = None,
        num_classes: int = 150,
        aux_weight: float = 0.4,
        pretrained: str | None = None,
        load_neck: bool = False,
        crop_size: int = 512,
        stride: int = 341,
        monitor: str = "val/mIoU",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["adapter", "decode_head", "aux_head", "optim"])
        adapter.check_input_size(crop_size, "crop_size")
        if pretrained:
            adapter.load_pretrained(pretrained, load_neck=load_neck)
        self.adapter = adapter
        self.decode_head = decode_head(in_channels=adapter.out_channels, num_classes=num_classes)
        self.aux_head = aux_head(in_channels=adapter.out_channels, num_classes=num_classes) if aux_head else None
        self.optim = optim
        self.val_miou = MulticlassJaccardIndex(num_classes, ignore_index=IGNORE_INDEX, average="macro")
        self.val_acc = MulticlassAccuracy(num_classes, ignore_index=IGNORE_INDEX, average="micro")

    @property
    def backbone(self) -> nn.Module:
        """The pre-trained backbone (the task contract: the param-group builder finds it here)."""
        return self.adapter.backbone

    def _logits(self, images: torch.Tensor, with_aux: bool = False):
        feats = list(self.adapter(images).values())
        size = images.shape[-2:]
        out = F.interpolate(self.decode_head(feats), size=size, mode="bilinear", align_corners=False)
        if with_aux and self.aux_head is not None:
            return out, F.interpolate(self.aux_head(feats), size=size, mode="bilinear", align_corners=False)
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W) -> (N, num_classes, H, W)`` logits of one forward pass (no sliding)."""
        return self._logits(images)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        labels = labels.as_subclass(torch.Tensor).long()
        out = self._logits(images, with_aux=True)
        main, aux = out if isinstance(out, tuple) else (out, None)
        loss_main = F.cross_entropy(main, labels, ignore_index=IGNORE_INDEX)
        loss = loss_main
        if aux is not None:
            loss_aux = F.cross_entropy(aux, labels, ignore_index=IGNORE_INDEX)
            loss = loss + self.hparams.aux_weight * loss_aux
            self.log("train/loss_aux", loss_aux, batch_size=len(images))
        self.log("train/loss_decode", loss_main, batch_size=len(images))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def predict_full(self, image: torch.Tensor, out_size) -> torch.Tensor:
        """Sliding-window logits of one (3, H, W) image resized to ``out_size``: (num_classes, *out_size)."""
        logits = slide_inference(
            self._logits,
            image[None],
            self.hparams.num_classes,  # type: ignore[attr-defined]
            self.hparams.crop_size,  # type: ignore[attr-defined]
            self.hparams.stride,  # type: ignore[attr-defined]
        )
        return F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)[0]

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        for image, label in zip(images, labels):
            label = label.as_subclass(torch.Tensor).long()
            pred = self.predict_full(image, label.shape[-2:]).argmax(0)
            self.val_miou.update(pred[None], label[None])
            self.val_acc.update(pred[None], label[None])

    def on_validation_epoch_end(self) -> None:
        log_global(self, "val/mIoU", self.val_miou.compute(), prog_bar=True)
        log_global(self, "val/aAcc", self.val_acc.compute())
        self.val_miou.reset()
        self.val_acc.reset()

    def configure_optimizers(self):
        return self.optim(self, self.trainer, self.trainer.datamodule.batch_size)
