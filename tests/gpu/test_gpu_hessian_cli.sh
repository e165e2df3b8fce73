# hessian and perplexity with their GEMMs on the GPU (cuBLAS, fp32, no
# TF32) against the CPU's, through the real binary on a generated model:
# every statistic within a tight tolerance of the CPU's, the same names,
# shapes, sample and token counts; the mean NLL within 1e-4 relative. Then
# the fallbacks: MERGESTREAM_FAULT=gpu_alloc:N (N walked upward until no
# fallback happens) and gpu_alloc:1+ and a tiny --gpu-memory-limit send
# batches to the CPU, each with a "GPU out of memory on ...: using CPU" line,
# and the results still match the CPU's. Exit 77 where no GPU is usable.
source "$(dirname "$0")/../e2e/lib.bash"

M="$WORK/m"
"$MS_GEN" base "$M" --preset small --dtype bf16 --seed 5 # 4 layers, hidden 256, inter 688, vocab 1024
RANDOM=11
for i in $(seq 1 48); do # ~4,900 tokens: more than one 4,096-row fp32 block per statistic
  n=$((5 + RANDOM % 196)); line=""
  for j in $(seq 1 $n); do line="$line $((RANDOM % 1024))"; done
  echo "$line"
done > "$WORK/calib.txt"

if ! "$MS_BIN" perplexity "$M" --calib "$WORK/calib.txt" --max-samples 1 --device cuda --quiet \
  > /dev/null 2> "$WORK/probe.err"; then
  if grep -q "no usable GPU" "$WORK/probe.err"; then echo "SKIP: $(cat "$WORK/probe.err")"; exit 77; fi
  cat "$WORK/probe.err"; fail "perplexity --device cuda failed"
fi

# close_h DIR_CPU DIR_OTHER LABEL: same header (names, shapes, offsets,
# n_samples, n_tokens), and every element within 1e-4 x the largest |value|
# of its tensor (float32 sums in another order, through 4 layers); with
# DATA_ONLY=1 the headers may differ (the model's path). Prints the worst
# ratio |diff| / (1e-4 max) seen (tests/tools/st_close); returns 1 when it
# exceeds 1.
close_h() {
  local out rc=0
  out=$("$MS_ST_CLOSE" "$1/hessians.safetensors" "$2/hessians.safetensors" --rel 1e-4 ${DATA_ONLY:+--data-only}) ||
    rc=$?
  echo "$3: $out"
  [ "$rc" -le 1 ] || fail "$3: st_close could not compare"
  return "$rc"
}


# mean NLLs within 1e-4 relative
close_nll() {
  awk -v a="$1" -v b="$2" -v label="$3" 'BEGIN { d = a - b; d = d < 0 ? -d : d; r = d / (a < 0 ? -a : a)
    printf "%s: mean NLL %.9g vs %.9g (relative %.2g)\n", label, a, b, r; exit !(r <= 1e-4) }'
}

H() { "$MS_BIN" hessian "$M" --calib "$WORK/calib.txt" --batch-size 5 "$@"; }
P() { "$MS_BIN" perplexity "$M" --calib "$WORK/calib.txt" --batch-size 5 --json "$@"; }

H -o "$WORK/cpu" --device cpu --json --quiet > "$WORK/cpu.json"
H -o "$WORK/gpu" --device cuda --json --quiet > "$WORK/gpu.json"
grep -qE '"device":[[:space:]]*"cuda"' "$WORK/gpu.json" || fail "hessian --device cuda did not report cuda"
[ "$(json_num "$WORK/gpu.json" batches_gpu)" -gt 0 ] || fail "no batch ran on the GPU"
[ "$(json_num "$WORK/gpu.json" batches_cpu)" -eq 0 ] || fail "batches fell back without a reason"
[ "$(json_num "$WORK/gpu.json" n_tokens)" = "$(json_num "$WORK/cpu.json" n_tokens)" ] || fail "token counts differ"
close_h "$WORK/cpu" "$WORK/gpu" "hessian cuda vs cpu" || fail "GPU statistics differ from the CPU's"
# the statistics converted on the device (not yet run on a GPU: behind
# MERGESTREAM_GPU_UNVERIFIED) against the same sums brought back through the
# host: the same expression, the same bytes
MERGESTREAM_GPU_UNVERIFIED=1 H -o "$WORK/gpu_out" --device cuda --quiet
MERGESTREAM_GPU_UNVERIFIED=0 H -o "$WORK/gpu_host" --device cuda --quiet
cmp -s "$WORK/gpu_out/hessians.safetensors" "$WORK/gpu_host/hessians.safetensors" ||
  fail "statistics converted on the GPU differ from those converted on the host"
# the comparison can fail: another model of the same shapes
"$MS_GEN" base "$WORK/m2" --preset small --dtype bf16 --seed 6
"$MS_BIN" hessian "$WORK/m2" --calib "$WORK/calib.txt" --batch-size 5 -o "$WORK/other" --device cpu --quiet
if DATA_ONLY=1 close_h "$WORK/cpu" "$WORK/other" "another model"; then fail "close_h cannot tell two models apart"; fi
DATA_ONLY=1 close_h "$WORK/cpu" "$WORK/gpu" "data only" > /dev/null || fail "DATA_ONLY comparison broken"

