"""TrackFormer: Multi-Object Tracking with Transformers.

Tim Meinhardt, Alexander Kirillov, Laura Leal-Taixe, Christoph Feichtenhofer. CVPR 2022. arXiv:2101.02702.
Official code: https://github.com/timmeinhardt/trackformer (described at e468bf1).

What this file reproduces: the paper's main MOT17 model (Deformable DETR with multi-frame attention, hidden 288,
500 object queries, 4 feature levels per frame, iterative box refinement, focal loss), its track queries, two-frame
training with the official data pipeline (CrowdHuman + MOT17 jointly, visibility <= 0.25 ignored, crops that keep
boxes whole, the previous-frame jitter) and track-query augmentation, the online `Tracker` (cfgs/track.yaml and
track_reid.yaml: thresholds 0.4, NMS 0.9, inactive patience 5, public-detection filters, interpolation), MOT17 /
MOT20 train and test splits with the three detector copies, MOTChallenge result files, and the MOTChallenge
evaluation by TrackEval (MOTA, IDF1, HOTA, MOTP, ...); with --masks the official mask head on TrackFormer and
MOTS20 (sMOTSA), and with --no-deformable --masks the paper's MOTS20 model (the vanilla-DETR TrackFormer with DETR's
mask head, DETRSegmTracking). Status: the models, matcher and criteria reproduce the official code's numbers on the
parity fixtures (tests/test_trackformer.py, 1e-4) and have the official key tables, so the released checkpoints load
strictly (597 keys; the vanilla MOTS20 model 490); the evaluation equals TrackEval and py-motmetrics on the same
files. The paper's MOT17 numbers (74.1 MOTA test, 71.3 on the cross-validation split) are not reproduced here
(CrowdHuman pre-training and ~7 GPU-days); the synthetic demo's numbers are in docs/trackformer.md.

Multi-scale deformable attention runs in pure PyTorch (`grid_sample`), as the official reference path: no
compiled CUDA op (the most reported problem with the official code).

Commands (DATA/MOT17/{train,test}/MOT17-XX-{DPM,FRCNN,SDP}/..., CrowdHuman as released or converted to COCO)
    # train_crowdhuman, then train_mot17_crowdhuman on the first half of every sequence (cross-validation);
    # tracks and evaluates the second half (MOT20: --data_root DATA/MOT20 --epochs 50)
    python trackformer.py --dataset crowdhuman --crowdhuman_path DATA/CrowdHuman --epochs 80 --lr_drop 50 \\
        --no_tracking_eval --output_dir out/crowdhuman
    python trackformer.py --dataset mot_crowdhuman --crowdhuman_path DATA/CrowdHuman --data_root DATA \\
        --pretrained out/crowdhuman/checkpoint.pth --output_dir out/mot17
    torchrun --nproc_per_node 7 trackformer.py ...   # the paper: 7 GPUs x batch 2
    # private / public detections on the test split, every detector copy: OUT/tracks/MOT17-XX-YYY.txt to upload
    python trackformer.py --data_root DATA --eval --resume MODEL.pth --split test --dets ALL --output_dir out/test
    python trackformer.py ... --eval --split test --dets ALL --public_detections min_iou_0_5
    # MOTS20 (the paper's vanilla-DETR model): DETR's mask head on COCO persons with the tracking model frozen
    # (train_coco_person_masks), then everything on MOTS20 (DATA/MOTS20/train/MOTS20-XX/ with KITTI-MOTS gt.txt,
    # train_mots20): masks, sMOTSA; a released model: --eval --resume mots20_train_masks.pth
    python trackformer.py --no-deformable --masks --freeze_detr --dataset coco_person --coco_path DATA/COCO \
        --pretrained BOX_MODEL.pth --load_mask_head_from_model detr-r50-panoptic-00ce5173.pth --lr 1e-4 \
        --epochs 50 --lr_drop 50 --no_tracking_eval --output_dir out/coco_person_masks
    python trackformer.py --no-deformable --masks --data_root DATA/MOTS20 \
        --pretrained out/coco_person_masks/checkpoint.pth --lr 1e-5 --lr_backbone 1e-6 --epochs 40 --lr_drop 40 \
        --output_dir out/mots
    # the synthetic demo (small configuration by flags; measured numbers in docs/trackformer.md)
    make demo-trackformer

Differences from the official code (details and reasons in docs/trackformer.md)
- Deformable attention is the official pure-PyTorch path (`ms_deform_attn_core_pytorch`).
- MOTChallenge folders are read directly (gt/gt.txt, det/det.txt, KITTI-MOTS gt.txt) instead of converted COCO
  JSON files; the kept rows and `ignore` flags are those of generate_coco_from_mot.py. Pixel coordinates are 0-based
  with exclusive corners (x0 = left - 1, x1 = x0 + width) in training and results; the official code trains on
  (left, left + width) and writes results as (x0 + 1, x1 - x0 + 1), one pixel off both ways.
- Evaluation is TrackEval with the benchmark's preprocessing (distractor-matched hypotheses removed); the official
  training-time evaluation is py-motmetrics without it.
- `--no_track_query_false_negatives` replaces `track_query_false_negative_prob`, which the official code uses as an
  on/off switch (see `add_track_queries`); `--pretrained` is the official `resume` without `resume_optim`.
- `--interpolate` fills track gaps linearly; the official `interpolate_tracks` fails (undefined return value).
- `--masks` is the official deformable segmentation-tracking model (DeformableDETRSegmTracking); its mask head needs
  --hidden_dim 384 (GroupNorm(8) must divide hidden / 16), so the released 288-wide MOT17 model cannot take it. The
  paper's MOTS20 model is `--no-deformable --masks` (DETRSegmTracking, hidden 256), which the official code at the
  described commit cannot run (its DETR.forward does not take the previous frame's features it is given).
- Training samples follow DistributedSampler's order on one process too (`--max_iters`: the first steps of each
  epoch), each augmented under a seed fixed by (--seed, epoch, position), and checkpoints hold the step within the
  epoch and every process's generators, so `--resume` continues the same run (bit for bit with `--deterministic`;
  `--checkpoint_every N` saves within an epoch). SIGTERM / SIGINT save a checkpoint after the current step and stop;
  a non-finite loss names the step, every loss term and the last good checkpoint. eval.json holds no timing (the
  tracking time goes to log.txt), so the same seed gives the same file.
"""
import argparse
import configparser
import contextlib
import copy
import io
import json
import math
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import nms

import detr
from common import training as tu
from common.matching import HungarianMatcher, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh
from common.position_encoding import PositionEmbeddingSine, PositionEmbeddingSine3D

# ----------------------------------------------------------------------------------------------------------------
# Arguments (official names; defaults = cfgs/train.yaml + mot17_crowdhuman + deformable + multi_frame + tracking)
# ----------------------------------------------------------------------------------------------------------------


# The two official model paths (`deformable` in cfgs/train.yaml): a flag below that is not given takes the value of
# the chosen path (Deformable DETR: train_deformable.yaml + train_multi_frame.yaml; vanilla DETR: train.yaml)
PATH_DEFAULTS = {"hidden_dim": (288, 256), "num_queries": (500, 100), "dim_feedforward": (1024, 2048),
                 "set_cost_class": (2.0, 1.0), "cls_loss_coef": (2.0, 1.0), "overflow_boxes": (True, False)}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with the flags of PATH_DEFAULTS that are not given resolved after parsing by --deformable."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extra = super().parse_known_args(args, namespace)
        for name, (deformable, vanilla) in PATH_DEFAULTS.items():
            if getattr(namespace, name, 0) is None:
                setattr(namespace, name, deformable if namespace.deformable else vanilla)
        return namespace, extra


