"""The backbone contract (mimlab.models.backbones.contract): every backbone config declares it truthfully, and a new
backbone that forgets part of it fails when any task is composed, before data is read, naming what is missing."""

from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import nn

from conftest import compose_config
from mimlab.masking import RandomMasking
from mimlab.models.backbones.contract import BackboneContractError, BackboneDefaults, check_backbone
from mimlab.train import CONFIG_DIR, build

BACKBONES = sorted(p.stem for p in (Path(CONFIG_DIR) / "model" / "backbone").glob("*.yaml"))
SMALL = ["vit_tiny_p8", "convnextv2_atto", "hivit_tiny"]


def backbone(name: str, tmp_path, size: int = 64) -> nn.Module:
    return instantiate(compose_config([f"model/backbone={name}", f"data.img_size={size}"], tmp_path).model.backbone)


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_config_declares_the_contract_and_its_maps_match_it(name, tmp_path):
    with torch.device("meta"):  # full-size models, shapes only
        model = backbone(name, tmp_path, size=224)
        check_backbone(model)
        maps = model.forward_features(torch.empty(2, 3, 224, 224))
        pooled = {pool: model.forward_pooled(torch.empty(2, 3, 224, 224), pool) for pool in model.feature_pools}
    assert [m.shape[1] for m in maps] == list(model.out_channels)
    assert [224 // m.shape[-1] for m in maps] == list(model.out_strides) and all(
        m.shape[-1] == m.shape[-2] for m in maps
    )
    assert all(p.shape == (2, model.num_features) for p in pooled.values())
    assert set(model.no_weight_decay()) <= {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("name", SMALL)
def test_pooled_features_are_the_mean_of_the_last_map_and_the_cls_token(name, tmp_path):
    model = backbone(name, tmp_path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_pooled(x, "avg"), model.forward_features(x)[-1].mean(dim=(2, 3)))
        if "cls" in model.feature_pools:
            torch.testing.assert_close(model.forward_pooled(x, "cls"), model.forward_tokens(x)[:, 0])
    with pytest.raises(ValueError, match="has no 'max' feature"):
        model.forward_pooled(x, "max")


class PlainEncoder(nn.Module):
    """A new backbone family that declares only its multi-scale outputs (it forgot the rest of the contract)."""

    def __init__(self, **_) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 16, 16, 16)
        self.out_channels, self.out_strides = [16], [16]

    def forward_features(self, x, mask=None):
        return [self.proj(x)]

    def forward(self, x, mask=None):
        return self.proj(x)


TASK_EXPERIMENTS = [
    "mae_vit_tiny_synthetic",
    "finetune_vit_tiny_synthetic",
    "linprobe_vit_tiny_synthetic",
    "detect_mae_vit_tiny_synthetic",
    "segment_mae_vit_tiny_synthetic",
]


@pytest.mark.parametrize("experiment", TASK_EXPERIMENTS)
def test_a_backbone_that_forgets_the_contract_fails_at_composition_naming_what_is_missing(experiment, tmp_path):
    cfg = compose_config(
        [
            f"experiment={experiment}",
            "logger=csv",
            "data.root=/nonexistent/never/read",
            f"model.backbone._target_={__name__}.PlainEncoder",
        ],
        tmp_path,
    )
    with pytest.raises(InstantiationException) as err:
        build(cfg)  # DataModule, task and Trainer objects only: no file is opened
    assert isinstance(err.value.__cause__, BackboneContractError) or "BackboneContractError" in str(err.value)
    message = str(err.value)
    for part in (
        "PlainEncoder",
        "forward_pooled",
        "forward_intermediates",
        "to_timm",
        "no_weight_decay",
        "layer_groups",
        "num_features",
        "feature_pools",
        "layer_decay_rules",
        "CONTRIBUTING.md",
    ):
        assert part in message, part


