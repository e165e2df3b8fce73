#!/usr/bin/env bash
# The GPU machine check: one call on a machine with an NVIDIA GPU (the
# `device` tool), about 6 minutes on an H100/H200 (FULL=1 adds the benches
# marked below, about a minute more). Writes $OUT/summary.txt
# (the figures for bench/RESULTS.md) and the logs beside it. Most important
# first, every section appending to the summary as it goes, so a run cut
# short still reports what it did:
#   1. configure and build with CUDA (Release; only this card's architecture
#      unless ARCHS is set)
#   2. the gpu-labelled tests: GPU-vs-CPU byte identity for every method
#      (kernels side by side, and through the binary whole, chunked, one and
#      two lanes), concurrent calls, the gpu_alloc fault walks and
#      --gpu-memory-limit fallbacks, cuBLAS GEMMs and hessian/perplexity on
#      the GPU against the CPU
#   3. Llama-3.2-1B-shaped TIES: GPU bytes == CPU bytes, and a merge while
#      another process holds nearly all GPU memory; the Hessian-aware merges
#      of a one-layer 1B-shaped model (Hessians factored on the GPU): same
#      bytes, and their times on the GPU and the CPU
#   4. bench (hot page cache): hessian tokens/s on the GPU against its GEMM
#      peak (whole decoder layers on the device, where the device's time
#      went), the Gram updates' rates and the tuning variables' effect on a
#      4-layer run; TIES copy / GPU
#      / CPU on every core; slerp and model_stock on GPU and CPU; FULL=1:
#      TIES with one GPU lane and with the pool pageable, hessian on the
#      CPU, and a cold CPU TIES with and without --direct-io; last,
#      bench_cholesky at down_proj's n = 8192 on the CPU and the GPU
#   5. every other test (unit, e2e: with a GPU present `--device auto` puts
#      the e2e merges on it), run beside step 2 (neither is timed)
# The device image has CMake, ninja, nvcc and PyTorch but not this project's
# C libraries: carry their Debian packages in .devdeps/ (see README).
set -uo pipefail
cd "$(dirname "$0")/../.."
# GPU code not yet run on a GPU (pipeline/backend_registry.c) is on for every
# test and bench below: this run is what verifies it
export MERGESTREAM_GPU_UNVERIFIED=1
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
summary="$OUT/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
t0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - t0 )) s"; }
note "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
note "cpu: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); commit $(cat .devsrc/commit 2>/dev/null || git rev-parse --short HEAD 2>/dev/null)"
if [ -d .devdeps ]; then
  for f in .devdeps/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi

# 1. build
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
ARCHS=${ARCHS:-${cap:-90}}
cmake -S . -B build-gpu -G Ninja -DMERGESTREAM_CUDA=ON -DMERGESTREAM_CUDA_ARCHS="$ARCHS" -DCMAKE_BUILD_TYPE=Release \
  > "$OUT/cmake.log" 2>&1 || { note "configure: FAILED"; tail -30 "$OUT/cmake.log"; exit 1; }
if cmake --build build-gpu -j "$(nproc)" > "$OUT/build.log" 2>&1; then note "build (CUDA ON, sm_$ARCHS): ok, $(elapsed)"; else
  note "build (CUDA ON): FAILED"; grep -E "error" "$OUT/build.log" | head -20 | tee -a "$summary"; exit 1; fi

# 2. the GPU tests, and 5. every other test beside them
ctest --test-dir build-gpu -j 8 --output-on-failure -LE "slow|gpu" --timeout 300 > "$OUT/ctest.log" 2>&1 &
others=$!
ctest --test-dir build-gpu -j 4 --output-on-failure -L gpu --timeout 300 > "$OUT/ctest_gpu.log" 2>&1
note "gpu tests: $(grep -E 'tests passed|tests failed' "$OUT/ctest_gpu.log" | tail -1), $(elapsed)"
grep -E "Test +#[0-9]+: " "$OUT/ctest_gpu.log" | sed -E 's/^ *[0-9]+\/[0-9]+ Test +#[0-9]+: /  /' | tee -a "$summary"
wait $others
note "other tests: $(grep -E 'tests passed|tests failed' "$OUT/ctest.log" | tail -1), $(elapsed)"
grep -E "^\s+[0-9]+ - .*\((Failed|Timeout)" "$OUT/ctest.log" | sed 's/^/  /' | tee -a "$summary"

