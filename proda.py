"""ProDA: Prototypical Pseudo Label Denoising and Target Structure Learning for Domain Adaptive Semantic Segmentation.

Pan Zhang, Bo Zhang, Ting Zhang, Dong Chen, Yong Wang, Fang Wen. CVPR 2021. arXiv:2101.10979.
Official code: https://github.com/microsoft/ProDA (commit 9ba80c7d).

What this file reproduces: the official pipeline, every stage in one script and chained by default:
  warm-up   source CE + output-space adversarial training (LS-GAN, weight 0.01, ProDA's 3x3-conv discriminator);
            then soft pseudo labels for the target train set and the initial class prototypes;
  stage 1   prototype-rectified soft pseudo labels (Eq. 3-4), symmetric CE + KL regulariser (Eq. 5, 9), structure
            learning between weak and strong views (Eq. 7-8), momentum prototypes (Eq. 6), EMA teacher;
            then flip-averaged hard pseudo labels (confidence > 0.95);
  stage 2/3 self-distillation: CE on hard pseudo labels (strong view) + KL to the previous stage's model; stage 2's
            student starts from a self-supervised init (SimCLRv2 R101, with bn_pretrain), stage 3's from the stage-2
            model (the README commands); then new hard pseudo labels (after stage 2).
Each stage writes OUTPUT_DIR/{warmup,stage1,stage2,stage3}/: the model in the official file format and name
(from_gta5_to_cityscapes_on_deeplabv2_best_model.pkl: ['ResNet101']['model_state'], prototypes in
['objective_vectors']; released models load unchanged), checkpoint.pth (--resume), log.txt, eval.json (Cityscapes
val at full resolution, per class), and the next stage's inputs (pseudo_soft/ + prototypes.pth, pseudo_labels/).
Status: numerically identical to the official code on the parity fixture (network and every intermediate of a
stage-1 step, pseudo labels, distillation and warm-up steps; tests/test_proda.py). The paper's 57.5 mIoU (GTA5 ->
Cityscapes) is not reproduced here (4 V100s x 36 h per stage); the synthetic demo's results are in the README's
demo table, what was measured and tried in docs/proda.md.

    python proda.py --source gta5 --target cityscapes --data_root DATA --pretrained resnet101-5d3b4d8f.pth \
        --student_init r101_1x_sk0.pth                       # whole pipeline, official settings
    python proda.py --stage 1 --output_dir OUT ...          # one stage; reads OUT/warmup/ (says so if missing)
    python proda.py --source synthia --data_root DATA ...   # 16 classes, also scored as mIoU-13
    torchrun --nproc_per_node 4 proda.py ...                # --batch_size is the total over processes
    python proda.py --eval --resume_path from_gta5_to_cityscapes_on_deeplabv2_best_model.pkl
    python proda.py ... --resume OUT/stage1/checkpoint.pth  # continue stage 1 where it stopped, then stages 2-3
    make demo-proda                                         # synthetic GTA5 -> Cityscapes, small model (demos/)

Resume: each stage's checkpoint.pth (written atomically at each validation and every --checkpoint_every iterations)
continues the stage at the saved iteration with the same batches, augmentations and random draws (bit for bit with
--deterministic on the same machine), then runs the stages after it. Each stage starts from --seed, as each official
command does. SIGTERM / SIGINT save a checkpoint at the end of the iteration and exit (a second signal exits at once);
a non-finite loss stops the run naming the iteration, every loss term and the last good checkpoint. Pseudo-label
folders, models and prototypes are written whole or not at all.

Defaults are the README's stage commands and, for the warm-up (which no README command trains), the official
parser's defaults (lr 1e-4, weak source view, BN trained). Differences from the official code (the official
behaviour is the default where released numbers depend on it; docs/proda.md has the full list with reasons):
  * Stages 2-3 KD: the official `F.kl_div(softmax(student), softmax(teacher))` feeds probabilities where
    log-probabilities belong (the term can be negative). Default as official; `--kd fixed` uses log_softmax.
  * The official stage-1 CE on the strong view (`--S_pseudo > 0`) crashes (undefined `cluster_arg`);
    `--stage1_strong` is that branch, corrected.
  * Replaying the strong augmentation on maps: the official TranslateX is normalised by H instead of W, and the
    warm-up's source replay uses scale 4 on a 1/8 map. Default as official; `--exact_replay` fixes both.
  * Each parameter is listed once in the 1x learning-rate group (the official generator repeats backbone convs).
  * All-ignored pseudo labels give a zero CE instead of the official NaN; training also stops at --train_iters.
  * Each stage hands on the best model on target val (official: model selection on the evaluation set);
    `--select last` hands on the last one.
"""
import argparse
import copy
import math
import os
import random
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Subset

from common import segmentation
from common.deeplab import AtrousConv2d, ResNetTrunk
from common.training import (
    MetricLogger,
    ResumableBatchSampler,
    SeededDataset,
    SmoothedValue,
    StopSignal,
    add_run_args,
    amp_autocast,
    append_log,
    atomic_write,
    check_finite_loss,
    check_identity,
    compile_model,
    endless_batches,
    get_rank,
    get_world_size,
    grad_scaler,
    init_distributed,
    is_main_process,
    load_checkpoint,
    load_model_state,
    loader_generator,
    make_deterministic,
    reduce_dict,
    resolve_device,
    restore_rng,
    rng_states,
    save_checkpoint,
    seed_everything,
    write_json,
)
from common.uda import gan_loss, seg_loss, upsample  # seg_loss(., ., 250) = the official `cross_entropy2d`

IGNORE = 250  # ProDA's ignore index (AdaptSegNet/ADVENT use 255)
STAGES = ("warmup", "1", "2", "3")


# ----------------------------------------------------------------------------------------------------------------
# Args (official parser_train.py names and defaults; README / train.py commands)
# ----------------------------------------------------------------------------------------------------------------


