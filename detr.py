"""DETR: End-to-End Object Detection with Transformers.

Carion, Massa, Synnaeve, Usunier, Kirillov, Zagoruyko. ECCV 2020. arXiv:2005.12872.
Official code: https://github.com/facebookresearch/detr (described at commit 29901c51).

What this file reproduces: the DETR detector (ResNet backbone with frozen batch norm, sine positional encoding,
post-norm transformer encoder-decoder, 100 object queries, class and box heads), its set criterion (Hungarian
matching, cross-entropy with a down-weighted no-object class, L1 + GIoU box losses, auxiliary decoding losses),
COCO training with the paper's augmentation and COCO box evaluation with pycocotools; and the panoptic
segmentation of Sec. 4.4 (`--masks`): a mask head on the frozen box model (`--frozen_weights`), focal + DICE mask
losses, COCO panoptic data (`--dataset_file coco_panoptic`), the official merging of things and stuff into panoptic
PNGs, mask AP with pycocotools and PQ / SQ / RQ as COCO's panopticapi defines them.
Status: numerically identical to the official code on the parity fixtures `tests/fixtures/detr_r50.pt` and
`detr_r50_panoptic.pt` (outputs, intermediates, every loss, matcher indices, the three post-processors; 1e-4), and
the released `detr-r50-e632da11.pth` and `detr-r50-panoptic-00ce5173.pth` have our key tables (strict loading). The
paper's numbers (42.0 box AP, PQ 43.4 with R50 on 16 V100s) are not reproduced here (no GPU); docs/detr.md has
what the synthetic demo measures.

Real data (COCO 2017 under /data/coco: train2017/, val2017/, annotations/instances_{train,val}2017.json; for
panoptic also annotations/panoptic_{train,val}2017.json and panoptic_{train,val}2017/*.png, or under
--coco_panoptic_path):
    python detr.py --coco_path /data/coco --output_dir outputs/detr --pretrained_backbone resnet50-0676ba61.pth
    torchrun --nproc_per_node 8 detr.py --coco_path /data/coco --output_dir outputs/detr
    python detr.py --coco_path /data/coco --eval --resume detr-r50-e632da11.pth --no_aux_loss --output_dir out
    python detr.py --resume detr-r50-e632da11.pth --viz image.jpg --output_dir out   # boxes + attention PNGs
    # panoptic (Sec. 4.4): boxes of things and stuff first, then the mask head on the frozen box model
    python detr.py --coco_path /data/coco --dataset_file coco_panoptic --output_dir out/box
    python detr.py --coco_path /data/coco --dataset_file coco_panoptic --masks --frozen_weights out/box/checkpoint.pth \
        --epochs 25 --lr_drop 15 --output_dir out/panoptic
    python detr.py --coco_path /data/coco --dataset_file coco_panoptic --masks --eval \
        --resume detr-r50-panoptic-00ce5173.pth --output_dir out   # eval.json: box AP, mask AP ("segm"), PQ
Synthetic demo (small backbone and transformer, same code path, flags only): `make demo-detr` (demos/detr.sh).

Differences from the official code:
- The ImageNet backbone is loaded from a file you give (`--pretrained_backbone`), never downloaded; without one the
  backbone starts from random weights and the run says so. A file whose keys do not all fit is an error.
- Additions, all off by default: `--backbone convstem` (a light, fully trainable conv backbone with coordinate
  input channels unless `--no_coordinates`, for CPU demos), `--warmup_iters` (linear learning-rate warm-up),
  `--scales/--max_size/--crop_scales/--crop_size` (the augmentation sizes, defaults as in the paper),
  `--num_classes` (default as the official `build`: 91, or 250 for coco_panoptic), `--amp`, `--compile`, `--viz`,
  `--eval_every`. Evaluation also writes COCO's result files (detections_val2017_results.json, and
  segmentations_val2017_results.json with --masks).
- `RandomSizeCrop` clamps its lower size to the image size, so images smaller than 384 px do not crash it (the
  official code raises there); identical otherwise.
- Training batches follow DistributedSampler's order on one process too, each image augmented under a seed fixed by
  (--seed, epoch, position), and checkpoints hold the step within the epoch and every process's generators, so
  `--resume` continues the same run (bit for bit with `--deterministic`; `--checkpoint_every N` saves within an
  epoch). SIGTERM / SIGINT save a checkpoint after the current step and stop; a non-finite loss stops the run naming
  every loss term and the last good checkpoint (the official code exits with the loss dict only).
- Attention runs with `need_weights=False` (PyTorch's fused kernel); attention maps for `--viz` are requested by
  forward hooks only when drawing.
- Panoptic post-processing treats every class id <= 90 as a thing and every other as stuff (the official map covers
  ids 0..200 only and raises KeyError for a predicted 201..249); PQ is our function (panopticapi is not on PyPI),
  tested against a hand-worked example; a frozen conv stem keeps its batch-norm statistics under --frozen_weights.
"""
import argparse
import datetime
import inspect
import io
import json
import math
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

from common import training
from common.matching import HungarianMatcher, assign, box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou
from common.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine

# ---------------------------------------------------------------------------------------------------------------------
# Arguments (official names and defaults, main.py get_args_parser)
# ---------------------------------------------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with `--num_classes` left unset resolved after parsing as the official `build` sets it: 250 for
    `--dataset_file coco_panoptic`, 91 (COCO) otherwise."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extra = super().parse_known_args(args, namespace)
        if getattr(namespace, "num_classes", 0) is None:
            namespace.num_classes = 250 if getattr(namespace, "dataset_file", "coco") == "coco_panoptic" else 91
        return namespace, extra


def get_args_parser():
    parser = ArgumentParser("DETR: End-to-End Object Detection with Transformers", add_help=True)
    model = parser.add_argument_group("model", "defaults: the official main.py; paper Sec. 3.2 (Sec. 4.4 for --masks)")
    loss = parser.add_argument_group("loss", "defaults: the official main.py; paper Sec. 3.1 and Appendix A.2")
    data = parser.add_argument_group("data", "defaults: the official main.py and datasets/coco.py; paper Sec. 4 "
                                             "(short side 480-800, long side at most 1333, random crops)")
    optim = parser.add_argument_group("optimisation", "defaults: the official main.py; paper Sec. 4, technical details")
    run = parser.add_argument_group("run", "defaults: the official main.py where it has the flag")
    # optimisation (Sec. 4, "Technical details")
    optim.add_argument("--lr", default=1e-4, type=float)
    optim.add_argument("--lr_backbone", default=1e-5, type=float)
    optim.add_argument("--batch_size", default=2, type=int, help="images per process (paper: 4 per GPU x 16)")
    optim.add_argument("--weight_decay", default=1e-4, type=float)
    optim.add_argument("--epochs", default=300, type=int)
    optim.add_argument("--lr_drop", default=200, type=int)
    optim.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm")
    optim.add_argument("--warmup_iters", default=0, type=int, help="linear lr warm-up iterations (not in the paper)")
    model.add_argument("--frozen_weights", default=None, type=str,
                       help="box model checkpoint: load it into the DETR part, freeze it and train only the mask head "
                            "(the paper's two-step panoptic recipe, Sec. 4.4; needs --masks)")
    # model (Sec. 3.2)
    model.add_argument("--backbone", default="resnet50", type=str,
                       help="torchvision ResNet name (resnet18/34/50/101), or a light trainable CNN for CPU demos, "
                            "not in the paper: 'convstem' (4 convs) or 'convstem7' (7 convs); see --no_coordinates")
    model.add_argument("--no_coordinates", dest="coordinates", action="store_false",
                       help="convstem only: do not append the two coordinate channels (y, x in [-1, 1], CoordConv) "
                            "to its input image; they are on by default because a shallow stem cannot learn "
                            "absolute position, which DETR's box head reads from the features")
    model.add_argument("--dilation", action="store_true", help="DC5: dilate the last stage instead of striding")
    model.add_argument("--position_embedding", default="sine", type=str, choices=("sine", "learned"))
    model.add_argument("--pretrained_backbone", default="", type=str,
                       help="torchvision ImageNet ResNet state dict (.pth) to start the backbone from")
    model.add_argument("--enc_layers", default=6, type=int)
    model.add_argument("--dec_layers", default=6, type=int)
    model.add_argument("--dim_feedforward", default=2048, type=int)
    model.add_argument("--hidden_dim", default=256, type=int)
    model.add_argument("--dropout", default=0.1, type=float)
    model.add_argument("--nheads", default=8, type=int)
    model.add_argument("--num_queries", default=100, type=int)
    model.add_argument("--pre_norm", action="store_true")
    model.add_argument("--masks", action="store_true",
                       help="train the segmentation head (Sec. 4.4): per-query masks, focal + DICE losses")
    model.add_argument("--num_classes", default=None, type=int,
                       help="max category id + 1; index num_classes = no object (default as the official build: 91 "
                            "for coco, 250 for coco_panoptic)")
    # loss (Sec. 3.1, Appendix A.2)
    loss.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                      help="disable the auxiliary decoding losses (one per decoder layer)")
    loss.add_argument("--set_cost_class", default=1, type=float, help="class weight in the matching cost")
    loss.add_argument("--set_cost_bbox", default=5, type=float, help="L1 box weight in the matching cost")
    loss.add_argument("--set_cost_giou", default=2, type=float, help="GIoU weight in the matching cost")
    loss.add_argument("--mask_loss_coef", default=1, type=float, help="weight of the focal mask loss")
    loss.add_argument("--dice_loss_coef", default=1, type=float, help="weight of the DICE mask loss")
    loss.add_argument("--bbox_loss_coef", default=5, type=float)
    loss.add_argument("--giou_loss_coef", default=2, type=float)
    loss.add_argument("--eos_coef", default=0.1, type=float, help="relative weight of the no-object class")
    # data (Sec. 4: shortest side 480..800, longest <= 1333; random crops with p 0.5)
    data.add_argument("--dataset_file", default="coco", choices=("coco", "coco_panoptic"),
                      help="coco: instances_*.json (boxes, and masks with --masks); coco_panoptic: panoptic_*.json "
                           "+ PNGs under --coco_panoptic_path (things and stuff), box / mask AP still against "
                           "--coco_path's instances_val2017.json, plus PQ")
    data.add_argument("--coco_path", "--data_root", dest="coco_path", type=str, default=None)
    data.add_argument("--coco_panoptic_path", type=str, default=None,
                      help="holds annotations/panoptic_{train,val}2017.json and panoptic_{train,val}2017/*.png "
                           "(default: --coco_path)")
    data.add_argument("--scales", default=list(range(480, 801, 32)), type=int, nargs="+",
                      help="training short-side sizes; evaluation uses the largest")
    data.add_argument("--max_size", default=1333, type=int, help="longest side after resizing")
    data.add_argument("--crop_scales", default=[400, 500, 600], type=int, nargs="+", help="resize before the crop")
    data.add_argument("--crop_size", default=[384, 600], type=int, nargs=2, help="random crop side range")
    # run
    run.add_argument("--output_dir", default="", help="where to save log.txt, checkpoint.pth, eval.json, PNGs")
    run.add_argument("--device", default=None, help="cuda, cpu or mps (default: cuda when available)")
    run.add_argument("--seed", default=42, type=int)
    run.add_argument("--resume", default="", help="checkpoint.pth of a run, or an official {'model': ...} file")
    run.add_argument("--start_epoch", default=0, type=int)
    run.add_argument("--eval", action="store_true", help="only evaluate (the model given by --resume)")
    run.add_argument("--eval_every", default=1, type=int, help="evaluate every N epochs (and after the last)")
    training.add_run_args(run)
    run.add_argument("--num_workers", default=2, type=int)
    run.add_argument("--viz", nargs="*", default=None, metavar="IMAGE",
                     help="write box and attention PNGs for these images (default: the first val image)")
    run.add_argument("--viz_threshold", default=0.7, type=float, help="score above which a detection is drawn")
    run.add_argument("--print_freq", default=10, type=int)
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# Model (Sec. 3.2, Fig. 2): backbone -> transformer encoder-decoder -> prediction heads
# ---------------------------------------------------------------------------------------------------------------------


