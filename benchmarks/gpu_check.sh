#!/usr/bin/env bash
# The GPU slot's plan, as two calls of the device tool with room to rerun: a GPU session has 15 minutes, machine
# start included, and a command killed at its limit loses whatever it did not write where the tool reads it back.
#
#   bash benchmarks/gpu_check.sh --call 1   # ~5 min: build, environment and fp32 GEMM probe, the step profiler, the
#                                           # fused-linear rows (dpo_kernels, low), the loss op, a representative
#                                           # selection of the CUDA tests. Device timeout_s: 360.
#   bash benchmarks/gpu_check.sh --call 2   # ~4 min: build (seconds on the still-warm machine), the rest of the CUDA
#                                           # tests, the memory profile to T = 65536, the logits path at
#                                           # [4·4096, 128256], the loss op at B = 8…65536, the shared-prompt step,
#                                           # the ranked-group step (K = 4, 8 against their pairs),
#                                           # then the peers from the carried wheels (carry .whl).
#                                           # Device timeout_s: 300.
#   bash benchmarks/gpu_check.sh --rerun bench-linear,cuda-tests-sample
#                                           # the named stages in plan order, after build (and wheels, for peers):
#                                           # what a failed call spends the next call on. timeout_s: `--list` budget
#                                           # plus 60.
#   bash benchmarks/gpu_check.sh            # both calls in one run (a machine without the 10-minute command limit)
#   ... --cpu-smoke                          # the same plan on a CPU at tiny sizes, no build (combine with the above)
#   ... --list                               # the selected stages with their caps, and the budget
#   bash benchmarks/gpu_check.sh --cuda-home # the CUDA toolkit the build would use, and why
#
# Each call's stages run in the order of STAGES below, most informative first, so that whatever a cut takes is the
# least needed; peers last, since they were measured on this H200 before this package existed. Each stage runs under
# `timeout`: it gets its cap, plus whatever earlier stages left unused as long as the caps of the stages after it
# still fit in the budget; with less budget than the caps, the later stages are the ones cut. The caps of each call
# add up to its budget (tests/tooling checks it); timeout_s is the budget plus 60 s, so the script ends itself and
# packs what it has.
#
# Results: after every stage $OUT/SUMMARY.md (the probe's branch, the table of stages, each stage's Markdown and text
# files, the --rerun line for what failed), $OUT/stages.tsv and $OUT/gpu_check.tar.gz (all of it, stage folders
# included) are rewritten, so a cut run keeps what finished. When OUT comes from the environment (the device tool
# sets it, and brings back at most 8 files, at most 2 folders down) the stage folders live in $GPU_CHECK_WORK and
# only those three files are in $OUT: fetch gpu_check.tar.gz; GPU_CHECK_KEEP_DIRS=1 keeps the folders in $OUT.
# Without OUT: benchmarks/results/<date>-<gpu>/<call-1|call-2|rerun|all>/.
#
# build builds the extension (pip install -e ., with CUDA_HOME resolved by setup.py's resolve_cuda_home); where pip
# refuses to install into the interpreter (PEP 668, "externally-managed-environment", or no pip) it builds in place
# and puts the checkout on PYTHONPATH. wheels installs the carried wheels (`make gpu-wheels`, carry .whl; the pins
# come from dpo_kernels/bench/peers.py): a wheel that does not install costs only the rows that need it, logged by
# name, and the stage exits 3; without pip into the interpreter they go into $GPU_CHECK_WORK/site, on PYTHONPATH.
#
# The CUDA tests: the tests whose id matches GPU_CHECK_TESTS_K (default "triton or cuda": the Triton-backend and
# CUDA-device parametrizations and the Triton test modules, wherever they live under tests/; not slow, not
# tests/tooling). Call 1 runs a sample: one test per test function first, then round by round one test for each
# parameter value not yet covered (each dtype, each flag, each size of each function), up to GPU_CHECK_SAMPLE_MAX
# (default 40). The size comes from the compile count: a test's time on the GPU machine is mostly its Triton compiles,
# estimated at 1-2 per test and about 1 s each on 16 cores, so 40 tests and the collection (~15 s) fit the 60 s cap.
# Call 2 runs the rest: the same collection less the same sample.
#
# Environment knobs: PYTHON (default: the first of python3, python that imports torch), OUT, GPU_CHECK_BUDGET_S (the
# selected plan's budget; default its caps' sum), GPU_CHECK_TESTS_K, GPU_CHECK_SAMPLE_MAX, GPU_CHECK_WHEELS (the wheel
# folder, default .whl), GPU_CHECK_WORK (scratch: the wheel target, build logs, stage folders; default
# $TMPDIR/dpo_kernels_gpu_check), GPU_CHECK_KEEP_DIRS, MAX_JOBS (build jobs, default nproc).
set -uo pipefail
SCRIPT=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$0")/.."
REPO=$(pwd)

