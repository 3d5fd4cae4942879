"""VisTR: End-to-End Video Instance Segmentation with Transformers.

Yuqing Wang, Zhaoliang Xu, Xinlong Wang, Chunhua Shen, Baoshan Cheng, Hao Shen, Huaxia Xia. CVPR 2021,
arXiv:2011.14503. Official code: https://github.com/Epiphqny/VisTR (commit 445c9e4), a fork of DETR.

VisTR is DETR applied to a whole clip. A ResNet runs on each of the T frames; the T feature maps form one sequence
of T*h*w tokens with a 3-D (time, y, x) sine position encoding; a DETR transformer (hidden 384) decodes
T * n instance queries, frame-major (query q = frame * n + slot), so slot s taken over all frames is one instance
sequence. Training matches whole sequences to ground-truth tracks (Hungarian, Sec. 3.2) and applies DETR's
losses plus focal + dice mask losses. The mask head attends each frame's queries to that frame's encoder memory,
refines with an FPN-style head ending in a deformable 3x3 conv, then a 3-D conv over time per instance (Sec. 3.3).

This file reproduces the official model (its checkpoints load strictly: 503 keys at R50, base keys prefixed
`vistr.`), matcher, losses, YouTube-VIS 2019 data pipeline, whole-video inference with the CodaLab results JSON,
and adds a local video mask AP (the official repository evaluates only on the server). Parity with the official
code is tested on `tests/fixtures/vistr_r50.pt` (outputs, matching, every loss, 1e-4). Status: the paper's
36.2 AP (R50, YouTube-VIS 2019 val) is not reproduced here (no GPU / real data in this project). The synthetic
demo's results are in the README's demo table; the recipe it follows and what was measured: docs/vistr.md.

Real data (YouTube-VIS 2019: ROOT/train.json + ROOT/train/JPEGImages/<video>/*.jpg, or the official repo's
ROOT/annotations/instances_train_sub.json):
    python vistr.py --data_root ROOT --backbone resnet50 --pretrained_weights r50_pretrained.pth --output_dir out
    torchrun --nproc_per_node 8 vistr.py --data_root ROOT --backbone resnet101 --pretrained_weights r101.pth --amp
    python vistr.py --data_root ROOT --eval --resume vistr_r50.pth --eval_split valid   # results.json for CodaLab
    python vistr.py --data_root ROOT --eval --resume out/checkpoint.pth                 # local AP, held-out videos
Demo (synthetic data, 2 CPU cores): make demo-vistr

Differences from the official code:
- `torchvision.ops.deform_conv2d` replaces the CUDA-only DCN extension (same weight/offset layout); off CUDA the
  same operation is computed with `grid_sample` (equal to 1e-13 in float64, gradients included; faster than
  torchvision's CPU kernel, docs/performance.md).
- The mask head runs all frames and all instance slots as one batch instead of Python loops (same numbers up
  to float rounding: GroupNorm and convs are per sample).
- The matcher uses slots = num_queries // num_frames instead of the hard-coded 10.
- Photometric jitter uses torchvision's colour functions instead of OpenCV's HSV conversion (no OpenCV here).
- Inference handles videos longer than num_frames (the official inference.py reads only the first 36 frames):
  overlapping clips (`--clip_stride`) whose instance sequences are linked by mask IoU on the shared frames
  (Hungarian; `--clip_linking slot` instead takes slot s as the same instance in every clip).
- `--input_size` scales every size of the official training augmentation (300 = the official R50 sizes).
- ResNet-18/34 backbones get FPN adapter widths that fit them (R50/R101, the released models, are unchanged).
- Additions, all off by default: `--batch_size` above 1 (the clips of a batch go through the model one by one and
  their gradients are averaged), `--lr_mask_head` (an own lr for the segmentation heads), `--match_valid_frames
  matched` (fixes the official matcher, which trains each matched pair on the valid frames of the track at the
  pair's position in the assignment instead of its own track's), `--cropped_out absent` (the official crop keeps an
  instance it removes from a frame as valid there, with its label and a zero-area box; this marks it absent),
  `--no_photometric` (no colour jitter and channel
  swap: where colour tells the classes apart, as in the synthetic data, a swap paints one class in another's colour).
- Training clips follow DistributedSampler's order on one process too (`--max_iters`: the first clips of each
  epoch's permutation), each augmented under a seed fixed by (--seed, epoch, position), and checkpoints hold the
  step within the epoch and every process's generators, so `--resume` continues the same run (bit for bit with
  `--deterministic`; `--checkpoint_every N` saves within an epoch). SIGTERM / SIGINT save a checkpoint after the
  current step and stop; a non-finite loss names the step, every loss term and the last good checkpoint.
"""
import argparse
import contextlib
import functools
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import deform_conv2d

import detr
from common import training as tu
from common.matching import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from common.position_encoding import PositionEmbeddingSine3D
from detr import MLP, Backbone, Joiner, MHAttentionMap, NestedTensor, Transformer, dice_loss, sigmoid_focal_loss

# ----------------------------------------------------------------------------------------------------------------
# Arguments (official main.py names and defaults)
# ----------------------------------------------------------------------------------------------------------------


def get_args_parser():
    p = argparse.ArgumentParser("VisTR: video instance segmentation with transformers", add_help=True)
    model = p.add_argument_group("model", "defaults: the official main.py; paper Sec. 3.1, 3.3 and 4.1")
    loss = p.add_argument_group("loss", "defaults: the official main.py and models/matcher.py; paper Sec. 3.2")
    data = p.add_argument_group("data", "defaults: the official main.py, datasets/ytvos.py, datasets/transforms.py "
                                        "and inference.py; paper Sec. 4.1")
    optim = p.add_argument_group("optimisation", "defaults: the official main.py, whose values its authors advise "
                                                 "over the paper's (its issue #27); paper Sec. 4.1")
    run = p.add_argument_group("run", "defaults: the official main.py where it has the flag")
    # optimisation (official defaults; the maintainer says to follow them over the paper, issue #27)
    optim.add_argument("--lr", default=1e-4, type=float)
    optim.add_argument("--lr_backbone", default=1e-5, type=float)
    optim.add_argument("--lr_mask_head", default=0, type=float,
                       help="own lr for the segmentation heads (bbox_attention, mask_head, insmask_head); not in the "
                            "official code; 0 (default): --lr, as official")
    optim.add_argument("--batch_size", default=1, type=int,
                       help="clips per optimizer step and process (official: 1); the model takes one clip at a time, "
                            "so a larger batch runs the clips one after another and averages their gradients")
    optim.add_argument("--weight_decay", default=1e-4, type=float)
    optim.add_argument("--epochs", default=18, type=int)
    optim.add_argument("--lr_drop", default=12, type=int)
    optim.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm")
    model.add_argument("--pretrained_weights", default="",
                       help="DETR checkpoint to start from ('detr.*' keys renamed to 'vistr.*' as "
                            "util/detr_weights_to_vistr.py does; class_embed and query_embed are dropped)")
    # model
    model.add_argument("--backbone", default="resnet101", help="torchvision ResNet (official default resnet101)")
    model.add_argument("--dilation", action="store_true", help="DC5: dilate the last ResNet stage")
    model.add_argument("--position_embedding", default="sine", choices=("sine",))
    model.add_argument("--enc_layers", default=6, type=int)
    model.add_argument("--dec_layers", default=6, type=int)
    model.add_argument("--dim_feedforward", default=2048, type=int)
    model.add_argument("--hidden_dim", default=384, type=int, help="d_model; the mask head is built for 384")
    model.add_argument("--dropout", default=0.1, type=float)
    model.add_argument("--nheads", default=8, type=int)
    model.add_argument("--num_frames", default=36, type=int, help="frames per clip (Sec. 4.1: 36)")
    model.add_argument("--num_queries", default=360, type=int, help="num_frames x instances per frame (36 x 10)")
    model.add_argument("--pre_norm", action="store_true")
    model.add_argument("--num_classes", default=41, type=int,
                       help="YouTube-VIS: 40 categories + index 0 for 'absent in this frame' (issue #27)")
    # loss
    loss.add_argument("--no_aux_loss", dest="aux_loss", action="store_false")
    loss.add_argument("--set_cost_class", default=1, type=float)
    loss.add_argument("--set_cost_bbox", default=5, type=float)
    loss.add_argument("--set_cost_giou", default=2, type=float, help="weight of the (plain) IoU matching cost")
    loss.add_argument("--mask_loss_coef", default=1, type=float)
    loss.add_argument("--dice_loss_coef", default=1, type=float)
    loss.add_argument("--bbox_loss_coef", default=5, type=float)
    loss.add_argument("--giou_loss_coef", default=2, type=float)
    loss.add_argument("--eos_coef", default=0.1, type=float)
    loss.add_argument("--match_valid_frames", default="official", choices=("official", "matched"),
                      help="frames a matched (slot, track) pair is trained on: official = those of the track at the "
                           "pair's position in the assignment (a defect when tracks have absent frames), matched = "
                           "the matched track's own")
    loss.add_argument("--cropped_out", default="official", choices=("official", "absent"),
                      help="a frame where the random crop removes an instance: official = still valid with its label "
                           "and a zero-area box (the official crop removes nothing), absent = as an unannotated frame "
                           "(label 0, box 0, valid 0)")
    # data
    data.add_argument("--data_root", "--ytvos_path", dest="data_root", default="data/synthetic/youtube_vis")
    data.add_argument("--input_size", default=300, type=int,
                      help="short side of the training clips (official R50: 300; all augmentation sizes scale with it)")
    data.add_argument("--no_photometric", dest="photometric", action="store_false",
                      help="skip the per-frame photometric distortion (colour jitter and channel swap) in training")
    data.add_argument("--val_size", default=300, type=int, help="short side at inference (official inference.py)")
    data.add_argument("--holdout_fraction", default=0.1, type=float,
                      help="fraction of train videos (the last ones by id) held out for the local video AP")
    data.add_argument("--holdout_ann", default="",
                      help="instead: a YouTube-VIS JSON (path, or name under --data_root) of held-out videos whose "
                           "frames lie in train/JPEGImages; training then uses all of the train annotations")
    data.add_argument("--clip_stride", default=None, type=int,
                      help="videos longer than --num_frames: a clip every this many frames (default num_frames // 2, "
                           "half-overlapping clips; the official inference reads only the first num_frames frames)")
    data.add_argument("--clip_linking", default="iou", choices=("iou", "slot"),
                      help="how the clips of a longer video join into instance sequences: iou = Hungarian matching on "
                           "the mask IoU over the frames they share; slot = slot s is the same instance in every clip")
    run.add_argument("--image_model", default="",
                     help="with --eval: evaluate this detr.py segmentation checkpoint (--masks) frame by frame instead "
                          "of VisTR, its detections linked from frame to frame by mask IoU (the per-frame baseline)")
    data.add_argument("--eval_split", default="holdout", choices=("holdout", "valid"),
                      help="holdout: local AP on held-out train videos; valid: results.json for the CodaLab server")
    # run
    run.add_argument("--output_dir", default="")
    run.add_argument("--device", default=tu.default_device())
    run.add_argument("--seed", default=42, type=int)
    run.add_argument("--resume", default="")
    run.add_argument("--start_epoch", default=0, type=int)
    run.add_argument("--eval", action="store_true")
    run.add_argument("--num_workers", default=2, type=int)
    tu.add_run_args(run)
    run.add_argument("--checkpoint_activations", action="store_true",
                     help="recompute activations in the backward pass instead of keeping them: each encoder and "
                          "decoder layer, the mask head frame by frame, the 3-D mask conv slot by slot (less memory, "
                          "more compute; not in the official code)")
    run.add_argument("--viz", action="store_true", help="write per-frame mask overlays to OUTPUT_DIR/viz")
    run.add_argument("--max_iters", default=0, type=int, help="stop each epoch after this many clips (0: all)")
    run.add_argument("--print_freq", default=10, type=int)
    return p


