"""Supervised fine-tuning of a pre-trained backbone on an ImageNet-layout data set (MAE / ConvNeXt V2 / iTPN recipes).

``images (N, C, H, W) -> features(backbone, images) (N, D) -> head -> logits (N, K)``. The backbone is any module of
the backbone contract (:mod:`mimlab.models.backbones.contract`, checked when the task is built); its weights come
from ``pretrained`` (a mimlab ``.ckpt`` or an official file, :func:`mimlab.checkpoints.load_pretrained`). Mixup/CutMix + label smoothing (timm), layer-wise
lr decay (``optim.param_groups``), drop path (backbone config) and model EMA (timm ``ModelEmaV3``; validated instead of
the raw weights when enabled) are configured in ``conf/task/finetune.yaml`` and the ``finetune_*`` experiments.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from mimlab.checkpoints import load_pretrained
from mimlab.data.base import ResumableDataModule
from mimlab.models.backbones.contract import check_backbone
from mimlab.models.heads.classifier import GlobalAvgPool
from mimlab.optim import OptimizerFactory
from mimlab.utils.distributed import log_global

log = logging.getLogger(__name__)


class ImageClassification(L.LightningModule):
    """Shared classification plumbing: weights, head, metrics (top-1/top-5 via torchmetrics), optimiser.

    Args:
        backbone: the encoder (weights loaded from ``pretrained`` unless None: random init, with a warning).
        head: partial ``head(in_dim, num_classes) -> nn.Module``.
        optim: the optimiser factory (lr = blr * effective batch / 256).
        num_classes: classes; None reads ``trainer.datamodule.num_classes`` at setup (the head is built then).
        features: ``f(backbone, images) -> (N, D)`` (``GlobalAvgPool()`` or ``ClsToken()``).
        pretrained: checkpoint path or None. allow_missing / ignore_unexpected: fnmatch patterns of backbone keys the
            checkpoint may lack / checkpoint keys to drop (:func:`mimlab.checkpoints.load_pretrained`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: Callable[[int, int], nn.Module],
        optim: OptimizerFactory,
        num_classes: int | None = None,
        features: Callable[[nn.Module, Tensor], Tensor] | None = None,
        pretrained: str | None = None,
        allow_missing: Iterable[str] = (),
        ignore_unexpected: Iterable[str] = (),
    ) -> None:
        super().__init__()
        check_backbone(backbone)
        self.backbone = backbone
        self.features = features if features is not None else GlobalAvgPool()
        self.features.dim(backbone)  # type: ignore[attr-defined]  # the backbone offers this pooled feature (composition-time error otherwise)
        self.head_factory = head
        self.optim = optim
        self.num_classes = num_classes
        self.pretrained = pretrained
        self.head: nn.Module | None = None
        self.load_report: dict[str, list[str]] = {}
        if pretrained:
            self.load_report = load_pretrained(
                pretrained, backbone, allow_missing=allow_missing, ignore_unexpected=ignore_unexpected
            )["backbone"]
        else:
            log.warning(
                "%s: no `pretrained` checkpoint given; the backbone starts from random init", type(self).__name__
            )
        if num_classes is not None:
            self._build_head(num_classes)

    # ------------------------------------------------------------------------------------------------ building
    def _build_head(self, num_classes: int) -> None:
        if int(num_classes) < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least 2 classes, got num_classes={num_classes} "
                "(one class folder gives 100% accuracy whatever the model); point data.root at labelled data"
            )
        self.num_classes = int(num_classes)
        self.head = self.head_factory(self.features.dim(self.backbone), self.num_classes)  # type: ignore[attr-defined]
        top5 = min(5, self.num_classes)
        self.metrics = nn.ModuleDict(
            {
                "acc1": MulticlassAccuracy(self.num_classes, top_k=1, average="micro"),
                "acc5": MulticlassAccuracy(self.num_classes, top_k=top5, average="micro"),
            }
        )
        self.val_loss = MeanMetric()  # sample-weighted over every rank's validation block
        self.on_head_built()

    def on_head_built(self) -> None:
        """Hook for subclasses (EMA copy, freezing)."""

    def setup(self, stage: str) -> None:
        if self.head is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None or not hasattr(datamodule, "num_classes"):
                raise ValueError(
                    "task.num_classes is null and the datamodule does not report num_classes; set task.num_classes"
                )
            self._build_head(datamodule.num_classes)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, images: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, num_classes) logits."""
        return self.head(self.features(self.backbone, images))  # type: ignore[misc]

    def evaluate(self, images: Tensor) -> Tensor:
        """Logits used for validation (subclasses: EMA weights)."""
        return self(images)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch[0], batch[1]
        logits = self.evaluate(images)
        loss = nn.functional.cross_entropy(logits, labels)
        self.metrics["acc1"].update(logits, labels)  # type: ignore[operator]
        self.metrics["acc5"].update(logits, labels)  # type: ignore[operator]
        self.val_loss.update(loss, weight=images.shape[0])

    def on_validation_epoch_end(self) -> None:
        """Log the metrics; ``compute`` sums their states over the ranks' disjoint blocks (exactly the 1-process figure)."""
        log_global(self, "val/loss", self.val_loss.compute())
        self.val_loss.reset()
        for name, metric in self.metrics.items():
            log_global(self, f"val/{name}", metric.compute() * 100, prog_bar=name == "acc1")  # type: ignore[operator]
            metric.reset()  # type: ignore[operator]

    # ------------------------------------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict:  # type: ignore[override]
        return self.optim(self, self.trainer, self.trainer.datamodule.batch_size)  # type: ignore[attr-defined]


