#!/usr/bin/env bash
# The device-machine run: build, GPU tests, compute-sanitizer, benchmarks. Logs and JSON go to
# $OUT (the device tool brings back at most 8 files, so each stage writes one log).
#
#   scripts/gpu_check.sh [build] [test] [sanitize] [bench] [bench-cpu] [e2e] [executor] [convert] [refit]
#   [assembly] [e2e-warm] [ab] [ab-cold] [ab-load] [engine-load]   (default: build test sanitize bench bench-cpu e2e convert refit;
#   executor is the executor-settings sweep beside the host ceilings; assembly and e2e-warm are parts of
#   bench and e2e; ab, ab-cold and ab-load compare this tree with an older one, interleaved, see ab_setup;
# ab-load times both with bench/ab_load.py, one protocol)
#
# Every bench appends its rows to $OUT/results.jsonl (fold them into bench/results/results.jsonl).
# Environment: PYLOADER_CUDA_ARCHS (default 90 here; release builds use setup.py's default),
# PYTEST_ARGS (extra pytest arguments), TEST_PATHS (the test stage's paths), SANITIZE_PATHS / SANITIZE_K / SANITIZE_TOOLS (the sanitizer's tests, -k and tools), BENCH_ARGS (extra arguments of the bench scripts, e.g. --quick),
# E2E_ARGS, EXECUTOR_ARGS, CONVERT_ARGS (default --cpu), REFIT_ARGS, PYLOADER_COMMIT (the commit recorded in logs and rows),
# AB_OLD (a tarball of the older tree, git archive --prefix=old/, default build/old.tar.gz), AB_OLD_COMMIT,
# AB_ROUNDS (default 4), AB_SIZE_GB (default 16), AB_DEQUANT (set: bench_dequant in the ab stage too), AB_NO_ASSEMBLY (set: no bench_assembly there),
# AB_NO_E2E (set: no warm pyloader bench there), AB_ASSEMBLY_ARGS (bench_assembly's arguments there, default --quick),
# AB_REFIT_ARGS (set: bench_refit there with these arguments), CONVERT_FORMATS (default fp8; e.g. "fp4 int4").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stages=${*:-build test sanitize bench bench-cpu e2e convert refit}
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
  python3 -m pytest ${TEST_PATHS:-tests} -q -rfs ${PYTEST_ARGS:-} > "$OUT/tests.log" 2>&1 || status=1
  tail -3 "$OUT/tests.log" | tee -a "$OUT/summary.txt"
fi

if has sanitize; then
  # The caching allocator would hide out-of-bounds accesses inside pooled blocks.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck}; do
    note "compute-sanitizer --tool $tool (cuda kernel tests)"
    compute-sanitizer --tool "$tool" --error-exitcode 99 --target-processes all \
      python3 -m pytest ${SANITIZE_PATHS:-tests} -q -x -m gpu -k "${SANITIZE_K:-cuda and not 64bit}" -p no:cacheprovider \
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
  python3 bench/bench_dequant.py --results "$OUT/results.jsonl" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1 || status=1
  note "bench_assembly (GPU)"
  python3 bench/bench_assembly.py --results "$OUT/results.jsonl" ${BENCH_ARGS:-} >> "$OUT/bench.log" 2>&1 || status=1
  tail -60 "$OUT/bench.log"
fi

if has assembly; then
  note "bench_assembly (GPU)"
  python3 bench/bench_assembly.py --results "$OUT/results.jsonl" ${BENCH_ARGS:-} >> "$OUT/bench.log" 2>&1 || status=1
  tail -24 "$OUT/bench.log"
fi

if has e2e || has e2e-warm; then
  note "pyloader bench (end to end, warm page cache)"
  python3 -m pyloader bench --results "$OUT/results.jsonl" --plot "$OUT/e2e_warm.png" --tmpdir "${BENCH_TMP:-/tmp}" \
    ${E2E_ARGS:-} > "$OUT/e2e.log" 2>&1 || status=1
  tail -10 "$OUT/e2e.log"
fi
if has e2e; then
  note "pyloader bench (end to end, cold page cache)"
  python3 -m pyloader bench --cold --repeats 1 --results "$OUT/results.jsonl" --tmpdir "${BENCH_TMP:-/tmp}" \
    ${E2E_ARGS:-} >> "$OUT/e2e.log" 2>&1 || status=1
  tail -14 "$OUT/e2e.log"
fi

if has executor; then
  note "bench_executor (pread ceiling, pread + H2D, executor settings sweep)"
  python3 bench/bench_executor.py --results "$OUT/results.jsonl" --dir "${BENCH_TMP:-/tmp}" ${EXECUTOR_ARGS:-} \
    > "$OUT/executor.log" 2>&1 || status=1
  tail -20 "$OUT/executor.log"
fi

if has convert; then
  note "bench_convert (GPU and CPU paths, disk and tmpfs output, common-script baseline)"
  for fmt in ${CONVERT_FORMATS:-fp8}; do
    python3 bench/bench_convert.py --format "$fmt" --results "$OUT/results.jsonl" ${CONVERT_ARGS---cpu} >> "$OUT/convert.log" 2>&1 || status=1
    tail -12 "$OUT/convert.log"
  done
