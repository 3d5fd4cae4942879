#!/usr/bin/env bash
# PVT demo: pvt_tiny's four stages, spatial-reduction attention and depths (2-2-2-2) at half width (embed dims
# 32/64/160/256, heads as the paper) trained from scratch on the synthetic ImageNet folders (6 shape classes, 60
# training and 20 val images each, 64x64), then top-1 on the val split (chance 16.7%). The DeiT recipe of the paper
# (AdamW, warm-up + cosine, label smoothing, RandAugment rand-m9-mstd0.5-inc1, random erasing, stochastic depth 0.1)
# with shorter settings by flags: 64 px input, batch 32, 12 epochs, a larger base lr (the recipe's lr is tuned for 300
# epochs), MixUp / CutMix off (they slow down a 12-epoch run), repeated augmentation off (--no_repeated_aug: it shows
# each epoch a third of the 360 images, three times each, which costs a 12-epoch run much accuracy; measured in
# docs/pvt.md). Rows: the untrained model and the trained one.
# Env: PY, DATA, OUT (set by `make demo-pvt`), SEEDS (default "0 1").
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/synthetic}
OUT=${OUT:-outputs/demo/pvt}
SEEDS=${SEEDS:-"0 1"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
start=$(date +%s)
FLAGS=(--model pvt_tiny --embed_dims 32 64 160 256 --data_root "$DATA/imagenet" --input_size 64
       --batch_size 32 --lr 0.016 --warmup_epochs 1 --epochs 12 --mixup 0 --cutmix 0 --no_repeated_aug
       --device cpu --num_workers 0 --print_freq 5)

run_seed() {  # the untrained model, then training; the first seed also draws the feature pyramid of a val image
  local seed=$1 viz=()
  [ "$seed" = "${SEEDS%% *}" ] && viz=(--viz)
  stage "$seed" untrained "$OUT/untrained_s$seed.log" \
    $PY pvt.py "${FLAGS[@]}" --seed "$seed" --eval --output_dir "$OUT/untrained_s$seed"
  stage "$seed" train "$OUT/pvt_tiny_s$seed.log" \
    $PY pvt.py "${FLAGS[@]}" "${viz[@]}" --seed "$seed" --output_dir "$OUT/pvt_tiny_s$seed"
}
rm -rf "$OUT"/untrained_s* "$OUT"/pvt_tiny_s*
run_seeds pvt run_seed
cp "$(ls "$OUT/pvt_tiny_s${SEEDS%% *}"/viz/*_pyramid.png | head -1)" "$OUT/pvt.png"  # the demo's figure
ROWS=()
add_row untrained untrained_s@
add_row PVT-Tiny pvt_tiny_s@
$PY -m common.demo write "$OUT" --paper pvt --metric top1 --seconds $(( $(date +%s) - start )) "${ROWS[@]}"