# stage, its cap in call 1 and in call 2, in seconds ("-": not in that call). Each column adds up to CALL_BUDGETS.
STAGES=(
  "build                75  40"
  "environment          15   -"
  "profile              90   -"
  "bench-linear         45   -"
  "loss-op              15   -"
  "cuda-tests-sample    60   -"
  "cuda-tests-rest       -  30"
  "memory                -  20"
  "bench-logits          -  15"
  "bench-loss            -  15"
  "shared-prompt         -  10"
  "group                 -  30"
  "compile               -  15"
  "wheels                -  10"
  "bench-linear-peers    -  25"
  "memory-peers          -  10"
  "bench-logits-peers    -  10"
  "trl-step              -  10"
)
CALL_BUDGETS=(300 240)
CALL_TIMEOUTS=(360 300)  # the device tool's timeout_s for each call: its budget plus 60 s
# A stage function's exit status when what it runs is not in this tree yet: recorded as "absent", not a failure.
ABSENT=79
NAMES=()
CAPS1=()
CAPS2=()
for entry in "${STAGES[@]}"; do
  read -r name cap1 cap2 <<< "$entry"
  NAMES+=("$name")
  CAPS1+=("$cap1")
  CAPS2+=("$cap2")
done

usage() {
  echo "usage: $0 [--call 1|2|all | --rerun STAGE,STAGE...] [--cpu-smoke] [--list] | --cuda-home" >&2
  echo "stages: ${NAMES[*]}" >&2
  exit 2
}

MODE=run
CALL=all
RERUN=
SMOKE=${_GPU_CHECK_SMOKE:-0}
while (( $# > 0 )); do
  case $1 in
    --call) CALL=${2:-}; shift ;;
    --rerun) RERUN=${2:-}; CALL=rerun; shift ;;
    --cpu-smoke) SMOKE=1 ;;
    --list) MODE=list ;;
    --cuda-home) MODE=cuda-home ;;
    --stage) MODE=stage; break ;;  # internal: one stage in a child process, `--stage NAME DIR`
    --pick-sample) MODE=pick; break ;;  # internal: `--pick-sample MAX`, test ids on stdin, the sample on stdout
    *) usage ;;
  esac
  shift
done
[[ $CALL == 1 || $CALL == 2 || $CALL == all || ($CALL == rerun && -n $RERUN) ]] || usage

# The selected plan: PLAN_NAMES with PLAN_CAPS, and BUDGET_S.
index_of() {
  local i
  for i in "${!NAMES[@]}"; do [[ ${NAMES[i]} == "$1" ]] && { echo "$i"; return 0; }; done
  return 1
}
declare -A WANTED=()
if [[ $CALL == rerun ]]; then
  IFS=',' read -r -a rerun_names <<< "$RERUN"
  for name in "${rerun_names[@]}"; do
    index_of "$name" > /dev/null || { echo "unknown stage '$name'" >&2; usage; }
    WANTED[$name]=1
  done
  # A rerun may land on a fresh machine: it builds first, and installs the wheels before any peer stage. A CPU
  # smoke run builds nothing it is not asked to.
  if [[ $SMOKE != 1 ]]; then
    WANTED[build]=1
    wheels_at=$(index_of wheels)
    for name in "${rerun_names[@]}"; do
      (( $(index_of "$name") > wheels_at )) && WANTED[wheels]=1
    done
  fi
