#!/usr/bin/env bash
# bench_hessian.sh: hessian throughput on the CPU as a fraction of the GEMM
# peak measured in the same run, for a generated model with Llama-3.2-1B
# layer shapes (hidden 2048, intermediate 8192, 32/8 heads, vocab 128256).
#
#   bench/bench_hessian.sh [BUILD_DIR]     (default: build)
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
# fraction leaves the output (a fixed ~330 MB per layer at these shapes,
# whatever the token count) out. Prints one "key value" line per figure.
set -euo pipefail
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

peak() { "$SGEMM" --threads "$THREADS" --seconds 2 | awk '/^sgemm_peak_gflops/ { print $2 }'; }
p1=$(peak)
"$MS_BIN" hessian "$WORK/model" --calib "$WORK/calib.txt" -o "$WORK/out" --batch-size "$BATCH" \
  --threads "$THREADS" --json --quiet > "$WORK/run.json"
p2=$(peak)
field() { awk -v k="\"$1\":" '$1 == k { gsub(/,/, "", $2); print $2 }' "$WORK/run.json"; }
tok_s=$(field tokens_per_second) gflops=$(field gflops_per_second) secs=$(field seconds)
tokens=$(field n_tokens) gflop=$(field gflop) rss=$(field peak_rss_bytes) out_s=$(field output_seconds)
awk -v p1="$p1" -v p2="$p2" -v g="$gflops" -v t="$tok_s" -v s="$secs" -v n="$tokens" -v f="$gflop" \
  -v rss="$rss" -v layers="$LAYERS" -v threads="$THREADS" -v out_s="$out_s" 'BEGIN {
  peak = p1 > p2 ? p1 : p2
  printf "model llama-3.2-1b-shapes layers %d, %d tokens, %d threads\n", layers, n, threads
  printf "sgemm_peak_gflops %.1f (before %.1f, after %.1f)\n", peak, p1, p2
  printf "hessian_seconds %.1f\n", s
  printf "hessian_tokens_per_second %.1f\n", t
  printf "hessian_output_seconds %.1f (writing and fsyncing the statistics)\n", out_s
  printf "hessian_gflop_per_token %.3f (all layers)\n", f / n
  printf "hessian_gflops %.1f\n", g
  printf "tokens_per_second_at_peak %.1f\n", t * peak / g
  printf "fraction_of_gemm_peak %.2f\n", g / peak
  printf "fraction_of_gemm_peak_without_output %.2f\n", f / (s - out_s) / peak
  printf "peak_rss_gb %.2f\n", rss / 1e9
}'
