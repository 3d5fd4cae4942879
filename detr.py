"""DETR: End-to-End Object Detection with Transformers.

Carion, Massa, Synnaeve, Usunier, Kirillov, Zagoruyko. ECCV 2020. arXiv:2005.12872.
Official code: https://github.com/facebookresearch/detr (described at commit 29901c51).

What this file reproduces: the DETR detector (ResNet backbone with frozen batch norm, sine positional encoding,
post-norm transformer encoder-decoder, 100 object queries, class and box heads), its set criterion (Hungarian
matching, cross-entropy with a down-weighted no-object class, L1 + GIoU box losses, auxiliary decoding losses),
COCO training with the paper's augmentation, and COCO box evaluation with pycocotools.
Status: numerically identical to the official code on the parity fixture `tests/fixtures/detr_r50.pt` (outputs,
every loss, post-processing, matcher indices within 1e-4); the released `detr-r50-e632da11.pth` loads strictly.
The paper's 42.0 AP (R50, 500 epochs on 16 V100s) is not reproduced here (no GPU). The synthetic demo (a small
DETR trained from scratch for 1000 steps) reaches 6.65 box AP (2 seeds; README.md).

Real data (COCO 2017 under /data/coco: train2017/, val2017/, annotations/instances_{train,val}2017.json):
    python detr.py --coco_path /data/coco --output_dir outputs/detr --pretrained_backbone resnet50-0676ba61.pth
    torchrun --nproc_per_node 8 detr.py --coco_path /data/coco --output_dir outputs/detr
    python detr.py --coco_path /data/coco --eval --resume detr-r50-e632da11.pth --no_aux_loss --output_dir out
    python detr.py --resume detr-r50-e632da11.pth --viz image.jpg --output_dir out   # boxes + attention PNGs
Synthetic demo (small backbone and transformer, same code path, flags only): `make demo-detr` (demos/detr.sh).

Differences from the official code:
- No segmentation head (`--masks`, panoptic), no `--frozen_weights`; box detection only.
- The ImageNet backbone is loaded from a file you give (`--pretrained_backbone`), never downloaded; without one the
  backbone starts from random weights and the run says so.
- Additions, all off by default: `--backbone convstem` (a light, fully trainable conv backbone with coordinate
  input channels, for CPU demos), `--warmup_iters` (linear learning-rate warm-up), `--scales/--max_size/
  --crop_scales/--crop_size` (the augmentation sizes, defaults as in the paper), `--num_classes` (default 91 as the
  official `build`), `--amp`, `--viz`, `--eval_every`.
- `RandomSizeCrop` clamps its lower size to the image size, so images smaller than 384 px do not crash it (the
  official code raises there); identical otherwise.
- Attention runs with `need_weights=False` (PyTorch's fused kernel); attention maps for `--viz` are requested by
  forward hooks only when drawing.
"""
import argparse
import datetime
import json
import math
import random
import time
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


