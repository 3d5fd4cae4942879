"""--amp is numerically sane: every paper's model under bfloat16 autocast (what `--amp` runs on CPU) gives outputs
within a stated bound of its float32 outputs, with the parity fixtures' weights (fill_state_dict) and inputs.

The bound is on the relative L2 error ||y_amp - y_fp32|| / ||y_fp32|| of each output: 3%, and 4% for VisTR's masks.
Why: bfloat16 keeps 8 significant bits, so every value autocast rounds (the inputs of each matmul and convolution)
carries a relative error of up to 2^-9 (0.2%). These errors are independent from layer to layer and add up over
the depth of the network, to about 1-1.5% at the end of a ResNet-101 or of a ResNet-50 + transformer, and more for
VisTR's masks, which pass through the backbone, twelve transformer layers and then the mask head. Each bound sits at
about twice the largest error measured for that kind of output (docs/performance.md), so a change that doubles the
bfloat16 error fails here: a step that needs float32 but runs in bfloat16 (VisTR's deformable sampling positions
in bfloat16 nearly double its mask error), an overflow, a NaN. The float32 parity tests are unchanged.

Also: which precision `--amp` picks (bfloat16 on CPU and on GPUs that have it, float16 with a GradScaler on older
GPUs), with the GPU's compute capability mocked.
"""
from types import SimpleNamespace

import pytest
import torch

import detr
import proda
import pvt
import trackformer
import vistr
from common import training
from common.deeplab import DeepLabV2
from tests.conftest import FIXTURES
from tests.fixtures.fill import fill_state_dict

BOUND = 0.03
MASK_BOUND = 0.04

pytestmark = pytest.mark.usefixtures("one_thread")


def load(name):
    return torch.load(FIXTURES / name, weights_only=False)


def with_fill(model, shapes, seed):
    model.load_state_dict(fill_state_dict(shapes, seed), strict=True)
    return model.eval()


def fp32_and_amp(forward):
    """({name: float32 output}, {name: output under bfloat16 autocast}) of forward() -> dict of tensors."""
    with torch.no_grad():
        ref = forward()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = forward()
    return ref, low


def assert_within(ref, low, what, bounds):
    """Every output named in bounds is finite under amp and within its relative L2 bound of float32."""
    for key, bound in bounds.items():
        a, b = low[key].float(), ref[key].float()
        assert low[key].shape == ref[key].shape, f"{what} {key}: shape {tuple(low[key].shape)} vs float32's"
        assert torch.isfinite(a).all(), f"{what} {key}: non-finite values under bfloat16 autocast"
        error = ((a - b).norm() / b.norm()).item()
        print(f"{what} {key}: relative error {error:.4f} (bound {bound})")
        assert error <= bound, f"{what} {key}: relative error {error:.4f} under bfloat16 autocast, bound {bound}"


def test_detr_amp_within_bound_of_float32():
    fx = load("detr_r50.pt")
    args = detr.get_args_parser().parse_args([])
    for key, value in fx["config"]["args"].items():
        if hasattr(args, key):
            setattr(args, key, value)
    args.num_classes = fx["config"]["num_classes"]
    model = with_fill(detr.build(args)[0], fx["shapes"], fx["seed"])
    ref, low = fp32_and_amp(lambda: model(list(fx["inputs"]["images"])))  # two sizes: the padding-mask path
    assert_within(ref, low, "DETR", {"pred_logits": BOUND, "pred_boxes": BOUND})
    for i, (r, lo) in enumerate(zip(ref["aux_outputs"], low["aux_outputs"])):
        assert_within(r, lo, f"DETR aux {i}", {"pred_logits": BOUND, "pred_boxes": BOUND})


def test_pvt_amp_within_bound_of_float32():
    fx = load("pvt_small.pt")
    model = with_fill(pvt.build_pvt("pvt_small", **fx["config"]["kwargs"]), fx["shapes"], fx["seed"])
    for name in ("x", "x_other_size"):  # the training grid and a resized position embedding
        ref, low = fp32_and_amp(lambda name=name: {"logits": model(fx["inputs"][name])})
        assert_within(ref, low, f"PVT-Small ({name})", {"logits": BOUND})


