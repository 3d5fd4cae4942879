"""DETR: parity with the official code (tests/fixtures/detr_r50.pt), transforms, bad input, the script end to end
(train, --resume, --eval, --viz) on tiny COCO-format data, and overfitting one batch."""
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import detr
from common import synthetic, training
from tests.fixtures.fill import fill_state_dict

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "detr_r50.pt"
TOL = {"rtol": 1e-4, "atol": 1e-4}
# pycocotools 2.0.11 under NumPy 2 warns inside its own decode; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# ---------------------------------------------------------------------------------------------------------------------
# Parity with the official implementation
# ---------------------------------------------------------------------------------------------------------------------


def args_from_fixture(fx):
    """Our parser's defaults overridden by every official argument the fixture was made with."""
    args = detr.get_args_parser().parse_args([])
    for key, value in fx["config"]["args"].items():
        if hasattr(args, key):
            setattr(args, key, value)
    args.num_classes = fx["config"]["num_classes"]
    return args


@pytest.fixture(scope="module")
def parity():
    fx = torch.load(FIXTURE, weights_only=False)
    model, criterion, postprocessors = detr.build(args_from_fixture(fx))
    state = fill_state_dict(fx["shapes"], fx["seed"])
    assert {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()} == \
        {k: (list(s), d) for k, (s, d) in fx["shapes"].items()}, "state-dict keys/shapes differ from the official"
    training.load_model_state(model, state, "fill_state_dict(detr_r50.pt shapes)", strict=True)
    model.eval()
    criterion.eval()
    return fx, model, criterion, postprocessors


def assert_outputs_close(ours, official, what):
    torch.testing.assert_close(ours["pred_logits"], official["pred_logits"], **TOL, msg=lambda m: f"{what} logits: {m}")
    torch.testing.assert_close(ours["pred_boxes"], official["pred_boxes"], **TOL, msg=lambda m: f"{what} boxes: {m}")
    assert len(ours["aux_outputs"]) == len(official["aux_outputs"]), f"{what}: number of aux outputs"
    for i, (a, b) in enumerate(zip(ours["aux_outputs"], official["aux_outputs"])):
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(a[key], b[key], **TOL, msg=lambda m, i=i, key=key: f"{what} aux {i} {key}: {m}")


def assert_losses_close(ours, official, total, weight_dict, what):
    assert set(ours) == set(official), f"{what}: loss keys differ: {set(ours) ^ set(official)}"
    for key, value in official.items():
        torch.testing.assert_close(ours[key], value, **TOL, msg=lambda m, key=key: f"{what} {key}: {m}")
    ours_total = sum(ours[k] * weight_dict[k] for k in ours if k in weight_dict)
    torch.testing.assert_close(ours_total, total, **TOL, msg=lambda m: f"{what} total loss: {m}")


def assert_postprocess_close(ours, official, what):
    assert len(ours) == len(official)
    for i, (a, b) in enumerate(zip(ours, official)):
        torch.testing.assert_close(a["scores"], b["scores"], **TOL, msg=lambda m, i=i: f"{what} image {i} scores: {m}")
        assert torch.equal(a["labels"], b["labels"]), f"{what} image {i}: labels differ"
        torch.testing.assert_close(a["boxes"], b["boxes"], **TOL, msg=lambda m, i=i: f"{what} image {i} boxes: {m}")


def assert_indices_equal(ours, official, what):
    for i, ((q, t), (oq, ot)) in enumerate(zip(ours, official, strict=True)):
        assert torch.equal(q, oq) and torch.equal(t, ot), \
            f"{what} image {i}: {(q.tolist(), t.tolist())} vs official {(oq.tolist(), ot.tolist())}"


def test_weight_dict_matches_official(parity):
    fx, _, criterion, _ = parity
    assert criterion.weight_dict == fx["config"]["weight_dict"]
    assert criterion.eos_coef == fx["config"]["eos_coef"]


def test_parity_outputs_intermediates_losses_postprocess(parity):
    fx, model, criterion, postprocessors = parity
    inputs, expected = fx["inputs"], fx["outputs"]
    seen = {}
    hooks = [model.backbone.register_forward_hook(lambda m, i, o: seen.update(src=o[0][-1], pos=o[1][-1])),
             model.transformer.register_forward_hook(lambda m, i, o: seen.update(memory=o[1]))]
    with torch.no_grad():
        outputs = model(list(inputs["images"]))  # a list: the padding / mask path
    for h in hooks:
        h.remove()
    inter = expected["intermediate"]
    assert torch.equal(seen["src"].mask, inter["feature_mask"]), "feature mask differs"
    torch.testing.assert_close(seen["src"].tensors, inter["backbone_src"], **TOL)
    torch.testing.assert_close(seen["pos"], inter["pos"], **TOL)
    torch.testing.assert_close(seen["memory"], inter["memory"], **TOL)
    assert_outputs_close(outputs, expected, "top level")
    with torch.no_grad():
        losses = criterion(outputs, inputs["targets"])
    assert_losses_close(losses, expected["loss_dict"], expected["total_loss"], criterion.weight_dict, "top level")
    assert_postprocess_close(postprocessors["bbox"](outputs, inputs["target_sizes"]), expected["postprocess"],
                             "top level postprocess")


def test_parity_query_override(parity):
    """Distinct queries: outputs, every layer's matching, losses and post-processing as the official code."""
    fx, model, criterion, postprocessors = parity
    inputs, expected = fx["inputs"], fx["outputs"]["query_override"]
    original = model.query_embed.weight.detach().clone()
    try:
        with torch.no_grad():
            model.query_embed.weight.copy_(inputs["query_embed_override"])
            outputs = model(list(inputs["images"]))
    finally:
        with torch.no_grad():
            model.query_embed.weight.copy_(original)
    assert_outputs_close(outputs, expected, "query_override")
    indices = criterion.match_all(outputs, inputs["targets"])
    assert_indices_equal(indices[0], expected["matcher_indices"], "query_override final layer")
    for layer, official in enumerate(expected["aux_matcher_indices"]):
        assert_indices_equal(indices[layer + 1], official, f"query_override aux {layer}")
    with torch.no_grad():
        losses = criterion(outputs, inputs["targets"])
    assert_losses_close(losses, expected["loss_dict"], expected["total_loss"], criterion.weight_dict,
                        "query_override")
    assert_postprocess_close(postprocessors["bbox"](outputs, inputs["target_sizes"]), expected["postprocess"],
                             "query_override postprocess")