fi
PLAN_NAMES=()
PLAN_CAPS=()
for i in "${!NAMES[@]}"; do
  name=${NAMES[i]}
  case $CALL in
    1) cap=${CAPS1[i]} ;;
    2) cap=${CAPS2[i]} ;;
    *) cap=${CAPS1[i]}; [[ $cap == - ]] && cap=${CAPS2[i]} ;;
  esac
  [[ $cap == - ]] && continue
  [[ $CALL == rerun && -z ${WANTED[$name]:-} ]] && continue
  # A smoke run uses the package as installed: no build unless a rerun names it.
  [[ $SMOKE == 1 && $name == build && -z ${WANTED[$name]:-} ]] && continue
  PLAN_NAMES+=("$name")
  PLAN_CAPS+=("$cap")
done
PLAN_SUM=0
for cap in "${PLAN_CAPS[@]}"; do PLAN_SUM=$(( PLAN_SUM + cap )); done
# A CPU smoke run gets three times the caps: a small shared CPU imports and compiles slower than the GPU machine.
BUDGET_S=${GPU_CHECK_BUDGET_S:-$(( SMOKE == 1 ? 3 * PLAN_SUM : PLAN_SUM ))}

if [[ $MODE == list ]]; then
  echo "budget $BUDGET_S"
  for i in "${!PLAN_NAMES[@]}"; do echo "${PLAN_NAMES[i]} ${PLAN_CAPS[i]}"; done
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

# The CUDA test sample: test ids (pytest's `path::name[params]`) on stdin, at most argv[1] of them on stdout, in
# rounds: round 0 takes each test function's first id; each later round takes, per function, its next id that adds a
# parameter value (a position of the dash-separated params and its value) not yet covered.
read -r -d '' PICKER << 'EOF'
import sys

limit = int(sys.argv[1])
functions = {}
for line in sys.stdin:
    test_id = line.strip()
    if "::" not in test_id:
        continue
    function, _, params = test_id.partition("[")
    functions.setdefault(function, []).append((test_id, params[:-1].split("-") if params else []))
rounds = []
for items in functions.values():
    covered, chosen = set(), []
    for test_id, values in items:
        new = set(enumerate(values)) - covered
        if new or not chosen:
            chosen.append(test_id)
            covered |= new
    rounds.append(chosen)
sample = []
for depth in range(max(map(len, rounds), default=0)):
    sample += [chosen[depth] for chosen in rounds if depth < len(chosen)]
print("\n".join(sample[:limit]))
EOF

if [[ $MODE == pick ]]; then
  "$PYTHON" -c "$PICKER" "$2"
  exit $?
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
  COMPILE_ARGS=(--tiny --device cpu --iters 1)
  LOSS_ARGS=(--device cpu --batch 8 1024)
  SAMPLE_MAX=${GPU_CHECK_SAMPLE_MAX:-3}
  REST_MAX=3  # the interpreter runs a Triton test in seconds to minutes: a smoke run only shows the stage works
