"""TrackFormer: Multi-Object Tracking with Transformers.

Tim Meinhardt, Alexander Kirillov, Laura Leal-Taixe, Christoph Feichtenhofer. CVPR 2022. arXiv:2101.02702.
Official code: https://github.com/timmeinhardt/trackformer (described at e468bf1).

What this file reproduces: the paper's main MOT17 model (Deformable DETR with multi-frame attention, hidden 288,
500 object queries, 4 feature levels per frame, iterative box refinement, focal loss), its track queries, two-frame
training with the official false-negative / false-positive track-query augmentation, the online `Tracker`
(score thresholds 0.4, NMS 0.9, inactive patience 5, re-identification) and the MOTChallenge evaluation (MOTA,
IDF1, MT, ML, FP, FN, IDSW at IoU 0.5). Status: the model, matcher and criterion reproduce the official code's
numbers on the parity fixture (tests/test_trackformer.py, 1e-4); the MOT17 numbers of the paper (74.1 MOTA on
the test set, 71.3 on the half/half cross-validation split) are not yet reproduced (they need the CrowdHuman
pre-training and ~7 GPU-days). The released checkpoints load strictly (597 keys).

Multi-scale deformable attention runs in pure PyTorch (`grid_sample`), as the official reference path: no
compiled CUDA op (the most reported problem with the official code).

Commands
    # MOT17 (MOTChallenge layout under DATA/MOT17/train/MOT17-XX-FRCNN/...), train on the first half of every
    # sequence, track and evaluate the second half (the paper's cross-validation split)
    python trackformer.py --data_root DATA --output_dir out/mot17 --resume crowdhuman_checkpoint.pth
    torchrun --nproc_per_node 8 trackformer.py --data_root DATA --output_dir out/mot17
    python trackformer.py --data_root DATA --eval --resume out/mot17/checkpoint.pth --output_dir out/mot17 --viz
    # the synthetic demo (small configuration by flags; measured numbers and time in README.md)
    make demo-trackformer

Differences from the official code
- Deformable attention is the official pure-PyTorch path (`ms_deform_attn_core_pytorch`); training and tracking
  are the same numbers as the CUDA op up to float rounding.
- MOT17 is read directly from `gt/gt.txt` instead of a converted COCO JSON (same rows kept: conf 1, class 1;
  visibility 0 -> ignored). CrowdHuman / COCO-person pre-training reads a COCO JSON (`--coco_person_json`)
  and simulates the previous frame by a random shift/scale of the same image, as the official code does.
- MOT17 frame pairs share one random transform (flip, resize or resize-crop-resize) as the official dataset; the
  official extra +-1% random shift of the previous MOT frame (`track_prev_frame_rnd_augs`) is not applied.
- Evaluation is a small CLEAR-MOT / IDF1 implementation with motmetrics' definitions (see `mot_counts`);
  motmetrics itself is not a dependency.
- The track-query augmentation follows the official code, which differs from its config names: see
  `add_track_queries`.
"""
import argparse
import configparser
import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import nms
from torchvision.ops import sigmoid_focal_loss as focal_loss

from common import training as tu
from common.matching import HungarianMatcher, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou
from common.position_encoding import PositionEmbeddingSine3D
from detr import MLP, Backbone, NestedTensor, nested_tensor_from_tensor_list

# ----------------------------------------------------------------------------------------------------------------
# Arguments (official names; defaults = cfgs/train.yaml + mot17_crowdhuman + deformable + multi_frame + tracking)
# ----------------------------------------------------------------------------------------------------------------


def get_args_parser():
    p = argparse.ArgumentParser("TrackFormer", add_help=True)
    # optimisation (Sec. 4, train.yaml)
    p.add_argument("--lr", default=2e-4, type=float)
    p.add_argument("--lr_backbone", default=2e-5, type=float, help="0 freezes the backbone")
    p.add_argument("--lr_backbone_names", default=["backbone.0"], nargs="+")
    p.add_argument("--lr_linear_proj_names", default=["reference_points", "sampling_offsets"], nargs="+")
    p.add_argument("--lr_linear_proj_mult", default=0.1, type=float)
    p.add_argument("--batch_size", default=2, type=int, help="per process (7 GPUs x 2 in the paper)")
    p.add_argument("--weight_decay", default=1e-4, type=float)
    p.add_argument("--epochs", default=40, type=int)
    p.add_argument("--lr_drop", default=10, type=int)
    p.add_argument("--clip_max_norm", default=0.1, type=float)
    # model (Deformable DETR, multi-frame; Sec. 3 and 4)
    p.add_argument("--backbone", default="resnet50", type=str)
    p.add_argument("--num_feature_levels", default=4, type=int)
    p.add_argument("--enc_layers", default=6, type=int)
    p.add_argument("--dec_layers", default=6, type=int)
    p.add_argument("--dim_feedforward", default=1024, type=int)
    p.add_argument("--hidden_dim", default=288, type=int, help="divisible by 3 (3-D encoding) and 32 (GroupNorm)")
    p.add_argument("--dropout", default=0.1, type=float)
    p.add_argument("--nheads", default=8, type=int)
    p.add_argument("--num_queries", default=500, type=int)
    p.add_argument("--dec_n_points", default=4, type=int)
    p.add_argument("--enc_n_points", default=4, type=int)
    p.add_argument("--num_classes", default=20, type=int, help="class logits (focal loss: no no-object logit); "
                   "20 as the released MOT models, person = 0")
    # track queries (Sec. 3.2 / 4)
    p.add_argument("--track_prev_frame_range", default=5, type=int)
    p.add_argument("--track_query_false_positive_prob", default=0.1, type=float)
    p.add_argument("--track_query_false_negative_prob", default=0.4, type=float)
    # matcher and loss (focal loss, Deformable DETR)
    p.add_argument("--no_aux_loss", dest="aux_loss", action="store_false")
    p.add_argument("--set_cost_class", default=2.0, type=float)
    p.add_argument("--set_cost_bbox", default=5.0, type=float)
    p.add_argument("--set_cost_giou", default=2.0, type=float)
    p.add_argument("--cls_loss_coef", default=2.0, type=float)
    p.add_argument("--bbox_loss_coef", default=5.0, type=float)
    p.add_argument("--giou_loss_coef", default=2.0, type=float)
    p.add_argument("--focal_alpha", default=0.25, type=float)
    p.add_argument("--focal_gamma", default=2.0, type=float)
    # tracker (cfgs/track.yaml + track_reid.yaml)
    p.add_argument("--detection_obj_score_thresh", default=0.4, type=float)
    p.add_argument("--track_obj_score_thresh", default=0.4, type=float)
    p.add_argument("--detection_nms_thresh", default=0.9, type=float)
    p.add_argument("--track_nms_thresh", default=0.9, type=float)
    p.add_argument("--inactive_patience", default=5, type=int)
    p.add_argument("--reid_sim_threshold", default=0.0, type=float)
    p.add_argument("--reid_score_thresh", default=0.4, type=float)
    p.add_argument("--public_detections", default="", choices=["", "min_iou_0_5"],
                   help="keep only new tracks that cover a det/det.txt box at IoU 0.5 (MOT17 public)")
    # data
    p.add_argument("--data_root", "--mot_path", default="data/synthetic", type=str,
                   help="folder holding MOT17/train/<seq>/{seqinfo.ini,img1,gt/gt.txt,det/det.txt}")
    p.add_argument("--train_frame_range", default=[0.0, 0.5], type=float, nargs=2,
                   help="fraction of every sequence used for training (cross-val: first half)")
    p.add_argument("--val_frame_range", default=[0.5, 1.0], type=float, nargs=2)
    p.add_argument("--sequences", default=[], nargs="*", help="sequence folder names (default: all)")
    p.add_argument("--coco_person_json", default="", type=str,
                   help="optional COCO-format person annotations (CrowdHuman/COCO) for simulated frame pairs")
    p.add_argument("--coco_person_images", default="", type=str)
    p.add_argument("--coco_and_crowdhuman_prev_frame_rnd_augs", default=0.2, type=float)
    p.add_argument("--img_max_size", default=1333, type=int, help="img_transform.max_size")
    p.add_argument("--val_width", default=800, type=int, help="img_transform.val_width (short side at eval)")
    # run
    p.add_argument("--output_dir", default="", type=str)
    p.add_argument("--device", default=tu.default_device(), type=str)
    p.add_argument("--seed", default=42, type=int)
    p.add_argument("--resume", default="", type=str, help="checkpoint to resume (or released model to load)")
    p.add_argument("--start_epoch", default=0, type=int)
    p.add_argument("--eval", action="store_true", help="only track and evaluate the validation frames")
    p.add_argument("--num_workers", default=2, type=int)
    p.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 on CUDA)")
    p.add_argument("--viz", action="store_true", help="draw tracks with ids (PNG per frame) into OUTPUT_DIR/viz")
    p.add_argument("--max_iters", default=0, type=int, help="stop an epoch after this many steps (0: all)")
    p.add_argument("--print_freq", default=10, type=int)
    return p


