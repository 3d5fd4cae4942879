"""Pyramid Vision Transformer v1: ImageNet classification, and PVT as a dense-prediction backbone (PVT+DETR).

Wenhai Wang, Enze Xie, Xiang Li, Deng-Ping Fan, Kaitao Song, Ding Liang, Tong Lu, Ping Luo, Ling Shao,
"Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction without Convolutions", ICCV 2021,
arXiv:2102.12122. Official code: https://github.com/whai362/PVT (classification/pvt.py at 57e2dfaa).

What this file reproduces: the PVT v1 model (tiny/small/medium/large) with the released checkpoints' keys (the
released pvt_*.pth load unchanged: raw, {'model': ...} or {'state_dict': ...}); the official code's outputs to 1e-4
(tests/test_pvt.py, against a fixture made with the official code); the backbone form (four feature maps at strides
4/8/16/32); ImageNet training and evaluation with the paper's DeiT recipe (top-1/top-5 in OUTPUT_DIR/eval.json); and
DETR with a PVT backbone (`--task detect`, Table 5), built from detr.py's transformer, criterion, data and COCO
evaluation. Status: the paper's numbers (PVT-Small 79.8 top-1 after 300 ImageNet epochs on 8 GPUs; PVT-Small+DETR
34.7 AP after 50 COCO epochs) are not reproduced here (no GPU); the synthetic demo's results are in the README's
demo table, what was measured and tried in docs/pvt.md.

Real data (ImageNet folders `train/<class>/*.JPEG`, `val/<class>/*.JPEG`):
    python pvt.py --model pvt_small --data_root /data/imagenet --output_dir out/pvt_small
    torchrun --nproc_per_node 8 pvt.py --model pvt_small --batch_size 128 --data_root /data/imagenet --output_dir out
    python pvt.py --model pvt_small --eval --pretrained pvt_small.pth --data_root /data/imagenet --output_dir out
    python pvt.py ... --checkpoint_every 1000 --resume out/pvt_small/checkpoint.pth   # continue at the saved step
A resumed run continues the interrupted one exactly (the same batches, augmentations and random draws; bit for bit
with --deterministic on the same machine); SIGTERM or SIGINT saves a checkpoint at the end of the step and exits.
PVT+DETR on COCO (detr.py's flags; `python pvt.py --task detect --help`):
    torchrun --nproc_per_node 8 pvt.py --task detect --model pvt_small --pretrained pvt_small.pth \
        --coco_path /data/coco --batch_size 2 --output_dir out/pvt_detr
Synthetic demo: `make demo-pvt` (demos/pvt.sh).

Differences from the official code:
- Position embeddings are resized when the token grid differs from the stage's own 224x224 grid; the official code
  compares every stage with stage 1's token count and so crashes when a later stage happens to have 3136 tokens
  (e.g. 448x448 inputs). Everywhere else the two agree.
- Attention uses `F.scaled_dot_product_attention` (same math as softmax(q k^T / sqrt(d)) v).
- RandAugment is written out here as timm's `rand-m9-mstd0.5-inc1` (same ops, magnitudes, probabilities, fill and
  bicubic resampling; our own random draws). torchvision's MixUp and CutMix stand in for timm's Mixup; there is no
  colour jitter (timm skips it when RandAugment is on).
- Repeated augmentation: the epoch's order also changes from epoch to epoch in a single process (the official
  main.py calls set_epoch only under DDP, so its single-process runs repeat epoch 0's order), datasets under 256
  images still get samples, and each sample's augmentation has its own seed (common/training.py: resumable order).
- No weight decay on position embeddings (the official code only exempts the cls token, norms and biases).
- PVT+DETR uses detr.py's model, training driver and checkpoint layout (PVT under `backbone.0.body.`), not
  mmdet's; labels are COCO category ids (91 classes) as in DETR. Its augmentation is the official config's (flip,
  short side 640-800) with DETR's resize rounding; `--random_crop` adds DETR's crop branch.
- Additions: `--depths/--embed_dims/--num_heads` (smaller models for demos and tests), `--viz` (the pyramid's
  feature maps for one image), step-exact resume (`--checkpoint_every`), stop signals, `--deterministic`.
Lab notes, measurements and a paper-to-code map: docs/pvt.md.
"""
import argparse
import math
import random
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.ops import StochasticDepth
from torchvision.transforms import v2

import detr
from common import training
from common.matching import HungarianMatcher

# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def get_args_parser():
    parser = argparse.ArgumentParser("PVT v1: ImageNet classification and PVT+DETR detection", add_help=True)
    model = parser.add_argument_group("model", "defaults: the official classification/pvt.py and "
                                               "configs/pvt/pvt_*.py; paper Sec. 3, Table 1 (--task detect: Table 5)")
    loss = parser.add_argument_group("loss", "defaults: the official classification/main.py; paper Sec. 4.1")
    data = parser.add_argument_group("data", "defaults: the official classification/main.py (DeiT's recipe with timm "
                                             "0.3.2's augmentation); paper Sec. 4.1")
    optim = parser.add_argument_group("optimisation", "defaults: the official classification/main.py and "
                                                      "configs/pvt/pvt_*.py; paper Sec. 4.1 (AdamW, cosine schedule)")
    run = parser.add_argument_group("run", "defaults: the official classification/main.py where it has the flag")
    model.add_argument("--task", default="classify", choices=["classify", "detect"],
                       help="classify: ImageNet (Table 2); detect: DETR with a PVT backbone on COCO (Table 5), "
                            "see --task detect --help")
    # model (Table 1)
    model.add_argument("--model", default="pvt_small", choices=["pvt_tiny", "pvt_small", "pvt_medium", "pvt_large"])
    model.add_argument("--depths", nargs=4, type=int, default=None, help="override the model's blocks per stage")
    model.add_argument("--embed_dims", nargs=4, type=int, default=None, help="override the model's widths")
    model.add_argument("--num_heads", nargs=4, type=int, default=None, help="override the model's heads")
    data.add_argument("--input_size", "--input-size", default=224, type=int, help="training resolution")
    model.add_argument("--drop", default=0.0, type=float, help="dropout rate")
    model.add_argument("--drop_path", "--drop-path", default=None, type=float,
                       help="stochastic depth rate (default per size as the official configs: tiny/small 0.1, "
                            "medium/large 0.3)")
    model.add_argument("--pretrained", "--finetune", default="",
                       help="weights to start from: a released .pth (raw, {'model'} or {'state_dict'}); a head of "
                            "another size is dropped")
    # optimisation (Section 4.1: the DeiT recipe)
    optim.add_argument("--batch_size", "--batch-size", default=128, type=int, help="per process")
    optim.add_argument("--epochs", default=300, type=int)
    optim.add_argument("--lr", default=5e-4, type=float, help="for a total batch of 512, scaled linearly")
    optim.add_argument("--weight_decay", "--weight-decay", default=0.05, type=float)
    optim.add_argument("--opt_eps", "--opt-eps", default=1e-8, type=float, help="AdamW epsilon")
    optim.add_argument("--clip_grad", "--clip-grad", default=None, type=float,
                       help="max gradient norm (default per size as the official configs: tiny/small none, "
                            "medium/large 1.0; 0: none)")
    optim.add_argument("--warmup_lr", "--warmup-lr", default=1e-6, type=float)
    optim.add_argument("--min_lr", "--min-lr", default=1e-5, type=float)
    optim.add_argument("--warmup_epochs", "--warmup-epochs", default=5, type=int)
    # augmentation and regularisation
    loss.add_argument("--smoothing", default=0.1, type=float, help="label smoothing")
    data.add_argument("--mixup", default=0.8, type=float, help="MixUp alpha (0: off)")
    data.add_argument("--cutmix", default=1.0, type=float, help="CutMix alpha (0: off)")
    data.add_argument("--mixup_prob", "--mixup-prob", default=1.0, type=float,
                      help="probability of mixing a batch")
    data.add_argument("--mixup_switch_prob", "--mixup-switch-prob", default=0.5, type=float,
                      help="probability of CutMix rather than MixUp when both are on")
    data.add_argument("--randaug_num_ops", default=2, type=int,
                      help="RandAugment operations per image (0: off); the official --aa rand-m9-mstd0.5-inc1 is "
                           "2 ops at magnitude 9 of 10 with magnitude std 0.5, timm's 'increasing' op set")
    data.add_argument("--randaug_magnitude", default=9.0, type=float, help="RandAugment magnitude, 0..10")
    data.add_argument("--randaug_magnitude_std", default=0.5, type=float,
                      help="std of the Gaussian noise on the magnitude, drawn per operation")
    data.add_argument("--reprob", default=0.25, type=float, help="random erasing probability (random pixels)")
    data.add_argument("--repeated_aug", "--repeated-aug", action="store_true", default=True,
                      help="repeated augmentation (the official RASampler, on by default): each image 3 times per "
                           "epoch, on 3 processes under torchrun, in the same process otherwise")
    data.add_argument("--no_repeated_aug", "--no-repeated-aug", dest="repeated_aug", action="store_false")
    data.add_argument("--crop_pct", default=0.875, type=float, help="eval: resize to input_size / crop_pct, crop")
    # data, runtime
    data.add_argument("--data_root", "--data-path", "--data_path", default="data/synthetic/imagenet",
                      help="ImageNet-style folders train/<class>/*, val/<class>/*")
    run.add_argument("--output_dir", default="", help="where to save log.txt, checkpoint.pth, eval.json")
    run.add_argument("--resume", default="", help="continue from this checkpoint.pth (at the step it was saved)")
    run.add_argument("--start_epoch", default=0, type=int)
    training.add_run_args(run)
    run.add_argument("--eval", action="store_true", help="only evaluate")
    run.add_argument("--device", default=None, help="cpu, cuda or mps (default: cuda when available)")
    run.add_argument("--seed", default=0, type=int)
    run.add_argument("--num_workers", default=10, type=int)
    run.add_argument("--viz", action="store_true",
                     help="write OUTPUT_DIR/viz/<image>_pyramid.png: the first val image and its four feature maps")
    run.add_argument("--print_freq", default=10, type=int)
    return parser


# The official per-size configs (classification/configs/pvt/pvt_*.py): what --drop_path / --clip_grad default to.
SIZE_DEFAULTS = {
    "pvt_tiny": dict(drop_path=0.1, clip_grad=None),
    "pvt_small": dict(drop_path=0.1, clip_grad=None),
    "pvt_medium": dict(drop_path=0.3, clip_grad=1.0),
    "pvt_large": dict(drop_path=0.3, clip_grad=1.0),
}


def apply_size_defaults(args):
    """Fill --drop_path and --clip_grad left unset with the chosen size's official values."""
    for name, value in SIZE_DEFAULTS[args.model].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def get_detect_args_parser():
    """`--task detect`: DETR's flags (detr.py) with the PVT backbone's and the official PVT+DETR config's
    (detection/configs/detr_pvt_s_8x2_50ep_coco.py, 8 GPUs x 2 images) as defaults: 50 epochs, lr drop at 33, AdamW
    1e-4 (backbone 1e-5), clip 0.1, flip and short side resized to one of 640-800 (no random crop)."""
    parser = detr.get_args_parser()
    parser.prog = "pvt.py --task detect"
    parser.description = "PVT+DETR: DETR with a PVT backbone (stage-4 features, stride 32) on COCO"
    pvt_detr = parser.add_argument_group(
        "PVT+DETR", "defaults: the official detection/configs/detr_pvt_s_8x2_50ep_coco.py; paper Sec. 5.2, Table 5")
    pvt_detr.add_argument("--task", default="detect", choices=["classify", "detect"])
    pvt_detr.add_argument("--model", default="pvt_small", choices=["pvt_tiny", "pvt_small", "pvt_medium", "pvt_large"])
    pvt_detr.add_argument("--depths", nargs=4, type=int, default=None, help="override the model's blocks per stage")
    pvt_detr.add_argument("--embed_dims", nargs=4, type=int, default=None, help="override the model's widths")
    pvt_detr.add_argument("--num_heads", nargs=4, type=int, default=None, help="override the model's heads")
    pvt_detr.add_argument("--drop_path", default=0.1, type=float, help="stochastic depth in the backbone")
    pvt_detr.add_argument("--pretrained", "--finetune", default="",
                          help="ImageNet PVT weights for the backbone (cls token, norm and head are ignored)")
    pvt_detr.add_argument("--random_crop", action="store_true",
                          help="train with DETR's augmentation (detr.py): half the images resized to --crop_scales, "
                               "cropped to --crop_size, then resized to --scales. Default: the official PVT+DETR "
                               "config's (detr_pvt_s_8x2_50ep_coco.py), flip and resize to --scales only")
    parser.set_defaults(epochs=50, lr_drop=33, scales=[640, 672, 704, 736, 768, 800], backbone="pvt")
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Model (Section 3 of the paper)
# ----------------------------------------------------------------------------------------------------------------


