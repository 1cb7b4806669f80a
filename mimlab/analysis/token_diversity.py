"""Token similarity / diversity of a teacher's output tokens (Img2Vec §3.2) and its CLI.

For one image with K tokens f_1..f_K (a 7x7 grid for a stride-32 CNN at 224 px, 14x14 for a ViT/16),

    similarity = 1 / (K (K - 1)) * sum_{i != k} cos(f_i, f_k),

averaged over the N images (the review's formula). ``diversity = 1 - similarity`` is this project's
working definition (docs/methods.md §5; not yet checked against the paper PDF). A zero token has cosine 0
with every other token (``F.normalize`` with eps).

CLI (key=value arguments, like the Hydra entry points)::

    python -m mimlab.analysis.token_diversity teacher=resnet50 data=/path/to/imagenet_sample
    python -m mimlab.analysis.token_diversity teacher=vit_base_patch16_224 checkpoint=/path/w.pth plot=fig3.png

prints the similarity and diversity and saves the per-query similarity map of one image (Figure 3).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


def as_tokens(features: Tensor) -> Tensor:
    """``(N, C, h, w)`` feature map or ``(N, K, C)`` tokens -> ``(N, K, C)``."""
    if features.ndim == 4:
        return features.flatten(2).transpose(1, 2)
    if features.ndim == 3:
        return features
    raise ValueError(f"expected (N, C, h, w) or (N, K, C) features, got shape {tuple(features.shape)}")


def pairwise_cosine(features: Tensor) -> Tensor:
    """Cosine similarity of every token pair: ``(N, K, C)`` or ``(N, C, h, w)`` -> ``(N, K, K)``."""
    tokens = F.normalize(as_tokens(features).float(), dim=-1)
    return tokens @ tokens.transpose(1, 2)


def token_similarity(features: Tensor) -> Tensor:
    """Mean cosine similarity over ordered pairs i != k of one image's tokens: -> ``(N,)``; needs K >= 2."""
    cos = pairwise_cosine(features)
    k = cos.shape[-1]
    if k < 2:
        raise ValueError("token similarity needs at least 2 tokens per image")
    off_diagonal = cos.sum((-2, -1)) - cos.diagonal(dim1=-2, dim2=-1).sum(-1)
    return off_diagonal / (k * (k - 1))


def token_diversity(features: Tensor) -> Tensor:
    """``1 - token_similarity`` per image -> ``(N,)`` (working definition, see the module docstring)."""
    return 1.0 - token_similarity(features)


def query_similarity_map(feature_map: Tensor, query: tuple[int, int]) -> Tensor:
    """Cosine similarity of token ``query = (row, col)`` with every token of one map ``(C, h, w)`` -> ``(h, w)``."""
    c, h, w = feature_map.shape
    tokens = F.normalize(feature_map.float().flatten(1).t(), dim=-1)  # (h*w, C)
    return (tokens @ tokens[query[0] * w + query[1]]).view(h, w)


@dataclass
class TokenDiversityConfig:
    """CLI options (``key=value``)."""

    teacher: str = "resnet50"  # any timm model name (CNN or ViT)
    data: str = (
        "data/synthetic/imagenet"  # image folder (the embedded data by default); <data>/<split>/ is used when it exists
    )
    checkpoint: str | None = None  # local teacher weights; None = random init
    model_kwargs: dict[str, Any] = field(
        default_factory=dict
    )  # timm.create_model extras, e.g. model_kwargs.img_size=384
    split: str = "val"
    img_size: int = 224
    batch_size: int = 16
    max_images: int | None = None
    seed: int = 0  # initialisation seed of a random teacher
    device: str = "cpu"
    plot: str | None = "outputs/token_diversity/{teacher}.png"  # None / "" = no plot
    plot_image: int = 0  # index of the image whose similarity map is drawn
    query: tuple[int, int] | None = None  # (row, col); None = grid centre


