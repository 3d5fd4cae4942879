"""Faults across the scripts whose training loops are not covered by their own test files' fault tests (pvt.py and
proda.py have theirs): a run killed with SIGKILL at a random point (before a step, while writing a checkpoint,
right after writing one) and resumed ends bit for bit where the uninterrupted run ends, reading the same samples;
SIGTERM saves at the next step and exits cleanly, a second SIGTERM exits at once; the same seed gives the same
eval.json; a non-finite loss names the step, every term and the last good checkpoint; --resume of another script,
size or class count is one clear error; a torchrun run on two CPU processes matches one process with the same
global batch.

Where to kill is drawn from a generator seeded by RESUME_TEST_SEED (random unless set); failures print the seed.
"""
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch.optim.optimizer import register_optimizer_step_pre_hook

import adaptsegnet
import advent
import detr
import pvt
import trackformer
import vistr
from common import training, uda
from tests.bitwise import assert_same
from tests.test_adaptsegnet import write_tiny_uda_data
from tests.test_pvt import run_flags as pvt_flags
from tests.test_pvt import write_image_folders
from tests.test_trackformer import TINY as TRACKFORMER_SMALL
from tests.test_trackformer import write_sequence
from tests.test_vistr import write_tiny_ytvis

ROOT = Path(__file__).resolve().parents[1]
FORK = multiprocessing.get_context("fork")
SEED = int(os.environ.get("RESUME_TEST_SEED", random.randrange(2**31)))
PICK = random.Random(SEED)  # its own generator: the runs in this process reseed `random`


# ----------------------------------------------------------------------------------------------------------------
# Tiny data
# ----------------------------------------------------------------------------------------------------------------


