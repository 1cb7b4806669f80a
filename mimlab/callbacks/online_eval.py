"""Representation-quality monitors for pre-training runs: a kNN classifier and an online linear probe.

Both read the backbone's image-level readout (``PooledFeatures``: its ``global_pool``, the mean of the last map
unless a config asks for the cls token; unmasked) from the task's ``backbone`` on the labelled ImageNet-layout data, without gradients into the backbone, and log per epoch:

* :class:`KNNMonitor` - ``knn/acc1``: every ``every_n_epochs`` it embeds the train and val folders with the eval transform,
  L2-normalises the features and votes with the ``k`` (20) most cosine-similar train features, each weighted by
  ``exp(sim / T)`` (T 0.07; InstDisc / DINO weighted kNN).
* :class:`OnlineLinearProbe` - ``probe/train_acc1``, ``probe/val_acc1``: a BatchNorm(affine=False) + Linear head trained
  with its own AdamW on detached features of every training batch (labels come with the batch; under DDP its gradients
  are averaged over the ranks, so every rank keeps the same head) and evaluated on the validation batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from mimlab.data.image_folder import CheckedImageFolder, DataLayoutError
from mimlab.data.resumable import EvalSampler
from mimlab.data.transforms import eval_transform
from mimlab.data.workers import init_worker
from mimlab.models.heads.classifier import LinearProbeHead, PooledFeatures
from mimlab.utils.distributed import gather_rows


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    query: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> Tensor:
    """Weighted kNN class scores (Q, num_classes): cosine similarity of L2-normalised features, weights exp(sim / T)."""
    train = nn.functional.normalize(train_features, dim=1)
    query = nn.functional.normalize(query, dim=1)
    sim = query @ train.T  # (Q, M)
    k = min(k, train.shape[0])
    top_sim, top_idx = sim.topk(k, dim=1)  # (Q, k)
    weights = (top_sim / temperature).exp()
    votes = nn.functional.one_hot(train_labels[top_idx], num_classes).to(weights.dtype)  # (Q, k, C)
    return (votes * weights.unsqueeze(-1)).sum(1)


@torch.no_grad()
def embed(backbone: nn.Module, loader: DataLoader, device: torch.device, features=None) -> tuple[Tensor, Tensor]:
    """Features (N, D) and labels (N,) of every image of ``loader``, backbone in eval mode (mode restored after)."""
    features = features or PooledFeatures()
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for images, target in loader:
        feats.append(features(backbone, images.to(device)).float().cpu())
        labels.append(target)
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


class KNNMonitor(L.Callback):
    """kNN accuracy of the backbone's pooled features (see module docstring).

    Under DDP every rank embeds its own contiguous block of the train and val images; the train bank is gathered in
    data set order and the correct counts are summed, so ``knn/acc1`` equals the 1-process figure.
    Validation folders are labelled by the training folders' names (a val class training lacks is an error), and a
    set with fewer than two classes turns the monitor off with a warning (its accuracy would be 100% by construction).

    Args:
        root: ImageNet-layout folder; None uses ``trainer.datamodule.root``. img_size: None uses the datamodule's.
            Undecodable files follow the datamodule's ``on_corrupt`` (``data.on_corrupt``).
        k, temperature: 20 and 0.07. every_n_epochs: how often (the last epoch always runs).
        batch_size, num_workers: of the embedding loaders. max_train: cap on train images (an evenly strided subset, so every class stays represented).
    """

    def __init__(
        self,
        root: str | None = None,
        img_size: int | None = None,
        k: int = 20,
        temperature: float = 0.07,
        every_n_epochs: int = 1,
        batch_size: int = 128,
        num_workers: int = 0,
        max_train: int | None = None,
    ) -> None:
        self.root, self.img_size, self.k, self.temperature = root, img_size, k, temperature
        self.every_n_epochs, self.batch_size, self.num_workers, self.max_train = (
            every_n_epochs,
            batch_size,
            num_workers,
            max_train,
        )
        self.last_acc: float | None = None
        self.disabled = False

    def _datasets(self, trainer: L.Trainer) -> tuple[Dataset, CheckedImageFolder]:
        dm = trainer.datamodule  # type: ignore[attr-defined]
        root = Path(self.root if self.root is not None else dm.root)
        transform, on_corrupt = eval_transform(self.img_size or dm.img_size), getattr(dm, "on_corrupt", "fail")
        hint = f"kNN monitor: {root} needs train/<class>/<image> and val/<class>/<image>"
        train = CheckedImageFolder(root / "train", transform, on_corrupt, hint)
        val = CheckedImageFolder(root / "val", transform, on_corrupt, hint, class_to_idx=train.class_to_idx)
        if len(train.classes) < 2:
            raise DataLayoutError(
                f"{root}/train has {len(train.classes)} class folder; kNN accuracy needs at least two"
            )
        bank: Dataset = train
        if self.max_train is not None and len(train) > self.max_train:
            stride = len(train) // self.max_train
            bank = Subset(train, range(0, stride * self.max_train, stride))
        return bank, val

    def _loader(self, trainer: L.Trainer, dataset: Dataset) -> DataLoader:
        sampler = EvalSampler(len(dataset), trainer.world_size, trainer.global_rank)  # type: ignore[arg-type]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            worker_init_fn=init_worker,
        )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        fitting = trainer.state.fn == TrainerFn.FITTING  # a checkpoint's own validation (mimlab-eval) always runs it
        if fitting and (trainer.current_epoch + 1) % self.every_n_epochs and not last:
            return
        if self.disabled:
            return
        try:
            bank, val = self._datasets(trainer)
        except (DataLayoutError, AttributeError) as err:  # sharded / unlabelled data: no class folders to vote with
            self.disabled = True
            rank_zero_warn(
                f"kNN monitor turned off for this run: {err} (point callbacks.knn.root at a labelled "
                "ImageNet-layout folder, or drop it with ~callbacks.knn)"
            )
            return
        backbone, device = pl_module.backbone, pl_module.device
        train_f, train_y = (gather_rows(t.to(device)) for t in embed(backbone, self._loader(trainer, bank), device))  # type: ignore[arg-type]
        val_f, val_y = embed(backbone, self._loader(trainer, val), device)  # type: ignore[arg-type]
        scores = knn_predict(train_f, train_y, val_f.to(device), len(val.classes), self.k, self.temperature)
        counts = torch.tensor(
            [(scores.argmax(1).cpu() == val_y).sum(), val_y.numel()], dtype=torch.float64, device=device
        )
        correct, total = trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        self.last_acc = 100.0 * correct / total
        pl_module.log("knn/acc1", self.last_acc, on_epoch=True, sync_dist=True)


class OnlineLinearProbe(L.Callback):
    """Online linear probe on detached pooled features (see module docstring).

    Args: num_classes (None: ``trainer.datamodule.num_classes``), lr / weight_decay of its AdamW.
    """

    def __init__(self, num_classes: int | None = None, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        self.num_classes, self.lr, self.weight_decay = num_classes, lr, weight_decay
        self.head: LinearProbeHead | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.features = PooledFeatures()
        self._counts = {"train": [0, 0], "val": [0, 0]}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.head is None:
            num_classes = self.num_classes or trainer.datamodule.num_classes  # type: ignore[attr-defined]
            self.head = LinearProbeHead(self.features.dim(pl_module.backbone), num_classes)  # type: ignore[arg-type]
            self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.head.to(pl_module.device)  # type: ignore[union-attr]

    def _features(self, pl_module: L.LightningModule, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.features(pl_module.backbone, images).float().detach()  # type: ignore[arg-type]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        images, labels = batch[0], batch[1]
        self.head.train()  # type: ignore[union-attr]
        with torch.enable_grad():
            logits = self.head(self._features(pl_module, images))  # type: ignore[misc]
            loss = nn.functional.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
            loss.backward()
            for p in self.head.parameters():  # type: ignore[union-attr]  # average over the ranks' batches: every rank keeps the same head
                p.grad = trainer.strategy.reduce(p.grad, reduce_op="mean")
            self.optimizer.step()  # type: ignore[union-attr]
        for buffer in self.head.buffers():  # type: ignore[union-attr]  # and the same BatchNorm statistics
            if buffer.is_floating_point():
                buffer.copy_(trainer.strategy.reduce(buffer, reduce_op="mean"))
        self._count("train", logits, labels)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.head.eval()  # type: ignore[union-attr]
        with torch.no_grad():
            logits = self.head(self._features(pl_module, batch[0]))  # type: ignore[misc]
        self._count("val", logits, batch[1])

    def _count(self, split: str, logits: Tensor, labels: Tensor) -> None:
        counts = self._counts[split]
        counts[0] += int((logits.argmax(-1) == labels).sum())
        counts[1] += labels.numel()

    def _log(self, pl_module: L.LightningModule, split: str) -> None:
        """Log the accuracy of the counts summed over the ranks (each counted its own disjoint samples)."""
        counts = torch.tensor(self._counts[split], dtype=torch.float64, device=pl_module.device)
        correct, total = pl_module.trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        if total:
            pl_module.log(f"probe/{split}_acc1", 100.0 * correct / total, on_epoch=True, sync_dist=True)
        self._counts[split] = [0, 0]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(pl_module, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            self._counts["val"] = [0, 0]
            return
        self._log(pl_module, "val")

    def state_dict(self) -> dict[str, Any]:
        return (
            {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()} if self.head is not None else {}  # type: ignore[union-attr]
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict and self.head is not None:
            self.head.load_state_dict(state_dict["head"])
            self.optimizer.load_state_dict(state_dict["optimizer"])  # type: ignore[union-attr]
