"""AdaptSegNet: parity with the official code (fixtures), the training iteration, and the script end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch

import adaptsegnet
from common import uda
from common.deeplab import DeepLabV2
from tests.conftest import FIXTURES, ROOT
from tests.fixtures.fill import fill_state_dict

ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def load_fixture(name):
    return torch.load(FIXTURES / name, weights_only=False)


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-4, atol=1e-4,
                               msg=lambda m: f"{what} differs from the official AdaptSegNet output: {m}")


# ----------------------------------------------------------------------------------------------------------------
# Parity with the official code
# ----------------------------------------------------------------------------------------------------------------


def test_deeplab_multi_matches_official_two_branch_classifier():
    fx = load_fixture("deeplabv2_multi.pt")
    cfg = fx["config"]
    model = DeepLabV2(num_classes=cfg["num_classes"], multi_level=True, aspp_branches=2, layers=tuple(cfg["layers"]))
    model.load_state_dict(fill_state_dict(fx["shapes"], fx["seed"]))  # strict: the released key table
    model.eval()
    with torch.no_grad():
        aux, main = model(fx["inputs"]["x"])
    close(aux, fx["outputs"]["adaptsegnet_aux"], "aux (layer5) output")
    close(main, fx["outputs"]["adaptsegnet_main"], "main (layer6) output")


def test_discriminator_and_gan_losses_match_official():
    fx = load_fixture("discriminators.pt")
    cfg, out = fx["config"], fx["outputs"]
    disc = adaptsegnet.FCDiscriminator(cfg["num_classes"], cfg["ndf"])
    disc.load_state_dict(fill_state_dict(fx["shapes"]["adaptsegnet_FCDiscriminator"], fx["seed"]))
    disc.eval()
    with torch.no_grad():
        d_out = disc(fx["inputs"]["prob"])
        close(d_out, out["adaptsegnet_D_out"], "D(softmax)")
        close(disc(fx["inputs"]["wsi"]), out["adaptsegnet_D_out_on_wsi"], "D(self-information map)")
        close(adaptsegnet.gan_loss(d_out, adaptsegnet.SOURCE_LABEL), out["adaptsegnet_bce_vs_source0"],
              "BCE against the source label")
        close(adaptsegnet.gan_loss(d_out, adaptsegnet.TARGET_LABEL) / 2, out["adaptsegnet_bce_vs_target1_half"],
              "halved BCE against the target label")
        close(adaptsegnet.gan_loss(d_out, adaptsegnet.SOURCE_LABEL, gan="LS"), out["adaptsegnet_lsgan_vs_source0"],
              "LS-GAN loss")


def test_segmentation_loss_and_poly_schedule_match_official():
    fx = load_fixture("advent_losses.pt")
    cfg, inp, out = fx["config"], fx["inputs"], fx["outputs"]
    up_main = uda.upsample(inp["pred_main"], cfg["crop_hw"])
    up_aux = uda.upsample(inp["pred_aux"], cfg["crop_hw"])
    close(up_main, out["up_main"], "upsampled main output")
    close(uda.seg_loss(up_main, inp["labels"]), out["adaptsegnet_CrossEntropy2d_main"], "CrossEntropy2d")
    close(uda.seg_loss(up_aux, inp["labels"]), out["seg_loss_aux"], "aux segmentation loss")

    # The poly tables at the stored iterations, for the segmentation network (2 groups, 10x) and a discriminator.
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt_g = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=cfg["LEARNING_RATE"])
    opt_d = torch.optim.Adam(params, lr=cfg["LEARNING_RATE_D"])
    for row, it in enumerate(out["lr_iters"].tolist()):
        uda.adjust_learning_rate(opt_g, cfg["LEARNING_RATE"], it, cfg["MAX_ITERS"], cfg["POWER"])
        uda.adjust_learning_rate(opt_d, cfg["LEARNING_RATE_D"], it, cfg["MAX_ITERS"], cfg["POWER"])
        got = torch.tensor([g["lr"] for g in opt_g.param_groups], dtype=torch.float64)
        torch.testing.assert_close(got, out["lr_G_groups"][row], rtol=1e-6, atol=0, msg=f"G lr at iteration {it}")
        torch.testing.assert_close(torch.tensor(opt_d.param_groups[0]["lr"], dtype=torch.float64), out["lr_D"][row],
                                   rtol=1e-6, atol=0, msg=f"D lr at iteration {it}")


def test_altered_fixture_is_detected():
    fx = load_fixture("discriminators.pt")
    disc = adaptsegnet.FCDiscriminator(fx["config"]["num_classes"], fx["config"]["ndf"])
    disc.load_state_dict(fill_state_dict(fx["shapes"]["adaptsegnet_FCDiscriminator"], fx["seed"] + 1))
    with torch.no_grad():
        d_out = disc(fx["inputs"]["prob"])
    with pytest.raises(AssertionError):
        close(d_out, fx["outputs"]["adaptsegnet_D_out"], "D(softmax) with other weights")


# ----------------------------------------------------------------------------------------------------------------
# The training iteration
# ----------------------------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def tiny_args(**overrides):
    args = adaptsegnet.get_args_parser().parse_args([])
    args.amp = False
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def test_discriminator_gradients_come_only_from_the_discriminator_step():
    """The adversarial term must not train D (frozen), and D's step must see detached maps: D's gradient equals that
    of its two halved BCE terms alone, recomputed here; the segmentation network does get gradient."""
    torch.manual_seed(0)
    args = tiny_args(lambda_adv_target1=0.5, lambda_adv_target2=1.0)
    model = DeepLabV2(num_classes=4, aspp_branches=2, layers=(1, 1, 1, 1), width=8).train()  # batch-stat BN
    d_aux, d_main = adaptsegnet.FCDiscriminator(4, 8), adaptsegnet.FCDiscriminator(4, 8)
    source = (torch.randn(1, 3, 64, 64), torch.randint(0, 4, (1, 64, 64)))
    target = torch.randn(1, 3, 64, 64)
    logs = adaptsegnet.train_one_iteration(model, d_aux, d_main, source, target, args,
                                           torch.amp.GradScaler("cpu", enabled=False))
    assert set(logs) == {"loss_seg_main", "loss_seg_aux", "loss_adv_aux", "loss_adv_main", "loss_D_aux", "loss_D_main"}
    assert model.layer6.conv2d_list[0].weight.grad.abs().sum() > 0
    assert model.layer5.conv2d_list[2].weight.grad is None, "the 2-branch classifier must not use branch 3"

    with torch.no_grad():
        outputs = [[uda.upsample(p, x.shape[-2:]) for p in model(x)] for x in (source[0], target)]
    for level, disc in enumerate((d_aux, d_main)):
        reference = adaptsegnet.FCDiscriminator(4, 8)
        reference.load_state_dict(disc.state_dict())
        loss = sum(adaptsegnet.gan_loss(reference(torch.softmax(out[level], 1)), label) / 2
                   for out, label in zip(outputs, (adaptsegnet.SOURCE_LABEL, adaptsegnet.TARGET_LABEL)))
        loss.backward()
        for (name, p), q in zip(disc.named_parameters(), reference.parameters()):
            where = f"D{level + 1} {name}"
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, where=where: f"{where}: gradient leaked from the G step: {m}")


def test_overfit_one_batch_with_adaptation():
    """Source loss on one fixed batch falls by at least 3x within 40 adaptation iterations of a tiny DeepLab."""
    torch.manual_seed(0)
    args = tiny_args(lambda_adv_target1=0.01, lambda_adv_target2=0.01)
    model = DeepLabV2(num_classes=3, layers=(1, 1, 1, 1), width=8).train()
    d_aux, d_main = adaptsegnet.FCDiscriminator(3, 8), adaptsegnet.FCDiscriminator(3, 8)
    opt = torch.optim.SGD(uda.optim_parameters(model, 0.01), lr=0.01, momentum=0.9)
    opt_d = torch.optim.Adam(list(d_aux.parameters()) + list(d_main.parameters()), lr=1e-4, betas=(0.9, 0.99))
    images = torch.randn(1, 3, 32, 32)
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[:, :, 10:20] = 1
    labels[:, 22:, :] = 2
    target = torch.randn(1, 3, 32, 32)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        opt_d.zero_grad()
        logs = adaptsegnet.train_one_iteration(model, d_aux, d_main, (images, labels), target, args, scaler)
        opt.step()
        opt_d.step()
        losses.append(logs["loss_seg_main"].item())
    assert losses[-1] < losses[0] / 3, f"source loss went {losses[0]:.3f} -> {losses[-1]:.3f}, expected a 3x drop"


# ----------------------------------------------------------------------------------------------------------------
# The script, as a user runs it
# ----------------------------------------------------------------------------------------------------------------


def write_tiny_uda_data(root, size=(64, 32), count=4):
    """A few GTA5 / SYNTHIA / Cityscapes files in the real layouts: road below, sky/building above, a car box."""
    import numpy as np
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(0)
    ids = {"road": 7, "building": 11, "car": 26, "sky": 23}
    synthia_ids = {"road": 3, "building": 2, "car": 8, "sky": 1}
    colours = {"road": (128, 64, 128), "building": (70, 70, 70), "car": (0, 0, 142), "sky": (70, 130, 180)}

    def scene(k, shift):
        names = np.full((h, w), "sky", dtype=object)
        names[h // 3: h // 2] = "building"
        names[h // 2:] = "road"
        x0 = (7 * k) % (w // 2)
        names[h // 2 - 4: h // 2 + 6, x0: x0 + w // 4] = "car"
        img = np.zeros((h, w, 3), np.float32)
        for n, c in colours.items():
            img[names == n] = c
        img = np.clip(img + shift + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        return img, names

    def save_pair(img, names, image_path, label_path, table, sixteen_bit=False):
        image_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(image_path)
        label = np.zeros((h, w), np.uint8)
        for n, v in table.items():
            label[names == n] = v
        if sixteen_bit:
            _write_png16(label_path, np.repeat(label[:, :, None].astype(np.uint16), 3, axis=2))
        else:
            Image.fromarray(label).save(label_path)

    for k in range(count):
        img, names = scene(k, 0)
        save_pair(img, names, root / "gta5" / "images" / f"{k:05d}.png", root / "gta5" / "labels" / f"{k:05d}.png",
                  ids)
        save_pair(img, names, root / "synthia" / "RGB" / f"{k:07d}.png",
                  root / "synthia" / "GT" / "LABELS" / f"{k:07d}.png", synthia_ids, sixteen_bit=True)
        for split in ("train", "val"):
            img, names = scene(k + 3, 30)
            stem = f"aachen_{k:06d}_000019" if split == "train" else f"frankfurt_{k:06d}_000019"
            city = stem.split("_")[0]
            save_pair(img, names, root / "cityscapes" / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                      root / "cityscapes" / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids)
    return root


def _write_png16(path, array):
    """A 16-bit RGB PNG (what SYNTHIA's GT/LABELS files are; PIL cannot write them): IHDR, one IDAT, IEND."""
    import struct
    import zlib

    import numpy as np

    array = np.ascontiguousarray(array, dtype=">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in array)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", array.shape[1], array.shape[0], 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return write_tiny_uda_data(tmp_path_factory.mktemp("uda"))


def run_script(*argv):
    proc = subprocess.run([sys.executable, "adaptsegnet.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          env=ONE_THREAD_ENV)
    assert proc.returncode == 0, f"adaptsegnet.py {' '.join(argv)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_script_trains_snapshots_and_evaluates(tiny_root, tmp_path):
    out = tmp_path / "run"
    small = ["--data_root", str(tiny_root), "--device", "cpu", "--layers", "1", "1", "1", "1", "--width", "8",
             "--input_size", "64,32", "--input_size_target", "64,32", "--num_workers", "0"]
    stdout = run_script(*small, "--output_dir", str(out), "--num_steps", "6", "--num_steps_stop", "4",
                        "--save_pred_every", "2", "--select", "best", "--viz", "--num_viz", "1")
    assert "selects on the target validation set" in stdout
    result = json.loads((out / "eval.json").read_text())
    assert 0 <= result["mIoU"] <= 100 and list(result["per_class"])[:3] == ["road", "sidewalk", "building"]
    assert (out / "snapshots" / "model_2.pth").is_file() and (out / "snapshots" / "model_4.pth").is_file()
    assert list((out / "viz").glob("*.png")), "--viz wrote no figure"
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [2, 4] and all("loss_D_main" in r for r in log)

    # --eval from the last checkpoint scores the last model: the same number as its snapshot evaluation.
    again = tmp_path / "eval"
    stdout = run_script(*small, "--output_dir", str(again), "--eval", "--resume", str(out / "checkpoint.pth"))
    assert json.loads((again / "eval.json").read_text())["mIoU"] == pytest.approx(log[-1]["mIoU"], abs=1e-6)
    assert "mIoU =" in stdout


def test_script_source_only_on_synthia_reports_miou13(tiny_root, tmp_path):
    out = tmp_path / "synthia"
    run_script("--data_root", str(tiny_root), "--device", "cpu", "--layers", "1", "1", "1", "1", "--width", "8",
               "--source", "synthia", "--input_size", "64,32", "--input_size_target", "64,32", "--num_workers", "0",
               "--lambda_adv_target1", "0", "--lambda_adv_target2", "0", "--num_steps_stop", "2",
               "--output_dir", str(out))
    result = json.loads((out / "eval.json").read_text())
    assert len(result["per_class"]) == 16 and "mIoU13" in result


def test_city_folder_without_labels_gives_one_clear_error(tiny_root, tmp_path):
    import shutil

    root = shutil.copytree(tiny_root, tmp_path / "data")
    shutil.rmtree(root / "cityscapes" / "gtFine" / "val" / "frankfurt")
    proc = subprocess.run([sys.executable, "adaptsegnet.py", "--data_root", str(root), "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, env=ONE_THREAD_ENV)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "frankfurt" in proc.stderr and "labels" in proc.stderr, proc.stderr
