"""What AdaptSegNet (`adaptsegnet.py`) and ADVENT (`advent.py`) literally share.

Both official repositories (wasidennis/AdaptSegNet, valeoai/ADVENT) run the same loop around a multi-level
DeepLab-v2: a supervised step on a source image (GTA5 or SYNTHIA), an adaptation step on a target image
(Cityscapes), then a step of two fully-convolutional discriminators, with poly learning-rate decay and evaluation
on Cityscapes val at full label resolution. This module holds those shared pieces:

    fc_discriminator_convs   the five 4x4 stride-2 convolutions of both papers' discriminator
    upsample, seg_loss       bilinear upsampling (align_corners=True) and the source cross-entropy, Eq. (3)/(1)
    source_segmentation_step the supervised half of every iteration: main + lambda_seg * aux
    bce_loss                 the discriminator's BCE against a constant domain label (source 0, target 1)
    gan_loss                 bce_loss or the LS-GAN squared error (also ProDA's warm-up, `proda.py`)
    adjust_learning_rate     poly schedule, 10x on the second group
    build_adversarial        the two discriminators, the SGD/Adam optimizers and the checkpoint state
    train                    the loop itself, with snapshots, resumable checkpoints and stop signals
    add_common_args, build_segmenter, build_data, evaluate, ...   the shared command-line and run plumbing
"""
import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from common import segmentation
from common.deeplab import DeepLabV2, load_caffe_init
from common.training import (
    MetricLogger,
    ResumableBatchSampler,
    SeededDataset,
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
    is_main_process,
    load_checkpoint,
    load_model_state,
    loader_generator,
    reduce_dict,
    restore_rng,
    rng_states,
    save_checkpoint,
    unwrap,
    write_json,
)

# ----------------------------------------------------------------------------------------------------------------
# Discriminator body, losses, schedule
# ----------------------------------------------------------------------------------------------------------------


def fc_discriminator_convs(num_classes, ndf=64):
    """The five convolutions of the fully-convolutional discriminator (AdaptSegNet Sec. 3.1, reused by ADVENT):
    kernel 4, stride 2, padding 1, with bias; channels num_classes -> ndf -> 2 ndf -> 4 ndf -> 8 ndf -> 1.

    Each paper wraps them under its own key names (AdaptSegNet `conv1..conv4, classifier`; ADVENT `nn.Sequential`
    indices 0, 2, 4, 6, 8) with LeakyReLU(0.2) between them and no activation after the last.
    """
    channels = [num_classes, ndf, 2 * ndf, 4 * ndf, 8 * ndf, 1]
    return [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1) for c_in, c_out in zip(channels, channels[1:])]


