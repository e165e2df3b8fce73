#!/usr/bin/env bash
# The original Kaggle job, end to end: Llama-3.2-1B shapes in bf16, two
# rank-16 LoRA adapters on all linear layers, TIES at density 0.2, cold page
# cache (root) or hot. Prints wall time, where the time went and peak RSS.
#   bench/bench_lora.sh [--dir DIR] [--max-memory SIZE] [-- MERGE_OPTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=/tmp/ms-bench-lora maxmem=4G extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --max-memory) maxmem=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
b=${MS_BUILD:-build}
mkdir -p "$dir"
[ -f "$dir/base/config.json" ] || "$b/bench/gen_model" base "$dir/base" --preset llama-1b --dtype bf16 --seed 1
[ -f "$dir/a1/adapter_config.json" ] || "$b/bench/gen_model" lora "$dir/base" "$dir/a1" --seed 2 --rank 16 --alpha 32 --targets all-linear
[ -f "$dir/a2/adapter_config.json" ] || "$b/bench/gen_model" lora "$dir/base" "$dir/a2" --seed 3 --rank 16 --alpha 32 --targets all-linear
cat > "$dir/r.yml" <<EOR
merge_method: ties
base_model: ./base
models:
  - model: ./base+./a1
    parameters: {weight: 0.5, density: 0.2}
  - model: ./base+./a2
    parameters: {weight: 0.5, density: 0.2}
dtype: bfloat16
EOR
state=hot
if [ "$(id -u)" -eq 0 ]; then sync; echo 1 > /proc/sys/vm/drop_caches && state=cold; fi
rm -rf "$dir/out"
/usr/bin/time -v "$b/pipeline/mergestream" merge "$dir/r.yml" -o "$dir/out" --max-memory "$maxmem" --json --quiet "${extra[@]}" \
  > "$dir/merge.json" 2> "$dir/time.txt"
get() { grep -o "\"$1\":[^,]*" "$dir/merge.json" | cut -d: -f2 | tr -d ' \t'; }
echo "machine: $(nproc) cores; cache=$state; base $(du -sh "$dir/base" | cut -f1), adapters $(du -sh "$dir/a1" | cut -f1) each"
echo "wall_s=$(get wall_seconds) read_busy_s=$(get read_busy_seconds) compute_busy_s=$(get compute_busy_seconds) write_busy_s=$(get write_busy_seconds) bytes_read=$(get bytes_read) peak_rss_MiB=$(awk -F': ' '/Maximum resident/ {printf "%.0f", $2/1024}' "$dir/time.txt") process_wall=$(awk -F': ' '/Elapsed/ {print $2}' "$dir/time.txt")"
