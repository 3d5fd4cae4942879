"""Box utilities and DETR's Hungarian matcher (facebookresearch/detr ``util/box_ops.py``, ``models/matcher.py``).

Boxes are ``cxcywh`` (normalised centre, width, height) as the models predict them, or ``xyxy`` corners. IoU and
generalized IoU are torchvision's (the same formulas as DETR's ``box_ops``). They do not assert on their inputs
(an assert there forces a device sync on every call); the matcher checks its cost matrix once, on the CPU copy it
needs anyway, and raises a clear error for NaN/Inf predictions instead of an assert deep inside GIoU.

The matcher is factored so that other set-prediction losses can reuse its pieces:
``HungarianMatcher.class_cost`` (override for a focal cost), ``HungarianMatcher.cost_matrix`` ([B, Q, sum T]) and
``assign(cost, sizes)``, which solves a batched cost matrix split by per-image target counts.
"""
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert
from torchvision.ops import box_iou as _box_iou
from torchvision.ops import generalized_box_iou as _generalized_box_iou


def box_cxcywh_to_xyxy(boxes):
    """[..., 4] (cx, cy, w, h) -> (x0, y0, x1, y1)."""
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes):
    """[..., 4] (x0, y0, x1, y1) -> (cx, cy, w, h)."""
    return box_convert(boxes, "xyxy", "cxcywh")


def box_iou(boxes1, boxes2):
    """Pairwise IoU of xyxy boxes: [N, 4], [M, 4] -> [N, M]."""
    return _box_iou(boxes1, boxes2)


def generalized_box_iou(boxes1, boxes2):
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes: [N, 4], [M, 4] -> [N, M].

    GIoU = IoU - (|C| - |A u B|) / |C|, C the smallest box enclosing A and B. Boxes must satisfy x1 >= x0,
    y1 >= y0 (not checked here; see ``check_boxes``).
    """
    return _generalized_box_iou(boxes1, boxes2)


def check_boxes(boxes, what="boxes"):
    """Raise a ValueError naming ``what`` if xyxy ``boxes`` hold NaN/Inf or have x1 < x0 or y1 < y0."""
    if boxes.numel() == 0:
        return
    if not torch.isfinite(boxes).all():
        raise ValueError(f"{what} contain NaN or Inf values (did training diverge? try a lower --lr or --amp off)")
    if (boxes[..., 2:] < boxes[..., :2]).any():
        bad = boxes[(boxes[..., 2:] < boxes[..., :2]).any(-1)][:3].tolist()
        raise ValueError(f"{what} must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0, got e.g. {bad}")


def assign(cost, sizes):
    """Solve one assignment per image of a batched cost matrix.

    cost: [B, Q, sum(sizes)] (any device; moved to the CPU once), sizes: targets per image. Image i is assigned on
    its own block cost[i, :, offset_i : offset_i + sizes[i]] with scipy's ``linear_sum_assignment``.
    Returns a list of B pairs (query_idx, target_idx), int64 tensors of length min(Q, sizes[i]), query_idx sorted.
    """
    cost = cost.detach().cpu()
    if not torch.isfinite(cost).all():
        raise ValueError("matching cost holds NaN/Inf: the predictions (logits or boxes) are not finite; "
                         "training probably diverged (lower --lr, check --clip_max_norm, or disable --amp)")
    indices = []
    for i, block in enumerate(cost.split(list(sizes), -1)):
        query_idx, target_idx = linear_sum_assignment(block[i].numpy())
        indices.append((torch.as_tensor(query_idx, dtype=torch.int64), torch.as_tensor(target_idx, dtype=torch.int64)))
    return indices


class HungarianMatcher(nn.Module):
    """One-to-one assignment between predictions and targets (DETR Sec. 3.1, Eq. 1), without gradient.

    Cost of matching prediction q to target t (Sec. 3.1, Appendix A.1):
        C = cost_bbox * ||b_q - b_t||_1 + cost_class * (-p_q(c_t)) + cost_giou * (-GIoU(b_q, b_t))
    computed for the whole batch as one [B * Q, sum T] matrix, moved to the CPU once, then solved per image.
    Defaults are the paper's weights (1, 5, 2); the official class defaults are 1, 1, 1 but ``build`` passes these.
    """

    def __init__(self, cost_class=1.0, cost_bbox=5.0, cost_giou=2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    def class_cost(self, logits, target_ids):
        """logits [N, num_classes + 1], target_ids [T] -> [N, T] = -p(target class) (the 1 - p constant dropped)."""
        return -logits.softmax(-1)[:, target_ids]

    @torch.no_grad()
    def cost_matrix(self, outputs, targets):
        """outputs: pred_logits [B, Q, K], pred_boxes [B, Q, 4] (cxcywh); targets: list of B dicts with labels [T_i],
        boxes [T_i, 4] (cxcywh). Returns the cost [B, Q, sum T_i]."""
        bs, num_queries = outputs["pred_logits"].shape[:2]
        out_bbox = outputs["pred_boxes"].flatten(0, 1)  # [B * Q, 4]
        tgt_ids = torch.cat([t["labels"] for t in targets])  # [sum T]
        tgt_bbox = torch.cat([t["boxes"] for t in targets]).to(out_bbox.dtype)  # [sum T, 4]
        cost_class = self.class_cost(outputs["pred_logits"].flatten(0, 1), tgt_ids)
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        return cost.view(bs, num_queries, len(tgt_ids))  # [B, Q, sum T]

    @torch.no_grad()
    def forward(self, outputs, targets):
        """Returns a list of B pairs (query_idx, target_idx) of int64 tensors, len = min(Q, T_i)."""
        return assign(self.cost_matrix(outputs, targets), [len(t["boxes"]) for t in targets])