else
  BENCH=()
  MEMORY=(--seq-lens 1024,2048,4096,8192,16384,32768,65536 --hidden 4096 --vocab 128256 --pairs 1)
  TRL_ARGS=()
  COMPILE_ARGS=(--device cuda)
  LOSS_ARGS=(--device cuda --batch 8 1024 65536)
  SAMPLE_MAX=${GPU_CHECK_SAMPLE_MAX:-40}
  REST_MAX=
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
    echo "wheels: no wheels in $WHEEL_DIR (make gpu-wheels, and carry .whl): rows of providers not installed are skipped"
    return 0
  fi
  if [[ -e $WORK/no-pip-install ]]; then
    if "$PYTHON" -m pip --version > /dev/null 2>&1; then mode=target; else mode=unzip; fi
  fi
  printf 'wheel\tstatus\tneeded_by\n' > "$dir/wheels.tsv"
  echo "wheels: ${#wheels[@]} wheel(s) from $WHEEL_DIR ($mode)"
  install_with "$mode" "${wheels[@]}" 2>&1 | tee "$WORK/pip.log"
  rc=${PIPESTATUS[0]}
  if (( rc != 0 )) && [[ $mode == env ]] && pip_refused "$WORK/pip.log"; then
    echo "wheels: pip will not install into $PYTHON: the wheels go into $SITE, on PYTHONPATH for the later stages"
    mode=target
    install_with "$mode" "${wheels[@]}" 2>&1
    rc=$?
  fi
  if (( rc == 0 )); then
    for w in "${wheels[@]}"; do printf '%s\tinstalled\t%s\n' "$(basename "$w")" "$(needed_by "$w")" >> "$dir/wheels.tsv"; done
  else
    # One at a time: a wheel that will not install costs only the rows that need it.
    echo "wheels: the wheels did not install together; one at a time"
    for w in "${wheels[@]}"; do
      if install_with "$mode" "$w" 2>&1; then
        printf '%s\tinstalled\t%s\n' "$(basename "$w")" "$(needed_by "$w")" >> "$dir/wheels.tsv"
      else
        failed=$(( failed + 1 ))
        echo "wheels: FAILED $(basename "$w"); lost: $(needed_by "$w")"
        printf '%s\tfailed\t%s\n' "$(basename "$w")" "$(needed_by "$w")" >> "$dir/wheels.tsv"
      fi
    done
  fi
  [[ $mode != env ]] && echo "$SITE" >> "$WORK/pythonpath"
  if (( failed > 0 )); then
    echo "wheels: $failed wheel(s) did not install (see wheels.tsv)"
    return 3
  fi
  return 0
}

build_package() {
  local jobs=${MAX_JOBS:-$(nproc)} rc
  echo "build: building the extension (MAX_JOBS=$jobs, CUDA_HOME=${CUDA_HOME:-unset}: $CUDA_HOME_WHY)"
  MAX_JOBS=$jobs "$PYTHON" -m pip install --no-build-isolation --no-deps -e . 2>&1 | tee "$WORK/pip.log"
  rc=${PIPESTATUS[0]}
  (( rc == 0 )) && return 0
  pip_refused "$WORK/pip.log" || return "$rc"
  echo "build: pip will not install into $PYTHON: building the extension in place, the checkout goes on PYTHONPATH"
  touch "$WORK/no-pip-install"
  MAX_JOBS=$jobs "$PYTHON" setup.py build_ext --inplace || return 1
  echo "$REPO" >> "$WORK/pythonpath"
}

stage_build() {
  build_package || { echo "build: the extension did not build: every stage that imports dpo_kernels fails"; return 1; }
}

stage_wheels() {
  rm -rf "$SITE"
  install_wheels "$1"
}

stage_environment() {
  local dir=$1
  {
    echo "CUDA_HOME=${CUDA_HOME:-unset}: $CUDA_HOME_WHY"
    echo "PYTHON=$PYTHON ($(command -v "$PYTHON")), PYTHONPATH=${PYTHONPATH:-}"
    local changes
    changes=$(git diff --quiet HEAD 2> /dev/null || echo ' (with local changes)')
    echo "commit $(git rev-parse HEAD 2> /dev/null || echo unknown)$changes"
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
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 0)
    print("device", torch.cuda.get_device_name(), f"{props.total_memory / 2**30:.1f} GiB,",
          props.multi_processor_count, "SMs,", f"L2 {l2 / 2**20:.0f} MiB" if l2 else "L2 unknown")
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

# The probe decides the engine's memory and speed (docs/design.md, "The fused linear engine"): say which branch.
if torch.cuda.is_available():
    from dpo_kernels.fused_linear import fp32_gemm

    mm_ok, acc_ok = fp32_gemm._probe(torch.device("cuda"), torch.bfloat16)
    branch = ("fp32-result GEMMs accumulating in place (the planned path)" if mm_ok and acc_ok else
              "fp32-result GEMMs, accumulated in a second step (more memory, slower per chunk)" if mm_ok else
              "GEMMs on upcast fp32 operands (correct, far slower)")
    print(f"fp32 GEMM probe (bf16 operands): fp32 result {'yes' if mm_ok else 'NO'}, in-place fp32 accumulate "
          f"{'yes' if acc_ok else 'NO'}: {branch}")
else:
    print("fp32 GEMM probe: not run (no CUDA device)")
EOF
  } 2>&1 | tee "$dir/environment.txt"
  return "${PIPESTATUS[0]}"
}

