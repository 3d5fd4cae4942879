"""DeepLab-v2 (common/deeplab.py): parity with AdaptSegNet/ADVENT, key layout, Caffe init, optimizer groups."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.deeplab import (
    ASPP_DILATIONS,
    AtrousConv2d,
    DeepLabV2,
    ResNetTrunk,
    freeze_bn_affine,
    load_caffe_init,
    optim_parameters,
)
from tests.fixtures.fill import fill_state_dict, shapes_of

FIXTURE = "tests/fixtures/deeplabv2_multi.pt"
TOL = dict(rtol=1e-4, atol=1e-4)
TINY = dict(layers=(1, 1, 1, 1), width=8)


@pytest.fixture(scope="module")
def fx():
    fx = torch.load(FIXTURE, weights_only=False)
    fx["filled"] = fill_state_dict(fx["shapes"], fx["seed"])
    return fx


def build_from_fixture(fx, aspp_branches):
    cfg = fx["config"]
    # What the model hard-wires must be what the fixture describes.
    assert cfg["block"] == "Bottleneck" and cfg["dilations"] == {"layer3": 2, "layer4": 4}, cfg
    assert tuple(cfg["classifier_dilations"]) == ASPP_DILATIONS, cfg
    model = DeepLabV2(
        num_classes=cfg["num_classes"], multi_level=cfg.get("advent_multi_level", True),
        aspp_branches=aspp_branches, layers=tuple(cfg["layers"]),
    )
    model.load_state_dict(fx["filled"])  # strict: the official 640 keys and shapes
    return model.eval() if cfg.get("mode", "eval") == "eval" else model.train()


@pytest.mark.parametrize("variant,branches", [("adaptsegnet", 2), ("advent", 4)])
def test_parity_with_official_deeplab_multi(fx, variant, branches):
    model = build_from_fixture(fx, branches)
    means = {}
    hooks = [getattr(model, name).register_forward_hook(
        lambda m, i, o, name=name: means.__setitem__(name, o.mean(dim=(0, 2, 3))))
        for name in fx["outputs"]["stage_channel_means"]]
    with torch.no_grad():
        aux, main = model(fx["inputs"]["x"])
    for h in hooks:
        h.remove()
    for name, expected in fx["outputs"]["stage_channel_means"].items():  # localises a mismatch, stage by stage
        torch.testing.assert_close(means[name], expected, **TOL, msg=lambda m, name=name: f"stage {name}: {m}")
    torch.testing.assert_close(aux, fx["outputs"][f"{variant}_aux"], **TOL, msg=lambda m: f"{variant} aux: {m}")
    torch.testing.assert_close(main, fx["outputs"][f"{variant}_main"], **TOL, msg=lambda m: f"{variant} main: {m}")
    if variant == "advent":
        # Evaluation path: bilinear upsampling (align_corners=True) of the main output to the input size, argmax.
        up = F.interpolate(main, size=fx["inputs"]["x"].shape[-2:], mode="bilinear", align_corners=True)
        torch.testing.assert_close(up, fx["outputs"]["advent_main_up_to_input"], **TOL)
        top2 = fx["outputs"]["advent_main_up_to_input"].topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-3  # pixels whose winner is not a near-tie
        assert torch.equal(up.argmax(1)[clear], fx["outputs"]["advent_main_up_argmax"][clear])


def test_state_dict_keys_match_official_tables(fx):
    multi = DeepLabV2(fx["config"]["num_classes"], multi_level=True)
    assert list(multi.state_dict()) == list(fx["shapes"]), "multi-level keys or their order differ from the official"
    assert shapes_of(multi.state_dict()) == fx["shapes"]
    single = DeepLabV2(fx["config"]["num_classes"], multi_level=False)
    assert shapes_of(single.state_dict()) == fx["shapes_advent_single_level"]
    single.load_state_dict({k: fx["filled"][k] for k in fx["shapes_advent_single_level"]})
    with torch.no_grad():
        out = single.eval()(fx["inputs"]["x"])
    assert isinstance(out, torch.Tensor) and out.shape == fx["outputs"]["advent_main"].shape


def test_trunk_key_layout_and_strides(fx):
    trunk = ResNetTrunk()
    expected = [k for k in fx["shapes"] if k.split(".")[0] not in ("layer5", "layer6")]
    assert list(trunk.state_dict()) == expected
    block = trunk.layer3[0]
    assert block.conv1.stride == (1, 1) and block.conv2.dilation == (2, 2) and trunk.layer4[0].conv2.dilation == (4, 4)
    assert trunk.layer2[0].conv1.stride == (2, 2) and trunk.layer2[0].conv2.stride == (1, 1)  # stride on the 1x1
    assert all(trunk.__getattr__(f"layer{i}")[0].downsample is not None for i in range(1, 5))
    small = ResNetTrunk(**TINY, norm_layer=nn.BatchNorm2d).eval()
    with torch.no_grad():
        x3, x4 = small(torch.randn(2, 3, 65, 97))
    assert x3.shape == (2, 16 * TINY["width"], 9, 13) and x4.shape == (2, 32 * TINY["width"], 9, 13)
    assert all(p.requires_grad for p in small.parameters()), "the bare trunk keeps trainable BN (ProDA)"


def test_aspp_branch_switch_sums_first_branches():
    model = DeepLabV2(5, **TINY, aspp_branches=2).eval()
    x = torch.randn(1, 32 * TINY["width"], 6, 7)
    convs = model.layer6.conv2d_list
    with torch.no_grad():
        torch.testing.assert_close(model.layer6(x), convs[0](x) + convs[1](x))
        model.layer6.branches = 4
        torch.testing.assert_close(model.layer6(x), sum(c(x) for c in convs))


@pytest.mark.parametrize("size", [(5, 7), (10, 17), (13, 30), (30, 30)])
@pytest.mark.parametrize("dilation", [6, 12, 24])
def test_atrous_conv_skips_only_taps_that_read_padding(size, dilation):
    """AtrousConv2d against nn.Conv2d with the same weights: output and every gradient, on maps smaller than the
    dilation in one, both or neither direction (the skipped taps' weight gradient must be exactly zero)."""
    torch.manual_seed(0)
    conv = AtrousConv2d(6, 4, dilation)
    reference = nn.Conv2d(6, 4, 3, padding=dilation, dilation=dilation)
    reference.load_state_dict(conv.state_dict())
    x = torch.randn(2, 6, *size, requires_grad=True)
    grads = []
    for module in (conv, reference):
        x.grad = None
        module.zero_grad()
        out = module(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), x.grad.clone(), module.weight.grad.clone(), module.bias.grad.clone()))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    outer_rows, outer_cols = (d >= n for d, n in zip(conv.dilation, size))
    if outer_rows:
        assert grads[0][2][:, :, [0, 2]].abs().sum() == 0
    if outer_cols:
        assert grads[0][2][:, :, :, [0, 2]].abs().sum() == 0


