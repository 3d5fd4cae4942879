#!/usr/bin/env bash
# ProDA, the paper's GTA5 -> Cityscapes pipeline in miniature, on the synthetic data (make demo-proda).
#
# Protocol (the same for every row; only the method differs): each row starts from the same initial weights, trains
# on the same data in the same order (the same seed), and is scored on Cityscapes val at full resolution with its
# last weights. The initial weights, made first (once for every row and seed, seed 0):
#   1. the trunk (conv1 .. layer4) of the DA demos' shared initial model (demos/uda_init.sh, `make demo-init`: the
#      small DeepLab-v2 trained on the synthetic GTA5). ProDA's network has the same trunk but reads RGB / 255 where
#      that model read BGR minus the mean, so conv1's input channels are reversed and scaled by 255 and bn1's running
#      mean is shifted by the mean's response (exact away from the zero-padded image border); loaded by key
#      intersection (--pretrained, as the official code loads ImageNet weights; the count of tensors is printed);
#   2. ProDA's own head (Classifier_Module2, which the DeepLab-v2 model does not have) fitted on the source from the
#      paper's random init: the warm-up loop with --adv 0, INIT_ITERS iterations. Without it every row would start
#      with an untrained head, and a row's score would mostly say how many iterations it had (a control given the
#      whole pipeline's budget then beat the warm-up).
# Rows, per seed (W = WARMUP_ITERS, S = STAGE_ITERS, T = W + 3 S), each from the initial weights (--resume_path):
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
# (the official default; its --freeze_bn is off); the initial model's affine parameters were learnt on the synthetic
# source a few minutes earlier, so nothing argues for freezing them.
# Flags that differ from the paper's configuration, and why (docs/proda.md has the measurements):
#   --layers 1 1 1 1 --width 16 --feat_dim FEAT_DIM --ndf NDF: the small network of the DA demos and a narrow
#   discriminator (paper ResNet-101, 256-d prototypes, discriminator width 64), for the budget; --src_size 128 72
#   --tgt_size 128 64 (the initial model's source size and the target's) with --resize RESIZE --rcrop CROP
#   --batch_size BATCH (paper 2200, 896x512, 4: crops of about half the image's width at its own scale, as here);
#   learning rates LR_WARMUP / LR_STAGE1 / LR_DISTILL (paper 1e-4 / 1e-4 / 6e-4, for 62k iterations of a pretrained
#   ResNet-101) and the poly schedule over each stage's iterations (paper 90k); adversarial weight ADV and
#   discriminator lr LR_D (paper 0.01 and 1e-4, with which the discriminator stays at chance and the warm-up equals
#   the BN-only control at the same iterations);
#   --student_init: the initial weights (paper SimCLRv2 R101) with --no-bn_clr (they have no bn_pretrain);
#   --select last (the official code hands on the model that is best on target val, selecting on the evaluation set).
# Env: PY, DATA, OUT (set by `make demo-proda`), INIT (outputs/demo/init), SEEDS ("0 1 2"), WARMUP_ITERS,
# STAGE_ITERS, INIT_ITERS and the values above.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/uda_lib.sh"
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/synthetic}
OUT=${OUT:-outputs/demo/proda}
SEEDS=${SEEDS:-"0 1 2"}
WARMUP_ITERS=${WARMUP_ITERS:-200}
STAGE_ITERS=${STAGE_ITERS:-100}
FEAT_DIM=${FEAT_DIM:-32}
NDF=${NDF:-16}
RESIZE=${RESIZE:-128}
CROP=${CROP:-64,32}
BATCH=${BATCH:-4}
ADV=${ADV:-1.0}
LR_D=${LR_D:-0.001}
LR_WARMUP=${LR_WARMUP:-0.0025}
LR_STAGE1=${LR_STAGE1:-0.0025}
LR_DISTILL=${LR_DISTILL:-0.0005}
INIT_ITERS=${INIT_ITERS:-600}
TOTAL=$((WARMUP_ITERS + 3 * STAGE_ITERS))
export OMP_NUM_THREADS=1
require_init

start=$SECONDS  # the demo's time: the head's fitting below included
mkdir -p "$OUT"
rm -rf "$OUT"/s[0-9]* "$OUT"/seed*.log "$OUT/init" "$OUT/init.log"
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
     --src_size 128 72 --tgt_size 128 64 --resize "$RESIZE" --rcrop "$CROP" --batch_size "$BATCH" --ndf "$NDF"
     --no-freeze_bn --S_pseudo_src 0 --select last --device cpu --num_workers 0 --threads 1 --print_interval 25
     --viz --viz_count 3)
# The initial weights: the trunk above with ProDA's head fitted on the source (the warm-up loop with --adv 0,
# INIT_ITERS iterations, seed 0), once for every row and seed.
START="$OUT/init/warmup/from_gta5_to_cityscapes_on_deeplabv2_last_model.pkl"
DEMO_NAME=demo-proda progress_start
stage init "ProDA head on the source" "$OUT/init.log" "$PY" proda.py "${RUN[@]}" --pretrained "$OUT/init_trunk.pth" \
  --stage warmup --adv 0 --lr_warmup "$LR_WARMUP" --warmup_iters "$INIT_ITERS" --val_interval "$INIT_ITERS" \
  --seed 0 --output_dir "$OUT/init" \
  || stage_failed "$OUT/init.log" "demo-proda: fitting ProDA's head on the source failed; see $OUT/init.log"
progress_stop
CONTROL=(--resume_path "$START" --stage warmup --adv 0 --lr_warmup "$LR_WARMUP" --warmup_iters "$TOTAL"
         --val_interval "$TOTAL")

run_seed() {
  local seed=$1 o="$OUT/s$1"
  stage "$seed" source-only "$o/source_only.log" "$PY" proda.py "${RUN[@]}" "${CONTROL[@]}" --seed "$seed" \
    --output_dir "$o/source_only"
  stage "$seed" "target BN" "$o/target_bn.log" "$PY" proda.py "${RUN[@]}" "${CONTROL[@]}" --seed "$seed" \
    --target_bn_only --output_dir "$o/target_bn"
  # the pipeline, one stage a process: each reads the previous one's outputs from $o/proda/
  local pipeline=(--adv "$ADV" --lr_D "$LR_D" --lr_warmup "$LR_WARMUP" --lr "$LR_STAGE1" --lr_distill "$LR_DISTILL"
                  --warmup_iters "$WARMUP_ITERS" --train_iters "$STAGE_ITERS" --val_interval "$TOTAL"
                  --student_init "$START" --no-bn_clr --output_dir "$o/proda")
  stage "$seed" warm-up "$o/warmup.log" "$PY" proda.py "${RUN[@]}" "${pipeline[@]}" --seed "$seed" --stage warmup \
    --resume_path "$START"
  for s in 1 2 3; do
    stage "$seed" "stage $s" "$o/stage$s.log" "$PY" proda.py "${RUN[@]}" "${pipeline[@]}" --seed "$seed" --stage "$s"
  done
  stage "$seed" oracle "$o/oracle.log" "$PY" proda.py "${RUN[@]}" "${CONTROL[@]}" --seed "$seed" \
    --source cityscapes --src_size 128 64 --output_dir "$o/oracle"
}

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
