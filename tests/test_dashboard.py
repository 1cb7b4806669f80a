"""Dashboard pieces: kNN accuracy against a loop reference, FLOP counting behaviour, grad norm, wandb defaults."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from conftest import TINY_MAE, TINY_MAE_DECODER, TINY_VIT, compose_config
from mimlab.callbacks.dashboard import TrainingDashboard, measure_train_flops
from mimlab.callbacks.online_eval import knn_predict
from mimlab.loggers import override_tags, wandb_logger
from mimlab.masking import MaskSet
from mimlab.targets.base import Target
from mimlab.targets.pixels import NormPixTarget
from mimlab.train import build


def _knn_reference(train, train_labels, val, val_labels, k, t):
    correct = 0
    for f, y in zip(val, val_labels):
        sims = [(float(f @ g), int(c)) for g, c in zip(train, train_labels)]
        top = sorted(sims, reverse=True)[:k]
        votes = {}
        for s, c in top:
            votes[c] = votes.get(c, 0.0) + torch.tensor(s / t).exp().item()
        correct += max(votes, key=votes.get) == int(y)
    return correct / len(val)


def knn_accuracy(train, train_labels, val, val_labels, k, temperature=0.07):
    scores = knn_predict(train, train_labels, val, num_classes=4, k=k, temperature=temperature)
    return float((scores.argmax(1) == val_labels).float().mean())


def test_knn_accuracy_matches_the_weighted_vote_reference():
    g = torch.Generator().manual_seed(0)
    centres = nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1)
    train_labels, val_labels = torch.arange(40) % 4, torch.arange(20) % 4
    noise = 0.5
    train = nn.functional.normalize(centres[train_labels] + noise * torch.randn(40, 16, generator=g), dim=1)
    val = nn.functional.normalize(centres[val_labels] + noise * torch.randn(20, 16, generator=g), dim=1)
    acc = knn_accuracy(train, train_labels, val, val_labels, k=5, temperature=0.1)
    assert acc == pytest.approx(_knn_reference(train, train_labels, val, val_labels, 5, 0.1))
    assert 0.25 < acc < 1.0  # informative but not trivial at this noise level
    assert knn_accuracy(centres[train_labels], train_labels, centres[val_labels], val_labels, k=3) == 1.0


@pytest.fixture(scope="module")
def tiny_mae():
    def build(ratio):
        cfg = compose_config(
            [
                "experiment=mae_vit_tiny_synthetic",
                "data.img_size=32",
                *TINY_VIT,
                *TINY_MAE_DECODER,
                f"masking.ratio={ratio}",
            ]
        )
        return instantiate(cfg.task)

    return build


def test_flop_count_is_linear_in_batch_and_falls_with_the_mask_ratio(tiny_mae):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    module = tiny_mae(0.5)
    two, one = measure_train_flops(module, images), measure_train_flops(module, images[:1])
    assert two == pytest.approx(2 * one, rel=1e-6) and one > 0
    assert all(p.grad is None for p in module.parameters())  # measuring leaves no gradients behind
    assert measure_train_flops(tiny_mae(0.9), images) < 0.9 * two  # fewer visible tokens in the encoder


def test_grad_norm_is_the_total_l2_norm_of_all_gradients():
    logged = {}
    module = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    module(torch.randn(5, 4)).square().sum().backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in module.parameters()])
    TrainingDashboard().on_before_optimizer_step(SimpleNamespace(global_step=0, log_every_n_steps=1), module, None)
    assert logged["train/grad_norm"] == pytest.approx(float(expected), rel=1e-6)
    logged.clear()
    trainer = SimpleNamespace(global_step=2, log_every_n_steps=2, should_stop=False)
    TrainingDashboard().on_before_optimizer_step(trainer, module, None)
    assert logged == {}  # only before the steps after which Lightning writes the logs


class _GradNormSpy(L.Callback):
    """The total gradient norm before every optimiser step, by the number of steps done before it."""

    def __init__(self):
        self.norms: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms[trainer.global_step] = float(torch.nn.utils.get_total_norm(grads))


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_dashboard_logs_on_lightnings_logging_steps_with_fresh_values(accumulate, tmp_path, synthetic_root):
    """A real fit: ``train/grad_norm`` in metrics.csv is the norm of the step it is logged at (Lightning writes the
    ``self.log`` values of every ``log_every_n_steps``-th step), ``perf/mfu`` comes once per logging step."""
    cfg = compose_config(
        [
            *TINY_MAE,
            *TINY_MAE_DECODER,
            f"data.root={synthetic_root}",
            "data.batch_size=4",
            "~callbacks.progress",
            "~callbacks.reconstruction",
            "~callbacks.knn",
            "trainer.max_steps=7",
            "trainer.log_every_n_steps=2",
            f"trainer.accumulate_grad_batches={accumulate}",
            "trainer.limit_val_batches=0",
            "callbacks.dashboard.peak_tflops=1",
        ],
        tmp_path,
    )
    datamodule, module, trainer = build(cfg)
    spy = _GradNormSpy()
    trainer.callbacks.append(spy)
    trainer.fit(module, datamodule=datamodule)
    with open(tmp_path / "csv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    grad_norms = {int(r["step"]): float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm")}
    mfu_steps = [int(r["step"]) for r in rows if r.get("perf/mfu")]
    assert sorted(grad_norms) == [1, 3, 5]  # Lightning's row of the 2nd, 4th and 6th optimiser step
    assert grad_norms == pytest.approx({step: spy.norms[step] for step in grad_norms}, rel=1e-5)
    assert mfu_steps == [2, 4, 6]  # after the 2nd, 4th and 6th step (the first, untimed one starts the clock)


def test_wandb_logger_outside_a_sweep_and_override_tags(tmp_path):
    logger = wandb_logger(project="t", save_dir=str(tmp_path), mode="offline")
    assert logger._wandb_init.get("group") is None and logger._wandb_init.get("tags") is None
    tags = override_tags(
        [
            "masking.ratio=0.6",
            "paths.output_dir=/x",
            "hydra.run.dir=/y",
            "data.root=/d",
            "~callbacks.progress",
            "+sweep=s",
            "model.decoder.depth=" + "8" * 80,
        ]
    )
    assert tags[:3] == ["masking.ratio=0.6", "~callbacks.progress", "sweep=s"] and len(tags[3]) == 64


def test_token_diversity_matches_the_pairwise_reference_and_extremes():
    from mimlab.callbacks.target_maps import similarity_maps, token_diversity

    torch.manual_seed(0)
    tokens = torch.randn(2, 9, 8)
    x = nn.functional.normalize(tokens, dim=-1)
    ref = [1 - sum(float(x[n, i] @ x[n, k]) for i in range(9) for k in range(9) if i != k) / 72 for n in range(2)]
    assert token_diversity(tokens).tolist() == pytest.approx(ref, rel=1e-5)
    assert float(token_diversity(torch.ones(1, 9, 8))) == pytest.approx(0.0, abs=1e-6)  # collapsed teacher
    maps = similarity_maps(tokens)
    assert maps.shape == (2, 1, 3, 3) and torch.allclose(maps[:, 0, 1, 1], torch.ones(2))  # centre vs itself


def test_teacher_panel_writes_diversity_csv_and_png_for_teachers_only(tmp_path):
    from mimlab.callbacks.target_maps import TeacherTargetPanel

    class Teacher(Target):
        from_teacher = True

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 8, stride=8)

        def forward(self, images, mask=None):
            return self.conv(images)  # (N, 8, 4, 4) tokens

    dataset = [(torch.randn(3, 32, 32), 0) for _ in range(8)]
    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(val_set=dataset), default_root_dir=str(tmp_path), global_step=0, loggers=[]
    )
    module = SimpleNamespace(
        target=Teacher(),
        device=torch.device("cpu"),
        make_mask=lambda images, seeds: MaskSet(torch.ones(images.shape[0], 16)),
    )
    path = TeacherTargetPanel(num_images=2).render(trainer, module)
    assert path is not None and path.stat().st_size > 500
    rows = (tmp_path / "target_maps" / "token_diversity.csv").read_text().splitlines()
    assert rows[0] == "step,target/token_diversity" and 0 < float(rows[1].split(",")[1]) <= 2
    module.target = NormPixTarget(patch_size=8)  # a pixel target: no teacher features, nothing drawn
    assert TeacherTargetPanel().render(trainer, module) is None


def test_the_run_summary_names_each_picture_by_what_it_draws(tmp_path):
    from mimlab.callbacks.reconstruction import ReconstructionPanel
    from mimlab.callbacks.target_maps import TeacherTargetPanel
    from mimlab.train import _artefacts

    reconstruction, target_maps = ReconstructionPanel(), TeacherTargetPanel()
    trainer = SimpleNamespace(
        default_root_dir=str(tmp_path), checkpoint_callback=None, callbacks=[reconstruction, target_maps], loggers=[]
    )
    target_maps.last_path = tmp_path / "target_maps" / "step_0000010.png"
    assert "reconstruction_png" not in _artefacts(trainer)  # a teacher target: no reconstruction drawn
    reconstruction.last_path = tmp_path / "reconstructions" / "step_0000010.png"
    artefacts = _artefacts(trainer)
    assert artefacts["reconstruction_png"] == str(reconstruction.last_path)
    assert artefacts["target_maps_png"] == str(target_maps.last_path)