def get_args_parser():
    p = ArgumentParser("TrackFormer", add_help=True)
    model = p.add_argument_group("model", "defaults: the official cfgs/train.yaml with train_deformable.yaml and "
                                          "train_multi_frame.yaml (--no-deformable: train.yaml alone); paper Sec. "
                                          "3.1 and App. A")
    tracking = p.add_argument_group("track queries", "defaults: the official cfgs/train.yaml and train_tracking.yaml; "
                                                     "paper Sec. 3.2 and Sec. 4, track augmentations")
    loss = p.add_argument_group("loss", "defaults: the official cfgs/train.yaml with train_deformable.yaml (focal "
                                        "loss); paper Sec. 3.3")
    masks = p.add_argument_group("masks (MOTS20)", "defaults: the official cfgs/train.yaml and train_mots20.yaml; "
                                                   "paper Sec. 4.2")
    tracker = p.add_argument_group("tracker", "defaults: the official cfgs/track.yaml with track_reid.yaml (the "
                                              "paper's runs); paper Sec. 3.3")
    data = p.add_argument_group("data", "defaults: the official cfgs/train_mot17_crowdhuman.yaml (MOT20: "
                                        "train_mot20_crowdhuman.yaml); paper Sec. 4")
    optim = p.add_argument_group("optimisation", "defaults: the official cfgs/train.yaml and "
                                                 "train_mot17_crowdhuman.yaml; paper Sec. 4")
    run = p.add_argument_group("run", "defaults: the official cfgs/train.yaml where it has the flag")
    # optimisation (Sec. 4, train.yaml)
    optim.add_argument("--lr", default=2e-4, type=float)
    optim.add_argument("--lr_backbone", default=2e-5, type=float, help="0 freezes the backbone")
    optim.add_argument("--lr_backbone_names", default=["backbone.0"], nargs="+")
    optim.add_argument("--lr_linear_proj_names", default=["reference_points", "sampling_offsets"], nargs="+")
    optim.add_argument("--lr_linear_proj_mult", default=0.1, type=float)
    optim.add_argument("--batch_size", default=2, type=int, help="per process (7 GPUs x 2 in the paper)")
    optim.add_argument("--weight_decay", default=1e-4, type=float)
    optim.add_argument("--epochs", default=40, type=int, help="40 train_mot17_crowdhuman, 50 train_mot20_crowdhuman, "
                       "80 train_crowdhuman")
    optim.add_argument("--lr_drop", default=10, type=int, help="the epoch after which the lr drops tenfold, once (the "
                       "official MultiStepLR): 10 (MOT17/MOT20), 50 (train_crowdhuman)")
    optim.add_argument("--clip_max_norm", default=0.1, type=float)
    # model (Deformable DETR, multi-frame; Sec. 3 and 4)
    model.add_argument("--deformable", default=True, action=argparse.BooleanOptionalAction,
                       help="the paper's MOT17 model: Deformable DETR over both frames (multi-frame attention, "
                       "4 feature levels, box refinement, focal loss). --no-deformable builds the vanilla-DETR "
                       "TrackFormer of the paper's MOTS20 results (DETRTracking, with --masks DETRSegmTracking): one "
                       "frame, layer4 only, cross-entropy with --eos_coef; its unset defaults are train.yaml's "
                       "(hidden 256, 100 queries, feed-forward 2048, class cost and weight 1, boxes clipped)")
    model.add_argument("--backbone", default="resnet50", type=str,
                       help="torchvision ResNet name, or detr.py's light 'convstem' for CPU demos")
    model.add_argument("--num_feature_levels", default=4, type=int, help="per frame (not used by --no-deformable)")
    model.add_argument("--enc_layers", default=6, type=int)
    model.add_argument("--dec_layers", default=6, type=int)
    model.add_argument("--dim_feedforward", default=None, type=int, help="1024 (2048 with --no-deformable)")
    model.add_argument("--hidden_dim", default=None, type=int, help="288, divisible by 3 (3-D encoding) and 32 "
                       "(GroupNorm); 256 with --no-deformable")
    model.add_argument("--dropout", default=0.1, type=float)
    model.add_argument("--nheads", default=8, type=int)
    model.add_argument("--num_queries", default=None, type=int, help="500 (100 with --no-deformable)")
    model.add_argument("--dec_n_points", default=4, type=int)
    model.add_argument("--enc_n_points", default=4, type=int)
    model.add_argument("--num_classes", default=20, type=int, help="classes, person = 0: 20 as the released MOT "
                       "models (focal loss: 20 logits; --no-deformable: 20 + no-object)")
    # track queries and their augmentation (Sec. 3.2 / 4 "Track augmentations")
    tracking.add_argument("--track_prev_frame_range", default=5, type=int, help="previous frame drawn from t +- range")
    tracking.add_argument("--track_prev_frame_rnd_augs", default=0.01, type=float,
                          help="previous MOT frame: random crop of (1 - x .. 1) of the frame, resized back")
    tracking.add_argument("--track_query_false_positive_prob", default=0.1, type=float,
                          help="up to ceil(x * #kept track queries) extra false-positive track queries")
    tracking.add_argument("--no_track_query_false_negatives", dest="track_query_false_negatives", action="store_false",
                          help="keep every matched previous object as a track query. Stands for the official "
                          "track_query_false_negative_prob, which the official code uses only as an on/off switch: "
                          "with it (the default, value 0.4) a random number n ~ U{0..#matched} of the matched objects "
                          "is kept")
    # matcher and loss (focal loss, Deformable DETR)
    loss.add_argument("--no_aux_loss", dest="aux_loss", action="store_false")
    loss.add_argument("--set_cost_class", default=None, type=float, help="2 (1 with --no-deformable)")
    loss.add_argument("--set_cost_bbox", default=5.0, type=float)
    loss.add_argument("--set_cost_giou", default=2.0, type=float)
    loss.add_argument("--cls_loss_coef", default=None, type=float, help="2 (1 with --no-deformable)")
    loss.add_argument("--bbox_loss_coef", default=5.0, type=float)
    loss.add_argument("--giou_loss_coef", default=2.0, type=float)
    loss.add_argument("--focal_alpha", default=0.25, type=float)
    loss.add_argument("--focal_gamma", default=2.0, type=float)
    loss.add_argument("--eos_coef", default=0.1, type=float, help="--no-deformable (cross-entropy): no-object weight; "
                      "false-positive track queries learn no-object at full weight (train_tracking.yaml "
                      "track_query_false_positive_eos_weight)")
    # segmentation (MOTS20, Sec. 4.2: DETR's mask head on TrackFormer)
    masks.add_argument("--masks", action="store_true", help="train and track masks (MOTS20 data); the head's "
                       "GroupNorm(8) widths hidden / 2 ... / 16 need --hidden_dim a multiple of 128 (of 384 with the "
                       "3-D encoding of the deformable model; the paper's MOTS20 model is --no-deformable, hidden 256)")
    masks.add_argument("--freeze_detr", action="store_true",
                       help="with --masks: train only bbox_attention and the mask head on the frozen tracking model "
                       "(train_coco_person_masks, the first MOTS step)")
    masks.add_argument("--load_mask_head_from_model", default="", type=str,
                       help="with --masks: a DETR segmentation checkpoint (detr-r50-panoptic-00ce5173.pth, or a "
                       "detr.py --masks run); its bbox_attention.* and mask_head.* tensors whose shapes fit this model "
                       "start the head, the others keep their initialisation (train_coco_person_masks)")
    masks.add_argument("--mask_loss_coef", default=1.0, type=float)
    masks.add_argument("--dice_loss_coef", default=1.0, type=float)
    # tracker (cfgs/track.yaml; the paper's runs add track_reid.yaml: inactive_patience 5)
    tracker.add_argument("--detection_obj_score_thresh", default=0.4, type=float)
    tracker.add_argument("--track_obj_score_thresh", default=0.4, type=float)
    tracker.add_argument("--detection_nms_thresh", default=0.9, type=float)
    tracker.add_argument("--track_nms_thresh", default=0.9, type=float)
    tracker.add_argument("--steps_termination", default=1, type=int,
                         help="frames a track may score below track_obj_score_thresh before it goes inactive")
    tracker.add_argument("--inactive_patience", default=5, type=int,
                         help="frames an inactive track is kept for re-identification: 5 (track_reid.yaml, the paper's "
                         "runs); -1 = track.yaml without reid")
    tracker.add_argument("--reid_sim_threshold", default=0.0, type=float)
    tracker.add_argument("--reid_score_thresh", default=0.4, type=float)
    tracker.add_argument("--reid_greedy_matching", action="store_true",
                         help="re-identify by greedy centre distance (gated by box areas) instead of embedding "
                         "distance")
    tracker.add_argument("--reid_sim_only", action="store_true", help="every track goes inactive after each frame")
    tracker.add_argument("--public_detections", default="", choices=["", "center_distance", "min_iou_0_5"],
                         help="MOT17 public detections: start a track only from a detection near a det/det.txt box "
                         "(min_iou_0_5 in the paper's public results)")
    tracker.add_argument("--interpolate", action="store_true", help="fill each track's gaps by linear interpolation")
    run.add_argument("--no_tracking_eval", dest="tracking_eval", action="store_false",
                     help="train only: no tracking of the validation frames afterwards (train.yaml tracking_eval)")
    # data (cfgs/train_mot17_crowdhuman.yaml, train_mot20_crowdhuman.yaml, train_crowdhuman.yaml)
    data.add_argument("--dataset", default="mot", choices=["mot", "crowdhuman", "mot_crowdhuman", "coco_person"],
                      help="training frames: MOT sequences, CrowdHuman images as simulated pairs (pre-training), "
                      "both (the paper's main run), or COCO person images with their masks as simulated pairs "
                      "(--masks --freeze_detr: train_coco_person_masks)")
    data.add_argument("--data_root", "--mot_path", default="data/synthetic", type=str,
                      help="MOTChallenge root holding train/ and test/<seq>/{seqinfo.ini,img1,gt/gt.txt,det/det.txt} "
                      "(MOT17, MOT20 or MOTS20; also found under DATA_ROOT/MOT17/, /MOT20/, /MOTS20/ or /mot17/)")
    data.add_argument("--crowdhuman_path", default="", type=str,
                      help="CrowdHuman root: annotation_{train,val}.odgt + Images/ (as released), or "
                      "annotations/<split>.json + <split>/ (converted to COCO, also COCO persons)")
    data.add_argument("--crowdhuman_train_split", default="train_val", choices=["train", "val", "train_val"])
    data.add_argument("--coco_path", default="", type=str,
                      help="COCO root for --dataset coco_person: annotations/person_keypoints_train2017.json + "
                      "train2017/ (the official coco_person split)")
    data.add_argument("--coco_and_crowdhuman_prev_frame_rnd_augs", default=0.2, type=float)
    data.add_argument("--no_overflow_boxes", dest="overflow_boxes", default=None, action="store_false",
                      help="clip boxes to random crops and results to the image (the main config keeps them whole; "
                      "--no-deformable clips them, as train.yaml)")
    data.add_argument("--train_frame_range", default=[0.0, 0.5], type=float, nargs=2,
                      help="fraction of every train sequence used for training (0 0.5: cross-val; 0 1: all)")
    data.add_argument("--split", default="train", choices=["train", "test"], help="sequences to track and evaluate")
    data.add_argument("--dets", default="FRCNN", choices=["DPM", "FRCNN", "SDP", "ALL"],
                      help="MOT17 detector copies to track (a submission needs ALL; training uses FRCNN)")
    data.add_argument("--val_frame_range", default=None, type=float, nargs=2,
                      help="fraction of every sequence tracked (default 0.5 1 on train: cross-val; 0 1 on test)")
    data.add_argument("--sequences", default=[], nargs="*", help="sequence folder names (default: all)")
    data.add_argument("--img_max_size", default=1333, type=int, help="img_transform.max_size")
    data.add_argument("--val_width", default=800, type=int, help="img_transform.val_width (short side at eval)")
    # run
    run.add_argument("--output_dir", default="", type=str)
    run.add_argument("--device", default=tu.default_device(), type=str)
    run.add_argument("--seed", default=42, type=int)
    run.add_argument("--resume", default="", type=str, help="checkpoint to resume (or released model to load)")
    run.add_argument("--pretrained", default="", type=str,
                     help="model weights to start training from, optimizer and epoch fresh (the official `resume` of "
                     "train_mot17_crowdhuman: the CrowdHuman-trained checkpoint)")
    run.add_argument("--start_epoch", default=0, type=int)
    run.add_argument("--eval", action="store_true", help="only track (and evaluate where gt.txt exists)")
    run.add_argument("--num_workers", default=2, type=int)
    tu.add_run_args(run)
    run.add_argument("--viz", action="store_true", help="draw tracks with ids (PNG per frame) into OUTPUT_DIR/viz")
    run.add_argument("--max_iters", default=0, type=int, help="stop an epoch after this many steps (0: all)")
    run.add_argument("--print_freq", default=10, type=int)
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
    # grid_sample's [-1, 1] coordinates, one contiguous grid per level with the points before the queries (the
    # official [N * M, Lq, P, 2] views are strided, and its sum over the last dimension, P, does not vectorise;
    # this layout gives the same sums, bit for bit, and is faster on CPU: docs/performance.md)
    grids = (2 * sampling_locations - 1).permute(3, 0, 2, 4, 1, 5).reshape(num_levels, n * m, num_points, lq, 2)
    weights = attention_weights.permute(3, 0, 2, 4, 1).reshape(num_levels, n * m, 1, num_points, lq)
    out = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        value_l = value_list[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)  # [N * M, D, H, W]
        sampled = F.grid_sample(value_l, grids[lvl], mode="bilinear", padding_mode="zeros", align_corners=False)
        # accumulated level by level (the official code stacks all levels first: same sum, one large copy more)
        out = out + (sampled * weights[lvl]).sum(2)  # [N * M, D, P, Lq] -> [N * M, D, Lq]
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
        self.d_model, self.nhead, self.dropout = d_model, nhead, dropout
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
        if num_encoder_layers == 0:  # the level embeddings enter only the encoder's positions: unused without one,
            self.level_embed.requires_grad_(False)  # and DistributedDataParallel stops on a trainable unused tensor

    @staticmethod
    def valid_ratio(mask):
        """Fraction of the map that is not padding, (w, h): [N, 2]."""
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    def encode(self, srcs, masks, pos_embeds, first_level=0):
        """One frame's levels (srcs / pos_embeds [N, C, H_l, W_l], masks [N, H_l, W_l]) through the encoder, with
        the level embeddings first_level, first_level + 1, ...: memory [N, sum_l H_l W_l, C]. Multi-frame attention
        with a separate encoder: the same encoder on each frame's levels (previous frame: first_level 0)."""
        src_flat = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)  # [N, S, C]
        mask_flat = torch.cat([mask.flatten(1) for mask in masks], 1)
        pos_flat = torch.cat([pos.flatten(2).transpose(1, 2) + self.level_embed[first_level + lvl].view(1, 1, -1)
                              for lvl, pos in enumerate(pos_embeds)], 1)
        spatial_shapes = torch.as_tensor([src.shape[-2:] for src in srcs], dtype=torch.long, device=src_flat.device)
        valid_ratios = torch.stack([self.valid_ratio(m) for m in masks], 1)  # [N, L, 2]
        return self.encoder(src_flat, spatial_shapes, valid_ratios, pos_flat, mask_flat)

    def forward(self, prev, cur, query_embed, track_queries=None):
        """prev / cur: (masks, memory) of the previous and the current frame (`encode`'s memory and its levels'
        masks); the decoder reads both frames' levels, previous frame first. query_embed [Q, 2C] = (query_pos, tgt).
        track_queries: optional dict with hs_embeds [N, T, C] and boxes [N, T, 4] (cxcywh), placed before the
        object queries. Returns hs [layers, N, T + Q, C], boxes [layers, N, T + Q, 4] and the memory [N, S, C]
        (current frame's tokens first)."""
        masks = prev[0] + cur[0]
        mask_flat = torch.cat([mask.flatten(1) for mask in masks], 1)
        spatial_shapes = torch.as_tensor([m.shape[-2:] for m in masks], dtype=torch.long, device=mask_flat.device)
        valid_ratios = torch.stack([self.valid_ratio(m) for m in masks], 1)  # [N, 8, 2]
        # the official code concatenates [current, previous] although the level list is [previous, current]:
        # the decoder reads level l < 4 from the current frame's memory (same shapes, so no effect on validity)
        memory = torch.cat([cur[1], prev[1]], 1)

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
        hs, boxes = self.decoder(tgt, reference_points, memory, spatial_shapes, valid_ratios, query_pos, mask_flat)
        return hs, boxes, memory


# ----------------------------------------------------------------------------------------------------------------
# Model: TrackFormer = Deformable DETR over two frames + track queries (Sec. 3.1 - 3.2)
# ----------------------------------------------------------------------------------------------------------------


class EncodedFrame(list):
    """A frame's backbone features (the list `features`) with `encoded`, the (masks, memory) of the frame in the
    previous-frame slot, computed with gradient by the training's previous-frame pass for the current frame's."""

    def __init__(self, features, encoded):
        super().__init__(features)
        self.encoded = encoded


