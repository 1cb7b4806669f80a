"""Every encoder the project pre-trains exports to a file that loads outside mimlab and computes what the encoder
computes: the printed load command (``timm.create_model(...)`` + ``load_state_dict(strict=True)``, or
``load_exported`` where timm has no such model) builds a model whose pooled features equal the mimlab encoder's
readout on the same images (ConvNeXt V2: timm's head LayerNorm of it)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from conftest import compose_config
from mimlab.checkpoints.export import ExportMismatchError, export, exported_features, load_exported, main
from mimlab.models.backbones.contract import TimmEquivalent

# recipe -> (the format its encoder exports to, the readout its pre-training trains)
RECIPES = {
    "mae_vit_tiny_synthetic": ("timm", "avg"),
    "simmim_vit_tiny_synthetic": ("timm", "avg"),
    "maskfeat_vit_tiny_synthetic": ("timm", "avg"),
    "data2vec2_vit_tiny_synthetic": ("mimlab", "avg"),
    "ijepa_vit_tiny_synthetic": ("timm", "avg"),
    "img2vec_vit_tiny_synthetic": ("timm", "avg"),
    "fcmae_convnextv2_atto_synthetic": ("timm", "avg"),
    "itpn_hivit_tiny_synthetic": ("mimlab", "avg"),
}


def pretraining_checkpoint(tmp_path, recipe: str, overrides=()):
    """A checkpoint as a pre-training run of ``recipe`` writes it (backbone weights moved off their init, the resolved
    config inside); returns (path, backbone, image size)."""
    cfg = compose_config([f"experiment={recipe}", *overrides], tmp_path)
    torch.manual_seed(0)
    backbone = instantiate(cfg.model.backbone).eval()
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "last.ckpt"
    config = OmegaConf.to_container(cfg, resolve=True)
    torch.save(
        {"state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}, "mimlab": {"config": config}},
        path,
    )
    return path, backbone, cfg.data.img_size


def load_with_printed_command(stdout: str) -> nn.Module:
    """Run the ``load with:`` line the export printed, as a user would paste it."""
    command = stdout.split("load with: ", 1)[1].strip()
    scope = {"timm": timm, "torch": torch}
    exec(command, scope)  # the command ends by building m
    return scope["m"].eval()


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_the_printed_load_command_builds_the_encoder_the_method_trained(recipe, tmp_path, capsys):
    ckpt, backbone, size = pretraining_checkpoint(tmp_path, recipe)
    fmt, readout = RECIPES[recipe]
    assert backbone.global_pool == readout
    main([f"ckpt={ckpt}"])
    printed = capsys.readouterr().out
    assert f"({fmt} format" in printed
    model = load_with_printed_command(printed)
    images = torch.randn(3, 3, size, size)
    with torch.no_grad():
        ours = backbone.forward_pooled(images)
        if recipe.startswith("fcmae"):  # timm's ConvNeXt head normalises the pooled feature (identity affine here)
            ours = nn.functional.layer_norm(ours, ours.shape[-1:], eps=1e-6)
        theirs = exported_features(model, images)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    if fmt == "timm":
        spec = json.loads(ckpt.with_suffix(".timm.pth.json").read_text())
        assert spec["kwargs"].get("global_pool", "avg") == {"cls": "token", "avg": "avg"}[readout]


def test_the_post_norm_vit_of_data2vec2_is_never_written_for_timms_pre_norm_vit(tmp_path):
    ckpt, backbone, size = pretraining_checkpoint(tmp_path, "data2vec2_vit_tiny_synthetic")
    result = export(ckpt)
    assert result.format == "mimlab" and result.path.name == "last.mimlab.pth"
    assert result.spec["mimlab_backbone"]["post_norm"] is True and result.spec["readout"] == "avg"
    # timm's pre-norm ViT would load these tensors only after renaming, and would compute something else
    plain = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=size, patch_size=8, embed_dim=192,
                              depth=4, num_heads=3, num_classes=0, global_pool="avg", fc_norm=False)  # fmt: skip
    assert set(plain.state_dict()) != set(torch.load(result.path))


def test_hivit_exports_its_state_dict_with_the_class_that_builds_it(tmp_path):
    ckpt, backbone, size = pretraining_checkpoint(tmp_path, "itpn_hivit_tiny_synthetic")
    result = export(ckpt)
    assert result.spec["mimlab_backbone"]["_target_"] == "mimlab.models.backbones.hivit.HiViT"
    fresh = load_exported(result.path, random_init=True)
    assert type(fresh) is type(backbone) and not torch.equal(
        fresh.patch_embed.proj.weight, backbone.patch_embed.proj.weight
    )


def test_export_refuses_to_overwrite_the_checkpoint_it_reads(tmp_path):
    ckpt, _, _ = pretraining_checkpoint(tmp_path, "mae_vit_tiny_synthetic")
    before = ckpt.read_bytes()
    with pytest.raises(SystemExit, match="is the checkpoint being exported"):
        main([f"ckpt={ckpt}", f"out={ckpt}"])
    with pytest.raises(SystemExit, match="is the checkpoint being exported"):
        main([f"ckpt={ckpt}", f"out={tmp_path / '.' / 'last.ckpt'}"])
    assert ckpt.read_bytes() == before


def test_an_export_that_would_compute_something_else_is_refused_and_leaves_no_file(tmp_path, monkeypatch):
    from mimlab.models.backbones.vit import MaskedViT

    ckpt, _, _ = pretraining_checkpoint(tmp_path, "ijepa_vit_tiny_synthetic")
    honest = MaskedViT.to_timm

    def swapped_blocks(self, head=None) -> TimmEquivalent:  # a converter bug: two blocks' weights exchanged
        spec = honest(self, head)
        state = dict(spec.state_dict)
        for key in [k for k in state if k.startswith("blocks.0.")]:
            other = key.replace("blocks.0.", "blocks.1.", 1)
            state[key], state[other] = state[other], state[key]
        return TimmEquivalent(spec.name, spec.kwargs, state, spec.reference)

    monkeypatch.setattr(MaskedViT, "to_timm", swapped_blocks)
    with pytest.raises(ExportMismatchError, match="does not build the same network"):
        export(ckpt, tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists() and not (tmp_path / "out.pth.json").exists()
