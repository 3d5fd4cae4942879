#!/usr/bin/env bash
# VisTR demo, the paper's recipe at toy scale: (1) detr.py trains a DETR on the synthetic COCO images (the same
# shapes as the synthetic videos), (2) vistr.py starts from it (--pretrained_weights: backbone, transformer and box
# head; class and query embeddings start fresh, as in the official conversion) and trains on clips of the synthetic
# YouTube-VIS videos, then (3) whole-video inference on the held-out videos and the local video mask AP
# (spatio-temporal IoU, COCO AP@[.5:.95], percent). Model: detr.py's light conv stem instead of a ResNet, 2 + 2
# pre-norm transformer layers at the official hidden size 384, 4-frame clips with 3 instance slots per frame,
# 64-pixel frames. Rows: VisTR untrained and VisTR trained from the DETR. Same code path as the official
# configuration; only flags differ. Seeds run in parallel, one thread (one core) each.
# VisTR trains with --no_photometric: the synthetic shapes' class shows in their colour as well as their outline,
# and the official per-frame channel swap paints a triangle in a hexagon's colours (training class error after
# 200-1000 clips 45-57% without it, 70-80% with it).
# The DETR stage uses lr 2.5e-4: at hidden 384, 5e-4 reached box AP 2.5 instead of 6.9 (seed 0, 500 steps).
# Env: PY, DATA, OUT (set by `make demo-vistr`), SEEDS (default "0 1"), DETR_EPOCHS (default 20 = 500 steps),
# VISTR_EPOCHS (default 1) x CLIPS (VisTR training clips per epoch, at most one per training frame: default 250),
# FRAMES (frames per clip, default 4), BATCH (clips per step, default 1), LR_MASK_HEAD (lr of the segmentation
# heads, default 0 = the common lr 2e-4). The longer run in the README: FRAMES=2 BATCH=4 LR_MASK_HEAD=2e-3
# VISTR_EPOCHS=4 CLIPS=500.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/synthetic}
OUT=${OUT:-outputs/demo/vistr}
SEEDS=${SEEDS:-"0 1"}
DETR_EPOCHS=${DETR_EPOCHS:-20}
VISTR_EPOCHS=${VISTR_EPOCHS:-1}
CLIPS=${CLIPS:-250}
FRAMES=${FRAMES:-4}
BATCH=${BATCH:-1}
LR_MASK_HEAD=${LR_MASK_HEAD:-0}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
start=$(date +%s)
SHARED=(--backbone convstem --hidden_dim 384 --nheads 8 --enc_layers 2 --dec_layers 2 --dim_feedforward 512
        --dropout 0.0 --pre_norm --device cpu --num_workers 0)
DETR=(--coco_path "$DATA/coco" --num_queries 10 --lr 2.5e-4 --lr_backbone 2.5e-4 --warmup_iters 100 --batch_size 8
      --epochs "$DETR_EPOCHS" --lr_drop "$DETR_EPOCHS" --scales 96 --max_size 160 --crop_scales 96
      --crop_size 72 96 --eval_every "$DETR_EPOCHS" --print_freq 100)
VISTR=(--data_root "$DATA/youtube_vis" --holdout_ann valid_holdout.json --num_frames "$FRAMES"
       --num_queries $((FRAMES * 3)) --input_size 64 --val_size 64 --no_photometric --batch_size "$BATCH"
       --lr 2e-4 --lr_backbone 2e-4 --lr_mask_head "$LR_MASK_HEAD" --epochs "$VISTR_EPOCHS"
       --lr_drop $((VISTR_EPOCHS + 1)) --max_iters "$CLIPS" --print_freq 50)

run_seed() {  # untrained, then the DETR, then VisTR from it
  local seed=$1
  $PY vistr.py "${SHARED[@]}" "${VISTR[@]}" --seed "$seed" --eval --output_dir "$OUT/untrained_s$seed"
  $PY detr.py "${SHARED[@]}" "${DETR[@]}" --seed "$seed" --output_dir "$OUT/detr_s$seed"
  $PY vistr.py "${SHARED[@]}" "${VISTR[@]}" --seed "$seed" --output_dir "$OUT/vistr_s$seed" \
    --pretrained_weights "$OUT/detr_s$seed/checkpoint.pth"
}

run_seeds vistr run_seed
ROWS=()
add_row untrained untrained_s@
add_row "VisTR (from the DETR)" vistr_s@
$PY -m common.demo write "$OUT" --paper vistr --metric AP --seconds $(( $(date +%s) - start )) "${ROWS[@]}"
