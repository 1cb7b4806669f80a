"""Per-layer feature cosine distance (ConvNeXt V2 paper, Fig. 3/4) of every FCMAE run in a sweep folder.

    python experiments/fcmae_grn/feature_cosine_table.py outputs/sweeps/fcmae_grn/<time> [--out experiments/fcmae_grn]

For each run folder: the backbone is rebuilt from ``.hydra/config.yaml`` (``model.backbone``), its ``backbone.*``
weights loaded from ``checkpoints/last.ckpt``, and ``mimlab.analysis.feature_cosine`` measures the mean pairwise
channel cosine distance of each block's MLP hidden activation (GRN output, or GELU output without GRN) on the
validation images at the run's ``data.img_size``. Writes ``feature_cosine.md`` (one row per block, one column per
run), ``feature_cosine.json`` and ``feature_cosine.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's mimlab, run from anywhere

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mimlab.analysis.feature_cosine import feature_cosine_distance, load_images, plot_feature_cosine
from mimlab.report import find_runs, read_overrides


def run_label(run: Path) -> str:
    choice = read_overrides(run).get("model/backbone")
    return str(choice) if choice else run.name


def measure(run: Path, images_dir: Path | None, max_images: int) -> list[float]:
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    size = int(cfg.data.img_size)
    backbone_cfg = OmegaConf.to_container(cfg.model.backbone, resolve=False)
    model = instantiate(backbone_cfg)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict({k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")})
    images = load_images(images_dir or Path(cfg.data.root) / "val", size=size, max_images=max_images)
    return list(feature_cosine_distance(model, images).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep")
    parser.add_argument("--out", default=str(Path(__file__).parent))
    parser.add_argument("--images", default=None, help="image folder (default: <data.root>/val of each run)")
    parser.add_argument("--max-images", type=int, default=200)
    args = parser.parse_args()
    curves = {
        run_label(run): measure(run, args.images and Path(args.images), args.max_images)
        for run in find_runs([args.sweep])
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "feature_cosine.json").write_text(json.dumps(curves, indent=1))
    labels = list(curves)
    depth = max(len(v) for v in curves.values())
    lines = ["| block | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for i in range(depth):
        lines.append(
            f"| {i} | " + " | ".join(f"{curves[k][i]:.3f}" if i < len(curves[k]) else "–" for k in labels) + " |"
        )
    lines.append("| mean | " + " | ".join(f"{sum(v) / len(v):.3f}" for v in curves.values()) + " |")
    (out / "feature_cosine.md").write_text("\n".join(lines) + "\n")
    plot_feature_cosine(curves, out / "feature_cosine.png", title="FCMAE ConvNeXt V2-Atto: GRN vs no GRN")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
