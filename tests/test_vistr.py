"""VisTR (vistr.py): parity with the official code, matcher, losses, data, inference, local video AP, the script."""
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import sigmoid_focal_loss as tv_focal

import vistr
from tests.fixtures.fill import fill_state_dict

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "vistr_r50.pt"


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def fixture_args(fx, **overrides):
    """Official defaults overridden by the fixture's config (T, Q, backbone, ...) and then by `overrides`."""
    args = vistr.get_args_parser().parse_args([])
    for key, value in fx["config"].items():
        if hasattr(args, key) and key not in ("data_root", "output_dir", "device", "resume"):
            setattr(args, key, value)
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def tiny_args(**overrides):
    """A tiny VisTR (detr.py's light conv stem, 1+2 layers); hidden 384 is what the mask head is built for."""
    args = vistr.get_args_parser().parse_args([
        "--backbone", "convstem", "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64",
        "--num_frames", "2", "--num_queries", "6", "--num_classes", "4", "--dropout", "0", "--device", "cpu"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.fixture(scope="module")
def parity():
    fx = torch.load(FIXTURE, weights_only=False)
    args = fixture_args(fx)
    model = vistr.build_model(args)
    model.load_state_dict(fill_state_dict(fx["shapes"], fx["seed"]), strict=True)  # official keys and shapes
    model.eval()
    with torch.no_grad():
        out = model(fx["inputs"]["clip"])
    return fx, args, out


def test_parity_outputs(parity):
    fx, args, out = parity
    ref = fx["outputs"]
    assert args.num_queries % args.num_frames == 0
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
    assert len(out["aux_outputs"]) == len(ref["aux_outputs"])
    for i, (a, b) in enumerate(zip(out["aux_outputs"], ref["aux_outputs"])):
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4,
                                       msg=lambda m, i=i, key=key: f"aux {i} {key}: {m}")


def test_parity_matcher_and_losses(parity):
    fx, args, out = parity
    ref = fx["outputs"]
    criterion = vistr.build_criterion(args)
    targets = fx["inputs"]["targets"]
    indices = criterion.matcher({k: v for k, v in out.items() if k != "aux_outputs"}, targets)
    for (src, tgt), (rsrc, rtgt) in zip(indices, ref["indices"]):
        assert src.tolist() == rsrc.tolist() and tgt.tolist() == rtgt.tolist(), f"final: {indices} vs {ref['indices']}"
    for i, (aux, ref_aux) in enumerate(zip(out["aux_outputs"], ref["aux_indices"])):
        got = criterion.matcher(aux, targets)
        assert [(s.tolist(), t.tolist()) for s, t in got] == [(s.tolist(), t.tolist()) for s, t in ref_aux], f"aux {i}"
    losses = criterion(out, targets)
    assert set(ref["losses"]) <= set(losses), f"missing losses: {set(ref['losses']) - set(losses)}"
    for key, value in ref["losses"].items():
        torch.testing.assert_close(losses[key], value, rtol=1e-4, atol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
    assert criterion.weight_dict == ref["weight_dict"]
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    torch.testing.assert_close(total, ref["loss_total_weighted"], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Matcher and losses against references
# ---------------------------------------------------------------------------------------------------------------------


def random_targets(g, num_inst, T, num_classes, absent=()):
    labels = torch.randint(1, num_classes, (num_inst,), generator=g).repeat_interleave(T)
    cxcy = torch.rand(num_inst * T, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(num_inst * T, 2, generator=g) * 0.3 + 0.05
    boxes, valid = torch.cat([cxcy, wh], 1), torch.ones(num_inst * T, dtype=torch.int64)
    for i in absent:
        labels[i], boxes[i], valid[i] = 0, 0, 0
    return {"labels": labels, "boxes": boxes, "valid": valid}


def test_matcher_against_brute_force():
    g = torch.Generator().manual_seed(0)
    T, n, C, K = 3, 4, 5, 3
    outputs = {"pred_logits": torch.randn(1, T * n, C + 1, generator=g),
               "pred_boxes": torch.rand(1, T * n, 4, generator=g) * 0.4 + 0.1}
    target = random_targets(g, K, T, C, absent=(4,))
    matcher = vistr.HungarianMatcher(T, 1, 5, 2)
    src, tgt = matcher(outputs, [target])[0]
    prob = outputs["pred_logits"][0].softmax(-1)
    boxes = outputs["pred_boxes"][0]

    def iou(a, b):  # plain IoU of two cxcywh boxes, eps 1e-6 as the official multi_iou
        a, b = vistr.box_cxcywh_to_xyxy(a), vistr.box_cxcywh_to_xyxy(b)
        inter = (torch.min(a[2:], b[2:]) - torch.max(a[:2], b[:2])).clamp(min=0).prod()
        union = (a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter
        return (inter + 1e-6) / (union + 1e-6)

    cost = torch.zeros(n, K)
    for s, k in itertools.product(range(n), range(K)):
        for t in range(T):
            q, j = t * n + s, k * T + t
            cost[s, k] += (-prob[q, target["labels"][j]] + 5 * (boxes[q] - target["boxes"][j]).abs().mean()
                           - 2 * iou(boxes[q], target["boxes"][j])) / T
    best = min(itertools.permutations(range(n), K), key=lambda slots: sum(cost[s, k] for k, s in enumerate(slots)))
    # every valid target frame k*T+t is predicted by query t*n + slot(k); absent frames are left out
    expected = {k * T + t: t * n + best[k] for k in range(K) for t in range(T) if target["valid"][k * T + t]}
    assert dict(zip(tgt.tolist(), src.tolist())) == expected


def test_matcher_reads_slots_from_query_count_and_handles_no_targets():
    T = 2
    matcher = vistr.HungarianMatcher(T, 1, 5, 2)
    outputs = {"pred_logits": torch.randn(1, 14, 4), "pred_boxes": torch.rand(1, 14, 4) * 0.5 + 0.1}
    src, tgt = matcher(outputs, [random_targets(torch.Generator().manual_seed(1), 2, T, 3)])[0]
    assert len(src) == 4 and all(0 <= s < 14 for s in src.tolist())
    slots = src.view(2, T) % 7  # 7 slots per frame; each instance keeps one slot over its frames
    assert (slots == slots[:, :1]).all() and slots[0, 0] != slots[1, 0]
    assert (src.view(2, T) // 7 == torch.arange(T)).all() and sorted(tgt.tolist()) == [0, 1, 2, 3]
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4),
             "valid": torch.zeros(0, dtype=torch.int64)}
    src, tgt = matcher(outputs, [empty])[0]
    assert src.numel() == 0 and tgt.numel() == 0


def test_matcher_valid_frames_official_defect_and_fix():
    # 2 frames, 2 slots, 2 tracks; track 0 is absent in frame 1. Slot 0 predicts track 1, slot 1 track 0, so
    # scipy lists the pairs (slot 0, track 1), (slot 1, track 0): the j-th pair's position differs from its track.
    T, n = 2, 2
    tracks = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])
    target = {"labels": torch.tensor([1, 0, 2, 2]), "boxes": torch.stack([tracks[0], torch.zeros(4), tracks[1],
                                                                            tracks[1]]),
              "valid": torch.tensor([1, 0, 1, 1])}
    boxes = torch.stack([tracks[1], tracks[0], tracks[1], tracks[0]])  # query t * n + s
    outputs = {"pred_logits": torch.zeros(1, T * n, 4), "pred_boxes": boxes[None]}
    pairs = lambda m: sorted(zip(*[x.tolist() for x in m(outputs, [target])[0]]))  # noqa: E731
    # official: pair 0 (slot 0, track 1) gets track 0's frames {0}; pair 1 (slot 1, track 0) gets track 1's {0, 1},
    # so query 3 is trained on track 0's absent frame (target 1: label 0, box 0) and query 2 on nothing
    assert pairs(vistr.HungarianMatcher(T, 1, 5, 2)) == [(0, 2), (1, 0), (3, 1)]
    # matched: each pair on its own track's frames
    assert pairs(vistr.HungarianMatcher(T, 1, 5, 2, valid_frames="matched")) == [(0, 2), (1, 0), (2, 3)]


def test_mask_losses_against_references():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(5, 40, generator=g), (torch.rand(5, 40, generator=g) > 0.5).float()
    ref = tv_focal(logits, targets, alpha=0.25, gamma=2, reduction="none").mean(1).sum() / 3.0
    torch.testing.assert_close(vistr.sigmoid_focal_loss(logits, targets, 3.0), ref)
    p = logits.sigmoid()
    dice = sum(1 - (2 * (p[i] * targets[i]).sum() + 1) / (p[i].sum() + targets[i].sum() + 1) for i in range(5)) / 3.0
    torch.testing.assert_close(vistr.dice_loss(logits, targets, 3.0), dice)


def test_elementwise_giou_matches_torchvision_up_to_eps():
    from torchvision.ops import generalized_box_iou
    g = torch.Generator().manual_seed(0)
    a = vistr.box_cxcywh_to_xyxy(torch.rand(6, 4, generator=g) * 0.5 + 0.2)
    b = vistr.box_cxcywh_to_xyxy(torch.rand(6, 4, generator=g) * 0.5 + 0.2)
    torch.testing.assert_close(vistr.elementwise_giou(a, b), generalized_box_iou(a, b).diag(), atol=1e-4, rtol=0)


def test_deform_conv_with_zero_and_integer_offsets_is_a_shifted_conv():
    g = torch.Generator().manual_seed(0)
    dcn = vistr.DeformConv(4, 3)
    x = torch.randn(2, 4, 7, 9, generator=g)
    zero = torch.zeros(2, 18, 7, 9)
    torch.testing.assert_close(dcn(x, zero), F.conv2d(x, dcn.weight, padding=1))
    shift = zero.clone()
    shift[:, 1::2] = 1.0  # every tap samples one pixel to the right (dx = +1; channel 2k is dy, 2k+1 is dx)
    ref = F.conv2d(F.pad(x, (0, 2, 1, 1)), dcn.weight)  # tap (i, j) at (y + i - 1, x + j): left pad 0, right 2
    torch.testing.assert_close(dcn(x, shift), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 4, 7, 9), (3, 5, 1, 6), (2, 3, 5, 1)])
