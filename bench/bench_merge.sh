#!/usr/bin/env bash
# Merge throughput against a copy of the same bytes, hot and cold page cache.
#
#   bench/bench_merge.sh [--size 400M | --preset llama-1b] [--method ties|slerp|model_stock] [--max-memory 1G]
#                        [--dir DIR] [--hot-only|--cold-only] [--runs N] [--ram SIZE] [--disk-read RATE]
#                        [-- MERGE_OPTIONS]
#
# Generates a bf16 base of about SIZE plus two fine-tunes (kept in DIR for
# reuse), then for each cache state runs the copy baseline (bench_copy: read
# every input once, write one output-sized file, fsync) and the merge (TIES,
# density 0.2, two fine-tunes), and prints one line each with seconds, GB/s,
# the merge/copy ratio (merge_s: the whole process, planning, pool setup and
# the final verify included), run_s (the pipeline alone), read_x (bytes read
# over input bytes: above 1 where tensors in row chunks are read again for
# their apply pass and the page cache cannot keep them), CPU-seconds per GB
# of input, peak RSS and the per-stage busy fractions of run_s (compute:
# summed over the compute workers, so up to 2 with a GPU). "cold" drops the page cache (needs root); otherwise, or with
# --hot-only, "hot" only; --cold-only skips "hot". --runs N repeats each cache state N times (copy and
# merge in turn, in the order copy merge merge copy copy merge ...) and then
# prints the medians of the copy, the merge and the per-run ratio: on a
# machine whose fsync time varies the single ratio says little. --ram SIZE
# runs the copy and the merge in a memory cgroup of SIZE (root; cgroup v2 or
# v1), page cache included: inputs larger than SIZE cannot stay cached, as on
# a machine with less RAM than the model, so a tensor in row chunks reads
# its chunks from the disk again for every pass. --disk-read RATE (bytes per
# second, SI suffixes: 500M, 2G) runs both in a block-I/O cgroup that limits
# reads from DIR's disk to RATE (root; cgroup v2 io.max or v1 blkio
# throttle): a cold run then sees a disk of that speed whatever the VM's
# disk does meanwhile, which shows up to which disk speed the merge keeps
# pace with the copy on this machine's cores. Needs a release build in
# build/ (or $MS_BUILD).
set -euo pipefail
cd "$(dirname "$0")/.."
size=400M preset= method=ties maxmem=1G dir=/tmp/ms-bench extra=() hot_only=0 runs=1 ram= disk_read=
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift 2 ;;
    --preset) preset=$2; shift 2 ;;
    --method) method=$2; shift 2 ;;
    --max-memory) maxmem=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --hot-only) hot_only=1; shift ;;
    --cold-only) hot_only=-1; shift ;;
    --runs) runs=$2; shift 2 ;;
    --ram) ram=$2; shift 2 ;;
    --disk-read) disk_read=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
# the sizes checked before anything is generated or measured
bytes= rate=
if [ -n "$ram" ] && ! bytes=$(numfmt --from=iec "$ram" 2>/dev/null); then
  echo "bench_merge.sh: --ram: '$ram' is not a size (1G, 512M)" >&2; exit 2
fi
if [ -n "$disk_read" ] && ! rate=$(numfmt --from=si "$disk_read" 2>/dev/null); then
  echo "bench_merge.sh: --disk-read: '$disk_read' is not a rate in bytes per second (500M, 2G)" >&2; exit 2
fi
b=${MS_BUILD:-build}
bin=$b/pipeline/mergestream gen=$b/bench/gen_model copy=$b/bench/bench_copy
mkdir -p "$dir"
gen_preset=${preset:-sized:$size}
m="$dir/${preset:-$size}"
[ -f "$m/base/config.json" ] || $gen base "$m/base" --preset "$gen_preset" --dtype bf16 --seed 1
[ -f "$m/ft1/config.json" ] || $gen finetune "$m/base" "$m/ft1" --seed 2
[ -f "$m/ft2/config.json" ] || $gen finetune "$m/base" "$m/ft2" --seed 3
case "$method" in
  slerp) cat > "$m/recipe.yml" <<EOR
