"""Released SimMIM (ViT, Swin), MaskFeat, data2vec 2.0 and I-JEPA files through the one loader, into the backbone
configs of the project's recipes (docs/checkpoints.md).

Each file is written by :mod:`mimlab.checkpoints.released` with the official key names, tensor ranks and file
structure (checked once against the official model code, docs/checkpoints.md). Every test states the official ->
mimlab mapping on its own, then checks that each model tensor equals its file tensor, that nothing kept its init,
and that the log names the layout (and the sub-model).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mimlab.checkpoints import released
from mimlab.checkpoints.encoder import checkpoint_encoder, inferred_node
from mimlab.checkpoints.load import CheckpointMismatchError, load_pretrained
from mimlab.train import CONFIG_DIR


def backbone(config: str, **overrides) -> torch.nn.Module:
    """``conf/model/backbone/<config>.yaml`` (the recipes' encoder) with ``overrides``."""
    node = OmegaConf.load(Path(CONFIG_DIR) / "model" / "backbone" / f"{config}.yaml")
    return instantiate(OmegaConf.merge(node, overrides))


def save(tmp_path: Path, name: str, obj: dict) -> Path:
    torch.save(obj, tmp_path / name)
    return tmp_path / name


def assert_loaded(model: torch.nn.Module, expected: dict[str, torch.Tensor], report: dict, skip=()) -> None:
    """Every model tensor (but ``skip``) equals its file tensor; none kept its init."""
    own = {k: v for k, v in model.state_dict().items() if k not in skip}
    assert sorted(own) == sorted(expected)
    for key, value in own.items():
        assert torch.equal(value, expected[key]), key
    assert [k for k in report["missing"] if k not in skip] == []


def test_simmim_vit_pretraining_file_fills_the_beit_encoder(tmp_path, caplog):
    file = released.simmim_vit(dim=64, depth=2, heads=2, patch=8, img=64)
    path = save(tmp_path, "simmim_pretrain__vit_base__img224__800ep.pth", file)
    model = backbone("mask_token_beit_tiny_p8", img_size=64, embed_dim=64, depth=2, num_heads=2)
    with caplog.at_level(logging.INFO):
        report = load_pretrained(path, model)["backbone"]
    enc = {k.removeprefix("encoder."): v for k, v in file["model"].items() if k.startswith("encoder.")}
    expected = {k: v for k, v in enc.items() if not k.endswith("relative_position_index")}  # a rebuilt buffer
    assert_loaded(model, expected, report)
    assert "official SimMIM ViT (BEiT layout) layout" in caplog.text and "decoder.* (2)" in caplog.text


def test_simmim_vit_fine_tuned_file_with_per_block_tables_is_refused_with_the_reason(tmp_path):
    file = released.simmim_vit(dim=64, depth=2, heads=2, patch=8, img=64)["model"]
    tuned = {k.removeprefix("encoder."): v for k, v in file.items() if not k.startswith(("decoder", "encoder.rel_pos"))}
    tuned |= {f"blocks.{i}.attn.relative_position_bias_table": torch.zeros(228, 2) for i in range(2)}
    tuned |= {"fc_norm.weight": torch.ones(64), "head.weight": torch.zeros(10, 64)}
    model = backbone("mask_token_beit_tiny_p8", img_size=64, embed_dim=64, depth=2, num_heads=2)
    with pytest.raises(CheckpointMismatchError, match=r"one relative position bias table per block.*pre-trained file"):
        load_pretrained(save(tmp_path, "simmim_finetune__vit_base.pth", {"model": tuned}), model)


SWIN = dict(img_size=64, window_size=2, embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4])


def official_to_timm_swin(key: str) -> str:
    """The official Swin keeps patch merging s at the end of stage s, timm at the start of stage s + 1."""
    parts = key.split(".")
    if parts[0] == "layers" and parts[2] == "downsample":
        parts[1] = str(int(parts[1]) + 1)
    return ".".join(parts)