def resize_mask(mask, size):
    """Nearest-neighbour resize of a [B, H, W] bool mask, as the official backbone does."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


class TrackFormer(nn.Module):
    """DeformableDETRTracking with multi_frame_attention, multi_frame_encoding and a separate encoder per frame.

    forward(images, prev_features=None, track_queries=None, previous_pass=False) -> (out, features):
      images [B, 3, H, W] (or a list of [3, H_i, W_i], padded and masked); prev_features the `features` returned
      for the previous frame (None: the current frame stands in for it; previous_pass: see `forward`);
      track_queries {hs_embeds [B, T, C], boxes [B, T, 4] cxcywh}. out = {pred_logits [B, T + Q, num_classes],
      pred_boxes [B, T + Q, 4], hs_embed [B, T + Q, C], aux_outputs}, query order [track queries..., object
      queries]. With `masks` (the official DeformableDETRSegmTracking) also pred_masks [B, T + Q, H_1, W_1] at the
      first backbone map's size, from detr.py's segmentation head (`predict_masks`).
    """

    def __init__(self, backbone, transformer, num_classes=20, num_queries=500, num_feature_levels=4, aux_loss=True,
                 masks=False, freeze_detr=False):
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
        bbox_embed = detr.MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        num_pred = len(transformer.decoder.layers)
        self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
        self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
        nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        # box refinement: the decoder uses the same heads. Registered twice, as in the official code, so the
        # checkpoint holds both bbox_embed.* and transformer.decoder.bbox_embed.* (597 keys) and loads strictly.
        self.transformer.decoder.bbox_embed = self.bbox_embed
        self.masks, self.freeze_detr = masks, freeze_detr
        if freeze_detr:  # everything built so far; the mask head below trains (the official DETRSegmBase)
            self.requires_grad_(False)
        if masks:  # DETR's segmentation head (detr.DETRsegm's), on layer3's projection; FPN over layer3, 2, 1
            c = backbone[0].num_channels
            self.bbox_attention = detr.MHAttentionMap(hidden_dim, hidden_dim, transformer.nhead, dropout=0.0)
            self.mask_head = detr.MaskHeadSmallConv(hidden_dim + transformer.nhead, [c // 2, c // 4, c // 8],
                                                    hidden_dim)

    def train(self, mode=True):
        """As nn.Module.train, but with freeze_detr the conv stem's batch norm keeps its statistics (a ResNet's
        batch norm is frozen anyway), as detr.DETRsegm under --frozen_weights."""
        super().train(mode)
        if self.freeze_detr:
            detr.keep_batch_norm_statistics(self.backbone)
        return self

    def backbone_features(self, images):
        """ResNet layer1-4 maps (strides 4, 8, 16, 32) with their padding masks: [(x [B, C_l, H_l, W_l], mask)];
        the transformer reads layer2-4, the mask head also layer1."""
        if torch.is_tensor(images) and images.dim() == 4:
            samples = detr.NestedTensor(images, images.new_zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool))
        else:
            samples = detr.nested_tensor_from_tensor_list(list(images))  # zero-padded, mask True on padding
        return [(f.tensors, f.mask) for f in self.backbone[0](samples).values()]

    def encode_frame(self, frame_features, pos, frame):
        """One frame's slot of the multi-frame attention (frame 0: previous, 1: current): its levels projected
        (plus the extra stride-64 levels), masked and position-coded (`pos`: the current frame's 3-D encodings, as
        the official code uses for both frames), then encoded: (masks, memory) for the transformer."""
        srcs, masks, pos_embeds = [], [], []
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
        return masks, self.transformer.encode(srcs, masks, pos_embeds, frame * self.num_feature_levels)

    def forward(self, images, prev_features=None, track_queries=None, previous_pass=False):
        """previous_pass: the training's previous-frame pass (under no_grad). Without dropout, the frame's
        previous-slot encoding is then computed with gradient and returned with the features (an EncodedFrame);
        the current frame's pass reuses it where it has the same padding masks, instead of encoding the same frame
        with the same weights and position codes again as the official code does: the same losses and gradients,
        one encoder pass less. With dropout the current pass encodes it again under its own dropout draws."""
        features = self.backbone_features(images)
        levels = features[-3:]
        # 3-D (frame, y, x) encoding of the current frame's masks: [B, 2, C, H, W]; frame 0 = previous
        pos = [self.backbone[1](x, m) for x, m in levels]
        prev_levels = levels if prev_features is None else prev_features[-3:]
        keep = previous_pass and not self.transformer.dropout
        prev = getattr(prev_features, "encoded", None)
        if prev is None or not all(torch.equal(p[1], c[1]) for p, c in zip(prev_levels, levels)):
            with torch.enable_grad() if keep else contextlib.nullcontext():
                prev = self.encode_frame(prev_levels, pos, 0)
        cur = self.encode_frame(levels, pos, 1)
        hs, boxes, memory = self.transformer(prev, cur, self.query_embed.weight, track_queries)
        logits = torch.stack([head(h) for head, h in zip(self.class_embed, hs)])
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "hs_embed": hs[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        if self.masks:
            out["pred_masks"] = self.predict_masks(features, prev[0] + cur[0], memory, hs[-1])
        return out, (EncodedFrame(features, prev) if keep else features)

    def predict_masks(self, features, masks, memory, queries):
        """DETRSegmBase.forward on Deformable DETR: attention maps of the last decoder output over one memory level
        (MHAttentionMap), then the FPN mask head on layer3's projection with layer3, 2, 1 of the current frame.

        The official code cuts the memory into levels in the order of `srcs` (previous frame first) while the memory
        holds the current frame first, so its `memory[-3]` (meant: layer3) is the previous frame's layer3 memory
        (frames share their shapes); kept, as the released models were trained so."""
        x, mask = features[-2]  # layer3
        src = self.input_proj[-3](x)
        sizes = [m.shape[-2] * m.shape[-1] for m in masks]  # the 8 levels, previous frame first
        h, w = masks[-3].shape[-2:]
        start = sum(sizes[:-3])
        level = memory[:, start:start + sizes[-3]].transpose(1, 2).reshape(memory.shape[0], -1, h, w)
        bbox_mask = self.bbox_attention(queries, level, mask=resize_mask(mask, src.shape[-2:]))
        masks = self.mask_head(src, bbox_mask, [features[-2][0], features[-3][0], features[-4][0]])
        return masks.view(queries.shape[0], queries.shape[1], *masks.shape[-2:])  # [B, T + Q, H_1, W_1]


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
# Model: the vanilla-DETR TrackFormer with DETR's mask head (the paper's MOTS20 model, Sec. 4.2)
# ----------------------------------------------------------------------------------------------------------------


class DETRTracking(detr.DETR):
    """The official DETRTracking (--no-deformable), with `masks` DETRSegmTracking: detr.py's DETR on one frame with
    track queries, and detr.py's segmentation head. State-dict keys as the official model (no `detr.` prefix, unlike
    detr.DETRsegm): backbone.0.body.*, input_proj, query_embed, class_embed, bbox_embed, transformer.*, and with
    masks bbox_attention.* and mask_head.*.

    forward(images, prev_features=None, track_queries=None, previous_pass=False) -> (out, features), the interface
    of TrackFormer: the previous frame's features (and previous_pass) are not used (vanilla DETR sees one frame),
    and of the track queries only hs_embeds [B, T, C]: each starts the decoder from that embedding with a zero
    positional query (official DETR.forward; their boxes are not an input here). out = {pred_logits [B, T + Q,
    num_classes + 1], pred_boxes, hs_embed [B, T + Q, C], aux_outputs, with masks pred_masks [B, T + Q, H/4, W/4]},
    query order [track queries..., object queries]. hs_embed, fed back as the next frame's track queries, is the
    last decoder layer's output before the decoder's final norm (the official hs_without_norm); the heads and the
    mask attention read it after the norm.
    """

    def __init__(self, backbone, transformer, num_classes=20, num_queries=100, aux_loss=True, masks=False,
                 freeze_detr=False):
        super().__init__(backbone, transformer, num_classes, num_queries, aux_loss)
        self.hidden_dim = transformer.d_model
        self.masks, self.freeze_detr = masks, freeze_detr
        if freeze_detr:  # everything built so far; the mask head below trains (the official DETRSegmBase)
            self.requires_grad_(False)
        if masks:  # detr.DETRsegm's head: attention over the encoder memory, FPN over layer3, 2, 1
            c, nheads = backbone.num_channels, transformer.nhead
            self.bbox_attention = detr.MHAttentionMap(self.hidden_dim, self.hidden_dim, nheads, dropout=0.0)
            self.mask_head = detr.MaskHeadSmallConv(self.hidden_dim + nheads, [c // 2, c // 4, c // 8],
                                                    self.hidden_dim)

    def train(self, mode=True):
        """As nn.Module.train; with freeze_detr the conv stem's batch norm keeps its statistics."""
        super().train(mode)
        if self.freeze_detr:
            detr.keep_batch_norm_statistics(self.backbone)
        return self

    def forward(self, images, prev_features=None, track_queries=None, previous_pass=False):
        features, pos = self.backbone(detr.nested_tensor_from_tensor_list(list(images)))
        src, mask = features[-1].decompose()
        src_proj = self.input_proj(src)
        query_pos, tgt = self.query_embed.weight, None
        if track_queries is not None:  # [track queries..., object queries]: embeddings as tgt, zero positions
            track_hs = track_queries["hs_embeds"]  # [B, T, C]
            query_pos = torch.cat([query_pos.new_zeros(track_hs.shape[1], query_pos.shape[1]), query_pos])
            tgt = torch.cat([track_hs, track_hs.new_zeros(track_hs.shape[0], self.num_queries, track_hs.shape[2])], 1)
        hs, memory, hs_embed = self.transformer(src_proj, mask, query_pos, pos[-1], tgt, unnormed=True)
        logits, boxes = self.class_embed(hs), self.bbox_embed(hs).sigmoid()  # [L, B, T + Q, ...]
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "hs_embed": hs_embed}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        if self.masks:  # DETRSegmBase.forward: the last layer's queries over the memory, FPN on layer3, 2, 1
            bbox_mask = self.bbox_attention(hs[-1], memory, mask=mask)  # [B, T + Q, heads, h, w]
            masks = self.mask_head(src_proj, bbox_mask, [features[2].tensors, features[1].tensors,
                                                         features[0].tensors])
            out["pred_masks"] = masks.view(*hs.shape[1:3], *masks.shape[-2:])  # [B, T + Q, H/4, W/4]
        return out, features


# ----------------------------------------------------------------------------------------------------------------
# Matching and losses: focal cost, track queries forced onto their identities (Sec. 3.3, Eq. 2)
# ----------------------------------------------------------------------------------------------------------------


class TrackHungarianMatcher(HungarianMatcher):
    """DETR's matcher with the focal classification cost and TrackFormer's track-query rule.

    C = cost_bbox * L1 + cost_class * C_focal + cost_giou * (-GIoU), with, at the target class and p = sigmoid:
        C_focal = alpha (1 - p)^gamma (-log(p + 1e-8)) - (1 - alpha) p^gamma (-log(1 - p + 1e-8)).
    Without focal_loss (the vanilla-DETR path) DETR's -softmax(logits)[target class] instead.
    Targets may carry `track_queries_mask` / `track_queries_fal_pos_mask` (bool [T + Q]) and
    `track_query_match_ids` (one target index per true track query, in order): a true track query is assigned to
    its own identity (Eq. 2: sigma(i) = j for track queries of objects still visible), false-positive track queries
    stay unmatched (-> background), and the object queries are matched to the remaining targets by Hungarian.
    Returns a list of B pairs (query_idx, target_idx), query_idx sorted.
    """

    def __init__(self, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0,
                 focal_loss=True):
        super().__init__(cost_class, cost_bbox, cost_giou)
        self.focal_alpha, self.focal_gamma, self.focal_loss = focal_alpha, focal_gamma, focal_loss

    def class_cost(self, logits, target_ids):
        if not self.focal_loss:
            return super().class_cost(logits, target_ids)
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


class SetCriterion(detr.SetCriterion):
    """DETR's set criterion (boxes, cardinality, masks, the loop over decoder layers with their suffixes) with the
    focal classification loss of Deformable DETR, and every layer matched by the track-aware matcher. Unmatched
    queries, false-positive track queries included, are trained as background (all-zero one-hot). Without focal_loss
    (the vanilla-DETR path) DETR's cross-entropy with no-object weight eos_coef (`loss_labels_ce`)."""

    def __init__(self, num_classes, matcher, weight_dict, focal_alpha=0.25, focal_gamma=2.0,
                 losses=("labels", "boxes", "cardinality"), focal_loss=True, eos_coef=0.1):
        super().__init__(num_classes, matcher, weight_dict, eos_coef=eos_coef, losses=losses)
        self.focal_alpha, self.focal_gamma, self.focal_loss = focal_alpha, focal_gamma, focal_loss

    def match_all(self, outputs, targets):
        """Track-aware matcher indices for the final layer, then each aux layer."""
        return [self.matcher(layer, targets) for layer in [outputs] + outputs.get("aux_outputs", [])]

    def loss_labels(self, outputs, targets, indices, num_boxes, log=True):
        if not self.focal_loss:
            return self.loss_labels_ce(outputs, targets, indices, num_boxes, log)
        logits = outputs["pred_logits"]  # [B, Q, K]
        idx = self._src_permutation_idx(indices)
        classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[idx] = classes_o
        onehot = torch.zeros(*logits.shape[:2], logits.shape[2] + 1, dtype=logits.dtype, device=logits.device)
        onehot.scatter_(2, classes.unsqueeze(-1), 1)
        # the official code averages over queries and then multiplies by their number: sum / num_boxes
        loss_ce = detr.sigmoid_focal_loss(logits, onehot[:, :, :-1], num_boxes, self.focal_alpha,
                                          self.focal_gamma) * logits.shape[1]
        losses = {"loss_ce": loss_ce}
        if log:  # top-1 error of the matched queries (logging only; 100 when there is no target)
            correct = (logits[idx].argmax(-1) == classes_o).float().mean() if len(classes_o) else logits.new_zeros(())
            losses["class_error"] = 100 - 100 * correct
        return losses

    def loss_labels_ce(self, outputs, targets, indices, num_boxes, log=True):
        """DETR's weighted cross-entropy (mean over queries weighted by their target class: eos_coef for
        no-object), as the official vanilla path with track_query_false_positive_eos_weight (train_tracking.yaml): a
        false-positive track query learns no-object at full weight (the official loss * 1 / eos_coef, counted as
        class 0 in the normaliser)."""
        logits = outputs["pred_logits"]  # [B, Q, num_classes + 1]
        idx = self._src_permutation_idx(indices)
        classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[idx] = classes_o
        weight = self.empty_weight[classes]  # [B, Q]
        for i, target in enumerate(targets):
            if "track_queries_fal_pos_mask" in target:
                weight[i, target["track_queries_fal_pos_mask"]] = 1.0
        nll = F.cross_entropy(logits.transpose(1, 2), classes, reduction="none")
        losses = {"loss_ce": (weight * nll).sum() / weight.sum()}
        if log:  # top-1 error of the matched queries (logging only; 100 when there is no target)
            correct = (logits[idx].argmax(-1) == classes_o).float().mean() if len(classes_o) else logits.new_zeros(())
            losses["class_error"] = 100 - 100 * correct
        return losses


