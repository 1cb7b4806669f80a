"""The one generic masked-image-modeling pre-training LightningModule.

``masking -> backbone(x, mask) -> neck -> decoder(features, mask) -> target(x, mask) -> loss(pred, target, mask)``.
A method (MAE, FCMAE, iTPN, Img2Vec, SimMIM, MaskFeat, data2vec 2.0, I-JEPA) is a composition of these parts chosen
in ``conf/experiment/*.yaml``. Masks arrive with the batch as a :class:`~mimlab.masking.MaskSet` over
``masking.unit_size``-pixel units, 1 = masked (several masks per image, target sets where the method has them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from mimlab.data.base import ResumableDataModule
from mimlab.data.resumable import mix_seed
from mimlab.masking import MaskSet
from mimlab.masking.base import MaskGenerator
from mimlab.models.backbones.contract import check_backbone
from mimlab.models.parts import CompositionError, PartFactory, Parts, build
from mimlab.optim import OptimizerFactory
from mimlab.targets.base import Target


class MaskedPretraining(L.LightningModule):
    """Args: the backbone, the optimiser factory, ``seed``, and the parts that attach to the backbone —
    ``masking``, ``neck`` (optional), ``target``, ``decoder`` — each built or a factory (:mod:`mimlab.models.parts`:
    configs give ``attach`` with ``_partial_: true``) called here, in that order, with the parts built before it.

    Masks come with the batch: at setup the module hands ``masking`` to its DataModule
    (:meth:`~mimlab.data.base.ResumableDataModule.deliver_masks`), whose loader workers draw each sample's masks from
    (seed, epoch, index) — (seed, index) in validation — and append them as a :class:`~mimlab.masking.MaskSet`
    stating its visible count; so the step does no host work for them, they resume exactly and do not depend on the
    batch size, worker count or number of processes. A batch without masks (another DataModule, a bare step) gets
    them drawn in the step (:meth:`make_mask`), keyed by (seed, global step, batch index, position in the global batch)
    in training and (seed, batch index, rank, position) in validation. Non-finite losses are
    :class:`mimlab.callbacks.nan_guard.NonFiniteGuard`'s business (``nan_guard``), outside the (possibly compiled) step."""

    def __init__(
        self,
        backbone: nn.Module,
        decoder: nn.Module | PartFactory,
        target: Target | PartFactory,
        loss: nn.Module,
        masking: MaskGenerator | PartFactory,
        optim: OptimizerFactory,
        neck: nn.Module | PartFactory | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        contract = check_backbone(backbone)
        self.backbone = backbone
        self.masking: MaskGenerator = build(masking, Parts(contract))
        built_neck = build(neck, Parts(contract, self.masking))
        self.neck = built_neck if built_neck is not None else nn.Identity()
        built_target: Target = build(target, Parts(contract, self.masking, self.neck))
        self.decoder = build(decoder, Parts(contract, self.masking, self.neck, built_target))
        self.target = built_target
        self.loss = loss
        self.optim = optim
        self.seed = seed

    def setup(self, stage: str) -> None:
        """Have the DataModule draw the masks in its loader workers (see the class docstring)."""
        datamodule = getattr(self.trainer, "datamodule", None)  # setup runs with the Trainer attached
        if isinstance(datamodule, ResumableDataModule):
            datamodule.deliver_masks(self.masking)

    # ----------------------------------------------------------------------------------------------- masks
    def _seed(self, *keys: int) -> int:
        return mix_seed(self.seed, *keys)

    @torch.compiler.disable  # host-side draws from host generators (batches without masks only)
    def make_mask(self, images: Tensor, seeds: int | Sequence[int]) -> MaskSet:
        """The masks of ``images`` (N, C, H, W) over the mask-unit grid, 1 = masked, drawn **on the host** with one
        generator per image: from ``seeds[n]``, or from (``seeds``, n) when one int is given."""
        per_image = [self._seed(seeds, n) for n in range(images.shape[0])] if isinstance(seeds, int) else seeds
        return self.masking.from_seeds((images.shape[-2], images.shape[-1]), per_image)

    def _step_seeds(self, batch_size: int, *keys: int) -> list[int]:
        """Seeds of a batch that came without masks: position ``j`` of rank ``r`` among ``W`` processes is ``j·W + r``
        (the order in which the sampler deals a step's samples to the ranks)."""
        try:
            world = self.trainer.world_size
        except RuntimeError:  # not attached to a Trainer (a bare step, a FLOP count): one process
            world = 1
        return [self._seed(*keys, j * world + self.global_rank) for j in range(batch_size)]

    def batch_masks(self, batch: Any, *keys: int) -> tuple[Tensor, MaskSet]:
        """(images, masks) of a batch: the loader's masks (last entry) or, without them, drawn here."""
        images = batch[0]
        if isinstance(batch[-1], MaskSet):
            return images, batch[-1]
        return images, self.make_mask(images, self._step_seeds(images.shape[0], *keys))

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, images: Tensor, masks: MaskSet) -> tuple[Any, Any]:
        """Return (prediction, target) for ``images`` under ``masks`` (host or device). The backbone gets the
        ``MaskSet`` (its stated visible count), decoder and target its plain form (:meth:`MaskSet.plain`)."""
        features = self.neck(self.backbone(images, masks))
        parts = masks.to(images.device, non_blocking=True).plain()
        return self.decoder(features, parts), self.target(images, parts)

    def compute_losses(self, images: Tensor, masks: MaskSet | None = None) -> dict[str, Tensor]:
        """The loss terms of one step on ``images`` (N, C, H, W) under ``masks`` (default: :meth:`make_mask` with
        seed 0)."""
        masks = masks if masks is not None else self.make_mask(images, 0)
        pred, target = self(images, masks)
        return self.loss(pred, target, masks.to(images.device, non_blocking=True).plain())

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, masks = self.batch_masks(batch, 0, self.global_step, batch_idx)
        losses = self.compute_losses(images, masks)
        self._log_losses("train", losses, images.shape[0])
        return losses["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, masks = self.batch_masks(batch, 1, batch_idx)
        losses = self.compute_losses(images, masks)
        self._log_losses("val", losses, images.shape[0])

    def _log_losses(self, stage: str, losses: dict[str, Tensor], batch_size: int) -> None:
        on_step = stage == "train"
        for name, value in losses.items():
            self.log(
                f"{stage}/{name}",
                value,
                on_step=on_step,
                on_epoch=True,
                prog_bar=name == "loss",
                batch_size=batch_size,
                sync_dist=not on_step,
            )

    @torch.no_grad()
    def check_composition(self, image_size: tuple[int, int]) -> None:
        """Run two blank images through masking -> backbone -> neck -> decoder -> target -> loss on the CPU, so parts
        that do not fit (shapes, strides, dims) fail here with :class:`CompositionError`, before data or training."""
        images = torch.zeros(2, 3, *image_size, device=self.device)
        try:
            losses = self.compute_losses(images, self.make_mask(images, 3))
        except Exception as err:  # re-raised with context
            raise CompositionError(
                f"the configured parts do not fit together at image size {image_size}: {type(err).__name__}: {str(err).rstrip('.')}. "
                f"backbone={type(self.backbone).__name__}, neck={type(self.neck).__name__}, "
                f"decoder={type(self.decoder).__name__}, target={type(self.target).__name__}, masking={self.masking!r}, "
                f"loss={type(self.loss).__name__}"
            ) from err
        if "loss" not in losses:
            raise CompositionError(
                f"loss {type(self.loss).__name__} returned {sorted(losses)}; it must return a 'loss' entry"
            )

    # ----------------------------------------------------------------------------------------------- visualisation
    @torch.no_grad()
    def reconstruct(self, images: Tensor, seed: int = 0) -> dict[str, Tensor]:
        """Pixel-space view of a prediction (pixel targets only): ``mask`` (N, 1, H, W) with 1 = masked, ``pred`` (N, C, H, W)."""
        masks = self.make_mask(images, self._seed(2, seed))
        pred, _ = self(images, masks)
        unit = self.masking.unit_size
        gh, gw = images.shape[-2] // unit, images.shape[-1] // unit
        mask_px = (
            masks.mask.to(images.device).reshape(-1, 1, gh, gw).repeat_interleave(unit, 2).repeat_interleave(unit, 3)
        )
        return {"mask": mask_px, "pred": self.target.to_image(pred, images)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record which module holds the encoder the method evaluates (``Target.evaluated_encoder``)."""
        checkpoint["evaluated_encoder"] = self.target.evaluated_encoder

    # ----------------------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict:  # type: ignore[override]
        batch_size = self.trainer.datamodule.batch_size  # type: ignore[attr-defined]
        return self.optim(self, self.trainer, batch_size)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        self.target.update(self.backbone, min((self.global_step + 1) / total, 1.0))
