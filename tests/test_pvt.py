"""PVT v1 (pvt.py): parity with the official code, checkpoint layout and loading, the backbone form, training."""
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import detr
import pvt
from tests.fixtures.fill import fill_state_dict

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "pvt_small.pt"
TOL = dict(rtol=1e-4, atol=1e-4)
NARROW = dict(embed_dims=[16, 32, 48, 64], num_heads=[1, 2, 2, 4])  # cheap widths, the size's own depths
TINY = dict(depths=[1, 1, 1, 1], **NARROW)
TINY_FLAGS = ["--model", "pvt_tiny", "--depths", "1", "1", "1", "1", "--embed_dims", "16", "32", "48", "64",
              "--num_heads", "1", "2", "2", "4"]


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
    model = pvt.pvt_tiny(drop_path_rate=0.1, **NARROW)
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
    source = pvt.pvt_tiny(**TINY).eval()
    path = tmp_path / "pvt_tiny.pth"
    torch.save(source.state_dict() if form == "raw" else {form: source.state_dict()}, path)
    model = pvt.pvt_tiny(**TINY).eval()
    assert pvt.load_pretrained(model, path) == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_checkpoint_of_another_size_is_a_clear_error(fx, tmp_path):
    path = tmp_path / "pvt_small.pth"
    torch.save({"model": fill_state_dict(fx["shapes"], fx["seed"])}, path)
    with pytest.raises(ValueError, match=r"pvt_small.*but the model is pvt_tiny"):
        pvt.load_pretrained(pvt.pvt_tiny(**NARROW), path)


def test_finetune_drops_a_head_of_another_size(tmp_path):
    source = pvt.pvt_tiny(num_classes=1000, **TINY)
    path = tmp_path / "pvt_tiny.pth"
    torch.save(source.state_dict(), path)
    model = pvt.pvt_tiny(num_classes=10, **TINY)
    assert sorted(pvt.load_pretrained(model, path)) == ["head.bias", "head.weight"]
    assert torch.equal(model.cls_token, source.cls_token) and model.head.weight.shape == (10, 64)


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
    model = pvt.pvt_tiny(num_classes=3, **NARROW).eval()
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
        pvt.pvt_tiny(**NARROW)(torch.randn(1, 3, 31, 64))


# ----------------------------------------------------------------------------------------------------------------
# Training: data, recipe pieces, overfitting one batch, the script end to end
# ----------------------------------------------------------------------------------------------------------------



def write_image_folders(root, classes=4, train=4, val=2, size=40):
    """ImageNet-style folders whose classes differ in colour: train/<class>/*.JPEG, val/<class>/*.JPEG."""
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.rand(size, size, 3, generator=g) * 60 + torch.tensor([60.0 * c, 200 - 50.0 * c, 90])
                Image.fromarray(pixels.clamp(0, 255).byte().numpy()).save(folder / f"img_{i}.JPEG")
    return root


def recipe_args(**overrides):
    args = pvt.apply_size_defaults(pvt.get_args_parser().parse_args([]))
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_overfit_one_batch(one_thread):
    torch.manual_seed(0)
    model = pvt.pvt_tiny(num_classes=4, **TINY)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    optimizer = torch.optim.AdamW(pvt.param_groups(model, 0.05), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, f"loss fell only from {losses[0]:.3f} to {losses[-1]:.3f}"


def test_no_weight_decay_on_cls_token_position_embeddings_norms_and_biases():
    model = pvt.pvt_tiny(num_classes=4, **TINY)
    no_decay, decay = pvt.param_groups(model, 0.05)
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.05
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "pos_embed1", "pos_embed4", "norm.weight", "block1.0.attn.norm.bias", "head.bias"} <= skipped
    assert all(n.endswith("weight") and "norm" not in n for n in (names[id(p)] for p in decay["params"]))