def upsample(logits, size):
    """Bilinear upsampling to `size` (H, W) with align_corners=True, as every official train and eval loop does."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)


def seg_loss(logits, labels, ignore_index=255):
    """Cross-entropy averaged over labelled pixels: logits [B, C, H, W], labels [B, H, W] (ignore_index and < 0
    are not counted), as AdaptSegNet's `CrossEntropy2d` and ADVENT's `cross_entropy_2d`. Zero when nothing is
    labelled (the official code returns zeros there too, where plain cross_entropy would give NaN)."""
    labels = labels.long()
    valid = (labels >= 0) & (labels != ignore_index)
    if not valid.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels.masked_fill(~valid, ignore_index), ignore_index=ignore_index)


def source_segmentation_step(model, images, labels, lambda_seg=0.1, lambda_main=1.0, ignore_index=255):
    """The supervised half of an iteration: both outputs upsampled to the source input size, then
    L_seg = lambda_main * CE(main) + lambda_seg * CE(aux) (AdaptSegNet Eq. (5), lambda_seg = 0.1; ADVENT
    LAMBDA_SEG_MAIN = 1, LAMBDA_SEG_AUX = 0.1).

    Returns (loss, {'loss_seg_main', 'loss_seg_aux'}, (aux_up, main_up)); the caller calls backward.
    """
    pred_aux, pred_main = model(images)  # [B, C, H/8, W/8] each
    pred_aux, pred_main = upsample(pred_aux, images.shape[-2:]), upsample(pred_main, images.shape[-2:])
    loss_main, loss_aux = seg_loss(pred_main, labels, ignore_index), seg_loss(pred_aux, labels, ignore_index)
    loss = lambda_main * loss_main + lambda_seg * loss_aux
    return loss, {"loss_seg_main": loss_main.detach(), "loss_seg_aux": loss_aux.detach()}, (pred_aux, pred_main)


def bce_loss(d_out, domain_label):
    """BCE-with-logits of the discriminator output against a constant domain label, mean over D's output cells.
    The official code labels source 0 and target 1 (the papers write it the other way round)."""
    return F.binary_cross_entropy_with_logits(d_out.float(), torch.full_like(d_out.float(), float(domain_label)))


def gan_loss(d_out, domain_label, gan="Vanilla"):
    """The adversarial loss of a discriminator output against a constant domain label, mean over D's output cells:
    BCE-with-logits (`Vanilla`, AdaptSegNet's default) or the LS-GAN squared error (`LS`, ProDA's warm-up default).
    AdaptSegNet Eq. (2)/(4); ProDA's `step_adv` (models/adaptation_modelv2.py) uses the same two forms."""
    if gan == "LS":
        return F.mse_loss(d_out.float(), torch.full_like(d_out.float(), float(domain_label)))
    return bce_loss(d_out, domain_label)


def lr_poly(base_lr, it, max_it, power):
    """Poly decay: base_lr * (1 - it / max_it) ** power."""
    return segmentation.lr_poly(base_lr, it, max_it, power)


def adjust_learning_rate(optimizer, base_lr, it, max_it, power):
    """Set group 0 to lr_poly(...) and group 1 (the classifiers, when present) to 10x it, as both official loops."""
    lr = lr_poly(base_lr, it, max_it, power)
    optimizer.param_groups[0]["lr"] = lr
    if len(optimizer.param_groups) > 1:
        optimizer.param_groups[1]["lr"] = 10 * lr
    return lr


def set_requires_grad(modules, flag):
    """Freeze (False) the discriminators during the segmentation network's adversarial step, as both loops do."""
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(flag)


def average_gradients(modules):
    """All-reduce-mean the gradients of modules that are not wrapped in DDP (the discriminators) over ranks."""
    if get_world_size() < 2:
        return
    for module in modules:
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= get_world_size()


# ----------------------------------------------------------------------------------------------------------------
# Command line shared by both scripts (paper hyperparameters stay in each script)
# ----------------------------------------------------------------------------------------------------------------

# Official input sizes (width, height): GTA5 and Cityscapes are resized, SYNTHIA keeps its own 1280x760.
INPUT_SIZES = {"gta5": (1280, 720), "synthia": (1280, 760), "cityscapes": (1024, 512)}
NUM_CLASSES = {"gta5": 19, "synthia": 16, "cityscapes": 19}


def size_arg(text):
    """'W,H' (the official format) -> (W, H)."""
    try:
        w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTH,HEIGHT such as 1280,720, got {text!r}") from None
    return w, h


