"""Training plumbing: atomic checkpoints, resume of RNG state, readable state-dict errors, logs and demo tables."""
import argparse
import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from common import demo, training


def test_checkpoint_round_trip_restores_rng(tmp_path):
    model = torch.nn.Linear(3, 2)
    training.save_checkpoint(tmp_path / "checkpoint.pth", model=model.state_dict(), epoch=4)
    expected = torch.rand(3)
    ckpt = training.load_checkpoint(tmp_path / "checkpoint.pth")
    assert ckpt["epoch"] == 4
    torch.testing.assert_close(ckpt["model"]["weight"], model.weight.detach())
    training.restore_rng(ckpt["rng"])
    torch.testing.assert_close(torch.rand(3), expected, msg="RNG state was not restored from the checkpoint")


def test_save_that_fails_midway_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    training.save_checkpoint(path, epoch=1)

    def crashing_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(RuntimeError):
        training.save_checkpoint(path, epoch=2)
    monkeypatch.undo()
    assert training.load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"], "temporary file left behind"


def test_process_killed_while_saving_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pth"
    training.save_checkpoint(path, epoch=1)
    # A child process starts a save and dies (os._exit: no cleanup at all) after writing part of the file.
    child = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(training.__file__.rsplit('/common/', 1)[0])!r})
        from common import training
        def dying_save(obj, f):
            with open(f, "wb") as fh:
                fh.write(b"half a checkpoint")
                fh.flush()
            os._exit(9)
        torch.save = dying_save
        training.save_checkpoint({str(path)!r}, epoch=2)
    """)
    result = subprocess.run([sys.executable, "-c", child], capture_output=True)
    assert result.returncode == 9, result.stderr.decode()
    assert training.load_checkpoint(path)["epoch"] == 1


def test_load_checkpoint_names_missing_path(tmp_path):
    with pytest.raises(SystemExit, match="checkpoint not found: .*nope.pth"):
        training.load_checkpoint(tmp_path / "nope.pth")


def test_load_model_state_lists_differences():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    good = {k: v.clone() for k, v in model.state_dict().items()}
    training.load_model_state(model, good, "good.pth")
    with pytest.raises(ValueError, match=r"bad.pth .*unexpected keys: extra"):
        training.load_model_state(model, dict(good, extra=torch.zeros(1)), "bad.pth")
    with pytest.raises(ValueError, match=r"missing keys: 0.bias"):
        training.load_model_state(model, {"0.weight": good["0.weight"]}, "bad.pth")
    with pytest.raises(ValueError, match=r"shape mismatch: 0.weight: checkpoint \(4, 3\) vs model \(2, 3\)"):
        training.load_model_state(model, dict(good, **{"0.weight": torch.zeros(4, 3)}), "bad.pth")
    missing, unexpected = training.load_model_state(model, {"0.weight": good["0.weight"], "x": torch.zeros(1)},
                                                    "partial.pth", strict=False)
    assert missing == ["0.bias"] and unexpected == ["x"]


def test_append_log_writes_one_json_line_per_call(tmp_path):
    training.append_log(tmp_path, {"epoch": 0, "loss": 1.5})
    training.append_log(tmp_path, {"epoch": 1, "loss": torch.tensor(0.5).item()})
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]


def test_metric_logger_smooths_and_prints(capsys):
    logger = training.MetricLogger()
    for i, _ in enumerate(logger.log_every(range(5), print_freq=2, header="Epoch: [0]")):
        logger.update(loss=torch.tensor(float(i)))
    assert logger.loss.global_avg == pytest.approx(2.0)
    assert logger.loss.median == pytest.approx(2.0)
    out = capsys.readouterr().out
    assert "Epoch: [0]  [1/5]  eta:" in out and "eta:" in out and "it/s:" in out and "total time" in out


def test_seed_everything_is_deterministic():
    training.seed_everything(3)
    a = torch.rand(4)
    training.seed_everything(3)
    torch.testing.assert_close(torch.rand(4), a)


def test_resolve_device_rejects_unavailable_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so the unavailable-device error cannot be shown here")
    with pytest.raises(SystemExit, match="CUDA is not available"):
        training.resolve_device("cuda")
    assert training.resolve_device("cpu").type == "cpu"


def test_demo_write_and_table(tmp_path, capsys):
    for method, values in {"src": [20.0, 30.0], "adapt": [40.0, 50.0]}.items():
        for seed, v in enumerate(values):
            (tmp_path / f"{method}{seed}.json").write_text(json.dumps({"mIoU": v, "per_class": {"road": 1.0}}))
    out = tmp_path / "demo" / "toy"
    demo.main(["write", str(out), "--paper", "toy", "--metric", "mIoU", "--seconds", "61",
               "--row", "source-only", str(tmp_path / "src0.json"), str(tmp_path / "src1.json"),
               "--row", "adapted", str(tmp_path / "adapt0.json"), str(tmp_path / "adapt1.json"),
               "--row_metric", "adapted", "gain"])
    written = json.loads((out / "demo.json").read_text())
    cpu_seconds, load = written.pop("cpu_seconds"), written.pop("load")  # this process's parent's, the machine's
    assert cpu_seconds >= 0 and load >= 0
    assert written == {"paper": "toy", "metric": "mIoU", "seconds": 61,
                       "rows": [{"method": "source-only", "value": 25.0, "values": [20.0, 30.0]},
                                {"method": "adapted", "value": 45.0, "values": [40.0, 50.0], "metric": "gain"}]}
    with pytest.raises(SystemExit, match="names no --row"):
        demo.main(["write", str(out), "--paper", "toy", "--metric", "mIoU", "--seconds", "1",
                   "--row", "adapted", str(tmp_path / "adapt0.json"), "--row_metric", "adapter", "gain"])
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{demo.BEGIN}\nold\n{demo.END}\nbottom\n")
    demo.main(["table", str(tmp_path / "demo"), "--readme", str(readme)])
    text = readme.read_text()
    assert "| toy | source-only | mIoU | 25.0 (±5.0) | 20.0, 30.0 | 1m01s (CPU " in text
    assert re.search(r"\| toy \| adapted \| gain \| 45\.0 \(±5\.0\) \| 40\.0, 50\.0 \| 1m01s \(CPU \d+m\d\ds; load "
                     r"\d+\.\d\) \|", text)
    assert "old" not in text and text.startswith("top\n") and text.endswith("bottom\n")
    with pytest.raises(SystemExit, match="no metric 'AP'"):
        demo.read_metric(tmp_path / "src0.json", "AP")


@pytest.mark.parametrize("device", [None, "cuda"])
def test_init_distributed_puts_each_rank_on_its_own_gpu(monkeypatch, device):
    """Under torchrun with CUDA (mocked: no GPU needed) rank 1 of 2 on a node uses cuda:1 and NCCL, whether --device
    was left unset (None) or given as plain `cuda`."""
    calls = {}
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.setdefault("set_device", index))
    monkeypatch.setattr(training.dist, "init_process_group", lambda **kw: calls.setdefault("group", kw))
    monkeypatch.setattr(training.dist, "barrier", lambda: None)
    monkeypatch.setattr(training.atexit, "register", lambda fn: None)
    monkeypatch.setattr(training.builtins, "print", training.builtins.print)  # restored after the test
    args = argparse.Namespace(device=device)
    training.init_distributed(args)
    assert args.device == "cuda:1" and args.gpu == 1 and calls["set_device"] == 1
    assert (args.rank, args.world_size, args.distributed) == (1, 2, True)
    assert calls["group"]["backend"] == "nccl"
    assert calls["group"]["timeout"].total_seconds() == 60 * training.DIST_TIMEOUT_MINUTES, "a dead rank must not hang"


def test_init_distributed_without_torchrun_resolves_the_default_device(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = argparse.Namespace(device=None)
    training.init_distributed(args)
    assert (args.device, args.distributed, args.gpu) == ("cpu", False, None)


def test_resumable_batch_sampler_continues_an_epoch_where_it_stopped():
    sampler = training.ResumableBatchSampler(10, batch_size=3, seed=5)
    sampler.set_epoch(2)
    full = list(sampler)
    indices = [i for b in full for i, _ in b]
    assert len(full) == len(sampler) == 3 and len(set(indices)) == 9 and set(indices) <= set(range(10))
    sampler.set_epoch(2, start=2)
    assert list(sampler) == full[2:] and len(sampler) == 1
    sampler.set_epoch(3)
    assert [i for b in sampler for i, _ in b] != [i for b in full for i, _ in b], "the order must change per epoch"
    # two processes share the epoch between them, padded to equal length as DistributedSampler
    shards = []
    for rank in range(2):
        s = training.ResumableBatchSampler(7, batch_size=2, seed=5, drop_last=False, rank=rank, world_size=2)
        s.set_epoch(0)
        shards.append([i for b in s for i, _ in b])
    assert [len(x) for x in shards] == [4, 4] and set(shards[0] + shards[1]) == set(range(7))


def test_seeded_dataset_fixes_each_sample_and_leaves_the_training_generators_alone():
    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return index, random.random(), float(np.random.rand()), torch.rand(1).item()

    dataset = training.SeededDataset(Draws())
    training.seed_everything(0)
    expected_next = torch.rand(1).item(), random.random()
    training.seed_everything(0)
    first = dataset[(2, 123)]
    assert (torch.rand(1).item(), random.random()) == expected_next, "the training's generators were disturbed"
    assert dataset[(2, 123)] == first and dataset[(2, 124)] != first and first[0] == 2


def test_checkpoint_is_plain_enough_for_weights_only_and_restores_every_generator(tmp_path):
    args = argparse.Namespace(lr=0.1, output_dir=tmp_path, sizes=(1, 2), score=np.float64(0.5))
    training.seed_everything(7)
    training.save_checkpoint(tmp_path / "checkpoint.pth", model={"w": torch.ones(2)}, args=args,
                             rng=training.rng_states())
    expected = random.random(), float(np.random.rand()), torch.rand(1).item()
    raw = torch.load(tmp_path / "checkpoint.pth", weights_only=True)  # no error: nothing but plain values
    assert raw["args"] == {"lr": 0.1, "output_dir": str(tmp_path), "sizes": (1, 2), "score": 0.5}
    training.restore_rng(training.load_checkpoint(tmp_path / "checkpoint.pth")["rng"])
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected


def test_older_checkpoints_with_namespace_args_and_numpy_rng_still_load(tmp_path):
    training.seed_everything(3)
    old = {"model": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=0.1),
           "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    torch.save(old, tmp_path / "old.pth")
    expected = float(np.random.rand())
    checkpoint = training.load_checkpoint(tmp_path / "old.pth")
    assert checkpoint["args"].lr == 0.1
    training.restore_rng(checkpoint["rng"])
    assert float(np.random.rand()) == expected


class NotWeights:
    pass


def test_checkpoints_that_are_not_plain_weights_get_one_clear_error(tmp_path):
    torch.save({"model": NotWeights()}, tmp_path / "pickle.pth")
    with pytest.raises(SystemExit, match=r"pickle.pth: it holds Python objects .* refuses .*NotWeights"):
        training.load_checkpoint(tmp_path / "pickle.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint\n")
    with pytest.raises(SystemExit, match=r"text.pth: not a PyTorch checkpoint"):
        training.load_checkpoint(tmp_path / "text.pth")
    torch.save({"model": {"w": torch.ones(100)}}, tmp_path / "good.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "good.pth").read_bytes()[:200])
    with pytest.raises(SystemExit, match=r"cut.pth: not a PyTorch checkpoint, or a truncated one"):
        training.load_checkpoint(tmp_path / "cut.pth")


def test_check_identity_names_what_was_found_and_what_was_expected():
    ours = {"script": "pvt.py", "model": "pvt_tiny", "num_classes": 4}
    training.check_identity({"identity": dict(ours)}, ours, "ckpt.pth")
    training.check_identity({"model": {}}, ours, "released.pth")  # no identity: nothing to compare
    with pytest.raises(SystemExit, match=r"ckpt.pth: checkpoint of script detr.py.*expected script pvt.py.*"
                                         r"differs in script"):
        training.check_identity({"identity": dict(ours, script="detr.py")}, ours, "ckpt.pth")
    with pytest.raises(SystemExit, match=r"model pvt_small, num_classes 10; expected .*model pvt_tiny, num_classes 4 "
                                         r"\(differs in model, num_classes\)"):
        training.check_identity({"identity": dict(ours, model="pvt_small", num_classes=10)}, ours, "ckpt.pth")


def test_restore_rng_takes_this_process_entry_of_a_per_process_list():
    training.seed_everything(1)
    first = training.rng_state()
    training.seed_everything(2)
    second = training.rng_state()
    training.restore_rng([first, second])  # a single process is rank 0
    training.seed_everything(1)
    expected = torch.rand(2)
    training.restore_rng([first, second])
    torch.testing.assert_close(torch.rand(2), expected)


def test_stop_signal_turns_sigterm_into_a_stop_at_the_step_boundary(capsys):
    stop = training.StopSignal()
    try:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested()
        with pytest.raises(SystemExit) as exit_info:
            stop.exit("out/checkpoint.pth")
        assert exit_info.value.code == 128 + signal.SIGTERM
        assert "stopped by SIGTERM: checkpoint saved to out/checkpoint.pth; continue with --resume out/checkpoint.pth" \
            in capsys.readouterr().out
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_second_signal_exits_at_once():
    child = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(training.__file__.rsplit('/common/', 1)[0])!r})
        from common import training
        stop = training.StopSignal()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        print("still running")
    """)
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert result.returncode == 128 + signal.SIGINT and "still running" not in result.stdout
    assert "SIGINT again: exiting now, without a checkpoint" in result.stderr