def get_args_parser():
    p = argparse.ArgumentParser("ProDA: prototypical pseudo-label denoising and target structure learning",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pipeline = p.add_argument_group("pipeline", "defaults: the whole official pipeline, the stages chained as the "
                                                "README's commands chain the official scripts")
    model = p.add_argument_group("model", "defaults: the official models/deeplabv2.py (DeepLab-v2 ResNet-101 with "
                                          "ProDA's head); paper Sec. 4.1")
    data = p.add_argument_group("data", "defaults: the official parser_train.py and data/ (GTA5 or SYNTHIA -> "
                                        "Cityscapes); paper Sec. 4.1")
    optim = p.add_argument_group("optimisation", "defaults: the official parser_train.py and the README's stage "
                                                 "commands; paper Sec. 4.1")
    warmup = p.add_argument_group("warm-up", "defaults: the official parser_train.py (no README command trains the "
                                             "warm-up)")
    stage1 = p.add_argument_group("stage 1", "defaults: the README's stage-1 command; paper Sec. 3.2-3.3")
    distill = p.add_argument_group("stages 2-3", "defaults: the README's stage-2 and stage-3 commands; paper Sec. 3.4")
    run = p.add_argument_group("run", "defaults: the official parser_train.py where it has the flag")
    a = pipeline.add_argument
    a("--stage", nargs="+", default=list(STAGES), choices=STAGES,
      help="stages to run, in order: warmup 1 2 3 (default: the whole pipeline)")
    a = data.add_argument
    a("--source", "--src_dataset", default="gta5", choices=["gta5", "synthia", "cityscapes"],
      help="cityscapes: the oracle, the warm-up's source CE on the Cityscapes train labels (--adv 0)")
    a("--target", "--tgt_dataset", default="cityscapes", choices=["cityscapes"])
    a("--data_root", default="data", help="holds <source>/ and cityscapes/ (see README)")
    a("--src_rootpath", default=None, help="default DATA_ROOT/<source>")
    a("--tgt_rootpath", default=None, help="default DATA_ROOT/cityscapes")
    a = run.add_argument
    a("--output_dir", default="outputs/proda", help="stage outputs go to OUTPUT_DIR/{warmup,stage1,stage2,stage3}")
    a = model.add_argument
    a("--num_classes", "--n_class", type=int, default=None, help="19 (GTA5), 16 (SYNTHIA, also scored as 13)")
    # data and augmentation (official parser_train.py)
    a = data.add_argument
    a("--src_size", type=int, nargs=2, default=None, metavar=("W", "H"), help="source resize (GTA5 1914 1052, "
      "SYNTHIA 1280 760)")
    a("--tgt_size", type=int, nargs=2, default=None, metavar=("W", "H"), help="target size (Cityscapes 2048 1024)")
    a("--resize", type=int, default=2200, help="RandomSized: width U(0.5, 1.5) x resize")
    a("--rcrop", type=lambda s: [int(v) for v in s.split(",")], default=[896, 512], help="random crop W,H")
    a("--hflip", type=float, default=0.5)
    a("--noshuffle", action="store_true")
    # optimisation
    a = optim.add_argument
    a("--batch_size", "--bs", type=int, default=4, help="per optimizer step, over all processes")
    a("--accum_steps", type=int, default=1, help="split each batch into this many micro-batches (less memory; BN "
      "then sees batch_size / accum_steps images)")
    a("--lr", type=float, default=1e-4, help="stage 1 (one group)")
    a("--lr_warmup", type=float, default=1e-4, help="warm-up (backbone; head 10x); the official parser's --lr")
    a("--lr_distill", type=float, default=6e-4, help="stages 2-3 (backbone; head and bn_pretrain 10x)")
    a("--train_iters", type=int, default=90000, help="poly schedule length; training stops here or after --epochs")
    a("--warmup_iters", type=int, default=None, help="the warm-up's --train_iters (default: --train_iters)")
    a("--epochs", type=int, default=84, help="passes over the target train set (84 x 743 = 62,475 iterations)")
    a = run.add_argument
    a("--val_interval", type=int, default=1000)
    a("--print_interval", type=int, default=20)
    a("--select", default="best", choices=["best", "last"], help="model each stage hands on: best on target val "
      "(official; model selection on the evaluation set) or the last")
    # warm-up (no README command trains it: the official parser_train.py defaults; LS-GAN, adv 0.01)
    a = warmup.add_argument
    a("--adv", type=float, default=0.01, help="adversarial weight (0 = source-only)")
    a("--target_bn_only", action="store_true", help="with --adv 0: still run the target images through the network "
      "in train mode (BatchNorm statistics take in the target; no adaptation loss), the control of the demo")
    a("--gan", default="LS", choices=["LS", "Vanilla"])
    a("--ndf", type=int, default=64, help="discriminator width (official 64)")
    a("--lr_D", type=float, default=1e-4, help="discriminator Adam lr (official 1e-4, poly schedule as the network)")
    a("--freeze_bn", action=argparse.BooleanOptionalAction, default=False, help="warm-up: BN in eval mode with "
      "frozen affine parameters (official flag, off by default)")
    a("--S_pseudo_src", type=float, default=0.0, help="warm-up: source CE on the strong view, times this weight "
      "(0 = the weak view, official default)")
    # stage 1
    a = stage1.add_argument
    a("--proto_momentum", type=float, default=1e-4)
    a("--proto_temperature", type=float, default=1.0)
    a("--proto_consistW", type=float, default=10.0)
    a("--rce", action=argparse.BooleanOptionalAction, default=True, help="stage 1: symmetric CE (alpha CE + beta "
      "RCE; the README stage-1 commands pass --rce); --no-rce: plain CE")
    a("--rce_alpha", type=float, default=0.1)
    a("--rce_beta", type=float, default=1.0)
    a("--regular_w", type=float, default=None, help="KL regulariser weight (0.1 GTA5, 0 SYNTHIA)")
    a("--regular_type", default="MRKLD", choices=["MRKLD", "MRENT"])
    a("--train_thred", type=float, default=0.0)
    a("--ema_decay", type=float, default=0.999)
    a("--proto_epochs", type=int, default=4, help="passes of calc_prototype.py over the target train set")
    a("--stage1_strong", action="store_true", help="stage 1 CE on the strong view (the official S_pseudo > 0 "
      "branch, which crashes there; corrected)")
    a("--exact_replay", action="store_true", help="fix the official replay defects (TranslateX normalised by H; "
      "scale 4 on the warm-up's 1/8 source map)")
    # stages 2-3
    a = distill.add_argument
    a("--threshold", type=float, default=0.95, help="hard pseudo labels: confidence <= threshold -> ignore")
    a("--distillation", type=float, default=1.0, help="KD weight")
    a("--distill_rce", action="store_true", help="stages 2-3: symmetric CE on the hard pseudo labels (the official "
      "--rce, which the README stage-2/3 commands do not pass; default plain CE)")
    a("--kd", default="official", choices=["official", "fixed"], help="official: kl_div(softmax(student), ...) "
      "(probabilities as input, the released models' form); fixed: log_softmax")
    a("--bn_clr", action=argparse.BooleanOptionalAction, default=True, help="stages 2-3 student with bn_pretrain")
    a("--student_init", default=None, help="stage 2 (and 3 with --stage3_reinit): self-supervised checkpoint "
      "(SimCLRv2 r101_1x_sk0.pth)")
    a("--stage3_reinit", action="store_true", help="stage 3: start the student from --student_init as stage 2 "
      "(the official --no_resume) instead of from the stage-2 model (the README stage-3 command)")
    # model
    a = model.add_argument
    a("--layers", type=int, nargs=4, default=[3, 4, 23, 3], help="blocks per ResNet layer (101: 3 4 23 3)")
    a("--width", type=int, default=64, help="ResNet stem width (64 = the paper's)")
    a("--feat_dim", type=int, default=256, help="head channels = prototype dimension")
    a("--droprate", type=float, default=0.1, help="Dropout2d before the classifier (official Classifier_Module2 "
      "droprate)")
    a("--pretrained", default=None, help="ImageNet backbone (torchvision resnet101-5d3b4d8f.pth), key intersection")
    # checkpoints and pseudo labels of an earlier run
    a = run.add_argument
    a("--resume_path", default=None, help="model the first stage starts from (official .pkl or checkpoint.pth): "
      "warm-up init, stage-1 warm-up model, stage-2/3 teacher")
    a("--path_soft", default=None, help="stage 1 soft pseudo labels (default OUTPUT_DIR/warmup/pseudo_soft)")
    a("--proto_path", default=None, help="stage 1 prototypes (default OUTPUT_DIR/warmup/prototypes.pth)")
    a("--path_LP", default=None, help="stage 2/3 hard pseudo labels (default OUTPUT_DIR/stage{1,2}/pseudo_labels)")
    # common flags
    a = run.add_argument
    a("--resume", default=None, help="continue OUTPUT_DIR/<stage>/checkpoint.pth (and the stages after it)")
    add_run_args(run, "also write OUTPUT_DIR/<stage>/checkpoint.pth every N iterations (it is always written at "
                      "each validation); a resumed run continues at the saved iteration")
    a("--eval", action="store_true", help="only evaluate --resume / --resume_path / the last stage's model")
    a("--device", default=None)
    a("--seed", type=int, default=1337)
    a("--num_workers", type=int, default=6)
    a("--threads", type=int, default=0, help="cap torch CPU threads (0 = torch's default)")
    a("--viz", action="store_true", help="colourised predictions, and stage 1's rectified vs raw pseudo labels")
    a("--viz_count", type=int, default=4)
    return p


def finalise_args(args):
    """Dataset-dependent defaults (official sizes, class counts) and the checks that need several flags."""
    if args.num_classes is None:
        args.num_classes = 16 if args.source == "synthia" else 19
    if args.regular_w is None:  # README: --regular_w 0.1 for GTA5, none in the SYNTHIA command
        args.regular_w = 0.0 if args.source == "synthia" else 0.1
    args.tgt_size = args.tgt_size or [2048, 1024]
    args.src_size = args.src_size or {"gta5": [1914, 1052], "synthia": [1280, 760]}.get(args.source, args.tgt_size)
    root = Path(args.data_root)
    args.src_rootpath = args.src_rootpath or str(root / args.source)
    args.tgt_rootpath = args.tgt_rootpath or str(root / args.target)
    denominator = args.accum_steps * args.world_size
    if args.batch_size % denominator:
        raise SystemExit(f"--batch_size {args.batch_size} must be a multiple of --accum_steps x processes "
                         f"({args.accum_steps} x {args.world_size})")
    if args.target_bn_only and args.adv != 0:
        raise SystemExit(f"--target_bn_only is the control without an adaptation loss: it needs --adv 0 (got "
                         f"--adv {args.adv})")
    if args.feat_dim % 32:
        raise SystemExit(f"--feat_dim {args.feat_dim} must be a multiple of 32 (GroupNorm(32))")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Model (Sec. 4.1: DeepLab-v2 ResNet-101 with ProDA's head; official models/deeplabv2.py)
# ----------------------------------------------------------------------------------------------------------------


class SEBlock(nn.Module):
    """Squeeze-and-excitation over the 1280 concatenated head channels (keys `se.0`, `se.2`)."""

    def __init__(self, channels, reduction=16):
        super().__init__()
        self.se = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x):
        return x * self.se(x.mean((2, 3)))[:, :, None, None]


def head_branch(in_channels, feat_dim, dilation=None):
    """A 1x1 conv (dilation None) or a 3x3 atrous conv (padding = dilation), then GroupNorm(32) and ReLU."""
    conv = nn.Conv2d(in_channels, feat_dim, 1) if dilation is None else AtrousConv2d(in_channels, feat_dim, dilation)
    return nn.Sequential(conv, nn.GroupNorm(32, feat_dim), nn.ReLU(inplace=True))


class ClassifierModule2(nn.Module):
    """ProDA's head (official `Classifier_Module2`): a 1x1 branch and four dilated 3x3 branches (6, 12, 18, 24),
    each conv + GroupNorm(32) + ReLU, concatenated (5 x 256 channels), SE block, 3x3 conv + GroupNorm to the
    256-d feature space where the prototypes live (no ReLU), Dropout2d(0.1), 1x1 classifier without bias."""

    def __init__(self, in_channels, num_classes, dilations=(6, 12, 18, 24), feat_dim=256, droprate=0.1):
        super().__init__()
        self.conv2d_list = nn.ModuleList([head_branch(in_channels, feat_dim)] +
                                         [head_branch(in_channels, feat_dim, d) for d in dilations])
        concat = feat_dim * (len(dilations) + 1)
        self.bottleneck = nn.Sequential(SEBlock(concat), nn.Conv2d(concat, feat_dim, 3, padding=1),
                                        nn.GroupNorm(32, feat_dim))
        self.head = nn.Sequential(nn.Dropout2d(droprate), nn.Conv2d(feat_dim, num_classes, 1, bias=False))

    def forward(self, x):
        feat = self.bottleneck(torch.cat([branch(x) for branch in self.conv2d_list], 1))
        feat = self.head[0](feat)  # the prototype space: [B, 256, H/8, W/8]
        return {"feat": feat, "out": self.head[1](feat)}


class ProDANet(ResNetTrunk):
    """DeepLab-v2 trunk (stride on the 1x1, dilations 2/4, output stride 8) with trainable BatchNorm, `layer5` =
    ProDA's head on layer4, and with `bn_clr` the extra `bn_pretrain` BatchNorm(2048) after layer4 that the
    self-supervised (SimCLRv2) students of stages 2-3 use. State dict = the official checkpoints' `model_state`
    (653 keys; 658 with bn_clr). forward(x) -> {'feat': [B, 256, h, w], 'out': [B, C, h, w]}, h = ceil(H / 8)."""

    def __init__(self, num_classes=19, bn_clr=False, layers=(3, 4, 23, 3), width=64, feat_dim=256, droprate=0.1):
        super().__init__(layers, width)
        self.bn_clr = bn_clr
        self.layer5 = ClassifierModule2(32 * width, num_classes, feat_dim=feat_dim, droprate=droprate)
        if bn_clr:
            self.bn_pretrain = nn.BatchNorm2d(32 * width)
        # Official init: every conv N(0, 0.01) (the head's kaiming init is overwritten by the trunk's loop), norm
        # layers weight 1 / bias 0, the bottleneck conv bias 0; other biases and the SE Linears keep PyTorch's.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.layer5.bottleneck[1].bias)

    def forward(self, x):
        _, x = super().forward(x)
        if self.bn_clr:
            x = self.bn_pretrain(x)
        return self.layer5(x)


class FCDiscriminator(nn.Module):
    """Warm-up discriminator (official models/discriminator.py): 3x3 stride-2 convs 19 -> 64 -> 128 -> 256 -> 512
    with ReLU x3 and LeakyReLU(0.2), then a 1x1 classifier to one logit per cell. (AdaptSegNet's has 4x4 kernels
    and LeakyReLU everywhere.)"""

    def __init__(self, num_classes, planes=64):
        super().__init__()
        self.conv1 = nn.Conv2d(num_classes, planes, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(planes, planes * 2, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(planes * 2, planes * 4, 3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(planes * 4, planes * 8, 3, stride=2, padding=1)
        self.classifier = nn.Conv2d(planes * 8, 1, 1)

    def forward(self, x):
        x = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))))
        return self.classifier(F.leaky_relu(self.conv4(x), 0.2))


# ----------------------------------------------------------------------------------------------------------------
# Losses and the algorithm's pieces (Sec. 3)
# ----------------------------------------------------------------------------------------------------------------


