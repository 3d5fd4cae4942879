"""ProDA (proda.py): parity with the official code (tests/fixtures/proda.pt), units, and the script as a user runs it.

The fixture holds the official network's outputs under fill_state_dict weights and every intermediate of one official
stage-1 step, pseudo-label generation, a distillation step and a warm-up step on tiny stand-in network outputs; its
`notes` say how each was made. Everything about the case (sizes, batch, options) is read from it.
"""
import hashlib
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_pre_hook

import adaptsegnet
import proda
from common import segmentation, synthetic, training, uda
from common.deeplab import DeepLabV2
from tests.bitwise import assert_same
from tests.fixtures.fill import fill_state_dict

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def fx():
    return torch.load(ROOT / "tests" / "fixtures" / "proda.pt", weights_only=False)


def close(name, got, expected):
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} vs official {tuple(expected.shape)}"
    torch.testing.assert_close(got.to(expected.dtype), expected, **TOL, msg=lambda m: f"{name}: {m}")


def parse(fx, *flags):
    args = proda.get_args_parser().parse_args(["--num_classes", str(fx["config"]["num_classes"]), *flags])
    args.world_size = 1
    return proda.finalise_args(args)


def pipeline_args(fx, stage="1", flags=()):
    """The configuration the pipeline runs `stage` with: the script's defaults (plus `flags` where a test checks an
    option), nothing set by hand. The options of the fixture's official run must be those defaults."""
    args = parse(fx)
    ours = {"proto_momentum": args.proto_momentum, "proto_temperature": args.proto_temperature,
            "train_thred": args.train_thred, "rce": args.rce, "rce_alpha": args.rce_alpha, "rce_beta": args.rce_beta,
            "regular_w": args.regular_w, "regular_type": args.regular_type, "proto_consistW": args.proto_consistW,
            "proto_rectify": True, "ema": True, "moving_prototype": True,  # always on in proda.py's stage 1
            "S_pseudo": float(args.stage1_strong), "distillation": args.distillation,
            "S_pseudo_src": args.S_pseudo_src, "adv": args.adv}
    official = fx["config"]["stage1_opt"]
    assert set(official) <= set(ours), f"fixture options unknown here: {set(official) - set(ours)}"
    differ = {k: (v, ours[k]) for k, v in official.items() if ours[k] != v}
    assert not differ, f"proda.py's defaults differ from the official run's options (official, ours): {differ}"
    args = parse(fx, *flags) if flags else args
    args.device, args.amp, args.stage_name = "cpu", False, stage
    return args


def test_defaults_are_the_official_commands():
    """Without flags the pipeline runs the README's stage commands and, for the warm-up (no README command), the
    official parser_train.py defaults."""
    args = proda.finalise_args(SimpleNamespace(**vars(proda.get_args_parser().parse_args([])), world_size=1))
    warmup = dict(lr=args.lr_warmup, S_pseudo_src=args.S_pseudo_src, freeze_bn=args.freeze_bn, adv=args.adv,
                  gan=args.gan)
    assert warmup == dict(lr=1e-4, S_pseudo_src=0.0, freeze_bn=False, adv=0.01, gan="LS"), warmup
    # stage 1: --proto_rectify --moving_prototype --ema --rce --regular_w 0.1 --proto_consistW 10 (lr: parser 1e-4)
    stage1 = dict(lr=args.lr, rce=args.rce, regular_w=args.regular_w, proto_consistW=args.proto_consistW,
                  stage1_strong=args.stage1_strong)
    assert stage1 == dict(lr=1e-4, rce=True, regular_w=0.1, proto_consistW=10.0, stage1_strong=False), stage1
    # stages 2-3: --S_pseudo 1 --threshold 0.95 --distillation 1 --finetune --lr 6e-4 --bn_clr, without --rce; stage 3
    # without --no_resume (its student resumes the stage-2 model)
    distill = dict(lr=args.lr_distill, threshold=args.threshold, distillation=args.distillation,
                   bn_clr=args.bn_clr, rce=args.distill_rce, reinit_stage3=args.stage3_reinit)
    assert distill == dict(lr=6e-4, threshold=0.95, distillation=1.0, bn_clr=True, rce=False,
                           reinit_stage3=False), distill
    synthia = proda.get_args_parser().parse_args(["--source", "synthia"])
    synthia.world_size = 1
    assert proda.finalise_args(synthia).regular_w == 0.0, "the SYNTHIA stage-1 command has no --regular_w"


def weak_view_size(fx):
    h, w = fx["config"]["crop_hw"]
    return h // 4, w // 4


# ------------------------------------------------------------------------------------------------ network parity


@pytest.mark.parametrize("tag,bn_clr", [("net", False), ("net_bnclr", True)])
def test_network_matches_official_keys_and_outputs(fx, tag, bn_clr, tmp_path):
    """Keys and shapes equal the official state dict (653 / 658 with bn_pretrain); a checkpoint in the official
    format (['ResNet101']['model_state'], prototypes in 'objective_vectors') loads strictly; features and logits
    match the official model's."""
    net = proda.ProDANet(fx["config"]["num_classes"], bn_clr=bn_clr)
    shapes = {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in net.state_dict().items()}
    assert shapes == {k: (list(s), d) for k, (s, d) in fx["shapes"][tag].items()}, "state dict differs from official"
    state, protos = fill_state_dict(fx["shapes"][tag], fx["seed"]), fx["inputs"]["protos"]
    torch.save({"ResNet101": {"model_state": state, "objective_vectors": protos}, "iter": 1, "best_iou": 0.5},
               tmp_path / "released.pkl")
    args = proda.get_args_parser().parse_args([])
    args.num_classes = fx["config"]["num_classes"]
    del net
    net, loaded = proda.net_from_file(args, tmp_path / "released.pkl")
    assert net.bn_clr == bn_clr and torch.equal(loaded, protos)
    net.eval()
    with torch.no_grad():
        out = net(fx["inputs"]["x"])
    close(f"{tag}_feat", out["feat"], fx["outputs"][f"{tag}_feat"])
    close(f"{tag}_out", out["out"], fx["outputs"][f"{tag}_out"])


# ------------------------------------------------------------------------------------------------ stage 1 parity