def test_per_size_defaults_as_the_official_configs():
    parse = pvt.get_args_parser().parse_args
    for model, expected in [("pvt_tiny", (0.1, None)), ("pvt_small", (0.1, None)), ("pvt_medium", (0.3, 1.0)),
                            ("pvt_large", (0.3, 1.0))]:
        args = pvt.apply_size_defaults(parse(["--model", model]))
        assert (args.drop_path, args.clip_grad) == expected, model
    args = pvt.apply_size_defaults(parse(["--model", "pvt_large", "--drop_path", "0.2", "--clip_grad", "0"]))
    assert (args.drop_path, args.clip_grad) == (0.2, 0.0)
    model, _, _ = pvt.build(parse(TINY_FLAGS), num_classes=3)  # build applies them too
    assert model.block4[-1].drop_path.p == pytest.approx(0.1)


def test_warmup_cosine_schedule():
    args = recipe_args()
    lr = 1e-3
    assert pvt.lr_at_epoch(0, lr, args) == pytest.approx(1e-6)
    cosine = 1e-5 + 0.5 * (lr - 1e-5) * (1 + math.cos(math.pi * 5 / 300))
    assert pvt.lr_at_epoch(5, lr, args) == pytest.approx(cosine)
    assert pvt.lr_at_epoch(300, lr, args) == pytest.approx(1e-5)


def test_augmentation_and_mixing(tmp_path):
    args = recipe_args(input_size=32)
    image = Image.new("RGB", (50, 40), (100, 150, 200))
    assert pvt.build_transform(True, args)(image).shape == (3, 32, 32)
    assert pvt.build_transform(False, args)(image).shape == (3, 32, 32)
    mix = pvt.build_mixing(args, num_classes=5)
    images, targets = mix(torch.randn(6, 3, 32, 32), torch.arange(6) % 5)
    assert images.shape == (6, 3, 32, 32) and targets.shape == (6, 5)
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    assert pvt.build_mixing(recipe_args(mixup=0.0, cutmix=0.0), num_classes=5) is None


def test_rand_augment_magnitude_mapping():
    """rand-m9 is magnitude 9 of timm's 10 levels: each op's argument at 9 (and at 10, the strongest), as timm's
    auto_augment.py level functions give them; torchvision's RandAugment(2, 9) with 31 bins rotates by 9 degrees."""
    at_9 = {"Rotate": 27.0, "ShearX": 0.27, "ShearY": 0.27, "TranslateX": 0.405, "TranslateY": 0.405, "Color": 0.81,
            "Contrast": 0.81, "Brightness": 0.81, "Sharpness": 0.81, "Posterize": 1, "Solarize": 26,
            "SolarizeAdd": 99}
    at_10 = {"Rotate": 30.0, "ShearX": 0.3, "TranslateX": 0.45, "Color": 0.9, "Posterize": 0, "Solarize": 0,
             "SolarizeAdd": 110}
    for table, m in ((at_9, 9), (at_10, 10)):
        for name, value in table.items():
            assert pvt.RAND_AUGMENT_OPS[name][0](m) == pytest.approx(value), f"{name} at magnitude {m}"
    assert sorted(pvt.RAND_AUGMENT_OPS) == sorted(
        ["AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
         "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY"])
    args = recipe_args()
    augment = [t for t in pvt.build_transform(True, args).transforms if isinstance(t, pvt.RandAugment)][0]
    assert (augment.num_ops, augment.magnitude, augment.magnitude_std, augment.prob) == (2, 9, 0.5, 0.5)
    assert augment.interpolation == Image.BICUBIC and augment.fill == (124, 116, 104)


