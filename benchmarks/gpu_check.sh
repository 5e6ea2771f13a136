#!/usr/bin/env bash
# One GPU slot, one script: build, the headline benchmark rows, the CUDA tests, the TRL step, then the peers, all
# within GPU_CHECK_BUDGET_S (default 540 s = 9 minutes) on an H100/H200.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine; results in $OUT or benchmarks/results/<date>-<gpu>/
#   bash benchmarks/gpu_check.sh --cpu-smoke  # dry run on a CPU: no install, tiny sizes, same stages and outputs
#   bash benchmarks/gpu_check.sh --list       # the stages in order with their caps, and the budget
#   bash benchmarks/gpu_check.sh --cuda-home  # the CUDA toolkit the build would use, and why
#
# Stages run in the order of STAGES below, most important rows first, so that whatever a cut takes is the least
# needed. Each runs under `timeout`: it gets its cap, plus whatever earlier stages left unused as long as the caps of
# the stages after it still fit in the budget; with less budget than the caps, the later stages are the ones cut.
# Each stage writes into its own folder $OUT/<stage>/ (log.txt and its results). After every stage $OUT/SUMMARY.md,
# $OUT/stages.tsv and $OUT/gpu_check.tar.gz (all of it) are rewritten, so a cut run keeps what finished. When OUT
# comes from the environment (the device tool sets it, and brings back at most 8 files, at most 2 folders down), the
# stage folders are removed at the end and those three files are what comes back: fetch gpu_check.tar.gz; keep the
# folders with GPU_CHECK_KEEP_DIRS=1. Give the command a limit of budget + 60 s so that the script ends itself.
#
# install builds the extension first (pip install -e ., with CUDA_HOME resolved by setup.py's resolve_cuda_home),
# then installs the carried wheels (`make gpu-wheels`, carry .whl): a wheel that does not install costs only the rows
# that need it, logged by name, and the stage exits 3. Where pip refuses to install into the interpreter (PEP 668,
# "externally-managed-environment", or no pip), the extension is built in place and the checkout put on PYTHONPATH,
# and the wheels go into $GPU_CHECK_WORK/site, put on PYTHONPATH for the later stages.
#
# Environment knobs: PYTHON (default: the first of python3, python that imports torch), OUT, GPU_CHECK_BUDGET_S,
# GPU_CHECK_STAGES (comma-separated stage names to run, default all; --cpu-smoke skips install unless named),
# GPU_CHECK_TESTS_K (pytest -k expression selecting the tests that run CUDA/Triton code, default "triton or cuda":
# the Triton-backend and CUDA-device parametrizations and the Triton test modules, wherever they live under tests/),
# GPU_CHECK_WHEELS (the wheel folder, default .whl), GPU_CHECK_WORK (scratch: the wheel target, build logs; default
# $TMPDIR/dpo_kernels_gpu_check), GPU_CHECK_KEEP_DIRS, MAX_JOBS (build jobs, default nproc).
set -uo pipefail
SCRIPT=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$0")/.."
REPO=$(pwd)

BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
# name, cap in seconds: the caps add up to the default budget (tests/tooling checks it).
STAGES=(
  "install              75"
  "environment          15"
  "bench-linear         60"
  "memory               60"
  "bench-logits         30"
  "loss-overhead        25"
  "cuda-tests          115"
  "trl-step             60"
  "bench-linear-peers   50"
  "memory-peers         20"
  "bench-logits-peers   15"
  "bench-loss           15"
)
NAMES=()
CAPS=()
for entry in "${STAGES[@]}"; do
  read -r name cap <<< "$entry"
  NAMES+=("$name")
  CAPS+=("$cap")
done

MODE=run
SMOKE=${_GPU_CHECK_SMOKE:-0}
case "${1:-}" in
  --cpu-smoke) SMOKE=1 ;;
  --list) MODE=list ;;
  --cuda-home) MODE=cuda-home ;;
  --stage) MODE=stage ;;  # internal: one stage in a child process, `--stage NAME DIR`
  "") ;;
  *) echo "usage: $0 [--cpu-smoke | --list | --cuda-home]" >&2; exit 2 ;;
esac

if [[ $MODE == list ]]; then
  echo "budget $BUDGET_S"
  for i in "${!NAMES[@]}"; do echo "${NAMES[i]} ${CAPS[i]}"; done
  exit 0
fi

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