def full2weak(feat, weak_params, scale=4):
    """Map a full-image map (EMA teacher, at 1/scale of the full image) into the weak view: resize to the
    RandomSized size / scale, crop the RandomCrop window / scale, flip. weak_params in collated-DataLoader form:
    {'RandomSized': [h [B], w [B]], 'RandomCrop': [y1, y2, x1, x2], 'RandomHorizontallyFlip': [B]}."""
    views = []
    for i in range(feat.shape[0]):
        h, w = int(weak_params["RandomSized"][0][i]), int(weak_params["RandomSized"][1][i])
        view = upsample(feat[i:i + 1], (int(h / scale), int(w / scale)))
        y1, y2, x1, x2 = (int(v[i]) for v in weak_params["RandomCrop"])
        y1, th, x1, tw = int(y1 / scale), int((y2 - y1) / scale), int(x1 / scale), int((x2 - x1) / scale)
        view = view[:, :, y1:y1 + th, x1:x1 + tw]
        if bool(weak_params["RandomHorizontallyFlip"][i]):
            view = view.flip(3)
        views.append(view)
    return torch.cat(views, 0)


def prototype_distance(feat, prototypes):
    """d_k = ||f - eta_k||_2 for every pixel and class: feat [B, D, H, W], prototypes [C, D] -> [B, C, H, W]."""
    return torch.stack([torch.norm(feat - proto[:, None, None], p=2, dim=1) for proto in prototypes], 1)


def prototype_weights(distance, temperature):
    """Eq. (4) from the feature-prototype distances d [B, C, H, W] (official `get_prototype_weight`):
    omega_k = softmax_k(-(d_k - min_j d_j) * tau), tau = proto_temperature (official; the paper writes / tau).
    The min subtraction does not change the softmax; it is kept as in the official code."""
    return F.softmax(-(distance - distance.min(1, keepdim=True)[0]) * temperature, dim=1)


def rectify_pseudo_labels(soft_labels, weights, train_thred=0.0):
    """Eq. (3): rectified = omega * soft pseudo label; label = argmax; pixels whose normalised maximum is below
    `train_thred` -> 250. Returns (labels [B, 1, H, W], rectified normalised over classes [B, C, H, W])."""
    rectified = weights * soft_labels
    labels = rectified.max(1, keepdim=True)[1]
    rectified = rectified / rectified.sum(1, keepdim=True)
    labels[rectified.max(1, keepdim=True)[0] < train_thred] = IGNORE
    return labels, rectified


def reverse_cross_entropy(logits, labels, num_classes):
    """RCE of the symmetric CE: -sum_c p_c log q_c with p = softmax clamped to [1e-7, 1] and q = one-hot clamped to
    [1e-4, 1] (so a wrong class costs -log 1e-4), averaged over labelled pixels."""
    prob = F.softmax(logits.float(), dim=1).clamp(1e-7, 1.0)
    mask = (labels != IGNORE).float()
    one_hot = F.one_hot(labels.masked_fill(labels == IGNORE, num_classes), num_classes + 1)  # [B, H, W, C + 1]
    one_hot = one_hot.permute(0, 3, 1, 2)[:, :-1].float().clamp(1e-4, 1.0)
    return -((prob * one_hot.log()).sum(1) * mask).sum() / (mask.sum() + 1e-6)


def pseudo_label_loss(logits, labels, symmetric, args):
    """Eq. (5) on hard pseudo labels [B, H, W]: the official `cross_entropy2d` (mean over labels != 250), or with
    `symmetric` (the official --rce) the symmetric CE rce_alpha * CE + rce_beta * RCE. Returns (loss, CE, RCE or
    None)."""
    ce = seg_loss(logits, labels, IGNORE)
    if not symmetric:
        return ce, ce, None
    rce = reverse_cross_entropy(logits, labels, args.num_classes)
    return args.rce_alpha * ce + args.rce_beta * rce, ce, rce


def regulariser(logits, kind="MRKLD"):
    """The KL regulariser (Eq. 9, official `regular_loss`): MRKLD = -mean over all elements of log p (KL from
    uniform, up to a constant); MRENT = mean over pixels of sum_c p log p (negative entropy)."""
    logp = F.log_softmax(logits.float(), dim=1)
    if kind == "MRKLD":
        return -logp.mean()
    n, _, h, w = logp.shape
    return (logp.exp() * logp).sum() / (n * h * w)


