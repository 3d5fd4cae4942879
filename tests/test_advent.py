"""ADVENT: parity with the official code (fixtures), MinEnt/AdvEnt iterations, the class-ratio prior, the script."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import adaptsegnet
import advent
from common import uda
from common.deeplab import DeepLabV2
from tests.conftest import FIXTURES, ROOT
from tests.fixtures.fill import fill_state_dict
from tests.test_adaptsegnet import ONE_THREAD_ENV, write_tiny_uda_data


def load_fixture(name):
    return torch.load(FIXTURES / name, weights_only=False)


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-4, atol=1e-4,
                               msg=lambda m: f"{what} differs from the official ADVENT output: {m}")


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ----------------------------------------------------------------------------------------------------------------
# Parity with the official code
# ----------------------------------------------------------------------------------------------------------------


def test_deeplab_v2_matches_official_four_branch_classifier_and_key_tables():
    fx = load_fixture("deeplabv2_multi.pt")
    cfg = fx["config"]
    model = DeepLabV2(num_classes=cfg["num_classes"], multi_level=cfg["advent_multi_level"], aspp_branches=4,
                      layers=tuple(cfg["layers"]))
    model.load_state_dict(fill_state_dict(fx["shapes"], fx["seed"]))  # strict: the released key table
    model.eval()
    with torch.no_grad():
        aux, main = model(fx["inputs"]["x"])
    close(aux, fx["outputs"]["advent_aux"], "aux (layer5) output")
    close(main, fx["outputs"]["advent_main"], "main (layer6) output")
    up = uda.upsample(main, fx["inputs"]["x"].shape[-2:])
    close(up, fx["outputs"]["advent_main_up_to_input"], "main output upsampled to the input")
    assert torch.equal(up.argmax(1), fx["outputs"]["advent_main_up_argmax"]), "argmax of the upsampled output"
    single = DeepLabV2(num_classes=cfg["num_classes"], multi_level=False, layers=tuple(cfg["layers"]))
    single.load_state_dict(fill_state_dict(fx["shapes_advent_single_level"], fx["seed"]))


def test_discriminator_on_self_information_matches_official():
    fx = load_fixture("discriminators.pt")
    cfg, inp, out = fx["config"], fx["inputs"], fx["outputs"]
    disc = advent.get_fc_discriminator(cfg["num_classes"], cfg["ndf"])
    state = fill_state_dict(fx["shapes"]["advent_get_fc_discriminator"], fx["seed"])
    disc.load_state_dict(state)
    disc.eval()
    wsi = advent.weighted_self_information(inp["prob"])
    close(wsi, inp["wsi"], "weighted self-information of the stored softmax")
    with torch.no_grad():
        d_out = disc(wsi)
        close(d_out, out["advent_D_out"], "D(I)")
        close(uda.bce_loss(d_out, advent.SOURCE_LABEL), out["advent_bce_loss_source0"], "BCE vs source label")
        close(uda.bce_loss(d_out, advent.TARGET_LABEL), out["advent_bce_loss_target1"], "BCE vs target label")
        # The same architecture as AdaptSegNet's: renaming 0/2/4/6/8 -> conv1..conv4/classifier gives the same D.
        renamed = adaptsegnet.FCDiscriminator(cfg["num_classes"], cfg["ndf"])
        names = dict(zip("02468", ["conv1", "conv2", "conv3", "conv4", "classifier"]))
        renamed.load_state_dict({f"{names[k[0]]}{k[1:]}": v for k, v in state.items()})
        close(renamed(wsi), out["advent_D_out"], "AdaptSegNet's D with ADVENT's weights")


class StoredPredictions(nn.Module):
    """A stand-in segmentation network that returns the fixture's (aux, main) logits times a unit scale."""

    def __init__(self, pred_aux, pred_main):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.pred_aux, self.pred_main = pred_aux, pred_main

    def forward(self, images):
        return self.pred_aux * self.scale, self.pred_main * self.scale