class NestedTensor:
    """A padded image batch [B, C, H, W] and its padding mask [B, H, W] (True on padding)."""

    def __init__(self, tensors, mask):
        self.tensors, self.mask = tensors, mask

    def to(self, device):
        return NestedTensor(self.tensors.to(device), self.mask.to(device))

    def decompose(self):
        return self.tensors, self.mask


def nested_tensor_from_tensor_list(tensor_list):
    """Pad a list of [C, H_i, W_i] tensors at the bottom/right to one batch; mask is True on the padding."""
    if not tensor_list:
        raise ValueError("nested_tensor_from_tensor_list: empty list of images")
    max_size = [max(sizes) for sizes in zip(*[img.shape for img in tensor_list])]
    first = tensor_list[0]
    tensors = first.new_zeros([len(tensor_list)] + max_size)
    mask = torch.ones((len(tensor_list), *max_size[1:]), dtype=torch.bool, device=first.device)
    for img, pad_img, m in zip(tensor_list, tensors, mask):
        pad_img[: img.shape[0], : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return NestedTensor(tensors, mask)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers only, no num_batches_tracked).

    y = x * scale + (bias - running_mean * scale), scale = weight * rsqrt(running_var + 1e-5).
    """

    def __init__(self, n):
        super().__init__()
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # torchvision ImageNet checkpoints carry it
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + 1e-5).rsqrt()
        bias = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        # in x's precision: under autocast the float32 statistics would turn every bfloat16 activation into float32
        return x * scale.to(x.dtype) + bias.to(x.dtype)


# Conv stems for CPU demos (not in the paper): --backbone name -> for layer1..layer4, the 3x3 convs of the stage as
# (width, stride); each stage halves the resolution (strides 2, 4, 8, 16).
CONVSTEMS = {
    "convstem": (((32, 2),), ((64, 2),), ((128, 2),), ((256, 2),)),  # 4 convs, receptive field 31 px
    "convstem7": (((32, 2),), ((64, 2), (64, 1)), ((128, 2), (128, 1)), ((256, 2), (256, 1))),  # 7 convs, 87 px
}


class ConvStem(nn.Module):
    """A light backbone for CPU demos (not in the paper), trained from scratch: stages of 3x3 conv + BatchNorm + ReLU
    (`CONVSTEMS`), named layer1..layer4 like a ResNet so that Backbone can return intermediate layers.

    With `coordinates` its input is the image plus two coordinate channels (CoordConv, Liu et al. 2018; see
    `with_coordinates`). DETR adds positional encodings to attention queries and keys only, so box positions must be
    read from the features themselves; a deep ResNet learns absolute position from its zero padding, a shallow stem
    hardly can (docs/detr.md has the measurements)."""

    def __init__(self, stages=CONVSTEMS["convstem"], coordinates=True):
        super().__init__()
        c_in = 5 if coordinates else 3
        for i, stage in enumerate(stages):
            layers = []
            for width, stride in stage:
                layers += [nn.Conv2d(c_in, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                c_in = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))

    @staticmethod
    def with_coordinates(images, mask):
        """[B, 3, H, W] images -> [B, 5, H, W]: y and x rising to 1 across each image's own (unpadded) area."""
        valid = (~mask).to(images.dtype)[:, None]
        y = valid.cumsum(2) / valid.sum(2, keepdim=True).clamp(min=1)
        x = valid.cumsum(3) / valid.sum(3, keepdim=True).clamp(min=1)
        return torch.cat([images, 2 * y - 1, 2 * x - 1], 1)


class Backbone(nn.Module):
    """ResNet with frozen batch norm (torchvision, via IntermediateLayerGetter), or a light ConvStem.

    Returns {name: NestedTensor} with the padding mask resized (nearest) to each feature map: only layer4 ('0'), or
    layer1..layer4 ('0'..'3') with return_interm_layers. As the official code, only layer2..layer4 of a ResNet train
    (conv1, bn1 and layer1 stay frozen); nothing trains when train_backbone is False.
    """

    def __init__(self, name, train_backbone, return_interm_layers, dilation, coordinates=True):
        super().__init__()
        self.coordinates = name in CONVSTEMS and coordinates
        if name in CONVSTEMS:
            backbone, trainable = ConvStem(CONVSTEMS[name], coordinates), ("layer",)
            self.num_channels, self.strides = CONVSTEMS[name][-1][-1][0], [2, 4, 8, 16]
        elif name.startswith("resnet"):
            if dilation and name in ("resnet18", "resnet34"):
                raise ValueError(f"--dilation needs a bottleneck ResNet (resnet50/101), not {name}")
            backbone = getattr(torchvision.models, name)(weights=None, norm_layer=FrozenBatchNorm2d,
                                                         replace_stride_with_dilation=[False, False, dilation])
            trainable = ("layer2", "layer3", "layer4")
            self.num_channels = 512 if name in ("resnet18", "resnet34") else 2048
            self.strides = [4, 8, 16, 16 if dilation else 32]
        else:
            raise ValueError(f"--backbone {name}: expected a torchvision ResNet name or one of {', '.join(CONVSTEMS)}")
        for param_name, parameter in backbone.named_parameters():
            if not train_backbone or not any(layer in param_name for layer in trainable):
                parameter.requires_grad_(False)
        if return_interm_layers:
            return_layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
        else:
            return_layers = {"layer4": "0"}
            self.strides = self.strides[-1:]
        self.body = IntermediateLayerGetter(backbone, return_layers=return_layers)

    def forward(self, tensor_list):
        images = tensor_list.tensors
        if self.coordinates:
            images = ConvStem.with_coordinates(images, tensor_list.mask)
        out = {}
        for name, x in self.body(images).items():
            mask = F.interpolate(tensor_list.mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
            out[name] = NestedTensor(x, mask)
        return out


class Joiner(nn.Sequential):
    """backbone[0] = Backbone, backbone[1] = position encoding: returns feature maps and their encodings."""

    def forward(self, tensor_list):
        features = list(self[0](tensor_list).values())
        pos = [self[1](f.tensors, f.mask).to(f.tensors.dtype) for f in features]
        return features, pos


def build_position_encoding(args):
    num_pos_feats = args.hidden_dim // 2  # y and x halves
    if args.position_embedding == "sine":
        return PositionEmbeddingSine(num_pos_feats, normalize=True)
    if args.position_embedding == "learned":
        return PositionEmbeddingLearned(num_pos_feats)
    raise ValueError(f"--position_embedding {args.position_embedding}: expected 'sine' or 'learned'")


def load_pretrained_backbone(backbone, path):
    """Load a torchvision ImageNet state dict (a .pth of `resnet50().state_dict()`, or {'model': ...}) into the
    backbone. Every backbone tensor must come from the file (its classifier `fc.*` and BN `num_batches_tracked` are
    ignored): a file whose keys do not fit, e.g. with a prefix, is an error rather than a silent random start."""
    state = training.load_checkpoint(path)
    state = {k: v for k, v in state.get("model", state).items()
             if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}  # no classifier, frozen BN
    own = backbone.body.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        prefixes = Counter(k[: -len(o)] for k in state for o in own if k.endswith("." + o))
        hint = f"; its keys carry a prefix ({prefixes.most_common(1)[0][0]}): strip it" if prefixes else ""
        raise SystemExit(f"--pretrained_backbone {path}: {len(own) - len(missing)} of the backbone's {len(own)} "
                         f"tensors found (expected a torchvision ResNet state dict with keys such as "
                         f"{next(iter(own))}){hint}")
    training.load_model_state(backbone.body, state, f"--pretrained_backbone {path}")
    print(f"backbone initialised from {path} ({len(own)} tensors)")


def build_backbone(args):
    backbone = Backbone(args.backbone, train_backbone=args.lr_backbone > 0, return_interm_layers=args.masks,
                        dilation=args.dilation, coordinates=args.coordinates)
    if args.pretrained_backbone:
        load_pretrained_backbone(backbone, args.pretrained_backbone)
    model = Joiner(backbone, build_position_encoding(args))
    model.num_channels = backbone.num_channels
    return model


class TransformerEncoderLayer(nn.Module):
    """Self-attention + FFN; post-norm by default (Attention is all you need), pre-norm with normalize_before."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def forward(self, src, src_key_padding_mask=None, pos=None):
        # src, pos: [HW, B, C]; the positional encoding is added to queries and keys, never to values
        x = self.norm1(src) if self.normalize_before else src
        q = k = x if pos is None else x + pos
        src = src + self.dropout1(self.self_attn(q, k, x, key_padding_mask=src_key_padding_mask,
                                                 need_weights=False)[0])
        if not self.normalize_before:
            src = self.norm1(src)
        x = self.norm2(src) if self.normalize_before else src
        src = src + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return src if self.normalize_before else self.norm2(src)


class TransformerDecoderLayer(nn.Module):
    """Self-attention between queries, cross-attention to the encoder memory, FFN (post-norm by default)."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def forward(self, tgt, memory, memory_key_padding_mask=None, pos=None, query_pos=None):
        # tgt, query_pos: [Q, B, C]; memory, pos: [HW, B, C]
        pre = self.normalize_before
        x = self.norm1(tgt) if pre else tgt
        q = k = x if query_pos is None else x + query_pos
        tgt = tgt + self.dropout1(self.self_attn(q, k, x, need_weights=False)[0])
        if not pre:
            tgt = self.norm1(tgt)
        x = self.norm2(tgt) if pre else tgt
        tgt = tgt + self.dropout2(self.multihead_attn(
            x if query_pos is None else x + query_pos, memory if pos is None else memory + pos, memory,
            key_padding_mask=memory_key_padding_mask, need_weights=False)[0])
        if not pre:
            tgt = self.norm2(tgt)
        x = self.norm3(tgt) if pre else tgt
        tgt = tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return tgt if pre else self.norm3(tgt)


class TransformerEncoder(nn.Module):
    def __init__(self, layers, norm=None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm  # only with pre-norm

    def forward(self, src, src_key_padding_mask=None, pos=None):
        for layer in self.layers:
            src = layer(src, src_key_padding_mask=src_key_padding_mask, pos=pos)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    """Stacked decoder layers; the shared final `norm` is applied to every layer's output, which are stacked
    when return_intermediate (the auxiliary losses decode each of them). Returns them and the last layer's output
    before that norm (TrackFormer feeds it back as a track query)."""

    def __init__(self, layers, norm, return_intermediate=False):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(self, tgt, memory, memory_key_padding_mask=None, pos=None, query_pos=None):
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask=memory_key_padding_mask, pos=pos, query_pos=query_pos)
            if self.return_intermediate:
                intermediate.append(self.norm(tgt))
        hs = torch.stack(intermediate) if self.return_intermediate else self.norm(tgt).unsqueeze(0)  # [L, Q, B, C]
        return hs, tgt


class Transformer(nn.Module):
    def __init__(self, d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048,
                 dropout=0.1, normalize_before=False, return_intermediate_dec=False):
        super().__init__()
        self.encoder = TransformerEncoder(
            [TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
             for _ in range(num_encoder_layers)], nn.LayerNorm(d_model) if normalize_before else None)
        self.decoder = TransformerDecoder(
            [TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
             for _ in range(num_decoder_layers)], nn.LayerNorm(d_model), return_intermediate=return_intermediate_dec)
        for p in self.parameters():  # Xavier init (Sec. 4, "Technical details")
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.d_model, self.nhead = d_model, nhead

    def forward(self, src, mask, query_embed, pos_embed, tgt=None, unnormed=False):
        """src, pos_embed [B, C, H, W], mask [B, H, W], query_embed [Q, C] -> (hs [L, B, Q, C], memory [B, C, H, W]).

        TrackFormer's hook: `tgt` [B, Q, C] replaces the zero decoder input, and with `unnormed` the last layer's
        output before the decoder's final norm, [B, Q, C], comes third."""
        bs, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)  # [HW, B, C]
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        query_embed = query_embed.unsqueeze(1).repeat(1, bs, 1)  # [Q, B, C]
        mask = mask.flatten(1)  # [B, HW]
        # the decoder input starts at zero; queries enter as positions
        tgt = torch.zeros_like(query_embed) if tgt is None else tgt.transpose(0, 1)
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed)
        hs, last = self.decoder(tgt, memory, memory_key_padding_mask=mask, pos=pos_embed, query_pos=query_embed)
        out = hs.transpose(1, 2), memory.permute(1, 2, 0).view(bs, c, h, w)
        return out + (last.transpose(0, 1),) if unnormed else out