def write_coco(root, n_train=4, n_val=2, size=64):
    """COCO-format square images with exactly one coloured rectangle each (category = colour), so that a batch's
    loss is the mean of its images' losses (what the two-process comparison relies on)."""
    rng = np.random.default_rng(0)
    colours = {1: (230, 30, 30), 2: (30, 220, 30), 3: (30, 30, 230)}
    for split, n in (("train", n_train), ("val", n_val)):
        (root / f"{split}2017").mkdir(parents=True)
        images, anns = [], []
        for i in range(n):
            img = Image.fromarray(rng.integers(90, 140, (size, size, 3), dtype=np.uint8))
            cat, (w, h) = 1 + i % 3, (int(v) for v in rng.integers(size // 5, size // 2, 2))
            x, y = (int(v) for v in rng.integers(0, size - max(w, h), 2))
            ImageDraw.Draw(img).rectangle([x, y, x + w - 1, y + h - 1], fill=colours[cat])
            img.save(root / f"{split}2017" / f"{i + 1:012d}.png")
            images.append({"id": i + 1, "file_name": f"{i + 1:012d}.png", "width": size, "height": size})
            anns.append({"id": i + 1, "image_id": i + 1, "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
                         "iscrowd": 0})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(
            {"images": images, "annotations": anns,
             "categories": [{"id": c, "name": n} for c, n in ((1, "red"), (2, "green"), (3, "blue"))]}))
    return root


# ----------------------------------------------------------------------------------------------------------------
# The scripts under test: how to run them small, and how far a checkpoint got
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Script:
    name: str
    main: Callable
    parser: Callable
    write_data: Callable  # root -> data path
    flags: Callable  # (data, out) -> flags of a small deterministic run with a checkpoint after every step
    steps: int  # optimizer steps of the whole run
    saves: int  # checkpoints the whole run writes
    samples_per_step: int
    done: Callable  # checkpoint dict -> optimizer steps it holds
    mismatches: list  # (flags of another model size or class count, the error expected on --resume)


DETR_SMALL = ["--device", "cpu", "--backbone", "convstem", "--lr_backbone", "1e-4", "--hidden_dim", "32",
              "--dim_feedforward", "64", "--nheads", "2", "--enc_layers", "1", "--dec_layers", "2",
              "--num_queries", "6", "--num_classes", "4", "--scales", "64", "--max_size", "64", "--crop_scales", "64",
              "--crop_size", "48", "64", "--num_workers", "0", "--batch_size", "2", "--print_freq", "100"]

SCRIPTS = {
    # 3 epochs of 2 steps; a checkpoint after step 1 of each epoch and at each epoch's end
    "detr": Script("detr", detr.main, detr.get_args_parser, lambda root: write_coco(root / "coco"),
                   lambda data, out: ["--coco_path", str(data), *DETR_SMALL, "--epochs", "3", "--checkpoint_every",
                                      "1", "--deterministic", "--output_dir", str(out)],
                   steps=6, saves=6, samples_per_step=2, done=lambda c: 2 * (c["epoch"] + 1) + c["step"],
                   mismatches=[(["--hidden_dim", "64"], r"checkpoint of script detr.py, backbone convstem, hidden_dim "
                                                        r"32.*; expected .*hidden_dim 64.* \(differs in hidden_dim\)"),
                               (["--num_classes", "91"], r"num_classes 4.*; expected .*num_classes 91.* \(differs in "
                                                         r"num_classes\)")]),
}
VISTR_SMALL = ["--backbone", "convstem", "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64",
               "--num_frames", "2", "--num_queries", "6", "--num_classes", "4", "--input_size", "32", "--val_size",
               "32", "--num_workers", "0", "--device", "cpu", "--holdout_fraction", "0.25", "--print_freq", "100"]
# 3 epochs of 2 clips (--max_iters 2, batch 1); a checkpoint after step 1 of each epoch and at each epoch's end
SCRIPTS["vistr"] = Script(
    "vistr", vistr.main, vistr.get_args_parser, lambda root: write_tiny_ytvis(root / "data") and root / "data",
    lambda data, out: ["--data_root", str(data), *VISTR_SMALL, "--epochs", "3", "--max_iters", "2",
                       "--checkpoint_every", "1", "--deterministic", "--output_dir", str(out)],
    steps=6, saves=6, samples_per_step=1, done=lambda c: 2 * (c["epoch"] + 1) + c["step"],
    mismatches=[(["--num_queries", "8"], r"checkpoint of script vistr.py.*num_queries 6.*; expected .*num_queries 8.* "
                                         r"\(differs in num_queries\)"),
                (["--num_classes", "5"], r"num_classes 4.*; expected .*num_classes 5.* \(differs in num_classes\)")])


def write_mot(root):
    """Two MOT17 training sequences (trained on their first half, tracked and scored on their second)."""
    for name, seed in (("MOT17-01-FRCNN", 1), ("MOT17-02-FRCNN", 2)):
        write_sequence(root / "mot17", name, seed=seed)
    return root / "mot17"


# 3 epochs of 2 steps (--max_iters 2, batch 1); a checkpoint after step 1 of each epoch and at each epoch's end
SCRIPTS["trackformer"] = Script(
    "trackformer", trackformer.main, trackformer.get_args_parser, write_mot,
    lambda data, out: ["--data_root", str(data), *TRACKFORMER_SMALL, "--epochs", "3", "--max_iters", "2",
                       "--batch_size", "1", "--print_freq", "100", "--checkpoint_every", "1", "--deterministic",
                       "--output_dir", str(out)],
    steps=6, saves=6, samples_per_step=1, done=lambda c: 2 * (c["epoch"] + 1) + c["step"],
    mismatches=[(["--hidden_dim", "192"], r"checkpoint of script trackformer.py.*hidden_dim 96.*; expected "
                                          r".*hidden_dim 192.* \(differs in hidden_dim\)"),
                (["--num_classes", "3"], r"num_classes 20.*; expected .*num_classes 3.* \(differs in num_classes\)")])
# 3 epochs of 4 steps (8 images, batch 2) with every random part of PVT's recipe on and a data-loader worker; a
# checkpoint every 2 steps
SCRIPTS["pvt"] = Script(
    "pvt", pvt.main, pvt.get_args_parser,
    lambda root: write_image_folders(root / "imagenet", classes=2, train=4, val=1, size=36), pvt_flags,
    steps=12, saves=6, samples_per_step=2, done=lambda c: 4 * (c["epoch"] + 1) + c["step"],
    mismatches=[(["--model", "pvt_small", "--depths", "3", "4", "6", "3"],
                 r"checkpoint of script pvt.py, task classify, model pvt_tiny, depths \[1, 1, 1, 1\].*expected "
                 r".*model pvt_small, depths \[3, 4, 6, 3\].*\(differs in model, depths\)")])
UDA_SMALL = ["--device", "cpu", "--layers", "1", "1", "1", "1", "--width", "8", "--input_size", "64,32",
             "--input_size_target", "64,32", "--num_workers", "0", "--print_freq", "100", "--save_pred_every", "3",
             "--checkpoint_every", "1", "--deterministic"]
UDA_MISMATCHES = [(["--width", "16"], r"checkpoint of script \w+.py, source gta5, num_classes 19, layers "
                                      r"\[1, 1, 1, 1\], width 8.*; expected .*width 16.* \(differs in width\)"),
                  (["--source", "synthia"], r"num_classes 19.*; expected .*source synthia, num_classes 16.* \(differs "
                                            r"in source, num_classes\)")]
for name, main, parser, length in (("adaptsegnet", adaptsegnet.main, adaptsegnet.get_args_parser,
                                    ["--num_steps", "8", "--num_steps_stop", "6"]),
                                   ("advent", advent.main, advent.get_args_parser,
                                    ["--method", "advent", "--max_iters", "8", "--early_stop", "6"])):
    # 6 iterations of one source and one target image, over two passes of the 4 images; a checkpoint after each
    SCRIPTS[name] = Script(name, main, parser, write_tiny_uda_data,
                           lambda data, out, length=length: ["--data_root", str(data), *UDA_SMALL, *length,
                                                             "--output_dir", str(out)],
                           steps=6, saves=6, samples_per_step=2, done=lambda c: c["iteration"],
                           mismatches=UDA_MISMATCHES)


# ----------------------------------------------------------------------------------------------------------------
# Forked runs with faults injected
# ----------------------------------------------------------------------------------------------------------------


def _child(script, flags, plan, record):
    """script.main in a forked process on one thread. `plan` = (what, n): SIGKILL before the n-th step of the first
    optimizer that steps ("kill_step"), while writing the n-th checkpoint ("kill_in_save", a half-written temporary
    file is left) or right after it ("kill_after_save"); one or two SIGTERMs before the n-th step ("term_step",
    "term_twice_step"). Every training sample read is appended to `record` as "index seed"."""
    torch.set_num_threads(1)
    what, n = plan or ("", 0)
    steps, saves, first = [0], [0], []

    def before_step(optimizer, args, kwargs):
        first.append(optimizer) if not first else None
        if optimizer is not first[0]:  # the discriminators' optimizers step in the same iteration
            return
        steps[0] += 1
        if steps[0] == n and what == "kill_step":
            os.kill(os.getpid(), signal.SIGKILL)
        if steps[0] == n and what.startswith("term"):
            for _ in range(2 if what == "term_twice_step" else 1):
                os.kill(os.getpid(), signal.SIGTERM)

    register_optimizer_step_pre_hook(before_step)
    save, replace, getitem = torch.save, os.replace, training.SeededDataset.__getitem__

    def dying_save(obj, f):
        if ".checkpoint.pth.tmp" not in str(f):
            return save(obj, f)  # snapshots and other files
        saves[0] += 1
        save(obj, f)
        if saves[0] == n and what == "kill_in_save":
            Path(f).write_bytes(Path(f).read_bytes()[:1000])
            os.kill(os.getpid(), signal.SIGKILL)

    def replace_then_die(src, dst):
        replace(src, dst)
        if saves[0] == n and what == "kill_after_save" and Path(dst).name == "checkpoint.pth":
            os.kill(os.getpid(), signal.SIGKILL)

    def recorded(self, key):
        with open(record, "a") as f:
            f.write(f"{key[0]} {key[1]}\n")
        return getitem(self, key)

    torch.save, os.replace, training.SeededDataset.__getitem__ = dying_save, replace_then_die, recorded
    script.main(script.parser().parse_args(flags))


def run_forked(script, flags, plan=None, record=os.devnull, timeout=300):
    """The forked run's exit code (polled: a killed run's data-loader worker can keep a join waiting)."""
    process = FORK.Process(target=_child, args=(script, flags, plan, record))
    process.start()
    deadline = time.time() + timeout
    while process.exitcode is None and time.time() < deadline:
        time.sleep(0.02)
    assert process.exitcode is not None, f"{script.name}: the run did not end within {timeout} s"
    return process.exitcode


def run_state(out):
    """What must be equal bit for bit between a run and its resumed twin: the final checkpoint but its args (which
    name --resume), and eval.json."""
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    return {k: v for k, v in checkpoint.items() if k != "args"}, (out / "eval.json").read_bytes()


@pytest.fixture(scope="module", params=list(SCRIPTS))
def uninterrupted(request, tmp_path_factory):
    """One uninterrupted run per script: the script, its data, final state and the samples it read."""
    script = SCRIPTS[request.param]
    root = tmp_path_factory.mktemp(script.name)
    data = script.write_data(root)
    out, record = root / "out", root / "samples.txt"
    assert run_forked(script, script.flags(data, out), record=record) == 0
    return script, data, run_state(out), record.read_text().splitlines()


def resume_and_compare(uninterrupted, out, where):
    """Resume from out/checkpoint.pth (or start again when none was written) and compare with the uninterrupted run:
    the final checkpoint (weights, optimizers, schedule, scaler, RNG states, step), eval.json, and the samples
    (index and augmentation seed) read after the checkpoint."""
    script, data, expected, samples = uninterrupted
    checkpoint = out / "checkpoint.pth"
    done = script.done(torch.load(checkpoint, weights_only=True)) if checkpoint.is_file() else 0
    record = out.parent / f"{out.name}_resumed.txt"
    flags = script.flags(data, out) + (["--resume", str(checkpoint)] if done else [])
    assert run_forked(script, flags, record=record) == 0, where
    resumed = record.read_text().splitlines() if record.exists() else []
    where = f"{where}, resumed at step {done} (RESUME_TEST_SEED={SEED})"
    assert len(resumed) == script.samples_per_step * (script.steps - done), f"{where}: read {len(resumed)} samples"
    assert resumed == samples[len(samples) - len(resumed):], f"{where}: another data order"
    state, eval_json = run_state(out)
    assert_same(state, expected[0], f"{where}: final checkpoint")
    assert eval_json == expected[1], f"{where}: eval.json differs"


# ----------------------------------------------------------------------------------------------------------------
# Tests run on every script
# ----------------------------------------------------------------------------------------------------------------


def test_sigkill_at_a_random_point_then_resume_is_the_same_run(uninterrupted, tmp_path):
    """SIGKILL at one point drawn at random: before a step, while writing a checkpoint or right after writing one."""
    script = uninterrupted[0]
    what = PICK.choice(["kill_step", "kill_in_save", "kill_after_save"])
    n = PICK.randint(1, script.steps if what == "kill_step" else script.saves)
    out = tmp_path / "out"
    where = f"{script.name}: {what} {n}"
    assert run_forked(script, script.flags(uninterrupted[1], out), plan=(what, n)) == -signal.SIGKILL, where
    resume_and_compare(uninterrupted, out, where)


def test_sigterm_saves_at_the_step_boundary_and_exits_cleanly(uninterrupted, tmp_path, capfd):
    script = uninterrupted[0]
    n = PICK.randint(1, script.steps)
    out = tmp_path / "out"
    where = f"{script.name}: SIGTERM before step {n} (RESUME_TEST_SEED={SEED})"
    assert run_forked(script, script.flags(uninterrupted[1], out), plan=("term_step", n)) == 128 + signal.SIGTERM
    output = capfd.readouterr()
    assert f"stopped by SIGTERM: checkpoint saved to {out / 'checkpoint.pth'}; continue with --resume" in output.out
    assert "Traceback" not in output.err, where
    assert script.done(torch.load(out / "checkpoint.pth", weights_only=True)) == n, f"{where}: saved elsewhere"
    resume_and_compare(uninterrupted, out, where)


def test_a_second_sigterm_stops_at_once_without_a_checkpoint(uninterrupted, tmp_path, capfd):
    script = uninterrupted[0]
    out = tmp_path / "out"
    assert run_forked(script, script.flags(uninterrupted[1], out), plan=("term_twice_step", 1)) \
        == 128 + signal.SIGTERM
    assert "SIGTERM again: exiting now, without a checkpoint" in capfd.readouterr().err
    assert not (out / "checkpoint.pth").exists()


def test_same_seed_same_eval_json(uninterrupted, tmp_path):
    script = uninterrupted[0]
    out = tmp_path / "again"
    assert run_forked(script, script.flags(uninterrupted[1], out)) == 0
    state, eval_json = run_state(out)
    assert_same(state, uninterrupted[2][0], f"{script.name}: second run")
    assert eval_json == uninterrupted[2][1], f"{script.name}: eval.json differs between two runs with the same seed"


def test_resume_of_another_script_size_or_class_count_is_one_clear_error(uninterrupted, tmp_path, one_thread):
    script, data, (state, _), _ = uninterrupted
    path = tmp_path / "checkpoint.pth"
    torch.save(state, path)
    flags = in_process(script.flags(data, tmp_path / "out")) + ["--resume", str(path)]
    for extra, error in script.mismatches:
        with pytest.raises(SystemExit, match=error):
            script.main(script.parser().parse_args([*flags, *extra]))
    other = "detr.py" if script.name == "vistr" else "vistr.py"
    torch.save(dict(state, identity=dict(state["identity"], script=other)), path)
    with pytest.raises(SystemExit, match=rf"checkpoint of script {other}.*expected script {script.name}.py"):
        script.main(script.parser().parse_args(flags))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "nothing written"


def in_process(flags):
    """Flags for a run in this process: --deterministic would stay on for the other tests."""
    return [flag for flag in flags if flag != "--deterministic"]


@pytest.mark.parametrize("name", ["adaptsegnet", "advent"])
def test_uda_non_finite_loss_names_the_iteration_every_term_and_the_last_checkpoint(name, tmp_path, monkeypatch,
                                                                                    one_thread):
    data = write_tiny_uda_data(tmp_path / "data")
    step, calls = uda.source_segmentation_step, [0]

    def diverging(*args, **kwargs):
        loss, logs, outputs = step(*args, **kwargs)
        calls[0] += 1
        if calls[0] == 3:
            logs["loss_seg_aux"] = logs["loss_seg_aux"] * float("nan")
        return loss, logs, outputs

    monkeypatch.setattr(uda, "source_segmentation_step", diverging)
    script, out = SCRIPTS[name], tmp_path / "out"
    with pytest.raises(SystemExit, match=r"non-finite loss at iteration 3: loss_seg_main [\d.e+-]+, loss_seg_aux nan, "
                                         r".*loss_[dD]_main [\d.e+-]+; stopping \(the last good checkpoint is "
                                         r".*out/checkpoint.pth\)"):
        script.main(script.parser().parse_args(in_process(script.flags(data, out))))
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == 2


# ----------------------------------------------------------------------------------------------------------------
# DETR: non-finite loss, two processes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "module", "where"), [("detr", detr, r"epoch 1, step 0 \(iteration 2\)"),
                                                      ("vistr", vistr, r"epoch 1, step 0, clip 1 of 1"),
                                                      ("trackformer", trackformer, r"epoch 1, step 0")],
                         ids=["detr", "vistr", "trackformer"])