# ----------------------------------------------------------------------------------------------------------------
# Model (Sec. 3.1 backbone + transformer, Sec. 3.3 instance sequence segmentation)
# ----------------------------------------------------------------------------------------------------------------


class VisTR(nn.Module):
    """Backbone, 3-D position encoding, DETR transformer and prediction heads (keys `vistr.*` in VisTRsegm)."""

    def __init__(self, backbone, transformer, num_classes, num_frames, num_queries, aux_loss=True):
        super().__init__()
        assert num_queries % num_frames == 0, f"num_queries ({num_queries}) must be a multiple of num_frames"
        self.num_frames, self.num_queries, self.aux_loss = num_frames, num_queries, aux_loss
        hidden_dim = transformer.d_model
        self.backbone = backbone
        self.transformer = transformer
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)


def deform_conv2d_sampled(x, offset, weight, padding):
    """Deformable convolution (stride 1) by bilinear sampling with grid_sample, then one matrix product.

    Tap (i, j) of output pixel (y, x) reads x at (y - padding + i + dy, x - padding + j + dx), where offset channel
    2 * (i * kw + j) is dy and the next one dx (the CUDA DCN's and torchvision's layout). grid_sample with zero
    padding reproduces their border rule (each of the 4 bilinear corners outside the map counts as 0). Used off
    CUDA: torchvision's CPU kernel gives the same numbers but its backward is several times slower.
    """
    n, c, h, w = x.shape
    out_c, _, kh, kw = weight.shape
    dtype = torch.promote_types(x.dtype, torch.float32)  # sampling positions in >= float32, also under --amp
    x = x.to(dtype)
    taps = torch.stack(torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij"), -1).view(-1, 2)
    taps = taps.to(x.device, dtype) - padding  # [k, (i, j)]
    ys = torch.arange(h, device=x.device, dtype=dtype).view(1, 1, h, 1)
    xs = torch.arange(w, device=x.device, dtype=dtype).view(1, 1, 1, w)
    offset = offset.to(dtype).view(n, kh * kw, 2, h, w)
    py = ys + taps[:, 0].view(1, -1, 1, 1) + offset[:, :, 0]  # [N, k, H, W] sampling rows (pixels)
    px = xs + taps[:, 1].view(1, -1, 1, 1) + offset[:, :, 1]
    # pixel -> [-1, 1] for align_corners=False: (p + 0.5) / size * 2 - 1
    grid = torch.stack(((px + 0.5) / w * 2 - 1, (py + 0.5) / h * 2 - 1), -1).view(n, kh * kw * h, w, 2)
    cols = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # [N, C, k*H, W]
    cols = cols.view(n, c * kh * kw, h * w)  # channel-major then tap, as weight.view(O, C * k)
    return (weight.view(out_c, -1) @ cols).view(n, out_c, h, w)


class DeformConv(nn.Module):
    """3x3 deformable convolution without bias (Dai et al. 2017); offsets come from the caller."""

    def __init__(self, in_channels, out_channels, kernel_size=3, padding=1):
        super().__init__()
        self.padding = padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def forward(self, x, offset):
        if x.is_cuda:
            return deform_conv2d(x, offset, self.weight, padding=(self.padding, self.padding))
        return deform_conv2d_sampled(x, offset, self.weight, self.padding)


class MaskHeadSmallConv(detr.MaskHeadSmallConv):
    """DETR's FPN-style mask head (detr.MaskHeadSmallConv: lay1-lay4, gn1-gn4 and the layer3/2/1 adapters, fed with
    the frame's encoder memory and its queries' attention maps) ending, as the official VisTR head, in a 3x3
    deformable conv whose offsets start at zero (conv_offset, dcn without bias) + gn5 and ReLU instead of DETR's
    lay5 and out_lay.

    dim = hidden + heads (392), fpn_dims = widths of layer3, layer2, layer1, context_dim = hidden (384).
    Output: [N, context_dim // 16 (24), h1, w1] per (frame, query), at the size of the layer1 features.
    """

    def __init__(self, dim, fpn_dims, context_dim):
        super().__init__(dim, fpn_dims, context_dim)
        del self.lay5, self.out_lay
        self.conv_offset = nn.Conv2d(context_dim // 8, 18, 1)  # 2 offsets x 9 taps, zero: starts as a plain conv
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)
        self.dcn = DeformConv(context_dim // 8, context_dim // 16, 3, padding=1)

    def forward(self, x, bbox_mask, fpns):
        # x: memory [B, C, h, w]; bbox_mask: [B, n, heads, h, w]; fpns: [B, C_l, H_l, W_l] for layer3, 2, 1
        x = self.fpn_features(x, bbox_mask, fpns)  # [B * n, context_dim // 8, h1, w1]
        return F.relu(self.gn5(self.dcn(x, self.conv_offset(x))))


# parameter-name prefixes of the instance sequence segmentation module (top-level keys of VisTRsegm)
SEGMENTATION_HEADS = ("bbox_attention.", "mask_head.", "insmask_head.")


class VisTRsegm(nn.Module):
    """VisTR with the instance sequence segmentation module (the released models; top-level keys as official).

    checkpoint_activations trades compute for memory: every encoder and decoder layer, the mask head frame by frame
    and the 3-D mask convolution slot by slot keep only their inputs for the backward pass and run again there
    (same numbers; the parameters and their names are unchanged).
    """

    def __init__(self, vistr, checkpoint_activations=False):
        super().__init__()
        self.vistr = vistr
        self.checkpoint_activations = checkpoint_activations
        if checkpoint_activations:  # detr.py's encoder and decoder call their layers: wrap each layer's forward
            for layer in [*vistr.transformer.encoder.layers, *vistr.transformer.decoder.layers]:
                layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
        hidden_dim, nheads = vistr.transformer.d_model, vistr.transformer.nhead
        c = vistr.backbone.num_channels
        self.bbox_attention = MHAttentionMap(hidden_dim, hidden_dim, nheads, dropout=0.0)
        self.mask_head = MaskHeadSmallConv(hidden_dim + nheads, [c // 2, c // 4, c // 8], hidden_dim)
        mid = hidden_dim // 16  # 24 channels per instance and frame
        self.insmask_head = nn.Sequential(  # 3-D convs over (time, y, x), keys 0..9 as official
            nn.Conv3d(mid, 12, 3, padding=2, dilation=2), nn.GroupNorm(4, 12), nn.ReLU(),
            nn.Conv3d(12, 12, 3, padding=2, dilation=2), nn.GroupNorm(4, 12), nn.ReLU(),
            nn.Conv3d(12, 12, 3, padding=2, dilation=2), nn.GroupNorm(4, 12), nn.ReLU(),
            nn.Conv3d(12, 1, 1))

    def forward(self, clip, mask=None):
        """clip: [T, 3, H, W] (one video clip, frames in order); mask: optional [T, H, W] padding (True = pad).

        Returns pred_logits [1, Q, num_classes + 1], pred_boxes [1, Q, 4] (cxcywh in [0, 1]), pred_masks
        [1, Q, h1, w1] (logits), aux_outputs (earlier decoder layers); query q = frame * (Q / T) + slot. The masks
        have the size of the backbone's first feature map (stride `backbone[0].strides[0]`): ceil(H / 4) x
        ceil(W / 4) for every ResNet (DC5 included: dilation changes only layer4), ceil(H / 2) x ceil(W / 2) for
        convstem.
        """
        v = self.vistr
        T, n = v.num_frames, v.num_queries // v.num_frames
        if clip.dim() != 4 or clip.shape[0] != T:
            raise ValueError(f"VisTR expects one clip [num_frames={T}, 3, H, W], got {tuple(clip.shape)}")
        if mask is None:
            mask = torch.zeros((T, *clip.shape[-2:]), dtype=torch.bool, device=clip.device)
        features, pos = v.backbone(NestedTensor(clip, mask))  # frames stacked in the batch; layer1..layer4
        src, src_mask = features[-1].decompose()
        src_proj = v.input_proj(src)  # [T, C, h, w]
        _, c, h, w = src_proj.shape
        # the whole clip is one sequence of T*h*w tokens: [1, C, T, h*w]
        src_proj = src_proj.reshape(1, T, c, h, w).permute(0, 2, 1, 3, 4).flatten(-2)
        seq_mask = src_mask.reshape(1, T, h * w)
        pos = pos[-1].permute(0, 2, 1, 3, 4).flatten(-2)  # [1, T, C, h, w] -> [1, C, T, h*w]
        hs, memory = v.transformer(src_proj, seq_mask, v.query_embed.weight, pos)  # [L, 1, Q, C], [1, C, T, h*w]
        outputs_class = v.class_embed(hs)
        outputs_coord = v.bbox_embed(hs).sigmoid()
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if v.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]
        # Sec. 3.3: per frame, the frame's n queries attend to the frame's encoder memory
        hs_frames = hs[-1].reshape(T, n, c)  # frame-major queries
        memory_frames = memory[0].permute(1, 0, 2).reshape(T, c, h, w)
        bbox_mask = self.bbox_attention(hs_frames, memory_frames, mask=src_mask)  # [T, n, heads, h, w]
        fpns = [features[2].tensors, features[1].tensors, features[0].tensors]  # layer3, layer2, layer1 per frame
        if self.checkpoint_activations and torch.is_grad_enabled():
            seg = torch.cat([checkpoint(self.mask_head, memory_frames[t:t + 1], bbox_mask[t:t + 1],
                                        [f[t:t + 1] for f in fpns], use_reentrant=False) for t in range(T)])
        else:
            seg = self.mask_head(memory_frames, bbox_mask, fpns)  # [T * n, 24, h1, w1]
        # instance level: a 3-D conv over each slot's mask features across the T frames
        seg = seg.view(T, n, *seg.shape[1:]).permute(1, 2, 0, 3, 4)  # [n, 24, T, h1, w1]
        if self.checkpoint_activations and torch.is_grad_enabled():
            masks = torch.cat([checkpoint(self.insmask_head, seg[s:s + 1], use_reentrant=False)
                               for s in range(n)])[:, 0]
        else:
            masks = self.insmask_head(seg)[:, 0]  # [n, T, h1, w1]
        out["pred_masks"] = masks.transpose(0, 1).reshape(1, v.num_queries, *masks.shape[-2:])
        return out


def build_model(args):
    if args.hidden_dim % 3 or (args.hidden_dim // 16) % 8 or args.hidden_dim % args.nheads:
        raise ValueError(f"--hidden_dim {args.hidden_dim}: the 3-D position encoding needs a multiple of 3 and the "
                         "mask head's GroupNorms a multiple of 128 (official: 384)")
    train_backbone = args.lr_backbone > 0
    body = Backbone(args.backbone, train_backbone, True, args.dilation)  # layer1..layer4 for the mask head
    backbone = Joiner(body, PositionEmbeddingSine3D(args.hidden_dim // 3, num_frames=args.num_frames, normalize=True))
    backbone.num_channels = body.num_channels
    transformer = Transformer(d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
                              num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward,
                              dropout=args.dropout, normalize_before=args.pre_norm, return_intermediate_dec=True)
    vistr = VisTR(backbone, transformer, args.num_classes, args.num_frames, args.num_queries, args.aux_loss)
    return VisTRsegm(vistr, args.checkpoint_activations)


# ----------------------------------------------------------------------------------------------------------------
# Instance sequence matching and losses (Sec. 3.2)
# ----------------------------------------------------------------------------------------------------------------


def elementwise_box_iou(boxes1, boxes2, eps=1e-6):
    """IoU of xyxy boxes, broadcast elementwise ([..., 4] each); eps as the official `multi_iou`."""
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area1 = (boxes1[..., 2:] - boxes1[..., :2]).prod(-1)
    area2 = (boxes2[..., 2:] - boxes2[..., :2]).prod(-1)
    union = area1 + area2 - inter
    return (inter + eps) / (union + eps), union


def elementwise_giou(boxes1, boxes2, eps=1e-6):
    """Generalized IoU of paired xyxy boxes [N, 4] with VisTR's eps (its box_ops adds 1e-6 to both ratios)."""
    iou, union = elementwise_box_iou(boxes1, boxes2, eps)
    lt = torch.min(boxes1[:, :2], boxes2[:, :2])
    rb = torch.max(boxes1[:, 2:], boxes2[:, 2:])
    area = (rb - lt).clamp(min=0).prod(-1)
    return iou - (area - union + eps) / (area + eps)


class HungarianMatcher(nn.Module):
    """Instance sequence matching (Eq. 2-3): one query slot across all T frames <-> one ground-truth track.

    outputs: pred_logits [B, Q, C+1], pred_boxes [B, Q, 4] with Q = T * n (frame-major).
    targets: per clip, labels [K*T], boxes [K*T, 4] cxcywh, valid [K*T] (instance-major: index k * T + t;
    absent frames have label 0 and box 0). Cost of slot s vs track k, averaged over the T frames (absent frames
    included, as the official code):
        C = cost_class * -mean_t p_st(c_kt) + cost_bbox * mean_t,coord |b_st - b_kt| + cost_giou * -mean_t IoU
    (plain IoU with eps 1e-6, not GIoU, though it is weighted by cost_giou). Returns per clip (src, tgt) int64
    indices over valid frames only: src = t * n + s, tgt = k * T + t, pair by pair in scipy's order.
    """

    def __init__(self, num_frames, cost_class=1.0, cost_bbox=1.0, cost_giou=1.0, valid_frames="official"):
        super().__init__()
        assert cost_class != 0 or cost_bbox != 0 or cost_giou != 0, "all matching costs are 0"
        assert valid_frames in ("official", "matched"), valid_frames
        self.num_frames, self.cost_class, self.cost_bbox, self.cost_giou = num_frames, cost_class, cost_bbox, cost_giou
        self.valid_frames = valid_frames

    @torch.no_grad()
    def forward(self, outputs, targets):
        T = self.num_frames
        indices = []
        for logits, boxes, tgt in zip(outputs["pred_logits"], outputs["pred_boxes"], targets):
            n = logits.shape[0] // T  # slots per frame (the official code hard-codes 10)
            k = len(tgt["labels"]) // T
            empty = torch.zeros(0, dtype=torch.int64, device=logits.device)
            if k == 0:
                indices.append((empty, empty.clone()))
                continue
            prob = logits.float().softmax(-1).reshape(T, n, -1).permute(1, 0, 2)  # [n, T, C+1]
            out_bbox = boxes.float().reshape(T, n, 4).permute(1, 0, 2).unsqueeze(1)  # [n, 1, T, 4]
            tgt_bbox = tgt["boxes"].reshape(k, T, 4).unsqueeze(0)  # [1, K, T, 4]
            frame_index = torch.arange(T, device=logits.device).repeat(k)
            cost_class = -prob[:, frame_index, tgt["labels"]].view(n, k, T).mean(-1)
            cost_bbox = (out_bbox - tgt_bbox).abs().mean((-1, -2))
            cost_iou = -elementwise_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))[0].mean(-1)
            cost = self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_iou
            cost = cost.cpu()
            if not torch.isfinite(cost).all():
                raise ValueError("VisTR matching cost holds NaN/Inf: the predictions are not finite "
                                 "(training diverged? lower --lr or disable --amp)")
            slots, tracks = linear_sum_assignment(cost.numpy())
            valid = tgt["valid"].reshape(k, T)
            src, dst = [], []
            for j, (s, kk) in enumerate(zip(slots, tracks)):
                # The official code takes the valid frames of track j (the pair's position in scipy's order), not
                # of the matched track kk; identical whenever every frame is valid. Otherwise the pair is trained
                # on the frames where another track is present: label 0 and box 0 where its own track is absent,
                # nothing where only its own track is present. Kept by default for parity with the released
                # training; valid_frames="matched" (--match_valid_frames matched) takes track kk's own frames.
                frames = valid[j if self.valid_frames == "official" else kk].nonzero().flatten()
                src.append(frames * n + int(s))
                dst.append(frames + int(kk) * T)
            indices.append((torch.cat(src).long(), torch.cat(dst).long()))
        return indices


class SetCriterion(detr.SetCriterion):
    """DETR's set loss on matched instance sequences (Eq. 4): CE + L1 + GIoU, plus focal + dice on masks.

    Labels and cardinality are DETR's. Every aux decoder layer is re-matched with the sequence matcher and gets the
    labels/boxes/cardinality losses (suffix _i), not the mask losses. num_boxes counts every target frame, absent
    ones included (official).
    """

    def match_all(self, outputs, targets):
        """Sequence-matcher indices for the final layer, then each aux layer."""
        return [self.matcher(layer, targets) for layer in [outputs] + outputs.get("aux_outputs", [])]

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        src_boxes = outputs["pred_boxes"][self._src_permutation_idx(indices)]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        giou = elementwise_giou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes))
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": (1 - giou).sum() / num_boxes}

    def loss_masks(self, outputs, targets, indices, num_boxes):
        src_masks = outputs["pred_masks"][self._src_permutation_idx(indices)]  # [N, h1, w1]
        target_masks = torch.cat([t["masks"][j] for t, (_, j) in zip(targets, indices)]).to(src_masks)
        if src_masks.numel() == 0:
            zero = outputs["pred_masks"].sum() * 0
            return {"loss_mask": zero, "loss_dice": zero}
        src_masks = F.interpolate(src_masks[:, None], size=target_masks.shape[-2:], mode="bilinear",
                                  align_corners=False)[:, 0].flatten(1)
        target_masks = target_masks.flatten(1)
        return {"loss_mask": sigmoid_focal_loss(src_masks, target_masks, num_boxes),
                "loss_dice": dice_loss(src_masks, target_masks, num_boxes)}


def build_criterion(args):
    matcher = HungarianMatcher(args.num_frames, args.set_cost_class, args.set_cost_bbox, args.set_cost_giou,
                               args.match_valid_frames)
    weight_dict = {"loss_ce": 1, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef,
                   "loss_mask": args.mask_loss_coef, "loss_dice": args.dice_loss_coef}
    if args.aux_loss:
        weight_dict.update({f"{k}_{i}": v for i in range(args.dec_layers - 1) for k, v in list(weight_dict.items())})
    return SetCriterion(args.num_classes, matcher, weight_dict, args.eos_coef,
                        ["labels", "boxes", "cardinality", "masks"])


# ----------------------------------------------------------------------------------------------------------------
# Data: YouTube-VIS 2019 (Sec. 4.1)
# ----------------------------------------------------------------------------------------------------------------


def segmentation_to_rle(segm, height, width, where):
    """A per-frame YouTube-VIS segmentation (polygons, uncompressed or compressed RLE) -> compressed RLE."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [height, width]:
            raise ValueError(f"{where}: segmentation of size {segm['size']}, but the video is {height}x{width}")
        rle = mask_utils.frPyObjects(segm, height, width) if isinstance(segm["counts"], list) else dict(segm)
    else:
        raise ValueError(f"{where}: a segmentation must be polygons or RLE, got {type(segm).__name__}")
    if isinstance(rle["counts"], str):
        rle["counts"] = rle["counts"].encode("ascii")
    return rle


def decode_segmentation(segm, height, width, where):
    if not segm:
        return np.zeros((height, width), dtype=np.uint8)
    return mask_utils.decode(segmentation_to_rle(segm, height, width, where))


def load_ytvis(ann_file, num_classes=None):
    """Read a YouTube-VIS JSON ({videos, annotations, categories}) and check what the loaders rely on."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"YouTube-VIS annotations not found: {ann_file}")
    try:
        data = json.loads(ann_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{ann_file}: not a YouTube-VIS JSON file ({error})") from None
    for key in ("videos", "categories"):
        if not isinstance(data, dict) or key not in data:
            raise ValueError(f"{ann_file}: not a YouTube-VIS file (no '{key}')")
    lengths = {v["id"]: len(v["file_names"]) for v in data["videos"]}
    sizes = {v["id"]: [v["height"], v["width"]] for v in data["videos"]}
    for ann in data.get("annotations", []):
        where = f"{ann_file}: annotation {ann.get('id')}"
        if ann["video_id"] not in lengths:
            raise ValueError(f"{where} refers to video {ann['video_id']}, which is not in 'videos'")
        if num_classes is not None and not 1 <= ann["category_id"] < num_classes:
            raise ValueError(f"{where} has category_id {ann['category_id']}, outside 1..{num_classes - 1} "
                             f"(--num_classes {num_classes}; index 0 is reserved for absent frames)")
        for key in ("segmentations", "bboxes"):
            if len(ann[key]) != lengths[ann["video_id"]]:
                raise ValueError(f"{where}: {len(ann[key])} {key} for a video of {lengths[ann['video_id']]} frames")
        for t, segm in enumerate(ann["segmentations"]):
            if isinstance(segm, dict) and list(segm.get("size", [])) != sizes[ann["video_id"]]:
                raise ValueError(f"{where}, frame {t}: segmentation of size {segm.get('size')}, but the video is "
                                 f"{sizes[ann['video_id']][0]}x{sizes[ann['video_id']][1]} (height x width)")
    return data


def split_videos(data, holdout_fraction):
    """Sorted video ids -> (train ids, held-out ids): the last round(fraction * N) videos (at least 1) held out."""
    ids = sorted(v["id"] for v in data["videos"])
    if holdout_fraction <= 0:
        return ids, []
    k = min(len(ids) - 1, max(1, round(holdout_fraction * len(ids))))
    return ids[:len(ids) - k], ids[len(ids) - k:]


def find_split(root, split):
    """(JPEGImages folder, annotation file) of a YouTube-VIS split under `root`, in either known layout."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data_root {root} does not exist (expected YouTube-VIS: train.json, "
                                "train/JPEGImages/<video>/*.jpg)")
    folder = {"train": "train", "valid": "valid"}[split]
    official = root / "annotations" / f"instances_{'train' if split == 'train' else 'val'}_sub.json"
    candidates = [root / f"{split}.json", official]
    for ann in candidates:
        if ann.is_file():
            return root / folder / "JPEGImages", ann
    raise FileNotFoundError(f"no {split} annotations under {root}: looked for " + ", ".join(map(str, candidates)))


def load_frame(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"frame missing on disk: {path}")
    try:
        return Image.open(path).convert("RGB")
    except OSError as error:
        raise OSError(f"cannot read frame {path}: {error}") from error


class YTVOSDataset(torch.utils.data.Dataset):
    """Training clips: one sample per (video, frame); the clip is the num_frames frames ending at that frame.

    As the official loader, frame indices wrap around the video (Python negative indexing), so a video shorter
    than num_frames is repeated. Targets are instance-major (index k * T + t); a frame where instance k is absent
    gets label 0, box 0, an empty mask and valid 0.
    """

    def __init__(self, img_folder, data, video_ids, num_frames, transforms):
        self.img_folder, self.num_frames, self.transforms = Path(img_folder), num_frames, transforms
        keep = set(video_ids)
        self.videos = [v for v in data["videos"] if v["id"] in keep]
        anns = {}
        for ann in data.get("annotations", []):
            if not ann.get("iscrowd", 0):
                anns.setdefault(ann["video_id"], []).append(ann)
        self.anns = anns
        self.samples = [(i, f) for i, v in enumerate(self.videos) for f in range(len(v["file_names"]))]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, idx):
        vid, frame_id = self.samples[idx]
        video = self.videos[vid]
        vid_len = len(video["file_names"])
        inds = [i % vid_len for i in range(self.num_frames)][::-1]
        frames = [(frame_id - i) % vid_len for i in inds]
        clip = [load_frame(self.img_folder / video["file_names"][f]) for f in frames]
        w, h = clip[0].size
        if (h, w) != (video["height"], video["width"]):
            raise ValueError(f"video {video['id']}: frame {video['file_names'][frames[0]]} is {h}x{w}, "
                             f"the annotation says {video['height']}x{video['width']}")
        boxes, labels, valid, masks = [], [], [], []
        for ann in self.anns.get(video["id"], []):
            for f in frames:
                box = ann["bboxes"][f]
                present = box is not None
                boxes.append(box if present else [0, 0, 0, 0])
                labels.append(ann["category_id"] if present else 0)
                valid.append(int(present))
                where = f"video {video['id']} annotation {ann.get('id')} frame {f}"
                masks.append(torch.from_numpy(decode_segmentation(ann["segmentations"][f], h, w, where)))
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy, clamped to the frame
        boxes[:, 0::2].clamp_(min=0, max=w)
        boxes[:, 1::2].clamp_(min=0, max=h)
        target = {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64),
                  "valid": torch.tensor(valid, dtype=torch.int64),
                  "masks": torch.stack(masks) if masks else torch.zeros((0, h, w), dtype=torch.uint8),
                  "orig_size": torch.tensor([h, w]), "size": torch.tensor([h, w])}
        clip, target = self.transforms(clip, target)
        return clip, target


# The official clip transforms (datasets/transforms.py): one random draw per clip for geometry, per frame for colour


def resize_clip(clip, target, size, max_size=None):
    """Short side -> size (long side capped at max_size; detr.resized_shape's rule), boxes scaled, masks nearest, as
    DETR's resize."""
    w, h = clip[0].size
    oh, ow = detr.resized_shape((w, h), size, max_size)
    clip = [TF.resize(im, [oh, ow]) for im in clip]
    if target is not None:
        target = dict(target)
        target["boxes"] = target["boxes"] * torch.tensor([ow / w, oh / h, ow / w, oh / h])
        if len(target["masks"]):
            target["masks"] = F.interpolate(target["masks"][:, None].float(), (oh, ow), mode="nearest")[:, 0] > 0.5
        else:
            target["masks"] = torch.zeros((0, oh, ow), dtype=torch.bool)
        target["size"] = torch.tensor([oh, ow])
    return clip, target


def crop_clip(clip, target, region, cropped_out="official"):
    """Crop every frame to region (top, left, height, width); boxes are shifted and clamped, masks cut.

    An instance that the crop removes from a frame (its clamped box has no area, or no mask pixel is left):
    cropped_out "official" keeps it valid there with its label and a zero-area box, as the official transforms.crop
    (nothing is removed), so the loss trains a query towards a degenerate box and an empty mask for that frame;
    "absent" marks it as in an unannotated frame (label 0, box 0, valid 0).
    """
    i, j, h, w = region
    clip = [TF.crop(im, i, j, h, w) for im in clip]
    target = dict(target)
    boxes = torch.min((target["boxes"] - torch.tensor([j, i, j, i])).reshape(-1, 2, 2),
                      torch.tensor([w, h], dtype=torch.float32)).clamp(min=0)
    target["boxes"] = boxes.reshape(-1, 4)
    target["masks"] = target["masks"][:, i:i + h, j:j + w]
    target["size"] = torch.tensor([h, w])
    if cropped_out == "absent":
        gone = (boxes[:, 1] <= boxes[:, 0]).any(1) | (target["masks"].flatten(1) == 0).all(1)
        gone &= target["valid"].bool()
        target["boxes"] = target["boxes"].masked_fill(gone[:, None], 0)
        target["labels"] = target["labels"].masked_fill(gone, 0)
        target["valid"] = target["valid"].masked_fill(gone, 0)
    elif cropped_out != "official":
        raise ValueError(f"cropped_out {cropped_out!r}: expected 'official' or 'absent'")
    return clip, target


def hflip_clip(clip, target):
    w = clip[0].size[0]
    target = dict(target)
    target["boxes"] = target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([w, 0, w, 0])
    target["masks"] = target["masks"].flip(-1)
    return [TF.hflip(im) for im in clip], target


def photometric_distort(img):
    """SSD-style colour jitter on one frame: brightness, contrast, saturation, hue (random order), channel swap."""
    x = TF.to_tensor(img)
    if random.random() < 0.5:
        x = x + random.uniform(-32, 32) / 255
    contrast_first = random.random() < 0.5

    def contrast(x):
        return x * random.uniform(0.5, 1.5) if random.random() < 0.5 else x

    if contrast_first:
        x = contrast(x)
    x = x.clamp(0, 1)
    if random.random() < 0.5:
        x = TF.adjust_saturation(x, random.uniform(0.5, 1.5))
    if random.random() < 0.5:
        x = TF.adjust_hue(x, random.uniform(-18, 18) / 360)
    if not contrast_first:
        x = contrast(x)
    if random.random() < 0.5:
        x = x[torch.randperm(3)]
    return TF.to_pil_image(x.clamp(0, 1))


IMAGENET_MEAN, IMAGENET_STD = detr.IMAGENET_MEAN, detr.IMAGENET_STD  # one copy of the constants


def to_model_input(clip, target=None):
    """Frames -> [T, 3, H, W] ImageNet-normalised; boxes xyxy (pixels) -> cxcywh / (w, h)."""
    x = torch.stack([TF.normalize(TF.to_tensor(im), IMAGENET_MEAN, IMAGENET_STD) for im in clip])
    if target is not None:
        h, w = x.shape[-2:]
        target = dict(target)
        target["boxes"] = box_xyxy_to_cxcywh(target["boxes"]) / torch.tensor([w, h, w, h], dtype=torch.float32)
        target["masks"] = target["masks"].to(torch.uint8)
    return x, target


class TrainTransform:
    """Official R50 training augmentation, every size scaled by input_size / 300: flip, resize 480..768 (max 800),
    photometric jitter (skipped if not photometric), resize 400/500/600, random crop 384..600, resize to 300 (max
    540), normalise."""

    def __init__(self, input_size=300, photometric=True, cropped_out="official"):
        self.photometric, self.cropped_out = photometric, cropped_out
        s = input_size / 300
        self.scales = [round(x * s) for x in range(480, 769, 32)]
        self.max_size, self.crop_scales = round(800 * s), [round(400 * s), round(500 * s), round(600 * s)]
        self.crop_min, self.crop_max = round(384 * s), round(600 * s)
        self.final_size, self.final_max = input_size, round(540 * s)

    def __call__(self, clip, target):
        if random.random() < 0.5:
            clip, target = hflip_clip(clip, target)
        clip, target = resize_clip(clip, target, random.choice(self.scales), self.max_size)
        if self.photometric:
            clip = [photometric_distort(im) for im in clip]
        clip, target = resize_clip(clip, target, random.choice(self.crop_scales))
        w, h = clip[0].size
        cw = random.randint(self.crop_min, min(w, self.crop_max))
        ch = random.randint(self.crop_min, min(h, self.crop_max))
        region = (random.randint(0, h - ch), random.randint(0, w - cw), ch, cw)
        clip, target = crop_clip(clip, target, region, self.cropped_out)
        clip, target = resize_clip(clip, target, self.final_size, self.final_max)
        return to_model_input(clip, target)


def collate_clips(batch):
    """A list of (clip, target): clips differ in size, and the model takes one at a time."""
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Inference on whole videos (official inference.py) and the YouTube-VIS results JSON
# ----------------------------------------------------------------------------------------------------------------


def encode_mask(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def clip_starts(length, num_frames, stride):
    """First frame of every clip of a video: one clip if the video is not longer than num_frames, else one every
    `stride` frames, the last one ending at the video's last frame."""
    if length <= num_frames:
        return [0]
    starts = list(range(0, length - num_frames + 1, stride))
    if starts[-1] + num_frames < length:
        starts.append(length - num_frames)
    return starts


def mask_iou_matrix(a, b):
    """Mask IoU of every pair of two sets of instance sequences, summed over frames: a [t, n, h, w], b [t, m, h, w]
    (bool) -> [n, m] = sum_t |a_t n b_t| / sum_t |a_t u b_t| (0 where both are empty)."""
    a, b = a.flatten(2).float(), b.flatten(2).float()
    inter = torch.einsum("tnp,tmp->nm", a, b)
    union = a.sum((0, 2))[:, None] + b.sum((0, 2))[None] - inter
    return inter / union.clamp(min=1)


def link_clips(clips, length, linking="iou"):
    """Join per-clip instance predictions into whole-video instance sequences.

    clips: (frame indices [t], class probabilities [t, n, C], mask logits [t, n, h, w]) per clip, in video order;
    each clip predicts the same number n of instance slots. The first clip's slots start n sequences. Each later
    clip's slots are assigned to them one to one: linking "iou" by the Hungarian algorithm on the mask IoU (masks =
    logits > 0) summed over the frames the clip shares with the earlier clips, or, if it shares none, between the
    sequences' last frame before the clip and the clip's first frame; linking "slot" keeps slot s as sequence s in
    every clip (correct only if the model orders its slots alike in every clip). A frame that several clips cover
    gets the mean of their probabilities and mask logits. Returns probabilities [length, n, C] and mask logits
    [length, n, h, w].
    """
    if linking not in ("iou", "slot"):
        raise ValueError(f"clip linking {linking!r}: expected 'iou' or 'slot'")
    _, first_prob, first_logits = clips[0]
    n = first_prob.shape[1]
    prob_sum = first_prob.new_zeros(length, n, first_prob.shape[-1])
    logit_sum = first_logits.new_zeros(length, n, *first_logits.shape[-2:])
    count = torch.zeros(length)
    for frames, prob, logits in clips:
        frames = torch.as_tensor(frames)
        shared = count[frames] > 0
        if linking == "iou" and count.any():
            if shared.any():
                ref = frames[shared]
                ours = logits[shared] > 0
            else:  # no overlap: the last frame before the clip against the clip's first frame
                ref = frames[:1] - 1
                ours = logits[:1] > 0
            mean = logit_sum[ref] / count[ref].view(-1, 1, 1, 1)
            iou = mask_iou_matrix(mean > 0, ours)  # [sequence, slot]
            sequences, slots = linear_sum_assignment(-iou.numpy())
            order = torch.as_tensor(slots[np.argsort(sequences)])  # the slot that continues sequence i
            prob, logits = prob[:, order], logits[:, order]
        prob_sum[frames] += prob
        logit_sum[frames] += logits
        count[frames] += 1
    count = count.clamp(min=1)
    return prob_sum / count.view(-1, 1, 1), logit_sum / count.view(-1, 1, 1, 1)


@torch.no_grad()
def infer_video(model, frames, video_id, num_frames, val_size, device, amp=False, clip_stride=None,
                clip_linking="iou"):
    """Predict every instance of one video -> list of {video_id, score, category_id, segmentations}.

    As the official inference.py for a video of up to num_frames frames: one clip, a shorter video repeated
    cyclically. A longer video is cut into clips of num_frames frames, one every clip_stride frames (default
    num_frames // 2, half-overlapping), the last one ending at the last frame, and their instance slots are joined
    into whole-video sequences by `link_clips` (clip_linking "iou": Hungarian on mask IoU; "slot": slot s is the same
    instance in every clip). The official code reads only the first num_frames frames of a longer video. Per
    sequence: score = mean over frames of the best class probability; category = the majority vote of per-frame
    argmax; masks = sigmoid(bilinear upsampling of the logits to the original size) > 0.5; a frame whose score is
    below 0.001 gets no mask (None); sequences whose masks are empty in every frame are dropped.
    """
    length = len(frames)
    w0, h0 = frames[0].size
    stride = clip_stride or max(1, num_frames // 2)
    x, _ = to_model_input(resize_clip(frames, None, val_size)[0])
    clips = []
    for start in clip_starts(length, num_frames, stride):
        keep = min(num_frames, length - start)
        idx = [start + i % keep for i in range(num_frames)]
        with tu.amp_autocast(device, amp):
            out = model(x[idx].to(device))
        logits, masks = out["pred_logits"][0].float(), out["pred_masks"][0].float()
        n = logits.shape[0] // num_frames
        prob = logits.softmax(-1)[:, :-1].reshape(num_frames, n, -1)[:keep]  # [t, n, C]
        clips.append((idx[:keep], prob.cpu(), masks.reshape(num_frames, n, *masks.shape[-2:])[:keep].cpu()))
    return video_results(*link_clips(clips, length, clip_linking), video_id, (h0, w0))


def video_results(probs, mask_logits, video_id, size):
    """Per-frame class probabilities [L, n, C] and mask logits [L, n, h, w] of n instance sequences -> the
    YouTube-VIS results of one video (official inference.py: mean best probability, majority category, masks
    upsampled bilinearly to `size` and thresholded at 0.5, no mask where a frame's score < 0.001, empty sequences
    dropped)."""
    scores, labels = probs.max(-1)
    rles, nonempty = [], torch.zeros(probs.shape[1], dtype=torch.bool)
    for t in range(len(probs)):
        masks = F.interpolate(mask_logits[t][None], size, mode="bilinear", align_corners=False)[0].sigmoid() > 0.5
        nonempty |= masks.flatten(1).any(1)
        masks = masks.numpy()
        rles.append([encode_mask(m) if s >= 0.001 else None for m, s in zip(masks, scores[t].tolist())])
    results = []
    for s in range(probs.shape[1]):
        if not nonempty[s]:
            continue
        results.append({"video_id": video_id, "score": float(scores[:, s].mean()),
                        "category_id": int(np.bincount(labels[:, s].numpy()).argmax()),
                        "segmentations": [rles[t][s] for t in range(len(probs))]})
    return results


def load_image_model(path, categories, device):
    """The per-frame baseline's image model: a detr.py segmentation checkpoint (trained with --masks), and for every
    video class index 0..max id the index of the image model's class of the same name (-1: none). The image
    model's class names come from the COCO annotations it was trained on (its checkpoint's --coco_path)."""
    ckpt = tu.load_checkpoint(path)
    image_args = ckpt.get("args")
    if isinstance(image_args, dict):  # checkpoints store args as a plain dict
        image_args = argparse.Namespace(**image_args)
    if "model" not in ckpt or not getattr(image_args, "masks", False):
        raise SystemExit(f"--image_model {path}: expected a detr.py checkpoint trained with --masks")
    image_args.frozen_weights, image_args.pretrained_backbone = None, ""  # the checkpoint holds every weight
    model = detr.build(image_args)[0].to(device).eval()
    tu.load_model_state(model, ckpt["model"], path)
    ann = Path(image_args.coco_path) / "annotations" / "instances_train2017.json"
    if not ann.is_file():
        raise SystemExit(f"--image_model {path}: its class names come from {ann}, which is missing")
    image_classes = {c["name"]: c["id"] for c in json.loads(ann.read_text())["categories"]}
    names = {c["id"]: c["name"] for c in categories}
    class_map = torch.tensor([image_classes.get(names.get(i), -1) for i in range(max(names) + 1)], device=device)
    if (class_map < 0).all():
        raise SystemExit(f"--image_model {path}: none of its classes ({', '.join(image_classes)}) is a video class")
    return model, class_map


@torch.no_grad()
def infer_video_per_frame(model, class_map, frames, video_id, val_size, device, amp=False):
    """The per-frame baseline (an image segmentation model, no temporal modelling): the image model's detections
    on every frame alone, joined into sequences by `link_clips` with one-frame clips (frame t's detections against
    the sequences' masks at frame t - 1, Hungarian on mask IoU), then scored as VisTR's (`video_results`). Class
    probabilities are the image model's, read at the classes of the same name (0 for video classes it lacks)."""
    w0, h0 = frames[0].size
    x, _ = to_model_input(resize_clip(frames, None, val_size)[0])
    clips = []
    for t in range(len(frames)):
        with tu.amp_autocast(device, amp):
            out = model(x[t:t + 1].to(device))
        prob = out["pred_logits"][0].float().softmax(-1)[:, class_map.clamp(min=0)]
        prob = prob.masked_fill(class_map < 0, 0)  # [Q, video classes]
        clips.append(([t], prob[None].cpu(), out["pred_masks"][0, None].float().cpu()))
    return video_results(*link_clips(clips, len(frames)), video_id, (h0, w0))


# ----------------------------------------------------------------------------------------------------------------
# Local evaluation: video mask AP with spatio-temporal IoU (the YouTube-VIS metric), built on COCOeval
# ----------------------------------------------------------------------------------------------------------------


def sequence_iou(dt_seq, gt_seq):
    """Spatio-temporal mask IoU of two tracks (RLE or None per frame): sum_t |D_t n G_t| / sum_t |D_t u G_t|."""
    if len(dt_seq) != len(gt_seq):
        raise ValueError(f"a predicted track has {len(dt_seq)} frames, the ground truth {len(gt_seq)}")
    inter = union = 0.0
    for d, g in zip(dt_seq, gt_seq):
        if d and g:
            i = float(mask_utils.area(mask_utils.merge([d, g], intersect=True)))
            inter += i
            union += float(mask_utils.area(d)) + float(mask_utils.area(g)) - i
        elif d or g:
            union += float(mask_utils.area(d or g))
    return inter / union if union > 0 else 0.0


class VideoCOCOeval(COCOeval):
    """COCOeval with a video as the 'image' and an instance track as the 'annotation'.

    Only the IoU changes (spatio-temporal, as youtubevos/cocoapi's YTVOSeval); matching, the 101-point AP over
    IoU 0.50:0.95, area ranges (on the track's mean per-frame area) and summarize() are COCO's own. Built with
    iouType 'bbox' only so that COCOeval does not rasterise per-image 'segmentation' fields; the IoU is on masks.
    """

    def computeIoU(self, vid, cat):
        p = self.params
        if p.useCats:
            gt, dt = self._gts[vid, cat], self._dts[vid, cat]
        else:
            gt = [g for c in p.catIds for g in self._gts[vid, c]]
            dt = [d for c in p.catIds for d in self._dts[vid, c]]
        if len(gt) == 0 and len(dt) == 0:
            return []
        order = np.argsort([-d["score"] for d in dt], kind="mergesort")
        dt = [dt[i] for i in order][:p.maxDets[-1]]
        ious = np.zeros((len(dt), len(gt)))
        for i, d in enumerate(dt):
            for j, g in enumerate(gt):
                ious[i, j] = sequence_iou(d["segmentations"], g["segmentations"])
        return ious


def frame_mask_iou(results):
    """Mean mask IoU between the predicted instances of one frame, over every pair of them in every frame of every
    video (the collapse diagnostic: near 1 when every slot predicts the same mask); None without pairs."""
    ious, by_video = [], {}
    for r in results:
        by_video.setdefault(r["video_id"], []).append(r["segmentations"])
    for tracks in by_video.values():
        for t in range(len(tracks[0])):
            rles = [dict(s, counts=s["counts"].encode("ascii")) for s in (track[t] for track in tracks) if s]
            if len(rles) > 1:
                iou = np.asarray(mask_utils.iou(rles, rles, [0] * len(rles)))
                ious += iou[np.triu_indices(len(rles), 1)].tolist()
    return float(np.mean(ious)) if ious else None


COCO_STATS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def _track(ann, rles, ann_id):
    areas = [float(mask_utils.area(r)) for r in rles if r]
    return dict(ann, id=ann_id, segmentations=rles, area=float(np.mean(areas)) if areas else 0.0,
                iscrowd=ann.get("iscrowd", 0), bbox=[0, 0, 0, 0])


def video_ap(data, results, video_ids):
    """COCO-style video mask AP (percent, COCO's 12 numbers) of `results` on the given videos of `data`."""
    keep = set(video_ids)
    videos = [v for v in data["videos"] if v["id"] in keep]
    images = [{"id": v["id"], "height": v["height"], "width": v["width"]} for v in videos]
    sizes = {v["id"]: (v["height"], v["width"]) for v in videos}
    gts = []
    for ann in data.get("annotations", []):
        if ann["video_id"] in keep:
            h, w = sizes[ann["video_id"]]
            rles = [segmentation_to_rle(s, h, w, f"annotation {ann.get('id')}") if s else None
                    for s in ann["segmentations"]]
            gts.append(_track(dict(ann, image_id=ann["video_id"]), rles, len(gts) + 1))
    dts = []
    for r in results:
        if r["video_id"] in keep:
            rles = [dict(s, counts=s["counts"].encode("ascii") if isinstance(s["counts"], str) else s["counts"])
                    if s else None for s in r["segmentations"]]
            dts.append(_track(dict(r, image_id=r["video_id"]), rles, len(dts) + 1))
    if not gts:
        raise ValueError("video_ap: the evaluated videos have no ground-truth instances")
    coco_gt, coco_dt = COCO(), COCO()
    coco_gt.dataset = {"images": images, "annotations": gts, "categories": data["categories"]}
    coco_dt.dataset = {"images": images, "annotations": dts, "categories": data["categories"]}
    coco_gt.createIndex()
    coco_dt.createIndex()
    evaluator = VideoCOCOeval(coco_gt, coco_dt, iouType="bbox")
    evaluator.params.imgIds = sorted(keep)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    # COCO's -1 (no ground truth in that area range) becomes None (null in eval.json)
    return {name: 100.0 * float(v) if v >= 0 else None for name, v in zip(COCO_STATS, evaluator.stats)}


# ----------------------------------------------------------------------------------------------------------------
# Visualisation: per-frame mask overlays
# ----------------------------------------------------------------------------------------------------------------

COLORS = np.array([[0, 114, 189], [217, 83, 25], [237, 177, 32], [126, 47, 142], [119, 172, 48], [77, 190, 238],
                   [162, 20, 47], [255, 0, 255], [0, 255, 0], [255, 128, 0]], dtype=np.float32)


def save_overlays(frames, instances, out_dir, top=3, strip_frames=8, strip_width=320):
    """frames + the `top` highest-scoring predicted tracks (one colour each, mask blended 50%) -> out_dir/00000.png,
    ..., and out_dir.png: up to `strip_frames` evenly spaced frames side by side, each at most strip_width wide."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    instances = sorted(instances, key=lambda r: -r["score"])[:top]
    overlays = []
    for t, im in enumerate(frames):
        arr = np.asarray(im).astype(np.float32)
        for c, inst in enumerate(instances):
            segm = inst["segmentations"][t]
            if segm:
                m = mask_utils.decode(dict(segm, counts=segm["counts"].encode("ascii"))).astype(bool)
                arr[m] = 0.5 * arr[m] + 0.5 * COLORS[c % len(COLORS)]
        overlays.append(Image.fromarray(arr.round().astype(np.uint8)))
        overlays[-1].save(out_dir / f"{t:05d}.png")
    picked = [overlays[i] for i in np.linspace(0, len(overlays) - 1, min(strip_frames, len(overlays))).round()
              .astype(int)]
    w, h = picked[0].size
    scale = min(1.0, strip_width / w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    strip = Image.new("RGB", (len(picked) * (size[0] + 2) - 2, size[1]), (255, 255, 255))
    for i, im in enumerate(picked):
        strip.paste(im.resize(size), (i * (size[0] + 2), 0))
    strip.save(out_dir.with_suffix(".png"))


# ----------------------------------------------------------------------------------------------------------------
# Training and evaluation loops
# ----------------------------------------------------------------------------------------------------------------


def train_one_epoch(model, criterion, loader, optimizer, scaler, device, epoch, args, after_step=None,
                    checkpoint=None):
    """One pass over the loader (from its sampler's `start` step on, for a run resumed mid-epoch); each batch is a
    list of clips, forwarded one by one, their gradients averaged. `after_step(epoch, steps done in this epoch)` runs
    after every optimizer step (checkpoints, stop signals); a non-finite loss stops the run naming the step, every
    weighted loss term and `checkpoint` (the last good one)."""
    model.train()
    criterion.train()
    logger = tu.MetricLogger(delimiter="  ")
    logger.add_meter("lr", tu.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    logger.add_meter("class_error", tu.SmoothedValue(window_size=1, fmt="{value:.2f}"))
    weight_dict = criterion.weight_dict
    first = getattr(getattr(loader, "batch_sampler", None), "start", 0)
    for step, batch in enumerate(logger.log_every(loader, args.print_freq, f"Epoch: [{epoch}]"), start=first):
        optimizer.zero_grad()
        for k, (clip, target) in enumerate(batch):
            clip = clip.to(device)
            target = {key: v.to(device) for key, v in target.items()}
            # with DDP, gradients are averaged across processes once, after the batch's last clip
            last = k == len(batch) - 1
            sync = model.no_sync() if args.distributed and not last else contextlib.nullcontext()
            with sync:
                with tu.amp_autocast(device, args.amp):
                    outputs = model(clip)
                loss_dict = criterion(outputs, [target])
                losses = sum(loss_dict[key] * weight_dict[key] for key in loss_dict if key in weight_dict)
                reduced = tu.reduce_dict(loss_dict)
                scaled = {key: v.detach() * weight_dict[key] for key, v in reduced.items() if key in weight_dict}
                loss_value = sum(scaled.values()).item()
                if not math.isfinite(loss_value):  # the terms are read only then (one device sync each)
                    tu.check_finite_loss({"loss": loss_value, **scaled},
                                         f"epoch {epoch}, step {step}, clip {k + 1} of {len(batch)}", checkpoint)
                scaler.scale(losses / len(batch)).backward()
            logger.update(loss=loss_value, class_error=reduced["class_error"], lr=optimizer.param_groups[0]["lr"],
                          **{key: v for key, v in scaled.items() if not key[-1].isdigit()})
        if args.clip_max_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
        scaler.step(optimizer)
        scaler.update()
        if after_step is not None:
            after_step(epoch, step + 1)
    logger.synchronize_between_processes()
    return {k: meter.global_avg for k, meter in logger.meters.items()}


def train_and_holdout(args):
    """(train image folder, train data, train video ids, held-out data, held-out video ids)."""
    img_folder, ann_file = find_split(args.data_root, "train")
    data = load_ytvis(ann_file, args.num_classes)
    if args.holdout_ann:
        path = Path(args.holdout_ann)
        holdout = load_ytvis(path if path.is_file() else Path(args.data_root) / path, args.num_classes)
        return img_folder, data, sorted(v["id"] for v in data["videos"]), holdout, sorted(
            v["id"] for v in holdout["videos"])
    train_ids, holdout_ids = split_videos(data, args.holdout_fraction)
    return img_folder, data, train_ids, data, holdout_ids


def eval_videos(args):
    """(image folder, annotation data, video ids) of the split that --eval_split names."""
    if args.eval_split == "valid":
        img_folder, ann_file = find_split(args.data_root, "valid")
        data = load_ytvis(ann_file)
        return img_folder, data, sorted(v["id"] for v in data["videos"])
    img_folder, _, _, holdout, holdout_ids = train_and_holdout(args)
    return img_folder, holdout, holdout_ids


@torch.no_grad()
def evaluate(model, args, device):
    """Whole-video inference on the evaluation split -> results.json (+ local video AP on held-out videos)."""
    model.eval()
    img_folder, data, ids = eval_videos(args)
    if not ids:
        raise SystemExit("no videos to evaluate (--holdout_fraction 0 leaves no held-out videos)")
    keep = set(ids)
    videos = [v for v in data["videos"] if v["id"] in keep][tu.get_rank()::tu.get_world_size()]
    if args.image_model:
        image_model, class_map = load_image_model(args.image_model, data["categories"], device)
    logger = tu.MetricLogger(delimiter="  ")
    results = []
    for video in logger.log_every(videos, args.print_freq, "Test:"):
        frames = [load_frame(img_folder / name) for name in video["file_names"]]
        if args.image_model:
            instances = infer_video_per_frame(image_model, class_map, frames, video["id"], args.val_size, device,
                                              args.amp)
        else:
            instances = infer_video(model, frames, video["id"], args.num_frames, args.val_size, device, args.amp,
                                    args.clip_stride, args.clip_linking)
        results += instances
        if args.viz and args.output_dir:
            save_overlays(frames, instances, Path(args.output_dir) / "viz" / str(video["id"]))
    if tu.get_world_size() > 1:
        gathered = [None] * tu.get_world_size()
        torch.distributed.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    if args.output_dir:
        tu.write_json(Path(args.output_dir) / "results.json", results)
    if args.eval_split == "valid":
        print(f"wrote {len(results)} predicted instances for {len(ids)} videos: submit results.json to CodaLab")
        return {}
    stats = video_ap(data, results, ids)
    stats["frame_mask_iou"] = frame_mask_iou(results)
    print("video mask AP (held-out videos): " + "  ".join(f"{k} {v:.2f}" for k, v in stats.items() if v is not None))
    return stats


# ----------------------------------------------------------------------------------------------------------------
# Build and main
# ----------------------------------------------------------------------------------------------------------------


def load_detr_weights(model, path):
    """Initialise from a DETR checkpoint as the official recipe (util/detr_weights_to_vistr.py + main.py).

    Keys 'detr.*' (a DETR segmentation model) become 'vistr.*'; unprefixed DETR keys (a box-only DETR, e.g. one
    our detr.py wrote) get the prefix; class_embed and query_embed are dropped (other classes and query count).
    Tensors whose shapes differ (e.g. a 256-d DETR transformer) are skipped and listed; the rest load.
    """
    ckpt = tu.load_checkpoint(path)
    state = ckpt.get("model", ckpt)
    renamed = {}
    for k, v in state.items():
        if k.startswith("detr."):
            k = "vistr." + k[len("detr."):]
        elif not k.startswith(("vistr.",) + SEGMENTATION_HEADS):
            k = "vistr." + k
        renamed[k] = v
    for k in ("vistr.class_embed.weight", "vistr.class_embed.bias", "vistr.query_embed.weight"):
        renamed.pop(k, None)
    own = model.state_dict()
    loadable = {k: v for k, v in renamed.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k, v in renamed.items() if k in own and own[k].shape != v.shape)
    if not any(k.startswith("vistr.backbone.") for k in loadable):
        raise SystemExit(f"--pretrained_weights {path}: no backbone weights fit this model (--backbone "
                         "mismatch, or not a DETR checkpoint?)")
    missing, _ = tu.load_model_state(model, loadable, path, strict=False)
    print(f"--pretrained_weights {path}: loaded {len(loadable)} tensors, {len(missing)} keep their initialisation"
          + (f", {len(skipped)} skipped for shape (e.g. {', '.join(skipped[:3])})" if skipped else ""))


def build(args):
    """Model, criterion and optimizer/scheduler as the official main.py; --lr_mask_head adds a third group."""
    model = build_model(args)
    criterion = build_criterion(args)
    groups = {"rest": [], "backbone": [], "heads": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "backbone" in name:
            groups["backbone"].append(p)
        elif args.lr_mask_head and name.startswith(SEGMENTATION_HEADS):
            groups["heads"].append(p)
        else:
            groups["rest"].append(p)
    param_dicts = [{"params": groups["rest"]}, {"params": groups["backbone"], "lr": args.lr_backbone}]
    if args.lr_mask_head:
        param_dicts.append({"params": groups["heads"], "lr": args.lr_mask_head})
    optimizer = torch.optim.AdamW(param_dicts, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    return model, criterion, optimizer, lr_scheduler


def run_identity(args):
    """What a checkpoint must match to be resumed here (common/training.py check_identity)."""
    return {"script": "vistr.py", "backbone": args.backbone, "hidden_dim": args.hidden_dim,
            "enc_layers": args.enc_layers, "dec_layers": args.dec_layers, "num_frames": args.num_frames,
            "num_queries": args.num_queries, "num_classes": args.num_classes}


def main(args):
    """Train (then evaluate on the held-out videos) or evaluate (--eval) a VisTR.

    Training checkpoints (OUTPUT_DIR/checkpoint.pth, at each epoch's end and every --checkpoint_every steps) hold
    the step within the epoch and every process's random generators; the clips and their augmentation are a
    function of (seed, epoch, position), so --resume continues the same run (bit for bit with --deterministic).
    SIGTERM / SIGINT save a checkpoint after the current step and stop."""
    tu.init_distributed(args)
    device = tu.resolve_device(args.device)
    if args.deterministic:
        tu.make_deterministic()
    tu.seed_everything(args.seed)
    if args.batch_size < 1:
        raise SystemExit(f"--batch_size {args.batch_size}: must be at least 1")
    model, criterion, optimizer, lr_scheduler = build(args)
    model.to(device)
    criterion.to(device)
    tu.compile_model(model, args.compile)
    print(f"number of params: {sum(p.numel() for p in model.parameters() if p.requires_grad)}")
    if args.pretrained_weights:
        load_detr_weights(model, args.pretrained_weights)
    elif not args.resume and not args.image_model:
        print("no --pretrained_weights: starting from random weights (the paper starts from a COCO DETR)")
    scaler = tu.grad_scaler(device, args.amp)
    identity = run_identity(args)
    start_step, rng = 0, None
    if args.resume:
        ckpt = tu.load_checkpoint(args.resume)
        if not isinstance(ckpt, dict) or "model" not in ckpt:
            raise SystemExit(f"--resume {args.resume}: expected a training checkpoint with a 'model' entry")
        tu.check_identity(ckpt, identity, f"--resume {args.resume}")
        tu.load_model_state(model, ckpt["model"], args.resume)
        if not args.eval and all(k in ckpt for k in ("optimizer", "lr_scheduler", "epoch")):
            start_step, rng = tu.resume_run(ckpt, args, optimizer, lr_scheduler, scaler)
    model_without_ddp = model
    if args.distributed:
        device_ids = [args.gpu] if args.gpu is not None else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if args.image_model and not args.eval:
        raise SystemExit("--image_model evaluates an image model frame by frame: use it with --eval")
    if args.eval:
        stats = evaluate(model_without_ddp, args, device)
        if args.output_dir and stats:
            tu.write_json(Path(args.output_dir) / "eval.json", stats)
            tu.append_log(args.output_dir, {f"test_{k}": v for k, v in stats.items()})
        return stats

    img_folder, data, train_ids, _, holdout_ids = train_and_holdout(args)
    transform = TrainTransform(args.input_size, args.photometric, args.cropped_out)
    dataset = YTVOSDataset(img_folder, data, train_ids, args.num_frames, transform)
    print(f"{len(train_ids)} training videos ({len(dataset)} clips), {len(holdout_ids)} held out for evaluation")
    # DistributedSampler's order (also on one process), each clip augmented under a seed fixed by its place in the
    # epoch; --max_iters keeps the first clips of each epoch's permutation, a random subset of that many
    sampler = tu.ResumableBatchSampler(len(dataset), args.batch_size, seed=args.seed,
                                       max_batches=args.max_iters // args.batch_size if args.max_iters else None)
    loader = torch.utils.data.DataLoader(tu.SeededDataset(dataset), batch_sampler=sampler, collate_fn=collate_clips,
                                         num_workers=args.num_workers, generator=tu.loader_generator(args.seed))
    checkpoint = Path(args.output_dir) / "checkpoint.pth" if args.output_dir else None

    save = tu.epoch_saver(checkpoint, identity=identity, args=args, model=model_without_ddp, optimizer=optimizer,
                          lr_scheduler=lr_scheduler, scaler=scaler)
    epochs = tu.ResumableEpochs(args, sampler, start_step, rng, save, checkpoint)
    start = time.time()
    for epoch in epochs:  # each epoch's checkpoint after its schedule step
        train_stats = train_one_epoch(model, criterion, loader, optimizer, scaler, device, epoch, args,
                                      epochs.after_step, checkpoint)
        lr_scheduler.step()
        tu.append_log(args.output_dir, {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch})
    print(f"training time {time.time() - start:.0f} s")
    stats = {}
    if holdout_ids:
        stats = evaluate(model_without_ddp, args, device)
        if args.output_dir:
            tu.write_json(Path(args.output_dir) / "eval.json", stats)
            tu.append_log(args.output_dir, {f"test_{k}": v for k, v in stats.items()})
    return stats


if __name__ == "__main__":
    main(get_args_parser().parse_args())