def test_simmim_swin_pretraining_file_fills_timm_swin_with_the_mergings_moved(tmp_path, caplog):
    file = released.simmim_swin(dim=16, depths=(1, 1, 2, 1), heads=(1, 2, 2, 4), window=2, patch=4, img=64)
    model = backbone("mask_token_swin_base_w6", **SWIN)
    with caplog.at_level(logging.INFO):
        report = load_pretrained(save(tmp_path, "simmim_swin.pth", file), model)["backbone"]
    expected = {
        official_to_timm_swin(k.removeprefix("encoder.")): v
        for k, v in file["model"].items()
        if k.startswith("encoder.") and not k.endswith(("relative_position_index", "attn_mask"))
    }
    assert "layers.3.downsample.reduction.weight" in expected and "layers.0.downsample.norm.weight" not in expected
    assert_loaded(model, expected, report)
    assert "official Swin (SimMIM) layout" in caplog.text and "moved to timm's layers.<s+1>.downsample" in caplog.text


def test_simmim_swin_fine_tuned_file_leaves_its_head_out_and_keeps_the_mask_token_init(tmp_path, caplog):
    file = released.simmim_swin(dim=16, depths=(1, 1, 2, 1), heads=(1, 2, 2, 4), window=2, patch=4, img=64)["model"]
    tuned = {
        k.removeprefix("encoder."): v for k, v in file.items() if k.startswith("encoder.") and "mask_token" not in k
    }
    tuned |= {"head.weight": torch.zeros(10, 128), "head.bias": torch.zeros(10)}
    model = backbone("mask_token_swin_base_w6", **SWIN)
    init = model.mask_token.detach().clone()
    with caplog.at_level(logging.INFO):
        report = load_pretrained(save(tmp_path, "simmim_finetune__swin.pth", {"model": tuned}), model)["backbone"]
    assert report["ignored"] == ["head.bias", "head.weight"] and report["missing"] == ["mask_token"]
    assert torch.equal(model.mask_token, init)
    assert torch.equal(model.layers[2].downsample.reduction.weight, tuned["layers.1.downsample.reduction.weight"])


def test_maskfeat_file_fills_the_encoder_and_its_head_norm_becomes_the_final_norm(tmp_path, caplog):
    file = released.maskfeat_vit(dim=64, depth=2, patch=16, img=64)
    model = backbone("mask_token_vit_tiny_p8", img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=1)
    with caplog.at_level(logging.INFO):
        report = load_pretrained(save(tmp_path, "in1k_VIT_B_MaskFeat_PT_epoch_01600.pyth", file), model)["backbone"]
    state = file["model_state"]
    expected = {k: v for k, v in state.items() if not k.startswith(("pred_head.", "hogs."))}
    expected |= {
        "norm.weight": state["pred_head.transforms.0.0.weight"],
        "norm.bias": state["pred_head.transforms.0.0.bias"],
    }
    assert_loaded(model, expected, report)
    assert "official MaskFeat (SlowFast ViT) layout" in caplog.text and "pred_head.projections.* (2)" in caplog.text


def test_maskfeat_file_with_a_multi_depth_head_is_refused(tmp_path):
    file = released.maskfeat_vit(dim=64, depth=2, patch=16, img=64)
    file["model_state"] |= {"pred_head.projections.1.weight": torch.zeros(108, 64)}
    model = backbone("mask_token_vit_tiny_p8", img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=1)
    with pytest.raises(CheckpointMismatchError, match="several blocks"):
        load_pretrained(save(tmp_path, "maskfeat_two_depths.pyth", file), model)


