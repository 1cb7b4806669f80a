"""Train FLOPs per image: the one count behind ``make bench``'s MFU and the dashboard's ``perf/mfu``.

Two counters, chosen by what the model contains (``method="auto"``):

* ``counter``: ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward, with timm attention forced onto
  the explicit matmul path while counting (FlopCounterMode has no formula for the CPU flash-attention kernel, so the
  q·k and attn·v products would otherwise be lost). Used for attention models (ViT, HiViT), including ones with grouped
  (not depthwise) convolutions such as data2vec 2.0's decoder: torch's convolution-backward formula ignores ``groups``
  for the weight gradient (8.5× too much for 16 groups), so each requested gradient is counted as one forward
  convolution instead (:func:`conv_backward_flop`). Parts without gradients (EMA teachers) count their forward only.
* ``analytic``: 6 × the multiply-accumulates of every ``nn.Conv2d`` / ``nn.Linear`` call of the forward (2 FLOPs per
  MAC, backward = 2 × forward). Used for models with depthwise convolutions: FlopCounterMode over-counts the
  depthwise-conv backward about 3× (ConvNeXt-B: 273 vs 92 GFLOP per image).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from mimlab.utils.fast_paths import set_fused_attn


def has_depthwise_conv(module: nn.Module) -> bool:
    """True when ``module`` holds a depthwise ``nn.Conv2d`` (one input channel per group: count analytically)."""
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in module.modules())


def flops_method(module: nn.Module) -> str:
    """``analytic`` for models with depthwise convs, else ``counter`` (see the module docstring)."""
    return "analytic" if has_depthwise_conv(module) else "counter"


def conv_backward_flop(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    **_kwargs,
) -> int:
    """FLOPs of ``aten.convolution_backward`` (shapes, as FlopCounterMode passes them): each requested gradient (input,
    weight) costs one forward convolution, ``2 · N · C_out · C_in/groups · k² · H_out · W_out`` (the weight shape
    already holds the per-group channels)."""
    return conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) * (int(output_mask[0]) + int(output_mask[1]))


def conv_linear_macs(module: nn.Module, run: Callable[[], Any]) -> int:
    """Multiply-accumulates of every ``nn.Conv2d`` and ``nn.Linear`` call during ``run()``.

    Conv2d: ``out.numel() * in_channels / groups * kh * kw``; Linear: ``out.numel() * in_features``. Attention score
    products and functional convs are not counted.
    """
    total = 0

    def hook(mod: nn.Module, _inputs: Any, output: Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            total += output.numel() * (mod.in_channels // mod.groups) * kh * kw
        else:
            total += output.numel() * mod.in_features  # type: ignore[assignment, operator]

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return total


def train_flops_per_image(
    module: nn.Module, step: Callable[[], Tensor], batch_size: int, method: str = "auto"
) -> float:
    """FLOPs per image of one training step; ``step()`` runs the forward and returns the scalar loss.

    ``method``: ``auto`` (:func:`flops_method`), ``counter`` or ``analytic``. No ``.grad`` is written.
    """
    method = flops_method(module) if method == "auto" else method
    if method == "analytic":
        with torch.no_grad():
            return 6.0 * conv_linear_macs(module, step) / batch_size
    if method != "counter":
        raise ValueError(f"FLOP count method must be 'auto', 'counter' or 'analytic', got {method!r}")
    fused = {m: m.fused_attn for m in module.modules() if isinstance(getattr(m, "fused_attn", None), bool)}
    set_fused_attn(module, False)
    try:
        with FlopCounterMode(
            display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop}
        ) as counter:
            # gradients returned, not accumulated: a .backward() here would fire DDP's gradient hooks outside a DDP
            # step, after which DDP with static_graph stops averaging some gradients (ranks drift apart)
            torch.autograd.grad(step(), [p for p in module.parameters() if p.requires_grad], allow_unused=True)
    finally:
        for sub, value in fused.items():
            sub.fused_attn = value
    return counter.get_total_flops() / batch_size