def test_parity_synthetic_predictions(parity):
    """The official matcher, criterion and PostProcess on stored well-separated predictions (no model)."""
    fx, _, criterion, postprocessors = parity
    inputs, expected = fx["inputs"], fx["outputs"]["synthetic"]
    outputs = inputs["synthetic_outputs"]
    indices = criterion.match_all(outputs, inputs["targets"])
    assert_indices_equal(indices[0], expected["matcher_indices"], "synthetic final layer")
    for layer, official in enumerate(expected["aux_matcher_indices"]):
        assert_indices_equal(indices[layer + 1], official, f"synthetic aux {layer}")
    assert_losses_close(criterion(outputs, inputs["targets"]), expected["loss_dict"], expected["total_loss"],
                        criterion.weight_dict, "synthetic")
    assert_postprocess_close(postprocessors["bbox"](outputs, inputs["target_sizes"]), expected["postprocess"],
                             "synthetic postprocess")


# ---------------------------------------------------------------------------------------------------------------------
# Parity of the segmentation / panoptic model (tests/fixtures/detr_r50_panoptic.pt)
# ---------------------------------------------------------------------------------------------------------------------

PANOPTIC_FIXTURE = ROOT / "tests" / "fixtures" / "detr_r50_panoptic.pt"


@pytest.fixture(scope="module")
def panoptic():
    fx = torch.load(PANOPTIC_FIXTURE, weights_only=False)
    model, criterion, postprocessors = detr.build(args_from_fixture(fx))
    shapes = {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()}
    official = {k: (list(s), d) for k, (s, d) in fx["shapes"].items()}
    assert shapes == official, f"state-dict keys/shapes differ from the official: {set(shapes) ^ set(official)}"
    training.load_model_state(model, fill_state_dict(fx["shapes"], fx["seed"]), "fill_state_dict(panoptic)")
    model.eval()
    criterion.eval()
    return fx, model, criterion, postprocessors


def run_panoptic_model(model, images):
    """Outputs and the intermediates the fixture stores, from forward hooks."""
    seen = {}
    hooks = [model.detr.backbone.register_forward_hook(lambda m, i, o: seen.update(features=o[0], pos=o[1][-1])),
             model.detr.input_proj.register_forward_hook(lambda m, i, o: seen.update(src_proj=o)),
             model.detr.transformer.register_forward_hook(lambda m, i, o: seen.update(hs=o[0], memory=o[1])),
             model.bbox_attention.register_forward_hook(lambda m, i, o: seen.update(bbox_mask=o))]
    try:
        with torch.no_grad():
            outputs = model(list(images))  # a list: the padding / mask path
    finally:
        for h in hooks:
            h.remove()
    return outputs, seen


def assert_masks_close(ours, official, what):
    torch.testing.assert_close(ours["pred_masks"], official["pred_masks"], **TOL, msg=lambda m: f"{what} masks: {m}")


def assert_segm_equal(postprocessors, outputs, inputs, official, rows, what):
    """PostProcessSegm (after PostProcess, as engine.evaluate) on stored predictions: the stored mask rows equal."""
    results = postprocessors["bbox"](outputs, inputs["orig_target_sizes"])
    results = postprocessors["segm"](results, outputs, inputs["orig_target_sizes"], inputs["target_sizes"])
    for i, (ours, theirs) in enumerate(zip(results, official, strict=True)):
        assert ours["masks"].dtype == torch.uint8
        assert ours["masks"].shape[1:] == theirs["masks"].shape[1:], f"{what} image {i}: mask size"
        differ = (ours["masks"][:rows] != theirs["masks"]).sum().item()
        assert differ == 0, f"{what} image {i}: {differ} mask pixels differ from the official PostProcessSegm"


def assert_panoptic_equal(postprocessors, outputs, inputs, official, what):
    """PostProcessPanoptic on stored predictions: decoded PNG and segments_info equal the official ones."""
    results = postprocessors["panoptic"](outputs, inputs["target_sizes"], inputs["orig_target_sizes"])
    for i, (ours, theirs) in enumerate(zip(results, official, strict=True)):
        png = torch.from_numpy(np.asarray(Image.open(io.BytesIO(ours["png_string"])).convert("RGB")).copy())
        assert png.shape == theirs["png"].shape, f"{what} image {i}: PNG size {png.shape} vs {theirs['png'].shape}"
        differ = (png != theirs["png"]).any(-1).sum().item()
        assert differ == 0, f"{what} image {i}: {differ} pixels of the panoptic PNG differ"
        assert ours["segments_info"] == theirs["segments_info"], \
            f"{what} image {i}: {ours['segments_info']} vs official {theirs['segments_info']}"


def test_panoptic_parity_outputs_intermediates_losses(panoptic):
    fx, model, criterion, postprocessors = panoptic
    inputs, expected = fx["inputs"], fx["outputs"]
    outputs, seen = run_panoptic_model(model, inputs["images"])
    inter = expected["intermediate"]
    assert [list(f.tensors.shape) for f in seen["features"]] == inter["feature_shapes"]
    for level, (feature, mask) in enumerate(zip(seen["features"], inter["feature_masks"])):
        assert torch.equal(feature.mask, mask), f"padding mask of backbone level {level} differs"
    for key in ("pos", "src_proj", "memory", "bbox_mask"):
        torch.testing.assert_close(seen[key], inter[key], **TOL, msg=lambda m, key=key: f"{key}: {m}")
    assert_outputs_close(outputs, expected, "panoptic top level")
    assert_masks_close(outputs, expected, "panoptic top level")
    with torch.no_grad():
        losses = criterion(outputs, inputs["targets"])
    assert_losses_close(losses, expected["loss_dict"], expected["total_loss"], criterion.weight_dict,
                        "panoptic top level")
    assert_postprocess_close(postprocessors["bbox"](outputs, inputs["orig_target_sizes"]), expected["postprocess"],
                             "panoptic top level postprocess")


