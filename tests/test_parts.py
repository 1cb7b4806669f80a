"""Parts are built from the parts they attach to (mimlab/models/parts.py): no config of a method's parts reads another
group's keys, widths and strides follow the backbone they are composed with, and a part that needs one backbone
family fails at build time naming itself."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config
from mimlab.masking import RandomMasking
from mimlab.models.backbones.hivit import HiViT
from mimlab.models.backbones.vit import MaskedViT
from mimlab.models.parts import CompositionError, Parts, build
from mimlab.targets.data2vec import Data2VecTarget
from mimlab.targets.ijepa import IJEPATarget
from mimlab.train import CONFIG_DIR

PART_GROUPS = ("model/neck", "model/decoder", "target", "masking", "loss")
INTERPOLATION = re.compile(r"\$\{(?!oc\.|mimlab\.|now:|hydra:)([\w.]+)")


def test_no_part_config_reads_another_groups_keys():
    """The configs of necks, decoders, targets, mask generators and losses state only their own settings; the one
    link left between groups is the input size a backbone is built for (``model.backbone.img_size:
    ${data.img_size}``)."""
    readers = {}
    for group in PART_GROUPS:
        for path in sorted((Path(CONFIG_DIR) / group).glob("*.yaml")):
            text = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
            if keys := INTERPOLATION.findall(text):
                readers[f"{group}/{path.name}"] = keys
    assert readers == {}
    backbone_reads = {
        key
        for path in (Path(CONFIG_DIR) / "model" / "backbone").glob("*.yaml")
        for key in INTERPOLATION.findall(path.read_text())
    }
    assert backbone_reads == {"data.img_size"}


@pytest.mark.parametrize(
    ("experiment", "first_layer"),
    [("mae_vit_tiny_synthetic", "decoder_embed"), ("simmim_vit_tiny_synthetic", "decoder.0")],
)
def test_a_decoder_takes_the_width_and_stride_of_the_backbone_it_is_composed_with(experiment, first_layer, tmp_path):
    """The same decoder config on two ViT widths and patch sizes: its input width and its output per unit follow the
    backbone; MAE's mask unit (unset) is the patch, SimMIM's recipe states 2x2 patches."""
    for embed_dim, patch in ((192, 8), (48, 4)):
        overrides = [f"experiment={experiment}", f"model.backbone.embed_dim={embed_dim}"]
        cfg = compose_config([*overrides, f"model.backbone.patch_size={patch}", "logger=csv"], tmp_path)
        module = instantiate(cfg.task)
        layer = module.decoder.get_submodule(first_layer)
        assert getattr(layer, "in_features", getattr(layer, "in_channels", None)) == embed_dim
        assert module.masking.unit_size == (patch if experiment.startswith("mae") else 2 * patch)
        images = torch.randn(2, 3, cfg.data.img_size, cfg.data.img_size)
        assert torch.isfinite(module.compute_losses(images)["loss"])


@pytest.mark.parametrize("target", [Data2VecTarget, IJEPATarget])
def test_a_target_that_needs_a_vit_names_itself_when_composed_with_another_family(target):
    hivit = HiViT(embed_dim=32, mlp_depth=1, depth=1, num_heads=2, img_size=64)
    factory = functools.partial(target.attach)
    with pytest.raises(CompositionError, match=rf"{target.__name__} attaches to a MaskedViT backbone.*HiViT"):
        build(factory, Parts(hivit, RandomMasking(0.5, 16)))


def test_build_calls_factories_only():
    masking = RandomMasking(0.5, 16)  # a built generator is callable, and must not be called with the parts
    hivit = HiViT(embed_dim=32, mlp_depth=1, depth=1, num_heads=2, img_size=64)
    assert build(masking, Parts(hivit)) is masking and build(None, Parts(hivit)) is None
    built = build(functools.partial(RandomMasking.attach, ratio=0.5), Parts(hivit))
    assert isinstance(built, RandomMasking) and built.unit_size == 16  # HiViT's final stride


def test_block_outputs_are_kept_because_the_decoder_that_reads_them_asks(tmp_path):
    """Img2Vec's decoder averages every block, iTPN-CLIP's head reads block ``aux_block``: each asks its backbone at
    build time (no recipe lists them); a ViT config of an older checkpoint (``keep_hidden_states: true``) keeps all."""
    img2vec = instantiate(compose_config(["experiment=img2vec_vit_tiny_synthetic", "logger=csv"], tmp_path).task)
    assert img2vec.backbone.keep_hidden == tuple(range(len(img2vec.backbone.blocks)))
    clip_cfg = compose_config(["experiment=itpn_hivit_tiny_clip_synthetic", "logger=csv"], tmp_path)
    assert list(clip_cfg.model.backbone.keep_hidden) == []
    assert instantiate(clip_cfg.task).backbone.keep_hidden == (clip_cfg.model.decoder.aux_block,)
    assert MaskedViT(32, 8, embed_dim=16, depth=3, num_heads=2, keep_hidden_states=True).keep_hidden == (0, 1, 2)