# 3. a 1B-shaped merge: same bytes on the GPU, and beside a GPU memory hog
bin=build-gpu/pipeline/mergestream gen=build-gpu/bench/gen_model
B=/tmp/ms-bench/llama-1b  # shared with bench_merge.sh --preset llama-1b
mkdir -p $B
[ -f $B/base/config.json ] || $gen base $B/base --preset llama-1b --dtype bf16 --seed 1
[ -f $B/ft1/config.json ] || $gen finetune $B/base $B/ft1 --seed 2
[ -f $B/ft2/config.json ] || $gen finetune $B/base $B/ft2 --seed 3
printf 'merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./ft1\n    parameters: {weight: 0.5, density: 0.2}\n  - model: ./ft2\n    parameters: {weight: 0.5, density: 0.2}\ndtype: bfloat16\n' > $B/r.yml
$bin merge $B/r.yml -o $B/cpu --device cpu --max-memory 8G --quiet --force
$bin merge $B/r.yml -o $B/gpu --device cuda --max-memory 8G --json --quiet --force > "$OUT/gpu.json"
if cmp -s $B/cpu/model.safetensors $B/gpu/model.safetensors; then note "llama-1b TIES: GPU bytes == CPU bytes"; else note "llama-1b TIES: GPU BYTES DIFFER"; fi
# another process holds all but ~1.5 GiB of the GPU: the merge must still finish, same bytes
python3 - > "$OUT/hog.log" 2>&1 <<'EOPY' &
import time, torch
free, total = torch.cuda.mem_get_info()
hog = torch.empty(max(free - (1536 << 20), 0), dtype=torch.uint8, device="cuda")
print(f"holding {hog.numel() >> 20} MiB of {total >> 20} MiB", flush=True)
time.sleep(60)
EOPY
hog=$!
sleep 8
$bin merge $B/r.yml -o $B/hogged --device cuda --max-memory 8G --json --force > "$OUT/hogged.json" 2> "$OUT/hogged.err"
rc=$?
kill $hog 2>/dev/null; wait $hog 2>/dev/null
note "merge beside a GPU memory hog ($(head -1 "$OUT/hog.log")): exit $rc, $(grep -oE '"(tensors_gpu|tensors_cpu|gpu_fallbacks)":[^,]*' "$OUT/hogged.json" | tr -d '\t\n ' )"
if [ $rc -eq 0 ] && cmp -s $B/cpu/model.safetensors $B/hogged/model.safetensors; then note "  bytes == CPU-only merge"; else
  note "  BYTES DIFFER or merge failed"; tail -5 "$OUT/hogged.err" | tee -a "$summary"; fi
rm -rf $B/cpu $B/gpu $B/hogged

# the Hessian-aware merges, one 1B-shaped layer (vocab 4096), Hessians from 16 x 512 tokens
H=/tmp/ms-bench/hess1
mkdir -p $H
[ -f $H/base/config.json ] || $gen base $H/base --preset llama-1b --layers 1 --vocab 4096 --dtype bf16 --seed 1 > /dev/null
[ -f $H/ft1/config.json ] || $gen finetune $H/base $H/ft1 --seed 2 > /dev/null
[ -f $H/ft2/config.json ] || $gen finetune $H/base $H/ft2 --seed 3 > /dev/null
for i in $(seq 1 16); do seq 1 512 | awk -v s=$i '{printf "%d ", ($1 * 7919 + s * 104729) % 4096} END {print ""}'; done > $H/calib.txt
for m in ft1 ft2; do $bin hessian $H/$m --calib $H/calib.txt -o $H/h_$m --device cuda --quiet --force; done
for m in ties_sparsegpt regmean; do
  p="weight: 0.5, density: 0.2, "; [ $m = regmean ] && p=""
  printf 'merge_method: %s\nbase_model: ./base\nmodels:\n  - model: ./ft1\n    parameters: {%shessian: ./h_ft1}\n  - model: ./ft2\n    parameters: {%shessian: ./h_ft2}\ndtype: bfloat16\n' $m "$p" "$p" > $H/$m.yml
  $bin merge $H/$m.yml -o $H/cpu --device cpu --json --quiet --force > "$OUT/${m}_cpu.json"
  $bin merge $H/$m.yml -o $H/gpu --device cuda --json --quiet --force > "$OUT/${m}_gpu.json"
  w() { grep -oE "\"$2\":[[:space:]]*[-0-9.e+]+" "$1" | grep -oE '[-0-9.e+]+$'; }
  same="GPU BYTES DIFFER"; cmp -s $H/cpu/model.safetensors $H/gpu/model.safetensors && same="GPU bytes == CPU bytes"
  note "1B-shaped layer, $m: $same; cpu $(w "$OUT/${m}_cpu.json" wall_seconds) s, cuda $(w "$OUT/${m}_gpu.json" wall_seconds) s ($(w "$OUT/${m}_gpu.json" hessian_factorisations_gpu) factorisations, $(w "$OUT/${m}_gpu.json" tensors_gpu) tensors on the GPU)"
