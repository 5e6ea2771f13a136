#!/usr/bin/env bash
# One GPU slot, one script: build, CUDA tests, the comparison sweep at DESIGN.md section 7 sizes, the TRL step timing
# and the memory profile to T=65536, all within GPU_CHECK_BUDGET_S (default 540 s = 9 minutes) on an H100/H200.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine; results in $OUT or benchmarks/results/<date>-<gpu>/
#   bash benchmarks/gpu_check.sh --cpu-smoke  # dry run on a CPU: no install, tiny sizes, same stages and outputs
#
# Every stage runs under `timeout` with min(its cap, what is left of the budget), so one slow stage cannot eat the
# slot; its output goes to $OUT/logs/<stage>.log and to stdout with a timestamp. A failed or timed-out stage is
# recorded in $OUT/stages.tsv and the script goes on. Environment knobs: PYTHON (default: the first of python3,
# python that imports torch), OUT, GPU_CHECK_BUDGET_S,
# GPU_CHECK_TESTS_K (pytest -k expression selecting the tests that run CUDA/Triton code, default "triton or cuda":
# the Triton-backend and CUDA-device parametrizations and the Triton test modules).
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
case "${1:-}" in
  --cpu-smoke) SMOKE=1 ;;
  "") ;;
  *) echo "usage: $0 [--cpu-smoke]" >&2; exit 2 ;;
esac

# The interpreter that holds torch: on the GPU image that is `python3` (a venv), and a bare `python` may be missing
# or another interpreter; take the first of python3, python that imports torch.
if [[ -z "${PYTHON:-}" ]]; then
  for candidate in python3 python; do
    if command -v "$candidate" > /dev/null && "$candidate" -c "import torch" 2> /dev/null; then
      PYTHON=$candidate
      break
    fi
  done
  PYTHON=${PYTHON:-python3}
fi
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
TESTS_K=${GPU_CHECK_TESTS_K:-triton or cuda}
START=$(date +%s)

log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }

if [[ -z "${OUT:-}" ]]; then
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  [[ -n "$gpu" ]] || gpu=$([[ $SMOKE == 1 ]] && echo cpu-smoke || echo unknown-gpu)
  OUT="benchmarks/results/$(date -u +%Y-%m-%d)-$(echo "$gpu" | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//' | tr 'A-Z' 'a-z')"
fi
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
printf 'stage\texit\tseconds\ttimeout_s\n' > "$OUT/stages.tsv"
log "gpu_check: output in $OUT, budget ${BUDGET_S}s, python $PYTHON, smoke=$SMOKE"

# stage NAME CAP_SECONDS COMMAND...: runs COMMAND under timeout min(CAP, budget left); never stops the script.
stage() {
  local name=$1 cap=$2
  shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 15 )); then
    log "SKIP  $name: only ${left}s of the budget left"
    printf '%s\tskipped\t0\t0\n' "$name" >> "$OUT/stages.tsv"
    return 0
  fi
  log "START $name (timeout ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" 2>&1 | while IFS= read -r line; do
    echo "[$(date -u +%H:%M:%S)] $name | $line"
  done | tee "$OUT/logs/$name.log"
  local rc=${PIPESTATUS[0]}
  local secs=$(( $(date +%s) - t0 ))
  if (( rc == 124 || rc == 137 )); then
    log "TIMEOUT $name after ${secs}s"
  else
    log "END   $name exit $rc after ${secs}s"
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$limit" >> "$OUT/stages.tsv"
}

do_install() {
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install --no-deps --no-index .whl/*.whl || return 1
  fi
  MAX_JOBS=${MAX_JOBS:-16} "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
}

show_environment() {
  nvidia-smi 2>/dev/null || echo "nvidia-smi: not available"
  "$PYTHON" - <<'EOF'
import importlib.metadata as md
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")
for p in ("triton", "transformers", "trl", "liger-kernel", "cut-cross-entropy", "dpo_kernels"):
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, "not installed")
import dpo_kernels
print("dpo_kernels imported from", dpo_kernels.__file__)
EOF
}

run_cuda_tests() {
  "$PYTHON" -m pytest tests -q -m "not slow" -k "$TESTS_K" -p no:cacheprovider --durations=10 \
    --junitxml="$OUT/tests-junit.xml"
  local rc=$?
  # 5 = nothing selected (a CPU smoke run has no CUDA tests to run)
  (( rc == 5 )) && { echo "no tests selected by -k '$TESTS_K'"; return 0; }
  return $rc
}

if [[ $SMOKE == 1 ]]; then
  BENCH=(--tiny --compile-backend aot_eager --warmup 0 --iters 1)
  MEMORY=(--seq-lens 64,128 --hidden 16 --vocab 257 --no-isolate --compile-backend aot_eager)
  TRL_ARGS=(--tiny)
else
  BENCH=()
  MEMORY=(--seq-lens 1024,2048,4096,8192,16384,32768,65536 --hidden 4096 --vocab 128256 --pairs 1)
  TRL_ARGS=()
fi
CLI=("$PYTHON" -m dpo_kernels.bench.cli)
# timeout runs programs, not shell functions: the functions above run in a child bash. Unbuffered Python, so that
# a stage killed by its timeout still shows its last progress lines.
export PYTHON OUT TESTS_K PYTHONUNBUFFERED=1
export -f do_install show_environment run_cuda_tests

if [[ $SMOKE == 1 ]]; then
  log "SKIP  install: --cpu-smoke uses the package as installed"
else
  stage install 150 bash -c do_install
fi
stage environment 30 bash -c show_environment
stage cuda-tests 150 bash -c run_cuda_tests
stage bench-linear 150 "${CLI[@]}" bench --ops linear --output-dir "$OUT/bench" "${BENCH[@]}"
stage bench-logits 45 "${CLI[@]}" bench --ops logits --output-dir "$OUT/bench" "${BENCH[@]}"
stage bench-loss 45 "${CLI[@]}" bench --ops loss --output-dir "$OUT/bench" "${BENCH[@]}"
if [[ $SMOKE == 1 ]]; then LOSS_DEVICE=cpu; else LOSS_DEVICE=cuda; fi
stage loss-overhead 30 "$PYTHON" benchmarks/bench_dpo_loss.py --device "$LOSS_DEVICE" --batch 8 1024 65536
stage memory 75 "${CLI[@]}" profile-memory --output-dir "$OUT/memory" "${MEMORY[@]}"
if [[ -f benchmarks/trl_step_timing.py ]]; then
  stage trl-step 75 "$PYTHON" benchmarks/trl_step_timing.py --output-dir "$OUT/trl" "${TRL_ARGS[@]}"
else
  log "SKIP  trl-step: benchmarks/trl_step_timing.py is missing"
fi

{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - START ))s of ${BUDGET_S}s"
  echo
  echo '| stage | exit | seconds | timeout |'
  echo '|---|---|---|---|'
  tail -n +2 "$OUT/stages.tsv" | awk -F'\t' '{ printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 }'
  echo
  for md in "$OUT"/bench/*.md "$OUT"/trl/*.md "$OUT"/memory/*.md; do
    [[ -f "$md" ]] && { cat "$md"; echo; }
  done
} > "$OUT/SUMMARY.md"
log "done: $OUT/SUMMARY.md"
failed=$(tail -n +2 "$OUT/stages.tsv" | awk -F'\t' '$2 != "0" && $2 != "skipped"' | wc -l)
log "$failed stage(s) failed or timed out"
exit $(( failed > 0 ? 1 : 0 ))
