"""Lightning DDP with ``static_graph`` made safe for gradient accumulation.

``DistributedDataParallel(static_graph=True)`` combined with ``no_sync()`` (how Lightning accumulates gradients) hits
``expect_autograd_hooks_ INTERNAL ASSERT FAILED`` on the first backward, and once that is patched it silently stops
all-reducing gradients (pytorch/pytorch#143580; fix proposed in #187732, not in torch 2.14). Measured here: a 2-process
gloo fit of the tiny MAE with ``accumulate_grad_batches=2`` crashes with exactly that assert. This strategy therefore
keeps ``static_graph`` for the common case and drops it (with a warning) when told that the Trainer accumulates;
``conf/hardware/ddp.yaml`` passes ``accumulate_grad_batches: ${trainer.accumulate_grad_batches}``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn


class MimDDPStrategy(DDPStrategy):
    """``DDPStrategy`` that builds DDP without ``static_graph`` when ``accumulate_grad_batches > 1``.

    Args:
        static_graph: ``DistributedDataParallel(static_graph=...)`` when gradients are not accumulated.
        accumulate_grad_batches: the Trainer's; a mismatch with the Trainer at ``setup`` is an error.
        args, kwargs: ``DDPStrategy``'s (the remaining kwargs go to ``DistributedDataParallel``).
    """

    def __init__(self, *args: Any, static_graph: bool = False, accumulate_grad_batches: int = 1, **kwargs: Any) -> None:
        if static_graph and accumulate_grad_batches > 1:
            rank_zero_warn(
                "hardware.strategy.static_graph=true is switched off because trainer.accumulate_grad_batches="
                f"{accumulate_grad_batches}: DDP static_graph with no_sync() accumulation is broken in torch "
                "(pytorch/pytorch#143580). Use more devices or a larger data.batch_size instead of accumulation to "
                "keep it."
            )
            static_graph = False
        super().__init__(*args, static_graph=static_graph, **kwargs)
        self.static_graph = static_graph
        self.accumulate_grad_batches = accumulate_grad_batches

    def setup(self, trainer: L.Trainer) -> None:
        if self.static_graph and trainer.accumulate_grad_batches > 1:
            raise ValueError(
                "MimDDPStrategy(static_graph=True) was built for accumulate_grad_batches="
                f"{self.accumulate_grad_batches} but the Trainer accumulates {trainer.accumulate_grad_batches} batches, "
                "which DDP's static graph does not survive (pytorch/pytorch#143580). Pass the Trainer's value as "
                "MimDDPStrategy(accumulate_grad_batches=...) (conf/hardware/ddp.yaml does: "
                "${trainer.accumulate_grad_batches}) or static_graph=False."
            )
        super().setup(trainer)