def test_rand_augment_applies_the_op_at_its_magnitude():
    """One op (prob 1, no magnitude noise) gives PIL's own result at magnitude 9, with either sign; the magnitude
    noise has the recipe's mean and std and stays within [0, 10]."""
    g = torch.Generator().manual_seed(0)
    image = Image.fromarray(torch.randint(0, 256, (24, 32, 3), generator=g, dtype=torch.uint8).numpy())
    rotate = pvt.RandAugment(num_ops=1, magnitude=9, magnitude_std=0, prob=1.0, ops=["Rotate"])
    out = rotate(image).tobytes()
    assert out in [image.rotate(a, resample=Image.BICUBIC, fillcolor=(124, 116, 104)).tobytes() for a in (27, -27)]
    shear = pvt.RandAugment(num_ops=1, magnitude=9, magnitude_std=0, prob=1.0, ops=["ShearX"])
    out = shear(image).tobytes()
    assert out in [image.transform(image.size, Image.AFFINE, (1, f, 0, 0, 1, 0), resample=Image.BICUBIC,
                                   fillcolor=(124, 116, 104)).tobytes() for f in (0.27, -0.27)]
    posterize = pvt.RandAugment(num_ops=1, magnitude=9, magnitude_std=0, prob=1.0, ops=["Posterize"])
    assert set(posterize(image).tobytes()) <= {0, 128}, "magnitude 9 keeps 1 bit"
    posterize.magnitude = 10
    assert set(posterize(image).tobytes()) == {0}, "magnitude 10 keeps 0 bits: a black image, as timm's"
    for name in pvt.RAND_AUGMENT_OPS:  # every op runs at both ends of the magnitude range
        for m in (0, 10):
            out = pvt.RandAugment(num_ops=1, magnitude=m, magnitude_std=0, prob=1.0, ops=[name])(image)
            assert out.size == image.size and out.mode == "RGB", f"{name} at magnitude {m}"
    skipped = pvt.RandAugment(num_ops=2, prob=0.0)
    assert skipped(image).tobytes() == image.tobytes()
    samples = torch.tensor([pvt.RandAugment().sample_magnitude() for _ in range(4000)])
    assert abs(samples.mean() - 9) < 0.05 and abs(samples.std() - 0.5) < 0.05 and samples.max() <= 10


def ra_orders(size, world, epoch, seed=0):
    """Each process's (indices, augmentation seeds) of one RASampler epoch."""
    orders = []
    for rank in range(world):
        sampler = pvt.RASampler(size, batch_size=1, seed=seed, rank=rank, world_size=world)
        sampler.set_epoch(epoch)
        pairs = [pair for batch in sampler for pair in batch]
        orders.append(([i for i, _ in pairs], [s for _, s in pairs]))
    return orders