def build_transformer(args):
    return Transformer(d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
                       num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward,
                       dropout=args.dropout, normalize_before=args.pre_norm, return_intermediate_dec=True)


class MLP(nn.Module):
    """num_layers Linear layers with ReLU in between (the box head: 3 layers, hidden_dim -> 4)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        dims = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + dims, dims + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DETR(nn.Module):
    """Backbone + transformer + class/box heads. forward(images) with images a list of [3, H_i, W_i] tensors, a
    [B, 3, H, W] tensor (no padding) or a NestedTensor; returns pred_logits [B, Q, num_classes + 1], pred_boxes
    [B, Q, 4] (normalised cxcywh) and, with aux_loss, aux_outputs for the earlier decoder layers."""

    def __init__(self, backbone, transformer, num_classes, num_queries, aux_loss=False):
        super().__init__()
        hidden_dim = transformer.d_model
        self.num_queries = num_queries
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)  # + 1: "no object"
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # the N learned object queries
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss

    def forward(self, samples):
        return self.predict(samples)[0]

    def predict(self, samples):
        """(outputs, what the segmentation head reads: decoder states hs [L, B, Q, C], encoder memory [B, C, h, w],
        the backbone levels as NestedTensors (finest first; layer4 last) and the projected layer4 src_proj)."""
        if isinstance(samples, (list, tuple)):
            samples = nested_tensor_from_tensor_list(samples)
        elif isinstance(samples, torch.Tensor):
            samples = nested_tensor_from_tensor_list(list(samples))
        features, pos = self.backbone(samples)
        src, mask = features[-1].decompose()
        src_proj = self.input_proj(src)
        hs, memory = self.transformer(src_proj, mask, self.query_embed.weight, pos[-1])  # [L, B, Q, C]
        outputs_class = self.class_embed(hs)  # [L, B, Q, num_classes + 1]
        outputs_coord = self.bbox_embed(hs).sigmoid()  # [L, B, Q, 4]
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]
        return out, hs, memory, features, src_proj


# ---------------------------------------------------------------------------------------------------------------------
# Segmentation head (Sec. 4.4, Fig. 8; official models/segmentation.py): a mask per query from its attention over the
# encoder memory, sharpened by an FPN-style convolutional head on the backbone's layer3, layer2 and layer1 features
# ---------------------------------------------------------------------------------------------------------------------


def _expand(tensor, length):
    """[B, C, H, W] -> [B * length, C, H, W], each image repeated `length` times in place (batch-major)."""
    return tensor.unsqueeze(1).repeat(1, int(length), 1, 1, 1).flatten(0, 1)


class MHAttentionMap(nn.Module):
    """The multi-head attention weights of each query over the encoder memory, without the value product:
    q [B, Q, C], k [B, C, h, w] -> [B, Q, heads, h, w]. As the official code, ONE softmax runs over heads and
    positions jointly (each head's map is not normalised on its own) and padded positions get weight 0."""

    def __init__(self, query_dim, hidden_dim, num_heads, dropout=0.0):
        super().__init__()
        self.num_heads, self.hidden_dim = num_heads, hidden_dim
        self.dropout = nn.Dropout(dropout)
        self.q_linear = nn.Linear(query_dim, hidden_dim)
        self.k_linear = nn.Linear(query_dim, hidden_dim)
        for layer in (self.q_linear, self.k_linear):
            nn.init.zeros_(layer.bias)
            nn.init.xavier_uniform_(layer.weight)
        self.normalize_fact = float(hidden_dim / num_heads) ** -0.5

    def forward(self, q, k, mask=None):
        q = self.q_linear(q)  # [B, Q, D]
        k = F.conv2d(k, self.k_linear.weight[:, :, None, None], self.k_linear.bias)  # k_linear per pixel: [B, D, h, w]
        head_dim = self.hidden_dim // self.num_heads
        qh = q.view(q.shape[0], q.shape[1], self.num_heads, head_dim)
        kh = k.view(k.shape[0], self.num_heads, head_dim, k.shape[-2], k.shape[-1])
        # scaled dot products q . k / sqrt(d_head): [B, Q, heads, h, w]
        weights = torch.einsum("bqnc,bnchw->bqnhw", qh * self.normalize_fact, kh)
        if mask is not None:
            weights = weights.masked_fill(mask[:, None, None], float("-inf"))
        weights = F.softmax(weights.flatten(2), dim=-1).view_as(weights)
        return self.dropout(weights)


class MaskHeadSmallConv(nn.Module):
    """FPN-style mask head with GroupNorm (Fig. 8). Input: the projected layer4 features src_proj [B, C, h, w],
    repeated per query, with that query's attention maps [B, Q, heads, h, w] as extra channels. Three upsampling
    steps each add a backbone level (layer3, layer2, layer1 = fpns) through a 1x1 adapter, after nearest
    upsampling to that level's exact size. Output: one mask logit map per query, [B * Q, 1, H/4, W/4].

    dim = hidden + heads, fpn_dims = the widths of layer3, layer2, layer1, context_dim = hidden; the widths halve
    from context_dim / 2 to context_dim / 16. `fpn_features` is the part that VisTR's head shares (vistr.py ends it
    with a deformable conv instead of lay5)."""

    def __init__(self, dim, fpn_dims, context_dim):
        super().__init__()
        widths = [dim, dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        if any(w % 8 for w in widths):
            raise ValueError(f"mask head widths {widths[1:]} (hidden {context_dim} + heads {dim - context_dim}, then "
                             "hidden / 2 ... / 16) must be multiples of 8 for GroupNorm(8): use a hidden size that is "
                             "a multiple of 128 and a head count that is a multiple of 8")
        for i in range(1, 6):  # lay1..lay5 (3x3 conv) + gn1..gn5, names as the official checkpoint
            setattr(self, f"lay{i}", nn.Conv2d(widths[i - 1], widths[i], 3, padding=1))
            setattr(self, f"gn{i}", nn.GroupNorm(8, widths[i]))
        self.out_lay = nn.Conv2d(widths[5], 1, 3, padding=1)
        self.adapter1 = nn.Conv2d(fpn_dims[0], widths[2], 1)
        self.adapter2 = nn.Conv2d(fpn_dims[1], widths[3], 1)
        self.adapter3 = nn.Conv2d(fpn_dims[2], widths[4], 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    @staticmethod
    def merge(x, adapter, fpn):
        """One FPN step: adapter(fpn), repeated per query, + x upsampled (nearest) to fpn's exact size."""
        cur = adapter(fpn)
        cur = _expand(cur, x.shape[0] // cur.shape[0])
        return cur + F.interpolate(x, size=cur.shape[-2:], mode="nearest")

    def fpn_features(self, x, bbox_mask, fpns):
        """Up to the finest level: [B * Q, context_dim / 8, H/4, W/4] (layer1's size), before its 3x3 conv."""
        x = torch.cat([_expand(x, bbox_mask.shape[1]), bbox_mask.flatten(0, 1)], 1)  # [B * Q, C + heads, h, w]
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        x = F.relu(self.gn3(self.lay3(self.merge(x, self.adapter1, fpns[0]))))
        x = F.relu(self.gn4(self.lay4(self.merge(x, self.adapter2, fpns[1]))))
        return self.merge(x, self.adapter3, fpns[2])

    def forward(self, x, bbox_mask, fpns):
        x = F.relu(self.gn5(self.lay5(self.fpn_features(x, bbox_mask, fpns))))
        return self.out_lay(x)


def keep_batch_norm_statistics(module):
    """Every batch norm in `module` to eval mode: a frozen model keeps its running statistics while the rest trains
    (--frozen_weights here, TrackFormer's --freeze_detr)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class DETRsegm(nn.Module):
    """DETR with the segmentation head (the released detr-r50-panoptic model; keys `detr.*`, `bbox_attention.*`,
    `mask_head.*`). forward(images) returns DETR's outputs plus pred_masks [B, Q, H/4, W/4]: mask logits at the
    resolution of backbone layer1 of the padded batch, from the last decoder layer only. With freeze_detr (the
    `--frozen_weights` step) only bbox_attention and mask_head train."""

    def __init__(self, detr, freeze_detr=False):
        super().__init__()
        self.detr, self.freeze_detr = detr, freeze_detr
        if freeze_detr:
            detr.requires_grad_(False)
        hidden_dim, nheads = detr.transformer.d_model, detr.transformer.nhead
        channels = detr.backbone.num_channels  # layer4; layer3, 2, 1 have 1/2, 1/4, 1/8 (R50: 1024, 512, 256)
        self.bbox_attention = MHAttentionMap(hidden_dim, hidden_dim, nheads, dropout=0.0)
        self.mask_head = MaskHeadSmallConv(hidden_dim + nheads, [channels // 2, channels // 4, channels // 8],
                                           hidden_dim)

    def train(self, mode=True):
        """As nn.Module.train, but a frozen DETR keeps its batch-norm statistics (only the conv stem has running
        ones: the ResNet's batch norm is frozen anyway); its dropout still follows `mode`, as official."""
        super().train(mode)
        if self.freeze_detr:
            keep_batch_norm_statistics(self.detr)
        return self

    def forward(self, samples):
        out, hs, memory, features, src_proj = self.detr.predict(samples)
        bbox_mask = self.bbox_attention(hs[-1], memory, mask=features[-1].mask)  # [B, Q, heads, h, w]
        fpns = [features[2].tensors, features[1].tensors, features[0].tensors]  # layer3, layer2, layer1
        masks = self.mask_head(src_proj, bbox_mask, fpns)  # [B * Q, 1, H/4, W/4]
        out["pred_masks"] = masks.view(hs.shape[1], hs.shape[2], *masks.shape[-2:])
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Set prediction loss (Sec. 3.1, Eq. 1-2) and post-processing
# ---------------------------------------------------------------------------------------------------------------------


def sigmoid_focal_loss(inputs, targets, num_boxes, alpha=0.25, gamma=2):
    """Focal loss (Lin et al. 2017) on logits: BCE * (1 - p_t)^gamma, weighted by alpha for positives and 1 - alpha
    for negatives; averaged over dim 1 (the pixels of a mask, or the queries of a [B, Q, C] map), summed over the
    rest, divided by num_boxes (official segmentation.py)."""
    prob = inputs.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes


def dice_loss(inputs, targets, num_boxes):
    """DICE loss (Milletari et al. 2016) on mask logits [N, pixels]: 1 - (2 sum(p t) + 1) / (sum p + sum t + 1) per
    mask, p = sigmoid, summed over masks and divided by num_boxes (official segmentation.py)."""
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * (inputs * targets).sum(1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_boxes


class SetCriterion(nn.Module):
    """Hungarian loss: match predictions to targets, then cross-entropy on classes (no-object weight eos_coef) and
    L1 + GIoU on the matched boxes; the same on every auxiliary decoder output, each with its own matching. With
    "masks" in `losses`, focal + DICE mask losses on the final layer only (too costly per layer, official).

    All layers' cost matrices are stacked and moved to the CPU in one transfer per batch.
    """

    def __init__(self, num_classes, matcher, weight_dict, eos_coef, losses=("labels", "boxes", "cardinality")):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = list(losses)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    @staticmethod
    def _src_permutation_idx(indices):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    @staticmethod
    def _tgt_permutation_idx(indices):
        batch_idx = torch.cat([torch.full_like(tgt, i) for i, (_, tgt) in enumerate(indices)])
        tgt_idx = torch.cat([tgt for _, tgt in indices])
        return batch_idx, tgt_idx

    def loss_labels(self, outputs, targets, indices, num_boxes, log=True):
        src_logits = outputs["pred_logits"]  # [B, Q, K + 1]
        idx = self._src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64, device=src_logits.device)
        target_classes[idx] = target_classes_o
        # weighted mean over all queries; unmatched queries learn "no object" with weight eos_coef
        losses = {"loss_ce": F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight)}
        if log:  # 100 - top-1 accuracy of the matched queries (logging only)
            if target_classes_o.numel() == 0:
                losses["class_error"] = torch.tensor(100.0, device=src_logits.device)
            else:
                correct = (src_logits[idx].argmax(-1) == target_classes_o).float().mean()
                losses["class_error"] = 100 - 100 * correct
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, num_boxes):
        """|#predictions that are not no-object - #targets|, averaged over images (logging only)."""
        logits = outputs["pred_logits"]
        tgt_lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        card_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(card_pred.float(), tgt_lengths.float())}

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        idx = self._src_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][idx]  # [M, 4] matched predictions
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
        # Eq. (2): L_box = lambda_iou L_iou(b, b^) + lambda_L1 ||b - b^||_1, each summed and divided by num_boxes
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        loss_giou = 1 - torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes)))
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": loss_giou.sum() / num_boxes}

    def loss_masks(self, outputs, targets, indices, num_boxes):
        """Sec. 4.4: focal + DICE losses of each matched query's mask logits, upsampled (bilinear) from 1/4 to the
        size of the target masks padded to the batch (padding counts as background, as the official code)."""
        src_masks = outputs["pred_masks"][self._src_permutation_idx(indices)]  # [M, H/4, W/4]
        target_masks = nested_tensor_from_tensor_list([t["masks"] for t in targets]).tensors.to(src_masks)
        target_masks = target_masks[self._tgt_permutation_idx(indices)]  # [M, H, W]
        src_masks = F.interpolate(src_masks[:, None], size=target_masks.shape[-2:], mode="bilinear",
                                  align_corners=False)[:, 0]
        src_masks, target_masks = src_masks.flatten(1), target_masks.flatten(1)
        return {"loss_mask": sigmoid_focal_loss(src_masks, target_masks, num_boxes),
                "loss_dice": dice_loss(src_masks, target_masks, num_boxes)}

    def match_all(self, outputs, targets):
        """Indices for the final layer and every aux layer: one stacked cost tensor, one move to the CPU."""
        layers = [outputs] + outputs.get("aux_outputs", [])
        costs = torch.stack([self.matcher.cost_matrix(layer, targets) for layer in layers]).cpu()
        sizes = [len(t["boxes"]) for t in targets]
        return [assign(cost, sizes) for cost in costs]

    def forward(self, outputs, targets, indices=None):
        """outputs as DETR returns them; targets: list of dicts with labels [T_i] and boxes [T_i, 4] (normalised
        cxcywh). `indices`: optional precomputed matches per layer (final first). Returns the loss dict."""
        outputs = {k: ([{n: v.float() for n, v in a.items()} for a in x] if k == "aux_outputs" else x.float())
                   for k, x in outputs.items()}
        if indices is None:
            indices = self.match_all(outputs, targets)
        device = outputs["pred_logits"].device
        num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        num_boxes = torch.clamp(training.all_reduce_mean(num_boxes), min=1).item()  # average over processes
        losses = {}
        for i, layer in enumerate([outputs] + outputs.get("aux_outputs", [])):
            suffix = "" if i == 0 else f"_{i - 1}"
            for loss in self.losses:
                if loss == "masks" and i > 0:  # mask losses on the final layer only (too costly per layer, official)
                    continue
                if loss == "labels":
                    values = self.loss_labels(layer, targets, indices[i], num_boxes, log=i == 0)
                else:
                    values = getattr(self, f"loss_{loss}")(layer, targets, indices[i], num_boxes)
                losses.update({k + suffix: v for k, v in values.items()})
        return losses