# ----------------------------------------------------------------------------------------------------------------
# Track queries for training (Sec. 3.3 "Track query re-identification" / 4 "Track augmentations")
# ----------------------------------------------------------------------------------------------------------------


def add_track_queries(targets, prev_indices, prev_out, num_queries, false_negatives, false_positive_prob):
    """Turn the previous frame's matched outputs into track queries of the current frame, as the official
    `add_track_queries_to_targets` does (the same random draws, in the same order).

    Where the official code differs from its config names:
    - false negatives: not an independent drop with `track_query_false_negative_prob` (0.4) per object (that code
      is commented out): with `false_negatives` a random subset of n matched objects is kept,
      n ~ U{0, ..., min_b #matched_b}, the same n for the whole batch (any probability > 0 switched it on).
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
        if false_negatives:
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
            if not candidates:  # fewer queries than objects and false positives (tiny --num_queries)
                break
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
    """TrackFormer, its criterion and matcher from `args` (the paper's MOT17 model with the default flags; with
    --no-deformable the vanilla-DETR TrackFormer of its MOTS20 results)."""
    if (args.freeze_detr or args.load_mask_head_from_model) and not args.masks:
        raise SystemExit("--freeze_detr and --load_mask_head_from_model concern the mask head: they need --masks")
    try:
        model = build_deformable(args) if args.deformable else build_vanilla(args)
    except ValueError as error:  # the mask head's widths (detr.MaskHeadSmallConv)
        raise SystemExit(f"--masks: {error}") from None
    # focal loss on the Deformable DETR path (train_deformable.yaml), cross-entropy on the vanilla one (train.yaml)
    matcher = TrackHungarianMatcher(args.set_cost_class, args.set_cost_bbox, args.set_cost_giou,
                                    args.focal_alpha, args.focal_gamma, focal_loss=args.deformable)
    weight_dict = {"loss_ce": args.cls_loss_coef, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
    if args.masks:
        weight_dict.update(loss_mask=args.mask_loss_coef, loss_dice=args.dice_loss_coef)
    if args.aux_loss:  # as the official build: aux copies of every weight, mask losses included (never computed)
        weight_dict.update({f"{k}_{i}": v for i in range(args.dec_layers - 1) for k, v in list(weight_dict.items())})
    losses = ("labels", "boxes", "cardinality") + (("masks",) if args.masks else ())
    criterion = SetCriterion(args.num_classes, matcher, weight_dict, args.focal_alpha, args.focal_gamma, losses,
                             focal_loss=args.deformable, eos_coef=args.eos_coef)
    return model, criterion, matcher


def build_deformable(args):
    """The official DeformableDETRTracking (DeformableDETRSegmTracking with --masks), multi-frame."""
    if args.hidden_dim % 3 or args.hidden_dim % 32:
        raise SystemExit(f"--hidden_dim {args.hidden_dim} must be divisible by 3 (3-D encoding) and 32 (GroupNorm)")
    backbone = detr.Backbone(args.backbone, train_backbone=args.lr_backbone > 0, return_interm_layers=True,
                             dilation=False)
    # [frame, y, x] x hidden_dim / 3 channels; the mask of the current frame is repeated over the 2 frames
    position = PositionEmbeddingSine3D(args.hidden_dim // 3, num_frames=2, normalize=True, per_frame_mask=False)
    transformer = DeformableTransformer(d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
                                        num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward,
                                        dropout=args.dropout, num_feature_levels=2 * args.num_feature_levels,
                                        dec_n_points=args.dec_n_points, enc_n_points=args.enc_n_points)
    return TrackFormer(nn.Sequential(backbone, position), transformer, num_classes=args.num_classes,
                       num_queries=args.num_queries, num_feature_levels=args.num_feature_levels,
                       aux_loss=args.aux_loss, masks=args.masks, freeze_detr=args.freeze_detr)


def build_vanilla(args):
    """The official DETRTracking (DETRSegmTracking with --masks) on detr.py's backbone and transformer: layer4 only
    (layer1-4 for the mask head), TrackFormer's 2-D sine encoding (positions offset by -0.5 before normalising, its
    copy of Deformable DETR's), the decoder's intermediate outputs for the aux losses."""
    backbone = detr.Backbone(args.backbone, train_backbone=args.lr_backbone > 0, return_interm_layers=args.masks,
                             dilation=False)
    joiner = detr.Joiner(backbone, PositionEmbeddingSine(args.hidden_dim // 2, normalize=True, offset=-0.5))
    joiner.num_channels = backbone.num_channels
    transformer = detr.Transformer(d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
                                   num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward,
                                   dropout=args.dropout, return_intermediate_dec=True)
    return DETRTracking(joiner, transformer, num_classes=args.num_classes, num_queries=args.num_queries,
                        aux_loss=args.aux_loss, masks=args.masks, freeze_detr=args.freeze_detr)


# ----------------------------------------------------------------------------------------------------------------
# Data: MOTChallenge sequences, frame pairs, CrowdHuman as simulated pairs (Sec. 4 "Datasets", datasets/mot.py)
# ----------------------------------------------------------------------------------------------------------------

DETECTORS = ("DPM", "FRCNN", "SDP")  # every MOT17 sequence exists once per public detector (same frames)
VIS_THRESHOLD = 0.25  # generate_coco_from_mot.py: training boxes with visibility <= 0.25 are `ignore`


def find_sequences(root, split="train", dets=("FRCNN",), names=()):
    """MOTChallenge sequence folders under ROOT/<split> (or ROOT/{MOT17,MOT20,MOTS20,mot17}/<split>).

    MOT17 folders end in the detector (MOT17-02-DPM, -FRCNN, -SDP: the same frames, different det/det.txt); only
    those in `dets` are kept. Folders without a detector suffix (MOT20-01) are always kept."""
    root = Path(root)
    for base in (root / split, *(root / name / split for name in ("MOT17", "MOT20", "MOTS20", "mot17"))):
        if base.is_dir():
            seqs = sorted(p for p in base.iterdir() if p.is_dir() and (not names or p.name in names)
                          and (p.name.rsplit("-", 1)[-1] not in DETECTORS or p.name.rsplit("-", 1)[-1] in dets))
            if not seqs:
                raise SystemExit(f"{base}: no sequence folders for detectors {'/'.join(dets)}"
                                 f"{' named ' + ', '.join(names) if names else ''}")
            return [MOTSequence(p) for p in seqs]
    raise SystemExit(f"{root}: expected MOTChallenge data, i.e. {root}/{split}/MOT17-XX-FRCNN/"
                     "{seqinfo.ini,img1/,gt/gt.txt,det/det.txt} (or the same under MOT17/ or MOT20/)")


def _read_rows(path, min_columns):
    try:
        rows = np.loadtxt(path, delimiter=",", ndmin=2) if path.stat().st_size else np.zeros((0, min_columns))
    except ValueError as error:
        raise SystemExit(f"{path}: expected comma-separated numbers ({error})") from None
    if rows.shape[1] < min_columns:
        raise SystemExit(f"{path}: expected at least {min_columns} comma-separated columns, got {rows.shape[1]}")
    return rows


def read_mots(path):
    """KITTI-MOTS / MOTS20 rows `frame id class height width rle` (space-separated; pycocotools compressed RLE;
    class 1 car, 2 pedestrian, 10 ignore region, id = class * 1000 + instance) -> [(frame, id, class, rle)]."""
    objects = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = line.split()
        if len(fields) != 6 or not all(v.isdigit() for v in fields[:5]):
            raise SystemExit(f"{path}, line {n}: expected `frame id class height width rle`, got {line[:60]!r}")
        frame, track_id, cls, h, w = (int(v) for v in fields[:5])
        objects.append((frame, track_id, cls, {"size": [h, w], "counts": fields[5].encode()}))
    return objects


class MOTSequence:
    """One MOTChallenge sequence: seqinfo.ini, img1/000001.jpg..., gt/gt.txt (train only), det/det.txt.

    gt.txt rows: frame, id, left, top, width, height, conf (0 = not evaluated), class (1 pedestrian; 2, 7, 8, 12
    distractors; MOT20 also 6), visibility; 1-based pixels. `gt_rows` keeps them as read (for the evaluation);
    `gt[frame]` holds the same rows with 0-based corners (x0, y0, x1, y1) = (left - 1, top - 1, x0 + w, y0 + h).
    Rows past seqLength and boxes of zero size are dropped with one printed line; a missing seqinfo.ini or frame
    image is an error naming the file. det.txt rows: frame, -1, left, top, width, height, score (public detections).

    A MOTS20 sequence (gt.txt in the KITTI-MOTS format, see `read_mots`) has `masks[(frame, id)]` (RLE) for its
    pedestrians (class 2), whose mask boxes make its gt rows, as the official MOTS20Sequence; cars (1) and ignore
    regions (10) are not targets.
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
        self.name = self.path.name
        self.length = int(info["seqLength"])
        self.width, self.height = int(info["imWidth"]), int(info["imHeight"])
        self.image_dir, self.image_ext = self.path / info.get("imDir", "img1"), info.get("imExt", ".jpg")
        gt_file = self.path / "gt" / "gt.txt"
        self.masks = {}
        if gt_file.is_file() and len(gt_file.read_text().split("\n", 1)[0].split()) == 6:  # MOTS: 6 fields
            objects = [o for o in read_mots(gt_file) if o[2] == 2]
            self.masks = {(frame, track_id): rle for frame, track_id, _, rle in objects}
            boxes = [mask_utils.toBbox(rle) for _, _, _, rle in objects]
            self.gt_rows = np.array([[f, i, x + 1, y + 1, w, h, 1, 1, 1.0] for (f, i, _, _), (x, y, w, h)
                                     in zip(objects, boxes)]).reshape(-1, 9)
        else:
            self.gt_rows = self._read_gt(gt_file)
        boxes = self.gt_rows.copy()
        boxes[:, 2:4] -= 1
        boxes[:, 4:6] += boxes[:, 2:4]
        self.gt = {int(f): boxes[boxes[:, 0] == f] for f in np.unique(boxes[:, 0])}
        det_file = self.path / "det" / "det.txt"
        self.dets = {}
        if det_file.is_file():
            for row in _read_rows(det_file, 7):
                x0, y0 = row[2] - 1, row[3] - 1
                self.dets.setdefault(int(row[0]), []).append([x0, y0, x0 + row[4], y0 + row[5], row[6]])

    def check_frames(self):
        """Every frame 1..seqLength exists and is whole (a JPEG's end-of-image marker, a PNG's IEND chunk among its
        last bytes), read from the files' ends: `main` calls it before it trains, so a missing or cut frame stops a
        run before it writes anything, not when training or tracking reaches the frame."""
        end_marker = {".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9", ".png": b"IEND"}.get(self.image_ext.lower())
        for frame in range(1, self.length + 1):
            path = self.image_dir / f"{frame:06d}{self.image_ext}"
            if not path.is_file():
                raise SystemExit(f"{path}: frame {frame} of sequence {self.name} is missing")
            if end_marker:
                with open(path, "rb") as f:
                    f.seek(max(0, path.stat().st_size - 1024))
                    if end_marker not in f.read():
                        raise SystemExit(f"{path}: frame {frame} of sequence {self.name} is truncated (no end "
                                         f"marker {end_marker!r} in its last bytes)")

    @property
    def has_gt(self):
        return len(self.gt_rows) > 0

    def _read_gt(self, path):
        if not path.is_file():
            return np.zeros((0, 9))
        rows = _read_rows(path, 9)[:, :9]
        past = (rows[:, 0] < 1) | (rows[:, 0] > self.length)
        empty = (rows[:, 4] <= 0) | (rows[:, 5] <= 0)
        if past.any() or empty.any():
            print(f"{path}: dropped {int(past.sum())} rows outside frames 1..{self.length} and "
                  f"{int((empty & ~past).sum())} boxes of zero size")
        return rows[~past & ~empty]

    def frames(self, frame_range):
        """1-based frame numbers in [int(start * L), int(end * L)) (the official cross-validation split)."""
        start, end = int(frame_range[0] * self.length), int(frame_range[1] * self.length)
        return list(range(start + 1, end + 1))

    def image(self, frame):
        path = self.image_dir / f"{frame:06d}{self.image_ext}"
        if not path.is_file():
            raise SystemExit(f"{path}: frame {frame} of sequence {self.name} is missing")
        try:
            return Image.open(path).convert("RGB")
        except OSError as error:
            raise OSError(f"cannot read frame {frame} of sequence {self.name}, {path}: {error}") from None

    def train_target(self, frame):
        """Pedestrians (conf 1, class 1) as generate_coco_from_mot: {boxes [N, 4] xyxy pixels, track_ids, ignore};
        `ignore` marks visibility <= VIS_THRESHOLD (removed from the targets after the transforms, as the official
        CocoDetection does)."""
        rows = self.gt.get(frame, np.zeros((0, 9)))
        rows = rows[(rows[:, 6] == 1) & (rows[:, 7] == 1)]
        target = {"boxes": torch.as_tensor(rows[:, 2:6], dtype=torch.float32),
                  "track_ids": torch.as_tensor(rows[:, 1], dtype=torch.int64),
                  "ignore": torch.as_tensor(rows[:, 8] <= VIS_THRESHOLD)}
        if self.masks:
            rles = [self.masks[frame, int(i)] for i in rows[:, 1]]
            target["masks"] = torch.as_tensor(mask_utils.decode(rles), dtype=torch.bool).permute(2, 0, 1) if rles \
                else torch.zeros(0, self.height, self.width, dtype=torch.bool)
        return target


