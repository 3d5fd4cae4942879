"""Box ops and the Hungarian matcher: against torchvision / brute force over all assignments, and against the
official matcher's indices stored in detr_r50.pt (`synthetic` and `query_override` blocks)."""
import itertools
from pathlib import Path

import pytest
import torch

from common.matching import (
    HungarianMatcher,
    assign,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    check_boxes,
    generalized_box_iou,
)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "detr_r50.pt"


@pytest.fixture(scope="module")
def fx():
    return torch.load(FIXTURE, weights_only=False)


def _random_boxes(n, g):
    cxcy = 0.1 + 0.8 * torch.rand(n, 2, generator=g)
    wh = 0.05 + 0.4 * torch.rand(n, 2, generator=g)
    return torch.cat([cxcy, wh], 1)


def test_box_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    boxes = _random_boxes(7, g)
    xyxy = box_cxcywh_to_xyxy(boxes)
    torch.testing.assert_close(xyxy[:, :2], boxes[:, :2] - boxes[:, 2:] / 2)
    torch.testing.assert_close(xyxy[:, 2:], boxes[:, :2] + boxes[:, 2:] / 2)
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), boxes)


def test_giou_against_hand_computation():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [4.0, 0.0, 5.0, 1.0]])
    # overlap 1, union 7, hull 9 -> 1/7 - 2/9; identical -> 1; disjoint: union 5, hull 10 -> 0 - 5/10
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1 / 7, 1.0, 0.0]]))
    torch.testing.assert_close(generalized_box_iou(a, b), torch.tensor([[1 / 7 - 2 / 9, 1.0, -0.5]]))


def test_check_boxes_names_the_problem():
    check_boxes(torch.tensor([[0.0, 0.0, 0.0, 1.0]]))  # zero width is allowed
    with pytest.raises(ValueError, match="target boxes.*x1 >= x0"):
        check_boxes(torch.tensor([[0.5, 0.0, 0.2, 1.0]]), "target boxes")
    with pytest.raises(ValueError, match="NaN"):
        check_boxes(torch.tensor([[float("nan"), 0.0, 0.2, 1.0]]))


def _brute_force(cost):
    """Minimum total cost over every injective map of the smaller side into the larger one."""
    q, t = cost.shape
    best = None
    if t <= q:
        for rows in itertools.permutations(range(q), t):
            total = sum(cost[r, c].item() for c, r in enumerate(rows))
            if best is None or total < best[0]:
                best = (total, sorted(zip(rows, range(t))))
    else:
        for cols in itertools.permutations(range(t), q):
            total = sum(cost[r, c].item() for r, c in enumerate(cols))
            if best is None or total < best[0]:
                best = (total, list(zip(range(q), cols)))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_matcher_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    bs, num_queries, num_classes = 3, 5, 4
    sizes = [0, 3, 5] if seed % 2 == 0 else [2, 0, 4]
    outputs = {"pred_logits": torch.randn(bs, num_queries, num_classes + 1, generator=g),
               "pred_boxes": torch.stack([_random_boxes(num_queries, g) for _ in range(bs)])}
    targets = [{"labels": torch.randint(0, num_classes, (n,), generator=g), "boxes": _random_boxes(n, g)}
               for n in sizes]
    matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
    indices = matcher(outputs, targets)
    for i, (t, (qi, ti)) in enumerate(zip(targets, indices)):
        assert qi.dtype == ti.dtype == torch.int64
        assert len(qi) == len(ti) == min(num_queries, len(t["labels"]))
        if len(t["labels"]) == 0:
            continue
        # the cost, written out per pair
        prob = outputs["pred_logits"][i].softmax(-1)
        pred_xyxy, tgt_xyxy = box_cxcywh_to_xyxy(outputs["pred_boxes"][i]), box_cxcywh_to_xyxy(t["boxes"])
        cost = torch.empty(num_queries, len(t["labels"]))
        for q in range(num_queries):
            for k in range(len(t["labels"])):
                l1 = (outputs["pred_boxes"][i, q] - t["boxes"][k]).abs().sum()
                giou = generalized_box_iou(pred_xyxy[q:q + 1], tgt_xyxy[k:k + 1])[0, 0]
                cost[q, k] = 5 * l1 - prob[q, t["labels"][k]] - 2 * giou
        best_total, best_pairs = _brute_force(cost)
        assert sorted(zip(qi.tolist(), ti.tolist())) == best_pairs, f"image {i}: not the optimal assignment"
        torch.testing.assert_close(cost[qi, ti].sum(), torch.tensor(best_total))
        assert torch.equal(qi, qi.sort().values), "query indices must come back sorted"


def test_matcher_all_images_empty():
    outputs = {"pred_logits": torch.randn(2, 4, 3), "pred_boxes": torch.rand(2, 4, 4) * 0.5 + 0.25}
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    for qi, ti in HungarianMatcher()(outputs, targets):
        assert qi.numel() == ti.numel() == 0 and qi.dtype == torch.int64


def test_matcher_rejects_nan_predictions_clearly():
    outputs = {"pred_logits": torch.randn(1, 4, 3), "pred_boxes": torch.rand(1, 4, 4)}
    outputs["pred_boxes"][0, 1] = float("nan")
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with pytest.raises(ValueError, match="not finite"):
        HungarianMatcher()(outputs, targets)


def test_assign_splits_by_target_counts():
    cost = torch.full((2, 3, 3), 10.0)
    cost[0, 2, 0] = 0.0  # image 0 owns target column 0
    cost[1, 0, 2] = 0.0  # image 1 owns target columns 1..2; its column 1 is local 1
    cost[1, 1, 1] = 0.0
    (q0, t0), (q1, t1) = assign(cost, [1, 2])
    assert q0.tolist() == [2] and t0.tolist() == [0]
    assert q1.tolist() == [0, 1] and t1.tolist() == [1, 0]


def _matcher_from_fixture(fx):
    m = fx["config"]["matcher"]
    return HungarianMatcher(cost_class=m["cost_class"], cost_bbox=m["cost_bbox"], cost_giou=m["cost_giou"])


def _assert_same_indices(ours, official, what):
    assert len(ours) == len(official), f"{what}: batch size differs"
    for i, ((q, t), (oq, ot)) in enumerate(zip(ours, official)):
        assert torch.equal(q, oq) and torch.equal(t, ot), f"{what} image {i}: {q.tolist(), t.tolist()} " \
                                                          f"vs official {oq.tolist(), ot.tolist()}"


@pytest.mark.parametrize("block", ["synthetic", "query_override"])
def test_matcher_indices_match_official(fx, block):
    matcher = _matcher_from_fixture(fx)
    targets = fx["inputs"]["targets"]
    preds = fx["inputs"]["synthetic_outputs"] if block == "synthetic" else fx["outputs"]["query_override"]
    expected = fx["outputs"][block]
    _assert_same_indices(matcher(preds, targets), expected["matcher_indices"], f"{block} final layer")
    for layer, aux in enumerate(preds["aux_outputs"]):
        _assert_same_indices(matcher(aux, targets), expected["aux_matcher_indices"][layer], f"{block} aux {layer}")
    cost = matcher.cost_matrix(preds, targets)
    offset = 0
    for i, official in enumerate(expected["matcher_cost_matrices"]):
        n = official.shape[1]
        torch.testing.assert_close(cost[i, :, offset:offset + n], official, rtol=1e-4, atol=1e-4)
        offset += n