def test_stage1_intermediates_match_official(fx):
    inp, out, args = fx["inputs"], fx["outputs"], pipeline_args(fx)
    raw = inp["raw"]
    loss, parts = proda.stage1_target_losses(raw["target_out"], raw["targetS_out"]["feat"], raw["ema_out"],
                                             fx["config"]["full_hw"], inp["target_lpsoft"], inp["weak"],
                                             inp["strong"], inp["protos"], args)
    for name in ("threshold_arg_soft", "full2weak_feat", "feat_proto_distance_weak", "proto_weight", "rectified_norm",
                 "loss_ce", "loss_rce", "loss_CTS", "teacher_dist_strong", "consist_mask", "consist_teacher",
                 "consist_student_logp", "loss_consist"):
        close(name, parts[name], out[name])
    close("pseudo_label_rectified", parts["pseudo_label_rectified"][:, None], out["pseudo_label_rectified"])
    close("loss_regular_mrkld", parts["loss_regular"], out["loss_regular_mrkld"])
    close("loss_total_stage1", loss, out["loss_total_stage1"])
    # the pieces on their own: Eq. (4) weights, rectified = weights x soft labels, the MRENT variant
    weights = proda.prototype_weights(proda.prototype_distance(parts["full2weak_feat"], inp["protos"]),
                                      args.proto_temperature)
    close("proto_weight", weights, out["proto_weight"])
    close("rectified", weights * parts["threshold_arg_soft"], out["rectified"])
    target_up = proda.upsample(raw["target_out"]["out"], weak_view_size(fx))
    close("target_out_up", target_up, out["target_out_up"])
    close("regular_mrent", proda.regulariser(target_up, "MRENT"), out["regular_mrent"])