def read_coco_persons(json_file, image_dir, masks=False):
    """The person boxes of a COCO-format file as [(image path, xyxy boxes [N, 4], ignore [N], segmentations)] for
    the images that have annotations (the official CocoDetection's remove_no_obj_imgs): `iscrowd` annotations
    dropped, `ignore` kept as a flag (ConvertCocoPolysToMask), boxes without area dropped; `segmentations` (COCO
    polygons or RLE, decoded by `decode_segmentations`) with `masks`, else None."""
    json_file = Path(json_file)
    try:
        data = json.loads(json_file.read_text())
        images, annotations = data["images"], data["annotations"]
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(f"{json_file}: expected a COCO annotation file (images, annotations): {error}") from None
    anns, annotated = {}, {a["image_id"] for a in annotations}
    for a in annotations:
        if not a.get("iscrowd"):
            anns.setdefault(a["image_id"], []).append(a)
    out = []
    for info in images:
        if info["id"] not in annotated:  # remove_no_obj_imgs: images without any annotation are not used
            continue
        objects = anns.get(info["id"], [])
        boxes = torch.tensor([a["bbox"] for a in objects], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # x, y, w, h -> x0, y0, x1, y1
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        ignore = torch.tensor([bool(a.get("ignore", 0)) for a in objects], dtype=torch.bool)
        segms = None
        if masks:
            if any("segmentation" not in a for a in objects):
                raise SystemExit(f"{json_file}: image {info['id']} has a person without `segmentation` (--masks)")
            segms = ([a["segmentation"] for a, k in zip(objects, keep.tolist()) if k], info["height"], info["width"])
        out.append((Path(image_dir) / info["file_name"], boxes[keep], ignore[keep], segms))
    return out


def decode_segmentations(segms):
    """(COCO segmentations, height, width) -> bool masks [N, H, W]: polygons (a list of them per object, merged),
    uncompressed RLE (counts as a list) or compressed RLE, as the official convert_coco_poly_to_mask."""
    objects, h, w = segms
    masks = []
    for segm in objects:
        if isinstance(segm, dict) and isinstance(segm.get("counts"), str):
            rle = {"size": segm["size"], "counts": segm["counts"].encode()}
        else:
            rle = mask_utils.frPyObjects(segm, h, w)
        mask = mask_utils.decode(rle)
        masks.append(torch.as_tensor(mask.reshape(h, w, -1).any(-1)))
    return torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.bool)


def read_crowdhuman(root, split="train_val"):
    """CrowdHuman person boxes as [(image path, xyxy boxes [N, 4], ignore [N], None)].

    Reads either the release layout (ROOT/annotation_{train,val}.odgt + ROOT/Images/<ID>.jpg; `split` names the
    odgt files, `train_val` both) or the COCO JSON that the official generate_coco_from_crowdhuman.py writes
    (ROOT/annotations/<split>.json + ROOT/<split>/). As the official conversion: full-body boxes (`fbox`) of
    `person` boxes only, `extra.ignore` (COCO: `ignore`) kept as a flag, iscrowd boxes dropped."""
    root = Path(root)
    coco_file = root / "annotations" / f"{split}.json"
    odgt_files = [root / f"annotation_{s}.odgt" for s in ("train", "val") if s in split]
    if coco_file.is_file():
        return read_coco_persons(coco_file, root / split)
    if not (odgt_files and all(f.is_file() for f in odgt_files)):
        raise SystemExit(f"{root}: expected CrowdHuman as released ({', '.join(f.name for f in odgt_files)} + "
                         f"Images/) or converted to COCO (annotations/{split}.json + {split}/)")
    out = []
    for odgt in odgt_files:
        for line in odgt.read_text().splitlines():
            record = json.loads(line)
            persons = [b for b in record["gtboxes"] if b["tag"] == "person"]
            boxes = torch.tensor([b["fbox"] for b in persons], dtype=torch.float32).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            ignore = torch.tensor([bool(b.get("extra", {}).get("ignore", 0)) for b in persons], dtype=torch.bool)
            out.append((root / "Images" / f"{record['ID']}.jpg", boxes[keep], ignore[keep], None))
    return out


def read_coco_person(root, masks=True):
    """COCO persons as the official `coco_person` dataset: ROOT/annotations/person_keypoints_train2017.json (the
    person annotations of COCO train2017) + ROOT/train2017/."""
    root = Path(root)
    json_file = root / "annotations" / "person_keypoints_train2017.json"
    if not json_file.is_file():
        raise SystemExit(f"{root}: expected COCO persons as annotations/person_keypoints_train2017.json + train2017/")
    return read_coco_persons(json_file, root / "train2017", masks)


def transform_params(w, h, max_size, rng):
    """One draw of the official train transform (make_coco_transforms, sizes scaled by max_size / 1333): flip,
    then a multi-scale resize, or resize -> random size crop -> multi-scale resize. Returns steps for
    apply_transform; a frame pair shares one draw (the official code replays the random state)."""
    scale = max_size / 1333
    scales = [int(scale * s) for s in range(480, 801, 32)]
    steps = [("flip", rng.random() < 0.5)]
    if rng.random() < 0.5:
        steps.append(("resize", resized_wh(w, h, rng.choice(scales), max_size)))
    else:
        w1, h1 = resized_wh(w, h, rng.choice([int(scale * s) for s in (400, 500, 600)]))
        lo, hi = int(scale * 384), int(scale * 600)
        cw, ch = rng.randint(min(lo, w1), min(w1, hi)), rng.randint(min(lo, h1), min(h1, hi))
        x0, y0 = rng.randint(0, w1 - cw), rng.randint(0, h1 - ch)
        steps += [("resize", (w1, h1)), ("crop", (x0, y0, cw, ch)),
                  ("resize", resized_wh(cw, ch, rng.choice(scales), max_size))]
    return steps


def prev_frame_jitter(w, h, rnd_augs, rng):
    """The official `_add_random_jitter` of the previous frame (after the shared transform): a crop of
    (1 - rnd_augs .. 1) x the width at the same aspect ratio, at a random position (boxes clipped to it), then a
    resize back to (w, h). rnd_augs: track_prev_frame_rnd_augs (MOT, 0.01) or
    coco_and_crowdhuman_prev_frame_rnd_augs (CrowdHuman / COCO, 0.2)."""
    if not rnd_augs:
        return []
    cw = rng.randint(int((1.0 - rnd_augs) * w), w)
    ch = int(h * cw / w)
    return [("crop_clip", (rng.randint(0, w - cw), rng.randint(0, h - ch), cw, ch)), ("resize", (w, h))]


def resized_wh(w, h, size, max_size=None):
    """DETR's resize rule (detr.resized_shape) as (w, h)."""
    return detr.resized_shape((w, h), size, max_size)[::-1]


def apply_transform(img, target, steps, overflow_boxes=True):
    """Apply transform steps to a PIL image and its target (boxes xyxy pixels, plus per-box fields; masks
    [N, H, W] are flipped, resized (nearest) and cropped along).

    `crop` with overflow_boxes (the main config) keeps partly visible boxes whole and collapses a box only on a side
    where it lies wholly outside the crop, as the official `crop(..., overflow_boxes=True)`; without it (and for the
    previous-frame jitter, `crop_clip`) boxes are clipped to the crop. Boxes left without area are removed."""
    target = dict(target)
    for name, value in steps:
        w, h = img.size
        boxes = target["boxes"]
        if name == "flip" and value:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        elif name == "resize":
            img = img.resize(value, Image.BILINEAR)
            target["boxes"] = boxes * torch.tensor([value[0] / w, value[1] / h] * 2)
            if "masks" in target:  # nearest, as the official resize
                target["masks"] = F.interpolate(target["masks"][:, None].float(), size=value[::-1])[:, 0] > 0.5
        elif name in ("crop", "crop_clip"):
            x0, y0, cw, ch = value
            img = img.crop((x0, y0, x0 + cw, y0 + ch))
            if "masks" in target:
                target["masks"] = target["masks"][:, y0:y0 + ch, x0:x0 + cw]
            boxes = boxes - torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
            size = torch.tensor([cw, ch, cw, ch], dtype=torch.float32)
            if overflow_boxes and name == "crop":
                pairs = boxes.view(-1, 2, 2).transpose(1, 2)  # [(x0, x1), (y0, y1)] per box
                pairs = torch.where((pairs < 0).all(-1, keepdim=True), torch.zeros_like(pairs), pairs)
                limit = size[:2].view(1, 2, 1)
                pairs = torch.where((pairs > limit).all(-1, keepdim=True), limit.expand_as(pairs), pairs)
                boxes = pairs.transpose(1, 2).reshape(-1, 4)
            else:
                boxes = torch.min(boxes, size).clamp(min=0)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            target = {k: v[keep] for k, v in target.items()}
            target["boxes"] = boxes[keep]
    return img, target


