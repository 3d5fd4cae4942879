"""ADVENT: Adversarial Entropy Minimization for Domain Adaptation in Semantic Segmentation.

Tuan-Hung Vu, Himalaya Jain, Maxime Bucher, Matthieu Cord, Patrick Perez. CVPR 2019, arXiv:1811.12833.
Official code: https://github.com/valeoai/ADVENT (3e58d45).

What this file reproduces: unsupervised adaptation of DeepLab-v2 ResNet-101 (multi-level, four-branch ASPP) from
GTA5 (19 classes) or SYNTHIA (16 classes, mIoU-13 also reported) to Cityscapes, by
- MinEnt (Sec. 3.1): minimising the normalised entropy of target predictions (`--method minent`);
- AdvEnt (Sec. 3.2): a discriminator per output level on weighted self-information maps, which the segmentation
  network learns to make look like the source ones (`--method advent`);
- the class-ratio prior (Sec. 3.3, `--class_prior`): this part follows the paper, not released code (the official
  code has none); mu = 0.5 is the paper's value as far as we know (the PDF was not at hand to check) and its weight
  `--lambda_class_prior` (0.001, the MinEnt main weight) is our choice;
- "AdvEnt+MinEnt", which the official config computes as a test-time average of the main logits of the two models
  (0.5 / 0.5), not as joint training: `--eval --ensemble ADVENT_CKPT MINENT_CKPT`.
Defaults are the official config (`advent/domain_adaptation/config.py`, `advent.yml`, `minent.yml`); parity tests
against the official code: tests/test_advent.py. The paper's 43.8 (AdvEnt) / 42.3 (MinEnt) / 45.5 (ensemble) mIoU
on GTA5 -> Cityscapes are not yet reproduced here (GPU, ~120k iterations). The synthetic demo's results are in the
README's demo table; what was measured and tried: docs/advent.md.

Real data (GTA5 under DATA/gta5, Cityscapes under DATA/cityscapes, the DeepLab ImageNet init of the official repo):
    python advent.py --method advent --data_root DATA --init DeepLab_resnet_pretrained_imagenet.pth --output_dir out/a
    python advent.py --method minent --data_root DATA --init DeepLab_resnet_pretrained_imagenet.pth --output_dir out/m
    python advent.py --data_root DATA --eval --resume gta2cityscapes_advent.pth
    python advent.py --data_root DATA --eval --ensemble gta2cityscapes_advent.pth gta2cityscapes_minent_ER.pth
    torchrun --nproc_per_node 4 advent.py --method advent --data_root DATA --init INIT --output_dir out/a
Synthetic demo (small DeepLab, 128x64 inputs; see demos/advent.sh):
    make demo-advent

Differences from the official code:
- The optimizer lists each parameter once (the official `optim_parameters` lists backbone weights ~3 times).
- `--method source_only` (no target term) is ours, for the baseline row; so are SYNTHIA (16 classes + mIoU-13),
  the Cityscapes oracle (`--source cityscapes`), the class-ratio prior and the entropy-map figures of `--viz`.
- `--select best` does what the official test `MODE: best` does (the best snapshot on the validation set) and says
  so; by default we report the last snapshot.
- Training reads the source and the target images in per-epoch permutations drawn from --seed (common/uda.py
  `train_loader`), and checkpoint.pth holds every random generator, so `--resume` continues the same run (bit for
  bit with `--deterministic`; `--checkpoint_every N` saves between snapshots); SIGTERM / SIGINT save a checkpoint
  after the iteration and stop; a non-finite loss stops the run naming every term and the last good checkpoint.
"""
import argparse
import math

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

SOURCE_LABEL, TARGET_LABEL = 0, 1  # official convention


# ----------------------------------------------------------------------------------------------------------------
# Arguments (defaults: the official config, cfg.TRAIN.*)
# ----------------------------------------------------------------------------------------------------------------


