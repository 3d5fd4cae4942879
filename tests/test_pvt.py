"""PVT v1 (pvt.py): parity with the official code, checkpoint layout and loading, the backbone form, training."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pvt
from tests.fixtures.fill import fill_state_dict

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "pvt_small.pt"
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def fx():
    return torch.load(FIXTURE, weights_only=False)


@pytest.fixture(scope="module")
def official(fx):
    """The fixture's factory and kwargs with the filled weights loaded strictly, and its outputs (computed once)."""
    factory = fx["config"]["factory"].split(":")[-1]
    model = getattr(pvt, factory)(**fx["config"]["kwargs"])
    model.load_state_dict(fill_state_dict(fx["shapes"], fx["seed"]), strict=True)
    model.eval()
    stage_tokens, hooks = {}, []
    for key in fx["outputs"]["stage_tokens_sample0"]:  # "stage3_tokens": the output of block3's last Block

        def keep(module, inputs, output, key=key):
            stage_tokens[key] = output[:1].clone()

        hooks.append(getattr(model, f"block{int(key[len('stage')])}")[-1].register_forward_hook(keep))
    with torch.no_grad():
        logits = model(fx["inputs"]["x"])
        for hook in hooks:
            hook.remove()
        outputs = {"logits": logits, "features": model.forward_features(fx["inputs"]["x"]),
                   "stage_tokens_sample0": stage_tokens, "logits_other_size": model(fx["inputs"]["x_other_size"])}
    return model, outputs


# ----------------------------------------------------------------------------------------------------------------
# Parity with the official code (tests/fixtures/pvt_small.pt)
# ----------------------------------------------------------------------------------------------------------------


def test_parity_with_official_pvt_small(fx, official):
    _, ours = official
    expected = fx["outputs"]
    size = tuple(fx["inputs"]["x_other_size"].shape[-2:])
    torch.testing.assert_close(ours["logits"], expected["logits"], **TOL, msg=lambda m: f"logits differ: {m}")
    torch.testing.assert_close(ours["features"], expected["features"], **TOL,
                               msg=lambda m: f"pooled features differ: {m}")
    for key, value in expected["stage_tokens_sample0"].items():
        torch.testing.assert_close(ours["stage_tokens_sample0"][key], value, **TOL,
                                   msg=lambda m, key=key: f"{key} differ: {m}")
    torch.testing.assert_close(ours["logits_other_size"], expected["logits_other_size"], **TOL,
                               msg=lambda m: f"logits at {size} differ (position-embedding interpolation): {m}")


def test_parity_is_sensitive_to_a_small_weight_change(fx, official):
    """The comparison has teeth: one altered weight moves the logits beyond the tolerance."""
    model, _ = official
    weight = model.block2[0].attn.kv.weight
    with torch.no_grad():
        weight[0, 0] += 0.05
        logits = model(fx["inputs"]["x"][:1])
        weight[0, 0] -= 0.05
    assert not torch.allclose(logits, fx["outputs"]["logits"][:1], **TOL)


# ----------------------------------------------------------------------------------------------------------------
# Key / shape tables of the four sizes
# ----------------------------------------------------------------------------------------------------------------


def official_key_table(depths, num_classes=1000, dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4),
                       sr_ratios=(8, 4, 2, 1), img_size=224):
    """The released checkpoints' {key: shape} layout, written out from the paper's configuration (Table 1)."""
    table = {}
    in_chans, grid = 3, img_size // 4
    for i, (depth, dim, ratio, sr) in enumerate(zip(depths, dims, mlp_ratios, sr_ratios), start=1):
        patch = 4 if i == 1 else 2
        table[f"patch_embed{i}.proj.weight"] = [dim, in_chans, patch, patch]
        for name in ("patch_embed{}.proj.bias", "patch_embed{}.norm.weight", "patch_embed{}.norm.bias"):
            table[name.format(i)] = [dim]
        table[f"pos_embed{i}"] = [1, grid * grid + (i == 4), dim]
        for j in range(depth):
            b = f"block{i}.{j}"
            for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.q.bias", "attn.proj.bias",
                         "mlp.fc2.bias"):
                table[f"{b}.{name}"] = [dim]
            table[f"{b}.attn.q.weight"] = [dim, dim]
            table[f"{b}.attn.kv.weight"], table[f"{b}.attn.kv.bias"] = [2 * dim, dim], [2 * dim]
            table[f"{b}.attn.proj.weight"] = [dim, dim]
            if sr > 1:
                table[f"{b}.attn.sr.weight"], table[f"{b}.attn.sr.bias"] = [dim, dim, sr, sr], [dim]
                table[f"{b}.attn.norm.weight"], table[f"{b}.attn.norm.bias"] = [dim], [dim]
            table[f"{b}.mlp.fc1.weight"], table[f"{b}.mlp.fc1.bias"] = [dim * ratio, dim], [dim * ratio]
            table[f"{b}.mlp.fc2.weight"] = [dim, dim * ratio]
        in_chans, grid = dim, grid // 2
    table["norm.weight"], table["norm.bias"] = [dims[-1]], [dims[-1]]
    table["cls_token"] = [1, 1, dims[-1]]
    table["head.weight"], table["head.bias"] = [num_classes, dims[-1]], [num_classes]
    return table


PAPER_SIZES = {  # Table 1 depths and the paper's parameter counts (millions)
    "pvt_tiny": ([2, 2, 2, 2], 13.2), "pvt_small": ([3, 4, 6, 3], 24.5),
    "pvt_medium": ([3, 4, 18, 3], 44.2), "pvt_large": ([3, 8, 27, 3], 61.4)}