P --device cpu --quiet > "$WORK/ppl_cpu.json"
P --device cuda --quiet > "$WORK/ppl_gpu.json"
nll_cpu=$(json_num "$WORK/ppl_cpu.json" mean_nll)
close_nll "$nll_cpu" "$(json_num "$WORK/ppl_gpu.json" mean_nll)" "perplexity cuda vs cpu" || fail "GPU NLL differs"
[ "$(json_num "$WORK/ppl_gpu.json" batches_gpu)" -gt 0 ] || fail "perplexity: no batch ran on the GPU"

# every device request fails: every batch on the CPU, one line each, same result
MERGESTREAM_FAULT=gpu_alloc:1+ H -o "$WORK/all" --device cuda --json > "$WORK/all.json" 2> "$WORK/all.err" ||
  { cat "$WORK/all.err"; fail "gpu_alloc:1+ failed the run"; }
grep -qE "GPU out of memory on layer 1/4, batch 1/10 \(needs [0-9.]+ MiB.*\): using CPU" "$WORK/all.err" ||
  { cat "$WORK/all.err"; fail "gpu_alloc:1+: no fallback line"; }
[ "$(json_num "$WORK/all.json" batches_gpu)" -eq 0 ] || fail "gpu_alloc:1+: a batch ran on the GPU"
[ "$(json_num "$WORK/all.json" gpu_fallbacks)" -gt 0 ] || fail "gpu_alloc:1+: no fallback counted"
close_h "$WORK/cpu" "$WORK/all" "gpu_alloc:1+" || fail "gpu_alloc:1+: statistics differ"
MERGESTREAM_FAULT=gpu_alloc:1+ P --device cuda > "$WORK/all_ppl.json" 2> "$WORK/all_ppl.err" ||
  { cat "$WORK/all_ppl.err"; fail "perplexity gpu_alloc:1+ failed"; }
grep -q "GPU out of memory on .*: using CPU" "$WORK/all_ppl.err" || fail "perplexity gpu_alloc:1+: no fallback line"
close_nll "$nll_cpu" "$(json_num "$WORK/all_ppl.json" mean_nll)" "perplexity gpu_alloc:1+" || fail "NLL differs"

# a cap below one layer's gate/up weight (1.4 MB): those batches on the CPU
H -o "$WORK/capped" --device cuda --gpu-memory-limit 1M --json > "$WORK/capped.json" 2> "$WORK/capped.err"
[ "$(json_num "$WORK/capped.json" gpu_fallbacks)" -gt 0 ] || fail "--gpu-memory-limit 1M: no fallback"
grep -qE "GPU out of memory on .*--gpu-memory-limit 1 MiB\): using CPU" "$WORK/capped.err" ||
  { head -3 "$WORK/capped.err"; fail "--gpu-memory-limit 1M: no fallback line naming the limit"; }
close_h "$WORK/cpu" "$WORK/capped" "--gpu-memory-limit 1M" || fail "--gpu-memory-limit 1M: statistics differ"

# walk the N-th device request (Fibonacci steps) until a run needs no fallback
n=1 next=2
while :; do
  rc=0
  MERGESTREAM_FAULT="gpu_alloc:$n" H -o "$WORK/f$n" --device cuda --json > "$WORK/f.json" 2> "$WORK/f.err" || rc=$?
  [ "$rc" -eq 0 ] || { cat "$WORK/f.err"; fail "gpu_alloc:$n failed the run"; }
  if [ "$(json_num "$WORK/f.json" gpu_fallbacks)" -eq 0 ]; then echo "gpu_alloc walk: no fallback from N=$n on"; break; fi
  [ "$(grep -c "GPU out of memory on .*: using CPU" "$WORK/f.err")" -eq 1 ] ||
    { cat "$WORK/f.err"; fail "gpu_alloc:$n: expected one fallback line"; }
  close_h "$WORK/cpu" "$WORK/f$n" "gpu_alloc:$n" > /dev/null || fail "gpu_alloc:$n: statistics differ"
  rc=0
  MERGESTREAM_FAULT="gpu_alloc:$n" P --device cuda > "$WORK/fp.json" 2> "$WORK/fp.err" || rc=$?
  [ "$rc" -eq 0 ] || { cat "$WORK/fp.err"; fail "perplexity gpu_alloc:$n failed"; }
  close_nll "$nll_cpu" "$(json_num "$WORK/fp.json" mean_nll)" "perplexity gpu_alloc:$n" > /dev/null ||
    fail "perplexity gpu_alloc:$n: NLL differs"
  rm -rf "$WORK/f$n"
  t=$((n + next)); n=$next; next=$t
  [ "$n" -lt 100000 ] || fail "gpu_alloc walk: still falling back at N=$n"
done
echo "test_gpu_hessian_cli: ok"