class Mlp(nn.Module):
    """The feed-forward layer of a block: Linear -> GELU (erf form) -> Linear."""

    def __init__(self, dim, hidden_dim, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Spatial-reduction attention (SRA, Section 3.3, Eqs. 2-3).

    Queries come from all N = H*W tokens; keys and values from the sequence reduced by `spatial_reduction_ratio` R
    in each direction (a R x R conv with stride R, then LayerNorm), so the cost falls from N^2 to N^2 / R^2.
    Official attribute names: `q`, `kv` (one Linear for k and v, output laid out [k | v]), `proj`, and for R > 1
    `sr` and `norm` (LayerNorm with PyTorch's default eps 1e-5).
    """

    def __init__(self, dim, num_heads, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0, sr_ratio=1):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} must be divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.spatial_reduction_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).transpose(1, 2)  # [B, h, N, d]
        if self.spatial_reduction_ratio > 1:
            # Eq. (3): SR(x) = Norm(Reshape(x, R) W^S), as a strided conv on the [B, C, H, W] token map
            x = self.sr(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)  # [B, N/R^2, C]
            x = self.norm(x)
        k, v = self.kv(x).reshape(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4)  # 2 x [B, h, N', d]
        # Eq. (2): head_j = softmax(q k^T / sqrt(d)) v
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                           scale=self.scale)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    """A pre-norm transformer encoder layer with SRA: x + SRA(LN(x)), then x + FFN(LN(x)) (Eq. 1)."""

    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_path, norm_layer,
                 sr_ratio):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop, sr_ratio)
        self.drop_path = StochasticDepth(drop_path, mode="row")  # per-sample, rescaled by 1 / (1 - p)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x, H, W):
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Patch embedding of one stage: a P x P conv with stride P, flattened to tokens, LayerNorm (eps 1e-5).

    `grid` is the token grid at the training resolution, the grid of the stage's position embedding.
    """

    def __init__(self, grid, patch_size, in_chans, embed_dim):
        super().__init__()
        self.grid = grid
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        x = self.proj(x)  # [B, C, H/P, W/P]
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), (H, W)  # [B, HW, C]


def resize_pos_embed(pos_embed, grid, H, W):
    """Bilinearly resize a [1, grid_h * grid_w, C] position embedding to an H x W token grid (align_corners=False).

    At the training grid it is returned as is (the official code's interpolation to the same size is an identity).
    """
    if (H, W) == tuple(grid):
        return pos_embed
    pos = pos_embed.reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)  # [1, C, gh, gw]
    return F.interpolate(pos, size=(H, W), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)