def to_input(img, target=None):
    """PIL -> normalised [3, H, W] (ImageNet mean/std); target -> boxes cxcywh / (w, h, w, h), labels 0 (person),
    track_ids (and masks), with `ignore` boxes removed."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(detr.IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(detr.IMAGENET_STD).view(3, 1, 1)
    if target is None:
        return x
    w, h = img.size
    keep = ~target["ignore"]
    boxes = box_xyxy_to_cxcywh(target["boxes"][keep].reshape(-1, 4)) / torch.tensor([w, h, w, h], dtype=torch.float32)
    out = {"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.int64),
           "track_ids": target["track_ids"][keep], "size": torch.tensor([h, w])}
    if "masks" in target:
        out["masks"] = target["masks"][keep]
    return x, out


class FramePairs(torch.utils.data.Dataset):
    """(frame t, previous frame t') pairs of the training frames of every sequence, |t - t'| <= prev_frame_range
    (datasets/mot.py: t' uniform in the range, clipped to the split). Both frames get the same random transform;
    the previous frame is then jittered (`prev_frame_jitter`, track_prev_frame_rnd_augs)."""

    def __init__(self, sequences, frame_range, prev_frame_range, max_size, rnd_augs=0.01, overflow_boxes=True):
        self.sequences, self.prev_frame_range, self.max_size = sequences, prev_frame_range, max_size
        self.rnd_augs, self.overflow_boxes = rnd_augs, overflow_boxes
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
        img, target = apply_transform(seq.image(frames[i]), seq.train_target(frames[i]), steps, self.overflow_boxes)
        prev = apply_transform(seq.image(frames[j]), seq.train_target(frames[j]), steps, self.overflow_boxes)
        prev = apply_transform(*prev, prev_frame_jitter(*prev[0].size, self.rnd_augs, random))
        img, target = to_input(img, target)
        target["prev_image"], target["prev_target"] = to_input(*prev)
        return img, target


class PersonImagePairs(torch.utils.data.Dataset):
    """CrowdHuman (or COCO person) images as simulated frame pairs (datasets/crowdhuman.py, coco.py): the previous
    frame is the same image under the same random transform, then jittered with
    coco_and_crowdhuman_prev_frame_rnd_augs (0.2: a crop of 80-100 % resized back). Track ids are box indices;
    items with segmentations (`read_coco_person`) also give the persons' masks."""

    def __init__(self, items, rnd_augs=0.2, max_size=1333, overflow_boxes=True):
        self.items, self.rnd_augs, self.max_size, self.overflow_boxes = items, rnd_augs, max_size, overflow_boxes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        path, boxes, ignore, segms = self.items[idx]
        if not path.is_file():
            raise SystemExit(f"{path}: image {idx} of the person-image annotations is missing")
        try:
            img = Image.open(path).convert("RGB")
        except OSError as error:
            raise OSError(f"cannot read image {path}: {error}") from None
        target = {"boxes": boxes, "track_ids": torch.arange(len(boxes)), "ignore": ignore}
        if segms is not None:
            target["masks"] = decode_segmentations(segms)
            if target["masks"].shape[-2:] != (img.height, img.width):
                raise SystemExit(f"{path}: {img.width}x{img.height} pixels, its annotations say "
                                 f"{target['masks'].shape[-1]}x{target['masks'].shape[-2]}")
        img, target = apply_transform(img, target, transform_params(*img.size, self.max_size, random),
                                      self.overflow_boxes)
        prev = apply_transform(img, target, prev_frame_jitter(*img.size, self.rnd_augs, random))
        img, target = to_input(img, target)
        target["prev_image"], target["prev_target"] = to_input(*prev)
        return img, target


def build_train_dataset(args):
    """`--dataset`: mot (MOT17/MOT20 frame pairs), crowdhuman (pre-training, train_crowdhuman), mot_crowdhuman
    (their concatenation, train_mot17_crowdhuman / train_mot20_crowdhuman), sampled uniformly, or coco_person (COCO
    person images with masks, train_coco_person_masks)."""
    if args.masks and args.dataset not in ("mot", "coco_person"):
        raise SystemExit("--masks trains on MOTS20 sequences (--dataset mot) or COCO persons (--dataset coco_person); "
                         "CrowdHuman has no masks")
    if args.dataset == "coco_person":
        if not args.coco_path:
            raise SystemExit("--dataset coco_person needs --coco_path")
        return PersonImagePairs(read_coco_person(args.coco_path, args.masks),
                                args.coco_and_crowdhuman_prev_frame_rnd_augs, args.img_max_size, args.overflow_boxes)
    parts = []
    if "crowdhuman" in args.dataset:
        if not args.crowdhuman_path:
            raise SystemExit(f"--dataset {args.dataset} needs --crowdhuman_path")
        parts.append(PersonImagePairs(read_crowdhuman(args.crowdhuman_path, args.crowdhuman_train_split),
                                      args.coco_and_crowdhuman_prev_frame_rnd_augs, args.img_max_size,
                                      args.overflow_boxes))
    if "mot" in args.dataset:
        sequences = find_sequences(args.data_root, "train", ("FRCNN",), args.sequences)
        for seq in sequences:
            seq.check_frames()
        if args.masks and not all(seq.masks for seq in sequences):
            raise SystemExit(f"--masks: {[s.name for s in sequences if not s.masks]} have no MOTS20 masks "
                             "(gt/gt.txt rows `frame id class height width rle`)")
        parts.insert(0, FramePairs(sequences, args.train_frame_range, args.track_prev_frame_range,
                                   args.img_max_size, args.track_prev_frame_rnd_augs, args.overflow_boxes))
    return parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)


def collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


# ----------------------------------------------------------------------------------------------------------------
# Train: two-frame forward (DETRTrackingBase.forward in training mode)
# ----------------------------------------------------------------------------------------------------------------


def two_frame_forward(model, matcher, images, targets, args):
    """Previous frame without gradient -> match -> track queries (with FN/FP augmentation) -> current frame."""
    with torch.no_grad():
        prev_out, prev_features = model([t["prev_image"] for t in targets], previous_pass=True)
        prev_out = {k: v for k, v in prev_out.items() if k != "aux_outputs"}
        prev_indices = matcher(prev_out, [t["prev_target"] for t in targets])
        add_track_queries(targets, prev_indices, prev_out, args.num_queries, args.track_query_false_negatives,
                          args.track_query_false_positive_prob)
    out, _ = model(images, prev_features, stack_track_queries(targets))
    return out


def to_device(images, targets, device):
    def move(t):
        return {k: (v.to(device) if torch.is_tensor(v) else move(v) if isinstance(v, dict) else v)
                for k, v in t.items()}
    return [img.to(device) for img in images], [move(t) for t in targets]


def train_one_epoch(model, criterion, matcher, loader, optimizer, scaler, device, epoch, args, after_step=None,
                    checkpoint=None):
    """One pass over the loader (from its sampler's `start` step on, for a run resumed mid-epoch; --max_iters steps
    at most, set in the sampler). `after_step(epoch, steps done in this epoch)` runs after every optimizer step
    (checkpoints, stop signals); a non-finite loss stops the run naming the step, every weighted loss term and
    `checkpoint` (the last good one)."""
    model.train()
    logger = tu.MetricLogger(delimiter="  ")
    logger.add_meter("lr", tu.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    first = getattr(getattr(loader, "batch_sampler", None), "start", 0)
    batches = logger.log_every(loader, args.print_freq, f"Epoch: [{epoch}]")
    for step, (images, targets) in enumerate(batches, start=first):
        images, targets = to_device(images, targets, device)  # prev_image and prev_target included
        with tu.amp_autocast(device, args.amp):
            out = two_frame_forward(model, matcher, images, targets, args)
        loss_dict = criterion(out, targets)
        loss = sum(loss_dict[k] * w for k, w in criterion.weight_dict.items() if k in loss_dict)
        loss_value = tu.all_reduce_mean(loss.detach()).item()
        if not math.isfinite(loss_value):  # the terms are read only then (one device sync each)
            reduced = tu.reduce_dict({k: v.detach() for k, v in loss_dict.items()})
            tu.check_finite_loss({"loss": loss_value, **{k: reduced[k] * w for k, w in criterion.weight_dict.items()
                                                         if k in reduced}},
                                 f"epoch {epoch}, step {step}", checkpoint)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        if args.clip_max_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
        scaler.step(optimizer)
        scaler.update()
        reduced = tu.reduce_dict({k: v.detach() for k, v in loss_dict.items()})
        logger.update(loss=sum(reduced[k] * w for k, w in criterion.weight_dict.items() if k in reduced),
                      **{k: v for k, v in reduced.items()
                         if k in ("loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice", "class_error")})
        logger.update(lr=optimizer.param_groups[0]["lr"])
        if after_step is not None:
            after_step(epoch, step + 1)
    logger.synchronize_between_processes()
    return {k: m.global_avg for k, m in logger.meters.items()}


def _float(out):
    """Losses in float32 under --amp (the matcher and GIoU need it)."""
    cast = {k: v.float() for k, v in out.items() if torch.is_tensor(v)}
    if "aux_outputs" in out:
        cast["aux_outputs"] = [{k: v.float() for k, v in a.items()} for a in out["aux_outputs"]]
    return cast


# ----------------------------------------------------------------------------------------------------------------
# Online tracking (Sec. 3.3, models/tracker.py): track queries follow objects, object queries start new tracks
# ----------------------------------------------------------------------------------------------------------------


class Track:
    def __init__(self, pos, score, track_id, hs_embed, obj_ind, out_index=None):
        self.id, self.pos, self.score, self.obj_ind = track_id, pos, score, obj_ind
        self.out_index = out_index  # its output (query) index in the current frame, for its mask
        self.hs_embed = [hs_embed]
        self.last_pos = [pos.clone()]
        self.count_inactive = 0
        self.count_termination = 0

    def has_positive_area(self):
        return bool(self.pos[2] > self.pos[0] and self.pos[3] > self.pos[1])


class Tracker:
    """The official tracker's bookkeeping, step by step (cfgs/track.yaml options as keyword arguments).

    detector(image, prev_features, track_queries) -> (out, features) is the model in eval mode (tests pass
    hand-made outputs). Each step: (1) drop inactive tracks older than `inactive_patience` or with an empty box;
    (2) query the model with all active then inactive tracks (embedding hs_embed, box centre of the last box);
    (3) keep an active track if its score > track_obj_score_thresh and its label is 0 (person); after
    `steps_termination` misses it goes inactive; an inactive track whose query scores > reid_score_thresh is
    re-activated (re-identification by its own track query); NMS at track_nms_thresh removes overlapping tracks;
    (4) object-query detections with score > detection_obj_score_thresh and label 0, optionally only those near a
    public detection, are matched to inactive tracks (embedding distance <= reid_sim_threshold, or greedy centre
    distance) and otherwise start new tracks; NMS at detection_nms_thresh removes new tracks that overlap existing
    ones. `results[track_id][frame] = {bbox (xyxy pixels), score, obj_ind}`, frames counted from 0.
    """

    def __init__(self, detector, num_object_queries, detection_obj_score_thresh=0.4, track_obj_score_thresh=0.4,
                 detection_nms_thresh=0.9, track_nms_thresh=0.9, inactive_patience=5, reid_sim_threshold=0.0,
                 reid_score_thresh=0.4, public_detections="", steps_termination=1, reid_greedy_matching=False,
                 reid_sim_only=False, overflow_boxes=True, post_process=post_process):
        self.detector, self.num_object_queries = detector, num_object_queries
        self.post_process = post_process  # DeformablePostProcess (sigmoid); detr.PostProcess() for --no-deformable
        self.detection_obj_score_thresh = detection_obj_score_thresh
        self.track_obj_score_thresh = track_obj_score_thresh
        self.detection_nms_thresh, self.track_nms_thresh = detection_nms_thresh, track_nms_thresh
        self.inactive_patience = float(inactive_patience)
        self.reid_sim_threshold, self.reid_score_thresh = reid_sim_threshold, reid_score_thresh
        self.public_detections, self.steps_termination = public_detections, steps_termination
        self.reid_greedy_matching, self.reid_sim_only = reid_greedy_matching, reid_sim_only
        self.overflow_boxes = overflow_boxes
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
        h, w = orig_size[0].tolist()
        if queried:
            boxes = box_xyxy_to_cxcywh(torch.stack([t.pos for t in queried]).float().cpu())
            boxes = boxes / torch.tensor([w, h, w, h], dtype=torch.float32)
            track_queries = {"hs_embeds": torch.stack([t.hs_embed[-1] for t in queried])[None].to(image.device),
                             "boxes": boxes[None].to(image.device)}
        out, features = self.detector(image, self.prev_features, track_queries)
        hs_embeds = out["hs_embed"][0]
        result = self.post_process(out, orig_size.to(out["pred_boxes"].device))[0]
        scores, labels, boxes = result["scores"], result["labels"], result["boxes"]
        if not self.overflow_boxes:
            boxes = torchvision.ops.clip_boxes_to_image(boxes, (h, w))
        num_tracks = len(queried)

        if num_tracks:  # track queries
            keep = (scores[:num_tracks] > self.track_obj_score_thresh) & (labels[:num_tracks] == 0)
            to_inactive = []
            for i, track in enumerate(self.tracks):
                if keep[i]:
                    track.score, track.pos, track.count_termination, track.out_index = scores[i], boxes[i], 0, i
                    track.hs_embed.append(hs_embeds[i])
                else:
                    track.count_termination += 1
                    if track.count_termination >= self.steps_termination:
                        to_inactive.append(track)
            reid_keep = (scores[:num_tracks] > self.reid_score_thresh) & (labels[:num_tracks] == 0)
            from_inactive = []
            for i, track in enumerate(self.inactive_tracks, start=len(self.tracks)):
                if reid_keep[i]:
                    track.score, track.pos, track.out_index = scores[i], boxes[i], i
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
        keep = (scores[num_tracks:] > self.detection_obj_score_thresh) & (labels[num_tracks:] == 0)
        det_index = keep.nonzero()[:, 0]
        det_scores, det_boxes, det_embeds = (x[num_tracks:][keep] for x in (scores, boxes, hs_embeds))
        if self.public_detections:
            covered = self._public_detections_mask(det_boxes, public_dets)
            det_scores, det_boxes, det_embeds, det_index = (x[covered] for x in (det_scores, det_boxes, det_embeds,
                                                                                 det_index))
        fresh = self._reid(det_boxes, det_scores, det_embeds, num_tracks + det_index)
        det_scores, det_boxes, det_embeds, det_index = (x[fresh] for x in (det_scores, det_boxes, det_embeds,
                                                                           det_index))
        new_ids = []
        for i in range(len(det_boxes)):
            self.tracks.append(Track(det_boxes[i], det_scores[i], self.track_num + i, det_embeds[i], det_index[i],
                                     num_tracks + int(det_index[i])))
            new_ids.append(self.track_num + i)
        self.track_num += len(new_ids)
        if self.detection_nms_thresh and self.tracks:
            # existing tracks get score +inf, so NMS only ever removes new tracks
            track_scores = torch.stack([t.score if t.id in new_ids else torch.tensor(float("inf")).to(t.score)
                                        for t in self.tracks])
            keep_ids = set(nms(torch.stack([t.pos for t in self.tracks]), track_scores,
                               self.detection_nms_thresh).tolist())
            self.tracks = [t for i, t in enumerate(self.tracks) if i in keep_ids]

        masks = self._masks(out, image.shape[-2:], (h, w)) if "pred_masks" in out else [None] * len(self.tracks)
        for track, mask in zip(self.tracks, masks):
            self.results.setdefault(track.id, {})[self.frame_index] = {
                "bbox": track.pos.float().cpu().numpy(), "score": float(track.score), "obj_ind": int(track.obj_ind)}
            if mask is not None:
                self.results[track.id][self.frame_index]["mask"] = mask
        for track in self.inactive_tracks:
            track.count_inactive += 1
        self.frame_index += 1
        self.prev_features = features
        if self.reid_sim_only:
            self._to_inactive(list(self.tracks))

    def _masks(self, out, input_size, orig_size):
        """The tracks' masks (PostProcessSegm with return_probs, then the official tracker's rule): mask logits
        upsampled (bilinear) to the input size, sigmoid, resized (nearest) to the frame; a pixel belongs to the track
        with the highest probability if that is > 0.5, so masks do not overlap. Returns bool [H, W] numpy arrays."""
        if not self.tracks:
            return []
        logits = out["pred_masks"][0, [t.out_index for t in self.tracks]].float()
        probs = F.interpolate(logits[None], size=tuple(input_size), mode="bilinear", align_corners=False).sigmoid()
        probs = F.interpolate(probs, size=tuple(int(v) for v in orig_size), mode="nearest")[0]
        owner = probs.argmax(0)
        return [((probs[i] > 0.5) & (owner == i)).cpu().numpy() for i in range(len(self.tracks))]

    def _public_detections_mask(self, det_boxes, public_dets):
        """Keep a new detection only if it is the closest one to a public detection (each used once):
        center_distance: squared centre distance below the detection's area; min_iou_0_5: IoU >= 0.5."""
        mask = torch.zeros(len(det_boxes), dtype=torch.bool, device=det_boxes.device)
        if public_dets is None or not len(public_dets) or not len(det_boxes):
            return mask
        public_dets = public_dets.to(det_boxes)
        if self.public_detections == "center_distance":
            area = (det_boxes[:, 2] - det_boxes[:, 0]) * (det_boxes[:, 3] - det_boxes[:, 1])
            dist = torch.cdist(box_xyxy_to_cxcywh(det_boxes)[:, :2], box_xyxy_to_cxcywh(public_dets)[:, :2]) ** 2
            for j in range(dist.shape[1]):
                i = dist[:, j].argmin()
                if dist[i, j] < area[i]:
                    dist[i, :] = float("inf")
                    mask[i] = True
        else:  # min_iou_0_5
            iou = box_iou(det_boxes, public_dets)
            for j in range(iou.shape[1]):
                i = iou[:, j].argmax()
                if iou[i, j] >= 0.5:
                    iou[i, :] = 0
                    mask[i] = True
        return mask

    def _reid(self, det_boxes, det_scores, det_embeds, det_out_index):
        """Re-identify inactive tracks with new detections: Hungarian on the L2 distance between embeddings,
        accepted when <= reid_sim_threshold; or (reid_greedy_matching) greedily by squared centre distance, a pair
        allowed when that distance is below both boxes' areas. Returns the mask of detections not used."""
        self._prune_inactive()
        fresh = torch.ones(len(det_boxes), dtype=torch.bool, device=det_boxes.device)
        if not self.inactive_tracks or not len(det_boxes):
            return fresh
        if self.reid_greedy_matching:
            track_cxcywh = box_xyxy_to_cxcywh(torch.stack([t.pos for t in self.inactive_tracks]).float())
            det_cxcywh = box_xyxy_to_cxcywh(det_boxes.float())
            dist = (torch.cdist(track_cxcywh[:, :2], det_cxcywh[:, :2]) ** 2).cpu().numpy()
            invalid = ((dist > (track_cxcywh[:, 2] * track_cxcywh[:, 3])[:, None].cpu().numpy())
                       | (dist > (det_cxcywh[:, 2] * det_cxcywh[:, 3])[None].cpu().numpy()))
            dist = dist + invalid * 1e18
            pairs = []
            for row in range(dist.shape[0]):
                col = dist[row].argmin()
                if dist[row, col] < 1e16:
                    dist[:, col] = 1e18
                    dist[row, col] = 0.0
                    pairs.append((row, col))
        else:
            # F.pairwise_distance adds eps 1e-6 to the difference, as the official code: with the default threshold
            # 0.0 no pair is ever accepted, i.e. re-identification runs through the inactive tracks' own queries
            dist = torch.stack([F.pairwise_distance(t.hs_embed[-1][None].float(), det_embeds.float())
                                for t in self.inactive_tracks]).cpu().numpy()
            pairs = list(zip(*linear_sum_assignment(dist)))
        used = []
        for row, col in pairs:
            if dist[row, col] <= self.reid_sim_threshold:
                track = self.inactive_tracks[row]
                track.count_inactive = 0
                track.pos, track.score, track.out_index = det_boxes[col], det_scores[col], int(det_out_index[col])
                track.hs_embed.append(det_embeds[col])
                track.last_pos = [track.pos.clone()]
                used.append(track)
                fresh[col] = False
                self.tracks.append(track)
                self.num_reids += 1
        self.inactive_tracks = [t for t in self.inactive_tracks if t not in used]
        return fresh


def interpolate_tracks(results):
    """Fill the frames a track misses between its first and last frame by linear interpolation of the box
    (track.yaml `interpolate`; the official `interpolate_tracks` meant this but returns an undefined name)."""
    filled = {}
    for track_id, frames in results.items():
        known = sorted(frames)
        boxes = np.stack([frames[f]["bbox"] for f in known])
        filled[track_id] = dict(frames)
        for f in range(known[0], known[-1] + 1):
            if f not in frames:
                box = np.array([np.interp(f, known, boxes[:, k]) for k in range(4)], dtype=np.float32)
                filled[track_id][f] = {"bbox": box, "score": -1.0, "obj_ind": -1}
    return filled


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: the MOTChallenge protocol (TrackEval: CLEAR-MOT, IDF1, HOTA) on MOTChallenge result files
# ----------------------------------------------------------------------------------------------------------------


def write_results(results, path, frames):
    """A MOTChallenge result file (ready to zip and upload): `frame, id, left, top, width, height, conf, -1, -1,
    -1`, 1-based frames, ids and pixels. results[track_id][i] (tracker step i) is frame frames[i]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for track_id, track in sorted(results.items()):
            for i, r in sorted(track.items()):
                x0, y0, x1, y1 = (float(v) for v in r["bbox"])
                f.write(f"{frames[i]},{track_id + 1},{x0 + 1:.2f},{y0 + 1:.2f},{x1 - x0:.2f},{y1 - y0:.2f},"
                        f"{r['score']:.4f},-1,-1,-1\n")


def write_mots_results(results, path, frames, height, width):
    """A MOTS20 result file as the official MOTS20Sequence.write_results: `frame id 2 height width rle` (KITTI-MOTS,
    class 2 pedestrian, id = track id + 1), one row per track and frame with a non-empty mask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for track_id, track in results.items():
        for i, r in track.items():
            if r.get("mask") is not None and r["mask"].any():
                rle = mask_utils.encode(np.asfortranarray(r["mask"].astype(np.uint8)))
                rows.append((frames[i], track_id + 1, rle["counts"].decode()))
    path.write_text("".join(f"{f} {i} 2 {height} {width} {rle}\n" for f, i, rle in sorted(rows)))


def mot_challenge_metrics(sequences, result_dir, frame_lists, benchmark="MOT17"):
    """Score result files (RESULT_DIR/<seq>.txt) on the given frames of each sequence with TrackEval, the
    MOTChallenge organisers' code, as the benchmark does.

    MOT17 / MOT20 (boxes, IoU >= 0.5): hypotheses matched (Hungarian) to a gt box of a distractor class (2 person on
    vehicle, 7 static person, 8 distractor, 12 reflection; MOT20 also 6 non-mot vehicle) are removed, then only
    conf-1 pedestrians (class 1, any visibility) are targets. MOTS20 (benchmark "MOTS", masks, mask IoU > 0.5):
    unmatched hypotheses lying more than half inside an ignore region (class 10) are removed; sMOTSA = (sum of the
    matches' mask IoU - FP - IDSW) / #gt, MOTSA = MOTA on masks.

    Frames outside frame_lists (e.g. the training half in the cross-validation split) are cut from both files and
    the rest renumbered from 1, since TrackEval scores whole sequences. Returns eval.json's dict: MOTA, IDF1, MOTP,
    HOTA, DetA, AssA (%), MT, ML, FP, FN, IDSW, Frag, num_objects, num_unique_objects (MOTS: sMOTSA, MOTSA, MOTSP
    instead of MOTA, MOTP), and per_sequence."""
    import trackeval  # imported here: only evaluation needs it

    mots = benchmark == "MOTS"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lengths = {}
        (tmp / "res" / "tracker" / "data").mkdir(parents=True)
        for seq, frames in zip(sequences, frame_lists):
            result_file = Path(result_dir) / f"{seq.name}.txt"
            if not result_file.is_file():
                raise SystemExit(f"{result_file}: no result file for sequence {seq.name}")
            (tmp / "gt" / seq.name / "gt").mkdir(parents=True)
            for source, target in ((seq.path / "gt" / "gt.txt", tmp / "gt" / seq.name / "gt" / "gt.txt"),
                                   (result_file, tmp / "res" / "tracker" / "data" / f"{seq.name}.txt")):
                if mots:
                    rows = [(f - frames[0] + 1, i, c, rle) for f, i, c, rle in read_mots(source)
                            if frames[0] <= f <= frames[-1]]
                    target.write_text("".join(f"{f} {i} {c} {' '.join(str(v) for v in rle['size'])} "
                                              f"{rle['counts'].decode()}\n" for f, i, c, rle in rows))
                else:
                    rows = seq.gt_rows if source.name == "gt.txt" else _read_rows(source, 7)
                    rows = rows[(rows[:, 0] >= frames[0]) & (rows[:, 0] <= frames[-1])].copy()
                    rows[:, 0] -= frames[0] - 1
                    np.savetxt(target, rows, delimiter=",", fmt="%.10g")
            lengths[seq.name] = len(frames)
        config = {"GT_FOLDER": str(tmp / "gt"), "TRACKERS_FOLDER": str(tmp / "res"), "OUTPUT_FOLDER": str(tmp / "out"),
                  "TRACKERS_TO_EVAL": ["tracker"], "SEQ_INFO": lengths, "SKIP_SPLIT_FOL": True, "PRINT_CONFIG": False}
        dataset = (trackeval.datasets.MOTSChallenge(config) if mots
                   else trackeval.datasets.MotChallenge2DBox(dict(config, BENCHMARK=benchmark)))
        evaluator = trackeval.Evaluator({"PRINT_RESULTS": False, "PRINT_CONFIG": False, "TIME_PROGRESS": False,
                                         "OUTPUT_SUMMARY": False, "OUTPUT_DETAILED": False, "PLOT_CURVES": False,
                                         "LOG_ON_ERROR": None})
        metrics = [trackeval.metrics.HOTA({"PRINT_CONFIG": False}),
                   trackeval.metrics.CLEAR({"THRESHOLD": 0.5, "PRINT_CONFIG": False}),
                   trackeval.metrics.Identity({"THRESHOLD": 0.5, "PRINT_CONFIG": False})]
        with contextlib.redirect_stdout(io.StringIO()):
            output, _ = evaluator.evaluate([dataset], metrics)
    by_sequence = output[type(dataset).__name__]["tracker"]

    def summary(res):
        hota, clear, identity, count = res["HOTA"], res["CLEAR"], res["Identity"], res["Count"]
        main = ({"sMOTSA": 100 * clear["sMOTA"], "MOTSA": 100 * clear["MOTA"], "MOTSP": 100 * clear["MOTP"]} if mots
                else {"MOTA": 100 * clear["MOTA"], "MOTP": 100 * clear["MOTP"]})
        return {**main, "IDF1": 100 * identity["IDF1"], "HOTA": 100 * hota["HOTA"].mean(),
                "DetA": 100 * hota["DetA"].mean(), "AssA": 100 * hota["AssA"].mean(), "MT": int(clear["MT"]),
                "ML": int(clear["ML"]), "FP": int(clear["CLR_FP"]), "FN": int(clear["CLR_FN"]),
                "IDSW": int(clear["IDSW"]), "Frag": int(clear["Frag"]), "num_objects": int(count["GT_Dets"]),
                "num_unique_objects": int(count["GT_IDs"])}

    result = summary(by_sequence["COMBINED_SEQ"]["pedestrian"])
    result["per_sequence"] = {name: summary(res["pedestrian"]) for name, res in by_sequence.items()
                              if name != "COMBINED_SEQ"}
    return result


# ----------------------------------------------------------------------------------------------------------------
# Evaluate: track every sequence online, write its MOTChallenge result file, score the ones with ground truth
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def track_and_evaluate(model, sequences, device, args, output_dir):
    """Online tracking of the `--val_frame_range` frames of each sequence (src/track.py); writes
    OUTPUT_DIR/tracks/<seq>.txt and returns eval.json's dict (metrics over the sequences that have gt/gt.txt)."""
    model.eval()
    unwrapped = tu.unwrap(model)

    def detector(image, prev_features, track_queries):
        with tu.amp_autocast(device, args.amp):
            out, features = unwrapped(image, prev_features, track_queries)
        return _float(out), features

    tracker = Tracker(detector, unwrapped.num_queries, args.detection_obj_score_thresh, args.track_obj_score_thresh,
                      args.detection_nms_thresh, args.track_nms_thresh, args.inactive_patience,
                      args.reid_sim_threshold, args.reid_score_thresh, args.public_detections,
                      args.steps_termination, args.reid_greedy_matching, args.reid_sim_only, args.overflow_boxes,
                      post_process if args.deformable else detr.PostProcess())
    track_dir = Path(output_dir) / "tracks"
    frame_lists, start = [], time.time()
    for seq in sequences:
        frames = seq.frames(args.val_frame_range)
        tracker.reset()
        seq_start = time.time()
        for frame in frames:
            img = seq.image(frame)
            x = to_input(img.resize(resized_wh(img.width, img.height, args.val_width, args.img_max_size),
                                    Image.BILINEAR))[None].to(device)
            dets = torch.tensor([d[:4] for d in seq.dets.get(frame, [])], dtype=torch.float32).reshape(-1, 4)
            tracker.step(x, torch.tensor([[img.height, img.width]], device=device), dets)
        results = interpolate_tracks(tracker.results) if args.interpolate else tracker.results
        if args.masks:
            write_mots_results(results, track_dir / f"{seq.name}.txt", frames, seq.height, seq.width)
        else:
            write_results(results, track_dir / f"{seq.name}.txt", frames)
        if args.viz:
            draw_tracks(seq, frames, results, Path(output_dir) / "viz" / seq.name)
        frame_lists.append(frames)
        print(f"{seq.name}: {len(frames)} frames, {len(results)} tracks, {tracker.num_reids} re-identified, "
              f"{len(frames) / (time.time() - seq_start):.1f} frames/s", flush=True)
    with_gt = [(seq, frames) for seq, frames in zip(sequences, frame_lists) if seq.has_gt]
    summary = {}
    if with_gt:
        benchmark = ("MOTS" if args.masks else "MOT20" if all(s.name.startswith("MOT20") for s, _ in with_gt)
                     else "MOT17")
        summary = mot_challenge_metrics([s for s, _ in with_gt], track_dir, [f for _, f in with_gt], benchmark)
    summary["seconds"] = time.time() - start
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Visualise: tracks with ids on the frames
# ----------------------------------------------------------------------------------------------------------------


def track_colour(track_id):
    return tuple(int(c) for c in np.random.default_rng(track_id).integers(64, 256, 3))


def draw_frame(img, results, i):
    """Every track's box (and mask) at tracker step i with its MOTChallenge id (track id + 1), coloured by id."""
    pixels = np.asarray(img).copy()
    for track_id, track in results.items():
        if i in track and track[i].get("mask") is not None:
            pixels[track[i]["mask"]] = 0.5 * pixels[track[i]["mask"]] + 0.5 * np.array(track_colour(track_id))
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    for track_id, track in results.items():
        if i in track:
            box = [float(v) for v in track[i]["bbox"]]
            draw.rectangle(box, outline=track_colour(track_id), width=2)
            draw.text((box[0] + 2, box[1] + 1), str(track_id + 1), fill=track_colour(track_id))
    return img


def draw_tracks(seq, frames, results, out_dir, panels=4):
    """One PNG per frame (OUT_DIR/<frame>.png) and OUT_DIR/../<seq>.png: `panels` frames spread over the run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        draw_frame(seq.image(frame), results, i).save(out_dir / f"{frame:06d}.png")
    picks = np.linspace(0, len(frames) - 1, min(panels, len(frames))).round().astype(int)
    strip = Image.new("RGB", (seq.width * len(picks), seq.height + 14), "white")
    for k, i in enumerate(picks):
        strip.paste(Image.open(out_dir / f"{frames[i]:06d}.png"), (k * seq.width, 14))
        ImageDraw.Draw(strip).text((k * seq.width + 2, 1), f"{seq.name} frame {frames[i]}", fill="black")
    strip.save(out_dir.parent / f"{seq.name}.png")


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


MASK_HEAD_KEYS = ("bbox_attention.", "mask_head.")


def load_mask_head(model, path):
    """The official load_mask_head_from_model: every bbox_attention.* / mask_head.* tensor of the checkpoint at
    `path` (a DETR segmentation model: detr-r50-panoptic-00ce5173.pth, or detr.py --masks) whose shape equals the
    model's replaces it; the others keep theirs. Returns the names loaded; an error when none fits."""
    checkpoint = tu.load_checkpoint(path)
    state = checkpoint["model"] if isinstance(checkpoint, dict) and "model" in checkpoint else checkpoint
    own = model.state_dict()
    head = [k for k in own if k.startswith(MASK_HEAD_KEYS)]
    loaded = [k for k in head if k in state and tuple(state[k].shape) == tuple(own[k].shape)]
    if not loaded:
        raise SystemExit(f"--load_mask_head_from_model {path}: none of its bbox_attention.* / mask_head.* tensors "
                         f"fits this model's {len(head)} (hidden {model.hidden_dim}); expected a DETR segmentation "
                         "checkpoint of the same widths")
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    print(f"mask head: {len(loaded)} of {len(head)} tensors from {path} (the others keep their initialisation)")
    return loaded


def check_model_path(state, args, source):
    """One clear error for a checkpoint of the other official model (released ones carry no identity): the vanilla
    DETR's one input projection is `input_proj.weight`, Deformable DETR's per-level ones `input_proj.<level>.*`."""
    vanilla = "input_proj.weight" in state
    if vanilla == args.deformable and (vanilla or "input_proj.0.0.weight" in state):
        raise SystemExit(f"{source}: a {'vanilla' if vanilla else 'Deformable'}-DETR TrackFormer checkpoint; load it "
                         f"with {'--no-deformable' if vanilla else '--deformable'} (and its --hidden_dim / "
                         "--num_queries)")


IDENTITY_ARGS = ("deformable", "backbone", "num_feature_levels", "enc_layers", "dec_layers", "hidden_dim",
                 "dim_feedforward", "num_queries", "num_classes", "masks", "freeze_detr")


def run_identity(args):
    """What a checkpoint must match to be resumed here (common/training.py check_identity)."""
    return {"script": "trackformer.py", **{k: getattr(args, k) for k in IDENTITY_ARGS}}


def main(args):
    """Train (--eval: only track) and track / evaluate on the --split sequences.

    Training checkpoints (OUTPUT_DIR/checkpoint.pth, at each epoch's end and every --checkpoint_every steps) hold
    the step within the epoch and every process's random generators; the samples and their augmentation are a
    function of (seed, epoch, position), so --resume continues the same run (bit for bit with --deterministic).
    SIGTERM / SIGINT save a checkpoint after the current step and stop."""
    tu.init_distributed(args)
    device = tu.resolve_device(args.device)
    if args.deterministic:
        tu.make_deterministic()
    tu.seed_everything(args.seed)
    if args.val_frame_range is None:
        args.val_frame_range = [0.5, 1.0] if args.split == "train" else [0.0, 1.0]
    model, criterion, matcher = build_model(args)
    model.to(device)
    tu.compile_model(model, args.compile)
    print(f"TrackFormer: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters")
    optimizer = torch.optim.AdamW(param_groups(model, args), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [args.lr_drop])  # one drop (src/train.py)
    scaler = tu.grad_scaler(device, args.amp)
    identity = run_identity(args)
    start_step, rng = 0, None
    if args.resume:
        checkpoint = tu.load_checkpoint(args.resume)
        tu.check_identity(checkpoint, identity, f"--resume {args.resume}")
        state = checkpoint["model"] if "model" in checkpoint else checkpoint
        check_model_path(state, args, f"--resume {args.resume}")
        tu.load_model_state(model, state, args.resume)
        # a run of this script (its checkpoints carry the RNG state) continues; a released model only loads
        if not args.eval and "rng" in checkpoint and "optimizer" in checkpoint:
            start_step, rng = tu.resume_run(checkpoint, args, optimizer, lr_scheduler, scaler)
        print(f"loaded {args.resume}" + (f", resuming at epoch {args.start_epoch}, step {start_step}"
                                         if args.start_epoch or start_step else ""))
    elif args.pretrained:
        checkpoint = tu.load_checkpoint(args.pretrained)
        state = checkpoint["model"] if "model" in checkpoint else checkpoint
        check_model_path(state, args, f"--pretrained {args.pretrained}")
        head = [k for k in model.state_dict() if k.startswith(MASK_HEAD_KEYS)]
        # a box model starts a --masks model (train_coco_person_masks): the mask head is all it may lack
        box_model = args.masks and not any(k in state for k in head)
        missing, unexpected = tu.load_model_state(model, state, args.pretrained, strict=not box_model)
        if unexpected or set(missing) - set(head):
            raise SystemExit(f"--pretrained {args.pretrained} does not fit this --masks model: missing "
                             f"{sorted(set(missing) - set(head))[:8]}, unexpected {unexpected[:8]}")
        print(f"starting from the weights of {args.pretrained}"
              + (f" (a box model: the {len(head)} mask-head tensors start fresh)" if box_model else ""))
    else:
        print("no --resume: the model starts from random weights (the paper starts from a CrowdHuman-trained model)")
    if args.load_mask_head_from_model and not (args.resume and "rng" in checkpoint):  # not when a run continues
        load_mask_head(model, args.load_mask_head_from_model)

    if tu.is_main_process() and args.tracking_eval:  # opened and checked before anything is written
        dets = DETECTORS if args.dets == "ALL" else (args.dets,)
        eval_sequences = find_sequences(args.data_root, args.split, dets, args.sequences)
        for seq in eval_sequences:
            seq.check_frames()
    if not args.eval:
        dataset = build_train_dataset(args)
        # DistributedSampler's order (also on one process), each sample augmented under a seed fixed by its place in
        # the epoch; --max_iters keeps the first steps of each epoch
        sampler = tu.ResumableBatchSampler(len(dataset), args.batch_size, seed=args.seed,
                                           max_batches=args.max_iters or None)
        loader = torch.utils.data.DataLoader(tu.SeededDataset(dataset), batch_sampler=sampler, collate_fn=collate,
                                             num_workers=args.num_workers, generator=tu.loader_generator(args.seed))
        train_model = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if args.gpu is not None
                                                                 else None) if args.distributed else model)
        checkpoint = Path(args.output_dir) / "checkpoint.pth" if args.output_dir else None

        save = tu.epoch_saver(checkpoint, identity=identity, args=args, model=model, optimizer=optimizer,
                              lr_scheduler=lr_scheduler, scaler=scaler)
        epochs = tu.ResumableEpochs(args, sampler, start_step, rng, save, checkpoint)
        start = time.time()
        for epoch in epochs:  # each epoch's checkpoint after its schedule step
            stats = train_one_epoch(train_model, criterion, matcher, loader, optimizer, scaler, device, epoch,
                                    args, epochs.after_step, checkpoint)
            lr_scheduler.step()
            tu.append_log(args.output_dir, {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()},
                                            "seconds": time.time() - start})
    if tu.is_main_process() and args.tracking_eval:
        with tempfile.TemporaryDirectory() as tmp:
            summary = track_and_evaluate(model, eval_sequences, device, args, args.output_dir or tmp)
        print(json.dumps({k: v for k, v in summary.items() if k != "per_sequence"}, indent=1))
        seconds = summary.pop("seconds")  # in log.txt only: eval.json is the same for the same seed and data
        if args.output_dir:
            tu.write_json(Path(args.output_dir) / "eval.json", summary)
            tu.append_log(args.output_dir, {"eval": {k: v for k, v in summary.items() if k != "per_sequence"},
                                            "seconds": seconds})
    return model


if __name__ == "__main__":
    main(get_args_parser().parse_args())
