#!/usr/bin/env bash
# VisTR demo, the paper's recipe in miniature (Sec. 4.1: VisTR starts from a COCO-trained DETR segmentation model):
#   (a) detr.py trains a DETR of VisTR's shape for boxes on the synthetic COCO images (the same shapes as the
#       videos, over other backgrounds);
#   (b) detr.py trains its mask head on the frozen box model (--masks --frozen_weights, DETR's segmentation recipe);
#   (c) vistr.py starts from that segmentation model (--pretrained_weights: backbone, transformer, box head,
#       bbox_attention and mask head; class and query embeddings start fresh, as the official conversion) and trains
#       on clips of the synthetic YouTube-VIS videos; whole-video inference on the held-out videos.
# Rows (held-out video mask AP: spatio-temporal IoU, COCO AP@[.5:.95], percent): `untrained` (VisTR with random
# weights), `DETR segmentation per frame` (the model of (b) on every frame alone, its detections linked from frame to
# frame by mask IoU, Hungarian: the image baseline), `VisTR`. The log also gives each model's mean mask IoU between
# the instances of a frame (near 1 when every slot predicts the same mask).
# Stages (a) and (b) are kept in OUT/stages and reused while their settings and the data do not change.
#
# Same code path as the official configuration; these flags differ, and why:
#   --backbone convstem (+ coordinate channels)   a small conv net trained from scratch instead of an ImageNet
#                                  ResNet-101 (no downloads, 2 CPU cores)
#   --enc_layers 2 --dec_layers 2 --dim_feedforward 512 --pre_norm --dropout 0
#                                  a smaller transformer at the official hidden size 384 (paper: 6 + 6, 2048,
#                                  post-norm, dropout 0.1); pre-norm trains faster from scratch, no dropout in a
#                                  short run
#   DETR (a): --num_queries 10 --lr 2.5e-4 --lr_backbone 2.5e-4 --warmup_iters 100 --batch_size 8, BOX_EPOCHS
#                                  a from-scratch, minutes-long schedule (paper: pretrained backbone at 1e-5,
#                                  lr 1e-4, 500 epochs); at hidden 384, lr 5e-4 reached half the box AP of 2.5e-4
#   DETR (b): --lr SEGM_LR --clip_max_norm 0, SEGM_EPOCHS
#                                  the mask head's instance-specific path (bbox_attention -> mask head) needs
#                                  several hundred steps before the masks differ between instances; with the
#                                  official clipping (0.1) and lr 1e-4 it does not start within CPU reach
#   --scales 64 --max_size 107 --crop_scales 64 --crop_size 48 64; --input_size 64 --val_size 64
#                                  the official augmentation scaled to two thirds of this data's size (images of
#                                  112-160 x 96-128 px, frames of 128 x 96 px), for the CPU budget
#   VisTR (c): --num_frames 4 --num_queries 12  4-frame clips, 3 slots per frame (paper: 36 frames, 10 slots)
#   --no_photometric               the synthetic shapes' class shows in their colour as well as their outline, and the
#                                  official per-frame channel swap paints one class in another's colours
#   VisTR (c): VISTR_LR, CLIPS, --clip_max_norm VISTR_CLIP   see docs/vistr.md for the measurements behind them
# Env: PY, DATA, OUT (set by `make demo-vistr`), SEEDS (default "0 1"), BOX_EPOCHS, SEGM_EPOCHS (25 steps each),
# CLIPS (VisTR training clips).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/synthetic}
OUT=${OUT:-outputs/demo/vistr}
SEEDS=${SEEDS:-"0 1"}
BOX_EPOCHS=${BOX_EPOCHS:-40}
SEGM_EPOCHS=${SEGM_EPOCHS:-16}
SEGM_LR=${SEGM_LR:-1e-3}
CLIPS=${CLIPS:-400}
FRAMES=${FRAMES:-4}
VISTR_LR=${VISTR_LR:-2e-4}
VISTR_CLIP=${VISTR_CLIP:-0}
export OMP_NUM_THREADS=1
mkdir -p "$OUT/stages"
start=$(date +%s)
SHARED=(--backbone convstem --hidden_dim 384 --nheads 8 --enc_layers 2 --dec_layers 2 --dim_feedforward 512
        --dropout 0.0 --pre_norm --device cpu --num_workers 0)
DETR=(--coco_path "$DATA/coco" --num_queries 10 --batch_size 8 --scales 64 --max_size 107 --crop_scales 64
      --crop_size 48 64 --print_freq 25)
BOX=(--lr 2.5e-4 --lr_backbone 2.5e-4 --warmup_iters 100 --epochs "$BOX_EPOCHS" --lr_drop "$BOX_EPOCHS"
     --eval_every "$BOX_EPOCHS")
SEGM=(--masks --lr "$SEGM_LR" --clip_max_norm 0 --epochs "$SEGM_EPOCHS" --lr_drop "$SEGM_EPOCHS"
      --eval_every "$SEGM_EPOCHS")
