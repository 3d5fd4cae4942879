"""Speed of every paper's training step and inference forward, in float32 and under `--amp`, as one table.

For each paper, the paper's model configuration (each script's own parser defaults and `build` functions) on
small inputs, the sizes at which the official code was timed on the same machine (docs/performance.md):

    train  forward + loss + backward + optimizer step, as the script's training loop runs them
    infer  forward in eval mode without gradients

each in float32 and under autocast (`--amp`: bfloat16 on CPU, and on CUDA where the GPU supports it, else float16
with a GradScaler). Per row: the median over `--reps` timed repetitions after `--warmup` untimed ones, float32 and
amp run alternately so that machine noise hits both alike, in wall-clock seconds and in CPU seconds of the process
(all threads; with one thread, CPU time is what other load on the machine disturbs least); items (images, clips,
frame pairs) per second; peak memory of the step; the FLOPs of one step counted by
`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention; elementwise work and grid_sample are
not counted); achieved FLOP/s and its share of this machine's matmul peak, measured in the same run with a large
float32 and a large amp-dtype matmul.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` over the step (every live tensor). On CPU the tensors held
before the step (parameters, buffers, gradients, optimizer state) plus the growth of the process's resident set
during the step (VmHWM after the step minus VmRSS before it, with the high-water mark reset through
/proc/self/clear_refs and freed heap returned by malloc_trim first); Linux only, else left empty.

    python -m benchmarks.bench --device cpu                 # all papers -> outputs/bench/{table.md,bench.json}
    python -m benchmarks.bench --device cuda --only detr,pvt
    python -m benchmarks.bench --quick                      # tiny models, one repetition: the code still runs
    python -m benchmarks.bench --compile --only pvt         # the models through torch.compile (scripts' --compile)
"""
import argparse
import contextlib
import ctypes
import io
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import adaptsegnet  # noqa: E402
import advent  # noqa: E402
import detr  # noqa: E402
import proda  # noqa: E402
import pvt  # noqa: E402
import trackformer  # noqa: E402
import vistr  # noqa: E402
from common import training, uda  # noqa: E402

PAPERS = ("detr", "deeplab", "vistr", "trackformer", "pvt")


def get_args_parser():
    p = argparse.ArgumentParser("make bench: training-step and inference speed of every paper's model")
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    p.add_argument("--quick", action="store_true", help="tiny models and inputs, one repetition (tests)")
    p.add_argument("--out", default="outputs/bench", help="writes table.md and bench.json here")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(PAPERS)}")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions per variant first")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--compile", action="store_true",
                   help="every model compiled with torch.compile, as the scripts' --compile (warm-up compiles)")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Mixed precision as `--amp` uses it, and the steps
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One row: `run(amp)` performs one training step or one inference forward."""
    paper: str
    kind: str  # "train" or "infer"
    config: str
    items: int
    unit: str
    run: Callable[[bool], None]
    holds: list = field(default_factory=list)  # modules and optimizers whose tensors exist before the step


def trainer(device, model, optimizer, loss_fn, max_norm=0.0):
    """run(amp): the scripts' step: zero_grad, (scaled) backward, clipping of the unscaled gradients, step."""
    scalers = {amp: training.grad_scaler(device, amp) for amp in (False, True)}

    def run(amp):
        model.train()
        loss = loss_fn(amp)
        scaler = scalers[amp]
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        if max_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        scaler.step(optimizer)
        scaler.update()
    return run


def inferer(device, model, forward):
    def run(amp):
        model.eval()
        with torch.no_grad(), training.amp_autocast(device, amp):
            forward()
    return run


def weighted_sum(loss_dict, weight_dict):
    return sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)


def random_boxes(g, n):
    """n normalised (cx, cy, w, h) boxes well inside the image."""
    return torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25, torch.rand(n, 2, generator=g) * 0.3 + 0.1], 1)