def get_args_parser():
    parser = argparse.ArgumentParser("ADVENT: MinEnt / AdvEnt entropy minimisation", add_help=True)
    model, loss, data, optim, run = uda.add_common_args(parser, aspp_branches=4, save_pred_every=2000, defaults={
        "model": "defaults: the official advent/model/deeplabv2.py and discriminator.py; paper Sec. 3 and 4",
        "loss": "defaults: the official domain_adaptation/config.py, advent.yml and minent.yml; paper Sec. 3.1-3.3",
        "data": "defaults: the official domain_adaptation/config.py; paper Sec. 4",
        "optimisation": "defaults: the official domain_adaptation/config.py; paper Sec. 4, implementation details",
        "run": "defaults: the official domain_adaptation/config.py and scripts/ where they have it"})
    loss.add_argument("--method", choices=["advent", "minent", "source_only"], default="advent",
                      help="AdvEnt (Sec. 3.2), MinEnt (Sec. 3.1), or the source-only baseline (cfg DA_METHOD)")
    optim.add_argument("--learning_rate", type=float, default=2.5e-4, help="SGD base lr (classifiers 10x)")
    optim.add_argument("--learning_rate_D", type=float, default=1e-4, help="Adam lr of the discriminators")
    optim.add_argument("--momentum", type=float, default=0.9)
    optim.add_argument("--weight_decay", type=float, default=5e-4)
    optim.add_argument("--power", type=float, default=0.9, help="poly lr decay power")
    optim.add_argument("--max_iters", "--num_steps", type=int, default=250000, help="poly schedule length")
    optim.add_argument("--early_stop", "--num_steps_stop", type=int, default=120000, help="iterations trained")
    loss.add_argument("--lambda_seg_main", type=float, default=1.0)
    loss.add_argument("--lambda_seg_aux", type=float, default=0.1)
    loss.add_argument("--lambda_adv_main", type=float, default=0.001, help="AdvEnt weight, Eq. (6)")
    loss.add_argument("--lambda_adv_aux", type=float, default=0.0002)
    loss.add_argument("--lambda_ent_main", type=float, default=0.001, help="MinEnt weight, Eq. (3)")
    loss.add_argument("--lambda_ent_aux", type=float, default=0.0002)
    loss.add_argument("--class_prior", action="store_true",
                      help="add the class-ratio prior of Sec. 3.3 (paper only; not in the official code)")
    loss.add_argument("--class_prior_mu", type=float, default=0.5,
                      help="mu of Sec. 3.3: classes predicted below mu x their source ratio are penalised")
    loss.add_argument("--lambda_class_prior", type=float, default=0.001,
                      help="weight of the class-ratio prior (our choice: the MinEnt main weight)")
    model.add_argument("--ndf", type=int, default=64, help="discriminator width")
    run.add_argument("--ensemble", nargs=2, metavar=("CKPT_A", "CKPT_B"),
                     help="with --eval: average the main logits of two models (AdvEnt+MinEnt)")
    run.add_argument("--ensemble_weights", nargs=2, type=float, default=[0.5, 0.5],
                     help="weights of the two models (cfg.TEST.MODEL_WEIGHT)")
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Model: DeepLab-v2 (common/deeplab.py, four ASPP branches) and the discriminator on self-information maps
# ----------------------------------------------------------------------------------------------------------------


def get_fc_discriminator(num_classes, ndf=64):
    """AdaptSegNet's fully-convolutional discriminator as ADVENT builds it: an nn.Sequential whose convolutions sit
    at indices 0, 2, 4, 6, 8 (LeakyReLU(0.2) at 1, 3, 5, 7), so the released ADVENT discriminators load."""
    convs = uda.fc_discriminator_convs(num_classes, ndf)
    layers = []
    for conv in convs[:-1]:
        layers += [conv, nn.LeakyReLU(negative_slope=0.2, inplace=True)]
    return nn.Sequential(*layers, convs[-1])


# ----------------------------------------------------------------------------------------------------------------
# Losses: entropy (Sec. 3.1), weighted self-information (Sec. 3.2), class-ratio prior (Sec. 3.3)
# ----------------------------------------------------------------------------------------------------------------


def weighted_self_information(prob):
    """Eq. (4), normalised: I^(h,w,c) = -P log P / log C for prob [B, C, H, W] (official `prob_2_entropy`:
    log2 with eps 1e-30; the base cancels in the normalisation). Summed over c it is the entropy map of Eq. (2)."""
    num_classes = prob.shape[1]
    return -prob * torch.log2(prob + 1e-30) / math.log2(num_classes)


def entropy_loss(prob):
    """Eq. (3) as the official `entropy_loss`: the pixel mean of the normalised entropy
    E^(h,w) = -1/log C sum_c P log P, i.e. -sum P log2(P + 1e-30) / (B H W log2 C)."""
    return weighted_self_information(prob).sum(dim=1).mean()


def class_prior_from_histogram(histogram):
    """Sec. 3.3: p_s, the l1-normalised histogram of labelled pixels per class over the source labels."""
    histogram = torch.as_tensor(histogram, dtype=torch.float64)
    return (histogram / histogram.sum()).float()


def class_ratio_prior_loss(prob, prior, mu=0.5):
    """Sec. 3.3: L_cp = sum_c max(0, mu * p_s^(c) - E_c[P^(c)]), where E_c[P^(c)] is the predicted ratio of class c
    in the target image (the mean over pixels of its probability). Classes predicted well below mu times their
    source frequency are pushed up; classes above it cost nothing. Averaged over the batch."""
    ratio = prob.float().mean(dim=(2, 3))  # [B, C]
    return torch.clamp(mu * prior.to(ratio) - ratio, min=0).sum(dim=1).mean()


# ----------------------------------------------------------------------------------------------------------------
# Train: one iteration of train_UDA.train_minent / train_advent
# ----------------------------------------------------------------------------------------------------------------