done
rm -rf $H/cpu $H/gpu

# 4. bench, hot page cache
hessian() { # LABEL DEVICE LAYERS SAMPLES [PATTERN]: bench_hessian.sh's figures (the lines matching PATTERN)
  LAYERS=$3 SAMPLES=$4 bash bench/bench_hessian.sh --device $2 build-gpu > "$OUT/hessian_$1.log" 2>&1
  grep -vE "^\s*$" "$OUT/hessian_$1.log" | tail -16 | grep -E -- "${5:-.}" | sed "s/^/  $1: /" | tee -a "$summary"
}
note "hessian (Llama-3.2-1B shapes: on the GPU all 16 layers, 64 x 2048 tokens as the original's calibration; FULL=1 on the CPU 2 layers, 4 x 2048):"
hessian cuda cuda 16 64
[ "${FULL:-0}" = 1 ] && hessian cpu cpu 2 4
# What would move the GPU's figure: the Gram updates' rate by column blocks
# against one cublasSsyrk, and 4-layer runs with each tuning variable
# (backend_registry.h) against none
note "Gram updates on the device (bench_sgemm --cuda --gram):"
build-gpu/bench/bench_sgemm --cuda --gram --seconds 3 2>&1 | grep -E "^(sgemm|gram)" | sed "s/^/  /" | tee -a "$summary"
note "hessian tuning (4 layers, 32 x 2048 tokens):"
sel="fraction_of_gemm_peak |gpu_layer_split"
hessian tune-default cuda 4 32 "$sel"
MERGESTREAM_GPU_GRAM_BLOCK=2048 hessian tune-gram2048 cuda 4 32 "$sel"
MERGESTREAM_GPU_ATTEND_ROWS=512 hessian tune-attend512 cuda 4 32 "$sel"
bench() { # LABEL BENCH_MERGE_ARGS...
  MS_BUILD=build-gpu bash bench/bench_merge.sh --preset llama-1b --max-memory 8G --dir /tmp/ms-bench --hot-only "${@:2}" \
    2>&1 | grep -E "cache=" | sed "s/^/  $1 /" | tee -a "$summary"
}
note "bench (TIES density 0.2, Llama-3.2-1B shapes, 3 x 2.47 GB bf16, --max-memory 8G, hot):"
bench "device=cuda lanes=2" -- --device cuda
bench "device=cpu($(nproc) cores)" -- --device cpu
if [ "${FULL:-0}" = 1 ]; then
  bench "device=cuda lanes=1" -- --device cuda --gpu-lanes 1
  MERGESTREAM_GPU_PIN=0 bench "device=cuda pool-pageable" -- --device cuda  # pinning's start-up cost against its copy speed
fi
for m in slerp model_stock; do
  note "bench ($m, hot):"
  bench "device=cuda $m" --method $m -- --device cuda
  bench "device=cpu $m" --method $m -- --device cpu
done
if [ "${FULL:-0}" = 1 ] && [ "$(id -u)" -eq 0 ]; then
  # --direct-io on a many-core host with a real disk (bench_merge.sh drops
  # the page cache: root only); this project's VM could not tell whether it
  # should be the default (bench/RESULTS.md, seventh session)
  cold() { # LABEL BENCH_MERGE_ARGS...
    MS_BUILD=build-gpu bash bench/bench_merge.sh --preset llama-1b --max-memory 8G --dir /tmp/ms-bench --cold-only \
      --runs 2 "${@:2}" 2>&1 | grep -E "median" | sed "s/^/  $1 /" | tee -a "$summary"
  }
  note "bench (TIES, cold, CPU, through the page cache and with --direct-io):"
  cold "device=cpu page-cache" -- --device cpu
  cold "device=cpu direct-io" -- --device cpu --direct-io
fi
note "bench_cholesky --n 8192 (down_proj's Hessian; GPU seconds with the copies):"
build-gpu/bench/bench_cholesky --n 8192 --no-old --gpu 2>&1 | sed 's/^/  /' | tee -a "$summary"
note "elapsed: $(elapsed)"
