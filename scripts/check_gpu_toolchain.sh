#!/usr/bin/env bash
# Opt-in check that fastmerge's GPU code builds against a given CUDA build of torch, on a
# machine WITHOUT a GPU (nothing here runs on a GPU; benchmarks/gpu_check.sh does that):
#
#     bash scripts/check_gpu_toolchain.sh [--out DIR] [--keep] [VENV]
#
# VENV: a virtual environment holding a CUDA build of torch (with its triton), pybind11, ninja,
# numpy, safetensors, pyyaml, tqdm and pytest; default: $VIRTUAL_ENV, else python3 on PATH.
# This script installs nothing and is never run by .ci/run (CI must not pull a CUDA torch).
# Steps, on a copy of the repository (the checkout's own extensions stay as they are):
#   env        torch, torch's CUDA, triton, nvcc, python versions
#   build      fastmerge._C, _core and _cuda (setup.py build_ext --inplace, FASTMERGE_BUILD_CUDA=1,
#              TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX); any compiler warning fails the step
#   import     the three extensions import; _cuda registers CUDA kernels for the three ops
#   triton     every Triton kernel variant compiles for sm_90 (PTX + cubin, triton's ptxas)
#   compile    tests/test_cuda_compile.py (every .cu for sm_80/sm_90 with warnings as errors,
#              the binding against torch's headers, the host harnesses), test_gpu_peel.py,
#              test_gpu_kit.py, test_cuda_backend.py
#   interp     the Triton interpreter tests (TRITON_INTERPRET=1): test_triton_backend.py,
#              test_ops.py, test_sweep_backends.py -k triton
#   kit        bash benchmarks/gpu_check.sh --dry-run with this interpreter
# One summary line per step; exit 0 when every step passed, 1 when one failed, 2 on a usage
# error. Takes ~10 minutes on 2 cores (MAX_JOBS, default 2, bounds parallel compiles).
set -u

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
  cat <<'EOF'

A venv for the torch the GPU machine has (here: torch 2.11.0 + CUDA 13), outside the repository:
    python3 -m venv /path/venv211 && /path/venv211/bin/pip install torch==2.11.0 pybind11 \
        ninja numpy safetensors pyyaml tqdm pytest
EOF
}

die() { echo "check_gpu_toolchain.sh: $*" >&2; exit 2; }

VENV=""
LOGS=""
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --keep) KEEP=1 ;;
    --out) [ $# -ge 2 ] || die "--out needs a directory"; LOGS="$2"; shift ;;
    --out=*) LOGS="${1#--out=}" ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$VENV" ] || die "one VENV only (see --help)"; VENV="$1" ;;
  esac
  shift
done

if [ -n "$VENV" ]; then
  [ -x "$VENV/bin/python" ] || die "VENV $VENV: no $VENV/bin/python (see --help)"
  PY="$(cd "$VENV" && pwd)/bin/python"
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  PY="$VIRTUAL_ENV/bin/python"
else
  PY="$(command -v python3 || true)"
  [ -n "$PY" ] || die "no python3 on PATH and no VENV given (see --help)"
fi
# the venv's scripts (ninja) first, as if it were activated; without ninja the build is serial
PATH="$(dirname "$PY"):$PATH"

TORCH_CUDA="$("$PY" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)" \
  || die "$PY cannot import torch"
[ -n "$TORCH_CUDA" ] || die "$PY has a CPU build of torch; this check needs a CUDA build"

if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then :
elif [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
elif command -v nvcc >/dev/null 2>&1; then
  CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
else die "no nvcc (set CUDA_HOME, or install the CUDA toolkit in /usr/local/cuda)"
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
export CUDA_VISIBLE_DEVICES=""  # nothing may run on a GPU, even where there is one
export PYTHONDONTWRITEBYTECODE=1 MAX_JOBS="${MAX_JOBS:-2}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fm-toolchain.XXXXXX")" || die "cannot make a temp dir"
COPY="$WORK/repo"
[ -n "$LOGS" ] || LOGS="$WORK/logs"
mkdir -p "$COPY" "$LOGS" || die "cannot create $LOGS"
LOGS="$(cd "$LOGS" && pwd)"
cleanup() {
  [ "$KEEP" = 1 ] || rm -rf "$COPY" "$WORK/triton-cache" "$WORK/setup.out"
  rmdir "$WORK" 2>/dev/null || true  # empty when the logs went to --out
}
trap cleanup EXIT

# The repository's files as git sees them (tracked + untracked, not ignored: no .so, no build/)
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  (cd "$ROOT" && git ls-files -z -co --exclude-standard | tar -c --null -T - 2>/dev/null) \
    | tar -x -C "$COPY" || die "cannot copy the repository to $COPY"
