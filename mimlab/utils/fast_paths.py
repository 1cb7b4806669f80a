"""The speed switches of the ``hardware`` config group, applied to a module before ``trainer.fit``.

Each switch is one key of ``conf/hardware/*.yaml`` (the GPU options turn the fast one on):
``fused_attn`` (timm SDPA attention), ``channels_last`` (NHWC weights for convnets), ``compile`` / ``compile_mode``
(``torch.compile`` of the whole module before fit; ``compile_mode=reduce-overhead`` adds CUDA graphs).
``fused_optimizer`` is read by ``conf/optim/*.yaml`` and ``matmul_precision`` by :func:`mimlab.train.build`.
Kept-token counts are static by construction (``RandomMasking.num_keep``), so compiled graphs are not re-traced per batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def set_fused_attn(module: nn.Module, enabled: bool) -> int:
    """Set ``fused_attn`` on every submodule that has it (timm ``Attention``); returns how many were set."""
    count = 0
    for sub in module.modules():
        if isinstance(getattr(sub, "fused_attn", None), bool):
            sub.fused_attn = bool(enabled)  # type: ignore[assignment]
            count += 1
    return count


def apply_fast_paths(module: nn.Module, hardware: Any) -> nn.Module:
    """Apply ``hardware.{fused_attn, channels_last, compile, compile_mode}`` to ``module``.

    Returns the module to hand to ``trainer.fit``: the compiled wrapper when ``hardware.compile`` is on (Lightning unwraps
    it and compiles the step methods), else ``module`` itself (changed in place).
    """
    set_fused_attn(module, hardware.get("fused_attn", True))
    if hardware.get("channels_last", False):
        module.to(memory_format=torch.channels_last)
    if hardware.get("compile", False):
        mode = hardware.get("compile_mode", None)
        return torch.compile(module, mode=mode) if mode else torch.compile(module)  # type: ignore[return-value]
    return module