def test_sampled_deform_conv_equals_torchvision_with_gradients(shape):
    """The CPU path (grid_sample) against torchvision.ops.deform_conv2d (the CUDA path), large offsets, in float64."""
    from torchvision.ops import deform_conv2d
    g = torch.Generator().manual_seed(0)
    n, c, h, w = shape
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    offset = (3 * torch.randn(n, 18, h, w, generator=g, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(6, c, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ref = deform_conv2d(x, offset, weight, padding=(1, 1))
    out = vistr.deform_conv2d_sampled(x, offset, weight, 1)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(out.square().sum(), (x, offset, weight))
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, offset, weight))
    for name, a, b in zip(("input", "offset", "weight"), grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"grad {name}: {m}")


def test_mask_head_init_and_checkpoint_layout():
    model = vistr.build_model(tiny_args())
    head = model.mask_head
    assert head.conv_offset.weight.abs().sum() == 0 and head.conv_offset.bias.abs().sum() == 0
    assert "mask_head.dcn.bias" not in model.state_dict()
    assert [k for k in model.state_dict() if k.startswith("insmask_head.")][0] == "insmask_head.0.weight"
    assert all(k.startswith(("vistr.", "bbox_attention.", "mask_head.", "insmask_head.")) for k in model.state_dict())


def test_optimizer_groups_official_and_with_lr_mask_head():
    model, _, optimizer, _ = vistr.build(tiny_args(lr=1e-4, lr_backbone=1e-5))
    names = {id(p): n for n, p in model.named_parameters()}
    rest, backbone = ([names[id(p)] for p in g["params"]] for g in optimizer.param_groups)  # exactly two, as official
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 1e-5]
    assert all("backbone" in n for n in backbone) and not any("backbone" in n for n in rest)
    assert any(n.startswith("mask_head.") for n in rest)
    model, _, optimizer, _ = vistr.build(tiny_args(lr=1e-4, lr_backbone=1e-5, lr_mask_head=1e-3))
    names = {id(p): n for n, p in model.named_parameters()}
    rest, backbone, heads = ([names[id(p)] for p in g["params"]] for g in optimizer.param_groups)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 1e-5, 1e-3]
    assert sorted(heads) == sorted(n for n, p in model.named_parameters() if n.startswith(vistr.SEGMENTATION_HEADS))
    assert all(n.startswith("vistr.") for n in rest) and len(rest) + len(backbone) + len(heads) == len(names)