else
  (cd "$ROOT" && tar -c --exclude=build --exclude='*.so' --exclude=.venv --exclude=.git .) \
    | tar -x -C "$COPY" || die "cannot copy the repository to $COPY"
fi
cd "$COPY" || exit 2
export PYTHONPATH="$COPY"
export TRITON_CACHE_DIR="$WORK/triton-cache"  # compile every kernel now, not from a past run

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts= -rfE)
FAILED=0
SUMMARY=()

run_step() {  # name, what, then the command; output to LOGS/name.log
  local name="$1" what="$2" t0 rc line
  shift 2
  t0=$(date +%s)
  "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  if [ "$rc" = 0 ]; then
    line="$(printf 'ok      %-8s %4ss  %s' "$name" "$(( $(date +%s) - t0 ))" "$what")"
  else
    FAILED=$((FAILED + 1))
    line="$(printf 'FAILED  %-8s %4ss  %s (exit %s, see %s)' "$name" \
      "$(( $(date +%s) - t0 ))" "$what" "$rc" "$LOGS/$name.log")"
  fi
  SUMMARY+=("$line")
  echo "[toolchain] $line"
}

env_step() {
  "$PY" - <<'EOF'
import platform
import torch
try:
    import triton
    tv = triton.__version__
except Exception as exc:  # reported, and the triton steps fail on their own
    tv = f"not importable ({exc})"
print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda})"
      f" | triton {tv}")
EOF
  nvcc --version | tail -n 2
}

build_step() {
  local out="$WORK/setup.out" rc
  env FASTMERGE_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" "$PY" setup.py build_ext \
    --inplace > "$out" 2>&1
  rc=$?
  cat "$out"
  [ "$rc" = 0 ] || return "$rc"
  # compiler diagnostics: "file:line: warning:" (gcc), "warning #123-D" / "ptxas warning" (nvcc)
  if grep -nE '(: warning|warning #[0-9]+|(nvcc|ptxas|nvlink) warning)' "$out"; then
    echo "compiler warnings above: the build must be warning-free"
    return 1
  fi
  ls fastmerge/_C*.so fastmerge/_core*.so fastmerge/_cuda*.so
}

import_step() {
  "$PY" - <<'EOF'
import os
import sys

import torch

import fastmerge
import fastmerge._C
import fastmerge._core
import fastmerge._cuda

root = os.environ["PYTHONPATH"]
for mod in (fastmerge, fastmerge._C, fastmerge._core, fastmerge._cuda):
    assert os.path.realpath(mod.__file__).startswith(os.path.realpath(root)), mod.__file__
missing = [op for op in ("score_histogram", "model_stats", "fused_merge")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmerge::{op}", "CUDA")]
if missing:
    sys.exit(f"fastmerge._cuda registered no CUDA kernel for {missing}")
print("fastmerge._C, _core, _cuda import from", root, "; CUDA kernels of the three ops registered")
EOF
}

run_step env "versions" env_step
run_step build "_C, _core, _cuda for sm_80 + sm_90 (+PTX), warning-free" build_step
run_step import "import the three extensions" import_step
run_step triton "Triton kernels compile for sm_90" \
  env TRITON_INTERPRET=0 "$PY" -m fastmerge.backends.triton.compile_check --arch 90 --all \
  --many-models --regs
run_step compile "nvcc/PTX compile tests + host harnesses" "${PYTEST[@]}" \
  tests/test_cuda_compile.py tests/test_gpu_peel.py tests/test_gpu_kit.py \
  tests/test_cuda_backend.py
run_step interp "Triton interpreter tests" env TRITON_INTERPRET=1 "${PYTEST[@]}" \
  tests/test_triton_backend.py tests/test_ops.py tests/test_sweep_backends.py -k triton
run_step kit "gpu_check.sh --dry-run" env PYTHON="$PY" bash benchmarks/gpu_check.sh --dry-run

echo
echo "fastmerge GPU toolchain check: $(head -n 1 "$LOGS/env.log" 2>/dev/null)"
echo "  $(grep -m1 -o 'release [0-9.]*, V[0-9.]*' "$LOGS/env.log" 2>/dev/null | sed 's/^/nvcc /')"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
echo "logs: $LOGS$([ "$KEEP" = 1 ] && echo "; built copy: $COPY")"
echo "Nothing ran on a GPU (CUDA_VISIBLE_DEVICES was empty): this checks the build, the" \
  "compiles and the interpreter only; run benchmarks/gpu_check.sh on a GPU machine."
if [ "$FAILED" -gt 0 ]; then
  echo "$FAILED step(s) FAILED"
  exit 1
fi
echo "all ${#SUMMARY[@]} steps passed"
