#!/usr/bin/env bash
# The GPU checks in one run, on a machine with a CUDA GPU, torch and cupy (no TensorFlow needed): build the
# extension, run the GPU tests and the CPU tests of the GPU package, run the GPU latency benchmark, and print
# a short table last. Bounded to 8 minutes: build 2, tests 3, benchmark 3 at most.
#
#   bash bench/gpu_check.sh            # logs and JSON under $OUT (or a temp folder)
#
# Offline machines: the protocol descriptor set (src/kernelport/protocol/kernelport_protos.desc) must exist or
# grpcio-tools be importable; wheels in .whl/ (tritonclient and what it needs) are installed to a temp folder
# first, for the gRPC CUDA shared-memory test (skipped without tritonclient).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
t0=$(date +%s)
status=0

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/kp-gpu-site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/kp-gpu-site"
fi

echo "== build ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -4
if [ ! -f src/kernelport/protocol/kernelport_protos.desc ]; then
  timeout 60 "$PY" setup.py -q build_py >"$OUT/build_py.log" 2>&1 || { echo "protos: no descriptor set and no grpcio-tools"; tail -5 "$OUT/build_py.log"; exit 2; }
fi
if ! timeout 120 "$PY" setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1; then
  echo "build failed:"; tail -20 "$OUT/build.log"; exit 2
fi
t_build=$(( $(date +%s) - t0 ))

echo "== GPU tests"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rs --timeout 150 \
  tests/test_gpu_paths.py tests/test_ipc_handles.py tests/test_device_pools.py 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
[ "$tests_rc" -eq 0 ] || status=1
t_tests=$(( $(date +%s) - t0 - t_build ))

echo "== GPU latency benchmark"
timeout 180 "$PY" bench/gpu_latency.py --iterations 1000 --big-iterations 200 --json "$OUT/gpu_latency.json" \
  2>&1 | tee "$OUT/gpu_latency.log"
bench_rc=${PIPESTATUS[0]}
[ "$bench_rc" -eq 0 ] || status=1
t_total=$(( $(date +%s) - t0 ))

echo
echo "== summary (build ${t_build}s, tests ${t_tests}s, total ${t_total}s; logs in $OUT)"
echo "tests: $(grep -E '(passed|failed|error)' "$OUT/gpu_tests.log" | tail -1) (exit $tests_rc)"
"$PY" - "$OUT/gpu_latency.json" "$bench_rc" <<'PYEOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    print(f"benchmark: no result (exit {sys.argv[2]})")
    sys.exit(0)
print(f"benchmark on {r['gpu']} (exit {sys.argv[2]}):")
print(f"{'row':<58} {'p50 us':>9} {'p99 us':>9}  figure")
for x in r["rows"]:
    print(f"{x['row']:<58} {x['p50_us']:>9.1f} {x['p99_us']:>9.1f}  {x['figure']}")
PYEOF
exit $status