def data2vec2_expected(state: dict[str, torch.Tensor], prenet: int = 2) -> dict[str, torch.Tensor]:
    """fairseq's image encoder in MaskedViT(post_norm) names: prenet blocks first, a zero cls row in the positions."""
    image = "modality_encoders.IMAGE."
    positions = state[image + "fixed_positional_encoder.positions"]
    expected = {
        "patch_embed.proj.weight": state[image + "local_encoder.proj.weight"],
        "patch_embed.proj.bias": state[image + "local_encoder.proj.bias"],
        "cls_token": state[image + "extra_tokens"],
        "pos_embed": torch.cat([torch.zeros_like(positions[:, :1]), positions], 1),
        "norm_pre.weight": state[image + "context_encoder.norm.weight"],
        "norm_pre.bias": state[image + "context_encoder.norm.bias"],
    }
    for key, value in state.items():
        if key.startswith(image + "context_encoder.blocks."):
            expected[key.removeprefix(image + "context_encoder.")] = value
        elif key.startswith("blocks."):
            index, rest = key.split(".", 2)[1:]
            expected[f"blocks.{prenet + int(index)}.{rest}"] = value
    return expected


@pytest.mark.parametrize("submodel", [None, "ema"])
def test_data2vec2_file_fills_the_post_ln_encoder_student_or_teacher(tmp_path, caplog, submodel):
    file = released.data2vec2_vit(dim=64, depth=4, prenet=2, patch=8, img=64)
    path = save(tmp_path, "base_imagenet.pt", file)
    model = backbone("vit_tiny_p8", img_size=64, embed_dim=64, depth=4, num_heads=1, post_norm=True)
    with caplog.at_level(logging.INFO):
        report = load_pretrained(f"{path}::{submodel}" if submodel else path, model)["backbone"]
    source = file["model"]["_ema"] if submodel else file["model"]
    assert_loaded(model, data2vec2_expected(source), report)
    taken = "sub-model ema" if submodel else "sub-model student (the default)"
    assert f"official data2vec 2.0 (fairseq) layout, {taken}" in caplog.text


def test_data2vec2_unknown_sub_model_and_a_file_without_teacher_are_refused(tmp_path):
    file = released.data2vec2_vit(dim=64, depth=4, prenet=2, patch=8, img=64)
    path = save(tmp_path, "base_imagenet.pt", file)
    model = backbone("vit_tiny_p8", img_size=64, embed_dim=64, depth=4, num_heads=1, post_norm=True)
    with pytest.raises(CheckpointMismatchError, match=r"no sub-model 'teacher': ask for one of ::student, ::ema"):
        load_pretrained(f"{path}::teacher", model)
    del file["model"]["_ema"]
    with pytest.raises(CheckpointMismatchError, match=r"no EMA teacher.*drop '::ema'"):
        load_pretrained(f"{save(tmp_path, 'no_ema.pt', file)}::ema", model)


@pytest.mark.parametrize("submodel", [None, "encoder"])
def test_ijepa_file_fills_the_cls_free_vit_target_encoder_by_default(tmp_path, caplog, submodel):
    file = released.ijepa_vit(dim=64, depth=2, patch=8, img=64)
    path = save(tmp_path, "IN1K-vit.h.14-300e.pth.tar", file)
    model = backbone("vit_tiny_p8", img_size=64, embed_dim=64, depth=2, num_heads=1, class_token=False)
    with caplog.at_level(logging.INFO):
        report = load_pretrained(f"{path}::{submodel}" if submodel else path, model)["backbone"]
    chosen = submodel or "target_encoder"
    assert_loaded(model, {k.removeprefix("module."): v for k, v in file[chosen].items()}, report)
    assert f"official I-JEPA layout, sub-model {chosen}" in caplog.text and "predictor.*" in caplog.text


def test_ijepa_predictor_and_sub_models_of_single_model_files_are_refused(tmp_path):
    path = save(tmp_path, "IN1K-vit.h.14-300e.pth.tar", released.ijepa_vit(dim=64, depth=2, patch=8, img=64))
    model = backbone("vit_tiny_p8", img_size=64, embed_dim=64, depth=2, num_heads=1, class_token=False)
    with pytest.raises(
        CheckpointMismatchError, match=r"no sub-model 'predictor': ask for one of ::target_encoder, ::encoder"
    ):
        load_pretrained(f"{path}::predictor", model)
    mae = save(tmp_path, "mae_pretrain_vit_base.pth", released.mae_vit(dim=64, depth=2, patch=8, img=64))
    with pytest.raises(CheckpointMismatchError, match=r"official MAE layout\) holds one model.*drop '::encoder'"):
        load_pretrained(f"{mae}::encoder", backbone("vit_tiny_p8", img_size=64, embed_dim=64, depth=2, num_heads=1))