class PyramidVisionTransformer(nn.Module):
    """PVT v1 (Section 3.1, Fig. 3): four stages, each a patch embedding, a position embedding and SRA blocks.

    The patch size shrinks the map progressively (4, 2, 2, 2: strides 4/8/16/32). For classification a cls token
    joins before stage 4 and the head reads it after the final norm. `backbone=True` builds the dense-prediction
    form: no cls token, final norm or head, and `forward` returns the four stage maps [B, C_i, H/s_i, W/s_i]. Both
    keep `pos_embed4`'s cls entry, so the released classification checkpoints load into either.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dims=(64, 128, 256, 512),
                 num_heads=(1, 2, 4, 8), mlp_ratios=(4, 4, 4, 4), qkv_bias=False, qk_scale=None, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.0, norm_layer=nn.LayerNorm, depths=(3, 4, 6, 3),
                 sr_ratios=(8, 4, 2, 1), backbone=False):
        super().__init__()
        self.depths, self.embed_dims, self.sr_ratios = list(depths), list(embed_dims), list(sr_ratios)
        self.num_classes = num_classes
        self.backbone = backbone
        self.num_stages = len(depths)
        self.strides = [patch_size * 2 ** i for i in range(self.num_stages)]
        n = sum(depths)
        drop_path = [drop_path_rate * k / max(n - 1, 1) for k in range(n)]  # stochastic depth, linear in depth
        for i in range(self.num_stages):
            grid = img_size // patch_size if i == 0 else (img_size // 2 ** (i + 1)) // 2  # 56, 28, 14, 7 at 224
            last = i == self.num_stages - 1
            setattr(self, f"patch_embed{i + 1}", PatchEmbed((grid, grid), patch_size if i == 0 else 2,
                                                            in_chans if i == 0 else embed_dims[i - 1], embed_dims[i]))
            # stage 4's embedding has one more entry, at index 0, for the cls token
            setattr(self, f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, grid * grid + last, embed_dims[i])))
            setattr(self, f"pos_drop{i + 1}", nn.Dropout(drop_rate))
            first = sum(depths[:i])
            setattr(self, f"block{i + 1}", nn.ModuleList([
                Block(embed_dims[i], num_heads[i], mlp_ratios[i], qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                      drop_path[first + j], norm_layer, sr_ratios[i]) for j in range(depths[i])]))
        if not backbone:
            self.norm = norm_layer(embed_dims[-1])
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[-1]))
            self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self):
        """The official initialisation: truncated normal (std 0.02) for Linear weights, position embeddings and
        the cls token, zero biases, LayerNorm (1, 0); convs keep PyTorch's default."""
        for name, p in self.named_parameters():
            if name.startswith("pos_embed") or name == "cls_token":
                nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def min_input_size(self):
        """The smallest side every stage can handle: each stage needs at least `sr_ratio` tokens per side."""
        return max(s * max(r, 1) for s, r in zip(self.strides, self.sr_ratios))

    def _check_input(self, x):
        if x.ndim != 4:
            raise ValueError(f"PVT expects images [B, 3, H, W], got a tensor of shape {tuple(x.shape)}")
        need = self.min_input_size()
        if min(x.shape[-2:]) < need:
            raise ValueError(f"input {x.shape[-2]}x{x.shape[-1]} is too small for PVT's patch embeddings: each side "
                             f"needs at least {need} pixels (strides {self.strides}, spatial reduction "
                             f"{self.sr_ratios})")

    def forward_stages(self, x):
        """Run the four stages. Returns the stage outputs: maps [B, C_i, H_i, W_i] for stages 1-3, and for stage 4
        the tokens [B, 1 + H_4 W_4, C_4] with the cls token first (classification) or the map (backbone)."""
        self._check_input(x)
        B = x.shape[0]
        outs = []
        for i in range(self.num_stages):
            patch_embed = getattr(self, f"patch_embed{i + 1}")
            pos_embed = getattr(self, f"pos_embed{i + 1}")
            x, (H, W) = patch_embed(x)  # [B, HW, C]
            if i < self.num_stages - 1:
                pos_embed = resize_pos_embed(pos_embed, patch_embed.grid, H, W)
            else:  # stage 4: entry 0 is the cls token's (unresized), the rest the grid's
                cls_pos, pos_embed = pos_embed[:, :1], resize_pos_embed(pos_embed[:, 1:], patch_embed.grid, H, W)
                if not self.backbone:
                    x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # [B, 1 + HW, C]
                    pos_embed = torch.cat([cls_pos, pos_embed], dim=1)
            x = getattr(self, f"pos_drop{i + 1}")(x + pos_embed)
            for blk in getattr(self, f"block{i + 1}"):
                x = blk(x, H, W)
            if i < self.num_stages - 1 or self.backbone:
                x = x.transpose(1, 2).reshape(B, -1, H, W)  # [B, C, H, W]
            outs.append(x)
        return outs

    def forward_features(self, x):
        """The pooled feature: the cls token after the final norm, [B, C_4]."""
        assert not self.backbone, "the backbone form has no cls token; use forward()"
        return self.norm(self.forward_stages(x)[-1])[:, 0]

    def forward(self, x):
        if self.backbone:
            return self.forward_stages(x)
        return self.head(self.forward_features(x))

    def no_weight_decay(self):
        """Parameters trained without weight decay besides norms and biases: the cls token and position
        embeddings (the official code exempts only the cls token)."""
        return {name for name, _ in self.named_parameters() if name == "cls_token" or name.startswith("pos_embed")}


# The paper's Table 1 configurations: all sizes share widths, heads, MLP ratios and SR ratios; depths differ.
PVT_CONFIGS = {
    "pvt_tiny": dict(depths=[2, 2, 2, 2]),
    "pvt_small": dict(depths=[3, 4, 6, 3]),
    "pvt_medium": dict(depths=[3, 4, 18, 3]),
    "pvt_large": dict(depths=[3, 8, 27, 3]),
}
PVT_SHARED = dict(patch_size=4, embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4],
                  qkv_bias=True, sr_ratios=[8, 4, 2, 1])


def build_pvt(name, **kwargs):
    """PVT `name` (pvt_tiny/small/medium/large) with Table 1's configuration; kwargs override it."""
    if name not in PVT_CONFIGS:
        raise ValueError(f"unknown PVT model {name!r}: choose one of {sorted(PVT_CONFIGS)}")
    config = dict(PVT_SHARED, **PVT_CONFIGS[name], norm_layer=partial(nn.LayerNorm, eps=1e-6))
    config.update({k: v for k, v in kwargs.items() if v is not None})
    return PyramidVisionTransformer(**config)


def pvt_tiny(**kwargs):
    return build_pvt("pvt_tiny", **kwargs)


def pvt_small(**kwargs):
    return build_pvt("pvt_small", **kwargs)


def pvt_medium(**kwargs):
    return build_pvt("pvt_medium", **kwargs)