def get_args_parser():
    parser = argparse.ArgumentParser("DETR: End-to-End Object Detection with Transformers", add_help=True)
    # optimisation (Sec. 4, "Technical details")
    parser.add_argument("--lr", default=1e-4, type=float)
    parser.add_argument("--lr_backbone", default=1e-5, type=float)
    parser.add_argument("--batch_size", default=2, type=int, help="images per process (paper: 4 per GPU x 16)")
    parser.add_argument("--weight_decay", default=1e-4, type=float)
    parser.add_argument("--epochs", default=300, type=int)
    parser.add_argument("--lr_drop", default=200, type=int)
    parser.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm")
    parser.add_argument("--warmup_iters", default=0, type=int, help="linear lr warm-up iterations (not in the paper)")
    # model (Sec. 3.2)
    parser.add_argument("--backbone", default="resnet50", type=str,
                        help="torchvision ResNet name (resnet18/34/50/101), or 'convstem' (light trainable CNN)")
    parser.add_argument("--dilation", action="store_true", help="DC5: dilate the last stage instead of striding")
    parser.add_argument("--position_embedding", default="sine", type=str, choices=("sine", "learned"))
    parser.add_argument("--pretrained_backbone", default="", type=str,
                        help="torchvision ImageNet ResNet state dict (.pth) to start the backbone from")
    parser.add_argument("--enc_layers", default=6, type=int)
    parser.add_argument("--dec_layers", default=6, type=int)
    parser.add_argument("--dim_feedforward", default=2048, type=int)
    parser.add_argument("--hidden_dim", default=256, type=int)
    parser.add_argument("--dropout", default=0.1, type=float)
    parser.add_argument("--nheads", default=8, type=int)
    parser.add_argument("--num_queries", default=100, type=int)
    parser.add_argument("--pre_norm", action="store_true")
    parser.add_argument("--num_classes", default=91, type=int,
                        help="max category id + 1 (91 for COCO, as the official build; index num_classes = no object)")
    # loss (Sec. 3.1, Appendix A.2)
    parser.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                        help="disable the auxiliary decoding losses (one per decoder layer)")
    parser.add_argument("--set_cost_class", default=1, type=float, help="class weight in the matching cost")
    parser.add_argument("--set_cost_bbox", default=5, type=float, help="L1 box weight in the matching cost")
    parser.add_argument("--set_cost_giou", default=2, type=float, help="GIoU weight in the matching cost")
    parser.add_argument("--bbox_loss_coef", default=5, type=float)
    parser.add_argument("--giou_loss_coef", default=2, type=float)
    parser.add_argument("--eos_coef", default=0.1, type=float, help="relative weight of the no-object class")
    # data (Sec. 4: shortest side 480..800, longest <= 1333; random crops with p 0.5)
    parser.add_argument("--coco_path", "--data_root", dest="coco_path", type=str, default=None)
    parser.add_argument("--scales", default=list(range(480, 801, 32)), type=int, nargs="+",
                        help="training short-side sizes; evaluation uses the largest")
    parser.add_argument("--max_size", default=1333, type=int, help="longest side after resizing")
    parser.add_argument("--crop_scales", default=[400, 500, 600], type=int, nargs="+", help="resize before the crop")
    parser.add_argument("--crop_size", default=[384, 600], type=int, nargs=2, help="random crop side range")
    # run
    parser.add_argument("--output_dir", default="", help="where to save log.txt, checkpoint.pth, eval.json, PNGs")
    parser.add_argument("--device", default=None, help="cuda, cpu or mps (default: cuda when available)")
    parser.add_argument("--seed", default=42, type=int)
    parser.add_argument("--resume", default="", help="checkpoint.pth of a run, or an official {'model': ...} file")
    parser.add_argument("--start_epoch", default=0, type=int)
    parser.add_argument("--eval", action="store_true", help="only evaluate (the model given by --resume)")
    parser.add_argument("--eval_every", default=1, type=int, help="evaluate every N epochs (and after the last)")
    parser.add_argument("--num_workers", default=2, type=int)
    parser.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 on CUDA)")
    parser.add_argument("--viz", nargs="*", default=None, metavar="IMAGE",
                        help="write box and attention PNGs for these images (default: the first val image)")
    parser.add_argument("--viz_threshold", default=0.7, type=float, help="score above which a detection is drawn")
    parser.add_argument("--print_freq", default=10, type=int)
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
        return x * scale + bias


class ConvStem(nn.Module):
    """A light backbone for CPU demos (not in the paper), trained from scratch: four stride-2 3x3 conv + BatchNorm +
    ReLU stages (total stride 16). Named layer1..layer4 like a ResNet so that Backbone can return intermediate
    layers.

    Its input is the image plus two coordinate channels (CoordConv, Liu et al. 2018; see `with_coordinates`). DETR
    adds positional encodings to attention queries and keys only, so box positions must be read from the features
    themselves; a deep ResNet learns absolute position from its zero padding, a four-layer stem (receptive field 31
    px) hardly can. On the DETR demo the coordinates raised box AP after 1000 steps from 12.0 / 9.5 to 15.4 / 17.1
    (seeds 0 / 1)."""

    def __init__(self, widths=(32, 64, 128, 256)):
        super().__init__()
        for i, (c_in, c_out) in enumerate(zip((5,) + tuple(widths[:-1]), widths)):
            self.add_module(f"layer{i + 1}", nn.Sequential(nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False),
                                                           nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)))

    @staticmethod
    def with_coordinates(images, mask):
        """[B, 3, H, W] images -> [B, 5, H, W]: y and x rising to 1 across each image's own (unpadded) area."""
        valid = (~mask).to(images.dtype)[:, None]
        y = valid.cumsum(2) / valid.sum(2, keepdim=True).clamp(min=1)
        x = valid.cumsum(3) / valid.sum(3, keepdim=True).clamp(min=1)
        return torch.cat([images, 2 * y - 1, 2 * x - 1], 1)