def add_common_args(parser, aspp_branches, save_pred_every, defaults):
    """The paper's argument groups (model, loss, data, optimisation, run), each described by `defaults[title]`: where
    the script's defaults for it come from. The data, model size, run and evaluation flags the adaptation scripts
    share go into them, with the per-paper defaults as arguments; returns the five groups for the script's own flags.
    """
    model, loss, data, optim, run = (parser.add_argument_group(title, defaults[title])
                                     for title in ("model", "loss", "data", "optimisation", "run"))
    data.add_argument("--data_root", default="data/synthetic",
                      help="folder holding gta5/, synthia/ and cityscapes/ in their real layouts")
    data.add_argument("--data_dir", "--data-dir", default=None, help="source dataset root (default DATA_ROOT/SOURCE)")
    data.add_argument("--data_dir_target", "--data-dir-target", default=None,
                      help="Cityscapes root (default DATA_ROOT/cityscapes)")
    data.add_argument("--source", choices=["gta5", "synthia", "cityscapes"], default="gta5",
                      help="gta5: 19 classes; synthia: 16 classes (mIoU-13 also reported); "
                           "cityscapes: the oracle, trained on target labels")
    data.add_argument("--target", choices=["cityscapes"], default="cityscapes")
    data.add_argument("--input_size", "--input-size", type=size_arg, default=None,
                      help="source W,H (default 1280,720 GTA5; 1280,760 SYNTHIA; 1024,512 Cityscapes)")
    data.add_argument("--input_size_target", "--input-size-target", type=size_arg, default=(1024, 512),
                      help="target W,H for training and evaluation (labels are scored at full resolution)")
    optim.add_argument("--batch_size", "--batch-size", type=int, default=1, help="source and target images per step")
    run.add_argument("--num_workers", type=int, default=2)
    model.add_argument("--layers", type=int, nargs=4, default=[3, 4, 23, 3], help="ResNet blocks (101: 3 4 23 3)")
    model.add_argument("--width", type=int, default=64, help="ResNet stem width (64 = the paper's model)")
    model.add_argument("--aspp_branches", type=int, default=aspp_branches, choices=[1, 2, 3, 4],
                       help="ASPP branches summed (AdaptSegNet's released models: 2; ADVENT: 4)")
    model.add_argument("--init", default=None, help="Caffe-converted DeepLab init ('Scale.'-prefixed keys)")
    model.add_argument("--restore_from", "--restore-from", default=None,
                       help="start from these segmentation weights (a checkpoint.pth or a plain state dict), "
                            "e.g. a source-only model; the iteration count starts at 0")
    run.add_argument("--output_dir", default="", help="log.txt, checkpoint.pth, snapshots/, eval.json, viz/")
    run.add_argument("--resume", default="", help="continue from OUTPUT_DIR/checkpoint.pth; with --eval, the "
                                                  "weights to evaluate (checkpoint.pth or a released .pth)")
    run.add_argument("--eval", action="store_true", help="only evaluate on Cityscapes val")
    run.add_argument("--save_pred_every", "--save-pred-every", type=int, default=save_pred_every,
                     help="snapshot every N iterations (and at the last)")
    add_run_args(run, "also save OUTPUT_DIR/checkpoint.pth every N iterations (0: with the snapshots only)")
    run.add_argument("--select", choices=["last", "best"], default="last",
                     help="report the last snapshot, or the best one on the target validation set (optimistic: "
                          "it selects on the data it reports)")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    run.add_argument("--seed", "--random-seed", type=int, default=1234)
    run.add_argument("--viz", action="store_true", help="write image / prediction / label figures to viz/")
    run.add_argument("--num_viz", type=int, default=4, help="validation images in the --viz figures")
    run.add_argument("--print_freq", type=int, default=50)
    return model, loss, data, optim, run


# ----------------------------------------------------------------------------------------------------------------
# Model set-up: DeepLab-v2 with its initialisation or given weights, DDP
# ----------------------------------------------------------------------------------------------------------------


def load_segmenter_weights(model, path, num_classes, source):
    """Strictly load segmentation weights from our checkpoint.pth (its 'model') or a plain state dict (the released
    AdaptSegNet/ADVENT models); a model of another class count gets one error that names both counts."""
    ckpt = load_checkpoint(path)
    state = ckpt["model"] if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) else ckpt
    head = state.get("layer6.conv2d_list.0.weight") if isinstance(state, dict) else None
    if head is None:
        raise SystemExit(f"{path}: not a DeepLab-v2 state dict (no 'layer6.conv2d_list.0.weight')")
    if head.shape[0] != num_classes:
        raise SystemExit(f"{path} holds a {head.shape[0]}-class model, but --source {source} trains and scores "
                         f"{num_classes} classes")
    try:
        load_model_state(model, state, path)
    except ValueError as error:
        raise SystemExit(str(error)) from None