VISTR=(--data_root "$DATA/youtube_vis" --holdout_ann valid_holdout.json --num_frames "$FRAMES"
       --num_queries $((FRAMES * 3)) --input_size 64 --val_size 64 --no_photometric --print_freq 25)
TRAIN=(--lr "$VISTR_LR" --lr_backbone "$VISTR_LR" --clip_max_norm "$VISTR_CLIP" --epochs 1 --lr_drop 2
       --max_iters "$CLIPS")

# cached DIR SETTINGS...: true if DIR holds a checkpoint made with these settings from this data
cached() {
  local dir=$1
  shift
  [ -f "$dir/checkpoint.pth" ] && [ -f "$dir/settings" ] \
    && [ "$(cat "$dir/settings")" = "$* $(cat "$DATA/coco/.synthetic" 2>/dev/null)" ]
}

# train_stage SEED NAME DIR CMD...: run CMD (a detr.py training into DIR) unless DIR is cached with these settings
train_stage() {
  local seed=$1 name=$2 dir=$3
  shift 3
  if cached "$dir" "$@"; then
    echo "seed $seed: $name cached in $dir"
    return
  fi
  rm -rf "$dir"
  stage "$seed" "$name" "$dir.log" "$@" --output_dir "$dir"
  echo "$* $(cat "$DATA/coco/.synthetic" 2>/dev/null)" > "$dir/settings"
}

run_seed() {
  local seed=$1 box=$OUT/stages/detr_box_s$1 segm=$OUT/stages/detr_segm_s$1 viz=()
  [ "$seed" = "${SEEDS%% *}" ] && viz=(--viz)
  train_stage "$seed" "DETR boxes" "$box" $PY detr.py "${SHARED[@]}" "${DETR[@]}" "${BOX[@]}" --seed "$seed"
  train_stage "$seed" "DETR masks" "$segm" $PY detr.py "${SHARED[@]}" "${DETR[@]}" "${SEGM[@]}" --seed "$seed" \
    --frozen_weights "$box/checkpoint.pth"
  stage "$seed" untrained "$OUT/untrained_s$seed.log" \
    $PY vistr.py "${SHARED[@]}" "${VISTR[@]}" --seed "$seed" --eval --output_dir "$OUT/untrained_s$seed"
  stage "$seed" "per-frame baseline" "$OUT/per_frame_s$seed.log" \
    $PY vistr.py "${SHARED[@]}" "${VISTR[@]}" "${viz[@]}" --seed "$seed" --eval --image_model "$segm/checkpoint.pth" \
    --output_dir "$OUT/per_frame_s$seed"
  stage "$seed" VisTR "$OUT/vistr_s$seed.log" \
    $PY vistr.py "${SHARED[@]}" "${VISTR[@]}" "${TRAIN[@]}" "${viz[@]}" --seed "$seed" --output_dir "$OUT/vistr_s$seed" \
    --pretrained_weights "$segm/checkpoint.pth"
}

# the figure: the first seed's held-out videos, per-frame baseline above VisTR (top 3 tracks, one colour each)
figure() {
  $PY - "$OUT" "${SEEDS%% *}" <<'EOF'
import sys
from pathlib import Path
from PIL import Image, ImageDraw
out, seed = Path(sys.argv[1]), sys.argv[2]
rows = []
for video in sorted((out / f"vistr_s{seed}" / "viz").glob("*.png"), key=lambda p: int(p.stem))[:3]:
    for run, label in ((f"per_frame_s{seed}", "DETR segmentation per frame"), (f"vistr_s{seed}", "VisTR")):
        strip = Image.open(out / run / "viz" / video.name).convert("RGB")
        row = Image.new("RGB", (strip.width, strip.height + 14), "white")
        row.paste(strip, (0, 14))
        ImageDraw.Draw(row).text((2, 1), f"video {video.stem}: {label}", fill="black")
        rows.append(row)
fig = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 4 for r in rows)), "white")
y = 0
for r in rows:
    fig.paste(r, (0, y))
    y += r.height + 4
fig.save(out / "vistr.png")
EOF
}

run_seeds vistr run_seed
figure
ROWS=()
add_row untrained untrained_s@
add_row "DETR segmentation per frame" per_frame_s@
add_row VisTR vistr_s@
$PY -m common.demo write "$OUT" --paper vistr --metric AP --seconds $(( $(date +%s) - start )) "${ROWS[@]}"
$PY - "$OUT" $SEEDS <<'EOF'
import json, sys
from pathlib import Path
out, seeds = Path(sys.argv[1]), sys.argv[2:]
for run, label in (("untrained", "untrained"), ("per_frame", "DETR segmentation per frame"), ("vistr", "VisTR")):
    for seed in seeds:
        s = json.loads((out / f"{run}_s{seed}" / "eval.json").read_text())
        iou = "-" if s.get("frame_mask_iou") is None else f"{s['frame_mask_iou']:.2f}"
        print(f"{label}, seed {seed}: video mask AP {s['AP']:.1f}, AP50 {s['AP50']:.1f}, "
              f"mean mask IoU between the instances of a frame {iou}")
EOF