def test_panoptic_parity_query_override(panoptic):
    """Distinct queries: outputs, matching on every layer, losses; the post-processors on the stored predictions."""
    fx, model, criterion, postprocessors = panoptic
    inputs, expected = fx["inputs"], fx["outputs"]["query_override"]
    query_embed = model.detr.query_embed.weight
    original = query_embed.detach().clone()
    try:
        with torch.no_grad():
            query_embed.copy_(inputs["query_embed_override"])
        outputs, seen = run_panoptic_model(model, inputs["images"])
    finally:
        with torch.no_grad():
            query_embed.copy_(original)
    torch.testing.assert_close(seen["hs"][-1], expected["intermediate"]["hs_last"], **TOL)
    torch.testing.assert_close(seen["bbox_mask"], expected["intermediate"]["bbox_mask"], **TOL)
    assert_outputs_close(outputs, expected, "panoptic query_override")
    assert_masks_close(outputs, expected, "panoptic query_override")
    indices = criterion.match_all(outputs, inputs["targets"])
    assert_indices_equal(indices[0], expected["matcher_indices"], "panoptic query_override final layer")
    for layer, official in enumerate(expected["aux_matcher_indices"]):
        assert_indices_equal(indices[layer + 1], official, f"panoptic query_override aux {layer}")
    with torch.no_grad():
        losses = criterion(outputs, inputs["targets"])
    assert_losses_close(losses, expected["loss_dict"], expected["total_loss"], criterion.weight_dict,
                        "panoptic query_override")
    stored = {k: expected[k] for k in ("pred_logits", "pred_boxes", "pred_masks")}
    assert_postprocess_close(postprocessors["bbox"](stored, inputs["orig_target_sizes"]), expected["postprocess"],
                             "panoptic query_override postprocess")
    rows = fx["config"]["segm_rows_stored"]
    assert_segm_equal(postprocessors, stored, inputs, expected["postprocess_segm"], rows, "query_override segm")
    assert_panoptic_equal(postprocessors, stored, inputs, expected["postprocess_panoptic"], "query_override panoptic")


def test_panoptic_parity_synthetic_predictions(panoptic):
    """The official matcher, criterion (mask losses included) and all three post-processors on stored predictions
    (a duplicated stuff class merged, an empty thing mask filtered, a no-object query)."""
    fx, _, criterion, postprocessors = panoptic
    inputs, expected = fx["inputs"], fx["outputs"]["synthetic"]
    outputs = inputs["synthetic_outputs"]
    indices = criterion.match_all(outputs, inputs["targets"])
    assert_indices_equal(indices[0], expected["matcher_indices"], "panoptic synthetic final layer")
    for layer, official in enumerate(expected["aux_matcher_indices"]):
        assert_indices_equal(indices[layer + 1], official, f"panoptic synthetic aux {layer}")
    assert_losses_close(criterion(outputs, inputs["targets"]), expected["loss_dict"], expected["total_loss"],
                        criterion.weight_dict, "panoptic synthetic")
    assert_postprocess_close(postprocessors["bbox"](outputs, inputs["orig_target_sizes"]), expected["postprocess"],
                             "panoptic synthetic postprocess")
    rows = fx["config"]["segm_rows_stored"]
    assert_segm_equal(postprocessors, outputs, inputs, expected["postprocess_segm"], rows, "synthetic segm")
    assert_panoptic_equal(postprocessors, outputs, inputs, expected["postprocess_panoptic"], "synthetic panoptic")


def test_panoptic_parity_mask_head_direct(panoptic):
    """MHAttentionMap and MaskHeadSmallConv on stored tensors where the masks differ across queries and the nearest
    upsamplings are not by 2 (2x3 -> 3x4 -> 5x7 -> 9x13)."""
    fx, model, _, _ = panoptic
    inputs, expected = fx["inputs"]["mask_head_direct"], fx["outputs"]["mask_head_direct"]
    with torch.no_grad():
        bbox_mask = model.bbox_attention(inputs["hs"], inputs["memory"], mask=inputs["mask"])
        masks = model.mask_head(inputs["src_proj"], bbox_mask, inputs["fpns"])
    torch.testing.assert_close(bbox_mask, expected["bbox_mask"], **TOL)
    torch.testing.assert_close(masks.view(expected["pred_masks"].shape), expected["pred_masks"], **TOL)