def quietly(fn, *args, **kwargs):
    """Call a builder without its progress prints (e.g. 'starts from random weights')."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# The papers' configurations
# ----------------------------------------------------------------------------------------------------------------


def detr_cases(device, quick):
    """DETR R50, 6 + 6 layers, 100 queries: batch 2 at 3x256x320 with 3 boxes per image (detr.py defaults)."""
    args = detr.get_args_parser().parse_args(
        ["--backbone", "convstem", "--hidden_dim", "32", "--dim_feedforward", "64", "--enc_layers", "1",
         "--dec_layers", "2", "--num_queries", "10"] if quick else [])
    h, w = (64, 80) if quick else (256, 320)
    torch.manual_seed(0)
    model, criterion, _ = detr.build(args)
    model.to(device)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, h, w, generator=g).to(device)
    targets = [{"labels": torch.randint(1, args.num_classes, (3,), generator=g), "boxes": random_boxes(g, 3)}
               for _ in range(2)]
    targets = detr.targets_to(targets, device)
    optimizer = torch.optim.AdamW(detr.param_groups(model, args), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=True)  # as detr.main

    def loss(amp):
        with training.amp_autocast(device, amp):
            outputs = model(images)
        return weighted_sum(criterion(outputs, targets), criterion.weight_dict)

    config = f"{args.backbone}, {args.enc_layers}+{args.dec_layers} layers, {args.num_queries} queries, 2x3x{h}x{w}"
    return [Case("DETR", "train", config + ", 3 boxes/img", 2, "img",
                 trainer(device, model, optimizer, loss, args.clip_max_norm), [model, optimizer]),
            Case("DETR", "infer", config, 2, "img", inferer(device, model, lambda: model(images)), [model])]


def deeplab_cases(device, quick):
    """DeepLab-v2 R101 multi-level, one source iteration at 256x512 (batch 1): L_seg = CE(main) + 0.1 CE(aux), SGD
    with the official groups, for ADVENT's 4-branch and AdaptSegNet's 2-branch head; ProDA's network (its
    ASPP + SE head, trainable BN) with its source CE. Inference: the segmenter's forward."""
    small = ["--layers", "1", "1", "1", "1", "--width", "8"] if quick else []
    h, w = (64, 128) if quick else (256, 512)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, h, w, generator=g).to(device)
    label = torch.randint(0, 19, (1, h, w), generator=g)
    label[:, :8] = 255  # some ignored pixels, as real labels have
    label = label.to(device)
    cases = []
    for paper, script in (("ADVENT", advent), ("AdaptSegNet", adaptsegnet)):
        args = script.get_args_parser().parse_args(small)
        torch.manual_seed(0)
        model, _ = quietly(uda.build_segmenter, args, device)
        optimizer = torch.optim.SGD(uda.optim_parameters(model, args.learning_rate), lr=args.learning_rate,
                                    momentum=args.momentum, weight_decay=args.weight_decay)

        def loss(amp, model=model):
            with training.amp_autocast(device, amp):
                return uda.source_segmentation_step(model, image, label)[0]

        config = f"R{3 * sum(args.layers) + 2} w{args.width}, {args.aspp_branches}-branch ASPP, 1x3x{h}x{w}"
        cases += [Case(paper, "train", config, 1, "img", trainer(device, model, optimizer, loss), [model, optimizer]),
                  Case(paper, "infer", config, 1, "img", inferer(device, model, lambda model=model: model(image)),
                       [model])]
    args = proda.get_args_parser().parse_args(small + ["--num_classes", "19"] + (["--feat_dim", "32"] if quick else []))
    args.stage_name = "1"  # the plain source CE of stages 1-3 (not the warm-up's strong view)
    proda_label = label.masked_fill(label == 255, proda.IGNORE)  # ProDA ignores 250
    torch.manual_seed(0)
    net = proda.build_net(args).to(device)
    optimizer = torch.optim.SGD(proda.param_groups(net, args.lr, "1"), lr=args.lr, momentum=0.9, weight_decay=2e-4)

    def loss(amp):
        with training.amp_autocast(device, amp):
            return proda.source_loss(net, {"img": image, "label": proda_label}, args)[0]

    config = f"R{3 * sum(args.layers) + 2} w{args.width}, ASPP+SE head, 1x3x{h}x{w}"
    cases += [Case("ProDA", "train", config, 1, "img", trainer(device, net, optimizer, loss), [net, optimizer]),
              Case("ProDA", "infer", config, 1, "img", inferer(device, net, lambda: net(image)), [net])]
    return cases


