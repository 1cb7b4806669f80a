"""Representation check of a frozen encoder: weighted kNN and a linear probe on its pooled features.

``features (N, D)`` come once per image from the eval transform (resize + centre crop + normalise) with the encoder
in eval mode; both classifiers work on these cached features, so a check of a small model on ten thousand images
takes seconds after the embedding pass:

* **kNN** (:func:`knn_accuracy`): cosine similarity of L2-normalised features, the ``k`` (20) nearest training
  images vote with weights ``exp(sim / T)`` (T 0.07), as the InstDisc / DINO protocol and the online
  :class:`~mimlab.callbacks.online_eval.KNNMonitor`.
* **Linear probe** (:func:`linear_probe_accuracy`): features standardised with the training set's per-channel mean
  and std (MAE's ``BatchNorm1d(affine=False)`` at its final statistics), then one Linear layer trained with AdamW
  and a cosine schedule on the cached training features (no augmentation), seeded; top-1 on the validation images.
* **Feature statistics** (:func:`feature_statistics`), to tell collapse from weak features: the effective rank of
  the validation features (RankMe: ``exp`` of the entropy of the normalised singular values) and the mean cosine
  similarity between two different images' features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import Progress
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mimlab.callbacks.online_eval import knn_predict
from mimlab.data.image_folder import CheckedImageFolder
from mimlab.data.transforms import eval_transform


@dataclass(frozen=True)
class LabelledFeatures:
    """Pooled features (N, D) float32 and integer labels (N,) of one split."""

    features: Tensor
    labels: Tensor


def labelled_folders(
    root: str | Path, img_size: int, crop_pct: float = 224 / 256
) -> tuple[CheckedImageFolder, CheckedImageFolder]:
    """(train, val) of an ImageNet-layout folder with the eval transform; val is labelled by the train class names."""
    root = Path(root)
    hint = f"the representation check needs {root}/train/<class>/<image> and {root}/val/<class>/<image>"
    transform = eval_transform(img_size, crop_pct)
    train = CheckedImageFolder(root / "train", transform, hint=hint)
    val = CheckedImageFolder(root / "val", transform, hint=hint, class_to_idx=train.class_to_idx)
    return train, val


@torch.no_grad()
def extract(
    encode: nn.Module,
    dataset: CheckedImageFolder,
    batch_size: int = 256,
    num_workers: int = 0,
    label: str = "",
    device: str = "cpu",
) -> LabelledFeatures:
    """``encode(images (N, C, H, W)) -> (N, D)`` over ``dataset`` in order, in eval mode on ``device``, with a progress
    bar; the features come back to the CPU."""
    loader: DataLoader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device != "cpu")
    was_training = encode.training
    encode.eval().to(device)
    feats, labels = [], []
    with Progress(transient=True) as progress:
        task = progress.add_task(f"embedding {label or dataset.root}", total=len(loader))
        for images, target in loader:
            feats.append(encode(images.to(device, non_blocking=True)).float().cpu())
            labels.append(target)
            progress.advance(task)
    encode.train(was_training)
    return LabelledFeatures(torch.cat(feats), torch.cat(labels))


def knn_accuracy(
    train: LabelledFeatures, val: LabelledFeatures, k: int = 20, temperature: float = 0.07, chunk: int = 1024
) -> float:
    """Top-1 (%) of the weighted kNN vote of ``train`` for every ``val`` feature, ``chunk`` queries at a time (a
    (chunk, N_train) similarity block: 5 GB at ImageNet scale)."""
    num_classes = int(max(train.labels.max(), val.labels.max())) + 1
    correct = 0
    for start in range(0, len(val.features), chunk):
        query = val.features[start : start + chunk]
        scores = knn_predict(train.features, train.labels, query, num_classes, k, temperature)
        correct += int((scores.argmax(1) == val.labels[start : start + chunk]).sum())
    return 100.0 * correct / len(val.features)


def linear_probe_accuracy(
    train: LabelledFeatures,
    val: LabelledFeatures,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> float:
    """Top-1 (%) on ``val`` of a Linear layer trained on the standardised ``train`` features (module docstring)."""
    mean, std = train.features.mean(0), train.features.std(0) + 1e-6
    x_train, x_val = (train.features - mean) / std, (val.features - mean) / std
    num_classes = int(max(train.labels.max(), val.labels.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(x_train.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=generator)
        head.bias.zero_()
    head.to(x_train.device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size].to(x_train.device)
            loss = nn.functional.cross_entropy(head(x_train[idx]), train.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        return 100.0 * (head(x_val).argmax(1) == val.labels).float().mean().item()


@torch.no_grad()
def feature_statistics(features: Tensor) -> dict[str, float]:
    """``{"effective_rank", "mean_cosine"}`` of features (N, D): RankMe (Garrido et al. 2023) of the feature matrix,
    in [1, min(N, D)], and the mean cosine similarity over pairs of different rows (1 = every image alike)."""
    singular = torch.linalg.svdvals(features.double())
    p = singular / singular.sum() + 1e-12
    unit = nn.functional.normalize(features.double(), dim=1)
    n = len(unit)
    mean_cosine = ((unit.sum(0) @ unit.sum(0)) - n) / (n * (n - 1))
    return {"effective_rank": float(torch.exp(-(p * p.log()).sum())), "mean_cosine": float(mean_cosine)}


@dataclass(frozen=True)
class Protocol:
    """The representation check's settings: eval transform (``img_size``, ``crop_pct``), kNN (``k``, ``temperature``),
    probe (``probe_epochs``, ``seed``), embedding loader (``batch_size``, ``num_workers``), and the ``device`` that embeds,
    votes and trains the probe (the cached features move there)."""

    img_size: int
    crop_pct: float = 224 / 256
    k: int = 20
    temperature: float = 0.07
    probe_epochs: int = 100
    seed: int = 0
    batch_size: int = 256
    num_workers: int = 0
    device: str = "cpu"


def evaluate_encoders(encoders: dict[str, nn.Module], root: str | Path, protocol: Protocol) -> dict[str, dict]:
    """``{name: {"knn_top1", "probe_top1"}}`` for each ``images -> (N, D)`` encoder on ``root``'s train/val splits."""
    train_set, val_set = labelled_folders(root, protocol.img_size, protocol.crop_pct)
    results = {}
    for name, encode in encoders.items():
        train, val = (
            extract(encode, split, protocol.batch_size, protocol.num_workers, f"{name}: {kind}", protocol.device)
            for split, kind in ((train_set, "train"), (val_set, "val"))
        )
        train, val = (
            LabelledFeatures(f.features.to(protocol.device), f.labels.to(protocol.device)) for f in (train, val)
        )
        results[name] = {
            "knn_top1": knn_accuracy(train, val, protocol.k, protocol.temperature),
            "probe_top1": linear_probe_accuracy(train, val, epochs=protocol.probe_epochs, seed=protocol.seed),
            **feature_statistics(val.features),
            "train_images": len(train_set),
            "val_images": len(val_set),
        }
    return results
