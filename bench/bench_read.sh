#!/bin/bash
# Runs bench_read hot and cold with both engines on generated files and prints
# the summary lines.
#   usage: bench/bench_read.sh [DIR [SIZE [REPEAT]]] [-- extra bench_read options]
#   BENCH_READ=path/to/bench_read (default: build/bench/bench_read)
# Cold runs need root (drop_caches) or at least files the page cache can drop.
set -euo pipefail
dir=${1:-/tmp/mergestream-bench-read}
size=${2:-3G}
repeat=${3:-5}
shift $(( $# < 3 ? $# : 3 ))
[ "${1:-}" = "--" ] && shift
bin=${BENCH_READ:-build/bench/bench_read}
if [ ! -x "$bin" ]; then
    echo "bench_read.sh: $bin not found (set BENCH_READ)" >&2
    exit 2
fi
"$bin" --gen "$dir" "$size" --repeat 1 "$@" >/dev/null
files=("$dir"/bench_read_*.bin)
for cache in hot cold; do
    flag=()
    [ "$cache" = cold ] && flag=(--drop-caches)
    for engine in uring pread; do
        "$bin" --engine "$engine" --repeat "$repeat" "${flag[@]}" "$@" "${files[@]}" | tee /dev/stderr | grep '^summary' || true
    done
done 2>/dev/null
