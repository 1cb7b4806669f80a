"""Probe head, LARS, model EMA, checkpoint import (mimlab + official layouts) and timm export round-trips."""

import json

import pytest
import timm
import torch
from timm.optim import Lars
from torch import nn

from mimlab.callbacks.online_eval import knn_predict
from mimlab.checkpoints.convnextv2 import convert_convnextv2_state_dict
from mimlab.checkpoints.export import export, main as export_main
from mimlab.checkpoints.load import CheckpointMismatchError, load_pretrained
from mimlab.models.backbones.convnextv2 import MaskedConvNeXtV2
from mimlab.models.backbones.vit import MaskedViT
from mimlab.models.heads.classifier import ClsToken, GlobalAvgPool, LinearProbeHead, PooledClassifierHead
from mimlab.optim import ParamGroups
from mimlab.tasks.finetune import FineTuning
from mimlab.tasks.linear_probe import LinearProbe


def tiny_vit(depth=2, **kw):
    return MaskedViT(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, **kw)


def test_probe_head_bn_has_no_affine_and_whitens():
    head = LinearProbeHead(16, 5)
    bn = head.bn
    assert not bn.affine and bn.eps == 1e-6 and bn.weight is None and bn.bias is None
    assert [n for n, _ in head.named_parameters()] == ["fc.weight", "fc.bias"]
    assert 0.005 < head.fc.weight.std() < 0.015 and torch.all(head.fc.bias == 0)
    x = torch.randn(64, 16) * 7 + 3
    whitened = head.bn(x)
    assert torch.allclose(whitened.mean(0), torch.zeros(16), atol=1e-5)
    assert torch.allclose(whitened.var(0, unbiased=False), torch.ones(16), atol=1e-3)


def test_lars_groups_match_mae_lars_rule():
    """timm Lars + the linear-probe ParamGroups (conf/optim/lars.yaml) == MAE util/lars.py (wd 0): trust ratio on
    ndim>1, plain momentum SGD on 1-D."""
    torch.manual_seed(0)
    probe = LinearProbe(tiny_vit(), head=LinearProbeHead, optim=None, num_classes=3)
    model = probe.head.fc
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    mom = {n: torch.zeros_like(p) for n, p in ref.items()}
    groups = ParamGroups(decay_options={"always_adapt": True}, no_decay_options={"always_adapt": False})(probe, 0.0)
    assert [[p is model.bias for p in g["params"]] for g in groups] == [[True], [False]]  # only the head trains
    opt = Lars(groups, lr=0.5, momentum=0.9, trust_coeff=0.001)
    for _ in range(3):
        x = torch.randn(4, 32)
        grads = torch.autograd.grad(model(x).pow(2).sum(), list(model.parameters()))
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        for (n, _), g in zip(model.named_parameters(), grads):  # MAE reference on the pre-step weights
            d = g.clone()
            if ref[n].ndim > 1:
                pn, un = ref[n].norm(), d.norm()
                d = d * torch.where(pn > 0, torch.where(un > 0, 0.001 * pn / un, 1.0), 1.0)
            mom[n] = mom[n] * 0.9 + d
            ref[n] = ref[n] - 0.5 * mom[n]
        opt.step()
        for n, p in model.named_parameters():
            assert torch.allclose(p, ref[n], atol=1e-6, rtol=1e-5), n


def test_model_ema_update_and_eval_uses_ema():
    task = FineTuning(tiny_vit(), head=PooledClassifierHead, optim=None, num_classes=4, mixup=None, ema_decay=0.5)
    assert not any(p.requires_grad for p in task.ema.parameters())
    before = {k: v.clone() for k, v in task.ema.module.state_dict().items()}
    with torch.no_grad():
        for p in list(task.backbone.parameters()) + list(task.head.parameters()):
            p.add_(1.0)
    task.ema.update(task._ema_source(), step=None)
    live = {
        **{f"backbone.{k}": v for k, v in task.backbone.state_dict().items()},
        **{f"head.{k}": v for k, v in task.head.state_dict().items()},
    }
    for key, value in task.ema.module.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, 0.5 * before[key] + 0.5 * live[key], atol=1e-6), key
    # the optimiser never sees EMA weights
    assert all(not n.startswith("ema.") for n, p in task.named_parameters() if p.requires_grad)


def test_feature_extractors_shapes():
    vit = tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    assert GlobalAvgPool()(vit, x).shape == (2, 32) and ClsToken()(vit, x).shape == (2, 32)
    assert torch.allclose(ClsToken()(vit, x), vit.forward_tokens(x)[:, 0])
    convnext = MaskedConvNeXtV2(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32])
    with pytest.raises(ValueError, match=r"MaskedConvNeXtV2 has no 'cls' feature; its pooled features are \['avg'\]"):
        LinearProbe(convnext, head=LinearProbeHead, optim=None, features=ClsToken())  # at composition, no data needed


