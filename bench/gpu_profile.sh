#!/usr/bin/env bash
# Where a GPU merge's time goes, on a machine with an NVIDIA GPU.
#
#   bench/gpu_profile.sh [--size 1G] [--dir DIR] [METHOD...]   (default: ties slerp model_stock)
#
# For each method: bench_merge.sh --hot-only (generates the bf16 models of
# SIZE once, runs the copy baseline and the merge), then one more merge with
# every log line stamped with the seconds since the process started (CUDA
# initialisation, pinning the staging pool, the run, the final verify), the
# run's JSON (wall, per-stage busy seconds), and, when nsys is installed, its
# summary of CUDA API calls, kernels and copies. Also the CUDA driver's
# persistence mode (off: every process pays the driver's start-up).
# MS_BUILD selects the build (default build).
set -uo pipefail
cd "$(dirname "$0")/.."
size=1G dir=/tmp/ms-profile methods=()
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    -h|--help) sed -n 2,14p "$0"; exit 0 ;;
    *) methods+=("$1"); shift ;;
  esac
done
[ ${#methods[@]} -gt 0 ] || methods=(ties slerp model_stock)
b=${MS_BUILD:-build}
bin=$b/pipeline/mergestream
echo "persistence mode: $(nvidia-smi --query-gpu=persistence_mode --format=csv,noheader 2>&1 | head -1)"
stamp() { # prefixes each line with the seconds since $1 (an EPOCHREALTIME)
  while IFS= read -r line; do
    awk -v t="$EPOCHREALTIME" -v s="$1" -v l="$line" 'BEGIN { printf "%7.2f  %s\n", t - s, l }'
  done
}
for m in "${methods[@]}"; do
  echo "== $m"
  MS_BUILD=$b bash bench/bench_merge.sh --size "$size" --method "$m" --max-memory 4G --dir "$dir" --hot-only \
    -- --device cuda 2>&1 | grep -E "cache=|inputs:"
  recipe="$dir/$size/recipe.yml"
  start=$EPOCHREALTIME
  "$bin" merge "$recipe" -o "$dir/out" --device cuda --max-memory 4G --force --json 2> >(stamp "$start" | grep -v "%") \
    > "$dir/run.json"
  wait
  awk -v t="$EPOCHREALTIME" -v s="$start" 'BEGIN { printf "%7.2f  process exit\n", t - s }'
  tr -d '\n\t ' < "$dir/run.json" | grep -oE '"(wall_seconds|read_busy_seconds|compute_busy_seconds|write_busy_seconds|tensors_gpu|tensors_cpu|compute_workers)":[0-9.e-]+' \
    | tr '\n' ' '
  echo
  if command -v nsys > /dev/null; then
    nsys profile -o "$dir/prof_$m" --force-overwrite true --stats=false "$bin" merge "$recipe" -o "$dir/out" \
      --device cuda --max-memory 4G --force --quiet > /dev/null 2>&1
    nsys stats -q --report cuda_api_sum,cuda_gpu_kern_sum,cuda_gpu_mem_time_sum --format csv "$dir/prof_$m.nsys-rep" \
      2> /dev/null | awk -F, 'NR == 1 || /Time|cuda|k_|Memcpy|memcpy|Memset|Register|Malloc|Synchronize/' | cut -d, -f1-4,9 \
      | head -40
  else
    echo "(nsys not installed: no kernel and copy breakdown)"
  fi
  rm -rf "$dir/out"
done