class PostProcess(nn.Module):
    """Model outputs -> COCO-style detections: per image, every query's best real class, its score, and the box in
    absolute xyxy pixels of target_sizes [B, 2] given as (h, w). No threshold, no top-k (as the official code)."""

    @torch.no_grad()
    def forward(self, outputs, target_sizes):
        prob = outputs["pred_logits"].float().softmax(-1)
        scores, labels = prob[..., :-1].max(-1)
        boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"].float())
        img_h, img_w = target_sizes.unbind(1)
        boxes = boxes * torch.stack([img_w, img_h, img_w, img_h], dim=1)[:, None, :]
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]


class PostProcessSegm(nn.Module):
    """Adds "masks" (uint8 [Q, 1, H0, W0]) to PostProcess's results: mask logits upsampled (bilinear) to the largest
    processed image size of the batch, thresholded at sigmoid > 0.5, cropped to each image's processed size, then
    resized (nearest) to its original size (official segmentation.py; `max_target_sizes` are the per-image
    processed sizes, as engine.evaluate passes them)."""

    def __init__(self, threshold=0.5):
        super().__init__()
        self.threshold = threshold

    @torch.no_grad()
    def forward(self, results, outputs, orig_target_sizes, max_target_sizes):
        max_h, max_w = max_target_sizes.max(0)[0].tolist()
        masks = F.interpolate(outputs["pred_masks"].float(), size=(max_h, max_w), mode="bilinear", align_corners=False)
        masks = (masks.sigmoid() > self.threshold).cpu()
        for result, mask, (h, w), orig in zip(results, masks, max_target_sizes.tolist(), orig_target_sizes.tolist()):
            result["masks"] = F.interpolate(mask[:, None, :h, :w].float(), size=tuple(orig), mode="nearest").byte()
        return results


def id2rgb(ids):
    """Panoptic segment ids [H, W] -> the COCO panoptic PNG colours uint8 [H, W, 3]: id = R + 256 G + 256^2 B."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 256 ** 2 % 256], -1).astype(np.uint8)


def rgb2id(rgb):
    """COCO panoptic PNG colours [H, W, 3] -> segment ids int64 [H, W] (panopticapi's rgb2id)."""
    rgb = np.asarray(rgb, dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 ** 2 * rgb[..., 2]


class PostProcessPanoptic(nn.Module):
    """Model outputs -> COCO panoptic results, as the official segmentation.py (Sec. 4.4, "panoptic segmentation").

    Per image: keep the queries whose best class is not "no object" with softmax score > threshold (0.85); upsample
    their mask logits (bilinear) straight to the processed size (the padding is not cropped: a smaller image of the
    batch gets a stretched mask, as official); each pixel goes to the kept query with the highest mask logit; stuff
    queries of the same class are merged into the first of them; the id map is resized to the original size with
    PIL's nearest filter; segments of <= 4 pixels are dropped and the map recomputed (without the merge) until none
    is. Segment ids are the positions 0..K-1 in the kept list. Returns per image {"png_string": PNG bytes (id2rgb
    colours), "segments_info": [{id, isthing, category_id, area}]}.
    """

    def __init__(self, is_thing_map, threshold=0.85):
        super().__init__()
        self.is_thing_map, self.threshold = is_thing_map, threshold

    @staticmethod
    def _id_map(masks, size, target_size, stuff_groups=None):
        """Per-pixel arg-max over kept queries at `size`, stuff duplicates merged, resized (PIL nearest) to
        target_size: (PIL image of id2rgb colours, area per kept query at target size)."""
        h, w = size
        if masks.shape[0] == 0:  # nothing kept
            ids = torch.zeros((h, w), dtype=torch.long)
        else:
            ids = masks.transpose(0, 1).softmax(-1).argmax(-1).view(h, w).cpu()
        for group in (stuff_groups or {}).values():
            for k in group[1:]:
                ids[ids == k] = group[0]
        final_h, final_w = target_size
        image = Image.fromarray(id2rgb(ids.numpy())).resize((final_w, final_h), resample=Image.NEAREST)
        ids = torch.from_numpy(rgb2id(np.asarray(image)))
        return image, [int((ids == k).sum()) for k in range(masks.shape[0])]

    @torch.no_grad()
    def forward(self, outputs, processed_sizes, target_sizes=None):
        target_sizes = processed_sizes if target_sizes is None else target_sizes
        results = []
        for logits, masks, size, target_size in zip(outputs["pred_logits"].float(), outputs["pred_masks"].float(),
                                                    processed_sizes.tolist(), target_sizes.tolist()):
            scores, labels = logits.softmax(-1).max(-1)
            keep = labels.ne(logits.shape[-1] - 1) & (scores > self.threshold)
            labels, masks = labels[keep], masks[keep]
            if masks.shape[0]:  # [K, h * w] logits at the processed size
                masks = F.interpolate(masks[None], size=tuple(size), mode="bilinear", align_corners=False)[0].flatten(1)
            else:
                masks = masks.new_zeros((0, size[0] * size[1]))
            stuff_groups = defaultdict(list)  # several queries may predict the same stuff class: merged
            for k, label in enumerate(labels.tolist()):
                if not self.is_thing_map[label]:
                    stuff_groups[label].append(k)
            image, area = self._id_map(masks, size, target_size, stuff_groups)
            while labels.numel() > 0:
                small = torch.tensor([a <= 4 for a in area])
                if not small.any():
                    break
                labels, masks = labels[~small], masks[~small]
                image, area = self._id_map(masks, size, target_size)
            segments_info = [{"id": k, "isthing": self.is_thing_map[c], "category_id": c, "area": a}
                             for k, (c, a) in enumerate(zip(labels.tolist(), area))]
            with io.BytesIO() as png:
                image.save(png, format="PNG")
                results.append({"png_string": png.getvalue(), "segments_info": segments_info})
        return results


# ---------------------------------------------------------------------------------------------------------------------
# Data (Sec. 4 and Appendix A.4): COCO 2017 via pycocotools, the paper's augmentation
# ---------------------------------------------------------------------------------------------------------------------

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def crop(image, target, region):
    """Crop a PIL image (and masks) to region (top, left, height, width); boxes are shifted and clipped, and the
    objects whose box becomes empty are removed."""
    top, left, h, w = region
    target = dict(target, size=torch.tensor([h, w]))
    boxes = target["boxes"] - torch.as_tensor([left, top, left, top])
    boxes = torch.min(boxes.reshape(-1, 2, 2), torch.as_tensor([w, h], dtype=torch.float32)).clamp(min=0)
    target["boxes"] = boxes.reshape(-1, 4)
    target["area"] = (boxes[:, 1, :] - boxes[:, 0, :]).prod(dim=1)
    if "masks" in target:
        target["masks"] = target["masks"][:, top:top + h, left:left + w]
    keep = torch.all(boxes[:, 1, :] > boxes[:, 0, :], dim=1)
    for field in ("boxes", "labels", "area", "iscrowd", "masks"):
        if field in target:
            target[field] = target[field][keep]
    return TF.crop(image, top, left, h, w), target


def hflip(image, target):
    w, _ = image.size
    target = dict(target, boxes=target["boxes"][:, [2, 1, 0, 3]] * torch.as_tensor([-1, 1, -1, 1])
                  + torch.as_tensor([w, 0, w, 0]))
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return TF.hflip(image), target


def resized_shape(image_size, size, max_size=None):
    """(h, w) with the short side at `size`, unless the long side would exceed max_size (official rounding)."""
    w, h = image_size
    if max_size is not None:
        short, long = float(min(w, h)), float(max(w, h))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    return (int(size * h / w), size) if w < h else (size, int(size * w / h))


def resize(image, target, size, max_size=None):
    h, w = resized_shape(image.size, size, max_size)
    rescaled = TF.resize(image, [h, w])
    ratio_w, ratio_h = rescaled.size[0] / image.size[0], rescaled.size[1] / image.size[1]
    target = dict(target, size=torch.tensor([h, w]), area=target["area"] * (ratio_w * ratio_h),
                  boxes=target["boxes"] * torch.as_tensor([ratio_w, ratio_h, ratio_w, ratio_h]))
    if "masks" in target:  # nearest to the exact new size, as the official transforms
        target["masks"] = F.interpolate(target["masks"][:, None].float(), size=(h, w), mode="nearest")[:, 0] > 0.5
    return rescaled, target


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image, target):
        return hflip(image, target) if random.random() < self.p else (image, target)


class RandomResize:
    def __init__(self, sizes, max_size=None):
        self.sizes, self.max_size = list(sizes), max_size

    def __call__(self, image, target):
        return resize(image, target, random.choice(self.sizes), self.max_size)


class RandomSizeCrop:
    """Crop of random width/height in [min_size, max_size] (clamped to the image) at a random position."""

    def __init__(self, min_size, max_size):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target):
        img_w, img_h = image.size
        w = random.randint(min(self.min_size, img_w), min(img_w, self.max_size))
        h = random.randint(min(self.min_size, img_h), min(img_h, self.max_size))
        return crop(image, target, torchvision.transforms.RandomCrop.get_params(image, [h, w]))


