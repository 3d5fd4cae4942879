#!/usr/bin/env bash
# ADVENT, the paper's GTA5 -> Cityscapes table in miniature, on the synthetic data (make demo-advent).
#
# Per seed: a source-only model (the baseline row, --method source_only), then MinEnt and AdvEnt each started from
# it, as the paper adapts a pre-trained segmenter, and "AdvEnt+MinEnt", which is (as in the official config) the
# test-time average of the two models' main logits: `--eval --ensemble`. One more row is a control: MinEnt with
# both weights 0 runs the same loop (target images through the network in train mode, so BatchNorm's running
# statistics take in the target domain) with no adaptation loss at all. Seeds run side by side, one thread each.
# Everything is the paper's code path; only flags differ from the paper's configuration:
#   small DeepLab-v2 (1 block per layer, width 16, output stride 8) trained from scratch, so lr 2.5e-3 (paper 2.5e-4
#   for an ImageNet-pretrained ResNet-101); discriminators of width 16 (paper 64); 128x72 source / 128x64 target
#   inputs; WARMUP + ADAPT iterations (paper 120k); weights 0.002 (aux) / 0.01 (main) for both the entropy and the
#   adversarial term, 10x the paper's 0.0002 / 0.001, which barely move the model in so few iterations. The reported
#   number is each run's last snapshot.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/synthetic}
OUT=${OUT:-outputs/demo/advent}
SEEDS=${SEEDS:-"0 1 2"}
WARMUP=${WARMUP:-300}
ADAPT=${ADAPT:-120}
export OMP_NUM_THREADS=1

SMALL=(--data_root "$DATA" --device cpu --layers 1 1 1 1 --width 16 --ndf 16 --input_size 128,72
       --input_size_target 128,64 --num_workers 0 --print_freq 50 --learning_rate 0.0025)
WEIGHTS=(--lambda_ent_main 0.01 --lambda_ent_aux 0.002 --lambda_adv_main 0.01 --lambda_adv_aux 0.002)

run_seed() {
    local seed=$1
    "$PY" advent.py "${SMALL[@]}" --seed "$seed" --method source_only \
        --max_iters "$WARMUP" --early_stop "$WARMUP" --save_pred_every "$WARMUP" \
        --output_dir "$OUT/source_only_s$seed" > "$OUT/source_only_s$seed.log" 2>&1
    for method in minent advent; do
        "$PY" advent.py "${SMALL[@]}" "${WEIGHTS[@]}" --seed "$seed" --method "$method" \
            --restore_from "$OUT/source_only_s$seed/checkpoint.pth" \
            --max_iters "$ADAPT" --early_stop "$ADAPT" --save_pred_every "$ADAPT" \
            --output_dir "$OUT/${method}_s$seed" > "$OUT/${method}_s$seed.log" 2>&1
    done
    "$PY" advent.py "${SMALL[@]}" --seed "$seed" --method minent --lambda_ent_main 0 --lambda_ent_aux 0 \
        --restore_from "$OUT/source_only_s$seed/checkpoint.pth" \
        --max_iters "$ADAPT" --early_stop "$ADAPT" --save_pred_every "$ADAPT" \
        --output_dir "$OUT/target_bn_s$seed" > "$OUT/target_bn_s$seed.log" 2>&1
    "$PY" advent.py "${SMALL[@]}" --seed "$seed" --eval --viz \
        --ensemble "$OUT/advent_s$seed/checkpoint.pth" "$OUT/minent_s$seed/checkpoint.pth" \
        --output_dir "$OUT/ensemble_s$seed" > "$OUT/ensemble_s$seed.log" 2>&1
}

start=$SECONDS
mkdir -p "$OUT"
rm -rf "$OUT"/source_only_s* "$OUT"/target_bn_s* "$OUT"/minent_s* "$OUT"/advent_s* "$OUT"/ensemble_s*
run_seeds advent run_seed
ROWS=()
add_row source-only source_only_s@
add_row "target BN statistics only" target_bn_s@
add_row MinEnt minent_s@
add_row AdvEnt advent_s@
add_row AdvEnt+MinEnt ensemble_s@
"$PY" -m common.demo write "$OUT" --paper advent --metric mIoU --seconds $((SECONDS - start)) "${ROWS[@]}"