# ----------------------------------------------------------------------------------------------------------------
# Model: multi-scale deformable attention (Deformable DETR, Sec. 4.1, Eq. 3), in pure PyTorch
# ----------------------------------------------------------------------------------------------------------------


def inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def ms_deform_attn_core(value, spatial_shapes, sampling_locations, attention_weights):
    """Eq. (3): MSDeformAttn(z_q, p_q, {x^l}) = sum_m W_m [sum_l sum_k A_mlqk W'_m x^l(phi_l(p_q) + dp_mlqk)].

    value [N, S, M, D] (S = sum_l H_l W_l), spatial_shapes [(H_l, W_l)], sampling_locations [N, Lq, M, L, P, 2]
    in [0, 1] (x, y), attention_weights [N, Lq, M, L, P] -> [N, Lq, M * D]. Bilinear sampling with zeros outside
    the map, `align_corners=False`, exactly as the official `ms_deform_attn_core_pytorch`.
    """
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] coordinates
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels, num_points)
    out = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        value_l = value_list[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)  # [N * M, D, H, W]
        grid_l = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # [N * M, Lq, P, 2]
        sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        # accumulated level by level (the official code stacks all levels first: same sum, one large copy more)
        out = out + (sampled * weights[..., lvl, :]).sum(-1)  # [N * M, D, Lq]
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: each query samples n_points locations per head and level around its
    reference point (offsets normalised by the level's size, or by the reference box's size when it is a box)."""

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        assert d_model % n_heads == 0, f"d_model {d_model} must be divisible by n_heads {n_heads}"
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        # offsets start on a fixed pattern: one direction per head (8 compass directions), scaled by point index
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query, reference_points, value_in, spatial_shapes, padding_mask=None):
        """query [N, Lq, C]; reference_points [N, Lq, L, 2] (x, y) or [N, Lq, L, 4] (cx, cy, w, h), in [0, 1];
        value_in [N, S, C]; spatial_shapes [L, 2] long (H, W); padding_mask [N, S] (True = padding)."""
        n, lq, _ = query.shape
        value = self.value_proj(value_in)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(n, value_in.shape[1], self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level. TrackFormer's copy of MSDeformAttn divides (dx, dy) by (H_l, W_l),
            # not by (W_l, H_l) as Deformable DETR does; the released models were trained so, and the parity test
            # fails with Deformable DETR's order on non-square maps, so the official order is kept.
            normalizer = spatial_shapes.to(offsets.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        else:
            # offsets relative to the reference box: p + dp / n_points * wh / 2
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        out = ms_deform_attn_core(value, shapes, locations.to(value.dtype), weights.to(value.dtype))
        return self.output_proj(out)


# ----------------------------------------------------------------------------------------------------------------
# Model: Deformable DETR encoder / decoder with iterative box refinement (Deformable DETR Sec. 4, App. A.4)
# ----------------------------------------------------------------------------------------------------------------


class EncoderLayer(nn.Module):
    def __init__(self, d_model, d_ffn, dropout, n_levels, n_heads, n_points):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, padding_mask):
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, reference_points, src, spatial_shapes,
                                                            padding_mask)))
        return self.norm2(src + self.dropout3(self.linear2(self.dropout2(F.relu(self.linear1(src))))))


class Encoder(nn.Module):
    def __init__(self, layer_kwargs, num_layers):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**layer_kwargs) for _ in range(num_layers))

    @staticmethod
    def reference_points(spatial_shapes, valid_ratios, device):
        """Pixel centres of every level, normalised by the valid (unpadded) size: [N, S, L, 2] (x, y)."""
        points = []
        for lvl, (h, w) in enumerate(spatial_shapes):
            ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                                          torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                                          indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            points.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, src, spatial_shapes, valid_ratios, pos, padding_mask):
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        reference_points = self.reference_points(shapes, valid_ratios, src.device)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, padding_mask)
        return src


class DecoderLayer(nn.Module):
    """Self-attention -> norm2, deformable cross-attention -> norm1, FFN -> norm3 (the official names)."""

    def __init__(self, d_model, d_ffn, dropout, n_levels, n_heads, n_points):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, padding_mask):
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, k, tgt, need_weights=False)[0]))
        tgt = self.norm1(tgt + self.dropout1(self.cross_attn(tgt + query_pos, reference_points, memory,
                                                             spatial_shapes, padding_mask)))
        return self.norm3(tgt + self.dropout4(self.linear2(self.dropout3(F.relu(self.linear1(tgt))))))


class Decoder(nn.Module):
    def __init__(self, layer_kwargs, num_layers):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(**layer_kwargs) for _ in range(num_layers))
        self.bbox_embed = None  # set by TrackFormer: the box heads, shared (iterative box refinement)

    def forward(self, tgt, reference_points, memory, spatial_shapes, valid_ratios, query_pos, padding_mask):
        """Returns hs [num_layers, N, Q, C] and each layer's refined boxes [num_layers, N, Q, 4] (cxcywh).

        The refined boxes are the model's box predictions: the official head recomputes the same
        sigmoid(bbox_embed[l](hs_l) + sigmoid^-1(reference_{l-1})) from the detached reference, so they are
        returned here (with the gradient through bbox_embed and hs) instead of being computed twice."""
        hs, boxes = [], []
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                ref_input = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                ref_input = reference_points[:, :, None] * valid_ratios[:, None]
            tgt = layer(tgt, query_pos, ref_input, memory, spatial_shapes, padding_mask)
            # iterative box refinement: b_l = sigmoid(delta_l + sigmoid^-1(b_{l-1})), detached between layers
            delta = self.bbox_embed[lid](tgt)
            if reference_points.shape[-1] == 4:
                new_reference = (delta + inverse_sigmoid(reference_points)).sigmoid()
            else:
                new_reference = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]],
                                          -1).sigmoid()
            reference_points = new_reference.detach()
            hs.append(tgt)
            boxes.append(new_reference)
        return torch.stack(hs), torch.stack(boxes)


class DeformableTransformer(nn.Module):
    """Encoder run separately on the previous and the current frame's levels; decoder over both frames' levels."""

    def __init__(self, d_model=288, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=1024,
                 dropout=0.1, num_feature_levels=8, dec_n_points=4, enc_n_points=4):
        super().__init__()
        self.d_model = d_model
        self.num_feature_levels = num_feature_levels  # both frames: 2 x 4
        self.encoder = Encoder(dict(d_model=d_model, d_ffn=dim_feedforward, dropout=dropout,
                                    n_levels=num_feature_levels // 2, n_heads=nhead, n_points=enc_n_points),
                               num_encoder_layers)
        self.decoder = Decoder(dict(d_model=d_model, d_ffn=dim_feedforward, dropout=dropout,
                                    n_levels=num_feature_levels, n_heads=nhead, n_points=dec_n_points),
                               num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.reference_points = nn.Linear(d_model, 2)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
        nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    @staticmethod
    def valid_ratio(mask):
        """Fraction of the map that is not padding, (w, h): [N, 2]."""
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    def forward(self, srcs, masks, pos_embeds, query_embed, track_queries=None):
        """srcs/masks/pos_embeds: 8 levels, previous frame first. query_embed [Q, 2C] = (query_pos, tgt).
        track_queries: optional dict with hs_embeds [N, T, C] and boxes [N, T, 4] (cxcywh), placed before the
        object queries. Returns hs [layers, N, T + Q, C] and boxes [layers, N, T + Q, 4]."""
        src_flat, mask_flat, pos_flat, shapes = [], [], [], []
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            shapes.append(src.shape[-2:])
            src_flat.append(src.flatten(2).transpose(1, 2))  # [N, H * W, C]
            mask_flat.append(mask.flatten(1))
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flat, mask_flat, pos_flat = torch.cat(src_flat, 1), torch.cat(mask_flat, 1), torch.cat(pos_flat, 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src_flat.device)  # [8, 2]
        valid_ratios = torch.stack([self.valid_ratio(m) for m in masks], 1)  # [N, 8, 2]

        # multi-frame attention, separate encoder: the same encoder on each frame's 4 levels
        half_tokens, half_levels = src_flat.shape[1] // 2, self.num_feature_levels // 2
        prev, cur = slice(None, half_tokens), slice(half_tokens, None)
        prev_memory = self.encoder(src_flat[:, prev], spatial_shapes[:half_levels], valid_ratios[:, :half_levels],
                                   pos_flat[:, prev], mask_flat[:, prev])
        memory = self.encoder(src_flat[:, cur], spatial_shapes[half_levels:], valid_ratios[:, half_levels:],
                              pos_flat[:, cur], mask_flat[:, cur])
        # the official code concatenates [current, previous] although the level list is [previous, current]:
        # the decoder reads level l < 4 from the current frame's memory (same shapes, so no effect on validity)
        memory = torch.cat([memory, prev_memory], 1)

        bs, c = memory.shape[0], memory.shape[2]
        query_pos, tgt = torch.split(query_embed, c, dim=1)
        query_pos = query_pos.unsqueeze(0).expand(bs, -1, -1)
        tgt = tgt.unsqueeze(0).expand(bs, -1, -1)
        reference_points = self.reference_points(query_pos).sigmoid()  # [N, Q, 2]
        if track_queries is not None:
            # track queries: previous output embeddings as tgt, no positional query, reference = previous centre
            track_hs = track_queries["hs_embeds"]
            tgt = torch.cat([track_hs, tgt], 1)
            query_pos = torch.cat([torch.zeros_like(track_hs), query_pos], 1)
            reference_points = torch.cat([track_queries["boxes"][..., :2], reference_points], 1)
        return self.decoder(tgt, reference_points, memory, spatial_shapes, valid_ratios, query_pos, mask_flat)


# ----------------------------------------------------------------------------------------------------------------
# Model: TrackFormer = Deformable DETR over two frames + track queries (Sec. 3.1 - 3.2)
# ----------------------------------------------------------------------------------------------------------------


def resize_mask(mask, size):
    """Nearest-neighbour resize of a [B, H, W] bool mask, as the official backbone does."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