stage_profile() {
  local dir=$1 rc
  "${CLI[@]}" bench --ops profile --output-dir "$dir" "${BENCH[@]}" 2>&1 | tee "$WORK/profile.out"
  rc=${PIPESTATUS[0]}
  if (( rc != 0 )) && grep -q "unknown op(s) \['profile'\]" "$WORK/profile.out"; then
    echo "profile: this tree's \`dpo-kernels bench\` has no --ops profile yet; stage skipped" | tee "$dir/note.txt"
    return $ABSENT
  fi
  return "$rc"
}

stage_bench_linear() {
  "${CLI[@]}" bench --ops linear --providers dpo_kernels,dpo_kernels_low --output-dir "$1" "${BENCH[@]}"
}

stage_loss_op() {
  [[ -f benchmarks/bench_dpo_loss.py ]] || { echo "benchmarks/bench_dpo_loss.py is missing"; return 2; }
  "$PYTHON" benchmarks/bench_dpo_loss.py "${LOSS_ARGS[@]}" 2>&1 | tee "$1/loss_op.txt"
  return "${PIPESTATUS[0]}"
}

# The CUDA tests' ids, one a line, into $1/collected.txt, and the sample (see the header) into $1/sample.txt.
collect_cuda_tests() {
  local dir=$1
  "$PYTHON" -m pytest tests -q --collect-only -m "not slow" -k "$TESTS_K" --ignore=tests/tooling -p no:cacheprovider \
    > "$WORK/collect.out" 2>&1
  local rc=$?
  grep '::' "$WORK/collect.out" > "$dir/collected.txt"
  # 5 = nothing selected (a CPU run has no CUDA parametrizations; the Triton ones run in the interpreter)
  if (( rc != 0 && rc != 5 )); then
    cat "$WORK/collect.out"
    return "$rc"
  fi
  "$PYTHON" -c "$PICKER" "$SAMPLE_MAX" < "$dir/collected.txt" > "$dir/sample.txt"
  echo "$(wc -l < "$dir/collected.txt") test(s) collected by -k '$TESTS_K'," \
    "$(grep -c '::' "$dir/sample.txt") in the sample"
}