class Backbone(nn.Module):
    """ResNet with frozen batch norm (torchvision, via IntermediateLayerGetter), or the light ConvStem.

    Returns {name: NestedTensor} with the padding mask resized (nearest) to each feature map: only layer4 ('0'), or
    layer1..layer4 ('0'..'3') with return_interm_layers. As the official code, only layer2..layer4 of a ResNet train
    (conv1, bn1 and layer1 stay frozen); nothing trains when train_backbone is False.
    """

    def __init__(self, name, train_backbone, return_interm_layers, dilation):
        super().__init__()
        self.name = name
        if name == "convstem":
            backbone, trainable = ConvStem(), ("layer",)
            self.num_channels, self.strides = 256, [2, 4, 8, 16]
        elif name.startswith("resnet"):
            if dilation and name in ("resnet18", "resnet34"):
                raise ValueError(f"--dilation needs a bottleneck ResNet (resnet50/101), not {name}")
            backbone = getattr(torchvision.models, name)(weights=None, norm_layer=FrozenBatchNorm2d,
                                                         replace_stride_with_dilation=[False, False, dilation])
            trainable = ("layer2", "layer3", "layer4")
            self.num_channels = 512 if name in ("resnet18", "resnet34") else 2048
            self.strides = [4, 8, 16, 16 if dilation else 32]
        else:
            raise ValueError(f"--backbone {name}: expected a torchvision ResNet name or 'convstem'")
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
        if self.name == "convstem":
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


def build_backbone(args):
    backbone = Backbone(args.backbone, train_backbone=args.lr_backbone > 0,
                        return_interm_layers=getattr(args, "masks", False), dilation=getattr(args, "dilation", False))
    pretrained = getattr(args, "pretrained_backbone", "")
    if pretrained:
        state = training.load_checkpoint(pretrained)
        state = {k: v for k, v in state.get("model", state).items()
                 if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}  # no classifier, frozen BN
        missing, unexpected = training.load_model_state(backbone.body, state, pretrained, strict=False)
        print(f"backbone initialised from {pretrained} (missing {len(missing)}, unexpected {len(unexpected)} keys)")
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
    when return_intermediate (the auxiliary losses decode each of them)."""

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
        if self.return_intermediate:
            return torch.stack(intermediate)  # [L, Q, B, C]
        return self.norm(tgt).unsqueeze(0)


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

    def forward(self, src, mask, query_embed, pos_embed):
        """src, pos_embed [B, C, H, W], mask [B, H, W], query_embed [Q, C] -> (hs [L, B, Q, C], memory [B, C, H, W])"""
        bs, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)  # [HW, B, C]
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        query_embed = query_embed.unsqueeze(1).repeat(1, bs, 1)  # [Q, B, C]
        mask = mask.flatten(1)  # [B, HW]
        tgt = torch.zeros_like(query_embed)  # the decoder input starts at zero; queries enter as positions
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed)
        hs = self.decoder(tgt, memory, memory_key_padding_mask=mask, pos=pos_embed, query_pos=query_embed)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).view(bs, c, h, w)


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
        if isinstance(samples, (list, tuple)):
            samples = nested_tensor_from_tensor_list(samples)
        elif isinstance(samples, torch.Tensor):
            samples = nested_tensor_from_tensor_list(list(samples))
        features, pos = self.backbone(samples)
        src, mask = features[-1].decompose()
        hs = self.transformer(self.input_proj(src), mask, self.query_embed.weight, pos[-1])[0]  # [L, B, Q, C]
        outputs_class = self.class_embed(hs)  # [L, B, Q, num_classes + 1]
        outputs_coord = self.bbox_embed(hs).sigmoid()  # [L, B, Q, 4]
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Set prediction loss (Sec. 3.1, Eq. 1-2) and post-processing
# ---------------------------------------------------------------------------------------------------------------------


class SetCriterion(nn.Module):
    """Hungarian loss: match predictions to targets, then cross-entropy on classes (no-object weight eos_coef) and
    L1 + GIoU on the matched boxes; the same on every auxiliary decoder output, each with its own matching.

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