class RandomSelect:
    def __init__(self, t1, t2, p=0.5):
        self.t1, self.t2, self.p = t1, t2, p

    def __call__(self, image, target):
        return self.t1(image, target) if random.random() < self.p else self.t2(image, target)


class ToTensorNormalize:
    """PIL -> normalised [3, H, W]; boxes xyxy pixels -> cxcywh divided by (w, h, w, h)."""

    def __call__(self, image, target):
        image = TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)
        h, w = image.shape[-2:]
        boxes = box_xyxy_to_cxcywh(target["boxes"]) / torch.tensor([w, h, w, h], dtype=torch.float32)
        return image, dict(target, boxes=boxes)


def make_coco_transforms(image_set, args):
    """Train: flip, then either a multi-scale resize or resize -> random crop -> multi-scale resize (p 0.5 each).
    Val: resize the short side to the largest training scale (800), long side <= max_size (1333)."""
    if image_set == "train":
        return Compose([RandomHorizontalFlip(), RandomSelect(
            RandomResize(args.scales, max_size=args.max_size),
            Compose([RandomResize(args.crop_scales), RandomSizeCrop(*args.crop_size),
                     RandomResize(args.scales, max_size=args.max_size)])), ToTensorNormalize()])
    return Compose([RandomResize([max(args.scales)], max_size=args.max_size), ToTensorNormalize()])


def coco_masks(segmentations, height, width):
    """COCO segmentations (polygon lists, or RLE dicts with list or string counts) -> bool masks [N, H, W], as the
    official convert_coco_poly_to_mask (the polygons of one object are merged)."""
    from pycocotools import mask as mask_utils

    masks = []
    for segmentation in segmentations:
        if isinstance(segmentation, dict) and isinstance(segmentation["counts"], str):
            rles = segmentation  # compressed RLE
        else:
            rles = mask_utils.frPyObjects(segmentation, height, width)
        mask = mask_utils.decode(rles)
        masks.append(torch.from_numpy(mask.reshape(height, width, -1)).any(-1))
    return torch.stack(masks) if masks else torch.zeros((0, height, width), dtype=torch.bool)


class CocoDetection(torch.utils.data.Dataset):
    """COCO detection images and targets as DETR uses them: crowd annotations dropped, xywh -> xyxy clipped to the
    image, zero-area boxes dropped (counted and reported once), labels = raw category ids, plus image_id, area,
    iscrowd, orig_size and size (both (h, w)), and with return_masks the objects' masks (bool [N, H, W], from their
    polygons or RLE). Images without objects are kept."""

    def __init__(self, img_folder, ann_file, transforms, num_classes, return_masks=False):
        from pycocotools.coco import COCO

        img_folder, ann_file = Path(img_folder), Path(ann_file)
        for path, what in ((img_folder, "image directory"), (ann_file, "annotation file")):
            if not path.exists():
                raise SystemExit(f"COCO {what} not found: {path}")
        try:
            self.coco = COCO(str(ann_file))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise SystemExit(f"{ann_file}: not a COCO instances file ({error!r})") from error
        self.ids = sorted(self.coco.imgs)
        self.img_folder, self.transforms, self.return_masks = img_folder, transforms, return_masks
        present = {p.name for p in img_folder.iterdir()}
        missing = [self.coco.imgs[i]["file_name"] for i in self.ids if self.coco.imgs[i]["file_name"] not in present]
        if missing:
            raise SystemExit(f"{ann_file} references {len(missing)} image(s) missing from {img_folder}, "
                                    f"e.g. {missing[:3]}")
        anns = self.coco.dataset.get("annotations", [])
        orphans = [a for a in anns if a["image_id"] not in self.coco.imgs]
        if orphans:
            raise SystemExit(f"{ann_file}: {len(orphans)} annotation(s) refer to images not in its 'images', e.g. "
                             f"annotation {orphans[0].get('id')} with image_id {orphans[0]['image_id']}")
        bad_ids = sorted({a["category_id"] for a in anns if not 0 <= a["category_id"] < num_classes})
        if bad_ids:
            raise SystemExit(f"{ann_file}: category ids {bad_ids[:5]} are outside [0, num_classes={num_classes}); "
                             f"set --num_classes to the largest id + 1")
        unknown = sorted({a["category_id"] for a in anns if a["category_id"] not in self.coco.cats})
        if unknown:
            raise SystemExit(f"{ann_file}: annotations have category ids {unknown[:5]} that are not in its "
                             f"'categories' (ids {sorted(self.coco.cats)})")
        degenerate = sum(1 for a in anns if not a.get("iscrowd", 0) and (a["bbox"][2] <= 0 or a["bbox"][3] <= 0))
        if degenerate:
            print(f"{ann_file}: {degenerate} annotation(s) with zero width or height will be dropped")

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, idx):
        image_id = self.ids[idx]
        path = self.img_folder / self.coco.imgs[image_id]["file_name"]
        try:
            image = Image.open(path).convert("RGB")
        except OSError as error:
            raise OSError(f"cannot read image {path}: {error}") from error
        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        w, h = image.size
        boxes = torch.as_tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2].clamp_(min=0, max=w)
        boxes[:, 1::2].clamp_(min=0, max=h)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        target = {"boxes": boxes[keep],
                  "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)[keep],
                  "image_id": torch.tensor([image_id]),
                  "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32)[keep],
                  "iscrowd": torch.zeros(int(keep.sum()), dtype=torch.int64),
                  "orig_size": torch.as_tensor([h, w]), "size": torch.as_tensor([h, w])}
        if self.return_masks:
            target["masks"] = coco_masks([a["segmentation"] for a in anns], h, w)[keep]
        return self.transforms(image, target)


class CocoPanoptic(torch.utils.data.Dataset):
    """COCO panoptic segmentation (official datasets/coco_panoptic.py): images from img_folder (the annotation's
    file name with .jpg), segments from ann_folder's PNG (id = R + 256 G + 256^2 B) and ann_file's segments_info.
    Targets: labels, masks (bool [N, H, W]; with return_masks), boxes = the masks' tight boxes (xyxy, inclusive last
    pixel as official masks_to_boxes), iscrowd, area, image_id, orig_size, size. As official, crowd segments stay
    in the targets and stuff segments are objects like things."""

    def __init__(self, img_folder, ann_folder, ann_file, transforms, num_classes, return_masks=True):
        self.img_folder, self.ann_folder, self.ann_file = Path(img_folder), Path(ann_folder), Path(ann_file)
        for path, what in ((self.img_folder, "image directory"), (self.ann_folder, "panoptic PNG directory"),
                           (self.ann_file, "panoptic annotation file")):
            if not path.exists():
                raise SystemExit(f"COCO panoptic {what} not found: {path}")
        try:
            dataset = json.loads(self.ann_file.read_text())
            self.annotations = sorted(dataset["annotations"], key=lambda a: a["image_id"])
            self.categories = {c["id"]: c for c in dataset["categories"]}
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise SystemExit(f"{self.ann_file}: not a COCO panoptic file ({error!r})") from error
        self.transforms, self.return_masks = transforms, return_masks
        present = {p.name for p in self.img_folder.iterdir()} | {p.name for p in self.ann_folder.iterdir()}
        missing = [name for a in self.annotations for name in (self.image_name(a), a["file_name"])
                   if name not in present]
        if missing:
            raise SystemExit(f"{self.ann_file} references {len(missing)} file(s) missing from {self.img_folder} or "
                             f"{self.ann_folder}, e.g. {missing[:3]}")
        bad_ids = sorted({s["category_id"] for a in self.annotations for s in a["segments_info"]
                          if not 0 <= s["category_id"] < num_classes})
        if bad_ids:
            raise SystemExit(f"{self.ann_file}: category ids {bad_ids[:5]} are outside [0, num_classes={num_classes})"
                             "; set --num_classes to the largest id + 1 (the official build uses 250)")
        self.ids = [a["image_id"] for a in self.annotations]

    @staticmethod
    def image_name(annotation):
        return annotation["file_name"].replace(".png", ".jpg")

    def __len__(self):
        return len(self.annotations)

    def __getitem__(self, idx):
        annotation = self.annotations[idx]
        path = self.img_folder / self.image_name(annotation)
        try:
            image = Image.open(path).convert("RGB")
        except OSError as error:
            raise OSError(f"cannot read image {path}: {error}") from error
        png = self.ann_folder / annotation["file_name"]
        try:
            ids = rgb2id(np.asarray(Image.open(png).convert("RGB")))
        except OSError as error:
            raise OSError(f"cannot read panoptic PNG {png}: {error}") from error
        w, h = image.size
        if ids.shape != (h, w):
            raise ValueError(f"{self.ann_folder / annotation['file_name']}: size {ids.shape[::-1]} differs from its "
                             f"image {path} ({w}x{h})")
        segments = annotation["segments_info"]
        masks = torch.from_numpy(ids[None] == np.array([s["id"] for s in segments]).reshape(-1, 1, 1))
        target = {"image_id": torch.tensor([annotation["image_id"]]),
                  "labels": torch.tensor([s["category_id"] for s in segments], dtype=torch.int64),
                  "boxes": torchvision.ops.masks_to_boxes(masks) if len(segments) else torch.zeros(0, 4),
                  "iscrowd": torch.tensor([s.get("iscrowd", 0) for s in segments], dtype=torch.int64),
                  "area": torch.tensor([s["area"] for s in segments], dtype=torch.float32),
                  "orig_size": torch.as_tensor([h, w]), "size": torch.as_tensor([h, w])}
        if self.return_masks:
            target["masks"] = masks
        return self.transforms(image, target)


