#!/usr/bin/env bash
# One-command GPU check of fastmerge, for a GPU machine with no network and ~10 minutes:
#
#     bash benchmarks/gpu_check.sh OUTDIR          # run every step, logs + SUMMARY.md in OUTDIR
#     bash benchmarks/gpu_check.sh --dry-run [OUTDIR]   # print the steps, check the tools
#
# Steps (each under its own `timeout`; a failed or timed-out step is recorded and the kit goes
# on to the next, so the whole run stays within ~9 minutes):
#   env      device, driver, torch / triton / nvcc versions           -> env.json, env.log
#   build    fastmerge._cuda in place for this GPU's architecture (setup.py build_ext
#            --inplace: no pip, no downloads, no build isolation)     -> build.log
#   cuda     CUDA backend tests + the conformance suite on "cuda"     -> cuda.log, cuda.xml
#   triton   Triton backend tests + the conformance suite on "triton" -> triton.log, triton.xml
#   large    the opt-in > 2^31-element tests (FASTMERGE_LARGE_TESTS=1) -> large.log, large.xml
#   bench    benchmarks/gpu.py --kit: copy bandwidth, fused merge pass (ties, dare_ties,
#            task_arithmetic; 4096x11008 and 4096x4096 bf16, N = 3) per backend, and a whole
#            streamed merge of generated checkpoints held in host memory -> bench.log/json/md
#   sweep    benchmarks/gpu_sweep.py: `fastmerge sweep` of K = 3 TIES points of generated 0.2B
#            checkpoints on cuda and triton vs 3 `fastmerge merge` runs, each point compared
#            byte for byte with its merge                        -> sweep.log/json/md
#   summary  SUMMARY.md: device, versions, pass/fail counts per suite, the benchmark table,
#            the sweep table
# PYTHON (default python3) picks the interpreter; FM_KIT_SCALE=2 doubles every timeout.
set -u

usage() { echo "usage: bash benchmarks/gpu_check.sh [--dry-run] OUTDIR" >&2; exit 2; }

DRY=0
OUT=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) usage ;;
    -*) echo "gpu_check.sh: unknown option $arg" >&2; usage ;;
    *) [ -z "$OUT" ] || usage; OUT="$arg" ;;
  esac
done
[ "$DRY" = 1 ] || [ -n "$OUT" ] || usage

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
if [ -z "${PYTHON:-}" ] && ! "$PY" -c 'import torch' >/dev/null 2>&1 \
    && python -c 'import torch' >/dev/null 2>&1; then
  PY=python  # the interpreter that has torch
fi
SCALE="${FM_KIT_SCALE:-1}"
# pip installs ninja into the interpreter's scripts folder, which is not on PATH when a venv's
# python is named without activating it; torch then falls back to a serial build (140 s limit).
PY_SCRIPTS="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)"
[ -n "$PY_SCRIPTS" ] && [ -d "$PY_SCRIPTS" ] && export PATH="$PATH:$PY_SCRIPTS"

# Per-step time limits in seconds (sum 10 minutes).
# The Triton step compiles one kernel per specialisation the suites launch (~1-2 s each).
T_ENV=30; T_BUILD=140; T_CUDA=90; T_TRITON=150; T_LARGE=40; T_BENCH=80; T_SWEEP=50
T_SUMMARY=20

# CUDA_HOME: the toolkit whose nvcc builds the extension.
find_cuda_home() {
  if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then echo "$CUDA_HOME"; return; fi
  if [ -x /usr/local/cuda/bin/nvcc ]; then echo /usr/local/cuda; return; fi
  local nvcc
  nvcc="$(command -v nvcc 2>/dev/null)" || return 1
  dirname "$(dirname "$(readlink -f "$nvcc")")"
}
CUDA_HOME_FOUND="$(find_cuda_home || true)"
if [ -n "$CUDA_HOME_FOUND" ]; then
  export CUDA_HOME="$CUDA_HOME_FOUND"
  export PATH="$CUDA_HOME/bin:$PATH"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts= -rfE)
STEPS=(env build cuda triton large bench sweep summary)

step_cmd() {  # the command of a step, as one string (what --dry-run prints)
  case "$1" in
    env) echo "$PY benchmarks/gpu.py --env \"\$OUT\"" ;;
    build) echo "FASTMERGE_BUILD_CUDA=1 FASTMERGE_SKIP_CPU_BUILD=1 TORCH_CUDA_ARCH_LIST=<this GPU> MAX_JOBS=<cores> $PY setup.py build_ext --inplace" ;;
    cuda) echo "${PYTEST[*]} --junitxml=\"\$OUT/cuda.xml\" tests/test_cuda_backend.py tests/test_gpu_peel.py tests/test_ops.py -k cuda" ;;
    triton) echo "${PYTEST[*]} --junitxml=\"\$OUT/triton.xml\" tests/test_triton_backend.py tests/test_gpu_peel.py tests/test_ops.py -k triton" ;;
    large) echo "FASTMERGE_LARGE_TESTS=1 ${PYTEST[*]} --junitxml=\"\$OUT/large.xml\" tests/test_cuda_backend.py tests/test_triton_backend.py -k '2_pow_31 or 2_31'" ;;
    bench) echo "$PY benchmarks/gpu.py --kit \"\$OUT\" --reps 3" ;;
    sweep) echo "$PY benchmarks/gpu_sweep.py \"\$OUT\" --size 0.2b --backends cuda,triton --device cuda" ;;
    summary) echo "$PY benchmarks/gpu.py --summary \"\$OUT\"" ;;
  esac
}

