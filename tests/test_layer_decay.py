"""Layer-wise lr decay: every real backbone gets the same layer ids and lr scales in fine-tuning, detection and
segmentation, and on the full-size models (meta device) they equal the official rules name by name.

The official rules are re-derived here as references, written after the official code:
MAE ``util/lr_decay.py`` (``param_groups_lrd``, ViT-B 0.65); ConvNeXt-V2 ``optim_factory.py`` + ``main_finetune.py``
("group" for Base, "single" for Atto, scales ``decay ** (num_layers + 1 - id)``); iTPN ``util/lr_decay.py`` (ids over
the official flat ``blocks`` list, PatchMerges skipped, decay renormalised by ``13 / num_layers``); SimMIM
``optimizer.py`` ``get_swin_layer`` (Swin, patch merging at the end of a stage there, at the start of the next in timm).
"""

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config
from mimlab.models.backbones.convnextv2 import MaskedConvNeXtV2
from mimlab.models.backbones.hivit import HiViT
from mimlab.optim import ParamGroups


def mae_official(name: str, depth: int, decay: float) -> tuple[float, bool]:
    """MAE ``param_groups_lrd`` + ``get_layer_id_for_vit``: (lr scale, no weight decay) of a ViT parameter."""
    num_layers = depth + 1
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        layer_id = 0
    elif name.startswith("blocks"):
        layer_id = int(name.split(".")[1]) + 1
    else:
        layer_id = num_layers
    return decay ** (num_layers - layer_id), name in ("pos_embed", "cls_token", "dist_token")


