"""Paper fine-tuning / probing recipes on the meta device: classifier parameter counts (docs/methods.md §7) and lr-scale range."""

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config


@pytest.mark.parametrize(
    "experiment, params_m, decay, num_layers",
    [
        ("finetune_mae_vit_b", 86.568, 0.65, 13),  # §7 #1; MAE: depth + 1
        ("finetune_convnextv2_b", 88.718, 0.6, 13),  # §7 #19; "group": 12 groups + 1
        ("finetune_itpn_b", 78.558, 0.60 ** (13 / 31), 31),  # §7 #34 (rpe on); iTPN renormalisation
    ],
)
def test_recipe_param_count_and_layer_scales(experiment, params_m, decay, num_layers, tmp_path):
    cfg = compose_config(
        [f"experiment={experiment}", "logger=csv", "task.num_classes=1000", "task.ema_decay=null"], tmp_path
    )
    with torch.device("meta"):
        module = instantiate(cfg.task)
        groups = module.optim.param_groups(module, module.optim.weight_decay)
    assert sum(p.numel() for p in module.parameters()) / 1e6 == pytest.approx(params_m, abs=5e-4)
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales[-1] == 1.0 and scales[0] == pytest.approx(decay**num_layers, rel=1e-9)
    assert len(scales) == num_layers + 1


def test_linear_probe_recipe_freezes_all_but_the_head(tmp_path):
    cfg = compose_config(["experiment=linprobe_mae_vit_b", "logger=csv", "task.num_classes=1000"], tmp_path)
    with torch.device("meta"):
        module = instantiate(cfg.task)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"head.fc.weight", "head.fc.bias"}
    assert sum(p.numel() for p in module.parameters()) / 1e6 == pytest.approx(86.568, abs=5e-4)
    assert cfg.optim.blr == 0.1 and cfg.optim.weight_decay == 0.0 and cfg.trainer.max_epochs == 90