def test_panoptic_quality_hand_worked_example():
    """Two images worked by hand: the void pixels of a prediction leave its union (without that, the class-2 pair
    would have IoU 3/6 = 0.5 and not match), a prediction mostly on a crowd region of its class is no false
    positive, a wrong class gives a false negative and a false positive, a class without segments is not averaged."""
    gt_1 = np.array([[10, 10, 10, 20, 20, 0],
                     [10, 10, 10, 20, 20, 0],
                     [30, 30, 30, 30, 30, 30],
                     [30, 30, 30, 30, 40, 40]])
    pred_1 = np.array([[1, 1, 1, 1, 2, 2],
                       [1, 1, 0, 2, 2, 2],
                       [3, 3, 3, 3, 3, 3],
                       [3, 3, 3, 4, 4, 4]])
    gt_segments_1 = [{"id": 10, "category_id": 1, "iscrowd": 0, "area": 6},
                     {"id": 20, "category_id": 2, "iscrowd": 0, "area": 4},
                     {"id": 30, "category_id": 100, "iscrowd": 0, "area": 10},
                     {"id": 40, "category_id": 1, "iscrowd": 1, "area": 2}]
    pred_segments_1 = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 2}, {"id": 3, "category_id": 100},
                       {"id": 4, "category_id": 1}]
    gt_2, pred_2 = np.array([[50, 50, 60, 60], [50, 50, 60, 60]]), np.array([[7, 7, 7, 8], [7, 7, 8, 8]])
    gt_segments_2 = [{"id": 50, "category_id": 1, "iscrowd": 0, "area": 4},
                     {"id": 60, "category_id": 100, "iscrowd": 0, "area": 4}]
    pred_segments_2 = [{"id": 7, "category_id": 2}, {"id": 8, "category_id": 100}]
    categories = {1: {"isthing": 1}, 2: {"isthing": 1}, 3: {"isthing": 1}, 100: {"isthing": 0}}
    pq = detr.panoptic_quality([(gt_1, gt_segments_1, pred_1, pred_segments_1),
                                (gt_2, gt_segments_2, pred_2, pred_segments_2)], categories)
    # class 1: TP (10, 1) IoU 5 / (6 + 6 - 5) = 5/7; FN 50. class 2: TP (20, 2) IoU 3 / (5 + 4 - 3 - 2 void) = 3/4;
    # FP 7. class 100: TP (30, 3) IoU 9/10 and (60, 8) IoU 3/4. Prediction 4 lies 2/3 on class 1's crowd: ignored.
    per_class = {1: (5 / 7 / 1.5, 5 / 7, 1 / 1.5), 2: (0.75 / 1.5, 0.75, 1 / 1.5), 100: (1.65 / 2, 0.825, 1.0)}
    for c, (pq_c, sq_c, rq_c) in per_class.items():
        assert pq["per_class"][c] == pytest.approx({"pq": pq_c, "sq": sq_c, "rq": rq_c}), f"class {c}"
    assert 3 not in pq["per_class"]
    for name, classes in (("All", (1, 2, 100)), ("Things", (1, 2)), ("Stuff", (100,))):
        expected = {k: np.mean([per_class[c][i] for c in classes]) for i, k in enumerate(("pq", "sq", "rq"))}
        assert pq[name] == pytest.approx(dict(expected, n=len(classes))), name
    with pytest.raises(ValueError, match="segment 9 is in a predicted PNG"):
        detr.panoptic_quality([(gt_2, gt_segments_2, np.full((2, 4), 9), pred_segments_2)], categories)