def build_segmenter(args, device, weights=None):
    """DeepLab-v2 multi-level for args.source's classes, initialised from `weights` (default: --resume with --eval,
    else --restore_from), else from the Caffe init (--init), else N(0, 0.01) as the official constructor."""
    num_classes = NUM_CLASSES[args.source]
    model = DeepLabV2(num_classes=num_classes, multi_level=True, aspp_branches=args.aspp_branches,
                      layers=tuple(args.layers), width=args.width)
    if weights is None:
        weights = args.resume if args.eval else args.restore_from
    if args.eval and not weights and not getattr(args, "ensemble", None):
        raise SystemExit("--eval needs the weights to evaluate: --resume CKPT (or --ensemble CKPT_A CKPT_B)")
    if weights:
        load_segmenter_weights(model, weights, num_classes, args.source)
        print(f"segmentation weights from {weights}")
    elif args.init:
        load_caffe_init(model, args.init)
    elif not args.eval:
        print("no --init: DeepLab-v2 starts from N(0, 0.01) (the papers start from the COCO-pretrained DeepLab init)")
    model.to(device)
    compile_model(model, args.compile)
    if getattr(args, "distributed", False):
        # The 2-branch classifier never uses conv2d_list.2/.3: DDP must be told that some parameters get no grad.
        model = nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if args.gpu is not None else None,
                                                    find_unused_parameters=args.aspp_branches < 4)
    return model, num_classes


def optim_parameters(model, lr):
    """The official two SGD groups (backbone lr, classifiers 10 lr) of a possibly DDP-wrapped DeepLab-v2."""
    from common.deeplab import optim_parameters as deeplab_groups
    return deeplab_groups(unwrap(model), lr)


def build_adversarial(args, model, discriminator, num_classes, device):
    """Both papers' training set-up around the segmenter: one discriminator (`discriminator(num_classes, ndf)`) on
    the aux (layer3) and one on the main (layer4) output, SGD with momentum for the segmenter, Adam with betas
    (0.9, 0.99) for each discriminator. Returns (d_aux, d_main, [optimizer, optimizer_d_aux, optimizer_d_main],
    state), state naming everything a checkpoint holds."""
    d_aux = discriminator(num_classes, args.ndf).to(device)
    d_main = discriminator(num_classes, args.ndf).to(device)
    optimizers = [torch.optim.SGD(optim_parameters(model, args.learning_rate), lr=args.learning_rate,
                                  momentum=args.momentum, weight_decay=args.weight_decay)]
    optimizers += [torch.optim.Adam(d.parameters(), lr=args.learning_rate_D, betas=(0.9, 0.99))
                   for d in (d_aux, d_main)]
    state = {"model": unwrap(model), "d_aux": d_aux, "d_main": d_main, "optimizer": optimizers[0],
             "optimizer_d_aux": optimizers[1], "optimizer_d_main": optimizers[2]}
    return d_aux, d_main, optimizers, state


# ----------------------------------------------------------------------------------------------------------------
# Snapshots, resume, the final report
# ----------------------------------------------------------------------------------------------------------------


def run_identity(args, script):
    """What a checkpoint must match to be resumed here (common/training.py check_identity)."""
    return {"script": script, "source": args.source, "num_classes": NUM_CLASSES[args.source],
            "layers": list(args.layers), "width": args.width, "aspp_branches": args.aspp_branches, "ndf": args.ndf}