def test_init_freeze_and_optimizer_groups():
    model = DeepLabV2(7, **TINY)
    bn_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert all(not p.requires_grad for p in model.parameters() if id(p) in bn_params)
    conv_std = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, nn.Conv2d)]).std()
    assert abs(conv_std.item() - 0.01) < 0.002, f"conv init std {conv_std:.4f}, expected N(0, 0.01)"
    groups = optim_parameters(model, lr=2.5e-4)
    assert [g["lr"] for g in groups] == [2.5e-4, 2.5e-3]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is listed twice"
    heads = {id(p) for name in ("layer5", "layer6") for p in getattr(model, name).parameters()}
    assert {id(p) for p in groups[1]["params"]} == heads
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(ids) == trainable | heads and not (set(ids) & bn_params)
    torch.optim.SGD(groups, lr=2.5e-4, momentum=0.9, weight_decay=5e-4)  # no duplicate-parameter warning/error
    # BN stays in train mode: batch statistics, running stats updated, affine untouched.
    before = model.bn1.running_mean.clone()
    model.train()(torch.randn(1, 3, 33, 33))
    assert not torch.equal(before, model.bn1.running_mean)
    freeze_bn_affine(ResNetTrunk(**TINY))


def test_load_caffe_init(tmp_path, capsys):
    model = DeepLabV2(19, **TINY)
    donor = DeepLabV2(19, **TINY)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("layer5", "layer6"))}
    ckpt = {f"Scale.{k}": v + 1.0 for k, v in donor.state_dict().items()
            if not k.endswith("num_batches_tracked") and not k.startswith(("layer5", "layer6"))}
    # The init's own single-level classifier (on layer4, 21 classes) is named layer5 and must be skipped.
    ckpt["Scale.layer5.conv2d_list.0.weight"] = torch.zeros(21, 32 * TINY["width"], 3, 3)
    ckpt["Scale.extra.weight"] = torch.zeros(3)
    path = tmp_path / "init.pth"
    torch.save(ckpt, path)
    missing, unexpected = load_caffe_init(model, str(path))
    state = model.state_dict()
    for key, value in ckpt.items():
        name = key.split(".", 1)[1]
        if name in state and not name.startswith("layer5"):
            assert torch.equal(state[name], value), name
    for key, value in head_before.items():
        assert torch.equal(state[key], value), f"{key} must keep its init"
    assert unexpected == ["Scale.extra.weight"]
    assert sorted(missing) == sorted(head_before)
    printed = capsys.readouterr().out
    assert str(path) in printed and "Scale.extra.weight" in printed

    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_caffe_init(model, str(tmp_path / "nowhere.pth"))
    torch.save({k.split(".", 1)[1]: v for k, v in ckpt.items()}, tmp_path / "plain.pth")  # no 'Scale.' prefix
    with pytest.raises(ValueError, match="plain.pth.*Scale"):
        load_caffe_init(model, str(tmp_path / "plain.pth"))
    torch.save({"Scale.conv1.weight": torch.zeros(1, 3, 7, 7)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth.*conv1.weight"):
        load_caffe_init(model, str(tmp_path / "bad.pth"))


def test_overfit_one_batch():
    torch.manual_seed(0)
    model = DeepLabV2(4, **TINY).train()
    x = torch.randn(1, 3, 33, 41)
    # Labels constant over 8x8 cells, so a stride-8 output can fit them; one band of ignore pixels.
    y = torch.randint(0, 4, (1, 1, 5, 6)).float()
    y = F.interpolate(y, size=(33, 41), mode="nearest").long()[:, 0]
    y[:, :3] = 255
    opt = torch.optim.SGD(optim_parameters(model, lr=0.01), lr=0.01, momentum=0.9)

    def loss_fn():
        aux, main = model(x)
        up = [F.interpolate(o, size=y.shape[-2:], mode="bilinear", align_corners=True) for o in (aux, main)]
        return F.cross_entropy(up[1], y, ignore_index=255) + 0.1 * F.cross_entropy(up[0], y, ignore_index=255)

    first = loss_fn().item()
    for _ in range(40):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss.item() < first / 3, f"loss {first:.3f} -> {loss.item():.3f}, expected a 3x drop"
