"""Import of official ConvNeXt-V2 state dicts (docs/methods.md §3.6) through the one loader: dense, sparse (Minkowski),
mimlab, and error reporting."""

import pytest
import torch

from mimlab.checkpoints import CheckpointMismatchError, load_pretrained
from mimlab.checkpoints.convnextv2 import convert_convnextv2_state_dict
from mimlab.models.backbones.convnextv2 import MaskedConvNeXtV2

DEPTHS, DIMS = (1, 1, 2, 1), (8, 16, 24, 32)


def randomised(num_classes=0, seed=0):
    torch.manual_seed(seed)
    model = MaskedConvNeXtV2(DEPTHS, DIMS, num_classes=num_classes).eval()
    for p in model.parameters():
        p.data.normal_(std=0.1)
    return model


def official_dense(model):
    """The layout of convnextv2_*_fcmae.pt / *_ema.pt: our names, GRN params of shape (1, 1, 1, C)."""
    return {k: (v.reshape(1, 1, 1, -1) if ".grn." in k else v.clone()) for k, v in model.state_dict().items()}


def official_sparse(model):
    """The FCMAE model state of the MinkowskiEngine code: encoder.*, .kernel, .ln., .linear., (1, C) biases."""
    sd = {}
    for k, v in model.state_dict().items():
        stage = int(k.split(".")[1])
        sparse_part = k.startswith("stages.") or (k.startswith("downsample_layers.") and stage > 0)
        if not sparse_part:  # the stem stays dense in the sparse model
            sd["encoder." + k] = v.clone()
            continue
        name, leaf = k.rsplit(".", 1)
        module = name.split(".")[-1]
        if leaf == "weight" and v.dim() == 4:  # conv: Minkowski kernel[b*k + a, in, out] = weight[out, in, a, b]
            out_c, in_c, ks, _ = v.shape
            kern = torch.empty(ks * ks, in_c, out_c)
            for a in range(ks):
                for b in range(ks):
                    kern[b * ks + a] = v[:, :, a, b].T
            sd[f"encoder.{name}.kernel"] = kern[:, 0, :] if module == "dwconv" else kern
        elif module == "norm" or (k.startswith("downsample_layers.") and name.endswith(".0")):
            sd[f"encoder.{name}.ln.{leaf}"] = v.clone()
        elif module in ("pwconv1", "pwconv2"):
            sd[f"encoder.{name}.linear.{leaf}"] = v.clone()
        elif module == "grn":
            sd[f"encoder.{k}"] = v.reshape(1, -1)
        else:  # conv biases are (1, C)
            sd[f"encoder.{k}"] = v.reshape(1, -1)
    sd.update(
        {
            "proj.weight": torch.zeros(512, DIMS[-1], 1, 1),
            "proj.bias": torch.zeros(512),
            "mask_token": torch.zeros(1, 512, 1, 1),
            "decoder.0.dwconv.weight": torch.zeros(512, 1, 7, 7),
            "pred.weight": torch.zeros(3072, 512, 1, 1),
        }
    )
    return sd


def assert_same(a, b):
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=ka)


def test_dense_finetuned_checkpoint_round_trips_through_a_file(tmp_path):
    src = randomised(num_classes=7)
    path = tmp_path / "convnextv2_tiny_1k_224_ema.pt"
    torch.save({"model": official_dense(src), "epoch": 3}, path)
    dst = randomised(num_classes=7, seed=1)
    report = load_pretrained(path, dst)["backbone"]
    assert_same(src, dst)
    assert not report["missing"] and not report["ignored"]
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(dst.forward_head(dst(x).map), src.forward_head(src(x).map))


def test_sparse_fcmae_state_dict_loads_and_drops_the_decoder():
    src = randomised()
    sparse = official_sparse(src)
    assert "encoder.stages.0.0.dwconv.kernel" in sparse and sparse["encoder.stages.0.0.dwconv.kernel"].shape == (49, 8)
    assert sparse["encoder.downsample_layers.1.1.kernel"].shape == (4, 8, 16)
    dst = randomised(seed=1)
    load_pretrained({"model": sparse}, dst)
    assert_same(src, dst)
    _, dropped = convert_convnextv2_state_dict(sparse)
    assert sorted(dropped) == sorted(k for k in sparse if not k.startswith("encoder."))
    x, mask = torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 1]])
    torch.testing.assert_close(dst(x, mask), src(x, mask))


def test_fcmae_checkpoint_into_classifier_needs_allow_missing():
    fcmae = official_dense(randomised())
    clf = randomised(num_classes=10)
    with pytest.raises(
        CheckpointMismatchError, match=r"missing in checkpoint \(4\): head.bias, head.weight, norm.bias"
    ):
        load_pretrained(fcmae, clf)
    report = load_pretrained(fcmae, clf, allow_missing=("norm.*", "head.*"))["backbone"]
    assert report["missing"] == ["head.bias", "head.weight", "norm.bias", "norm.weight"]


def test_mismatch_error_lists_shapes_and_unexpected_keys():
    wrong = official_dense(MaskedConvNeXtV2(DEPTHS, (8, 16, 24, 40)))  # other width in the last stage
    wrong["stages.9.0.grn.gamma"] = torch.zeros(4)
    model = randomised()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained(wrong, model)
    msg = str(err.value)
    assert "stages.3.0.dwconv.weight: checkpoint (40, 1, 7, 7) vs model (32, 1, 7, 7)" in msg
    assert "unexpected in checkpoint (1): stages.9.0.grn.gamma" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was loaded


def test_mimlab_pretraining_checkpoint_reads_the_backbone_only():
    src = randomised()
    lightning_ckpt = {
        "state_dict": {
            **{f"backbone.{k}": v for k, v in src.state_dict().items()},
            "decoder.proj.weight": torch.zeros(512, 32, 1, 1),
        },
        "global_step": 10,
    }
    dst = randomised(seed=1)
    load_pretrained(lightning_ckpt, dst)
    assert_same(src, dst)


def test_segmentation_starts_from_an_official_sparse_fcmae_file(tmp_path):
    from functools import partial

    from mimlab.models.heads.upernet import UperNetHead
    from mimlab.models.necks.dense_adapter import DenseFeatureAdapter
    from mimlab.optim import OptimizerFactory, ParamGroups
    from mimlab.tasks.segmentation import UperNetSegmentation

    src = randomised()
    torch.save({"model": official_sparse(src)}, tmp_path / "convnextv2_fcmae_sparse.pt")
    task = UperNetSegmentation(
        DenseFeatureAdapter(randomised(seed=1)),
        partial(UperNetHead, channels=16),
        OptimizerFactory(partial(torch.optim.AdamW), lr=1e-4, param_groups=ParamGroups(0.9)),
        num_classes=5,
        pretrained=str(tmp_path / "convnextv2_fcmae_sparse.pt"),
    )
    assert_same(src, task.backbone)
