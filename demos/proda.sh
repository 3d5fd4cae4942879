#!/usr/bin/env bash
# ProDA, the paper's GTA5 -> Cityscapes pipeline in miniature, on the synthetic data (make demo-proda).
#
# Protocol (the same for every row; only the method differs): each row starts from the same initial weights, trains
# on the same data in the same order (the same seed), and is scored on Cityscapes val at full resolution with its
# last weights. The initial weights: the trunk (conv1 .. layer4) of the DA demos' shared initial model
# (demos/uda_init.sh, `make demo-init`: the small DeepLab-v2 trained on the synthetic GTA5), loaded into ProDA's
# network by key intersection (--pretrained, as the official code loads ImageNet weights; the count is printed), and
# ProDA's head (Classifier_Module2) from the paper's random init, drawn from the seed. The two networks share the
# trunk but not the head, and ProDA reads RGB / 255 where the initial model read BGR minus the mean: conv1's input
# channels are reversed and scaled by 255 and bn1's running mean shifted by the mean's response (exact away from the
# zero-padded image border). Rows, per seed (W = WARMUP_ITERS, S = STAGE_ITERS, T = W + 3 S):
#   source-only                 the warm-up loop with --adv 0: the source loss only, no target image; T iterations
#   target BN statistics only   the same with --target_bn_only: the target images through the network in train mode
#                               (BatchNorm's statistics take them in), every adaptation weight 0; T iterations, the
#                               whole pipeline's budget, so each stage is compared with a control that had at least
#                               its budget
#   warm-up                     output-space adversarial warm-up (LS-GAN), W iterations; then soft pseudo labels and
#                               the initial prototypes
#   stage 1                     prototype-rectified pseudo labels, symmetric CE, KL regulariser, structure learning,
#                               momentum prototypes, EMA teacher (Sec. 3.2-3.3), S iterations from the warm-up model
#   stage 2                     distillation on stage 1's hard pseudo labels (Sec. 3.4), S iterations; the student
#                               starts from the initial weights (standing in for the paper's SimCLRv2 init)
#   stage 3                     distillation again, the student starting from the stage-2 model (the official
#                               command), S iterations
#   oracle                      --source cityscapes: the warm-up loop on the Cityscapes train labels; T iterations
# Seeds run side by side, one thread each. BatchNorm: train mode with trainable affine parameters in every stage
# (the official warm-up default, no --freeze_bn); the initial model's affine parameters were learnt on the synthetic
# source a few minutes earlier, so nothing argues for freezing them.
# Flags that differ from the paper's configuration, and why:
#   --layers 1 1 1 1 --width 16 --feat_dim FEAT_DIM: the small network of the DA demos (paper ResNet-101 from
#   ImageNet, 256-d prototypes), for the budget; --src_size 128 72 --tgt_size 128 64 (the initial model's source
#   size and the target's) with --resize RESIZE --rcrop CROP and --batch_size BATCH (paper 2200, 896x512, 4);
#   learning rates LR_WARMUP / LR_STAGE1 / LR_DISTILL (paper 1e-4 / 1e-4 / 6e-4, for 62k iterations of a pretrained
#   ResNet-101) and the poly schedule over each stage's iterations (paper 90k); adversarial weight ADV (paper 0.01);
#   --student_init: the initial model (paper SimCLRv2 R101) with --no-bn_clr (it has no bn_pretrain); --select last
#   (the official code hands on the model that is best on target val, i.e. selects on the evaluation set).
# Env: PY, DATA, OUT (set by `make demo-proda`), INIT (outputs/demo/init), SEEDS ("0 1 2"), WARMUP_ITERS,
# STAGE_ITERS, and the flags above.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/uda_lib.sh"
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/synthetic}
OUT=${OUT:-outputs/demo/proda}
SEEDS=${SEEDS:-"0 1 2"}
WARMUP_ITERS=${WARMUP_ITERS:-200}
STAGE_ITERS=${STAGE_ITERS:-100}
FEAT_DIM=${FEAT_DIM:-64}
RESIZE=${RESIZE:-192}
CROP=${CROP:-96,48}
BATCH=${BATCH:-4}
ADV=${ADV:-0.01}
LR_WARMUP=${LR_WARMUP:-0.0025}
LR_STAGE1=${LR_STAGE1:-0.001}
LR_DISTILL=${LR_DISTILL:-0.001}
TOTAL=$((WARMUP_ITERS + 3 * STAGE_ITERS))
export OMP_NUM_THREADS=1
require_init

