#!/usr/bin/env bash
# GPU evidence for ddpm-fast. A lent session has 15 minutes of device time in all, machine start
# (1-2 min) and transfers included (docs/DESIGN.md, "Time budgets"), so:
#
#   bash benchmarks/gpu_suite.sh              call 1, at most 7 minutes (SUITE_BUDGET_S, default 400 s)
#   bash benchmarks/gpu_suite.sh --fidelity   call 2, at most 4 minutes (default 220 s)
#   bash benchmarks/gpu_suite.sh --dali       only where it fits: DALI is not on the GPU image
#   bash benchmarks/gpu_suite.sh --quick      a ~2-minute subset: versions, ceilings, a few micro-benchmarks
#   ... --dry-run                             print the plan, each step with its cap; exit 3 if the caps
#                                             and the summary's reserve exceed the budget
#
# Default, in the order that earns the most if the call is cut short: versions; ceilings (copy GB/s,
# bf16 matmul TFLOP/s); build the CUDA extension (sm_90a); the GPU tests (pytest -m gpu: a wrong
# kernel makes every later number moot); the epoch benchmark (reference, then bf16 eager, then
# compiled, each row written as it finishes, compile time apart, so a slow compile still leaves the
# eager figures); sampling (256 images, DDPM-1000 against the default few-step sampler); the kernel
# micro-benchmarks at the anime64 shapes; a torch.profiler breakdown of a training and a sampling
# step. --fidelity: python -m benchmarks.fidelity ("learning unchanged"), reference and fast path
# from one seed and the fast path from a second (the yardstick), anime64, batch 128, 400 steps each;
# the GPU image has no Inception weights, so each run's samples come back as a compressed uint8 file
# and `python -m benchmarks.fidelity --combine ... --kid-samples N` scores them on the CPU machine.
#
# Every step runs under `timeout`, its cap shrunk to what is left of the call's budget less the
# summary's reserve; a step with too little left is recorded as skipped; a failing or timed-out
# step is recorded and the suite goes on. After every step the modules' JSON (each in an OUT folder
# of its own) is joined into $OUT/gpu_suite.json, beside the full log (else in benchmarks/results/),
# so a call cut off from outside still returns what finished; the summary table comes last.
# `python -m benchmarks.report gpu_suite.json` turns it into RESULTS.md and the backend table.
# $OUT returns at most 8 files: the log, the JSON and (--fidelity) three runs' JSON and samples.
set -u

MODE=full DRY=0
for arg in "$@"; do
  case "$arg" in
    --quick) MODE=quick ;;
    --dali) MODE=dali ;;
    --fidelity) MODE=fidelity ;;
    --dry-run) DRY=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
RESULTS=${OUT:-$ROOT/benchmarks/results}
case $MODE in  # the whole call's budget, leaving room under its device-call limit
  fidelity) BUDGET=${SUITE_BUDGET_S:-220} ;;
  *) BUDGET=${SUITE_BUDGET_S:-400} ;;
esac
RESERVE=20  # seconds kept for the summary after the last step
START=$(date +%s)
PLANNED=0  # --dry-run: the sum of the step caps
WORK="<work dir>"
if [ "$DRY" = 0 ]; then
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/ddpm_gpu_suite.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT  # everything worth keeping is joined into the JSON at the end
  mkdir -p "$RESULTS"
  exec > >(tee "$RESULTS/gpu_suite.log") 2>&1  # the whole log beside the JSON: the reply keeps only a tail
fi
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
# one inductor cache for every torch.compile of the run, so repeated shapes compile once
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor}

record() {  # record NAME RC SECONDS CAP STATUS COMMAND: one row of $WORK/steps.tsv
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$WORK/steps.tsv"
}

# step NAME CAP_SECONDS CMD...: run CMD under timeout, log to $WORK/NAME.log, record its row. The
# cap shrinks to what is left of the budget; with too little left the step is recorded as skipped
# rather than run, so the summary still comes back.
step() {
  local name=$1 cap=$2
  shift 2
  if [ "$DRY" = 1 ]; then
    printf '[plan] %-22s cap %4ss: %s\n' "$name" "$cap" "$*"
    PLANNED=$((PLANNED + cap))
    return 0
  fi
  local left=$((BUDGET - ($(date +%s) - START) - RESERVE))
  if [ "$left" -lt 15 ]; then
    echo "=== $name: skipped, suite time budget spent"
    record "$name" 0 0 "$cap" skipped "$*"
    return 0
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "=== $name (cap ${cap}s): $*"
  local t0 rc status
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$cap" "$@" 2>&1 | tee "$WORK/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  record "$name" "$rc" "$(awk "BEGIN { print $(date +%s.%N) - $t0 }")" "$cap" "$status" "$*"
  echo "=== $name: $status (rc $rc)"
  "$PY" -m benchmarks.report --assemble "$WORK" --out "$RESULTS/gpu_suite.json" --partial >/dev/null 2>&1 || true
}

note() {  # note NAME MESSAGE: a step that is not run, with the reason (recorded like a step)
  if [ "$DRY" = 1 ]; then
    printf '[plan] %-22s %s\n' "$1" "$2"
  else
    echo "=== $1: $2"
    echo "$2" >"$WORK/$1.log"
    record "$1" 0 0 0 skipped "$2"
  fi
}

