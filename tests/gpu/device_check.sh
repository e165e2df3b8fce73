#!/usr/bin/env bash
# The GPU machine check: one call on a machine with an NVIDIA GPU (the
# `device` tool), done in a few minutes. Builds with CUDA, runs every test
# (gpu-labelled ones must pass, not skip), and a short bench; writes
# $OUT/summary.txt and the full log to $OUT/device_check.log.
#
# The device image has CMake, ninja and nvcc but not this project's C
# libraries: carry their Debian packages in .devdeps/ (see README, "GPU
# machine") and this script unpacks them first.
#
# Stages this script will grow into as the GPU backend lands (issue 4):
# GPU-vs-CPU byte identity for every method, a merge with a small
# --gpu-memory-limit and with gpu_alloc faults, a merge beside another
# process holding most GPU memory, and GPU/CPU/copy throughput.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
summary="$OUT/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
t0=$(date +%s)

note "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
note "cpu: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
if [ -d .devdeps ]; then
  for f in .devdeps/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi

cmake -S . -B build-gpu -G Ninja -DMERGESTREAM_CUDA=ON -DCMAKE_BUILD_TYPE=Release > "$OUT/cmake.log" 2>&1 \
  || { note "configure: FAILED"; tail -30 "$OUT/cmake.log"; exit 1; }
if cmake --build build-gpu -j "$(nproc)" > "$OUT/build.log" 2>&1; then
  note "build (CUDA ON): ok"
else
  note "build (CUDA ON): FAILED"; grep -E "error" "$OUT/build.log" | head -20; exit 1
fi

ctest --test-dir build-gpu -j 8 --output-on-failure -LE slow > "$OUT/ctest.log" 2>&1
note "tests: $(grep -E 'tests passed|tests failed' "$OUT/ctest.log" | tail -1)"
grep -E "^\s+[0-9]+ - .*\((Failed|Skipped|Timeout)" "$OUT/ctest.log" | sed 's/^/  /' | tee -a "$summary"
ctest --test-dir build-gpu -L gpu --output-on-failure > "$OUT/ctest_gpu.log" 2>&1
if grep -q "Skipped" "$OUT/ctest_gpu.log"; then note "gpu tests: SKIPPED (no usable device?)"; else
  note "gpu tests: $(grep -E 'tests passed|tests failed' "$OUT/ctest_gpu.log" | tail -1)"; fi
grep -h "GPU(s)" build-gpu/Testing/Temporary/LastTest*.log 2>/dev/null | head -1 | sed 's/^/  /' | tee -a "$summary"

note "bench (CPU backend on this machine's $(nproc) cores, TIES density 0.2, 3 x 1G bf16):"
MS_BUILD=build-gpu bash bench/bench_merge.sh --size 1G --max-memory 2G --dir /tmp/ms-bench 2>&1 | sed 's/^/  /' | tee -a "$summary"
note "elapsed: $(( $(date +%s) - t0 )) s"