class TrackFormer(nn.Module):
    """DeformableDETRTracking with multi_frame_attention, multi_frame_encoding and a separate encoder per frame.

    forward(images, prev_features=None, track_queries=None) -> (out, features):
      images [B, 3, H, W] (or a list of [3, H_i, W_i], padded and masked); prev_features the `features` returned
      for the previous frame (None: the current frame stands in for it); track_queries {hs_embeds [B, T, C],
      boxes [B, T, 4] cxcywh}. out = {pred_logits [B, T + Q, num_classes], pred_boxes [B, T + Q, 4],
      hs_embed [B, T + Q, C], aux_outputs}, query order [track queries..., object queries].
    """

    def __init__(self, backbone, transformer, num_classes=20, num_queries=500, num_feature_levels=4, aux_loss=True):
        super().__init__()
        self.backbone = backbone  # [0]: ResNet (keys backbone.0.body.*), [1]: 3-D sine encoding (no parameters)
        self.transformer = transformer
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.aux_loss = aux_loss
        hidden_dim = transformer.d_model
        self.hidden_dim = hidden_dim
        channels = [backbone[0].num_channels // 4, backbone[0].num_channels // 2, backbone[0].num_channels]
        projections = [nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
                       for c in channels]
        in_channels = channels[-1]
        for _ in range(num_feature_levels - len(channels)):  # extra stride-64 level from the last backbone map
            projections.append(nn.Sequential(nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                                             nn.GroupNorm(32, hidden_dim)))
            in_channels = hidden_dim
        self.input_proj = nn.ModuleList(projections)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)  # (query_pos, tgt)

        class_embed = nn.Linear(hidden_dim, num_classes)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))  # focal-loss prior 0.01
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        num_pred = len(transformer.decoder.layers)
        self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
        self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
        nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        # box refinement: the decoder uses the same heads. Registered twice, as in the official code, so the
        # checkpoint holds both bbox_embed.* and transformer.decoder.bbox_embed.* (597 keys) and loads strictly.
        self.transformer.decoder.bbox_embed = self.bbox_embed

    def backbone_features(self, images):
        """ResNet layer2-4 maps (strides 8, 16, 32) with their padding masks: [(x [B, C_l, H_l, W_l], mask)]."""
        if torch.is_tensor(images) and images.dim() == 4:
            samples = NestedTensor(images, images.new_zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool))
        else:
            samples = nested_tensor_from_tensor_list(list(images))  # zero-padded, mask True on padding
        return [(f.tensors, f.mask) for f in list(self.backbone[0](samples).values())[-3:]]

    def forward(self, images, prev_features=None, track_queries=None):
        features = self.backbone_features(images)
        # 3-D (frame, y, x) encoding of the current frame's masks: [B, 2, C, H, W]; frame 0 = previous
        pos = [self.backbone[1](x, m) for x, m in features]
        frames = [features if prev_features is None else prev_features, features]
        srcs, masks, pos_embeds = [], [], []
        for frame, frame_features in enumerate(frames):  # levels 0-3: previous frame, 4-7: current frame
            for lvl, (x, m) in enumerate(frame_features):
                srcs.append(self.input_proj[lvl](x))
                masks.append(m)
                pos_embeds.append(pos[lvl][:, frame])
            for lvl in range(len(frame_features), self.num_feature_levels):
                x = frame_features[-1][0] if lvl == len(frame_features) else srcs[-1]
                src = self.input_proj[lvl](x)
                m = resize_mask(frame_features[0][1], src.shape[-2:])  # from the frame's stride-8 mask
                srcs.append(src)
                masks.append(m)
                pos_embeds.append(self.backbone[1](src, m)[:, frame].to(src.dtype))
        hs, boxes = self.transformer(srcs, masks, pos_embeds, self.query_embed.weight, track_queries)
        logits = torch.stack([head(h) for head, h in zip(self.class_embed, hs)])
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "hs_embed": hs[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out, features


@torch.no_grad()
def post_process(outputs, target_sizes):
    """DeformablePostProcess: score = max_c sigmoid(logit_c), label = argmax; boxes xyxy in pixels of
    target_sizes [B, 2] (h, w). No clipping (`overflow_boxes`)."""
    scores, labels = outputs["pred_logits"].sigmoid().max(-1)
    img_h, img_w = target_sizes.unbind(1)
    scale = torch.stack([img_w, img_h, img_w, img_h], dim=1).to(outputs["pred_boxes"].dtype)
    boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"]) * scale[:, None, :]
    return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]


# ----------------------------------------------------------------------------------------------------------------
# Matching and losses: focal cost, track queries forced onto their identities (Sec. 3.3, Eq. 2)
# ----------------------------------------------------------------------------------------------------------------


class TrackHungarianMatcher(HungarianMatcher):
    """DETR's matcher with the focal classification cost and TrackFormer's track-query rule.

    C = cost_bbox * L1 + cost_class * C_focal + cost_giou * (-GIoU), with, at the target class and p = sigmoid:
        C_focal = alpha (1 - p)^gamma (-log(p + 1e-8)) - (1 - alpha) p^gamma (-log(1 - p + 1e-8)).
    Targets may carry `track_queries_mask` / `track_queries_fal_pos_mask` (bool [T + Q]) and
    `track_query_match_ids` (one target index per true track query, in order): a true track query is assigned to
    its own identity (Eq. 2: sigma(i) = j for track queries of objects still visible), false-positive track queries
    stay unmatched (-> background), and the object queries are matched to the remaining targets by Hungarian.
    Returns a list of B pairs (query_idx, target_idx), query_idx sorted.
    """

    def __init__(self, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0):
        super().__init__(cost_class, cost_bbox, cost_giou)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def class_cost(self, logits, target_ids):
        prob = logits.sigmoid()
        neg = (1 - self.focal_alpha) * prob ** self.focal_gamma * (-(1 - prob + 1e-8).log())
        pos = self.focal_alpha * (1 - prob) ** self.focal_gamma * (-(prob + 1e-8).log())
        return pos[:, target_ids] - neg[:, target_ids]

    @torch.no_grad()
    def forward(self, outputs, targets):
        cost = self.cost_matrix(outputs, targets).float().cpu()  # [B, Q, sum T]
        indices, offset = [], 0
        for i, target in enumerate(targets):
            num_targets = len(target["boxes"])
            block = cost[i, :, offset:offset + num_targets]
            offset += num_targets
            if not torch.isfinite(block).all():
                raise ValueError("matching cost holds NaN/Inf: predictions are not finite (training diverged?)")
            forced_rows, forced_cols = [], []
            free_rows = torch.ones(block.shape[0], dtype=torch.bool)
            if "track_queries_mask" in target:
                track_mask = target["track_queries_mask"].cpu()
                true_tracks = (track_mask & ~target["track_queries_fal_pos_mask"].cpu()).nonzero()[:, 0]
                forced_rows = true_tracks.tolist()
                forced_cols = target["track_query_match_ids"].cpu().tolist()
                free_rows &= ~track_mask  # false positives and true track queries leave the free pool
            free_cols = torch.ones(num_targets, dtype=torch.bool)
            free_cols[forced_cols] = False
            row_ids, col_ids = free_rows.nonzero()[:, 0], free_cols.nonzero()[:, 0]
            rows, cols = linear_sum_assignment(block[row_ids][:, col_ids].numpy())
            src = torch.cat([torch.as_tensor(forced_rows, dtype=torch.int64), row_ids[rows]])
            tgt = torch.cat([torch.as_tensor(forced_cols, dtype=torch.int64), col_ids[cols]])
            order = src.argsort()
            indices.append((src[order], tgt[order]))
        return indices


def sigmoid_focal_loss(logits, targets, num_boxes, alpha=0.25, gamma=2.0):
    """Focal loss (RetinaNet; torchvision's): FL = -alpha_t (1 - p_t)^gamma log(p_t), averaged over queries,
    summed, divided by num_boxes."""
    return focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none").mean(1).sum() / num_boxes


