"""Export names the timm model timm itself registers for the architecture, so ``timm.create_model(name)`` loads it."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import compose_config
from mimlab.checkpoints.export import main as export_main


def pretraining_checkpoint(path, backbone_config: str, tmp_path):
    """A mimlab pre-training checkpoint holding the backbone of ``conf/model/backbone/<backbone_config>``."""
    cfg = compose_config([f"model/backbone={backbone_config}", "data.img_size=224"], tmp_path)
    torch.manual_seed(0)
    backbone = instantiate(cfg.model.backbone).eval()
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    config = {"model": {"backbone": OmegaConf.to_container(cfg.model.backbone, resolve=True)}}  # as a run stores it
    torch.save({"state_dict": state, "mimlab": {"config": config}}, path)
    return backbone


def exported(tmp_path, ckpt):
    export_main([f"ckpt={ckpt}", "format=timm"])
    spec = json.loads(ckpt.with_suffix(".timm.pth.json").read_text())
    return spec, torch.load(ckpt.with_suffix(".timm.pth"))


def test_convnextv2_atto_is_exported_as_timm_convnextv2_atto(tmp_path):
    ckpt = tmp_path / "fcmae_atto.ckpt"
    backbone = pretraining_checkpoint(ckpt, "convnextv2_atto", tmp_path)
    spec, state = exported(tmp_path, ckpt)
    assert spec == {"model_name": "convnextv2_atto", "kwargs": {"num_classes": 0}}
    model = timm.create_model("convnextv2_atto", pretrained=False, num_classes=0).eval()  # conv_mlp=True in timm
    model.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), backbone.forward_features(x)[-1], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "backbone_config, name", [("vit_base_p16", "vit_base_patch16_224"), ("convnextv2_base", "convnextv2_base")]
)
def test_paper_sized_backbones_get_timm_names_without_architecture_kwargs(tmp_path, backbone_config, name):
    ckpt = tmp_path / "pre.ckpt"
    pretraining_checkpoint(ckpt, backbone_config, tmp_path)
    spec, state = exported(tmp_path, ckpt)
    assert spec["model_name"] == name and set(spec["kwargs"]) <= {"num_classes", "global_pool", "fc_norm"}
    timm.create_model(name, pretrained=False, **spec["kwargs"]).load_state_dict(state, strict=True)
