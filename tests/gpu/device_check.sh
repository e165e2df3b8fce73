#!/usr/bin/env bash
# The GPU machine check: one call on a machine with an NVIDIA GPU (the
# `device` tool), a few minutes on an H100. Writes $OUT/summary.txt (the
# figures for bench/RESULTS.md) and the logs beside it.
#   1. configure and build with CUDA (Release)
#   2. every test but the slow ones, gpu-labelled included: GPU-vs-CPU byte
#      identity for every method (test_gpu_merge, test_gpu_merge_cli), the
#      gpu_alloc fault walk and --gpu-memory-limit fallbacks
#   3. a merge while another process holds nearly all GPU memory
#   4. bench: TIES on a Llama-3.2-1B-shaped bf16 model: copy, CPU (all
#      cores), GPU with two lanes (overlap) and with one; slerp and
#      model_stock hot, CPU and GPU; hessian tokens/s against the GEMM peak
# Every section appends to $OUT/summary.txt as it goes, so a run cut short
# still reports what it did.
# The device image has CMake, ninja, nvcc and PyTorch but not this project's
# C libraries: carry their Debian packages in .devdeps/ (see README).
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
note "cpu: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); commit $(git rev-parse --short HEAD 2>/dev/null)"
if [ -d .devdeps ]; then
  for f in .devdeps/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi

cmake -S . -B build-gpu -G Ninja -DMERGESTREAM_CUDA=ON -DCMAKE_BUILD_TYPE=Release > "$OUT/cmake.log" 2>&1 \
  || { note "configure: FAILED"; tail -30 "$OUT/cmake.log"; exit 1; }
if cmake --build build-gpu -j "$(nproc)" > "$OUT/build.log" 2>&1; then note "build (CUDA ON): ok"; else
  note "build (CUDA ON): FAILED"; grep -E "error" "$OUT/build.log" | head -20 | tee -a "$summary"; exit 1; fi

ctest --test-dir build-gpu -j 8 --output-on-failure -LE slow > "$OUT/ctest.log" 2>&1
note "tests: $(grep -E 'tests passed|tests failed' "$OUT/ctest.log" | tail -1)"
grep -E "^\s+[0-9]+ - .*\((Failed|Skipped|Timeout)" "$OUT/ctest.log" | sed 's/^/  /' | tee -a "$summary"
for t in $(ctest --test-dir build-gpu -N -L gpu | sed -nE 's/.*Test +#[0-9]+: ([^ ]+).*/\1/p'); do
  line=$(grep -E "Test +#[0-9]+: $t " "$OUT/ctest.log" | head -1 | sed 's/.*\.\.\.\s*//')
  note "  $t: ${line:-not run}"
done
note "tests done: $(( $(date +%s) - t0 )) s"

bin=build-gpu/pipeline/mergestream gen=build-gpu/bench/gen_model
B=/tmp/ms-bench/llama-1b  # shared with bench_merge.sh --preset llama-1b
mkdir -p $B
[ -f $B/base/config.json ] || $gen base $B/base --preset llama-1b --dtype bf16 --seed 1
[ -f $B/ft1/config.json ] || $gen finetune $B/base $B/ft1 --seed 2
[ -f $B/ft2/config.json ] || $gen finetune $B/base $B/ft2 --seed 3
printf 'merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./ft1\n    parameters: {weight: 0.5, density: 0.2}\n  - model: ./ft2\n    parameters: {weight: 0.5, density: 0.2}\ndtype: bfloat16\n' > $B/r.yml
$bin merge $B/r.yml -o $B/cpu --device cpu --max-memory 8G --quiet --force
# another process holds all but ~1.5 GiB of the GPU: the merge must still finish, same bytes
python3 - > "$OUT/hog.log" 2>&1 <<'EOPY' &
import time, torch
free, total = torch.cuda.mem_get_info()
hog = torch.empty(max(free - (1536 << 20), 0), dtype=torch.uint8, device="cuda")
print(f"holding {hog.numel() >> 20} MiB of {total >> 20} MiB", flush=True)
time.sleep(90)
EOPY
hog=$!
sleep 8
$bin merge $B/r.yml -o $B/hogged --device cuda --max-memory 8G --json --force > "$OUT/hogged.json" 2> "$OUT/hogged.err"
rc=$?
kill $hog 2>/dev/null; wait $hog 2>/dev/null
note "merge beside a GPU memory hog ($(head -1 "$OUT/hog.log")): exit $rc, $(grep -oE '"(tensors_gpu|tensors_cpu|gpu_fallbacks)":[^,]*' "$OUT/hogged.json" | tr -d '\t\n ' )"
if [ $rc -eq 0 ] && cmp -s $B/cpu/model.safetensors $B/hogged/model.safetensors; then note "  bytes == CPU-only merge"; else
  note "  BYTES DIFFER or merge failed"; tail -5 "$OUT/hogged.err" | tee -a "$summary"; fi
$bin merge $B/r.yml -o $B/gpu --device cuda --max-memory 8G --json --quiet --force > "$OUT/gpu.json"
if cmp -s $B/cpu/model.safetensors $B/gpu/model.safetensors; then note "llama-1b TIES: GPU bytes == CPU bytes"; else note "llama-1b TIES: GPU BYTES DIFFER"; fi

$bin merge $B/r.yml -o $B/gpu1 --device cuda --gpu-lanes 1 --max-memory 8G --quiet --force
if cmp -s $B/cpu/model.safetensors $B/gpu1/model.safetensors; then note "  --gpu-lanes 1: same bytes"; else note "  --gpu-lanes 1: BYTES DIFFER"; fi
rm -rf $B/cpu $B/gpu $B/gpu1 $B/hogged

bench() { # LABEL BENCH_MERGE_ARGS...
  MS_BUILD=build-gpu bash bench/bench_merge.sh --preset llama-1b --max-memory 8G --dir /tmp/ms-bench "${@:2}" 2>&1 \
    | grep -E "cache=" | sed "s/^/  $1 /" | tee -a "$summary"
}
note "bench (TIES density 0.2, Llama-3.2-1B shapes, 3 x 2.47 GB bf16, --max-memory 8G):"
bench "device=cuda lanes=2" -- --device cuda
bench "device=cuda lanes=1" --hot-only -- --device cuda --gpu-lanes 1
bench "device=cpu($(nproc) cores)" -- --device cpu
for m in slerp model_stock; do
  note "bench ($m, hot):"
  bench "device=cuda $m" --method $m --hot-only -- --device cuda
  bench "device=cpu $m" --method $m --hot-only -- --device cpu
done
note "bench done: $(( $(date +%s) - t0 )) s"
note "hessian (Llama-3.2-1B layer shapes, 2 layers, 4 x 2048 tokens):"
for dev in cuda cpu; do
  SAMPLES=4 bash bench/bench_hessian.sh --device $dev build-gpu > "$OUT/hessian_$dev.log" 2>&1
  sed "s/^/  $dev: /" "$OUT/hessian_$dev.log" | grep -vE "^  $dev: *$" | tail -12 | tee -a "$summary"
done
note "elapsed: $(( $(date +%s) - t0 )) s"