merge_method: slerp
base_model: ./base
models:
  - model: ./ft1
parameters: {t: 0.5}
dtype: bfloat16
EOR
  ;;
  model_stock) cat > "$m/recipe.yml" <<EOR
merge_method: model_stock
base_model: ./base
models:
  - model: ./ft1
  - model: ./ft2
dtype: bfloat16
EOR
  ;;
  *) cat > "$m/recipe.yml" <<EOR
merge_method: $method
base_model: ./base
models:
  - model: ./ft1
    parameters: {weight: 0.5, density: 0.2}
  - model: ./ft2
    parameters: {weight: 0.5, density: 0.2}
dtype: bfloat16
EOR
  ;;
esac
inputs=("$m"/base/*.safetensors "$m"/ft1/*.safetensors)
[ "$method" = slerp ] || inputs+=("$m"/ft2/*.safetensors)
in_bytes=$(cat "${inputs[@]}" | wc -c)
out_bytes=$(cat "$m"/base/*.safetensors | wc -c)

drop() { sync; echo 1 > /proc/sys/vm/drop_caches 2>/dev/null; }
cgs=() # the cgroups the copy and the merge run in
# a cgroup left by an earlier run would keep that run's limits
rmdir /sys/fs/cgroup/ms-bench /sys/fs/cgroup/{memory,blkio}/ms-bench 2>/dev/null || true
# cgroup_limit OPTION V2_CONTROLLER V2_FILE V2_VALUE V1_CONTROLLER V1_FILE V1_VALUE:
# the cgroup ms-bench with one limit set, added to cgs
cgroup_limit() {
  local cg
  if [ -w /sys/fs/cgroup/cgroup.subtree_control ]; then
    cg=/sys/fs/cgroup/ms-bench
    echo "+$2" > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
    mkdir -p "$cg" && echo "$4" > "$cg/$3"
  elif [ -d "/sys/fs/cgroup/$5" ] && mkdir -p "/sys/fs/cgroup/$5/ms-bench" 2>/dev/null; then
    cg=/sys/fs/cgroup/$5/ms-bench
    echo "$7" > "$cg/$6"
  else
    echo "$1 needs root and a $2 (v2) or $5 (v1) cgroup" >&2; exit 2
  fi
  [[ " ${cgs[*]-} " == *" $cg "* ]] || cgs+=("$cg")
}
if [ -n "$ram" ]; then
  cgroup_limit --ram memory memory.max "$bytes" memory memory.limit_in_bytes "$bytes"
fi
if [ -n "$disk_read" ]; then
  # the whole disk under DIR: throttling works on a disk's queue, not a partition's
  src=$(findmnt -no SOURCE --target "$dir")
  disk=$(lsblk -ndo PKNAME "$src" 2>/dev/null || true)
  majmin=$(lsblk -ndo MAJ:MIN "${disk:+/dev/$disk}${disk:-$src}" | tr -d ' ')
  if [ -z "$majmin" ]; then echo "--disk-read: no block device found under $dir ($src)" >&2; exit 2; fi
  cgroup_limit --disk-read io io.max "$majmin rbps=$rate" blkio blkio.throttle.read_bps_device "$majmin $rate"
fi
# runs "$@" inside the --ram and --disk-read cgroups, if any
limited() {
  if [ ${#cgs[@]} -gt 0 ]; then
    sh -c 'for g in "$@"; do [ "$g" = -- ] && break; echo $$ > "$g/cgroup.procs" || exit 1; done
           while [ "$1" != -- ]; do shift; done; shift; exec "$@"' sh "${cgs[@]}" -- "$@"
  else "$@"; fi
}
states=(hot)
if [ "$hot_only" != 1 ] && [ "$(id -u)" -eq 0 ] && drop; then
  if [ "$hot_only" = 0 ]; then states=(cold hot); else states=(cold); fi
fi
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
echo "inputs: ${#inputs[@]} files, $(numfmt --to=iec $in_bytes) bf16 ($method), max-memory $maxmem${ram:+, RAM limited to $ram}${disk_read:+, disk reads limited to ${disk_read}B/s}"
# median of the numbers on stdin
median() { sort -g | awk '{ v[NR] = $1 } END { print NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
prepare() { if [ "$state" = cold ]; then drop; else sync; cat "${inputs[@]}" > /dev/null; fi; }
measure_copy() { # sets c
  prepare
  c=$(limited $copy "$dir/copy.out" "$out_bytes" "${inputs[@]}" | sed 's/.*copy_seconds=\([0-9.]*\).*/\1/')
  rm -f "$dir/copy.out"
}
measure_merge() { # sets wall, run_s, read_b, cpu_s, rss, rb, cb, wb
  rm -rf "$dir/out"
  prepare
  limited /usr/bin/time -v "$bin" merge "$m/recipe.yml" -o "$dir/out" --max-memory "$maxmem" --json --quiet "${extra[@]}" \
    > "$dir/merge.json" 2> "$dir/time.txt"
  # the whole process (planning, pool setup, the run, the final verify), not just the run
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; print s}' "$dir/time.txt")
  cpu_s=$(awk -F': ' '/User time/ {u=$2} /System time/ {s=$2} END {print u + s}' "$dir/time.txt")
  rss=$(awk -F': ' '/Maximum resident/ {print $2}' "$dir/time.txt")
  json() { grep -o "\"$1\":[^,]*" "$dir/merge.json" | cut -d: -f2; }
  run_s=$(json wall_seconds) read_b=$(json bytes_read)
  rb=$(json read_busy_seconds)
  cb=$(json compute_busy_seconds) wb=$(json write_busy_seconds)
  rm -rf "$dir/out"
}
for state in "${states[@]}"; do
 : > "$dir/runs.txt"
 for run in $(seq "$runs"); do
  # copy then merge in odd runs, merge then copy in even ones: on a VM whose
  # runs alternate slow and fast (memory the previous run freed), a fixed
  # order would put every copy on one side of that pattern
  if [ $((run % 2)) -eq 1 ]; then measure_copy; measure_merge; else measure_merge; measure_copy; fi
  awk -v s="$state" -v c="$c" -v w="$wall" -v b="$in_bytes" -v cpu="$cpu_s" -v rss="$rss" -v rb="$rb" -v cb="$cb" -v wb="$wb" \
    -v run="$run_s" -v rd="$read_b" 'BEGIN {
    printf "cache=%s copy_s=%.2f copy_GBps=%.2f merge_s=%.2f merge_GBps=%.2f ratio=%.2f run_s=%.2f read_x=%.2f cpu_s_per_GB=%.2f peak_rss_MiB=%.0f busy(read/compute/write)=%.2f/%.2f/%.2f\n",
      s, c, b / c / 1e9, w, b / w / 1e9, w / c, run, rd / b, cpu / (b / 1e9), rss / 1024, rb / run, cb / run, wb / run }'
  echo "$c $wall" >> "$dir/runs.txt"
 done
 if [ "$runs" -gt 1 ]; then
  mc=$(awk '{ print $1 }' "$dir/runs.txt" | median)
  mw=$(awk '{ print $2 }' "$dir/runs.txt" | median)
  mr=$(awk '{ print $2 / $1 }' "$dir/runs.txt" | median)
  printf 'cache=%s runs=%s median: copy_s=%.2f merge_s=%.2f ratio=%.2f (per-run ratios %s)\n' "$state" "$runs" \
    "$mc" "$mw" "$mr" "$(awk '{ printf "%.2f ", $2 / $1 }' "$dir/runs.txt" | sed 's/ $//')"
 fi
done
