#!/usr/bin/env bash
# DETR demo: the paper's panoptic recipe (Sec. 4.4) in miniature on the synthetic COCO data (common/synthetic.py:
# 200 train / 50 val images of 112-160 x 96-128 px, 2-6 shapes of 6 thing classes with COCO's sparse ids over 2-3
# stuff regions of COCO panoptic stuff classes). The box model trains on a larger training split of the same kind
# that the demo writes first (TRAIN_IMAGES, default 1600: the data set's 200 images and 1400 more from the same
# generator, in OUT/data/coco with DATA's val split linked in). Per seed, three runs of detr.py:
#   1. box: DETR trained from scratch on the panoptic set, boxes of things and stuff (--dataset_file coco_panoptic);
#      box AP on val2017 against instances_val2017.json (things), as the official code evaluates it;
#   2. the control: the untrained mask head on that box model (--masks --frozen_weights --eval): mask AP and PQ;
#   3. masks: the mask head trained on the frozen box model (--masks --frozen_weights); mask AP ("segm") and
#      PQ / SQ / RQ on the val split; the first seed also draws its detections, attention maps and masks.
# Rows: box AP, mask AP and PQ of the trained mask head, and mask AP / PQ of the untrained one on the same frozen
# box model (same initial weights and data: the control that isolates the mask training). demo.json's metric is
# box AP; the rows whose name has `segm` hold mask AP, those with `PQ` hold PQ.
#
# Same code path as the paper's configuration (detr.py's defaults); these flags differ, and why:
#   --backbone convstem            a 4-conv stem trained from scratch instead of an ImageNet ResNet-50 (no
#                                  pretrained weights, 2 CPU cores), with trainable BatchNorm instead of frozen, two
#                                  coordinate input channels (DETR's box head reads position from the features; a
#                                  stem this shallow cannot learn it from zero padding) and strides 4/8/16/16 (masks
#                                  at stride 4 as the paper's, tokens at stride 16); the 7-conv convstem7 scores
#                                  higher per step, but its steps cost 1.35x: in this demo's CPU time it reached
#                                  box AP 8.8 / 9.0 (seeds 0 / 1)
#   --hidden_dim 128 --dim_feedforward 256 --enc_layers 3 --dec_layers 3 --num_queries 16
#                                  a smaller transformer (paper: 256, 2048, 6, 6, 100) for the CPU budget; 16
#                                  queries cover the at most 10 things and stuff segments of an image
#   --pre_norm --dropout 0         pre-norm trains the small model faster from scratch; no dropout in a short run
#   --lr 5e-4 --lr_backbone 5e-4 --warmup_iters 100
#                                  the paper's 1e-4 (backbone 1e-5, pretrained) barely moves a from-scratch model
#                                  in a few minutes; the warm-up keeps the larger lr stable
#   --batch_size 8 --epochs, --lr_drop (7/8 of the epochs)   a minutes-long schedule (paper: 64 images, 500 epochs):
#                                  1600 box steps (8 epochs of 1600 images), 200 mask steps (8 epochs of 200)
#   1600 box training images       on DATA's 200 the same 1600 steps scored 3-6 AP lower (each image seen 64 times
#                                  instead of 8; COCO has 118k); writing them costs about 10 ms of CPU time per
#                                  image, once for both seeds; the mask stage trains on DATA's 200 as before
#   --scales 96 --max_size 160 --crop_scales 96 --crop_size 72 96
#                                  the paper's augmentation at this data's scale (paper: 480-800 px, crops 384-600)
#   masks: --lr 1e-3 --clip_max_norm 0, MASK_EPOCHS (25 steps each), --lr_drop (7/8)
#                                  the masks differ between queries only once bbox_attention has learnt where each
#                                  query looks (its gradients start near 1e-7, hundreds of times below the rest of
#                                  the mask head's), which takes a few hundred steps; the official clipping (0.1)
#                                  scales them further, to Adam's epsilon; lr 3e-3 learnt less in 200 steps (paper:
#                                  lr 1e-4, 25 epochs, drop at 15)
#   masks: --amp                   bfloat16 autocast: the mask head's step takes about half the CPU time (scores no
#                                  lower than float32's)
# Measurements behind these choices: docs/detr.md.
# Env: PY, DATA, OUT (set by `make demo-detr`), SEEDS (default "0 1"), TRAIN_IMAGES (default 1600), EPOCHS (box,
# default 8), MASK_EPOCHS (default 8).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/synthetic}
OUT=${OUT:-outputs/demo/detr}
SEEDS=${SEEDS:-"0 1"}
TRAIN_IMAGES=${TRAIN_IMAGES:-1600}
EPOCHS=${EPOCHS:-8}
MASK_EPOCHS=${MASK_EPOCHS:-8}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
start=$(date +%s)