def test_minent_iteration_and_losses_match_official():
    fx = load_fixture("advent_losses.pt")
    cfg, inp, out = fx["config"], fx["inputs"], fx["outputs"]
    for level in ("aux", "main"):
        up = uda.upsample(inp[f"pred_{level}"], cfg["crop_hw"])
        prob = torch.softmax(up, dim=1)
        close(up, out[f"up_{level}"], f"upsampled {level} output")
        close(prob, out[f"prob_{level}"], f"{level} softmax")
        close(advent.weighted_self_information(prob), out[f"wsi_{level}"], f"{level} self-information map")
        close(advent.entropy_loss(prob), out[f"entropy_loss_{level}"], f"{level} entropy loss")
        close(uda.seg_loss(up, inp["labels"]), out[f"seg_loss_{level}"], f"{level} segmentation loss")

    # One MinEnt iteration of the script on the stored logits: source and target images of the crop size.
    args = advent.get_args_parser().parse_args(["--method", "minent"])
    for key in ("LAMBDA_ENT_MAIN", "LAMBDA_ENT_AUX", "LAMBDA_SEG_MAIN", "LAMBDA_SEG_AUX"):
        setattr(args, key.lower(), cfg[key])
    images = torch.zeros(1, 3, *cfg["crop_hw"])
    model = StoredPredictions(inp["pred_aux"], inp["pred_main"])
    logs = advent.train_one_iteration(model, None, None, (images, inp["labels"]), images, args,
                                      torch.amp.GradScaler("cpu", enabled=False))
    close(logs["loss_seg_main"], out["seg_loss_main"], "source main CE in the iteration")
    close(logs["loss_seg_main"] * cfg["LAMBDA_SEG_MAIN"] + logs["loss_seg_aux"] * cfg["LAMBDA_SEG_AUX"],
          out["seg_loss_total"], "source segmentation total")
    close(logs["loss_ent_aux"], out["entropy_loss_aux"], "target aux entropy in the iteration")
    close(cfg["LAMBDA_ENT_AUX"] * logs["loss_ent_aux"] + cfg["LAMBDA_ENT_MAIN"] * logs["loss_ent_main"],
          out["minent_loss"], "MinEnt total")


def test_altered_fixture_is_detected():
    fx = load_fixture("advent_losses.pt")
    prob = torch.softmax(uda.upsample(fx["inputs"]["pred_main"] * 1.01, fx["config"]["crop_hw"]), dim=1)
    with pytest.raises(AssertionError):
        close(advent.entropy_loss(prob), fx["outputs"]["entropy_loss_main"], "entropy of altered logits")


# ----------------------------------------------------------------------------------------------------------------
# Class-ratio prior (Sec. 3.3; no official code, so a hand-computed example)
# ----------------------------------------------------------------------------------------------------------------


def test_class_ratio_prior_against_hand_computed_example():
    prior = advent.class_prior_from_histogram([6, 3, 1, 0])  # p_s = [0.6, 0.3, 0.1, 0]
    torch.testing.assert_close(prior, torch.tensor([0.6, 0.3, 0.1, 0.0]))
    # Two pixels: [1, 0, 0, 0] and [0.5, 0.5, 0, 0] -> predicted class ratios [0.75, 0.25, 0, 0].
    prob = torch.tensor([[1.0, 0.5], [0.0, 0.5], [0.0, 0.0], [0.0, 0.0]]).reshape(1, 4, 1, 2).requires_grad_()
    # mu = 0.5: mu p_s = [0.3, 0.15, 0.05, 0] -> only class 2 is below: 0.05 - 0 = 0.05
    loss = advent.class_ratio_prior_loss(prob, prior, mu=0.5)
    assert loss.item() == pytest.approx(0.05)
    # mu = 1: [0.6 - 0.75 < 0, 0.3 - 0.25, 0.1 - 0, 0] -> 0.05 + 0.1
    assert advent.class_ratio_prior_loss(prob, prior, mu=1.0).item() == pytest.approx(0.15)
    loss.backward()  # d/dP: -1/(H W) for the class below its prior, 0 for the others
    torch.testing.assert_close(prob.grad[0, :, 0, 0], torch.tensor([0.0, 0.0, -0.5, 0.0]))


# ----------------------------------------------------------------------------------------------------------------
# The AdvEnt iteration and the script, as a user runs it
# ----------------------------------------------------------------------------------------------------------------


