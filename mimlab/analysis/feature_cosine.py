"""Feature cosine distance (ConvNeXt V2 paper, Fig. 3/4; docs/methods.md §3.5): how diverse the channels of a layer are.

For one image and one layer with activation ``X`` (H, W, C), channel ``X_i`` flattened to an HW-vector,
``d(X) = 1/C² · Σ_i Σ_j (1 − cos(X_i, X_j)) / 2`` ∈ [0, 1] (mean over all C×C pairs, self-pairs included).
It is computed **per image** and averaged over images (the paper's protocol; a third-party reproduction pools
N·H·W instead). High = diverse channels, ~0 = collapsed (redundant) channels. An all-zero (dead) channel has
cosine 0 with every channel. The 1/C² normalisation is recalled from the paper, not re-read (docs/methods.md §8).

Default layers: the MLP hidden activation of every block, i.e. the output of each GRN module (V2), or of each
GELU when the model has no GRN (V1-style). CLI::

    python -m mimlab.analysis.feature_cosine --checkpoint ckpt.pt --images DIR \
        --backbone conf/model/backbone/convnextv2_base.yaml --out cosine.png [--label V2] [--max-images 1000]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["channel_cosine_distance", "default_layers", "feature_cosine_distance", "plot_feature_cosine", "main"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def channel_cosine_distance(x: torch.Tensor, channel_dim: int = -1) -> torch.Tensor:
    """Per-image mean pairwise cosine distance of the channels of ``x`` (N, ..., C) -> (N,)."""
    x = x.movedim(channel_dim, -1).flatten(1, -2).float()  # (N, HW, C)
    xn = F.normalize(x, dim=1)
    cos = xn.transpose(1, 2) @ xn  # (N, C, C)
    return ((1.0 - cos) / 2.0).mean(dim=(1, 2))


def default_layers(model: nn.Module) -> list[str]:
    """Names of every GRN module (MLP hidden activation after GRN), else of every GELU."""
    from mimlab.models.layers.grn import GRN

    names = [n for n, m in model.named_modules() if isinstance(m, GRN)]
    return names or [n for n, m in model.named_modules() if isinstance(m, nn.GELU)]


@torch.no_grad()
def feature_cosine_distance(
    model: nn.Module,
    images: torch.Tensor | Sequence[torch.Tensor],
    layers: Sequence[str] | None = None,
    channel_dim: int = -1,
    batch_size: int = 32,
) -> dict[str, float]:
    """Mean over images of the per-layer channel cosine distance.

    ``images``: a (N, 3, H, W) tensor or an iterable of such batches (already normalised). ``layers``: module
    names to hook (default :func:`default_layers`); their outputs must carry channels on ``channel_dim``
    (-1 for the channels-last MLP of mimlab / official ConvNeXt V2). Returns ``{layer: distance}`` in model order.
    """
    layers = list(layers or default_layers(model))
    if not layers:
        raise ValueError("feature_cosine_distance: no layers given and the model has no GRN / GELU modules")
    modules = dict(model.named_modules())
    unknown = [n for n in layers if n not in modules]
    if unknown:
        raise KeyError(f"feature_cosine_distance: model has no modules named {unknown}")
    sums = {n: 0.0 for n in layers}
    hooks = [
        modules[n].register_forward_hook(
            lambda _m, _i, out, n=n: sums.__setitem__(
                n, sums[n] + channel_cosine_distance(out, channel_dim).sum().item()
            )
        )
        for n in layers
    ]
    was_training, count = model.training, 0
    model.eval()
    try:
        batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
        for batch in batches:
            model(batch)
            count += batch.shape[0]
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {n: s / count for n, s in sums.items()}


def plot_feature_cosine(curves: Mapping[str, Sequence[float]], path: str | Path, title: str = "") -> Path:
    """Save a PNG of distance vs normalised layer index (0..1), one line per model in ``curves``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for label, values in curves.items():
        xs = [i / max(len(values) - 1, 1) for i in range(len(values))]
        ax.plot(xs, list(values), marker="o", markersize=3, label=label)
    ax.set_xlabel("normalised layer index")
    ax.set_ylabel("feature cosine distance")
    ax.set_ylim(0, 1)
    ax.set_title(title or "Feature cosine distance per layer")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def load_images(folder: str | Path, size: int = 224, max_images: int = 1000) -> torch.Tensor:
    """Images under ``folder`` (recursive, sorted): resize short side, centre crop, ImageNet normalisation."""
    from PIL import Image
    from torchvision import transforms as T

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:max_images]
    if not files:
        raise FileNotFoundError(f"feature_cosine: no images ({sorted(IMAGE_SUFFIXES)}) under {folder}")
    tf = T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    return torch.stack([tf(Image.open(f).convert("RGB")) for f in files])


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from mimlab.checkpoints.load import load_pretrained

    p = argparse.ArgumentParser(prog="python -m mimlab.analysis.feature_cosine", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="official ConvNeXt-V2 / timm / mimlab checkpoint (.pt/.ckpt)")
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument(
        "--backbone", required=True, help="backbone config yaml, e.g. conf/model/backbone/convnextv2_base.yaml"
    )
    p.add_argument(
        "--out", default="feature_cosine.png", help="PNG path; a .json with the numbers is written beside it"
    )
    p.add_argument("--label", default=None, help="legend label (default: checkpoint file name)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--max-images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)

    model = instantiate(OmegaConf.load(args.backbone), num_classes=0)
    load_pretrained(args.checkpoint, model, ignore_unexpected=("head.*", "norm.*"))
    images = load_images(args.images, args.size, args.max_images)
    result = feature_cosine_distance(model, images, batch_size=args.batch_size)
    width = max(len(n) for n in result)
    for name, value in result.items():
        print(f"{name:<{width}}  {value:.4f}")
    label = args.label or Path(args.checkpoint).stem
    out = plot_feature_cosine({label: list(result.values())}, args.out, title=f"{label} ({images.shape[0]} images)")
    out.with_suffix(".json").write_text(
        json.dumps({"label": label, "images": images.shape[0], "layers": result}, indent=1)
    )
    print(f"saved {out}")
    return result


def cli() -> None:
    """``mimlab-feature-cosine``: :func:`main`, returning None (a console script exits with what its function
    returns; a dict would be printed as an error, with exit status 1)."""
    main()


if __name__ == "__main__":
    main()