def instances_val(args):
    """pycocotools COCO of --coco_path's annotations/instances_val2017.json (box and mask AP ground truth)."""
    from pycocotools.coco import COCO

    path = Path(args.coco_path) / "annotations" / "instances_val2017.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: box and mask AP are computed against the instances file, also for "
                         "--dataset_file coco_panoptic (as the official code)")
    return COCO(str(path))


def build_dataset(image_set, args):
    """COCO 2017 instances (--dataset_file coco) or panoptic (coco_panoptic) for 'train' or 'val'."""
    root = Path(args.coco_path or "")
    if not args.coco_path or not root.is_dir():
        raise SystemExit(f"--coco_path {args.coco_path}: directory not found (expected train2017/, val2017/ "
                                "and annotations/instances_{train,val}2017.json inside)")
    transforms = make_coco_transforms(image_set, args)
    if args.dataset_file == "coco_panoptic":
        panoptic = Path(args.coco_panoptic_path or root)
        return CocoPanoptic(root / f"{image_set}2017", panoptic / f"panoptic_{image_set}2017",
                            panoptic / "annotations" / f"panoptic_{image_set}2017.json", transforms,
                            args.num_classes, return_masks=args.masks)
    return CocoDetection(root / f"{image_set}2017", root / "annotations" / f"instances_{image_set}2017.json",
                         transforms, args.num_classes, return_masks=args.masks)


def collate_fn(batch):
    images, targets = zip(*batch)
    return nested_tensor_from_tensor_list(list(images)), list(targets)


# ---------------------------------------------------------------------------------------------------------------------
# Build (models/detr.py build)
# ---------------------------------------------------------------------------------------------------------------------


