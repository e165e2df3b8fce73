#!/usr/bin/env bash
# bench_hessian.sh: hessian throughput on the CPU or the GPU as a fraction
# of the GEMM peak measured in the same run, for a generated model with
# Llama-3.2-1B layer shapes (hidden 2048, intermediate 8192, 32/8 heads,
# vocab 128256).
#
#   bench/bench_hessian.sh [--device cpu|cuda] [BUILD_DIR]   (default: cpu, build)
#
# --device cuda: the run's GEMMs and Gram updates go through cuBLAS (fp32,
# no TF32) and the peak is cuBLAS's fp32 SGEMM rate on device-resident
# operands at the same shapes (bench_sgemm --cuda), so the fraction counts
# every transfer, the CPU's elementwise work and the statistics' trip back
# to the host against the run. The lines then start with "cuda_".
#
# Environment: LAYERS (default 2), SAMPLES (8), SEQ (2048), BATCH (1 sample
# per batch: 2048 tokens per GEMM), THREADS (all cores), MS_BIN (default
# BUILD_DIR/pipeline/mergestream), KEEP=1 keeps the work directory.
#
# The peak is bench_sgemm's best fp32 GEMM rate at the layer shapes, measured
# just before and just after the run (the larger of the two counts: the
# fraction is never flattered by a slow peak measurement). The run's rate is
# its useful FLOPs (linear layers, causal attention, Gram updates) over its
# wall time, weight reads, statistics output and fsync included; the second
# fraction leaves out the time the run waited on the output (a fixed ~330 MB
# per layer at these shapes, whatever the token count, written while the
# next layer runs). Prints one "key value" line per figure; with --device
# cuda also where the device's stream spent the whole layers' time
# (gpu_layer_split: CUDA events between the layer's steps) and how much of
# the layers' wall time the host spent between the steps.
set -euo pipefail
DEVICE=cpu
if [ "${1:-}" = "--device" ]; then DEVICE=${2:?--device needs cpu or cuda}; shift 2; fi
case "$DEVICE" in cpu|cuda) ;; *) echo "bench_hessian.sh: --device cpu|cuda, got '$DEVICE'" >&2; exit 2 ;; esac
BUILD=${1:-build}
LAYERS=${LAYERS:-2} SAMPLES=${SAMPLES:-8} SEQ=${SEQ:-2048} BATCH=${BATCH:-1}
THREADS=${THREADS:-$(nproc)}
MS_BIN=${MS_BIN:-$BUILD/pipeline/mergestream}
GEN=$BUILD/bench/gen_model SGEMM=$BUILD/bench/bench_sgemm
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ms-bench-hessian.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT

"$GEN" base "$WORK/model" --preset llama-1b --layers "$LAYERS" --seed 1
awk -v n="$SAMPLES" -v s="$SEQ" 'BEGIN { srand(7); for (i = 0; i < n; i++) { l = "";
  for (j = 0; j < s; j++) l = l (j ? " " : "") int(rand() * 128256); print l } }' > "$WORK/calib.txt"

if [ "$DEVICE" = cuda ]; then
  peak() { "$SGEMM" --cuda --seconds 2 | awk '/^sgemm_peak_gflops/ { print $2 }'; }
  gpu_name=$("$SGEMM" --cuda --seconds 0.1 | sed -n 's/^gpu //p')
  prefix=cuda_
else
  peak() { "$SGEMM" --threads "$THREADS" --seconds 2 | awk '/^sgemm_peak_gflops/ { print $2 }'; }
  gpu_name=""
  prefix=""
fi
p1=$(peak)
"$MS_BIN" hessian "$WORK/model" --calib "$WORK/calib.txt" -o "$WORK/out" --batch-size "$BATCH" \
  --threads "$THREADS" --device "$DEVICE" --json --quiet > "$WORK/run.json"
p2=$(peak)
field() { awk -v k="\"$1\":" '$1 == k { gsub(/,/, "", $2); print $2 }' "$WORK/run.json"; }
tok_s=$(field tokens_per_second) gflops=$(field gflops_per_second) secs=$(field seconds)
tokens=$(field n_tokens) gflop=$(field gflop) rss=$(field peak_rss_bytes) out_s=$(field output_seconds)
on_gpu=$(field batches_gpu) on_cpu=$(field batches_cpu) fallbacks=$(field gpu_fallbacks)
lay_s=$(field layers_seconds) lin_s=$(field linear_gemm_seconds) att_s=$(field attention_seconds)
stat_s=$(field statistics_seconds)
# the device stream's seconds in whole layers, by phase (null on the CPU)
ph=""
if [ "$DEVICE" = cuda ]; then
  for k in upload linear attention elementwise statistics idle download; do ph="$ph $(field "$k")"; done
fi
awk -v p1="$p1" -v p2="$p2" -v g="$gflops" -v t="$tok_s" -v s="$secs" -v n="$tokens" -v f="$gflop" \
  -v rss="$rss" -v layers="$LAYERS" -v threads="$THREADS" -v out_s="$out_s" -v x="$prefix" -v dev="$DEVICE" \
  -v gpu="$gpu_name" -v on_gpu="$on_gpu" -v on_cpu="$on_cpu" -v fb="$fallbacks" -v lay="$lay_s" -v lin="$lin_s" \
  -v att="$att_s" -v st="$stat_s" -v ph="$ph" 'BEGIN {
  peak = p1 > p2 ? p1 : p2
  printf "model llama-3.2-1b-shapes layers %d, %d tokens, %d threads, device %s%s\n", layers, n, threads, dev,
    gpu != "" ? " (" gpu ")" : ""
  printf "%ssgemm_peak_gflops %.1f (before %.1f, after %.1f)\n", x, peak, p1, p2
  printf "%shessian_seconds %.1f\n", x, s
  printf "%shessian_tokens_per_second %.1f\n", x, t
  printf "%shessian_output_seconds %.1f (the run waiting on the statistics: converting them, their writes, fsync)\n", x, out_s
  printf "%shessian_time_split linear GEMMs %.2f s, attention %.2f s, other layer work %.2f s, statistics %.2f s\n", \
    x, lin, att, lay - lin - att, st
  printf "%shessian_gflop_per_token %.3f (all layers)\n", x, f / n
  printf "%shessian_gflops %.1f\n", x, g
  printf "%stokens_per_second_at_peak %.1f\n", x, t * peak / g
  printf "%sfraction_of_gemm_peak %.2f\n", x, g / peak
  printf "%sfraction_of_gemm_peak_without_output %.2f\n", x, f / (s - out_s) / peak
  if (dev == "cuda")
    printf "%sbatch_steps %d on the GPU, %d on the CPU, %d GPU fallbacks\n", x, on_gpu, on_cpu, fb
  if (split(ph, p, " ") == 7) {
    dev_s = 0; for (i = 1; i <= 7; i++) dev_s += p[i]
    printf "%sgpu_layer_split upload %.2f s, linear %.2f, attention %.2f, elementwise %.2f, statistics %.2f, " \
      "idle %.2f, download %.2f; the host between the steps %.2f (of the layers %.2f s)\n", \
      x, p[1], p[2], p[3], p[4], p[5], p[6], p[7], lay - dev_s, lay
  }
  printf "%speak_rss_gb %.2f\n", x, rss / 1e9
}'