def test_criterion_with_images_without_targets():
    """Empty targets: no box losses, every query learns no-object, nothing crashes in the matcher."""
    g = torch.Generator().manual_seed(0)
    criterion = detr.SetCriterion(5, detr.HungarianMatcher(), {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}, 0.1)

    def layer():
        return {"pred_logits": torch.randn(2, 4, 6, generator=g), "pred_boxes": torch.rand(2, 4, 4, generator=g)}

    outputs = dict(layer(), aux_outputs=[layer()])
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    losses = criterion(outputs, [empty, empty])
    assert losses["loss_bbox"] == 0 and losses["loss_giou_0"] == 0 and losses["class_error"] == 100
    expected_ce = torch.nn.functional.cross_entropy(outputs["pred_logits"].transpose(1, 2), torch.full((2, 4), 5))
    torch.testing.assert_close(losses["loss_ce"], expected_ce)
    one = {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    losses = criterion(outputs, [one, empty])
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_bbox"] > 0
    # mask losses: a batch without any target gives 0 (and a gradient of 0), one target a positive loss
    criterion.losses.append("masks")
    outputs["pred_masks"] = torch.randn(2, 4, 5, 6, generator=g, requires_grad=True)
    empty["masks"], one["masks"] = torch.zeros(0, 20, 24, dtype=torch.bool), torch.ones(1, 16, 24, dtype=torch.bool)
    losses = criterion(outputs, [empty, empty])
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0 and "loss_mask_0" not in losses
    (losses["loss_mask"] + losses["loss_dice"]).backward()
    assert (outputs["pred_masks"].grad == 0).all()
    losses = criterion(outputs, [one, empty])
    assert losses["loss_mask"] > 0 and losses["loss_dice"] > 0


def test_backbone_options_and_torchvision_init(tmp_path, one_thread):
    """--pretrained_backbone takes a torchvision ImageNet file (fc and num_batches_tracked ignored); interm layers,
    dilation, and the frozen stem / layer1 of the official code."""
    import torchvision

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    args = detr.get_args_parser().parse_args(["--backbone", "resnet18", "--pretrained_backbone", str(path)])
    joiner = detr.build_backbone(args)
    reference = torch.load(path)
    assert torch.equal(joiner[0].body.layer3[0].conv1.weight, reference["layer3.0.conv1.weight"])
    assert not any(k.endswith("num_batches_tracked") for k in joiner.state_dict())
    trainable = {n.split(".")[2] for n, p in joiner.named_parameters() if p.requires_grad}  # 0.body.<layer>
    assert trainable == {"layer2", "layer3", "layer4"}
    image = torch.randn(1, 3, 64, 96)
    mask = torch.zeros(1, 64, 96, dtype=torch.bool)
    mask[:, :, 80:] = True
    features = detr.Backbone("resnet50", True, return_interm_layers=True, dilation=True)(detr.NestedTensor(image, mask))
    assert [tuple(f.tensors.shape[-2:]) for f in features.values()] == [(16, 24), (8, 12), (4, 6), (4, 6)]
    assert features["3"].mask[0, 0].tolist() == [False] * 5 + [True]


def test_checkpoint_key_errors_are_named(parity):
    fx, model, _, _ = parity
    state = fill_state_dict(fx["shapes"], fx["seed"])
    state["class_embed.extra"] = torch.zeros(1)
    del state["query_embed.weight"]
    with pytest.raises(ValueError, match="detr-r50.pth.*missing keys: query_embed.weight.*unexpected keys: class_emb"):
        training.load_model_state(model, state, "detr-r50.pth")


# ---------------------------------------------------------------------------------------------------------------------
# Data: transforms keep boxes on their objects; bad input gets one clear error
# ---------------------------------------------------------------------------------------------------------------------

COLORS = {1: (230, 30, 30), 2: (30, 220, 30), 3: (30, 30, 230)}


def write_tiny_coco(root, n_train=6, n_val=3, size=(80, 64), seed=0, extra_annotations=()):
    """COCO-format data: coloured rectangles (category = colour) on noise; image 1 has no objects."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            w, h = size
            img = Image.fromarray(rng.integers(90, 140, (h, w, 3), dtype=np.uint8))
            draw = ImageDraw.Draw(img)
            for _ in range(0 if i == 0 else int(rng.integers(1, 4))):
                cat = int(rng.integers(1, 4))
                bw, bh = int(rng.integers(w // 5, w // 2)), int(rng.integers(h // 5, h // 2))
                x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                draw.rectangle([x, y, x + bw - 1, y + bh - 1], fill=COLORS[cat])
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "bbox": [x, y, bw, bh],
                             "area": bw * bh, "iscrowd": 0})
            name = f"{i + 1:012d}.png"
            img.save(root / f"{split}2017" / name)
            images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        anns += [dict(a, id=len(anns) + k + 1) for k, a in enumerate(extra_annotations)]
        (root / "annotations").mkdir(exist_ok=True)
        categories = [{"id": c, "name": n} for c, n in ((1, "red"), (2, "green"), (3, "blue"))]
        (root / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return root


SMALL = ["--device", "cpu", "--backbone", "convstem", "--lr_backbone", "1e-4", "--hidden_dim", "32",
         "--dim_feedforward", "64", "--nheads", "2", "--enc_layers", "1", "--dec_layers", "2", "--num_queries", "6",
         "--num_classes", "4", "--scales", "64", "--max_size", "96", "--crop_scales", "56", "64", "--crop_size", "40",
         "64", "--num_workers", "0"]


def small_args(coco_path, *extra):
    return detr.get_args_parser().parse_args(["--coco_path", str(coco_path), *SMALL, *extra])


def test_resize_rule_as_official():
    # short side to size; long side capped at max_size with the official rounding; int() truncation
    assert detr.resized_shape((640, 480), 800, 1333) == (800, 1066)
    assert detr.resized_shape((480, 640), 800, 1333) == (1066, 800)
    assert detr.resized_shape((2000, 500), 800, 1333) == (333, 1332)
    assert detr.resized_shape((600, 800), 600, None) == (800, 600)


def _colour_extent(image, colour):
    """xyxy extent of the pixels of `colour` in a de-normalised [3, H, W] tensor."""
    pixels = (image * torch.tensor(detr.IMAGENET_STD)[:, None, None] + torch.tensor(detr.IMAGENET_MEAN)[:, None, None])
    match = ((pixels * 255 - torch.tensor(colour)[:, None, None]).abs() < 40).all(0)
    ys, xs = match.nonzero(as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_train_transforms_keep_boxes_on_objects():
    """Through flip, resize and crop, the target box still encloses exactly its object's pixels."""
    image = Image.new("RGB", (160, 120), (120, 120, 120))
    Image.Image.paste(image, (230, 30, 30), (50, 30, 110, 90))
    target = {"boxes": torch.tensor([[50.0, 30.0, 110.0, 90.0]]), "labels": torch.tensor([1]),
              "area": torch.tensor([3600.0]), "iscrowd": torch.tensor([0])}
    args = small_args("unused", "--scales", "96", "112", "128", "--crop_scales", "100", "120",
                      "--crop_size", "60", "90")
    transform = detr.make_coco_transforms("train", args)
    checked = 0
    for seed in range(30):
        random.seed(seed)
        out, t = transform(image, dict(target))
        if len(t["boxes"]) == 0:
            continue  # cropped away: the box is removed with it
        h, w = out.shape[-2:]
        box = detr.box_cxcywh_to_xyxy(t["boxes"][0]) * torch.tensor([w, h, w, h])
        torch.testing.assert_close(box, _colour_extent(out, (230, 30, 30)), atol=2.0, rtol=0,
                                   msg=lambda m, seed=seed: f"seed {seed}: box and object disagree: {m}")
        assert t["size"].tolist() == [h, w]
        checked += 1
    assert checked >= 15


def test_train_transforms_keep_masks_on_objects():
    """Masks go through flip, resize and crop with the image: the mask covers exactly its object's pixels, and its
    tight box is the target box (up to the resize's rounding)."""
    image = Image.new("RGB", (160, 120), (120, 120, 120))
    Image.Image.paste(image, (230, 30, 30), (50, 30, 110, 90))
    mask = torch.zeros(1, 120, 160, dtype=torch.bool)
    mask[0, 30:90, 50:110] = True
    target = {"boxes": torch.tensor([[50.0, 30.0, 110.0, 90.0]]), "labels": torch.tensor([1]),
              "area": torch.tensor([3600.0]), "iscrowd": torch.tensor([0]), "masks": mask}
    args = small_args("unused", "--scales", "96", "112", "128", "--crop_scales", "100", "120",
                      "--crop_size", "60", "90")
    transform = detr.make_coco_transforms("train", args)
    checked = 0
    for seed in range(30):
        random.seed(seed)
        out, t = transform(image, dict(target))
        if len(t["boxes"]) == 0:
            assert t["masks"].shape[0] == 0
            continue
        h, w = out.shape[-2:]
        assert t["masks"].shape == (1, h, w) and t["masks"].dtype == torch.bool
        ys, xs = t["masks"][0].nonzero(as_tuple=True)
        extent = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        torch.testing.assert_close(extent, _colour_extent(out, (230, 30, 30)), atol=2.0, rtol=0)
        box = detr.box_cxcywh_to_xyxy(t["boxes"][0]) * torch.tensor([w, h, w, h])
        torch.testing.assert_close(extent, box, atol=2.0, rtol=0)
        checked += 1
    assert checked >= 15


@pytest.fixture(scope="module")
def synthetic_coco(tmp_path_factory):
    """common.synthetic's COCO set (instances + panoptic), 8 + 2 images of 64 x 48."""
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.write(out, only=["coco"], images=8, size=(64, 48))
    return out / "coco"


def test_synthetic_panoptic_annotations_match_their_pngs(synthetic_coco):
    """The panoptic set written by common/synthetic.py: every PNG segment is listed with its area and box, things
    are the visible part of their instance masks, stuff classes (ids > 90) cover the background, void (id 0) is
    only the thin band along stuff boundaries."""
    from pycocotools.coco import COCO

    for split in ("train", "val"):
        panoptic = json.loads((synthetic_coco / "annotations" / f"panoptic_{split}2017.json").read_text())
        instances = COCO(str(synthetic_coco / "annotations" / f"instances_{split}2017.json"))
        categories = {c["id"]: c for c in panoptic["categories"]}
        assert {k for k, c in categories.items() if c["isthing"]} == set(synthetic.COCO_CATEGORIES)
        assert all(k > 90 for k, c in categories.items() if not c["isthing"])
        assert [a["image_id"] for a in panoptic["annotations"]] == [i["id"] for i in panoptic["images"]]
        for annotation in panoptic["annotations"]:
            png = synthetic_coco / f"panoptic_{split}2017" / annotation["file_name"]
            ids = detr.rgb2id(np.asarray(Image.open(png)))
            segments = {s["id"]: s for s in annotation["segments_info"]}
            assert set(np.unique(ids).tolist()) - {0} == set(segments)
            assert (ids == 0).mean() < 0.1, "void should be a thin band"
            assert any(not categories[s["category_id"]]["isthing"] for s in segments.values()), "no stuff"
            for segment_id, segment in segments.items():
                ys, xs = np.nonzero(ids == segment_id)
                assert segment["area"] == len(ys)
                assert segment["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            things = [s for s in segments.values() if categories[s["category_id"]]["isthing"]]
            anns = instances.imgToAnns[annotation["image_id"]]
            assert sorted(s["category_id"] for s in things) == sorted(a["category_id"] for a in anns)
            assert sum(s["iscrowd"] for s in things) == sum(a["iscrowd"] for a in anns)
            union = np.zeros_like(ids, dtype=bool)
            for a in anns:
                union |= instances.annToMask(a).astype(bool)
            for s in things:  # visible part of some instance mask
                assert union[ids == s["id"]].all()


def test_synthetic_panoptic_is_byte_identical_per_seed(tmp_path):
    def digest(root):
        files = sorted((root / "coco").rglob("panoptic*"))
        return [(str(f.relative_to(root)), f.read_bytes() if f.is_file() else b"") for f in files]

    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        synthetic.write(tmp_path / name, only=["coco"], images=3, size=(48, 40), seed=seed)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_panoptic_dataset_targets(synthetic_coco):
    """CocoPanoptic (official datasets/coco_panoptic.py): one target per segment, crowd included, boxes = the
    masks' tight boxes with the inclusive last pixel, 250 classes by default."""
    args = detr.get_args_parser().parse_args(["--coco_path", str(synthetic_coco), "--dataset_file", "coco_panoptic",
                                              "--masks", "--scales", "64", "--max_size", "96"])
    assert args.num_classes == 250
    dataset = detr.build_dataset("val", args)
    annotation = json.loads((synthetic_coco / "annotations" / "panoptic_val2017.json").read_text())["annotations"][0]
    image, target = dataset[0]
    segments = annotation["segments_info"]
    assert target["labels"].tolist() == [s["category_id"] for s in segments]
    assert target["iscrowd"].tolist() == [s["iscrowd"] for s in segments]
    h, w = image.shape[-2:]
    assert target["masks"].shape == (len(segments), h, w) and target["orig_size"].tolist() == [48, 64]
    boxes = detr.box_cxcywh_to_xyxy(target["boxes"]) * torch.tensor([w, h, w, h])
    scale = torch.tensor([w / 64, h / 48, w / 64, h / 48])
    expected = torch.tensor([[x, y, x + bw - 1, y + bh - 1] for x, y, bw, bh in (s["bbox"] for s in segments)])
    torch.testing.assert_close(boxes, expected * scale, atol=1e-3, rtol=0)
    (synthetic_coco / "panoptic_val2017" / annotation["file_name"]).rename(synthetic_coco / "moved.png")
    try:
        with pytest.raises(SystemExit, match="missing from .*panoptic_val2017"):
            detr.build_dataset("val", args)
    finally:
        (synthetic_coco / "moved.png").rename(synthetic_coco / "panoptic_val2017" / annotation["file_name"])


def test_dataset_targets_and_empty_images(tmp_path):
    root = write_tiny_coco(tmp_path / "coco")
    dataset = detr.build_dataset("val", small_args(root))
    image, target = dataset[0]  # image 1 has no objects: kept, with empty targets
    assert image.shape[0] == 3 and target["boxes"].shape == (0, 4) and target["labels"].numel() == 0
    image, target = dataset[1]
    assert target["boxes"].shape[0] == target["labels"].shape[0] > 0
    assert (target["boxes"] > 0).all() and (target["boxes"] <= 1).all()
    assert target["orig_size"].tolist() == [64, 80]


def test_bad_input_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--coco_path .*missing.*not found"):
        detr.build_dataset("train", small_args(tmp_path / "missing"))
    root = write_tiny_coco(tmp_path / "coco")
    (root / "train2017" / "000000000002.png").unlink()
    with pytest.raises(SystemExit, match="missing from .*train2017.*000000000002.png"):
        detr.build_dataset("train", small_args(root))
    bad = {"image_id": 2, "category_id": 7, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}
    root = write_tiny_coco(tmp_path / "coco_bad_category", extra_annotations=[bad])
    with pytest.raises(SystemExit, match=r"category ids \[7\].*--num_classes"):
        detr.build_dataset("train", small_args(root))
    degenerate = {"image_id": 2, "category_id": 1, "bbox": [10, 10, 0, 8], "area": 0, "iscrowd": 0}
    root = write_tiny_coco(tmp_path / "coco_degenerate", extra_annotations=[degenerate])
    dataset = detr.build_dataset("val", small_args(root))
    assert "1 annotation(s) with zero width or height will be dropped" in capsys.readouterr().out
    n_annotations = len(dataset.coco.imgToAnns[2])
    assert len(dataset[1][1]["labels"]) == n_annotations - 1  # the zero-width box is gone, the rest kept


# ---------------------------------------------------------------------------------------------------------------------
# Training: overfit one batch, AMP step, and the script end to end
# ---------------------------------------------------------------------------------------------------------------------


def test_overfit_one_batch(tmp_path, one_thread):
    torch.manual_seed(0)
    root = write_tiny_coco(tmp_path / "coco", n_train=3)
    args = small_args(root, "--dropout", "0", "--lr", "1e-3", "--lr_backbone", "1e-3")
    dataset = detr.build_dataset("val", args)  # no augmentation
    samples, targets = detr.collate_fn([dataset[1], dataset[2]])
    model, criterion, _ = detr.build(args)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        loss_dict = criterion(model(samples), targets)
        loss = sum(loss_dict[k] * criterion.weight_dict[k] for k in loss_dict if k in criterion.weight_dict)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3, f"loss fell only from {losses[0]:.3f} to {losses[-1]:.3f}"


def test_amp_training_step_is_finite(tmp_path, one_thread):
    root = write_tiny_coco(tmp_path / "coco", n_train=2)
    args = small_args(root, "--amp")
    samples, targets = detr.collate_fn([detr.build_dataset("val", args)[i] for i in (1, 2)])
    model, criterion, _ = detr.build(args)
    with training.amp_autocast("cpu", True):
        outputs = model(samples)
    assert outputs["pred_logits"].dtype == torch.bfloat16
    loss_dict = criterion(outputs, targets)
    loss = sum(loss_dict[k] * criterion.weight_dict[k] for k in loss_dict if k in criterion.weight_dict)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def run_script(*args):
    result = subprocess.run([sys.executable, str(ROOT / "detr.py"), *args], capture_output=True, text=True,
                            cwd=ROOT, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert result.returncode == 0, \
        f"detr.py {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_script_trains_resumes_evaluates_and_draws(tmp_path):
    root = write_tiny_coco(tmp_path / "coco", n_train=4, n_val=2)
    out = tmp_path / "out"
    flags = ["--coco_path", str(root), "--output_dir", str(out), "--device", "cpu",
             "--backbone", "convstem", "--lr_backbone", "1e-4", "--hidden_dim", "32", "--dim_feedforward", "64",
             "--nheads", "2", "--enc_layers", "1", "--dec_layers", "2", "--num_queries", "6", "--num_classes", "4",
             "--scales", "64", "--max_size", "96", "--crop_scales", "56", "64", "--crop_size", "40", "64",
             "--num_workers", "0", "--batch_size", "2"]
    run_script(*flags, "--epochs", "1")
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=False)
    assert {"model", "optimizer", "lr_scheduler", "epoch", "args", "rng"} <= set(checkpoint)
    assert checkpoint["epoch"] == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # resuming in-process saves one interpreter start (~10 s of imports on a busy machine)
        detr.main(detr.get_args_parser().parse_args([*flags, "--epochs", "2", "--resume", str(out / "checkpoint.pth")]))
    finally:
        torch.set_num_threads(threads)
    assert torch.load(out / "checkpoint.pth", weights_only=False)["epoch"] == 1
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and "test_coco_eval_bbox" in log[-1]
    (out / "eval.json").unlink()
    official_format = out / "model_only.pth"  # a release file holds only {'model': state_dict}
    torch.save({"model": checkpoint["model"]}, official_format)
    (out / "detections_val2017_results.json").unlink()
    run_script(*flags, "--eval", "--resume", str(official_format), "--viz")
    stats = json.loads((out / "eval.json").read_text())
    assert list(stats) == detr.COCO_STAT_NAMES
    assert all(v is None or 0 <= v <= 100 for v in stats.values())
    for kind in ("boxes", "decoder_attention", "encoder_attention"):
        assert Image.open(out / "viz" / f"000000000001_{kind}.png").size[0] > 0
    # --eval writes the COCO results file: every query of every val image, as COCO's server and tools read it
    results = json.loads((out / "detections_val2017_results.json").read_text())
    assert len(results) == 2 * 6 and all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in results)
    assert {r["image_id"] for r in results} == {1, 2} and all(len(r["bbox"]) == 4 for r in results)


def test_script_panoptic_two_steps(synthetic_coco, tmp_path, one_thread):
    """The paper's panoptic recipe (Sec. 4.4) end to end on the synthetic COCO panoptic set: a box model on things
    and stuff, then --masks --frozen_weights trains only the mask head; evaluation gives box AP, mask AP and PQ and
    writes the COCO result files and the panoptic PNGs."""
    flags = ["--coco_path", str(synthetic_coco), "--dataset_file", "coco_panoptic", "--device", "cpu",
             "--backbone", "convstem", "--lr_backbone", "1e-4", "--hidden_dim", "128", "--nheads", "8",
             "--dim_feedforward", "64", "--enc_layers", "1", "--dec_layers", "2", "--num_queries", "8",
             "--scales", "64", "--max_size", "96", "--crop_scales", "56", "64", "--crop_size", "40", "64",
             "--num_workers", "0", "--batch_size", "2", "--epochs", "1", "--print_freq", "100"]
    box, masks = tmp_path / "box", tmp_path / "masks"
    detr.main(detr.get_args_parser().parse_args([*flags, "--output_dir", str(box)]))
    with pytest.raises(SystemExit, match="--frozen_weights .*needs --masks"):
        detr.main(detr.get_args_parser().parse_args([*flags, "--frozen_weights", str(box / "checkpoint.pth")]))
    detr.main(detr.get_args_parser().parse_args(
        [*flags, "--masks", "--frozen_weights", str(box / "checkpoint.pth"), "--output_dir", str(masks), "--viz"]))
    box_state = torch.load(box / "checkpoint.pth", weights_only=False)["model"]
    mask_state = torch.load(masks / "checkpoint.pth", weights_only=False)["model"]
    assert len(mask_state) == len(box_state) + 4 + 28  # detr.*, bbox_attention.* (4), mask_head.* (28)
    for key, value in box_state.items():  # frozen: the box model is unchanged by the mask training
        assert torch.equal(mask_state[f"detr.{key}"], value), f"{key} changed under --frozen_weights"
    stats = json.loads((masks / "eval.json").read_text())
    assert list(stats) == [*detr.COCO_STAT_NAMES, "segm", "panoptic"]
    assert list(stats["segm"]) == detr.COCO_STAT_NAMES
    assert set(stats["panoptic"]) == {f"{m}{s}" for m in ("PQ", "SQ", "RQ") for s in ("", "_th", "_st")}
    assert all(0 <= v <= 100 for v in stats["panoptic"].values())
    segm = json.loads((masks / "segmentations_val2017_results.json").read_text())
    assert len(segm) == 2 * 8 and all(set(r["segmentation"]) == {"size", "counts"} for r in segm)
    predictions = json.loads((masks / "panoptic_eval" / "predictions.json").read_text())["annotations"]
    for prediction in predictions:
        ids = detr.rgb2id(np.asarray(Image.open(masks / "panoptic_eval" / prediction["file_name"])))
        assert ids.shape == (48, 64)
        assert {s["id"] for s in prediction["segments_info"]} <= set(np.unique(ids).tolist())
    assert Image.open(next((masks / "viz").glob("*_masks.png"))).size == (64, 48)


def test_pretrained_backbone_must_fit(tmp_path):
    """A backbone file whose keys do not fit (here: prefixed as inside a DETR checkpoint) stops the run instead of
    leaving the backbone at random weights."""
    import torchvision

    state = torchvision.models.resnet18().state_dict()
    path = tmp_path / "prefixed.pth"
    torch.save({"model": {f"backbone.0.body.{k}": v for k, v in state.items()}}, path)
    args = detr.get_args_parser().parse_args(["--backbone", "resnet18", "--pretrained_backbone", str(path)])
    with pytest.raises(SystemExit, match=r"0 of the backbone's \d+ tensors found.*prefix \(backbone\.0\.body\.\)"):
        detr.build_backbone(args)
    del state["layer4.1.conv2.weight"]
    torch.save(state, path)
    with pytest.raises(SystemExit, match=r"\d+ of the backbone's \d+ tensors found"):
        detr.build_backbone(args)


def test_checkpoint_saves_and_restores_grad_scaler(tmp_path, monkeypatch, one_thread):
    """The gradient scaler's state is saved in checkpoint.pth and restored on --resume; a checkpoint without it
    (written before it was saved) still resumes."""
    loaded = []

    class RecordingScaler(torch.amp.GradScaler):
        def load_state_dict(self, state):
            loaded.append(state)
            super().load_state_dict(state)

    monkeypatch.setattr(training, "grad_scaler", lambda device, enabled: RecordingScaler("cpu", init_scale=1024.0))
    root = write_tiny_coco(tmp_path / "coco", n_train=2, n_val=1)
    out = tmp_path / "out"
    flags = ["--coco_path", str(root), *SMALL, "--output_dir", str(out), "--batch_size", "2"]
    detr.main(detr.get_args_parser().parse_args([*flags, "--epochs", "1"]))
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=False)
    assert checkpoint["scaler"]["scale"] == 1024.0
    detr.main(detr.get_args_parser().parse_args([*flags, "--epochs", "2", "--resume", str(out / "checkpoint.pth")]))
    assert loaded == [checkpoint["scaler"]]
    del checkpoint["scaler"]
    torch.save(checkpoint, out / "old.pth")
    detr.main(detr.get_args_parser().parse_args([*flags, "--epochs", "2", "--resume", str(out / "old.pth")]))
    assert len(loaded) == 1