# ---------------------------------------------------------------------------------------------------------------------
# Data (Sec. 4 and Appendix A.4): COCO 2017 via pycocotools, the paper's augmentation
# ---------------------------------------------------------------------------------------------------------------------

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def crop(image, target, region):
    """Crop a PIL image to region (top, left, height, width); boxes are shifted, clipped, and empty ones removed."""
    top, left, h, w = region
    target = dict(target, size=torch.tensor([h, w]))
    boxes = target["boxes"] - torch.as_tensor([left, top, left, top])
    boxes = torch.min(boxes.reshape(-1, 2, 2), torch.as_tensor([w, h], dtype=torch.float32)).clamp(min=0)
    target["boxes"] = boxes.reshape(-1, 4)
    target["area"] = (boxes[:, 1, :] - boxes[:, 0, :]).prod(dim=1)
    keep = torch.all(boxes[:, 1, :] > boxes[:, 0, :], dim=1)
    for field in ("boxes", "labels", "area", "iscrowd"):
        target[field] = target[field][keep]
    return TF.crop(image, top, left, h, w), target


def hflip(image, target):
    w, _ = image.size
    boxes = target["boxes"][:, [2, 1, 0, 3]] * torch.as_tensor([-1, 1, -1, 1]) + torch.as_tensor([w, 0, w, 0])
    return TF.hflip(image), dict(target, boxes=boxes)


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


class CocoDetection(torch.utils.data.Dataset):
    """COCO detection images and targets as DETR uses them: crowd annotations dropped, xywh -> xyxy clipped to the
    image, zero-area boxes dropped (counted and reported once), labels = raw category ids, plus image_id, area,
    iscrowd, orig_size and size (both (h, w)). Images without objects are kept."""

    def __init__(self, img_folder, ann_file, transforms, num_classes):
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
        self.img_folder, self.transforms = img_folder, transforms
        present = {p.name for p in img_folder.iterdir()}
        missing = [self.coco.imgs[i]["file_name"] for i in self.ids if self.coco.imgs[i]["file_name"] not in present]
        if missing:
            raise SystemExit(f"{ann_file} references {len(missing)} image(s) missing from {img_folder}, "
                                    f"e.g. {missing[:3]}")
        anns = self.coco.dataset.get("annotations", [])
        bad_ids = sorted({a["category_id"] for a in anns if not 0 <= a["category_id"] < num_classes})
        if bad_ids:
            raise SystemExit(f"{ann_file}: category ids {bad_ids[:5]} are outside [0, num_classes={num_classes}); "
                             f"set --num_classes to the largest id + 1")
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
        return self.transforms(image, target)


def build_dataset(image_set, args):
    root = Path(args.coco_path or "")
    if not args.coco_path or not root.is_dir():
        raise SystemExit(f"--coco_path {args.coco_path}: directory not found (expected train2017/, val2017/ "
                                "and annotations/instances_{train,val}2017.json inside)")
    return CocoDetection(root / f"{image_set}2017", root / "annotations" / f"instances_{image_set}2017.json",
                         make_coco_transforms(image_set, args), args.num_classes)


def collate_fn(batch):
    images, targets = zip(*batch)
    return nested_tensor_from_tensor_list(list(images)), list(targets)


# ---------------------------------------------------------------------------------------------------------------------
# Build (models/detr.py build)
# ---------------------------------------------------------------------------------------------------------------------


