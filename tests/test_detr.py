"""DETR: parity with the official code (tests/fixtures/detr_r50.pt), transforms, bad input, the script end to end
(train, --resume, --eval, --viz) on tiny COCO-format data, and overfitting one batch."""
from pathlib import Path

import pytest
import torch

import detr
from common import training
from tests.fixtures.fill import fill_state_dict

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "detr_r50.pt"
TOL = {"rtol": 1e-4, "atol": 1e-4}


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


def test_official_checkpoint_format_loads(parity, tmp_path):
    """An official release file ({'model': state_dict}) resumes strictly; a wrong key is named in the error."""
    fx, model, _, _ = parity
    state = fill_state_dict(fx["shapes"], fx["seed"])
    path = tmp_path / "detr-r50-official.pth"
    torch.save({"model": state}, path)
    training.load_model_state(model, training.load_checkpoint(path)["model"], str(path))
    state["class_embed.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match="class_embed.extra"):
        training.load_model_state(model, state, str(path))
