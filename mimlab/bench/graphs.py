"""How ``torch.compile`` sees a training step: graphs and graph breaks (``torch._dynamo.explain``)."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch

from mimlab.bench.workloads import quiet_step


def explain_step(module: L.LightningModule, batch: Any) -> dict[str, Any]:
    """Graph count, graph-break count and the first break reasons of ``module.training_step(batch, 0)`` under
    ``torch._dynamo.explain`` — the region Lightning compiles when the module is handed to ``trainer.fit`` compiled.
    The global RNGs are seeded first, so the count does not depend on a random draw."""
    torch._dynamo.reset()
    torch.manual_seed(0)  # random branches (timm Mixup's draw, drop path) take the same path on every run
    np.random.seed(0)
    explanation = torch._dynamo.explain(lambda: quiet_step(module, batch, 0))()
    reasons = []
    for reason in explanation.break_reasons:
        frame = reason.user_stack[-1] if reason.user_stack else None
        where = f"{frame.filename.rsplit('/mimlab/', 1)[-1]}:{frame.lineno}" if frame is not None else "?"
        reasons.append(f"{where}: {reason.reason.splitlines()[0][:160]}")
    torch._dynamo.reset()
    return {"graphs": explanation.graph_count, "graph_breaks": explanation.graph_break_count, "break_reasons": reasons}