def train_one_iteration(model, d_aux, d_main, source, target, args, scaler, class_prior=None):
    """Backward passes of one iteration (the caller zeroes gradients before and steps the optimizers after).

    Source: L_seg = lambda_seg_main CE(main) + lambda_seg_aux CE(aux), Eq. (1). Target, on softmax P_t of both
    outputs upsampled to the target input size:
      MinEnt: lambda_ent_aux E(P_t^aux) + lambda_ent_main E(P_t^main)                          Eq. (3)
      AdvEnt: lambda_adv_aux BCE(D_aux(I_t^aux), 0) + lambda_adv_main BCE(D_main(I_t^main), 0)  Eq. (6)
              with the discriminators frozen, then each discriminator learns I_s -> 0, I_t -> 1 on detached maps,
              each term halved (Eq. (5)).
      + lambda_cp L_cp(P_t^main) with --class_prior                                            Sec. 3.3
    """
    images_s, labels_s = source
    device = images_s.device
    with amp_autocast(device, args.amp):
        loss, logs, (aux_s, main_s) = uda.source_segmentation_step(model, images_s, labels_s, args.lambda_seg_aux,
                                                                   lambda_main=args.lambda_seg_main)
    scaler.scale(loss).backward()
    if args.method == "source_only":
        return logs

    adversarial = args.method == "advent"
    if adversarial:
        uda.set_requires_grad([d_aux, d_main], False)
    with amp_autocast(device, args.amp):
        aux_t, main_t = model(target)
        prob_aux = F.softmax(uda.upsample(aux_t, target.shape[-2:]).float(), dim=1)
        prob_main = F.softmax(uda.upsample(main_t, target.shape[-2:]).float(), dim=1)
        if adversarial:
            loss_aux = uda.bce_loss(d_aux(weighted_self_information(prob_aux)), SOURCE_LABEL)
            loss_main = uda.bce_loss(d_main(weighted_self_information(prob_main)), SOURCE_LABEL)
            loss = args.lambda_adv_aux * loss_aux + args.lambda_adv_main * loss_main
            logs.update(loss_adv_trg_aux=loss_aux.detach(), loss_adv_trg_main=loss_main.detach())
        else:
            loss_aux, loss_main = entropy_loss(prob_aux), entropy_loss(prob_main)
            loss = args.lambda_ent_aux * loss_aux + args.lambda_ent_main * loss_main
            logs.update(loss_ent_aux=loss_aux.detach(), loss_ent_main=loss_main.detach())
        if class_prior is not None:
            loss_cp = class_ratio_prior_loss(prob_main, class_prior, args.class_prior_mu)
            loss = loss + args.lambda_class_prior * loss_cp
            logs.update(loss_class_prior=loss_cp.detach())
    scaler.scale(loss).backward()
    if not adversarial:
        return logs

    uda.set_requires_grad([d_aux, d_main], True)
    for name, disc, pred_s, prob_t in (("aux", d_aux, aux_s, prob_aux), ("main", d_main, main_s, prob_main)):
        with amp_autocast(device, args.amp):
            info_s = weighted_self_information(F.softmax(pred_s.detach().float(), dim=1))
            loss_d_s = uda.bce_loss(disc(info_s), SOURCE_LABEL) / 2
            loss_d_t = uda.bce_loss(disc(weighted_self_information(prob_t.detach())), TARGET_LABEL) / 2
        scaler.scale(loss_d_s + loss_d_t).backward()
        logs[f"loss_d_{name}"] = (loss_d_s + loss_d_t).detach()
    return logs


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
        if args.ensemble:
            models = [uda.build_segmenter(args, device, weights=path)[0] for path in args.ensemble]
            uda.evaluate_and_report(args, models, args.ensemble_weights, data["val"], num_classes, device, True)
        else:
            uda.evaluate_and_report(args, [model], [1.0], data["val"], num_classes, device, True)
        return

    class_prior = None
    if args.class_prior:
        class_prior = class_prior_from_histogram(uda.source_label_histogram(args, data["source_dataset"],
                                                                             num_classes)).to(device)
        print("class-ratio prior p_s (Sec. 3.3):", [round(v, 4) for v in class_prior.tolist()])
    # discriminators on the aux (layer3) and main (layer4) outputs; SGD for the segmenter, Adam for each D
    adversarial = uda.build_adversarial(args, model, get_fc_discriminator, num_classes, device)
    d_aux, d_main = adversarial[:2]

    def iteration(source, target, scaler):
        return train_one_iteration(model, d_aux, d_main, source, target, args, scaler, class_prior)

    uda.train(args, "advent.py", model, adversarial, iteration, data, num_classes, device, args.early_stop,
              args.max_iters, f"ADVENT {args.method}", adapt=args.method == "advent", entropy_maps=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