def convnext_official(name: str, depths: list[int], decay: float, group: bool) -> tuple[float, bool]:
    """ConvNeXt-V2 ``get_num_layer_for_convnext(_single)`` + ``LayerDecayValueAssigner`` + ``get_parameter_groups``."""
    parts = name.split(".")
    if group:
        num_layers = 12
        if parts[0] == "downsample_layers":
            stage = int(parts[1])
            layer_id = 0 if stage == 0 else (stage + 1 if stage in (1, 2) else 12)
        elif parts[0] == "stages":
            stage, block = int(parts[1]), int(parts[2])
            layer_id = stage + 1 if stage in (0, 1) else (3 + block // 3 if stage == 2 else 12)
        else:
            layer_id = num_layers + 1
    else:
        num_layers = sum(depths)
        if parts[0] == "downsample_layers":
            layer_id = sum(depths[: int(parts[1])]) + 1
        elif parts[0] == "stages":
            layer_id = sum(depths[: int(parts[1])]) + int(parts[2]) + 1
        else:
            layer_id = sum(depths) + 1
    values = [decay ** (num_layers + 1 - i) for i in range(num_layers + 2)]
    return values[layer_id], name.endswith((".gamma", ".beta"))


def itpn_official(name: str, mlp_depth: int, depth: int, decay: float) -> tuple[float, bool]:
    """iTPN ``param_groups_lrd`` on the official flat ``blocks`` list (PatchMerge at indices m and 2m+1)."""
    m = mlp_depth
    kinds = ["mlp"] * m + ["merge"] + ["mlp"] * m + ["merge"] + ["attn"] * depth
    main_block = [i for i, kind in enumerate(kinds) if kind != "merge"]
    num_layers = len(main_block) + 1
    layer_decay = decay ** (13 / num_layers)
    offsets = {"stage4": 0, "merge4": m, "stage8": m + 1, "merge8": 2 * m + 1, "main_blocks": 2 * m + 2}
    root, _, rest = name.partition(".")
    if root in offsets:  # mimlab name -> the official name in the flat list
        index, _, tail = rest.partition(".") if root in ("stage4", "stage8", "main_blocks") else ("0", "", rest)
        name = f"blocks.{offsets[root] + int(index)}.{tail}"
    if name in ("cls_token", "pos_embed", "absolute_pos_embed") or name.startswith("patch_embed"):
        layer_id = 0
    elif name.startswith("blocks"):
        i = int(name.split(".")[1])
        while i not in main_block:
            i -= 1
        layer_id = main_block.index(i) + 1
    else:
        layer_id = num_layers
    return layer_decay ** (num_layers - layer_id), name.endswith(
        ".relative_position_bias_table"
    ) or name == "absolute_pos_embed"


def swin_official(name: str, depths: list[int], decay: float) -> tuple[float, bool]:
    """SimMIM ``get_swin_layer`` + ``scales = decay ** i for i in reversed(range(num_layers + 2))``; timm's
    ``layers.i.downsample`` is SimMIM's ``layers.(i-1).downsample``. No decay: ``relative_position_bias_table``."""
    num_layers = sum(depths) + 2
    parts = name.split(".")
    if parts[0] == "layers" and parts[2] == "downsample":
        parts = ["layers", str(int(parts[1]) - 1), "downsample", parts[3]]
    if name == "mask_token" or name.startswith("patch_embed"):
        layer_id = 0
    elif parts[0] == "layers":
        stage, block_id = int(parts[1]), parts[3]
        layer_id = (
            sum(depths[: stage + 1]) if block_id in ("reduction", "norm") else sum(depths[:stage]) + int(block_id) + 1
        )
    else:
        layer_id = num_layers - 1
    scales = [decay**i for i in reversed(range(num_layers))]
    return scales[layer_id], name.endswith("relative_position_bias_table") or name == "mask_token"


# backbone config, neck for detection/segmentation, decay (the fine-tuning recipe's), official reference
CASES = {
    "vit_base_p16": ("simple_fpn", 0.65, lambda n, b, d: mae_official(n, len(b.blocks), d)),
    "convnextv2_base": ("fpn", 0.6, lambda n, b, d: convnext_official(n, b.depths, d, group=True)),
    "convnextv2_atto": ("fpn", 0.9, lambda n, b, d: convnext_official(n, b.depths, d, group=False)),
    "itpn_base": ("itpn_pyramid", 0.60, lambda n, b, d: itpn_official(n, len(b.stage4), len(b.main_blocks), d)),
    "mask_token_swin_base_w6": ("fpn", 0.9, lambda n, b, d: swin_official(n, [len(s.blocks) for s in b.layers], d)),
}
TASKS = {
    "finetune": ["task=finetune", "task.num_classes=1000"],
    "detect": ["task=detect", "data=coco_synthetic"],
    "segment": ["task=segment", "data=ade20k_synthetic"],
}


def backbone_groups(backbone_cfg: str, task: str, tmp_path) -> tuple[torch.nn.Module, dict[str, tuple[float, bool]]]:
    """Build the task on the meta device and read (lr scale, no weight decay) of every backbone parameter from the
    param groups its `optim` group builds."""
    neck, decay, _ = CASES[backbone_cfg]
    size = 192 if "swin" in backbone_cfg else 224  # SimMIM's Swin-B: window 6 at 192 px
    overrides = [
        *TASKS[task],
        f"model/backbone={backbone_cfg}",
        f"model.backbone.img_size={size}",
        "logger=csv",
        f"optim.param_groups.layer_decay={decay}",
    ]
    if backbone_cfg.startswith("convnext"):
        overrides.remove(f"model.backbone.img_size={size}")
    if task != "finetune":
        overrides.append(f"model/neck={neck}")
    with torch.device("meta"):
        module = instantiate(compose_config(overrides, tmp_path).task)
    groups = module.optim.param_groups(module, 0.05)
    by_param = {id(p): (g["lr_scale"], g["weight_decay"] == 0.0) for g in groups for p in g["params"]}
    return module.backbone, {n: by_param[id(p)] for n, p in module.backbone.named_parameters() if p.requires_grad}


@pytest.mark.slow
@pytest.mark.parametrize("backbone_cfg", list(CASES))
def test_every_task_gets_the_official_scales_of_the_backbone(backbone_cfg, tmp_path):
    _, decay, official = CASES[backbone_cfg]
    per_task = {task: backbone_groups(backbone_cfg, task, tmp_path) for task in TASKS}
    finetune = per_task["finetune"][1]  # (MAE fine-tuning drops the ViT's final norm: its global pool uses fc_norm)
    for task, (backbone, scales) in per_task.items():
        assert {n: scales[n] for n in finetune} == finetune, task
        for name, (scale, no_decay) in scales.items():
            ref_scale, ref_named_no_decay = official(name, backbone, decay)
            param = dict(backbone.named_parameters())[name]
            assert scale == ref_scale, (task, name)  # bit-exact: the same operations as the official code
            assert no_decay == (param.ndim <= 1 or name.endswith(".bias") or ref_named_no_decay), (task, name)


def test_convnext_single_rule_leaves_id_zero_empty_and_keeps_the_official_stem_scale():
    """ConvNeXt V2 'single' puts the stem at id 1: id 0 is legitimately empty (the rule must not renumber)."""
    with torch.device("meta"):
        atto = MaskedConvNeXtV2((2, 2, 6, 2), (40, 80, 160, 320))
    groups = atto.layer_groups("single")
    assert 0 not in groups.ids.values() and groups.num_layers == 13 and groups.ids["downsample_layers.0.0.weight"] == 1
    assert groups.scale(0.9, groups.ids["downsample_layers.0.0.weight"]) == 0.9**12
    assert atto.layer_groups("group").num_layers == 13  # 'group' on Atto depths: ids 5..11 empty, scales unchanged
    with pytest.raises(ValueError, match=r"no layer-decay rule 'stage'.*\['single', 'group'\].*layer_decay_rule"):
        atto.layer_groups("stage")


def test_hivit_rules_itpn_renormalises_and_hivit_does_not():
    with torch.device("meta"):
        itpn_b = HiViT(embed_dim=512, mlp_depth=3, depth=24, num_heads=8, rpe=True)
    itpn, plain = itpn_b.layer_groups("itpn"), itpn_b.layer_groups("hivit")
    assert itpn.ids == plain.ids and itpn.num_layers == 31
    assert itpn.scale(0.6, 0) == (0.6 ** (13 / 31)) ** 31 and plain.scale(0.6, 0) == 0.6**31
    assert itpn.ids["merge4.reduction.weight"] == itpn.ids["stage4.2.mlp.fc2.weight"] == 3


def test_non_backbone_parameters_get_scale_one_and_layer_decay_one_is_a_single_scale(tmp_path):
    with torch.device("meta"):
        module = instantiate(compose_config(["experiment=detect_mae_vit_b_coco", "logger=csv"], tmp_path).task)
    groups = module.optim.param_groups(module, 0.1)
    head = {id(p) for p in module.model.roi_heads.parameters()} | {id(p) for p in module.adapter.neck.parameters()}
    assert all(g["lr_scale"] == 1.0 for g in groups if any(id(p) in head for p in g["params"]))
    flat = ParamGroups(layer_decay=1.0)(module, 0.1)
    assert [g["lr_scale"] for g in flat] == [1.0, 1.0] and sum(len(g["params"]) for g in flat) == sum(
        len(g["params"]) for g in groups
    )
