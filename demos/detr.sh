#!/usr/bin/env bash
# DETR demo: train a small DETR from scratch on the synthetic COCO data (common/synthetic.py: 200 train / 50 val
# images of 112-160 x 96-128 px, 2-6 shapes of 6 classes with COCO's sparse ids), then COCO box AP on val2017 with
# pycocotools. Same code path as the paper's configuration (detr.py with its defaults); the flags below change only
# sizes and the schedule: the light `convstem` backbone (trainable, from scratch, with coordinate channels) instead
# of an ImageNet ResNet-50, hidden 128 with 3 + 3 pre-norm layers and 10 queries, image sizes for 128 px images, lr
# 5e-4 with a linear warm-up (the paper's 1e-4 barely moves in a few minutes), no dropout. Two seeds run in
# parallel, one thread (one core) each, to stay within 5 minutes on 2 cores (a third seed would not fit).
# Env: PY, DATA, OUT (set by `make demo-detr`), SEEDS (default "0 1"), EPOCHS (default 64 = 1600 steps).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/synthetic}
OUT=${OUT:-outputs/demo/detr}
SEEDS=${SEEDS:-"0 1"}
EPOCHS=${EPOCHS:-64}
mkdir -p "$OUT"
start=$(date +%s)
FLAGS=(--coco_path "$DATA/coco" --device cpu --num_workers 0
       --backbone convstem --hidden_dim 128 --dim_feedforward 256 --nheads 4 --enc_layers 3 --dec_layers 3
       --pre_norm --num_queries 10 --dropout 0.0
       --lr 5e-4 --lr_backbone 5e-4 --warmup_iters 100 --batch_size 8 --epochs "$EPOCHS" --lr_drop $(((EPOCHS * 7 + 7) / 8))
       --scales 96 --max_size 160 --crop_scales 96 --crop_size 72 96
       --eval_every "$EPOCHS" --print_freq 100)

run_seed() {  # the first seed also draws boxes and attention maps for the first validation image
  local viz=()
  [ "$1" = "${SEEDS%% *}" ] && viz=(--viz)
  OMP_NUM_THREADS=1 $PY detr.py "${FLAGS[@]}" "${viz[@]}" --seed "$1" --output_dir "$OUT/seed$1"
}
run_seeds detr run_seed
ROWS=()
add_row "DETR (convstem, hidden 128, 3+3 pre-norm layers)" seed@
$PY -m common.demo write "$OUT" --paper detr --metric AP --seconds $(( $(date +%s) - start )) "${ROWS[@]}"
