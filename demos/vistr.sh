#!/usr/bin/env bash
# VisTR demo: a small VisTR (detr.py's light conv stem instead of a ResNet, 2+2 pre-norm transformer layers at the
# official hidden size 384, 4-frame clips with 3 instance slots per frame, 64-pixel frames) trained from scratch on
# the synthetic YouTube-VIS videos; then whole-video inference on the held-out videos and the local video mask AP
# (spatio-temporal IoU, COCO AP@[.5:.95], percent). Rows: the same model untrained, and trained. Same code path as
# the official configuration; only flags differ. Env: PY, DATA, OUT (set by `make demo-vistr`), SEEDS (default "0").
set -euo pipefail
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/synthetic}
OUT=${OUT:-outputs/demo/vistr}
SEEDS=${SEEDS:-"0"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$OUT"
start=$(date +%s)
FLAGS=(--data_root "$DATA/youtube_vis" --holdout_ann valid_holdout.json
       --backbone convstem --enc_layers 2 --dec_layers 2 --dim_feedforward 512 --dropout 0.0 --pre_norm
       --num_frames 4 --num_queries 12 --input_size 64 --val_size 64
       --lr 2e-4 --lr_backbone 2e-4 --epochs 2 --lr_drop 10 --max_iters 150
       --device cpu --num_workers 0 --print_freq 50)
untrained=(); trained=()
for seed in $SEEDS; do
  $PY vistr.py "${FLAGS[@]}" --seed "$seed" --eval --output_dir "$OUT/untrained_s$seed"
  $PY vistr.py "${FLAGS[@]}" --seed "$seed" --output_dir "$OUT/vistr_s$seed"
  untrained+=("$OUT/untrained_s$seed/eval.json"); trained+=("$OUT/vistr_s$seed/eval.json")
done
$PY -m common.demo write "$OUT" --paper vistr --metric AP --seconds $(( $(date +%s) - start )) \
  --row untrained "${untrained[@]}" --row VisTR "${trained[@]}"