# ---------------------------------------------------------------------------------------------------------------------
# Data, inference, local evaluation
# ---------------------------------------------------------------------------------------------------------------------


def rect_mask(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def uncompressed_rle(mask):
    """A binary mask as YouTube-VIS train.json stores it: column-major run lengths, starting with a 0-run."""
    counts = []
    for value, group in itertools.groupby(mask.flatten(order="F")):
        if not counts and value == 1:
            counts.append(0)
        counts.append(len(list(group)))
    return {"counts": counts, "size": list(mask.shape)}


def write_tiny_ytvis(root, lengths=(3, 5, 4, 6), size=(48, 64), num_classes=3, seed=0):
    """YouTube-VIS layout (train.json + train/JPEGImages): squares of a class colour moving on noise.

    Segmentations are uncompressed RLE (as train.json) except the first instance, stored as polygons; the second
    instance of every video is absent from its first frame.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    root = Path(root)
    videos, anns = [], []
    colors = {1: (230, 40, 40), 2: (40, 230, 40), 3: (40, 40, 230)}
    for v, length in enumerate(lengths, start=1):
        names, objs = [], [(1 + (v + i) % num_classes, 4 + 10 * i, 6 + 8 * i) for i in range(2)]
        tracks = [[None] * length for _ in objs]
        for t in range(length):
            img = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
            for i, (cat, y, x) in enumerate(objs):
                if i == 1 and t == 0:
                    continue
                y0, x0 = y + t, x + 2 * t
                img[y0:y0 + 14, x0:x0 + 14] = colors[cat]
                tracks[i][t] = (y0, x0, min(y0 + 14, h), min(x0 + 14, w))
            name = f"vid{v:02d}/{t:05d}.jpg"
            (root / "train" / "JPEGImages" / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "train" / "JPEGImages" / name, quality=95)
            names.append(name)
        videos.append({"id": v, "width": w, "height": h, "length": length, "file_names": names})
        for i, ((cat, _, _), track) in enumerate(zip(objs, tracks)):
            segs, boxes, areas = [], [], []
            for box in track:
                if box is None:
                    segs.append(None), boxes.append(None), areas.append(None)
                    continue
                y0, x0, y1, x1 = box
                if i == 0 and v == 1:
                    segs.append([[x0, y0, x1, y0, x1, y1, x0, y1]])
                else:
                    segs.append(uncompressed_rle(rect_mask(h, w, y0, x0, y1, x1)))
                boxes.append([x0, y0, x1 - x0, y1 - y0])
                areas.append((x1 - x0) * (y1 - y0))
            anns.append({"id": len(anns) + 1, "video_id": v, "category_id": cat, "iscrowd": 0, "height": h,
                         "width": w, "length": 1, "segmentations": segs, "bboxes": boxes, "areas": areas})
    data = {"videos": videos, "annotations": anns,
            "categories": [{"id": c, "name": f"class{c}", "supercategory": "object"} for c in range(1, 4)]}
    (root / "train.json").write_text(json.dumps(data))
    return data


def test_dataset_clip_sampling_and_targets(tmp_path):
    data = write_tiny_ytvis(tmp_path)
    folder, ann = vistr.find_split(tmp_path, "train")
    data = vistr.load_ytvis(ann, num_classes=4)
    T = 5
    ds = vistr.YTVOSDataset(folder, data, [1], T, transforms=lambda clip, target: (clip, target))
    assert len(ds) == 3  # one sample per frame of video 1 (3 frames)
    clip, target = ds[1]  # frames ending at frame 1, wrapping around the 3-frame video: 2, 0, 1, 2, 0 ... reversed
    inds = [i % 3 for i in range(T)][::-1]
    frames = [(1 - i) % 3 for i in inds]
    assert len(clip) == T and target["labels"].shape == (2 * T,)  # instance-major: k * T + t
    for k in range(2):
        for t, f in enumerate(frames):
            j = k * T + t
            present = not (k == 1 and f == 0)
            assert target["valid"][j] == int(present)
            if present:
                seg = data["annotations"][k]["segmentations"][f]
                expected = vistr.decode_segmentation(seg, 48, 64, "test")
                assert (target["masks"][j].numpy() == expected).all() and expected.sum() > 0
                x, y, bw, bh = data["annotations"][k]["bboxes"][f]
                assert target["boxes"][j].tolist() == [x, y, x + bw, y + bh]
            else:
                assert target["labels"][j] == 0 and target["boxes"][j].abs().sum() == 0
                assert target["masks"][j].sum() == 0


def test_train_transform_keeps_boxes_and_masks_aligned(tmp_path):
    write_tiny_ytvis(tmp_path)
    folder, ann = vistr.find_split(tmp_path, "train")
    data = vistr.load_ytvis(ann, num_classes=4)
    ds = vistr.YTVOSDataset(folder, data, [2], 3, vistr.TrainTransform(input_size=40))
    vistr.random.seed(0)
    for i in range(3):
        clip, target = ds[i]
        assert clip.shape[0] == 3 and min(clip.shape[-2:]) == 40
        h, w = clip.shape[-2:]
        assert target["masks"].shape[-2:] == (h, w)
        for box, mask, valid in zip(target["boxes"], target["masks"], target["valid"]):
            if valid and mask.any():
                ys, xs = torch.nonzero(mask, as_tuple=True)
                cx, cy = (xs.min() + xs.max() + 1) / 2 / w, (ys.min() + ys.max() + 1) / 2 / h
                assert abs(box[0] - cx) < 0.1 and abs(box[1] - cy) < 0.1


def test_no_photometric_keeps_the_colours():
    """Photometric distortion changes a frame's colours (e.g. swaps channels); --no_photometric leaves them."""
    frame = Image.new("RGB", (64, 48), (200, 40, 20))
    clip = [frame] * 4
    target = {"boxes": torch.tensor([[8.0, 8.0, 30.0, 30.0]]), "labels": torch.tensor([1]),
              "valid": torch.tensor([1]), "masks": torch.zeros((1, 48, 64), dtype=torch.uint8)}
    vistr.random.seed(0)
    torch.manual_seed(0)
    colour = torch.tensor([200, 40, 20]) / 255
    expected = (colour - torch.tensor(vistr.IMAGENET_MEAN)) / torch.tensor(vistr.IMAGENET_STD)
    plain, _ = vistr.TrainTransform(input_size=40, photometric=False)(clip, target)
    assert torch.allclose(plain.mean((-2, -1)), expected.expand(4, 3), atol=1e-5)
    jittered, _ = vistr.TrainTransform(input_size=40)(clip, target)
    assert (jittered.mean((-2, -1)) - expected).abs().amax() > 0.1
    assert vistr.get_args_parser().parse_args(["--no_photometric"]).photometric is False
    assert vistr.get_args_parser().parse_args([]).photometric is True


def test_bad_input_errors(tmp_path):
    data = write_tiny_ytvis(tmp_path)
    folder, ann = vistr.find_split(tmp_path, "train")
    (folder / data["videos"][0]["file_names"][1]).unlink()
    ds = vistr.YTVOSDataset(folder, vistr.load_ytvis(ann, 4), [1], 2, lambda c, t: (c, t))
    with pytest.raises(FileNotFoundError, match="00001.jpg"):
        ds[1]
    bad = json.loads(ann.read_text())
    bad["annotations"][2]["segmentations"][0] = {"counts": [0, 10], "size": [10, 1]}
    with pytest.raises(ValueError, match="segmentation of size"):
        vistr.decode_segmentation(bad["annotations"][2]["segmentations"][0], 48, 64, "annotation 3")
    bad["annotations"][2]["category_id"] = 41
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="category_id 41"):
        vistr.load_ytvis(tmp_path / "bad.json", num_classes=41)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vistr.find_split(tmp_path / "nowhere", "train")


