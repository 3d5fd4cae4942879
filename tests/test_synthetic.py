"""common/synthetic.py: every format written tiny, read back with the real tools and the project's loaders."""
import configparser
import hashlib
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from common import segmentation as seg
from common import synthetic as syn

ROOT = Path(__file__).resolve().parents[1]
IMAGES = 8  # --images 8: 8 street scenes per source set, 8 + 2 Cityscapes, 8 + 2 COCO, 2 x 4 MOT frames, ...
# pycocotools 2.0.11 under NumPy 2 warns inside its own decode; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    syn.write(out, images=IMAGES, seed=0)
    return out


def read_png16(path):
    """Decode a PNG of bit depth 16, colour type 2 (RGB) by the PNG specification: [H, W, 3] uint16."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, tag = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        crc = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0]
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, f"{path}: bad CRC in {tag}"
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour_type, _, _, interlace = header
    assert (depth, colour_type, interlace) == (16, 2, 0), f"{path}: expected 16-bit RGB, got {header}"
    raw, bpp, stride = zlib.decompress(idat), 6, width * 6
    rows, prev = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return np.frombuffer(b"".join(rows), ">u2").reshape(height, width, 3).astype(np.uint16)


def expected_train_ids(dataset, index, size, column, num_classes, ignore=255):
    """Regenerate scene `index` of `dataset` and map its classes to train ids by class name (column 0: Cityscapes
    ids, where lane markings are road; column 1: SYNTHIA ids, where they are 'lanemarking', ignored)."""
    canvas = syn.street_scene(syn.item_rng(0, dataset, "layout", index), *size, dataset.split("/")[0])
    names = seg.CLASS_NAMES[num_classes]

    def train_id(cls):
        if cls == "lane":
            cls = "road" if column == 0 else None
        cls = {"light": "traffic light", "sign": "traffic sign"}.get(cls, cls)
        return names.index(cls) if cls in names else ignore

    table = np.array([train_id(m[0]) for m in canvas.materials], np.int64)
    return table[np.asarray(canvas.image)]


# ---------------------------------------------------------------------------------------------------------------------
# Street scenes
# ---------------------------------------------------------------------------------------------------------------------


def test_gta5_labels_are_palette_pngs_of_cityscapes_ids_and_round_trip(data):
    root = data / "gta5"
    images, labels = sorted((root / "images").glob("*.png")), sorted((root / "labels").glob("*.png"))
    assert [p.name for p in images] == [p.name for p in labels] == [f"{i:05d}.png" for i in range(1, IMAGES + 1)]
    valid = {v[0] for v in syn.STREET_CLASSES.values()}
    for p in labels:
        with Image.open(p) as im:
            assert im.mode == "P", f"{p}: GTA5 labels are palette PNGs, got {im.mode}"
            ids = np.asarray(im)
        assert set(np.unique(ids)) <= valid, f"{p}: unexpected ids {set(np.unique(ids)) - valid}"
        with Image.open(root / "images" / p.name) as im:
            assert im.mode == "RGB" and im.size[::-1] == ids.shape == (88, 160)
    dataset = seg.GTA5(root, num_classes=19)
    for i in range(len(dataset)):
        _, label, _ = dataset[i]
        np.testing.assert_array_equal(label.numpy(), expected_train_ids("gta5", i, (160, 88), 0, 19),
                                      err_msg=f"GTA5 {i}: train ids differ from the scene's classes")


def test_synthia_labels_are_16bit_rgb_with_class_ids_in_channel_0(data):
    root = data / "synthia"
    labels = sorted((root / "GT" / "LABELS").glob("*.png"))
    assert [p.name for p in labels] == [p.name for p in sorted((root / "RGB").glob("*.png"))]
    assert labels[0].name == "0000000.png"
    synthia_ids = {v[1] for v in syn.STREET_CLASSES.values()}
    for p in labels:
        arr = read_png16(p)
        assert arr.shape == (76, 128, 3)
        assert set(np.unique(arr[..., 0])) <= synthia_ids, f"{p}: unexpected class ids"
        dynamic = np.isin(arr[..., 0], [syn.STREET_CLASSES[c][1] for c in syn.DYNAMIC])
        assert not arr[..., 1][~dynamic].any(), f"{p}: instance ids outside person/rider/car/bus/bicycle"
        assert not arr[..., 2].any()
        np.testing.assert_array_equal(seg.read_synthia_label(p), arr[..., 0].astype(np.int32))
    dataset = seg.SYNTHIA(root, num_classes=16)
    for i in range(len(dataset)):
        _, label, _ = dataset[i]
        np.testing.assert_array_equal(label.numpy(), expected_train_ids("synthia", i, (128, 76), 1, 16),
                                      err_msg=f"SYNTHIA {i}: train ids differ from the scene's classes")


def test_png16_encoder_round_trips_large_values(tmp_path):
    arr = np.random.default_rng(0).integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    syn.write_png16(tmp_path / "x.png", arr)
    np.testing.assert_array_equal(read_png16(tmp_path / "x.png"), arr)
    np.testing.assert_array_equal(seg.read_synthia_label(tmp_path / "x.png"), arr[..., 0].astype(np.int32))


def test_cityscapes_layout_label_ids_and_round_trip(data):
    root = data / "cityscapes"
    for split, n in (("train", IMAGES), ("val", 2)):
        cities = syn.CITYSCAPES_CITIES[split]
        images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        assert len(images) == n and {p.parent.name for p in images} <= set(cities)
        for p in images:
            assert p.name.startswith(p.parent.name + "_") and p.name.count("_") == 3
            label = root / "gtFine" / split / p.parent.name / p.name.replace("_leftImg8bit", "_gtFine_labelIds")
            with Image.open(label) as im:
                assert im.mode == "L", f"{label}: Cityscapes labelIds are 8-bit grey, got {im.mode}"
                assert im.size == (128, 64)
        dataset = seg.Cityscapes(root, split=split, num_classes=19)
        for k in range(len(dataset)):
            _, label, name = dataset[k]
            city, stem = name.split("/")
            index = cities.index(city) + len(cities) * int(stem.split("_")[1])
            np.testing.assert_array_equal(label.numpy(), expected_train_ids(f"cityscapes/{split}", index, (128, 64),
                                                                            0, 19), err_msg=f"Cityscapes {name}")


def test_street_scenes_cover_the_classes_and_ignore_ids():
    seen = set()
    for i in range(40):
        seen |= set(np.unique(syn.street_labels(syn.street_scene(syn.item_rng(0, "cover", i), 128, 64), 0)).tolist())
    must = {0, 4, 7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 26}  # incl. ignore ids 0 unlabeled, 4 static
    assert must <= seen, f"classes never drawn in 40 scenes: {must - seen}"


def test_target_shift_is_class_conditional_and_in_layout():
    """Cityscapes differs from GTA5 in more than a global colour transform (which BatchNorm statistics could undo):
    some classes keep their game colours while others move (cars lose their saturation, paving turns from pink to
    grey), and the layout differs (the ego vehicle's bonnet over the bottom rows, higher horizon, smaller
    objects, more cars and persons)."""
    game, real = syn.STREET_DOMAINS["gta5"], syn.STREET_DOMAINS["cityscapes"]

    def saturation(colours):
        return np.mean([max(c) - min(c) for c in colours])

    for kept in ("road", "sky", "lane"):
        assert real["palette"][kept] == game["palette"][kept]
    assert saturation(real["palette"]["car"]) < 0.7 * saturation(game["palette"]["car"])
    assert saturation(real["palette"]["sidewalk"]) < 0.7 * saturation(game["palette"]["sidewalk"])
    bottom = {d: [syn.street_labels(syn.street_scene(syn.item_rng(0, d, "layout", i), 128, 64, d), 0)[-1]
                  for i in range(10)] for d in ("gta5", "cityscapes")}
    assert not any((row == 1).any() for row in bottom["gta5"])
    assert all((row == 1).mean() > 0.5 for row in bottom["cityscapes"]), "the bonnet (ego vehicle, id 1) is missing"
    assert real["scale"] < game["scale"] and real["horizon"][0] < game["horizon"][0]
    assert real["cars"][0] > game["cars"][0] and real["persons"][0] > game["persons"][0]


def test_game_and_real_renderings_share_the_layout_but_not_the_appearance():
    canvas = syn.street_scene(syn.item_rng(0, "shift", 0), 128, 64)
    game = syn.render_street(canvas, syn.item_rng(0, "g"), syn.GAME_STYLE).astype(float)
    real = syn.render_street(canvas, syn.item_rng(0, "r"), syn.REAL_STYLE).astype(float)
    hsv = [np.asarray(Image.fromarray(x.astype(np.uint8)).convert("HSV"), float) for x in (game, real)]
    assert real.mean() < 0.9 * game.mean(), "the real rendering is darker"
    assert hsv[1][..., 1].mean() < 0.8 * hsv[0][..., 1].mean(), "the real rendering is desaturated"


# ---------------------------------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------------------------------


def test_coco_loads_with_pycocotools_and_masks_match_boxes(data):
    root = data / "coco"
    for split, n in (("train", IMAGES), ("val", 2)):
        coco = COCO(str(root / "annotations" / f"instances_{split}2017.json"))
        assert len(coco.imgs) == n
        assert sorted(coco.cats) == sorted(syn.COCO_CATEGORIES) and max(coco.cats) == 90
        assert len({a["id"] for a in coco.dataset["annotations"]}) == len(coco.anns)
        for img in coco.imgs.values():
            with Image.open(root / f"{split}2017" / img["file_name"]) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (img["width"], img["height"])
            assert len(coco.getAnnIds(imgIds=img["id"])) >= 1
        for ann in coco.anns.values():
            img = coco.imgs[ann["image_id"]]
            mask = coco.annToMask(ann)
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"], f"box outside: {ann}"
            ys, xs = np.nonzero(mask)
            assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == [x, y, w, h]
            assert ann["area"] == mask.sum()
            if ann["iscrowd"]:
                assert isinstance(ann["segmentation"]["counts"], list), "crowds use uncompressed RLE as COCO's"
            else:
                assert isinstance(ann["segmentation"], list), "objects use polygons as COCO's"


def test_coco_ground_truth_scores_ap_100_with_cocoeval(data):
    coco = COCO(str(data / "coco" / "annotations" / "instances_train2017.json"))
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in coco.anns.values() if not a["iscrowd"]]
    ev = COCOeval(coco, coco.loadRes(dets), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------------------
# MOT17
# ---------------------------------------------------------------------------------------------------------------------


def test_mot17_layout_and_tracks(data):
    seqs = sorted((data / "mot17" / "train").iterdir())
    assert [s.name for s in seqs] == ["MOT17-02-FRCNN", "MOT17-04-FRCNN"]
    for seq in seqs:
        ini = configparser.ConfigParser()
        ini.read(seq / "seqinfo.ini")
        info = ini["Sequence"]
        assert info["name"] == seq.name and info["imDir"] == "img1" and info["imExt"] == ".jpg"
        length, width, height = int(info["seqLength"]), int(info["imWidth"]), int(info["imHeight"])
        assert int(info["frameRate"]) == 30
        frames = sorted((seq / "img1").glob("*.jpg"))
        assert [f.name for f in frames] == [f"{t:06d}.jpg" for t in range(1, length + 1)]
        with Image.open(frames[0]) as im:
            assert im.size == (width, height)
        gt = np.loadtxt(seq / "gt" / "gt.txt", delimiter=",", ndmin=2)
        assert gt.shape[1] == 9
        frame, tid, left, top, w, h, flag, cls, vis = gt.T
        assert set(cls) <= {1, 7, 8, 12} and {1, 7, 8} <= set(cls)
        assert np.all(flag[cls != 1] == 0) and np.all(flag[cls == 1] == 1)
        assert frame.min() >= 1 and frame.max() <= length and np.all((vis >= 0) & (vis <= 1))
        assert len({(f, i) for f, i in zip(frame, tid)}) == len(gt), "one row per (frame, id)"
        assert np.all(w > 0) and np.all(h > 0)
        # boxes 1-based and overlapping the image (they may extend past the border, as in MOT17)
        assert np.all((left - 1 < width) & (left - 1 + w > 0) & (top - 1 < height) & (top - 1 + h > 0))
        assert np.all(np.diff(tid) >= 0), "sorted by id, then frame"
        for i in np.unique(tid[cls == 1]):
            rows = gt[tid == i]
            assert np.all(np.diff(rows[:, 0]) == 1), f"track {i} skips frames"
            centre = rows[:, 2:4] + rows[:, 4:6] / 2
            assert np.abs(np.diff(centre, axis=0)).max(initial=0) < 0.05 * width, f"track {i} jumps"
        assert len(np.unique(tid[cls == 1])) >= 4
        det = np.loadtxt(seq / "det" / "det.txt", delimiter=",", ndmin=2)
        assert det.shape[1] == 10 and np.all(det[:, 1] == -1) and np.all(det[:, 7:] == -1)
        assert np.all((det[:, 0] >= 1) & (det[:, 0] <= length)) and np.all((det[:, 6] >= 0) & (det[:, 6] <= 1))


def test_mot17_has_occlusions_entries_and_exits():
    frames, rows = syn.mot_sequence(syn.item_rng(0, "mot-occ"), 160, 128, 60)
    rows = np.array(rows, float)
    ped = rows[rows[:, 7] == 1]
    assert (ped[:, 8] < 0.5).any(), "some pedestrian is mostly occluded"
    starts = {i: ped[ped[:, 1] == i, 0].min() for i in np.unique(ped[:, 1])}
    ends = {i: ped[ped[:, 1] == i, 0].max() for i in np.unique(ped[:, 1])}
    assert any(s > 1 for s in starts.values()), "someone enters"
    assert any(e < 60 for e in ends.values()), "someone leaves"


# ---------------------------------------------------------------------------------------------------------------------
# YouTube-VIS
# ---------------------------------------------------------------------------------------------------------------------


def test_youtube_vis_json_frames_and_rle_masks(data):
    root = data / "youtube_vis"
    seen_videos = set()
    for split, n in (("train", 2), ("valid_holdout", 1)):  # 60 and 30 videos scaled by IMAGES / 200, at least 1
        d = json.loads((root / f"{split}.json").read_text())
        assert len(d["videos"]) == n and {c["id"] for c in d["categories"]} == set(syn.YTVIS_CATEGORIES)
        videos = {v["id"]: v for v in d["videos"]}
        assert not seen_videos & set(videos), "held-out videos are not train videos"
        seen_videos |= set(videos)
        for v in videos.values():
            assert v["length"] == len(v["file_names"])
            for name in v["file_names"]:
                with Image.open(root / "train" / "JPEGImages" / name) as im:
                    assert im.size == (v["width"], v["height"])
        for ann in d["annotations"]:
            v = videos[ann["video_id"]]
            assert 1 <= ann["category_id"] <= 40 and ann["iscrowd"] == 0
            assert len(ann["segmentations"]) == len(ann["bboxes"]) == len(ann["areas"]) == v["length"]
            for seg_, box, area in zip(ann["segmentations"], ann["bboxes"], ann["areas"]):
                assert (seg_ is None) == (box is None) == (area is None)
                if seg_ is None:
                    continue
                assert seg_["size"] == [v["height"], v["width"]] and isinstance(seg_["counts"], list)
                mask = mask_utils.decode(mask_utils.frPyObjects(seg_, *seg_["size"]))
                ys, xs = np.nonzero(mask)
                assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == box
                assert mask.sum() == area
                assert box[0] + box[2] <= v["width"] and box[1] + box[3] <= v["height"]


def test_youtube_vis_instances_enter_leave_and_occlude():
    absent, overlapping = 0, 0
    for i in range(12):
        _, _, masks = syn.ytvis_video(syn.item_rng(0, "ytvis-test", i), 128, 96, 10)
        for inst in masks:
            absent += any(m is None for m in inst) and any(m is not None for m in inst)
        for t in range(10):
            frame = [inst[t] for inst in masks if inst[t] is not None]
            overlapping += len(frame) > 1 and any((a & b).any() for a in frame for b in frame if a is not b)
    assert absent >= 1, "some instance enters, leaves or is hidden in some frames"
    assert overlapping == 0, "visible masks of one frame are disjoint (later instances occlude earlier ones)"


# ---------------------------------------------------------------------------------------------------------------------
# ImageNet
# ---------------------------------------------------------------------------------------------------------------------


def test_imagenet_folders_load_with_imagefolder(data):
    from torchvision.datasets import ImageFolder

    for split, n in (("train", 2), ("val", 1)):
        ds = ImageFolder(str(data / "imagenet" / split))
        assert ds.classes == sorted(syn.IMAGENET_CLASSES) and len(ds) == n * len(syn.IMAGENET_CLASSES)
        assert all(Path(p).suffix == ".JPEG" for p, _ in ds.samples)
        image, _ = ds[0]
        assert image.size == (64, 64) and image.mode == "RGB"


# ---------------------------------------------------------------------------------------------------------------------
# Determinism and the command line
# ---------------------------------------------------------------------------------------------------------------------


def digest(root):
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        syn.write(tmp_path / name, images=2, seed=seed, size=(48, 32))
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_command_line_writes_only_the_selected_sets(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "common.synthetic", str(out), "--only", "gta5,cityscapes",
                           "--images", "4", "--size", "64x32", "--seed", "3"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["cityscapes", "gta5"]
    assert len(list((out / "gta5" / "images").glob("*.png"))) == 4
    with Image.open(next((out / "cityscapes" / "gtFine" / "train").rglob("*.png"))) as im:
        assert im.size == (64, 32)


def test_rewrites_its_own_output_but_never_a_foreign_folder(tmp_path):
    syn.write(tmp_path, only=["gta5"], images=3, size=(32, 16))
    syn.write(tmp_path, only=["gta5"], images=2, size=(32, 16))
    assert len(list((tmp_path / "gta5" / "images").glob("*.png"))) == 2, "no stale files from the first write"
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "real.json").write_text("{}")
    with pytest.raises(FileExistsError, match="refusing"):
        syn.write(tmp_path, only=["coco"], images=2, size=(32, 32))
    assert (tmp_path / "coco" / "real.json").read_text() == "{}"
