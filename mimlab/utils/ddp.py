"""Lightning DDP with ``static_graph`` made safe for gradient accumulation.

``DistributedDataParallel(static_graph=True)`` combined with ``no_sync()`` (how Lightning accumulates gradients) hits
``expect_autograd_hooks_ INTERNAL ASSERT FAILED`` on the first backward, and once that is patched it silently stops
all-reducing gradients (pytorch/pytorch#143580; fix proposed in #187732, not in torch 2.14). Measured here: a 2-process
gloo fit of the tiny MAE with ``accumulate_grad_batches=2`` crashes with exactly that assert. This strategy therefore
keeps ``static_graph`` for the common case and drops it (with a warning) when the Trainer accumulates.
"""
from __future__ import annotations

import lightning as L
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn


class MimDDPStrategy(DDPStrategy):
    """``DDPStrategy`` whose ``static_graph=True`` is turned off when ``trainer.accumulate_grad_batches > 1``."""

    def setup(self, trainer: L.Trainer) -> None:
        if trainer.accumulate_grad_batches > 1 and self._ddp_kwargs.get("static_graph", False):
            rank_zero_warn(
                "hardware.strategy.static_graph=true is switched off because trainer.accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}: DDP static_graph with no_sync() accumulation is broken in torch "
                "(pytorch/pytorch#143580). Use more devices or a larger data.batch_size instead of accumulation to keep it."
            )
            self._ddp_kwargs["static_graph"] = False
        super().setup(trainer)
