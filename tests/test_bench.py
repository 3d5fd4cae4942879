"""make bench (benchmarks/bench.py): the CI-sized run measures every paper's rows and writes its table and JSON;
the FLOP count and the peak-memory method give known answers on known work."""
import json
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench

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