def test_video_ap_hand_worked_example():
    """One video, two frames, one ground-truth track; spatio-temporal IoU decides the AP.

    GT: frame 0 a 10x10 square (100 px), frame 1 a 6x10 bar (60 px). Detection A (score 0.9): the same square in
    frame 0, nothing in frame 1 -> IoU = (100 + 0) / (100 + 60) = 0.625 (the per-frame mean would be 0.5).
    A matches at IoU thresholds 0.50, 0.55, 0.60 and not above -> AP = 3/10 = 30%. With a false positive B ranked
    above A (score 0.95, disjoint), precision at recall 1 is 1/2 at those thresholds -> AP = 15%.
    """
    h, w = 20, 20
    rle = vistr.encode_mask
    gt = {"videos": [{"id": 7, "height": h, "width": w, "length": 2, "file_names": ["a", "b"]}],
          "categories": [{"id": 1, "name": "x"}],
          "annotations": [{"id": 1, "video_id": 7, "category_id": 1, "iscrowd": 0,
                           "segmentations": [rle(rect_mask(h, w, 0, 0, 10, 10)), rle(rect_mask(h, w, 0, 0, 6, 10))],
                           "bboxes": [[0, 0, 10, 10], [0, 0, 10, 6]], "areas": [100, 60]}]}
    det_a = {"video_id": 7, "score": 0.9, "category_id": 1, "segmentations": [rle(rect_mask(h, w, 0, 0, 10, 10)), None]}
    det_b = {"video_id": 7, "score": 0.95, "category_id": 1,
             "segmentations": [rle(rect_mask(h, w, 12, 12, 20, 20)), rle(rect_mask(h, w, 12, 12, 20, 20))]}
    assert vistr.sequence_iou(det_a["segmentations"], [
        vistr.segmentation_to_rle(s, h, w, "") for s in gt["annotations"][0]["segmentations"]]) == 0.625
    assert vistr.video_ap(gt, [det_a], [7])["AP"] == pytest.approx(30.0)
    stats = vistr.video_ap(gt, [det_a, det_b], [7])
    assert stats["AP"] == pytest.approx(15.0) and stats["AP50"] == pytest.approx(50.0)
    assert stats["AP75"] == pytest.approx(0.0)