def resume(args, state, identity):
    """Restore every entry of `state` (modules, optimizers, the gradient scaler) from --resume, after checking that
    the checkpoint is one of this script and model; returns (start iteration, best, the saved generator states)."""
    if not args.resume:
        return 0, None, None
    ckpt = load_checkpoint(args.resume)
    check_identity(ckpt, identity, f"--resume {args.resume}")
    for name, obj in state.items():
        if name not in ckpt:
            if name == "scaler":  # checkpoints written before the scaler was saved
                continue
            raise SystemExit(f"{args.resume} has no '{name}': not a checkpoint.pth of this script")
        if isinstance(obj, nn.Module):
            try:
                load_model_state(obj, ckpt[name], f"{args.resume} ['{name}']")
            except ValueError as error:
                raise SystemExit(str(error)) from None
        else:
            obj.load_state_dict(ckpt[name])
    print(f"resumed from {args.resume} at iteration {ckpt['iteration']}")
    return ckpt["iteration"], ckpt.get("best"), ckpt.get("rng")


def after_iteration(args, iteration, stop_at, state, identity, logger, best, model, val_loader, num_classes, device,
                    stop):
    """Every --save_pred_every iterations and at the last one: a snapshot snapshots/model_ITER.pth (the official
    plain state dict), checkpoint.pth (everything --resume needs) and a log.txt line; with --select best, also the
    snapshot's mIoU on the target validation set. checkpoint.pth also every --checkpoint_every iterations, and on
    SIGTERM / SIGINT (`stop`), after which the run stops. Returns the best result so far (--select best) or None."""
    snapshot = iteration % args.save_pred_every == 0 or iteration == stop_at
    periodic = bool(args.checkpoint_every) and iteration % args.checkpoint_every == 0
    stopping = stop.requested()  # every process asks (a collective under torchrun)
    if not (snapshot or periodic or stopping):
        return best
    out = Path(args.output_dir) if args.output_dir else None
    if snapshot:
        record = {"iteration": iteration, **{k: round(m.global_avg, 6) for k, m in logger.meters.items()}}
        if out and is_main_process():
            weights = unwrap(model).state_dict()
            atomic_write(out / "snapshots" / f"model_{iteration}.pth", lambda tmp: torch.save(weights, tmp))
        if args.select == "best":
            results = evaluate([model], [1.0], val_loader, num_classes, device, args.amp)
            model.train()
            record["mIoU"] = results["mIoU"]
            print(f"iteration {iteration}: target val mIoU {results['mIoU']:.2f}")
            if best is None or results["mIoU"] > best["mIoU"]:
                best = dict(results, iteration=iteration)
    if out:
        save_checkpoint(out / "checkpoint.pth", identity=identity, **{k: v.state_dict() for k, v in state.items()},
                        iteration=iteration, best=best, args=args, rng=rng_states())
    if snapshot:
        append_log(args.output_dir, record)
    if stopping:
        stop.exit(out / "checkpoint.pth" if out else None)
    return best


