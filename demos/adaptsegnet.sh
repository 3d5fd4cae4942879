#!/usr/bin/env bash
# AdaptSegNet, the paper's GTA5 -> Cityscapes table in miniature, on the synthetic data (make demo-adaptsegnet).
#
# Per seed: a source-only model (the baseline row; --lambda_adv_target1 0 --lambda_adv_target2 0), then AdaptSegNet
# adaptation started from it, as the paper adapts a pre-trained segmenter. Seeds run side by side, one thread each.
# Everything is the paper's code path; only flags differ from the paper's configuration:
#   small DeepLab-v2 (1 block per layer, width 16, output stride 8) trained from scratch, so lr 2.5e-3 (paper 2.5e-4
#   for a COCO-pretrained ResNet-101); discriminators of width 16 (paper 64); 128x72 source / 128x64 target inputs;
#   WARMUP + ADAPT iterations (paper 150k); adversarial weights 0.002 (aux) / 0.01 (main), 10x the paper's 0.0002 /
#   0.001, which barely move the model in so few iterations. The reported number is each run's last snapshot.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/synthetic}
OUT=${OUT:-outputs/demo/adaptsegnet}
SEEDS=${SEEDS:-"0 1 2"}
WARMUP=${WARMUP:-300}
ADAPT=${ADAPT:-150}
export OMP_NUM_THREADS=1

SMALL=(--data_root "$DATA" --device cpu --layers 1 1 1 1 --width 16 --ndf 16 --input_size 128,72
       --input_size_target 128,64 --num_workers 0 --print_freq 50 --learning_rate 0.0025)

run_seed() {
    local seed=$1
    "$PY" adaptsegnet.py "${SMALL[@]}" --seed "$seed" --lambda_adv_target1 0 --lambda_adv_target2 0 \
        --num_steps "$WARMUP" --num_steps_stop "$WARMUP" --save_pred_every "$WARMUP" \
        --output_dir "$OUT/source_only_s$seed" > "$OUT/source_only_s$seed.log" 2>&1
    "$PY" adaptsegnet.py "${SMALL[@]}" --seed "$seed" --restore_from "$OUT/source_only_s$seed/checkpoint.pth" \
        --lambda_adv_target1 0.002 --lambda_adv_target2 0.01 \
        --num_steps "$ADAPT" --num_steps_stop "$ADAPT" --save_pred_every "$ADAPT" --viz \
        --output_dir "$OUT/adaptsegnet_s$seed" > "$OUT/adaptsegnet_s$seed.log" 2>&1
}

start=$SECONDS
mkdir -p "$OUT"
rm -rf "$OUT"/source_only_s* "$OUT"/adaptsegnet_s*
run_seeds adaptsegnet run_seed
ROWS=()
add_row source-only source_only_s@
add_row AdaptSegNet adaptsegnet_s@
"$PY" -m common.demo write "$OUT" --paper adaptsegnet --metric mIoU --seconds $((SECONDS - start)) "${ROWS[@]}"