def build(args):
    """(model, criterion, postprocessors) as the official build: weight_dict with _i copies for the aux layers
    (the mask weights are copied too, though the criterion computes mask losses on the final layer only); with
    --masks the model is DETRsegm (frozen DETR part with --frozen_weights) and "segm" (+ "panoptic" for
    coco_panoptic) post-processors are added."""
    if args.frozen_weights and not args.masks:
        raise SystemExit("--frozen_weights trains the mask head on a frozen box model: it needs --masks")
    model = DETR(build_backbone(args), build_transformer(args), num_classes=args.num_classes,
                 num_queries=args.num_queries, aux_loss=args.aux_loss)
    if args.masks:
        model = DETRsegm(model, freeze_detr=bool(args.frozen_weights))
    matcher = HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox,
                               cost_giou=args.set_cost_giou)
    weight_dict = {"loss_ce": 1, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
    if args.masks:
        weight_dict.update(loss_mask=args.mask_loss_coef, loss_dice=args.dice_loss_coef)
    if args.aux_loss:
        weight_dict.update({f"{k}_{i}": v for i in range(args.dec_layers - 1) for k, v in list(weight_dict.items())})
    losses = ["labels", "boxes", "cardinality"] + (["masks"] if args.masks else [])
    criterion = SetCriterion(args.num_classes, matcher, weight_dict, args.eos_coef, losses)
    postprocessors = {"bbox": PostProcess()}
    if args.masks:
        postprocessors["segm"] = PostProcessSegm()
        if args.dataset_file == "coco_panoptic":  # COCO panoptic: ids 1..90 are things, the rest stuff
            postprocessors["panoptic"] = PostProcessPanoptic({i: i <= 90 for i in range(args.num_classes + 1)})
    return model, criterion, postprocessors


def param_groups(model, args):
    """Sec. 4: the AdamW groups of the official main.py: the backbone at --lr_backbone, the rest at --lr (frozen
    parameters left out)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in trainable if "backbone" not in n]},
            {"params": [p for n, p in trainable if "backbone" in n], "lr": args.lr_backbone}]


# ---------------------------------------------------------------------------------------------------------------------
# Training and evaluation (engine.py)
# ---------------------------------------------------------------------------------------------------------------------


def targets_to(targets, device):
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, max_norm=0, args=None, scaler=None,
                    global_step=0, header=None, after_step=None, checkpoint=None):
    """One pass over data_loader (from its batch sampler's `start` step on, for a run resumed mid-epoch); returns
    (averaged meters, global step). `header` starts each progress line; `after_step(epoch, steps done in this
    epoch, global step)` runs after every optimizer step (checkpoints, stop signals); a non-finite loss stops the run
    naming the step, every weighted loss term and `checkpoint` (the last good one)."""
    model.train()
    criterion.train()
    logger = training.MetricLogger(delimiter="  ")
    logger.add_meter("lr", training.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    logger.add_meter("class_error", training.SmoothedValue(window_size=1, fmt="{value:.2f}"))
    warmup = getattr(args, "warmup_iters", 0)
    amp = bool(getattr(args, "amp", False))
    header = header or f"Epoch: [{epoch}]"
    batches = logger.log_every(data_loader, getattr(args, "print_freq", 10), header)
    for step, (samples, targets) in enumerate(batches, start=getattr(data_loader.batch_sampler, "start", 0)):
        if global_step < warmup:  # linear warm-up on top of the step schedule
            for group in optimizer.param_groups:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * (global_step + 1) / warmup
        samples, targets = samples.to(device), targets_to(targets, device)
        with training.amp_autocast(device, amp):
            outputs = model(samples)
        loss_dict = criterion(outputs, targets)
        weight_dict = criterion.weight_dict
        losses = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)
        reduced = training.reduce_dict(loss_dict)
        weighted = {k: reduced[k].detach() * weight_dict[k] for k in reduced if k in weight_dict}
        loss_value = sum(weighted.values()).item()
        if not math.isfinite(loss_value):  # the terms are read only then (one device sync each)
            training.check_finite_loss({"loss": loss_value, **weighted},
                                       f"epoch {epoch}, step {step} (iteration {global_step})", checkpoint)
        optimizer.zero_grad()
        if scaler is not None:
            scaler.scale(losses).backward()
            scaler.unscale_(optimizer)
        else:
            losses.backward()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        global_step += 1
        logger.update(loss=loss_value, **{k: v for k, v in reduced.items() if k in weight_dict})
        logger.update(class_error=reduced["class_error"], lr=optimizer.param_groups[0]["lr"])
        if after_step is not None:
            after_step(epoch, step + 1, global_step)
    logger.synchronize_between_processes()
    print("Averaged stats:", logger)
    return {k: meter.global_avg for k, meter in logger.meters.items()}, global_step


COCO_STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def coco_evaluate(coco_gt, results, image_ids, iou_type="bbox"):
    """pycocotools COCOeval ("bbox" or "segm") on results [{image_id, category_id, bbox (xywh) or segmentation
    (RLE), score}], restricted to image_ids; returns the 12 standard numbers in percent (None where undefined),
    named as COCO names them."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {name: 0.0 for name in COCO_STAT_NAMES}
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes([dict(r) for r in results]), iouType=iou_type)  # loadRes edits
    coco_eval.params.imgIds = sorted(image_ids)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    # COCOeval reports -1 where a number is undefined (e.g. no large objects): written as null
    return {name: 100.0 * float(v) if v >= 0 else None for name, v in zip(COCO_STAT_NAMES, coco_eval.stats)}


VOID, OFFSET = 0, 256 ** 3  # panopticapi: id 0 is unlabeled; a (gt, pred) id pair packs as gt * OFFSET + pred


def panoptic_quality(images, categories):
    """PQ, SQ and RQ (Kirillov et al., "Panoptic Segmentation", CVPR 2019) as COCO's panopticapi pq_compute.

    images: (gt_ids [H, W], gt_segments, pred_ids [H, W], pred_segments) per image; segment ids as in the PNGs,
    segments as in the panoptic JSON ({id, category_id}, plus iscrowd and area for the ground truth: its area is
    the JSON's, a prediction's is counted in its PNG). categories: {id: {"isthing": 0 or 1, ...}}.
    A ground-truth and a predicted segment of the same class match when IoU > 0.5, the union leaving out the
    prediction's void pixels; crowd ground truth never matches. Unmatched ground truth is a false negative (crowd
    excepted); an unmatched prediction is a false positive unless more than half of it lies on void or on a crowd
    region of its class. Per class PQ = sum IoU / (TP + FP / 2 + FN / 2), SQ = sum IoU / TP, RQ = TP / (TP + FP / 2
    + FN / 2), averaged over the classes that have any TP, FP or FN. Returns {"All", "Things", "Stuff": {pq, sq,
    rq, n}, "per_class": {id: {pq, sq, rq}}} as fractions. Unlike panopticapi a predicted class missing from
    `categories` is not an error: it counts as a false positive of a class outside every average (no effect),
    and a split without classes averages to 0 instead of dividing by zero.
    """
    tp, fp, fn, iou_sum = defaultdict(int), defaultdict(int), defaultdict(int), defaultdict(float)
    for gt_ids, gt_segments, pred_ids, pred_segments in images:
        gt = {s["id"]: s for s in gt_segments}
        pred = {s["id"]: dict(s, area=0) for s in pred_segments}
        labels, counts = np.unique(pred_ids, return_counts=True)
        for label, count in zip(labels.tolist(), counts.tolist()):
            if label in pred:
                pred[label]["area"] = count
            elif label != VOID:
                raise ValueError(f"segment {label} is in a predicted PNG but not in its segments_info")
        if any(s["area"] == 0 for s in pred.values()):
            raise ValueError(f"segments {[k for k, s in pred.items() if s['area'] == 0]} are in segments_info but "
                             "not in the predicted PNG")
        pairs, counts = np.unique(np.asarray(gt_ids, np.int64) * OFFSET + pred_ids, return_counts=True)
        intersection = {(pair // OFFSET, pair % OFFSET): n for pair, n in zip(pairs.tolist(), counts.tolist())}
        matched_gt, matched_pred = set(), set()
        for (g, q), n in intersection.items():
            if g not in gt or q not in pred or gt[g].get("iscrowd", 0) == 1:
                continue
            if gt[g]["category_id"] != pred[q]["category_id"]:
                continue
            iou = n / (pred[q]["area"] + gt[g]["area"] - n - intersection.get((VOID, q), 0))
            if iou > 0.5:  # at most one match per segment (Kirillov et al., Theorem 1)
                tp[gt[g]["category_id"]] += 1
                iou_sum[gt[g]["category_id"]] += iou
                matched_gt.add(g)
                matched_pred.add(q)
        crowd = {}  # category -> its crowd segment
        for g, segment in gt.items():
            if g in matched_gt:
                continue
            if segment.get("iscrowd", 0) == 1:
                crowd[segment["category_id"]] = g
            else:
                fn[segment["category_id"]] += 1
        for q, segment in pred.items():
            if q in matched_pred:
                continue
            ignored = intersection.get((VOID, q), 0)
            if segment["category_id"] in crowd:
                ignored += intersection.get((crowd[segment["category_id"]], q), 0)
            if ignored / segment["area"] <= 0.5:
                fp[segment["category_id"]] += 1
    results = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        per_class = {}
        for c, info in categories.items():
            if isthing is not None and bool(info["isthing"]) != isthing:
                continue
            denominator = tp[c] + 0.5 * fp[c] + 0.5 * fn[c]
            if denominator > 0:
                per_class[c] = {"pq": iou_sum[c] / denominator, "sq": iou_sum[c] / tp[c] if tp[c] else 0.0,
                                "rq": tp[c] / denominator}
        n = len(per_class)
        results[name] = {k: sum(v[k] for v in per_class.values()) / n if n else 0.0 for k in ("pq", "sq", "rq")}
        results[name]["n"] = n
        if isthing is None:
            results["per_class"] = per_class
    return results


def pq_compute(gt_json, gt_folder, predictions, pred_folder):
    """panoptic_quality of the predictions ([{image_id, file_name, segments_info}], PNGs in pred_folder) against a
    COCO panoptic ground truth (gt_json, PNGs in gt_folder); every ground-truth image needs a prediction."""
    gt_json, gt_folder, pred_folder = Path(gt_json), Path(gt_folder), Path(pred_folder)
    dataset = json.loads(gt_json.read_text())
    predicted = {p["image_id"]: p for p in predictions}
    missing = [a["image_id"] for a in dataset["annotations"] if a["image_id"] not in predicted]
    if missing:
        raise ValueError(f"no panoptic prediction for {len(missing)} image(s) of {gt_json}, e.g. {missing[:3]}")

    def read(path):
        return rgb2id(np.asarray(Image.open(path).convert("RGB")))

    images = ((read(gt_folder / a["file_name"]), a["segments_info"],
               read(pred_folder / predicted[a["image_id"]]["file_name"]), predicted[a["image_id"]]["segments_info"])
              for a in dataset["annotations"])
    return panoptic_quality(images, {c["id"]: c for c in dataset["categories"]})


def _gather(items):
    """Concatenate a list (or merge a dict) over all processes (itself when not distributed)."""
    if training.get_world_size() < 2:
        return items
    gathered = [None] * training.get_world_size()
    dist.all_gather_object(gathered, items)
    if isinstance(items, dict):
        return {k: v for part in gathered for k, v in part.items()}
    return [x for part in gathered for x in part]


@torch.no_grad()
def evaluate(model, criterion, postprocessors, data_loader, coco_gt, device, args=None):
    """Validation losses, COCO box AP, mask AP (with the "segm" post-processor) and PQ (with "panoptic"), as
    engine.evaluate. Results are gathered from every process and evaluated on rank 0. With --output_dir it also
    writes the results in COCO's format: detections_val2017_results.json ([{image_id, category_id, bbox (xywh),
    score}], what COCO's evaluation server and tools read), segmentations_val2017_results.json (the same with
    RLE segmentation) and panoptic_eval/ (predictions.json + PNGs, as panopticapi reads them)."""
    from pycocotools import mask as mask_utils

    model.eval()
    criterion.eval()
    logger = training.MetricLogger(delimiter="  ")
    logger.add_meter("class_error", training.SmoothedValue(window_size=1, fmt="{value:.2f}"))
    output_dir = Path(args.output_dir) if getattr(args, "output_dir", "") else None
    panoptic_dir = None
    if "panoptic" in postprocessors:
        if output_dir is None:
            raise SystemExit("panoptic evaluation writes its PNGs to OUTPUT_DIR/panoptic_eval: give --output_dir")
        panoptic_dir = output_dir / "panoptic_eval"
        panoptic_dir.mkdir(parents=True, exist_ok=True)
    detections, segmentations, panoptic = {}, {}, []
    for samples, targets in logger.log_every(data_loader, getattr(args, "print_freq", 10), "Test:"):
        samples, targets = samples.to(device), targets_to(targets, device)
        with training.amp_autocast(device, bool(getattr(args, "amp", False))):
            outputs = model(samples)
        loss_dict = training.reduce_dict(criterion(outputs, targets))
        weight_dict = criterion.weight_dict
        logger.update(loss=sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict).item(),
                      **{k: v for k, v in loss_dict.items() if k in weight_dict}, class_error=loss_dict["class_error"])
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        sizes = torch.stack([t["size"] for t in targets])
        results = postprocessors["bbox"](outputs, orig_sizes)
        if "segm" in postprocessors:
            results = postprocessors["segm"](results, outputs, orig_sizes, sizes)
        for target, result in zip(targets, results):
            image_id = int(target["image_id"])
            labels, scores = result["labels"].tolist(), result["scores"].tolist()
            xywh = torch.cat([result["boxes"][:, :2], result["boxes"][:, 2:] - result["boxes"][:, :2]], 1).tolist()
            detections[image_id] = [{"image_id": image_id, "category_id": c, "bbox": b, "score": s}
                                    for c, b, s in zip(labels, xywh, scores)]
            if "masks" in result:
                rles = mask_utils.encode(np.asfortranarray(result["masks"][:, 0].permute(1, 2, 0).numpy()))
                segmentations[image_id] = [
                    {"image_id": image_id, "category_id": c, "score": s,
                     "segmentation": dict(rle, counts=rle["counts"].decode("ascii"))}
                    for c, s, rle in zip(labels, scores, rles)]
        if panoptic_dir is not None:
            for target, result in zip(targets, postprocessors["panoptic"](outputs, sizes, orig_sizes)):
                image_id = int(target["image_id"])
                (panoptic_dir / f"{image_id:012d}.png").write_bytes(result["png_string"])
                panoptic.append({"image_id": image_id, "file_name": f"{image_id:012d}.png",
                                 "segments_info": result["segments_info"]})
    logger.synchronize_between_processes()
    print("Averaged stats:", logger)
    # DistributedSampler pads with repeats: merging by image id removes them
    detections, segmentations = _gather(detections), _gather(segmentations)
    panoptic = list({p["image_id"]: p for p in _gather(panoptic)}.values())
    stats = {k: meter.global_avg for k, meter in logger.meters.items()}
    if not training.is_main_process():
        return stats
    image_ids = sorted(detections)
    detections = [d for image_id in image_ids for d in detections[image_id]]
    stats["coco_eval_bbox"] = coco_evaluate(coco_gt, detections, image_ids)
    if output_dir:  # compact, as COCO's result files (100 entries per image)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "detections_val2017_results.json").write_text(json.dumps(detections))
    if "segm" in postprocessors:
        segmentations = [d for image_id in image_ids for d in segmentations[image_id]]
        stats["coco_eval_masks"] = coco_evaluate(coco_gt, segmentations, image_ids, "segm")
        if output_dir:
            (output_dir / "segmentations_val2017_results.json").write_text(json.dumps(segmentations))
    if panoptic_dir is not None:
        dataset = data_loader.dataset
        training.write_json(panoptic_dir / "predictions.json", {"annotations": panoptic})
        pq = pq_compute(dataset.ann_file, dataset.ann_folder, panoptic, panoptic_dir)
        stats.update(PQ_all=pq["All"], PQ_th=pq["Things"], PQ_st=pq["Stuff"])
    return stats


def eval_summary(stats):
    """The eval.json of a run: COCO's 12 box numbers (percent), plus "segm" (mask AP) and "panoptic" (PQ, SQ, RQ
    for all classes, things and stuff, percent) when evaluated."""
    summary = dict(stats["coco_eval_bbox"])
    if "coco_eval_masks" in stats:
        summary["segm"] = stats["coco_eval_masks"]
    if "PQ_all" in stats:
        summary["panoptic"] = {f"{k.upper()}{suffix}": 100 * stats[key][k] for key, suffix in
                               (("PQ_all", ""), ("PQ_th", "_th"), ("PQ_st", "_st")) for k in ("pq", "sq", "rq")}
    return summary


# ---------------------------------------------------------------------------------------------------------------------
# Visualise (Fig. 3 and 6: encoder self-attention, decoder attention per detected object)
# ---------------------------------------------------------------------------------------------------------------------


PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230)]


def _heatmap(image, attention):
    """Blend an attention map [h, w] (any scale) over a PIL image as a black-red-yellow-white heat map."""
    a = attention.float()
    a = ((a - a.min()) / (a.max() - a.min() + 1e-12)).numpy()
    heat = np.stack([np.clip(3 * a, 0, 1), np.clip(3 * a - 1, 0, 1), np.clip(3 * a - 2, 0, 1)], -1)
    heat = Image.fromarray((heat * 255).astype(np.uint8)).resize(image.size, Image.BILINEAR)
    return Image.blend(image, heat, 0.6)


def _panel(images, labels):
    """Tile images in one row with a caption above each."""
    w, h = images[0].size
    canvas = Image.new("RGB", (w * len(images), h + 14), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, label) in enumerate(zip(images, labels)):
        canvas.paste(image, (i * w, 14))
        draw.text((i * w + 2, 1), label, fill="black")
    return canvas


def _request_attention_weights(module, args, kwargs):
    """Forward pre-hook: make nn.MultiheadAttention return its head-averaged weights (the model asks for none)."""
    return args, dict(kwargs, need_weights=True, average_attn_weights=True)