def test_non_finite_loss_names_the_step_every_term_and_the_last_checkpoint(name, module, where, tmp_path, monkeypatch,
                                                                            one_thread):
    """The third training step's GIoU loss is made infinite: the run stops before that step's update, naming it,
    every weighted term and the checkpoint written at the end of the first epoch."""
    script = SCRIPTS[name]
    data = script.write_data(tmp_path)
    forward, calls = module.SetCriterion.forward, [0]

    def diverging(self, outputs, targets):
        losses = forward(self, outputs, targets)
        calls[0] += self.training
        if self.training and calls[0] == 3:
            losses["loss_giou"] = losses["loss_giou"] * float("inf")
        return losses

    monkeypatch.setattr(module.SetCriterion, "forward", diverging)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=rf"non-finite loss at {where}: loss inf, .*loss_giou inf.*; stopping "
                                         r"\(the last good checkpoint is .*out/checkpoint.pth\)"):
        script.main(script.parser().parse_args(in_process(script.flags(data, out))))
    saved = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (0, 0)


def test_detr_torchrun_two_processes_match_one_process(tmp_path):
    """torchrun --nproc_per_node 2 on CPU (gloo), one image per process, against one process with two images per
    step: the same samples (the sampler deals one permutation out), the same augmentation, no dropout, frozen batch
    norm; the logged
    training and validation losses agree to 1e-5 relative (only the summation order of the gradients differs), and
    only rank 0 writes (one log line per epoch, the same files)."""
    data = write_coco(tmp_path / "coco")
    # a backbone with frozen batch norm (the conv stem's batch statistics would depend on the per-process batch)
    flags = ["--coco_path", str(data), *DETR_SMALL, "--backbone", "resnet18", "--crop_size", "64", "64",
             "--epochs", "2", "--dropout", "0"]  # crops of the whole image: no padding in a batch of two
    single, double = tmp_path / "single", tmp_path / "double"
    env = {"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "detr.py"), *flags, "--batch_size", "1", "--output_dir", str(double)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert run_forked(SCRIPTS["detr"], [*flags, "--output_dir", str(single)]) == 0
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-3000:]
    logs = [[json.loads(line) for line in (out / "log.txt").read_text().splitlines()] for out in (single, double)]
    assert [r["epoch"] for r in logs[1]] == [0, 1], "one log line per epoch: rank 0 alone writes"
    for one, two in zip(*logs):
        for key in ("train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou", "test_loss"):
            assert two[key] == pytest.approx(one[key], rel=1e-5), f"epoch {one['epoch']} {key}"
    assert sorted(p.name for p in double.iterdir()) == sorted(p.name for p in single.iterdir())
    assert output.count("Start training") == 1, "only rank 0 prints"