def train(args, script, model, adversarial, iteration, data, num_classes, device, stop_at, max_iters, header,
          adapt=True, entropy_maps=False):
    """The training loop of both official scripts (AdaptSegNet train_gta2cityscapes_multi.py, ADVENT train_UDA.py):
    `stop_at` iterations of a poly schedule over `max_iters`. Each iteration zeroes the gradients, sets the poly
    learning rates (the segmenter's from --learning_rate, 10x on the classifiers; the discriminators' from
    --learning_rate_D), reads one source and one target batch, runs `iteration(source, target, scaler)` (the
    script's backward passes; it returns the loss terms), averages the discriminators' gradients over processes and
    steps the optimizers (the discriminators' only when `adapt`); then `after_iteration`, and `finish` at the end.
    `adversarial` is what `build_adversarial` returns.

    A resumed run continues where its checkpoint was written: the loaders at that iteration's batches, the random
    generators as they were (bit for bit with --deterministic). SIGTERM / SIGINT save a checkpoint after the
    current iteration and stop; a non-finite loss stops before the optimizer step, naming the iteration, every loss
    term and the last good checkpoint."""
    d_aux, d_main, optimizers, state = adversarial
    scaler = grad_scaler(device, args.amp)
    state = dict(state, scaler=scaler)
    identity = run_identity(args, script)
    start, best, rng = resume(args, state, identity)
    stepped = optimizers if adapt else optimizers[:1]
    source, target = endless_batches(data["source"], start), endless_batches(data["target"], start)
    checkpoint = Path(args.output_dir) / "checkpoint.pth" if args.output_dir else None
    stop = StopSignal()
    model.train()  # BN in train mode (batch statistics) with frozen affine parameters, as both official loops
    logger = MetricLogger(delimiter="  ")
    start_time = time.time()
    restore_rng(rng)  # last, so that the resumed run draws exactly what the interrupted one would have
    try:
        for it in logger.log_every(range(start, stop_at), args.print_freq, header=header):
            for opt in stepped:
                opt.zero_grad()
            lr = adjust_learning_rate(optimizers[0], args.learning_rate, it, max_iters, args.power)
            for opt in stepped[1:]:
                adjust_learning_rate(opt, args.learning_rate_D, it, max_iters, args.power)
            images_s, labels_s, _ = next(source)
            images_t = next(target)[0]
            logs = iteration((images_s.to(device), labels_s.to(device)), images_t.to(device), scaler)
            check_finite_loss(reduce_dict(logs), f"iteration {it + 1}", checkpoint)  # before the optimizer steps
            average_gradients([d_aux, d_main])
            for opt in stepped:
                scaler.step(opt)
            scaler.update()
            logger.update(lr=lr, **logs)
            best = after_iteration(args, it + 1, stop_at, state, identity, logger, best, model, data["val"],
                                   num_classes, device, stop)
    finally:
        stop.close()
    finish(args, model, data["val"], num_classes, device, best, stop_at, time.time() - start_time, entropy_maps)


def finish(args, model, val_loader, num_classes, device, best, iteration, seconds, entropy_maps=False):
    """Evaluate the last model (default) or report the best snapshot (--select best); eval.json (the same for the
    same seed and data: the training time is printed, not stored), --viz figures."""
    if args.select == "best":
        print("--select best: reporting the snapshot with the best mIoU on the target validation set (as ADVENT's "
              "test MODE 'best'); this selects on the target validation set itself, so the number is optimistic.")
        results = dict(best, selection="best snapshot on target val")
        path = Path(args.output_dir) / "snapshots" / f"model_{best['iteration']}.pth"
        if get_world_size() > 1:
            dist.barrier()  # rank 0 may have written that snapshot just now
        if path.is_file():
            unwrap(model).load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        results = dict(evaluate([model], [1.0], val_loader, num_classes, device, args.amp),
                       selection="last snapshot", iteration=iteration)
    print(f"training time {seconds:.0f} s")
    report(results)
    if args.output_dir:
        write_json(Path(args.output_dir) / "eval.json", results)
    if args.viz and args.output_dir:
        visualize([model], [1.0], val_loader.dataset, Path(args.output_dir) / "viz", device, args.num_viz,
                  num_classes, entropy_maps)


# ----------------------------------------------------------------------------------------------------------------
# Data: source (labelled), target (Cityscapes train, unlabelled), Cityscapes val at full label resolution
# ----------------------------------------------------------------------------------------------------------------


TARGET_SEED = 1_000_003  # the target stream's epochs draw from seed + this, never from a source epoch's generator