def test_inference_short_and_long_videos_give_results_json(tmp_path):
    torch.manual_seed(0)
    args = tiny_args()
    model = vistr.build_model(args).eval()
    frames = [Image.fromarray(np.full((30, 40, 3), 40 * i, dtype=np.uint8)) for i in range(5)]
    for length in (1, 2, 5):  # shorter than, equal to and longer than num_frames (2)
        results = vistr.infer_video(model, frames[:length], 3, args.num_frames, 32, "cpu")
        json.dumps(results)
        for r in results:
            assert r["video_id"] == 3 and len(r["segmentations"]) == length and 0 <= r["score"] <= 1
            assert 0 <= r["category_id"] < args.num_classes
            for s in r["segmentations"]:
                assert s is None or tuple(s["size"]) == (30, 40)


def test_clip_starts_cover_the_video_and_end_at_its_last_frame():
    assert vistr.clip_starts(3, 5, 2) == [0]
    assert vistr.clip_starts(10, 4, 2) == [0, 2, 4, 6]
    assert vistr.clip_starts(11, 4, 2) == [0, 2, 4, 6, 7]
    assert vistr.clip_starts(9, 4, 4) == [0, 4, 5]


class ScriptedClips(torch.nn.Module):
    """Stands in for VisTR: returns the given outputs, one per call, in order."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, clip):
        return self.outputs.pop(0)


def two_instance_clip(order, num_frames):
    """Outputs of one clip with 2 slots: instance A (class 1, left half) and B (class 2, right half), in `order`."""
    logits = {"A": torch.tensor([0.0, 8, 0, 0]), "B": torch.tensor([0.0, 0, 8, 0])}
    masks = {"A": torch.tensor([10.0, 10, -10, -10]).expand(4, 4), "B": torch.tensor([-10.0, -10, 10, 10]).expand(4, 4)}
    return {"pred_logits": torch.stack([logits[k] for _ in range(num_frames) for k in order])[None],
            "pred_masks": torch.stack([masks[k] for _ in range(num_frames) for k in order])[None]}


@pytest.mark.parametrize("num_frames, stride", [(3, 1), (2, 2)])
def test_clip_linking_follows_instances_when_the_slot_order_swaps(num_frames, stride):
    """A 4-frame video in two clips; the model lists A, B in the first clip and B, A in the second.

    (3, 1): clips 0-2 and 1-3 share frames 1-2, linked by mask IoU there; (2, 2): clips 0-1 and 2-3 share none,
    linked by frame 1 against frame 2. IoU linking gives A (left half) and B (right half) in every frame; slot
    linking takes slot 0 for one instance across clips, so its sequence turns from A into B.
    """
    frames = [Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8))] * 4
    left = np.zeros((16, 16), dtype=np.uint8)
    left[:, :8] = 1
    right = 1 - left
    clips = [two_instance_clip("AB", num_frames), two_instance_clip("BA", num_frames)]
    results = vistr.infer_video(ScriptedClips(clips), frames, 5, num_frames, 16, "cpu", clip_stride=stride)
    assert [r["category_id"] for r in results] == [1, 2]
    for r, expected in zip(results, (left, right)):
        assert len(r["segmentations"]) == 4
        for t, segm in enumerate(r["segmentations"]):
            got = vistr.mask_utils.decode(vistr.segmentation_to_rle(segm, 16, 16, ""))
            assert (got == expected).all(), f"category {r['category_id']}, frame {t}"
    clips = [two_instance_clip("AB", num_frames), two_instance_clip("BA", num_frames)]
    results = vistr.infer_video(ScriptedClips(clips), frames, 5, num_frames, 16, "cpu", clip_stride=stride,
                                clip_linking="slot")
    first = [vistr.mask_utils.decode(vistr.segmentation_to_rle(s, 16, 16, "")) for s in results[0]["segmentations"]]
    assert (first[0] == left).all() and (first[3] == right).all()


def test_per_frame_baseline_links_detections_from_frame_to_frame():
    """An image model lists A (image class 4 = video class 1, left half), B (image class 7 = video class 2, right
    half) in frames 0 and 2 and B, A in frame 1; the baseline links them by mask IoU with the previous frame."""
    frames = [Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8))] * 3
    logits = {"A": torch.full((9,), -5.0).index_fill(0, torch.tensor([4]), 5.0),
              "B": torch.full((9,), -5.0).index_fill(0, torch.tensor([7]), 5.0)}
    masks = {"A": torch.tensor([10.0, 10, -10, -10]).expand(4, 4), "B": torch.tensor([-10.0, -10, 10, 10]).expand(4, 4)}
    outputs = [{"pred_logits": torch.stack([logits[k] for k in order])[None],
                "pred_masks": torch.stack([masks[k] for k in order])[None]} for order in ("AB", "BA", "AB")]
    class_map = torch.tensor([-1, 4, 7])
    results = vistr.infer_video_per_frame(ScriptedClips(outputs), class_map, frames, 1, 16, "cpu")
    assert [r["category_id"] for r in results] == [1, 2]
    for r, columns in zip(results, (slice(0, 8), slice(8, 16))):
        for segm in r["segmentations"]:
            got = vistr.mask_utils.decode(vistr.segmentation_to_rle(segm, 16, 16, ""))
            assert got[:, columns].all() and got.sum() == 128
    assert vistr.frame_mask_iou(results) == 0.0
    assert vistr.frame_mask_iou(results + results[:1]) == pytest.approx(1 / 3)  # pairs: A-B, A-A', B-A'


def test_per_frame_baseline_from_a_detr_segmentation_checkpoint(tmp_path):
    """--eval --image_model: a detr.py --masks checkpoint, its classes matched to the video's by name."""
    import detr
    data = write_tiny_ytvis(tmp_path / "ytvis")
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    categories = [{"id": 7, "name": "class2"}, {"id": 4, "name": "class1"}, {"id": 9, "name": "other"}]
    (tmp_path / "coco" / "annotations" / "instances_train2017.json").write_text(json.dumps({"categories": categories}))
    image_args = detr.get_args_parser().parse_args([
        "--masks", "--backbone", "convstem", "--hidden_dim", "128", "--enc_layers", "1", "--dec_layers", "1",
        "--dim_feedforward", "64", "--num_queries", "4", "--num_classes", "10", "--coco_path", str(tmp_path / "coco"),
        "--device", "cpu"])
    torch.manual_seed(0)
    torch.save({"model": detr.build(image_args)[0].state_dict(), "args": vars(image_args)}, tmp_path / "segm.pth")
    _, class_map = vistr.load_image_model(tmp_path / "segm.pth", data["categories"], "cpu")
    assert class_map.tolist() == [-1, 4, 7, -1]
    args = tiny_args(data_root=str(tmp_path / "ytvis"), eval=True, image_model=str(tmp_path / "segm.pth"),
                     output_dir=str(tmp_path / "out"), val_size=32, holdout_fraction=0.5)
    stats = vistr.evaluate(vistr.build_model(args), args, torch.device("cpu"))
    assert "AP" in stats and "frame_mask_iou" in stats
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["video_id"] for r in results} <= {3, 4} and all(r["category_id"] in (1, 2) for r in results)


