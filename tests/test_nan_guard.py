"""nan_guard: a non-finite loss or gradient never reaches the weights; a run that keeps producing them stops with a
message naming the step, the batch and the loss terms."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from conftest import TINY_MAE_QUIET, TINY_VIT, compose_config
from mimlab.callbacks.nan_guard import NonFiniteLossError
from mimlab.train import build

TINY = [*TINY_MAE_QUIET, "data.batch_size=8", "trainer.limit_val_batches=0", "callbacks.checkpoint.monitor=null"]


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients overflow."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


class LossWithBadGradientsAt(nn.Module):
    """The recipe's loss, with NaN gradients on the training calls listed in ``bad`` (0-based)."""

    def __init__(self, loss: nn.Module, bad: set[int]) -> None:
        super().__init__()
        self.loss, self.bad, self.calls = loss, bad, 0

    def forward(self, pred, target, mask):
        out = dict(self.loss(pred, target, mask))
        if self.calls in self.bad:
            out["loss"] = _NaNGradient.apply(out["loss"])
        self.calls += 1
        return out


class LossWithBadTermsAt(LossWithBadGradientsAt):
    """The recipe's loss, whose total is NaN and an extra term ``aux`` infinite on the calls listed in ``bad``."""

    def forward(self, pred, target, mask):
        out = dict(self.loss(pred, target, mask))
        bad = self.calls in self.bad
        out["aux"] = out["loss"].detach() * (math.inf if bad else 1.0)
        out["loss"] = out["loss"] * (math.nan if bad else 1.0)
        self.calls += 1
        return out


def fit(tmp_path, root, bad: set[int], *overrides: str, loss=LossWithBadGradientsAt):
    cfg = compose_config([*TINY, f"data.root={root}", *overrides], tmp_path)
    datamodule, module, trainer = build(cfg)
    module.loss = loss(module.loss, bad)
    return module, trainer, lambda: trainer.fit(module, datamodule=datamodule)


def test_stop_names_step_batch_and_the_non_finite_terms(tmp_path, synthetic_root):
    module, trainer, run = fit(tmp_path, synthetic_root, {1}, "trainer.max_steps=5", loss=LossWithBadTermsAt)
    with pytest.raises(
        NonFiniteLossError,
        match=r"non-finite loss at global step 1, batch 1: term\(s\) loss, aux = "
        r"nan, inf.*nan_guard=skip",
    ):
        run()
    assert trainer.global_step == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_skip_of_a_non_finite_loss_leaves_the_weights_untouched(tmp_path, synthetic_root):
    module, trainer, run = fit(
        tmp_path, synthetic_root, {0, 1}, "nan_guard=skip", "trainer.max_steps=2", loss=LossWithBadTermsAt
    )
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.warns(UserWarning, match=r"non-finite loss at global step 0, batch 0: term\(s\) loss, aux.*skipping"):
        run()
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert float(trainer.callback_metrics["train/skipped_updates"]) == 2


def test_skip_drops_non_finite_gradients_before_the_weights_move(tmp_path, synthetic_root):
    module, trainer, run = fit(tmp_path, synthetic_root, {2}, "nan_guard=skip", "trainer.max_steps=5")
    with pytest.warns(
        UserWarning, match=r"non-finite gradients at global step 2 \(the loss was finite\); skipping this update"
    ):
        run()
    assert trainer.global_step == 5
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert float(trainer.callback_metrics["train/skipped_updates"]) == 1
    assert math.isfinite(float(trainer.callback_metrics["train/loss_step"]))


def test_skip_stops_a_run_that_keeps_skipping(tmp_path, synthetic_root):
    module, _, run = fit(
        tmp_path, synthetic_root, set(range(2, 100)), "nan_guard=skip", "nan_guard_max_skips=3", "trainer.max_steps=20"
    )
    with pytest.raises(NonFiniteLossError, match=r"skipped 3 updates in a row \(global steps 2-4\).*diverging"):
        run()
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_stop_names_the_step_of_non_finite_gradients(tmp_path, synthetic_root):
    module, _, run = fit(tmp_path, synthetic_root, {1}, "trainer.max_steps=5")
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradients at global step 1 \(the loss was finite\)"):
        run()
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_unknown_nan_guard_mode_fails_at_build(tmp_path):
    with pytest.raises(ValueError, match=r"nan_guard must be one of stop, skip, off; got 'skp'"):
        build(compose_config([*TINY, "nan_guard=skp"], tmp_path))


class NaNImagesAt(L.Callback):
    """Turns the images of the training batch at global step ``step`` into NaN; keeps every buffer of the module
    before that step and after it."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.before = {k: v.clone() for k, v in pl_module.named_buffers()}
            for images in batch[0] if isinstance(batch[0], list) else [batch[0]]:
                images.fill_(math.nan)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.before and not self.after:
            self.after = {k: v.clone() for k, v in pl_module.named_buffers()}


TASKS = {
    "linear_probe": ["experiment=linprobe_vit_tiny_synthetic", "data.img_size=32", "data.batch_size=8"],
    "detection": [
        "experiment=detect_mae_vit_tiny_synthetic",
        "model.neck.out_channels=16",
        "data.batch_size=2",
        "task.head_channels=16",
        "task.representation_size=32",
        "task.box_batch_size_per_image=32",
        "task.rpn_pre_nms_top_n=50",
        "task.rpn_post_nms_top_n=20",
        "optim.schedule.warmup_steps=1",
    ],
}


@pytest.mark.parametrize("task", ["linear_probe", pytest.param("detection", marks=pytest.mark.slow)])
def test_skip_leaves_every_buffer_as_it_was(task, tmp_path, synthetic_root):
    """One NaN batch: BatchNorm running statistics (the linear probe's head.bn, the detector's conv box head) come
    back as they were before it, so validation and the best checkpoint stay finite."""
    cfg = compose_config(
        [
            *TASKS[task],
            *TINY_VIT,
            f"data.root={synthetic_root}" if task == "linear_probe" else f"paths.data_dir={tmp_path / 'data'}",
            "hardware.num_workers=0",
            "logger=csv",
            "~callbacks.progress",
            "nan_guard=skip",
            "trainer.max_steps=3",
            "trainer.limit_val_batches=1",
            "+trainer.num_sanity_val_steps=0",
        ],
        tmp_path,
    )
    datamodule, module, trainer = build(cfg)
    nan_batch = NaNImagesAt(step=1)
    trainer.callbacks.append(nan_batch)
    with pytest.warns(UserWarning, match="non-finite loss at global step 1.*skipping this update"):
        trainer.fit(module, datamodule=datamodule)
    assert any("running_mean" in k for k in nan_batch.before)
    changed = [k for k, v in nan_batch.before.items() if not torch.equal(v, nan_batch.after[k])]
    assert not changed, changed
    assert all(torch.isfinite(b.float()).all() for b in module.buffers())
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    assert metrics and all(math.isfinite(v) for v in metrics.values()), metrics
