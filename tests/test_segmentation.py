"""common/segmentation.py: label tables, loaders on tiny files in the real layouts, mIoU against hand computation."""
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from common.segmentation import (
    CITYSCAPES_IDS,
    CLASS_NAMES,
    CLASS_NAMES_19,
    GTA5,
    IMG_MEAN,
    PALETTE,
    SYNTHIA,
    SYNTHIA_IDS,
    Cityscapes,
    ConfusionMatrix,
    colorize,
    evaluate,
    id_to_train_lut,
    lr_poly,
    map_ids,
)

# The notes' tables (cityscapesScripts label ids; SYNTHIA's own ids), written out independently of the module.
CITYSCAPES_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                       26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SYNTHIA_CLASS = {1: "sky", 2: "building", 3: "road", 4: "sidewalk", 5: "fence", 6: "vegetation", 7: "pole", 8: "car",
                 9: "traffic sign", 10: "person", 11: "bicycle", 12: "motorcycle", 15: "traffic light",
                 16: "terrain", 17: "rider", 18: "truck", 19: "bus", 20: "train", 21: "wall"}


def png16(path, array):
    """Minimal 16-bit PNG writer (colour type 2 = RGB, or 0 = grey), filter 0 on every row."""
    h, w = array.shape[:2]
    colour = 2 if array.ndim == 3 else 0
    raw = b"".join(b"\x00" + array[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def write_rgb(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8), "RGB").save(path)


def write_ids(path, ids, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(ids.astype(np.uint8), "P" if palette else "L")
    if palette:
        image.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    image.save(path)


# ---------------------------------------------------------------- tables


def test_cityscapes_and_synthia_tables():
    assert dict(zip(CITYSCAPES_IDS[19], range(19))) == CITYSCAPES_TO_TRAIN
    for n in (19, 16, 13):
        assert len(CLASS_NAMES[n]) == len(CITYSCAPES_IDS[n]) == len(SYNTHIA_IDS[n]) == n
        # Every subset keeps the 19-class column order, and both datasets' ids name the same classes.
        assert [CITYSCAPES_IDS[19][CLASS_NAMES_19.index(c)] for c in CLASS_NAMES[n]] == list(CITYSCAPES_IDS[n])
        assert [SYNTHIA_CLASS[i] for i in SYNTHIA_IDS[n]] == list(CLASS_NAMES[n])
    assert set(CLASS_NAMES_19) - set(CLASS_NAMES[16]) == {"terrain", "truck", "train"}
    assert set(CLASS_NAMES[16]) - set(CLASS_NAMES[13]) == {"wall", "fence", "pole"}


@pytest.mark.parametrize("ignore", [255, 250])
def test_lookup_table_maps_unknown_ids_to_ignore(ignore):
    lut = id_to_train_lut(CITYSCAPES_IDS[19], ignore)
    raw = np.array([[7, 33, 0, 9, -1], [255, 1000, 26, 34, 31]])
    expected = np.array([[0, 18, ignore, ignore, ignore], [ignore, ignore, 13, ignore, 16]])
    np.testing.assert_array_equal(map_ids(raw, lut, ignore), expected)
    lut16 = id_to_train_lut(SYNTHIA_IDS[16], ignore)
    np.testing.assert_array_equal(map_ids(np.array([3, 16, 21, 11, 65535]), lut16, ignore), [0, ignore, 3, 15, ignore])


def test_colorize_uses_cityscapes_palette():
    image = colorize(torch.tensor([[0, 10], [255, 3]]))
    assert image.mode == "P"
    rgb = np.asarray(image.convert("RGB"))
    assert tuple(rgb[0, 0]) == PALETTE[0] and tuple(rgb[0, 1]) == PALETTE[10] and tuple(rgb[1, 0]) == (0, 0, 0)
    sky16 = CLASS_NAMES[16].index("sky")
    assert tuple(np.asarray(colorize(np.array([[sky16]]), 16).convert("RGB"))[0, 0]) == PALETTE[10]


# ---------------------------------------------------------------- metrics


def test_confusion_matrix_by_hand():
    cm = ConfusionMatrix(3, ignore_index=255)
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 2, 0]])
    cm.update(pred, label)
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])  # rows: ground truth, columns: prediction
    assert torch.equal(cm.mat, expected)
    # IoU = TP / (TP + FP + FN): class 0: 1 / (1 + 1 + 1), class 1: 2 / (2 + 1 + 0), class 2: 1 / (1 + 0 + 1)
    torch.testing.assert_close(cm.iou(), torch.tensor([1 / 3, 2 / 3, 1 / 2], dtype=torch.float64))
    assert cm.miou() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    # A class absent from both labels and predictions is NaN and skipped by the mean, as the official nanmean.
    cm4 = ConfusionMatrix(4, ignore_index=250)
    cm4.update(pred, label.masked_fill(label == 255, 250))
    assert torch.isnan(cm4.iou()[3]) and cm4.miou() == pytest.approx(cm.miou())
    summary = cm4.summary(class_names=["a", "b", "c", "d"])
    assert summary["mIoU"] == pytest.approx(100 * cm.miou()) and summary["per_class"]["d"] is None