# the box model's training split: TRAIN_IMAGES synthetic COCO images (seed 0: the first 200 are DATA's), with
# DATA's val split and annotations linked in, so every model is scored on the same val images
BOX_DATA=$OUT/data/coco
val=$(cd "$DATA/coco" && pwd)
rm -rf "$OUT/data"
echo "demo-detr: writing $TRAIN_IMAGES training images to $BOX_DATA"
$PY -c 'import sys
from common.synthetic import write_coco
write_coco(sys.argv[1], int(sys.argv[2]), 0, None, 0)' "$BOX_DATA" "$TRAIN_IMAGES"
rm -rf "$BOX_DATA/val2017" "$BOX_DATA/panoptic_val2017" "$BOX_DATA"/annotations/*_val2017.json
for path in val2017 panoptic_val2017 annotations/instances_val2017.json annotations/panoptic_val2017.json; do
  ln -s "$val/$path" "$BOX_DATA/$path"
done

MODEL=(--dataset_file coco_panoptic --device cpu --num_workers 0
       --backbone convstem --hidden_dim 128 --dim_feedforward 256 --nheads 8 --enc_layers 3 --dec_layers 3
       --pre_norm --num_queries 16 --dropout 0.0
       --scales 96 --max_size 160 --crop_scales 96 --crop_size 72 96 --batch_size 8 --print_freq 25)
BOX=(--coco_path "$BOX_DATA" --lr 5e-4 --lr_backbone 5e-4 --warmup_iters 100
     --epochs "$EPOCHS" --lr_drop $(((EPOCHS * 7 + 7) / 8)) --eval_every "$EPOCHS")
MASKS=(--coco_path "$DATA/coco" --masks --amp --lr 1e-3 --clip_max_norm 0
       --epochs "$MASK_EPOCHS" --lr_drop $(((MASK_EPOCHS * 7 + 7) / 8)) --eval_every "$MASK_EPOCHS")

# metric SRC KEY DST: DST = {"AP": SRC's KEY} (dotted), for the rows whose number is mask AP or PQ
metric() {
  $PY -c 'import json, sys
value = json.load(open(sys.argv[1]))
for key in sys.argv[2].split("."):
    value = value[key]
json.dump({"AP": value}, open(sys.argv[3], "w"))' "$@"
}

run_seed() {
  local seed=$1 dir=$OUT/seed$1 viz=()
  [ "$seed" = "${SEEDS%% *}" ] && viz=(--viz)
  stage "$seed" box "$dir/box.log" \
    $PY detr.py "${MODEL[@]}" "${BOX[@]}" --seed "$seed" --output_dir "$dir/box"
  stage "$seed" "masks untrained" "$dir/masks_untrained.log" \
    $PY detr.py "${MODEL[@]}" "${MASKS[@]}" --frozen_weights "$dir/box/checkpoint.pth" --eval --seed "$seed" \
    --output_dir "$dir/masks_untrained"
  stage "$seed" masks "$dir/masks.log" \
    $PY detr.py "${MODEL[@]}" "${MASKS[@]}" "${viz[@]}" --frozen_weights "$dir/box/checkpoint.pth" --seed "$seed" \
    --output_dir "$dir/masks"
  for run in masks masks_untrained; do
    mkdir -p "$dir/$run/segm" "$dir/$run/pq"
    metric "$dir/$run/eval.json" segm.AP "$dir/$run/segm/eval.json"
    metric "$dir/$run/eval.json" panoptic.PQ "$dir/$run/pq/eval.json"
  done
}

# one figure (2x, nearest): the first seed's detections and masks on the first val image, and below them each
# detection's decoder attention
figure() {
  $PY -c 'import sys
from pathlib import Path
from PIL import Image
viz, out = Path(sys.argv[1]), sys.argv[2]
def load(kind):
    image = Image.open(next(viz.glob(f"*_{kind}.png"))).convert("RGB")
    return image.resize((image.width * 2, image.height * 2), Image.NEAREST)
top = [load(kind) for kind in ("boxes", "masks")]
attention = load("decoder_attention")
width = max(sum(im.width for im in top), attention.width)
canvas = Image.new("RGB", (width, top[0].height + attention.height), "white")
x = 0
for im in top:
    canvas.paste(im, (x, 0))
    x += im.width
canvas.paste(attention, (0, top[0].height))
canvas.save(out)' "$OUT/seed${SEEDS%% *}/masks/viz" "$OUT/detr.png"
}

run_seeds detr run_seed
figure
ROWS=()
add_row "DETR box AP (convstem, trained on things + stuff)" seed@/box
add_row "DETR mask head, segm AP (frozen box model)" seed@/masks/segm
add_row "untrained mask head, segm AP (same box model)" seed@/masks_untrained/segm
add_row "DETR panoptic, PQ" seed@/masks/pq
add_row "untrained mask head, PQ (same box model)" seed@/masks_untrained/pq
ROWS+=(--row_metric "DETR mask head, segm AP (frozen box model)" "mask AP"
       --row_metric "untrained mask head, segm AP (same box model)" "mask AP"
       --row_metric "DETR panoptic, PQ" PQ --row_metric "untrained mask head, PQ (same box model)" PQ)
$PY -m common.demo write "$OUT" --paper detr --metric AP --seconds $(( $(date +%s) - start )) "${ROWS[@]}"