def build(args):
    """(model, criterion, postprocessors) as the official build: weight_dict with _i copies for the aux layers."""
    model = DETR(build_backbone(args), build_transformer(args), num_classes=args.num_classes,
                 num_queries=args.num_queries, aux_loss=args.aux_loss)
    matcher = HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox,
                               cost_giou=args.set_cost_giou)
    weight_dict = {"loss_ce": 1, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
    if args.aux_loss:
        weight_dict.update({f"{k}_{i}": v for i in range(args.dec_layers - 1) for k, v in list(weight_dict.items())})
    criterion = SetCriterion(args.num_classes, matcher, weight_dict, args.eos_coef)
    return model, criterion, {"bbox": PostProcess()}


# ---------------------------------------------------------------------------------------------------------------------
# Training and evaluation (engine.py)
# ---------------------------------------------------------------------------------------------------------------------


def targets_to(targets, device):
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, max_norm=0, args=None, scaler=None,
                    global_step=0):
    """One pass over data_loader; returns (averaged meters, global step)."""
    model.train()
    criterion.train()
    logger = training.MetricLogger(delimiter="  ")
    logger.add_meter("lr", training.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    logger.add_meter("class_error", training.SmoothedValue(window_size=1, fmt="{value:.2f}"))
    warmup = getattr(args, "warmup_iters", 0)
    amp = bool(getattr(args, "amp", False))
    for samples, targets in logger.log_every(data_loader, getattr(args, "print_freq", 10), f"Epoch: [{epoch}]"):
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
        loss_value = sum(reduced[k] * weight_dict[k] for k in reduced if k in weight_dict).item()
        if not math.isfinite(loss_value):
            raise SystemExit(f"loss is {loss_value} at epoch {epoch}, step {global_step}: stopping "
                             f"({ {k: round(v.item(), 4) for k, v in reduced.items()} })")
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
    logger.synchronize_between_processes()
    print("Averaged stats:", logger)
    return {k: meter.global_avg for k, meter in logger.meters.items()}, global_step


COCO_STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def coco_evaluate(coco_gt, detections, image_ids):
    """pycocotools COCOeval (bbox) on detections [{image_id, category_id, bbox (xywh), score}], restricted to
    image_ids; returns the 12 standard numbers in percent (None where undefined), named as COCO names them."""
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return {name: 0.0 for name in COCO_STAT_NAMES}
    coco_dt = coco_gt.loadRes(detections)
    coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
    coco_eval.params.imgIds = sorted(image_ids)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    # COCOeval reports -1 where a number is undefined (e.g. no large objects): written as null
    return {name: 100.0 * float(v) if v >= 0 else None for name, v in zip(COCO_STAT_NAMES, coco_eval.stats)}


@torch.no_grad()
def evaluate(model, criterion, postprocessors, data_loader, coco_gt, device, args=None):
    """Validation losses and COCO box AP (results gathered from every process, evaluated on rank 0)."""
    model.eval()
    criterion.eval()
    logger = training.MetricLogger(delimiter="  ")
    logger.add_meter("class_error", training.SmoothedValue(window_size=1, fmt="{value:.2f}"))
    detections = {}
    for samples, targets in logger.log_every(data_loader, getattr(args, "print_freq", 10), "Test:"):
        samples, targets = samples.to(device), targets_to(targets, device)
        with training.amp_autocast(device, bool(getattr(args, "amp", False))):
            outputs = model(samples)
        loss_dict = training.reduce_dict(criterion(outputs, targets))
        weight_dict = criterion.weight_dict
        logger.update(loss=sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict).item(),
                      **{k: v for k, v in loss_dict.items() if k in weight_dict}, class_error=loss_dict["class_error"])
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        for target, result in zip(targets, postprocessors["bbox"](outputs, orig_sizes)):
            xywh = torch.cat([result["boxes"][:, :2], result["boxes"][:, 2:] - result["boxes"][:, :2]], 1).tolist()
            detections[int(target["image_id"])] = [
                {"image_id": int(target["image_id"]), "category_id": int(c), "bbox": b, "score": float(s)}
                for c, b, s in zip(result["labels"].tolist(), xywh, result["scores"].tolist())]
    logger.synchronize_between_processes()
    print("Averaged stats:", logger)
    if training.get_world_size() > 1:  # DistributedSampler pads with repeats: merging by image id removes them
        gathered = [None] * training.get_world_size()
        dist.all_gather_object(gathered, detections)
        detections = {k: v for part in gathered for k, v in part.items()}
    stats = {k: meter.global_avg for k, meter in logger.meters.items()}
    if training.is_main_process():
        stats["coco_eval_bbox"] = coco_evaluate(coco_gt, [d for v in detections.values() for d in v], detections)
    return stats