def test_repeated_augmentation_sampler():
    """The official RASampler: each index 3 times, the copies on 3 processes at the same step with different
    augmentation seeds; len(dataset) // 256 * 256 samples an epoch in all; the order depends on the epoch (and on
    the seed); with seed 0 it is the official order (a permutation from a generator seeded with the epoch)."""
    size, world = 600, 3
    orders = ra_orders(size, world, epoch=0)
    assert [len(indices) for indices, _ in orders] == [512 // 3] * 3
    first, second, third = (indices for indices, _ in orders)
    assert first == second == third, "the 3 copies of an image go to the 3 processes at the same step"
    assert len(set(first)) == len(first), "each process sees an image once"
    assert all(len({seeds[j] for _, seeds in orders}) == 3 for j in range(len(first))), "copies share a seed"
    official = torch.randperm(size, generator=torch.Generator().manual_seed(0)).tolist()
    assert first == official[:len(first)]
    single = ra_orders(size, 1, epoch=0)[0][0]
    assert single[:9] == [official[0]] * 3 + [official[1]] * 3 + [official[2]] * 3 and len(single) == 512
    assert sorted(single[:510]) == sorted(official[:170] * 3)
    assert ra_orders(size, world, epoch=1)[0][0] != first, "the order must change with the epoch"
    assert ra_orders(size, world, epoch=1) == ra_orders(size, world, epoch=1)
    assert ra_orders(size, world, epoch=0, seed=1)[0][0] != first
    assert [len(indices) for indices, _ in ra_orders(10, 2, epoch=0)] == [5, 5], "small datasets still sample"
    assert recipe_args().repeated_aug and not pvt.get_args_parser().parse_args(["--no_repeated_aug"]).repeated_aug


def test_bad_data_is_a_clear_error(tmp_path):
    root = write_image_folders(tmp_path / "imagenet", classes=2, train=1, val=1)
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        pvt.image_folder(tmp_path / "missing", None)
    (root / "train" / "n_empty").mkdir()
    with pytest.raises(FileNotFoundError, match="n_empty holds no images"):
        pvt.image_folder(root / "train", None)
    (root / "train" / "n_empty" / "broken.JPEG").write_bytes(b"not an image")
    dataset = pvt.image_folder(root / "train", None)
    index = [i for i, (path, _) in enumerate(dataset.samples) if path.endswith("broken.JPEG")][0]
    with pytest.raises(ValueError, match="cannot decode image .*broken.JPEG"):
        dataset[index]


def run_script(*args, module=None):
    command = [sys.executable, *(["-m", module] if module else []), *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_script_trains_resumes_and_evaluates(tmp_path):
    data = write_image_folders(tmp_path / "imagenet")
    out, ddp_out = tmp_path / "out", tmp_path / "ddp"
    flags = [*TINY_FLAGS, "--input_size", "32", "--batch_size", "8", "--num_workers", "0", "--device", "cpu",
             "--data_root", str(data), "--warmup_epochs", "1", "--print_freq", "1"]
    run_script("pvt.py", *flags, "--output_dir", str(out), "--epochs", "1", "--amp")
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=False)
    assert {"model", "optimizer", "lr_scheduler", "scaler", "epoch", "args", "rng"} <= set(checkpoint)
    assert checkpoint["epoch"] == 0
    run_script("pvt.py", *flags, "--output_dir", str(out), "--epochs", "2", "--resume", str(out / "checkpoint.pth"),
               "--viz")
    assert (out / "viz" / "img_0_pyramid.png").is_file()
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and all(math.isfinite(r["train_loss"]) for r in log)
    result = json.loads((out / "eval.json").read_text())  # the last epoch's evaluation
    assert set(result) == {"top1", "top5"} and 0 <= result["top1"] <= 100 and result["top5"] == 100  # 4 classes
    # --eval under torchrun: two processes (gloo) shard the val split without padding, so the accuracy is the same
    run_script("--nproc_per_node", "2", "pvt.py", *flags, "--output_dir", str(ddp_out), "--eval",
               "--resume", str(out / "checkpoint.pth"), module="torch.distributed.run")
    assert json.loads((ddp_out / "eval.json").read_text()) == pytest.approx(result)


def test_resume_of_a_checkpoint_without_grad_scaler_state(tmp_path, one_thread):
    data = write_image_folders(tmp_path / "imagenet", classes=2, train=2, val=1)
    args = pvt.get_args_parser().parse_args([*TINY_FLAGS, "--input_size", "32", "--batch_size", "4", "--num_workers",
                                             "0", "--device", "cpu", "--data_root", str(data), "--epochs", "1",
                                             "--output_dir", str(tmp_path / "out"), "--print_freq", "100"])
    pvt.main(args)
    path = tmp_path / "out" / "checkpoint.pth"
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["scaler"]
    torch.save(checkpoint, path)
    args = pvt.get_args_parser().parse_args([*TINY_FLAGS, "--input_size", "32", "--batch_size", "4", "--num_workers",
                                             "0", "--device", "cpu", "--data_root", str(data), "--epochs", "2",
                                             "--output_dir", str(tmp_path / "out"), "--resume", str(path)])
    pvt.main(args)
    assert torch.load(path, weights_only=False)["epoch"] == 1


def test_torchrun_two_processes_train(tmp_path):
    """`torchrun --nproc_per_node 2` on CPU (gloo): both ranks join, train an epoch and rank 0 writes the outputs."""
    data = write_image_folders(tmp_path / "imagenet")
    out = tmp_path / "ddp"
    stdout = run_script("--nproc_per_node", "2", "pvt.py", *TINY_FLAGS, "--input_size", "32", "--batch_size", "4",
                        "--num_workers", "0", "--data_root", str(data), "--warmup_epochs", "1", "--epochs", "1",
                        "--output_dir", str(out), module="torch.distributed.run")
    assert "distributed: rank 0 of 2 (gloo)" in stdout and "distributed: rank 1 of 2 (gloo)" in stdout
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0] and math.isfinite(log[0]["train_loss"]), "rank 0 alone writes the log"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pth", "eval.json", "log.txt"]
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 0 and len(checkpoint["rng"]) == 2, "each process's generators are saved"
    assert not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])