def affine_sample(x, v, kind, exact=False):
    """Replay one geometric RandAugment op on a map [1, C, H, W] with grid_sample (nearest), as the official
    `randaugment.affine_sample`; out-of-image cells become 0. `v`: degrees (Rotate), shear factor (Shear*),
    pixels at this map's scale (Translate*).

    Official defect: the TranslateX offset is normalised by H instead of W, so on a 2:1 map the replayed shift is
    W/H times the image's. exact=True (--exact_replay) normalises it by W, matching the image-side shift."""
    h, w = x.shape[2], x.shape[3]
    if kind == "Rotate":
        a = v / 180 * math.pi
        theta = [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]
    else:
        theta = {"ShearX": [[1, v, 0], [0, 1, 0]], "ShearY": [[1, 0, 0], [v, 1, 0]],
                 "TranslateX": [[1, 0, v], [0, 1, 0]], "TranslateY": [[1, 0, 0], [0, 1, v]]}[kind]
        theta = [[float(t) for t in row] for row in theta]
    theta[0][1] *= h / w
    theta[1][0] *= w / h
    if kind != "Rotate":
        theta[0][2] = theta[0][2] * 2 / (w if exact and kind == "TranslateX" else h) + theta[0][0] + theta[0][1] - 1
        theta[1][2] = theta[1][2] * 2 / h + theta[1][0] + theta[1][1] - 1
    grid = F.affine_grid(torch.tensor(theta, dtype=x.dtype, device=x.device)[None], list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", align_corners=False)


def replay_strong(maps, params, padding=IGNORE, scale=4, exact=False):
    """Official `label_strong_T`: apply a batch's recorded strong augmentation (flip, shear/translate/rotate,
    cutout) to maps computed on the weak view (pseudo labels, feature-prototype distances) at 1/scale of the crop.
    Cells that the affine ops move in from outside or that cutout covers become `padding`.
    params: RandAugmentMC dict, collated: {'Hflip': [B], 'ShearX'.. 'Rotate': [B] (1e4 = not applied),
    'CutoutAbs': [x0, y0, x1, y1] in crop pixels}. Applied in the record's key order, as the official code."""
    maps = maps + 1  # so that 0 marks padding
    for i in range(maps.shape[0]):
        for kind, param in params.items():
            if kind == "Hflip" and bool(param[i]):
                maps[i] = maps[i].clone().flip(-1)
            elif kind in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate") and float(param[i]) != 1e4:
                v = float(param[i])
                v = int(v // scale) if kind.startswith("Translate") else v
                maps[i:i + 1] = affine_sample(maps[i:i + 1].clone(), v, kind, exact)
            elif kind == "CutoutAbs" and isinstance(param, (list, tuple)):
                x0, y0, x1, y1 = (int(float(p[i]) // scale) for p in param)
                maps[i, :, y0:y1, x0:x1] = 0
    maps[maps == 0] = padding + 1
    return maps - 1


def prototype_consistency(weak_dist, strong_feat, prototypes, strong_params, temperature, exact_replay=False):
    """Target structure learning (Eq. 7-8): the teacher's prototypical assignment of the weak view, replayed through
    the strong augmentation, supervises the student's assignment of the strong view.
    weak_dist [B, C, h, w]: EMA features mapped into the weak view, distances to the prototypes; strong_feat
    [B, D, h, w]: student features of the strong view. KL(teacher || student), mean over the non-padded cells."""
    teacher_dist = replay_strong(weak_dist, strong_params, padding=IGNORE, scale=4, exact=exact_replay)
    mask = (teacher_dist != IGNORE).float()
    teacher = F.softmax(-teacher_dist * temperature, dim=1)
    student_logp = F.log_softmax(-prototype_distance(strong_feat, prototypes) * temperature, dim=1)
    loss = (F.kl_div(student_logp, teacher, reduction="none") * mask).sum() / mask.sum()
    return loss, {"teacher_dist_strong": teacher_dist, "consist_mask": mask, "consist_teacher": teacher,
                  "consist_student_logp": student_logp}


def class_mean_vectors(feat, logits, num_classes, min_pixels=10):
    """Per image and predicted class with >= min_pixels pixels, the mean feature over those pixels (official
    `calculate_mean_vector`): feat [B, D, H, W], logits [B, C, H, W] -> (vectors [K, D], ids [K]), image-major."""
    one_hot = F.one_hot(logits.argmax(1), num_classes).permute(0, 3, 1, 2).float()  # [B, C, H, W]
    area = one_hot.mean((2, 3))  # fraction of the image predicted as each class
    vectors, ids = [], []
    for n in range(feat.shape[0]):
        for c in range(num_classes):
            if area[n, c] == 0 or one_hot[n, c].sum() < min_pixels:
                continue
            vectors.append((feat[n] * one_hot[n, c]).mean((1, 2)) / area[n, c])
            ids.append(c)
    feat_dim = feat.shape[1]
    vectors = torch.stack(vectors) if vectors else feat.new_zeros((0, feat_dim))
    return vectors, torch.tensor(ids, dtype=torch.long, device=feat.device)


class Prototypes:
    """The class prototypes eta_k [C, D] and how many updates each has had (official `objective_vectors`, `_num`).

    update(k, v, 'moving_average'): eta_k <- (1 - m) eta_k + m v (Eq. 6, m = proto_momentum = 1e-4; stage 1);
    update(k, v, 'mean'): running mean of the vectors seen (calc_prototype.py, initial prototypes). Counts are
    capped at 3000, so after 3000 vectors the running mean becomes a moving average with weight 1/3001."""

    def __init__(self, vectors, momentum=1e-4):
        self.vectors = vectors.float().clone()
        self.counts = torch.zeros(vectors.shape[0], device=vectors.device)
        self.momentum = momentum

    def update(self, k, vector, mode="moving_average"):
        if vector.sum().item() == 0:
            return
        vector = vector.to(self.vectors)
        if mode == "moving_average":
            self.vectors[k] = self.vectors[k] * (1 - self.momentum) + self.momentum * vector
        else:
            self.vectors[k] = (self.vectors[k] * self.counts[k] + vector) / (self.counts[k] + 1)
        self.counts[k] = min(self.counts[k] + 1, 3000)

    def update_all(self, vectors, ids, mode="moving_average"):
        for vector, k in zip(vectors, ids.tolist()):
            self.update(k, vector, mode)


@torch.no_grad()
def ema_update(teacher, student, decay=0.999):
    """Mean teacher: theta' <- decay theta' + (1 - decay) theta for parameters; buffers (BN statistics) copied."""
    for p_t, p_s in zip(teacher.parameters(), student.parameters()):
        p_t.copy_(p_t * decay + p_s.detach() * (1.0 - decay))
    for b_t, b_s in zip(teacher.buffers(), student.buffers()):
        b_t.copy_(b_s)


def stage1_target_losses(target_out, targetS_feat, ema_out, full_size, soft_labels, weak_params, strong_params,
                         prototypes, args):
    """Stage-1 target losses from the networks' raw outputs (official `CustomModel.step` after the source CE).

    target_out: student on the weak view {'out', 'feat'} at crop/8; targetS_feat: student features on the strong
    view (crop/8); ema_out: EMA teacher on the full image (full/8) of size full_size (H, W); soft_labels: the
    warm-up model's soft pseudo labels, already carried through the weak augmentation (crop size); prototypes [C, D].
    Returns (loss, intermediates): loss = proto_consistW * L_consist + L_CTS."""
    soft = F.interpolate(soft_labels, scale_factor=0.25, mode="bilinear", align_corners=True)  # [B, C, crop/4]
    size = soft.shape[2:]
    ema_feat = upsample(ema_out["feat"].float(), (int(full_size[0] / 4), int(full_size[1] / 4)))  # [B, D, full/4]
    weak_feat = full2weak(ema_feat, weak_params)  # [B, D, crop/4]
    weak_dist = prototype_distance(weak_feat, prototypes)
    # Eq. (3)-(4): prototype-rectified pseudo labels
    weights = prototype_weights(weak_dist, args.proto_temperature)
    labels, rectified = rectify_pseudo_labels(soft, weights, args.train_thred)
    labels = labels[:, 0]
    if args.stage1_strong:  # target_out is then the strong view's: move the labels there too
        labels = replay_strong(labels[:, None].float(), strong_params, exact=args.exact_replay).long()[:, 0]
    out = upsample(target_out["out"].float(), size)
    # Eq. (5): CE on the rectified labels (the symmetric CE under --rce, the README command) + Eq. (9) the KL
    # regulariser when regular_w > 0
    loss_cts, loss_ce, loss_rce = pseudo_label_loss(out, labels, args.rce, args)
    loss_reg = regulariser(out, args.regular_type)
    if args.regular_w > 0:
        loss_cts = loss_cts + args.regular_w * loss_reg
    # Eq. (7)-(8): structure learning between the weak (teacher) and strong (student) views
    strong_feat = upsample(targetS_feat.float(), size)
    loss_consist, parts = prototype_consistency(weak_dist, strong_feat, prototypes, strong_params,
                                                args.proto_temperature, args.exact_replay)
    loss = args.proto_consistW * loss_consist + loss_cts
    parts.update(full2weak_feat=weak_feat, feat_proto_distance_weak=weak_dist, proto_weight=weights,
                 rectified_norm=rectified, pseudo_label_rectified=labels, threshold_arg_soft=soft,
                 loss_ce=loss_ce, loss_rce=loss_rce, loss_regular=loss_reg, loss_CTS=loss_cts,
                 loss_consist=loss_consist, ema_feat_up=ema_feat)
    return loss, parts


def flip_average(logits, flip_logits, size):
    """Flip-averaged class probabilities at image size (generate_pseudo_label.py --flip): logits of the image and of
    its mirror [B, C, h, w] -> (p(x) + flip(p(flip x))) / 2 [B, C, H, W]."""
    prob, flip_prob = upsample(F.softmax(logits.float(), 1), size), upsample(F.softmax(flip_logits.float(), 1), size)
    return (prob + flip_prob.flip(3)) / 2


def hard_pseudo_labels(prob, threshold):
    """Stage-2/3 pseudo labels: argmax with confidence <= threshold (0.95) -> 250. prob [B, C, H, W] -> [B, H, W]."""
    confidence, labels = prob.max(1)
    return labels.masked_fill(confidence <= threshold, IGNORE), confidence


def distillation_losses(student_logits, teacher_logits, labels, args):
    """Stages 2-3 (official `step_distillation`): CE of the student (strong view) against the hard pseudo labels
    replayed onto the strong view (the symmetric CE with --distill_rce, the official --rce, which the README stage-2/3
    commands do not pass), plus `distillation` x KL to the teacher's prediction on the same strong view.

    Official defect (default, --kd official): `F.kl_div(softmax(student), softmax(teacher))` gets probabilities
    where it expects log-probabilities, so the term is sum t (log t - s) and can be negative; its gradient still
    pushes s up where t is large. --kd fixed uses log_softmax(student), the true KL(teacher || student)."""
    ce, _, _ = pseudo_label_loss(student_logits, labels, args.distill_rce, args)
    teacher = F.softmax(teacher_logits.float(), dim=1)
    student = F.softmax(student_logits.float(), dim=1) if args.kd == "official" else F.log_softmax(
        student_logits.float(), dim=1)
    kd = F.kl_div(student, teacher, reduction="none").mean()  # the official mask (teacher != 250) is all ones
    return ce + args.distillation * kd, {"loss_ce": ce, "loss_kd": kd}


def adversarial_loss(target_up, discriminator, adv_weight, gan="LS"):
    """Warm-up generator term (official `step_adv`, output-space adversarial training as AdaptSegNet): make D call
    the target softmax 'source' (label 0). LS-GAN (MSE) by default, `--gan Vanilla` = BCE. Returns (loss, D out)."""
    d_out = discriminator(F.softmax(target_up.float(), dim=1))
    return gan_loss(d_out, 0, gan) * adv_weight, d_out


def discriminator_loss(source_up, target_up, discriminator, gan="LS"):
    """Warm-up D loss on detached outputs: source -> 0, target -> 1 (summed, as the official code)."""
    d_source = discriminator(F.softmax(source_up.detach().float(), dim=1))
    d_target = discriminator(F.softmax(target_up.detach().float(), dim=1))
    return gan_loss(d_source, 0, gan) + gan_loss(d_target, 1, gan)


# ----------------------------------------------------------------------------------------------------------------
# Data: weak and strong augmentations whose parameters are recorded (official data/augmentations.py,
# data/randaugment.py), so the strong view's maps can be computed from the weak view's
# ----------------------------------------------------------------------------------------------------------------

GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")  # the record's order (= the replay order)
GRAY = (127, 127, 127)


def weak_augment(img, label, lp=None, lpsoft=None, resize=2200, crop=(896, 512), hflip=0.5):
    """RandomSized (width U(0.5, 1.5) x resize, aspect kept) -> RandomCrop (crop = (w, h)) -> flip with prob hflip,
    on a PIL image, its label (PIL 'L', NEAREST), optional hard pseudo label (PIL 'L') and soft pseudo label
    (tensor [C, h, w] at network resolution, brought to image size first; bilinear, align_corners=True).
    Returns (img, label, lp, lpsoft, params) with params {'RandomSized': (h, w), 'RandomCrop': (y1, y2, x1, x2),
    'RandomHorizontallyFlip': bool}, the official record that full2weak replays."""
    if lpsoft is not None:
        lpsoft = upsample(lpsoft[None], (img.height, img.width))[0]
    w = int(random.uniform(0.5, 1.5) * resize)
    h = int(w / (img.width / img.height))
    tw, th = crop
    if w < tw or h < th:
        raise ValueError(f"RandomSized gave {w}x{h}, smaller than the {tw}x{th} crop: use --resize of at least "
                         f"{2 * max(tw, math.ceil(th * img.width / img.height))} or a smaller --rcrop")
    img, label = img.resize((w, h), Image.BILINEAR), label.resize((w, h), Image.NEAREST)
    lp = lp.resize((w, h), Image.NEAREST) if lp is not None else None
    lpsoft = upsample(lpsoft[None], (h, w))[0] if lpsoft is not None else None
    x1, y1 = random.randint(0, w - tw), random.randint(0, h - th)
    box = (x1, y1, x1 + tw, y1 + th)
    img, label = img.crop(box), label.crop(box)
    lp = lp.crop(box) if lp is not None else None
    lpsoft = lpsoft[:, y1:y1 + th, x1:x1 + tw] if lpsoft is not None else None
    flip = random.random() < hflip
    if flip:
        img, label = img.transpose(Image.FLIP_LEFT_RIGHT), label.transpose(Image.FLIP_LEFT_RIGHT)
        lp = lp.transpose(Image.FLIP_LEFT_RIGHT) if lp is not None else None
        lpsoft = lpsoft.flip(2) if lpsoft is not None else None
    return img, label, lp, lpsoft, {"RandomSized": (h, w), "RandomCrop": (y1, y1 + th, x1, x1 + tw),
                                    "RandomHorizontallyFlip": flip}


def _affine(img, coeffs):
    return img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=GRAY)


def _signed(v):
    return -v if random.random() < 0.5 else v


# FixMatch's RandAugment pool: name -> op(img, v in 1..9) -> (img, None); the geometric ones are in geometric_op
RANDAUGMENT_POOL = {
    "AutoContrast": lambda img, v: (ImageOps.autocontrast(img), None),
    "Brightness": lambda img, v: (ImageEnhance.Brightness(img).enhance(v * 0.9 / 10 + 0.05), None),
    "Color": lambda img, v: (ImageEnhance.Color(img).enhance(v * 0.9 / 10 + 0.05), None),
    "Contrast": lambda img, v: (ImageEnhance.Contrast(img).enhance(v * 0.9 / 10 + 0.05), None),
    "Equalize": lambda img, v: (ImageOps.equalize(img), None),
    "Identity": lambda img, v: (img, None),
    "Posterize": lambda img, v: (ImageOps.posterize(img, int(v * 4 / 10) + 4), None),
    "Rotate": None, "ShearX": None, "ShearY": None,
    "Sharpness": lambda img, v: (ImageEnhance.Sharpness(img).enhance(v * 0.9 / 10 + 0.05), None),
    "Solarize": lambda img, v: (ImageOps.solarize(img, 256 - int(v * 256 / 10)), None),
    "TranslateX": None, "TranslateY": None,
}


def geometric_op(img, kind, v):
    """The geometric RandAugment ops with a random sign; return the recorded parameter (degrees, shear factor, or
    translation in pixels of this image)."""
    if kind == "Rotate":
        deg = _signed(int(v * 30 / 10))
        return img.rotate(deg, resample=Image.BILINEAR, fillcolor=GRAY), deg
    if kind in ("ShearX", "ShearY"):
        s = _signed(v * 0.3 / 10)
        return _affine(img, (1, s, 0, 0, 1, 0) if kind == "ShearX" else (1, 0, 0, s, 1, 0)), s
    frac = _signed(v * 0.3 / 10)
    if kind == "TranslateX":
        px = int(frac * img.width)
        return _affine(img, (1, 0, px, 0, 1, 0)), px
    px = int(frac * img.height)
    return _affine(img, (1, 0, 0, 0, 1, px)), px


def strong_augment(img, n=2, m=10):
    """RandAugmentMC(2, 10) + Cutout (the official strong view): flip with p 0.5, n ops drawn from the FixMatch pool
    each applied with p 0.5 at a random magnitude 1..m-1, then a gray square of side min(w, h) // 3.
    Returns (img, params) with the official record: {'Hflip', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY',
    'Rotate' (1e4 = not applied), 'CutoutAbs': (x0, y0, x1, y1)}.
    The official code applies the ops in draw order but replays the geometric ones in the record's order, and keeps
    only the last value of an op drawn twice; here the geometric ops are applied in the record's order and at most
    once each, so replay_strong reproduces the image's geometry exactly (up to the map's resolution)."""
    params = {"Hflip": False, **{k: 1e4 for k in GEOMETRIC}, "CutoutAbs": 1e4}
    if random.random() < 0.5:
        img, params["Hflip"] = img.transpose(Image.FLIP_LEFT_RIGHT), True
    geometric = {}
    for name in random.choices(list(RANDAUGMENT_POOL), k=n):
        v = np.random.randint(1, m)
        if random.random() < 0.5:
            if name in GEOMETRIC:
                geometric.setdefault(name, v)
            else:
                img, _ = RANDAUGMENT_POOL[name](img, v)
    for name in GEOMETRIC:
        if name in geometric:
            img, params[name] = geometric_op(img, name, geometric[name])
    side = min(img.size) // 3
    x0 = int(max(0, np.random.uniform(0, img.width) - side / 2))
    y0 = int(max(0, np.random.uniform(0, img.height) - side / 2))
    x1, y1 = int(min(img.width, x0 + side)), int(min(img.height, y0 + side))
    img = img.copy()
    ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), GRAY)
    params["CutoutAbs"] = (x0, y0, x1, y1)
    return img, params


def to_tensor(img):
    """ProDA's input: RGB / 255, no mean, no std (not the BGR-minus-mean of AdaptSegNet/ADVENT). [3, H, W]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)


class SourceSet(Dataset):
    """GTA5 / SYNTHIA training images: resized to the official size (GTA5 1914x1052, SYNTHIA 1280x760; image
    bilinear, label nearest), weak augmentation, and the strong view when the warm-up uses it (S_pseudo_src)."""

    def __init__(self, base, args, strong):
        self.base, self.args, self.strong = base, args, strong

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        args, base = self.args, self.base
        img = segmentation.read_image(base.image_paths[i]).resize(tuple(args.src_size), Image.BILINEAR)
        label = Image.fromarray(segmentation.map_ids(base.read_label(base.label_paths[i]), base.lut, IGNORE))
        label = label.resize(tuple(args.src_size), Image.NEAREST)
        img, label, _, _, _ = weak_augment(img, label, resize=args.resize, crop=args.rcrop, hflip=args.hflip)
        item = {"img": to_tensor(img), "label": torch.from_numpy(np.asarray(label, dtype=np.int64))}
        if self.strong:
            img_strong, params = strong_augment(img)
            item.update(img_strong=to_tensor(img_strong), params=params)
        return item


class TargetTrainSet(Dataset):
    """Cityscapes train for stages 1-3 (official `Cityscapes_loader` with augmentations): the full image (for the
    EMA teacher), its weak view, the strong view of the weak view, both parameter records, and the pseudo labels
    carried through the weak augmentation: soft ones (stage 1, .npy [C, h, w] at network resolution) or hard ones
    (stages 2-3, .png + _conf.npy at image size; confidence <= threshold -> 250)."""

    def __init__(self, base, args, soft_dir=None, hard_dir=None):
        self.base, self.args, self.soft_dir, self.hard_dir = base, args, soft_dir, hard_dir

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        args, size = self.args, tuple(self.args.tgt_size)
        img = read_target_image(self.base.image_paths[i], size)
        name = os.path.basename(self.base.names[i])
        lp = lpsoft = None
        if self.soft_dir is not None:
            lpsoft = torch.from_numpy(np.load(os.path.join(self.soft_dir, name.replace(".png", ".npy"))))
            check_size(lpsoft.shape, (args.num_classes, *output_size(size)),
                       os.path.join(self.soft_dir, name.replace(".png", ".npy")))
        if self.hard_dir is not None:
            lp = np.asarray(Image.open(os.path.join(self.hard_dir, name)).resize(size, Image.NEAREST), dtype=np.uint8)
            conf = np.load(os.path.join(self.hard_dir, name.replace(".png", "_conf.npy")))
            check_size(conf.shape, size[::-1], os.path.join(self.hard_dir, name.replace(".png", "_conf.npy")))
            lp = np.where(conf <= args.threshold, IGNORE, lp).astype(np.uint8)
            lp = Image.fromarray(lp)
        label = Image.new("L", img.size, IGNORE)  # target labels are never used in training
        weak, _, lp, lpsoft, weak_params = weak_augment(img, label, lp, lpsoft, args.resize, args.rcrop, args.hflip)
        strong, params = strong_augment(weak)
        item = {"img": to_tensor(weak), "img_strong": to_tensor(strong), "img_full": to_tensor(img),
                "params": params, "weak_params": weak_params}
        if lpsoft is not None:
            item["lpsoft"] = lpsoft
        if lp is not None:
            item["lp"] = torch.from_numpy(np.asarray(lp, dtype=np.int64))
        return item


def output_size(size):
    """Network output (h, w) for an input of size (W, H): conv1 (stride 2), ceil-mode maxpool, layer2 (stride 2)."""
    def down(n):
        n = (n - 1) // 2 + 1  # conv1 7x7 s2 p3
        n = -(-(n - 1) // 2) + 1  # maxpool 3x3 s2 p1, ceil_mode=True
        return (n - 1) // 2 + 1  # layer2's 1x1 stride-2 conv
    return down(size[1]), down(size[0])


def check_size(got, expected, path):
    if tuple(got) != tuple(expected):
        raise SystemExit(f"{path}: shape {tuple(got)}, expected {tuple(expected)} ([classes,] h, w) for --num_classes "
                         f"and --tgt_size; it was made for other settings: write the pseudo labels again with these")


def read_target_image(path, size):
    """A target image, resized to --tgt_size (W, H) as the official loader; another aspect ratio is an error."""
    img = segmentation.read_image(path)
    if abs(img.width / img.height - size[0] / size[1]) > 0.01 * size[0] / size[1]:
        raise SystemExit(f"{path}: target image is {img.width}x{img.height}, expected {size[0]}x{size[1]} or the same "
                         f"aspect ratio (set --tgt_size W H to your images' size)")
    return img.resize(size, Image.BILINEAR) if img.size != size else img


SOURCE_SEED = 1_000_003  # the source stream's passes draw from seed + this, never from a target pass's generator


def train_loader(dataset, args, batch_size, what, seed):
    """Training batches of this process: a ResumableBatchSampler (each pass's order and every sample's augmentation
    seed a function of seed, pass and rank), so a run resumed at any iteration reads what the uninterrupted run read."""
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed=seed, shuffle=not args.noshuffle, drop_last=True)
    if sampler.batches_per_epoch() == 0:
        raise SystemExit(f"{what}: {len(dataset)} images, fewer than the {batch_size} a process needs for one batch "
                         f"(--batch_size / (--accum_steps x processes))")
    return DataLoader(SeededDataset(dataset), batch_sampler=sampler, num_workers=args.num_workers,
                      pin_memory=torch.device(args.device).type == "cuda", generator=loader_generator(args.seed))


def eval_loader(dataset, args):
    """Batches of one image of this process's share, in order (evaluation, pseudo labels, prototypes)."""
    return DataLoader(shard(dataset), batch_size=1, num_workers=args.num_workers,
                      generator=loader_generator(args.seed))


def shard(dataset):
    """This process's share for evaluation and label writing: every world_size-th item (no padding duplicates)."""
    return Subset(dataset, range(get_rank(), len(dataset), get_world_size()))


def build_data(args):
    """The shared datasets (common/segmentation.py: file layouts, label tables, ignore 250, RGB / 255)."""
    C = args.num_classes
    common = dict(num_classes=C, ignore_index=IGNORE, size=tuple(args.tgt_size), mean="rgb01",
                  interpolation="bilinear")
    if args.source == "gta5":
        source = segmentation.GTA5(args.src_rootpath, num_classes=C, ignore_index=IGNORE)
    elif args.source == "synthia":
        source = segmentation.SYNTHIA(args.src_rootpath, num_classes=C, ignore_index=IGNORE)
    else:  # the oracle: Cityscapes train with its labels, as a source (SourceSet resizes to --src_size)
        source = segmentation.Cityscapes(args.src_rootpath, "train", num_classes=C, ignore_index=IGNORE)
    return {"source": source,
            "target_train": segmentation.Cityscapes(args.tgt_rootpath, "train", labels=False, **common),
            "target_val": segmentation.Cityscapes(args.tgt_rootpath, "val", **common)}


# ----------------------------------------------------------------------------------------------------------------
# Build: networks and checkpoints (official format: {'ResNet101': {'model_state', 'objective_vectors'}, ...})
# ----------------------------------------------------------------------------------------------------------------


def stage_dir(args, stage):
    return Path(args.output_dir) / ("warmup" if stage == "warmup" else f"stage{stage}")


def model_file(args, stage, which=None):
    """The stage's model in the official file format and name (`from_gta5_to_cityscapes_on_deeplabv2_best_model.pkl`);
    `which` = best (best on target val, as the official code selects) or last."""
    which = which or args.select
    return stage_dir(args, stage) / f"from_{args.source}_to_{args.target}_on_deeplabv2_{which}_model.pkl"


def build_net(args, bn_clr=False):
    return ProDANet(args.num_classes, bn_clr, tuple(args.layers), args.width, args.feat_dim, args.droprate)


TRUNK = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")  # torchvision ResNet names, as the official


def trunk_summary(state):
    """'blocks 3 4 23 3, width 64' for a state dict with torchvision ResNet key names."""
    blocks = [len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
    width = tuple(state["conv1.weight"].shape)[0] if "conv1.weight" in state else "?"
    return f"blocks {' '.join(map(str, blocks))}, width {width}"


def architecture(args):
    return (f"a {args.num_classes}-class ProDA network with --layers {' '.join(map(str, args.layers))} --width "
            f"{args.width} --feat_dim {args.feat_dim}")


def load_strict(net, state, path, args):
    """Load a whole ProDA model (strict); another architecture is one error naming the file and what was expected."""
    try:
        load_model_state(net, state, str(path))
    except ValueError as error:
        raise SystemExit(f"{error}. Expected {architecture(args)} (set these flags to the model's)") from None


def read_model(path):
    """(state_dict, prototypes or None) from an official ProDA checkpoint (['ResNet101']['model_state'], prototypes in
    ['objective_vectors']) or from this script's checkpoint.pth (['model'], ['prototypes'])."""
    ckpt = load_checkpoint(path)
    check_identity(ckpt, {"script": "proda.py"}, str(path))
    if isinstance(ckpt, dict) and isinstance(ckpt.get("ResNet101"), dict) and "model_state" in ckpt["ResNet101"]:
        return ckpt["ResNet101"]["model_state"], ckpt["ResNet101"].get("objective_vectors")
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return ckpt["model"], ckpt.get("prototypes")
    raise SystemExit(f"{path}: expected an official ProDA checkpoint (['ResNet101']['model_state']) or a proda.py "
                     f"checkpoint (['model']); found keys {list(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt)}")


def net_from_file(args, path):
    """A ProDANet holding the model in `path` (bn_pretrain when its keys have it), loaded strictly."""
    state, prototypes = read_model(path)
    net = build_net(args, bn_clr=any(k.startswith("bn_pretrain.") for k in state))
    load_strict(net, state, path, args)
    return net, prototypes


def load_init(net, path, what):
    """Initialise from a backbone checkpoint by key intersection, as the official `Deeplab(initialization=...)`
    (torchvision ResNet-101 for ImageNet init; SimCLRv2 r101_1x_sk0 `['state_dict']` for the stage-2/3 students).
    Reports the checkpoint keys it ignores and the model keys it leaves at init. The trunk (conv1, bn1,
    layer1..layer4) must be complete and of the same depth and width, and matching keys of the same shape: another
    architecture is an error (the official intersection would load such a file partially, without a word)."""
    ckpt = load_checkpoint(path)
    if isinstance(ckpt, dict) and "ResNet101" in ckpt:  # an official / proda.py model file
        ckpt = ckpt["ResNet101"]["model_state"]
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise SystemExit(f"{path}: expected a state dict (or {{'state_dict': ...}}) of tensors for {what}")
    own = net.state_dict()
    matched = {k: v for k, v in state.items() if k in own}
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in matched.items() if v.shape != own[k].shape]
    if not matched:
        raise SystemExit(f"{path} ({what}): no key matches ProDANet (expected names like 'conv1.weight', "
                         f"'layer1.0.conv1.weight'); got {list(state)[:5]}")
    trunk_missing = [k for k in own if k.startswith(TRUNK) and k not in state and not k.endswith("batches_tracked")]
    trunk_extra = [k for k in state if k.startswith(TRUNK) and k not in own]
    if bad or trunk_missing or trunk_extra:
        details = [f"{name} {keys[:4]}{' ...' if len(keys) > 4 else ''}" for name, keys in
                   (("shapes differ:", bad), ("trunk keys missing:", trunk_missing),
                    ("trunk keys the network lacks:", trunk_extra)) if keys]
        raise SystemExit(f"{path} ({what}): another architecture. Expected a ResNet trunk with "
                         f"{trunk_summary(own)} under torchvision's key names (--layers, --width; ResNet-101: "
                         f"blocks 3 4 23 3, width 64), found {trunk_summary(state)}; " + "; ".join(details))
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in matched and not k.endswith("num_batches_tracked")]
    net.load_state_dict({**own, **matched})
    print(f"{what}: {len(matched)} tensors from {path}; ignored {len(unexpected)} unexpected checkpoint keys "
          f"{unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}; {len(missing)} model keys left at init "
          f"({sorted({k.split('.')[0] for k in missing})})")
    return missing, unexpected


