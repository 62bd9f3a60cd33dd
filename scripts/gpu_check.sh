#!/usr/bin/env bash
# The device-machine run: build, GPU tests, compute-sanitizer, benchmarks. Logs and JSON go to
# $OUT (the device tool brings back at most 8 files, so each stage writes one log).
#
#   scripts/gpu_check.sh [build] [test] [sanitize] [bench] [bench-cpu] [e2e] [executor] [convert]
#   [variants] [register] [assembly] [e2e-warm]   (default: all but executor, variants and register, the
#   experiments; assembly and e2e-warm are parts of bench and e2e)
#
# Environment: PYLOADER_CUDA_ARCHS (default 90 here; release builds use setup.py's default),
# PYTEST_ARGS (extra pytest arguments), BENCH_ARGS (extra arguments of the bench scripts, e.g. --quick),
# E2E_ARGS, EXECUTOR_ARGS, CONVERT_ARGS (default --cpu), PYLOADER_COMMIT (the commit recorded in logs and JSON).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stages=${*:-build test sanitize bench bench-cpu e2e convert}
status=0
has() { [[ " $stages " == *" $1 "* ]]; }
note() { echo "== $(date +%T) $*" | tee -a "$OUT/summary.txt"; }

# Peer loaders, carried as wheels (.whl/, see ../shared/docs/anchors.md): installed aside, never into the project.
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/peers-site .whl/*.whl > /dev/null 2>&1 \
    && export PYTHONPATH=/tmp/peers-site${PYTHONPATH:+:$PYTHONPATH}
fi

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; nvcc --version | tail -1;
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; echo "commit ${PYLOADER_COMMIT:-unknown: set PYLOADER_COMMIT, this copy of the tree can carry a stale .git}"; } \
  > "$OUT/summary.txt" 2>&1

if has build; then
  note "build"
  PYLOADER_CUDA_ARCHS=${PYLOADER_CUDA_ARCHS:-90} PYLOADER_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
    python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
    || { note "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
  python3 -c 'import pyloader._C as C; assert C.cuda_built and C.device_count() > 0, "extension not usable"' \
    >> "$OUT/build.log" 2>&1 || { note "EXTENSION NOT USABLE"; tail -5 "$OUT/build.log"; exit 1; }
fi

if has test; then
  note "pytest (all tests, GPU included)"
  python3 -m pytest tests -q -rfs ${PYTEST_ARGS:-} > "$OUT/tests.log" 2>&1 || status=1
  tail -3 "$OUT/tests.log" | tee -a "$OUT/summary.txt"
fi

if has sanitize; then
  # The caching allocator would hide out-of-bounds accesses inside pooled blocks.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  for tool in memcheck racecheck initcheck; do
    note "compute-sanitizer --tool $tool (cuda kernel tests)"
    compute-sanitizer --tool "$tool" --error-exitcode 99 --target-processes all \
      python3 -m pytest tests -q -x -m gpu -k "cuda and not 64bit" -p no:cacheprovider \
      > "$OUT/sanitize_$tool.tmp" 2>&1
    rc=$?
    { echo "===== $tool"; cat "$OUT/sanitize_$tool.tmp"; } >> "$OUT/sanitize.log"
    tail -2 "$OUT/sanitize_$tool.tmp" | tee -a "$OUT/summary.txt"
    grep -m3 -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitize_$tool.tmp" | tee -a "$OUT/summary.txt"
    rm -f "$OUT/sanitize_$tool.tmp"
    [ $rc -eq 0 ] || { status=1; note "$tool: exit $rc"; }
  done
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
fi

if has bench; then
  note "bench_dequant (GPU)"
  python3 bench/bench_dequant.py --json "$OUT/bench.json" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1 || status=1
  note "bench_assembly (GPU)"
  python3 bench/bench_assembly.py --json "$OUT/bench.json" ${BENCH_ARGS:-} >> "$OUT/bench.log" 2>&1 || status=1
  tail -60 "$OUT/bench.log"
fi

if has assembly; then
  note "bench_assembly (GPU)"
  python3 bench/bench_assembly.py --json "$OUT/bench.json" ${BENCH_ARGS:-} >> "$OUT/bench.log" 2>&1 || status=1
  tail -24 "$OUT/bench.log"
fi

if has e2e || has e2e-warm; then
  note "pyloader bench (end to end, warm page cache)"
  python3 -m pyloader bench --json "$OUT/bench.json" --plot "$OUT/e2e_warm.png" --tmpdir "${BENCH_TMP:-/tmp}" \
    ${E2E_ARGS:-} > "$OUT/e2e.log" 2>&1 || status=1
  tail -10 "$OUT/e2e.log"
fi
if has e2e; then
  note "pyloader bench (end to end, cold page cache)"
  python3 -m pyloader bench --cold --repeats 1 --json "$OUT/bench.json" --tmpdir "${BENCH_TMP:-/tmp}" \
    ${E2E_ARGS:-} >> "$OUT/e2e.log" 2>&1 || status=1
  tail -14 "$OUT/e2e.log"
fi

if has variants; then
  note "dequant kernel-shape experiment (bench/kernels/dequant_variants.cu)"
  nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/dequant_variants bench/kernels/dequant_variants.cu > "$OUT/variants.log" 2>&1 \
    && { /tmp/dequant_variants 16384 16384; /tmp/dequant_variants 129280 7168; /tmp/dequant_variants 2048 7168; } \
    >> "$OUT/variants.log" 2>&1 || status=1
  cat "$OUT/variants.log"
fi

if has executor; then
  note "bench_executor (pread ceiling, pread + H2D, executor settings sweep)"
  python3 bench/bench_executor.py --json "$OUT/executor.json" --dir "${BENCH_TMP:-/tmp}" ${EXECUTOR_ARGS:-} \
    > "$OUT/executor.log" 2>&1 || status=1
  tail -20 "$OUT/executor.log"
fi

if has register; then
  note "probe_register (cudaHostRegister of page-cache mappings: rates, overlap with copies and readers)"
  python3 bench/probe_register.py --json "$OUT/register.json" ${REGISTER_ARGS:-} > "$OUT/register.log" 2>&1 || status=1
  tail -24 "$OUT/register.log"
fi

if has convert; then
  note "bench_convert (GPU and CPU paths, disk and tmpfs output, common-script baseline)"
  python3 bench/bench_convert.py --json "$OUT/bench.json" ${CONVERT_ARGS---cpu} > "$OUT/convert.log" 2>&1 || status=1
  tail -12 "$OUT/convert.log"
fi

if has bench-cpu; then
  note "bench_dequant --cpu"
  python3 bench/bench_dequant.py --cpu --json "$OUT/bench.json" >> "$OUT/bench.log" 2>&1 || status=1
  python3 bench/bench_router.py --json "$OUT/bench.json" >> "$OUT/bench.log" 2>&1 || status=1
  python3 bench/probe_cpu_dequant.py --json "$OUT/bench.json" >> "$OUT/bench.log" 2>&1 || status=1
  python3 bench/probe_cpu_gather.py --json "$OUT/bench.json" >> "$OUT/bench.log" 2>&1 || status=1
  python3 bench/probe_gc_pause.py --json "$OUT/bench.json" >> "$OUT/bench.log" 2>&1 || status=1
  tail -60 "$OUT/bench.log"
fi

note "done, status $status"
cat "$OUT/summary.txt"
exit $status