# run_tests DIR LIST: the tests of LIST (ids, one a line) with a junit report; nothing to run is a pass.
run_tests() {
  local dir=$1 list=$2 ids
  mapfile -t ids < <(grep '::' "$list")
  if (( ${#ids[@]} == 0 )); then
    echo "no tests to run"
    return 0
  fi
  "$PYTHON" -m pytest -q -p no:cacheprovider --durations=10 --junitxml="$dir/junit.xml" "${ids[@]}"
}

stage_cuda_tests_sample() {
  collect_cuda_tests "$1" || return $?
  run_tests "$1" "$1/sample.txt"
}

stage_cuda_tests_rest() {
  collect_cuda_tests "$1" || return $?
  grep -vxF -f "$1/sample.txt" "$1/collected.txt" > "$1/rest.txt"
  if [[ -n $REST_MAX ]]; then
    head -n "$REST_MAX" "$1/rest.txt" > "$WORK/rest.head" && mv "$WORK/rest.head" "$1/rest.txt"
  fi
  echo "$(grep -c '::' "$1/rest.txt") test(s) beyond the sample"
  run_tests "$1" "$1/rest.txt"
}

stage_memory() {
  "${CLI[@]}" profile-memory --providers dpo_kernels,dpo_kernels_low --output-dir "$1" "${MEMORY[@]}"
}

stage_bench_logits() {
  "${CLI[@]}" bench --ops logits --providers dpo_kernels,eager --output-dir "$1" "${BENCH[@]}"
}

stage_bench_loss() {
  "${CLI[@]}" bench --ops loss --output-dir "$1" "${BENCH[@]}"
}

stage_shared_prompt() {
  "${CLI[@]}" bench --ops shared-prompt --output-dir "$1" "${BENCH[@]}"
}

stage_group() {
  # Fewer timed steps than the CPU default: eight shapes, five layouts, two attentions in 30 s (SDPA first; the
  # report is rewritten after each attention, so a cut keeps SDPA's rows).
  "${CLI[@]}" bench --ops group --output-dir "$1" --warmup 1 --iters 3 "${BENCH[@]}"
}

stage_compile() {
  [[ -f benchmarks/compile_check.py ]] || { echo "benchmarks/compile_check.py is missing"; return 2; }
  "$PYTHON" benchmarks/compile_check.py --output-dir "$1" "${COMPILE_ARGS[@]}"
}

stage_bench_linear_peers() {
  "${CLI[@]}" bench --ops linear --providers trl,eager,torch_compile,liger,cce,torch_native,quack --output-dir "$1" "${BENCH[@]}"
}

stage_memory_peers() {
  "${CLI[@]}" profile-memory --providers trl,eager,liger,cce,torch_native,quack --output-dir "$1" "${MEMORY[@]}"
}

stage_bench_logits_peers() {
  "${CLI[@]}" bench --ops logits --providers trl,torch_compile,liger,quack --output-dir "$1" "${BENCH[@]}"
}

stage_trl_step() {
  [[ -f benchmarks/trl_step_timing.py ]] || { echo "benchmarks/trl_step_timing.py is missing"; return 2; }
  "$PYTHON" benchmarks/trl_step_timing.py --output-dir "$1" "${TRL_ARGS[@]}"
}

if [[ $MODE == stage ]]; then
  name=$2
  "stage_${name//-/_}" "$3"
  exit $?
fi

# ---- the run ----

START=$(date +%s)
log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }

case $CALL in
  1 | 2) LABEL=call-$CALL ;;
  *) LABEL=$CALL ;;
esac
OUT_FROM_ENV=${OUT:+1}
if [[ -z "${OUT:-}" ]]; then
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  [[ -n "$gpu" ]] || gpu=$([[ $SMOKE == 1 ]] && echo cpu-smoke || echo unknown-gpu)
  OUT="benchmarks/results/$(date -u +%Y-%m-%d)-$(echo "$gpu" | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//' | tr 'A-Z' 'a-z')/$LABEL"
fi
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
WORK=$(cd "$WORK" && pwd)
SITE=$WORK/site
# Where the stage folders live: beside the three files that come back, or in the scratch folder when the device tool
# reads $OUT back (at most 8 files; the tarball holds the folders).
if [[ -n $OUT_FROM_ENV && ${GPU_CHECK_KEEP_DIRS:-0} != 1 ]]; then
  STAGE_ROOT=$WORK/stages
  rm -rf "$STAGE_ROOT"
else
  STAGE_ROOT=$OUT
fi
mkdir -p "$STAGE_ROOT"
rm -f "$WORK/pythonpath" "$WORK/no-pip-install"
touch "$WORK/pythonpath"
BASE_PYTHONPATH=${PYTHONPATH:-}

resolve_cuda_home
export PYTHON GPU_CHECK_WORK=$WORK PYTHONUNBUFFERED=1 _GPU_CHECK_SMOKE=$SMOKE
printf 'stage\texit\tseconds\ttimeout_s\n' > "$OUT/stages.tsv"
log "gpu_check $LABEL: output in $OUT, budget ${BUDGET_S}s, python $PYTHON, smoke=$SMOKE"
log "stages: ${PLAN_NAMES[*]}"
log "CUDA_HOME=${CUDA_HOME:-unset}: $CUDA_HOME_WHY"

# The stages that failed, timed out or were skipped for want of budget, comma-separated (for the --rerun line).
not_passed() {
  tail -n +2 "$OUT/stages.tsv" | awk -F'\t' '$2 != "0" && $2 != "absent" { print $1 }' | paste -sd, -
}