def pvt_large(**kwargs):
    return build_pvt("pvt_large", **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: the released .pth files (raw, {'model': ...} or {'state_dict': ...})
# ----------------------------------------------------------------------------------------------------------------


def read_state_dict(path):
    """The model weights in a checkpoint file, stored raw, as {'model': sd} (ours, DeiT's) or {'state_dict': sd}
    (mmcv's)."""
    checkpoint = training.load_checkpoint(path)
    for key in ("model", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def _size_name(depths):
    names = {tuple(c["depths"]): name for name, c in PVT_CONFIGS.items()}
    return names.get(tuple(depths), f"a PVT with depths {list(depths)}")


def check_pvt_size(state_dict, model, source):
    """A clear error when `source` holds another PVT size than `model` (the blocks per stage differ)."""
    depths = [len({k.split(".")[1] for k in state_dict if k.startswith(f"block{i + 1}.")})
              for i in range(model.num_stages)]
    if not any(depths):
        raise ValueError(f"{source} holds no PVT weights (no block1.* ... keys)")
    if depths != model.depths:
        raise ValueError(f"{source} holds {_size_name(depths)} (blocks per stage {depths}) but the model is "
                         f"{_size_name(model.depths)} (blocks per stage {model.depths}): pick the matching --model")


def load_pretrained(model, path):
    """Load released PVT weights into a classifier or the backbone form, every other key strictly.

    Ignored (and reported): `cls_token`, `norm.*`, `head.*` for the backbone form, and a head whose number of classes
    differs (fine-tuning; the new head keeps its initialisation). Returns the ignored keys.
    """
    state_dict = read_state_dict(path)
    check_pvt_size(state_dict, model, path)
    own = model.state_dict()
    ignored = [k for k in state_dict
               if (k not in own and (k == "cls_token" or k.split(".")[0] in ("norm", "head")))
               or (k.startswith("head.") and k in own and state_dict[k].shape != own[k].shape)]
    state_dict = {k: v for k, v in state_dict.items() if k not in ignored}
    fresh = [k for k in own if k.startswith("head.") and k not in state_dict]
    state_dict.update({k: own[k] for k in fresh})
    training.load_model_state(model, state_dict, source=str(path), strict=True)
    print(f"loaded {path}" + (f"; ignored {', '.join(ignored)}" if ignored else "")
          + (f"; newly initialised {', '.join(fresh)}" if fresh else ""))
    return ignored


# ----------------------------------------------------------------------------------------------------------------
# Data: ImageNet-style folders with the DeiT augmentation (Section 4.1)
# ----------------------------------------------------------------------------------------------------------------

IMAGENET_MEAN, IMAGENET_STD = detr.IMAGENET_MEAN, detr.IMAGENET_STD  # one copy of the constants


def load_image(path):
    """Open an image as RGB; one clear error naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"cannot decode image {path}: {error}") from error


def image_folder(root, transform):
    """`root/<class>/*` as a torchvision ImageFolder, after checking that every class folder holds images."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root} (expected {root}/<class>/<image>)")
    classes = sorted(d for d in root.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class folders in {root} (expected {root}/<class>/<image>)")
    for folder in classes:
        if not any(f.name.lower().endswith(IMG_EXTENSIONS) for f in folder.rglob("*") if f.is_file()):
            raise FileNotFoundError(f"class folder {folder} holds no images (extensions {', '.join(IMG_EXTENSIONS)})")
    return datasets.ImageFolder(str(root), transform=transform, loader=load_image)


def _affine(image, matrix, augment):
    """PIL affine warp with RandAugment's resampling and fill: output pixel (x, y) reads input (a x + b y + c,
    d x + e y + f) for matrix (a, b, c, d, e, f)."""
    return image.transform(image.size, Image.AFFINE, matrix, resample=augment.interpolation, fillcolor=augment.fill)


def _posterize(image, bits, augment):
    """Keep the `bits` most significant bits of every channel value; 0 bits gives a black image, as PIL's posterize
    did when timm was written (Pillow now refuses 0)."""
    mask = ~(2 ** (8 - bits) - 1)
    return image.point(lambda i: i & mask)


def _solarize_add(image, add, augment):
    """Add `add` to every channel value below 128 (capped at 255)."""
    return image.point(lambda i: min(255, i + add) if i < 128 else i)


# timm's RandAugment operations, the "increasing" set (`inc1`): name -> (magnitude m in [0, 10] -> argument, whether
# the argument gets a random sign, op(image, argument, augment)). Strength rises with m for every op.
RAND_AUGMENT_OPS = {
    "AutoContrast": (None, False, lambda image, v, a: ImageOps.autocontrast(image)),
    "Equalize": (None, False, lambda image, v, a: ImageOps.equalize(image)),
    "Invert": (None, False, lambda image, v, a: ImageOps.invert(image)),
    "Rotate": (lambda m: 30 * m / 10, True,  # degrees
               lambda image, v, a: image.rotate(v, resample=a.interpolation, fillcolor=a.fill)),
    "Posterize": (lambda m: 4 - int(4 * m / 10), False, _posterize),  # bits kept
    "Solarize": (lambda m: 256 - int(256 * m / 10), False, lambda image, v, a: ImageOps.solarize(image, v)),
    "SolarizeAdd": (lambda m: int(110 * m / 10), False, _solarize_add),
    "Color": (lambda m: 0.9 * m / 10, True, lambda image, v, a: ImageEnhance.Color(image).enhance(1 + v)),
    "Contrast": (lambda m: 0.9 * m / 10, True, lambda image, v, a: ImageEnhance.Contrast(image).enhance(1 + v)),
    "Brightness": (lambda m: 0.9 * m / 10, True, lambda image, v, a: ImageEnhance.Brightness(image).enhance(1 + v)),
    "Sharpness": (lambda m: 0.9 * m / 10, True, lambda image, v, a: ImageEnhance.Sharpness(image).enhance(1 + v)),
    "ShearX": (lambda m: 0.3 * m / 10, True, lambda image, v, a: _affine(image, (1, v, 0, 0, 1, 0), a)),
    "ShearY": (lambda m: 0.3 * m / 10, True, lambda image, v, a: _affine(image, (1, 0, 0, v, 1, 0), a)),
    "TranslateX": (lambda m: 0.45 * m / 10, True,  # fraction of the width
                   lambda image, v, a: _affine(image, (1, 0, v * image.size[0], 0, 1, 0), a)),
    "TranslateY": (lambda m: 0.45 * m / 10, True,
                   lambda image, v, a: _affine(image, (1, 0, 0, 0, 1, v * image.size[1]), a)),
}


class RandAugment:
    """RandAugment as the DeiT recipe of the paper (Section 4.1) runs it: timm's `rand-m9-mstd0.5-inc1`
    (timm/data/auto_augment.py, used by the official classification/datasets.py).

    Per image, `num_ops` operations are drawn with replacement from RAND_AUGMENT_OPS; each is applied with
    probability `prob` (0.5) at a magnitude drawn from N(magnitude, magnitude_std) and clipped to [0, 10]. Geometric
    operations resample bicubically (the recipe's interpolation) and fill with the ImageNet mean colour. torchvision's
    RandAugment is another algorithm: 31 magnitude bins (its magnitude 9 is a third of this one's), no per-op
    probability, an identity op instead of Invert and SolarizeAdd, and other posterize levels.
    """

    def __init__(self, num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5, ops=tuple(RAND_AUGMENT_OPS),
                 fill=(124, 116, 104), interpolation=Image.BICUBIC):
        self.num_ops, self.magnitude, self.magnitude_std, self.prob = num_ops, magnitude, magnitude_std, prob
        self.ops, self.fill, self.interpolation = list(ops), tuple(fill), interpolation

    def sample_magnitude(self):
        return min(10.0, max(0.0, random.gauss(self.magnitude, self.magnitude_std)))

    def __call__(self, image):
        for name in random.choices(self.ops, k=self.num_ops):
            if random.random() > self.prob:
                continue
            level, signed, op = RAND_AUGMENT_OPS[name]
            value = level(self.sample_magnitude()) if level else None
            if signed and random.random() > 0.5:
                value = -value
            image = op(image, value, self)
        return image


def build_transform(is_train, args):
    """Train: random resized crop (bicubic), flip, RandAugment, normalise, random erasing. Eval: resize to
    input_size / crop_pct (256 for 224), center crop."""
    bicubic = transforms.InterpolationMode.BICUBIC
    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if not is_train:
        return transforms.Compose([transforms.Resize(int(args.input_size / args.crop_pct), interpolation=bicubic),
                                   transforms.CenterCrop(args.input_size), *normalize])
    augment = [transforms.RandomResizedCrop(args.input_size, interpolation=bicubic), transforms.RandomHorizontalFlip()]
    if args.randaug_num_ops > 0:
        augment.append(RandAugment(args.randaug_num_ops, args.randaug_magnitude, args.randaug_magnitude_std))
    erase = [transforms.RandomErasing(p=args.reprob, value="random")] if args.reprob > 0 else []
    return transforms.Compose([*augment, *normalize, *erase])


def build_mixing(args, num_classes):
    """MixUp / CutMix on a batch (torchvision), one of them per batch, with probability `mixup_prob`.

    Returns a function (images, labels) -> (images, soft targets [B, num_classes]), or None when both are off.
    """
    mixers, p = [], []
    if args.cutmix > 0:
        mixers.append(v2.CutMix(alpha=args.cutmix, num_classes=num_classes))
        p.append(args.mixup_switch_prob if args.mixup > 0 else 1.0)
    if args.mixup > 0:
        mixers.append(v2.MixUp(alpha=args.mixup, num_classes=num_classes))
        p.append(1.0 - args.mixup_switch_prob if args.cutmix > 0 else 1.0)
    if not mixers:
        return None
    mix = v2.RandomChoice(mixers, p=p)

    def apply(images, labels):
        if random.random() < args.mixup_prob:
            return mix(images, labels)
        return images, F.one_hot(labels, num_classes).to(images.dtype)

    return apply


class RASampler(training.ResumableBatchSampler):
    """Repeated augmentation (Hoffer et al., 2020), the official main.py's RASampler (DeiT's samplers.py), on by
    default: each epoch repeats every index of a permutation 3 times in a row and deals the list out to the
    processes, so an image's 3 copies go to 3 processes at the same step and are augmented differently; with one or
    two processes the copies meet in the same process, mostly in the same batch (the official code samples this way
    in a single process too). Each process keeps the first len(dataset) // 256 * 256 / world samples of its share,
    so an epoch holds about as many samples as the dataset, a third of its images; below 256 images (where the
    official sampler yields nothing) it keeps ceil(len(dataset) / world). With seed 0 the order is the official one.
    """

    repeats = 3

    def samples_per_rank(self):
        if self.dataset_size < 256:
            return math.ceil(self.dataset_size / self.world_size)
        return self.dataset_size // 256 * 256 // self.world_size

    def order(self, generator):
        indices = torch.randperm(self.dataset_size, generator=generator).tolist()
        repeated = [i for i in indices for _ in range(self.repeats)]
        total = math.ceil(len(repeated) / self.world_size) * self.world_size
        repeated += repeated[:total - len(repeated)]
        return repeated[self.rank::self.world_size][:self.samples_per_rank()]


def first_val_image(val_loader):
    """(path of the first val image, class names) for --viz."""
    dataset = val_loader.dataset.dataset  # the ImageFolder inside the shard
    return dataset.samples[0][0], dataset.classes


def build_data(args):
    """Train and val loaders; the val split is sharded without padding so distributed top-1 is exact."""
    root = Path(args.data_root)
    train_set = image_folder(root / "train", build_transform(True, args))
    val_set = image_folder(root / "val", build_transform(False, args))
    if val_set.classes != train_set.classes:
        raise ValueError(f"{root}/val has classes {val_set.classes[:5]}... but {root}/train has "
                         f"{train_set.classes[:5]}...: both splits need the same class folders")
    world, rank = training.get_world_size(), training.get_rank()
    sampler = (RASampler if args.repeated_aug else training.ResumableBatchSampler)(
        len(train_set), args.batch_size, seed=args.seed)
    sampler.drop_last = sampler.samples_per_rank() >= args.batch_size  # tiny datasets keep their one short batch
    pin = str(args.device).startswith("cuda")
    train_loader = DataLoader(training.SeededDataset(train_set), batch_sampler=sampler, num_workers=args.num_workers,
                              pin_memory=pin, generator=training.loader_generator(args.seed))
    val_shard = Subset(val_set, range(rank, len(val_set), world))
    val_loader = DataLoader(val_shard, max(1, int(1.5 * args.batch_size)), shuffle=False,
                            num_workers=args.num_workers, pin_memory=pin,
                            generator=training.loader_generator(args.seed))
    return train_loader, val_loader, len(train_set.classes)


# ----------------------------------------------------------------------------------------------------------------
# Build: model, AdamW without decay on the cls token / position embeddings / norms / biases, cosine schedule
# ----------------------------------------------------------------------------------------------------------------


def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on 1-d parameters (norms, biases), the cls token and position embeddings."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at_epoch(epoch, lr, args):
    """Linear warm-up from warmup_lr, then cosine to min_lr over `epochs` (timm's per-epoch cosine schedule)."""
    if epoch < args.warmup_epochs:
        return args.warmup_lr + (lr - args.warmup_lr) * epoch / args.warmup_epochs
    return args.min_lr + 0.5 * (lr - args.min_lr) * (1 + math.cos(math.pi * epoch / args.epochs))


def build(args, num_classes):
    """The classifier, its optimizer (lr scaled by total batch / 512) and the per-epoch schedule."""
    apply_size_defaults(args)  # for callers that did not go through main
    # img_size stays 224 as in the official training script: other input sizes resize the position embeddings
    model = build_pvt(args.model, num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                      depths=args.depths, embed_dims=args.embed_dims, num_heads=args.num_heads)
    if args.pretrained:
        load_pretrained(model, args.pretrained)
    elif not args.resume:
        print(f"{args.model}: no --pretrained weights, starting from the paper's initialisation")
    lr = args.lr * args.batch_size * training.get_world_size() / 512
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, eps=args.opt_eps, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_at_epoch(epoch, lr, args) / lr)
    return model, optimizer, scheduler


# ----------------------------------------------------------------------------------------------------------------
# Train and evaluate
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_path(args):
    return Path(args.output_dir) / "checkpoint.pth" if args.output_dir else None


def train_one_epoch(model, loader, optimizer, scaler, mix, device, epoch, args, after_step=lambda epoch, done: None):
    """The epoch's batches from the sampler's start step on (all of them unless the run was resumed mid-epoch);
    `after_step(epoch, steps done in this epoch)` runs after every optimizer step (checkpoints, stop signals)."""
    model.train()
    logger = training.MetricLogger(delimiter="  ")
    logger.add_meter("lr", training.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    sampler = loader.batch_sampler
    batches = logger.log_every(loader, args.print_freq, f"Epoch: [{epoch}]")
    for step, (images, labels) in enumerate(batches, start=sampler.start):
        images, targets = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if mix is not None:
            images, targets = mix(images, targets)  # soft targets [B, num_classes]
        with training.amp_autocast(device, args.amp):
            logits = model(images)
        # label smoothing on the (mixed) targets: (1 - eps) y + eps / num_classes, then cross-entropy
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=args.smoothing)
        iteration = epoch * sampler.batches_per_epoch() + step
        training.check_finite_loss(training.reduce_dict({"loss": loss.detach()}),
                                   f"epoch {epoch}, step {step} (iteration {iteration})", checkpoint_path(args))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        logger.update(loss=loss.item(), lr=optimizer.param_groups[0]["lr"])
        after_step(epoch, step + 1)
    logger.synchronize_between_processes()
    return {name: meter.global_avg for name, meter in logger.meters.items()}


@torch.no_grad()
def evaluate(model, loader, device, args):
    """Top-1 / top-5 accuracy (percent) and cross-entropy over the whole val split (summed over processes)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    for images, labels in training.MetricLogger().log_every(loader, args.print_freq, "Test:"):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with training.amp_autocast(device, args.amp):
            logits = model(images).float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(labels[:, None])  # [B, 5]
        totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum"), hits[:, 0].sum(), hits.sum(),
                               torch.tensor(len(labels), device=device)]).double()
    if training.get_world_size() > 1:
        dist.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    print(f"* Acc@1 {100 * top1 / n:.3f} Acc@5 {100 * top5 / n:.3f} loss {loss / n:.3f} ({int(n)} images)")
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "loss": loss / n}


# ----------------------------------------------------------------------------------------------------------------
# Visualise: the feature pyramid (Fig. 1 (c) of the paper)
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def visualize(model, image_path, class_names, device, args):
    """Write OUTPUT_DIR/viz/<image>_pyramid.png: the (eval-transformed) image beside the L2 norm of each stage's
    features (strides 4/8/16/32, each scaled to [0, 255] and enlarged to the image size), and print the top-5."""
    model = training.unwrap(model).eval()
    x = build_transform(False, args)(load_image(image_path))[None].to(device)
    stages = model.forward_stages(x)
    logits = model.head(model.norm(stages[-1])[:, 0])
    H, W = x.shape[-2:]
    stages[-1] = stages[-1][:, 1:].transpose(1, 2).reshape(1, -1, H // model.strides[-1], W // model.strides[-1])
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    panels = [Image.fromarray((x[0].cpu() * std + mean).clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy())]
    for feature in stages:
        norm = feature[0].float().norm(dim=0).cpu()  # [H_i, W_i]
        norm = (norm - norm.min()) / (norm.max() - norm.min()).clamp(min=1e-6)
        panels.append(Image.fromarray(norm.mul(255).byte().numpy()).resize((W, H), Image.NEAREST).convert("RGB"))
    canvas = Image.new("RGB", (len(panels) * (W + 4), H), "white")
    for i, panel in enumerate(panels):
        canvas.paste(panel, (i * (W + 4), 0))
    out = Path(args.output_dir or ".") / "viz" / f"{Path(image_path).stem}_pyramid.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    top = logits[0].softmax(-1).topk(min(5, logits.shape[1]))
    print(f"--viz: wrote {out}; top classes: "
          + ", ".join(f"{class_names[i]} {p:.2f}" for p, i in zip(top.values.tolist(), top.indices.tolist())))


# ----------------------------------------------------------------------------------------------------------------
# PVT+DETR (Section 5.2, Table 5): DETR's transformer, set criterion, COCO data and evaluation from detr.py
# ----------------------------------------------------------------------------------------------------------------


class PVTBackbone(nn.Module):
    """DETR's backbone slot filled with PVT, as the official `pvt_small_f4`: the stage-4 map [B, C_4, H/32, W/32] of
    the backbone form, with the padding mask resized (nearest) to it."""

    def __init__(self, pvt):
        super().__init__()
        self.body = pvt
        self.num_channels = pvt.embed_dims[-1]

    def forward(self, tensor_list):
        x = self.body(tensor_list.tensors)[-1]
        mask = F.interpolate(tensor_list.mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
        return {"0": detr.NestedTensor(x, mask)}


def build_detect(args):
    """(model, criterion, postprocessors) of DETR with a PVT backbone; everything after the backbone is detr.py's."""
    if getattr(args, "masks", False):
        raise SystemExit("--masks: PVT+DETR here is box detection only (the paper's Table 5)")
    pvt = build_pvt(args.model, backbone=True, drop_path_rate=args.drop_path, depths=args.depths,
                    embed_dims=args.embed_dims, num_heads=args.num_heads)
    if args.pretrained:
        load_pretrained(pvt, args.pretrained)
    elif not args.resume:
        print(f"{args.model}: no --pretrained ImageNet weights, the backbone starts from the paper's initialisation")
    pvt.requires_grad_(args.lr_backbone > 0)
    backbone = detr.Joiner(PVTBackbone(pvt), detr.build_position_encoding(args))
    backbone.num_channels = pvt.embed_dims[-1]
    model = detr.DETR(backbone, detr.build_transformer(args), num_classes=args.num_classes,
                      num_queries=args.num_queries, aux_loss=args.aux_loss)
    matcher = HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox,
                               cost_giou=args.set_cost_giou)
    weight_dict = {"loss_ce": 1, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
    if args.aux_loss:  # the same weights for every decoder layer's auxiliary loss
        weight_dict.update({f"{k}_{i}": v for i in range(args.dec_layers - 1) for k, v in list(weight_dict.items())})
    criterion = detr.SetCriterion(args.num_classes, matcher, weight_dict, args.eos_coef)
    return model, criterion, {"bbox": detr.PostProcess()}


def build_detect_dataset(image_set, args):
    """detr.py's COCO dataset. Training images get the official PVT+DETR augmentation (flip, short side resized to
    one of --scales, long side <= --max_size; mmdet's Resize + RandomFlip) unless --random_crop asks for DETR's."""
    dataset = detr.build_dataset(image_set, args)
    if image_set == "train" and not args.random_crop:
        dataset.transforms = detr.Compose([detr.RandomHorizontalFlip(), detr.RandomResize(args.scales, args.max_size),
                                           detr.ToTensorNormalize()])
    return dataset


def main_detect(args):
    """Train / evaluate PVT+DETR with detr.py's own driver (detr.main: AdamW with the backbone at --lr_backbone, step
    decay at --lr_drop, checkpoints and --resume, COCO box AP in OUTPUT_DIR/eval.json)."""
    return detr.main(args, build=build_detect, build_dataset=build_detect_dataset)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def run_identity(model, args):
    """What a checkpoint must match to be resumed here (common/training.py check_identity)."""
    return {"script": "pvt.py", "task": "classify", "model": args.model, "depths": model.depths,
            "embed_dims": model.embed_dims, "num_classes": model.num_classes}


def main(args):
    apply_size_defaults(args)
    training.init_distributed(args)
    device = training.resolve_device(args.device)
    if args.deterministic:
        training.make_deterministic()
    training.seed_everything(args.seed)
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir and training.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)

    train_loader, val_loader, num_classes = build_data(args)
    model, optimizer, scheduler = build(args, num_classes)
    model.to(device)
    training.compile_model(model, args.compile)
    model_without_ddp = model
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if args.gpu is not None else None)
    scaler = training.grad_scaler(device, args.amp)
    identity = run_identity(model_without_ddp, args)
    print(f"{args.model}: {sum(p.numel() for p in model_without_ddp.parameters()):,} parameters, {num_classes} "
          f"classes, {len(train_loader.dataset)} train / {len(val_loader.dataset.dataset)} val images")

    start_step, rng = 0, None
    if args.resume:
        checkpoint = training.load_checkpoint(args.resume)
        if not isinstance(checkpoint, dict) or "model" not in checkpoint:
            raise SystemExit(f"--resume {args.resume}: expected a training checkpoint with a 'model' entry (released "
                             "weights go to --pretrained)")
        training.check_identity(checkpoint, identity, f"--resume {args.resume}")
        check_pvt_size(checkpoint["model"], model_without_ddp, args.resume)
        training.load_model_state(model_without_ddp, checkpoint["model"], source=args.resume)
        if not args.eval and "optimizer" in checkpoint:
            start_step, rng = training.resume_run(checkpoint, args, optimizer, scheduler, scaler)
            print(f"resuming from {args.resume} at epoch {args.start_epoch}, step {start_step}")

    if args.eval:
        if not (args.resume or args.pretrained):
            print("warning: --eval without --resume or --pretrained evaluates an untrained model")
        stats = evaluate(model, val_loader, device, args)
        if output_dir:
            training.write_json(output_dir / "eval.json", {"top1": stats["top1"], "top5": stats["top5"]})
            training.append_log(output_dir, {f"test_{k}": v for k, v in stats.items()})
        if args.viz and training.is_main_process():
            visualize(model, *first_val_image(val_loader), device, args)
        return stats

    save = training.epoch_saver(checkpoint_path(args), identity=identity, args=args, model=model_without_ddp,
                                optimizer=optimizer, lr_scheduler=scheduler, scaler=scaler)
    epochs = training.ResumableEpochs(args, train_loader.batch_sampler, start_step, rng, save, checkpoint_path(args))
    mix = build_mixing(args, num_classes)
    start, stats = time.time(), {}
    for epoch in epochs:  # each epoch's checkpoint after its evaluation
        train_stats = train_one_epoch(model, train_loader, optimizer, scaler, mix, device, epoch, args,
                                      epochs.after_step)
        scheduler.step()
        stats = evaluate(model, val_loader, device, args)
        if output_dir:
            training.write_json(output_dir / "eval.json", {"top1": stats["top1"], "top5": stats["top5"]})
            training.append_log(output_dir, {**{f"train_{k}": v for k, v in train_stats.items()},
                                             **{f"test_{k}": v for k, v in stats.items()}, "epoch": epoch})
    print(f"training time {time.time() - start:.0f} s")
    if args.viz and training.is_main_process():
        visualize(model, *first_val_image(val_loader), device, args)
    return stats


if __name__ == "__main__":
    task = argparse.ArgumentParser(add_help=False)
    task.add_argument("--task", default="classify")
    if task.parse_known_args()[0].task == "detect":
        main_detect(get_detect_args_parser().parse_args())
    else:
        main(get_args_parser().parse_args())