def test_crop_that_removes_an_instance_official_and_absent():
    """Instance 0 lies in the left part of frame 1 only; a crop of the right part removes it there."""
    masks = torch.zeros(4, 20, 40, dtype=torch.uint8)  # instance-major: k * T + t, T = 2
    masks[0, 5:15, 25:35] = 1
    masks[1, 5:15, 2:12] = 1
    masks[2:, 2:8, 22:30] = 1
    target = {"boxes": torch.tensor([[25.0, 5, 35, 15], [2, 5, 12, 15], [22, 2, 30, 8], [22, 2, 30, 8]]),
              "labels": torch.tensor([1, 1, 2, 2]), "valid": torch.ones(4, dtype=torch.int64), "masks": masks}
    clip = [Image.new("RGB", (40, 20))] * 2
    region = (0, 20, 20, 20)  # top, left, height, width: x in [20, 40)
    _, official = vistr.crop_clip(clip, target, region)
    assert official["valid"].tolist() == [1, 1, 1, 1] and official["labels"].tolist() == [1, 1, 2, 2]
    assert official["boxes"][1].tolist() == [0, 5, 0, 15] and official["masks"][1].sum() == 0  # zero-area box
    _, absent = vistr.crop_clip(clip, target, region, cropped_out="absent")
    assert absent["valid"].tolist() == [1, 0, 1, 1] and absent["labels"].tolist() == [1, 0, 2, 2]
    assert absent["boxes"][1].tolist() == [0, 0, 0, 0]
    assert torch.equal(absent["boxes"][[0, 2, 3]], official["boxes"][[0, 2, 3]])
    assert vistr.get_args_parser().parse_args([]).cropped_out == "official"