# ---------------------------------------------------------------------------------------------------------------------
# Visualise (Fig. 3 and 6: encoder self-attention, decoder attention per detected object)
# ---------------------------------------------------------------------------------------------------------------------


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
    <name>_encoder_attention.png (last encoder layer's self-attention at the detections' centres)."""
    model = training.unwrap(model).eval()
    out_dir = Path(args.output_dir or ".") / "viz"
    out_dir.mkdir(parents=True, exist_ok=True)
    transform = make_coco_transforms("val", args)
    encoder_attn = model.transformer.encoder.layers[-1].self_attn
    decoder_attn = model.transformer.decoder.layers[-1].multihead_attn
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
        hooks = [model.backbone.register_forward_hook(
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
        print(f"--viz: wrote {out_dir}/{path.stem}_{{boxes,decoder_attention,encoder_attention}}.png "
              f"({len(keep)} detection(s))")


# ---------------------------------------------------------------------------------------------------------------------
# Main (main.py)
# ---------------------------------------------------------------------------------------------------------------------


def main(args, build=build, build_dataset=build_dataset):
    """Train or evaluate (--eval) a DETR; pvt.py passes its own `build` and `build_dataset` (PVT+DETR) and so
    trains with this same driver."""
    training.init_distributed(args)
    device = training.resolve_device(args.device)
    training.seed_everything(args.seed)
    if args.eval and not args.resume:
        print("warning: --eval without --resume evaluates an untrained model")
    model, criterion, postprocessors = build(args)
    model.to(device)
    criterion.to(device)
    if args.backbone.startswith("resnet") and not args.pretrained_backbone and not args.resume:
        print("note: no --pretrained_backbone given, the ResNet starts from random weights (the paper uses ImageNet)")
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=None if args.gpu is None else [args.gpu])
        model_without_ddp = model.module
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print("number of params:", n_parameters)
    # Sec. 4: AdamW, backbone at lr_backbone, step decay by 10 at lr_drop
    param_dicts = [
        {"params": [p for n, p in model_without_ddp.named_parameters() if "backbone" not in n and p.requires_grad]},
        {"params": [p for n, p in model_without_ddp.named_parameters() if "backbone" in n and p.requires_grad],
         "lr": args.lr_backbone}]
    optimizer = torch.optim.AdamW(param_dicts, lr=args.lr, weight_decay=args.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    scaler = training.grad_scaler(device, args.amp)
    global_step = 0
    if args.resume:
        checkpoint = training.load_checkpoint(args.resume)
        if "model" not in checkpoint:
            raise SystemExit(f"--resume {args.resume}: expected a dict with a 'model' state dict")
        training.load_model_state(model_without_ddp, checkpoint["model"], args.resume)
        if not args.eval and all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
            optimizer.load_state_dict(checkpoint["optimizer"])
            lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
            args.start_epoch = checkpoint["epoch"] + 1
            global_step = checkpoint.get("global_step", 0)
            training.restore_rng(checkpoint.get("rng"))
        print(f"resumed from {args.resume} (start epoch {args.start_epoch})")
    if args.viz is not None and not args.coco_path:  # pictures only
        if not args.viz:
            raise SystemExit("--viz without images needs --coco_path (it draws the first validation image)")
        visualize(model, args.viz, args, device)
        return

    dataset_val = build_dataset("val", args)
    sampler_val = (torch.utils.data.DistributedSampler(dataset_val, shuffle=False) if args.distributed
                   else torch.utils.data.SequentialSampler(dataset_val))
    loader_val = torch.utils.data.DataLoader(dataset_val, args.batch_size, sampler=sampler_val, drop_last=False,
                                             collate_fn=collate_fn, num_workers=args.num_workers)
    output_dir = Path(args.output_dir) if args.output_dir else None

    def evaluate_and_save(epoch):
        stats = evaluate(model, criterion, postprocessors, loader_val, dataset_val.coco, device, args)
        if output_dir and "coco_eval_bbox" in stats:
            training.write_json(output_dir / "eval.json", stats["coco_eval_bbox"])
        return stats

    def draw():
        if args.viz is not None:
            first = dataset_val.img_folder / dataset_val.coco.imgs[dataset_val.ids[0]]["file_name"]
            names = {c["id"]: c["name"] for c in dataset_val.coco.dataset.get("categories", [])}
            visualize(model, args.viz or [first], args, device, names)

    if args.eval:
        test_stats = evaluate_and_save(args.start_epoch)
        training.append_log(args.output_dir, {**{f"test_{k}": v for k, v in test_stats.items()},
                                              "n_parameters": n_parameters})
        draw()
        return test_stats

    dataset_train = build_dataset("train", args)
    sampler_train = (torch.utils.data.DistributedSampler(dataset_train) if args.distributed
                     else torch.utils.data.RandomSampler(dataset_train))
    batch_sampler = torch.utils.data.BatchSampler(sampler_train, args.batch_size, drop_last=True)
    if len(batch_sampler) == 0:
        raise SystemExit(f"{len(dataset_train)} training images per process is less than --batch_size "
                         f"{args.batch_size}")
    loader_train = torch.utils.data.DataLoader(dataset_train, batch_sampler=batch_sampler, collate_fn=collate_fn,
                                               num_workers=args.num_workers)
    print("Start training")
    start_time = time.time()
    test_stats = {}
    for epoch in range(args.start_epoch, args.epochs):
        if args.distributed:
            sampler_train.set_epoch(epoch)
        train_stats, global_step = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch,
                                                   args.clip_max_norm, args, scaler, global_step)
        lr_scheduler.step()
        if output_dir:
            training.save_checkpoint(output_dir / "checkpoint.pth", model=model_without_ddp.state_dict(),
                                     optimizer=optimizer.state_dict(), lr_scheduler=lr_scheduler.state_dict(),
                                     epoch=epoch, global_step=global_step, args=args)
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
