#!/usr/bin/env bash
# The initial model of the domain-adaptation demos (make demo-init; adaptsegnet.sh and advent.sh start every row from
# it). It stands in for the papers' ImageNet / COCO-pretrained DeepLab: the papers adapt a network that is already
# good on the source, and so do the demos. It is the demos' small DeepLab-v2 (1 block per layer, width 16, output
# stride 8, the four-branch ASPP, multi-level) trained on the synthetic GTA5 only (source labels; no target image is
# seen), ITERS iterations of batch 4 from the N(0, 0.01) init, SGD lr 2.5e-3 (heads 10x), momentum 0.9, poly 0.9, at
# the demos' 128x72 source input: ADVENT's code path with --method source_only. Written once into INIT
# (outputs/demo/init): checkpoint.pth, init.log, eval.json (its target mIoU) and data.sha256, the fingerprint of the
# GTA5 files it was trained on; the demos refuse an initial model made from other data.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/uda_lib.sh"
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/synthetic}
OUT=${OUT:-$INIT}
ITERS=${ITERS:-1200}
export OMP_NUM_THREADS=${THREADS:-2}  # one run: both cores of an idle machine (THREADS=1 on a busy one)

mkdir -p "$OUT"
rm -f "$OUT/checkpoint.pth" "$OUT/data.sha256"
start=$SECONDS
DEMO_NAME=demo-init progress_start
stage init "source training" "$OUT/init.log" "$PY" advent.py --data_root "$DATA" --device cpu --method source_only \
  --layers 1 1 1 1 --width 16 --input_size 128,72 --input_size_target 128,64 --num_workers 0 --batch_size 4 \
  --learning_rate 0.0025 --max_iters "$ITERS" --early_stop "$ITERS" --save_pred_every "$ITERS" --print_freq 50 \
  --seed 0 --output_dir "$OUT" \
  || stage_failed "$OUT/init.log" "demo-init: training the initial model failed; see $OUT/init.log"
progress_stop
rm -rf "$OUT/snapshots"
data_fingerprint "$DATA/gta5" > "$OUT/data.sha256"
miou=$("$PY" -c "import json, sys; print(round(json.load(open(sys.argv[1]))['mIoU'], 1))" "$OUT/eval.json")
echo "initial model: $OUT/checkpoint.pth (target val mIoU $miou), $((SECONDS - start)) s"