def test_confusion_matrix_against_brute_force_and_16_13_subsets():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 16, (2, 9, 11), generator=g)
    label[:, :2] = 255
    pred = torch.where(torch.rand(label.shape, generator=g) < 0.6, label.clamp(max=15),
                       torch.randint(0, 16, label.shape, generator=g))
    cm = ConfusionMatrix(16)
    cm.update(pred[0], label[0])
    cm.update(pred[1], label[1])
    iou = []
    for c in range(16):
        valid = label != 255
        tp = ((pred == c) & (label == c) & valid).sum().item()
        union = (((pred == c) | (label == c)) & valid).sum().item()
        iou.append(tp / union if union else float("nan"))
    torch.testing.assert_close(cm.iou(), torch.tensor(iou, dtype=torch.float64), equal_nan=True)
    summary = cm.summary()
    assert list(summary["per_class"]) == list(CLASS_NAMES[16])
    assert summary["mIoU"] == pytest.approx(100 * np.nanmean(iou))
    keep13 = [i for i, c in enumerate(CLASS_NAMES[16]) if c not in ("wall", "fence", "pole")]
    assert summary["mIoU13"] == pytest.approx(100 * np.nanmean([iou[i] for i in keep13]))
    assert "mIoU13" not in ConfusionMatrix(19).summary()


def test_lr_poly_matches_advent_schedule():
    fx = torch.load("tests/fixtures/advent_losses.pt", weights_only=False)
    cfg, out = fx["config"], fx["outputs"]
    for it, groups, lr_d in zip(out["lr_iters"].tolist(), out["lr_G_groups"], out["lr_D"]):
        base = lr_poly(cfg["LEARNING_RATE"], it, cfg["MAX_ITERS"], cfg["POWER"])
        assert base == pytest.approx(groups[0].item(), rel=1e-9) and 10 * base == pytest.approx(groups[1].item())
        assert lr_poly(cfg["LEARNING_RATE_D"], it, cfg["MAX_ITERS"], cfg["POWER"]) == pytest.approx(lr_d.item())


def test_evaluate_upsamples_main_output_to_label_size():
    class Constant(torch.nn.Module):  # (aux, main): main predicts class 1 left, class 0 right, at 1/2 resolution
        def forward(self, x):
            main = torch.zeros(x.shape[0], 2, 2, 2)
            main[:, 1, :, 0] = 1.0
            main[:, 0, :, 1] = 1.0
            return torch.zeros_like(main), main

    label = torch.zeros(1, 4, 5, dtype=torch.long)
    label[..., :2] = 1
    label[..., 0, 0] = 255
    loader = [(torch.zeros(1, 3, 4, 4), label, ["x"])]
    cm = evaluate(Constant(), loader, 2, "cpu")
    # align_corners=True: columns 0-1 lean to class 1, column 2 is a tie (argmax picks class 0), 3-4 class 0.
    assert torch.equal(cm.mat, torch.tensor([[12, 0], [0, 7]]))


# ---------------------------------------------------------------- datasets


def test_gta5_loader_caffe_mean_resize_and_list(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 8, 3))
    ids = np.array([7, 8, 26, 0, 200, 33] * 8).reshape(6, 8)
    for name in ("00001.png", "00002.png"):
        write_rgb(tmp_path / "images" / name, rgb)
        write_ids(tmp_path / "labels" / name, ids, palette=True)  # GTA5 labels are palette PNGs
    ds = GTA5(tmp_path)
    assert len(ds) == 2 and ds.names == ["00001.png", "00002.png"]
    image, label, name = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 6, 8) and label.dtype == torch.int64
    expected = torch.from_numpy((rgb[:, :, ::-1] - np.array(IMG_MEAN)).transpose(2, 0, 1).astype(np.float32))
    torch.testing.assert_close(image, expected)  # BGR minus IMG_MEAN, no /255
    np.testing.assert_array_equal(label.numpy(), map_ids(ids, id_to_train_lut(CITYSCAPES_IDS[19]), 255))
    assert label[0, :6].tolist() == [0, 1, 13, 255, 255, 18]

    (tmp_path / "train.txt").write_text("00002.png\n")
    ds = GTA5(tmp_path, list_path=tmp_path / "train.txt", num_classes=16, ignore_index=250, size=(4, 3),
              mean="rgb01", interpolation="bilinear")
    image, label, name = ds[0]
    assert name == "00002.png" and image.shape == (3, 3, 4) and label.shape == (3, 4)
    assert 0 <= image.min() and image.max() <= 1 and set(label.unique().tolist()) <= {0, 1, 12, 15, 250}
    batch = next(iter(DataLoader(GTA5(tmp_path, size=(4, 3)), batch_size=2)))
    assert batch[0].shape == (2, 3, 3, 4) and batch[1].shape == (2, 3, 4)
    assert list(batch[2]) == ["00001.png", "00002.png"]