def test_prototype_updates_match_official(fx):
    inp, out, args = fx["inputs"], fx["outputs"], pipeline_args(fx)
    full = fx["config"]["full_hw"]
    ema_feat = proda.upsample(inp["raw"]["ema_out"]["feat"], (full[0] // 4, full[1] // 4))
    ema_out = proda.upsample(inp["raw"]["ema_out"]["out"], (full[0] // 4, full[1] // 4))
    close("ema_out_up", ema_out, out["ema_out_up"])
    vectors, ids = proda.class_mean_vectors(ema_feat, ema_out, fx["config"]["num_classes"])
    assert ids.tolist() == out["mean_vector_ids"].tolist(), "class ids of the mean vectors differ"
    close("mean_vectors", vectors, out["mean_vectors"])
    moving = proda.Prototypes(inp["protos"], args.proto_momentum)
    moving.update_all(vectors, ids)  # Eq. (6), momentum 1e-4 (stage 1, start_mean=False)
    close("prototypes_after_moving_average", moving.vectors, out["prototypes_after_moving_average"])
    close("prototype_counts_after", moving.counts, out["prototype_counts_after"])
    running = proda.Prototypes(torch.zeros_like(inp["protos"]))
    running.update_all(vectors, ids, mode="mean")  # calc_prototype.py
    assert ids.tolist() == out["calc_prototype_ids"].tolist()
    close("calc_prototype_vectors", running.vectors, out["calc_prototype_vectors"])
    close("calc_prototype_counts", running.counts, out["calc_prototype_counts"])


class StandIn:
    """Returns stored network outputs as fresh leaves (the fixture's QueueNet), in call order."""

    def __init__(self, outputs):
        self.queue, self.leaves = list(outputs), []

    def __call__(self, x):
        out = {k: v.clone().requires_grad_(True) for k, v in self.queue.pop(0).items()}
        self.leaves.append(out)
        return out


def test_stage1_step_matches_official_step(fx):
    """stage1_step as the training loop runs it: losses, the source gradient, prototypes after, teacher EMA."""
    inp, out, args = fx["inputs"], fx["outputs"], pipeline_args(fx)
    raw, n = inp["raw"], fx["config"]["N"]
    (h, w), (fh, fw) = fx["config"]["crop_hw"], fx["config"]["full_hw"]
    student = StandIn([raw["source_out"], raw["target_out"], raw["targetS_out"]])
    teacher = StandIn([raw["ema_out"]])
    src = {"img": torch.zeros(n, 3, h, w), "label": inp["source_label"]}
    tgt = {"img": torch.zeros(n, 3, h, w), "img_strong": torch.zeros(n, 3, h, w),
           "img_full": torch.zeros(n, 3, fh, fw), "lpsoft": inp["target_lpsoft"], "weak_params": inp["weak"],
           "params": inp["strong"]}
    prototypes = proda.Prototypes(inp["protos"], args.proto_momentum)
    losses, (vectors, ids), _ = proda.stage1_step(student, teacher, prototypes, src, tgt, args, lambda loss: loss)
    close("step_loss", losses["loss"], out["step_loss"])
    close("step_loss_CTS", losses["loss_CTS"], out["step_loss_CTS"])
    close("step_loss_consist", losses["loss_consist"], out["step_loss_consist"])
    close("step_loss_source_seg", losses["loss_source"], out["step_loss_source_seg"])
    close("step_grad_source_out", student.leaves[0]["out"].grad, out["step_grad_source_out"])
    prototypes.update_all(vectors, ids)
    close("step_prototypes_after", prototypes.vectors, out["step_prototypes_after"])
    # teacher EMA on the fixture's toy Linear(3, 2): student params filled 1, 2; teacher 3, 4
    q, k = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    for lin, (wv, bv) in ((q, (1.0, 2.0)), (k, (3.0, 4.0))):
        lin.weight.data.fill_(wv)
        lin.bias.data.fill_(bv)
    proda.ema_update(k, q, args.ema_decay)
    close("step_ema_weight_after", k.weight.data, out["step_ema_weight_after"])
    close("step_ema_bias_after", k.bias.data, out["step_ema_bias_after"])


def test_altered_fixture_fails(fx):
    """The comparisons above do catch a difference: perturbed prototypes give other rectified labels and losses."""
    inp, args = fx["inputs"], pipeline_args(fx)
    raw = inp["raw"]
    loss, _ = proda.stage1_target_losses(raw["target_out"], raw["targetS_out"]["feat"], raw["ema_out"],
                                         fx["config"]["full_hw"], inp["target_lpsoft"], inp["weak"], inp["strong"],
                                         inp["protos"].roll(1, dims=0), args)  # prototypes of other classes
    with pytest.raises(AssertionError):
        close("loss_total_stage1", loss, fx["outputs"]["loss_total_stage1"])


def test_no_rce_is_plain_cross_entropy_in_stage1(fx):
    """--no-rce: L_CTS = CE + regular_w * MRKLD (the official step without --rce), no reverse CE."""
    inp, out = fx["inputs"], fx["outputs"]
    args = pipeline_args(fx, "1", ("--no-rce",))
    raw = inp["raw"]
    _, parts = proda.stage1_target_losses(raw["target_out"], raw["targetS_out"]["feat"], raw["ema_out"],
                                          fx["config"]["full_hw"], inp["target_lpsoft"], inp["weak"], inp["strong"],
                                          inp["protos"], args)
    assert parts["loss_rce"] is None, "--no-rce still computed the reverse CE"
    close("loss_CTS with --no-rce", parts["loss_CTS"], out["loss_ce"] + args.regular_w * out["loss_regular_mrkld"])


def test_prototype_rectification_has_one_implementation(fx, monkeypatch):
    """Stage 1 rectifies through prototype_weights (Eq. 4), the function the parity test checks on its own."""
    inp, args = fx["inputs"], pipeline_args(fx)
    calls, original = [], proda.prototype_weights
    monkeypatch.setattr(proda, "prototype_weights", lambda *a: calls.append(a) or original(*a))
    raw = inp["raw"]
    proda.stage1_target_losses(raw["target_out"], raw["targetS_out"]["feat"], raw["ema_out"], fx["config"]["full_hw"],
                               inp["target_lpsoft"], inp["weak"], inp["strong"], inp["protos"], args)
    assert len(calls) == 1, "stage 1 computes the prototype weights without prototype_weights"


def test_shared_rules_come_from_common_uda():
    """One copy each: upsampling, the segmentation CE and the GAN loss live in common/uda.py (AdaptSegNet, ProDA)."""
    assert proda.upsample is uda.upsample and proda.seg_loss is uda.seg_loss and proda.gan_loss is uda.gan_loss
    assert adaptsegnet.gan_loss is uda.gan_loss


# ------------------------------------------------------------------------------------------------ stages 2-3, warm-up


def test_pseudo_labels_match_official(fx):
    inp, out = fx["inputs"], fx["outputs"]
    prob = proda.flip_average(inp["lp_logits"], inp["lp_flip_logits"], fx["config"]["crop_hw"])
    close("pl_flip_avg_prob", prob, out["pl_flip_avg_prob"])
    labels, confidence = proda.hard_pseudo_labels(prob, 0.95)
    close("pl_confidence", confidence[:, None], out["pl_confidence"])
    close("pl_hard", prob.argmax(1, keepdim=True), out["pl_hard"])
    close("pl_thresholded_0.95", labels, out["pl_thresholded_0.95"])
    close("pl_soft", F.softmax(inp["lp_logits"], dim=1), out["pl_soft"])


@pytest.mark.parametrize("kd", ["official", "fixed"])
def test_distillation_matches_official(fx, kd):
    inp, out = fx["inputs"], fx["outputs"]
    args = pipeline_args(fx, "2", () if kd == "official" else ("--kd", kd))  # README stage-2 command (no --rce)
    n, (h, w) = fx["config"]["N"], fx["config"]["crop_hw"]
    student = StandIn([inp["raw"]["source_out"], inp["raw"]["targetS_out"]])
    teacher = StandIn([inp["teacher_raw"]])
    src = {"img": torch.zeros(n, 3, h, w), "label": inp["source_label"]}
    tgt = {"img_strong": torch.zeros(n, 3, h, w), "lp": out["pl_thresholded_0.95"], "params": inp["strong"]}
    labels = proda.replay_strong(F.interpolate(tgt["lp"][:, None].float(), scale_factor=0.25), inp["strong"]).long()
    close("distill_labels_strong", labels, out["distill_labels_strong"])
    losses = proda.distill_step(student, teacher, src, tgt, args, lambda loss: loss)
    if kd == "official":  # probabilities as kl_div input: sum t (log t - s), negative here
        close("distill_kd", losses["loss_kd"], out["distill_kd"])
        close("distill_loss", losses["loss"], out["distill_loss"])
    else:  # the true KL(teacher || student) is non-negative and the CE is unchanged
        assert losses["loss_kd"] >= 0
        close("distill_ce", losses["loss"] - losses["loss_kd"], out["distill_ce"])


def test_distill_rce_is_the_symmetric_cross_entropy(fx):
    """--distill_rce (the official --rce in step_distillation): rce_alpha * CE + rce_beta * RCE on the same labels."""
    inp, out = fx["inputs"], fx["outputs"]
    args = pipeline_args(fx, "2", ("--distill_rce",))
    n, (h, w) = fx["config"]["N"], fx["config"]["crop_hw"]
    student = StandIn([inp["raw"]["source_out"], inp["raw"]["targetS_out"]])
    tgt = {"img_strong": torch.zeros(n, 3, h, w), "lp": out["pl_thresholded_0.95"], "params": inp["strong"]}
    losses = proda.distill_step(student, StandIn([inp["teacher_raw"]]),
                                {"img": torch.zeros(n, 3, h, w), "label": inp["source_label"]}, tgt, args,
                                lambda loss: loss)
    student_up = proda.upsample(inp["raw"]["targetS_out"]["out"], out["distill_labels_strong"].shape[2:])
    rce = proda.reverse_cross_entropy(student_up, out["distill_labels_strong"][:, 0], args.num_classes)
    close("distill CE with --distill_rce", losses["loss"] - losses["loss_kd"],
          args.rce_alpha * out["distill_ce"] + args.rce_beta * rce)


def test_warmup_step_matches_official(fx):
    inp, out = fx["inputs"], fx["outputs"]
    disc = proda.FCDiscriminator(fx["config"]["num_classes"])
    disc.load_state_dict(fill_state_dict(fx["shapes"]["warmup_FCDiscriminator"], fx["seed"]), strict=True)
    args = pipeline_args(fx, "warmup")
    n, (h, w) = fx["config"]["N"], fx["config"]["crop_hw"]
    student = StandIn([inp["raw"]["source_out"], inp["raw"]["target_out"]])
    src = {"img": torch.zeros(n, 3, h, w), "label": inp["source_label"]}
    losses = proda.warmup_step(student, disc, src, {"img": torch.zeros(n, 3, h, w)}, args, lambda loss: loss)
    close("warmup_loss_seg", losses["loss_source"], out["warmup_loss_seg"])
    close("warmup_loss_adv_G", losses["loss_adv"], out["warmup_loss_adv_G"])
    close("warmup_loss_D", losses["loss_D"], out["warmup_loss_D"])
    _, d_out = proda.adversarial_loss(proda.upsample(inp["raw"]["target_out"]["out"], (h, w)), disc, args.adv)
    close("warmup_D_out_target", d_out, out["warmup_D_out_target"])
    assert all(p.grad is not None for p in disc.parameters()), "D got no gradient from its own loss"


# ------------------------------------------------------------------------------------------------ units


def test_replay_matches_image_geometry():
    """replay_strong (exact) moves a label map as PIL moves the image; the official TranslateX replay does not."""
    rng = np.random.default_rng(0)
    label = np.kron(rng.integers(1, 19, (8, 16)), np.ones((8, 8))).astype(np.uint8)  # 64 x 128, 2:1 like a crop
    pil = Image.fromarray(label)
    mapped = torch.from_numpy(label.astype(np.float32))[None, None]
    cases = {"TranslateX": (12, (1, 0, 12, 0, 1, 0)), "TranslateY": (9, (1, 0, 0, 0, 1, 9)),
             "ShearX": (-0.2, (1, -0.2, 0, 0, 1, 0))}
    for kind, (v, coeffs) in cases.items():
        moved = np.asarray(pil.transform(pil.size, Image.AFFINE, coeffs, resample=Image.NEAREST, fillcolor=0))
        exact = proda.affine_sample(mapped, v, kind, exact=True)[0, 0].numpy()
        assert (exact == moved).mean() > 0.97, f"{kind}: replay disagrees with the image op"
    official = proda.affine_sample(mapped, 12, "TranslateX")[0, 0].numpy()
    moved_twice = np.asarray(pil.transform(pil.size, Image.AFFINE, (1, 0, 24, 0, 1, 0), resample=Image.NEAREST))
    assert (official == moved_twice).mean() > 0.99, "official TranslateX replay shifts by W/H x the image's shift"


def test_weak_augmentation_record_maps_full_image_into_weak_view():
    """full2weak on a full-image map (at 1/4) reproduces the weak view's map from the recorded parameters."""
    torch.manual_seed(0)
    h, w = 64, 128
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    smooth = torch.stack([xx, yy, xx * yy])  # [3, H, W] smooth map, also used as the image
    img = Image.fromarray((smooth.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    proda.random.seed(3)
    weak, _, _, lpsoft, params = proda.weak_augment(img, Image.new("L", (w, h)), lpsoft=smooth, resize=160,
                                                    crop=(64, 32))
    collated = {"RandomSized": [torch.tensor([params["RandomSized"][0]]), torch.tensor([params["RandomSized"][1]])],
                "RandomCrop": [torch.tensor([v]) for v in params["RandomCrop"]],
                "RandomHorizontallyFlip": torch.tensor([params["RandomHorizontallyFlip"]])}
    full_quarter = proda.upsample(smooth[None], (h // 4, w // 4))
    mapped = proda.full2weak(full_quarter, collated)[0]
    expected = proda.upsample(lpsoft[None], mapped.shape[1:])[0]
    assert mapped.shape[1:] == (8, 16)
    assert (mapped - expected).abs().max() < 0.08, "weak-view map and full2weak(full map) disagree"
    assert weak.size == (64, 32)


def test_strong_augmentation_record_layout():
    """The strong view's record has the official keys and collates to the fixture's layout."""
    proda.random.seed(0)
    np.random.seed(0)
    img = Image.fromarray(np.random.randint(0, 255, (32, 64, 3), dtype=np.uint8))
    records = [proda.strong_augment(img)[1] for _ in range(2)]
    batch = torch.utils.data.default_collate(records)
    assert list(batch) == ["Hflip", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "CutoutAbs"]
    assert isinstance(batch["CutoutAbs"], list) and len(batch["CutoutAbs"]) == 4
    maps = proda.replay_strong(torch.rand(2, 19, 8, 16), batch)
    assert (maps == proda.IGNORE).any(), "cutout must pad the replayed map"


def test_reverse_cross_entropy_by_hand():
    logits = torch.tensor([[[[2.0]], [[0.0]], [[-1.0]]]])  # [1, 3, 1, 1]
    p = torch.softmax(logits[0, :, 0, 0], 0)
    expected = -(p[1] * 0 + (p[0] + p[2]) * np.log(1e-4))  # label 1: log 1 for it, log 1e-4 for the others
    got = proda.reverse_cross_entropy(logits, torch.tensor([[[1]]]), 3)
    assert abs(got.item() - expected.item()) < 1e-5
    assert proda.reverse_cross_entropy(logits, torch.tensor([[[proda.IGNORE]]]), 3).item() == 0


def test_overfit_one_batch(one_thread):
    """A small ProDANet fits one source batch: the CE falls by at least 5x."""
    torch.manual_seed(0)
    net = proda.ProDANet(4, layers=(1, 1, 1, 1), width=8, feat_dim=32)
    x = torch.rand(2, 3, 32, 48)
    y = (torch.arange(48)[None, None, :] // 12).expand(2, 32, 48).clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(40):
        loss = uda.seg_loss(uda.upsample(net(x)["out"], (32, 48)), y, proda.IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"


# ------------------------------------------------------------------------------------------------ the script


def write_tiny_data(root, images=4):
    """Tiny synthetic GTA5 + Cityscapes in the real layouts (common/synthetic.py), 64x32 images."""
    synthetic.write(root, only=("gta5", "cityscapes"), images=images, size=(64, 32))


TINY = ["--layers", "1", "1", "1", "1", "--width", "8", "--feat_dim", "32", "--src_size", "64", "32", "--tgt_size",
        "64", "32", "--resize", "64", "--rcrop", "32,16", "--batch_size", "2", "--num_workers", "0", "--threads", "1",
        "--proto_epochs", "1", "--print_interval", "1", "--device", "cpu"]


def run_script(*args):
    result = subprocess.run([sys.executable, str(ROOT / "proda.py"), *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    return result


def test_whole_pipeline_then_eval(tmp_path):
    """As a user: the default pipeline (warm-up, pseudo labels, prototypes, stages 1-3) on tiny data, each stage two
    iterations with a checkpoint, then --eval from stage 3's checkpoint."""
    write_tiny_data(tmp_path / "data")
    out = tmp_path / "out"
    result = run_script("--data_root", str(tmp_path / "data"), "--output_dir", str(out), "--train_iters", "2",
                        "--val_interval", "2", "--viz", "--viz_count", "1", *TINY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("warmup", "stage1", "stage2", "stage3"):
        report = json.loads((out / stage / "eval.json").read_text())
        assert 0 <= report["mIoU"] <= 100 and len(report["per_class"]) == 19, f"{stage}: {report}"
        assert (out / stage / "checkpoint.pth").is_file()
    n_train = len(list((tmp_path / "data" / "cityscapes" / "leftImg8bit" / "train").rglob("*.png")))
    assert len(list((out / "warmup" / "pseudo_soft").glob("*.npy"))) == n_train
    assert (out / "warmup" / "prototypes.pth").is_file()
    assert len(list((out / "stage1" / "pseudo_labels").glob("*_conf.npy"))) == n_train
    assert list((out / "stage1" / "viz").glob("pseudo_rectified_*.png")), "stage 1 --viz wrote no rectification figure"
    result = run_script("--data_root", str(tmp_path / "data"), "--output_dir", str(tmp_path / "eval"), "--eval",
                        "--resume", str(out / "stage3" / "checkpoint.pth"), *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["mIoU"] == pytest.approx(
        json.loads((out / "stage3" / "eval.json").read_text())["mIoU"])


def test_stage_started_alone_names_the_missing_inputs(tmp_path):
    write_tiny_data(tmp_path / "data", images=2)
    result = run_script("--data_root", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--stage", "1",
                        *TINY)
    assert result.returncode != 0
    assert "warm-up model" in result.stderr and "--stage warmup" in result.stderr, result.stderr[-2000:]


def tiny_args(out_dir, *flags):
    args = proda.get_args_parser().parse_args(["--layers", "1", "1", "1", "1", "--width", "8", "--feat_dim", "32",
                                               "--output_dir", str(out_dir), *flags])
    args.world_size, args.device = 1, "cpu"
    return proda.finalise_args(args)


def save_model(net, path):
    """A model file in the official format, as each stage writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"ResNet101": {"model_state": net.state_dict(), "objective_vectors": None}, "iter": 1, "best_iou": 0},
               path)


NO_IMAGES = {"target_train": SimpleNamespace(names=[])}  # stage_inputs only lists the pseudo-label files it needs


@pytest.mark.parametrize("reinit", [False, True])
def test_stage3_student_starts_from_the_stage2_model(tmp_path, reinit):
    """README stage-3 command (no --no_resume): the student resumes the stage-2 model, which is also the teacher;
    --stage3_reinit starts it from the initialisation instead, as stage 2."""
    args = tiny_args(tmp_path, *(["--stage3_reinit"] if reinit else []))
    torch.manual_seed(0)
    stage2 = proda.build_net(args, bn_clr=True)
    save_model(stage2, proda.model_file(args, "2"))
    (proda.stage_dir(args, "2") / "pseudo_labels").mkdir()
    inputs = proda.stage_inputs("3", args, NO_IMAGES, first=False)
    expected = stage2.state_dict()
    for name, net in (("teacher", inputs["teacher"]), ("student", inputs["net"])):
        state = net.state_dict()
        same = state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
        assert same != (reinit and name == "student"), f"stage-3 {name} (--stage3_reinit {reinit})"
    assert inputs["net"] is not inputs["teacher"]


def test_stage_started_without_the_previous_outputs_is_one_error(tmp_path):
    args = tiny_args(tmp_path)
    with pytest.raises(SystemExit, match=r"stage 3 needs the stage-2 model at .*stage2.*--stage 2"):
        proda.stage_inputs("3", args, NO_IMAGES, first=False)
    save_model(proda.build_net(args), proda.model_file(args, "warmup"))
    with pytest.raises(SystemExit, match=r"initial prototypes at .*prototypes.pth.*--stage warmup"):
        proda.stage_inputs("1", args, NO_IMAGES, first=False)
    torch.save({"prototypes": torch.zeros(19, 64), "counts": torch.zeros(19)}, tmp_path / "warmup" / "prototypes.pth")
    with pytest.raises(SystemExit, match=r"prototypes.pth: prototypes of shape \(19, 64\), expected \(19, 32\)"):
        proda.stage_inputs("1", args, NO_IMAGES, first=False)


def test_model_of_another_architecture_is_one_error(tmp_path):
    """A model file (--resume_path, a previous stage's model) from another width or class count: a SystemExit that
    names the file and the flags it expected, not a traceback."""
    args = tiny_args(tmp_path)
    save_model(proda.ProDANet(19, layers=(1, 1, 1, 1), width=16, feat_dim=32), tmp_path / "wide.pkl")
    with pytest.raises(SystemExit, match=r"wide.pkl does not fit ProDANet: shape mismatch.*Expected a 19-class ProDA "
                                         r"network with --layers 1 1 1 1 --width 8 --feat_dim 32"):
        proda.net_from_file(args, tmp_path / "wide.pkl")
    save_model(proda.ProDANet(16, layers=(1, 1, 1, 1), width=8, feat_dim=32), tmp_path / "synthia.pkl")
    with pytest.raises(SystemExit, match=r"synthia.pkl does not fit.*layer5.head.1.weight: checkpoint \(16,"):
        proda.net_from_file(args, tmp_path / "synthia.pkl")


def test_init_of_another_architecture_is_one_error(tmp_path, capsys):
    """--pretrained / --student_init load by key intersection (official), but the trunk must be the network's: a
    deeper or narrower ResNet, or a partial one, is one error naming the file and the depth and width expected."""
    args = tiny_args(tmp_path)
    net = proda.build_net(args)
    trunk = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("layer5.")}  # conv1 .. layer4
    torch.save({"state_dict": {**trunk, "fc.weight": torch.zeros(1000, 256), "head.projection.weight": torch.zeros(3)}},
               tmp_path / "ssl.pth")
    _, unexpected = proda.load_init(net, tmp_path / "ssl.pth", "stage 2 initialisation")
    assert set(unexpected) == {"fc.weight", "head.projection.weight"}
    assert "fc.weight" in capsys.readouterr().out, "unexpected keys must be reported"
    deeper = proda.ProDANet(19, layers=(1, 1, 2, 1), width=8, feat_dim=32).state_dict()
    torch.save(deeper, tmp_path / "deeper.pth")
    with pytest.raises(SystemExit, match=r"deeper.pth \(stage 2 initialisation\): another architecture. Expected a "
                                         r"ResNet trunk with blocks 1 1 1 1, width 8 .* found blocks 1 1 2 1, width 8"):
        proda.load_init(net, tmp_path / "deeper.pth", "stage 2 initialisation")
    torch.save({k: v for k, v in trunk.items() if not k.startswith("layer4.")}, tmp_path / "partial.pth")
    with pytest.raises(SystemExit, match=r"partial.pth .*trunk keys missing: \['layer4.0.conv1.weight'"):
        proda.load_init(net, tmp_path / "partial.pth", "stage 2 initialisation")
    torch.save(proda.ProDANet(19, layers=(1, 1, 1, 1), width=16, feat_dim=32).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(SystemExit, match=r"wide.pth .*found blocks 1 1 1 1, width 16; shapes differ"):
        proda.load_init(net, tmp_path / "wide.pth", "stage 2 initialisation")
    torch.save({"state_dict": {"net.0.weight": torch.zeros(3)}}, tmp_path / "foreign.pth")
    with pytest.raises(SystemExit, match="no key matches"):
        proda.load_init(net, tmp_path / "foreign.pth", "stage 2 initialisation")


def test_target_image_of_another_aspect_ratio_is_one_error(tmp_path):
    Image.new("RGB", (50, 50)).save(tmp_path / "square.png")
    with pytest.raises(SystemExit, match="aspect ratio"):
        proda.read_target_image(tmp_path / "square.png", (64, 32))


# ------------------------------------------------------------------------------------------------ faults and resume

FORK = multiprocessing.get_context("fork")
RUN_ITERS = 3  # per stage; 4 stages, so 12 optimizer steps in all
PICK = random.Random()  # where to kill: its own generator, since the runs in this process reseed `random`


def run_flags(data, out, *extra):
    """The whole pipeline (warm-up, soft pseudo labels, prototypes, stage 1, hard pseudo labels, stages 2 and 3), 3
    iterations a stage on 4 images in batches of 2 (so a resume can land mid-pass), validation every 2 iterations,
    a checkpoint after every iteration, --deterministic."""
    return ["--data_root", str(data), "--output_dir", str(out), "--train_iters", str(RUN_ITERS), "--val_interval",
            "2", "--checkpoint_every", "1", "--deterministic", *TINY, *extra]


def _child(flags, plan, record, counts):
    """proda.main in a forked process on one thread. `plan` = (what, n): SIGKILL before the n-th SGD step of the
    pipeline ("kill_step"), while writing the n-th file through torch.save (checkpoints, models, prototypes:
    "kill_in_save") or right after it ("kill_after_save"), while writing the n-th pseudo-label array
    ("kill_in_labels"); one or two SIGTERMs before the n-th SGD step ("term_step", "term_twice_step"). Every training
    sample read is appended to `record` as "dataset index seed"; the numbers of steps, saves and label arrays go to
    `counts` at the end."""
    torch.set_num_threads(1)
    what, n = plan or ("", 0)
    done = {"steps": 0, "saves": 0, "labels": 0}

    def before_step(optimizer, args, kwargs):
        if not isinstance(optimizer, torch.optim.SGD):  # the warm-up's discriminator has an Adam of its own
            return
        done["steps"] += 1
        if done["steps"] == n and what == "kill_step":
            os.kill(os.getpid(), signal.SIGKILL)
        if done["steps"] == n and what.startswith("term"):
            for _ in range(2 if what == "term_twice_step" else 1):
                os.kill(os.getpid(), signal.SIGTERM)

    register_optimizer_step_pre_hook(before_step)
    save, replace, np_save, getitem = torch.save, os.replace, np.save, training.SeededDataset.__getitem__

    def dying_save(obj, f):
        done["saves"] += 1
        save(obj, f)
        if done["saves"] == n and what == "kill_in_save":
            Path(f).write_bytes(Path(f).read_bytes()[:1000])  # a half-written file, then death
            os.kill(os.getpid(), signal.SIGKILL)

    def replace_then_die(src, dst):
        replace(src, dst)
        if done["saves"] == n and what == "kill_after_save":
            os.kill(os.getpid(), signal.SIGKILL)

    def dying_np_save(f, array, *a, **k):
        done["labels"] += 1
        np_save(f, array, *a, **k)
        if done["labels"] == n and what == "kill_in_labels":
            os.kill(os.getpid(), signal.SIGKILL)

    def recorded(self, key):
        with open(record, "a") as f:
            f.write(f"{type(self.dataset).__name__} {key[0]} {key[1]}\n")
        return getitem(self, key)

    torch.save, os.replace, np.save, training.SeededDataset.__getitem__ = (dying_save, replace_then_die,
                                                                          dying_np_save, recorded)
    proda.main(proda.get_args_parser().parse_args(flags))
    Path(counts).write_text(json.dumps(done))


def run_forked(flags, plan=None, record=os.devnull, counts=os.devnull, timeout=300):
    """The forked run's exit code (polled: a killed run's data-loader worker can keep a join waiting)."""
    process = FORK.Process(target=_child, args=(flags, plan, record, counts))
    process.start()
    deadline = time.time() + timeout
    while process.exitcode is None and time.time() < deadline:
        time.sleep(0.02)
    assert process.exitcode is not None, f"the run did not end within {timeout} s"
    return process.exitcode


def run_outputs(out):
    """Everything a run wrote but its logs, the args in its checkpoints (which name --resume) and the temporary files
    that a SIGKILL during an atomic write leaves behind: .pth / .pkl loaded, every other file as bytes."""
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_dir() or path.name == "log.txt" or re.fullmatch(r"\..*\.tmp\d+", path.name):
            continue
        name = str(path.relative_to(out))
        if path.suffix in (".pth", ".pkl"):
            files[name] = torch.load(path, weights_only=True)
            if path.name == "checkpoint.pth":
                files[name].pop("args")
        else:
            files[name] = path.read_bytes()
    return files


def steps_done(checkpoint):
    """Optimizer steps of the whole pipeline before `checkpoint` (a stage's checkpoint.pth, loaded)."""
    return proda.STAGES.index(checkpoint["stage"]) * RUN_ITERS + checkpoint["iteration"]


def latest_checkpoint(out):
    """The checkpoint a stopped pipeline continues from: the latest stage's."""
    found = [out / d / "checkpoint.pth" for d in ("warmup", "stage1", "stage2", "stage3")
             if (out / d / "checkpoint.pth").is_file()]
    return found[-1] if found else None


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted pipeline: its data, outputs, the samples it read and how many steps / saves / label arrays
    it made."""
    root = tmp_path_factory.mktemp("uninterrupted")
    write_tiny_data(root / "data")
    out, record, counts = root / "out", root / "samples.txt", root / "counts.json"
    assert run_forked(run_flags(root / "data", out), record=record, counts=counts) == 0
    done = json.loads(counts.read_text())
    assert done["steps"] == 4 * RUN_ITERS, done
    return root / "data", run_outputs(out), record.read_text().splitlines(), done


def resume_and_compare(uninterrupted, out, *extra):
    """Continue from the latest checkpoint (or start again when none was written) and compare with the uninterrupted
    run: every stage's checkpoint (weights, optimizer, discriminator, EMA teacher, prototypes, RNG states), models,
    prototypes, pseudo labels and eval.json, and the samples (index and augmentation seed) read after the
    checkpoint."""
    data, expected, samples, _ = uninterrupted
    checkpoint = latest_checkpoint(out)
    done = steps_done(torch.load(checkpoint, weights_only=True)) if checkpoint else 0  # ours load without pickles
    record = out.parent / f"{out.name}_resumed.txt"
    assert run_forked(run_flags(data, out, *extra, *(["--resume", str(checkpoint)] if checkpoint else [])),
                      record=record) == 0
    resumed = record.read_text().splitlines() if record.exists() else []
    if "--num_workers" not in extra:  # a worker reads ahead of the training loop
        assert len(resumed) == 4 * (4 * RUN_ITERS - done), f"resumed after step {done}: read {len(resumed)} samples"
        assert resumed == samples[len(samples) - len(resumed):], f"resumed after step {done}: another data order"
    assert_same(run_outputs(out), expected, f"resumed after step {done}")


@pytest.mark.parametrize("what", ["kill_step", "kill_in_save", "kill_after_save", "kill_in_labels"])
def test_sigkill_at_a_random_point_then_resume_is_the_same_run(uninterrupted, tmp_path, what):
    """SIGKILL before a random optimizer step of any stage, while writing a random checkpoint / model / prototype
    file (a half-written temporary file is left), right after writing one, or while writing the pseudo labels
    between stages; the resumed pipeline ends bit for bit where the uninterrupted one ended."""
    counts = uninterrupted[3]
    n = PICK.randint(1, {"kill_step": counts["steps"], "kill_in_save": counts["saves"],
                         "kill_after_save": counts["saves"], "kill_in_labels": counts["labels"]}[what])
    out = tmp_path / "out"
    assert run_forked(run_flags(uninterrupted[0], out), plan=(what, n)) == -signal.SIGKILL, f"{what} {n}"
    resume_and_compare(uninterrupted, out)


def test_resume_with_a_data_loader_worker_is_the_same_run(uninterrupted, tmp_path):
    """Killed and resumed with a data-loader worker: the same run as the uninterrupted one without (every sample's
    augmentation comes from its own seed, whichever process loads it)."""
    n = PICK.randint(1, uninterrupted[3]["steps"])
    out = tmp_path / "out"
    assert run_forked(run_flags(uninterrupted[0], out, "--num_workers", "1"), plan=("kill_step", n)) == \
        -signal.SIGKILL
    resume_and_compare(uninterrupted, out, "--num_workers", "1")


def test_sigterm_saves_at_the_step_boundary_and_exits_cleanly(uninterrupted, tmp_path, capfd):
    n = PICK.randint(1, uninterrupted[3]["steps"])
    out = tmp_path / "out"
    assert run_forked(run_flags(uninterrupted[0], out), plan=("term_step", n)) == 128 + signal.SIGTERM
    output = capfd.readouterr()
    checkpoint = latest_checkpoint(out)
    assert f"stopped by SIGTERM: checkpoint saved to {checkpoint}; continue with --resume {checkpoint}" in output.out
    assert "Traceback" not in output.err
    assert steps_done(torch.load(checkpoint, weights_only=True)) == n, f"SIGTERM before step {n}: saved elsewhere"
    resume_and_compare(uninterrupted, out)


def test_a_second_sigterm_stops_at_once_without_a_checkpoint(uninterrupted, tmp_path, capfd):
    out = tmp_path / "out"
    assert run_forked(run_flags(uninterrupted[0], out), plan=("term_twice_step", 1)) == 128 + signal.SIGTERM
    assert "SIGTERM again: exiting now, without a checkpoint" in capfd.readouterr().err
    assert latest_checkpoint(out) is None


def test_same_seed_same_outputs_and_eval_json(uninterrupted, tmp_path):
    """Two runs with the same seed: every stage's eval.json, models, prototypes and pseudo labels are identical."""
    out = tmp_path / "again"
    assert run_forked(run_flags(uninterrupted[0], out)) == 0
    again = run_outputs(out)
    for stage in ("warmup", "stage1", "stage2", "stage3"):
        assert again[f"{stage}/eval.json"] == uninterrupted[1][f"{stage}/eval.json"], f"{stage}/eval.json differs"
    assert_same(again, uninterrupted[1], "second run")


def test_non_finite_loss_stops_with_iteration_terms_and_last_checkpoint(tmp_path, monkeypatch, one_thread):
    """A NaN in stage 1's second iteration: the run stops before the optimizer step, naming the stage and iteration,
    every loss term and the last good checkpoint (stage 1's after its first iteration)."""
    write_tiny_data(tmp_path / "data", images=2)
    original, calls = proda.stage1_target_losses, [0]

    def diverging(*a, **k):
        loss, parts = original(*a, **k)
        calls[0] += 1
        return (loss * float("nan"), parts) if calls[0] == 2 else (loss, parts)

    monkeypatch.setattr(proda, "stage1_target_losses", diverging)
    out = tmp_path / "out"
    flags = [f for f in run_flags(tmp_path / "data", out, "--stage", "warmup", "1") if f != "--deterministic"]
    with pytest.raises(SystemExit, match=r"non-finite loss at stage 1, iteration 2: loss_source [^,]+, loss nan, "
                                         r"loss_CTS [^,]+, loss_consist [^,]+; stopping \(the last good checkpoint "
                                         r"is .*stage1/checkpoint.pth\)"):
        proda.main(proda.get_args_parser().parse_args(flags))
    assert torch.load(out / "stage1" / "checkpoint.pth", weights_only=True)["iteration"] == 1


def test_resume_of_another_script_size_or_number_of_classes_is_one_clear_error(uninterrupted, tmp_path, one_thread):
    data, expected = uninterrupted[0], uninterrupted[1]
    path = tmp_path / "checkpoint.pth"
    state = expected["stage1/checkpoint.pth"]
    torch.save(state, path)
    flags = ["--data_root", str(data), "--output_dir", str(tmp_path / "out"), *TINY, "--resume", str(path)]

    def refused(pattern, *extra):
        with pytest.raises(SystemExit, match=pattern):
            proda.main(proda.get_args_parser().parse_args([*flags, *extra]))

    refused(r"checkpoint of script proda.py, source gta5, num_classes 19, layers \[1, 1, 1, 1\], width 8, feat_dim "
            r"32; expected .*width 16.*\(differs in width\)", "--width", "16")
    refused(r"num_classes 19.*expected .*num_classes 16.*\(differs in num_classes\)", "--num_classes", "16")
    torch.save(dict(state, identity=dict(state["identity"], script="advent.py")), path)
    refused(r"checkpoint of script advent.py.*expected script proda.py")
    torch.save({"model": state["model"], "iteration": 5}, path)  # another script's checkpoint without an identity
    refused(r"expected a proda.py checkpoint \(OUTPUT_DIR/<stage>/checkpoint.pth.*found \['model', 'iteration'\]")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.pth")), "a refused run wrote"


def test_target_bn_only_adds_the_target_statistics_and_nothing_else(one_thread):
    """--adv 0 --target_bn_only (the demo's control): the same gradients as source-only, and BatchNorm's running
    statistics that took in the target batch as well; without --adv 0 it is refused."""
    args = tiny_args("unused", "--adv", "0")
    args.stage_name, args.amp = "warmup", False
    src = {"img": torch.rand(2, 3, 16, 32), "label": torch.randint(0, 19, (2, 16, 32))}
    tgt = {"img": torch.rand(2, 3, 16, 32) + 1}
    nets = []
    for bn_only in (False, True):
        args.target_bn_only = bn_only
        torch.manual_seed(0)
        net = proda.build_net(args).train()
        losses = proda.warmup_step(net, None, src, tgt, args, lambda loss: loss)
        nets.append(net)
        assert set(losses) == {"loss_source"}
    (plain, control) = nets
    for (name, a), b in zip(plain.named_parameters(), control.parameters()):
        assert torch.equal(a.grad, b.grad), f"{name}: --target_bn_only changed a gradient"
    assert not torch.equal(plain.bn1.running_mean, control.bn1.running_mean), "the target batch left BN untouched"
    assert torch.equal(plain.bn1.weight, control.bn1.weight)
    with pytest.raises(SystemExit, match="--target_bn_only .* needs --adv 0"):
        tiny_args("unused", "--target_bn_only")


def test_oracle_source_is_cityscapes_train_with_labels(tmp_path):
    """--source cityscapes (the demo's oracle): the warm-up's source set is Cityscapes train with its labels, at
    --tgt_size unless --src_size is given."""
    write_tiny_data(tmp_path, images=2)
    args = tiny_args(tmp_path / "out", "--source", "cityscapes", "--data_root", str(tmp_path), "--tgt_size", "64",
                     "32")
    assert args.src_size == [64, 32] and args.num_classes == 19
    data = proda.build_data(args)
    train = segmentation.Cityscapes(tmp_path / "cityscapes", "train", ignore_index=proda.IGNORE)
    assert data["source"].image_paths == train.image_paths and data["source"].label_paths == train.label_paths
    assert data["source"].label_paths is not None


def make_demo_init(data, init):
    """A stand-in for `make demo-init`: the DA demos' DeepLab-v2 (width 16) in advent.py's checkpoint format, with
    the fingerprint of the GTA5 files (demos/uda_lib.sh data_fingerprint)."""
    init.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({"model": DeepLabV2(19, layers=(1, 1, 1, 1), width=16).state_dict()}, init / "checkpoint.pth")
    digest = hashlib.sha256()
    for path in sorted(p for p in (data / "gta5").rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(data / "gta5")).encode() + b"\0" + path.read_bytes())
    (init / "data.sha256").write_text(digest.hexdigest() + "\n")


def test_demo_rows_gap_and_figure(tmp_path):
    """demos/proda.sh at a tiny budget (one seed, 2 iterations for the head on the source and the warm-up, 1 per
    stage): the row names in demo.json, every row (and the stage-2 student) from the same initial weights, which hold
    the shared initial model's trunk (loaded by key intersection, count printed), the gap-closed table and the
    figure; without the shared initial model, one error naming it."""
    data = tmp_path / "data"
    write_tiny_data(data)
    env = {**os.environ, "PY": sys.executable, "DATA": str(data), "OUT": str(tmp_path / "out"), "SEEDS": "0",
           "INIT": str(tmp_path / "init"), "INIT_ITERS": "2", "WARMUP_ITERS": "2", "STAGE_ITERS": "1",
           "OMP_NUM_THREADS": "1"}
    demo = ["bash", str(ROOT / "demos" / "proda.sh")]
    result = subprocess.run(demo, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "checkpoint.pth: no initial model" in result.stderr, result.stderr[-2000:]
    make_demo_init(data, tmp_path / "init")
    result = subprocess.run(demo, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "demo.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["source-only", "target BN statistics only", "warm-up", "stage 1",
                                               "stage 2", "stage 3", "oracle"]
    assert all(len(row["values"]) == 1 and 0 <= row["values"][0] <= 100 for row in rows)
    assert "warmup initialisation: 102 tensors from" in (tmp_path / "out" / "init.log").read_text(), \
        "the initial model's trunk was not loaded"
    start = tmp_path / "out" / "init" / "warmup" / "from_gta5_to_cityscapes_on_deeplabv2_last_model.pkl"
    for log in ("source_only", "target_bn", "warmup", "oracle"):
        text = (tmp_path / "out" / "s0" / f"{log}.log").read_text()
        assert f"resume_path={start}" in text, f"{log}: the row does not start from the initial weights"
    assert f"stage 2 initialisation: 131 tensors from {start}" in (tmp_path / "out" / "s0" / "stage2.log").read_text()
    assert "| oracle |" in (tmp_path / "out" / "gap.md").read_text()
    assert Image.open(tmp_path / "out" / "proda.png").width > 0


# ------------------------------------------------------------------------------------------------ torchrun


def write_unit_scale_backbone(path):
    """A trunk checkpoint for TINY's network with torchvision's ResNet init (kaiming, fan_out): unit-scale features,
    as ImageNet weights give. The paper's N(0, 0.01) init with BatchNorm on running statistics leaves layer4's
    features near 1e-5, where the head's GroupNorm divides rounding noise by its epsilon."""
    torch.manual_seed(0)
    net = proda.ProDANet(19, layers=(1, 1, 1, 1), width=8, feat_dim=32)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    torch.save({k: v for k, v in net.state_dict().items() if k.startswith(proda.TRUNK)}, path)


def test_torchrun_two_processes_match_one_process(tmp_path):
    """torchrun --nproc_per_node 2 on CPU (gloo), one image per process, against one process with two images per
    step (--batch_size is the total in both): the warm-up, whose adversarial step has a discriminator outside DDP.
    What makes the two runs the same computation: BatchNorm on running statistics (--freeze_bn, the official flag;
    in train mode each process would normalise with its own image's statistics), no head dropout (--droprate 0;
    each process draws its own masks), source labels without ignored pixels (the CE is a mean over a batch's valid
    pixels, which is the mean of the per-image means only when every crop has as many), and the sampler dealing one
    permutation out (process r reads the sample, with its augmentation seed, that the single process reads at
    position r of the batch). The losses and mIoU logged at every iteration agree to 1e-5 relative (the gradient
    sums are ordered differently); only rank 0 writes (one log line per iteration, one progress output, the same
    files); the soft pseudo labels (each process writes its share) and the prototypes (gathered) agree too."""
    data = tmp_path / "data"
    write_tiny_data(data)
    gta5 = segmentation.GTA5(data / "gta5", ignore_index=proda.IGNORE)
    for path in gta5.label_paths:  # pixels of ignored ids become road (id 7)
        ids = np.asarray(Image.open(path))
        valid = segmentation.map_ids(ids, gta5.lut, proda.IGNORE) != proda.IGNORE
        Image.fromarray(np.where(valid, ids, 7).astype(np.uint8)).save(path)
    write_unit_scale_backbone(tmp_path / "backbone.pth")
    flags = ["--data_root", str(data), *TINY, "--stage", "warmup", "--train_iters", "3", "--val_interval", "1",
             "--freeze_bn", "--droprate", "0", "--pretrained", str(tmp_path / "backbone.pth"), "--lr_warmup", "0.01"]
    single, double = tmp_path / "single", tmp_path / "double"
    env = {"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "proda.py"), *flags, "--output_dir", str(double)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert run_forked([*flags, "--output_dir", str(single)]) == 0
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-3000:]
    logs = [[json.loads(line) for line in (out / "warmup" / "log.txt").read_text().splitlines()]
            for out in (single, double)]
    assert [r["iteration"] for r in logs[1]] == [1, 2, 3], "one log line per iteration: rank 0 alone writes"
    assert logs[0][-1]["loss_source"] < 0.99 * logs[0][0]["loss_source"], "the losses must move for the comparison"
    for one, two in zip(*logs):
        for key in ("loss_source", "loss_adv", "loss_D", "mIoU", "lr"):
            assert two[key] == pytest.approx(one[key], rel=1e-5), f"iteration {one['iteration']} {key}"
    files = [sorted(str(p.relative_to(out)) for p in out.rglob("*")) for out in (single, double)]
    assert files[1] == files[0], "the same files (no temporary or per-rank leftovers)"
    assert output.count("==> stage warmup") == 1, "only rank 0 prints"
    for name in files[0]:
        if name.endswith(".npy"):  # soft pseudo labels
            np.testing.assert_allclose(np.load(double / name), np.load(single / name), rtol=1e-5, atol=1e-6,
                                       err_msg=name)
    prototypes = [torch.load(out / "warmup" / "prototypes.pth", weights_only=True) for out in (single, double)]
    assert torch.equal(prototypes[1]["counts"], prototypes[0]["counts"])
    torch.testing.assert_close(prototypes[1]["prototypes"], prototypes[0]["prototypes"], rtol=1e-5, atol=1e-6)
