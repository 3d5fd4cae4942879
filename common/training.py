"""Training plumbing shared by every paper script.

Progress logging (`MetricLogger`: smoothed values, ETA, it/s, max memory), one JSON line per epoch or evaluation
in `OUTPUT_DIR/log.txt`, atomic checkpoints with RNG state, `torchrun` set-up (NCCL on GPUs, gloo on CPU; only
rank 0 prints and writes), seeding (`seed + rank`), device resolution, strict state-dict loading with a readable
error, and mixed precision.
"""
import argparse
import atexit
import builtins
import datetime
import json
import math
import os
import pickle
import random
import signal
import sys
import time
from collections import Counter, defaultdict, deque
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------------------------------
# Distributed set-up (torchrun)
# ----------------------------------------------------------------------------------------------------------------


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def _print_only_on_main_process(is_main):
    """Silence print() on every rank but 0; `print(..., force=True)` still prints everywhere."""
    builtin_print = builtins.print

    def print_(*args, force=False, **kwargs):
        if is_main or force:
            builtin_print(*args, **kwargs)

    builtins.print = print_


DIST_TIMEOUT_MINUTES = 30  # --dist_timeout where a script has the flag


def add_run_args(group, checkpoint_every="also save OUTPUT_DIR/checkpoint.pth every N steps within an epoch (0: at "
                                         "epoch ends)"):
    """The run flags every training script shares, added to its argparse `group`: --amp, --compile,
    --checkpoint_every (`checkpoint_every` is its help: what it counts, where it writes), --deterministic,
    --dist_timeout."""
    group.add_argument("--amp", action="store_true",
                       help="mixed precision: bfloat16 on CPU and GPUs that have it, else float16 with loss scaling")
    group.add_argument("--compile", action="store_true",
                       help="compile the model with torch.compile (the first steps take minutes: they compile it)")
    group.add_argument("--checkpoint_every", default=0, type=int,
                       help=checkpoint_every)
    group.add_argument("--deterministic", action="store_true",
                       help="deterministic kernels only: a run (and a resumed run) repeats bit for bit on the same "
                            "machine and thread count")
    group.add_argument("--dist_timeout", default=DIST_TIMEOUT_MINUTES, type=float,
                       help="minutes a process waits for the others under torchrun before it stops with an error")


def init_distributed(args):
    """Join the process group that `torchrun` describes in RANK / WORLD_SIZE / LOCAL_RANK, and pick the device.

    Sets `args.device` (`--device`, or `default_device()` when it is None), `args.distributed`, `args.rank`,
    `args.world_size` and `args.gpu` (the local rank on CUDA, else None). Under torchrun a CUDA device becomes
    `cuda:LOCAL_RANK` (each process on its own GPU, as the official DETR code does) and the process group uses NCCL;
    on CPU it uses gloo, so CPU-only DDP runs work too. Collectives time out after `args.dist_timeout` minutes
    (default DIST_TIMEOUT_MINUTES), so the other processes stop with an error when one dies or hangs. Call it first
    in `main`, before `resolve_device(args.device)`.
    """
    args.device = str(getattr(args, "device", None) or default_device())
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, None
        return
    args.rank = int(os.environ["RANK"])
    args.world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.device(args.device).type == "cuda" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
    args.gpu = local_rank if use_cuda else None
    args.distributed = True
    # a process that waits longer than the timeout in a collective (a rank died or hangs) raises instead of waiting
    timeout = datetime.timedelta(minutes=getattr(args, "dist_timeout", None) or DIST_TIMEOUT_MINUTES)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://",
                            world_size=args.world_size, rank=args.rank, timeout=timeout)
    # leave the group before the interpreter shuts down: a gloo group still alive at exit can abort the process
    # ("terminate called without an active exception") after the script's work is done
    atexit.register(_leave_process_group)
    dist.barrier()
    _print_only_on_main_process(args.rank == 0)
    print(f"distributed: rank {args.rank} of {args.world_size} ({'nccl' if use_cuda else 'gloo'})", force=True)


