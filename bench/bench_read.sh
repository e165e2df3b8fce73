#!/bin/bash
# Runs bench_read hot and cold with both engines on generated files: one line
# per round, then a "summary" line (medians) per engine and cache state.
#   usage: bench/bench_read.sh [DIR [SIZE [REPEAT]]] [-- extra bench_read options]
#   BENCH_READ=path/to/bench_read (default: build/bench/bench_read)
# Cold runs drop the page cache (fadvise; /proc/sys/vm/drop_caches as root).
set -euo pipefail
dir=${1:-/tmp/mergestream-bench-read}
size=${2:-3G}
repeat=${3:-5}
shift $(( $# < 3 ? $# : 3 ))
if [ "${1:-}" = "--" ]; then shift; fi
bin=${BENCH_READ:-build/bench/bench_read}
if [ ! -x "$bin" ]; then
    echo "bench_read.sh: $bin not found (set BENCH_READ)" >&2
    exit 2
fi
mkdir -p "$dir"
"$bin" --gen "$dir" "$size" --repeat 1 "$@" >/dev/null
files=("$dir"/bench_read_*.bin)
for cache in hot cold; do
    flag=()
    if [ "$cache" = cold ]; then flag=(--drop-caches); fi
    for engine in uring pread; do
        "$bin" --engine "$engine" --repeat "$repeat" "${flag[@]}" "$@" "${files[@]}"
    done
done
