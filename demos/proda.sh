#!/usr/bin/env bash
# ProDA demo: synthetic GTA5 -> Cityscapes (common/synthetic.py: the target is a darker, desaturated "real" rendering
# of the same kind of street layouts) with a small ProDA network (DeepLab-v2 trunk with 1 block per layer at width 16,
# ProDA's head with 64-d prototypes) trained from scratch, through the whole pipeline: the adversarial warm-up (LS-GAN,
# weight 0.01), soft pseudo labels + initial prototypes, stage 1 (rectified pseudo labels, symmetric CE, KL
# regulariser, structure learning, momentum prototypes, EMA teacher), hard pseudo labels, one distillation stage
# (student initialised from the source-only model, standing in for the paper's SimCLRv2 init). The source-only row
# is the warm-up code path with --adv 0 (no target image at all) and the same budget.
# Target mIoU (Cityscapes val at full resolution) after each stage; seeds run in parallel, one thread each.
# Same code path as the official settings; the flags below change only sizes, iterations and learning rates (the
# paper's are for ImageNet-initialised ResNet-101 over 62k iterations), BN (trained, not frozen: the official warm-up
# freezes it because it starts from ImageNet weights) and the warm-up's source view (weak).
# Env: PY, DATA, OUT (set by `make demo-proda`), SEEDS (default "0 1 2"), WARMUP_ITERS (400), STAGE_ITERS (200).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/synthetic}
OUT=${OUT:-outputs/demo/proda}
SEEDS=${SEEDS:-"0 1 2"}
WARMUP_ITERS=${WARMUP_ITERS:-400}
STAGE_ITERS=${STAGE_ITERS:-200}
mkdir -p "$OUT"
start=$(date +%s)
FLAGS=(--source gta5 --target cityscapes --data_root "$DATA" --layers 1 1 1 1 --width 16 --feat_dim 64
       --src_size 160 88 --tgt_size 128 64 --resize 192 --rcrop 96,48 --batch_size 4
       --no-freeze_bn --S_pseudo_src 0 --select last --device cpu --num_workers 0 --threads 1 --print_interval 100)
MODEL=from_gta5_to_cityscapes_on_deeplabv2_last_model.pkl

run_seed() {
  local seed=$1 dir="$OUT/s$1"
  $PY proda.py "${FLAGS[@]}" --seed "$seed" --output_dir "$dir/source_only" --stage warmup --adv 0 \
    --lr_warmup 0.01 --train_iters "$WARMUP_ITERS" --val_interval "$WARMUP_ITERS"
  # the pipeline: each stage reads the previous one's outputs from $dir/proda/
  $PY proda.py "${FLAGS[@]}" --seed "$seed" --output_dir "$dir/proda" --stage warmup 1 2 \
    --lr_warmup 0.01 --lr 0.005 --lr_distill 0.001 --student_init "$dir/source_only/warmup/$MODEL" --no-bn_clr \
    --train_iters "$STAGE_ITERS" --warmup_iters "$WARMUP_ITERS" --val_interval "$WARMUP_ITERS"
}

run_seeds proda run_seed
ROWS=()
add_row source-only s@/source_only/warmup
add_row "warm-up (adversarial)" s@/proda/warmup
add_row "stage 1" s@/proda/stage1
add_row "stage 2 (distillation)" s@/proda/stage2
$PY -m common.demo write "$OUT" --paper proda --metric mIoU --seconds $(( $(date +%s) - start )) "${ROWS[@]}"
