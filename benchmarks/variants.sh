#!/usr/bin/env bash
# One-off variants next to a full run: TAG ENGINE [flags] per line on stdin, results in OUTDIR.
#   printf 'nobias zray3 --no-bias\n' | benchmarks/variants.sh OUTDIR
set -u
out=${1:?usage: variants.sh OUTDIR < lines}
here=$(cd "$(dirname "$0")" && pwd)
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
mkdir -p "$out"
while read -r tag engine flags; do
  [ -n "$tag" ] && [ "${tag#\#}" = "$tag" ] || continue  # blank lines, comments
  echo "=== $engine [$tag]" >&2
  # shellcheck disable=SC2086  # flags are words on purpose
  torchrun --standalone --nproc_per_node "$ngpu" "$here/gpt_throughput.py" --engine "$engine" \
    --tag "$tag" --out "$out/$engine-$tag.json" $flags 2>&1 | grep -v "^\[rank\|^W1" | tail -n 40
done
python3 "$here/gpt_throughput.py" --table "$out"
