"""Layer-wise lr decay groups: exact scales for ViT (MAE), ConvNeXt V2 single/group and HiViT/iTPN (renormalised)."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mimlab.models.backbones.vit import MaskedViT
from mimlab.models.heads.classifier import PooledClassifierHead
from mimlab.optim.layer_decay import ConvNeXtLayerIds, HiViTLayerIds, LayerDecay, ViTLayerIds


class _Task(nn.Module):
    def __init__(self, backbone: nn.Module, dim: int) -> None:
        super().__init__()
        self.backbone, self.head = backbone, PooledClassifierHead(dim, 10)


def _scales(groups):
    out = {}
    for g in groups:
        for p in g["params"]:
            out[id(p)] = (g["lr_scale"], g["weight_decay"])
    return out


@pytest.mark.parametrize("decay", [0.65, 0.75])
def test_vit_block_i_scale_is_decay_pow_depth_minus_i(decay):
    depth = 4
    task = _Task(MaskedViT(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, learnable_pos_embed=True), 32)
    scales = _scales(LayerDecay(decay, ViTLayerIds())(task, 0.05))
    for name, p in task.named_parameters():
        scale, wd = scales[id(p)]
        if name.startswith("backbone.blocks."):
            i = int(name.split(".")[2])
            assert scale == decay ** (depth - i), name
        elif name.split(".")[1] in ("cls_token", "pos_embed", "patch_embed"):
            assert scale == decay ** (depth + 1), name
        else:  # final norm, fc_norm, head
            assert scale == 1.0, name
        no_decay = p.ndim <= 1 or name in ("backbone.cls_token", "backbone.pos_embed")
        assert wd == (0.0 if no_decay else 0.05), name


def _official_convnext_id(name, depths, group):
    """ConvNeXt-V2 optim_factory.py, re-derived in the test as the reference."""
    parts = name.split(".")
    if parts[0] == "downsample_layers":
        s = int(parts[1])
        if not group:
            return sum(depths[:s]) + 1
        return 0 if s == 0 else (s + 1 if s in (1, 2) else 12)
    if parts[0] == "stages":
        s, b = int(parts[1]), int(parts[2])
        if not group:
            return sum(depths[:s]) + b + 1
        return s + 1 if s in (0, 1) else (3 + b // 3 if s == 2 else 12)
    return 13 if group else sum(depths) + 1


@pytest.mark.parametrize("group", [False, True])
def test_convnext_layer_ids_match_official_rule(group):
    depths = [3, 3, 27, 3]
    backbone = SimpleNamespace(depths=depths)
    rule = ConvNeXtLayerIds(group=group)
    names = [f"downsample_layers.{k}.0.weight" for k in range(4)]
    names += [f"stages.{s}.{b}.dwconv.weight" for s, d in enumerate(depths) for b in range(d)] + ["norm.weight"]
    for name in names:
        assert rule(name, backbone) == _official_convnext_id(name, depths, group), name
    assert rule.num_layers(backbone) == (13 if group else 37)
    ids = {rule(n, backbone) for n in names}
    assert ids == set(range(0 if group else 1, rule.num_layers(backbone) + 1))


def test_hivit_ids_match_official_block_list_and_renormalise():
    """Official iTPN: one `blocks` list with PatchMerges at indices 3 and 7 (B); merge takes the id of the block before."""
    m, depth = 3, 24
    official_list = ["mlp"] * m + ["merge"] + ["mlp"] * m + ["merge"] + ["attn"] * depth
    main = [i for i, kind in enumerate(official_list) if kind != "merge"]
    num_layers = len(main) + 1
    assert num_layers == 31

    def official(i):
        while i >= 0:
            if i in main:
                return main.index(i) + 1
            i -= 1
        return 0

    ours = []
    for j in range(m):
        ours.append(f"stage4.{j}.mlp.fc1.weight")
    ours.append("merge4.reduction.weight")
    ours += [f"stage8.{j}.mlp.fc1.weight" for j in range(m)] + ["merge8.reduction.weight"]
    ours += [f"main_blocks.{j}.attn.qkv.weight" for j in range(depth)]
    backbone = SimpleNamespace(stage4=[0] * m, stage8=[0] * m, main_blocks=[0] * depth)
    rule = HiViTLayerIds()
    assert rule.num_layers(backbone) == num_layers
    for i, name in enumerate(ours):
        assert rule(name, backbone) == official(i), name
    assert rule("patch_embed.proj.weight", backbone) == 0 and rule("absolute_pos_embed", backbone) == 0
    ld = LayerDecay(0.60, rule, reference_layers=13)
    assert ld.effective_decay(backbone) == pytest.approx(0.60 ** (13 / 31), rel=1e-12)


def test_layer_id_gap_is_an_error():
    task = _Task(MaskedViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), 32)
    task.backbone.blocks[0].requires_grad_(False)
    task.backbone.blocks = nn.ModuleList([task.backbone.blocks[1]])  # depth 1 now: still consistent
    LayerDecay(0.5)(task, 0.05)

    class Skip(ViTLayerIds):
        def __call__(self, name, backbone):
            return 1 + super().__call__(name, backbone) if name.startswith("blocks") else super().__call__(name, backbone)

    with pytest.raises(ValueError, match="scales would not be exact"):
        LayerDecay(0.5, Skip())(_Task(MaskedViT(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2), 32), 0.05)