def _leave_process_group():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def reduce_dict(input_dict, average=True):
    """Sum (or average) a dict of scalar tensors over all processes; the same dict on every rank."""
    world_size = get_world_size()
    if world_size < 2:
        return input_dict
    with torch.no_grad():
        names = sorted(input_dict)
        values = torch.stack([input_dict[k] for k in names])
        dist.all_reduce(values)
        if average:
            values /= world_size
        return dict(zip(names, values))


def all_reduce_mean(tensor):
    """The mean of `tensor` over all processes (the tensor itself when not distributed)."""
    if get_world_size() < 2:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor / get_world_size()


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


# ----------------------------------------------------------------------------------------------------------------
# Seeds and devices
# ----------------------------------------------------------------------------------------------------------------


def seed_everything(seed):
    """Seed python, numpy and torch with `seed + rank`, as the official DETR code does."""
    seed = int(seed) + get_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name):
    """`torch.device(name)`, with one clear error when that device is not available here."""
    device = torch.device(name or default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise SystemExit(f"--device {name}: MPS is not available on this machine (use --device cpu)")
    return device


def amp_dtype(device):
    """The precision of `--amp` on `device`: bfloat16 on CPU and on GPUs with native bfloat16 (compute capability 8
    and later: it has float32's range, so gradients need no scaling); float16 on older GPUs, with `grad_scaler`."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16
    return torch.bfloat16


def amp_autocast(device, enabled):
    """Mixed precision for `--amp` (autocast to `amp_dtype(device)`); a no-op when disabled."""
    if not enabled:
        return nullcontext()
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=amp_dtype(device))


def grad_scaler(device, enabled):
    """The gradient scaler of `--amp`: active where it runs in float16 (older GPUs), a pass-through elsewhere."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=enabled and amp_dtype(device) == torch.float16)


def compile_model(model, enabled):
    """`--compile`: compile `model`'s forward with `torch.compile` (TorchInductor: generated C++ on CPU, Triton
    kernels on CUDA), in place (`nn.Module.compile`), so its state dict keeps its keys and checkpoints are the same
    with or without the flag. Compiling happens at the first calls (minutes for a ResNet) and again for new input
    shapes or modes; Python control flow the compiler cannot follow runs eagerly between compiled parts."""
    if enabled:
        model.compile()
    return model


# ----------------------------------------------------------------------------------------------------------------
# Data order: the same samples, in the same order, with the same augmentation, in a run and in its resumption
# ----------------------------------------------------------------------------------------------------------------


@contextmanager
def sample_rng(seed):
    """Seed python's, numpy's and torch's (CPU) generators with `seed` inside the block, and give them back their
    previous state afterwards, so the block's random draws neither depend on nor disturb the training's."""
    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])