# The toolkit, resolved by setup.py's own function so that the build and this script agree; torch's guess from a
# wrapper nvcc (/usr/local/bin/nvcc running `exec /usr/local/cuda-13.0/bin/nvcc`) is /usr/local, without headers.
resolve_cuda_home() {
  local line
  line=$("$PYTHON" -c 'import runpy
home, why = runpy.run_path("setup.py", run_name="gpu_check")["resolve_cuda_home"]()
print(f"{home or str()}\t{why}")' 2> /dev/null)
  if [[ -z $line ]]; then
    if [[ -f /usr/local/cuda/include/cuda_runtime_api.h ]]; then
      line="/usr/local/cuda"$'\t'"setup.py could not be loaded by $PYTHON; /usr/local/cuda, the default location"
    else
      line=$'\t'"setup.py could not be loaded by $PYTHON and /usr/local/cuda has no CUDA headers"
    fi
  fi
  CUDA_HOME_WHY=${line#*$'\t'}
  local home=${line%%$'\t'*}
  [[ -n $home ]] && export CUDA_HOME=$home
  export CUDA_HOME_WHY
}

if [[ $MODE == cuda-home ]]; then
  resolve_cuda_home
  echo "CUDA_HOME=${CUDA_HOME:-}"
  echo "why: $CUDA_HOME_WHY"
  exit 0
fi

WHEEL_DIR=${GPU_CHECK_WHEELS:-.whl}
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/dpo_kernels_gpu_check}
SITE=$WORK/site
TESTS_K=${GPU_CHECK_TESTS_K:-triton or cuda}
CLI=("$PYTHON" -m dpo_kernels.bench.cli)
if [[ $SMOKE == 1 ]]; then
  BENCH=(--tiny --compile-backend aot_eager --warmup 0 --iters 1)
  MEMORY=(--seq-lens 64,128 --hidden 16 --vocab 257 --no-isolate --compile-backend aot_eager)
  TRL_ARGS=(--tiny)
  LOSS_ARGS=(--device cpu --batch 8 1024)
else
  BENCH=()
  MEMORY=(--seq-lens 1024,2048,4096,8192,16384,32768,65536 --hidden 4096 --vocab 128256 --pairs 1)
  TRL_ARGS=()
  LOSS_ARGS=(--device cuda --batch 8 1024 65536)
fi

# ---- the stages: stage_<name with _ for -> DIR; their exit status is the stage's ----

# Which rows a carried wheel serves, for the log when it does not install: dpo_kernels/bench/peers.py holds the map,
# and runs as a file on the standard library alone, so it answers before (or without) a working dpo_kernels.
needed_by() {
  "$PYTHON" dpo_kernels/bench/peers.py --needed-by "$(basename "$1")" 2> /dev/null \
    || echo "whatever imports $(basename "$1")"
}

# pip's answer when it will not install into this interpreter.
pip_refused() {
  grep -q -e externally-managed-environment -e "No module named pip" "$1"
}

build_package() {
  local jobs=${MAX_JOBS:-$(nproc)} rc
  echo "install: building the extension (MAX_JOBS=$jobs, CUDA_HOME=${CUDA_HOME:-unset}: $CUDA_HOME_WHY)"
  MAX_JOBS=$jobs "$PYTHON" -m pip install --no-build-isolation --no-deps -e . 2>&1 | tee "$WORK/pip.log"
  rc=${PIPESTATUS[0]}
  (( rc == 0 )) && return 0
  pip_refused "$WORK/pip.log" || return "$rc"
  echo "install: pip will not install into $PYTHON: building the extension in place, the checkout goes on PYTHONPATH"
  touch "$WORK/no-pip-install"
  MAX_JOBS=$jobs "$PYTHON" setup.py build_ext --inplace || return 1
  echo "$REPO" >> "$WORK/pythonpath"
}

# install_with MODE WHEEL...: into the interpreter's environment (env), into $SITE with pip (target), or unpacked
# into $SITE where there is no pip at all (unzip: a wheel is a zip of what goes on sys.path).
install_with() {
  local mode=$1 w
  shift
  case $mode in
    env) "$PYTHON" -m pip install --no-index --no-deps --no-compile --no-cache-dir "$@" ;;
    target) "$PYTHON" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@" ;;
    unzip) for w in "$@"; do "$PYTHON" -m zipfile -e "$w" "$SITE" || return 1; done ;;
  esac
}

