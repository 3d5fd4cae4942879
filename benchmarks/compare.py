"""Two revisions of the code, timed against each other in one process: every `make bench` row of the older and
the newer revision, float32 and amp, run alternately (A B B A ...) so that a loaded machine slows both alike.

Each revision is exported (`git archive`) into a temporary folder and imported there: first the older one's
modules build their cases (models, inputs, steps), then they are dropped from `sys.modules` and the newer one's are
imported and build theirs; each case keeps the functions of its own revision. The same seeds give both the same
weights and inputs where the model's parameters are unchanged. CPU seconds of the process (use `--threads 1` on a
shared machine) and wall seconds, medians of `--reps`.

    python -m benchmarks.compare --before 9db4ba1 --only trackformer --threads 1 --reps 5
    python -m benchmarks.compare --before HEAD~3 --after HEAD --only detr,vistr --kind infer
"""
import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROJECT_MODULES = ("adaptsegnet", "advent", "benchmarks", "common", "detr", "proda", "pvt", "trackformer", "vistr")


def get_args_parser():
    p = argparse.ArgumentParser("compare two revisions' make bench rows in one process")
    p.add_argument("--before", required=True, help="git revision of the older code")
    p.add_argument("--after", default="HEAD", help="git revision of the newer code (default: HEAD)")
    p.add_argument("--only", default="", help="comma-separated papers, as make bench's --only")
    p.add_argument("--kind", default="", choices=["", "train", "infer"], help="only training or inference rows")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    return p


def export(revision, folder):
    """The files of `revision` (committed state only) in a new folder `folder`."""
    folder.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def cases_of(folder, papers, device, kind):
    """The bench cases that the code in `folder` builds (its modules imported afresh)."""
    for name in [m for m in sys.modules if m.split(".")[0] in PROJECT_MODULES]:
        del sys.modules[name]
    sys.path.insert(0, str(folder))
    try:
        bench = importlib.import_module("benchmarks.bench")
        cases = [c for p in papers for c in bench.CASES[p](device, False) if not kind or c.kind == kind]
    finally:
        sys.path.remove(str(folder))
    return cases


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    papers = [p for p in args.only.split(",") if p] or list(importlib.import_module("benchmarks.bench").PAPERS)
    with tempfile.TemporaryDirectory() as tmp:
        before, after = export(args.before, Path(tmp, "before")), export(args.after, Path(tmp, "after"))
        old, new = cases_of(before, papers, device, args.kind), cases_of(after, papers, device, args.kind)
        bench = sys.modules["benchmarks.bench"]
        print(f"{args.before} -> {args.after}, {torch.get_num_threads()} threads, medians of {args.reps}; CPU s "
              "(wall s)")
        for a, b in zip(old, new):
            fns = {(rev, amp): (lambda case=case, amp=amp: case.run(amp))
                   for rev, case in (("before", a), ("after", b)) for amp in (False, True)}
            times = bench.interleaved(fns, device, args.reps, args.warmup)
            cpu = {k: statistics.median(c) for k, (_, c) in times.items()}
            wall = {k: statistics.median(w) for k, (w, _) in times.items()}
            for amp in (False, True):
                precision = str(bench.training.amp_dtype(device)).replace("torch.", "") if amp else "float32"
                print(f"{b.paper:12s} {b.kind:5s} {precision:8s} before {cpu['before', amp]:7.3f} "
                      f"({wall['before', amp]:.3f})  after {cpu['after', amp]:7.3f} ({wall['after', amp]:.3f})  "
                      f"after / before {cpu['after', amp] / cpu['before', amp]:.2f}x  {b.config}", flush=True)
            print(f"{b.paper:12s} {b.kind:5s} amp / fp32: before {cpu['before', True] / cpu['before', False]:.2f}x, "
                  f"after {cpu['after', True] / cpu['after', False]:.2f}x", flush=True)
    print(f"finished {time.strftime('%H:%M:%S')}")


if __name__ == "__main__":
    main()