def test_vistr_amp_within_bound_of_float32():
    fx = load("vistr_r50.pt")
    args = vistr.get_args_parser().parse_args([])
    for key, value in fx["config"].items():
        if hasattr(args, key) and key not in ("data_root", "output_dir", "device", "resume"):
            setattr(args, key, value)
    model = with_fill(vistr.build_model(args), fx["shapes"], fx["seed"])
    ref, low = fp32_and_amp(lambda: model(fx["inputs"]["clip"]))
    assert_within(ref, low, "VisTR", {"pred_logits": BOUND, "pred_boxes": BOUND, "pred_masks": MASK_BOUND})


def test_trackformer_amp_within_bound_of_float32():
    """Both frames under amp: the previous frame's features, then the current frame with the fixture's two track
    queries (one true, one false positive); the fixture's frames at half resolution, to keep the test fast."""
    fx = load("trackformer.pt")
    config = fx["config"]["train_args"]
    args = trackformer.get_args_parser().parse_args([])
    for name in ("hidden_dim", "num_queries", "num_feature_levels", "enc_layers", "dec_layers", "dim_feedforward",
                 "nheads", "dec_n_points", "enc_n_points", "backbone"):
        setattr(args, name, config[name])
    args.num_classes = fx["config"]["class_logits"]
    model = with_fill(trackformer.build_model(args)[0], fx["shapes"], fx["seed"])
    inputs = fx["inputs"]
    track_queries = trackformer.stack_track_queries([inputs["criterion_track_queries"]])

    def forward():
        _, prev_features = model(inputs["img_prev"][..., ::2, ::2])
        return model(inputs["img_cur"][..., ::2, ::2], prev_features, track_queries)[0]

    ref, low = fp32_and_amp(forward)
    assert_within(ref, low, "TrackFormer", {"pred_logits": BOUND, "pred_boxes": BOUND, "hs_embed": BOUND})


@pytest.mark.parametrize("paper,branches", [("AdaptSegNet", 2), ("ADVENT", 4)])
def test_deeplab_v2_amp_within_bound_of_float32(paper, branches):
    fx = load("deeplabv2_multi.pt")
    model = DeepLabV2(num_classes=fx["config"]["num_classes"], multi_level=True, aspp_branches=branches)
    with_fill(model, fx["shapes"], fx["seed"])
    ref, low = fp32_and_amp(lambda: dict(zip(("aux", "main"), model(fx["inputs"]["x"]))))
    assert_within(ref, low, f"{paper} DeepLab-v2", {"aux": BOUND, "main": BOUND})


def test_proda_amp_within_bound_of_float32():
    fx = load("proda.pt")
    model = with_fill(proda.ProDANet(fx["config"]["num_classes"]), fx["shapes"]["net"], fx["seed"])
    ref, low = fp32_and_amp(lambda: model(fx["inputs"]["x"]))
    assert_within(ref, low, "ProDA", {"feat": BOUND, "out": BOUND})


@pytest.mark.parametrize("major, dtype, scaled", [(7, torch.float16, True), (8, torch.bfloat16, False),
                                                  (9, torch.bfloat16, False)])
def test_amp_on_cuda_is_bfloat16_where_the_gpu_has_it_else_float16_with_a_grad_scaler(monkeypatch, major, dtype,
                                                                                      scaled):
    """A GPU of compute capability `major` (mocked: this test needs no GPU): Ampere (8) and later run --amp in
    bfloat16 without loss scaling, older GPUs in float16 with an active GradScaler; the CPU in bfloat16."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major, minor=0))
    assert training.amp_dtype("cuda") == training.amp_dtype(torch.device("cuda:0")) == dtype
    assert training.amp_autocast("cuda", True).fast_dtype == dtype
    assert training.grad_scaler("cuda", True).is_enabled() == scaled
    assert not training.grad_scaler("cuda", False).is_enabled()
    assert training.amp_dtype("cpu") == training.amp_autocast("cpu", True).fast_dtype == torch.bfloat16
    assert not training.grad_scaler("cpu", True).is_enabled()