def test_inconsistent_declarations_are_named():
    class HalfDone(BackboneDefaults, PlainEncoder):
        num_features, feature_pools, global_pool = 16, ("avg", "max"), "avg"
        in_chans, img_size = 3, None
        layer_decay_rules, layer_decay_rule = ("mine",), "mine"

        def forward_pooled(self, x, pool="avg"):
            return self.proj(x).mean((2, 3))

        def no_weight_decay(self):
            return {"pos_embed"}

        def drop_final_norm(self):
            return ()

        def forward_intermediates(self, x, indices, mask=None):
            return self.forward_features(x, mask)

        def layer_groups(self, rule=None):
            from mimlab.models.backbones.contract import LayerGroups

            return LayerGroups(rule or "mine", {"proj.weight": 0}, 1)

    with pytest.raises(BackboneContractError) as err:
        check_backbone(HalfDone())
    message = str(err.value)
    assert "feature_pools ('avg', 'max')" in message and "no layer id to ['proj.bias']" in message
    assert "names parameters it does not have: ['pos_embed']" in message


@pytest.mark.parametrize(
    ("name", "dropped"),
    [("vit_tiny_p8", True), ("mask_token_beit_tiny_p8", True), ("mask_token_swin_base_w6", False)],
)
def test_fine_tuning_drops_the_final_norm_only_where_the_family_recipe_does(name, dropped, tmp_path):
    """MAE's and SimMIM's ViT global-pool fine-tuning replace the final LayerNorm by the head's fc_norm; Swin keeps
    timm's final norm (SimMIM pools after it) — the backbone declares it (``drop_final_norm``), no task reaches into
    an attribute by name."""
    from mimlab.models.heads.classifier import PooledClassifierHead
    from mimlab.tasks.finetune import FineTuning

    with torch.device("meta"):
        model = backbone(name, tmp_path, size=192 if "swin" in name else 64)
        assert isinstance(model.norm, nn.LayerNorm)
        FineTuning(model, head=PooledClassifierHead, optim=None, num_classes=3, mixup=None)
    assert isinstance(model.norm, nn.Identity if dropped else nn.LayerNorm)


@pytest.mark.parametrize("name", [*SMALL, "mask_token_beit_tiny_p8"])
def test_intermediate_features_are_what_the_encoding_keeps_and_end_at_its_output(name, tmp_path):
    """``forward_intermediates`` (timm's name) is the one way to reach block or stage outputs: under a mask they are
    the tensors a token backbone's ``Encoding.hidden`` keeps, and the last one (final-normed) is the encoding's
    tokens; a stage backbone's are its ``forward_features`` maps, the last one the encoding's ``map``."""
    model = backbone(name, tmp_path).eval()
    unit = model.out_strides[-1]
    masking = RandomMasking(0.5, unit_size=unit)
    mask = masking(2, masking.grid((64, 64)), torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        every = model.forward_intermediates(x, "all", mask)
        torch.testing.assert_close(model.forward_intermediates(x, [-1], mask)[0], every[-1])
        assert len(model.forward_intermediates(x, [0, -1])) == 2 and len(every) > 1
        encoding = model(x, mask)
        if hasattr(model, "request_hidden"):  # a token backbone
            model.request_hidden("all")
            kept = model(x, mask).hidden
            assert list(kept) == list(range(len(every)))
            for ours, theirs in zip(kept.values(), every):
                torch.testing.assert_close(ours, theirs)
            final_norm = model.norm if hasattr(model, "norm") else nn.Identity()
            torch.testing.assert_close(final_norm(every[-1]), encoding.tokens)
        else:
            for ours, theirs in zip(every, model.forward_features(x, mask)):
                torch.testing.assert_close(ours, theirs)
            torch.testing.assert_close(encoding.map, every[-1])
    with pytest.raises(ValueError, match="outside"):
        model.forward_intermediates(x, [len(every)])


def test_a_map_of_an_encoding_that_dropped_units_is_refused_naming_what_to_use(tmp_path):
    model = backbone("vit_tiny_p8", tmp_path).eval()
    mask = RandomMasking(0.5, unit_size=8)(1, (8, 8), torch.Generator().manual_seed(0))
    with torch.no_grad():
        encoding = model(torch.randn(1, 3, 64, 64), mask)
        assert model(torch.randn(1, 3, 64, 64)).map.shape == (1, model.num_features, 8, 8)  # nothing dropped
    with pytest.raises(ValueError, match="MaskTokenViT"):
        _ = encoding.map