def test_fixture_key_table_matches_the_paper_configuration(fx):
    assert len(fx["shapes"]) == 301
    assert {k: list(s) for k, (s, _) in fx["shapes"].items()} == official_key_table(PAPER_SIZES["pvt_small"][0])


@pytest.mark.parametrize("name", list(PAPER_SIZES))
def test_factory_key_tables(name):
    depths, params_m = PAPER_SIZES[name]
    with torch.device("meta"):
        model = getattr(pvt, name)()
    table = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert table == official_key_table(depths), f"{name}: state-dict keys/shapes differ from the official layout"
    assert list(model.state_dict()) == list(model.state_dict())  # stable order
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == params_m


def test_official_epsilons_and_drop_path():
    model = pvt.pvt_tiny(drop_path_rate=0.1)
    assert model.patch_embed1.norm.eps == 1e-5 and model.block1[0].attn.norm.eps == 1e-5
    assert model.block1[0].norm1.eps == 1e-6 and model.norm.eps == 1e-6
    rates = [blk.drop_path.p for i in range(1, 5) for blk in getattr(model, f"block{i}")]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 8).tolist())


def test_attention_matches_explicit_softmax():
    """F.scaled_dot_product_attention in SRA equals softmax(q k^T * scale) v written out (Eq. 2)."""
    torch.manual_seed(0)
    attn = pvt.Attention(dim=40, num_heads=5, qkv_bias=True, sr_ratio=2).eval()
    B, H, W, C = 2, 6, 4, 40
    x = torch.randn(B, H * W, C)
    reduced = attn.norm(attn.sr(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2))
    q = attn.q(x).reshape(B, -1, 5, 8).transpose(1, 2)
    k, v = attn.kv(reduced).reshape(B, -1, 2, 5, 8).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(B, H * W, C))
    torch.testing.assert_close(attn(x, H, W), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint loading
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["raw", "model", "state_dict"])
def test_checkpoint_forms_load(tmp_path, form):
    torch.manual_seed(0)
    source = pvt.pvt_tiny().eval()
    path = tmp_path / "pvt_tiny.pth"
    torch.save(source.state_dict() if form == "raw" else {form: source.state_dict()}, path)
    model = pvt.pvt_tiny().eval()
    assert pvt.load_pretrained(model, path) == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_checkpoint_of_another_size_is_a_clear_error(fx, tmp_path):
    path = tmp_path / "pvt_small.pth"
    torch.save({"model": fill_state_dict(fx["shapes"], fx["seed"])}, path)
    with pytest.raises(ValueError, match=r"pvt_small.*but the model is pvt_tiny"):
        pvt.load_pretrained(pvt.pvt_tiny(), path)


def test_finetune_drops_a_head_of_another_size(tmp_path):
    source = pvt.pvt_tiny(num_classes=1000)
    path = tmp_path / "pvt_tiny.pth"
    torch.save(source.state_dict(), path)
    model = pvt.pvt_tiny(num_classes=10)
    assert sorted(pvt.load_pretrained(model, path)) == ["head.bias", "head.weight"]
    assert torch.equal(model.cls_token, source.cls_token) and model.head.weight.shape == (10, 512)


# ----------------------------------------------------------------------------------------------------------------
# Backbone form and input sizes
# ----------------------------------------------------------------------------------------------------------------


def test_backbone_form_loads_classification_checkpoint(fx, tmp_path):
    path = tmp_path / "pvt_small.pth"
    torch.save(fill_state_dict(fx["shapes"], fx["seed"]), path)
    backbone = pvt.pvt_small(backbone=True).eval()
    ignored = pvt.load_pretrained(backbone, path)
    assert sorted(ignored) == ["cls_token", "head.bias", "head.weight", "norm.bias", "norm.weight"]
    x = fx["inputs"]["x"][:1]
    with torch.no_grad():
        maps = backbone(x)
    assert [tuple(m.shape) for m in maps] == [(1, c, 224 // s, 224 // s)
                                             for c, s in zip([64, 128, 320, 512], [4, 8, 16, 32])]
    # stage 3 does not depend on the cls token: the map is the official stage-3 output
    stage3 = fx["outputs"]["stage_tokens_sample0"]["stage3_tokens"]
    torch.testing.assert_close(maps[2].flatten(2).transpose(1, 2), stage3, **TOL)


def test_other_input_sizes_including_the_official_crash_case():
    """Sizes that are not multiples of 32 work, and so does 448 x 448 (stage 2 has 3136 tokens: the official code
    crashes there)."""
    model = pvt.pvt_tiny(num_classes=3).eval()
    with torch.no_grad():
        for size in [(100, 100), (250, 130), (448, 448)]:
            assert model(torch.randn(1, 3, *size)).shape == (1, 3)


def test_resize_pos_embed_is_identity_at_the_training_grid():
    pos = torch.randn(1, 28 * 28, 8)
    assert pvt.resize_pos_embed(pos, (28, 28), 28, 28) is pos
    resized = pvt.resize_pos_embed(pos, (28, 28), 14, 21)
    expected = F.interpolate(pos.reshape(1, 28, 28, 8).permute(0, 3, 1, 2), size=(14, 21), mode="bilinear")
    torch.testing.assert_close(resized, expected.flatten(2).transpose(1, 2))


def test_input_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="too small.*at least 32 pixels"):
        pvt.pvt_tiny()(torch.randn(1, 3, 31, 64))
