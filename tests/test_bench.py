"""make bench (benchmarks/bench.py): the CI-sized run measures every paper's rows and writes its table and JSON;
the FLOP count and the peak-memory method give known answers on known work. `--compile`: every script has the flag,
and it compiles the model in place and runs a training step and an evaluation.

The compile tests trace the models with torch.compile's "eager" backend: TorchDynamo captures the graphs (what
fails on code it cannot trace) but TorchInductor does not generate and build C++ for them, which takes minutes even
for a tiny model on the development CPU (docs/performance.md) and so is left to `make bench BENCH_ARGS=--compile`.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import adaptsegnet
import advent
import detr
import proda
import pvt
import trackformer
import vistr
from benchmarks import bench
from common import training
from tests.test_pvt import TINY_FLAGS, write_image_folders

EXPECTED = {("DETR", "train"), ("DETR", "infer"), ("ADVENT", "train"), ("ADVENT", "infer"), ("AdaptSegNet", "train"),
            ("AdaptSegNet", "infer"), ("ProDA", "train"), ("ProDA", "infer"), ("VisTR", "train"), ("VisTR", "infer"),
            ("TrackFormer", "train"), ("TrackFormer", "infer"), ("PVT", "train"), ("PVT", "infer")}
CPU = torch.device("cpu")


def test_quick_bench_measures_every_paper_and_writes_table_and_json(tmp_path, one_thread):
    result = bench.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    rows = result["rows"]
    assert {(r["paper"], r["kind"]) for r in rows} == EXPECTED
    assert [r["precision"] for r in rows] == ["float32", "bfloat16"] * (len(rows) // 2), "fp32/amp pairs"
    for r in rows:
        what = f"{r['paper']} {r['kind']} {r['precision']}"
        assert r["seconds"] > 0 and r["items_per_second"] > 0, what
        assert r["flops"] > 0, f"{what}: no matmul or convolution counted"
        if sys.platform == "linux":
            assert r["peak_bytes"] and r["peak_bytes"] > 0, f"{what}: no peak memory"
    # a train step does the forward's work and about twice that again backwards
    for paper in ("DETR", "PVT"):
        flops = {r["kind"]: r["flops"] for r in rows if r["paper"] == paper}
        assert 2.5 * flops["infer"] < flops["train"] < 3.5 * flops["infer"], f"{paper}: {flops}"
    assert set(result["matmul_peak"]) == {"float32", "amp"} and min(result["matmul_peak"].values()) > 0
    table = (tmp_path / "table.md").read_text()
    assert sum(line.startswith(("| DETR", "| ADVENT", "| AdaptSegNet", "| ProDA", "| VisTR", "| TrackFormer", "| PVT"))
               for line in table.splitlines()) == len(rows)
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == json.loads(json.dumps(rows))


def test_flops_of_a_matmul_and_its_backward():
    a, b = torch.randn(32, 48, requires_grad=True), torch.randn(48, 16)
    assert bench.count_flops(lambda amp: (a @ b)) == 2 * 32 * 48 * 16
    assert bench.count_flops(lambda amp: (a @ b).sum().backward()) == 2 * (2 * 32 * 48 * 16)  # + grad of a


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_peak_memory_of_a_known_allocation():
    model = torch.nn.Linear(256, 256)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 256)).sum().backward()
    optimizer.step()
    held = 4 * (256 * 256 + 256) * 4 + 2 * 4  # weights, gradients, Adam's two moments, its two step counters
    assert bench.held_bytes([model, optimizer]) == held
    size = 64 * 2 ** 20

    def run(amp):
        torch.ones(size // 4).add_(1)  # 64 MiB, touched, freed at return

    peak = bench.peak_memory(bench.Case("x", "train", "", 1, "img", run, [model, optimizer]), False, CPU)
    assert held + 0.9 * size < peak < held + size + 16 * 2 ** 20, f"peak {peak / 2 ** 20:.1f} MiB for a 64 MiB tensor"


def test_interleaved_runs_alternate_and_markdown_ratio():
    calls = []
    times = bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, CPU, reps=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert all(len(walls) == 3 for walls, _ in times.values())
    row = {"paper": "P", "kind": "train", "config": "c", "unit": "img", "items_per_second": 1.0, "flops": 1e9,
           "peak_bytes": None, "cpu_seconds": 1.0}
    result = {"device_name": "cpu", "torch": "x", "threads": 1, "amp_dtype": "bfloat16",
              "matmul_peak": {"float32": 1e10, "amp": 2e10},
              "rows": [dict(row, precision="float32", amp=False, seconds=2.0, flops_per_second=5e8),
                       dict(row, precision="bfloat16", amp=True, seconds=1.0, flops_per_second=1e9)]}
    lines = bench.markdown(result).splitlines()
    assert lines[-2].endswith("| 5% |  |") and lines[-1].endswith("| 5% | 0.50x |")


@pytest.fixture
def eager_compile(monkeypatch):
    """nn.Module.compile with the "eager" backend (module docstring); yields the classes of the modules compiled."""
    compiled, compile_ = [], torch.nn.Module.compile

    def compile_eagerly(module, **kwargs):
        compiled.append(type(module).__name__)
        compile_(module, **kwargs, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eagerly)
    torch._dynamo.reset()
    counters.clear()
    yield compiled
    torch._dynamo.reset()


def test_compile_model_compiles_in_place_with_the_same_state_dict(eager_compile):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    x, keys = torch.randn(4, 8), list(model.state_dict())
    expected = model(x)
    assert training.compile_model(model, False) is model and eager_compile == []
    assert training.compile_model(model, True) is model and eager_compile == ["Sequential"]
    assert torch.equal(model(x), expected)
    assert counters["stats"]["unique_graphs"] == 1, "the forward was not captured by torch.compile"
    assert list(model.state_dict()) == keys, "compiling must not rename the state dict's keys (checkpoints)"


def test_compile_flag_trains_and_evaluates_pvt(tmp_path, eager_compile, one_thread):
    data = write_image_folders(tmp_path / "imagenet", classes=2, train=2, val=1)
    args = pvt.get_args_parser().parse_args([*TINY_FLAGS, "--input_size", "32", "--batch_size", "4", "--num_workers",
                                             "0", "--device", "cpu", "--data_root", str(data), "--epochs", "1",
                                             "--output_dir", str(tmp_path / "out"), "--print_freq", "100",
                                             "--compile"])
    pvt.main(args)
    assert eager_compile == ["PyramidVisionTransformer"]
    assert counters["stats"]["unique_graphs"] >= 2, "a training and an evaluation graph"
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=False)
    model = pvt.build_pvt("pvt_tiny", num_classes=2, depths=[1] * 4, embed_dims=[16, 32, 48, 64],
                          num_heads=[1, 2, 2, 4])
    assert list(checkpoint["model"]) == list(model.state_dict()), "the checkpoint of a compiled model"


@pytest.mark.parametrize("parser", [detr.get_args_parser, pvt.get_args_parser, pvt.get_detect_args_parser,
                                    vistr.get_args_parser, trackformer.get_args_parser, advent.get_args_parser,
                                    adaptsegnet.get_args_parser, proda.get_args_parser])
def test_every_script_has_compile_and_amp_flags_with_one_help(parser):
    actions = {a.dest: a for a in parser()._actions}
    reference = {a.dest: a.help for a in detr.get_args_parser()._actions if a.dest in ("amp", "compile")}
    for flag in ("amp", "compile"):
        assert flag in actions and actions[flag].help == reference[flag], f"--{flag} of {parser.__module__}"
        assert actions[flag].default is False
