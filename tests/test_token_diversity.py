"""Token similarity / diversity on constructed inputs with known answers, and the CLI end to end."""

import math

import pytest
import torch
from PIL import Image

from mimlab.analysis import token_diversity as td


def test_identical_tokens_have_similarity_one():
    tokens = torch.randn(1, 1, 8).expand(3, 5, 8)  # 3 images, 5 identical tokens each
    assert torch.allclose(td.token_similarity(tokens), torch.ones(3))
    assert torch.allclose(td.token_diversity(tokens), torch.zeros(3), atol=1e-6)


def test_orthogonal_tokens_have_similarity_zero():
    tokens = torch.eye(6).unsqueeze(0) * 3.0  # 6 orthogonal tokens of different norm than 1
    assert td.token_similarity(tokens).item() == pytest.approx(0.0, abs=1e-7)
    assert td.token_diversity(tokens).item() == pytest.approx(1.0)


def test_opposite_pair_and_mixed_case():
    pair = torch.tensor([[[1.0, 0.0], [-2.0, 0.0]]])
    assert td.token_similarity(pair).item() == pytest.approx(-1.0)
    # tokens e1, e1, e2: cos pairs (ordered, i != k): 1,0 | 1,0 | 0,0 -> sum 2 over K(K-1) = 6
    tokens = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    assert td.token_similarity(tokens).item() == pytest.approx(2 / 6)


def test_matches_double_loop_reference_and_accepts_feature_maps():
    torch.manual_seed(0)
    fmap = torch.randn(2, 16, 3, 4)  # (N, C, h, w): K = 12 tokens
    tokens = fmap.flatten(2).transpose(1, 2)
    for n in range(2):
        k = tokens.shape[1]
        ref = sum(
            torch.cosine_similarity(tokens[n, i], tokens[n, j], dim=0).item()
            for i in range(k)
            for j in range(k)
            if i != j
        ) / (k * (k - 1))
        assert td.token_similarity(fmap)[n].item() == pytest.approx(ref, abs=1e-6)
    assert torch.allclose(td.token_similarity(fmap), td.token_similarity(tokens))


def test_query_map_and_errors():
    fmap = torch.zeros(2, 2, 2)
    fmap[0, 0, 0] = fmap[0, 0, 1] = 1.0  # tokens (0,0),(0,1) = e1
    fmap[1, 1, 0] = fmap[1, 1, 1] = 1.0  # tokens (1,0),(1,1) = e2
    sim = td.query_similarity_map(fmap, (0, 0))
    assert torch.allclose(sim, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        td.token_similarity(torch.randn(1, 1, 4))
    with pytest.raises(ValueError, match="expected"):
        td.token_similarity(torch.randn(4, 4))


def test_cli_runs_on_an_image_folder(tmp_path, capsys):
    torch.manual_seed(0)
    for i in range(3):
        Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy()).save(tmp_path / f"im{i}.png")
    plot = tmp_path / "plots" / "{teacher}.png"
    out = td.main(["teacher=resnet18", f"data={tmp_path}", "img_size=64", "batch_size=2", f"plot={plot}"])
    printed = capsys.readouterr().out
    assert out["images"] == 3 and out["tokens"] == 4  # 64 px / stride 32 -> 2x2 grid
    assert math.isclose(out["diversity"], 1 - out["similarity"])
    assert "token similarity" in printed and "token diversity" in printed
    assert (tmp_path / "plots" / "resnet18.png").stat().st_size > 0


def test_cli_names_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="bad argument"):
        td.main(["teachr=resnet18"])
    with pytest.raises(SystemExit, match="data="):
        td.main([f"data={tmp_path / 'missing'}", "plot="])