@pytest.mark.parametrize("backbone, stride", [("resnet18", 4), ("convstem", 2)])
def test_pred_masks_at_the_first_feature_map(backbone, stride):
    """pred_masks have the size of the backbone's layer1 features: ceil(H / 4) for ResNets, ceil(H / 2) convstem."""
    torch.manual_seed(0)
    model = vistr.build_model(tiny_args(backbone=backbone, num_frames=1, num_queries=2)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 33, 47))
    assert model.vistr.backbone[0].strides[0] == stride
    assert out["pred_masks"].shape[-2:] == (-(-33 // stride), -(-47 // stride))


def test_evaluate_valid_split_writes_codalab_results(tmp_path):
    """--eval_split valid: the official layout (valid.json without annotations, valid/JPEGImages) -> results.json."""
    data = write_tiny_ytvis(tmp_path)
    (tmp_path / "valid").mkdir()
    (tmp_path / "train" / "JPEGImages").rename(tmp_path / "valid" / "JPEGImages")
    (tmp_path / "valid.json").write_text(json.dumps({"videos": data["videos"][:2], "categories": data["categories"]}))
    args = tiny_args(data_root=str(tmp_path), eval_split="valid", output_dir=str(tmp_path / "out"), val_size=32)
    torch.manual_seed(0)
    assert vistr.evaluate(vistr.build_model(args), args, torch.device("cpu")) == {}
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["video_id"] for r in results} <= {1, 2}
    assert all(len(r["segmentations"]) == data["videos"][r["video_id"] - 1]["length"] for r in results)


def test_pretrained_weights_from_detr_checkpoint(tmp_path):
    import detr
    args = tiny_args()
    detr_args = detr.get_args_parser().parse_args([])
    for key in ("backbone", "enc_layers", "dec_layers", "dim_feedforward", "hidden_dim", "nheads"):
        setattr(detr_args, key, getattr(args, key))
    detr_args.lr_backbone = 1e-5
    backbone, transformer = detr.build_backbone(detr_args), detr.build_transformer(detr_args)
    detr_model = detr.DETR(backbone, transformer, num_classes=91, num_queries=7, aux_loss=True)
    torch.save({"model": detr_model.state_dict()}, tmp_path / "detr.pth")
    torch.save({"model": {"detr." + k: v for k, v in detr_model.state_dict().items()}}, tmp_path / "detr_segm.pth")
    for name in ("detr.pth", "detr_segm.pth"):
        model = vistr.build_model(args)
        vistr.load_detr_weights(model, tmp_path / name)
        own = model.state_dict()
        for key, value in detr_model.state_dict().items():
            if key.startswith(("class_embed", "query_embed")):
                continue
            assert torch.equal(own["vistr." + key], value), key
    detr_args.hidden_dim = 256  # detr.py's default width: only the backbone fits; the rest is skipped and listed
    small = detr.DETR(detr.build_backbone(detr_args), detr.build_transformer(detr_args), 91, 7, aux_loss=True)
    torch.save({"model": small.state_dict()}, tmp_path / "detr256.pth")
    model = vistr.build_model(args)
    before = model.vistr.transformer.encoder.layers[0].linear1.weight.clone()
    vistr.load_detr_weights(model, tmp_path / "detr256.pth")
    assert torch.equal(model.vistr.transformer.encoder.layers[0].linear1.weight, before)
    own = model.state_dict()
    assert all(torch.equal(own["vistr." + k], v) for k, v in small.state_dict().items() if k.startswith("backbone."))


# ---------------------------------------------------------------------------------------------------------------------
# Training: overfit one clip, and the script end to end
# ---------------------------------------------------------------------------------------------------------------------


def test_overfit_one_clip(tmp_path):
    torch.manual_seed(0)
    write_tiny_ytvis(tmp_path)
    folder, ann = vistr.find_split(tmp_path, "train")
    args = tiny_args(lr=3e-4)
    ds = vistr.YTVOSDataset(folder, vistr.load_ytvis(ann, 4), [2], args.num_frames,
                            lambda c, t: vistr.to_model_input(*vistr.resize_clip(c, t, 32)))
    clip, target = ds[1]
    model, criterion, optimizer, _ = vistr.build(args)
    model.train()
    losses = []
    for _ in range(25):
        loss_dict = criterion(model(clip), [target])
        loss = sum(loss_dict[k] * criterion.weight_dict[k] for k in loss_dict if k in criterion.weight_dict)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], f"loss did not halve on one clip: {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_batch_of_clips_averages_their_gradients(tmp_path):
    """--batch_size 2: the clips go through the model one by one; the step uses the mean of their gradients."""
    from common import training as tu
    write_tiny_ytvis(tmp_path)
    folder, ann = vistr.find_split(tmp_path, "train")
    args = tiny_args(clip_max_norm=0.0, batch_size=2, max_iters=0, print_freq=100, amp=False, distributed=False)
    ds = vistr.YTVOSDataset(folder, vistr.load_ytvis(ann, 4), [2, 3], args.num_frames,
                            lambda c, t: vistr.to_model_input(*vistr.resize_clip(c, t, 32)))
    clips = [ds[1], ds[6]]
    torch.manual_seed(0)
    model, criterion, optimizer, _ = vistr.build(args)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = []
    for clip, target in clips:  # each clip alone, from the same weights (BatchNorm statistics restored)
        model.load_state_dict(state)
        model.zero_grad()
        loss_dict = criterion(model(clip), [target])
        sum(loss_dict[k] * criterion.weight_dict[k] for k in loss_dict if k in criterion.weight_dict).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.load_state_dict(state)
    scaler = tu.grad_scaler("cpu", False)
    vistr.train_one_epoch(model, criterion, [clips], optimizer, scaler, torch.device("cpu"), 0, args)
    assert optimizer.state  # one step was taken
    for n, p in model.named_parameters():
        if n in grads[0]:
            torch.testing.assert_close(p.grad, (grads[0][n] + grads[1][n]) / 2, rtol=1e-4, atol=1e-6)


