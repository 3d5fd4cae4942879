"""AdaptSegNet: Learning to Adapt Structured Output Space for Semantic Segmentation.

Yi-Hsuan Tsai, Wei-Chih Hung, Samuel Schulter, Kihyuk Sohn, Ming-Hsuan Yang, Manmohan Chandraker. CVPR 2018,
arXiv:1802.10349. Official code: https://github.com/wasidennis/AdaptSegNet (fca9ff0).

What this file reproduces: multi-level output-space adversarial adaptation of DeepLab-v2 ResNet-101 from GTA5 (19
classes) or SYNTHIA (16 classes, mIoU-13 also reported) to Cityscapes, scored by mIoU on Cityscapes val at full
label resolution. A discriminator per output level (aux on layer3, main on layer4) tells source from target
softmax maps; the segmentation network learns to fool them. Defaults are the official script's
(`train_gta2cityscapes_multi.py`), so released checkpoints load and the training loop is the official one step
for step (parity tests: tests/test_adaptsegnet.py). The paper's 42.4 mIoU (GTA5 -> Cityscapes) is not yet
reproduced here: that needs a GPU and ~150k iterations. The synthetic demo's results are in the README's demo table;
what was measured and tried, and the differences below with their reasons: docs/adaptsegnet.md.

Real data (GTA5 under DATA/gta5, Cityscapes under DATA/cityscapes, Caffe DeepLab init from the official repo):
    python adaptsegnet.py --data_root DATA --init DeepLab_resnet_pretrained_init-f81d91e8.pth --output_dir out/asn
    python adaptsegnet.py --data_root DATA --eval --resume GTA2Cityscapes_multi-ed35151c.pth     # released model
    python adaptsegnet.py --data_root DATA --init INIT --lambda_adv_target1 0 --lambda_adv_target2 0   # source-only
    torchrun --nproc_per_node 4 adaptsegnet.py --data_root DATA --init INIT --output_dir out/asn
Synthetic demo (small DeepLab, 128x64 inputs; see demos/adaptsegnet.sh):
    make demo-adaptsegnet

Differences from the official code:
- `--aspp_branches 2` (default) keeps the official classifier, which returns inside its loop and so sums only the
  dilation-6 and -12 branches (the released models depend on it); `--aspp_branches 4` is the intended ASPP.
- The optimizer lists each parameter once; the official `optim_parameters` lists backbone weights ~3 times, which on
  PyTorch 0.4 made the backbone step about 3x the nominal lr (common/deeplab.py).
- Source-only (`--lambda_adv_target1 0 --lambda_adv_target2 0`) skips the target forward and the discriminators
  altogether (the official loop would still run them, and target images would then update BN running statistics).
- SYNTHIA -> Cityscapes (16 classes, mIoU-13) and the Cityscapes oracle (`--source cityscapes`) are ours: the
  official repository has GTA5 only. No `--iter_size` (gradient accumulation; official default 1).
- Training reads the source and the target images in per-epoch permutations drawn from --seed (common/uda.py
  `train_loader`), and checkpoint.pth holds every random generator, so `--resume` continues the same run (bit for
  bit with `--deterministic`; `--checkpoint_every N` saves between snapshots); SIGTERM / SIGINT save a checkpoint
  after the iteration and stop; a non-finite loss stops the run naming every term and the last good checkpoint.
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import uda
from common.training import (
    amp_autocast,
    init_distributed,
    make_deterministic,
    resolve_device,
    seed_everything,
)

SOURCE_LABEL, TARGET_LABEL = 0, 1  # official convention (the paper's Eq. (2) uses z = 1 for source)


# ----------------------------------------------------------------------------------------------------------------
# Arguments (defaults: the official train_gta2cityscapes_multi.py)
# ----------------------------------------------------------------------------------------------------------------


def get_args_parser():
    parser = argparse.ArgumentParser("AdaptSegNet: multi-level output-space adaptation", add_help=True)
    model, loss, data, optim, run = uda.add_common_args(parser, aspp_branches=2, save_pred_every=5000, defaults={
        "model": "defaults: the official model/deeplab_multi.py and model/discriminator.py; paper Sec. 3.1",
        "loss": "defaults: the official train_gta2cityscapes_multi.py; paper Eq. (2)-(5)",
        "data": "defaults: the official train_gta2cityscapes_multi.py and dataset/; paper Sec. 4",
        "optimisation": "defaults: the official train_gta2cityscapes_multi.py; paper Sec. 4, implementation details",
        "run": "defaults: the official train_gta2cityscapes_multi.py and evaluate_cityscapes.py where they have it"})
    optim.add_argument("--learning_rate", "--learning-rate", type=float, default=2.5e-4,
                       help="SGD base lr of the segmentation network (classifiers 10x), Sec. 4 implementation")
    optim.add_argument("--learning_rate_D", "--learning-rate-D", type=float, default=1e-4,
                       help="Adam lr of the discriminators, betas (0.9, 0.99)")
    optim.add_argument("--momentum", type=float, default=0.9)
    optim.add_argument("--weight_decay", "--weight-decay", type=float, default=5e-4)
    optim.add_argument("--power", type=float, default=0.9, help="poly lr decay power")
    optim.add_argument("--num_steps", "--num-steps", type=int, default=250000, help="poly schedule length")
    optim.add_argument("--num_steps_stop", "--num-steps-stop", type=int, default=150000,
                       help="iterations actually trained (early stop of the poly schedule)")
    loss.add_argument("--lambda_seg", "--lambda-seg", type=float, default=0.1,
                      help="lambda_seg of the aux (layer3) output, Eq. (5)")
    loss.add_argument("--lambda_adv_target1", "--lambda-adv-target1", type=float, default=0.0002,
                      help="lambda_adv of the aux output, Eq. (5); 0 for both = source-only")
    loss.add_argument("--lambda_adv_target2", "--lambda-adv-target2", type=float, default=0.001,
                      help="lambda_adv of the main output, Eq. (5)")
    loss.add_argument("--target_bn_only", action="store_true",
                      help="with both adversarial weights 0: still run the target images through the network in "
                           "train mode (BatchNorm statistics take in the target; no adaptation loss), the control")
    loss.add_argument("--gan", choices=["Vanilla", "LS"], default="Vanilla",
                      help="discriminator objective: BCE (Eq. (2)) or least squares")
    model.add_argument("--ndf", type=int, default=64, help="discriminator width")
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Model: DeepLab-v2 (common/deeplab.py) and the fully-convolutional discriminator (Sec. 3.1)
# ----------------------------------------------------------------------------------------------------------------


class FCDiscriminator(nn.Module):
    """D(P) for a softmax map P [B, C, H, W] -> per-cell source/target logits [B, 1, H/32, W/32].

    Five 4x4 stride-2 convolutions (64, 128, 256, 512, 1 channels), LeakyReLU(0.2) between them, no batch norm
    and no sigmoid (the loss takes logits). Keys `conv1..conv4, classifier` as the official model/discriminator.py.
    """

    def __init__(self, num_classes, ndf=64):
        super().__init__()
        self.conv1, self.conv2, self.conv3, self.conv4, self.classifier = uda.fc_discriminator_convs(num_classes, ndf)
        self.leaky_relu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x):
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = self.leaky_relu(conv(x))
        return self.classifier(x)


# ----------------------------------------------------------------------------------------------------------------
# Losses: Eq. (2) discriminator, Eq. (4) adversarial (segmentation loss Eq. (3): common/uda.py)
# ----------------------------------------------------------------------------------------------------------------


# Eq. (2)/(4) in the official form: BCE-with-logits against a constant domain label, or the LS-GAN squared error
# (`--gan LS`), averaged over the discriminator's output cells.
gan_loss = uda.gan_loss


# ----------------------------------------------------------------------------------------------------------------
# Train: one iteration of Eq. (6), min_G max_D, as the official loop
# ----------------------------------------------------------------------------------------------------------------


def train_one_iteration(model, d_aux, d_main, source, target, args, scaler):
    """Backward passes of one iteration (the caller zeroes gradients before and steps the optimizers after).

    1. Segmentation network, discriminators frozen: L_seg on the source (main + lambda_seg * aux), then on the
       target L_adv = lambda_adv^1 * L_adv(D1(softmax(aux_t))) + lambda_adv^2 * L_adv(D2(softmax(main_t))), which
       asks the discriminators to call target maps "source" (Eq. (4), label 0).
    2. Discriminators on detached maps: source maps labelled 0, target maps labelled 1, each loss halved.
    """
    images_s, labels_s = source
    with amp_autocast(images_s.device, args.amp):
        loss, logs, (aux_s, main_s) = uda.source_segmentation_step(model, images_s, labels_s, args.lambda_seg)
    scaler.scale(loss).backward()
    if args.lambda_adv_target1 == 0 and args.lambda_adv_target2 == 0:  # source-only baseline
        if args.target_bn_only:
            with torch.no_grad(), amp_autocast(images_s.device, args.amp):
                model(target)
        return logs

    uda.set_requires_grad([d_aux, d_main], False)
    with amp_autocast(images_s.device, args.amp):
        aux_t, main_t = model(target)
        aux_t, main_t = uda.upsample(aux_t, target.shape[-2:]), uda.upsample(main_t, target.shape[-2:])
        # Eq. (4): -sum log D(P_t)^(source), on the softmax of each level
        loss_adv_aux = gan_loss(d_aux(F.softmax(aux_t.float(), dim=1)), SOURCE_LABEL, args.gan)
        loss_adv_main = gan_loss(d_main(F.softmax(main_t.float(), dim=1)), SOURCE_LABEL, args.gan)
        loss = args.lambda_adv_target1 * loss_adv_aux + args.lambda_adv_target2 * loss_adv_main
    scaler.scale(loss).backward()
    uda.set_requires_grad([d_aux, d_main], True)

    loss_d = {}
    for name, disc, pred_s, pred_t in (("aux", d_aux, aux_s, aux_t), ("main", d_main, main_s, main_t)):
        with amp_autocast(images_s.device, args.amp):
            # Eq. (2): the discriminator learns source = 0, target = 1 on detached maps
            loss_d_s = gan_loss(disc(F.softmax(pred_s.detach().float(), dim=1)), SOURCE_LABEL, args.gan) / 2
            loss_d_t = gan_loss(disc(F.softmax(pred_t.detach().float(), dim=1)), TARGET_LABEL, args.gan) / 2
        scaler.scale(loss_d_s + loss_d_t).backward()
        loss_d[f"loss_D_{name}"] = (loss_d_s + loss_d_t).detach()
    return {**logs, "loss_adv_aux": loss_adv_aux.detach(), "loss_adv_main": loss_adv_main.detach(), **loss_d}


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def main(args):
    init_distributed(args)
    device = resolve_device(args.device)
    if args.deterministic:
        make_deterministic()
    seed_everything(args.seed)
    model, num_classes = uda.build_segmenter(args, device)
    data = uda.build_data(args)
    if args.eval:
        uda.evaluate_and_report(args, [model], [1.0], data["val"], num_classes, device)
        return

    # discriminators on the aux (layer3) and main (layer4) outputs; SGD for the segmenter, Adam for each D
    adversarial = uda.build_adversarial(args, model, FCDiscriminator, num_classes, device)
    d_aux, d_main = adversarial[:2]

    def iteration(source, target, scaler):
        return train_one_iteration(model, d_aux, d_main, source, target, args, scaler)

    adapt = args.lambda_adv_target1 != 0 or args.lambda_adv_target2 != 0
    uda.train(args, "adaptsegnet.py", model, adversarial, iteration, data, num_classes, device, args.num_steps_stop,
              args.num_steps, "AdaptSegNet", adapt=adapt)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