def train_loader(dataset, args, seed, what):
    """Shuffled training batches of this process: a ResumableBatchSampler (each epoch's order a function of seed,
    epoch and rank: under torchrun one permutation dealt out to the processes), so a resumed run reads what the
    uninterrupted run read; `endless_batches` runs it epoch after epoch."""
    sampler = ResumableBatchSampler(len(dataset), args.batch_size, seed=seed)
    if sampler.batches_per_epoch() == 0:
        raise SystemExit(f"data: {what} has {len(dataset)} images, fewer than --batch_size {args.batch_size} per "
                         "process")
    return torch.utils.data.DataLoader(SeededDataset(dataset), batch_sampler=sampler, num_workers=args.num_workers,
                                       pin_memory=torch.cuda.is_available(), generator=loader_generator(args.seed))


def source_dataset(args, num_classes):
    root = args.data_dir or str(Path(args.data_root) / args.source)
    size = args.input_size or INPUT_SIZES[args.source]
    if args.source == "gta5":
        return segmentation.GTA5(root, num_classes=num_classes, size=size)
    if args.source == "synthia":
        return segmentation.SYNTHIA(root, num_classes=num_classes, size=size)
    return segmentation.Cityscapes(root, split="train", num_classes=num_classes, size=size)  # the oracle


def build_data(args):
    """{'val': Cityscapes val loader (images at --input_size_target, labels at full resolution, this rank's share)}
    and, when training, 'source' / 'target' (loaders of (image, label, name) batches, see `train_loader`) and
    'source_dataset'."""
    num_classes = NUM_CLASSES[args.source]
    target_root = args.data_dir_target or str(Path(args.data_root) / args.target)
    try:
        val = segmentation.Cityscapes(target_root, split="val", num_classes=num_classes,
                                      size=args.input_size_target, resize_label=False)
        data = {"val": torch.utils.data.DataLoader(
            torch.utils.data.Subset(val, range(get_rank(), len(val), get_world_size())), batch_size=1,
            num_workers=args.num_workers, generator=loader_generator(args.seed))}
        if args.eval:
            return data
        source = source_dataset(args, num_classes)
        target = segmentation.Cityscapes(target_root, split="train", num_classes=num_classes,
                                         size=args.input_size_target, labels=False)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        raise SystemExit(f"data: {error}") from None
    print(f"source {args.source}: {len(source)} images at {source.size}; target {args.target} train: {len(target)} "
          f"at {target.size}; val: {len(val)} (labels at full resolution)")
    data.update(source=train_loader(source, args, args.seed, f"source {args.source}"),
                target=train_loader(target, args, args.seed + TARGET_SEED, f"target {args.target} train"),
                source_dataset=source)
    return data


def source_label_histogram(args, dataset, num_classes):
    """Labelled pixels per class over all source training labels, read at their native resolution (labels only, no
    images), for ADVENT's class-ratio prior; cached in OUTPUT_DIR/source_class_histogram.json."""
    cache = Path(args.output_dir) / "source_class_histogram.json" if args.output_dir else None
    if cache and cache.is_file():
        return json.loads(cache.read_text())
    hist = np.zeros(num_classes, dtype=np.int64)
    for path in dataset.label_paths:
        label = segmentation.map_ids(dataset.read_label(path), dataset.lut, dataset.ignore_index)
        hist += np.bincount(label[label < num_classes].ravel(), minlength=num_classes)[:num_classes]
    if cache and is_main_process():
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(hist.tolist()))
    return hist.tolist()


# ----------------------------------------------------------------------------------------------------------------
# Evaluation (mIoU on Cityscapes val, full label resolution, main output) and figures
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(models, weights, image, size, amp=False):
    """sum_k w_k * upsample(main_k(image)) at `size` (H, W): one model, or the ADVENT test-time ensemble."""
    logits = 0
    for model, weight in zip(models, weights):
        with amp_autocast(image.device, amp):
            main = segmentation.main_logits(model(image))
        logits = logits + weight * upsample(main.float(), size)
    return logits