def list_images(root: str | Path, split: str | None = None) -> list[Path]:
    """Sorted image files under ``root/split`` (or ``root`` when that folder does not exist)."""
    root = Path(root).expanduser()
    if split and (root / split).is_dir():
        root = root / split
    if not root.is_dir():
        raise FileNotFoundError(f"data={root}: no such folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"data={root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return files


def load_images(files: list[Path], img_size: int) -> Tensor:
    """Resize (short side img_size/0.875) + centre crop + ImageNet normalisation -> ``(N, 3, S, S)``."""
    from PIL import Image
    from torchvision.transforms import v2 as T

    transform = T.Compose(
        [
            T.Resize(int(img_size / 0.875), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(img_size),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ]
    )
    return torch.stack([transform(Image.open(f).convert("RGB")) for f in files])


def save_similarity_plot(image: Tensor, feature_map: Tensor, query: tuple[int, int], path: Path, title: str) -> None:
    """Figure 3 of the review: the image with the query token boxed, and the query's similarity map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    rgb = (image.permute(1, 2, 0) * std + mean).clamp(0, 1).numpy()
    sim = query_similarity_map(feature_map, query)
    h, w = sim.shape
    sy, sx = image.shape[-2] / h, image.shape[-1] / w
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].imshow(rgb)
    axes[0].add_patch(Rectangle((query[1] * sx, query[0] * sy), sx, sy, fill=False, color="red", lw=2))
    axes[0].set_title("query token")
    shown = axes[1].imshow(sim.numpy(), cmap="viridis", vmin=-1, vmax=1)
    axes[1].add_patch(Rectangle((query[1] - 0.5, query[0] - 0.5), 1, 1, fill=False, color="red", lw=2))
    axes[1].set_title(title)
    fig.colorbar(shown, ax=axes[1], fraction=0.046)
    for ax in axes:
        ax.set_axis_off()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def run(cfg: TokenDiversityConfig) -> dict[str, float]:
    """Computes similarity/diversity of ``cfg.teacher`` on ``cfg.data``; returns and prints them."""
    from mimlab.targets.frozen_teacher import FrozenTeacher

    files = list_images(cfg.data, cfg.split)[: cfg.max_images]
    if not 0 <= cfg.plot_image < len(files):
        raise ValueError(f"plot_image={cfg.plot_image} but only {len(files)} images were found")
    teacher = FrozenTeacher(
        cfg.teacher, checkpoint=cfg.checkpoint, model_kwargs=dict(cfg.model_kwargs), init_seed=cfg.seed
    ).to(cfg.device)
    sims, plot_map, plot_image = [], None, None
    for start in range(0, len(files), cfg.batch_size):
        images = load_images(files[start : start + cfg.batch_size], cfg.img_size)
        fmap = teacher(images.to(cfg.device)).cpu()
        sims.append(token_similarity(fmap))
        if start <= cfg.plot_image < start + len(images):
            plot_map, plot_image = fmap[cfg.plot_image - start], images[cfg.plot_image - start]
    similarity = torch.cat(sims).mean().item()
    grid = tuple(plot_map.shape[-2:])  # type: ignore[union-attr]
    result = {"images": len(files), "tokens": grid[0] * grid[1], "similarity": similarity, "diversity": 1 - similarity}
    print(
        f"teacher={cfg.teacher} checkpoint={cfg.checkpoint or 'random init'} images={len(files)} grid={grid[0]}x{grid[1]}"
    )
    print(f"token similarity = {similarity:.4f}")
    print(f"token diversity  = {1 - similarity:.4f}  (1 - similarity)")
    if cfg.plot:
        query = tuple(cfg.query) if cfg.query is not None else (grid[0] // 2, grid[1] // 2)
        path = Path(cfg.plot.format(teacher=cfg.teacher))
        save_similarity_plot(plot_image, plot_map, query, path, f"{cfg.teacher}: cosine to query")  # type: ignore[arg-type]
        print(f"similarity map of image {cfg.plot_image} ({files[cfg.plot_image].name}) -> {path}")
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    from omegaconf import OmegaConf

    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        print(OmegaConf.to_yaml(OmegaConf.structured(TokenDiversityConfig)))
        return {}
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(TokenDiversityConfig), OmegaConf.from_dotlist(args))
    except Exception as err:  # unknown key or bad type: name it and stop before touching data
        raise SystemExit(
            f"token_diversity: bad argument ({err}). Options:\n"
            f"{OmegaConf.to_yaml(OmegaConf.structured(TokenDiversityConfig))}"
        ) from None
    try:
        return run(OmegaConf.to_object(cfg))  # type: ignore[arg-type]
    except (FileNotFoundError, KeyError, ValueError) as err:  # bad data path / checkpoint / options: no traceback
        raise SystemExit(f"token_diversity: {err}") from None


def cli() -> None:
    """``mimlab-token-diversity``: :func:`main`, returning None (a console script exits with what its function
    returns; a dict would be printed as an error, with exit status 1)."""
    main()


if __name__ == "__main__":
    main()
