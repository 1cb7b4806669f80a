"""Online k-nearest-neighbour accuracy of the backbone's pooled features, a label-cheap probe during pre-training.

Every ``every_n_epochs`` validation epochs (and at the last epoch) the backbone embeds up to ``max_train``
training images (with the *evaluation* transform) and the validation set, unmasked: features are the global average of
the last ``forward_features`` map (N, C), L2-normalised. Each validation image is classified by a temperature-weighted
vote of its ``k`` most cosine-similar training images (the InstDisc / DINO weighted kNN). Logged as ``val/knn_acc``.
"""
from __future__ import annotations

import copy

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset


def knn_accuracy(train_feats: Tensor, train_labels: Tensor, val_feats: Tensor, val_labels: Tensor,
                 k: int = 20, temperature: float = 0.07) -> float:
    """(Nt, C), (Nt,), (Nv, C), (Nv,) -> top-1 accuracy in [0, 1]. Features must be L2-normalised."""
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    sim = val_feats @ train_feats.T                                        # (Nv, Nt) cosine similarity
    top_sim, top_idx = sim.topk(min(k, train_feats.shape[0]), dim=1)      # (Nv, k)
    votes = torch.zeros(val_feats.shape[0], num_classes, device=val_feats.device)
    votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
    return float((votes.argmax(1) == val_labels).float().mean())


@torch.no_grad()
def embed(backbone: torch.nn.Module, loader: DataLoader, device: torch.device) -> tuple[Tensor, Tensor]:
    """Pooled, L2-normalised last-stage features (N, C) and labels (N,) of every batch in ``loader``."""
    feats, labels = [], []
    for images, targets in loader:
        maps = backbone.forward_features(images.to(device))
        feats.append(F.normalize(maps[-1].float().mean((-2, -1)), dim=1))
        labels.append(targets.to(device))
    return torch.cat(feats), torch.cat(labels)


class KNNMonitor(L.Callback):
    """Needs a datamodule with ``train_set`` / ``val_set`` (labelled image folders) and ``val_transform``.
    Arguments share their names with ``mimlab.callbacks.online_eval.KNNMonitor`` (``callbacks=pretrain_with_probes``
    replaces this one with it under the same ``knn`` key)."""

    def __init__(self, every_n_epochs: int = 5, k: int = 20, temperature: float = 0.07,
                 max_train: int | None = 2000, batch_size: int = 128) -> None:
        self.every_n_epochs = every_n_epochs
        self.k = k
        self.temperature = temperature
        self.max_train = max_train
        self.batch_size = batch_size

    def _due(self, trainer: L.Trainer) -> bool:
        epoch = trainer.current_epoch + 1
        return not trainer.sanity_checking and (epoch % self.every_n_epochs == 0 or epoch == trainer.max_epochs)

    def _loaders(self, datamodule) -> tuple[DataLoader, DataLoader]:
        train = copy.copy(datamodule.train_set)
        train.transform = datamodule.val_transform
        cap = self.max_train or len(train)  # null = every training image
        step = max(len(train) // cap, 1)
        train = Subset(train, list(range(0, len(train), step))[:cap])
        make = lambda ds: DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=0)  # noqa: E731
        return make(train), make(datamodule.val_set)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._due(trainer):
            return
        train_loader, val_loader = self._loaders(trainer.datamodule)
        backbone = pl_module.backbone
        was_training = backbone.training
        backbone.eval()
        train_feats, train_labels = embed(backbone, train_loader, pl_module.device)
        val_feats, val_labels = embed(backbone, val_loader, pl_module.device)
        backbone.train(was_training)
        acc = knn_accuracy(train_feats, train_labels, val_feats, val_labels, self.k, self.temperature)
        pl_module.log("val/knn_acc", acc, on_step=False, on_epoch=True, sync_dist=False)