def test_torchrun_a_hanging_process_makes_the_other_stop(tmp_path):
    """Under torchrun, a process that stops answering (here rank 1 sleeps before its second step) makes the other
    one fail after --dist_timeout instead of waiting forever, and torchrun ends the run."""
    data = write_image_folders(tmp_path / "imagenet")
    driver = tmp_path / "hang.py"
    driver.write_text(textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from torch.optim.optimizer import register_optimizer_step_pre_hook
        import pvt
        steps = [0]
        def hang(optimizer, args, kwargs):
            steps[0] += 1
            if steps[0] == 2 and os.environ["RANK"] == "1":
                signal.signal(signal.SIGTERM, signal.SIG_DFL)  # stuck as in native code: no step boundary comes
                time.sleep(120)
        register_optimizer_step_pre_hook(hang)
        pvt.main(pvt.get_args_parser().parse_args(sys.argv[1:]))
    """))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(driver), *TINY_FLAGS,
               "--input_size", "32", "--batch_size", "2", "--num_workers", "0", "--data_root", str(data),
               "--epochs", "1", "--dist_timeout", "0.1", "--output_dir", str(tmp_path / "out")]
    start = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=100,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and time.time() - start < 90
    assert "Timed out" in result.stderr or "timed out" in result.stderr, result.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------------
# Faults (a killed or stopped run resuming as the same run, same seed same numbers: tests/test_resume.py)
# ----------------------------------------------------------------------------------------------------------------

def run_flags(data, out, *extra):
    """3 epochs of 4 steps (8 images, batch 2) with every random part of the recipe on (RandAugment, MixUp/CutMix,
    random erasing, drop path, repeated augmentation), a data-loader worker, --deterministic, a checkpoint every 2
    steps."""
    return [*TINY_FLAGS, "--input_size", "32", "--batch_size", "2", "--num_workers", "1", "--device", "cpu",
            "--data_root", str(data), "--warmup_epochs", "1", "--epochs", "3", "--checkpoint_every", "2",
            "--print_freq", "100", "--deterministic", "--output_dir", str(out), *extra]


def test_non_finite_loss_stops_with_step_loss_and_last_checkpoint(tmp_path, monkeypatch, one_thread):
    data = write_image_folders(tmp_path / "imagenet", classes=2, train=4, val=1)
    cross_entropy, calls = F.cross_entropy, [0]

    def diverging(logits, targets, **kwargs):
        loss = cross_entropy(logits, targets, **kwargs)
        if "label_smoothing" in kwargs:  # training, not evaluation
            calls[0] += 1
            loss = loss * float("nan") if calls[0] == 3 else loss
        return loss

    monkeypatch.setattr(F, "cross_entropy", diverging)
    flags = [flag for flag in run_flags(data, tmp_path / "out", "--checkpoint_every", "1") if flag != "--deterministic"]
    with pytest.raises(SystemExit, match=r"non-finite loss at epoch 0, step 2 \(iteration 2\): loss nan; stopping "
                                         r"\(the last good checkpoint is .*out/checkpoint.pth\)"):
        pvt.main(pvt.get_args_parser().parse_args(flags))
    assert torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)["step"] == 2


def test_resume_with_another_number_of_classes_is_one_clear_error(tmp_path, one_thread):
    """The checkpoint's identity is read before anything else (tests/test_resume.py runs the other faults on PVT)."""
    data = write_image_folders(tmp_path / "three", classes=3, train=1, val=1)
    args = pvt.get_args_parser().parse_args(run_flags(data, tmp_path / "out"))
    pvt.apply_size_defaults(args)
    model = pvt.build(args, 2)[0]
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "identity": pvt.run_identity(model, args)}, path)
    flags = [flag for flag in run_flags(data, tmp_path / "out", "--resume", str(path)) if flag != "--deterministic"]
    with pytest.raises(SystemExit, match=r"num_classes 2; expected .*num_classes 3 \(differs in num_classes\)"):
        pvt.main(pvt.get_args_parser().parse_args(flags))


# ----------------------------------------------------------------------------------------------------------------
# PVT+DETR (--task detect)
# ----------------------------------------------------------------------------------------------------------------


