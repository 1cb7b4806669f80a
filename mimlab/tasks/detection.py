"""COCO instance detection / segmentation with torchvision's Mask R-CNN on any mimlab backbone.

The backbone goes through :class:`~mimlab.models.necks.dense_adapter.DenseFeatureAdapter` (ViT → simple FPN,
ConvNeXt V2 → FPN, iTPN → its pre-trained pyramid) which returns 256-channel maps at strides 4..64 named
``"0".."3", "pool"``. Images arrive as lists of (3, H, W) floats in [0, 1]; the data pipeline does the training
rescaling (LSJ or multi-scale), so the detector's own transform only normalises, resizes at *evaluation*
(``min_size``/``max_size``) and pads to a multiple of 32.

Validation computes COCO box and mask mAP with ``torchmetrics.detection.MeanAveragePrecision`` (pycocotools backend:
the official COCOeval, crowd regions honoured through ``iscrowd``/``area``) and logs ``val/bbox_mAP``, ``val/segm_mAP``
(the AP50/AP75/S/M/L variants and the recall ``val/{bbox,segm}_mAR_100``) once per validation epoch. Under DDP every
rank evaluates its own block of validation images and the per-image results are gathered in data set order before
COCOeval runs, so the figures are those of one process.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from mimlab.models.necks.dense_adapter import DenseFeatureAdapter
from mimlab.optim import OptimizerFactory
from mimlab.utils.distributed import gather_list_states, log_global
from mimlab.utils.extras import require


class _EvalResizeTransform(GeneralizedRCNNTransform):
    """Normalise + batch always; resize only in eval mode (training scale augmentation lives in the data pipeline)."""

    def resize(self, image, target=None):
        if self.training:
            return image, target
        return super().resize(image, target)


class _DetectorBackbone(nn.Module):
    """torchvision wants ``out_channels: int``; this holds the adapter and checks its levels share one width."""

    def __init__(self, adapter: DenseFeatureAdapter):
        super().__init__()
        if len(set(adapter.out_channels)) != 1:
            raise ValueError(
                f"Mask R-CNN needs one width on every level; the adapter gives {adapter.out_channels}. "
                f"Add a neck (SimpleFeaturePyramid / TorchvisionFPN) with out_channels=256."
            )
        self.adapter = adapter
        self.out_channels = adapter.out_channels[0]

    def forward(self, x):
        return self.adapter(x)


class MaskRCNNDetection(L.LightningModule):
    """Mask R-CNN fine-tuning of a pre-trained backbone.

    Args:
        adapter: backbone + neck adapter with 5 levels (s4..s64, last named ``pool``).
        optim: the optimiser factory of the ``optim`` config group (``adamw_layer_decay_multistep``: AdamW, layer-wise
            lr decay over the backbone's declared layer ids, warm-up + multi-step).
        num_classes: object classes without background (80 for COCO).
        pretrained: pre-training checkpoint (mimlab ``.ckpt`` or official file) filling the backbone (and, with
            ``load_neck``, the neck).
        min_size, max_size: evaluation resize (shorter side / longer side cap) of the detector transform; the recipes
            set both from ``data.img_size`` (the one size knob). ``min_size`` must be a multiple of the backbone's
            largest stride.
        anchor_sizes: one anchor size per level; ``None`` follows the input size: ``min_size/32 · (1, 2, 4, 8, 16)``
            (32..512 at 1024 px, ViTDet's).
        box_score_thresh: detections scoring below it are dropped before evaluation (0.05 as Detectron2/torchvision).
        conv_heads: 4conv1fc box head + normed 4-conv mask head + 2-conv RPN (ViTDet / iTPN / torchvision v2 style)
            instead of the 2-fc box head of the original Mask R-CNN.
        head_channels, representation_size: RoI head widths (256 / 1024 in the paper configs).
        monitor: the metric the best checkpoint follows (read by ``callbacks/dense``).
        box_batch_size_per_image, rpn_pre_nms_top_n, rpn_post_nms_top_n: RoI sampling / proposal counts (512, 2000,
            1000 as torchvision; CPU-fast configs shrink them).
    """

    def __init__(
        self,
        adapter: DenseFeatureAdapter,
        optim: OptimizerFactory,
        num_classes: int,
        pretrained: str | None = None,
        load_neck: bool = False,
        min_size: int = 1024,
        max_size: int = 1024,
        anchor_sizes: Sequence[int] | None = None,
        conv_heads: bool = True,
        head_channels: int = 256,
        representation_size: int = 1024,
        box_batch_size_per_image: int = 512,
        rpn_pre_nms_top_n: int = 2000,
        rpn_post_nms_top_n: int = 1000,
        detections_per_img: int = 100,
        box_score_thresh: float = 0.05,
        mask_threshold: float = 0.5,
        monitor: str = "val/bbox_mAP",
    ):
        require("pycocotools", "task=detect (COCO box and mask mAP)")
        super().__init__()
        self.save_hyperparameters(ignore=["adapter", "optim"])
        adapter.check_input_size(min_size, "min_size")
        if pretrained:
            adapter.load_pretrained(pretrained, load_neck=load_neck)
        backbone = _DetectorBackbone(adapter)
        names = adapter.names()
        if anchor_sizes is None:
            anchor_sizes = [max(1, round(min_size / 32)) * 2**i for i in range(len(names))]
        if len(names) != len(anchor_sizes):
            raise ValueError(
                f"anchor_sizes has {len(anchor_sizes)} entries but the adapter gives {len(names)} levels {names}."
            )
        c = backbone.out_channels
        kwargs = {}
        if conv_heads:
            kwargs = dict(
                rpn_head=RPNHead(c, 3, conv_depth=2),
                box_head=FastRCNNConvFCHead(
                    (c, 7, 7), [head_channels] * 4, [representation_size], norm_layer=nn.BatchNorm2d
                ),
                box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
                mask_head=MaskRCNNHeads(c, [head_channels] * 4, 1, norm_layer=nn.BatchNorm2d),
                mask_predictor=MaskRCNNPredictor(head_channels, head_channels, num_classes + 1),
            )
            num_classes_arg = None
        else:
            num_classes_arg = num_classes + 1
        self.model = MaskRCNN(
            backbone,
            num_classes=num_classes_arg,
            rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(names)),
            box_roi_pool=MultiScaleRoIAlign(names[:-1], 7, 2),
            mask_roi_pool=MultiScaleRoIAlign(names[:-1], 14, 2),
            box_detections_per_img=detections_per_img,
            box_batch_size_per_image=box_batch_size_per_image,
            box_score_thresh=box_score_thresh,
            rpn_pre_nms_top_n_train=rpn_pre_nms_top_n,
            rpn_pre_nms_top_n_test=min(rpn_pre_nms_top_n, 1000),
            rpn_post_nms_top_n_train=rpn_post_nms_top_n,
            rpn_post_nms_top_n_test=rpn_post_nms_top_n,
            **kwargs,
        )
        self.model.transform = _EvalResizeTransform(
            min_size,
            max_size,
            self.model.transform.image_mean,
            self.model.transform.image_std,
            size_divisible=adapter.size_divisible,
        )
        self.optim = optim
        with torch.device("cpu"):  # the metric builds its COCO thresholds with .tolist(): not on the meta device
            self.val_map = MeanAveragePrecision(iou_type=("bbox", "segm"), backend="pycocotools", sync_on_compute=False)

    @property
    def adapter(self) -> DenseFeatureAdapter:
        return self.model.backbone.adapter

    @property
    def backbone(self) -> nn.Module:
        """The pre-trained backbone (the task contract: the param-group builder finds it here)."""
        return self.adapter.backbone

    @staticmethod
    def _train_targets(targets: list[dict]) -> list[dict]:
        return [{k: t[k] for k in ("boxes", "labels", "masks")} for t in targets]

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        return self.model(images)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        losses = self.model(images, self._train_targets(targets))
        loss = sum(losses.values())
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(images))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def to_metric_inputs(self, preds: list[dict], targets: list[dict]) -> tuple[list[dict], list[dict]]:
        """Detections and targets in the ``MeanAveragePrecision`` format (bool (K, H, W) masks)."""
        thr = self.hparams.mask_threshold  # type: ignore[attr-defined]
        p = [
            {
                "boxes": d["boxes"],
                "scores": d["scores"],
                "labels": d["labels"],
                "masks": (d["masks"][:, 0] > thr) if d["masks"].ndim == 4 else d["masks"].bool(),
            }
            for d in preds
        ]
        t = [
            {
                "boxes": g["boxes"].as_subclass(torch.Tensor),
                "labels": g["labels"],
                "masks": g["masks"].bool(),
                **({"iscrowd": g["iscrowd"]} if "iscrowd" in g else {}),
                **({"area": g["area"]} if "area" in g else {}),
            }
            for g in targets
        ]
        return p, t

    def validation_step(self, batch, batch_idx):
        images, targets = batch
        preds, gts = self.to_metric_inputs(self.model(images), targets)
        self.val_map.update(preds, gts)

    def on_validation_epoch_end(self) -> None:
        gather_list_states(self.val_map)  # every rank's images, in data set order (exactly the 1-process figure)
        res = self.val_map.compute()
        self.val_map.reset()
        for iou in ("bbox", "segm"):
            for k in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100"):
                key = f"{iou}_{k}"
                if key in res:
                    name = k.replace("map", "mAP").replace("mar", "mAR")
                    log_global(self, f"val/{iou}_{name}", res[key].float(), prog_bar=k == "map")

    def configure_optimizers(self):
        return self.optim(self, self.trainer, self.trainer.datamodule.batch_size)