class FineTuning(ImageClassification):
    """End-to-end fine-tuning (see module docstring).

    Args (in addition to :class:`ImageClassification`):
        mixup: partial ``timm.data.Mixup(num_classes=...)`` or None; when set the loss is soft-target CE on its targets
            (label smoothing is then part of Mixup, as in timm/MAE).
        label_smoothing: smoothing for the plain CE when ``mixup`` is None.
        ema_decay: model EMA decay (ConvNeXt V2: 0.9999) or None; validation then uses the EMA weights and also logs
            the raw weights' top-1 as ``val/acc1_raw``.
        ema_warmup: timm's EMA decay warm-up (useful for short runs).
        drop_backbone_norm: have the backbone drop its final norm where its family's global-pool fine-tuning does
            (the contract's ``drop_final_norm``: MAE's ViT — the pooled patch tokens go through ``fc_norm`` instead;
            Swin, ConvNeXt V2 and HiViT keep theirs).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *args: Any,
        mixup: Callable[..., Any] | None = None,
        label_smoothing: float = 0.1,
        ema_decay: float | None = None,
        ema_warmup: bool = False,
        drop_backbone_norm: bool = True,
        **kwargs: Any,
    ) -> None:
        self.mixup_factory = mixup
        self.label_smoothing = label_smoothing
        self.ema_decay = ema_decay
        self.ema_warmup = ema_warmup
        self.mixup = None
        self.ema: ModelEmaV3 | None = None
        if drop_backbone_norm:  # before loading and before the EMA copy; the checkpoint's final-norm keys are unused
            unused = check_backbone(backbone).drop_final_norm()
            kwargs["ignore_unexpected"] = (*kwargs.get("ignore_unexpected", ()), *unused)
        super().__init__(backbone, *args, **kwargs)

    def on_head_built(self) -> None:
        self.mixup = self.mixup_factory(num_classes=self.num_classes) if self.mixup_factory is not None else None
        if self.mixup is not None:
            self.train_loss: nn.Module = SoftTargetCrossEntropy()
        elif self.label_smoothing > 0:
            self.train_loss = LabelSmoothingCrossEntropy(self.label_smoothing)
        else:
            self.train_loss = nn.CrossEntropyLoss()
        if self.ema_decay is not None:
            self.ema = ModelEmaV3(self._ema_source(), decay=self.ema_decay, use_warmup=self.ema_warmup)
            self.ema.requires_grad_(False)
            self.raw_acc1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro")

    def _ema_source(self) -> nn.ModuleDict:
        """A view (not registered) of the trained parts, in the layout the EMA copy keeps: ``backbone.*``, ``head.*``."""
        return nn.ModuleDict({"backbone": self.backbone, "head": self.head})  # type: ignore[dict-item]

    def setup(self, stage: str) -> None:
        """Build the head (base class), then have the DataModule mix training batches before the step."""
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)  # setup runs with the Trainer attached
        if self.mixup is not None and isinstance(datamodule, ResumableDataModule):
            datamodule.transform_training_batches(self.mix_batch)

    def mix_batch(self, batch: Any) -> list[Any]:
        """Mixup/CutMix (timm) of a training batch (images (N, C, H, W), class indices (N,), ...) -> (images, soft
        targets (N, num_classes), ...); an odd batch loses its last image (timm pairs image n with image N-1-n). It runs
        outside the training step (the DataModule's :meth:`~mimlab.data.base.ResumableDataModule.transform_training_batches`),
        because its per-batch draws are host-side numpy: inside a compiled step they would split the graph."""
        images, labels = batch[0], batch[1]
        if images.shape[0] % 2:
            images, labels = images[:-1], labels[:-1]
        images, targets = self.mixup(images, labels)  # type: ignore[misc]
        return [images, targets, *batch[2:]]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """``batch`` = (images, targets): soft targets when mixed before the step, else class indices (mixed here when
        Mixup is on: a loader that is not a mimlab DataModule)."""
        if self.mixup is not None and batch[1].ndim == 1:
            batch = self.mix_batch(batch)
        images, targets = batch[0], batch[1]
        loss = self.train_loss(self(images), targets)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=images.shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self._ema_source(), step=self.global_step)

    def evaluate(self, images: Tensor) -> Tensor:
        """Validation logits: the EMA weights when model EMA is on, else the trained weights."""
        if self.ema is None:
            return self(images)
        ema = self.ema.module
        return ema["head"](self.features(ema["backbone"], images))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.raw_acc1.update(self(batch[0]), batch[1])
        super().validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        if self.ema is not None:
            log_global(self, "val/acc1_raw", self.raw_acc1.compute() * 100)
            self.raw_acc1.reset()
        super().on_validation_epoch_end()