def init_student(args, net, stage):
    """Initial weights of a network trained from scratch (warm-up, stage 2, stage 3 with --stage3_reinit): the
    self-supervised checkpoint (stages 2-3, --student_init), else the ImageNet one (--pretrained), else the paper's
    random init, said aloud."""
    path = args.student_init if stage in ("2", "3") and args.student_init else args.pretrained
    if path:
        load_init(net, path, f"stage {stage} initialisation")
    else:
        print(f"stage {stage}: no --pretrained{' / --student_init' if stage in ('2', '3') else ''} given, so the "
              f"network starts from random initialisation (the paper starts from ImageNet / SimCLRv2 weights)")


def param_groups(net, lr, stage):
    """Stage 1: one group over all parameters (official, no --finetune). Warm-up and stages 2-3: backbone at lr and
    layer5 (+ bn_pretrain) at 10 lr (official get_1x/get_10x_lr_params; each parameter listed once here, the
    official 1x generator lists backbone convs several times)."""
    if stage == "1":
        return [{"params": [p for p in net.parameters() if p.requires_grad], "lr": lr, "base_lr": lr}]
    head = [p for n, p in net.named_parameters() if n.split(".")[0] in ("layer5", "bn_pretrain")]
    ids = {id(p) for p in head}
    backbone = [p for p in net.parameters() if id(p) not in ids]
    return [{"params": backbone, "lr": lr, "base_lr": lr}, {"params": head, "lr": 10 * lr, "base_lr": 10 * lr}]