class SeededDataset(torch.utils.data.Dataset):
    """`dataset` read with the (index, seed) pairs that `ResumableBatchSampler` yields: each sample is loaded and
    augmented under `sample_rng(seed)`, so its augmentation is fixed by the run's seed and its place in the epoch,
    whichever process or data-loader worker loads it and whenever the run was resumed."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with sample_rng(seed):
            return self.dataset[index]


class ResumableBatchSampler(torch.utils.data.Sampler):
    """The training batches of one epoch, as a pure function of (seed, epoch, rank): a run resumed at any step
    sees the very batches the uninterrupted run would have seen.

    Use it as `DataLoader(SeededDataset(dataset), batch_sampler=sampler, generator=loader_generator(seed))` and
    call `set_epoch(epoch, start)` before each epoch, `start` being the number of this epoch's batches already
    trained (0, or the checkpoint's step within the epoch on resume). The default order is DistributedSampler's:
    a permutation drawn from a generator seeded with `seed + epoch`, padded to a multiple of the number of processes
    and dealt out to them; subclasses change `order` (and `samples_per_rank`). Every sample also gets its own
    augmentation seed, drawn from the same generator, one per (process, position). `max_batches` (when given)
    keeps only the first batches of each epoch (a `--max_iters` per epoch).
    """

    def __init__(self, dataset_size, batch_size, seed=0, shuffle=True, drop_last=True, rank=None, world_size=None,
                 max_batches=None):
        self.dataset_size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.shuffle, self.drop_last, self.max_batches = shuffle, drop_last, max_batches
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        self.epoch, self.start = 0, 0

    def samples_per_rank(self):
        return math.ceil(self.dataset_size / self.world_size)

    def order(self, generator):
        """This process's sample indices for the epoch whose generator is given."""
        indices = (torch.randperm(self.dataset_size, generator=generator).tolist() if self.shuffle
                   else list(range(self.dataset_size)))
        total = self.samples_per_rank() * self.world_size
        indices += (indices * math.ceil(total / max(len(indices), 1)))[:total - len(indices)]
        return indices[self.rank::self.world_size]

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def batches_per_epoch(self):
        n = self.samples_per_rank()
        batches = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        return min(batches, self.max_batches) if self.max_batches is not None else batches

    def __len__(self):
        """The batches still to come in this epoch (all of them unless it was resumed)."""
        return max(self.batches_per_epoch() - self.start, 0)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        indices = self.order(generator)
        seeds = torch.randint(2**62, (len(indices) * self.world_size,), generator=generator)
        seeds = seeds[self.rank::self.world_size].tolist()
        b = self.batch_size
        for i in range(self.start, self.batches_per_epoch()):
            yield list(zip(indices[i * b:(i + 1) * b], seeds[i * b:(i + 1) * b]))


def endless_batches(loader, consumed=0):
    """Batches of a DataLoader over a `ResumableBatchSampler` forever, a new epoch of the sampler each time it runs
    out, starting after `consumed` batches (0, or the iterations a resumed run has done), for loops counted in
    iterations rather than epochs."""
    sampler = loader.batch_sampler
    epoch, start = divmod(consumed, sampler.batches_per_epoch())
    while True:
        sampler.set_epoch(epoch, start)
        yield from loader
        epoch, start = epoch + 1, 0


def loader_generator(seed):
    """A generator of its own for a DataLoader (`generator=`): the loader draws its workers' base seed from it at
    every `iter()`, which would otherwise consume the global torch generator and shift the training's random
    stream (dropout, drop path, mixing) by one draw per epoch and evaluation."""
    return torch.Generator().manual_seed(int(seed) + get_rank())


# ----------------------------------------------------------------------------------------------------------------
# Determinism, stop signals, non-finite losses
# ----------------------------------------------------------------------------------------------------------------


def make_deterministic():
    """`--deterministic`: only deterministic kernels (`torch.use_deterministic_algorithms(True)`, an error for an
    op that has none), no cuDNN autotuning, and the cuBLAS workspace setting CUDA's deterministic matmuls need.

    With the data order and augmentation of `ResumableBatchSampler` / `SeededDataset` and every DataLoader given a
    `loader_generator`, a run then repeats bit for bit on the same machine, software and number of threads (tests
    use one thread on CPU: `torch.set_num_threads(1)`), and a resumed run continues the same run.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


class StopSignal:
    """SIGTERM and SIGINT (what a cluster scheduler sends before it stops a job, and Ctrl-C) as a request to stop
    at the next step boundary; a second signal exits at once (exit code 128 + signal number).

    The training loop asks `stop.requested()` after each optimizer step; when it is true it saves a checkpoint and
    calls `stop.exit(path)`, which says where the checkpoint is and exits with code 128 + signal number. Under DDP
    `requested()` is a collective (every process must call it at every step) so that all processes stop at the same
    step, whichever of them got the signal. `close()` puts the previous handlers back.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.received, self.pid = None, os.getpid()
        self.previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a forked data-loader worker (Ctrl-C reaches it too): the training process decides
            return
        name = signal.Signals(signum).name
        if self.received is not None:
            sys.stderr.write(f"\n{name} again: exiting now, without a checkpoint\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.received = signum
        sys.stderr.write(f"\n{name}: a checkpoint will be saved at the end of this step, then the run stops "
                         f"({name} again stops at once)\n")
        sys.stderr.flush()

    def requested(self):
        flag = self.received is not None
        if get_world_size() > 1:
            device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([float(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def exit(self, checkpoint):
        signum = self.received or signal.SIGTERM
        where = f"checkpoint saved to {checkpoint}; continue with --resume {checkpoint}" if checkpoint else (
            "no --output_dir, so no checkpoint was saved")
        print(f"stopped by {signal.Signals(signum).name}: {where}", flush=True)
        raise SystemExit(128 + signum)

    def close(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def check_finite_loss(terms, where, checkpoint=None):
    """Stop with one message when a loss is not finite: `where` it happened (e.g. "epoch 3, step 120, iteration
    1200"), every term of `terms` ({name: scalar tensor or float}: the total and each weighted part) and the last
    good checkpoint. Under DDP pass terms averaged over the processes (`reduce_dict`), so all of them stop together.
    """
    values = {name: float(v) for name, v in terms.items()}
    if all(math.isfinite(v) for v in values.values()):
        return
    last = (f"the last good checkpoint is {checkpoint}" if checkpoint and Path(checkpoint).is_file()
            else "no checkpoint was written yet")
    raise SystemExit(f"non-finite loss at {where}: " + ", ".join(f"{k} {v:.6g}" for k, v in values.items())
                     + f"; stopping ({last})")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and logs
# ----------------------------------------------------------------------------------------------------------------


def rng_state():
    """This process's python, numpy, torch (and CUDA) generator states, as plain values and tensors."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def epoch_saver(path, *, identity, args, model, optimizer, lr_scheduler, scaler, **extra):
    """`save(epoch, done)` for `ResumableEpochs`: the checkpoint at `path` after `done` batches of `epoch` (every
    process takes part: the RNG states are gathered); `extra` maps more entries to functions giving their values
    at saving time. Saves nothing without a `path`. A schedule's Counters (MultiStepLR's milestones) are saved as
    plain dicts, which weights_only loading accepts (`resume_run` makes them Counters again)."""
    def save(epoch, done):
        if path:
            schedule = {k: dict(v) if isinstance(v, Counter) else v
                        for k, v in lr_scheduler.state_dict().items()}
            save_checkpoint(path, identity=identity, model=model.state_dict(), optimizer=optimizer.state_dict(),
                            lr_scheduler=schedule, scaler=scaler.state_dict(), epoch=epoch - 1,
                            step=done, args=args, **{key: value() for key, value in extra.items()},
                            rng=rng_states())
    return save


def resume_run(checkpoint, args, optimizer, lr_scheduler, scaler):
    """Continue a run from its `epoch_saver` checkpoint: the optimizer, the schedule (the Counters `epoch_saver` saved
    as plain dicts become Counters again), the gradient scaler where the checkpoint has one (older ones do not) and
    `args.start_epoch`. Returns (start_step, rng) for `ResumableEpochs`: the batches done of the next epoch (0 at an
    epoch's end; "epoch" is the last finished one) and the saved generators."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    counters = [key for key, value in lr_scheduler.state_dict().items() if isinstance(value, Counter)]
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    for key in counters:
        setattr(lr_scheduler, key, Counter(getattr(lr_scheduler, key)))
    if "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    args.start_epoch = checkpoint["epoch"] + 1
    return checkpoint.get("step", 0), checkpoint.get("rng")


class ResumableEpochs:
    """The epoch loop of a run that can stop and resume anywhere, as `for epoch in epochs:`. The body trains,
    calling `epochs.after_step(epoch, done)` after each optimizer step, steps its schedule and evaluates; then the
    epoch's checkpoint is saved (`save(epoch + 1, 0)`; `save(epoch, done)` writes the checkpoint, see
    `epoch_saver`). The first epoch skips the `start_step` batches that a resumed run already trained (`sampler` is
    the run's ResumableBatchSampler), and the saved generators `rng` come back last, so the resumed run draws
    exactly what the interrupted one would have. SIGTERM / SIGINT end the run at the next step with a checkpoint
    (a StopSignal); `checkpoint` is the path the exit message names."""

    def __init__(self, args, sampler, start_step, rng, save, checkpoint):
        self.args, self.sampler, self.start_step, self.rng = args, sampler, start_step, rng
        self.save, self.checkpoint, self.stop = save, checkpoint, None

    def __iter__(self):
        self.stop = StopSignal()
        restore_rng(self.rng)
        try:
            for epoch in range(self.args.start_epoch, self.args.epochs):
                self.sampler.set_epoch(epoch, self.start_step if epoch == self.args.start_epoch else 0)
                yield epoch
                self.save(epoch + 1, 0)
        finally:
            self.stop.close()

    def after_step(self, epoch, done):
        """After each optimizer step, `done` batches of `epoch` finished: the --checkpoint_every checkpoint (not at
        an epoch's end, saved after the body), and on a stop request a checkpoint and a clean exit."""
        periodic = bool(self.args.checkpoint_every) and done % self.args.checkpoint_every == 0
        periodic = periodic and done < self.sampler.batches_per_epoch()
        if periodic:
            self.save(epoch, done)
        if self.stop.requested():
            if not periodic:
                self.save(epoch, done)
            self.stop.exit(self.checkpoint)


def rng_states():
    """Every process's `rng_state()`, a list indexed by rank (a collective: call it on every process). Pass it as
    `save_checkpoint(..., rng=rng_states())` so that each process of a resumed DDP run gets its own generators back."""
    if get_world_size() < 2:
        return [rng_state()]
    states = [None] * get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def restore_rng(state):
    """Restore the generators saved by `save_checkpoint`: this process's entry of a per-process list (`rng_states`),
    or a single state; a no-op for checkpoints without them."""
    if not state:
        return
    if isinstance(state, list):
        if len(state) != get_world_size():
            print(f"note: the checkpoint holds the generators of {len(state)} process(es), this run has "
                  f"{get_world_size()}: each process takes entry rank % {len(state)}")
        state = state[get_rank() % len(state)]
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_write(path, write):
    """Write through `write(tmp_path)` then rename, so a crash midway never leaves a half-written `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _plain(value):
    """`value` with what `torch.load(weights_only=True)` refuses made plain: an argparse Namespace becomes a dict,
    numpy arrays tensors, numpy scalars python numbers, paths and devices strings. Containers are walked."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return type(value)((k, _plain(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (Path, torch.device)):
        return str(value)
    return value


def save_checkpoint(path, **state):
    """Save `state` (model, optimizer, lr_scheduler, epoch/iteration, args, identity, ...) plus the RNG state,
    atomically, in a form that `torch.load(weights_only=True)` reads (args as a plain dict).

    Only rank 0 writes. The file is first written next to `path` and then renamed over it, so the previous
    checkpoint survives a run that is killed while saving. The RNG state is rank 0's `rng_state()` unless the
    caller passes `rng=rng_states()` (every process's). `identity` (see `check_identity`) says what the checkpoint
    can be resumed into.
    """
    if not is_main_process():
        return
    state = _plain(dict(state, rng=state["rng"] if "rng" in state else rng_state()))
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _old_checkpoint_globals():
    """Types that checkpoints written before args and RNG states were stored plainly hold (an argparse Namespace,
    numpy arrays of numbers), all safe to rebuild."""
    reconstruct = np.ndarray((0,)).__reduce__()[0]
    dtypes = [type(np.dtype(t)) for t in (np.uint8, np.uint32, np.int32, np.int64, np.float32, np.float64, np.bool_)]
    return [argparse.Namespace, np.ndarray, np.dtype, reconstruct, *dtypes]


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint file with `torch.load(weights_only=True)` (no arbitrary code from a pickle); one clear
    error naming the path when it is missing, unreadable, or holds objects that only a full unpickling would
    rebuild."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_old_checkpoint_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).split("WeightsUnpickler error:")[-1].strip().splitlines()[0].split(". Please")[0]
        if "global" not in reason.lower():  # not a pickle of objects at all (a text file, say)
            raise SystemExit(f"cannot read checkpoint {path}: not a PyTorch checkpoint ({reason})") from error
        raise SystemExit(f"cannot read checkpoint {path}: it holds Python objects that torch.load(weights_only=True) "
                         f"refuses to rebuild ({reason}); expected model weights, optionally in a dict of tensors, "
                         "numbers, strings, lists and dicts") from error
    except Exception as error:  # a truncated, empty or foreign file: say which one
        raise SystemExit(f"cannot read checkpoint {path}: not a PyTorch checkpoint, or a truncated one "
                         f"({type(error).__name__}: {error})") from error


def check_identity(checkpoint, expected, source):
    """One clear error when the checkpoint read from `source` was written by another script or for another model.

    `expected` is this run's identity, the dict a script passes to `save_checkpoint(..., identity=...)`: its name
    and the arguments that decide the state dict's shapes, e.g. {"script": "pvt.py", "model": "pvt_small",
    "depths": [3, 4, 6, 3], "num_classes": 1000}. Entries missing on either side are not compared; checkpoints
    without an identity (older ones, released weights) pass, and `load_model_state` reports any shape mismatch.
    """
    found = checkpoint.get("identity") if isinstance(checkpoint, dict) else None
    if not isinstance(found, dict):
        return
    differ = [k for k in expected if k in found and found[k] != expected[k]]
    if differ:
        raise SystemExit(f"{source}: checkpoint of " + ", ".join(f"{k} {found[k]}" for k in found)
                         + "; expected " + ", ".join(f"{k} {expected[k]}" for k in expected)
                         + f" (differs in {', '.join(differ)})")


def load_model_state(model, state_dict, source, strict=True):
    """`model.load_state_dict` with a readable error that names `source` and lists what differs.

    With `strict=False` the keys that differ are returned as (missing, unexpected); shape mismatches are always
    an error.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]

    def listing(keys):
        return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

    problems = []
    if mismatched:
        problems.append(f"shape mismatch: {listing(mismatched)}")
    if strict and missing:
        problems.append(f"missing keys: {listing(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {listing(unexpected)}")
    if problems:
        raise ValueError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=strict)
    return missing, unexpected


def write_json(path, obj):
    """Write `obj` as indented JSON, atomically (rank 0 only)."""
    if not is_main_process():
        return
    text = json.dumps(obj, indent=2, default=float) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def append_log(output_dir, record):
    """Append one JSON object as a line to OUTPUT_DIR/log.txt (rank 0 only), as DETR's training log."""
    if not output_dir or not is_main_process():
        return
    path = Path(output_dir) / "log.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, default=float) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Progress logging
# ----------------------------------------------------------------------------------------------------------------


class SmoothedValue:
    """A series of values: median and mean over a recent window, and the global mean."""

    def __init__(self, window_size=20, fmt="{median:.4f} ({global_avg:.4f})"):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        """Sum count and total over processes (the window stays local)."""
        if get_world_size() < 2:
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self):
        return float(np.median(self.deque)) if self.deque else 0.0

    @property
    def avg(self):
        return float(np.mean(self.deque)) if self.deque else 0.0

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    @property
    def max(self):
        return max(self.deque) if self.deque else 0.0

    @property
    def value(self):
        return self.deque[-1] if self.deque else 0.0

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    """Named SmoothedValues and a progress line every `print_freq` steps (ETA, time per step, max memory)."""

    def __init__(self, delimiter="  "):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            self.meters[name].update(float(value))

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def __getattr__(self, name):
        meters = self.__dict__.get("meters", {})
        if name in meters:
            return meters[name]
        raise AttributeError(f"'MetricLogger' object has no attribute '{name}'")

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable, print_freq, header=""):
        """Yield from `iterable`, printing progress every `print_freq` items and a summary at the end."""
        total = len(iterable) if hasattr(iterable, "__len__") else None
        step_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        start = end = time.time()
        i = 0
        for i, item in enumerate(iterable):
            data_time.update(time.time() - end)
            yield item
            step_time.update(time.time() - end)
            if i % print_freq == 0 or (total is not None and i == total - 1):
                parts = [header, f"[{i + 1}/{total}]" if total else f"[{i + 1}]"]
                if total:
                    eta = step_time.global_avg * (total - i - 1)
                    parts.append(f"eta: {datetime.timedelta(seconds=int(eta))}")
                parts += [str(self), f"time: {step_time}", f"data: {data_time}",
                          f"it/s: {1.0 / max(step_time.avg, 1e-9):.2f}"]
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB")
                print(self.delimiter.join(p for p in parts if p), flush=True)
            end = time.time()
        elapsed = time.time() - start
        steps = i + 1 if total is None else total
        print(f"{header} total time: {datetime.timedelta(seconds=int(elapsed))} "
              f"({elapsed / max(steps, 1):.4f} s / it)", flush=True)
