# Shared by the demos that run their seeds side by side (sourced, not run). Needs OUT and SEEDS.

# run_seeds NAME FUNCTION: `FUNCTION SEED` for every seed in SEEDS as background jobs (output to
# OUT/seed<SEED>.log), then wait for all; if one fails, stop the others, show the end of its log and exit 1.
run_seeds() {
  local name=$1 function=$2 seed pids=() seeds=()
  trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
  for seed in $SEEDS; do
    "$function" "$seed" > "$OUT/seed$seed.log" 2>&1 &
    pids+=($!)
    seeds+=("$seed")
  done
  for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
      kill "${pids[@]}" 2>/dev/null || true
      tail -n 20 "$OUT/seed${seeds[$i]}.log" >&2
      echo "demo-$name: seed ${seeds[$i]} failed; see $OUT/seed${seeds[$i]}.log" >&2
      exit 1
    fi
  done
  trap - INT TERM
}

# add_row LABEL PATH: appends `--row LABEL OUT/PATH/eval.json ...` (one file per seed, `@` in PATH standing for the
# seed) to ROWS, the arguments of `python -m common.demo write`.
add_row() {
  local seed
  ROWS+=(--row "$1")
  for seed in $SEEDS; do ROWS+=("$OUT/${2//@/$seed}/eval.json"); done
}