REBUILT = {  # released.TINY file -> the class and readout mimlab-eval rebuilds it as
    "mae_pretrain_vit_tiny.pth": ("MaskedViT", "avg"),
    "simmim_pretrain__vit_tiny.pth": ("MaskTokenViT", "avg"),
    "simmim_pretrain__swin_tiny.pth": ("MaskTokenSwin", "avg"),
    "in1k_VIT_tiny_MaskFeat_PT.pyth": ("MaskTokenViT", "avg"),
    "data2vec2_tiny_imagenet.pt": ("MaskedViT", "avg"),
    "IN1K-vit.tiny-ijepa.pth.tar": ("MaskedViT", "avg"),
}


@pytest.mark.parametrize("name", sorted(REBUILT))
def test_every_released_layout_is_rebuilt_without_a_config(tmp_path, name):
    """mimlab-eval's representation check and mimlab-export rebuild the encoder from the converted shapes alone, and
    its random-init twin for the baseline."""
    assert set(REBUILT) == set(released.TINY)
    encoder = checkpoint_encoder(save(tmp_path, name, released.TINY[name]()))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        trained, fresh = encoder.backbone.forward_pooled(images), encoder.fresh(0).forward_pooled(images)
    assert (type(encoder.backbone).__name__, encoder.backbone.global_pool) == REBUILT[name]
    assert trained.shape == fresh.shape == (2, encoder.backbone.num_features) and not torch.allclose(trained, fresh)
    assert encoder.node.get("post_norm", False) == ("data2vec2" in name)
    assert encoder.node.get("class_token", True) == ("ijepa" not in name)