def test_amp_training_step_on_cpu():
    """--amp (bfloat16 autocast on CPU): finite losses and gradients; deformable sampling stays in float32."""
    from common import training as tu
    torch.manual_seed(0)
    args = tiny_args(amp=True)
    model, criterion, optimizer, _ = vistr.build(args)
    target = random_targets(torch.Generator().manual_seed(0), 2, args.num_frames, 3)
    target["masks"] = torch.zeros(len(target["labels"]), 32, 40, dtype=torch.uint8)
    target["masks"][:, 8:20, 10:30] = 1
    with tu.amp_autocast("cpu", True):
        out = model(torch.randn(args.num_frames, 3, 32, 40))
    losses = criterion(out, [target])
    loss = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    x, offset = torch.randn(1, 2, 40, 90), torch.full((1, 18, 40, 90), 0.3)
    weight = torch.randn(3, 2, 3, 3)
    with tu.amp_autocast("cpu", True):
        low = vistr.deform_conv2d_sampled(x, offset, weight, 1).float()
    ref = vistr.deform_conv2d_sampled(x, offset, weight, 1)
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()  # bf16 matmul error only, not misplaced samples


def saved_bytes_and_gradients(model, clip, target, criterion):
    """Bytes of the tensors autograd keeps for the backward pass (by storage), then the loss and the gradients."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(0)  # the same dropout masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = criterion(model(clip), [target])
        loss = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    loss.backward()
    return sum(storages.values()), loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_checkpoint_activations_same_gradients_less_saved_memory():
    """In float64, so that the mask head run frame by frame (rather than all frames at once) rounds alike."""
    args = tiny_args(dropout=0.1, num_frames=3, num_queries=9)
    torch.manual_seed(0)
    plain = vistr.build_model(args).double().train()
    lean = vistr.build_model(tiny_args(dropout=0.1, num_frames=3, num_queries=9, checkpoint_activations=True))
    lean = lean.double().train()
    lean.load_state_dict(plain.state_dict())
    assert set(lean.state_dict()) == set(plain.state_dict())
    criterion = vistr.build_criterion(args)
    target = random_targets(torch.Generator().manual_seed(0), 2, args.num_frames, 3)
    target["masks"] = torch.zeros(len(target["labels"]), 32, 40, dtype=torch.uint8)
    target["masks"][:, 8:20, 10:30] = 1
    target["boxes"] = target["boxes"].double()
    clip = torch.randn(args.num_frames, 3, 32, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    saved_plain, loss_plain, grads_plain = saved_bytes_and_gradients(plain, clip, target, criterion)
    saved_lean, loss_lean, grads_lean = saved_bytes_and_gradients(lean, clip, target, criterion)
    torch.testing.assert_close(loss_lean, loss_plain, rtol=1e-10, atol=1e-10)
    assert grads_lean.keys() == grads_plain.keys()
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_lean[name], grad, rtol=1e-8, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    assert saved_lean < 0.5 * saved_plain, f"saved {saved_lean} bytes with checkpointing, {saved_plain} without"


def test_script_trains_then_evaluates_from_checkpoint(tmp_path):
    write_tiny_ytvis(tmp_path / "data")
    out = tmp_path / "out"
    common = [sys.executable, str(ROOT / "vistr.py"), "--data_root", str(tmp_path / "data"), "--output_dir", str(out),
              "--backbone", "convstem", "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64",
              "--num_frames", "2", "--num_queries", "6", "--num_classes", "4", "--input_size", "32",
              "--val_size", "32", "--num_workers", "0", "--device", "cpu", "--holdout_fraction", "0.25"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(common + ["--epochs", "1", "--max_iters", "3"], capture_output=True, text=True, cwd=ROOT,
                         env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert (out / "checkpoint.pth").is_file() and (out / "eval.json").is_file()
    assert "AP" in json.loads((out / "eval.json").read_text())
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert "train_loss" in log[0] and "test_AP" in log[-1]
    run = subprocess.run(common + ["--eval", "--resume", str(out / "checkpoint.pth"), "--viz"],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert all(set(r) == {"video_id", "score", "category_id", "segmentations"} for r in results)
    assert all(r["video_id"] == 4 and len(r["segmentations"]) == 6 for r in results)  # held out: the last video
    if results:
        assert len(list((out / "viz" / "4").glob("*.png"))) == 6 and (out / "viz" / "4.png").is_file()