def vistr_target(g, instances, frames, h, w):
    n = instances * frames
    masks = torch.zeros(n, h, w, dtype=torch.uint8)
    masks[:, h // 4: h // 2, w // 4: w // 2] = 1
    return {"labels": torch.randint(1, 41, (instances,), generator=g).repeat_interleave(frames),
            "boxes": random_boxes(g, n), "valid": torch.ones(n, dtype=torch.int64), "masks": masks}


def vistr_cases(device, quick):
    """VisTR R50 with the mask head (6 + 6 layers, hidden 384), a 2-frame 64x96 clip with 10 queries (the parity
    fixture's configuration): inference and a train step. The demo-size model (light conv stem, 2 + 2 pre-norm
    layers, 4 frames x 3 slots, demos/vistr.sh): a train step on a 4-frame 64x96 clip."""
    r50 = ["--backbone", "convstem", "--enc_layers", "1", "--dec_layers", "1", "--dim_feedforward", "64",
           "--num_frames", "2", "--num_queries", "4"] if quick else \
          ["--backbone", "resnet50", "--num_frames", "2", "--num_queries", "10"]
    demo = ["--backbone", "convstem", "--hidden_dim", "384", "--nheads", "8", "--enc_layers", "2", "--dec_layers",
            "2", "--dim_feedforward", "512", "--dropout", "0.0", "--pre_norm", "--num_frames", "4", "--num_queries",
            "12", "--lr", "2e-4", "--lr_backbone", "2e-4"]
    h, w = (32, 48) if quick else (64, 96)
    cases = []
    for name, flags, what in (("R50", r50, ("infer", "train")), ("demo", demo, ("train",))):
        args = vistr.get_args_parser().parse_args(flags)
        torch.manual_seed(0)
        model, criterion, optimizer, _ = vistr.build(args)
        model.to(device)
        g = torch.Generator().manual_seed(0)
        clip = torch.rand(args.num_frames, 3, h, w, generator=g).to(device)
        target = {k: v.to(device) for k, v in vistr_target(g, 2, args.num_frames, h, w).items()}

        def loss(amp, model=model, criterion=criterion, clip=clip, target=target):
            with training.amp_autocast(device, amp):
                outputs = model(clip)
            return weighted_sum(criterion(outputs, [target]), criterion.weight_dict)

        config = (f"{name}: {args.backbone}, {args.enc_layers}+{args.dec_layers} layers, {args.num_queries} queries, "
                  f"{args.num_frames}x3x{h}x{w}")
        if "infer" in what:
            cases.append(Case("VisTR", "infer", config, 1, "clip",
                              inferer(device, model, lambda model=model, clip=clip: model(clip)), [model]))
        cases.append(Case("VisTR", "train", config, 1, "clip",
                          trainer(device, model, optimizer, loss, args.clip_max_norm), [model, optimizer]))
    return cases


def trackformer_cases(device, quick):
    """TrackFormer's main MOT17 model (Deformable DETR, hidden 288, 500 queries, multi-frame attention, trackformer.py
    defaults). Inference: frame t at 128x160 with the previous frame's features (the tracker's per-frame forward).
    Train: two_frame_forward on 2 frame pairs (3 people each) with track queries (previous frame matched, FN/FP
    augmentation), the focal criterion, AdamW with the script's groups, clipping 0.1."""
    args = trackformer.get_args_parser().parse_args(
        ["--backbone", "convstem", "--hidden_dim", "96", "--dim_feedforward", "128", "--enc_layers", "1",
         "--dec_layers", "2", "--num_queries", "10", "--nheads", "4"] if quick else [])
    h, w = (64, 80) if quick else (128, 160)
    torch.manual_seed(0)
    model, criterion, matcher = trackformer.build_model(args)
    model.to(device)
    g = torch.Generator().manual_seed(0)
    prev, cur = torch.rand(1, 3, h, w, generator=g).to(device), torch.rand(1, 3, h, w, generator=g).to(device)
    with torch.no_grad():
        model.eval()
        _, prev_features = model(prev)

    images, targets = [], []
    for _ in range(2):  # frame pairs: the same 3 people, moved a little
        boxes = random_boxes(g, 3)
        prev_target = {"boxes": boxes, "labels": torch.zeros(3, dtype=torch.int64), "track_ids": torch.arange(3)}
        target = dict(prev_target, boxes=(boxes + 0.02).clamp(max=1))
        target["prev_image"], target["prev_target"] = torch.rand(3, h, w, generator=g), prev_target
        images.append(torch.rand(3, h, w, generator=g))
        targets.append(target)
    images, targets = trackformer.to_device(images, targets, device)
    optimizer = torch.optim.AdamW(trackformer.param_groups(model, args), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=True)  # as trackformer.main

    def loss(amp):
        torch.manual_seed(0)  # the same track-query augmentation draws every step
        batch = [{k: v for k, v in t.items() if not k.startswith("track_quer")} for t in targets]
        with training.amp_autocast(device, amp):
            out = trackformer.two_frame_forward(model, matcher, images, batch, args)
        return weighted_sum(criterion(trackformer._float(out), batch), criterion.weight_dict)

    config = f"{args.backbone}, hidden {args.hidden_dim}, {args.num_queries} queries"
    return [Case("TrackFormer", "train", f"{config}, 2 frame pairs 3x{h}x{w}, track queries", 2, "pair",
                 trainer(device, model, optimizer, loss, args.clip_max_norm), [model, optimizer]),
            Case("TrackFormer", "infer", f"{config}, frame 1x3x{h}x{w} + previous features", 1, "frame",
                 inferer(device, model, lambda: model(cur, prev_features)), [model])]


def pvt_cases(device, quick):
    """PVT-Small (pvt.py defaults): forward of a batch of 2 at 224, and a train step on it (MixUp/CutMix, label
    smoothing, AdamW, stochastic depth 0.1)."""
    args = pvt.get_args_parser().parse_args(
        ["--model", "pvt_tiny", "--depths", "1", "1", "1", "1", "--embed_dims", "16", "32", "48", "64",
         "--num_heads", "1", "1", "2", "2"] if quick else [])
    size = 64 if quick else 224
    num_classes = 1000
    torch.manual_seed(0)
    model, optimizer, _ = quietly(pvt.build, args, num_classes)
    model.to(device)
    mix = pvt.build_mixing(args, num_classes)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, num_classes, (2,), generator=g).to(device)

    def loss(amp):
        x, y = mix(images, labels)
        with training.amp_autocast(device, amp):
            logits = model(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=args.smoothing)

    config = f"{args.model}, 2x3x{size}x{size}"
    return [Case("PVT", "train", config, 2, "img", trainer(device, model, optimizer, loss, args.clip_grad or 0.0),
                 [model, optimizer]),
            Case("PVT", "infer", config, 2, "img", inferer(device, model, lambda: model(images)), [model])]