def test_non_finite_loss_names_where_every_term_and_the_last_checkpoint(tmp_path):
    training.check_finite_loss({"loss": torch.tensor(1.0)}, "epoch 0, step 1")
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"non-finite loss at epoch 2, step 5: loss nan, loss_ce 0.5, loss_bbox inf; "
                                         r"stopping \(the last good checkpoint is .*checkpoint.pth\)"):
        training.check_finite_loss({"loss": torch.tensor(float("nan")), "loss_ce": 0.5, "loss_bbox": float("inf")},
                                   "epoch 2, step 5", tmp_path / "checkpoint.pth")
    with pytest.raises(SystemExit, match=r"no checkpoint was written yet"):
        training.check_finite_loss({"loss": float("nan")}, "epoch 0, step 0", tmp_path / "missing.pth")


def test_make_deterministic_turns_on_deterministic_algorithms():
    try:
        training.make_deterministic()
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)


def test_epoch_saver_and_resume_run_continue_a_multistep_schedule(tmp_path):
    """MultiStepLR's milestones (a Counter) go into the checkpoint as a plain dict, which weights_only loading
    takes, and come back as a Counter: the resumed schedule drops the lr where the uninterrupted one does."""
    def build():
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        return model, optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, [3]), torch.amp.GradScaler("cpu")

    model, optimizer, schedule, scaler = build()
    args = argparse.Namespace(start_epoch=0)
    save = training.epoch_saver(tmp_path / "checkpoint.pth", identity={"script": "test"}, args=args, model=model,
                                optimizer=optimizer, lr_scheduler=schedule, scaler=scaler)
    for _ in range(2):
        optimizer.step()
        schedule.step()
    save(2, 5)
    expected = []
    for _ in range(3):
        optimizer.step()
        schedule.step()
        expected.append(optimizer.param_groups[0]["lr"])

    checkpoint = training.load_checkpoint(tmp_path / "checkpoint.pth")
    assert type(checkpoint["lr_scheduler"]["milestones"]) is dict
    model, optimizer, schedule, scaler = build()
    resumed = argparse.Namespace(start_epoch=0)
    start_step, rng = training.resume_run(checkpoint, resumed, optimizer, schedule, scaler)
    assert (resumed.start_epoch, start_step) == (2, 5) and rng
    assert type(schedule.milestones) is collections.Counter
    got = []
    for _ in range(3):
        optimizer.step()
        schedule.step()
        got.append(optimizer.param_groups[0]["lr"])
    assert got == expected == [0.1, 0.1, 0.1]
