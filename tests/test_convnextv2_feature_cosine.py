"""Feature cosine distance (docs/methods.md §3.5): formula, random vs collapsed model, CLI with PNG output."""

import json

import pytest
import torch
from PIL import Image

from mimlab.analysis.feature_cosine import channel_cosine_distance, default_layers, feature_cosine_distance, main
from mimlab.models.backbones.convnextv2 import MaskedConvNeXtV2


def test_formula_matches_double_sum_per_image():
    x = torch.randn(3, 4, 5, 6)  # (N, H, W, C)
    got = channel_cosine_distance(x)
    for n in range(3):
        ch = x[n].reshape(-1, 6).T  # (C, HW)
        total = sum((1 - torch.cosine_similarity(ch[i], ch[j], dim=0)) / 2 for i in range(6) for j in range(6))
        torch.testing.assert_close(got[n], total / 36)
    same = torch.randn(2, 3, 3, 1).expand(2, 3, 3, 7)  # identical channels -> 0
    torch.testing.assert_close(channel_cosine_distance(same), torch.zeros(2), atol=1e-6, rtol=0)


def tiny():
    torch.manual_seed(0)
    return MaskedConvNeXtV2(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)).eval()


def collapse(model):
    """Make every MLP hidden channel the same function of the input: the extreme of feature collapse."""
    for name, p in model.named_parameters():
        if name.endswith("pwconv1.weight"):
            p.data.copy_(p.data[:1].expand_as(p))
        elif name.endswith("pwconv1.bias"):
            p.data.fill_(0.1)
    return model


def test_random_model_is_diverse_and_collapsed_model_is_not():
    images = torch.randn(4, 3, 64, 64)
    diverse = feature_cosine_distance(tiny(), images, batch_size=2)
    collapsed = feature_cosine_distance(collapse(tiny()), images)
    assert list(diverse) == default_layers(tiny()) == [f"stages.{s}.0.grn" for s in range(4)]
    assert all(v > 0.1 for v in diverse.values()), diverse
    assert all(v < 1e-4 for v in collapsed.values()), collapsed


def test_cli_writes_plot_and_numbers(tmp_path, capsys):
    folder = tmp_path / "imgs" / "class_a"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy()).save(folder / f"{i}.png")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "_target_: mimlab.models.backbones.convnextv2.MaskedConvNeXtV2\ndepths: [1, 1, 1, 1]\ndims: [8, 16, 24, 32]\n"
    )
    ckpt = tmp_path / "tiny.pt"
    torch.save({"model": tiny().state_dict()}, ckpt)
    out = tmp_path / "out" / "cos.png"
    result = main(
        [
            "--checkpoint",
            str(ckpt),
            "--images",
            str(tmp_path / "imgs"),
            "--backbone",
            str(cfg),
            "--out",
            str(out),
            "--size",
            "32",
        ]
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["images"] == 3 and saved["layers"] == pytest.approx(result)
    assert "stages.3.0.grn" in capsys.readouterr().out