install_wheels() {
  local dir=$1 mode=env w rc failed=0
  shopt -s nullglob
  local wheels=("$WHEEL_DIR"/*.whl)
  shopt -u nullglob
  if (( ${#wheels[@]} == 0 )); then
    echo "install: no wheels in $WHEEL_DIR (make gpu-wheels, and carry .whl): rows of providers not installed are skipped"
    return 0
  fi
  if [[ -e $WORK/no-pip-install ]]; then
    if "$PYTHON" -m pip --version > /dev/null 2>&1; then mode=target; else mode=unzip; fi
  fi
  printf 'wheel\tstatus\tneeded_by\n' > "$dir/wheels.tsv"
  echo "install: ${#wheels[@]} wheel(s) from $WHEEL_DIR ($mode)"
  install_with "$mode" "${wheels[@]}" 2>&1 | tee "$WORK/pip.log"
  rc=${PIPESTATUS[0]}
  if (( rc != 0 )) && [[ $mode == env ]] && pip_refused "$WORK/pip.log"; then
    echo "install: pip will not install into $PYTHON: the wheels go into $SITE, on PYTHONPATH for the later stages"
    mode=target
    install_with "$mode" "${wheels[@]}" 2>&1
    rc=$?
  fi
  if (( rc == 0 )); then
    for w in "${wheels[@]}"; do printf '%s\tinstalled\t%s\n' "$(basename "$w")" "$(needed_by "$w")" >> "$dir/wheels.tsv"; done
  else
    # One at a time: a wheel that will not install costs only the rows that need it.
    echo "install: the wheels did not install together; one at a time"
    for w in "${wheels[@]}"; do
      if install_with "$mode" "$w" 2>&1; then
        printf '%s\tinstalled\t%s\n' "$(basename "$w")" "$(needed_by "$w")" >> "$dir/wheels.tsv"
      else
        failed=$(( failed + 1 ))
        echo "install: FAILED $(basename "$w"); lost: $(needed_by "$w")"
        printf '%s\tfailed\t%s\n' "$(basename "$w")" "$(needed_by "$w")" >> "$dir/wheels.tsv"
      fi
    done
  fi
  [[ $mode != env ]] && echo "$SITE" >> "$WORK/pythonpath"
  if (( failed > 0 )); then
    echo "install: $failed wheel(s) did not install (see wheels.tsv); the extension is built"
    return 3
  fi
  return 0
}

stage_install() {
  local dir=$1
  build_package || { echo "install: the extension did not build: every stage that imports dpo_kernels fails"; return 1; }
  install_wheels "$dir"
}

stage_environment() {
  local dir=$1
  {
    echo "CUDA_HOME=${CUDA_HOME:-unset}: $CUDA_HOME_WHY"
    echo "PYTHON=$PYTHON ($(command -v "$PYTHON")), PYTHONPATH=${PYTHONPATH:-}"
    nvidia-smi 2> /dev/null || echo "nvidia-smi: not available"
    if [[ -n ${CUDA_HOME:-} && -x $CUDA_HOME/bin/nvcc ]]; then "$CUDA_HOME/bin/nvcc" --version | tail -n 2; fi
    gcc --version 2> /dev/null | head -n 1 || echo "gcc: not available"
    # The peers and the wheels they need come from dpo_kernels/bench/peers.py, as arguments.
    "$PYTHON" - $("$PYTHON" dpo_kernels/bench/peers.py --packages) << 'EOF'
import importlib.metadata as md
import os
import sys
import sysconfig

import torch

print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")
print("Python.h", "present" if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else "MISSING")
for p in ("triton", "numpy", "transformers", "accelerate", "pandas", *sys.argv[1:], "dpo_kernels"):
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, "not installed")
import dpo_kernels

print("dpo_kernels imported from", dpo_kernels.__file__)
try:
    cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("dpo_kernels::dpo_loss_forward", "CUDA")
    print("dpo_kernels._C has a CUDA kernel:", cuda_kernel)
except Exception as exc:  # an introspection helper, not worth failing the stage for
    print("dpo_kernels._C CUDA kernel: unknown", exc)
EOF
  } 2>&1 | tee "$dir/environment.txt"
  return "${PIPESTATUS[0]}"
}

stage_bench_linear() {
  "${CLI[@]}" bench --ops linear --providers dpo_kernels,dpo_kernels_low,trl --output-dir "$1" "${BENCH[@]}"
}

stage_memory() {
  "${CLI[@]}" profile-memory --providers dpo_kernels,dpo_kernels_low,trl --output-dir "$1" "${MEMORY[@]}"
}

stage_bench_logits() {
  "${CLI[@]}" bench --ops logits --providers dpo_kernels,eager,trl --output-dir "$1" "${BENCH[@]}"
}

stage_loss_overhead() {
  [[ -f benchmarks/bench_dpo_loss.py ]] || { echo "benchmarks/bench_dpo_loss.py is missing"; return 2; }
  "$PYTHON" benchmarks/bench_dpo_loss.py "${LOSS_ARGS[@]}" 2>&1 | tee "$1/loss_overhead.txt"
  return "${PIPESTATUS[0]}"
}

stage_cuda_tests() {
  # By test id, not path: the Triton and CUDA parametrizations wherever the test files live. tests/tooling holds the
  # build and script checks, which run no kernels.
  "$PYTHON" -m pytest tests -q -m "not slow" -k "$TESTS_K" --ignore=tests/tooling -p no:cacheprovider --durations=10 \
    --junitxml="$1/junit.xml"
  local rc=$?
  # 5 = nothing selected (a CPU smoke run has no CUDA tests to run)
  (( rc == 5 )) && { echo "no tests selected by -k '$TESTS_K'"; return 0; }
  return $rc
}

stage_trl_step() {
  [[ -f benchmarks/trl_step_timing.py ]] || { echo "benchmarks/trl_step_timing.py is missing"; return 2; }
  "$PYTHON" benchmarks/trl_step_timing.py --output-dir "$1" "${TRL_ARGS[@]}"
}

stage_bench_linear_peers() {
  "${CLI[@]}" bench --ops linear --providers eager,torch_compile,liger,cce,torch_native,quack --output-dir "$1" "${BENCH[@]}"
}

stage_memory_peers() {
  "${CLI[@]}" profile-memory --providers eager,liger,cce,torch_native,quack --output-dir "$1" "${MEMORY[@]}"
}

stage_bench_logits_peers() {
  "${CLI[@]}" bench --ops logits --providers torch_compile,liger,quack --output-dir "$1" "${BENCH[@]}"
}

stage_bench_loss() {
  "${CLI[@]}" bench --ops loss --output-dir "$1" "${BENCH[@]}"
}

if [[ $MODE == stage ]]; then
  name=$2
  "stage_${name//-/_}" "$3"
  exit $?
fi

# ---- the run ----

START=$(date +%s)
log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }

OUT_FROM_ENV=${OUT:+1}
if [[ -z "${OUT:-}" ]]; then
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  [[ -n "$gpu" ]] || gpu=$([[ $SMOKE == 1 ]] && echo cpu-smoke || echo unknown-gpu)
  OUT="benchmarks/results/$(date -u +%Y-%m-%d)-$(echo "$gpu" | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//' | tr 'A-Z' 'a-z')"
fi
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
WORK=$(cd "$WORK" && pwd)
SITE=$WORK/site

# The stages to run: GPU_CHECK_STAGES, else all (a smoke run uses the package as installed: no install).
declare -A SELECTED=()
if [[ -n ${GPU_CHECK_STAGES:-} ]]; then
  IFS=',' read -r -a wanted <<< "$GPU_CHECK_STAGES"
  for name in "${wanted[@]}"; do
    [[ " ${NAMES[*]} " == *" $name "* ]] || { echo "unknown stage '$name'; stages: ${NAMES[*]}" >&2; exit 2; }
    SELECTED[$name]=1
  done
else
  for name in "${NAMES[@]}"; do SELECTED[$name]=1; done
  [[ $SMOKE == 1 ]] && unset 'SELECTED[install]'
fi

resolve_cuda_home
export PYTHON GPU_CHECK_WORK=$WORK PYTHONUNBUFFERED=1 _GPU_CHECK_SMOKE=$SMOKE
printf 'stage\texit\tseconds\ttimeout_s\n' > "$OUT/stages.tsv"
log "gpu_check: output in $OUT, budget ${BUDGET_S}s, python $PYTHON, smoke=$SMOKE"
log "CUDA_HOME=${CUDA_HOME:-unset}: $CUDA_HOME_WHY"

write_summary() {
  local name f
  {
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - START ))s of ${BUDGET_S}s, smoke=$SMOKE"
    echo
    echo '| stage | exit | seconds | timeout |'
    echo '|---|---|---|---|'
    tail -n +2 "$OUT/stages.tsv" | awk -F'\t' '{ printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 }'
    echo
    for name in "${NAMES[@]}"; do
      [[ -d $OUT/$name ]] || continue
      printf -- '---\n\nStage `%s`:\n\n' "$name"
      for f in "$OUT/$name"/*.md; do
        [[ -f $f ]] && { cat "$f"; echo; }
      done
      for f in "$OUT/$name"/*.txt "$OUT/$name"/*.tsv; do
        [[ -f $f && $(basename "$f") != log.txt ]] || continue
        printf '## %s: %s\n\n```\n' "$name" "$(basename "$f")"
        cat "$f"
        printf '```\n\n'
      done
    done
  } > "$OUT/.SUMMARY.md.tmp" && mv "$OUT/.SUMMARY.md.tmp" "$OUT/SUMMARY.md"
}

pack() {
  local dirs=() name
  for name in "${NAMES[@]}"; do [[ -d $OUT/$name ]] && dirs+=("$name"); done
  # Without trainer output folders: checkpoints, if a trainer wrote any, would take the tarball past what comes back.
  tar -czf "$OUT/.gpu_check.tar.gz.tmp" -C "$OUT" --exclude=_trainer SUMMARY.md stages.tsv "${dirs[@]}" \
    && mv "$OUT/.gpu_check.tar.gz.tmp" "$OUT/gpu_check.tar.gz"
}

# run_stage NAME CAP RESERVED: RESERVED is what the selected stages after it are owed.
run_stage() {
  local name=$1 cap=$2 reserved=$3
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  local limit=$(( cap < left ? cap : left ))
  (( left - reserved > limit )) && limit=$(( left - reserved ))
  if (( limit < 10 )); then
    log "SKIP  $name: only ${left}s of the budget left"
    printf '%s\tskipped\t0\t0\n' "$name" >> "$OUT/stages.tsv"
    return 0
  fi
  local dir=$OUT/$name
  rm -rf "$dir" && mkdir -p "$dir"
  log "START $name (timeout ${limit}s, cap ${cap}s)"
  local t0=$(date +%s)
  timeout --kill-after=15 "$limit" bash "$SCRIPT" --stage "$name" "$dir" 2>&1 | while IFS= read -r line; do
    echo "[$(date -u +%H:%M:%S)] $name | $line"
  done | tee "$dir/log.txt"
  local rc=${PIPESTATUS[0]}
  local secs=$(( $(date +%s) - t0 ))
  if (( rc == 124 || rc == 137 )); then
    log "TIMEOUT $name after ${secs}s"
  else
    log "END   $name exit $rc after ${secs}s"
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$limit" >> "$OUT/stages.tsv"
}

for i in "${!NAMES[@]}"; do
  name=${NAMES[i]}
  [[ -n ${SELECTED[$name]:-} ]] || continue
  reserved=0
  for (( j = i + 1; j < ${#NAMES[@]}; j++ )); do
    [[ -n ${SELECTED[${NAMES[j]}]:-} ]] && reserved=$(( reserved + CAPS[j] ))
  done
  if [[ $name == install ]]; then
    rm -rf "$SITE" "$WORK/pythonpath" "$WORK/no-pip-install"
    touch "$WORK/pythonpath"
  fi
  run_stage "$name" "${CAPS[i]}" "$reserved"
  if [[ $name == install && -s $WORK/pythonpath ]]; then
    PYTHONPATH=$(paste -sd: "$WORK/pythonpath")${PYTHONPATH:+:$PYTHONPATH}
    export PYTHONPATH
    log "PYTHONPATH=$PYTHONPATH"
  fi
  write_summary
  pack || log "could not write $OUT/gpu_check.tar.gz"
done

log "done: $OUT/SUMMARY.md, all of it in $OUT/gpu_check.tar.gz"
failed=$(tail -n +2 "$OUT/stages.tsv" | awk -F'\t' '$2 != "0" && $2 != "skipped"' | wc -l)
log "$failed stage(s) failed or timed out"
if [[ -n $OUT_FROM_ENV && ${GPU_CHECK_KEEP_DIRS:-0} != 1 && -f $OUT/gpu_check.tar.gz ]]; then
  for name in "${NAMES[@]}"; do rm -rf "${OUT:?}/$name"; done
fi
exit $(( failed > 0 ? 1 : 0 ))