@pytest.mark.parametrize(("name", "convs", "receptive_field"), [("convstem", 4, 31), ("convstem7", 7, 87)])
def test_convstem_designs(name, convs, receptive_field, one_thread):
    """The conv stems: number of 3x3 convs, stride 16 at layer4, and the receptive field their comments state (the
    pixels that reach one output cell, measured by its gradient)."""
    backbone = detr.Backbone(name, True, True, False, coordinates=False).eval()
    assert sum(isinstance(m, torch.nn.Conv2d) for m in backbone.modules()) == convs
    image = torch.rand(1, 3, 256, 256, requires_grad=True)
    features = backbone(detr.NestedTensor(image, torch.zeros(1, 256, 256, dtype=torch.bool)))
    assert [f.tensors.shape[-1] for f in features.values()] == [128, 64, 32, 16]
    features["3"].tensors[0, :, 8, 8].sum().backward()
    cols = image.grad[0].abs().sum((0, 1)).nonzero().flatten()
    assert cols.max() - cols.min() + 1 == receptive_field


def test_convstem_coordinates_are_a_flag():
    """--no_coordinates (named in --help) builds the conv stem on the plain 3-channel image."""
    assert "--no_coordinates" in detr.get_args_parser().format_help()
    for extra, channels in (([], 5), (["--no_coordinates"], 3)):
        args = detr.get_args_parser().parse_args(["--backbone", "convstem", *extra])
        backbone = detr.build_backbone(args)
        assert backbone[0].body.layer1[0].in_channels == channels
        features, _ = backbone(detr.NestedTensor(torch.rand(1, 3, 32, 48), torch.zeros(1, 32, 48, dtype=torch.bool)))
        assert features[-1].tensors.shape == (1, 256, 2, 3)


def test_convstem_coordinates_span_each_images_own_area():
    images = torch.zeros(2, 3, 4, 6)
    mask = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[1, :, 3:] = True  # the second image is 4 x 3, padded to 4 x 6
    mask[1, 2:] = True     # ... and 2 x 3
    out = detr.ConvStem.with_coordinates(images, mask)
    assert out.shape == (2, 5, 4, 6)
    torch.testing.assert_close(out[0, 3, :, 0], torch.tensor([-0.5, 0.0, 0.5, 1.0]))  # y: 2 * (k + 1) / H - 1
    torch.testing.assert_close(out[0, 4, 0], torch.tensor([2 * (k + 1) / 6 - 1 for k in range(6)]))
    torch.testing.assert_close(out[1, 3, :2, 0], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out[1, 4, 0, :3], torch.tensor([-1 / 3, 1 / 3, 1.0]))
    backbone = detr.Backbone("convstem", True, False, False)
    features = backbone(detr.NestedTensor(torch.rand(2, 3, 64, 96), torch.zeros(2, 64, 96, dtype=torch.bool)))
    assert features["0"].tensors.shape == (2, 256, 4, 6)