class SetCriterion(nn.Module):
    """Focal classification + L1 + GIoU on matched pairs, on the last decoder layer and each auxiliary layer
    (each re-matched). Unmatched queries, false-positive track queries included, are trained as background."""

    def __init__(self, num_classes, matcher, weight_dict, focal_alpha=0.25, focal_gamma=2.0):
        super().__init__()
        self.num_classes, self.matcher, self.weight_dict = num_classes, matcher, weight_dict
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def loss_labels(self, outputs, targets, indices, num_boxes, log=True):
        logits = outputs["pred_logits"]  # [B, Q, K]
        batch_idx, src_idx = _src_permutation(indices)
        classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[batch_idx, src_idx] = classes_o
        onehot = torch.zeros(*logits.shape[:2], logits.shape[2] + 1, dtype=logits.dtype, device=logits.device)
        onehot.scatter_(2, classes.unsqueeze(-1), 1)
        # the official code averages over queries and then multiplies by their number: sum / num_boxes
        loss_ce = sigmoid_focal_loss(logits, onehot[:, :, :-1], num_boxes, self.focal_alpha,
                                     self.focal_gamma) * logits.shape[1]
        losses = {"loss_ce": loss_ce}
        if log:  # top-1 error of the matched queries (logging only; 100 when there is no target)
            matched = logits[batch_idx, src_idx].detach()
            accuracy = ((matched.argmax(-1) == classes_o).float().mean() * 100 if len(classes_o)
                        else logits.new_zeros(()))
            losses["class_error"] = 100 - accuracy
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, num_boxes):
        # logging only; as the official code, the last logit counts as "no object"
        logits = outputs["pred_logits"]
        card_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        return {"cardinality_error": F.l1_loss(card_pred.float(), lengths.float())}

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        src = outputs["pred_boxes"][_src_permutation(indices)]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], 0)
        loss_giou = 1 - torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        return {"loss_bbox": F.l1_loss(src, tgt, reduction="none").sum() / num_boxes,
                "loss_giou": loss_giou.sum() / num_boxes}

    def get_losses(self, outputs, targets, indices, num_boxes, log=True):
        losses = self.loss_labels(outputs, targets, indices, num_boxes, log)
        losses.update(self.loss_cardinality(outputs, targets, indices, num_boxes))
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        return losses

    def forward(self, outputs, targets):
        num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))],
                                    device=outputs["pred_logits"].device)
        num_boxes = torch.clamp(tu.all_reduce_mean(num_boxes), min=1).item()
        last = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        losses = self.get_losses(last, targets, self.matcher(last, targets), num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_losses = self.get_losses(aux, targets, self.matcher(aux, targets), num_boxes, log=False)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        return losses


def _src_permutation(indices):
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch_idx, torch.cat([src for src, _ in indices])


# ----------------------------------------------------------------------------------------------------------------
# Track queries for training (Sec. 3.3 "Track query re-identification" / 4 "Track augmentations")
# ----------------------------------------------------------------------------------------------------------------


def add_track_queries(targets, prev_indices, prev_out, num_queries, false_negative_prob, false_positive_prob):
    """Turn the previous frame's matched outputs into track queries of the current frame, as the official
    `add_track_queries_to_targets` does (the same random draws, in the same order).

    Where the official code differs from its config names:
    - false negatives: not an independent drop with `track_query_false_negative_prob` (0.4) per object (that code
      is commented out): a random subset of n matched objects is kept, n ~ U{0, ..., min_b #matched_b}, the same n
      for the whole batch; the probability only switches this on (any value > 0).
    - false positives: not one per track query with probability `track_query_false_positive_prob`: m ~
      U{0, ..., ceil(0.1 n)} extra previous outputs (same m for the batch). For j < #kept boxes whose identity
      persists, the output is drawn with weight = distance to kept box j (farther = more likely; the official
      weight is sqrt(2) |dx|: dx is squared twice and dy ignored, kept here); otherwise uniformly.
    - kept objects whose identity left the current frame also become false-positive track queries.

    Sets in each target: track_query_hs_embeds [T, C], track_query_boxes [T, 4] (detached), track_query_match_ids
    [#true], track_queries_mask and track_queries_fal_pos_mask [T + num_queries] (track queries first).
    """
    min_matched = min(len(ind[1]) for ind in prev_indices)
    num_kept = torch.randint(0, min_matched + 1, (1,)).item() if min_matched else 0
    num_fps = torch.randint(int(math.ceil(false_positive_prob * num_kept)) + 1, (1,)).item() if num_kept else 0
    for i, (target, (prev_out_ind, prev_target_ind)) in enumerate(zip(targets, prev_indices)):
        device = target["boxes"].device
        if false_negative_prob:
            subset = torch.randperm(len(prev_target_ind))[:num_kept]
            prev_out_ind, prev_target_ind = prev_out_ind[subset], prev_target_ind[subset]
        prev_track_ids = target["prev_target"]["track_ids"][prev_target_ind.to(device)]
        same_id = prev_track_ids.unsqueeze(1).eq(target["track_ids"])  # [kept, T_cur]
        persists = same_id.any(1)
        target["track_query_match_ids"] = same_id.nonzero()[:, 1]

        prev_boxes = prev_out["pred_boxes"][i]
        persisting_boxes = prev_boxes[prev_out_ind[persists.cpu()]]
        candidates = [k for k in range(prev_boxes.shape[0]) if k not in set(prev_out_ind.tolist())]
        false_positives = []
        for j in torch.randperm(num_kept)[:num_fps].tolist():
            if j < len(persisting_boxes):
                delta = persisting_boxes[j, :2].unsqueeze(0) - prev_boxes[candidates, :2]
                weights = torch.sqrt(delta[:, 0] ** 2 + delta[:, 0] ** 2)
                false_positives.append(candidates.pop(torch.multinomial(weights.float().cpu(), 1).item()))
            else:
                false_positives.append(candidates.pop(torch.randperm(len(candidates))[0].item()))
        query_ind = torch.tensor(prev_out_ind.tolist() + false_positives, dtype=torch.int64)
        is_true = torch.cat([persists.cpu(), torch.zeros(len(false_positives), dtype=torch.bool)])

        target["track_query_hs_embeds"] = prev_out["hs_embed"][i, query_ind.to(prev_boxes.device)]
        target["track_query_boxes"] = prev_boxes[query_ind.to(prev_boxes.device)].detach()
        pad = torch.zeros(num_queries, dtype=torch.bool)
        target["track_queries_mask"] = torch.cat([torch.ones_like(is_true), pad]).to(device)
        target["track_queries_fal_pos_mask"] = torch.cat([~is_true, pad]).to(device)


def stack_track_queries(targets):
    """The track queries of a batch as model input (every sample has the same number, as the official stack)."""
    return {"hs_embeds": torch.stack([t["track_query_hs_embeds"] for t in targets]),
            "boxes": torch.stack([t["track_query_boxes"] for t in targets])}


# ----------------------------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------------------------


def build_model(args):
    """TrackFormer, its criterion and matcher from `args` (the paper's MOT17 model with the default flags)."""
    if args.hidden_dim % 3 or args.hidden_dim % 32:
        raise SystemExit(f"--hidden_dim {args.hidden_dim} must be divisible by 3 (3-D encoding) and 32 (GroupNorm)")
    backbone = Backbone(args.backbone, train_backbone=args.lr_backbone > 0, return_interm_layers=True,
                        dilation=False)
    # [frame, y, x] x hidden_dim / 3 channels; the mask of the current frame is repeated over the 2 frames
    position = PositionEmbeddingSine3D(args.hidden_dim // 3, num_frames=2, normalize=True, per_frame_mask=False)
    transformer = DeformableTransformer(d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
                                        num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward,
                                        dropout=args.dropout, num_feature_levels=2 * args.num_feature_levels,
                                        dec_n_points=args.dec_n_points, enc_n_points=args.enc_n_points)
    model = TrackFormer(nn.Sequential(backbone, position), transformer, num_classes=args.num_classes,
                        num_queries=args.num_queries, num_feature_levels=args.num_feature_levels,
                        aux_loss=args.aux_loss)
    matcher = TrackHungarianMatcher(args.set_cost_class, args.set_cost_bbox, args.set_cost_giou,
                                    args.focal_alpha, args.focal_gamma)
    weight_dict = {"loss_ce": args.cls_loss_coef, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
    if args.aux_loss:
        weight_dict.update({f"{k}_{i}": v for i in range(args.dec_layers - 1) for k, v in list(weight_dict.items())})
    criterion = SetCriterion(args.num_classes, matcher, weight_dict, args.focal_alpha, args.focal_gamma)
    return model, criterion, matcher


# ----------------------------------------------------------------------------------------------------------------
# Online tracking (Sec. 3.3, models/tracker.py): track queries follow objects, object queries start new tracks
# ----------------------------------------------------------------------------------------------------------------


class Track:
    def __init__(self, pos, score, track_id, hs_embed, obj_ind):
        self.id, self.pos, self.score, self.obj_ind = track_id, pos, score, obj_ind
        self.hs_embed = [hs_embed]
        self.last_pos = [pos.clone()]
        self.count_inactive = 0
        self.count_termination = 0

    def has_positive_area(self):
        return bool(self.pos[2] > self.pos[0] and self.pos[3] > self.pos[1])


class Tracker:
    """The official tracker's bookkeeping, step by step.

    detector(image, prev_features, track_queries) -> (out, features) is the model in eval mode (tests pass
    hand-made outputs). Each step: (1) drop inactive tracks older than `inactive_patience` or with an empty box;
    (2) query the model with all active then inactive tracks (embedding hs_embed, box centre of the last box);
    (3) keep an active track if its score > track_obj_score_thresh and its label is 0 (person), else it goes
    inactive; an inactive track whose query scores > reid_score_thresh is re-activated (re-identification by its
    own track query); NMS at track_nms_thresh removes overlapping tracks; (4) object-query detections with
    score > detection_obj_score_thresh and label 0 are matched to inactive tracks by embedding distance
    (accepted when <= reid_sim_threshold) and otherwise start new tracks; NMS at detection_nms_thresh removes new
    tracks that overlap existing ones. `results[track_id][frame] = {bbox (xyxy pixels), score, obj_ind}`.
    """

    def __init__(self, detector, num_object_queries, detection_obj_score_thresh=0.4, track_obj_score_thresh=0.4,
                 detection_nms_thresh=0.9, track_nms_thresh=0.9, inactive_patience=5, reid_sim_threshold=0.0,
                 reid_score_thresh=0.4, public_detections="", steps_termination=1):
        self.detector, self.num_object_queries = detector, num_object_queries
        self.detection_obj_score_thresh = detection_obj_score_thresh
        self.track_obj_score_thresh = track_obj_score_thresh
        self.detection_nms_thresh, self.track_nms_thresh = detection_nms_thresh, track_nms_thresh
        self.inactive_patience = float(inactive_patience)
        self.reid_sim_threshold, self.reid_score_thresh = reid_sim_threshold, reid_score_thresh
        self.public_detections, self.steps_termination = public_detections, steps_termination
        self.reset()

    def reset(self):
        self.tracks, self.inactive_tracks = [], []
        self.prev_features = None
        self.track_num, self.results, self.frame_index, self.num_reids = 0, {}, 0, 0

    def _prune_inactive(self):
        self.inactive_tracks = [t for t in self.inactive_tracks
                                if t.has_positive_area() and t.count_inactive <= self.inactive_patience]

    def _to_inactive(self, tracks):
        self.tracks = [t for t in self.tracks if t not in tracks]
        for track in tracks:
            track.pos = track.last_pos[-1]
        self.inactive_tracks += tracks

    @torch.no_grad()
    def step(self, image, orig_size, public_dets=None):
        """image [1, 3, h, w] (normalised, resized); orig_size [1, 2] (H, W) of the frame the results refer to;
        public_dets [D, 4] xyxy pixels (only with public_detections)."""
        self._prune_inactive()
        for track in self.tracks:
            track.last_pos.append(track.pos.clone())
        queried = self.tracks + self.inactive_tracks
        track_queries = None
        if queried:
            h, w = orig_size[0].tolist()
            boxes = box_xyxy_to_cxcywh(torch.stack([t.pos for t in queried]).float().cpu())
            boxes = boxes / torch.tensor([w, h, w, h], dtype=torch.float32)
            track_queries = {"hs_embeds": torch.stack([t.hs_embed[-1] for t in queried])[None].to(image.device),
                             "boxes": boxes[None].to(image.device)}
        out, features = self.detector(image, self.prev_features, track_queries)
        hs_embeds = out["hs_embed"][0]
        result = post_process(out, orig_size.to(out["pred_boxes"].device))[0]
        scores, labels, boxes = result["scores"], result["labels"], result["boxes"]
        num_tracks = len(queried)

        if num_tracks:  # track queries
            keep = (scores[:num_tracks] > self.track_obj_score_thresh) & (labels[:num_tracks] == 0)
            to_inactive = []
            for i, track in enumerate(self.tracks):
                if keep[i]:
                    track.score, track.pos, track.count_termination = scores[i], boxes[i], 0
                    track.hs_embed.append(hs_embeds[i])
                else:
                    track.count_termination += 1
                    if track.count_termination >= self.steps_termination:
                        to_inactive.append(track)
            reid_keep = (scores[:num_tracks] > self.reid_score_thresh) & (labels[:num_tracks] == 0)
            from_inactive = []
            for i, track in enumerate(self.inactive_tracks, start=len(self.tracks)):
                if reid_keep[i]:
                    track.score, track.pos = scores[i], boxes[i]
                    track.hs_embed.append(hs_embeds[i])
                    from_inactive.append(track)
            self.num_reids += len(from_inactive)
            for track in from_inactive:
                self.inactive_tracks.remove(track)
                self.tracks.append(track)
            self._to_inactive(to_inactive)
            if self.track_nms_thresh and self.tracks:
                keep_ids = set(nms(torch.stack([t.pos for t in self.tracks]),
                                   torch.stack([t.score for t in self.tracks]), self.track_nms_thresh).tolist())
                self.tracks = [t for i, t in enumerate(self.tracks) if i in keep_ids]

        # new detections from the object queries
        det_scores, det_boxes = scores[num_tracks:], boxes[num_tracks:]
        det_embeds = hs_embeds[num_tracks:]
        keep = (det_scores > self.detection_obj_score_thresh) & (labels[num_tracks:] == 0)
        det_index = keep.nonzero()[:, 0]
        det_scores, det_boxes, det_embeds = det_scores[keep], det_boxes[keep], det_embeds[keep]
        if self.public_detections:
            covered = self._public_detections_mask(det_boxes, public_dets)
            det_scores, det_boxes, det_embeds, det_index = (x[covered] for x in (det_scores, det_boxes, det_embeds,
                                                                                 det_index))
        fresh = self._reid(det_boxes, det_scores, det_embeds)
        det_scores, det_boxes, det_embeds, det_index = (x[fresh] for x in (det_scores, det_boxes, det_embeds,
                                                                           det_index))
        new_ids = []
        for i in range(len(det_boxes)):
            self.tracks.append(Track(det_boxes[i], det_scores[i], self.track_num + i, det_embeds[i], det_index[i]))
            new_ids.append(self.track_num + i)
        self.track_num += len(new_ids)
        if self.detection_nms_thresh and self.tracks:
            # existing tracks get score +inf, so NMS only ever removes new tracks
            track_scores = torch.stack([t.score if t.id in new_ids else torch.tensor(float("inf")).to(t.score)
                                        for t in self.tracks])
            keep_ids = set(nms(torch.stack([t.pos for t in self.tracks]), track_scores,
                               self.detection_nms_thresh).tolist())
            self.tracks = [t for i, t in enumerate(self.tracks) if i in keep_ids]

        for track in self.tracks:
            self.results.setdefault(track.id, {})[self.frame_index] = {
                "bbox": track.pos.float().cpu().numpy(), "score": float(track.score), "obj_ind": int(track.obj_ind)}
        for track in self.inactive_tracks:
            track.count_inactive += 1
        self.frame_index += 1
        self.prev_features = features

    def _public_detections_mask(self, det_boxes, public_dets):
        """min_iou_0_5: a new detection is kept when it is the best match (IoU >= 0.5) of a public detection."""
        mask = torch.zeros(len(det_boxes), dtype=torch.bool, device=det_boxes.device)
        if public_dets is None or not len(public_dets) or not len(det_boxes):
            return mask
        iou = box_iou(det_boxes, public_dets.to(det_boxes))
        for j in range(iou.shape[1]):
            i = iou[:, j].argmax()
            if iou[i, j] >= 0.5:
                iou[i, :] = 0
                mask[i] = True
        return mask

    def _reid(self, det_boxes, det_scores, det_embeds):
        """Re-identify inactive tracks with new detections: Hungarian on the L2 distance between embeddings,
        accepted when <= reid_sim_threshold. Returns the mask of detections that were not used."""
        self._prune_inactive()
        fresh = torch.ones(len(det_boxes), dtype=torch.bool, device=det_boxes.device)
        if not self.inactive_tracks or not len(det_boxes):
            return fresh
        # F.pairwise_distance adds eps 1e-6 to the difference, as the official code: with the default threshold 0.0
        # no pair is ever accepted, i.e. re-identification runs through the inactive tracks' own queries only
        dist = torch.stack([F.pairwise_distance(t.hs_embed[-1][None].float(), det_embeds.float())
                            for t in self.inactive_tracks]).cpu().numpy()
        used = []
        for row, col in zip(*linear_sum_assignment(dist)):
            if dist[row, col] <= self.reid_sim_threshold:
                track = self.inactive_tracks[row]
                track.count_inactive = 0
                track.pos, track.score = det_boxes[col], det_scores[col]
                track.hs_embed.append(det_embeds[col])
                track.last_pos = [track.pos.clone()]
                used.append(track)
                fresh[col] = False
                self.tracks.append(track)
                self.num_reids += 1
        self.inactive_tracks = [t for t in self.inactive_tracks if t not in used]
        return fresh


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: CLEAR-MOT (Bernardin & Stiefelhagen 2008) and IDF1 (Ristani et al. 2016), motmetrics' definitions
# ----------------------------------------------------------------------------------------------------------------


def _iou_xywh(a, b):
    """Pairwise IoU of [N, 4] and [M, 4] (left, top, width, height) boxes -> [N, M] numpy."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ax1, ay1, bx1, by1 = a[:, None, 0], a[:, None, 1], b[None, :, 0], b[None, :, 1]
    ax2, ay2 = ax1 + a[:, None, 2], ay1 + a[:, None, 3]
    bx2, by2 = bx1 + b[None, :, 2], by1 + b[None, :, 3]
    inter = np.clip(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0, None) * \
        np.clip(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0, None)
    union = a[:, None, 2] * a[:, None, 3] + b[None, :, 2] * b[None, :, 3] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def mot_counts(gt, hyp, iou_threshold=0.5):
    """Per-sequence event counts as motmetrics' MOTAccumulator with `iou_matrix(max_iou=0.5)`.

    gt, hyp: {frame: {id: (left, top, width, height)}}. Distance = 1 - IoU, pairs with IoU < 0.5 cannot match.
    Per frame: (1) an object keeps the hypothesis it was last matched to if that pair is still valid; (2) the rest
    are matched by Hungarian (maximum number of valid pairs, then minimum distance); a match to another
    hypothesis than the object's last one is an identity switch; (3) unmatched objects are misses (FN),
    unmatched hypotheses false positives. IDF1 counts come from one global assignment of object ids to
    hypothesis ids maximising the number of frames where the pair is valid.
    """
    counts = dict(num_objects=0, num_predictions=0, FN=0, FP=0, IDSW=0, matches=0)
    last_match, tracked, present = {}, {}, {}
    pair_frames = {}  # (object id, hypothesis id) -> frames where the pair is valid (IoU >= threshold)
    for frame in sorted(set(gt) | set(hyp)):
        oids, hids = list(gt.get(frame, {})), list(hyp.get(frame, {}))
        counts["num_objects"] += len(oids)
        counts["num_predictions"] += len(hids)
        valid = np.zeros((len(oids), len(hids)), dtype=bool)
        dist = np.full((len(oids), len(hids)), np.nan)
        if oids and hids:
            iou = _iou_xywh([gt[frame][o] for o in oids], [hyp[frame][h] for h in hids])
            valid = iou >= iou_threshold
            dist = np.where(valid, 1 - iou, np.nan)
        for i, j in zip(*np.nonzero(valid)):
            pair_frames[oids[i], hids[j]] = pair_frames.get((oids[i], hids[j]), 0) + 1
        o_free, h_free = np.ones(len(oids), bool), np.ones(len(hids), bool)
        for i, o in enumerate(oids):  # (1) continue previous correspondences
            present[o] = present.get(o, 0) + 1
            if o in last_match and last_match[o] in hids:
                j = hids.index(last_match[o])
                if h_free[j] and valid[i, j]:
                    o_free[i], h_free[j] = False, False
                    counts["matches"] += 1
                    tracked[o] = tracked.get(o, 0) + 1
        oi, hj = np.nonzero(o_free)[0], np.nonzero(h_free)[0]
        if len(oi) and len(hj):  # (2) Hungarian on the rest; invalid pairs cost more than any set of valid ones
            sub = dist[np.ix_(oi, hj)]
            rows, cols = linear_sum_assignment(np.where(np.isnan(sub), 1e6, sub))
            for r, c in zip(rows, cols):
                if np.isnan(sub[r, c]):
                    continue
                o, h = oids[oi[r]], hids[hj[c]]
                if o in last_match and last_match[o] != h:
                    counts["IDSW"] += 1
                last_match[o] = h
                o_free[oi[r]], h_free[hj[c]] = False, False
                counts["matches"] += 1
                tracked[o] = tracked.get(o, 0) + 1
        counts["FN"] += int(o_free.sum())  # (3)
        counts["FP"] += int(h_free.sum())
    ratios = [tracked.get(o, 0) / n for o, n in present.items()]
    counts["MT"] = sum(r >= 0.8 for r in ratios)
    counts["ML"] = sum(r < 0.2 for r in ratios)
    counts["num_unique_objects"] = len(present)
    # IDF1: global one-to-one assignment of object ids to hypothesis ids maximising IDTP
    oid_list = sorted({o for frame in gt.values() for o in frame})
    hid_list = sorted({h for frame in hyp.values() for h in frame})
    idtp = 0
    if oid_list and hid_list:
        overlap = np.zeros((len(oid_list), len(hid_list)))
        o_index, h_index = {o: i for i, o in enumerate(oid_list)}, {h: j for j, h in enumerate(hid_list)}
        for (o, h), n in pair_frames.items():
            overlap[o_index[o], h_index[h]] = n
        rows, cols = linear_sum_assignment(-overlap)
        idtp = int(overlap[rows, cols].sum())
    counts.update(IDTP=idtp, IDFN=counts["num_objects"] - idtp, IDFP=counts["num_predictions"] - idtp)
    return counts


def mot_summary(count_list):
    """Sum per-sequence counts (motmetrics' OVERALL row) -> MOTA / IDF1 / MOTP-free summary, MOTA and IDF1 in %."""
    total = {k: sum(c[k] for c in count_list) for k in count_list[0]}
    mota = 1 - (total["FN"] + total["FP"] + total["IDSW"]) / max(total["num_objects"], 1)
    idf1 = 2 * total["IDTP"] / max(2 * total["IDTP"] + total["IDFP"] + total["IDFN"], 1)
    return {"MOTA": 100 * mota, "IDF1": 100 * idf1, "MT": total["MT"], "ML": total["ML"], "FP": total["FP"],
            "FN": total["FN"], "IDSW": total["IDSW"], "num_objects": total["num_objects"],
            "num_unique_objects": total["num_unique_objects"]}


# ----------------------------------------------------------------------------------------------------------------
# Data: MOT17 in the MOTChallenge layout, frame pairs for training, COCO-person pairs (Sec. 4 "Datasets")
# ----------------------------------------------------------------------------------------------------------------

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def find_sequences(root, names=()):
    """Sequence folders under ROOT/train (or ROOT/MOT17/train, ROOT/mot17/train): every sub-folder is one."""
    root = Path(root)
    for base in (root / "train", root / "MOT17" / "train", root / "mot17" / "train"):
        if base.is_dir():
            seqs = sorted(p for p in base.iterdir() if p.is_dir() and (not names or p.name in names))
            if not seqs:
                raise SystemExit(f"{base}: no sequence folders{' named ' + ', '.join(names) if names else ''}")
            return [MOTSequence(p) for p in seqs]
    raise SystemExit(f"{root}: expected MOT17 in the MOTChallenge layout, i.e. {root}/train/MOT17-XX-FRCNN/"
                     "{seqinfo.ini,img1/,gt/gt.txt} (or the same under MOT17/)")


def _read_rows(path, min_columns):
    rows = np.loadtxt(path, delimiter=",", ndmin=2) if path.stat().st_size else np.zeros((0, min_columns))
    if rows.shape[1] < min_columns:
        raise SystemExit(f"{path}: expected at least {min_columns} comma-separated columns, got {rows.shape[1]}")
    return rows


class MOTSequence:
    """One MOTChallenge sequence: seqinfo.ini, img1/000001.jpg..., gt/gt.txt, det/det.txt.

    gt.txt rows: frame, id, left, top, width, height, conf, class, visibility (1-based pixels). Rows past
    seqLength and boxes of zero size are dropped with one printed line; a missing seqinfo.ini or frame image is an
    error naming the file. Boxes are kept here as 0-based (x0, y0, x1, y1) = (left - 1, top - 1, x0 + w, y0 + h).
    """

    def __init__(self, path):
        self.path = Path(path)
        ini = self.path / "seqinfo.ini"
        if not ini.is_file():
            raise SystemExit(f"{self.path}: missing seqinfo.ini (MOTChallenge sequences need [Sequence] name, imDir, "
                             "seqLength, imWidth, imHeight, imExt)")
        config = configparser.ConfigParser()
        config.read(ini)
        info = config["Sequence"]
        self.name = info.get("name", self.path.name)
        self.length = int(info["seqLength"])
        self.width, self.height = int(info["imWidth"]), int(info["imHeight"])
        self.image_dir, self.image_ext = self.path / info.get("imDir", "img1"), info.get("imExt", ".jpg")
        self.gt = self._read_gt(self.path / "gt" / "gt.txt")
        det_file = self.path / "det" / "det.txt"
        self.dets = {}
        if det_file.is_file():
            for row in _read_rows(det_file, 7):
                x0, y0 = row[2] - 1, row[3] - 1
                self.dets.setdefault(int(row[0]), []).append([x0, y0, x0 + row[4], y0 + row[5], row[6]])

    def _read_gt(self, path):
        """{frame: rows [N, 9]} with columns frame, id, x0, y0, x1, y1, conf, class, visibility."""
        if not path.is_file():
            return {}
        rows = _read_rows(path, 9)[:, :9]
        past = (rows[:, 0] < 1) | (rows[:, 0] > self.length)
        empty = (rows[:, 4] <= 0) | (rows[:, 5] <= 0)
        if past.any() or empty.any():
            print(f"{path}: dropped {int(past.sum())} rows outside frames 1..{self.length} and "
                  f"{int((empty & ~past).sum())} boxes of zero size")
        rows = rows[~past & ~empty].copy()
        rows[:, 2:4] -= 1
        rows[:, 4:6] += rows[:, 2:4]
        return {int(f): rows[rows[:, 0] == f] for f in np.unique(rows[:, 0])}

    def frames(self, frame_range):
        """1-based frame numbers in [int(start * L), int(end * L)) (the official cross-validation split)."""
        start, end = int(frame_range[0] * self.length), int(frame_range[1] * self.length)
        return list(range(start + 1, end + 1))

    def image(self, frame):
        path = self.image_dir / f"{frame:06d}{self.image_ext}"
        if not path.is_file():
            raise SystemExit(f"{path}: frame {frame} of sequence {self.name} is missing")
        return Image.open(path).convert("RGB")

    def train_target(self, frame):
        """Pedestrians (conf 1, class 1) with visibility > 0, as generate_coco_from_mot: conf-0 rows, distractor
        classes (2 person on vehicle, 7 static person, 8 distractor, 12 reflection, ...) and invisible boxes are
        not targets."""
        rows = self.gt.get(frame, np.zeros((0, 9)))
        keep = (rows[:, 6] == 1) & (rows[:, 7] == 1) & (rows[:, 8] > 0)
        return torch.as_tensor(rows[keep, 2:6], dtype=torch.float32), torch.as_tensor(rows[keep, 1], dtype=torch.int64)

    def eval_boxes(self, frame):
        """{id: (left, top, width, height)} of pedestrians (conf 1, class 1; any visibility), as the official eval."""
        rows = self.gt.get(frame, np.zeros((0, 9)))
        rows = rows[(rows[:, 6] == 1) & (rows[:, 7] == 1)]
        return {int(r[1]): (r[2], r[3], r[4] - r[2], r[5] - r[3]) for r in rows}


def resized_size(w, h, size, max_size=None):
    """DETR's resize rule: short side -> size, unless the long side would exceed max_size. Returns (w, h)."""
    if max_size is not None:
        lo, hi = float(min(w, h)), float(max(w, h))
        if hi / lo * size > max_size:
            size = int(round(max_size * lo / hi))
    if w < h:
        return size, int(size * h / w)
    return int(size * w / h), size


def transform_params(w, h, max_size, rng):
    """One draw of the official train transform (flip; resize, or resize-crop-resize), shared by a frame pair."""
    scale = max_size / 1333
    scales = [int(scale * s) for s in range(480, 801, 32)]
    steps = [("flip", rng.random() < 0.5)]
    if rng.random() < 0.5:
        steps.append(("resize", resized_size(w, h, rng.choice(scales), max_size)))
    else:
        w1, h1 = resized_size(w, h, rng.choice([int(scale * s) for s in (400, 500, 600)]))
        lo, hi = int(scale * 384), int(scale * 600)
        cw, ch = rng.randint(min(lo, w1), min(w1, hi)), rng.randint(min(lo, h1), min(h1, hi))
        x0, y0 = rng.randint(0, w1 - cw), rng.randint(0, h1 - ch)
        steps += [("resize", (w1, h1)), ("crop", (x0, y0, cw, ch)),
                  ("resize", resized_size(cw, ch, rng.choice(scales), max_size))]
    return steps


def apply_transform(img, boxes, ids, steps):
    """Apply transform_params to a PIL image and its xyxy pixel boxes; boxes cropped to nothing are removed."""
    for name, value in steps:
        w, h = img.size
        if name == "flip" and value:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        elif name == "resize":
            img = img.resize(value, Image.BILINEAR)
            boxes = boxes * torch.tensor([value[0] / w, value[1] / h] * 2)
        elif name == "crop":
            x0, y0, cw, ch = value
            img = img.crop((x0, y0, x0 + cw, y0 + ch))
            boxes = boxes - torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
            boxes = torch.min(boxes.reshape(-1, 2, 2), torch.tensor([cw, ch], dtype=torch.float32)).clamp(min=0)
            boxes = boxes.reshape(-1, 4)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, ids = boxes[keep], ids[keep]
    return img, boxes, ids


def to_input(img, boxes=None, ids=None):
    """PIL -> normalised [3, H, W]; boxes -> the target dict (cxcywh normalised, labels 0 = person)."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    if boxes is None:
        return x
    w, h = img.size
    boxes = box_xyxy_to_cxcywh(boxes.reshape(-1, 4)) / torch.tensor([w, h, w, h], dtype=torch.float32)
    return x, {"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.int64), "track_ids": ids,
               "size": torch.tensor([h, w])}


class FramePairs(torch.utils.data.Dataset):
    """(frame t, frame t' with |t - t'| <= track_prev_frame_range) pairs of the training frames of every sequence;
    both frames go through the same random transform (datasets/mot.py)."""

    def __init__(self, sequences, frame_range, prev_frame_range, max_size):
        self.sequences, self.prev_frame_range, self.max_size = sequences, prev_frame_range, max_size
        self.items = [(s, f, seq.frames(frame_range)) for s, seq in enumerate(sequences)
                      for f in range(len(seq.frames(frame_range)))]
        if not self.items:
            raise SystemExit(f"no training frames in range {frame_range} of {[s.name for s in sequences]}")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        s, i, frames = self.items[idx]
        seq = self.sequences[s]
        j = random.randint(max(0, i - self.prev_frame_range), min(i + self.prev_frame_range, len(frames) - 1))
        steps = transform_params(seq.width, seq.height, self.max_size, random)
        out = []
        for frame in (frames[i], frames[j]):
            boxes, ids = seq.train_target(frame)
            out.append(to_input(*apply_transform(seq.image(frame), boxes, ids, steps)))
        (img, target), (prev_img, prev_target) = out
        target["prev_image"], target["prev_target"] = prev_img, prev_target
        return img, target


class CocoPersonPairs(torch.utils.data.Dataset):
    """CrowdHuman / COCO person images as simulated frame pairs: the previous frame is the same image rescaled by
    up to +-`rnd_augs` and shifted (crop or pad back to the original size), as the official CocoDetection."""

    def __init__(self, ann_file, image_dir, rnd_augs, max_size):
        from pycocotools.coco import COCO
        self.coco, self.image_dir = COCO(str(ann_file)), Path(image_dir)
        self.ids, self.rnd_augs, self.max_size = sorted(self.coco.imgs), rnd_augs, max_size
        self.person = set(self.coco.getCatIds(catNms=["person"]))
        if not self.person:  # CrowdHuman conversions name it differently: then every category counts as a person
            self.person = set(self.coco.getCatIds())
            print(f"{ann_file}: no category named 'person'; all {len(self.person)} categories are used as persons")

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, idx):
        info = self.coco.imgs[self.ids[idx]]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise SystemExit(f"{path}: image of annotation id {info['id']} is missing")
        img = Image.open(path).convert("RGB")
        anns = [a for a in self.coco.imgToAnns[info["id"]] if a["category_id"] in self.person and not a.get("iscrowd")]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes = boxes[keep]
        ids = torch.arange(len(boxes))
        w, h = img.size
        s = random.uniform(1 - self.rnd_augs, 1 + self.rnd_augs)
        sw, sh = max(1, int(w * s)), max(1, int(h * s))
        x0, y0 = random.randint(min(0, sw - w), max(0, sw - w)), random.randint(min(0, sh - h), max(0, sh - h))
        prev = apply_transform(img, boxes, ids, [("resize", (sw, sh)), ("crop", (x0, y0, w, h))])
        steps = transform_params(w, h, self.max_size, random)
        img, target = to_input(*apply_transform(img, boxes, ids, steps))
        target["prev_image"], target["prev_target"] = to_input(*apply_transform(*prev, steps))
        return img, target


def collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


# ----------------------------------------------------------------------------------------------------------------
# Train: two-frame forward (DETRTrackingBase.forward in training mode)
# ----------------------------------------------------------------------------------------------------------------


def two_frame_forward(model, matcher, images, targets, args):
    """Previous frame without gradient -> match -> track queries (with FN/FP augmentation) -> current frame."""
    with torch.no_grad():
        prev_out, prev_features = model([t["prev_image"] for t in targets])
        prev_out = {k: v for k, v in prev_out.items() if k != "aux_outputs"}
        prev_indices = matcher(prev_out, [t["prev_target"] for t in targets])
        add_track_queries(targets, prev_indices, prev_out, args.num_queries, args.track_query_false_negative_prob,
                          args.track_query_false_positive_prob)
    out, _ = model(images, prev_features, stack_track_queries(targets))
    return out


def to_device(images, targets, device):
    def move(t):
        return {k: (v.to(device) if torch.is_tensor(v) else move(v) if isinstance(v, dict) else v)
                for k, v in t.items()}
    return [img.to(device) for img in images], [move(t) for t in targets]


def train_one_epoch(model, criterion, matcher, loader, optimizer, scaler, device, epoch, args):
    model.train()
    logger = tu.MetricLogger(delimiter="  ")
    logger.add_meter("lr", tu.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    for step, (images, targets) in enumerate(logger.log_every(loader, args.print_freq, f"Epoch: [{epoch}]")):
        if args.max_iters and step >= args.max_iters:
            break
        images, targets = to_device(images, targets, device)  # prev_image and prev_target included
        with tu.amp_autocast(device, args.amp):
            out = two_frame_forward(model, matcher, images, targets, args)
        out = _float(out)
        loss_dict = criterion(out, targets)
        loss = sum(loss_dict[k] * w for k, w in criterion.weight_dict.items() if k in loss_dict)
        if not math.isfinite(loss.item()):
            raise SystemExit(f"loss is {loss.item()} at epoch {epoch} step {step}: {tu.reduce_dict(loss_dict)}")
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        if args.clip_max_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
        scaler.step(optimizer)
        scaler.update()
        reduced = tu.reduce_dict({k: v.detach() for k, v in loss_dict.items()})
        logger.update(loss=sum(reduced[k] * w for k, w in criterion.weight_dict.items() if k in reduced),
                      **{k: v for k, v in reduced.items() if k in ("loss_ce", "loss_bbox", "loss_giou", "class_error")})
        logger.update(lr=optimizer.param_groups[0]["lr"])
    logger.synchronize_between_processes()
    return {k: m.global_avg for k, m in logger.meters.items()}


def _float(out):
    """Losses in float32 under --amp (the matcher and GIoU need it)."""
    cast = {k: v.float() for k, v in out.items() if torch.is_tensor(v)}
    if "aux_outputs" in out:
        cast["aux_outputs"] = [{k: v.float() for k, v in a.items()} for a in out["aux_outputs"]]
    return cast


# ----------------------------------------------------------------------------------------------------------------
# Evaluate: track the held-out frames of every sequence, write MOTChallenge files, score them
# ----------------------------------------------------------------------------------------------------------------


def write_results(results, path):
    """MOTChallenge result file: frame, id, left, top, width, height, score, -1, -1, -1 (1-based)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for track_id, frames in sorted(results.items()):
            for frame, r in sorted(frames.items()):
                x0, y0, x1, y1 = (float(v) for v in r["bbox"])
                f.write(f"{frame},{track_id + 1},{x0 + 1:.2f},{y0 + 1:.2f},{x1 - x0:.2f},{y1 - y0:.2f},"
                        f"{r['score']:.4f},-1,-1,-1\n")


@torch.no_grad()
def track_and_evaluate(model, sequences, device, args, output_dir=None):
    """Online tracking of the `--val_frame_range` frames of each sequence; returns eval.json's dict."""
    model.eval()
    unwrapped = tu.unwrap(model)

    def detector(image, prev_features, track_queries):
        with tu.amp_autocast(device, args.amp):
            out, features = unwrapped(image, prev_features, track_queries)
        return _float(out), features

    tracker = Tracker(detector, unwrapped.num_queries, args.detection_obj_score_thresh, args.track_obj_score_thresh,
                      args.detection_nms_thresh, args.track_nms_thresh, args.inactive_patience,
                      args.reid_sim_threshold, args.reid_score_thresh, args.public_detections)
    counts, per_sequence, start = [], {}, time.time()
    for seq in sequences:
        frames = seq.frames(args.val_frame_range)
        tracker.reset()
        for frame in frames:
            img = seq.image(frame)
            size = resized_size(img.width, img.height, args.val_width, args.img_max_size)
            x = to_input(img.resize(size, Image.BILINEAR))[None].to(device)
            dets = torch.tensor([d[:4] for d in seq.dets.get(frame, [])], dtype=torch.float32).reshape(-1, 4)
            tracker.step(x, torch.tensor([[img.height, img.width]], device=device), dets)
        # tracker frame index i -> sequence frame frames[i]
        results = {tid: {frames[i]: r for i, r in f.items()} for tid, f in tracker.results.items()}
        hyp = {}
        for tid, f in results.items():
            for frame, r in f.items():
                x0, y0, x1, y1 = (float(v) for v in r["bbox"])
                hyp.setdefault(frame, {})[tid] = (x0 + 1, y0 + 1, x1 - x0, y1 - y0)
        gt = {}
        for frame in frames:  # eval boxes are 0-based x0 = left - 1: back to MOTChallenge's left
            gt[frame] = {i: (b[0] + 1, b[1] + 1, b[2], b[3]) for i, b in seq.eval_boxes(frame).items()}
        seq_counts = mot_counts(gt, hyp)
        counts.append(seq_counts)
        per_sequence[seq.name] = mot_summary([seq_counts])
        if output_dir:
            write_results(results, Path(output_dir) / "tracks" / f"{seq.name}.txt")
            if args.viz:
                draw_tracks(seq, frames, results, Path(output_dir) / "viz" / seq.name)
        print(f"{seq.name}: {len(frames)} frames, {len(results)} tracks, MOTA {per_sequence[seq.name]['MOTA']:.1f} "
              f"IDF1 {per_sequence[seq.name]['IDF1']:.1f}")
    summary = mot_summary(counts)
    summary["per_sequence"] = per_sequence
    summary["seconds"] = time.time() - start
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Visualise: tracks with ids on the frames
# ----------------------------------------------------------------------------------------------------------------


def draw_tracks(seq, frames, results, out_dir):
    """One PNG per frame with every track's box and id, coloured by id."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for frame in frames:
        img = seq.image(frame)
        draw = ImageDraw.Draw(img)
        for tid, track in results.items():
            if frame in track:
                colour = tuple(int(c) for c in np.random.default_rng(tid).integers(64, 256, 3))
                box = [float(v) for v in track[frame]["bbox"]]
                draw.rectangle(box, outline=colour, width=2)
                draw.text((box[0] + 2, box[1] + 1), str(tid + 1), fill=colour)
        img.save(out_dir / f"{frame:06d}.png")


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def param_groups(model, args):
    """Backbone at lr_backbone, reference_points / sampling_offsets at lr * lr_linear_proj_mult, the rest at lr."""
    def matches(name, keys):
        return any(k in name for k in keys)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if not matches(n, args.lr_backbone_names)
                    and not matches(n, args.lr_linear_proj_names)], "lr": args.lr},
        {"params": [p for n, p in named if matches(n, args.lr_backbone_names)], "lr": args.lr_backbone},
        {"params": [p for n, p in named if matches(n, args.lr_linear_proj_names)],
         "lr": args.lr * args.lr_linear_proj_mult},
    ]


def main(args):
    tu.init_distributed(args)
    device = tu.resolve_device(args.device)
    tu.seed_everything(args.seed)
    model, criterion, matcher = build_model(args)
    model.to(device)
    print(f"TrackFormer: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters")
    sequences = find_sequences(args.data_root, args.sequences)
    optimizer = torch.optim.AdamW(param_groups(model, args), lr=args.lr, weight_decay=args.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    scaler = tu.grad_scaler(device, args.amp)
    if args.resume:
        checkpoint = tu.load_checkpoint(args.resume)
        tu.load_model_state(model, checkpoint["model"] if "model" in checkpoint else checkpoint, args.resume)
        # a run of this script (its checkpoints carry the RNG state) continues; a released model only loads
        if not args.eval and "rng" in checkpoint and "optimizer" in checkpoint:
            optimizer.load_state_dict(checkpoint["optimizer"])
            lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
            args.start_epoch = checkpoint["epoch"] + 1
            tu.restore_rng(checkpoint.get("rng"))
        print(f"loaded {args.resume}" + (f", resuming at epoch {args.start_epoch}" if args.start_epoch else ""))
    else:
        print("no --resume: the model starts from random weights (the paper starts from a CrowdHuman-trained model)")

    if not args.eval:
        if args.coco_person_json:
            dataset = CocoPersonPairs(args.coco_person_json, args.coco_person_images,
                                      args.coco_and_crowdhuman_prev_frame_rnd_augs, args.img_max_size)
        else:
            dataset = FramePairs(sequences, args.train_frame_range, args.track_prev_frame_range, args.img_max_size)
        sampler = (torch.utils.data.DistributedSampler(dataset) if args.distributed
                   else torch.utils.data.RandomSampler(dataset))
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                             collate_fn=collate, num_workers=args.num_workers)
        train_model = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if args.gpu is not None
                                                                 else None) if args.distributed else model)
        start = time.time()
        for epoch in range(args.start_epoch, args.epochs):
            if args.distributed:
                sampler.set_epoch(epoch)
            stats = train_one_epoch(train_model, criterion, matcher, loader, optimizer, scaler, device, epoch, args)
            lr_scheduler.step()
            if args.output_dir:
                tu.save_checkpoint(Path(args.output_dir) / "checkpoint.pth", model=model.state_dict(),
                                   optimizer=optimizer.state_dict(), lr_scheduler=lr_scheduler.state_dict(),
                                   epoch=epoch, args=args)
            tu.append_log(args.output_dir, {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()},
                                            "seconds": time.time() - start})
    if tu.is_main_process():
        summary = track_and_evaluate(model, sequences, device, args, args.output_dir)
        print(json.dumps({k: v for k, v in summary.items() if k != "per_sequence"}, indent=1))
        if args.output_dir:
            tu.write_json(Path(args.output_dir) / "eval.json", summary)
            tu.append_log(args.output_dir, {"eval": {k: v for k, v in summary.items() if k != "per_sequence"}})
    return model


if __name__ == "__main__":
    main(get_args_parser().parse_args())