write_summary() {
  local name f probe again
  probe=$(grep -h "^fp32 GEMM probe" "$STAGE_ROOT"/environment/environment.txt 2> /dev/null)
  again=$(not_passed)
  {
    echo "# gpu_check $LABEL $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - START ))s of ${BUDGET_S}s, smoke=$SMOKE"
    echo
    echo "commit $(git rev-parse --short HEAD 2> /dev/null || echo unknown)"
    [[ -n $probe ]] && echo "$probe"
    echo
    echo '| stage | exit | seconds | timeout |'
    echo '|---|---|---|---|'
    tail -n +2 "$OUT/stages.tsv" | awk -F'\t' '{ printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 }'
    echo
    if [[ -n $again ]]; then
      echo "Failed or not run: $again. Rerun: \`bash benchmarks/gpu_check.sh --rerun $again\`"
      echo "(\`--list\` gives its budget; timeout_s = budget + 60)."
      echo
    fi
    for name in "${PLAN_NAMES[@]}"; do
      [[ -d $STAGE_ROOT/$name ]] || continue
      printf -- '---\n\nStage `%s`:\n\n' "$name"
      for f in "$STAGE_ROOT/$name"/*.md; do
        [[ -f $f ]] && { cat "$f"; echo; }
      done
      for f in "$STAGE_ROOT/$name"/*.txt "$STAGE_ROOT/$name"/*.tsv; do
        case $(basename "$f") in log.txt | collected.txt | sample.txt | rest.txt) continue ;; esac
        [[ -f $f ]] || continue
        printf '## %s: %s\n\n```\n' "$name" "$(basename "$f")"
        cat "$f"
        printf '```\n\n'
      done
    done
  } > "$OUT/.SUMMARY.md.tmp" && mv "$OUT/.SUMMARY.md.tmp" "$OUT/SUMMARY.md"
}

pack() {
  local dirs=() name
  for name in "${PLAN_NAMES[@]}"; do [[ -d $STAGE_ROOT/$name ]] && dirs+=("$name"); done
  # Without trainer output folders: checkpoints, if a trainer wrote any, would take the tarball past what comes back.
  tar -czf "$OUT/.gpu_check.tar.gz.tmp" --exclude=_trainer -C "$OUT" SUMMARY.md stages.tsv \
    -C "$STAGE_ROOT" "${dirs[@]}" && mv "$OUT/.gpu_check.tar.gz.tmp" "$OUT/gpu_check.tar.gz"
}

# run_stage NAME CAP RESERVED: RESERVED is what the stages after it are owed.
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
  local dir=$STAGE_ROOT/$name
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
  elif (( rc == ABSENT )); then
    log "ABSENT $name: not in this tree (see its note)"
    rc=absent
  else
    log "END   $name exit $rc after ${secs}s"
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$limit" >> "$OUT/stages.tsv"
}

for i in "${!PLAN_NAMES[@]}"; do
  name=${PLAN_NAMES[i]}
  reserved=0
  for (( j = i + 1; j < ${#PLAN_NAMES[@]}; j++ )); do reserved=$(( reserved + PLAN_CAPS[j] )); done
  run_stage "$name" "${PLAN_CAPS[i]}" "$reserved"
  # build and wheels name what the later stages import from (PEP 668: the checkout, the wheel folder).
  if [[ -s $WORK/pythonpath ]]; then
    PYTHONPATH=$(paste -sd: "$WORK/pythonpath")${BASE_PYTHONPATH:+:$BASE_PYTHONPATH}
    export PYTHONPATH
    log "PYTHONPATH=$PYTHONPATH"
  fi
  write_summary
  pack || log "could not write $OUT/gpu_check.tar.gz"
done

again=$(not_passed)
log "done: $OUT/SUMMARY.md, all of it in $OUT/gpu_check.tar.gz"
[[ -n $again ]] && log "failed or not run: $again; rerun with: bash benchmarks/gpu_check.sh --rerun $again"
# The exit status counts the stages that failed or timed out; those the budget skipped are only in the rerun line.
failed=$(tail -n +2 "$OUT/stages.tsv" | awk -F'\t' '$2 != "0" && $2 != "absent" && $2 != "skipped"' | wc -l)
exit $(( failed > 0 ? 1 : 0 ))