@torch.no_grad()
def evaluate(models, weights, loader, num_classes, device, amp=False):
    """The official protocol (evaluate_cityscapes.py + compute_iou.py / eval_UDA.py): main logits upsampled to the
    label size (bilinear, align_corners=True), argmax, one confusion matrix over the whole split, IoU per class,
    mIoU = nanmean. Returns ConfusionMatrix.summary(): percent, plus mIoU13 for 16 classes."""
    for model in models:
        model.eval()
    cm = segmentation.ConfusionMatrix(num_classes)
    for image, label, _ in loader:
        label = label.to(device)
        cm.update(predict(models, weights, image.to(device), label.shape[-2:], amp).argmax(1), label)
    cm.all_reduce()
    return cm.summary()


def report(results):
    """Per-class IoU in the papers' table order, then mIoU (and mIoU-13)."""
    names = list(results["per_class"])
    cells = ["-" if v is None else f"{v:.1f}" for v in results["per_class"].values()]
    widths = [max(len(n), len(c)) for n, c in zip(names, cells)]
    print(" | ".join(n.rjust(w) for n, w in zip(names, widths)))
    print(" | ".join(c.rjust(w) for c, w in zip(cells, widths)))
    line = f"mIoU = {results['mIoU']:.2f}"
    if "mIoU13" in results:
        line += f"  mIoU-13 = {results['mIoU13']:.2f}"
    print(line, flush=True)


def evaluate_and_report(args, models, weights, val_loader, num_classes, device, entropy_maps=False):
    """--eval: score the model (or the weighted ensemble), print the table, write OUTPUT_DIR/eval.json, --viz."""
    results = evaluate(models, weights, val_loader, num_classes, device, args.amp)
    report(results)
    if args.output_dir:
        write_json(Path(args.output_dir) / "eval.json", results)
        if args.viz:
            visualize(models, weights, val_loader.dataset, Path(args.output_dir) / "viz", device, args.num_viz,
                      num_classes, entropy_maps)
    return results


def heat_map(values):
    """[H, W] in [0, 1] -> uint8 RGB, black -> purple -> orange -> yellow (an inferno-like ramp)."""
    anchors = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)
    x = np.clip(values, 0, 1) * (len(anchors) - 1)
    low = np.floor(x).astype(int).clip(0, len(anchors) - 2)
    frac = (x - low)[..., None]
    return (anchors[low] * (1 - frac) + anchors[low + 1] * frac).astype(np.uint8)


@torch.no_grad()
def visualize(models, weights, dataset, out_dir, device, count, num_classes, entropy_maps=False):
    """For the first `count` val images: image | prediction | label (| normalised entropy map, ADVENT's figure),
    all at the label's resolution, as OUT_DIR/<name>.png."""
    if not is_main_process():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for model in models:
        model.eval()
    for index in range(min(count, len(dataset))):
        image, label, name = dataset[index]
        logits = predict(models, weights, image[None].to(device), label.shape[-2:])
        prob = F.softmax(logits, dim=1)
        # Eq. (2): E = -sum_c P log P / log C, in [0, 1]
        entropy = (-(prob * torch.log(prob + 1e-30)).sum(1)[0] / math.log(num_classes)).cpu().numpy()
        bgr = image.numpy().transpose(1, 2, 0) + np.array(segmentation.IMG_MEAN, np.float32)
        rgb = Image.fromarray(np.clip(bgr[:, :, ::-1], 0, 255).astype(np.uint8)).resize(label.shape[::-1])
        panels = [rgb, segmentation.colorize(logits.argmax(1)[0], num_classes).convert("RGB"),
                  segmentation.colorize(label, num_classes).convert("RGB")]
        if entropy_maps:
            panels.append(Image.fromarray(heat_map(entropy)))
        figure = Image.new("RGB", (sum(p.width for p in panels), panels[0].height))
        for i, panel in enumerate(panels):
            figure.paste(panel, (i * panel.width, 0))
        figure.save(out_dir / (Path(name).name.replace("_leftImg8bit", "").rsplit(".", 1)[0] + ".png"))
