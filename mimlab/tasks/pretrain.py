"""The one generic masked-image-modeling pre-training LightningModule.

``masking -> backbone(x, mask) -> neck -> decoder(features, mask) -> target(x, mask) -> loss(pred, target, mask)``.
A method (MAE, FCMAE, iTPN, Img2Vec, SimMIM, MaskFeat, data2vec 2.0, I-JEPA) is a composition of these parts chosen
in ``conf/experiment/*.yaml``. Mask convention: (N, L) over ``masking.unit_size``-pixel units, 1 = masked; or a
:class:`~mimlab.masking.MaskSet` (several masks per image, target sets), which this module passes on untouched.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from mimlab.masking import MaskSet
from mimlab.models.backbones.contract import check_backbone
from mimlab.optim import OptimizerFactory
from mimlab.targets.base import Target


class CompositionError(ValueError):
    """The parts chosen in the config do not fit together; raised before any training step."""


class MaskedPretraining(L.LightningModule):
    """Args: the composed parts (``nn.Module`` each, ``neck`` optional), the mask generator, the optimiser factory,
    and ``seed``: each training sample's mask is drawn from a generator seeded by (seed, global step, batch index,
    position in the global batch) (:meth:`sample_generators`), so masks are reproducible, resume exactly and do not
    depend on the number of processes; validation masks depend only on (seed, batch index, rank) and are therefore
    identical every epoch. Non-finite losses are :class:`mimlab.callbacks.nan_guard.NonFiniteGuard`'s business
    (``nan_guard``), outside the (possibly compiled) step."""

    def __init__(
        self,
        backbone: nn.Module,
        decoder: nn.Module,
        target: Target,
        loss: nn.Module,
        masking: Any,
        optim: OptimizerFactory,
        neck: nn.Module | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_backbone(backbone)
        self.backbone = backbone
        self.neck = neck if neck is not None else nn.Identity()
        self.decoder = decoder
        self.target = target
        self.loss = loss
        self.masking = masking
        self.optim = optim
        self.seed = seed

    # ----------------------------------------------------------------------------------------------- masks
    def _generator(self, *keys: int) -> torch.Generator:
        value = self.seed
        for key in keys:
            value = (value * 1_000_003 + key) % (2**63 - 1)
        return torch.Generator().manual_seed(value)

    @torch.compiler.disable  # host-side generator objects: one graph break here instead of one per generator
    def sample_generators(self, batch_size: int, batch_idx: int) -> list[torch.Generator]:
        """One generator per training sample, keyed by (seed, step, batch, position in the global batch).

        Position ``j`` of rank ``r`` among ``W`` processes is ``j·W + r``, the order in which the DataModule's sampler
        deals a step's samples to the ranks; so ``W`` processes × batch ``B`` and one process × batch ``W·B`` draw the
        same mask for the same sample, and a resumed run draws the masks of the uninterrupted one."""
        try:
            world = self.trainer.world_size
        except RuntimeError:  # not attached to a Trainer (a bare step, a FLOP count): one process
            world = 1
        return [
            self._generator(0, self.global_step, batch_idx, j * world + self.global_rank) for j in range(batch_size)
        ]

    @torch.compiler.disable  # host-side draws from host generators
    def make_mask(self, images: Tensor, generator: torch.Generator | list[torch.Generator]) -> Tensor | MaskSet:
        """(N, C, H, W) -> (N, L) float mask over the mask-unit grid, 1 = masked (or a ``MaskSet``), **on the host**:
        backbones read the (static) visible count there without a device sync and move the mask to the images' device
        themselves. ``generator``: one for the whole batch, or a list with one per sample (row ``n`` drawn from
        ``generator[n]``; a masker with ``takes_sample_generators`` gets the whole list and builds the batch itself)."""
        grid = self.masking.grid(tuple(images.shape[-2:]))
        if isinstance(generator, torch.Generator) or getattr(self.masking, "takes_sample_generators", False):
            return self.masking(images.shape[0], grid, generator=generator)
        return torch.cat([self.masking(1, grid, generator=g) for g in generator])

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, images: Tensor, mask: Tensor | MaskSet) -> tuple[Any, Any]:
        """Return (prediction, target) for ``images`` under ``mask`` (host or device; the backbone gets it as given)."""
        features = self.neck(self.backbone(images, mask))
        device_mask = mask.to(images.device, non_blocking=True)
        return self.decoder(features, device_mask), self.target(images, device_mask)

    def compute_losses(self, images: Tensor, generator: torch.Generator | list[torch.Generator]) -> dict[str, Tensor]:
        """The loss terms of one step on ``images`` (N, C, H, W) with a mask drawn from ``generator`` (see make_mask)."""
        mask = self.make_mask(images, generator)
        pred, target = self(images, mask)
        return self.loss(pred, target, mask.to(images.device, non_blocking=True))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = batch[0]
        losses = self.compute_losses(images, self.sample_generators(images.shape[0], batch_idx))
        self._log_losses("train", losses, images.shape[0])
        return losses["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images = batch[0]
        losses = self.compute_losses(images, self._generator(1, batch_idx, self.global_rank))
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
            losses = self.compute_losses(images, self._generator(3))
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
        mask = self.make_mask(images, self._generator(2, seed))
        pred, _ = self(images, mask)
        unit = self.masking.unit_size
        gh, gw = images.shape[-2] // unit, images.shape[-1] // unit
        mask_px = mask.to(images.device).reshape(-1, 1, gh, gw).repeat_interleave(unit, 2).repeat_interleave(unit, 3)
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
