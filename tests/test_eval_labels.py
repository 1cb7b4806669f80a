"""Labels in evaluation: validation classes are matched to training classes by name, one-class data is not scored."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
from hydra.utils import instantiate
from lightning.pytorch.trainer.states import TrainerFn

from conftest import TINY_VIT, compose_config
from mimlab.callbacks.online_eval import KNNMonitor
from mimlab.data.imagenet import ImageNetDataModule


def knn_trainer(root):
    dm = ImageNetDataModule(str(root), img_size=32, batch_size=4)
    return SimpleNamespace(
        sanity_checking=False,
        max_epochs=1,
        current_epoch=0,
        datamodule=dm,
        world_size=1,
        global_rank=0,
        state=SimpleNamespace(fn=TrainerFn.FITTING),
    )


def test_knn_labels_a_val_subset_by_training_class_names(synthetic_root, tmp_path):
    root = tmp_path / "subset"
    shutil.copytree(synthetic_root, root)
    shutil.rmtree(root / "val" / "00_circle")  # plain ImageFolder indices of val would all shift by one
    bank, val = KNNMonitor()._datasets(knn_trainer(root))
    assert val.class_to_idx == bank.class_to_idx and len(val.classes) == 10
    assert {label for _, label in val.samples} == set(range(1, 10))


def test_knn_turns_itself_off_on_one_class_instead_of_reporting_100(synthetic_root, tmp_path):
    root = tmp_path / "one"
    for split in ("train", "val"):
        shutil.copytree(synthetic_root / split / "00_circle", root / split / "only")
    monitor = KNNMonitor()
    with pytest.warns(UserWarning, match="kNN monitor turned off.*1 class folder; kNN accuracy needs at least two"):
        monitor.on_validation_epoch_end(knn_trainer(root), pl_module=None)
    assert monitor.disabled and monitor.last_acc is None


def test_classification_refuses_one_class(tmp_path):
    cfg = compose_config(
        [
            "experiment=finetune_vit_tiny_synthetic",
            "task.num_classes=1",
            *TINY_VIT,
        ],
        tmp_path,
    )
    with pytest.raises(Exception, match="needs at least 2 classes, got num_classes=1"):
        instantiate(cfg.task)