def meta(**shapes: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Shapes only (``blocks__0__attn`` -> ``blocks.0.attn``)."""
    return {k.replace("__", "."): torch.empty(v, device="meta") for k, v in shapes.items()}


def test_inferred_configs_of_paper_sized_files():
    """I-JEPA ViT-g/16 (1408-d, 16 heads, MLP 48/11), SimMIM ViT-B/16 at 224 px and SimMIM Swin-B at 192 px with window 6
    from the converted shapes."""
    giant = meta(
        patch_embed__proj__weight=(1408, 3, 16, 16),
        pos_embed=(1, 196, 1408),
        blocks__0__attn__qkv__weight=(3 * 1408, 1408),
        blocks__0__mlp__fc1__weight=(6144, 1408),
    )
    node = inferred_node(giant)
    assert (node["num_heads"], node["img_size"], node["class_token"]) == (16, 224, False)
    with torch.device("meta"):
        assert instantiate(node).blocks[0].mlp.fc1.out_features == 6144
    beit = meta(
        cls_token=(1, 1, 768),
        mask_token=(1, 1, 768),
        patch_embed__proj__weight=(768, 3, 16, 16),
        rel_pos_bias__relative_position_bias_table=(27 * 27 + 3, 12),
        blocks__0__gamma_1=(768,),
        blocks__0__attn__qkv__weight=(3 * 768, 768),
        blocks__0__mlp__fc1__weight=(3072, 768),
    )
    node = inferred_node(beit)
    assert (node["num_heads"], node["img_size"], node["abs_pos_embed"], node["block"]["init_values"]) == (
        12,
        224,
        False,
        0.1,
    )
    swin = meta(patch_embed__proj__weight=(128, 3, 4, 4), layers__0__blocks__0__mlp__fc1__weight=(512, 128))
    for stage, (depth, heads, window) in enumerate(zip((2, 2, 18, 2), (4, 8, 16, 32), (6, 6, 6, 6))):
        swin |= {
            f"layers.{stage}.blocks.{b}.attn.relative_position_bias_table": torch.empty(
                (2 * window - 1) ** 2, heads, device="meta"
            )
            for b in range(depth)
        }
    node = inferred_node(swin)
    assert (node["img_size"], node["window_size"], node["depths"], node["num_heads"]) == (
        192,
        6,
        [2, 2, 18, 2],
        [4, 8, 16, 32],
    )


def test_task_pretrained_takes_the_sub_model_suffix_through_hydra(tmp_path):
    """``task.pretrained=<file>::encoder`` composes and fills the fine-tuning backbone with the I-JEPA context encoder."""
    from conftest import compose_config

    file = released.ijepa_vit(dim=64, depth=2, patch=8, img=64)
    path = save(tmp_path, "IN1K-vit.h.14-300e.pth.tar", file)
    cfg = compose_config(
        [
            "experiment=finetune_vit_tiny_synthetic",
            "data.img_size=64",
            "model.backbone.embed_dim=64",
            "model.backbone.depth=2",
            "model.backbone.num_heads=1",
            "+model.backbone.class_token=false",
            f"task.pretrained={path}::encoder",
            "task.num_classes=3",
        ],
        tmp_path,
    )
    task = instantiate(cfg.task)
    weight = file["encoder"]["module.blocks.1.mlp.fc2.weight"]
    assert torch.equal(task.backbone.blocks[1].mlp.fc2.weight, weight)


def test_dense_adapter_reads_a_released_swin_file(tmp_path):
    """Detection and segmentation load through DenseFeatureAdapter.load_pretrained: the same layouts."""
    from mimlab.models.necks.dense_adapter import DenseFeatureAdapter

    file = released.simmim_swin(dim=16, depths=(1, 1, 2, 1), heads=(1, 2, 2, 4), window=2, patch=4, img=64)
    adapter = DenseFeatureAdapter(backbone("mask_token_swin_base_w6", **SWIN))
    adapter.load_pretrained(save(tmp_path, "simmim_swin.pth", file))
    assert torch.equal(
        adapter.backbone.layers[3].downsample.reduction.weight,
        file["model"]["encoder.layers.2.downsample.reduction.weight"],
    )
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        adapter.load_pretrained(tmp_path / "absent.pth")


def test_representation_check_of_a_released_sub_model(tmp_path, synthetic_root):
    """``mimlab-eval ckpt=<file>::encoder features=<folder>``: kNN + probe of the rebuilt encoder and its random twin."""
    from mimlab.eval import main, representation_check

    path = save(tmp_path, "IN1K-vit.h.14-300e.pth.tar", released.ijepa_vit(dim=64, depth=2, patch=8, img=64))
    record = representation_check({"ckpt": f"{path}::encoder", "features": str(synthetic_root), "probe_epochs": "2"})
    assert record["img_size"] == 64 and record["readout"] == "avg"
    assert set(record["results"]) == {"trained", "random init"}
    assert (tmp_path / "IN1K-vit.h.14-300e.pth.tar.encoder.features.json").is_file()
    with pytest.raises(SystemExit, match="representation check"):
        main([f"ckpt={path}::encoder"])


@pytest.mark.parametrize("name", sorted(REBUILT))
def test_every_released_layout_exports_and_the_export_computes_the_same(tmp_path, name):
    """mimlab-export of a released file (the export itself compares the written model with the mimlab encoder)."""
    from mimlab.checkpoints.export import export

    path = save(tmp_path, name, released.TINY[name]())
    source = f"{path}::encoder" if "ijepa" in name else str(path)
    exported = export(source)
    assert exported.path.is_file() and exported.path.parent == tmp_path
    assert exported.format == ("mimlab" if "data2vec2" in name else "timm")
    assert ("encoder" in exported.path.name) == ("ijepa" in name)
