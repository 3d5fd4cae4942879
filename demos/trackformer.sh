#!/usr/bin/env bash
# TrackFormer demo: a small TrackFormer (detr.py's light conv stem instead of ResNet-50, hidden 96, 2+3 transformer
# layers, 30 object queries, the paper's 4 feature levels per frame, multi-frame attention, track queries with the
# official FN/FP augmentation) trained from scratch on frame pairs of the first half of the synthetic MOT17
# sequences, then online tracking (official tracker thresholds) of the held-out second half, scored with
# CLEAR-MOT / IDF1 at IoU 0.5. Rows: MOTA of the same model untrained (no detections: the trivial tracker), and
# trained; IDF1 and the other counts are in each run's eval.json. Same code path as the paper's config; only flags
# differ. Env: PY, DATA, OUT (set by `make demo-trackformer`), SEEDS (default "0 1").
set -euo pipefail
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/synthetic}
OUT=${OUT:-outputs/demo/trackformer}
SEEDS=${SEEDS:-"0 1"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$OUT"
start=$(date +%s)
FLAGS=(--data_root "$DATA/mot17" --backbone convstem --hidden_dim 96 --dim_feedforward 256 --enc_layers 2
       --dec_layers 3 --num_queries 30 --dropout 0.0 --img_max_size 133 --val_width 64
       --lr 5e-4 --lr_backbone 5e-4 --batch_size 2 --epochs 6 --lr_drop 5
       --device cpu --num_workers 0 --print_freq 50)
untrained=(); trained=()
for seed in $SEEDS; do
  viz=(); [ "$seed" = "$(echo $SEEDS | cut -d' ' -f1)" ] && viz=(--viz)
  $PY trackformer.py "${FLAGS[@]}" --seed "$seed" --eval --output_dir "$OUT/untrained_s$seed"
  $PY trackformer.py "${FLAGS[@]}" --seed "$seed" --output_dir "$OUT/trackformer_s$seed" "${viz[@]}"
  untrained+=("$OUT/untrained_s$seed/eval.json"); trained+=("$OUT/trackformer_s$seed/eval.json")
done
$PY -m common.demo write "$OUT" --paper trackformer --metric MOTA --seconds $(( $(date +%s) - start )) \
  --row untrained "${untrained[@]}" --row TrackFormer "${trained[@]}"
for f in "${trained[@]}"; do
  $PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1], {k: round(r[k], 1) for k in ('MOTA','IDF1','MT','ML','FP','FN','IDSW')})" "$f"
done