mkdir -p "$OUT"
rm -rf "$OUT"/s[0-9]* "$OUT"/seed*.log
# The initial model's trunk for ProDA's input (RGB / 255 instead of BGR minus the mean); see the header.
"$PY" - "$INIT/checkpoint.pth" "$OUT/init_trunk.pth" <<'EOF'
import sys
import torch
from common.segmentation import IMG_MEAN
from common.training import load_checkpoint
from proda import TRUNK
source, target = sys.argv[1:]
trunk = {k: v.clone() for k, v in load_checkpoint(source)["model"].items() if k.startswith(TRUNK)}
weight = trunk["conv1.weight"]  # [out, BGR, 7, 7] on BGR minus the mean
trunk["bn1.running_mean"] += (weight.sum((2, 3)) * torch.tensor(IMG_MEAN, dtype=weight.dtype)).sum(1)
trunk["conv1.weight"] = 255 * weight.flip(1)
torch.save(trunk, target)
EOF

RUN=(--source gta5 --target cityscapes --data_root "$DATA" --layers 1 1 1 1 --width 16 --feat_dim "$FEAT_DIM"
     --src_size 128 72 --tgt_size 128 64 --resize "$RESIZE" --rcrop "$CROP" --batch_size "$BATCH" --no-freeze_bn
     --S_pseudo_src 0 --select last --device cpu --num_workers 0 --threads 1 --print_interval 25
     --pretrained "$OUT/init_trunk.pth" --viz --viz_count 3)
CONTROL=(--stage warmup --adv 0 --lr_warmup "$LR_WARMUP" --warmup_iters "$TOTAL" --val_interval "$TOTAL")

run_seed() {
  local seed=$1 o="$OUT/s$1"
  stage "$seed" source-only "$o/source_only.log" "$PY" proda.py "${RUN[@]}" "${CONTROL[@]}" --seed "$seed" \
    --output_dir "$o/source_only"
  stage "$seed" "target BN" "$o/target_bn.log" "$PY" proda.py "${RUN[@]}" "${CONTROL[@]}" --seed "$seed" \
    --target_bn_only --output_dir "$o/target_bn"
  # the pipeline: each stage reads the previous one's outputs from $o/proda/
  stage "$seed" "ProDA warm-up..stage 3" "$o/proda.log" "$PY" proda.py "${RUN[@]}" --seed "$seed" \
    --stage warmup 1 2 3 --adv "$ADV" --lr_warmup "$LR_WARMUP" --lr "$LR_STAGE1" --lr_distill "$LR_DISTILL" \
    --warmup_iters "$WARMUP_ITERS" --train_iters "$STAGE_ITERS" --val_interval "$TOTAL" \
    --student_init "$OUT/init_trunk.pth" --no-bn_clr --output_dir "$o/proda"
  stage "$seed" oracle "$o/oracle.log" "$PY" proda.py "${RUN[@]}" "${CONTROL[@]}" --seed "$seed" \
    --source cityscapes --src_size 128 64 --output_dir "$o/oracle"
}

start=$SECONDS
run_seeds proda run_seed
ROWS=()
add_row source-only s@/source_only/warmup
add_row "target BN statistics only" s@/target_bn/warmup
add_row warm-up s@/proda/warmup
add_row "stage 1" s@/proda/stage1
add_row "stage 2" s@/proda/stage2
add_row "stage 3" s@/proda/stage3
add_row oracle s@/oracle/warmup
"$PY" -m common.demo write "$OUT" --paper proda --metric mIoU --seconds $((SECONDS - start)) "${ROWS[@]}"
gap_report
# the figure: the first seed's predictions on three val images (each --viz figure: image | ground truth | prediction)
o="$OUT/s${SEEDS%% *}"
figure "$OUT/proda.png" image="$o/source_only/warmup/viz:0/3" "ground truth=$o/source_only/warmup/viz:1/3" \
  source-only="$o/source_only/warmup/viz:2/3" BN-only="$o/target_bn/warmup/viz:2/3" \
  warm-up="$o/proda/warmup/viz:2/3" "stage 1=$o/proda/stage1/viz:2/3" "stage 2=$o/proda/stage2/viz:2/3" \
  "stage 3=$o/proda/stage3/viz:2/3"