def set_train(net, freeze_bn):
    """train() mode; with freeze_bn (warm-up command) BatchNorm layers in eval mode with frozen affine parameters."""
    net.train()
    if freeze_bn:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
                for p in m.parameters():
                    p.requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# Train: one (micro-)step of each stage. Each returns detached losses; the caller steps the optimizers.
# ----------------------------------------------------------------------------------------------------------------


def source_loss(net, src, args):
    """Supervised source CE: the output upsampled to the crop (align_corners=True), ignore 250. With S_pseudo_src > 0
    (warm-up) the source's strong view is used instead (official): CE at the network's resolution against the label
    downsampled (nearest) and replayed onto the strong view, times S_pseudo_src. Official defect: that replay uses
    scale 4 on a 1/8 map (translations and cutout coordinates doubled); --exact_replay uses 8.
    Returns (loss, output upsampled to the crop)."""
    size = src["img"].shape[2:]
    if args.stage_name == "warmup" and args.S_pseudo_src > 0:
        out = net(src["img_strong"])["out"]
        label = F.interpolate(src["label"][:, None].float(), size=out.shape[2:])
        scale = 8 if args.exact_replay else 4
        label = replay_strong(label, src["params"], scale=scale, exact=args.exact_replay).long()[:, 0]
        return seg_loss(out, label, IGNORE) * args.S_pseudo_src, upsample(out.float(), size)
    out = upsample(net(src["img"])["out"].float(), size)
    return seg_loss(out, src["label"], IGNORE), out


def warmup_step(net, discriminator, src, tgt, args, scale):
    """Warm-up (official `step_adv`): L = L_seg(source) + adv * L_adv(target) with D frozen (one backward), then
    D's step on the detached outputs. With --adv 0 this is source-only training (no target forward, no D); with
    --target_bn_only as well, the target batch goes through the network in train mode without a loss, so only
    BatchNorm's statistics take it in (the demo's control)."""
    if args.adv == 0:
        with amp_autocast(args.device, args.amp):
            loss_src, _ = source_loss(net, src, args)
        scale(loss_src).backward()
        if args.target_bn_only:
            with torch.no_grad(), amp_autocast(args.device, args.amp):
                net(tgt["img"])
        return {"loss_source": loss_src.detach()}
    for p in discriminator.parameters():
        p.requires_grad_(False)
    with amp_autocast(args.device, args.amp):
        loss_src, src_up = source_loss(net, src, args)
        tgt_up = upsample(net(tgt["img"])["out"].float(), tgt["img"].shape[2:])
        loss_adv, _ = adversarial_loss(tgt_up, discriminator, args.adv, args.gan)
    scale(loss_src + loss_adv).backward()
    for p in discriminator.parameters():
        p.requires_grad_(True)
    loss_d = discriminator_loss(src_up, tgt_up, discriminator, args.gan)
    scale(loss_d).backward()
    return {"loss_source": loss_src.detach(), "loss_adv": loss_adv.detach(), "loss_D": loss_d.detach()}


def stage1_step(net, ema, prototypes, src, tgt, args, scale):
    """Stage 1 (official `CustomModel.step`): source CE (its own backward), EMA teacher on the full target image,
    student on the weak and strong views, L = proto_consistW * L_consist + L_CTS. Returns (losses, EMA class mean
    vectors and ids for the prototype update, intermediates)."""
    with amp_autocast(args.device, args.amp):
        loss_src, _ = source_loss(net, src, args)
    scale(loss_src).backward()  # its own backward first, as the official code (frees the source graph)
    with torch.no_grad(), amp_autocast(args.device, args.amp):
        ema_out = ema(tgt["img_full"])
    with amp_autocast(args.device, args.amp):
        if args.stage1_strong:  # corrected form of the official S_pseudo > 0 branch: CE on the strong view
            target_out = net(tgt["img_strong"])
            strong_feat = target_out["feat"]
        else:
            target_out = net(tgt["img"])
            strong_feat = net(tgt["img_strong"])["feat"]
    loss, parts = stage1_target_losses(target_out, strong_feat, ema_out, tgt["img_full"].shape[2:], tgt["lpsoft"],
                                       tgt["weak_params"], tgt["params"], prototypes.vectors, args)
    scale(loss).backward()
    ema_logits = upsample(ema_out["out"].float(), parts["ema_feat_up"].shape[2:])
    vectors, ids = class_mean_vectors(parts["ema_feat_up"], ema_logits, prototypes.vectors.shape[0])
    losses = {"loss_source": loss_src.detach(), "loss": loss.detach(), "loss_CTS": parts["loss_CTS"].detach(),
              "loss_consist": parts["loss_consist"].detach()}
    return losses, (vectors, ids), parts


def distill_step(net, teacher, src, tgt, args, scale):
    """Stages 2-3 (official `step_distillation` with S_pseudo 1): source CE, then the student on the strong view
    against the hard pseudo labels (nearest x0.25, replayed onto the strong view) + KL to the teacher."""
    with amp_autocast(args.device, args.amp):
        loss_src, _ = source_loss(net, src, args)
    scale(loss_src).backward()
    labels = F.interpolate(tgt["lp"][:, None].float(), scale_factor=0.25)
    labels = replay_strong(labels, tgt["params"], scale=4, exact=args.exact_replay).long()[:, 0]
    with amp_autocast(args.device, args.amp):
        out = net(tgt["img_strong"])["out"]
        with torch.no_grad():
            teacher_out = teacher(tgt["img_strong"])["out"]
    out, teacher_out = upsample(out.float(), labels.shape[1:]), upsample(teacher_out.float(), labels.shape[1:])
    loss, parts = distillation_losses(out, teacher_out, labels, args)
    scale(loss).backward()
    return {"loss_source": loss_src.detach(), "loss": loss.detach(), "loss_kd": parts["loss_kd"].detach()}


# ----------------------------------------------------------------------------------------------------------------
# Pseudo labels and prototypes (official generate_pseudo_label.py, calc_prototype.py)
# ----------------------------------------------------------------------------------------------------------------


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_file(obj, path):
    """torch.save on rank 0 through a temporary file and a rename: a run killed while writing keeps the old file."""
    if is_main_process():
        atomic_write(path, lambda tmp: torch.save(obj, tmp))


@contextmanager
def whole_folder(folder):
    """Write a folder's files (each process its share) into FOLDER.partial, and put it in FOLDER's place once every
    process is done: a run stopped midway never leaves a half-written folder for the next stage to read."""
    partial = folder.with_name(folder.name + ".partial")
    if is_main_process():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    yield partial
    barrier()
    if is_main_process():
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
    barrier()


@torch.no_grad()
def write_hard_pseudo_labels(net, dataset, out_dir, args):
    """--flip: flip-averaged softmax at image size; saves the argmax (.png) and its confidence (_conf.npy,
    float16 as the official code); the next stage sets confidence <= --threshold (0.95) to 250."""
    net.eval()
    with whole_folder(out_dir) as partial:
        for image, _, names in eval_loader(dataset, args):
            image = image.to(args.device)
            with amp_autocast(args.device, args.amp):
                logits, flip_logits = net(image)["out"], net(image.flip(3))["out"]
            confidence, labels = flip_average(logits, flip_logits, image.shape[2:]).max(1)
            for c, lab, name in zip(confidence, labels, names):
                base = os.path.basename(name)
                Image.fromarray(lab.cpu().numpy().astype(np.uint8)).save(partial / base)
                np.save(partial / base.replace(".png", "_conf.npy"), c.cpu().numpy().astype(np.float16))


