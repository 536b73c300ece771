#!/usr/bin/env bash
# zray.fit against the engine alone on this machine's GPU, one call: the GPU tests of the fit
# path first, then benchmarks/fit_overhead.py for each CASE (size:seq:micro-batch:stage).
#
#   benchmarks/run_fit_overhead.sh OUTDIR
#
# CASES (space-separated) picks the runs; TESTS=0 skips the tests; REPLICA is passed to
# --replica (default: "default 1": fit as configured, then with a copy forced every step);
# REPEATS is passed to --repeats (interleaved rounds; medians reported); TRAINER=1 adds fit's
# loop without Ray (--trainer); DELAYS (e.g. "0 2 5") is passed to --engine-delays-ms.
# Each case writes OUTDIR/fit_<size>_s<stage>.json; the tables go to stdout.
set -u
out=${1:?usage: run_fit_overhead.sh OUTDIR}
here=$(cd "$(dirname "$0")" && pwd)
cases=${CASES:-"gpt_125m:1024:8:2 gpt_125m:1024:8:3 gpt_1b:2048:8:2 gpt_1b:2048:8:3"}
mkdir -p "$out"
if [ "${TESTS:-1}" = 1 ]; then
  python3 -m pytest -q -p no:cacheprovider "$here/../tests/distributed/test_state_copies_gpu.py" \
    "$here/../tests/cluster/test_fit_gpu.py" 2>&1 | tail -n 30 | tee "$out/gpu_tests.log"
fi
for c in $cases; do
  IFS=: read -r size seq mb stage <<<"$c"
  echo "=== $size seq $seq mb $mb stage $stage" >&2
  python3 "$here/fit_overhead.py" --device cuda --size "$size" --seq "$seq" --micro-batch "$mb" \
    --stage "$stage" --steps "${STEPS:-80}" --warmup "${WARMUP:-20}" \
    --replica ${REPLICA:-default 1} --repeats "${REPEATS:-1}" ${TRAINER:+--trainer} --engine-delays-ms ${DELAYS:-0} --out "$out/fit_${size}_s${stage}.json" 2>&1 |
    grep -v "^(\|^\[\|WARNING\|INFO" | tail -n 12
done