def write_tiny_coco(root, images=4, size=64):
    """A COCO-format set (train2017 = val2017 here) of coloured rectangles of two categories."""
    g = torch.Generator().manual_seed(1)
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir(parents=True)
        anns, infos = [], []
        for i in range(images):
            pixels = torch.full((size, size, 3), 30.0)
            x0, y0 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
            w, h = (int(v) for v in torch.randint(12, size // 2, (2,), generator=g))
            category = 1 + i % 2
            pixels[y0:y0 + h, x0:x0 + w] = torch.tensor([220.0, 40, 40] if category == 1 else [40.0, 40, 220])
            name = f"{i:012d}.jpg"
            Image.fromarray(pixels.byte().numpy()).save(root / f"{split}2017" / name)
            infos.append({"id": i + 1, "file_name": name, "width": size, "height": size})
            anns.append({"id": i + 1, "image_id": i + 1, "category_id": category, "bbox": [x0, y0, w, h],
                         "area": w * h, "iscrowd": 0})
        (root / "annotations").mkdir(exist_ok=True)
        categories = [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(
            {"images": infos, "annotations": anns, "categories": categories}))
    return root


def test_detect_backbone_loads_classification_weights(tmp_path):
    source = pvt.pvt_tiny(**TINY)
    path = tmp_path / "pvt_tiny.pth"
    torch.save({"model": source.state_dict()}, path)
    args = pvt.get_detect_args_parser().parse_args(
        ["--model", "pvt_tiny", *TINY_FLAGS[2:], "--pretrained", str(path), "--hidden_dim", "32", "--nheads", "2",
         "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64", "--num_queries", "5"])
    assert (args.epochs, args.lr_drop, args.lr, args.lr_backbone, args.clip_max_norm) == (50, 33, 1e-4, 1e-5, 0.1)
    model, criterion, _ = pvt.build_detect(args)
    torch.testing.assert_close(model.backbone[0].body.block4[0].attn.q.weight, source.block4[0].attn.q.weight)
    outputs = model([torch.randn(3, 70, 90), torch.randn(3, 64, 64)])  # padded batch
    assert outputs["pred_logits"].shape == (2, 5, 92) and outputs["pred_boxes"].shape == (2, 5, 4)
    assert len(outputs["aux_outputs"]) == 1 and "loss_giou_0" in criterion.weight_dict


def test_detect_augmentation_is_the_official_config_unless_random_crop(tmp_path):
    """Training images: flip and a short side from --scales (the official detr_pvt_s_8x2_50ep_coco.py pipeline),
    with DETR's random-crop branch only under --random_crop."""
    coco = write_tiny_coco(tmp_path / "coco", size=96)
    flags = ["--coco_path", str(coco), "--scales", "64", "80", "--max_size", "200"]
    args = pvt.get_detect_args_parser().parse_args(flags)
    assert args.scales == [64, 80] and not args.random_crop
    assert pvt.get_detect_args_parser().parse_args([]).scales == [640, 672, 704, 736, 768, 800]
    dataset = pvt.build_detect_dataset("train", args)
    assert [type(t) for t in dataset.transforms.transforms] == [
        detr.RandomHorizontalFlip, detr.RandomResize, detr.ToTensorNormalize]
    for i in range(len(dataset)):
        image, target = dataset[i]
        assert min(image.shape[-2:]) in (64, 80) and len(target["boxes"]) == 1, "no crop may remove the object"
    cropping = pvt.build_detect_dataset("train", pvt.get_detect_args_parser().parse_args([*flags, "--random_crop"]))
    assert any(isinstance(t, detr.RandomSelect) for t in cropping.transforms.transforms)
    val = pvt.build_detect_dataset("val", args)
    assert min(val[0][0].shape[-2:]) == 80


def test_detect_script_trains_and_evaluates(tmp_path):
    coco = write_tiny_coco(tmp_path / "coco")
    out = tmp_path / "out"
    flags = ["--task", "detect", *TINY_FLAGS, "--coco_path", str(coco), "--output_dir", str(out), "--device", "cpu",
             "--num_workers", "0", "--batch_size", "2", "--hidden_dim", "32", "--dim_feedforward", "64", "--nheads",
             "2", "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "5", "--num_classes", "3", "--scales",
             "64", "--max_size", "96", "--crop_scales", "64", "--crop_size", "48", "64", "--print_freq", "1"]
    run_script("pvt.py", *flags, "--epochs", "1")
    assert json.loads((out / "log.txt").read_text().splitlines()[-1])["epoch"] == 0
    run_script("pvt.py", *flags, "--eval", "--resume", str(out / "checkpoint.pth"))
    result = json.loads((out / "eval.json").read_text())
    assert {"AP", "AP50", "AP75", "AR100"} <= set(result)