def test_synthia_loader_reads_16_bit_labels(tmp_path):
    ids = np.array([[3, 4, 21, 16], [1, 11, 300, 0]], dtype=np.uint16)
    gt = np.stack([ids, np.full_like(ids, 4097), np.zeros_like(ids)], axis=-1)  # channel 1: instance ids > 255
    (tmp_path / "GT" / "LABELS").mkdir(parents=True)
    png16(tmp_path / "GT" / "LABELS" / "0000000.png", gt)
    write_rgb(tmp_path / "RGB" / "0000000.png", np.full((2, 4, 3), 128))
    # PIL keeps only the high byte of 16-bit RGB: the reason for the libpng path (fails if PIL ever changes).
    assert (np.asarray(Image.open(tmp_path / "GT" / "LABELS" / "0000000.png"))[..., 0] == ids >> 8).all()
    _, label, _ = SYNTHIA(tmp_path, num_classes=16, ignore_index=250)[0]
    assert label.tolist() == [[0, 1, 3, 250], [9, 15, 250, 250]]
    _, label19, _ = SYNTHIA(tmp_path, num_classes=19)[0]
    assert label19.tolist() == [[0, 1, 3, 9], [10, 18, 255, 255]]
    png16(tmp_path / "GT" / "LABELS" / "0000000.png", ids)  # single-channel 16-bit labels work too
    assert SYNTHIA(tmp_path, num_classes=13)[0][1].tolist() == [[0, 1, 255, 255], [6, 12, 255, 255]]
    (tmp_path / "GT" / "LABELS" / "0000000.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(RuntimeError, match="LABELS/0000000.png: unreadable SYNTHIA label"):
        SYNTHIA(tmp_path)[0]


def make_cityscapes(root, split="val", cities=("frankfurt", "lindau"), size=(8, 4)):
    for i, city in enumerate(cities):
        stem = f"{city}_000000_00001{i}"
        write_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", np.full((size[1], size[0], 3), 50))
        write_ids(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", np.full((size[1], size[0]), 23))


def test_cityscapes_loader(tmp_path):
    make_cityscapes(tmp_path)
    ds = Cityscapes(tmp_path, "val", size=(4, 2), resize_label=False)
    assert ds.names == ["frankfurt/frankfurt_000000_000010_leftImg8bit.png",
                        "lindau/lindau_000000_000011_leftImg8bit.png"]
    image, label, _ = ds[1]
    assert image.shape == (3, 2, 4) and label.shape == (4, 8) and (label == 10).all()  # sky at full resolution
    (tmp_path / "val.txt").write_text("lindau/lindau_000000_000011_leftImg8bit.png\n")
    ds = Cityscapes(tmp_path, "val", list_path=tmp_path / "val.txt", num_classes=13, ignore_index=250)
    assert len(ds) == 1 and (ds[0][1] == CLASS_NAMES[13].index("sky")).all()
    make_cityscapes(tmp_path, "train", cities=("aachen",))
    for f in (tmp_path / "gtFine" / "train" / "aachen").iterdir():
        f.unlink()
    (tmp_path / "gtFine" / "train" / "aachen").rmdir()
    image, label, _ = Cityscapes(tmp_path, "train", labels=False, size=(4, 2))[0]  # target images without labels
    assert image.shape == (3, 2, 4) and (label == 255).all()
    with pytest.raises(FileNotFoundError, match="gtFine/train/aachen.*labels of .*leftImg8bit/train/aachen"):
        Cityscapes(tmp_path, "train")


def test_loader_errors_name_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/nowhere/images.*GTA5 images"):
        GTA5(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="RGB.*SYNTHIA images"):
        SYNTHIA(tmp_path)
    with pytest.raises(FileNotFoundError, match="leftImg8bit/val"):
        Cityscapes(tmp_path)
    write_rgb(tmp_path / "images" / "00001.png", np.zeros((6, 8, 3)))
    (tmp_path / "labels").mkdir()
    with pytest.raises(FileNotFoundError, match="labels/00001.png: label file not found"):
        GTA5(tmp_path)
    write_ids(tmp_path / "labels" / "00001.png", np.zeros((5, 8)))
    ds = GTA5(tmp_path)
    with pytest.raises(ValueError, match=r"labels/00001.png is 8x5 but image .*images/00001.png is 8x6"):
        ds[0]
    assert GTA5(tmp_path, size=(4, 3))[0][1].shape == (3, 4)  # resized independently, as the official loaders
    with pytest.raises(FileNotFoundError, match="missing.txt: list file not found"):
        GTA5(tmp_path, list_path=tmp_path / "missing.txt")
    (tmp_path / "list.txt").write_text("00001.png\n00009.png\n")
    with pytest.raises(FileNotFoundError, match="images/00009.png: image listed in"):
        GTA5(tmp_path, list_path=tmp_path / "list.txt")
    (tmp_path / "images" / "00001.png").write_bytes(b"not a png")
    with pytest.raises(RuntimeError, match="images/00001.png: unreadable image"):
        GTA5(tmp_path)[0]
    write_rgb(tmp_path / "images" / "00001.png", np.zeros((5, 8, 3)))
    write_rgb(tmp_path / "labels" / "00001.png", np.zeros((5, 8, 3)))
    with pytest.raises(RuntimeError, match="labels/00001.png: unreadable label.*single-channel"):
        GTA5(tmp_path)[0]