@torch.no_grad()
def soft_pseudo_labels_and_prototypes(net, dataset, out_dir, args):
    """The warm-up model's outputs on the target train images (no augmentation, eval mode) in one pass, for the two
    official scripts that read them:
    generate_pseudo_label.py --soft: the softmax at network resolution, one float32 [C, h, w] .npy per image in
    out_dir; calc_prototype.py: per image and predicted class with >= 10 pixels, the mean feature at network
    resolution, folded into running means (counts capped at 3000) over `proto_epochs` (4) passes. In eval mode each
    pass sees the same vectors: they are computed once and folded in proto_epochs times in the same order.
    Returns the initial Prototypes."""
    net.eval()
    collected = []
    with whole_folder(out_dir) as partial:
        for image, _, names in eval_loader(dataset, args):
            with amp_autocast(args.device, args.amp):
                out = net(image.to(args.device))
            prob = F.softmax(out["out"].float(), dim=1)
            for p, name in zip(prob, names):
                np.save(partial / os.path.basename(name).replace(".png", ".npy"), p.cpu().numpy())
            collected.append(class_mean_vectors(out["feat"].float(), out["out"].float(), args.num_classes))
    vectors = torch.cat([v for v, _ in collected]) if collected else torch.zeros(0, args.feat_dim)
    ids = torch.cat([i for _, i in collected]) if collected else torch.zeros(0, dtype=torch.long)
    vectors, ids = gather_vectors(vectors, ids)
    prototypes = Prototypes(torch.zeros(args.num_classes, args.feat_dim))
    for _ in range(args.proto_epochs):
        prototypes.update_all(vectors, ids, mode="mean")
    return prototypes


def gather_vectors(vectors, ids):
    """The class mean vectors of all processes, in rank order (prototype updates stay identical on every rank)."""
    if get_world_size() < 2:
        return vectors.cpu(), ids.cpu()
    parts = [None] * get_world_size()
    dist.all_gather_object(parts, (vectors.cpu(), ids.cpu()))
    return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])


# ----------------------------------------------------------------------------------------------------------------
# Stages: warm-up -> (soft pseudo labels, prototypes) -> stage 1 -> (hard labels) -> stage 2 -> (hard labels) -> 3
# ----------------------------------------------------------------------------------------------------------------

PRODUCER = {"1": "warmup", "2": "1", "3": "2"}


def stage_title(stage):
    return "the warm-up stage" if stage == "warmup" else f"stage {stage}"


def require(path, what, stage, args, flag):
    """A missing input of a stage started alone: say which stage writes it and how to run that stage."""
    if not Path(path).exists():
        producer = PRODUCER[stage]
        raise SystemExit(f"stage {stage} needs {what} at {path}, which does not exist. It is written by "
                         f"{stage_title(producer)}: run "
                         f"`python proda.py --stage {producer} --output_dir {args.output_dir} ...` (with the same "
                         f"data flags) first, or pass {flag}.")
    return Path(path)


def require_files(folder, names, suffixes, stage, args, flag):
    missing = [os.path.basename(n).replace(".png", s) for n in names for s in suffixes
               if not (folder / os.path.basename(n).replace(".png", s)).is_file()]
    if missing:
        raise SystemExit(f"stage {stage}: {len(missing)} pseudo-label files missing in {folder} (e.g. {missing[:3]}); "
                         f"they are written by {stage_title(PRODUCER[stage])}: "
                         f"run `python proda.py --stage {PRODUCER[stage]} --output_dir {args.output_dir} ...` or "
                         f"pass {flag}")


def stage_inputs(stage, args, data, first):
    """Networks, prototypes and pseudo-label folders that `stage` starts from (the previous stage's outputs)."""
    device, C = args.device, args.num_classes
    prev = PRODUCER.get(stage)
    given = args.resume_path if first else None
    inputs = {}
    if stage == "warmup":
        if given:
            net, _ = net_from_file(args, given)
        else:
            net = build_net(args)
            init_student(args, net, stage)
        inputs["discriminator"] = FCDiscriminator(C, args.ndf).to(device)
    elif stage == "1":
        net, _ = net_from_file(args, given or require(model_file(args, prev), "the warm-up model", stage, args,
                                                        "--resume_path"))
        inputs["ema"] = copy.deepcopy(net).to(device)  # stays in train mode, as the official BaseNet_ema
        proto_path = require(args.proto_path or stage_dir(args, prev) / "prototypes.pth", "the initial prototypes",
                             stage, args, "--proto_path")
        vectors = load_checkpoint(proto_path)  # ours: {'prototypes', 'counts'}; official calc_prototype.py: a tensor
        vectors = vectors["prototypes"] if isinstance(vectors, dict) else torch.as_tensor(vectors)
        if tuple(vectors.shape) != (C, args.feat_dim):
            raise SystemExit(f"{proto_path}: prototypes of shape {tuple(vectors.shape)}, expected ({C}, "
                             f"{args.feat_dim}) (--num_classes x --feat_dim); made by another warm-up model")
        inputs["prototypes"] = Prototypes(vectors.to(device), args.proto_momentum)
        soft_dir = require(args.path_soft or stage_dir(args, prev) / "pseudo_soft", "soft pseudo labels", stage, args,
                           "--path_soft")
        require_files(soft_dir, data["target_train"].names, [".npy"], stage, args, "--path_soft")
        inputs["train_set"] = TargetTrainSet(data["target_train"], args, soft_dir=soft_dir)
    else:
        teacher_path = given or require(model_file(args, prev), f"the stage-{prev} model", stage, args, "--resume_path")
        teacher, _ = net_from_file(args, teacher_path)
        inputs["teacher"] = compile_model(teacher.to(device).eval(), args.compile)
        if stage == "3" and not args.stage3_reinit:  # README stage-3 command (no --no_resume): resume the teacher
            net, _ = net_from_file(args, teacher_path)
            print(f"stage 3: the student starts from the stage-2 model {teacher_path} (--stage3_reinit: from "
                  f"--student_init as stage 2)")
        else:
            net = build_net(args, bn_clr=args.bn_clr)
            init_student(args, net, stage)
        hard_dir = require(args.path_LP or stage_dir(args, prev) / "pseudo_labels", "hard pseudo labels", stage,
                           args, "--path_LP")
        require_files(hard_dir, data["target_train"].names, [".png", "_conf.npy"], stage, args, "--path_LP")
        inputs["train_set"] = TargetTrainSet(data["target_train"], args, hard_dir=hard_dir)
    if stage == "warmup":
        inputs["train_set"] = TargetTrainSet(data["target_train"], args)
    inputs["net"] = compile_model(net.to(device), args.compile)
    return inputs


def run_identity(args):
    """What a checkpoint must match to be resumed here (common/training.py check_identity)."""
    return {"script": "proda.py", "source": args.source, "num_classes": args.num_classes, "layers": list(args.layers),
            "width": args.width, "feat_dim": args.feat_dim}


def checkpoint_path(args, stage):
    return stage_dir(args, stage) / "checkpoint.pth"


def last_checkpoint(args, stage):
    """The checkpoint a run stopped in `stage` continues from: the stage's own, else the latest earlier stage's."""
    for s in reversed(STAGES[:STAGES.index(stage) + 1]):
        if checkpoint_path(args, s).is_file():
            return checkpoint_path(args, s)
    return None


