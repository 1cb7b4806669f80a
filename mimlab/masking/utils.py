"""Mask helpers shared by every mask-aware backbone. Convention: 1 = masked, 0 = visible."""

from __future__ import annotations

import torch
from torch import Tensor


def check_range(key: str, bounds: tuple[float, float], low: float, high: float | None = None) -> tuple[float, float]:
    """``bounds`` as a ``(lo, hi)`` pair with ``low < lo <= hi`` (``<= high`` when given), else a ``ValueError`` naming
    the config key ``masking.<key>``."""
    values = tuple(bounds)
    if len(values) == 2 and low < values[0] <= values[1] and (high is None or values[1] <= high):
        return float(values[0]), float(values[1])
    within = f"{low} < lo <= hi" + (f" <= {high}" if high is not None else "")
    raise ValueError(f"masking.{key} must be two numbers [lo, hi] with {within}, got {list(values)}")


def check_visible(keep: int, num_units: int, unit_size: int, ratio: float) -> int:
    """``keep`` visible units of ``num_units``, checked: a mask must keep one unit visible and hide one, else a
    ``ValueError`` naming ``masking.ratio``, the grid and the image-size knobs."""
    if not 0 < keep < num_units:
        raise ValueError(
            f"masking.ratio={ratio} over {num_units} mask unit(s) of {unit_size} px keeps "
            f"int({num_units} x {1 - ratio:.3g}) = {keep} visible: "
            + ("every image would be fully masked" if keep == 0 else "nothing would be masked")
            + ". Use larger images (data.img_size), a smaller masking.unit_size or another masking.ratio."
        )
    return keep


def upsample_mask(mask: Tensor, grid: tuple[int, int], factor: int) -> Tensor:
    """(N, gh*gw) unit mask -> (N, gh*f * gw*f) mask on a ``factor``-times finer grid (row-major)."""
    if factor == 1:
        return mask
    n = mask.shape[0]
    m = mask.reshape(n, grid[0], grid[1])
    m = m.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
    return m.reshape(n, -1)


def mask_to_token_grid(mask: Tensor, token_grid: tuple[int, int]) -> Tensor:
    """Bring a square-unit mask (N, L_units) onto a token grid (gh, gw) that is an integer multiple of it."""
    num_tokens = token_grid[0] * token_grid[1]
    if mask.shape[1] == num_tokens:
        return mask
    ratio = num_tokens / mask.shape[1]
    factor = int(round(ratio**0.5))
    if factor * factor != ratio or token_grid[0] % factor or token_grid[1] % factor:
        raise ValueError(
            f"mask with {mask.shape[1]} units does not tile the {token_grid[0]}x{token_grid[1]} token grid; "
            "masking.unit_size must be a multiple of the backbone's patch size"
        )
    return upsample_mask(mask, (token_grid[0] // factor, token_grid[1] // factor), factor)


def keep_indices(mask: Tensor, num_keep: int) -> Tensor:
    """(N, L) mask -> (N, num_keep) indices of the visible units in ascending spatial order."""
    return torch.argsort(mask, dim=1, stable=True)[:, :num_keep]


def num_visible(mask: Tensor, stated: int | None = None, units: int | None = None) -> int:
    """Visible entries per row of ``mask`` (identical for every row by construction). ``stated``: the generator's
    visible count over ``units`` mask units (:attr:`MaskSet.visible`); ``mask`` may be a finer token grid, each unit
    then covering ``L / units`` entries. Without it the count is read from the mask: a device read when the mask lives
    on an accelerator, and a graph break under ``torch.compile``."""
    if stated is not None:
        return stated * (mask.shape[1] // (units or mask.shape[1]))
    return int(mask.shape[1] - mask[0].sum().item())


def fill_masked(tokens: Tensor, mask: Tensor, fill: Tensor) -> Tensor:
    """Replace masked tokens by ``fill`` (a learnable mask token): ``tokens * (1 - m) + fill * m``.

    tokens: (N, L, D) or (N, H, W, D); mask: (N, L) or (N, H*W) on the same token grid, 1 = masked; fill broadcasts
    to one token (e.g. (1, 1, D)). As SimMIM / MaskFeat: the mask token takes the place of the patch embedding."""
    w = mask.reshape(*tokens.shape[:-1], 1).to(device=tokens.device, dtype=tokens.dtype)
    return tokens * (1 - w) + fill.to(tokens.dtype) * w