def test_advent_iteration_trains_discriminators_on_detached_self_information():
    torch.manual_seed(0)
    args = advent.get_args_parser().parse_args(["--method", "advent", "--lambda_adv_main", "1"])
    model = DeepLabV2(num_classes=4, layers=(1, 1, 1, 1), width=8).train()
    d_aux, d_main = advent.get_fc_discriminator(4, 8), advent.get_fc_discriminator(4, 8)
    source = (torch.randn(1, 3, 64, 64), torch.randint(0, 4, (1, 64, 64)))
    target = torch.randn(1, 3, 64, 64)
    logs = advent.train_one_iteration(model, d_aux, d_main, source, target, args,
                                      torch.amp.GradScaler("cpu", enabled=False))
    assert {"loss_adv_trg_main", "loss_d_main", "loss_d_aux"} <= set(logs)
    with torch.no_grad():
        outputs = [[uda.upsample(p, x.shape[-2:]) for p in model(x)] for x in (source[0], target)]
    reference = advent.get_fc_discriminator(4, 8)
    reference.load_state_dict(d_main.state_dict())
    sum(uda.bce_loss(reference(advent.weighted_self_information(torch.softmax(out[1], 1))), label) / 2
        for out, label in zip(outputs, (advent.SOURCE_LABEL, advent.TARGET_LABEL))).backward()
    for p, q in zip(d_main.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg="D_main gradient leaked from G step")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return write_tiny_uda_data(tmp_path_factory.mktemp("uda"))


def run_script(*argv, ok=True):
    proc = subprocess.run([sys.executable, "advent.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          env=ONE_THREAD_ENV)
    if ok:
        assert proc.returncode == 0, f"advent.py {' '.join(argv)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_script_advent_minent_and_ensemble(tiny_root, tmp_path):
    small = ["--data_root", str(tiny_root), "--device", "cpu", "--layers", "1", "1", "1", "1", "--width", "8",
             "--input_size", "64,32", "--input_size_target", "64,32", "--num_workers", "0"]
    runs = {}
    for method, extra in (("advent", []), ("minent", ["--class_prior"])):
        runs[method] = tmp_path / method
        stdout = run_script(*small, "--method", method, *extra, "--early_stop", "3", "--save_pred_every", "2",
                            "--output_dir", str(runs[method]), "--viz", "--num_viz", "1").stdout
        result = json.loads((runs[method] / "eval.json").read_text())
        assert result["selection"] == "last snapshot" and result["iteration"] == 3
        assert sorted(p.name for p in (runs[method] / "snapshots").iterdir()) == ["model_2.pth", "model_3.pth"]
        assert list((runs[method] / "viz").glob("*.png"))
    assert "class-ratio prior" in stdout
    assert "loss_class_prior" in (runs["minent"] / "log.txt").read_text()

    out = tmp_path / "ensemble"
    stdout = run_script(*small, "--eval", "--ensemble", str(runs["advent"] / "checkpoint.pth"),
                        str(runs["minent"] / "checkpoint.pth"), "--output_dir", str(out)).stdout
    assert "mIoU =" in stdout and 0 <= json.loads((out / "eval.json").read_text())["mIoU"] <= 100

    # A 19-class checkpoint evaluated for SYNTHIA (16 classes): one error naming both counts.
    proc = run_script(*small, "--source", "synthia", "--eval", "--resume", str(runs["advent"] / "checkpoint.pth"),
                      ok=False)
    assert proc.returncode != 0 and "19-class" in proc.stderr and "16 classes" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_script_resume_continues_where_it_stopped(tiny_root, tmp_path):
    small = ["--data_root", str(tiny_root), "--device", "cpu", "--layers", "1", "1", "1", "1", "--width", "8",
             "--input_size", "64,32", "--input_size_target", "64,32", "--num_workers", "0", "--method", "advent",
             "--save_pred_every", "2", "--output_dir", str(tmp_path)]
    run_script(*small, "--early_stop", "2")
    stdout = run_script(*small, "--early_stop", "4", "--resume", str(tmp_path / "checkpoint.pth")).stdout
    assert "resumed from" in stdout and "at iteration 2" in stdout
    log = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [2, 4]