step_limit() {
  local t
  case "$1" in
    env) t=$T_ENV ;; build) t=$T_BUILD ;; cuda) t=$T_CUDA ;; triton) t=$T_TRITON ;;
    large) t=$T_LARGE ;; bench) t=$T_BENCH ;; sweep) t=$T_SWEEP ;; summary) t=$T_SUMMARY ;;
  esac
  echo $((t * SCALE))
}

if [ "$DRY" = 1 ]; then
  echo "fastmerge GPU check (dry run): repository $ROOT"
  echo "steps (each under 'timeout'; a failing step is recorded and the next one runs):"
  total=0
  for s in "${STEPS[@]}"; do
    lim=$(step_limit "$s"); total=$((total + lim))
    printf '  %-8s %4ss  %s\n' "$s" "$lim" "$(step_cmd "$s")"
  done
  echo "  total time bound: ${total}s"
  echo "tools:"
  missing=0
  check() {  # name, found?, detail
    if [ "$2" = 1 ]; then printf '  ok       %-12s %s\n' "$1" "$3"
    else printf '  MISSING  %-12s %s\n' "$1" "$3"; missing=$((missing + 1)); fi
  }
  command -v timeout >/dev/null 2>&1 && check timeout 1 "$(command -v timeout)" \
    || check timeout 0 "coreutils timeout is needed to bound each step"
  if command -v "$PY" >/dev/null 2>&1; then check python 1 "$(command -v "$PY")"
  else check python 0 "set PYTHON"; fi
  tv="$("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())' 2>/dev/null)"
  [ -n "$tv" ] && check torch 1 "$tv" || check torch 0 "torch is not importable by $PY"
  trv="$("$PY" -c 'import triton; print(triton.__version__)' 2>/dev/null)"
  [ -n "$trv" ] && check triton 1 "$trv" || check triton 0 "triton is not importable (the triton steps will fail)"
  [ -n "$CUDA_HOME_FOUND" ] && check nvcc 1 "CUDA_HOME=$CUDA_HOME_FOUND" \
    || check nvcc 0 "no nvcc in /usr/local/cuda or on PATH (the build step will fail)"
  "$PY" -c 'import pytest' 2>/dev/null && check pytest 1 "" || check pytest 0 "pytest is not importable"
  command -v ninja >/dev/null 2>&1 && check ninja 1 "$(command -v ninja)" \
    || check ninja 0 "no ninja on PATH or beside $PY (the build compiles serially and may time out)"
  command -v nvidia-smi >/dev/null 2>&1 && check nvidia-smi 1 "" || check nvidia-smi 0 "(optional: driver version)"
  [ -f benchmarks/make_checkpoints.py ] && check checkpoints 1 "benchmarks/make_checkpoints.py" \
    || check checkpoints 0 "benchmarks/make_checkpoints.py (the streamed merge is skipped without it)"
  echo "dry run: nothing was built or run ($missing missing)"
  exit 0
fi

mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
STEPS_FILE="$OUT/steps.tsv"
printf 'step\trc\tseconds\tlimit\n' > "$STEPS_FILE"
START=$(date +%s)

run_step() {  # name, then the command; output to OUT/name.log, status to steps.tsv
  local name="$1"; shift
  local lim t0 rc
  lim=$(step_limit "$name")
  t0=$(date +%s)
  echo "[gpu_check] $name (limit ${lim}s) ..."
  timeout -k 10 "$lim" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$lim" >> "$STEPS_FILE"
  if [ "$rc" = 0 ]; then echo "[gpu_check] $name ok ($(( $(date +%s) - t0 ))s)"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo "[gpu_check] $name TIMED OUT after ${lim}s"
  else echo "[gpu_check] $name FAILED (exit $rc), see $OUT/$name.log"; fi
  return 0
}

run_step env "$PY" benchmarks/gpu.py --env "$OUT"

ARCH="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)"
CORES="$(nproc 2>/dev/null || echo 4)"
run_step build env FASTMERGE_BUILD_CUDA=1 FASTMERGE_SKIP_CPU_BUILD=1 \
  TORCH_CUDA_ARCH_LIST="${ARCH:-8.0;9.0+PTX}" MAX_JOBS="$CORES" \
  "$PY" setup.py build_ext --inplace

run_step cuda "${PYTEST[@]}" --junitxml="$OUT/cuda.xml" \
  tests/test_cuda_backend.py tests/test_gpu_peel.py tests/test_ops.py -k cuda
run_step triton "${PYTEST[@]}" --junitxml="$OUT/triton.xml" \
  tests/test_triton_backend.py tests/test_gpu_peel.py tests/test_ops.py -k triton
run_step large env FASTMERGE_LARGE_TESTS=1 "${PYTEST[@]}" --junitxml="$OUT/large.xml" \
  tests/test_cuda_backend.py tests/test_triton_backend.py -k "2_pow_31 or 2_31"
run_step bench "$PY" benchmarks/gpu.py --kit "$OUT" --reps 3
run_step sweep "$PY" benchmarks/gpu_sweep.py "$OUT" --size 0.2b --backends cuda,triton \
  --device cuda
run_step summary "$PY" benchmarks/gpu.py --summary "$OUT"

if [ ! -s "$OUT/SUMMARY.md" ]; then  # python itself failed: still leave a summary
  { echo "# fastmerge GPU check"; echo; echo "The summary writer failed; step status:"; echo
    sed 's/^/    /' "$STEPS_FILE"; } > "$OUT/SUMMARY.md"
fi
[ -s "$OUT/sweep.md" ] && cat "$OUT/sweep.md" >> "$OUT/SUMMARY.md"  # the sweep step's table
echo "[gpu_check] done in $(( $(date +%s) - START ))s: $OUT/SUMMARY.md"
cat "$OUT/SUMMARY.md"