@torch.no_grad()
def visualize(model, image_paths, args, device, category_names=None):
    """For each image, write to OUTPUT_DIR/viz: <name>_boxes.png (detections above --viz_threshold, or the best one),
    <name>_decoder_attention.png (last decoder layer's cross-attention of each detection) and
    <name>_encoder_attention.png (last encoder layer's self-attention at the detections' centres) and, for a
    segmentation model, <name>_masks.png (each detection's mask, sigmoid > 0.5, in its own colour)."""
    model = training.unwrap(model).eval()
    detr_model = model.detr if isinstance(model, DETRsegm) else model
    out_dir = Path(args.output_dir or ".") / "viz"
    out_dir.mkdir(parents=True, exist_ok=True)
    transform = make_coco_transforms("val", args)
    encoder_attn = detr_model.transformer.encoder.layers[-1].self_attn
    decoder_attn = detr_model.transformer.decoder.layers[-1].multihead_attn
    names = category_names or {}
    for path in image_paths:
        path = Path(path)
        try:
            image = Image.open(path).convert("RGB")
        except OSError as error:
            raise SystemExit(f"--viz: cannot read image {path}: {error}") from error
        empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "area": torch.zeros(0),
                 "iscrowd": torch.zeros(0, dtype=torch.int64)}
        tensor, _ = transform(image, empty)
        seen = {}
        hooks = [detr_model.backbone.register_forward_hook(
            lambda m, i, o, seen=seen: seen.update(shape=o[0][-1].tensors.shape[-2:]))]
        for key, module in (("encoder", encoder_attn), ("decoder", decoder_attn)):
            hooks.append(module.register_forward_pre_hook(_request_attention_weights, with_kwargs=True))
            hooks.append(module.register_forward_hook(lambda m, i, o, key=key, seen=seen: seen.update({key: o[1][0]})))
        try:
            outputs = model([tensor.to(device)])
        finally:
            for hook in hooks:
                hook.remove()
        h, w = seen["shape"]
        scores, labels = outputs["pred_logits"][0].softmax(-1)[:, :-1].max(-1)
        keep = (scores > args.viz_threshold).nonzero().flatten()
        if keep.numel() == 0:
            keep = scores.argmax().view(1)
        keep = keep[scores[keep].argsort(descending=True)][:8].cpu()
        boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"][0, keep].float().cpu()) * torch.tensor([*image.size] * 2)
        drawn = image.copy()
        draw = ImageDraw.Draw(drawn)
        captions = []
        for q, box in zip(keep.tolist(), boxes.tolist()):
            caption = f"{names.get(int(labels[q]), int(labels[q]))} {scores[q]:.2f}"
            captions.append(f"query {q}: {caption}")
            draw.rectangle(box, outline="red", width=2)
            draw.text((box[0] + 2, box[1] + 1), caption, fill="red")
        drawn.save(out_dir / f"{path.stem}_boxes.png")
        decoder_maps = [_heatmap(image, seen["decoder"][q].view(h, w).cpu()) for q in keep.tolist()]
        _panel(decoder_maps, captions).save(out_dir / f"{path.stem}_decoder_attention.png")
        centres = ((boxes[:, :2] + boxes[:, 2:]) / 2 / torch.tensor([*image.size]) * torch.tensor([w, h])).long()
        points = [(min(int(y), h - 1), min(int(x), w - 1)) for x, y in centres.tolist()]
        encoder_maps = [_heatmap(image, seen["encoder"][y * w + x].view(h, w).cpu()) for y, x in points]
        _panel(encoder_maps, [f"self-attention at feature ({y}, {x})" for y, x in points]).save(
            out_dir / f"{path.stem}_encoder_attention.png")
        if "pred_masks" in outputs:
            masks = F.interpolate(outputs["pred_masks"][:1, keep.to(outputs["pred_masks"].device)].float(),
                                  size=tuple(tensor.shape[-2:]), mode="bilinear", align_corners=False)[0]
            masks = F.interpolate((masks.sigmoid() > 0.5).float()[None].cpu(), size=image.size[::-1])[0].bool()
            overlay = np.asarray(image).astype(np.float32)
            for k, mask in enumerate(masks.numpy()):  # later detections drawn over earlier ones
                overlay[mask] = 0.4 * overlay[mask] + 0.6 * np.array(PALETTE[k % len(PALETTE)])
            drawn = Image.fromarray(overlay.astype(np.uint8))
            draw = ImageDraw.Draw(drawn)
            for k, (box, caption) in enumerate(zip(boxes.tolist(), captions)):
                draw.text((box[0] + 2, box[1] + 1), caption.split(": ", 1)[1], fill=PALETTE[k % len(PALETTE)])
            drawn.save(out_dir / f"{path.stem}_masks.png")
        print(f"--viz: wrote {out_dir}/{path.stem}_{{boxes,decoder_attention,encoder_attention"
              f"{',masks' if 'pred_masks' in outputs else ''}}}.png ({len(keep)} detection(s))")


# ---------------------------------------------------------------------------------------------------------------------
# Main (main.py)
# ---------------------------------------------------------------------------------------------------------------------


IDENTITY_ARGS = ("task", "backbone", "model", "depths", "embed_dims", "hidden_dim", "enc_layers", "dec_layers",
                 "num_queries", "num_classes", "masks")


def run_identity(args, build):
    """What a checkpoint must match to be resumed here (common/training.py check_identity): the script whose
    `build` made the model (detr.py, or pvt.py for PVT+DETR) and the arguments that decide its state dict's shapes."""
    identity = {"script": Path(inspect.getfile(build)).name}
    return identity | {k: getattr(args, k) for k in IDENTITY_ARGS if getattr(args, k, None) is not None}


def main(args, build=build, build_dataset=build_dataset):
    """Train or evaluate (--eval) a DETR; pvt.py passes its own `build` and `build_dataset` (PVT+DETR) and so
    trains with this same driver.

    Training checkpoints (OUTPUT_DIR/checkpoint.pth, at each epoch's end and every --checkpoint_every steps) hold
    the step within the epoch and every process's random generators; the training batches and their augmentation
    are a function of (seed, epoch, position), so --resume continues the same run (bit for bit with
    --deterministic). SIGTERM / SIGINT save a checkpoint after the current step and stop."""
    training.init_distributed(args)
    device = training.resolve_device(args.device)
    if args.deterministic:
        training.make_deterministic()
    training.seed_everything(args.seed)
    if args.eval and not args.resume:
        print("warning: --eval without --resume evaluates an untrained model"
              + (" (mask head; the box model from --frozen_weights)" if args.frozen_weights else ""))
    model, criterion, postprocessors = build(args)
    model.to(device)
    criterion.to(device)
    training.compile_model(model, args.compile)
    if args.backbone.startswith("resnet") and not args.pretrained_backbone and not args.resume:
        print("note: no --pretrained_backbone given, the ResNet starts from random weights (the paper uses ImageNet)")
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=None if args.gpu is None else [args.gpu])
        model_without_ddp = model.module
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print("number of params:", n_parameters)
    # Sec. 4: AdamW, backbone at lr_backbone, step decay by 10 at lr_drop; fused: one kernel for all parameters
    optimizer = torch.optim.AdamW(param_groups(model_without_ddp, args), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=True)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    scaler = training.grad_scaler(device, args.amp)
    identity = run_identity(args, build)
    global_step, start_step, rng = 0, 0, None
    if args.frozen_weights:  # Sec. 4.4: the mask head trains on a trained, frozen box model
        checkpoint = training.load_checkpoint(args.frozen_weights)
        if "model" not in checkpoint:
            raise SystemExit(f"--frozen_weights {args.frozen_weights}: expected a dict with a 'model' state dict")
        training.load_model_state(model_without_ddp.detr, checkpoint["model"],
                                  f"--frozen_weights {args.frozen_weights}")
        print(f"box model loaded from {args.frozen_weights} and frozen: only the mask head trains")
    if args.resume:
        checkpoint = training.load_checkpoint(args.resume)
        if "model" not in checkpoint:
            raise SystemExit(f"--resume {args.resume}: expected a dict with a 'model' state dict")
        training.check_identity(checkpoint, identity, f"--resume {args.resume}")
        training.load_model_state(model_without_ddp, checkpoint["model"], args.resume)
        if not args.eval and all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
            start_step, rng = training.resume_run(checkpoint, args, optimizer, lr_scheduler, scaler)
            global_step = checkpoint.get("global_step", 0)
        print(f"resumed from {args.resume} (start epoch {args.start_epoch}, step {start_step})")
    if args.viz is not None and not args.coco_path:  # pictures only
        if not args.viz:
            raise SystemExit("--viz without images needs --coco_path (it draws the first validation image)")
        visualize(model, args.viz, args, device)
        return

    dataset_val = build_dataset("val", args)
    sampler_val = (torch.utils.data.DistributedSampler(dataset_val, shuffle=False) if args.distributed
                   else torch.utils.data.SequentialSampler(dataset_val))
    loader_val = torch.utils.data.DataLoader(dataset_val, args.batch_size, sampler=sampler_val, drop_last=False,
                                             collate_fn=collate_fn, num_workers=args.num_workers,
                                             generator=training.loader_generator(args.seed))
    output_dir = Path(args.output_dir) if args.output_dir else None
    # box and mask AP against the instances file; for coco_panoptic the one under --coco_path, as official
    coco_gt = getattr(dataset_val, "coco", None) or instances_val(args)

    def evaluate_and_save(epoch):
        stats = evaluate(model, criterion, postprocessors, loader_val, coco_gt, device, args)
        if output_dir and "coco_eval_bbox" in stats:
            training.write_json(output_dir / "eval.json", eval_summary(stats))
        return stats

    def draw():
        if args.viz is not None:
            first = dataset_val.img_folder / coco_gt.imgs[dataset_val.ids[0]]["file_name"]
            names = {c["id"]: c["name"] for c in getattr(dataset_val, "categories", coco_gt.cats).values()}
            visualize(model, args.viz or [first], args, device, names)

    if args.eval:
        test_stats = evaluate_and_save(args.start_epoch)
        training.append_log(args.output_dir, {**{f"test_{k}": v for k, v in test_stats.items()},
                                              "n_parameters": n_parameters})
        draw()
        return test_stats

    dataset_train = build_dataset("train", args)
    # DistributedSampler's order (one permutation per epoch, dealt out to the processes) with every sample's
    # augmentation seeded by its place in the epoch, so a resumed run reads what the uninterrupted one read
    sampler_train = training.ResumableBatchSampler(len(dataset_train), args.batch_size, seed=args.seed)
    if sampler_train.batches_per_epoch() == 0:
        raise SystemExit(f"{len(dataset_train)} training images per process is less than --batch_size "
                         f"{args.batch_size}")
    loader_train = torch.utils.data.DataLoader(training.SeededDataset(dataset_train), batch_sampler=sampler_train,
                                               collate_fn=collate_fn, num_workers=args.num_workers,
                                               generator=training.loader_generator(args.seed))
    checkpoint_path = output_dir / "checkpoint.pth" if output_dir else None

    save = training.epoch_saver(checkpoint_path, identity=identity, args=args, model=model_without_ddp,
                                optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=scaler,
                                global_step=lambda: global_step)

    epochs = training.ResumableEpochs(args, sampler_train, start_step, rng, save, checkpoint_path)

    def after_step(epoch, done, step_count):
        """After each optimizer step: the global step count (the checkpoint holds it), then the loop's checkpoint or
        stop."""
        nonlocal global_step
        global_step = step_count
        epochs.after_step(epoch, done)

    print("Start training")
    start_time = time.time()
    test_stats = {}
    for epoch in epochs:  # each epoch's checkpoint after its evaluation, whose resizing draws from `random`
        header = f"Epoch: [{epoch}] of {args.epochs}"
        if epoch > args.start_epoch:  # the whole run's remaining time, from the epochs so far (evaluations too)
            eta = (time.time() - start_time) / (epoch - args.start_epoch) * (args.epochs - epoch)
            header += f", run eta {datetime.timedelta(seconds=int(eta))}"
        train_stats, global_step = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch,
                                                   args.clip_max_norm, args, scaler, global_step, header,
                                                   after_step, checkpoint_path)
        lr_scheduler.step()
        last = epoch == args.epochs - 1
        test_stats = evaluate_and_save(epoch) if last or (epoch + 1) % args.eval_every == 0 else {}
        training.append_log(args.output_dir, {**{f"train_{k}": v for k, v in train_stats.items()},
                                              **{f"test_{k}": v for k, v in test_stats.items()},
                                              "epoch": epoch, "n_parameters": n_parameters})
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    draw()
    return test_stats


if __name__ == "__main__":
    main(get_args_parser().parse_args())