def _save_mimlab(path, state, config=None):
    torch.save({"state_dict": state, "mimlab": {"config": config or {}}}, path)
    return path


def test_import_mimlab_ckpt_and_official_mae(tmp_path):
    src = tiny_vit()
    state = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    state["decoder.decoder_embed.weight"] = torch.randn(4, 32)
    ours = _save_mimlab(tmp_path / "last.ckpt", state)
    dst = tiny_vit()
    load_pretrained(ours, dst)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())
    official = dict(src.state_dict(), mask_token=torch.zeros(1, 1, 16), **{"decoder_pred.weight": torch.zeros(3, 3)})
    torch.save({"model": official, "epoch": 1}, tmp_path / "mae_pretrain.pth")
    dst = tiny_vit()
    load_pretrained(tmp_path / "mae_pretrain.pth", dst)
    assert torch.equal(dst.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)


def test_import_error_lists_missing_unexpected_and_mismatched(tmp_path):
    official = tiny_vit(depth=3).state_dict()
    official["patch_embed.proj.weight"] = torch.zeros(32, 3, 4, 4)
    torch.save({"model": official}, tmp_path / "bad.pth")
    deeper = MaskedViT(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained(tmp_path / "bad.pth", deeper)
    msg = str(err.value)
    assert "bad.pth" in msg and "official MAE layout" in msg
    assert "shape mismatches (1): patch_embed.proj.weight" in msg
    assert "missing in checkpoint" in msg and "blocks.3.attn.qkv.weight" in msg
    official = tiny_vit(depth=3).state_dict()
    torch.save({"model": official}, tmp_path / "deeper.pth")
    with pytest.raises(CheckpointMismatchError, match=r"unexpected in checkpoint \(\d+\): blocks\.2\."):
        load_pretrained(tmp_path / "deeper.pth", tiny_vit(depth=2))


def test_minkowski_remap_matches_official_formula():
    k, cin, cout, c = 3, 2, 4, 5
    conv = torch.randn(k * k, cin, cout)
    dw = torch.randn(k * k, c)
    out, _ = convert_convnextv2_state_dict(
        {
            "encoder.x.kernel": conv,
            "encoder.dw.kernel": dw,
            "b.bias": torch.randn(1, c),
            "stages.0.0.pwconv1.linear.weight": torch.randn(3, 3),
        }
    )
    assert torch.equal(out["x.weight"], conv.permute(2, 1, 0).reshape(cout, cin, k, k).transpose(3, 2))
    assert torch.equal(out["dw.weight"], dw.permute(1, 0).reshape(c, 1, k, k).transpose(3, 2))
    # index check: kernel offset (x * k + y) of input i / output o lands at weight[o, i, y, x]
    assert out["x.weight"][1, 0, 2, 0] == conv[0 * k + 2, 0, 1]
    assert out["b.bias"].shape == (c,) and "stages.0.0.pwconv1.weight" in out


def test_export_vit_pretrain_ckpt_loads_in_timm_strict(tmp_path):
    src = tiny_vit().eval()
    ckpt = _save_mimlab(
        tmp_path / "pre.ckpt",
        {f"backbone.{k}": v for k, v in src.state_dict().items()},
        {"model": {"backbone": {"num_heads": 2}}},
    )
    export_main([f"ckpt={ckpt}", "format=timm"])
    out = tmp_path / "pre.timm.pth"
    spec = json.loads((tmp_path / "pre.timm.pth.json").read_text())
    model = timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"]).eval()
    model.load_state_dict(torch.load(out), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.forward_features(x), src.forward_tokens(x), atol=1e-5)


def test_export_vit_finetuned_with_ema_matches_task_logits(tmp_path):
    task = FineTuning(tiny_vit(), head=PooledClassifierHead, optim=None, num_classes=7, mixup=None, ema_decay=0.9)
    with torch.no_grad():
        for p in task.head.parameters():
            p.normal_()
    task.ema.update(task._ema_source(), step=None)
    task.eval()
    ckpt = _save_mimlab(tmp_path / "ft.ckpt", task.state_dict(), {"model": {"backbone": {"num_heads": 2}}})
    for ema in (False, True):
        result = export(ckpt, tmp_path / f"ft_{ema}.pth", ema=ema)
        path, name, kwargs = result.path, result.spec["model_name"], result.spec["kwargs"]
        assert kwargs["global_pool"] == "avg" and kwargs["num_classes"] == 7
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
        model.load_state_dict(torch.load(path), strict=True)
        x = torch.randn(3, 3, 32, 32)
        ref = task.evaluate(x) if ema else task(x)
        assert torch.allclose(model(x), ref, atol=1e-5)


def test_export_convnextv2_loads_in_timm_strict(tmp_path):
    src = MaskedConvNeXtV2(depths=[1, 1, 2, 1], dims=[8, 16, 32, 64], num_classes=0).eval()
    task = FineTuning(src, head=PooledClassifierHead, optim=None, num_classes=5, mixup=None)
    task.eval()
    ckpt = _save_mimlab(tmp_path / "cnx.ckpt", task.state_dict())
    result = export(ckpt)
    path, name, kwargs = result.path, result.spec["model_name"], result.spec["kwargs"]
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    model.load_state_dict(torch.load(path), strict=True)
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(model(x), task(x), atol=1e-4)


def test_export_rejects_unknown_backbone(tmp_path):
    ckpt = _save_mimlab(tmp_path / "x.ckpt", {"backbone.stage4.0.w": torch.zeros(2, 2)})
    with pytest.raises(CheckpointMismatchError, match="neither a ViT .* nor a ConvNeXt V2"):
        export(ckpt)


def test_knn_predict_matches_brute_force():
    torch.manual_seed(0)
    bank, labels, query = torch.randn(50, 8), torch.randint(0, 4, (50,)), torch.randn(6, 8)
    scores = knn_predict(bank, labels, query, 4, k=5, temperature=0.07)
    bn, qn = nn.functional.normalize(bank, dim=1), nn.functional.normalize(query, dim=1)
    for q in range(6):
        sims = bn @ qn[q]
        idx = sims.argsort(descending=True)[:5]
        expected = torch.zeros(4)
        for i in idx:
            expected[labels[i]] += torch.exp(sims[i] / 0.07)
        assert torch.allclose(scores[q], expected, rtol=1e-5)


def _official_hivit_layout(state, m):
    """mimlab HiViT names -> the official flat `blocks` list (PatchMerges at indices m and 2m+1)."""
    offsets = {"stage4": 0, "stage8": m + 1, "main_blocks": 2 * m + 2}
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in offsets:
            index, _, rest = rest.partition(".")
            key = f"blocks.{offsets[head] + int(index)}.{rest}"
        elif head in ("merge4", "merge8"):
            key = f"blocks.{m if head == 'merge4' else 2 * m + 1}.{rest}"
        out[key] = value
    return out


def test_official_itpn_layout_is_routed_to_the_itpn_converter(tmp_path):
    from mimlab.models.backbones.hivit import HiViT

    kw = dict(img_size=32, embed_dim=64, mlp_depth=1, depth=2, num_heads=2, num_classes=0)
    src = HiViT(**kw)
    official = _official_hivit_layout(src.state_dict(), m=1)
    official.update(
        {
            "fpn_modules.0.weight": torch.zeros(3),
            "decoder_pred.weight": torch.zeros(3),
            "mask_token": torch.zeros(1, 1, 64),
        }
    )
    torch.save({"model": official}, tmp_path / "itpn.pth")
    dst = HiViT(**kw, rpe=True)  # fine-tuning turns the relative position bias on: new tables
    report = load_pretrained(tmp_path / "itpn.pth", dst, allow_missing=["*relative_position_bias_table"])["backbone"]
    assert report["missing"] and all("relative_position_bias_table" in k for k in report["missing"])
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())
    with pytest.raises(CheckpointMismatchError, match="relative_position_bias_table"):
        load_pretrained(tmp_path / "itpn.pth", HiViT(**kw, rpe=True))


def test_official_fcmae_checkpoint_loads_into_convnextv2(tmp_path):
    kw = dict(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], num_classes=0)
    src = MaskedConvNeXtV2(**kw)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    official = {
        k: (v.reshape(1, 1, 1, -1) if ".grn." in k else v) for k, v in src.state_dict().items()
    }  # official GRN shape
    official.update(
        {
            "mask_token": torch.zeros(1, 512, 1, 1),
            "proj.weight": torch.zeros(512, 32, 1, 1),
            "decoder.0.dwconv.weight": torch.zeros(512, 1, 7, 7),
            "pred.weight": torch.zeros(3072, 512, 1, 1),
        }
    )
    torch.save({"model": official}, tmp_path / "convnextv2_fcmae.pt")
    dst = MaskedConvNeXtV2(**kw)
    load_pretrained(tmp_path / "convnextv2_fcmae.pt", dst)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())
