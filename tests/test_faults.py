"""Bad input to every script: one message naming the path and what was expected, a non-zero exit code, and the
output directory left as it was.

Each case damages a copy of a tiny dataset written by common/synthetic.py (or writes a file that is not a checkpoint)
and runs the script as `python <script> ...` does: its `__main__` block (runpy) in a forked process, stdout and stderr
to files. The scripts are imported once here, so a case costs no interpreter start. What the user reads last (the
last line of stderr, below a traceback if there is one) must name the path and say what was expected.
"""
import json
import multiprocessing
import os
import re
import runpy
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import adaptsegnet  # noqa: F401  (imported here so that the forked runs start with every script loaded)
import advent  # noqa: F401
import detr  # noqa: F401
import proda  # noqa: F401
import pvt  # noqa: F401
import trackformer  # noqa: F401
import vistr  # noqa: F401
from common import synthetic

ROOT = Path(__file__).resolve().parents[1]
FORK = multiprocessing.get_context("fork")

# ---------------------------------------------------------------------------------------------------------------- runs


def _main(script, argv, stdout, stderr):
    """`python script argv...` in this (forked) process: exit code as the interpreter gives it."""
    torch.set_num_threads(1)
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.stdout, sys.stderr = (open(fd, "w", buffering=1, closefd=False) for fd in (1, 2))  # not pytest's capture
    sys.argv = [str(ROOT / script), *argv]
    code = 0
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as error:
        if error.code is None or isinstance(error.code, int):
            code = error.code or 0
        else:
            print(error.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(script, argv, where, timeout=120):
    """(exit code, stdout, stderr) of the script run in a forked process."""
    stdout, stderr = where / "stdout.txt", where / "stderr.txt"
    process = FORK.Process(target=_main, args=(script, argv, stdout, stderr))
    process.start()
    deadline = time.time() + timeout
    while process.exitcode is None and time.time() < deadline:
        time.sleep(0.02)
    if process.exitcode is None:
        process.kill()
        process.join()
        pytest.fail(f"{script} {' '.join(argv)} did not end within {timeout} s")
    return process.exitcode, stdout.read_text(), stderr.read_text()


# ---------------------------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Tiny datasets in every format the scripts read (two images, frames or videos per split)."""
    root = tmp_path_factory.mktemp("clean")
    synthetic.write(root, only=["coco", "youtube_vis", "mot17", "imagenet"], images=2, size=(64, 48))
    synthetic.write(root, only=["gta5", "cityscapes"], images=2, size=(64, 32))
    return root


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def every(folder, pattern):
    return sorted(Path(folder).rglob(pattern))


def truncate_all(folder, pattern):
    """Cut every matching file in half (so that whichever the run reads first is bad); returns the folder."""
    for path in every(folder, pattern):
        truncate(path)
    return folder


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def removed(path):
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    return path


def emptied(path):
    path.write_bytes(b"")
    return path


class Executes:
    """Unpickled with weights_only=False, this runs code (here a harmless print the test looks for)."""

    def __reduce__(self):
        return print, ("UNPICKLED: loading the checkpoint ran code from it",)


def text_file(d):
    path = d / "notes.pth"
    path.write_text("these are not weights\n")
    return path


def truncated_checkpoint(d):
    path = d / "cut.pth"
    torch.save({"model": {"weight": torch.zeros(4000)}}, path)
    return truncate(path)


def pickled_objects(d):
    path = d / "objects.pth"
    torch.save({"model": Executes()}, path)
    return path


CHECKPOINTS = {"text_file": (text_file, "not a PyTorch checkpoint"),
               "truncated_checkpoint": (truncated_checkpoint, "not a PyTorch checkpoint, or a truncated one"),
               "pickle": (pickled_objects, r"refuses to rebuild.*expected model weights")}

# Each case: damage(d) -> (extra flags, the path the message must name, what it must say it expected / found).
MISSING = "not found|does not exist|missing|expected|looked for"
UNREADABLE = "truncated|cannot read|unreadable"


def coco_cases(d):
    coco, annotations = d / "coco", d / "coco" / "annotations" / "instances_train2017.json"
    return {
        "missing_root": lambda: (["--coco_path", str(d / "nowhere")], d / "nowhere", MISSING),
        "missing_split_file": lambda: ([], removed(annotations), MISSING),
        "truncated_jpeg": lambda: ([], truncate_all(coco / "train2017", "*.jpg"), UNREADABLE),
        "annotation_of_a_missing_image": lambda: (
            [], edit_json(annotations, lambda j: j["annotations"][0].update(image_id=987654)),
            r"refer to images not in its 'images'.*image_id 987654"),
        "image_file_missing": lambda: ([], removed(every(coco / "train2017", "*.jpg")[0]).parent,
                                       "missing from"),
        "annotation_of_a_missing_category": lambda: (
            [], edit_json(annotations, lambda j: j["annotations"][0].update(category_id=77)),
            r"category ids \[77\] that are not in its 'categories'"),
        "empty_annotation_file": lambda: ([], emptied(annotations), "not a COCO instances file"),
    }


def coco_panoptic_cases(d):
    """detr.py --dataset_file coco_panoptic: the segments PNGs."""
    pngs = d / "coco" / "panoptic_train2017"
    panoptic = ["--dataset_file", "coco_panoptic", "--masks", "--hidden_dim", "128", "--nheads", "8"]

    def png_of_another_size():
        for path in every(pngs, "*.png"):
            Image.open(path).resize((32, 24), Image.NEAREST).save(path)
        return panoptic, pngs, r"size \(32, 24\) differs from its image"

    return {
        "truncated_png": lambda: (panoptic, truncate_all(pngs, "*.png"), UNREADABLE),
        "label_of_another_size": png_of_another_size,
    }


def imagenet_cases(d):
    imagenet = d / "imagenet"
    return {
        "missing_root": lambda: (["--data_root", str(d / "nowhere")], d / "nowhere", MISSING),
        "missing_split": lambda: ([], removed(imagenet / "val"), MISSING),
        "truncated_jpeg": lambda: ([], truncate_all(imagenet / "train", "*.JPEG"), "cannot decode image"),
    }


def ytvis_cases(d):
    ytvis, annotations = d / "youtube_vis", d / "youtube_vis" / "train.json"
    frames = ytvis / "train" / "JPEGImages"

    def other_size(data):
        annotation = next(a for a in data["annotations"] if any(isinstance(s, dict) for s in a["segmentations"]))
        rle = next(s for s in annotation["segmentations"] if isinstance(s, dict))
        rle["size"] = [2 * rle["size"][0], rle["size"][1]]

    def missing_frames():
        """Every frame of every video but its first: any clip of two frames needs one of them."""
        for video in json.loads(annotations.read_text())["videos"]:
            for name in video["file_names"][1:]:
                (frames / name).unlink()
        return [], frames, "frame missing on disk"

    return {
        "missing_root": lambda: (["--data_root", str(d / "nowhere")], d / "nowhere", MISSING),
        "missing_split_file": lambda: ([], removed(annotations), MISSING),
        "truncated_jpeg": lambda: ([], truncate_all(frames, "*.jpg"), UNREADABLE),
        "label_of_another_size": lambda: ([], edit_json(annotations, other_size),
                                          r"segmentation of size \[96, 64\], but the video is 48x64"),
        "annotation_of_a_missing_video": lambda: (
            [], edit_json(annotations, lambda j: j["annotations"][0].update(video_id=987654)),
            "refers to video 987654, which is not in 'videos'"),
        "category_outside_the_table": lambda: (
            [], edit_json(annotations, lambda j: j["annotations"][0].update(category_id=77)),
            r"category_id 77, outside 1\.\.40"),
        "video_with_missing_frames": missing_frames,
        "empty_annotation_file": lambda: ([], emptied(annotations), "not a YouTube-VIS JSON file"),
    }


def mot17_cases(d):
    sequence = d / "mot17" / "train" / "MOT17-02-FRCNN"
    return {
        "missing_root": lambda: (["--data_root", str(d / "nowhere")], d / "nowhere", "expected MOTChallenge data"),
        "missing_split_file": lambda: ([], removed(sequence / "seqinfo.ini").parent, "missing seqinfo.ini"),
        "truncated_jpeg": lambda: ([], truncate_all(sequence / "img1", "*.jpg"), UNREADABLE),
    }


def uda_cases(d):
    cityscapes = d / "cityscapes"

    def label_of_another_size():
        path = every(cityscapes / "gtFine" / "val", "*_labelIds.png")[0]
        Image.open(path).resize((32, 16), Image.NEAREST).save(path)
        return [], path, r"is 32x16 but image .* is 64x32"

    return {
        "missing_root": lambda: (["--data_root", str(d / "nowhere")], d / "nowhere", MISSING),
        "missing_split": lambda: ([], removed(cityscapes / "leftImg8bit" / "val"), MISSING),
        "truncated_png_source": lambda: ([], truncate_all(d / "gta5" / "images", "*.png"), UNREADABLE),
        "truncated_png_target": lambda: ([], truncate_all(cityscapes / "leftImg8bit" / "train", "*.png"),
                                         UNREADABLE),
        "label_of_another_size": label_of_another_size,
        "empty_label_file": lambda: ([], emptied(every(cityscapes / "gtFine" / "val", "*_labelIds.png")[0]),
                                     "unreadable label"),
    }


UDA = ["--layers", "1", "1", "1", "1", "--width", "8", "--input_size", "64,32", "--input_size_target", "64,32",
       "--num_workers", "0", "--device", "cpu"]
# script -> (datasets it reads, tiny flags given the data folder, damage cases, flags that read a checkpoint)
SCRIPTS = {
    "detr.py": (["coco"], lambda d: [
        "--coco_path", str(d / "coco"), "--device", "cpu", "--backbone", "convstem", "--lr_backbone", "1e-4",
        "--hidden_dim", "32", "--dim_feedforward", "64", "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1",
        "--num_queries", "6", "--scales", "64", "--max_size", "96", "--crop_scales", "56", "64", "--crop_size", "40",
        "64", "--num_workers", "0", "--batch_size", "2", "--epochs", "1"],
        lambda d: {**coco_cases(d), **coco_panoptic_cases(d)}, [["--resume"], ["--pretrained_backbone"],
                     ["--masks", "--hidden_dim", "128", "--nheads", "8", "--frozen_weights"]]),
    "pvt.py": (["imagenet"], lambda d: [
        "--data_root", str(d / "imagenet"), "--model", "pvt_tiny", "--depths", "1", "1", "1", "1", "--embed_dims",
        "16", "32", "48", "64", "--num_heads", "1", "2", "2", "4", "--input_size", "32", "--batch_size", "2",
        "--epochs", "1", "--num_workers", "0", "--device", "cpu"],
        imagenet_cases, [["--resume"], ["--pretrained"]]),
    "pvt.py --task detect": (["coco"], lambda d: [
        "--task", "detect", "--coco_path", str(d / "coco"), "--model", "pvt_tiny", "--depths", "1", "1", "1", "1",
        "--embed_dims", "16", "32", "48", "64", "--num_heads", "1", "2", "2", "4", "--device", "cpu",
        "--num_workers", "0", "--batch_size", "2", "--hidden_dim", "32", "--dim_feedforward", "64", "--nheads", "2",
        "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "5", "--scales", "64", "--max_size", "96",
        "--crop_scales", "64", "--crop_size", "48", "64", "--epochs", "1"],
        coco_cases, [["--resume"], ["--pretrained"]]),
    "vistr.py": (["youtube_vis"], lambda d: [
        "--data_root", str(d / "youtube_vis"), "--backbone", "convstem", "--enc_layers", "1", "--dec_layers", "1",
        "--dim_feedforward", "64", "--num_frames", "2", "--num_queries", "6", "--input_size", "32", "--val_size",
        "32", "--num_workers", "0", "--device", "cpu", "--epochs", "1", "--max_iters", "1", "--holdout_ann",
        "valid_holdout.json"],
        ytvis_cases, [["--resume"], ["--pretrained_weights"], ["--eval", "--image_model"]]),
    "trackformer.py": (["mot17"], lambda d: [
        "--data_root", str(d / "mot17"), "--backbone", "convstem", "--hidden_dim", "96", "--dim_feedforward", "128",
        "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "10", "--nheads", "4", "--img_max_size", "96",
        "--val_width", "64", "--device", "cpu", "--num_workers", "0", "--epochs", "1", "--max_iters", "1",
        "--batch_size", "2"],
        mot17_cases, [["--resume"], ["--pretrained"]]),
    "adaptsegnet.py": (["gta5", "cityscapes"], lambda d: ["--data_root", str(d), *UDA, "--num_steps_stop", "1"],
                       uda_cases, [["--resume"], ["--init"], ["--restore_from"]]),
    "advent.py": (["gta5", "cityscapes"], lambda d: ["--data_root", str(d), *UDA, "--early_stop", "1"],
                  uda_cases, [["--resume"], ["--init"], ["--restore_from"]]),
    "proda.py": (["gta5", "cityscapes"], lambda d: [
        "--data_root", str(d), "--layers", "1", "1", "1", "1", "--width", "8", "--feat_dim", "32", "--src_size",
        "64", "32", "--tgt_size", "64", "32", "--resize", "64", "--rcrop", "32,16", "--batch_size", "2",
        "--num_workers", "0", "--proto_epochs", "1", "--device", "cpu", "--stage", "warmup", "--train_iters", "1"],
        uda_cases, [["--resume"], ["--resume_path"], ["--pretrained"]]),
}
DATA_CASES = [(script, case) for script, (_, _, cases, _) in SCRIPTS.items() for case in cases(Path())]
CHECKPOINT_CASES = [(script, " ".join(flags), kind) for script, (*_, checkpoint_flags) in SCRIPTS.items()
                    for flags in checkpoint_flags for kind in CHECKPOINTS]


def prepare(clean, tmp_path, script):
    """A copy of the script's datasets and an output folder holding a previous run's files."""
    formats, flags, _, _ = SCRIPTS[script]
    for name in formats:
        shutil.copytree(clean / name, tmp_path / name)
    out = tmp_path / "out"
    for folder in (out, out / "warmup"):  # proda.py writes OUTPUT_DIR/<stage>/
        folder.mkdir(parents=True)
        torch.save({"model": {"weight": torch.ones(3)}, "epoch": 7}, folder / "checkpoint.pth")
        (folder / "eval.json").write_text('{"mIoU": 12.5}\n')
        (folder / "log.txt").write_text('{"epoch": 7}\n')
    return flags(tmp_path), out


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def check_refused(script, argv, tmp_path, out, path, expected):
    """The run fails with exit code 1, its last stderr line names `path` and matches `expected`, no checkpoint was
    unpickled, and the output folder is as it was."""
    before = snapshot(out)
    code, stdout, stderr = run(script.split()[0], [*script.split()[1:], *argv, "--output_dir", str(out)], tmp_path)
    lines = [line for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    where = f"{script} {' '.join(argv[-2:])}: exit code {code}\n--- stdout ...\n{stdout[-1500:]}\n--- stderr ...\n" \
            f"{stderr[-3000:]}"
    assert "UNPICKLED" not in stdout + stderr, f"a checkpoint was unpickled with code execution\n{where}"
    assert code == 1, f"expected a failed run (exit code 1)\n{where}"
    assert str(path) in last, f"the last line of stderr does not name {path}\n{where}"
    assert re.search(expected, last), f"the last line of stderr does not match {expected!r}\n{where}"
    assert snapshot(out) == before, f"the output folder changed\n{where}"


@pytest.mark.parametrize("script,case", DATA_CASES, ids=[f"{s.split()[0][:-3]}{'_detect' * ('detect' in s)}-{c}"
                                                         for s, c in DATA_CASES])
def test_bad_data_is_one_clear_error(clean, tmp_path, script, case):
    argv, out = prepare(clean, tmp_path, script)
    extra, path, expected = SCRIPTS[script][2](tmp_path)[case]()
    check_refused(script, [*argv, *extra], tmp_path, out, path, expected)


@pytest.mark.parametrize("script,flags,kind", CHECKPOINT_CASES,
                         ids=[f"{s.split()[0][:-3]}{'_detect' * ('detect' in s)}-{f.split()[-1][2:]}-{k}"
                              for s, f, k in CHECKPOINT_CASES])
def test_a_file_that_is_not_a_checkpoint_is_one_clear_error(clean, tmp_path, script, flags, kind):
    argv, out = prepare(clean, tmp_path, script)
    write, expected = CHECKPOINTS[kind]
    path = write(tmp_path)
    check_refused(script, [*argv, *flags.split(), str(path)], tmp_path, out, path, f"cannot read checkpoint .*"
                                                                                    f"{expected}")


@pytest.mark.parametrize("script", ["adaptsegnet.py", "advent.py", "proda.py"])
def test_label_ids_outside_the_table_are_ignored(clean, tmp_path, script):
    """Label ids that the class table does not list map to the ignore index, as the official loaders do (e.g.
    Cityscapes' license plate, -1), so a run with them trains and evaluates."""
    argv, out = prepare(clean, tmp_path, script)
    for path in every(tmp_path / "gta5" / "labels", "*.png") + every(tmp_path / "cityscapes" / "gtFine", "*.png"):
        ids = np.asarray(Image.open(path)).copy()
        ids[:4] = 200
        Image.fromarray(ids).save(path)
    code, stdout, stderr = run(script, [*argv, "--output_dir", str(out)], tmp_path)
    assert code == 0, stdout[-1500:] + stderr[-3000:]
