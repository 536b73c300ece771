#!/usr/bin/env bash
# Run benchmarks/gpt_throughput.py for every engine, each in its own torchrun on all local GPUs,
# then the one-GPU pair (plain loop, zray stage 0), then print the table and the checks.
#
#   benchmarks/run_gpt_throughput.sh OUTDIR [flags for gpt_throughput.py ...]
#
# ENGINES (space-separated) picks the multi-GPU engines; ONE_GPU=0 skips the one-GPU pair;
# BASE=DIR also runs zray's stages from another copy of the package (PYTHONPATH=DIR), written as
# OUTDIR/base/*.json, to measure a change against the code before it.
set -u
out=${1:?usage: run_gpt_throughput.sh OUTDIR [flags]}
shift
here=$(cd "$(dirname "$0")" && pwd)
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
engines=${ENGINES:-"ddp fsdp2 zray0 zray1 zray2 zray3 ds1 ds2 ds3"}
mkdir -p "$out"
run() {  # run NPROC ENGINE JSON [flags]
  local n=$1 e=$2 json=$3
  shift 3
  echo "=== $e on $n GPU(s)" >&2
  torchrun --standalone --nproc_per_node "$n" "$here/gpt_throughput.py" --engine "$e" \
    --out "$json" "$@" 2>&1 | grep -v "^\[rank" | tail -n 40 || true
  [ -s "$json" ] || echo "FAILED: $e" >&2
}
for e in $engines; do
  run "$ngpu" "$e" "$out/$e.json" "$@"
done
if [ "${ONE_GPU:-1}" = 1 ]; then
  mkdir -p "$out/one"
  for e in plain zray0; do
    run 1 "$e" "$out/one/$e.json" "$@"
  done
fi
if [ -n "${BASE:-}" ]; then
  mkdir -p "$out/base"
  for e in zray0 zray1 zray2 zray3; do
    PYTHONPATH="$BASE${PYTHONPATH:+:$PYTHONPATH}" run "$ngpu" "$e" "$out/base/$e.json" "$@"
  done
fi
dirs=("$out")
[ -d "$out/one" ] && dirs+=("$out/one")
python3 "$here/gpt_throughput.py" --table "${dirs[@]}"
if [ -d "$out/base" ]; then
  echo "--- zray before the change (BASE=$BASE):"
  python3 "$here/gpt_throughput.py" --table "$out/base" | head -n 6
fi