CASES = {"detr": detr_cases, "deeplab": deeplab_cases, "vistr": vistr_cases, "trackformer": trackformer_cases,
         "pvt": pvt_cases}


# ----------------------------------------------------------------------------------------------------------------
# Measuring: time, FLOPs, peak memory, the machine's matmul peak
# ----------------------------------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, device):
    """(wall seconds, process CPU seconds) of fn()."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(fns, device, reps, warmup):
    """{key: ([wall seconds], [cpu seconds])}: every fn run `warmup` times, then `reps` rounds in which each runs
    once, in alternating order (ABBA...) so that slow phases of the machine fall on all of them alike."""
    keys = list(fns)
    for _ in range(warmup):
        for key in keys:
            fns[key]()
    times = {key: ([], []) for key in keys}
    for r in range(reps):
        for key in (keys if r % 2 == 0 else keys[::-1]):
            wall, cpu = timed(fns[key], device)
            times[key][0].append(wall)
            times[key][1].append(cpu)
    return times


def matmul_peak(device, reps, n):
    """FLOP/s of an n x n matmul in float32 and in the amp dtype (median of interleaved repetitions)."""
    dtypes = {"float32": torch.float32, "amp": training.amp_dtype(device)}
    g = torch.Generator().manual_seed(0)
    mats = {k: (torch.randn(n, n, generator=g).to(device, d), torch.randn(n, n, generator=g).to(device, d))
            for k, d in dtypes.items()}
    times = interleaved({k: (lambda a=a, b=b: a @ b) for k, (a, b) in mats.items()}, device, reps, warmup=1)
    return {k: 2 * n ** 3 / statistics.median(walls) for k, (walls, _) in times.items()}


class _GlobalTotalOnly(contextlib.nullcontext):
    """Stands in for FlopCounterMode's per-module tracker, which fails on tensors that are views made under no_grad
    (TrackFormer's query embedding split in the previous frame's forward); only the total is needed here."""
    parents = ("Global",)


def count_flops(run):
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalTotalOnly()
    with counter:
        run(False)
    return counter.get_total_flops()


_LIBC = None


def _proc_status(field_name):
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field_name}:\s+(\d+) kB", text).group(1)) * 1024


def held_bytes(holds):
    """Bytes of the tensors the case holds between steps: parameters, buffers, gradients, optimizer state."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for obj in holds:
        if isinstance(obj, torch.nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                add(t)
                add(t.grad)
        else:
            for state in obj.state.values():
                for t in state.values():
                    add(t)
    return total


def peak_memory(case, amp, device):
    """Peak bytes of one step (module docstring); None where it cannot be measured."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        case.run(amp)
        sync(device)
        return torch.cuda.max_memory_allocated(device)
    if device.type != "cpu" or not Path("/proc/self/clear_refs").exists():
        return None
    global _LIBC
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        return None
    before = _proc_status("VmRSS")
    case.run(amp)
    return held_bytes(case.holds) + _proc_status("VmHWM") - before


def measure(case, device, reps, warmup):
    """The row's numbers for float32 and amp."""
    flops = count_flops(case.run)
    times = interleaved({amp: (lambda amp=amp: case.run(amp)) for amp in (False, True)}, device, reps, warmup)
    rows = []
    for amp in (False, True):
        walls, cpus = times[amp]
        seconds = statistics.median(walls)
        rows.append({"paper": case.paper, "kind": case.kind, "config": case.config,
                     "precision": str(training.amp_dtype(device)).replace("torch.", "") if amp else "float32",
                     "amp": amp, "seconds": seconds, "seconds_all": walls, "cpu_seconds": statistics.median(cpus),
                     "items_per_second": case.items / seconds, "unit": case.unit, "flops": flops,
                     "flops_per_second": flops / seconds, "peak_bytes": peak_memory(case, amp, device)})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------


def markdown(result):
    peak = result["matmul_peak"]
    lines = [f"Device: {result['device_name']}, torch {result['torch']}, {result['threads']} threads; matmul peak "
             f"{peak['float32'] / 1e9:.0f} GFLOP/s float32, {peak['amp'] / 1e9:.0f} GFLOP/s {result['amp_dtype']}"
             + ("; models compiled (torch.compile)." if result.get("compile") else "."),
             "",
             "| paper | step | configuration | precision | s / step | CPU s / step | items / s | peak MB "
             "| GFLOP / step | GFLOP/s | % of matmul peak | amp / fp32 |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fp32 = {}
    for row in result["rows"]:
        key = (row["paper"], row["kind"], row["config"])
        if not row["amp"]:
            fp32[key] = row["seconds"]
        share = row["flops_per_second"] / peak["amp" if row["amp"] else "float32"]
        memory = "" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2 ** 20:.0f}"
        ratio = f"{row['seconds'] / fp32[key]:.2f}x" if row["amp"] and key in fp32 else ""
        lines.append(f"| {row['paper']} | {row['kind']} | {row['config']} | {row['precision']} | "
                     f"{row['seconds']:.3f} | {row['cpu_seconds']:.3f} | {row['items_per_second']:.1f} {row['unit']} | "
                     f"{memory} | "
                     f"{row['flops'] / 1e9:.1f} | {row['flops_per_second'] / 1e9:.1f} | {100 * share:.0f}% | "
                     f"{ratio} |")
    return "\n".join(lines) + "\n"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        cpu = platform.processor() or platform.machine()
    return f"{cpu} ({os.cpu_count()} cores)"


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps, warmup = (1, 0) if args.quick else (args.reps, args.warmup)
    papers = [p for p in args.only.split(",") if p] or list(PAPERS)
    unknown = set(papers) - set(CASES)
    if unknown:
        raise SystemExit(f"--only {args.only}: unknown {sorted(unknown)}; choose from {','.join(PAPERS)}")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    peak = matmul_peak(device, reps, 256 if args.quick else (8192 if device.type == "cuda" else 2048))
    result = {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "amp_dtype": str(training.amp_dtype(device)).replace("torch.", ""),
              "quick": args.quick, "compile": args.compile, "reps": reps, "warmup": warmup,
              "load_average_before": load,
              "matmul_peak": peak, "rows": []}
    for paper in papers:
        cases = CASES[paper](device, args.quick)
        for model in {id(m): m for case in cases for m in case.holds if isinstance(m, torch.nn.Module)}.values():
            training.compile_model(model, args.compile)
        for case in cases:
            rows = measure(case, device, reps, warmup)
            result["rows"] += rows
            for row in rows:
                print(f"{row['paper']:12s} {row['kind']:5s} {row['precision']:8s} {row['seconds']:8.3f} s  "
                      f"{row['config']}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    table = markdown(result)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