micro() {  # micro NAME CAP FILE [pytest args...]: one micro-benchmark file, its rows in micro_NAME.json
  local name=$1 cap=$2 file=$3
  shift 3
  step "micro_$name" "$cap" env DDPM_BENCH_JSON="$WORK/micro_$name.json" \
    "$PY" -m pytest "benchmarks/$file" -q -p no:cacheprovider --benchmark-disable "$@"
}

step env 10 bash -c "nvidia-smi; nvcc --version | tail -2; $PY -c 'import sys, torch, triton; \
print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
\"triton\", triton.__version__); print(\"gpu\", torch.cuda.get_device_name(), torch.cuda.get_device_capability())'"

BUILD=("$PY" -m pip install --no-build-isolation --no-deps --no-index -e .)
FIDELITY=(--preset anime64 --image-size 64 --batch-size 128 --steps 400 --lr 2e-4 --warmup 100 --compile none
          --save-samples 500)
CHECK_EXT="import torch, ddpm_fast._C; print('extension ops:', sorted(n for n in dir(torch.ops.ddpm_fast) if not n.startswith('_')))"

case $MODE in
  dali)
    step build 40 env DDPM_FAST_NO_EXTENSION=1 "${BUILD[@]}"
    if [ "$DRY" = 1 ] || "$PY" -c "import nvidia.dali" 2>/dev/null; then
      step dali 300 env OUT="$WORK/dali" "$PY" -m benchmarks.data_loading
    else
      note dali "DALI is not installed on this machine: carry its wheels in (nvidia-dali-cuda130), then rerun --dali"
    fi
    ;;
  fidelity)
    # The comparison runs the reference ops: no CUDA extension build, so the time goes to training.
    step build 30 env DDPM_FAST_NO_EXTENSION=1 "${BUILD[@]}"
    step fidelity 160 env OUT="$WORK/fidelity" "$PY" -m benchmarks.fidelity "${FIDELITY[@]}" \
      --runs reference:0,fast:0,fast:1
    # each finished run's JSON and samples beside the suite's, for a later --combine with KID
    [ "$DRY" = 1 ] || cp "$WORK"/fidelity/fidelity-run-*.json "$WORK"/fidelity/fidelity-samples-*.npz \
      "$RESULTS"/ 2>/dev/null || true
    ;;
  quick)
    # ddpm_fast.kernels exists only once installed (package_dir maps kernels/ there): a quick
    # editable install without the extension, so the Triton rows are measured
    step build 60 env DDPM_FAST_NO_EXTENSION=1 "${BUILD[@]}"
    step ceilings 60 "$PY" -m benchmarks.ceilings --json "$WORK/ceilings.json"
    micro sampling 45 test_bench_sampling_update.py
    micro attention 60 test_bench_attention.py -k "128x4x1024x64"
    micro group_norm 60 test_bench_group_norm.py -k "not compile and (C64_64x64 or C256_8x8)"
    ;;
  full)
    step ceilings 20 "$PY" -m benchmarks.ceilings --json "$WORK/ceilings.json"
    step build 75 "${BUILD[@]}"
    step extension 10 "$PY" -c "$CHECK_EXT"
    # The GPU tests first: a wrong kernel or a crashing graph path makes every number after it moot.
    # Only -m gpu (the CPU-only tests are CI's; the slow "learning unchanged" test included: CI has
    # no CUDA, so it runs here or nowhere), over 4 workers with pytest-xdist (on the GPU image: ~150
    # Triton compiles to spread), a hung test cut at 120 s with pytest-timeout (also there); no -x:
    # one failure should not hide the others in a call that cannot be repeated cheaply.
    PYTEST_EXTRA=()
    if [ "$DRY" = 0 ]; then
      "$PY" -c "import xdist" 2>/dev/null && PYTEST_EXTRA+=(-n 4 --dist loadfile)
      "$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_EXTRA+=(--timeout 120)
    fi
    step tests 110 "$PY" -m pytest tests -m gpu -q -p no:cacheprovider --durations=15 \
      "${PYTEST_EXTRA[@]}"
    step epoch 60 env OUT="$WORK/epoch" "$PY" -m benchmarks.epoch --quick --paths reference,fast_eager,fast
    step sample 35 env OUT="$WORK/sample" "$PY" -m benchmarks.sample --quick
    micro sampling 10 test_bench_sampling_update.py
    micro attention 15 test_bench_attention.py
    micro group_norm 15 test_bench_group_norm.py
    # Where a step's time goes, the evidence NOTES.md's predictions are checked against; last, as
    # the least needed.
    step profile 20 env OUT="$WORK/profile" "$PY" -m benchmarks.profile_step --steps 3
    ;;
esac

if [ "$DRY" = 1 ]; then
  printf '[plan] %-22s %s\n' summary "$PY -m benchmarks.report --assemble $WORK --out $RESULTS/gpu_suite.json"
  printf '[plan] %-22s %ss of step caps + %ss for the summary; the call stops starting steps at %ss (SUITE_BUDGET_S)\n' \
    total "$PLANNED" "$RESERVE" "$BUDGET"
  if [ $((PLANNED + RESERVE)) -gt "$BUDGET" ]; then
    echo "plan over budget: $PLANNED s of caps + $RESERVE s reserve > $BUDGET s" >&2
    exit 3
  fi
  exit 0
fi
"$PY" -m benchmarks.report --assemble "$WORK" --out "$RESULTS/gpu_suite.json"
echo "suite: $(($(date +%s) - START)) s, mode $MODE"
