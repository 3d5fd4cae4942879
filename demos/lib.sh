# Shared by the demos (sourced, not run). Needs OUT; run_seeds also needs SEEDS.
#
# Progress: a demo wraps each long command in `stage SEED NAME LOG CMD...`; while `run_seeds` (or a pair of
# `progress_start` / `progress_stop` around serial work) runs, one line per PROGRESS_EVERY seconds (default 15)
# shows, for every seed, its current stage and the last progress line of that stage's log: the step / total and
# ETA that the scripts' loggers print. Logs stay in files.

# stage SEED NAME LOG CMD...: run CMD with stdout and stderr to LOG, telling the progress line that SEED is at NAME.
stage() {
  local seed=$1 name=$2 log=$3
  shift 3
  mkdir -p "$OUT/.progress" "$(dirname "$log")"
  printf '%s\t%s\t%s\n' "$name" "$log" "$(date +%s)" > "$OUT/.progress/$seed"
  "$@" > "$log" 2>&1
}

# The step / total and ETA of the last line of LOG that has an ETA or a step count.
_progress_of() {
  local line step eta
  line=$(grep -aE 'eta|ETA|[0-9]+ ?/ ?[0-9]+' "$1" 2>/dev/null | tail -n 1) || true
  step=$(grep -oE '\[ *[0-9]+ */ *[0-9]+\]|[0-9]+ ?/ ?[0-9]+' <<< "$line" | tail -n 1) || true
  eta=$(grep -oiE 'eta:? *[0-9:]+' <<< "$line" | head -n 1) || true
  local epoch
  epoch=$(grep -oE '(Epoch|epoch|stage|Stage): *\[?[0-9A-Za-z-]+\]?( of [0-9]+)?' <<< "$line" | head -n 1) || true
  echo "$epoch $step $eta" | tr -s ' '
}

_progress_loop() {
  local begin=$1 file name log since now
  while sleep "${PROGRESS_EVERY:-15}"; do
    now=$(date +%s)
    local parts=()
    for file in "$OUT"/.progress/*; do
      [ -f "$file" ] || continue
      IFS=$'\t' read -r name log since < "$file"
      parts+=("seed $(basename "$file"): $name ($((now - since))s) $(_progress_of "$log")")
    done
    [ ${#parts[@]} -eq 0 ] || printf '[%s %dm%02ds] %s\n' "${DEMO_NAME:-demo}" $(((now - begin) / 60)) \
      $(((now - begin) % 60)) "$(IFS='|'; echo "${parts[*]}" | sed 's/|/ | /g')"
  done
}

# progress_start / progress_stop: the progress line in the background while the demo's own commands run.
progress_start() {
  rm -rf "$OUT/.progress"
  mkdir -p "$OUT/.progress"
  _progress_loop "$(date +%s)" &
  _PROGRESS_PID=$!
}

progress_stop() {
  if [ -n "${_PROGRESS_PID:-}" ]; then
    kill_tree "$_PROGRESS_PID"  # the loop and its sleep
    wait "$_PROGRESS_PID" 2>/dev/null || true
  fi
  _PROGRESS_PID=
  rm -rf "$OUT/.progress"
  return 0
}

# _children PID: the processes whose parent is PID (pgrep, or /proc where procps is missing).
_children() {
  if command -v pgrep > /dev/null; then
    pgrep -P "$1" || true
    return 0  # (a bare `return` in an EXIT trap returns the status the script exited with)
  fi
  local stat line rest
  for stat in /proc/[0-9]*/stat; do
    line=$(cat "$stat" 2> /dev/null) || continue
    rest=(${line##*) })  # after the command name: state, parent, ...
    if [ "${rest[1]:-}" = "$1" ]; then stat=${stat#/proc/}; echo "${stat%/stat}"; fi
  done
}

# kill_tree PID...: stop each PID and every process started below it (a seed's job is a subshell whose Python
# processes would otherwise outlive the demo); the whole tree is listed first, then signalled at once.
kill_tree() {
  local all=() queue=("$@") pid
  while [ ${#queue[@]} -gt 0 ]; do
    pid=${queue[0]}
    queue=("${queue[@]:1}")
    all+=("$pid")
    queue+=($(_children "$pid"))
  done
  [ ${#all[@]} -eq 0 ] || kill "${all[@]}" 2> /dev/null || true
}

# stage_failed LOG MESSAGE: after a failed stage, stop the progress line, show the end of LOG and MESSAGE, and exit 1.
stage_failed() {
  progress_stop
  tail -n 20 "$1" >&2
  echo "$2" >&2
  exit 1
}

# run_seeds NAME FUNCTION: `FUNCTION SEED` for every seed in SEEDS as background jobs (output to
# OUT/seed<SEED>.log), then wait for all; as soon as one fails (whichever seed), stop the others, show the end of
# the log of the stage it failed in and exit 1. Prints the progress line meanwhile.
run_seeds() {
  local name=$1 function=$2 seed pids=() seeds=() running i log
  DEMO_NAME=demo-$name progress_start
  trap 'kill_tree "${pids[@]}"; progress_stop' INT TERM
  for seed in $SEEDS; do
    "$function" "$seed" > "$OUT/seed$seed.log" 2>&1 &
    pids+=($!)
    seeds+=("$seed")
  done
  running=("${!pids[@]}")
  while [ ${#running[@]} -gt 0 ]; do
    sleep 1
    for i in "${running[@]}"; do
      kill -0 "${pids[$i]}" 2> /dev/null && continue
      running=($(printf '%s\n' "${running[@]}" | grep -vx "$i" || true))
      wait "${pids[$i]}" && continue
      log="$OUT/seed${seeds[$i]}.log"
      [ ! -f "$OUT/.progress/${seeds[$i]}" ] || IFS=$'\t' read -r _ log _ < "$OUT/.progress/${seeds[$i]}"
      kill_tree "${pids[@]}"
      stage_failed "$log" \
        "demo-$name: seed ${seeds[$i]} failed in $log (the seed's own output: $OUT/seed${seeds[$i]}.log)"
    done
  done
  progress_stop
  trap - INT TERM
}

# add_row LABEL PATH: appends `--row LABEL OUT/PATH/eval.json ...` (one file per seed, `@` in PATH standing for the
# seed) to ROWS, the arguments of `python -m common.demo write`.
add_row() {
  local seed
  ROWS+=(--row "$1")
  for seed in $SEEDS; do ROWS+=("$OUT/${2//@/$seed}/eval.json"); done
}
