"""demos/lib.sh, which every demo sources: a failing seed stops the demo at once, names the log of the stage it
failed in, and leaves no process of the other seeds running; seeds that succeed end the demo normally."""
import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# seed 0: a long stage whose process writes its pid; seed 1 (when FAIL is set): a stage that fails after a moment
DEMO = r"""
set -euo pipefail
source demos/lib.sh
run_seed() {
  if [ "$1" = 0 ]; then
    stage 0 slow "$OUT/s0/slow.log" bash -c 'echo $$ > "$OUT/slow.pid"; exec sleep "$SLOW"'
  elif [ -n "${FAIL:-}" ]; then
    stage 1 fine "$OUT/s1/fine.log" true
    stage 1 broken "$OUT/s1/broken.log" bash -c 'sleep 0.5; echo "the broken stage says why" >&2; exit 3'
  else
    stage 1 fine "$OUT/s1/fine.log" true
  fi
}
run_seeds test run_seed
echo "all seeds done"
"""


def run_demo(tmp_path, slow, fail):
    env = {**os.environ, "OUT": str(tmp_path), "SEEDS": "0 1", "SLOW": str(slow), "PROGRESS_EVERY": "100"}
    if fail:
        env["FAIL"] = "1"
    start = time.monotonic()
    result = subprocess.run(["bash", "-c", DEMO], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return result, time.monotonic() - start


def test_a_failing_seed_stops_the_demo_at_once_names_its_stage_log_and_leaves_no_process(tmp_path):
    result, seconds = run_demo(tmp_path, slow=60, fail=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert seconds < 30, f"the demo took {seconds:.0f} s to stop: a seed or a process it started kept it waiting"
    assert f"seed 1 failed in {tmp_path}/s1/broken.log" in result.stderr
    assert "the broken stage says why" in result.stderr  # the end of the failed stage's log
    assert "all seeds done" not in result.stdout
    pid = int((tmp_path / "slow.pid").read_text())
    for _ in range(50):  # the other seed's process (a grandchild of the demo) is stopped with it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        pytest.fail("seed 0's stage was still running after the demo had stopped")


def test_seeds_that_succeed_end_the_demo_normally(tmp_path):
    result, _ = run_demo(tmp_path, slow=1, fail=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all seeds done" in result.stdout
    assert not (tmp_path / ".progress").exists()


def test_a_demo_that_stops_on_an_error_stops_its_progress_line(tmp_path):
    """A demo's own `trap progress_stop EXIT` after a failing command (demos/trackformer.sh's pre-training): the
    progress line's loop ends with the demo instead of printing on, and keeping its output open, for ever."""
    script = r"""
set -euo pipefail
source demos/lib.sh
trap 'progress_stop' EXIT
progress_start
stage pre broken "$OUT/broken.log" false || { echo "the stage failed" >&2; exit 1; }
"""
    env = {**os.environ, "OUT": str(tmp_path), "PROGRESS_EVERY": "1"}
    process = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=20)  # returns once no process holds the demo's output open
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.communicate()
        pytest.fail("the progress line outlived the demo")
    assert process.returncode == 1 and "the stage failed" in stderr
