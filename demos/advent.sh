#!/usr/bin/env bash
# ADVENT, the paper's GTA5 -> Cityscapes table in miniature, on the synthetic data (make demo-advent).
#
# Protocol (the same for every row; only the method differs): each row starts from the same initial model
# (demos/uda_init.sh, made once by `make demo-init`: the small DeepLab-v2 trained on the synthetic GTA5), trains
# ITERS iterations on the same data in the same order (the same seed), and is scored on Cityscapes val with its
# last weights. Rows, per seed:
#   source-only                 --method source_only: the source loss only, no target image
#   target BN statistics only   --method minent with both entropy weights 0: the same loop with the target images
#                               through the network in train mode (BatchNorm's statistics take in the target), no
#                               adaptation loss: the control every method row is compared with
#   MinEnt, AdvEnt              the paper's two methods (Sec. 3.1, 3.2)
#   AdvEnt+MinEnt               the official config's ensemble: the test-time average of the two models' main logits
#   oracle                      --source cityscapes: the same loop on the Cityscapes train labels
# Seeds run side by side, one thread each. BatchNorm as in the official loop: train mode (batch statistics, the
# running statistics take in source and target batches) with frozen affine parameters (common.deeplab.DeepLabV2
# freezes them, as the official models do; the initial model's stay at weight 1, bias 0).
# Flags that differ from the paper's configuration, and why:
#   small DeepLab-v2 (1 block per layer, width 16, output stride 8) from the demo's initial model instead of an
#   ImageNet-pretrained ResNet-101: the budget; lr 2.5e-3 (paper 2.5e-4) for the small network; discriminators of
#   width 16 (paper 64); 128x72 source / 128x64 target inputs (paper 1280x720 / 1024x512); ITERS iterations (paper
#   120k) with the poly schedule over ITERS (paper 250k); entropy weights ENT_MAIN / ENT_AUX and adversarial weights
#   ADV_MAIN / ADV_AUX with discriminator lr LR_D, larger than the paper's 0.001 / 0.0002 and 1e-4, which do not
#   move the model in so few iterations (docs/advent.md has the measurements).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/uda_lib.sh"
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/synthetic}
OUT=${OUT:-outputs/demo/advent}
SEEDS=${SEEDS:-"0 1 2"}
ITERS=${ITERS:-300}
ENT_MAIN=${ENT_MAIN:-0.05}
ENT_AUX=${ENT_AUX:-0.01}
ADV_MAIN=${ADV_MAIN:-0.02}
ADV_AUX=${ADV_AUX:-0.004}
LR_D=${LR_D:-0.001}
export OMP_NUM_THREADS=1
require_init

RUN=(--data_root "$DATA" --device cpu --layers 1 1 1 1 --width 16 --ndf 16 --input_size 128,72
     --input_size_target 128,64 --num_workers 0 --print_freq 25 --learning_rate 0.0025 --learning_rate_D "$LR_D"
     --restore_from "$INIT/checkpoint.pth" --max_iters "$ITERS" --early_stop "$ITERS" --save_pred_every "$ITERS"
     --viz --num_viz 3)

run_seed() {
  local seed=$1 o="$OUT/s$1"
  stage "$seed" source-only "$o/source_only.log" "$PY" advent.py "${RUN[@]}" --seed "$seed" --method source_only \
    --output_dir "$o/source_only"
  stage "$seed" "target BN" "$o/target_bn.log" "$PY" advent.py "${RUN[@]}" --seed "$seed" --method minent \
    --lambda_ent_main 0 --lambda_ent_aux 0 --output_dir "$o/target_bn"
  stage "$seed" MinEnt "$o/minent.log" "$PY" advent.py "${RUN[@]}" --seed "$seed" --method minent \
    --lambda_ent_main "$ENT_MAIN" --lambda_ent_aux "$ENT_AUX" --output_dir "$o/minent"
  stage "$seed" AdvEnt "$o/advent.log" "$PY" advent.py "${RUN[@]}" --seed "$seed" --method advent \
    --lambda_adv_main "$ADV_MAIN" --lambda_adv_aux "$ADV_AUX" --output_dir "$o/advent"
  stage "$seed" AdvEnt+MinEnt "$o/ensemble.log" "$PY" advent.py "${RUN[@]}" --seed "$seed" --eval \
    --ensemble "$o/advent/checkpoint.pth" "$o/minent/checkpoint.pth" --output_dir "$o/ensemble"
  stage "$seed" oracle "$o/oracle.log" "$PY" advent.py "${RUN[@]}" --seed "$seed" --method source_only \
    --source cityscapes --input_size 128,64 --output_dir "$o/oracle"
}

start=$SECONDS
mkdir -p "$OUT"
rm -rf "$OUT"/s[0-9]* "$OUT"/seed*.log
run_seeds advent run_seed
ROWS=()
add_row source-only s@/source_only
add_row "target BN statistics only" s@/target_bn
add_row MinEnt s@/minent
add_row AdvEnt s@/advent
add_row AdvEnt+MinEnt s@/ensemble
add_row oracle s@/oracle
"$PY" -m common.demo write "$OUT" --paper advent --metric mIoU --seconds $((SECONDS - start)) "${ROWS[@]}"
gap_report
# the figure: the first seed's predictions on three val images, then the entropy maps (Eq. (2)) of three rows
o="$OUT/s${SEEDS%% *}"
figure "$OUT/advent.png" image="$o/source_only/viz:0/4" "ground truth=$o/source_only/viz:2/4" \
  source-only="$o/source_only/viz:1/4" BN-only="$o/target_bn/viz:1/4" MinEnt="$o/minent/viz:1/4" \
  AdvEnt="$o/advent/viz:1/4" AdvEnt+MinEnt="$o/ensemble/viz:1/4" "entropy BN-only=$o/target_bn/viz:3/4" \
  "entropy MinEnt=$o/minent/viz:3/4" "entropy AdvEnt=$o/advent/viz:3/4"