def run_stage(stage, args, data, first, stop, resume=None):
    """Train one stage, evaluate it, write its model (official format), eval.json and the next stage's inputs.

    Each stage starts from --seed, as each official command does, so it depends only on the earlier stages' files.
    checkpoint.pth is written at each validation and every --checkpoint_every iterations; on SIGTERM / SIGINT at
    the end of the iteration, then the run stops (`stop`, a StopSignal)."""
    args.stage_name = stage
    seed_everything(args.seed)
    out_dir = stage_dir(args, stage)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"==> stage {stage} -> {out_dir}")
    inputs = stage_inputs(stage, args, data, first)
    net, device = inputs["net"], args.device
    lr = {"warmup": args.lr_warmup, "1": args.lr, "2": args.lr_distill, "3": args.lr_distill}[stage]
    freeze_bn = stage == "warmup" and args.freeze_bn
    set_train(net, freeze_bn)
    optimizer = torch.optim.SGD(param_groups(net, lr, stage), lr=lr, momentum=0.9, weight_decay=2e-4)
    disc = inputs.get("discriminator")
    optimizer_d = torch.optim.Adam(disc.parameters(), lr=args.lr_D, betas=(0.9, 0.99)) if disc is not None else None
    if optimizer_d is not None:
        for g in optimizer_d.param_groups:
            g["base_lr"] = args.lr_D
    scaler = grad_scaler(device, args.amp)
    prototypes, ema, teacher = inputs.get("prototypes"), inputs.get("ema"), inputs.get("teacher")

    micro = args.batch_size // (args.accum_steps * args.world_size)
    source_set = SourceSet(data["source"], args, strong=stage == "warmup" and args.S_pseudo_src > 0)
    src_loader = train_loader(source_set, args, micro, f"{args.src_rootpath} (source)", args.seed + SOURCE_SEED)
    tgt_loader = train_loader(inputs["train_set"], args, micro, f"{args.tgt_rootpath} train (target)", args.seed)
    iters = args.warmup_iters if stage == "warmup" and args.warmup_iters is not None else args.train_iters
    total = min(iters, args.epochs * len(tgt_loader) // args.accum_steps)
    start, best, evals = 0, -1.0, {}  # evals: 'best' / 'last' -> (iteration, result) of the evaluations
    if resume is not None:
        load_strict(net, resume["model"], args.resume, args)
        optimizer.load_state_dict(resume["optimizer"])
        if disc is not None:
            disc.load_state_dict(resume["discriminator"])
            optimizer_d.load_state_dict(resume["optimizer_D"])
        if ema is not None:
            ema.load_state_dict(resume["ema"])
            prototypes.vectors = resume["prototypes"].to(device)
            prototypes.counts = resume["prototype_counts"].to(device)
        scaler.load_state_dict(resume["scaler"])
        start, best, evals = resume["iteration"], resume["best_miou"], resume["evals"]
        print(f"resumed stage {stage} at iteration {start} from {args.resume}")
    if args.distributed and args.gpu is not None:  # sync BN over the GPUs, as the official SynchronizedBatchNorm2d
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # same parameters and keys; CPU (gloo) keeps plain BN
        set_train(net, freeze_bn)
    ddp_net = DDP(net, device_ids=[args.gpu] if args.gpu is not None else None) if args.distributed else net
    if disc is not None and args.distributed:
        for p in disc.parameters():
            dist.broadcast(p.data, 0)
    ckpt = checkpoint_path(args, stage)

    def save(iteration):
        """checkpoint.pth after `iteration` iterations (every process takes part: the RNG states are gathered)."""
        save_checkpoint(ckpt, identity=run_identity(args), stage=stage, model=net.state_dict(),
                        optimizer=optimizer.state_dict(), iteration=iteration, best_miou=best, evals=evals, args=args,
                        scaler=scaler.state_dict(), discriminator=disc.state_dict() if disc is not None else None,
                        optimizer_D=optimizer_d.state_dict() if optimizer_d is not None else None,
                        ema=ema.state_dict() if ema is not None else None,
                        prototypes=prototypes.vectors if prototypes else None,
                        prototype_counts=prototypes.counts if prototypes else None, rng=rng_states())

    # endless passes, a new one each time a loader runs out (official DataProvider); each continues where the run
    # stopped: iterations x micro-batches
    src_iter = endless_batches(src_loader, start * args.accum_steps)
    tgt_iter = endless_batches(tgt_loader, start * args.accum_steps)
    logger = MetricLogger(delimiter="  ")
    logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.2e}"))

    def scale(loss):
        return scaler.scale(loss / args.accum_steps)

    if total == 0:
        save(0)
    restore_rng(resume.get("rng") if resume is not None else None)  # last: the draws continue where they stopped
    for it in logger.log_every(range(start, total), args.print_interval, f"stage {stage}:"):
        for opt in (optimizer, optimizer_d):
            for g in (opt.param_groups if opt is not None else []):
                g["lr"] = segmentation.lr_poly(g["base_lr"], it, iters, 0.9)  # poly 0.9 per iteration
        optimizer.zero_grad(set_to_none=True)
        if optimizer_d is not None:
            optimizer_d.zero_grad(set_to_none=True)
        collected = []
        for k in range(args.accum_steps):
            src, tgt = to_device(next(src_iter), device), to_device(next(tgt_iter), device)
            sync = nullcontext() if not args.distributed or k == args.accum_steps - 1 else ddp_net.no_sync()
            with sync:
                if stage == "warmup":
                    losses = warmup_step(ddp_net, disc, src, tgt, args, scale)
                elif stage == "1":
                    losses, vectors, parts = stage1_step(ddp_net, ema, prototypes, src, tgt, args, scale)
                    collected.append(vectors)
                else:
                    losses = distill_step(ddp_net, teacher, src, tgt, args, scale)
            losses = reduce_dict(losses)
            where = f"stage {stage}, iteration {it + 1}" + (f", micro-batch {k + 1}" if args.accum_steps > 1 else "")
            check_finite_loss(losses, where, last_checkpoint(args, stage))  # before the optimizer step
        if disc is not None and args.distributed:
            for p in disc.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= args.world_size
        scaler.step(optimizer)
        if optimizer_d is not None and args.adv > 0:
            scaler.step(optimizer_d)
        scaler.update()
        if stage == "1":  # Eq. (6): momentum prototypes from the EMA teacher's output; then the EMA teacher
            vectors, ids = gather_vectors(torch.cat([v for v, _ in collected]), torch.cat([i for _, i in collected]))
            prototypes.update_all(vectors.to(device), ids)
            ema_update(ema, net, args.ema_decay)
            if args.viz and (it == start or (it + 1) % args.val_interval == 0) and is_main_process():
                visualise_rectification(tgt, parts, out_dir / "viz" / f"pseudo_rectified_{it + 1:06d}.png", args)
        logger.update(lr=optimizer.param_groups[0]["lr"], **losses)
        evaluated = (it + 1) % args.val_interval == 0 or it + 1 == total
        if evaluated:
            result = evaluate(net, data["target_val"], args)
            set_train(net, freeze_bn)
            print(f"stage {stage} iteration {it + 1}: target mIoU {result['mIoU']:.2f}")
            append_log(out_dir, {"stage": stage, "iteration": it + 1, "mIoU": result["mIoU"],
                                 **{k: float(v.global_avg) for k, v in logger.meters.items()}})
            official = {"ResNet101": {"model_state": net.state_dict(),
                                      "objective_vectors": prototypes.vectors if prototypes else None},
                        "iter": it + 1, "best_iou": result["mIoU"]}
            if disc is not None:
                official["FCDiscriminator"] = {"model_state": disc.state_dict()}
            evals["last"] = (it + 1, result)
            if result["mIoU"] >= best:
                best, evals["best"] = result["mIoU"], (it + 1, result)
                save_file(official, model_file(args, stage, "best"))
            save_file(official, model_file(args, stage, "last"))
        saved = evaluated or bool(args.checkpoint_every and (it + 1) % args.checkpoint_every == 0)
        if saved:
            save(it + 1)
        if stop.requested():
            if not saved:
                save(it + 1)
            stop.exit(ckpt)
    finish_stage(stage, net, args, data, out_dir, evals)


def finish_stage(stage, net, args, data, out_dir, evals):
    """Hand on the selected model (best on val, as the official code, or --select last): its eval.json and the
    inputs of the next stage. Without training (--train_iters 0) the starting model is evaluated and handed on."""
    barrier()
    if args.select in evals:
        path = model_file(args, stage)
        load_strict(net, read_model(path)[0], path, args)
        iteration, result = evals[args.select]
    else:
        iteration, result = 0, evaluate(net, data["target_val"], args)
        save_file({"ResNet101": {"model_state": net.state_dict(), "objective_vectors": None}, "iter": 0,
                   "best_iou": result["mIoU"]}, model_file(args, stage))
    print(f"stage {stage} ({args.select} model, iteration {iteration}): target mIoU {result['mIoU']:.2f}")
    print(per_class_table(result))
    write_json(out_dir / "eval.json", {"stage": stage, "selected": args.select, "iteration": iteration, **result})
    if args.viz and is_main_process():
        visualise_predictions(net, data["target_val"], out_dir / "viz", args)
    if stage == "warmup":  # soft pseudo labels and initial prototypes for stage 1
        prototypes = soft_pseudo_labels_and_prototypes(net, data["target_train"], out_dir / "pseudo_soft", args)
        save_file({"prototypes": prototypes.vectors, "counts": prototypes.counts}, out_dir / "prototypes.pth")
    elif stage in ("1", "2"):  # hard, flip-averaged pseudo labels for the next distillation stage
        write_hard_pseudo_labels(net, data["target_train"], out_dir / "pseudo_labels", args)
    barrier()
    return result


def per_class_table(result):
    names = list(result["per_class"])
    head = " | ".join(f"{n[:8]:>8}" for n in names)
    vals = " | ".join(f"{'-' if v is None else format(v, '.1f'):>8}" for v in result["per_class"].values())
    return f"{head}\n{vals}"


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------------
# Evaluate (Cityscapes val at full resolution, shared mIoU) and visualise
# ----------------------------------------------------------------------------------------------------------------


def evaluate(net, dataset, args):
    """mIoU on target val: logits upsampled (align_corners=True) to the full label size, one confusion matrix over
    the split (summed over processes). Returns {'mIoU', 'per_class', ['mIoU13']} in percent."""
    val_loader = eval_loader(dataset, args)
    with amp_autocast(args.device, args.amp):
        cm = segmentation.evaluate(net, val_loader, args.num_classes, args.device, IGNORE)
    return cm.summary()


@torch.no_grad()
def visualise_predictions(net, dataset, out_dir, args):
    """--viz: image | ground truth | prediction, colourised, for the first --viz_count val images."""
    net.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(min(args.viz_count, len(dataset))):
        image, label, name = dataset[i]
        logits = net(image[None].to(args.device))["out"].float()
        pred = upsample(logits, label.shape).argmax(1)[0]
        panels = [Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)),
                  segmentation.colorize(label, args.num_classes).convert("RGB"),
                  segmentation.colorize(pred, args.num_classes).convert("RGB")]
        side_by_side(panels).save(out_dir / os.path.basename(name))


def visualise_rectification(tgt, parts, path, args):
    """--viz, stage 1: the weak view | raw soft pseudo label (argmax) | prototype-rectified pseudo label."""
    size = tuple(tgt["img"].shape[2:][::-1])
    weak = Image.fromarray((tgt["img"][0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))
    raw = segmentation.colorize(parts["threshold_arg_soft"][0].argmax(0), args.num_classes).convert("RGB")
    rectified = segmentation.colorize(parts["pseudo_label_rectified"][0], args.num_classes).convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    side_by_side([weak, raw.resize(size, Image.NEAREST), rectified.resize(size, Image.NEAREST)]).save(path)


def side_by_side(panels):
    canvas = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)))
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width
    return canvas


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    init_distributed(args)
    args.device = str(resolve_device(args.device))
    if args.deterministic:
        make_deterministic()
    seed_everything(args.seed)
    finalise_args(args)
    print(" ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    data = build_data(args)
    if args.eval:
        stage = args.stage[-1]
        path = args.resume or args.resume_path or model_file(args, stage)
        net, _ = net_from_file(args, path)
        compile_model(net.to(args.device), args.compile)
        result = evaluate(net, data["target_val"], args)
        print(f"{path}: target mIoU {result['mIoU']:.2f}")
        print(per_class_table(result))
        write_json(Path(args.output_dir) / "eval.json", {"checkpoint": str(path), **result})
        if args.viz and is_main_process():
            visualise_predictions(net, data["target_val"], Path(args.output_dir) / "viz", args)
        return result
    stages = [s for s in STAGES if s in args.stage]
    resume = resume_checkpoint(args, stages) if args.resume else None
    if resume is not None:
        skipped, stages = stages[:stages.index(resume["stage"])], stages[stages.index(resume["stage"]):]
        if skipped:
            print(f"--resume: skipping stages {skipped} (their outputs are read from {args.output_dir})")
    start, stop = time.time(), StopSignal()
    try:
        for i, stage in enumerate(stages):
            run_stage(stage, args, data, first=i == 0, stop=stop, resume=resume if i == 0 else None)
            if i + 1 < len(stages) and stop.requested():  # the signal came while the stage wrote its outputs
                stop.exit(checkpoint_path(args, stage))
    finally:
        stop.close()
    print(f"done in {time.time() - start:.0f}s")


def resume_checkpoint(args, stages):
    """The --resume checkpoint: one of this script's stage checkpoints, for this model and class count."""
    checkpoint = load_checkpoint(args.resume)
    source = f"--resume {args.resume}"
    check_identity(checkpoint, run_identity(args), source)
    if not isinstance(checkpoint, dict) or checkpoint.get("stage") not in STAGES or "iteration" not in checkpoint:
        found = list(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise SystemExit(f"{source}: expected a proda.py checkpoint (OUTPUT_DIR/<stage>/checkpoint.pth, with 'stage', "
                         f"'iteration', 'model', ...), found {found}; a model to start from goes to --resume_path")
    if checkpoint["stage"] not in stages:
        raise SystemExit(f"{source} is a stage-{checkpoint['stage']} checkpoint, not one of the stages to run "
                         f"({' '.join(stages)})")
    return checkpoint


if __name__ == "__main__":
    main(get_args_parser().parse_args())