fi

if has refit; then
  note "bench_refit (BF16 buckets -> BF16 and FP8 parameters, per-tensor loops beside)"
  python3 bench/bench_refit.py --results "$OUT/results.jsonl" ${REFIT_ARGS:-} > "$OUT/refit.log" 2>&1 || status=1
  tail -16 "$OUT/refit.log"
fi

if has engine-load; then
  note "bench_engine_load (a several-GB model into transformers: pyloader.from_pretrained beside its own loader)"
  python3 bench/bench_engine_load.py --results "$OUT/results.jsonl" ${ENGINE_ARGS:-} > "$OUT/engine_load.log" 2>&1 || status=1
  tail -6 "$OUT/engine_load.log" | tee -a "$OUT/summary.txt"
fi

if has bench-cpu; then
  note "bench_dequant --cpu"
  python3 bench/bench_dequant.py --cpu --results "$OUT/results.jsonl" >> "$OUT/bench.log" 2>&1 || status=1
  python3 bench/bench_router.py --results "$OUT/results.jsonl" >> "$OUT/bench.log" 2>&1 || status=1
  tail -60 "$OUT/bench.log"
fi

ab_setup() {
  # The older tree (a git archive with prefix old/) built in place and imported through PYTHONPATH,
  # this one through its editable install; one checkpoint for both. Done once a machine.
  [ -f /tmp/ab/ready ] && return 0
  note "ab: build the older tree, write the checkpoint"
  rm -rf /tmp/ab && mkdir -p /tmp/ab && tar xzf "${AB_OLD:-build/old.tar.gz}" -C /tmp/ab || return 1
  [ -d /tmp/ab/old/triton_kernels ] && ln -sfn ../triton_kernels /tmp/ab/old/pyloader/triton_kernels
  (cd /tmp/ab/old && PYLOADER_CUDA_ARCHS=${PYLOADER_CUDA_ARCHS:-90} PYLOADER_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
    python3 setup.py -q build_ext --inplace) >> "$OUT/ab.log" 2>&1 || return 1
  python3 -c "import sys, torch; from pyloader.bench import synthetic_config; from pyloader.synthetic import write_checkpoint
write_checkpoint('/tmp/ab/ck', synthetic_config(float(sys.argv[1]), torch.device('cuda')), shard_bytes=4 << 30)" \
    "${AB_SIZE_GB:-16}" >> "$OUT/ab.log" 2>&1 || return 1
  touch /tmp/ab/ready
}
ab_pair() {  # label, rounds, then the command's arguments after python3 (old tree, then this one; each writes --results)
  local label=$1 rounds=$2; shift 2
  note "ab: $label"
  python3 bench/interleave.py --rounds "$rounds" --results "$OUT/results.jsonl" \
    --run old="cd /tmp/ab/old && PYTHONPATH=/tmp/ab/old PYLOADER_COMMIT=${AB_OLD_COMMIT:-old} python3 $* --results {out}" \
    --run new="PYTHONPATH=$PWD PYLOADER_COMMIT=${PYLOADER_COMMIT:-new} python3 $* --results {out}" \
    >> "$OUT/ab.log" 2>&1 || status=1
}
if has ab || has ab-cold || has ab-load; then
  ab_setup || { note "ab setup failed"; tail -20 "$OUT/ab.log"; exit 1; }
fi
if has ab; then  # this tree against an older one, interleaved round by round
  [ -z "${AB_NO_E2E:-}" ] && ab_pair "pyloader bench, warm" "${AB_ROUNDS:-4}" -m pyloader bench --checkpoint /tmp/ab/ck --no-peers --repeats 3
  [ -z "${AB_NO_ASSEMBLY:-}" ] && ab_pair "bench_assembly" 2 bench/bench_assembly.py ${AB_ASSEMBLY_ARGS:---quick}
  [ -n "${AB_DEQUANT:-}" ] && ab_pair "bench_dequant" 2 bench/bench_dequant.py --quick
  [ -n "${AB_REFIT_ARGS:-}" ] && ab_pair "bench_refit" 2 bench/bench_refit.py $AB_REFIT_ARGS
fi
if has ab-load; then  # the same load protocol for both trees (their pyloader bench methods differ)
  ab_pair "pyloader.load, warm" "${AB_ROUNDS:-4}" "$PWD/bench/ab_load.py" --checkpoint /tmp/ab/ck --loads 5
  ab_pair "pyloader.load, cold" 2 "$PWD/bench/ab_load.py" --checkpoint /tmp/ab/ck --loads 2 --cold
fi
if has ab-cold; then
  ab_pair "pyloader bench, cold" 2 -m pyloader bench --checkpoint /tmp/ab/ck --no-peers --cold --repeats 1
fi
if has ab || has ab-cold || has ab-load; then
  grep -B1 -A30 "gbps_median" "$OUT/ab.log" | tail -120
fi

python3 bench/check_rows.py "$OUT" --results "$OUT/results.jsonl" > /dev/null 2>&1 || true  # tests and sanitizer as rows
note "done, status $status"
cat "$OUT/summary.txt"
exit $status
